"""embconstraint: pin rows of an embedding to a reference, exactly and at (almost) no cost.

>>> import torch
>>> from embconstraint import constrain, release
>>> old = torch.nn.Embedding(3, 4)
>>> new = constrain(torch.nn.Embedding(5, 4), old)      # rows 0..2 pinned to old's
>>> torch.equal(new.weight[:3], old.weight)
True

The package, by layer: :mod:`embconstraint.core` (the front door: ``constrain``, ``release``,
``is_constrained``, ``merged_state_dict``) over the private mechanism; :mod:`embconstraint.files`
(export, verify, rows-only files); the integrations :mod:`embconstraint.lightning` and
:mod:`embconstraint.hf`; :mod:`embconstraint.demo` and the ``embconstraint`` command
(:mod:`embconstraint.cli`). Errors of embconstraint's own are in :mod:`embconstraint.exceptions`.
"""

from __future__ import annotations

from typing import Any

from .core import constrain, is_constrained, merged_state_dict, release
from .exceptions import CheckpointError, PinnedRowsError
from .files import load_rows, save_rows, unload_rows

__all__ = [
    "constrain",
    "release",
    "is_constrained",
    "merged_state_dict",
    "save_rows",
    "load_rows",
    "unload_rows",
    "EmbeddingConstraint",
    "PinnedRowsError",
    "CheckpointError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The Lightning callback is imported lazily: the core does not need pytorch-lightning.
    if name == "EmbeddingConstraint":
        from .lightning import EmbeddingConstraint

        return EmbeddingConstraint
    raise AttributeError(f"module 'embconstraint' has no attribute {name!r}")
