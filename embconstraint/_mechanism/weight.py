"""The weight a constrained module computes with: a write-guarding tensor subclass.

``weight`` is returned as a :class:`PinnedWeight` whose storage is the table. Its
``__torch_function__`` sends the ops listed in :data:`HANDLED` (``F.embedding``,
``F.embedding_bag``, ``F.linear`` of an output head, tied or not) to the kernels of
:mod:`.kernels`; any other use of ``weight`` (``weight @ h``, ``weight.sum()``, ...) runs on the plain merged tensor in user order
(:func:`run_plain`), whose results that alias it come back as :class:`PinnedView`. In-place
writes are applied to a scratch copy and handed to the parametrization, which writes back
the free rows only if the pinned rows are unchanged.

With the split storage (sharded training) the weight has no table: it is a zero-stride
``(V, D)`` stand-in (``_table`` is None) and the merged tensor is built from the pinned and
free rows only where a use needs it (:func:`plain`).

The parametrization is reached through the members of :class:`Pin` only (it is
:class:`~embconstraint._mechanism.parametrization.PinnedRows`, which imports this module).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .kernels import MAX_NORM_REFUSED, embedding, embedding_bag, linear, merge
from .layout import Layout

__all__ = ["PinnedWeight", "PinnedView", "PinnedConstant", "HANDLED", "DATA_SET", "wrap", "constant", "plain",
           "storage_ptr"]

class Pin(Protocol):
    """What a weight needs of its parametrization."""

    @property
    def layout(self) -> Layout: ...

    @property
    def free_parameter(self) -> Tensor: ...

    def table(self, free: Tensor) -> Tensor: ...

    def pinned_block(self, like: Tensor | None = None) -> Tensor: ...

    def check_pinned(self, weight: Tensor, what: str) -> None: ...

    def write_free_rows(self, weight: Tensor, free: Tensor) -> None: ...


_DATA_GET = Tensor.data.__get__
DATA_SET = Tensor.data.__set__  # ``weight.data = value``: a write like ``weight.data.copy_(value)``
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


def _merged(w: PinnedWeight) -> Tensor:
    """The plain tensor ``w`` stands for (layout order): the table through a ``Merge`` node, so
    that gradients reach the free rows. Built on the first use that is not a handled op (a
    lookup needs none), in the grad mode of the weight's access, then kept on ``w``."""
    m = w.__dict__.get("_merged")
    if m is None:
        with torch._C.DisableTorchFunctionSubclass(), torch.set_grad_enabled(w._grad_mode):
            if w._table is None:  # split storage: built from the pinned and free rows
                m = torch.cat([w._pin.pinned_block(w._free), w._free])
            else:
                m = merge(w._free, w._table)
            w.__dict__["_merged"] = m
    return m


def plain(t: Tensor) -> Tensor:
    """``t`` seen as a plain ``torch.Tensor`` (same storage and autograd history). A merged
    weight comes back in user order: its storage is the table, in layout order (a gather for
    the scattered layout)."""
    if isinstance(t, PinnedWeight):
        with torch._C.DisableTorchFunctionSubclass():
            return t._pin.layout.to_user_order(_merged(t))
    return t.as_subclass(Tensor) if type(t) is not Tensor and not isinstance(t, nn.Parameter) else t


_IS_FUNCTORCH_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def transformed(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's wrapper (``grad``, ``vmap``...): no storage of
    its own, so it can neither alias the table nor go through the storage-level kernels. (Runs at
    every weight access: the check is resolved once, at import.)"""
    return _IS_FUNCTORCH_WRAPPED is not None and _IS_FUNCTORCH_WRAPPED(t)


def storage_ptr(t: Tensor) -> int | None:
    """The address of ``t``'s storage (None for tensors without one: sparse, nested, meta ...)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _is_write(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _target(args: tuple, kwargs: dict) -> Any:
    """The tensor an op works on (and, for an in-place op, writes to)."""
    return args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))


