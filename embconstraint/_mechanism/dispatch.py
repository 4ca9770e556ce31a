"""What a guarded weight needs to know about the torch call it intercepts: whether it writes (an
in-place method or operator, a value assignment), reads or sets a tensor's own autograd state, which
argument it works on, and whether a ``torch.func`` transform or forward-mode AD is under way. Pure
functions of the call: no tensor class of embconstraint here (:mod:`.weight` and :mod:`.traced`
use them).

>>> import torch
>>> is_write(torch.Tensor.add_), is_write(torch.Tensor.add), is_value_setter(torch.Tensor.data.__set__)
(True, False, True)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "DATA_GET",
    "DATA_SET",
    "RAW_ADDRESSES",
    "REQUIRES_GRAD_SET",
    "functional",
    "transformed",
    "storage_ptr",
    "is_write",
    "standalone",
    "is_state_getter",
    "is_setter",
    "is_value_setter",
    "op_name",
    "arg",
    "target_of",
    "through_torch_function",
]

DATA_GET = Tensor.data.__get__
DATA_SET = Tensor.data.__set__  # ``weight.data = value``: a write like ``weight.data.copy_(value)``
# What reads a raw address (safetensors, PEFT's tie check): the shared user-order storage, kept on the weight.
RAW_ADDRESSES = (Tensor.data_ptr, Tensor.untyped_storage, Tensor.__cuda_array_interface__.__get__)
REQUIRES_GRAD_SET = Tensor.requires_grad.__set__

# Tensor methods whose name ends in "_" but that do not write values.
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "record_stream", "set_"})
_INPLACE_DUNDERS = frozenset(
    {
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__imatmul__",
    }
)


def functional() -> bool:
    """Whether plain differentiable ops must stand in for the kernels: under a ``torch.func``
    transform (``vmap`` over the ids, ``jvp``, ...) or forward-mode AD, which the kernels'
    autograd Functions (no vmap rule, no jvp) do not support."""
    return torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


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


def is_write(func: Any) -> bool:
    """Whether ``func`` writes into its first argument (an in-place method or operator)."""
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES


# Attributes of a tensor's own autograd state (not derived from its values): read on the object itself.
_AUTOGRAD_STATE = frozenset(
    {
        "grad",
        "_grad",
        "requires_grad",
        "is_leaf",
        "grad_fn",
        "_grad_fn",
        "retains_grad",
        "_backward_hooks",
        "_post_accumulate_grad_hooks",
    }
)


_BASE_GET = Tensor._base.__get__


def standalone(func: Any, args: tuple) -> tuple[bool, Any]:
    """``t._is_view()`` / ``t._base`` of a guarded stand-in (a constant or a view of the weight):
    it presents itself as a tensor of its own (not a view, no base), so that no one reaches an
    unguarded alias of the table through ``_base``, and a chain of stand-ins never starts."""
    if func == Tensor._is_view:
        return True, False
    if func == _BASE_GET:
        return True, None
    return False, None


def is_state_getter(func: Any) -> bool:
    """Whether ``func`` reads a tensor's own autograd state (``t.grad``, ``t.requires_grad``...),
    as opposed to a view or value of it (``t.T``, ``t.data``)."""
    return (
        getattr(func, "__name__", "") == "__get__"
        and getattr(func.__self__, "__name__", "") in _AUTOGRAD_STATE
    )


def is_setter(func: Any) -> bool:
    """Whether ``func`` sets a tensor attribute (``t.requires_grad = ...``, ``t.grad = ...``): the
    ``__set__`` of one of ``Tensor``'s descriptors."""
    return getattr(func, "__name__", "") == "__set__"


def is_value_setter(func: Any) -> bool:
    """Whether ``func`` sets values by assignment (``t.data = ...``, ``t.real = ...``): a write."""
    return is_setter(func) and getattr(func.__self__, "__name__", "") not in _AUTOGRAD_STATE | {"names"}


def op_name(func: Any) -> str:
    """How an error names ``func``: ``copy_``, ``.real assignment``..."""
    return (
        f".{func.__self__.__name__} assignment" if is_setter(func) else getattr(func, "__name__", str(func))
    )


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def target_of(args: tuple, kwargs: dict) -> Any:
    """The tensor an op works on (and, for an in-place op, writes to)."""
    return args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))


def through_torch_function(descriptor: Any) -> property:
    """``descriptor`` (``Tensor.real``) as a property whose setter reaches ``__torch_function__``:
    torch's own ``real`` setter writes into the tensor's storage without it."""

    def set_(self: Tensor, value: Any) -> None:
        type(self).__torch_function__(descriptor.__set__, (type(self),), (self, value), {})

    return property(descriptor.__get__, set_, None, f"``Tensor.{descriptor.__name__}``, its writes checked.")
