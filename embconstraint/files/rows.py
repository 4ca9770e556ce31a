"""A rows-only file: the free rows of every constrained weight, for adapters and small uploads.

:func:`save_rows` writes, to a ``.safetensors`` file, only the free rows (the trained new tokens)
of each constrained weight in a module, with their row indices and a SHA-256 fingerprint of the
pinned rows they were trained against. :func:`load_rows` writes them back, bitwise, into a model
(plain or constrained) whose pinned rows have that fingerprint, and refuses anything else before
changing anything. For ``k`` new rows the file holds ``k x D`` values per weight, not the table.

Names are module names plus the parameter (``model.embed_tokens.weight``), without PEFT's
``base_model.model.`` prefix, so a file saved from a ``PeftModel`` loads into its base model
(before ``PeftModel.from_pretrained``) and the reverse. :func:`extract_rows` builds the same file
from a plain weights file (``embconstraint rows WEIGHTS OUT --pinned N``).

File layout: tensor ``NAME`` is the ``(k, ...)`` free rows, tensor ``NAME.free_rows`` their ``k``
row indices (int64, increasing); the metadata entry ``embconstraint_rows`` is a JSON object
``{NAME: {"num_rows": V, "sha256": ...}}``. The fingerprint hashes the dtype, the shape and the
bytes of the pinned rows (every row not in ``free_rows``) in increasing row order.

>>> import os, tempfile, torch
>>> from embconstraint import constrain
>>> old = torch.nn.Embedding(3, 4)
>>> trained = constrain(torch.nn.Embedding(5, 4), old)          # rows 3, 4 are new
>>> path = os.path.join(tempfile.mkdtemp(), "rows.safetensors")
>>> save_rows(torch.nn.ModuleDict({"emb": trained}), path)
['emb.weight']
>>> fresh = torch.nn.Embedding(5, 4)
>>> with torch.no_grad():
...     fresh.weight[:3] = old.weight                             # the same old rows, other new ones
>>> load_rows(torch.nn.ModuleDict({"emb": fresh}), path)
['emb.weight']
>>> torch.equal(fresh.weight, trained.weight)
True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._mechanism import PinnedRows, pin_of, tie_of
from .formats import (
    PathLike,
    SafetensorsFile,
    load_tensors,
    path_str,
    pick,
    refuse_same_file,
    state_dict_of,
    write_atomic,
)

__all__ = ["save_rows", "load_rows", "extract_rows", "METADATA_KEY", "PEFT_PREFIX"]

METADATA_KEY = "embconstraint_rows"
PEFT_PREFIX = "base_model.model."
_ROWS_SUFFIX = ".free_rows"


def _canonical(name: str) -> str:
    """``name`` without PEFT's ``base_model.model.`` prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _pinned_part(weight: Tensor, free_rows: Tensor) -> Tensor:
    """The rows of ``weight`` not in ``free_rows`` (increasing order; a view for a free suffix)."""
    num_rows, k = weight.shape[0], free_rows.numel()
    if k == 0 or (free_rows[0].item() == num_rows - k and free_rows[-1].item() == num_rows - 1):
        return weight[: num_rows - k]
    keep = torch.ones(num_rows, dtype=torch.bool)
    keep[free_rows] = False
    return weight[keep.to(weight.device)]