def run_plain(func, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on the plain tensors that constrained weights stand for (in user order);
    results that alias one come back as :class:`PinnedView`, so that writes through them
    cannot bypass the pinned-row check."""
    originals: dict[int, Tensor] = {}  # id(plain stand-in) -> the guarded argument
    ptrs: set[int | None] = set()

    def unwrap(a: Any) -> Any:
        if not isinstance(a, (PinnedWeight, PinnedView, PinnedConstant)) or getattr(a, "_own", False):
            return a
        with torch._C.DisableTorchFunctionSubclass():
            t = _merged(a) if isinstance(a, PinnedWeight) else a.as_subclass(Tensor)
            ptrs.add(storage_ptr(t))
            if isinstance(a, PinnedWeight):  # the table is in layout order
                t = a._pin.layout.to_user_order(t)
                ptrs.add(storage_ptr(t))
                if func in _RAW_ADDRESSES:
                    a._gathered = t
        originals[id(t)] = a
        return t

    args, kwargs = tree_map(unwrap, (args, kwargs))
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
        return t.as_subclass(PinnedView) if storage_ptr(t) in ptrs else t

    if isinstance(out, (tuple, list)):
        return type(out)(guard(t) for t in out)
    return guard(out)


class PinnedView(Tensor):
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
        return run_plain(func, args, kwargs)


class PinnedWeight(Tensor):
    """The merged ``(V, D)`` weight of a constrained module.

    Its storage is the table itself (no copy). It behaves as the plain merged tensor in user
    order everywhere, except that the ops in :data:`HANDLED` take their kernel (with no gather
    even for the scattered layout) and in-place writes are checked against the pinned rows.
    """

    _pin: Pin
    _free: Tensor
    _table: Tensor
    _grad_mode: bool  # grad mode of the access: the lazily built Merge node records a graph in it

    @classmethod
    @torch.compiler.disable
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handled = HANDLED.get(func)
        if handled is not None and isinstance(_arg(args, kwargs, handled.position, handled.name), cls):
            return handled.handler(*args, **kwargs)
        out = kwargs.get("out")
        if isinstance(out, (cls, PinnedView)):
            if isinstance(out, cls):
                return _write(func, args, kwargs)
            return PinnedView.__torch_function__(func, types, args, kwargs)
        target = _target(args, kwargs)
        if isinstance(target, cls):
            if func in (Tensor.detach, _DATA_GET):  # `in` compares by ==, as method-wrappers need
                if target._table is not None:  # aliased storage: a guarded constant
                    return constant(target._pin, target._free)
                with torch._C.DisableTorchFunctionSubclass():
                    detached = wrap(func(*args, **kwargs), target._pin, target._free, target._table)
                    if target._table is None:  # (split storage: no Merge node to keep out of the graph)
                        detached._free = target._free.detach()
                    detached._grad_mode = False  # its Merge node, if built, records no graph
                    return detached
            if _is_write(func) or func == DATA_SET:
                return _write(func, args, kwargs)
        return run_plain(func, args, kwargs)

    def set_(self, *args: Any, **kwargs: Any) -> Tensor:  # set_ does not reach __torch_function__
        raise RuntimeError(_SET_REFUSED)


_SET_REFUSED = ("set_ on the weight of a constrained embedding is not supported (it would replace the "
                "pinned rows); write the free rows under torch.no_grad() (emb.weight[rows] = values), "
                "or release() the embedding first")


class PinnedConstant(Tensor):
    """``weight.detach()`` / ``weight.data`` (and a state dict's weight) of a constrained module:
    the merged ``(V, D)`` weight in user order, as a constant (no autograd history; for the
    prefix layout an alias of the table, no copy). Every op reads it as a plain tensor, lookups
    included; in-place writes go through the pinned-row check into the module's free rows.

    ``requires_grad_(True)`` (``nn.Parameter(weight.detach())``, ``from_pretrained(...,
    freeze=False)``, a new leaf) makes it a tensor of its own: its values are copied once and it
    behaves as a plain tensor from then on, unconnected to the module.
    """

    _pin: Pin
    _free: Tensor
    _own: bool = False

    @classmethod
    @torch.compiler.disable
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _target(args, kwargs)
        if isinstance(target, cls) and target._own:
            return _run_own(func, args, kwargs)
        handled = HANDLED.get(func)
        weight = _arg(args, kwargs, 1, "weight") if handled is not None else None
        if isinstance(weight, cls) and not weight._own and _arg(args, kwargs, 3, "max_norm") is not None:
            raise ValueError(MAX_NORM_REFUSED)
        out = kwargs.get("out")
        if isinstance(out, cls) and not out._own:
            return _write(func, args, kwargs)
        if isinstance(out, PinnedView):
            return PinnedView.__torch_function__(func, types, args, kwargs)
        if isinstance(target, cls):
            if func in (Tensor.detach, _DATA_GET):
                return constant(target._pin, target._free)
            if func == Tensor.requires_grad_ and _arg(args, kwargs, 1, "requires_grad", True):
                return _own_copy(target)
            if _is_write(func) or func == DATA_SET:
                return _write(func, args, kwargs)
        return run_plain(func, args, kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:  # saved (torch.save, pickle) as the plain tensor
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> Tensor:  # a copy is a plain tensor of its own
        with torch._C.DisableTorchFunctionSubclass():
            out = self.as_subclass(Tensor).clone().requires_grad_(self.requires_grad)
        memo[id(self)] = out
        return out

    def set_(self, *args: Any, **kwargs: Any) -> Tensor:  # set_ does not reach __torch_function__
        if not self._own:
            raise RuntimeError(_SET_REFUSED)
        return Tensor.set_(self, *args, **kwargs)


def _run_own(func, args: tuple, kwargs: dict) -> Any:
    """``func`` on a constant that became a tensor of its own: plain torch semantics."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _own_copy(c: PinnedConstant) -> PinnedConstant:
    """Make ``c`` a tensor of its own (a new leaf): copy its values out of the table."""
    with torch._C.DisableTorchFunctionSubclass():
        Tensor.set_(c, c.clone())  # allowed: the constant comes from _make_subclass
        c._own = True
        Tensor.requires_grad_(c, True)
    return c


def constant(pin: Pin, free: Tensor) -> PinnedConstant:
    """The merged weight of ``pin`` as a :class:`PinnedConstant` (user order, no grad)."""
    with torch._C.DisableTorchFunctionSubclass():
        t = pin.layout.to_user_order(pin.table(free)).detach()
    c = Tensor._make_subclass(PinnedConstant, t, False)
    c._pin, c._free = pin, free
    return c


def wrap(t: Tensor, pin: Pin, free: Tensor, table: Tensor | None) -> PinnedWeight:
    """``t`` (an alias of ``table``; a stand-in with the split storage, ``table`` None) as the
    :class:`PinnedWeight` of ``pin``. ``table`` is kept as given: a detached alias of the table."""
    w = t.as_subclass(PinnedWeight)
    w._pin, w._free, w._table = pin, free, table
    w._grad_mode = torch.is_grad_enabled()
    return w


def _write(func, args: tuple, kwargs: dict) -> Tensor:
    """An in-place op on the merged weight: applied to a scratch copy, then only the free rows
    are written back, and only if the pinned rows are left unchanged."""
    name = ".data assignment" if func == DATA_SET else getattr(func, "__name__", str(func))
    if "out" in kwargs and isinstance(kwargs["out"], (PinnedWeight, PinnedConstant)):
        target, slot = kwargs["out"], "out"
    elif args:
        target, slot = args[0], 0
    else:
        slot = "tensor" if "tensor" in kwargs else "input"
        target = kwargs[slot]
    if torch.is_grad_enabled() and target.requires_grad and func != DATA_SET:
        raise RuntimeError(
            f"in-place {name} on the weight of a constrained embedding needs torch.no_grad(); "
            "writes may only change the free rows"
        )
    # (grad mode is checked above, before no_grad: a decorator would hide the caller's mode)
    pin, free = target._pin, target._free
    if isinstance(target, PinnedWeight) and target._table is None:  # split storage: write the registered free rows
        free = pin.free_parameter
    with torch.no_grad():
        scratch = pin.layout.to_user_order(pin.table(free)).clone()
        if slot == 0:
            args = (scratch, *args[1:])
        else:
            kwargs = {**kwargs, slot: scratch}
        with torch._C.DisableTorchFunctionSubclass():
            func(*args, **kwargs)
        pin.check_pinned(scratch, f"in-place {name}")
        pin.write_free_rows(scratch, free)
        if isinstance(target, PinnedConstant) and storage_ptr(target) != storage_ptr(pin.table(free)):
            with torch._C.DisableTorchFunctionSubclass():
                target.copy_(scratch)  # a gathered (scattered-layout) or stale constant: keep it current
        return target


# -- the handled functions ------------------------------------------------------------------------


class Handled:
    """How a function that takes a constrained weight runs: ``handler`` gets the call's own
    arguments; the weight is argument ``position`` (or keyword ``name``)."""

    __slots__ = ("handler", "position", "name")

    def __init__(self, handler: Callable[..., Tensor], position: int = 1, name: str = "weight") -> None:
        self.handler, self.position, self.name = handler, position, name


def _split_pinned(weight: PinnedWeight) -> Tensor | None:
    """The pinned rows the kernels take with the split storage (None with the table)."""
    return weight._pin.pinned_block(weight._free) if weight._table is None else None


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False):
    return embedding(input, weight._free, weight._table, weight._pin.layout, padding_idx,
                     max_norm, scale_grad_by_freq, sparse, pinned=_split_pinned(weight))


def _embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False,
                   mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False,
                   padding_idx=None):
    if input.is_nested:
        with torch._C.DisableTorchFunctionSubclass():
            return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq,
                                   mode, sparse, per_sample_weights, include_last_offset, padding_idx)
    return embedding_bag(input, weight._free, weight._table, weight._pin.layout, offsets, max_norm,
                         scale_grad_by_freq, mode, sparse, per_sample_weights,
                         include_last_offset, padding_idx, pinned=_split_pinned(weight))


