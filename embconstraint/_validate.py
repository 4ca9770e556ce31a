"""The checks every entry point shares, and the error-type policy.

Error policy (the whole package follows it):

- ``TypeError``: an argument of the wrong kind (a list where a tensor is expected, an integer
  dtype where floating point is needed, an ``nn.Linear`` where an embedding is expected).
- ``ValueError``: an argument of the right kind with a wrong value (a shape, a range, a dtype
  that cannot hold the reference exactly, an unsupported option such as ``max_norm``, whether
  set on the embedding or passed to ``F.embedding``; a module that cannot take the constraint as
  it is: already constrained, or with another parametrization), and any problem with the
  content of an input file (``FileNotFoundError`` for a missing one).
- ``RuntimeError``: a conflict with the current state (the operation is fine, but not now:
  a write that would change pinned rows, a tie that must be re-made, a checkpoint that cannot
  be trusted). A change of pinned rows raises :class:`PinnedRowsError`, a ``RuntimeError``.

Every check runs before anything changes. "Bitwise equal" means equal bits
(:func:`bitwise_equal`: ``-0.0 != 0.0``, a nan equals the same nan), everywhere.

>>> bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0])), bool(torch.equal(torch.tensor([0.0]), torch.tensor([-0.0])))
(False, True)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._tensor import plain

__all__ = [
    "PinnedRowsError", "bitwise_equal", "equal_bits", "max_abs_deviation",
    "ON_MISMATCH", "check_on_mismatch", "as_reference", "check_reference", "casts_exactly",
    "index_tensor", "check_rows", "checked_indices", "check_embedding", "reference_bias", "check_bias",
]

ON_MISMATCH = ("error", "checkpoint")
_BIT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PinnedRowsError(RuntimeError):
    """An operation would change pinned rows of a constrained embedding (a write, an assignment,
    ``load_state_dict`` of a plain checkpoint with other pinned rows)."""


def equal_bits(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise bit equality of two tensors of one dtype and shape (bool tensor)."""
    a, b = a.contiguous(), b.contiguous()
    bits = _BIT_VIEW[a.element_size()]
    return a.view(bits) == b.view(bits)


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (one dtype) have the same shape and the same bits."""
    return a.shape == b.shape and (a.numel() == 0 or bool(equal_bits(a, b).all()))


def max_abs_deviation(a: Tensor, b: Tensor) -> float:
    """Largest ``|a - b|`` in float64 (nan counts as inf; 0.0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item()


def check_on_mismatch(on_mismatch: Any) -> None:
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")


def as_reference(reference: Any) -> Tensor:
    """The ``(n, D)`` floating-point tensor of an embedding, output head (``nn.Linear``: its
    weight rows) or tensor ``reference`` (detached)."""
    if isinstance(reference, (nn.Embedding, nn.EmbeddingBag, nn.Linear)):
        reference = reference.weight
    if not isinstance(reference, Tensor):
        raise TypeError(
            "reference must be an nn.Embedding, nn.EmbeddingBag, nn.Linear, Tensor or Parameter of shape (n, D), "
            f"got {type(reference).__name__}"
        )
    if reference.layout != torch.strided or reference.is_nested:
        raise ValueError(f"reference must be a dense (strided) tensor, got layout {reference.layout}")
    if reference.is_meta:
        raise ValueError("reference is on the meta device (no values); pass a materialised tensor")
    reference = plain(reference.detach())
    if reference.dim() != 2:
        raise ValueError(f"reference must have shape (n, D), got shape {tuple(reference.shape)}")
    if not reference.is_floating_point():
        raise TypeError(f"reference must be a floating-point tensor, got dtype {reference.dtype}")
    return reference


def casts_exactly(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of ``t`` survives a round trip through ``dtype``."""
    return t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t)


def check_reference(reference: Tensor, weight: Tensor) -> Tensor:
    """Check an :func:`as_reference` tensor against the ``(V, D)`` weight it will be pinned in
    (``weight`` may be on the meta device)."""
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
    if not casts_exactly(reference, weight.dtype):
        raise ValueError(
            f"reference dtype {reference.dtype} cannot be cast exactly to the embedding's dtype "
            f"{weight.dtype}; cast the embedding (or the reference) first"
        )
    return reference


def index_tensor(indices: Any) -> Tensor:
    """``indices`` (a 1-D integer tensor or NumPy array, or a sequence of ints) as a CPU int64 tensor."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(indices, np.ndarray):
        if not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"indices must hold integers, got NumPy dtype {indices.dtype}")
        indices = torch.as_tensor(indices)
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
    return idx.long()


def check_rows(idx: Tensor, num_pinned: int, num_rows: int | None, what: str = "reference") -> None:
    """``idx`` holds ``num_pinned`` distinct rows in ``[0, num_rows)`` (``None``: size not known yet)."""
    if idx.numel() != num_pinned:
        raise ValueError(f"indices has {idx.numel()} entries but {what} has {num_pinned} rows")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if num_rows is None and lo < 0:
            raise ValueError(f"indices must be non-negative row numbers, got min {lo}")
        if num_rows is not None and (lo < 0 or hi >= num_rows):
            raise ValueError(
                f"indices must lie in [0, {num_rows}) for an embedding of {num_rows} rows, got min {lo}, max {hi}"
            )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("indices must be distinct: a row cannot be pinned twice")


def checked_indices(indices: Any, num_pinned: int, num_rows: int | None) -> Tensor | None:
    """Validated ``indices`` (CPU int64), or None for the default (the first ``num_pinned`` rows)."""
    if indices is None:
        return None
    idx = index_tensor(indices)
    check_rows(idx, num_pinned, num_rows)
    return idx


def reference_bias(reference: Any) -> Tensor | None:
    """The bias of an ``nn.Linear`` ``reference`` (detached), None for anything else."""
    if isinstance(reference, nn.Linear) and reference.bias is not None:
        return plain(reference.bias.detach())
    return None


def check_bias(module: nn.Module, reference: Any, num_pinned: int) -> None:
    """A head's bias against an ``nn.Linear`` reference: both or neither have one, and a head
    bias is a floating-point ``nn.Parameter`` (checked for any reference)."""
    bias = getattr(module, "bias", None) if isinstance(module, nn.Linear) else None
    if isinstance(reference, nn.Linear) and reference.bias is not None and bias is None:
        raise ValueError(
            f"reference is an nn.Linear with a bias but embedding ({type(module).__name__}) has none; "
            "pass reference.weight to pin the weight rows only"
        )
    if isinstance(reference, nn.Linear) and reference.bias is None and bias is not None:
        raise ValueError(
            f"reference is an nn.Linear without a bias but embedding ({type(module).__name__}) has one; "
            "pass reference.weight to pin the bias entries at their current values"
        )
    if bias is None:
        return
    if not isinstance(bias, nn.Parameter) or not bias.is_floating_point():
        raise TypeError("embedding.bias must be a floating-point nn.Parameter")
    ref_bias = reference_bias(reference)
    if ref_bias is not None:
        if ref_bias.shape != (num_pinned,):
            raise ValueError(f"reference.bias must have shape ({num_pinned},), got {tuple(ref_bias.shape)}")
        if not bool(torch.isfinite(ref_bias).all()) or not casts_exactly(ref_bias, bias.dtype):
            raise ValueError("reference.bias must be finite and exactly representable in the module's bias dtype")


def check_embedding(embedding: Any, parametrized: bool, constrained: bool, heads: bool = False) -> None:
    """What :func:`embconstraint.constrain` refuses of the module itself (``heads``: an
    ``nn.Linear`` output head is accepted too)."""
    kinds = (nn.Embedding, nn.EmbeddingBag, nn.Linear) if heads else (nn.Embedding, nn.EmbeddingBag)
    if not isinstance(embedding, kinds):
        expected = "an nn.Embedding, nn.EmbeddingBag or nn.Linear (an output head)" if heads else \
            "an nn.Embedding or nn.EmbeddingBag"
        raise TypeError(f"embedding must be {expected}, got {type(embedding).__name__}")
    if constrained:
        raise ValueError("embedding is already constrained; call release() first")
    if parametrized:
        raise ValueError("embedding.weight already has a parametrization; embconstraint must be the only one")
    if not isinstance(embedding.weight, nn.Parameter):
        raise TypeError("embedding.weight must be an nn.Parameter")
    if not embedding.weight.is_floating_point():
        raise TypeError(f"embedding.weight must be floating point, got {embedding.weight.dtype}")
    if getattr(embedding, "max_norm", None) is not None:
        raise ValueError(
            "embedding.max_norm renormalizes rows in place and would move pinned rows; "
            "constrained embeddings need max_norm=None"
        )
