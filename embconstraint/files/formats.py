"""Reading weight files: format detection, lazy safetensors, integrity, and the tensors taken from them.

The file layer behind :mod:`embconstraint.export` (``verify`` and ``export``): ``.safetensors``
files (needs ``safetensors``) and torch files (``.pt``, ``.pth``; ``.ckpt`` and ``.bin`` are
also read), always loaded with ``torch.load(weights_only=True)``. A problem with a file's
content is a ``ValueError`` (``FileNotFoundError`` for a missing file); a wrong kind of
argument is a ``TypeError``. Writing them is :mod:`.writing`'s.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._common import index_tensor

__all__ = [
    "PathLike",
    "SafetensorsFile",
    "load_tensors",
    "checkpoint_problem",
    "read_indices",
    "state_dict_of",
    "pick",
    "tensor_problem",
    "listing",
    "path_str",
    "suffix_of",
    "tensor_source",
    "as_indices",
    "safetensors_module",
    "SAFETENSORS",
]

PathLike = str | os.PathLike
_TORCH_READ = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS = ".safetensors"
_MAX_LISTED = 12


def suffix_of(path: Path) -> str:
    """``path``'s extension, lower case."""
    return path.suffix.lower()


def safetensors_module(path: Path) -> Any:
    """The ``safetensors`` package, or a ``ValueError`` (about ``path``) saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError(
            f"{path}: .safetensors files need the safetensors package (pip install 'embconstraint[export]')"
        ) from None
    return safetensors


class SafetensorsFile(Mapping):
    """A read-only, lazy view of a .safetensors file: tensors are read when indexed."""

    def __init__(self, path: Path, what: str) -> None:
        safetensors = safetensors_module(path)
        self.path, self.what = path, what
        try:
            self._file = safetensors.safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except Exception as err:  # SafetensorError, OSError, ...: a bad or truncated file
            raise ValueError(
                f"{what} {path_str(path)!r}: not a readable .safetensors file ({_one_line(err)})"
            ) from None

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as err:
            raise ValueError(
                f"{self.what} {path_str(self.path)!r}: cannot read tensor {key!r} ({_one_line(err)})"
            ) from None

    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` (empty if none)."""
        return dict(self._file.metadata() or {})

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def path_str(path: PathLike) -> str:
    return os.fspath(path)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _existing(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {path_str(path)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{what} {path_str(path)!r} is a directory, expected a file")
    return p


def load_tensors(path: PathLike, *, what: str = "file") -> Mapping[str, Any] | Tensor:
    """Read a ``.safetensors`` file (lazily) or a torch file (``weights_only=True``).

    Returns a mapping of names to tensors, or a bare tensor if the torch file holds one.
    A Lightning checkpoint (a dict with a ``"state_dict"`` entry) is returned whole.
    ``what`` names the file in error messages.

    >>> import os, tempfile, torch
    >>> p = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save({"w": torch.zeros(2, 3)}, p)
    >>> {k: tuple(v.shape) for k, v in load_tensors(p).items()}
    {'w': (2, 3)}
    """
    p = _existing(path, what)
    suffix, content = suffix_of(p), _sniff(p)
    if content == "safetensors" or (suffix == SAFETENSORS and content != "torch"):
        return SafetensorsFile(p, what)  # by content first: a renamed file is read for what it is
    if suffix not in _TORCH_READ and content != "torch":
        raise ValueError(
            f"{what} {path_str(path)!r}: unknown extension {p.suffix!r}; expected "
            f"{SAFETENSORS} or one of {', '.join(_TORCH_READ)}"
        )
    _check_zip(p, what)
    try:
        with open(p, "rb") as f:  # a file object: torch.load reads it as a torch file whatever its name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (bad zip), EOFError (truncated) ...
        msg = _one_line(err)
        if "weights_only" in msg.lower() or "unsupported global" in msg.lower():
            raise ValueError(
                f"{what} {path_str(path)!r} holds Python objects that torch.load(weights_only=True) refuses; "
                "load it yourself and pass its state dict to embconstraint.export.export_state_dict"
            ) from None
        raise ValueError(f"{what} {path_str(path)!r}: not a readable torch file ({msg})") from None
    if isinstance(obj, Tensor) or isinstance(obj, Mapping):
        return obj
    raise ValueError(
        f"{what} {path_str(path)!r} holds a {type(obj).__name__}, expected a tensor or a dict of tensors"
    )


def _sniff(path: Path) -> str | None:
    """``"torch"`` (a zip archive, what ``torch.save`` writes), ``"safetensors"`` (an 8-byte
    header length, then a JSON header) or None, from the first bytes of ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if (
        len(head) == 9
        and head[8:9] == b"{"
        and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8
    ):
        return "safetensors"
    return None


def checkpoint_problem(path: PathLike) -> str | None:
    """Why the torch file at ``path`` cannot be trusted (truncated or corrupted), else None.

    ``torch.save`` writes a zip archive with a CRC-32 per entry, which ``torch.load`` does not
    check: flipped bits load silently and a truncated file fails with a bare ``OSError``.
    Missing files, remote paths and legacy (non-zip) files are left to ``torch.load``.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        return None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    if os.path.getsize(path) == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # legacy pickle format or not a torch file: torch.load decides
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # BadZipFile, EOFError, UnicodeDecodeError ... from a damaged archive
        return f"truncated or corrupted torch file ({type(err).__name__}: {_one_line(err)})"
    if bad is not None:
        return f"corrupted torch file (the CRC-32 of its entry {bad!r} does not match its data)"
    return None


def _check_zip(path: Path, what: str) -> None:
    problem = checkpoint_problem(path)
    if problem is not None and problem != "the file is empty":
        raise ValueError(f"{what} {path_str(path)!r}: {problem}")


def state_dict_of(obj: Mapping[str, Any] | Tensor, where: str) -> Mapping[str, Any] | Tensor:
    """The state dict of a Lightning checkpoint, or ``obj`` itself; a key that is not a string
    (``{0: tensor}``, which ``torch.save`` accepts) is a ``ValueError``."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd = obj["state_dict"]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{where}: its 'state_dict' entry is a {type(sd).__name__}, expected a dict")
        obj = sd
    if isinstance(obj, Mapping) and not isinstance(obj, SafetensorsFile):
        bad = next((k for k in obj if not isinstance(k, str)), None)
        if bad is not None:
            raise ValueError(
                f"{where} has the key {bad!r} ({type(bad).__name__}); the keys of a state dict "
                "must be strings (parameter names such as 'emb.weight')"
            )
    return obj


def read_indices(path: PathLike) -> Tensor:
    """Row indices from a text file (integers separated by whitespace, commas or newlines;
    ``#`` starts a comment) or from a torch file holding a 1-D integer tensor.

    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "rows.txt")
    >>> _ = open(p, "w").write("0, 2 5\\n7  # the last one\\n")
    >>> read_indices(p).tolist()
    [0, 2, 5, 7]
    """
    p = _existing(path, "indices file")
    if suffix_of(p) in _TORCH_READ:
        obj = load_tensors(p, what="indices file")
        if not isinstance(obj, Tensor):
            raise ValueError(
                f"indices file {path_str(path)!r} must hold a tensor, got a {type(obj).__name__}"
            )
        if obj.is_floating_point() or obj.is_complex() or obj.dtype == torch.bool:
            raise ValueError(f"indices file {path_str(path)!r} must hold integers, got dtype {obj.dtype}")
        if obj.dim() != 1:
            raise ValueError(
                f"indices file {path_str(path)!r} must hold a 1-D tensor, got shape {tuple(obj.shape)}"
            )
        return obj.long()
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"indices file {path_str(path)!r}: cannot read it as text ({_one_line(err)})"
        ) from None
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not token:
                continue
            try:
                values.append(int(token))
            except ValueError:
                raise ValueError(
                    f"indices file {path_str(path)!r}, line {lineno}: {token!r} is not an integer"
                ) from None
    return torch.tensor(values, dtype=torch.long)


def _shape(container: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    if isinstance(container, SafetensorsFile):
        return container.shape(key)
    value = container[key]
    return tuple(value.shape) if isinstance(value, Tensor) and not value.is_nested else None


def tensor_problem(value: Any) -> str | None:
    """Why ``value`` is not a dense tensor with data (what verify and export compare), else None."""
    if not isinstance(value, Tensor):
        return None
    if value.is_nested:
        return "a nested tensor"
    if value.layout != torch.strided:
        return f"a sparse tensor (layout {value.layout})"
    if value.is_meta:
        return "a meta tensor (it holds no data)"
    if value.is_quantized:
        return "a quantized tensor"
    return None


def _usable(where: str, key: str | None, value: Any) -> tuple[str | None, Any]:
    problem = tensor_problem(value)
    if problem is not None:
        name = f"{where}: tensor {key!r}" if key is not None else where
        raise ValueError(
            f"{name} is {problem}; expected a dense tensor (save it with .to_dense() / on a real device)"
        )
    return key, value


def listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _candidates(container: Mapping[str, Any]) -> list[str]:
    out = []
    for k in container:
        shape = _shape(container, k)
        if shape is not None and len(shape) == 2:
            out.append(k)
    return out


def pick(
    container: Mapping[str, Any] | Tensor, key: str | None, where: str, prefer_single: bool
) -> tuple[str | None, Tensor]:
    """Choose one tensor: ``key`` if given (and present), else the only 2-D tensor. A chosen
    tensor that is sparse, nested, meta or quantized is a ``ValueError``."""
    if isinstance(container, Tensor):
        return _usable(where, None, container)
    tensor_keys = [k for k in container if _shape(container, k) is not None]
    if prefer_single and len(tensor_keys) == 1:
        return _usable(where, tensor_keys[0], container[tensor_keys[0]])
    if key is not None and key in container:
        value = container[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        return _usable(where, key, value)
    candidates = _candidates(container)
    if key is not None and not prefer_single:
        raise ValueError(f"{where} has no tensor {key!r}; its 2-D tensors: {listing(candidates) or 'none'}")
    if len(candidates) == 1:
        return _usable(where, candidates[0], container[candidates[0]])
    if not candidates:
        if not isinstance(container, SafetensorsFile):  # a sparse/nested/meta tensor is the news
            for k, value in container.items():
                _usable(where, k, value)
        raise ValueError(f"{where} holds no 2-D tensor")
    missing = f"has no tensor {key!r} and " if key is not None else ""
    raise ValueError(
        f"{where} {missing}holds {len(candidates)} 2-D tensors; pick one with --key: {listing(candidates)}"
    )


# -- verify --------------------------------------------------------------------------------


def tensor_source(value: PathLike | Mapping[str, Any] | Tensor, what: str):
    """``value`` (a path, a tensor or a dict of tensors) as (tensors, where), for messages."""
    if isinstance(value, Tensor):
        return value, what
    if isinstance(value, Mapping):
        return state_dict_of(value, what) if not isinstance(value, SafetensorsFile) else value, what
    if isinstance(value, (str, os.PathLike)):
        return state_dict_of(
            load_tensors(value, what=what), f"{what} {path_str(value)!r}"
        ), f"{what} {path_str(value)!r}"
    raise TypeError(f"{what} must be a path, a tensor or a dict of tensors, got {type(value).__name__}")


def as_indices(indices: PathLike | Tensor | list[int] | None) -> Tensor | None:
    """``indices`` (a path, a 1-D integer tensor or a list of ints) as a CPU int64 tensor."""
    if indices is None:
        return None
    if isinstance(indices, (str, os.PathLike)):
        return read_indices(indices)
    if isinstance(indices, (Tensor, list, tuple)):
        return index_tensor(indices)
    raise TypeError(
        f"indices must be a path, a 1-D integer tensor or a list of ints, got {type(indices).__name__}"
    )
