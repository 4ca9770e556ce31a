"""The rows-file format: a ``.safetensors`` file of the free rows of constrained weights, with a
fingerprint of the pinned rows they were trained against; reading, writing and checking one.

File layout: tensor ``NAME`` is the ``(k, ...)`` free rows, tensor ``NAME.free_rows`` their ``k``
row indices (int64, increasing); the metadata entry ``embconstraint_rows`` is a JSON object
``{NAME: {"num_rows": V, "sha256": ..., "sha256_as": {DTYPE: ...}}}``. The fingerprint hashes the
dtype, the shape and the bytes of the pinned rows (every row not in ``free_rows``) in increasing
row order; ``sha256_as`` holds the same fingerprint of the pinned rows cast to each lower precision
(``torch.bfloat16`` and ``torch.float16`` for a float32 file), so that a file loads onto the same
base in another precision: its rows are cast to the model's dtype, as PEFT casts on load.

Names are module names plus the parameter (``model.embed_tokens.weight``), without PEFT's
``base_model.model.`` prefix. :func:`extract_rows` builds a rows file from a plain weights file
(``embconstraint rows WEIGHTS OUT --pinned N``); :mod:`.rows` writes one from a model and loads it
into one. This module reads and writes files without the mechanism.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .formats import (
    PathLike,
    SafetensorsFile,
    load_tensors,
    path_str,
    pick,
    state_dict_of,
)
from .writing import refuse_same_file, write_atomic

__all__ = ["extract_rows", "METADATA_KEY", "PEFT_PREFIX"]

METADATA_KEY = "embconstraint_rows"
PEFT_PREFIX = "base_model.model."
_ROWS_SUFFIX = ".free_rows"


def canonical(name: str) -> str:
    """``name`` without PEFT's ``base_model.model.`` prefix."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def _pinned_part(weight: Tensor, free_rows: Tensor) -> Tensor:
    """The rows of ``weight`` not in ``free_rows`` (increasing order; a view for a free suffix)."""
    num_rows, k = weight.shape[0], free_rows.numel()
    if k == 0 or (free_rows[0].item() == num_rows - k and free_rows[-1].item() == num_rows - 1):
        return weight[: num_rows - k]
    keep = torch.ones(num_rows, dtype=torch.bool)
    keep[free_rows] = False
    return weight[keep.to(weight.device)]


# Lower precisions a file's pinned rows are also fingerprinted in: a dtype -> the dtypes it holds exactly.
_LOWER = {
    torch.float64: (torch.float32, torch.bfloat16, torch.float16),
    torch.float32: (torch.bfloat16, torch.float16),
}


