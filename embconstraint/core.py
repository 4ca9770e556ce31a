"""The functional front door: :func:`constrain`, :func:`release`, :func:`is_constrained`.

Also the documented internal interface the integrations (``lightning``, ``hf``, ``export``)
build on, so that no module reaches into another's private names:

- :func:`pin_of` / :func:`tie_of`: the parametrization of a constrained / tied weight.
- :func:`tied_modules`: the modules whose weight is tied to a constrained embedding.
- :func:`check_constrain_args`: everything :func:`constrain` refuses, checked without changing anything.
- :func:`constrain_tied`: :func:`constrain`, keeping modules that share the Parameter tied.
- :func:`pinned_values` / :func:`pinned_deviation`: the pinned rows as they are, and their
  largest deviation from a target (the callback's metric).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._layout import Layout
from ._parametrization import PinnedRows, TiedTo, install_fast_getter, parametrization_list, pin_of, tie_of
from ._sharded import is_sharded
from ._ties import shared
from ._validate import (
    as_reference,
    check_bias,
    check_embedding,
    check_on_mismatch,
    check_reference,
    checked_indices,
    reference_bias,
)
from .state import install_hooks, remove_hooks

__all__ = ["constrain", "release", "is_constrained"]

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


def check_constrain_args(embedding: Embedding, reference: Reference, indices: Indices,
                         on_mismatch: str, *, heads: bool = False) -> tuple[Tensor, Tensor | None]:
    """Everything :func:`constrain` refuses, checked without changing anything; returns the
    reference tensor and the validated indices (None for the first ``n`` rows). ``heads``:
    accept an ``nn.Linear`` output head (and an ``nn.Linear`` reference with a bias)."""
    parametrized = isinstance(embedding, nn.Module) and any(
        parametrize.is_parametrized(embedding, name) for name in ("weight", "bias"))
    check_embedding(embedding, parametrized, is_constrained(embedding), heads=heads)
    check_on_mismatch(on_mismatch)
    if is_sharded(embedding.weight):
        raise ValueError(
            f"embedding.weight is already sharded (a {type(embedding.weight).__name__}, e.g. by fully_shard); "
            "call constrain() before fully_shard(), which then shards only the free rows"
        )
    weight = embedding.weight.detach()
    ref = check_reference(as_reference(reference), weight)
    check_bias(embedding, reference, ref.shape[0])
    return ref, checked_indices(indices, ref.shape[0], weight.shape[0])


def _bias_reference(module: nn.Module, reference: Reference, idx: Tensor | None, num_pinned: int) -> Tensor | None:
    """The pinned entries of a head's bias: the reference head's bias, else their current values."""
    bias = getattr(module, "bias", None) if isinstance(module, nn.Linear) else None
    if bias is None:
        return None
    ref = reference_bias(reference)
    if ref is not None:
        return ref
    return bias.detach()[:num_pinned] if idx is None else bias.detach().index_select(0, idx.to(bias.device))


def _pin(module: nn.Module, name: str, reference: Tensor, layout: Layout, on_mismatch: str) -> None:
    grad = getattr(module, name).grad  # a pending gradient keeps its free rows (release's inverse)
    pin = PinnedRows(reference, layout, on_mismatch)
    parametrize.register_parametrization(module, name, pin)
    pin.bind(parametrization_list(module, name))
    install_fast_getter(module, name)
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
            e.g. ``head.weight = emb.weight``): those modules stay tied to the merged ``(V, D)``
            weight. Without it, a shared Parameter is refused (``RuntimeError``, nothing changes).

    >>> import torch
    >>> old = torch.nn.Embedding(3, 4)
    >>> new = constrain(torch.nn.Embedding(5, 4), old)
    >>> torch.equal(new.weight[:3], old.weight), [tuple(p.shape) for p in new.parameters()]
    (True, [(2, 4)])
    """
    ref, idx = check_constrain_args(embedding, reference, indices, on_mismatch, heads=True)
    if root is not None and not isinstance(root, nn.Module):
        raise TypeError(f"root must be an nn.Module, got {type(root).__name__}")
    tied = _shared_with(root, embedding.weight, embedding) if root is not None else []
    _check_not_shared(embedding, tied)
    layout = Layout.from_indices(idx, ref.shape[0], embedding.weight.shape[0])
    bias = _bias_reference(embedding, reference, idx, ref.shape[0])
    _pin(embedding, "weight", ref, layout, on_mismatch)
    if bias is not None:
        _pin(embedding, "bias", bias, layout, on_mismatch)
    install_hooks(embedding)
    pin = pin_of(embedding)
    for module, name in tied:
        parametrize.register_parametrization(module, name, TiedTo(embedding, pin), unsafe=True)
        pin.add_tie(module, name)
        install_hooks(module)
    return embedding


def _check_not_shared(embedding: nn.Module, tied: list[tuple[nn.Module, str]]) -> None:
    """Refuse a Parameter that a module other than ``embedding`` (and the ``tied`` ones) holds:
    constraining would silently shrink it there to the free rows."""
    for name in ("weight", "bias"):
        others = shared(embedding, name, tied if name == "weight" else [])
        if others:
            where = ", ".join(f"{type(m).__name__}.{n}" for m, n in others)
            raise RuntimeError(
                f"embedding.{name} is shared with {where} (tied weights): constraining it would shrink "
                f"that module's {name} to the free rows; pass root=<the model> to keep them tied "
                f"(constrain(embedding, reference, root=model)), or untie them first"
            )