def _fingerprint(weight: Tensor, free_rows: Tensor) -> str:
    """SHA-256 of the dtype, shape and bytes of the pinned rows of ``weight``."""
    pinned = _pinned_part(weight.detach(), free_rows).cpu().contiguous()
    digest = hashlib.sha256(f"{pinned.dtype}|{tuple(pinned.shape)}|".encode())
    if pinned.numel():
        digest.update(pinned.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Entry:
    name: str
    values: Tensor  # (k, ...) free rows, CPU
    free_rows: Tensor  # (k,) int64, increasing, CPU
    num_rows: int
    sha256: str


def _entry(name: str, weight: Tensor, free_rows: Tensor) -> _Entry:
    weight = weight.detach()
    values = weight.index_select(0, free_rows.to(weight.device)).cpu().contiguous()
    return _Entry(name, values, free_rows.cpu().long(), weight.shape[0], _fingerprint(weight, free_rows))


def _constrained_weights(module: nn.Module) -> Iterator[tuple[str, PinnedRows]]:
    """(name without PEFT's prefix, pin) of each constrained weight; a tied head (TiedTo) is the
    embedding's weight and is left to it."""
    for mname, m in module.named_modules():
        for attr in list(getattr(m, "parametrizations", {}).keys()):
            pin = pin_of(m, attr)
            if pin is not None:
                yield _canonical(f"{mname}.{attr}" if mname else attr), pin


def _write(entries: Iterable[_Entry], path: PathLike) -> list[str]:
    out = _rows_path(path)
    tensors, meta = {}, {}
    for e in entries:
        tensors[e.name], tensors[e.name + _ROWS_SUFFIX] = e.values, e.free_rows
        meta[e.name] = {"num_rows": e.num_rows, "sha256": e.sha256}
    write_atomic(tensors, out, "safetensors", metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return list(meta)


def _rows_path(path: PathLike) -> Path:
    if not isinstance(path, (str, Path)) and not hasattr(path, "__fspath__"):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = Path(path)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"path {path_str(path)!r}: a rows file is a .safetensors file, got extension {out.suffix!r}")
    return out


def save_rows(module: nn.Module, path: PathLike) -> list[str]:
    """Write the free rows of every constrained weight in ``module`` to ``path`` (``.safetensors``).

    Each weight is stored under its name without PEFT's ``base_model.model.`` prefix, with its free
    row indices and the SHA-256 fingerprint of its pinned rows; a head tied to a constrained
    embedding is the embedding's weight and is saved once. Returns the names written.

    Raises ``TypeError`` for a ``module`` that is not an ``nn.Module``, ``ValueError`` when it
    holds no constrained weight or ``path`` does not end in ``.safetensors``.

    >>> import os, tempfile, torch
    >>> from embconstraint import constrain
    >>> emb = constrain(torch.nn.Embedding(6, 2), torch.zeros(4, 2))
    >>> save_rows(emb, os.path.join(tempfile.mkdtemp(), "rows.safetensors"))
    ['weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    _rows_path(path)
    entries = [_entry(name, pin.merged(), pin.free_rows()) for name, pin in _constrained_weights(module)]
    if not entries:
        raise ValueError(f"save_rows: {type(module).__name__} holds no constrained weight")
    return _write(entries, path)


def _read(path: PathLike) -> list[_Entry]:
    p = _rows_path(path)
    if not p.exists():
        raise FileNotFoundError(f"rows file {path_str(path)!r} does not exist")
    file = load_tensors(p, what="rows file")
    assert isinstance(file, SafetensorsFile)
    raw = file.metadata().get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"rows file {path_str(path)!r} has no {METADATA_KEY!r} metadata: not written by save_rows")
    try:
        meta = json.loads(raw)
        entries = [_Entry(name, file[name], file[name + _ROWS_SUFFIX].long(), int(m["num_rows"]), str(m["sha256"]))
                   for name, m in meta.items()]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"rows file {path_str(path)!r}: damaged {METADATA_KEY!r} entry ({err!r})") from None
    for e in entries:
        rows = e.free_rows
        if (rows.dim() != 1 or e.values.dim() < 1 or e.values.shape[0] != rows.numel()
                or (rows.numel() and (rows.min() < 0 or rows.max() >= e.num_rows or (rows.diff() <= 0).any()))):
            raise ValueError(f"rows file {path_str(path)!r}: entry {e.name!r} has inconsistent rows "
                             f"(values {tuple(e.values.shape)}, {rows.numel()} row indices, num_rows {e.num_rows})")
    return entries


def _targets(module: nn.Module) -> dict[str, nn.Module]:
    return {_canonical(name): m for name, m in module.named_modules()}


def _target_weight(targets: Mapping[str, nn.Module], e: _Entry) -> tuple[nn.Module, str, Tensor]:
    """The module, attribute and current (merged) weight that entry ``e`` goes to; the refusals."""
    mpath, _, attr = e.name.rpartition(".")
    m = targets.get(mpath)
    if m is None:
        raise ValueError(f"load_rows: the model has no module {mpath!r} (entry {e.name!r}); "
                         f"names are matched without PEFT's {PEFT_PREFIX!r} prefix")
    if tie_of(m, attr) is not None:
        raise ValueError(f"load_rows: {e.name} is tied to a constrained embedding in the model, but the file "
                         "holds its own rows (saved from an untied model)")
    pin = pin_of(m, attr)
    weight = pin.merged() if pin is not None else getattr(m, attr, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"load_rows: module {mpath!r} has no tensor {attr!r} (entry {e.name!r})")
    expected = (e.num_rows, *e.values.shape[1:])
    if tuple(weight.shape) != expected:
        raise ValueError(f"load_rows: {e.name} has shape {tuple(weight.shape)} in the model, "
                         f"the file's rows are for shape {expected}")
    if weight.dtype != e.values.dtype:
        raise ValueError(f"load_rows: {e.name} is {weight.dtype} in the model, the file holds {e.values.dtype}")
    if pin is not None and not torch.equal(pin.free_rows(), e.free_rows):
        raise ValueError(f"load_rows: {e.name} is constrained with {pin.num_rows - pin.num_pinned} free rows "
                         f"in the model, other than the file's {e.free_rows.numel()} free rows")
    if _fingerprint(weight, e.free_rows) != e.sha256:
        raise ValueError(f"load_rows: the pinned rows of {e.name} differ from those the file's rows were "
                         "trained against (SHA-256 fingerprint mismatch): a rows file for another model")
    return m, attr, weight


def load_rows(module: nn.Module, path: PathLike) -> list[str]:
    """Write the rows saved by :func:`save_rows` into ``module``, bitwise; returns the names loaded.

    ``module`` may be plain or constrained, a ``PeftModel`` or a base model (names are matched
    without PEFT's ``base_model.model.`` prefix). Every entry is checked first: the module exists,
    the weight has the file's shape and dtype, its pinned rows (every row but the file's) have the
    file's SHA-256 fingerprint, and a constrained weight frees exactly the file's rows. Any
    difference raises a ``ValueError`` naming the weight, and nothing is written. A constrained
    weight of ``module`` that the file does not hold is refused too (its new rows would stay
    untrained).

    >>> import os, tempfile, torch
    >>> from embconstraint import constrain
    >>> emb = constrain(torch.nn.Embedding(6, 2), torch.zeros(4, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "rows.safetensors")
    >>> _ = save_rows(emb, path)
    >>> load_rows(torch.nn.Embedding(6, 2), path)  # other pinned rows: refused
    Traceback (most recent call last):
    ...
    ValueError: load_rows: the pinned rows of weight differ from those the file's rows were trained against (SHA-256 fingerprint mismatch): a rows file for another model
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    entries = _read(path)
    targets = _targets(module)
    plan = [(e, *_target_weight(targets, e)) for e in entries]
    names = {e.name for e in entries}
    left = [name for name, _ in _constrained_weights(module) if name not in names]
    if left:
        raise ValueError(f"load_rows: the model's constrained weight(s) {left} are not in the rows file "
                         f"{path_str(path)!r} (it holds {sorted(names)})")
    with torch.no_grad():
        for e, m, attr, weight in plan:
            pin = pin_of(m, attr)
            if pin is not None:  # free_parameter holds the free rows in increasing order
                pin.free_parameter.copy_(e.values)
            else:
                weight.index_copy_(0, e.free_rows.to(weight.device), e.values.to(weight.device))
    return [e.name for e in entries]


def extract_rows(weights: PathLike, out: PathLike, *, num_pinned: int, keys: Iterable[str] | None = None) -> list[str]:
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
    _rows_path(out)
    refuse_same_file(out, weights, "weights file", "the rows")
    container = state_dict_of(load_tensors(weights, what="weights"), f"weights {path_str(weights)!r}")
    if isinstance(container, Tensor):
        raise ValueError(f"weights {path_str(weights)!r} holds a bare tensor; a rows file needs named weights")
    picked = [pick(container, key, f"weights {path_str(weights)!r}", False) for key in (list(keys) if keys else [None])]
    entries = []
    for key, weight in picked:
        if weight.dim() < 1 or not 0 <= num_pinned <= weight.shape[0]:
            raise ValueError(f"num_pinned must lie in [0, {weight.shape[0] if weight.dim() else 0}] "
                             f"for {key!r} of shape {tuple(weight.shape)}, got {num_pinned}")
        entries.append(_entry(_canonical(key), weight, torch.arange(num_pinned, weight.shape[0])))
    return _write(entries, out)