def fingerprint(weight: Tensor, free_rows: Tensor, dtype: torch.dtype | None = None) -> str:
    """SHA-256 of the dtype, shape and bytes of the pinned rows of ``weight`` (cast to ``dtype`` first)."""
    pinned = _pinned_part(weight.detach(), free_rows)
    if dtype is not None and pinned.dtype != dtype:
        pinned = pinned.to(dtype)
    pinned = pinned.cpu().contiguous()
    digest = hashlib.sha256(f"{pinned.dtype}|{tuple(pinned.shape)}|".encode())
    if pinned.numel():
        digest.update(pinned.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One weight of a rows file: its free rows, their indices and the fingerprints of its pinned rows."""

    name: str
    values: Tensor  # (k, ...) free rows, CPU
    free_rows: Tensor  # (k,) int64, increasing, CPU
    num_rows: int
    sha256: str
    sha256_as: dict[str, str] = field(default_factory=dict)  # the pinned rows cast to each lower precision

    def fingerprint_for(self, dtype: torch.dtype) -> tuple[str | None, torch.dtype]:
        """(the file's fingerprint to compare with, the dtype to hash the model's pinned rows in)
        for a model weight of ``dtype``; (None, ...) when the two precisions cannot be compared."""
        own = self.values.dtype
        if dtype == own or own in _LOWER.get(dtype, ()):  # same, or the file is the lower precision
            return self.sha256, own
        return self.sha256_as.get(str(dtype)), dtype


def entry(name: str, weight: Tensor, free_rows: Tensor) -> Entry:
    """The entry ``name`` of a rows file for ``weight`` (the merged ``(V, ...)`` weight) freeing ``free_rows``."""
    weight = weight.detach()
    values = weight.index_select(0, free_rows.to(weight.device)).cpu().contiguous()
    lower = {str(dt): fingerprint(weight, free_rows, dt) for dt in _LOWER.get(weight.dtype, ())}
    rows = free_rows.cpu().long().clone()  # its own memory: a head's weight and bias share one layout
    return Entry(name, values, rows, weight.shape[0], fingerprint(weight, free_rows), lower)


def write_rows_file(entries: Iterable[Entry], path: PathLike) -> list[str]:
    """Write ``entries`` as the rows file ``path`` (atomically); returns their names."""
    out = rows_path(path)
    tensors, meta = {}, {}
    for e in entries:
        tensors[e.name], tensors[e.name + _ROWS_SUFFIX] = e.values, e.free_rows
        meta[e.name] = {"num_rows": e.num_rows, "sha256": e.sha256, "sha256_as": e.sha256_as}
    write_atomic(tensors, out, "safetensors", metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return list(meta)


def rows_path(path: PathLike) -> Path:
    """``path`` as a ``Path``, checked to name a ``.safetensors`` file (``TypeError``, ``ValueError``)."""
    if not isinstance(path, (str, Path)) and not hasattr(path, "__fspath__"):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = Path(path)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(
            f"path {path_str(path)!r}: a rows file is a .safetensors file, got extension {out.suffix!r}"
        )
    return out


def read_rows_file(path: PathLike) -> list[Entry]:
    """The entries of the rows file ``path``, checked to be consistent (else a ``ValueError``)."""
    p = rows_path(path)
    if not p.exists():
        raise FileNotFoundError(f"rows file {path_str(path)!r} does not exist")
    file = load_tensors(p, what="rows file")
    assert isinstance(file, SafetensorsFile)
    raw = file.metadata().get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            f"rows file {path_str(path)!r} has no {METADATA_KEY!r} metadata: not written by save_rows"
        )
    try:
        meta = json.loads(raw)
        entries = [
            Entry(
                name,
                file[name],
                file[name + _ROWS_SUFFIX].long(),
                int(m["num_rows"]),
                str(m["sha256"]),
                {str(k): str(v) for k, v in m.get("sha256_as", {}).items()},
            )
            for name, m in meta.items()
        ]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"rows file {path_str(path)!r}: damaged {METADATA_KEY!r} entry ({err!r})") from None
    for e in entries:
        rows = e.free_rows
        if (
            rows.dim() != 1
            or e.values.dim() < 1
            or e.values.shape[0] != rows.numel()
            or (rows.numel() and (rows.min() < 0 or rows.max() >= e.num_rows or (rows.diff() <= 0).any()))
        ):
            raise ValueError(
                f"rows file {path_str(path)!r}: entry {e.name!r} has inconsistent rows "
                f"(values {tuple(e.values.shape)}, {rows.numel()} row indices, num_rows {e.num_rows})"
            )
    return entries


def extract_rows(
    weights: PathLike, out: PathLike, *, num_pinned: int, keys: Iterable[str] | None = None
) -> list[str]:
    """Write a rows file from a plain weights file: rows ``num_pinned..V-1`` of each weight in
    ``keys`` (default: the only 2-D tensor) are the free rows, the first ``num_pinned`` the pinned
    ones. Returns the names written (the file's keys, without PEFT's prefix).

    >>> import os, tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> torch.save({"emb.weight": torch.zeros(5, 2)}, os.path.join(d, "w.pt"))
    >>> extract_rows(os.path.join(d, "w.pt"), os.path.join(d, "rows.safetensors"), num_pinned=3)
    ['emb.weight']
    """
    if isinstance(num_pinned, bool) or not isinstance(num_pinned, int):
        raise TypeError(f"num_pinned must be an int, got {type(num_pinned).__name__}")
    rows_path(out)
    refuse_same_file(out, weights, "weights file", "the rows")
    container = state_dict_of(load_tensors(weights, what="weights"), f"weights {path_str(weights)!r}")
    if isinstance(container, Tensor):
        raise ValueError(
            f"weights {path_str(weights)!r} holds a bare tensor; a rows file needs named weights"
        )
    picked = [
        pick(container, key, f"weights {path_str(weights)!r}", False)
        for key in (list(keys) if keys else [None])
    ]
    entries = []
    for key, weight in picked:
        if weight.dim() < 1 or not 0 <= num_pinned <= weight.shape[0]:
            raise ValueError(
                f"num_pinned must lie in [0, {weight.shape[0] if weight.dim() else 0}] "
                f"for {key!r} of shape {tuple(weight.shape)}, got {num_pinned}"
            )
        entries.append(entry(canonical(key), weight, torch.arange(num_pinned, weight.shape[0])))
    return write_rows_file(entries, out)
