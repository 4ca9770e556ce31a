"""The weight a constrained module computes with inside ``torch.compile``.

Dynamo traces this module (nothing here is ``torch.compiler.disable``-d): the weight is the plain
merged tensor (``torch.cat`` of the pinned and the free rows, in user order) as a
:class:`TracedWeight`, whose ``__torch_function__`` sends ``F.embedding``, ``F.embedding_bag`` and
``F.linear`` to the split kernels of :mod:`.kernels` (two batch-sized gathers and a select; the
pinned and the free logits), so the compiled program builds no ``(V, D)`` tensor for them and the
unused ``cat`` is dead code. Any other use computes with the merged tensor, differentiably. An
in-place write is refused: write outside the compiled region.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import arg, is_value_setter, is_write
from .head_kernels import split_linear
from .kernels import embedding, embedding_bag
from .layout import Layout

__all__ = ["TracedWeight", "traced"]

_WRITE_REFUSED = (
    "in-place {} on the weight of a constrained embedding inside torch.compile is not supported; "
    "write outside the compiled region (under torch.no_grad(): emb.weight[rows] = values)"
)


class TracedWeight(Tensor):
    """The merged weight of a constrained module inside ``torch.compile`` (see the module docstring)."""

    _merged: Tensor  # the plain merged tensor (user order)
    _free: Tensor
    _pinned: Tensor  # the pinned rows, layout order
    _layout: Layout

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and isinstance(arg(args, kwargs, 1, "weight"), cls):
            return _embedding(*args, **kwargs)
        if func is F.embedding_bag and isinstance(arg(args, kwargs, 1, "weight"), cls):
            return _embedding_bag(*args, **kwargs)
        if func is F.linear and isinstance(arg(args, kwargs, 1, "weight"), cls):
            return _linear(*args, **kwargs)
        if is_write(func) or is_value_setter(func):
            raise RuntimeError(_WRITE_REFUSED.format(getattr(func, "__name__", func)))
        args = tuple(_plain(a) for a in args)
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _plain(a: Any) -> Any:
    if isinstance(a, TracedWeight):
        return a._merged
    if isinstance(a, (list, tuple)):
        return type(a)(_plain(x) for x in a)
    return a


def traced(merged: Tensor, free: Tensor, pinned: Tensor, layout: Layout) -> TracedWeight:
    """``merged`` as the :class:`TracedWeight` of the rows ``(pinned, free)`` in ``layout``."""
    w = merged.as_subclass(TracedWeight)
    w._merged, w._free, w._pinned, w._layout = merged, free, pinned, layout
    return w


def _embedding(
    input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False
):
    return embedding(
        input,
        weight._free,
        None,
        weight._layout,
        padding_idx,
        max_norm,
        scale_grad_by_freq,
        sparse,
        pinned=weight._pinned,
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
    return embedding_bag(
        input,
        weight._free,
        None,
        weight._layout,
        offsets,
        max_norm,
        scale_grad_by_freq,
        mode,
        sparse,
        per_sample_weights,
        include_last_offset,
        padding_idx,
        pinned=weight._pinned,
    )


def _linear(input, weight, bias=None):
    bias = bias._merged if isinstance(bias, TracedWeight) else bias
    return split_linear(input, weight._free, weight._pinned, weight._layout, bias)