def _split_linear(input: Tensor, weight: PinnedWeight, bias: Tensor | None) -> Tensor:
    """``F.linear`` on the split storage (sharded training): the logits of the pinned rows and of
    the free rows, concatenated, then in user order; no ``(V, D)`` weight is built (equal to the
    plain head to rounding: two matmuls)."""
    pin, free = weight._pin, weight._free
    with torch._C.DisableTorchFunctionSubclass():
        out = torch.cat([F.linear(input, pin.pinned_block(free)), F.linear(input, free)], dim=-1)
        if pin.layout.pos is not None:
            out = out.index_select(-1, pin.layout.pos_on(out.device))
    return out if bias is None else out + plain(bias)


def _linear(input, weight, bias=None):
    if (weight._table is None and weight._free.dim() == 2 and not isinstance(bias, PinnedView)
            and not torch.is_autocast_enabled(input.device.type)):
        return _split_linear(input, weight, bias)
    split = weight._table is None or (isinstance(bias, PinnedWeight) and bias._table is None)
    if split or torch.is_autocast_enabled(input.device.type) or isinstance(bias, PinnedView):
        # the generic path: autocast casts the merged weight; the split storage has no table
        return run_plain(F.linear, (input, weight, bias), {})
    bias_free = None
    if isinstance(bias, PinnedWeight):  # a constrained head's bias: its free entries train
        bias_free = bias._free
        bias = bias._pin.layout.to_user_order(bias._table)
    return linear(input, weight._free, weight._table, weight._pin.layout, bias, bias_free)


HANDLED: dict[Callable[..., Any], Handled] = {
    F.embedding: Handled(_embedding),
    F.embedding_bag: Handled(_embedding_bag),
    F.linear: Handled(_linear),
}
