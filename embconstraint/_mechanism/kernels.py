"""The autograd kernels: ops on the table whose backward reaches the free rows only.

Every kernel works on ``(free, table, layout)``: ``free`` is the trainable ``(V - n, D)`` tensor
(the gradient's target), ``table`` the ``(V, D)`` rows in layout order (see :mod:`.layout`),
``layout`` the :class:`~embconstraint._mechanism.layout.Layout` that maps user ids to table rows. With the
split storage (sharded training, see :mod:`.storage`) there is no table: ``table`` is
None and ``pinned`` holds the ``(n, D)`` pinned rows; a lookup is then two batch-sized gathers
and a select (bitwise the table lookup), a bag bags the looked-up rows. Pinned
rows never receive a gradient and no ``(V, D)`` gradient is built by a lookup or by an output
head's ``F.linear`` (table layout only; with the split storage a head takes the generic path): the
head's kernels are in :mod:`.head_kernels`. A new op is one more function here plus one handler in
:mod:`.handlers`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import Layout

__all__ = [
    "Merge",
    "merge",
    "apply_function",
    "embedding",
    "embedding_bag",
    "EMBEDDING_BAG_MODES",
    "MAX_NORM_REFUSED",
]

EMBEDDING_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}
_EMBEDDING_DENSE_BACKWARD = torch.ops.aten.embedding_dense_backward.default  # the overload: no resolution
_FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]
MAX_NORM_REFUSED = (
    "max_norm renormalizes looked-up rows in place, which would change pinned rows; "
    "it is not supported on a constrained embedding (set max_norm=None)"
)


class Merge(torch.autograd.Function):
    """The table, as a tensor whose gradient reaches the free rows: an alias of the table in
    forward; in backward, the free rows of the dense ``(V, D)`` gradient: its last rows (a
    gradient in table order), or its rows ``free_rows`` (a gradient in user order, which is what
    code outside embconstraint hands to the weight's autograd node). Only uses of ``weight``
    other than a handled op produce such a gradient."""

    @staticmethod
    def forward(ctx, free: Tensor, table: Tensor, free_rows: Tensor | None = None) -> Tensor:
        ctx.num_pinned, ctx.free_rows = table.shape[0] - free.shape[0], free_rows
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.free_rows is not None:
            return grad.index_select(0, ctx.free_rows), None, None
        return grad[ctx.num_pinned :], None, None


def apply_function(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)`` without ``Function.apply``'s Python wrapper (it only unwraps dead
    functorch wrappers and binds defaults for ``setup_context``, which these kernels do not
    define): the same C++ ``_FunctionBase.apply`` runs. Under torch.compile, the wrapper (which
    Dynamo traces)."""
    if torch.compiler.is_compiling():
        return fn.apply(*args)
    return _FUNCTION_APPLY.__get__(None, fn)(*args)


def merge(free: Tensor, table: Tensor, free_rows: Tensor | None = None) -> Tensor:
    """``Merge.apply(free, table, free_rows)``: the table as a tensor whose gradient reaches ``free``."""
    return apply_function(Merge, free, table, free_rows)


def _free_ids(lidx: Tensor, num_pinned: int, lpad: int) -> Tensor:
    """Whether each table row ``lidx`` is a free row that trains (not pinned, not padding)."""
    keep = lidx >= num_pinned
    return keep & (lidx != lpad) if lpad >= 0 else keep


def _free_index(lidx: Tensor, num_pinned: int, num_free: int, lpad: int) -> Tensor:
    """Map table rows to free-row positions; pinned and padding rows go to the sink ``num_free``."""
    return torch.where(_free_ids(lidx, num_pinned, lpad), lidx - num_pinned, num_free)


class _Lookup(torch.autograd.Function):
    """``F.embedding`` on the table with a gradient for the free rows only."""

    @staticmethod
    def forward(ctx, free, table, lidx, lpad, scale_grad_by_freq, sparse, input, free_map):
        # backward maps the user ids through free_map (user row -> free position, sink k): one
        # gather instead of the three element-wise kernels of _free_index, same values
        ctx.save_for_backward(input, free_map)
        ctx.args = (free.shape[0], lpad, scale_grad_by_freq, sparse)
        return torch.embedding(table, lidx, lpad, scale_grad_by_freq, sparse)

    @staticmethod
    def backward(ctx, grad):
        input, free_map = ctx.saved_tensors
        k, lpad, sgbf, sparse = ctx.args
        ridx = free_map.index_select(0, input.reshape(-1)).view(input.shape)  # (its shape: double backward)
        if sparse:
            g = torch.ops.aten.embedding_sparse_backward(grad, ridx, k, k, sgbf)
        else:
            # One sink row past the end receives nothing (it is the padding row) and is sliced off.
            # Differentiable in grad (a Hessian-vector product gathers back through it).
            g = _EMBEDDING_DENSE_BACKWARD(grad, ridx, k + 1, k, sgbf)[:k]
        return g, None, None, None, None, None, None, None


def _gather(free: Tensor, pinned: Tensor, lidx: Tensor) -> Tensor:
    """Rows ``lidx`` (layout order) of ``cat([pinned, free])``, without building it."""
    n, k = pinned.shape[0], free.shape[0]
    if n == 0 or k == 0:
        return torch.embedding(free if n == 0 else pinned, lidx)
    return torch.where(
        (lidx >= n).unsqueeze(-1),
        torch.embedding(free, (lidx - n).clamp_min(0)),
        torch.embedding(pinned, lidx.clamp_max(n - 1)),
    )


class _SplitLookup(torch.autograd.Function):
    """:class:`_Lookup` on the split storage (and in compiled code): ``pinned`` instead of the
    table; the free position of each id is computed from its table row, element-wise."""

    @staticmethod
    def forward(ctx, free, pinned, lidx, lpad, scale_grad_by_freq, sparse):
        ctx.save_for_backward(lidx)
        ctx.args = (pinned.shape[0], free.shape[0], lpad, scale_grad_by_freq, sparse)
        return _gather(free, pinned, lidx)

    @staticmethod
    def backward(ctx, grad):
        (lidx,) = ctx.saved_tensors
        n, k, lpad, sgbf, sparse = ctx.args
        if (
            k == 0
        ):  # no free rows (a tensor-parallel rank holding pinned rows only): no gradient, not an empty one,
            return None, None, None, None, None, None  # which fully_shard's reduce-scatter refuses
        if torch.compiler.is_compiling() and not (sparse or sgbf):
            return _spread_backward(grad, lidx, n, k, lpad), None, None, None, None, None
        ridx = _free_index(lidx, n, k, lpad)
        if sparse:
            g = torch.ops.aten.embedding_sparse_backward(grad, ridx, k, k, sgbf)
        else:
            g = _EMBEDDING_DENSE_BACKWARD(grad, ridx, k + 1, k, sgbf)[:k]
        return g, None, None, None, None, None


def _spread_backward(grad: Tensor, lidx: Tensor, num_pinned: int, num_free: int, lpad: int) -> Tensor:
    """The free rows' dense gradient in compiled code. The eager kernel skips the ids of pinned
    (and padding) rows sent to one sink row; the compiler's scatter-add does not skip them, and
    with most ids pinned every one of them would add into that one row, serialising the atomic
    adds. Here their gradient is zeroed and they add it into free rows spread like the ids
    themselves (``lidx mod num_free``): the same sums (plus zeros), no contended row.
    (``scale_grad_by_freq`` counts the ids per row, so it keeps the sink.)"""
    keep = _free_ids(lidx, num_pinned, lpad)
    ridx = torch.where(keep, lidx - num_pinned, lidx.remainder(num_free))
    zeroed = torch.where(keep.unsqueeze(-1), grad, 0.0)  # (not a product: a pinned id's inf or nan stays out)
    return _EMBEDDING_DENSE_BACKWARD(zeroed, ridx, num_free, -1, False)


def _split_bag(free, pinned, per_sample_weights, lidx, offsets, lpad, sgbf, mode, sparse, last):
    """``_Bag`` on the split storage: look the rows up (batch-sized; ``scale_grad_by_freq`` and
    sparsity apply there, counted over the real ids), then bag them by position; padding entries
    point at one appended zero row. The forward is bitwise the table's bag; the gradient is
    summed in another order (equal to rounding)."""
    rows = apply_function(_SplitLookup, free, pinned, lidx, lpad, sgbf, sparse)
    pos = torch.arange(lidx.numel(), device=lidx.device, dtype=lidx.dtype)
    pad = None
    if lpad >= 0:
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        pad = lidx.numel()
        pos = torch.where(lidx == lpad, pad, pos)
    return torch.nn.functional.embedding_bag(
        pos,
        rows,
        offsets,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=last,
        padding_idx=pad,
    )


class _Bag(torch.autograd.Function):
    """``F.embedding_bag`` on the table with a gradient for the free rows only."""

    @staticmethod
    def forward(ctx, free, table, per_sample_weights, lidx, offsets, lpad, sgbf, mode, sparse, last):
        out, offset2bag, bag_size, max_indices = torch.ops.aten._embedding_bag(
            table, lidx, offsets, sgbf, mode, sparse, per_sample_weights, last, lpad
        )
        ctx.save_for_backward(table, per_sample_weights, lidx, offsets, offset2bag, bag_size, max_indices)
        ctx.shape = (table.shape[0] - free.shape[0], free.shape[0])
        ctx.lpad, ctx.sgbf, ctx.mode, ctx.sparse = lpad, sgbf, mode, sparse
        return out

    @staticmethod
    def backward(ctx, grad):
        table, psw, lidx, offsets, offset2bag, bag_size, max_indices = ctx.saved_tensors
        n, k = ctx.shape
        grad = grad.contiguous()
        g_free = g_psw = None
        if ctx.needs_input_grad[0]:
            ridx = _free_index(lidx, n, k, ctx.lpad)
            rmax = _free_index(max_indices, n, k, -1) if ctx.mode == 2 else max_indices
            rows = k if ctx.sparse else k + 1
            # scale_grad_by_freq is applied here, not by the kernel: torch 2.13's CPU kernel divides
            # by the wrong count (pytorch/pytorch#190063); this is the documented semantics.
            scale = ctx.sgbf and not ctx.sparse
            g_free = torch.ops.aten._embedding_bag_backward(
                grad,
                ridx,
                offsets,
                offset2bag,
                bag_size,
                rmax,
                rows,
                ctx.sgbf and not scale,
                ctx.mode,
                ctx.sparse,
                psw,
                k,
            )
            if scale:
                counts = torch.zeros(k + 1, dtype=g_free.dtype, device=g_free.device)
                counts.index_add_(0, ridx, torch.ones_like(ridx, dtype=g_free.dtype))
                g_free = g_free / counts.clamp_min(1).unsqueeze(1)
            if not ctx.sparse:
                g_free = g_free[:k]
        if ctx.needs_input_grad[2]:
            g_psw = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, table, lidx, offsets, offset2bag, ctx.mode, ctx.lpad
            )
        return g_free, None, g_psw, None, None, None, None, None, None, None


