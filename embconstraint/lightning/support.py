"""What the Lightning callback needs besides :func:`~embconstraint.constrain` and
:func:`~embconstraint.release`, written as library functions that import no Lightning package
(the Trainer and the LightningModule are duck-typed): the strategy and precision checks, the
install during ``configure_model``, the hints added to a failing run's exception, and the release
of what the callback installed.

>>> import torch
>>> emb = torch.nn.Embedding(4, 2)
>>> hint = non_leaf_hint(ValueError("can't optimize a non-leaf Tensor"), torch.nn.Sequential(emb), emb)
>>> "self.0.parameters()" in hint
True
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_module_registration_hook

from .._mechanism import as_reference, check_reference, pin_of, tied_modules
from ..core import is_constrained, release

__all__ = [
    "add_note",
    "check_trainer",
    "defer_until_configured",
    "install_in_configure_model",
    "lightning_classes",
    "non_leaf_hint",
    "release_installed",
    "optimizer_state_problem",
    "optimizer_groups_problem",
]

# Strategies not supported: FSDP1 and XLA FSDP flatten parameters (the free rows would no longer be the
# embedding's own Parameter, and their state dicts are post-processed by parameter name, after the
# constraint's hooks renamed it); Lightning's DeepSpeedStrategy is not tested with the callback (DeepSpeed
# itself is supported through deepspeed.initialize and the transformers Trainer). ModelParallelStrategy
# (FSDP2 fully_shard and tensor parallelism, applied in configure_model) is supported.
_UNSUPPORTED_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy"})
# Precisions that cast the whole module (the pinned rows too) to another dtype after setup.
_TRUE_PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def add_note(exception: BaseException, note: str) -> None:
    """``exception.add_note(note)``; before Python 3.11, appended to a one-argument message."""
    if hasattr(exception, "add_note"):
        exception.add_note(note)
    elif len(exception.args) == 1 and isinstance(exception.args[0], str):
        exception.args = (f"{exception.args[0]}\n{note}",)


def lightning_classes(attr: str) -> list[type]:
    """``attr`` (e.g. ``"Callback"``) of each installed Lightning package."""
    classes = []
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            classes.append(getattr(importlib.import_module(name), attr))
        except ImportError:
            pass
    return classes


def defer_until_configured(pl_module: nn.Module, path: str) -> bool:
    """Whether the embedding at ``path`` is missing and ``pl_module`` overrides ``configure_model``
    (which may create it)."""
    try:
        pl_module.get_submodule(path)
        return False
    except AttributeError:
        configure = getattr(type(pl_module), "configure_model", None)
        return configure is not None and all(
            configure is not getattr(base, "configure_model", None)
            for base in lightning_classes("LightningModule")
        )


def install_in_configure_model(
    pl_module: nn.Module, path: str, installed: Callable[[], bool], install: Callable[[], None]
) -> None:
    """Make ``pl_module.configure_model`` call ``install()`` the moment the embedding at ``path``
    (or its parent) is assigned, so before a ``fully_shard`` that follows, and at the latest right
    after ``configure_model``, unless ``installed()`` says it already ran."""
    original = pl_module.configure_model
    busy: list[bool] = []

    def on_register(module: nn.Module, name: str, submodule: nn.Module) -> None:
        # (constrain itself registers modules: `busy` stops the recursion)
        if busy or installed() or not any(m is module for m in pl_module.modules()):
            return
        busy.append(True)
        try:
            module._modules[name] = submodule  # the hook runs before the assignment: attach first
            if defer_until_configured(pl_module, path) is False:
                install()
        finally:
            busy.clear()

    @functools.wraps(original)
    def configure_model() -> None:
        handle = register_module_module_registration_hook(on_register)
        try:
            original()
        finally:
            handle.remove()
            pl_module.__dict__.pop("configure_model", None)
        if not installed():
            install()

    pl_module.configure_model = configure_model  # Lightning looks the hook up on the instance


def check_trainer(trainer: Any, embedding: nn.Module, reference: nn.Module | Tensor) -> None:
    """Refuse (``ValueError``) a strategy that is not supported (FSDP1, XLA FSDP, Lightning's
    DeepSpeed strategy) and a ``*-true`` precision that cannot hold the reference exactly."""
    names = {cls.__name__ for cls in type(getattr(trainer, "strategy", None)).__mro__}
    refused = sorted(names & _UNSUPPORTED_STRATEGIES)
    if refused:
        raise ValueError(
            f"EmbeddingConstraint does not support {refused[0]}. Use strategy='ddp' (the pinned rows are not "
            "buffers, so DDP never broadcasts them), or ModelParallelStrategy with fully_shard and/or "
            "tensor parallelism (embconstraint.parallel's RowwiseParallel / ColwiseParallel) applied in "
            "configure_model. DeepSpeed ZeRO works through deepspeed.initialize and the transformers Trainer "
            "(embconstraint's guide 'DeepSpeed and tensor parallelism')."
        )
    dtype = _TRUE_PRECISION_DTYPES.get(str(getattr(trainer, "precision", "")))
    if dtype is not None:
        meta = torch.empty(embedding.weight.shape, dtype=dtype, device="meta")
        try:
            check_reference(as_reference(reference), meta)
        except ValueError as err:
            raise ValueError(f"EmbeddingConstraint with precision={trainer.precision!r}: {err}") from None


def non_leaf_hint(exception: BaseException, root: nn.Module, embedding: nn.Module) -> str | None:
    """The fix for torch's "can't optimize a non-leaf Tensor" when ``configure_optimizers``
    named the constrained ``weight`` (computed from the trainable rows, so not a leaf)."""
    if not (isinstance(exception, ValueError) and "non-leaf Tensor" in str(exception)):
        return None
    path = next((name for name, m in root.named_modules() if m is embedding), "")
    prefix = f"{path}." if path else ""
    return (
        f"EmbeddingConstraint: {prefix or 'the embedding.'}weight of a constrained embedding is computed "
        f"from its trainable rows, so an optimizer cannot hold it: in configure_optimizers pass "
        f"self.{prefix}parameters() instead (one (V - n, D) Parameter, named "
        f"'{prefix}parametrizations.weight.original'; name-based param groups must use that name)."
    )


def release_installed(embedding: nn.Module, root: nn.Module | None) -> None:
    """Release ``embedding`` (and its tied heads), and the modules of ``root`` still tied to it;
    a sharded embedding (``fully_shard``, tensor parallelism) stays constrained, its state dicts being
    plain already."""
    if is_constrained(embedding) and (
        pin_of(embedding).storage == "split" or pin_of(embedding).shard is not None
    ):
        return
    if is_constrained(embedding):
        release(embedding)  # its tied heads too; a pending .grad becomes (V, D)
    for module in tied_modules(root, embedding) if root is not None else ():  # ties it no longer knows of
        release(module)


def optimizer_state_problem(
    pin: Any, optimizers: Iterable[Any], saved_states: Iterable[Mapping]
) -> str | None:
    """Why saved optimizer states (``optimizer.state_dict()`` of each optimizer) cannot drive the
    free rows of ``pin`` (a ``PinnedRows``), or None: a state saved for the ``(V, D)`` weight has
    the wrong shape for the ``(V - n, D)`` free rows."""
    free = pin.free_parameter
    for optimizer, saved in zip(optimizers, saved_states, strict=False):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        index = next((i for i, p in enumerate(params) if p is free), None)
        state = saved.get("state", {}).get(index, {}) if index is not None else {}
        for name, value in state.items():
            if isinstance(value, Tensor) and value.dim() == free.dim() and value.shape != free.shape:
                return (
                    f"the checkpoint's optimizer state {name!r} for the embedding has shape "
                    f"{tuple(value.shape)}, but its trainable rows have shape {tuple(free.shape)}"
                )
    return None


def optimizer_groups_problem(pin: Any, name: str, optimizers: Iterable[Any]) -> str | None:
    """Why the optimizers look built from names that miss the free rows of ``pin`` (named
    ``name``), or None: a param group is empty (a group selected by the plain name
    ``...embedding.weight`` ends up so), or the free rows, trainable, are in no group."""
    free = pin.free_parameter
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    if not groups:
        return None
    fix = (
        f"the embedding's trainable rows are the Parameter named {name!r} (select them with "
        "self.embedding.parameters() or by that name)"
    )
    if any(not group["params"] for group in groups):
        return f"an optimizer param group is empty; if it was selected by name, {fix}"
    if free.requires_grad and not any(p is free for group in groups for p in group["params"]):
        return f"the trainable rows are in no optimizer param group, so they will not train; {fix}"
    return None
