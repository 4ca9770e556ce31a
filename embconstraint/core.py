"""The front door: :func:`constrain`, :func:`release`, :func:`is_constrained`, :func:`merged_state_dict`.

Each registers or removes the parametrizations of :mod:`embconstraint._mechanism`; the
integrations call these and that package's declared interface, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._common import original_key
from ._mechanism import (
    Layout,
    PinnedRows,
    RowShard,
    TiedTo,
    check_constrain_args,
    check_optimizer,
    full,
    gathered,
    hf_styled_forward,
    install_accessors,
    install_hooks,
    install_tp_hooks,
    local_layout,
    local_part,
    parametrization_list,
    pin_of,
    reference_bias,
    remove_hooks,
    row_shard,
    shared,
    tie_of,
    widened,
    widening_plan,
    zero_managed,
)

__all__ = ["constrain", "release", "is_constrained", "merged_state_dict", "check_constrain", "ConstrainPlan"]

Embedding = nn.Embedding | nn.EmbeddingBag | nn.Linear
Reference = nn.Embedding | nn.EmbeddingBag | nn.Linear | Tensor
Indices = Tensor | Sequence[int] | None


def is_constrained(embedding: nn.Module) -> bool:
    """Whether ``embedding`` has pinned rows installed by :func:`constrain`.

    >>> import torch
    >>> emb = torch.nn.Embedding(5, 2)
    >>> is_constrained(emb), is_constrained(constrain(emb, torch.ones(3, 2)))
    (False, True)
    """
    return isinstance(embedding, nn.Module) and pin_of(embedding) is not None


def _bias_reference(
    module: nn.Module, reference: Reference, idx: Tensor | None, num_pinned: int
) -> Tensor | None:
    """The pinned entries of a head's bias: the reference head's bias, else their current values."""
    bias = getattr(module, "bias", None) if isinstance(module, nn.Linear) else None
    if bias is None:
        return None
    ref = reference_bias(reference)
    if ref is not None:
        return ref
    bias = full(
        bias.detach()
    )  # (a tensor-parallel head's bias is a DTensor: all-gathered, every rank constrains)
    return bias[:num_pinned] if idx is None else bias.index_select(0, idx.to(bias.device))


def _pin(module: nn.Module, name: str, reference: Tensor, layout: Layout, on_mismatch: str) -> None:
    grad = getattr(module, name).grad  # a pending gradient keeps its free rows (release's inverse)
    pin = PinnedRows(reference, layout, on_mismatch)
    parametrize.register_parametrization(module, name, pin)
    pin.bind(parametrization_list(module, name))
    install_accessors(module, name)
    if grad is not None:
        free = pin.free_parameter
        free.grad = None  # still the (V, D) tensor: it no longer fits the free rows
        free.grad = grad.index_select(0, pin.free_rows().to(grad.device))


def constrain(
    embedding: Embedding,
    reference: Reference,
    *,
    indices: Indices = None,
    on_mismatch: Literal["error", "checkpoint"] = "error",
    root: nn.Module | None = None,
) -> Embedding:
    """Pin rows of ``embedding.weight`` to ``reference``, in place; returns ``embedding``.

    Reference row ``i`` is pinned at row ``indices[i]`` (default: the first ``n`` rows). The
    pinned rows are a copy of ``reference`` and hold bitwise at every forward pass; only the
    other rows are trainable: ``embedding.parameters()`` yields one ``(V - n, D)`` parameter.

    An output head (``nn.Linear`` whose ``weight`` is ``(V, D)``, one row per vocabulary
    entry) is constrained the same way; when it has a bias, the bias entries of the pinned rows
    are pinned too (to the reference head's bias, or at their current values) and its
    parameters are the ``(V - n, D)`` free rows and the ``(V - n,)`` free bias entries.

    Args:
        embedding: an ``nn.Embedding``, ``nn.EmbeddingBag`` or ``nn.Linear`` head (subclasses included).
        reference: an ``nn.Embedding``/``nn.EmbeddingBag``, an ``nn.Linear`` (its weight rows
            and, for a head with a bias, its bias entries) or a tensor of shape ``(n, D)``.
        indices: ``n`` distinct rows of ``embedding``; a 1-D integer tensor, NumPy integer array or sequence.
        on_mismatch: what ``load_state_dict`` does when a plain checkpoint's pinned rows differ
            from the reference: ``"error"`` (default) or ``"checkpoint"`` (take them from it).
        root: the model, when a module of it shares the embedding's Parameter (weight tying,
            e.g. ``head.weight = emb.weight``) or a head's bias (BERT's ``cls.predictions.bias``
            is its ``decoder.bias``): those modules stay tied to the merged ``(V, D)`` weight (or
            bias). Without it, a shared Parameter is refused (``RuntimeError``, nothing changes).

    Distributed training: constrain before ``fully_shard`` and before ``deepspeed.initialize`` (a
    module either already manages is refused); a module built under ``deepspeed.zero.Init`` is
    gathered for the time it takes (every rank calls it). After tensor parallelism that shards the
    rows (torch's ``RowwiseParallel`` on an embedding, ``ColwiseParallel`` on a head: the weight a
    ``DTensor`` sharded on dim 0; or transformers' ``from_pretrained(..., tp_plan="auto")``), each rank
    constrains its own rows (see :mod:`embconstraint.parallel`); a ``DTensor`` reference is all-gathered.

    >>> import torch
    >>> old = torch.nn.Embedding(3, 4)
    >>> new = constrain(torch.nn.Embedding(5, 4), old)
    >>> torch.equal(new.weight[:3], old.weight), [tuple(p.shape) for p in new.parameters()]
    (True, [(2, 4)])
    """
    with gathered(embedding):  # a module built under deepspeed.zero.Init: its whole weight, once
        check_constrain(embedding, reference, indices=indices, on_mismatch=on_mismatch, root=root).apply()
    return embedding


@dataclass
class ConstrainPlan:
    """What :func:`constrain` will do, every argument checked (:func:`check_constrain`); nothing
    has changed until :meth:`apply`. Integrations that constrain several modules at once (an
    embedding and an untied head) check all of them first, then apply."""

    embedding: nn.Module
    reference: Tensor
    layout: Layout
    bias: Tensor | None
    on_mismatch: str
    tied: list[tuple[nn.Module, str, str]]  # (module, its attribute, the embedding's tensor it shares)
    shard: RowShard | None = None  # tensor parallelism: this rank's rows of the table (see _apply_sharded)

    def apply(self) -> nn.Module:
        """Constrain ``embedding`` (and tie the modules that share its tensors); returns it."""
        if self.shard is not None:
            return self._apply_sharded()
        embedding = self.embedding
        zero = zero_managed(embedding.weight)  # gathered by the caller (see constrain)
        _pin(embedding, "weight", self.reference, self.layout, self.on_mismatch)
        if self.bias is not None:
            _pin(embedding, "bias", self.bias, self.layout, self.on_mismatch)
        install_hooks(embedding)
        for module, name, shares in self.tied:
            pin = pin_of(embedding, shares)
            parametrize.register_parametrization(module, name, TiedTo(embedding, pin, shares), unsafe=True)
            install_accessors(module, name)  # (DeepSpeed ZeRO-3 needs its getter)
            pin.add_tie(module, name)
        for module in {id(m): m for m, _, _ in self.tied}.values():
            install_hooks(module)
        if zero:
            _own_free_rows(embedding, self.tied)
        return embedding

    def _apply_sharded(self) -> nn.Module:
        """Tensor parallelism: the table's rows are sharded over a 1-D mesh (``RowwiseParallel`` on an
        embedding, ``ColwiseParallel`` on a head: the weight a DTensor ``Shard(0)``; or a plain weight that
        :mod:`embconstraint.parallel` shards). The module keeps this rank's rows as a plain Parameter (the
        modules tied to it too) and is constrained on them (its pinned rows among them, at their local
        positions); the hooks of :mod:`._mechanism.tensor_parallel` compute its output from them."""
        embedding, shard = self.embedding, self.shard
        shard, layout = local_layout(self.layout, shard)
        mine = shard.pinned
        reference = self.reference[mine.to(self.reference.device)]
        bias = None if self.bias is None else self.bias[mine.to(self.bias.device)]
        for name in ("weight", "bias"):
            param = embedding._parameters.get(name)
            if param is None:
                continue
            local = nn.Parameter(local_part(param, shard), requires_grad=param.requires_grad)
            embedding.register_parameter(name, local)
            for module, attr, shares in self.tied:
                if shares == name:
                    module.register_parameter(attr, local)
        padding = getattr(embedding, "padding_idx", None)
        if (
            padding is not None
        ):  # the module now computes on its rows: the padding row is local (or elsewhere)
            embedding.padding_idx = padding - shard.lo if shard.lo <= padding < shard.hi else None
        ConstrainPlan(embedding, reference, layout, bias, self.on_mismatch, self.tied).apply()
        for name in ("weight", "bias"):
            if (pin := pin_of(embedding, name)) is not None:
                pin.shard = shard
        install_tp_hooks(embedding, lambda: shard)
        for module in {id(m): m for m, _, shares in self.tied if shares == "weight"}.values():
            install_tp_hooks(module, lambda: shard)  # a tied head computes on these rows too
        return embedding


def _own_free_rows(embedding: nn.Module, tied: list[tuple[nn.Module, str, str]]) -> None:
    """After constraining a module that DeepSpeed ZeRO-3 partitioned (gathered meanwhile): parametrize
    keeps the module's Parameter object as the free rows, which is DeepSpeed's (its attributes, its
    partition, and a gathered buffer that DeepSpeed frees when the gathering ends). The free rows become
    a Parameter of their own, in the embedding and in the modules tied to it, and the pinned rows a
    copy: ``deepspeed.initialize`` partitions the new Parameter like any it has not seen."""
    for name in ("weight", "bias"):
        pin = pin_of(embedding, name)
        if pin is None:
            continue
        pin.split_storage()
        old = pin.free_parameter
        new = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
        for module, attr in [(embedding, name), *((m, a) for m, a, shares in tied if shares == name)]:
            parametrization_list(module, attr).register_parameter("original", new)


def check_constrain(
    embedding: Embedding,
    reference: Reference,
    *,
    indices: Indices = None,
    on_mismatch: str = "error",
    root: nn.Module | None = None,
) -> ConstrainPlan:
    """Check the arguments of :func:`constrain` without changing anything; ``.apply()`` the plan
    to constrain. Same arguments and errors as :func:`constrain`.

    >>> import torch
    >>> emb = torch.nn.Embedding(5, 2)
    >>> plan = check_constrain(emb, torch.zeros(3, 2))
    >>> is_constrained(emb), is_constrained(plan.apply())
    (False, True)
    """
    ref, idx = check_constrain_args(embedding, reference, indices, on_mismatch, heads=True)
    if root is not None and not isinstance(root, nn.Module):
        raise TypeError(f"root must be an nn.Module, got {type(root).__name__}")
    tied = [] if root is None else _tied_under(root, embedding)
    _check_not_shared(embedding, tied)
    layout = Layout.from_indices(idx, ref.shape[0], embedding.weight.shape[0])
    bias = _bias_reference(embedding, reference, idx, ref.shape[0])
    shard = row_shard(embedding.weight)
    if shard is not None:  # a forward transformers' tensor parallelism wrapped: one it recognises, or refused
        for module in (embedding, *(m for m, _, _ in tied)):
            hf_styled_forward(module)
    return ConstrainPlan(embedding, ref, layout, bias, on_mismatch, tied, shard=shard)


def _tied_under(root: nn.Module, embedding: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, name, embedding's name) for each parameter of ``embedding`` another module under
    ``root`` holds. (A function of its own: a local variable left holding a Parameter would defeat
    :func:`_check_not_shared`'s reference count.)"""
    params = embedding._parameters
    return [
        (m, n, name)
        for name in ("weight", "bias")
        if params.get(name) is not None
        for m, n in _shared_with(root, params[name], embedding)
    ]


