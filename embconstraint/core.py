"""The functional front door: :func:`constrain`, :func:`release`, :func:`is_constrained`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._pinned import PinnedRows, TiedTo, _plain

__all__ = ["constrain", "release", "is_constrained"]

Embedding = nn.Embedding | nn.EmbeddingBag
Reference = nn.Embedding | nn.EmbeddingBag | Tensor
Indices = Tensor | Sequence[int] | None

_HOOKS = "_embconstraint_hooks"
_ON_MISMATCH = ("error", "checkpoint")


def _pinned_rows(module: nn.Module, name: str = "weight") -> PinnedRows | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, PinnedRows):
            return p
    return None


def _tied_to(module: nn.Module, name: str) -> TiedTo | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, TiedTo)), None)


def is_constrained(embedding: nn.Module) -> bool:
    """Whether ``embedding`` has pinned rows installed by :func:`constrain`.

    >>> import torch
    >>> emb = torch.nn.Embedding(5, 2)
    >>> is_constrained(emb), is_constrained(constrain(emb, torch.ones(3, 2)))
    (False, True)
    """
    return isinstance(embedding, nn.Module) and _pinned_rows(embedding) is not None


def _reference_tensor(reference: Reference) -> Tensor:
    if isinstance(reference, (nn.Embedding, nn.EmbeddingBag)):
        reference = reference.weight
    if not isinstance(reference, Tensor):
        raise TypeError(
            "reference must be an nn.Embedding, nn.EmbeddingBag, Tensor or Parameter of shape (n, D), "
            f"got {type(reference).__name__}"
        )
    reference = _plain(reference.detach())
    if reference.dim() != 2:
        raise ValueError(f"reference must have shape (n, D), got shape {tuple(reference.shape)}")
    if not reference.is_floating_point():
        raise TypeError(f"reference must be a floating-point tensor, got dtype {reference.dtype}")
    return reference


def _check_reference(reference: Tensor, weight: Tensor) -> Tensor:
    num_rows, dim = weight.shape
    if reference.shape[1] != dim:
        raise ValueError(
            f"reference has embedding dimension {reference.shape[1]} but the embedding has {dim} "
            f"(reference shape {tuple(reference.shape)}, embedding weight shape {tuple(weight.shape)})"
        )
    if reference.shape[0] > num_rows:
        raise ValueError(
            f"reference has {reference.shape[0]} rows but the embedding only has {num_rows} "
            f"(reference shape {tuple(reference.shape)}, embedding weight shape {tuple(weight.shape)})"
        )
    # aminmax propagates nan and surfaces +-inf in one pass; isfinite(reference) would allocate an
    # |x| copy and three bool masks (1.6x the reference's size) and take ~25x longer on CPU.
    if reference.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(reference))).all()):
        raise ValueError("reference holds non-finite values (nan or inf); pinned rows must be finite")
    if reference.dtype != weight.dtype and not torch.equal(
            reference.to(weight.dtype).to(reference.dtype), reference):
        raise ValueError(
            f"reference dtype {reference.dtype} cannot be cast exactly to the embedding's dtype "
            f"{weight.dtype}; cast the embedding (or the reference) first"
        )
    return reference  # copied (and cast) into the table by PinnedRows, not before


def _layout_rows(indices: Indices, num_pinned: int, num_rows: int) -> Tensor | None:
    """Layout -> user row map, or None when the pinned rows are the first ``num_pinned`` rows."""
    if indices is None:
        return None
    if isinstance(indices, Tensor):
        idx = indices.detach().cpu()
    elif isinstance(indices, Sequence) and not isinstance(indices, (str, bytes)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise TypeError("indices must be a 1-D integer tensor or a sequence of ints")
        idx = torch.tensor(list(indices), dtype=torch.long)
    else:
        raise TypeError(f"indices must be a 1-D integer tensor or a sequence of ints, got {type(indices).__name__}")
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"indices must hold integers, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
    idx = idx.long()
    if idx.numel() != num_pinned:
        raise ValueError(f"indices has {idx.numel()} entries but reference has {num_pinned} rows")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_rows):
        raise ValueError(
            f"indices must lie in [0, {num_rows}) for an embedding of {num_rows} rows, "
            f"got min {int(idx.min())}, max {int(idx.max())}"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("indices must be distinct: a row cannot be pinned twice")
    if torch.equal(idx, torch.arange(num_pinned)):
        return None
    free = torch.ones(num_rows, dtype=torch.bool)
    free[idx] = False
    return torch.cat([idx, free.nonzero().flatten()])


def _checked(embedding: Embedding, reference: Reference, indices: Indices,
             on_mismatch: str) -> tuple[Tensor, Tensor | None]:
    """Everything :func:`constrain` refuses, checked without changing anything; returns the
    reference (cast and copied onto the embedding's device) and the layout rows."""
    if not isinstance(embedding, (nn.Embedding, nn.EmbeddingBag)):
        raise TypeError(f"embedding must be an nn.Embedding or nn.EmbeddingBag, got {type(embedding).__name__}")
    if is_constrained(embedding):
        raise ValueError("embedding is already constrained; call release() first")
    if parametrize.is_parametrized(embedding, "weight"):
        raise ValueError("embedding.weight already has a parametrization; embconstraint must be the only one")
    if not isinstance(embedding.weight, nn.Parameter):
        raise TypeError("embedding.weight must be an nn.Parameter")
    if not embedding.weight.is_floating_point():
        raise TypeError(f"embedding.weight must be floating point, got {embedding.weight.dtype}")
    if embedding.max_norm is not None:
        raise ValueError(
            "embedding.max_norm renormalizes rows in place and would move pinned rows; "
            "constrained embeddings need max_norm=None"
        )
    if on_mismatch not in _ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {_ON_MISMATCH}, got {on_mismatch!r}")
    weight = embedding.weight.detach()
    ref = _check_reference(_reference_tensor(reference), weight)
    return ref, _layout_rows(indices, ref.shape[0], weight.shape[0])



def constrain(
    embedding: Embedding,
    reference: Reference,
    *,
    indices: Indices = None,
    on_mismatch: Literal["error", "checkpoint"] = "error",
) -> Embedding:
    """Pin rows of ``embedding.weight`` to ``reference``, in place; returns ``embedding``.

    Reference row ``i`` is pinned at row ``indices[i]`` (default: the first ``n`` rows). The
    pinned rows are a copy of ``reference`` and hold bitwise at every forward pass; only the
    other rows are trainable: ``embedding.parameters()`` yields one ``(V - n, D)`` parameter.

    Args:
        embedding: an ``nn.Embedding`` or ``nn.EmbeddingBag`` (subclasses included).
        reference: an ``nn.Embedding``/``nn.EmbeddingBag`` or a tensor of shape ``(n, D)``.
        indices: ``n`` distinct rows of ``embedding``; a 1-D integer tensor or sequence.
        on_mismatch: what ``load_state_dict`` does when a plain checkpoint's pinned rows differ
            from the reference: ``"error"`` (default) or ``"checkpoint"`` (take them from it).

    >>> import torch
    >>> old = torch.nn.Embedding(3, 4)
    >>> new = constrain(torch.nn.Embedding(5, 4), old)
    >>> torch.equal(new.weight[:3], old.weight), [tuple(p.shape) for p in new.parameters()]
    (True, [(2, 4)])
    """
    ref, rows = _checked(embedding, reference, indices, on_mismatch)
    pin = PinnedRows(ref, rows, embedding.weight.shape[0], on_mismatch)
    parametrize.register_parametrization(embedding, "weight", pin)
    setattr(embedding, _HOOKS, [
        embedding.register_state_dict_post_hook(_merged_keys),
        embedding.register_load_state_dict_pre_hook(_load_plain),
    ])
    return embedding


def _tie(module: nn.Module, name: str, embedding: nn.Module) -> None:
    """Make ``module.<name>``, which shared the Parameter of a now constrained ``embedding``,
    compute with the embedding's merged weight."""
    parametrize.register_parametrization(module, name, TiedTo(embedding), unsafe=True)
    setattr(module, _HOOKS, [
        module.register_state_dict_post_hook(_merged_keys),
        module.register_load_state_dict_pre_hook(_load_plain),
    ])


def _shared_with(root: nn.Module, param: Tensor, skip: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (module, name) under ``root`` whose own parameter is ``param``, ``skip`` aside."""
    return [
        (m, n)
        for m in root.modules()
        if m is not skip
        for n, p in m._parameters.items()
        if p is param
    ]


def _constrain_tied(root: nn.Module, embedding: Embedding, reference: Reference, **kwargs) -> Embedding:
    """:func:`constrain`, keeping every module of ``root`` that shares the embedding's
    Parameter (a tied output head) tied to the merged weight."""
    tied = _shared_with(root, embedding.weight, embedding) if isinstance(embedding, nn.Module) else []
    constrain(embedding, reference, **kwargs)
    for module, name in tied:
        _tie(module, name, embedding)
    return embedding


def release(module: nn.Module) -> nn.Module:
    """Remove every constraint in ``module`` (an embedding or any module holding some).

    Each weight becomes an ordinary ``nn.Parameter`` of shape ``(V, D)``, bitwise equal to the
    constrained weight; modules tied to a constrained embedding share that Parameter again.

    >>> import torch
    >>> emb = constrain(torch.nn.Embedding(5, 2), torch.zeros(3, 2))
    >>> merged = emb.weight.detach().clone()
    >>> torch.equal(release(emb).weight, merged), type(emb.weight).__name__
    (True, 'Parameter')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    pinned = [m for m in module.modules() if is_constrained(m)]
    tied = [(m, n) for m in module.modules() if parametrize.is_parametrized(m)
            for n in list(m.parametrizations.keys()) if _tied_to(m, n) is not None]
    if not pinned and not tied:
        raise ValueError(f"release: {type(module).__name__} holds no constrained embedding")
    for m in pinned:
        pin, free = _pinned_rows(m), m.parametrizations.weight.original
        with torch.no_grad():
            merged = pin.to_user_order(pin._sync(free))  # the table itself for the prefix layout
        _remove_hooks(m)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        with torch.no_grad():
            free.set_(merged)  # same Parameter object, now (V, D): optimizers keep their reference
    for m, name in tied:
        _remove_hooks(m)
        parametrize.remove_parametrizations(m, name, leave_parametrized=False)
    return module


def _remove_hooks(module: nn.Module) -> None:
    for handle in getattr(module, _HOOKS, ()):
        handle.remove()
    if hasattr(module, _HOOKS):
        delattr(module, _HOOKS)


def _original_key(prefix: str, name: str) -> str:
    return f"{prefix}parametrizations.{name}.original"


def _merged_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: a constrained (or tied) weight is saved under its plain key, as
    the merged ``(V, D)`` tensor. Nothing is copied for the prefix layout, and no view of a
    larger storage is saved."""
    for name in list(module.parametrizations.keys()):
        pin, tie = _pinned_rows(module, name), _tied_to(module, name)
        if pin is None and tie is None:
            continue
        key = _original_key(prefix, name)
        if key not in state_dict:
            continue
        keep_vars = state_dict[key].requires_grad
        del state_dict[key]
        emb = module if tie is None else tie.embedding
        p = _pinned_rows(emb)
        table = p._sync(emb.parametrizations.weight.original)
        merged = p.to_user_order(table)
        state_dict[prefix + name] = merged if keep_vars else merged.detach()


def _load_plain(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict,
                missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: accept the plain ``weight`` key (what state_dict() writes and
    what an unconstrained model saves), loading its free rows and checking its pinned rows."""
    for name in list(module.parametrizations.keys()):
        pin, tie = _pinned_rows(module, name), _tied_to(module, name)
        if pin is None and tie is None:
            continue
        key, okey = prefix + name, _original_key(prefix, name)
        if key not in state_dict:
            continue
        value = state_dict.pop(key)
        emb = module if tie is None else tie.embedding
        p, free = _pinned_rows(emb), emb.parametrizations.weight.original
        expected = (p.num_rows, free.shape[1])
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                f"the shape in current model is {expected} (a constrained embedding)."
            )
            state_dict[okey] = free.detach()
            continue
        try:
            state_dict[okey] = p.load_plain(_plain(value), free, key)
        except RuntimeError as err:
            error_msgs.append(f"{err}. Pass on_mismatch='checkpoint' to constrain() to take them from the checkpoint.")
            state_dict[okey] = free.detach()
