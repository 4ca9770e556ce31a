"""Export merged weights from checkpoints, and verify that pinned rows held.

These are the library functions behind ``embconstraint export`` and ``embconstraint verify``.
Files are read and written by extension: ``.safetensors`` (needs the ``safetensors`` package,
``pip install 'embconstraint[export]'``) or torch files (``.pt``, ``.pth``; ``.ckpt`` and
``.bin`` are also read). Torch files are always loaded with ``torch.load(weights_only=True)``.

Every problem with the input (a missing file, a corrupted or truncated file, a missing key,
a shape mismatch) raises :class:`ValueError` (:class:`FileNotFoundError` for a missing file)
with a one-line message.

>>> import os, tempfile, torch
>>> old = torch.randn(3, 4)
>>> new = torch.cat([old, torch.randn(2, 4)])       # rows 0..2 kept, 2 rows added
>>> d = tempfile.mkdtemp()
>>> torch.save({"emb.weight": new}, os.path.join(d, "new.pt"))
>>> torch.save(old, os.path.join(d, "old.pt"))
>>> result = verify(os.path.join(d, "new.pt"), os.path.join(d, "old.pt"))
>>> result.ok, result.key, result.rows_checked, result.max_deviation
(True, 'emb.weight', 3, 0.0)
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Verification",
    "export_checkpoint",
    "export_state_dict",
    "load_tensors",
    "read_indices",
    "verify",
]

PathLike = str | os.PathLike
_TORCH_READ = (".pt", ".pth", ".ckpt", ".bin")
_TORCH_WRITE = (".pt", ".pth")
_SAFETENSORS = ".safetensors"
_RAW_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.original$")
_MAX_LISTED = 12
_BIT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- reading -------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _safetensors_module(path: Path) -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError(
            f"{path}: .safetensors files need the safetensors package "
            "(pip install 'embconstraint[export]')"
        ) from None
    return safetensors


class _SafetensorsFile(Mapping):
    """A read-only, lazy view of a .safetensors file: tensors are read when indexed."""

    def __init__(self, path: Path, what: str) -> None:
        safetensors = _safetensors_module(path)
        self.path, self.what = path, what
        try:
            self._file = safetensors.safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except Exception as err:  # SafetensorError, OSError, ...: a bad or truncated file
            raise ValueError(
                f"{what} {_path_str(path)!r}: not a readable .safetensors file ({_one_line(err)})"
            ) from None

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as err:
            raise ValueError(
                f"{self.what} {_path_str(self.path)!r}: cannot read tensor {key!r} ({_one_line(err)})"
            ) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _path_str(path: PathLike) -> str:
    return os.fspath(path)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _existing(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {_path_str(path)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{what} {_path_str(path)!r} is a directory, expected a file")
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
    suffix = _suffix(p)
    if suffix == _SAFETENSORS:
        return _SafetensorsFile(p, what)
    if suffix not in _TORCH_READ:
        raise ValueError(
            f"{what} {_path_str(path)!r}: unknown extension {p.suffix!r}; expected "
            f"{_SAFETENSORS} or one of {', '.join(_TORCH_READ)}"
        )
    _check_zip(p, what)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (bad zip), EOFError (truncated) ...
        msg = _one_line(err)
        if "weights_only" in msg.lower() or "unsupported global" in msg.lower():
            raise ValueError(
                f"{what} {_path_str(path)!r} holds Python objects that torch.load(weights_only=True) refuses; "
                "load it yourself and pass its state dict to embconstraint.export.export_state_dict"
            ) from None
        raise ValueError(f"{what} {_path_str(path)!r}: not a readable torch file ({msg})") from None
    if isinstance(obj, Tensor) or isinstance(obj, Mapping):
        return obj
    raise ValueError(
        f"{what} {_path_str(path)!r} holds a {type(obj).__name__}, expected a tensor or a dict of tensors"
    )


def _checkpoint_problem(path: PathLike) -> str | None:
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
    problem = _checkpoint_problem(path)
    if problem is not None and problem != "the file is empty":
        raise ValueError(f"{what} {_path_str(path)!r}: {problem}")


def _state_dict_of(obj: Mapping[str, Any] | Tensor, where: str) -> Mapping[str, Any] | Tensor:
    """The state dict of a Lightning checkpoint, or ``obj`` itself."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd = obj["state_dict"]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{where}: its 'state_dict' entry is a {type(sd).__name__}, expected a dict")
        return sd
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
    if _suffix(p) in _TORCH_READ:
        obj = load_tensors(p, what="indices file")
        if not isinstance(obj, Tensor):
            raise ValueError(f"indices file {_path_str(path)!r} must hold a tensor, got a {type(obj).__name__}")
        if obj.is_floating_point() or obj.is_complex() or obj.dtype == torch.bool:
            raise ValueError(f"indices file {_path_str(path)!r} must hold integers, got dtype {obj.dtype}")
        if obj.dim() != 1:
            raise ValueError(f"indices file {_path_str(path)!r} must hold a 1-D tensor, got shape {tuple(obj.shape)}")
        return obj.long()
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"indices file {_path_str(path)!r}: cannot read it as text ({_one_line(err)})") from None
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for token in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not token:
                continue
            try:
                values.append(int(token))
            except ValueError:
                raise ValueError(
                    f"indices file {_path_str(path)!r}, line {lineno}: {token!r} is not an integer"
                ) from None
    return torch.tensor(values, dtype=torch.long)