def _check_not_shared(embedding: nn.Module, tied: list[tuple[nn.Module, str, str]]) -> None:
    """Refuse a Parameter that a module other than ``embedding`` (and the ``tied`` ones) holds:
    constraining would silently shrink it there to the free rows."""
    for name in ("weight", "bias"):
        others = shared(embedding, name, [(m, n) for m, n, shares in tied if shares == name])
        if others:
            where = ", ".join(f"{type(m).__name__}.{n}" for m, n in others)
            raise RuntimeError(
                f"embedding.{name} is shared with {where} (tied weights): constraining it would shrink "
                f"that module's {name} to the free rows; pass root=<the model> to keep them tied "
                f"(constrain(embedding, reference, root=model)), or untie them first"
            )


def _shared_with(root: nn.Module, param: Tensor, skip: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (module, name) under ``root`` whose own parameter is ``param``, ``skip`` aside."""
    return [(m, n) for m in root.modules() if m is not skip for n, p in m._parameters.items() if p is param]


def release(module: nn.Module, *, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Remove every constraint in ``module`` (an embedding or any module holding some).

    Each weight becomes an ordinary ``nn.Parameter`` of shape ``(V, D)``, bitwise equal to the
    constrained weight; modules tied to a constrained embedding share that Parameter again:
    releasing an embedding releases the modules tied to it, and releasing a tied module (an
    output head) releases its embedding. It stays the same Parameter object, so optimizers
    and hooks holding it keep it. A pending ``.grad`` becomes the merged ``(V, D)`` gradient
    (zeros in the pinned rows); no gradient stays ``None``.

    Args:
        module: a constrained embedding, or a module holding constrained embeddings.
        optimizer: an optimizer over the trainable rows: each of its per-parameter state
            tensors shaped like the free rows (Adam's moments, a momentum buffer) is widened to
            ``(V, D)`` with zero state in the pinned rows (scalar state such as ``step`` is
            kept), so the same optimizer goes on training every row. Without it, build a new
            optimizer after ``release`` (or drop its state for the embedding).

    >>> import torch
    >>> emb = constrain(torch.nn.Embedding(5, 2), torch.zeros(3, 2))
    >>> opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    >>> emb(torch.arange(5)).sum().backward(); opt.step()
    >>> merged = emb.weight.detach().clone()
    >>> torch.equal(release(emb, optimizer=opt).weight, merged), type(emb.weight).__name__
    (True, 'Parameter')
    >>> tuple(emb.weight.grad.shape), tuple(opt.state[emb.weight]["exp_avg"].shape)
    ((5, 2), (5, 2))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_optimizer(optimizer)
    pinned, tied = _to_release(module)
    _refuse_sharded(pinned)
    plan = widening_plan(optimizer, [pin_of(m, n).free_parameter for m in pinned for n in _pinned_names(m)])
    for m in pinned:
        remove_hooks(m)
        for name in _pinned_names(m):
            _release_pin(m, name, optimizer, plan)
    for m, name in tied:
        if parametrize.is_parametrized(m, name):
            remove_hooks(m)
            parametrize.remove_parametrizations(m, name, leave_parametrized=False)
    return module


def _pinned_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s tensors that :class:`PinnedRows` constrains (``weight``, ``bias``)."""
    return [n for n in module.parametrizations.keys() if pin_of(module, n) is not None]


def _to_release(module: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str]]]:
    """What :func:`release` releases under ``module``: the constrained modules, and the ``(module, name)``
    tied to them; raises (``ValueError``) when there is none."""
    pinned = [m for m in module.modules() if is_constrained(m)]
    tied = [
        (m, n)
        for m in module.modules()
        if parametrize.is_parametrized(m)
        for n in list(m.parametrizations.keys())
        if tie_of(m, n) is not None
    ]
    if not pinned and not tied:
        raise ValueError(f"release: {type(module).__name__} holds no constrained embedding")
    # A tie is one Parameter shared by two modules: releasing either side releases both, so that
    # neither keeps the (V - n, D) free rows as its weight.
    for m, name in tied:
        embedding = tie_of(m, name).embedding
        if is_constrained(embedding) and not any(embedding is p for p in pinned):
            pinned.append(embedding)  # (not if torch's remove_parametrizations released it: the tie is plain)
    tied += [tie for m in pinned for n in _pinned_names(m) for tie in pin_of(m, n).ties() if tie not in tied]
    return pinned, tied