def embedding(
    input: Tensor,
    free: Tensor,
    table: Tensor | None,
    layout: Layout,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    pinned: Tensor | None = None,
) -> Tensor:
    """``F.embedding(input, weight, ...)`` for the weight that ``(free, table, layout)`` stand for
    (``(free, pinned, layout)`` when ``table`` is None: the split storage)."""
    if max_norm is not None:
        raise ValueError(MAX_NORM_REFUSED)
    lidx, lpad = layout.index(input, padding_idx)
    if table is None:
        return apply_function(_SplitLookup, free, pinned, lidx, lpad, scale_grad_by_freq, sparse)
    free_map = layout.free_map(input.device, input.dtype, lpad)
    return apply_function(_Lookup, free, table, lidx, lpad, scale_grad_by_freq, sparse, input, free_map)


def _bag_input(
    input: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None, include_last_offset: bool
) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """:func:`embedding_bag`'s bags checked (the errors of ``torch.nn.functional.embedding_bag``)
    and normalised: a 2D ``input`` becomes 1D bags with their ``offsets``. Returns ``(input,
    offsets, per_sample_weights, include_last_offset)``."""
    if per_sample_weights is not None and input.size() != per_sample_weights.size():
        raise ValueError(
            f"embedding_bag: If per_sample_weights ({per_sample_weights.shape}) is not None, "
            f"then it must have the same shape as the input ({input.shape})"
        )
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None")
        offsets = torch.arange(0, input.numel(), input.size(1), dtype=input.dtype, device=input.device)
        include_last_offset = False
        input = input.reshape(-1)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if offsets.dim() != 1:
            raise ValueError("offsets has to be a 1D Tensor")
    else:
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    return input, offsets, per_sample_weights, include_last_offset


