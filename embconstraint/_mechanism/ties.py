"""Finding the modules that share a Parameter (weight tying) before :func:`~embconstraint.constrain`
changes it: constraining turns the Parameter into the ``(V - n, D)`` free rows in place, so a
module that shares it (a tied ``nn.Linear`` head) would silently compute with the free rows.

``holders(param)`` finds every module whose own parameter is ``param``, wherever it lives. It is
cheap when nothing else holds the Parameter (one reference count); otherwise it asks the garbage
collector who refers to it (a walk over the live objects, once per ``constrain``).

>>> from torch import nn
>>> emb, head = nn.Embedding(4, 2), nn.Linear(2, 4, bias=False)
>>> head.weight = emb.weight
>>> [(type(m).__name__, n) for m, n in holders(emb.weight) if m is not emb]
[('Linear', 'weight')]
"""

from __future__ import annotations

import gc
import sys

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

__all__ = ["holders"]


def _refs(params: dict, name: str) -> int:
    return sys.getrefcount(params[name])


_ALONE = _refs({"p": nn.Parameter(nn.Linear(1, 1).weight.detach())}, "p")  # held by one dict only


def holders(param: Tensor, skip: tuple[dict, ...] = ()) -> list[tuple[nn.Module, str]]:
    """Every (module, name) whose own parameter ``name`` is ``param`` (deduplicated), leaving out
    the parameter dicts in ``skip``. At most three walks over the live objects, each batched: the
    dicts holding ``param`` as a value (an optimizer's state, which holds it as a key, is no
    candidate), then the modules (or their ``__dict__``) holding those dicts."""
    skipped = {id(d) for d in skip}
    dicts = {
        id(r): r
        for r in gc.get_referrers(param)
        if isinstance(r, dict) and id(r) not in skipped and any(v is param for v in r.values())
    }
    if not dicts:
        return []
    owners, inner = [], []
    for r in gc.get_referrers(*dicts.values()):
        (owners if isinstance(r, nn.Module) else inner if type(r) is dict else []).append(r)
    if inner:  # a module's _parameters is held by its instance __dict__
        owners += [m for m in gc.get_referrers(*inner) if isinstance(m, nn.Module)]
    found: dict[tuple[int, str], tuple[nn.Module, str]] = {}
    for m in owners:
        if id(m.__dict__.get("_parameters")) in dicts:
            found.update({(id(m), n): (m, n) for n, p in m._parameters.items() if p is param})
    return list(found.values())


def shared(
    module: nn.Module, name: str, known: list[tuple[nn.Module, str]] = ()
) -> list[tuple[nn.Module, str]]:
    """The (module, name) pairs other than ``module`` and ``known`` that hold ``module``'s own
    parameter ``name``."""
    params = module._parameters
    if name not in params or params[name] is None or _refs(params, name) <= _ALONE + len(known):
        return []  # nothing but the module (and the known holders) holds it
    skip = {(id(m), n) for m, n in known} | {(id(module), name)}
    own = (params, *(m._parameters for m, _ in known))

    def others() -> list[tuple[nn.Module, str]]:
        # (a ParametrizationList holds it only inside a parametrized module, refused elsewhere)
        return [
            (m, n)
            for m, n in holders(params[name], own)
            if (id(m), n) not in skip and not isinstance(m, ParametrizationList)
        ]

    found = others()
    if found:  # garbage not yet collected (a released parametrization, a dropped model) is no holder
        gc.collect()
        found = others()
    return found