def _shared_with(root: nn.Module, param: Tensor, skip: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (module, name) under ``root`` whose own parameter is ``param``, ``skip`` aside."""
    return [
        (m, n)
        for m in root.modules()
        if m is not skip
        for n, p in m._parameters.items()
        if p is param
    ]


def constrain_tied(root: nn.Module, embedding: Embedding, reference: Reference, **kwargs) -> Embedding:
    """:func:`constrain`, keeping every module of ``root`` that shares the embedding's
    Parameter (a tied output head) tied to the merged weight."""
    return constrain(embedding, reference, root=root, **kwargs)


def tied_modules(root: nn.Module, embedding: nn.Module) -> list[nn.Module]:
    """The modules of ``root`` (``embedding`` aside) with a weight tied to ``embedding``."""
    return [m for m in root.modules() if m is not embedding
            and any((t := tie_of(m, n)) is not None and t.embedding is embedding
                    for n in getattr(m, "parametrizations", {}))]


def _widened(value: Tensor, free_rows: Tensor, num_rows: int) -> Tensor:
    """``value`` (one entry per free row, table order) spread onto ``num_rows`` rows, zeros elsewhere."""
    rows = free_rows.to(value.device)
    if value.layout == torch.sparse_coo:  # an nn.Embedding(sparse=True) gradient
        value = value.coalesce()
        return torch.sparse_coo_tensor(rows[value.indices()[0]].unsqueeze(0), value.values(),
                                       (num_rows, *value.shape[1:]))
    wide = value.new_zeros((num_rows, *value.shape[1:]))
    wide.index_copy_(0, rows, value)
    return wide


def _check_optimizer(optimizer: object) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


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
    _check_optimizer(optimizer)
    pinned = [m for m in module.modules() if is_constrained(m)]
    tied = [(m, n) for m in module.modules() if parametrize.is_parametrized(m)
            for n in list(m.parametrizations.keys()) if tie_of(m, n) is not None]
    if not pinned and not tied:
        raise ValueError(f"release: {type(module).__name__} holds no constrained embedding")
    # A tie is one Parameter shared by two modules: releasing either side releases both, so that
    # neither keeps the (V - n, D) free rows as its weight.
    for m, name in tied:
        embedding = tie_of(m, name).embedding
        if not any(embedding is p for p in pinned):
            pinned.append(embedding)
    tied += [tie for m in pinned for n in m.parametrizations.keys() if (pin := pin_of(m, n)) is not None
             for tie in pin.ties() if tie not in tied]
    for m in pinned:
        if any(pin_of(m, n) is not None and pin_of(m, n).storage == "split" for n in m.parametrizations.keys()):
            raise RuntimeError(
                "release: a constrained module in sharded training (fully_shard) cannot be released in "
                "place; save merged_state_dict(model) (or a full state dict) and load it into a plain model"
            )
    for m in pinned:
        remove_hooks(m)
        for name in [n for n in m.parametrizations.keys() if pin_of(m, n) is not None]:
            pin = pin_of(m, name)
            free, merged = pin.free_parameter, pin.merged()  # the table itself for the prefix layout
            rows, num_rows = pin.free_rows(), pin.num_rows
            grad = None if free.grad is None else _widened(free.grad, rows, num_rows)
            state = optimizer.state.get(free, {}) if optimizer is not None else {}
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == free.shape:
                    state[key] = _widened(value, rows, num_rows)
            parametrize.remove_parametrizations(m, name, leave_parametrized=False)
            pin.unbind()
            with torch.no_grad():
                free.set_(merged)  # same Parameter object, now (V, D): optimizers keep their reference
            free.grad = grad
    for m, name in tied:
        if parametrize.is_parametrized(m, name):
            remove_hooks(m)
            parametrize.remove_parametrizations(m, name, leave_parametrized=False)
    return module


def pinned_values(embedding: nn.Module) -> Tensor:
    """The pinned rows of a constrained ``embedding`` as they are, in reference order ``(n, D)``."""
    pin = pin_of(embedding)
    if pin.storage == "split":  # read apart from the free rows: no collective under FSDP2
        return pin.pinned_block()
    weight = embedding.weight  # user order through its __torch_function__
    if pin.layout.kind == "prefix":
        return weight[: pin.num_pinned]
    return weight.index_select(0, pin.pinned_rows().to(weight.device))


@torch.no_grad()
def pinned_deviation(embedding: nn.Module, target: Tensor) -> Tensor:
    """Largest ``|pinned row - target|`` of a constrained ``embedding`` (0-dim tensor on the
    weight's device; 0.0 when nothing is pinned)."""
    rows = pinned_values(embedding)
    if rows.numel() == 0:
        return rows.new_zeros(())
    return (rows - target.to(device=rows.device, dtype=rows.dtype)).abs().max()
