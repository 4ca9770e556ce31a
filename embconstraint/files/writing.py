"""Writing weight files: the format an output's extension names, written atomically (a failed write
leaves no partial file, the new file gets the mode ``open()`` would give it), never over the input.

:mod:`.export` and :mod:`.rows_file` write through it; :mod:`.formats` reads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .formats import SAFETENSORS, PathLike, path_str, safetensors_module, suffix_of

__all__ = ["writer_kind", "write_atomic", "same_file", "refuse_same_file"]

_TORCH_WRITE = (".pt", ".pth")


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file (through a symbolic or a hard link included)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def refuse_same_file(out: PathLike, source: PathLike, what: str, product: str) -> None:
    """``ValueError`` when writing ``out`` would replace the input file ``source`` (a link to it included)."""
    if same_file(out, source):
        raise ValueError(
            f"output {path_str(out)!r} is the {what} itself: writing onto it would replace the {what} "
            f"by {product} only; write to another file"
        )


def writer_kind(out: Path) -> str:
    """``"safetensors"`` or ``"torch"``: how ``out`` is written (by its extension)."""
    suffix = suffix_of(out)
    if suffix == SAFETENSORS:
        safetensors_module(out)
        return "safetensors"
    if suffix in _TORCH_WRITE:
        return "torch"
    raise ValueError(
        f"output {path_str(out)!r}: unknown extension {out.suffix!r}; "
        f"use {SAFETENSORS} (safetensors) or {' / '.join(_TORCH_WRITE)} (torch)"
    )


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def write_atomic(
    tensors: dict[str, Any], out: Path, kind: str, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``out`` through a temporary file in the same folder, renamed when
    complete: a failed write leaves no partial file. ``metadata``: extra safetensors metadata."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if kind == "safetensors":
            import safetensors.torch

            safetensors.torch.save_file(
                tensors,
                tmp,
                metadata={"format": "pt", "producer": "embconstraint export", **(metadata or {})},
            )
        else:
            torch.save(tensors, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: give the file the mode open() would
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
