"""Every error embconstraint raises of its own; the rest are Python's ``TypeError`` and ``ValueError``.

Error policy (the whole package follows it):

- ``TypeError``: an argument of the wrong kind (a list where a tensor is expected, an integer
  dtype where floating point is needed, an ``nn.Linear`` where an embedding is expected).
- ``ValueError``: an argument of the right kind with a wrong value (a shape, a range, a dtype
  that cannot hold the reference exactly, an unsupported option such as ``max_norm``; a module
  that cannot take the constraint as it is), and any problem with the content of an input file
  (``FileNotFoundError`` for a missing one).
- ``RuntimeError``: a conflict with the current state (the operation is fine, but not now). Two
  of them have a class of their own, so that callers can catch them by type:
  :class:`PinnedRowsError` (an operation would change pinned rows) and :class:`CheckpointError`
  (a checkpoint that cannot be trusted).

>>> import torch
>>> from embconstraint import constrain
>>> emb = constrain(torch.nn.Embedding(4, 2), torch.zeros(3, 2))
>>> try:
...     with torch.no_grad():
...         emb.weight[0] = 1.0
... except PinnedRowsError as err:
...     print(type(err).__mro__[1].__name__, "-", str(err)[:48])
RuntimeError - in-place __setitem__ would change pinned rows of

Every check runs before anything changes.
"""

from __future__ import annotations

__all__ = ["PinnedRowsError", "CheckpointError"]


class PinnedRowsError(RuntimeError):
    """An operation would change pinned rows of a constrained embedding (a write, an assignment,
    ``load_state_dict`` of a plain checkpoint with other pinned rows)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (truncated, corrupted, or saved for another layout of
    the trainable rows), found before anything is loaded from it."""
