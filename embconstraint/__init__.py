"""embconstraint: pin rows of an embedding to a reference, exactly and at (almost) no cost.

>>> import torch
>>> from embconstraint import constrain, release
>>> old = torch.nn.Embedding(3, 4)
>>> new = constrain(torch.nn.Embedding(5, 4), old)      # rows 0..2 pinned to old's
>>> torch.equal(new.weight[:3], old.weight)
True
"""

from __future__ import annotations

from typing import Any

from ._validate import PinnedRowsError
from .core import constrain, is_constrained, release
from .rows import load_rows, save_rows
from .state import merged_state_dict

__all__ = ["constrain", "release", "is_constrained", "merged_state_dict", "PinnedRowsError", "EmbeddingConstraint",
           "save_rows", "load_rows"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The Lightning callback is imported lazily: the core does not need pytorch-lightning.
    if name == "EmbeddingConstraint":
        from .lightning import EmbeddingConstraint

        return EmbeddingConstraint
    raise AttributeError(f"module 'embconstraint' has no attribute {name!r}")
