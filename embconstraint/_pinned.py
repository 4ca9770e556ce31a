"""The mechanism: a parametrization that pins rows of an embedding weight.

Storage layout
--------------
One ``(V, D)`` tensor, the *table*, holds every row. Its first ``n`` rows are the
pinned (reference) rows and its last ``V - n`` rows are the free rows. The
trainable parameter (``parametrizations.weight.original``) is a view of the
free block, so "concatenating" the two blocks costs nothing: the table *is* the
merged weight. When the pinned rows are the first ``n`` user rows (the
vocabulary-growth case) the table is in user order and is returned as the
weight without any copy ("prefix" layout). For scattered pinned rows the table
is a permutation of the user rows ("scattered" layout): lookups remap their
indices (one gather over the batch) and only non-lookup uses of ``weight`` pay
for a gather of the whole table.

Gradients
---------
``weight`` is returned as a :class:`_PinnedWeight`, a tensor subclass whose
``__torch_function__`` sends ``F.embedding`` and ``F.embedding_bag`` to
autograd functions that compute the forward on the table and the backward
directly into a ``(V - n, D)`` gradient of the free rows: pinned rows never
receive a gradient and no ``(V, D)`` gradient is ever built. Any other use of
``weight`` (a tied output head, ``weight.sum()``, ...) runs on the plain merged
tensor, whose backward slices the free rows out of the dense gradient.

Nothing here synchronizes host and device during a step: aliasing checks read
tensor metadata only, and index remapping is element-wise.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

_EMBEDDING_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}
_DATA_GET = Tensor.data.__get__
_DATA_SET = Tensor.data.__set__  # ``weight.data = value``: a write like ``weight.data.copy_(value)``
# Results that hold a raw address but no reference: for the scattered layout the user-order
# gather they point into is kept alive on the weight (safetensors reads through data_ptr()).
_RAW_ADDRESSES = (Tensor.data_ptr, Tensor.__cuda_array_interface__.__get__)

# Tensor methods whose name ends in "_" but that do not write values.
_NOT_WRITES = frozenset(
    {"requires_grad_", "retain_grad", "share_memory_", "record_stream", "set_"}
)
_INPLACE_DUNDERS = frozenset(
    {
        "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
        "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__",
        "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
    }
)


def _plain(t: Tensor) -> Tensor:
    """``t`` seen as a plain ``torch.Tensor`` (same storage and autograd history). A merged
    weight comes back in user order: its storage is the table, in layout order (a gather for
    the scattered layout)."""
    if isinstance(t, _PinnedWeight):
        with torch._C.DisableTorchFunctionSubclass():
            return t._pin.to_user_order(t.as_subclass(Tensor))
    return t.as_subclass(Tensor) if type(t) is not Tensor and not isinstance(t, nn.Parameter) else t


def _is_write(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES


class _Merge(torch.autograd.Function):
    """The table, as a tensor whose gradient reaches the free rows: an alias of the table in
    forward, the free block of the dense ``(V, D)`` gradient in backward. Only uses of
    ``weight`` other than a lookup produce such a gradient."""

    @staticmethod
    def forward(ctx, free: Tensor, table: Tensor) -> Tensor:
        ctx.num_pinned = table.shape[0] - free.shape[0]
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.num_pinned:], None


def _free_index(lidx: Tensor, num_pinned: int, num_free: int, lpad: int) -> Tensor:
    """Map layout rows to free-row positions; pinned and padding rows go to the sink ``num_free``."""
    keep = lidx >= num_pinned
    if lpad >= 0:
        keep = keep & (lidx != lpad)
    return torch.where(keep, lidx - num_pinned, num_free)


class _Lookup(torch.autograd.Function):
    """``F.embedding`` on the table with a gradient for the free rows only."""

    @staticmethod
    def forward(ctx, free, table, lidx, lpad, scale_grad_by_freq, sparse):
        ctx.save_for_backward(lidx)
        ctx.shape = (table.shape[0] - free.shape[0], free.shape[0])
        ctx.lpad, ctx.sgbf, ctx.sparse = lpad, scale_grad_by_freq, sparse
        return torch.embedding(table, lidx, lpad, scale_grad_by_freq, sparse)

    @staticmethod
    def backward(ctx, grad):
        (lidx,) = ctx.saved_tensors
        n, k = ctx.shape
        ridx = _free_index(lidx, n, k, ctx.lpad)
        if ctx.sparse:
            g = torch.ops.aten.embedding_sparse_backward(grad, ridx, k, k, ctx.sgbf)
        else:
            # One sink row past the end receives nothing (it is the padding row) and is sliced off.
            g = torch.ops.aten.embedding_dense_backward(grad, ridx, k + 1, k, ctx.sgbf)[:k]
        return g, None, None, None, None, None


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
                grad, ridx, offsets, offset2bag, bag_size, rmax, rows,
                ctx.sgbf and not scale, ctx.mode, ctx.sparse, psw, k,
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


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _target(args: tuple, kwargs: dict) -> Any:
    """The tensor an op works on (and, for an in-place op, writes to)."""
    return args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))


def _run_plain(func, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on the plain tensors that constrained weights stand for (in user order);
    results that alias one come back as :class:`_PinnedView`, so that writes through them
    cannot bypass the pinned-row check."""
    originals: dict[int, Tensor] = {}  # id(plain stand-in) -> the guarded argument
    ptrs: set[int | None] = set()

    def plain(a: Any) -> Any:
        if not isinstance(a, (_PinnedWeight, _PinnedView)):
            return a
        with torch._C.DisableTorchFunctionSubclass():
            t = a.as_subclass(Tensor)
            ptrs.add(_storage_ptr(t))
            if isinstance(a, _PinnedWeight):  # the table is in layout order
                t = a._pin.to_user_order(t)
                ptrs.add(_storage_ptr(t))
                if func in _RAW_ADDRESSES:
                    a._gathered = t
        originals[id(t)] = a
        return t

    args, kwargs = tree_map(plain, (args, kwargs))
    with torch._C.DisableTorchFunctionSubclass():
        if func == Tensor.__repr__:  # print as the plain tensor it stands for
            return func(*args, **kwargs)
        out = func(*args, **kwargs)

    def guard(t: Any) -> Any:
        np = sys.modules.get("numpy")
        if np is not None and isinstance(t, np.ndarray):  # .numpy(), __array__: may alias the table
            t.flags.writeable = False
        if not isinstance(t, Tensor):
            return t
        if id(t) in originals:
            return originals[id(t)]
        return t.as_subclass(_PinnedView) if _storage_ptr(t) in ptrs else t

    if isinstance(out, (tuple, list)):
        return type(out)(guard(t) for t in out)
    return guard(out)


