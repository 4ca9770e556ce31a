"""Export merged weights from checkpoints: ``embconstraint export``, as library functions.

Every problem with the input (a corrupted or truncated file, a missing key, a shape mismatch)
raises :class:`ValueError` (:class:`FileNotFoundError` for a missing file or output folder), and
an argument of the wrong kind (a list where a path or a dict is expected) :class:`TypeError`,
each with a one-line message. Files are read by :mod:`.formats` and written by :mod:`.writing`.

>>> import os, tempfile, torch
>>> d = tempfile.mkdtemp()
>>> torch.save({"epoch": 3, "state_dict": {"emb.parametrizations.weight.original": torch.ones(2, 4)}},
...            os.path.join(d, "raw.ckpt"))
>>> merged = export_checkpoint(os.path.join(d, "raw.ckpt"), os.path.join(d, "out.pt"), reference=torch.zeros(3, 4))
>>> merged["emb.weight"].sum(dim=1).tolist()       # pinned rows from the reference, then the free rows
[0.0, 0.0, 0.0, 4.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._common import RAW_KEY, check_rows
from .formats import (
    PathLike,
    SafetensorsFile,
    as_indices,
    listing,
    load_tensors,
    path_str,
    pick,
    state_dict_of,
    tensor_problem,
    tensor_source,
)
from .verify import exact_cast
from .writing import refuse_same_file, write_atomic, writer_kind

__all__ = ["export_checkpoint", "export_state_dict"]


def _foreign(state_dict: Mapping[str, Any], key: str) -> bool:
    """Whether the raw entry ``key`` belongs to another parametrization (torch's ``orthogonal``,
    ``spectral_norm``, ...): those keep state of their own (``...parametrizations.weight.0.base``),
    which embconstraint's never does. They are exported as they are."""
    siblings = key[: -len("original")]
    return any(k != key and k.startswith(siblings) for k in state_dict)


def _merge_raw(
    state_dict: dict[str, Any], reference: Tensor | None, indices: Tensor | None, where: str
) -> dict[str, Any]:
    """Replace ``*.parametrizations.<name>.original`` entries (the free rows of a constrained
    embedding) by the merged ``*.<name>`` weight, built with ``reference`` as pinned rows."""
    raw = [k for k in state_dict if RAW_KEY.match(k) and not _foreign(state_dict, k)]
    if not raw:
        return state_dict
    out = dict(state_dict)
    for k in raw:
        m = RAW_KEY.match(k)
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
            raise ValueError(
                f"shape mismatch: reference has shape {tuple(reference.shape)} but {k!r} has "
                f"shape {tuple(free.shape)} (free rows); their embedding dimensions must match"
            )
        n, num_rows = reference.shape[0], reference.shape[0] + free.shape[0]
        idx = torch.arange(n) if indices is None else indices
        check_rows(idx, n, num_rows)
        merged = torch.empty((num_rows, free.shape[1]), dtype=free.dtype)
        is_free = torch.ones(num_rows, dtype=torch.bool)
        is_free[idx] = False
        merged[idx] = exact_cast(reference.detach().cpu(), free.dtype)
        merged[is_free.nonzero().flatten()] = free.detach().cpu()
        out[plain] = merged
    return out


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
    return _export(state_dict, Path(out), reference, as_indices(indices), "state dict")


def _export(
    state_dict: Mapping[str, Any], out: Path, reference: Tensor | None, idx: Tensor | None, where: str
) -> dict[str, Any]:
    kind = writer_kind(out)
    if out.is_dir():
        raise ValueError(f"output {path_str(out)!r} is a directory, expected a file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {path_str(out.parent)!r} does not exist")
    for k, v in state_dict.items():  # before merging: a raw entry must be dense too
        problem = tensor_problem(v)
        if problem is not None and (kind == "safetensors" or v.is_meta or RAW_KEY.match(k)):
            fix = (
                "it cannot be exported"
                if v.is_meta or RAW_KEY.match(k)
                else "safetensors holds dense tensors only (export to .pt, or save it with .to_dense())"
            )
            raise ValueError(f"{where}: tensor {k!r} is {problem}; {fix}")
    sd = _merge_raw(dict(state_dict), reference, idx, where)
    if reference is not None and sd.keys() == state_dict.keys():
        raise ValueError(
            f"a reference was given, but {where} holds no raw "
            "'*.parametrizations.<name>.original' entry to merge it into"
        )
    if kind == "safetensors":
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(
                f"{where}: entries {listing(bad)} are not tensors; safetensors holds tensors "
                "only (export to .pt instead)"
            )
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    else:
        sd = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in sd.items()}
    write_atomic(sd, out, kind)
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
    writer_kind(Path(out))  # refuse a bad output name before reading anything
    where = f"checkpoint {path_str(checkpoint)!r}"
    refuse_same_file(out, checkpoint, "checkpoint", "its weights")
    obj = load_tensors(checkpoint, what="checkpoint")
    sd = state_dict_of(obj, where)
    if isinstance(sd, Tensor):
        raise ValueError(f"{where} holds a bare tensor, expected a Lightning checkpoint or a state dict")
    if sd is obj and not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(
            f"{where} is neither a Lightning checkpoint (no 'state_dict' entry) nor a state dict "
            f"of tensors; its entries: {listing(list(sd))}"
        )
    ref = None
    if reference is not None:
        src, r_where = tensor_source(reference, "reference")
        _, ref = pick(src, reference_key, r_where, prefer_single=True)
    if isinstance(sd, SafetensorsFile):
        sd = {k: sd[k] for k in sd}
    return _export(sd, Path(out), ref, as_indices(indices), where)
