"""Weight files: export merged weights, verify pinned rows, and rows-only files.

- :func:`export_checkpoint` / :func:`export_state_dict`: a checkpoint's merged, plain-key weights
  as ``.safetensors`` or ``.pt`` (``embconstraint export``).
- :func:`verify`: whether the pinned rows of a weight file are bitwise a reference
  (``embconstraint verify``).
- :func:`save_rows` / :func:`load_rows` / :func:`extract_rows`: the trained rows only, with a
  fingerprint of the rows they were trained against (``embconstraint rows``).

Files are read and written by extension: ``.safetensors`` (``pip install 'embconstraint[export]'``)
or torch files (``.pt``, ``.pth``; ``.ckpt`` and ``.bin`` are also read), always loaded with
``torch.load(weights_only=True)``. A problem with a file is a one-line ``ValueError``
(``FileNotFoundError`` for a missing one). :mod:`.formats`, :mod:`.writing`, :mod:`.export`,
:mod:`.verify` and :mod:`.rows_file` read and write files without the mechanism; :mod:`.rows`
writes into models through its interface.

>>> import torch
>>> verify({"emb.weight": torch.ones(5, 2)}, torch.ones(3, 2)).summary()
'emb.weight: 3 pinned rows checked (of 5), max |Δ| = 0.0, all bitwise equal to the reference'
"""

from __future__ import annotations

from .export import export_checkpoint, export_state_dict
from .formats import checkpoint_problem, load_tensors, read_indices
from .rows import load_rows, loaded_rows, save_rows, unload_rows
from .rows_file import extract_rows
from .verify import Verification, verify

__all__ = [
    "export_checkpoint",
    "export_state_dict",
    "verify",
    "Verification",
    "save_rows",
    "load_rows",
    "unload_rows",
    "loaded_rows",
    "extract_rows",
    "load_tensors",
    "read_indices",
    "checkpoint_problem",
]