def _shape(container: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    if isinstance(container, _SafetensorsFile):
        return container.shape(key)
    value = container[key]
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _candidates(container: Mapping[str, Any]) -> list[str]:
    out = []
    for k in container:
        shape = _shape(container, k)
        if shape is not None and len(shape) == 2:
            out.append(k)
    return out


def _pick(container: Mapping[str, Any] | Tensor, key: str | None, where: str,
          prefer_single: bool) -> tuple[str | None, Tensor]:
    """Choose one tensor: ``key`` if given (and present), else the only 2-D tensor."""
    if isinstance(container, Tensor):
        return None, container
    tensor_keys = [k for k in container if _shape(container, k) is not None]
    if prefer_single and len(tensor_keys) == 1:
        return tensor_keys[0], container[tensor_keys[0]]
    if key is not None and key in container:
        value = container[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        return key, value
    candidates = _candidates(container)
    if key is not None and not prefer_single:
        raise ValueError(f"{where} has no tensor {key!r}; its 2-D tensors: {_listing(candidates) or 'none'}")
    if len(candidates) == 1:
        return candidates[0], container[candidates[0]]
    if not candidates:
        raise ValueError(f"{where} holds no 2-D tensor")
    missing = f"has no tensor {key!r} and " if key is not None else ""
    raise ValueError(
        f"{where} {missing}holds {len(candidates)} 2-D tensors; pick one with --key: {_listing(candidates)}"
    )


# -- verify --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify`.

    Attributes:
        key: the tensor checked in the weights (None for a bare tensor).
        reference_key: the tensor used in the reference (None for a bare tensor).
        shape: shape of the checked weight, ``(V, D)``.
        rows_checked: number of pinned rows compared.
        rows_differing: how many of them are not bitwise equal to the reference.
        max_deviation: largest ``|weight - reference|`` over the pinned rows (float64; inf for nan).
    """

    key: str | None
    reference_key: str | None
    shape: tuple[int, int]
    rows_checked: int
    rows_differing: int
    max_deviation: float

    @property
    def ok(self) -> bool:
        """True when every pinned row is bitwise equal to its reference row."""
        return self.rows_differing == 0

    def summary(self) -> str:
        """One line for humans, e.g. ``emb.weight: 12 of 16 rows checked, max |Δ| = 0.0, ...``."""
        name = self.key or "weights"
        verdict = ("all bitwise equal to the reference" if self.ok
                   else f"{self.rows_differing} row(s) differ from the reference")
        return (f"{name}: {self.rows_checked} pinned rows checked (of {self.shape[0]}), "
                f"max |Δ| = {self.max_deviation!r}, {verdict}")


def _as_tensor_source(value: PathLike | Mapping[str, Any] | Tensor, what: str):
    if isinstance(value, (Tensor, Mapping)):
        return value, what
    if isinstance(value, (str, os.PathLike)):
        return _state_dict_of(load_tensors(value, what=what), f"{what} {_path_str(value)!r}"), \
            f"{what} {_path_str(value)!r}"
    raise TypeError(f"{what} must be a path, a tensor or a dict of tensors, got {type(value).__name__}")


def _as_indices(indices: PathLike | Tensor | list[int] | None) -> Tensor | None:
    if indices is None:
        return None
    if isinstance(indices, (str, os.PathLike)):
        return read_indices(indices)
    if isinstance(indices, Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must hold integers, got dtype {indices.dtype}")
        if indices.dim() > 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
        return indices.detach().cpu().long().reshape(-1)
    if isinstance(indices, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                  for i in indices):
        return torch.tensor(list(indices), dtype=torch.long)
    raise TypeError(f"indices must be a path, a 1-D integer tensor or a list of ints, got {type(indices).__name__}")


def _check_rows(idx: Tensor, num_pinned: int, num_rows: int) -> None:
    if idx.numel() != num_pinned:
        raise ValueError(f"indices has {idx.numel()} entries but the reference has {num_pinned} rows")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_rows):
        raise ValueError(f"indices must lie in [0, {num_rows}), got min {int(idx.min())}, max {int(idx.max())}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("indices must be distinct: a row cannot be pinned twice")


def _exact_cast(reference: Tensor, dtype: torch.dtype) -> Tensor:
    cast = reference.to(dtype)
    if cast.dtype != reference.dtype and not torch.equal(cast.to(reference.dtype), reference):
        raise ValueError(
            f"the reference ({reference.dtype}) cannot be represented exactly in the weights' dtype {dtype}"
        )
    return cast


def verify(
    weights: PathLike | Mapping[str, Any] | Tensor,
    reference: PathLike | Mapping[str, Any] | Tensor,
    key: str | None = None,
    indices: PathLike | Tensor | list[int] | None = None,
) -> Verification:
    """Check that the pinned rows of a weight are bitwise equal to a reference.

    Reference row ``i`` is expected at row ``indices[i]`` of the weight (default: the first
    ``n`` rows, ``n`` the reference's row count).

    Args:
        weights: a ``.safetensors``/torch file path, a dict of tensors (a Lightning checkpoint's
            ``"state_dict"`` is used) or a ``(V, D)`` tensor.
        reference: the same kinds, holding the ``(n, D)`` reference.
        key: the tensor to check in ``weights`` (and in ``reference`` when it holds several
            tensors). Without it, the only 2-D tensor is used.
        indices: a path (text file of integers or a torch file), a 1-D integer tensor or a list.

    >>> import torch
    >>> old = torch.randn(3, 2)
    >>> new = torch.cat([torch.randn(1, 2), old])     # old rows now live at rows 1..3
    >>> verify({"w": new}, old, indices=[1, 2, 3]).ok
    True
    >>> verify({"w": new}, old).ok                    # not at rows 0..2
    False
    """
    w_src, w_where = _as_tensor_source(weights, "weights")
    r_src, r_where = _as_tensor_source(reference, "reference")
    w_key, w = _pick(w_src, key, w_where, prefer_single=False)
    r_key, ref = _pick(r_src, key, r_where, prefer_single=True)
    w_name = f"{w_where} tensor {w_key!r}" if w_key else w_where
    r_name = f"{r_where} tensor {r_key!r}" if r_key else r_where
    for t, name in ((w, w_name), (ref, r_name)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    (num_rows, dim), (num_pinned, rdim) = w.shape, ref.shape
    if rdim != dim:
        raise ValueError(f"shape mismatch: {w_name} has shape {tuple(w.shape)} but {r_name} has "
                         f"shape {tuple(ref.shape)} (embedding dimensions {dim} != {rdim})")
    idx = _as_indices(indices)
    if idx is None:
        if num_pinned > num_rows:
            raise ValueError(f"shape mismatch: {r_name} has {num_pinned} rows but {w_name} only {num_rows} "
                             f"(shapes {tuple(ref.shape)} and {tuple(w.shape)})")
        idx = torch.arange(num_pinned)
    _check_rows(idx, num_pinned, num_rows)
    ref = _exact_cast(ref.detach().cpu(), w.dtype)
    rows = w.detach().cpu().index_select(0, idx).contiguous()
    ref = ref.contiguous()
    if num_pinned:
        bits = _BIT_VIEW[rows.element_size()]
        same = rows.view(bits) == ref.view(bits)  # element-wise, bitwise (-0.0 != 0.0, nan == nan)
        diff = (rows.double() - ref.double()).abs().nan_to_num(float("inf"), float("inf"), float("inf"))
        diff[same] = 0.0
        max_dev = float(diff.max())
        differing = int((~same.all(dim=1)).sum())
    else:
        max_dev, differing = 0.0, 0
    return Verification(w_key, r_key, (num_rows, dim), num_pinned, differing, max_dev)


# -- export --------------------------------------------------------------------------------


def _merge_raw(state_dict: dict[str, Any], reference: Tensor | None, indices: Tensor | None,
               where: str) -> dict[str, Any]:
    """Replace ``*.parametrizations.<name>.original`` entries (the free rows of a constrained
    embedding) by the merged ``*.<name>`` weight, built with ``reference`` as pinned rows."""
    raw = [k for k in state_dict if _RAW_KEY.match(k)]
    if not raw:
        return state_dict
    out = dict(state_dict)
    for k in raw:
        m = _RAW_KEY.match(k)
        plain = m["prefix"] + m["name"]
        if plain in out:  # the merged weight is already there: the raw entry is redundant
            del out[k]
            continue
        if reference is None:
            raise ValueError(
                f"{where} holds the raw parametrization entry {k!r} (a constrained embedding's free rows "
                "only, without its pinned rows); save with model.state_dict() or "
                "embconstraint.merged_state_dict(model), or pass the pinned rows with --reference "
                "(and --indices) to merge them"
            )
        free = out.pop(k)
        if not isinstance(free, Tensor) or free.dim() != 2:
            raise ValueError(f"{where}: entry {k!r} is not a 2-D tensor")
        if reference.dim() != 2 or reference.shape[1] != free.shape[1]:
            raise ValueError(f"shape mismatch: reference has shape {tuple(reference.shape)} but {k!r} has "
                             f"shape {tuple(free.shape)} (free rows); their embedding dimensions must match")
        n, num_rows = reference.shape[0], reference.shape[0] + free.shape[0]
        idx = torch.arange(n) if indices is None else indices
        _check_rows(idx, n, num_rows)
        merged = torch.empty((num_rows, free.shape[1]), dtype=free.dtype)
        is_free = torch.ones(num_rows, dtype=torch.bool)
        is_free[idx] = False
        merged[idx] = _exact_cast(reference.detach().cpu(), free.dtype)
        merged[is_free.nonzero().flatten()] = free.detach().cpu()
        out[plain] = merged
    return out


def _writer(out: Path) -> str:
    suffix = _suffix(out)
    if suffix == _SAFETENSORS:
        _safetensors_module(out)
        return "safetensors"
    if suffix in _TORCH_WRITE:
        return "torch"
    raise ValueError(f"output {_path_str(out)!r}: unknown extension {out.suffix!r}; "
                     f"use {_SAFETENSORS} (safetensors) or {' / '.join(_TORCH_WRITE)} (torch)")


def export_state_dict(
    state_dict: Mapping[str, Any],
    out: PathLike,
    *,
    reference: Tensor | None = None,
    indices: Tensor | list[int] | None = None,
) -> dict[str, Any]:
    """Write ``state_dict`` with plain keys to ``out`` (``.safetensors`` or ``.pt``/``.pth``).

    Raw ``*.parametrizations.weight.original`` entries (what ``named_parameters()`` of a
    constrained embedding yields: its free rows only) are refused unless ``reference`` (the
    pinned rows, reference row ``i`` at row ``indices[i]``) is given to merge them. Tensors are
    written contiguous and unshared (safetensors refuses shared storage). The file is written
    to a temporary name first and renamed, so a failed export leaves no partial file.
    Returns the dict that was written.

    >>> import os, tempfile, torch
    >>> out = os.path.join(tempfile.mkdtemp(), "model.pt")
    >>> written = export_state_dict({"emb.weight": torch.ones(4, 2)}, out)
    >>> torch.equal(torch.load(out)["emb.weight"], torch.ones(4, 2))
    True
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    return _export(state_dict, Path(out), reference, _as_indices(indices), "state dict")


def _export(state_dict: Mapping[str, Any], out: Path, reference: Tensor | None, idx: Tensor | None,
            where: str) -> dict[str, Any]:
    kind = _writer(out)
    if out.is_dir():
        raise ValueError(f"output {_path_str(out)!r} is a directory, expected a file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {_path_str(out.parent)!r} does not exist")
    sd = _merge_raw(dict(state_dict), reference, idx, where)
    if reference is not None and sd.keys() == state_dict.keys():
        raise ValueError(f"a reference was given, but {where} holds no raw "
                         "'*.parametrizations.<name>.original' entry to merge it into")
    if kind == "safetensors":
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"{where}: entries {_listing(bad)} are not tensors; safetensors holds tensors "
                             "only (export to .pt instead)")
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    else:
        sd = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in sd.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if kind == "safetensors":
            import safetensors.torch

            safetensors.torch.save_file(sd, tmp, metadata={"format": "pt", "producer": "embconstraint export"})
        else:
            torch.save(sd, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sd


def export_checkpoint(
    checkpoint: PathLike,
    out: PathLike,
    *,
    reference: PathLike | Tensor | None = None,
    indices: PathLike | Tensor | list[int] | None = None,
    reference_key: str | None = None,
) -> dict[str, Any]:
    """Write the (merged, plain-key) weights of a Lightning checkpoint to ``out``.

    ``checkpoint`` is a torch file holding a Lightning checkpoint (its ``"state_dict"`` entry is
    exported) or a plain state dict. ``out`` ends with ``.safetensors`` or ``.pt``/``.pth``.
    ``reference``/``indices``/``reference_key`` are only needed for checkpoints that hold raw
    parametrization entries (see :func:`export_state_dict`). Returns the dict written.

    >>> import os, tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> torch.save({"epoch": 3, "state_dict": {"emb.weight": torch.zeros(4, 2)}}, os.path.join(d, "a.ckpt"))
    >>> sorted(export_checkpoint(os.path.join(d, "a.ckpt"), os.path.join(d, "a.pt")))
    ['emb.weight']
    """
    _writer(Path(out))  # refuse a bad output name before reading anything
    where = f"checkpoint {_path_str(checkpoint)!r}"
    obj = load_tensors(checkpoint, what="checkpoint")
    sd = _state_dict_of(obj, where)
    if isinstance(sd, Tensor):
        raise ValueError(f"{where} holds a bare tensor, expected a Lightning checkpoint or a state dict")
    if sd is obj and not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{where} is neither a Lightning checkpoint (no 'state_dict' entry) nor a state dict "
                         f"of tensors; its entries: {_listing(list(sd))}")
    ref = None
    if reference is not None:
        src, r_where = _as_tensor_source(reference, "reference")
        _, ref = _pick(src, reference_key, r_where, prefer_single=True)
    if isinstance(sd, _SafetensorsFile):
        sd = {k: sd[k] for k in sd}
    return _export(sd, Path(out), ref, _as_indices(indices), where)
