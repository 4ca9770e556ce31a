"""A rows-only file: the free rows of every constrained weight, for adapters and small uploads.

:func:`save_rows` writes, to a ``.safetensors`` file, only the free rows (the trained new tokens)
of each constrained weight in a module, with their row indices and a SHA-256 fingerprint of the
pinned rows they were trained against. :func:`load_rows` writes them back, bitwise, into a model
(plain or constrained) whose pinned rows have that fingerprint, and refuses anything else before
changing anything. For ``k`` new rows the file holds ``k x D`` values per weight, not the table.

Names are module names plus the parameter (``model.embed_tokens.weight``), without PEFT's
``base_model.model.`` prefix, so a file saved from a ``PeftModel`` loads into its base model
(before ``PeftModel.from_pretrained``) and the reverse. The file's layout and fingerprints, and
:func:`extract_rows` (the same file from a plain weights file), are in :mod:`.rows_file`; this
module moves rows between such a file and a live model.

Several files with disjoint rows stack on one base (each one's fingerprint is checked against
the base's rows, the rows loaded from the others set aside); :func:`unload_rows` puts back the
rows a file replaced, and loading a file with the same rows as a loaded one switches to it.

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

import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._common import original_key
from .._mechanism import PinnedRows, pin_of, tie_of
from .formats import PathLike, path_str
from .rows_file import (
    PEFT_PREFIX,
    Entry,
    canonical,
    entry,
    fingerprint,
    read_rows_file,
    rows_path,
    write_rows_file,
)

__all__ = ["save_rows", "load_rows", "unload_rows", "loaded_rows"]


def _constrained_weights(module: nn.Module, with_path: bool = False) -> Iterator[tuple]:
    """(name without PEFT's prefix, pin) of each constrained weight (with ``with_path``, also the
    weight's full name, prefix included); a tied head (TiedTo) is the embedding's weight and is
    left to it."""
    for mname, m in module.named_modules():
        for attr in list(getattr(m, "parametrizations", {}).keys()):
            pin = pin_of(m, attr)
            if pin is not None and pin.shard is not None:
                raise ValueError(
                    f"{mname or type(m).__name__} is sharded by tensor parallelism (each rank holds its rows of the "
                    "vocabulary): a rows file needs the whole table; write one from merged_state_dict(model) "
                    "(embconstraint.files.extract_rows, or the rows CLI)"
                )
            if pin is not None:
                full = f"{mname}.{attr}" if mname else attr
                yield (canonical(full), pin, full) if with_path else (canonical(full), pin)


def _merged_from(pin: PinnedRows, full: str, state_dict: Mapping[str, Tensor]) -> Tensor:
    """The merged weight of ``pin`` (named ``full`` in the module) with the free rows of ``state_dict``:
    its merged (plain) entry, or its raw entry (the free rows) completed with ``pin``'s pinned rows."""
    path, _, attr = full.rpartition(".")
    plain, raw = full, original_key(f"{path}." if path else "", attr)
    if plain in state_dict:
        return state_dict[plain].detach()
    if raw not in state_dict:
        raise ValueError(f"save_rows: state_dict holds neither {plain!r} nor {raw!r}")
    free = state_dict[raw].detach()
    pinned = pin.pinned_block()
    if free.shape[1:] != pinned.shape[1:] or free.shape[0] != pin.num_rows - pin.num_pinned:
        raise ValueError(
            f"save_rows: state_dict[{raw!r}] has shape {tuple(free.shape)}, expected the "
            f"{pin.num_rows - pin.num_pinned} free rows of shape {(pin.num_rows - pin.num_pinned, *pinned.shape[1:])}"
        )
    free = free.to(pinned.device)
    return pin.layout.to_user_order(torch.cat([pinned.to(free.dtype), free]))


def save_rows(
    module: nn.Module, path: PathLike, *, state_dict: Mapping[str, Tensor] | None = None
) -> list[str]:
    """Write the free rows of every constrained weight in ``module`` to ``path`` (``.safetensors``).

    Each weight is stored under its name without PEFT's ``base_model.model.`` prefix, with its free
    row indices and the SHA-256 fingerprint of its pinned rows (also of the pinned rows cast to each
    lower precision); a head tied to a constrained embedding is the embedding's weight and is saved
    once. Returns the names written.

    ``state_dict``: take the free rows from it instead of from the module (the pinned rows still
    come from the module), as ``save_pretrained(state_dict=...)`` saves a given state dict: each
    weight by its plain name (the merged weight) or its raw name
    (``...parametrizations.weight.original``, the free rows: what ``named_parameters()`` and
    DeepSpeed ZeRO-3's consolidated state dict hold), names as in ``module``.

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
    rows_path(path)
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors or None, got {type(state_dict).__name__}")
    entries = [
        entry(
            name, pin.merged() if state_dict is None else _merged_from(pin, full, state_dict), pin.free_rows()
        )
        for name, pin, full in _constrained_weights(module, with_path=True)
    ]
    if not entries:
        raise ValueError(f"save_rows: {type(module).__name__} holds no constrained weight")
    return write_rows_file(entries, path)


# -- what was loaded where ----------------------------------------------------------------------


@dataclass
class _Loaded:
    """Rows of one weight loaded from one file, and the rows they replaced (the base's)."""

    source: str  # the file, resolved
    free_rows: Tensor  # (k,) CPU int64
    base: Tensor  # (k, ...) the rows before the load, on the weight's device and dtype


# module -> {attribute: [_Loaded, in load order]}; weak: a model that is dropped takes its record along.
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _source(path: PathLike) -> str:
    return str(Path(path).resolve())


def loaded_rows(module: nn.Module) -> dict[str, list[str]]:
    """The rows files loaded into ``module`` and not unloaded: ``{file: [weight names]}``, in load order.

    >>> import torch
    >>> loaded_rows(torch.nn.Embedding(3, 2))
    {}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    out: dict[str, list[str]] = {}
    for name, m in _targets(module).items():
        for attr, records in _LOADED.get(m, {}).items():
            for r in records:
                out.setdefault(r.source, []).append(f"{name}.{attr}" if name else attr)
    return out


def _targets(module: nn.Module) -> dict[str, nn.Module]:
    return {canonical(name): m for name, m in module.named_modules()}


@dataclass
class _Step:
    """One entry of a rows file, checked and ready to write into ``module.<attr>``."""

    entry: Entry
    module: nn.Module
    attr: str
    weight: Tensor  # the current (merged) weight
    replaces: list[_Loaded]  # loaded records with exactly these rows (a switch): their base rows are kept


def _rows_loaded_from_others(records: list[_Loaded], e: Entry, source: str, path: PathLike) -> list[_Loaded]:
    """The records ``e`` replaces (same rows: a switch, or the same file again); refuses a partial overlap."""
    replaced = []
    for r in records:
        if r.source == source or torch.equal(r.free_rows, e.free_rows):
            replaced.append(r)
        elif bool(torch.isin(e.free_rows, r.free_rows).any()):
            raise ValueError(
                f"load_rows: rows of {e.name} in {path_str(path)!r} overlap rows loaded from "
                f"{r.source!r} (not the same rows); unload_rows(model, {r.source!r}) first"
            )
    return replaced


def _base_weight(weight: Tensor, others: list[_Loaded]) -> Tensor:
    """``weight`` with the rows loaded from other files put back to the base's (a copy if any)."""
    if not others:
        return weight
    base = weight.detach().clone()
    for r in others:
        base.index_copy_(0, r.free_rows.to(base.device), r.base.to(base))
    return base


def _check_entry(targets: Mapping[str, nn.Module], e: Entry, path: PathLike) -> _Step:
    """Everything :func:`load_rows` refuses of one entry, checked without changing anything."""
    mpath, _, attr = e.name.rpartition(".")
    m = targets.get(mpath)
    if m is None:
        raise ValueError(
            f"load_rows: the model has no module {mpath!r} (entry {e.name!r}); "
            f"names are matched without PEFT's {PEFT_PREFIX!r} prefix"
        )
    if tie_of(m, attr) is not None:
        raise ValueError(
            f"load_rows: {e.name} is tied to a constrained embedding in the model, but the file "
            "holds its own rows (saved from an untied model)"
        )
    pin = pin_of(m, attr)
    weight = pin.merged() if pin is not None else getattr(m, attr, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"load_rows: module {mpath!r} has no tensor {attr!r} (entry {e.name!r})")
    expected = (e.num_rows, *e.values.shape[1:])
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"load_rows: {e.name} has shape {tuple(weight.shape)} in the model, "
            f"the file's rows are for shape {expected}"
        )
    if pin is not None and not torch.equal(pin.free_rows(), e.free_rows):
        raise ValueError(
            f"load_rows: {e.name} is constrained with {pin.num_rows - pin.num_pinned} free rows "
            f"in the model, other than the file's {e.free_rows.numel()} free rows"
        )
    expected_sha, dtype = e.fingerprint_for(weight.dtype)
    if expected_sha is None:
        raise ValueError(
            f"load_rows: {e.name} is {weight.dtype} in the model, the file holds {e.values.dtype} "
            f"and no fingerprint of its pinned rows in {weight.dtype}; cast the model to "
            f"{e.values.dtype} to load it"
        )
    records = _LOADED.get(m, {}).get(attr, [])
    replaces = _rows_loaded_from_others(records, e, _source(path), path)
    others = [r for r in records if not any(r is x for x in replaces)]
    if fingerprint(_base_weight(weight, others), e.free_rows, dtype) != expected_sha:
        raise ValueError(
            f"load_rows: the pinned rows of {e.name} differ from those the file's rows were "
            "trained against (SHA-256 fingerprint mismatch): a rows file for another model"
        )
    return _Step(e, m, attr, weight, replaces)


def check_rows_file(module: nn.Module, path: PathLike) -> list[_Step]:
    """Every check of :func:`load_rows`, nothing written; pass the result to :func:`write_rows`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    entries = read_rows_file(path)
    targets = _targets(module)
    steps = [_check_entry(targets, e, path) for e in entries]
    names = {e.name for e in entries}
    left = [name for name, _ in _constrained_weights(module) if name not in names]
    if left:
        raise ValueError(
            f"load_rows: the model's constrained weight(s) {left} are not in the rows file "
            f"{path_str(path)!r} (it holds {sorted(names)})"
        )
    return steps


@torch.no_grad()
def write_rows(steps: list[_Step], path: PathLike) -> list[str]:
    """Write the rows :func:`check_rows_file` checked (cast to each weight's dtype); returns the names."""
    source = _source(path)
    for s in steps:
        e, pin = s.entry, pin_of(s.module, s.attr)
        rows = e.free_rows.to(s.weight.device)
        base = s.replaces[0].base if s.replaces else s.weight.index_select(0, rows).clone()
        values = e.values.to(device=s.weight.device, dtype=s.weight.dtype)
        if pin is not None:  # free_parameter holds the free rows in increasing order
            pin.free_parameter.copy_(values)
        else:
            s.weight.index_copy_(0, rows, values)
        records = _LOADED.setdefault(s.module, {}).setdefault(s.attr, [])
        records[:] = [r for r in records if not any(r is x for x in s.replaces)]
        records.append(_Loaded(source, e.free_rows, base))
    return [s.entry.name for s in steps]


def load_rows(module: nn.Module, path: PathLike) -> list[str]:
    """Write the rows saved by :func:`save_rows` into ``module``, bitwise; returns the names loaded.

    ``module`` may be plain or constrained, a ``PeftModel`` or a base model (names are matched
    without PEFT's ``base_model.model.`` prefix). Every entry is checked first: the module exists,
    the weight has the file's shape, its pinned rows (every row but the file's) have the file's
    SHA-256 fingerprint, and a constrained weight frees exactly the file's rows. Any difference
    raises a ``ValueError`` naming the weight, and nothing is written. A constrained weight of
    ``module`` that the file does not hold is refused too (its new rows would stay untrained).

    **Precision.** A file loads onto the same base in another precision: its rows are cast to
    the model's dtype (a float32 file onto a bfloat16 base, as PEFT casts on load), and the
    fingerprint is compared in the lower of the two precisions (float16 against bfloat16, where
    neither holds the other, is refused).

    **Several files.** Files with disjoint rows, trained on the same base, stack: each one's
    fingerprint is taken over the base's rows, those loaded from the other files set aside.
    Loading a file with exactly the rows of a loaded one switches to it (the same file again
    reloads it); a partial overlap is refused. :func:`unload_rows` puts the base's rows back.

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
    return write_rows(check_rows_file(module, path), path)


@torch.no_grad()
def unload_rows(module: nn.Module, path: PathLike | None = None) -> list[str]:
    """Put back the rows that :func:`load_rows` of ``path`` replaced (``None``: of every file
    loaded into ``module``, last loaded first); returns the names restored. The rows get the
    values they had before that load, bitwise (also after training them since).

    >>> import os, tempfile, torch
    >>> from embconstraint import constrain
    >>> trained = constrain(torch.nn.Embedding(5, 2), torch.zeros(3, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "rows.safetensors")
    >>> _ = save_rows(trained, path)
    >>> base = torch.nn.Embedding(5, 2)
    >>> with torch.no_grad():
    ...     _ = base.weight[:3].zero_()
    >>> before = base.weight.detach().clone()
    >>> load_rows(base, path), unload_rows(base, path)
    (['weight'], ['weight'])
    >>> torch.equal(base.weight, before)
    True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    source = None if path is None else _source(rows_path(path))
    plan = []
    for name, m in _targets(module).items():
        for attr, records in _LOADED.get(m, {}).items():
            plan += [
                (f"{name}.{attr}" if name else attr, m, attr, r)
                for r in records
                if source is None or r.source == source
            ]
    if not plan:
        what = "no rows file" if path is None else f"no rows from {path_str(path)!r}"
        raise ValueError(f"unload_rows: {what} loaded into {type(module).__name__}")
    for _, m, attr, r in reversed(plan):
        pin = pin_of(m, attr)
        if pin is not None:
            pin.free_parameter.copy_(r.base.to(pin.free_parameter))
        else:
            weight = getattr(m, attr)
            weight.index_copy_(0, r.free_rows.to(weight.device), r.base.to(weight))
        records = _LOADED[m][attr]
        records[:] = [x for x in records if x is not r]
    return list(dict.fromkeys(name for name, *_ in plan))
