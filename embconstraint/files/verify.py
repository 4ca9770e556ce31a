"""``verify``: check that the pinned rows of a weight are bitwise equal to a reference.

"Bitwise" is :func:`embconstraint._common.equal_bits`: ``-0.0`` differs from ``0.0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._common import RAW_KEY, casts_exactly, check_rows, equal_bits
from .formats import PathLike, as_indices, pick, tensor_source

__all__ = ["Verification", "verify", "exact_cast"]


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify`.

    Attributes:
        key: the tensor checked in the weights (None for a bare tensor).
        reference_key: the tensor used in the reference (None for a bare tensor).
        shape: shape of the checked weight, ``(V, D)``.
        rows_checked: number of pinned rows compared.
        rows_differing: how many of them are not bitwise equal to the reference.
        max_deviation: largest ``|weight - reference|`` over the pinned rows (float64; inf for nan).
    """

    key: str | None
    reference_key: str | None
    shape: tuple[int, int]
    rows_checked: int
    rows_differing: int
    max_deviation: float

    @property
    def ok(self) -> bool:
        """True when every pinned row is bitwise equal to its reference row."""
        return self.rows_differing == 0

    def summary(self) -> str:
        """One line for humans, e.g. ``emb.weight: 12 of 16 rows checked, max |Δ| = 0.0, ...``."""
        name = self.key or "weights"
        verdict = (
            "all bitwise equal to the reference"
            if self.ok
            else f"{self.rows_differing} row(s) differ from the reference"
        )
        return (
            f"{name}: {self.rows_checked} pinned rows checked (of {self.shape[0]}), "
            f"max |Δ| = {self.max_deviation!r}, {verdict}"
        )


def exact_cast(reference: Tensor, dtype: torch.dtype) -> Tensor:
    """``reference`` cast to ``dtype``; ``ValueError`` if a value would change."""
    if not casts_exactly(reference, dtype):
        raise ValueError(
            f"the reference ({reference.dtype}) cannot be represented exactly in the weights' dtype {dtype}"
        )
    return reference.to(dtype)


def verify(
    weights: PathLike | Mapping[str, Any] | Tensor,
    reference: PathLike | Mapping[str, Any] | Tensor,
    key: str | None = None,
    indices: PathLike | Tensor | list[int] | None = None,
    reference_key: str | None = None,
) -> Verification:
    """Check that the pinned rows of a weight are bitwise equal to a reference.

    Reference row ``i`` is expected at row ``indices[i]`` of the weight (default: the first
    ``n`` rows, ``n`` the reference's row count).

    Args:
        weights: a ``.safetensors``/torch file path, a dict of tensors (a Lightning checkpoint's
            ``"state_dict"`` is used) or a ``(V, D)`` tensor.
        reference: the same kinds, holding the ``(n, D)`` reference.
        key: the tensor to check in ``weights``. Without it, the only 2-D tensor is used.
        indices: a path (text file of integers or a torch file), a 1-D integer tensor or a list.
        reference_key: the tensor to use in ``reference`` when it is a dict (default: ``key``;
            without either, its only tensor). A name missing from ``reference`` is an error.

    A raw ``*.parametrizations.<name>.original`` entry (a constrained embedding's free rows,
    without its pinned rows) is refused, as are sparse, nested and meta tensors.

    >>> import torch
    >>> old = torch.randn(3, 2)
    >>> new = torch.cat([torch.randn(1, 2), old])     # old rows now live at rows 1..3
    >>> verify({"w": new}, old, indices=[1, 2, 3]).ok
    True
    >>> verify({"w": new}, old).ok                    # not at rows 0..2
    False
    """
    w_src, w_where = tensor_source(weights, "weights")
    r_src, r_where = tensor_source(reference, "reference")
    w_key, w = pick(w_src, key, w_where, prefer_single=False)
    r_wanted = reference_key if reference_key is not None else key
    try:
        r_key, ref = pick(r_src, r_wanted, r_where, prefer_single=r_wanted is None)
    except ValueError as err:
        if reference_key is not None or key is None:
            raise
        raise ValueError(f"{err} (name REF's tensor with --reference-key / reference_key)") from None
    if w_key is not None and RAW_KEY.match(w_key):
        raise ValueError(
            f"{w_where} tensor {w_key!r} is a raw parametrization entry (a constrained embedding's free rows only, "
            "without its pinned rows): verify the merged weight (model.state_dict() or "
            "embconstraint.merged_state_dict(model)), or merge it first with export --reference"
        )
    w_name = f"{w_where} tensor {w_key!r}" if w_key else w_where
    r_name = f"{r_where} tensor {r_key!r}" if r_key else r_where
    for t, name in ((w, w_name), (ref, r_name)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    (num_rows, dim), (num_pinned, rdim) = w.shape, ref.shape
    if rdim != dim:
        raise ValueError(
            f"shape mismatch: {w_name} has shape {tuple(w.shape)} but {r_name} has "
            f"shape {tuple(ref.shape)} (embedding dimensions {dim} != {rdim})"
        )
    idx = as_indices(indices)
    if idx is None:
        if num_pinned > num_rows:
            raise ValueError(
                f"shape mismatch: {r_name} has {num_pinned} rows but {w_name} only {num_rows} "
                f"(shapes {tuple(ref.shape)} and {tuple(w.shape)})"
            )
        idx = torch.arange(num_pinned)
    check_rows(idx, num_pinned, num_rows)
    ref = exact_cast(ref.detach().cpu(), w.dtype)
    rows = w.detach().cpu().index_select(0, idx).contiguous()
    ref = ref.contiguous()
    if num_pinned:
        same = equal_bits(rows, ref)  # element-wise, bitwise (-0.0 != 0.0, nan == nan)
        diff = (rows.double() - ref.double()).abs().nan_to_num(float("inf"), float("inf"), float("inf"))
        diff[same] = 0.0
        max_dev = float(diff.max())
        differing = int((~same.all(dim=1)).sum())
    else:
        max_dev, differing = 0.0, 0
    return Verification(w_key, r_key, (num_rows, dim), num_pinned, differing, max_dev)


# -- export --------------------------------------------------------------------------------
