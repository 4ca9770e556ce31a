"""What ``release(module, optimizer=)`` does to the optimizer: its state, kept for the free rows, widened
to every row of the released weight (zeros in the pinned rows), or refused before anything changes.

:func:`widening_plan` checks every state entry and lists those to widen; :func:`widened` spreads one
value (a state tensor, a gradient) from the free rows onto all rows.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


def widened(value: Tensor, free_rows: Tensor, num_rows: int) -> Tensor:
    """``value`` (one entry per free row, table order) spread onto ``num_rows`` rows, zeros elsewhere."""
    rows = free_rows.to(value.device)
    if value.layout == torch.sparse_coo:  # an nn.Embedding(sparse=True) gradient
        value = value.coalesce()
        return torch.sparse_coo_tensor(  # (valid by construction: distinct rows < num_rows)
            rows[value.indices()[0]].unsqueeze(0),
            value.values(),
            (num_rows, *value.shape[1:]),
            check_invariants=False,
        )
    wide = value.new_zeros((num_rows, *value.shape[1:]))
    wide.index_copy_(0, rows, value)
    return wide


def check_optimizer(optimizer: object) -> None:
    """Refuse (``TypeError``) an ``optimizer=`` that is neither a ``torch.optim.Optimizer`` nor ``None``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


# Per-row statistics of factored optimizers, one entry per row: (key, shape of the entry given the
# free rows' shape). transformers' Adafactor keeps ``exp_avg_sq_row`` (rows,), torch's ``row_var`` (rows, 1).
_ROW_STATISTICS = {"exp_avg_sq_row": lambda shape: shape[:-1], "row_var": lambda shape: (*shape[:-1], 1)}
# Their per-column statistics: a mean over the rows, with no entry per row; kept as they are.
_COLUMN_STATISTICS = {
    "exp_avg_sq_col": lambda shape: (*shape[:-2], shape[-1]),
    "col_var": lambda shape: (*shape[:-2], 1, shape[-1]),
}


def _holds(optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def widening_plan(optimizer: torch.optim.Optimizer | None, frees: list[Tensor]) -> list[tuple[dict, str]]:
    """The ``(state, key)`` entries of ``optimizer`` to widen from the free rows to every row, for
    the free-row parameters ``frees``; raises (``ValueError``) for a state that cannot be widened,
    before anything changes. Kept as they are: scalars and 0-d tensors (``step``), and the column
    statistics of a factored optimizer (Adafactor), a mean over the rows with no entry per row."""
    if optimizer is None:
        return []
    name = type(optimizer).__name__
    held = [free for free in frees if _holds(optimizer, free)]
    zero = sys.modules.get("torch.distributed.optim")
    if held and zero is not None and isinstance(optimizer, getattr(zero, "ZeroRedundancyOptimizer", ())):
        raise ValueError(
            f"release: {name} partitions its parameters across ranks by their size when it is built, and a "
            "released weight changes size; call release(module) without optimizer= and build a new optimizer"
        )
    if (
        held
        and isinstance(optimizer, torch.optim.LBFGS)
        and (optimizer.state or getattr(optimizer, "_numel_cache", None))
    ):
        raise ValueError(
            "release: LBFGS keeps one flat history over all its parameters (its directions and steps), which "
            "cannot be widened to the released rows; call release(module) without optimizer= and build a new LBFGS"
        )
    plan = []
    for free in held:
        state = optimizer.state.get(free, {})
        shape = tuple(free.shape)
        for key, value in state.items():
            if not isinstance(value, Tensor):
                if _holds_tensors(value):
                    raise ValueError(
                        f"release: {name} keeps state {key!r} as a {type(value).__name__} of tensors, "
                        "which cannot be widened to the released rows; call release(module) without "
                        "optimizer= and build a new optimizer"
                    )
                continue  # a number (step), a flag
            if value.dim() == 0 or (
                key in _COLUMN_STATISTICS and tuple(value.shape) == _COLUMN_STATISTICS[key](shape)
            ):
                continue
            if tuple(value.shape) == shape or (
                key in _ROW_STATISTICS and tuple(value.shape) == _ROW_STATISTICS[key](shape)
            ):
                plan.append((state, key))
                continue
            raise ValueError(
                f"release: {name}'s state {key!r} has shape {tuple(value.shape)}, neither one entry per free row "
                f"(the free rows are {shape}) nor a scalar, so it cannot be widened to the released rows; call "
                "release(module) without optimizer= and build a new optimizer"
            )
    return plan


def _holds_tensors(value: object) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_holds_tensors(v) for v in value)