def _storage_ptr(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested, meta ...
        return None


class _PinnedView(Tensor):
    """A view of a constrained weight (``weight[2:5]``, ``weight.t()``...): reads as a plain
    tensor; in-place writes are refused, since they would bypass the pinned-row check."""

    @classmethod
    @torch.compiler.disable
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (isinstance(_target(args, kwargs), cls) and _is_write(func)) or isinstance(kwargs.get("out"), cls):
            raise RuntimeError(
                f"in-place {getattr(func, '__name__', func)} on a view of a constrained embedding's weight "
                "is not supported; write through the weight itself under torch.no_grad() "
                "(e.g. emb.weight[rows] = values), or release() the embedding first"
            )
        return _run_plain(func, args, kwargs)


class _PinnedWeight(Tensor):
    """The merged ``(V, D)`` weight of a constrained embedding.

    Its storage is the table itself (no copy). It behaves as the plain merged tensor in user
    order everywhere, except that embedding lookups take the fast path (with no gather even
    for the scattered layout) and in-place writes are checked against the pinned rows.
    """

    _pin: PinnedRows
    _free: Tensor
    _table: Tensor

    @classmethod
    @torch.compiler.disable
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and isinstance(_arg(args, kwargs, 1, "weight"), cls):
            return _embedding(*args, **kwargs)
        if func is F.embedding_bag and isinstance(_arg(args, kwargs, 1, "weight"), cls):
            return _embedding_bag(*args, **kwargs)
        out = kwargs.get("out")
        if isinstance(out, (cls, _PinnedView)):
            return out._pin._write(func, args, kwargs) if isinstance(out, cls) else _PinnedView.__torch_function__(
                func, types, args, kwargs)
        target = _target(args, kwargs)
        if isinstance(target, cls):
            if func in (Tensor.detach, _DATA_GET):  # `in` compares by ==, as method-wrappers need
                with torch._C.DisableTorchFunctionSubclass():
                    return target._pin._wrap(func(*args, **kwargs), target._free, target._table)
            if _is_write(func) or func == _DATA_SET:
                return target._pin._write(func, args, kwargs)
        return _run_plain(func, args, kwargs)


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False):
    pin: PinnedRows = weight._pin
    if max_norm is not None:
        raise RuntimeError(
            "max_norm renormalizes looked-up rows in place, which would change pinned rows; "
            "it is not supported on a constrained embedding (set max_norm=None)"
        )
    lidx, lpad = pin._layout_index(input, padding_idx)
    return _Lookup.apply(weight._free, weight._table, lidx, lpad, scale_grad_by_freq, sparse)