def _refuse_sharded(pinned: list[nn.Module]) -> None:
    """Refuse (``RuntimeError``) to release in place a module whose rows are sharded (tensor parallelism,
    ``fully_shard``): it holds only part of them."""
    for m in pinned:
        pins = [pin_of(m, n) for n in _pinned_names(m)]
        if any(pin.shard is not None for pin in pins):
            raise RuntimeError(
                "release: a constrained module under tensor parallelism holds this rank's rows only and cannot be "
                "released in place; save merged_state_dict(model) (or get_model_state_dict) and load it into a "
                "plain model"
            )
        if any(pin.storage == "split" for pin in pins):
            raise RuntimeError(
                "release: a constrained module in sharded training (fully_shard) cannot be released in "
                "place; save merged_state_dict(model) (or a full state dict) and load it into a plain model"
            )


def _release_pin(
    module: nn.Module, name: str, optimizer: torch.optim.Optimizer | None, plan: list[tuple[dict, str]]
) -> None:
    """Turn ``module.<name>``'s free rows back into the whole ``(V, D)`` Parameter (the same object), its
    gradient and the ``plan``'s optimizer state widened with it."""
    pin = pin_of(module, name)
    free, merged = pin.free_parameter, pin.merged()  # the table itself for the prefix layout
    rows, num_rows = pin.free_rows(), pin.num_rows
    grad = None if free.grad is None else widened(free.grad, rows, num_rows)
    state = optimizer.state.get(free, {}) if optimizer is not None else {}
    for st, key in plan:
        if st is state:
            state[key] = widened(state[key], rows, num_rows)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    pin.unbind()
    with torch.no_grad():
        free.set_(merged)  # same Parameter object, now (V, D): optimizers keep their reference
    free.grad = grad


