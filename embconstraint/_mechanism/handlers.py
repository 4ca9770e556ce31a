"""The handlers of the ops a constrained weight sends to the kernels (``F.embedding``,
``F.embedding_bag``, ``F.linear`` of an output head): each takes the call's own arguments and runs
its kernel of :mod:`.kernels` on the weight's free rows and table (or pinned rows, with the split
storage); under a ``torch.func`` transform or forward-mode AD, and where a kernel does not apply,
the plain op on the merged weight. Importing this module enters them in
:data:`.weight.HANDLED`, which :class:`~.weight.PinnedWeight`'s ``__torch_function__`` reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import functional
from .head_kernels import linear, split_linear
from .kernels import MAX_NORM_REFUSED, embedding, embedding_bag
from .weight import HANDLED, Handled, PinnedView, PinnedWeight, plain, run_plain

__all__: list[str] = []  # (what it provides is the entries of weight.HANDLED)


def _split_pinned(weight: PinnedWeight) -> Tensor | None:
    """The pinned rows the kernels take with the split storage (None with the table)."""
    return weight._pin.pinned_block(weight._free) if weight._table is None else None


def _embedding(
    input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False
):
    if functional():
        if max_norm is not None:
            raise ValueError(MAX_NORM_REFUSED)
        return F.embedding(input, plain(weight), padding_idx, None, norm_type, scale_grad_by_freq, sparse)
    return embedding(
        input,
        weight._free,
        weight._table,
        weight._pin.layout,
        padding_idx,
        max_norm,
        scale_grad_by_freq,
        sparse,
        pinned=_split_pinned(weight),
    )


def _embedding_bag(
    input,
    weight,
    offsets=None,
    max_norm=None,
    norm_type=2,
    scale_grad_by_freq=False,
    mode="mean",
    sparse=False,
    per_sample_weights=None,
    include_last_offset=False,
    padding_idx=None,
):
    if input.is_nested or functional():
        if max_norm is not None:
            raise ValueError(MAX_NORM_REFUSED)
        return F.embedding_bag(
            input,
            plain(weight),
            offsets,
            None,
            norm_type,
            scale_grad_by_freq,
            mode,
            sparse,
            per_sample_weights,
            include_last_offset,
            padding_idx,
        )
    return embedding_bag(
        input,
        weight._free,
        weight._table,
        weight._pin.layout,
        offsets,
        max_norm,
        scale_grad_by_freq,
        mode,
        sparse,
        per_sample_weights,
        include_last_offset,
        padding_idx,
        pinned=_split_pinned(weight),
    )


def _linear(input, weight, bias=None):
    if functional() or isinstance(bias, PinnedView):
        return run_plain(F.linear, (input, weight, bias), {})
    autocast = torch.is_autocast_enabled(input.device.type)
    if weight._table is None and weight._free.dim() == 2 and not autocast:
        pin = weight._pin
        return split_linear(
            input,
            weight._free,
            pin.pinned_block(weight._free),
            pin.layout,
            None if bias is None else plain(bias),
        )
    if weight._table is None or (isinstance(bias, PinnedWeight) and bias._table is None) or autocast:
        # the generic path: autocast casts the merged weight; the split storage has no table
        return run_plain(F.linear, (input, weight, bias), {})
    bias_free = None
    if isinstance(bias, PinnedWeight):  # a constrained head's bias: its free entries train
        bias_free = bias._free
        bias = bias._pin.layout.to_user_order(bias._table)
    return linear(input, weight._free, weight._table, weight._pin.layout, bias, bias_free)


HANDLED.update(
    {
        F.embedding: Handled(_embedding),
        F.embedding_bag: Handled(_embedding_bag),
        F.linear: Handled(_linear),
    }
)
