"""The autograd kernels of an output head's ``F.linear`` on a constrained weight: with the table
(:func:`linear`, whose backward builds nothing of size ``(V, D)``), and from the pinned and the free
rows without building the weight (:func:`split_linear`: the split storage, compiled code). See
:mod:`.kernels` for the conventions ``(free, table, layout)`` and ``(free, pinned, layout)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import apply_function
from .layout import Layout

__all__ = ["linear", "split_linear"]


class _Linear(torch.autograd.Function):
    """``F.linear`` with a constrained weight ``(V, D)`` (an output head): the plain forward; in
    backward, the weight gradient of the free rows only (the free output columns of the incoming
    gradient against the inputs), the bias gradient of the free entries only (or of every entry
    for a plain bias), the input gradient as usual. Each product is the one PyTorch's own
    backward computes, restricted to the free rows, so the gradients are bitwise those of a plain
    head."""

    @staticmethod
    def forward(ctx, input, free, bias_free, weight, bias, free_cols, num_pinned):
        ctx.save_for_backward(input, weight, free)
        ctx.free_cols, ctx.num_pinned = free_cols, num_pinned
        return torch._C._nn.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        input, weight, free = ctx.saved_tensors
        cols, n = ctx.free_cols, ctx.num_pinned
        grad2 = grad.reshape(-1, grad.shape[-1])
        g_in = g_free = g_bfree = g_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled() and free.requires_grad:
                # create_graph (double backward): the input gradient is a function of the free rows
                weight = torch.cat([weight[:n], free]) if cols is None else weight.index_put((cols,), free)
            g_in = grad2.mm(weight).reshape(input.shape)
        if ctx.needs_input_grad[1]:
            g_cols = grad2[:, n:] if cols is None else grad2.index_select(1, cols)
            g_free = g_cols.t().mm(input.reshape(-1, input.shape[-1]))
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            g_sum = grad2.sum(0)
            if ctx.needs_input_grad[4]:
                g_bias = g_sum
            if ctx.needs_input_grad[2]:
                g_bfree = g_sum[n:] if cols is None else g_sum.index_select(0, cols)
        return g_in, g_free, g_bfree, None, g_bias, None, None


def linear(
    input: Tensor,
    free: Tensor,
    table: Tensor,
    layout: Layout,
    bias: Tensor | None = None,
    bias_free: Tensor | None = None,
) -> Tensor:
    """``F.linear(input, weight, bias)`` for the weight that ``(free, table, layout)`` stand for.
    ``bias`` is a plain bias, or (with ``bias_free``, its free entries) the merged bias of a
    constrained one, in user order. For the scattered layout the forward gathers the weight into
    user order (the logits' columns are the user's); the backward builds nothing of size (V, D)."""
    weight = layout.to_user_order(table)
    cols = None if layout.rows is None else layout.free_rows_on(table.device)
    return apply_function(_Linear, input, free, bias_free, weight, bias, cols, layout.num_pinned)


@torch.library.custom_op("embconstraint::split_logits", mutates_args=())
def _split_logits(input: Tensor, pinned: Tensor, free: Tensor) -> Tensor:
    """``input @ cat([pinned, free]).T`` without the ``cat``: each product writes its columns of
    one output (a row-major buffer with leading dimension ``V``: no copy)."""
    x = input.reshape(-1, input.shape[-1])
    n = pinned.shape[0]
    out = x.new_empty(x.shape[0], n + free.shape[0])
    torch.mm(x, pinned.t(), out=out[:, :n])
    torch.mm(x, free.t(), out=out[:, n:])
    return out.view(*input.shape[:-1], out.shape[1])


@_split_logits.register_fake
def _(input: Tensor, pinned: Tensor, free: Tensor) -> Tensor:
    return input.new_empty(*input.shape[:-1], pinned.shape[0] + free.shape[0])


def _split_logits_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _split_logits_backward(ctx, grad: Tensor):
    """The input gradient and the free rows' weight gradient, from column slices of ``grad``
    (differentiable ops: higher-order gradients follow)."""
    input, pinned, free = ctx.saved_tensors
    n = pinned.shape[0]
    g2, x = grad.reshape(-1, grad.shape[-1]), input.reshape(-1, input.shape[-1])
    g_in = g_free = None
    if ctx.needs_input_grad[0]:
        g_in = torch.addmm(g2[:, n:].mm(free), g2[:, :n], pinned).view(input.shape)
    if ctx.needs_input_grad[2]:
        g_free = g2[:, n:].t().mm(x)
    return g_in, None, g_free


_split_logits.register_autograd(_split_logits_backward, setup_context=_split_logits_context)


def split_linear(
    input: Tensor, free: Tensor, pinned: Tensor, layout: Layout, bias: Tensor | None = None
) -> Tensor:
    """``F.linear(input, weight, bias)`` for the weight that ``(free, pinned, layout)`` stand for
    (the split storage; compiled code), without building it: the logits of the pinned rows and of
    the free rows written side by side into one output (a custom op), then, for the scattered
    layout, put in user order. Equal to the plain head to rounding (two matmuls). Under autocast the
    three operands are cast as ``F.linear`` would cast them."""
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, pinned, free = input.to(dtype), pinned.to(dtype), free.to(dtype)
    if pinned.dtype != input.dtype or free.dtype != input.dtype or pinned.shape[0] == 0 or free.shape[0] == 0:
        # (no free rows: their empty logits do not come from them, so that they get no gradient, not an empty
        # one, which fully_shard's reduce-scatter refuses; a tensor-parallel rank may hold pinned rows only)
        logits_free = (
            torch.nn.functional.linear(input, free)
            if free.shape[0]
            else input.new_zeros((*input.shape[:-1], 0))
        )
        out = torch.cat([torch.nn.functional.linear(input, pinned), logits_free], dim=-1)
    else:
        out = _split_logits(input, pinned, free)
    if layout.pos is not None:
        out = out.index_select(-1, layout.pos_on(out.device))
    return out if bias is None else out + bias