def merged_state_dict(module: nn.Module, state_dict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The state dict an unconstrained ``module`` would have, with the merged weights.

    Keys and shapes are the plain ones (``...embedding.weight``, shape ``(V, D)``), and no
    tensor shares storage with the live model, so the result can be saved (``torch.save``,
    ``safetensors``) or loaded into a plain model. Sharded (DTensor) values are all-gathered:
    under FSDP2 every rank must call it, and every rank gets plain, whole tensors.

    ``state_dict``: make this one plain instead of ``module.state_dict()``: its raw entries
    (``...parametrizations.weight.original``, the free rows only, as ``named_parameters()`` and
    DeepSpeed ZeRO-3's consolidated state dict name them) become the merged weights under their
    plain keys, with ``module``'s pinned rows (a tied head's entry is the same tensor as its
    embedding's); every other entry is kept as it is. Nothing is communicated.

    >>> import torch
    >>> model = torch.nn.Sequential(constrain(torch.nn.Embedding(4, 2), torch.ones(1, 2)))
    >>> sd = merged_state_dict(model)
    >>> list(sd), tuple(sd["0.weight"].shape), torch.equal(sd["0.weight"][0], torch.ones(2))
    (['0.weight'], (4, 2), True)
    >>> raw = {k: v.detach() for k, v in model.named_parameters()}   # the free rows only
    >>> torch.equal(merged_state_dict(model, raw)["0.weight"], sd["0.weight"])
    True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if state_dict is None:
        return {
            k: full(v).detach().clone() if isinstance(v, Tensor) else v
            for k, v in module.state_dict().items()
        }
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors or None, got {type(state_dict).__name__}")
    out, merged = dict(state_dict), {}
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        for name in list(getattr(m, "parametrizations", {}).keys()):
            tie = tie_of(m, name)
            pin = pin_of(m, name) or (tie.pin if tie is not None else None)
            raw = original_key(prefix, name)
            if pin is None or raw not in out or not isinstance(out[raw], Tensor):
                continue
            free = out.pop(raw)
            expected = (pin.num_rows - pin.num_pinned, *pin.pinned_block().shape[1:])
            if tuple(free.shape) != expected:
                raise ValueError(
                    f"state_dict[{raw!r}] has shape {tuple(free.shape)}, expected the free rows "
                    f"{expected} of {prefix + name}"
                )
            if id(free) not in merged:
                pinned = pin.pinned_block().to(device=free.device, dtype=free.dtype)
                merged[id(free)] = pin.layout.to_user_order(torch.cat([pinned, free.detach()]))
            out[prefix + name] = merged[id(free)]
    return out
