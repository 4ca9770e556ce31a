"""The accessors installed on a constrained module's class: the fast getter of the constrained
tensor, and an ``_apply`` that re-syncs the pinned rows after a conversion."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .parametrization import PinnedRows, TiedTo, pin_of
from .storage import ORIGINAL

__all__ = ["install_accessors"]


def _no_module_hooks(m: nn.Module) -> bool:
    """True when ``m(x)`` would run ``m.forward(x)`` directly (``Module.__call__``'s own test)."""
    g = nn.modules.module
    return not (
        m._backward_hooks
        or m._backward_pre_hooks
        or m._forward_hooks
        or m._forward_pre_hooks
        or g._global_backward_pre_hooks
        or g._global_backward_hooks
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
    )


def _fast_weight(plist: nn.Module) -> Tensor | None:
    """The getter's fast path (see :func:`install_accessors`): the weight that the parametrizations
    ``plist`` (a ``ParametrizationList``) hold, computed without parametrize's getter, or None when
    parametrize's getter must compute it."""
    mods, orig = plist._modules, plist._parameters.get(ORIGINAL)
    if orig is not None and len(mods) == 1:
        pin = mods["0"]  # resolved per call: deepcopy keeps the class, not the PinnedRows
        if type(pin) is PinnedRows:
            if _no_module_hooks(pin):
                return pin.eager_weight(orig)
            if "ds_id" in orig.__dict__:  # DeepSpeed ZeRO-3 (see install_accessors)
                return pin.eager_weight(plist._parameters[ORIGINAL])
        elif type(pin) is TiedTo and "ds_id" in orig.__dict__:  # a tied head under ZeRO-3: the
            return pin.forward(orig)  # embedding's getter, which reads the free rows through DeepSpeed
    return None


def install_accessors(module: nn.Module, name: str = "weight") -> None:
    """Install, on the per-module class that parametrize created for ``module``: a fast getter
    for ``module.<name>`` (below), and an ``_apply`` that re-syncs the pinned rows after a
    conversion (``.to()``, ``.half()``...: :meth:`PinnedRows.sync`); and fill the row maps that
    a lookup on the weight's device reads.

    The getter replaces the property parametrize injected by one that calls
    :meth:`PinnedRows.forward` directly when that is what parametrize's getter would compute:
    caching off, no tracing, the list holds only our ``PinnedRows`` with no hooks, ``original``
    a registered tensor. Anything else (another parametrization appended, ``parametrize.cached()``,
    hooks, ``torch.compile``) takes parametrize's own getter. Installed on a module tied to a
    constrained one (:class:`TiedTo`), it takes parametrize's getter too, except under ZeRO-3 (below).

    DeepSpeed ZeRO-3 registers hooks on every module, the ``ParametrizationList`` and the
    ``PinnedRows`` included; those would gather the free rows for the list's call only,
    partition them again before the lookup runs, and wrap the weight in an autograd function that
    detaches it from the free rows. For a ZeRO-3 Parameter the getter calls
    :meth:`PinnedRows.eager_weight` directly and reads ``original`` through DeepSpeed's parameter dict,
    which gathers it in forward and registers it as an external parameter of the module running
    (the embedding, or a tied head): from then on DeepSpeed gathers the free rows before that
    module's forward and backward and partitions them after, as for its own weights. A tied head's
    getter calls :meth:`TiedTo.forward` directly for the same reason (its list's hooks would detach
    the weight from the free rows: the head's gradient would not reach them)."""
    cls = type(module)
    prop = cls.__dict__[name]
    slow = prop.fget

    def get(self: nn.Module) -> Tensor:
        if torch.compiler.is_compiling():
            return slow(self)
        if not parametrize._cache_enabled and torch._C._get_tracing_state() is None:
            weight = _fast_weight(self._modules["parametrizations"]._modules[name])
            if weight is not None:
                return weight
        return slow(self)

    setattr(cls, name, property(get, prop.fset, prop.fdel, prop.__doc__))
    if "_apply" not in cls.__dict__:
        base_apply = cls._apply

        def _apply(self: nn.Module, fn, *args, **kwargs):
            out = base_apply(self, fn, *args, **kwargs)
            for plist in getattr(self, "parametrizations", {}).values():
                for p in plist:
                    if isinstance(p, PinnedRows):
                        p.sync(getattr(self, "padding_idx", None))
            return out

        cls._apply = _apply
    pin = pin_of(module, name)
    if pin is not None:
        pin.sync(getattr(module, "padding_idx", None))
