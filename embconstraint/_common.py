"""What every layer shares, with no dependency on the mechanism: bitwise comparison, row indices,
and the state-dict key under which ``torch.nn.utils.parametrize`` keeps a trainable tensor.

"Bitwise equal" means equal bits, everywhere in embconstraint (``-0.0 != 0.0``, a nan equals the
same nan):

>>> bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0])), bool(torch.equal(torch.tensor([0.0]), torch.tensor([-0.0])))
(False, True)
>>> original_key("emb.", "weight"), bool(RAW_KEY.match("emb.parametrizations.weight.original"))
('emb.parametrizations.weight.original', True)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "bitwise_equal",
    "equal_bits",
    "max_abs_deviation",
    "casts_exactly",
    "index_tensor",
    "check_rows",
    "RAW_KEY",
    "original_key",
]

_BIT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Where parametrize keeps the trainable tensor of a parametrized ``name``: the one place that spells it out.
RAW_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.original$")


def original_key(prefix: str, name: str) -> str:
    """The state-dict key of the raw trainable tensor of parametrized ``name`` (``RAW_KEY`` matches it)."""
    return f"{prefix}parametrizations.{name}.original"


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


def casts_exactly(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of ``t`` survives a round trip through ``dtype``."""
    return t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t)


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
        raise TypeError(
            f"indices must be a 1-D integer tensor or a sequence of ints, got {type(indices).__name__}"
        )
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
