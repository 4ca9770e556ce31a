"""The weight a constrained module computes with: a write-guarding tensor subclass.

``weight`` is returned as a :class:`PinnedWeight` whose storage is the table. Its
``__torch_function__`` sends the ops listed in :data:`HANDLED` (``F.embedding``,
``F.embedding_bag``, ``F.linear`` of an output head, tied or not) to the kernels of
:mod:`.kernels`, through the handlers of :mod:`.handlers` (which fills :data:`HANDLED`); any other use of ``weight`` (``weight @ h``, ``weight.sum()``, ...) runs on the plain merged tensor in user order
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
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .dispatch import (
    DATA_GET,
    DATA_SET,
    RAW_ADDRESSES,
    REQUIRES_GRAD_SET,
    arg,
    functional,
    is_setter,
    is_state_getter,
    is_value_setter,
    is_write,
    op_name,
    standalone,
    storage_ptr,
    target_of,
    through_torch_function,
)
from .kernels import MAX_NORM_REFUSED, merge
from .layout import Layout

__all__ = [
    "PinnedWeight",
    "PinnedView",
    "PinnedConstant",
    "HANDLED",
    "Handled",
    "wrap",
    "constant",
    "plain",
    "run_plain",
]


class Pin(Protocol):
    """What a weight needs of its parametrization."""

    @property
    def layout(self) -> Layout: ...

    @property
    def free_parameter(self) -> Tensor: ...

    def table(self, free: Tensor) -> Tensor: ...

    def user_order(self, free: Tensor) -> Tensor: ...

    def pinned_block(self, like: Tensor | None = None) -> Tensor: ...

    def check_pinned(self, weight: Tensor, what: str) -> None: ...

    def write_free_rows(self, weight: Tensor, free: Tensor) -> None: ...


def _merged(w: PinnedWeight) -> Tensor:
    """The plain tensor ``w`` stands for, in table order, with autograd history that reaches the
    free rows (in the grad mode of the weight's access): for the prefix layout ``w`` itself seen as
    a plain tensor; otherwise a ``Merge`` node of its own (``w``'s node takes gradients in user
    order); with the split storage, or under a ``torch.func`` transform or forward-mode AD, a
    ``torch.cat`` of the pinned and the free rows. Built on the first use that is not a handled
    op, then kept on ``w``."""
    m = w.__dict__.get("_merged")
    if m is None:
        with torch._C.DisableTorchFunctionSubclass(), torch.set_grad_enabled(w._grad_mode):
            if w._table is None or functional():
                m = torch.cat([w._pin.pinned_block(w._free), w._free])
            elif w._pin.layout.rows is None:
                m = w.as_subclass(Tensor)
            else:
                m = merge(w._free, w._table)
        w.__dict__["_merged"] = m
    return m


def plain(t: Tensor) -> Tensor:
    """``t`` seen as a plain ``torch.Tensor`` (same storage and autograd history). A merged
    weight comes back in user order: its storage is the table, in layout order (a gather for
    the scattered layout, built once per weight object, so that every use of one weight object
    reads, and sets attributes on, one tensor)."""
    if isinstance(t, PinnedWeight):
        user = t.__dict__.get("_user")
        if user is None:
            with torch._C.DisableTorchFunctionSubclass(), torch.set_grad_enabled(t._grad_mode):
                user = t.__dict__["_user"] = t._pin.layout.to_user_order(_merged(t))
        return user
    return t.as_subclass(Tensor) if type(t) is not Tensor and not isinstance(t, nn.Parameter) else t


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
            if isinstance(a, PinnedWeight) and func in RAW_ADDRESSES:  # one address for tied weights
                t = a._gathered = a._pin.user_order(a._free)
            elif isinstance(a, PinnedWeight):  # the table (layout order) and its user-order stand-in
                ptrs.add(storage_ptr(_merged(a)))
                t = plain(a)
            else:
                t = a.as_subclass(Tensor)
            ptrs.add(storage_ptr(t))
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
    @torch.compiler.disable  # (a weight made outside a compiled region: Dynamo runs its dispatch outside)
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(target_of(args, kwargs), cls):
            handled, out = standalone(func, args)
            if handled:
                return out
        if (
            isinstance(target_of(args, kwargs), cls) and (is_write(func) or is_value_setter(func))
        ) or isinstance(kwargs.get("out"), cls):
            raise RuntimeError(
                f"in-place {op_name(func)} on a view of a constrained embedding's weight "
                "is not supported; write through the weight itself under torch.no_grad() "
                "(e.g. emb.weight[rows] = values), or release() the embedding first"
            )
        return run_plain(func, args, kwargs)

    real = through_torch_function(Tensor.real)
    imag = through_torch_function(Tensor.imag)


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
    @torch.compiler.disable  # (a weight made outside a compiled region: Dynamo runs its dispatch outside)
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handled = HANDLED.get(func)
        if handled is not None and isinstance(arg(args, kwargs, handled.position, handled.name), cls):
            return handled.handler(*args, **kwargs)
        out = kwargs.get("out")
        if isinstance(out, (cls, PinnedView)):
            if isinstance(out, cls):
                return _write(func, args, kwargs)
            return PinnedView.__torch_function__(func, types, args, kwargs)
        target = target_of(args, kwargs)
        if isinstance(target, cls):
            if func in (Tensor.detach, DATA_GET):  # `in` compares by ==, as method-wrappers need
                if target._table is not None:  # aliased storage: a guarded constant
                    return constant(target._pin, target._free)
                with torch._C.DisableTorchFunctionSubclass():
                    detached = wrap(func(*args, **kwargs), target._pin, target._free, target._table)
                    if target._table is None:  # (split storage: no Merge node to keep out of the graph)
                        detached._free = target._free.detach()
                    detached._grad_mode = False  # its Merge node, if built, records no graph
                    return detached
            if is_write(func) or is_value_setter(func):
                return _write(func, args, kwargs)
        return run_plain(func, args, kwargs)

    def set_(self, *args: Any, **kwargs: Any) -> Tensor:  # set_ does not reach __torch_function__
        raise RuntimeError(_SET_REFUSED)

    real = through_torch_function(Tensor.real)
    imag = through_torch_function(Tensor.imag)


_SET_REFUSED = (
    "set_ on the weight of a constrained embedding is not supported (it would replace the "
    "pinned rows); write the free rows under torch.no_grad() (emb.weight[rows] = values), "
    "or release() the embedding first"
)


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
    @torch.compiler.disable  # (a weight made outside a compiled region: Dynamo runs its dispatch outside)
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = target_of(args, kwargs)
        if isinstance(target, cls) and target._own:
            return _run_own(func, args, kwargs)
        handled = HANDLED.get(func)
        weight = arg(args, kwargs, 1, "weight") if handled is not None else None
        if isinstance(weight, cls) and not weight._own and arg(args, kwargs, 3, "max_norm") is not None:
            raise ValueError(MAX_NORM_REFUSED)
        out = kwargs.get("out")
        if isinstance(out, cls) and not out._own:
            return _write(func, args, kwargs)
        if isinstance(out, PinnedView):
            return PinnedView.__torch_function__(func, types, args, kwargs)
        if isinstance(target, cls):
            handled, out = standalone(func, args)
            if handled:
                return out
            if func in (Tensor.detach, DATA_GET):
                return constant(target._pin, target._free)
            if func == Tensor.requires_grad_ and arg(args, kwargs, 1, "requires_grad", True):
                return _own_copy(target)
            if func == REQUIRES_GRAD_SET and args[1]:  # ``t.requires_grad = True``: as requires_grad_()
                _own_copy(target)
                return None
            if is_write(func) or is_value_setter(func):
                return _write(func, args, kwargs)
            if is_setter(func) or is_state_getter(
                func
            ):  # ``t.grad = ...``, ``t.grad``: on the constant itself
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
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

    real = through_torch_function(Tensor.real)
    imag = through_torch_function(Tensor.imag)


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
    """The merged weight of ``pin`` as a :class:`PinnedConstant` (user order, no grad; the
    storage of :meth:`PinnedRows.user_order`, so that tied weights share it)."""
    user = pin.user_order(free)
    c = Tensor._make_subclass(PinnedConstant, user, False)
    c._user = user  # (keeps the shared tensor alive: the next constant of this pin reuses it)
    c._pin, c._free = pin, free
    return c


def wrap(t: Tensor, pin: Pin, free: Tensor, table: Tensor | None) -> PinnedWeight:
    """``t`` as the :class:`PinnedWeight` of ``pin``: ``t`` is a new tensor (its class is changed in
    place, no alias is made) that spans ``table``'s storage (a zero-stride stand-in with the split
    storage, ``table`` None) and whose autograd history reaches ``free``."""
    t.__class__ = PinnedWeight
    t.__dict__.update(_pin=pin, _free=free, _table=table, _grad_mode=torch.is_grad_enabled())
    return t


_AVERAGING_HINT = (
    "; to average models (EMA, SWA), average model.parameters() (the trainable rows) or write "
    "into the tensors of state_dict(), which keep pinned values within rounding"
)


def _write(func, args: tuple, kwargs: dict) -> Tensor:
    """An in-place op on the merged weight: applied to a scratch copy, then only the free rows
    are written back, and only if the pinned rows are left unchanged."""
    name = op_name(func)
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
    if (
        isinstance(target, PinnedWeight) and target._table is None
    ):  # split storage: write the registered free rows
        free = pin.free_parameter
    with torch.no_grad():
        scratch = pin.layout.to_user_order(pin.table(free)).clone()
        if slot == 0:
            args = (scratch, *args[1:])
        else:
            kwargs = {**kwargs, slot: scratch}
        with torch._C.DisableTorchFunctionSubclass():
            func(*args, **kwargs)
        # A state dict's tensor may be written with pinned rows within rounding of their values
        # (an EMA, ``ema * d + (1 - d) * model``): the free rows are written, the pinned ones kept.
        constant_target = isinstance(target, PinnedConstant)
        pin.check_pinned(
            scratch,
            f"in-place {name}",
            rounding=constant_target,
            hint="" if constant_target else _AVERAGING_HINT,
        )
        pin.write_free_rows(scratch, free)
        table = pin.table(free)
        if constant_target and storage_ptr(target) != storage_ptr(table):
            with torch._C.DisableTorchFunctionSubclass():  # a gathered (scattered-layout) or stale constant
                target.copy_(pin.layout.to_user_order(table))
        return target


# -- the handled functions ------------------------------------------------------------------------


class Handled:
    """How a function that takes a constrained weight runs: ``handler`` gets the call's own
    arguments; the weight is argument ``position`` (or keyword ``name``)."""

    __slots__ = ("handler", "position", "name")

    def __init__(self, handler: Callable[..., Tensor], position: int = 1, name: str = "weight") -> None:
        self.handler, self.position, self.name = handler, position, name


# The ops a constrained weight sends to their kernel, read by ``__torch_function__``: filled by
# :mod:`.handlers` (one entry per op), which the package imports with this module.
HANDLED: dict[Callable[..., Any], Handled] = {}
