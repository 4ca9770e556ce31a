"""What the parametrizations notice of the torch code around them: ``remove_parametrizations``
reading the weight, ``torch.jit.script`` (refused), and the rounding that averaging a state dict's
tensor leaves on the pinned values (accepted by a write into it)."""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.nn.utils import parametrize

__all__ = ["within_rounding", "removing_parametrizations", "SCRIPTING_REFUSED"]

_REMOVE_PARAMETRIZATIONS = parametrize.remove_parametrizations.__code__


def within_rounding(new: Tensor, old: Tensor) -> bool:
    """Whether every value of ``new`` is within two units in the last place of ``old``'s."""
    if not old.is_floating_point():
        return False
    tol = 2 * torch.finfo(old.dtype).eps
    return bool(((new.double() - old.double()).abs() <= tol * old.double().abs()).all())


def removing_parametrizations(depth: int = 8) -> bool:
    """Whether ``torch.nn.utils.parametrize.remove_parametrizations`` is reading the weight: it
    ``set_``s the Parameter to the weight's storage, bypassing ``__torch_function__``, so the
    scattered layout must hand it a tensor in user order (a gather, once)."""
    frame = sys._getframe(2)
    while frame is not None and depth:
        if frame.f_code is _REMOVE_PARAMETRIZATIONS:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


SCRIPTING_REFUSED = (
    "torch.jit.script cannot compile a module holding a constrained embedding: torch's parametrizations do not "
    "script; use torch.jit.trace or torch.export, which export the merged weight, or script the "
    "plain model: embconstraint.release(model) first (or load embconstraint.merged_state_dict(model) "
    "into an unconstrained copy)"
)