def _check_bag_mode(
    mode: str,
    scale_grad_by_freq: bool,
    sparse: bool,
    max_norm: float | None,
    per_sample_weights: Tensor | None,
) -> None:
    """:func:`embedding_bag`'s ``mode`` and options checked against each other (the errors of
    ``torch.nn.functional.embedding_bag``), and ``max_norm`` refused."""
    if mode not in EMBEDDING_BAG_MODES:
        raise ValueError("mode has to be one of sum, mean or max")
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights")
    if max_norm is not None:
        raise ValueError(MAX_NORM_REFUSED)
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError(
            f"embedding_bag: per_sample_weights is only supported for mode='sum' (got mode='{mode}')"
        )


def embedding_bag(
    input: Tensor,
    free: Tensor,
    table: Tensor | None,
    layout: Layout,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    pinned: Tensor | None = None,
) -> Tensor:
    """``F.embedding_bag(input, weight, ...)`` for the weight that ``(free, table, layout)`` stand
    for (a non-nested ``input``; ``(free, pinned, layout)`` when ``table`` is None). Argument
    handling mirrors ``torch.nn.functional.embedding_bag``."""
    input, offsets, per_sample_weights, include_last_offset = _bag_input(
        input, offsets, per_sample_weights, include_last_offset
    )
    _check_bag_mode(mode, scale_grad_by_freq, sparse, max_norm, per_sample_weights)
    lidx, lpad = layout.index(input, padding_idx)
    offsets = offsets.to(lidx.dtype)
    if table is None:
        return _split_bag(
            free,
            pinned,
            per_sample_weights,
            lidx,
            offsets,
            lpad,
            scale_grad_by_freq,
            mode,
            sparse,
            include_last_offset,
        )
    return apply_function(
        _Bag,
        free,
        table,
        per_sample_weights,
        lidx,
        offsets,
        lpad,
        scale_grad_by_freq,
        EMBEDDING_BAG_MODES[mode],
        sparse,
        include_last_offset,
    )