def _embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False,
                   mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False,
                   padding_idx=None):
    # Argument handling mirrors torch.nn.functional.embedding_bag.
    pin: PinnedRows = weight._pin
    if input.is_nested:
        with torch._C.DisableTorchFunctionSubclass():
            return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq,
                                   mode, sparse, per_sample_weights, include_last_offset, padding_idx)
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
    if mode not in _EMBEDDING_BAG_MODES:
        raise ValueError("mode has to be one of sum, mean or max")
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights")
    if max_norm is not None:
        raise RuntimeError(
            "max_norm renormalizes looked-up rows in place, which would change pinned rows; "
            "it is not supported on a constrained embedding (set max_norm=None)"
        )
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError(
            "embedding_bag: per_sample_weights is only supported for mode='sum' "
            f"(got mode='{mode}')"
        )
    lidx, lpad = pin._layout_index(input, padding_idx)
    offsets = offsets.to(lidx.dtype)
    return _Bag.apply(weight._free, weight._table, per_sample_weights, lidx, offsets, lpad,
                      scale_grad_by_freq, _EMBEDDING_BAG_MODES[mode], sparse, include_last_offset)


class PinnedRows(nn.Module):
    """Parametrization ``weight = reference rows ∪ free rows`` (see the module docstring).

    Registered by :func:`embconstraint.constrain`; not meant to be built by hand.
    ``rows`` holds, in layout order, the user row of every table row: the pinned
    rows first (in reference order), then the free rows in increasing order.
    """

    def __init__(self, reference: Tensor, rows: Tensor | None, num_rows: int,
                 on_mismatch: str = "error") -> None:
        super().__init__()
        self.num_rows = num_rows
        self.num_pinned = reference.shape[0]
        self.on_mismatch = on_mismatch
        self._reference: Tensor | None = reference  # consumed by the first right_inverse
        self._table: Tensor | None = None
        # rows: layout -> user row; pos: user row -> layout. None for the prefix layout.
        self._rows = rows
        self._pos = None if rows is None else torch.empty_like(rows).index_copy_(
            0, rows, torch.arange(num_rows))
        self._device_pos: dict[torch.device, Tensor] = {}
        self.path = "aliased"

    # -- layout helpers -------------------------------------------------------------------
    @property
    def layout(self) -> str:
        return "prefix" if self._rows is None else "scattered"

    def pinned_rows(self) -> Tensor:
        """User rows of the pinned rows, in reference order (CPU, int64)."""
        if self._rows is None:
            return torch.arange(self.num_pinned)
        return self._rows[: self.num_pinned]

    def free_rows(self) -> Tensor:
        """User rows of the free rows, in increasing order (CPU, int64)."""
        if self._rows is None:
            return torch.arange(self.num_pinned, self.num_rows)
        return self._rows[self.num_pinned:]

    def _pos_on(self, device: torch.device) -> Tensor:
        pos = self._device_pos.get(device)
        if pos is None:
            pos = self._device_pos[device] = self._pos.to(device)
        return pos

    def _layout_index(self, input: Tensor, padding_idx: int | None) -> tuple[Tensor, int]:
        lpad = -1
        if padding_idx is not None:
            lpad = padding_idx + self.num_rows if padding_idx < 0 else padding_idx
            if self._pos is not None:
                lpad = int(self._pos[lpad])
        if self._pos is None:
            return input, lpad
        return self._pos_on(input.device)[input], lpad

    def to_user_order(self, table: Tensor) -> Tensor:
        """The table's rows in user order (a view for the prefix layout, a gather otherwise)."""
        if self._pos is None:
            return table
        return table.index_select(0, self._pos_on(table.device))

    def user_to_layout(self, weight: Tensor) -> Tensor:
        if self._rows is None:
            return weight
        return weight.index_select(0, self._rows.to(weight.device))

    # -- the parametrization ----------------------------------------------------------------
    def _aliased(self, free: Tensor) -> bool:
        table = self._table
        return (
            table is not None
            and free.device == table.device
            and free.dtype == table.dtype
            and free.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
            and free.storage_offset() == table.storage_offset() + self.num_pinned * table.shape[1]
            and free.shape == (self.num_rows - self.num_pinned, table.shape[1])
            and free.stride() == table.stride()
            and table.is_contiguous()
        )

    @torch.no_grad()
    def _sync(self, free: Tensor) -> Tensor:
        """The table, re-built around ``free`` if a conversion (``.to``, ``.half``, a loader,
        a distributed wrapper) separated them. Re-aliases ``free`` when it is a Parameter."""
        if self._aliased(free):
            return self._table
        old = self._table
        table = torch.empty((self.num_rows, free.shape[1]), dtype=free.dtype, device=free.device)
        table[: self.num_pinned] = old[: self.num_pinned]
        table[self.num_pinned:] = free
        self._table = table
        if isinstance(free, nn.Parameter) and free.is_leaf:
            free.set_(table[self.num_pinned:])
            self.path = "aliased"
        else:
            self.path = "copy"
        return table

    @torch.compiler.disable
    def forward(self, free: Tensor) -> Tensor:
        table = self._sync(free)
        return self._wrap(_Merge.apply(free, table.detach()), free, table)

    def _wrap(self, t: Tensor, free: Tensor, table: Tensor) -> _PinnedWeight:
        w = t.as_subclass(_PinnedWeight)
        w._pin, w._free, w._table = self, free, table.detach()
        return w

    @torch.no_grad()
    def right_inverse(self, weight: Tensor) -> Tensor:
        weight = _plain(weight)
        if self._table is None:  # registration: build the table around a copy of the reference
            ref, self._reference = self._reference, None
            if _storage_ptr(ref) == _storage_ptr(weight):  # e.g. "pin the rows at their current values"
                ref = ref.clone()
            if self._rows is None and weight.is_contiguous():
                # The prefix layout is the user order: the embedding's own storage becomes the
                # table, so constraining allocates no second (V, D) tensor.
                table = weight.detach()
            else:
                table = torch.empty((self.num_rows, weight.shape[1]), dtype=weight.dtype, device=weight.device)
                torch.index_select(weight, 0, self.free_rows().to(weight.device), out=table[self.num_pinned:])
            table[: self.num_pinned] = ref  # copies, casting dtype and device
            self._table = table
            return table[self.num_pinned:]
        # assignment ``module.weight = value``: value must keep the pinned rows
        table = self._table
        self._check_pinned(weight, "weight")
        table[self.num_pinned:] = self.user_to_layout(weight.to(table))[self.num_pinned:]
        return table[self.num_pinned:]

    def _check_pinned(self, weight: Tensor, what: str) -> None:
        """Raise if ``weight`` (user order) does not hold the pinned rows bitwise."""
        if tuple(weight.shape) != (self.num_rows, self._table.shape[1]):
            raise ValueError(
                f"{what} must have shape {(self.num_rows, self._table.shape[1])}, got {tuple(weight.shape)}"
            )
        new = self.user_to_layout(weight.to(self._table))[: self.num_pinned]
        old = self._table[: self.num_pinned]
        if not torch.equal(new, old):
            dev = (new.double() - old.double()).abs().nan_to_num(float("inf")).max().item()
            raise RuntimeError(
                f"{what} would change pinned rows of a constrained embedding (max |Δ| = {dev:g}); "
                "pinned rows only change through release() or on_mismatch='checkpoint'"
            )

    def _write(self, func, args, kwargs) -> Tensor:
        """An in-place op on the merged weight: applied to a scratch copy, then only the free
        rows are written back, and only if the pinned rows are left unchanged."""
        name = ".data assignment" if func == _DATA_SET else getattr(func, "__name__", str(func))
        if "out" in kwargs and isinstance(kwargs["out"], _PinnedWeight):
            target, slot = kwargs["out"], "out"
        elif args:
            target, slot = args[0], 0
        else:
            slot = "tensor" if "tensor" in kwargs else "input"
            target = kwargs[slot]
        if torch.is_grad_enabled() and target.requires_grad and func != _DATA_SET:
            raise RuntimeError(
                f"in-place {name} on the weight of a constrained embedding needs torch.no_grad(); "
                "writes may only change the free rows"
            )
        # (grad mode is checked above, before no_grad: a decorator would hide the caller's mode)
        with torch.no_grad():
            free = target._free
            scratch = self.to_user_order(self._sync(free)).clone()
            if slot == 0:
                args = (scratch, *args[1:])
            else:
                kwargs = {**kwargs, slot: scratch}
            with torch._C.DisableTorchFunctionSubclass():
                func(*args, **kwargs)
            self._check_pinned(scratch, f"in-place {name}")
            self._sync(free)[self.num_pinned:] = self.user_to_layout(scratch)[self.num_pinned:]
            if not self._aliased(free):  # the copy path: free rows live apart from the table
                free.copy_(self._table[self.num_pinned:])
            return target

    @torch.no_grad()
    def load_plain(self, weight: Tensor, free: Tensor, what: str) -> Tensor:
        """Free rows to load from a plain ``(V, D)`` weight; pinned rows are checked (or adopted)."""
        table = self._sync(free)
        if self.on_mismatch == "checkpoint":
            if tuple(weight.shape) == (self.num_rows, table.shape[1]):
                table[: self.num_pinned] = self.user_to_layout(weight.to(table))[: self.num_pinned]
        else:
            self._check_pinned(weight, what)
        return self.user_to_layout(weight.to(table))[self.num_pinned:]

    def extra_repr(self) -> str:
        return (f"rows={self.num_rows}, pinned={self.num_pinned}, layout={self.layout}, "
                f"path={self.path}")


class TiedTo(nn.Module):
    """Parametrization of a module that shares its weight with a constrained embedding
    (e.g. a tied output head): it computes with that embedding's merged weight."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list keeps the embedding out of this module's children

    @property
    def embedding(self) -> nn.Module:
        return self._embedding[0]

    def forward(self, _: Tensor) -> Tensor:
        return self.embedding.weight

    def right_inverse(self, value: Tensor) -> Tensor:
        emb_weight = self.embedding.weight
        original = self.embedding.parametrizations.weight.original
        # At registration ``value`` is the shared Parameter, which constrain() already turned
        # into the embedding's free rows (``original``): accept it as the tie itself.
        if value is not original and value is not emb_weight and not torch.equal(_plain(value), _plain(emb_weight)):
            raise RuntimeError("a weight tied to a constrained embedding can only be set through the embedding")
        return self.embedding.parametrizations.weight.original
