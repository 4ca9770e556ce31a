"""What a checkpoint of a constrained model looks like: plain keys, merged ``(V, D)`` weights.

The state-dict hooks that :func:`embconstraint.constrain` installs save a constrained (or tied)
weight under its plain key and load a plain weight back (free rows loaded, pinned rows checked
or, with ``on_mismatch="checkpoint"``, adopted); :func:`merged_state_dict` is the detached copy.

Sharded (FSDP2) free rows: the saved weight is the merged ``(V, D)`` as a DTensor sharded on
dim 0 over the same mesh (the free rows are all-gathered once; each rank keeps its chunk), so
``get_model_state_dict`` (full or sharded) and DCP see the plain key; a loaded weight (plain or
DTensor) is sharded back the way the live free rows are, without communication.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from ._parametrization import original_key, pin_of, tie_of
from ._sharded import as_shards, full, like
from ._tensor import constant, plain
from ._validate import PinnedRowsError

__all__ = ["merged_state_dict", "install_hooks", "remove_hooks", "optimizer_state_problem", "optimizer_groups_problem"]

_HOOKS = "_embconstraint_hooks"
_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> prefix of the load under way


def install_hooks(module: nn.Module) -> None:
    """Install the save/load hooks on a constrained (or tied) ``module``."""
    setattr(module, _HOOKS, [
        module.register_state_dict_post_hook(_merged_keys),
        module.register_load_state_dict_pre_hook(_load_plain),
        module.register_load_state_dict_post_hook(_tied_not_missing),
    ])


def remove_hooks(module: nn.Module) -> None:
    """Remove what :func:`install_hooks` installed."""
    for handle in getattr(module, _HOOKS, ()):
        handle.remove()
    if hasattr(module, _HOOKS):
        delattr(module, _HOOKS)


def _constrained_names(module: nn.Module):
    """(name, the embedding's pin) for each constrained or tied weight of ``module``."""
    for name in list(module.parametrizations.keys()):
        pin, tie = pin_of(module, name), tie_of(module, name)
        if pin is not None or tie is not None:
            yield name, pin if tie is None else tie.pin


def _merged_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: a constrained (or tied) weight is saved under its plain key, as
    the merged ``(V, D)`` tensor, a :class:`~._tensor.PinnedConstant`: it reads and saves as a plain
    tensor, and writes into it cannot move pinned rows. Nothing is copied for the prefix layout,
    and no view of a larger storage is saved."""
    for name, pin in _constrained_names(module):
        key = original_key(prefix, name)
        if key not in state_dict:
            continue
        keep_vars = state_dict[key].requires_grad
        del state_dict[key]
        free = pin.free_parameter
        if not pin.is_split(free):  # guarded: writes into it go through the pinned-row check (no copy: prefix)
            state_dict[prefix + name] = constant(pin, free)
            continue
        merged = as_shards(pin.layout.to_user_order(pin.table(free)), free)
        state_dict[prefix + name] = merged if keep_vars else merged.detach()


def _load_plain(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict,
                missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: accept the plain ``weight`` key (what state_dict() writes and
    what an unconstrained model saves), loading its free rows and checking its pinned rows.
    A shape mismatch is reported the way torch reports one; pinned rows that differ raise
    :class:`PinnedRowsError` before this module's weight changes."""
    _PREFIXES[module] = prefix  # for _tied_not_missing
    for name, pin in _constrained_names(module):
        key, okey = prefix + name, original_key(prefix, name)
        if key not in state_dict:
            continue
        value = full(state_dict.pop(key))  # (a collective for a DTensor: all ranks load)
        free = pin.free_parameter
        expected = (pin.num_rows, *free.shape[1:])
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                f"the shape in current model is {expected} (a constrained embedding)."
            )
            state_dict[okey] = free.detach()
            continue
        try:
            state_dict[okey] = like(pin.load_plain(plain(value), free, key), free)
        except PinnedRowsError as err:  # raised as it is (not collected): callers can catch it by type
            raise PinnedRowsError(
                f"{err}. Pass on_mismatch='checkpoint' to constrain() to take them from the checkpoint."
            ) from None


def _tied_not_missing(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: a tied weight's raw key is the embedding's free rows, loaded
    through the embedding (checkpoints, e.g. ``save_pretrained``'s, drop tied keys): not missing.
    A constrained weight that is missing is named by its plain key (``0.weight``)."""
    prefix = _PREFIXES.pop(module, None)
    if prefix is None:
        return
    missing = incompatible_keys.missing_keys
    for name in list(module.parametrizations.keys()):
        key = original_key(prefix, name)
        if key not in missing:
            continue
        if tie_of(module, name) is not None:
            missing.remove(key)
        elif pin_of(module, name) is not None:  # reported under the plain key, the one a checkpoint has
            missing[missing.index(key)] = prefix + name


def optimizer_state_problem(pin: Any, optimizers: Iterable[Any], saved_states: Iterable[Mapping]) -> str | None:
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
                return (f"the checkpoint's optimizer state {name!r} for the embedding has shape "
                        f"{tuple(value.shape)}, but its trainable rows have shape {tuple(free.shape)}")
    return None


def optimizer_groups_problem(pin: Any, name: str, optimizers: Iterable[Any]) -> str | None:
    """Why the optimizers look built from names that miss the free rows of ``pin`` (named
    ``name``), or None: a param group is empty (a group selected by the plain name
    ``...embedding.weight`` ends up so), or the free rows, trainable, are in no group."""
    free = pin.free_parameter
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    if not groups:
        return None
    fix = (f"the embedding's trainable rows are the Parameter named {name!r} (select them with "
           "self.embedding.parameters() or by that name)")
    if any(not group["params"] for group in groups):
        return f"an optimizer param group is empty; if it was selected by name, {fix}"
    if free.requires_grad and not any(p is free for group in groups for p in group["params"]):
        return f"the trainable rows are in no optimizer param group, so they will not train; {fix}"
    return None


def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The state dict an unconstrained ``module`` would have, with the merged weights.

    Keys and shapes are the plain ones (``...embedding.weight``, shape ``(V, D)``), and no
    tensor shares storage with the live model, so the result can be saved (``torch.save``,
    ``safetensors``) or loaded into a plain model. Sharded (DTensor) values are all-gathered:
    under FSDP2 every rank must call it, and every rank gets plain, whole tensors.

    >>> import torch
    >>> from embconstraint import constrain
    >>> model = torch.nn.Sequential(constrain(torch.nn.Embedding(4, 2), torch.ones(1, 2)))
    >>> sd = merged_state_dict(model)
    >>> list(sd), tuple(sd["0.weight"].shape), torch.equal(sd["0.weight"][0], torch.ones(2))
    (['0.weight'], (4, 2), True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return {k: full(v).detach().clone() if isinstance(v, Tensor) else v for k, v in module.state_dict().items()}
