"""PEFT and the rows embconstraint trains: what a ``PeftModel``'s own methods do with them.

The new rows of a constrained embedding (and head) live in the base model's tables, not in the
adapter, so PEFT's methods would not see them. While an embedding of a ``PeftModel`` is
constrained by :mod:`embconstraint.hf` (``constrain_new_tokens``, ``constrain_input_embeddings``),
three of its methods take the rows along (each hook removes itself once nothing is constrained):

- ``save_pretrained(folder)`` also writes the rows file :data:`ROWS_FILE` into ``folder`` (the
  ``Trainer`` saves every checkpoint of a ``PeftModel`` this way);
- ``load_adapter(folder, ...)`` also loads ``folder``'s rows file when it has one, checked before
  the adapter is loaded (the ``Trainer`` resumes and restores its best model this way);
- ``disable_adapter()`` also switches the new rows off: inside it they hold the values they had
  when they were constrained (the base model's), as PEFT's own trainable tokens do; TRL computes
  the reference model of DPO, KTO, GRPO, RLOO or ORPO this way.

Two more follow an adapter added later (TRL's ``DPOTrainer`` adds a ``"ref"`` copy of the adapter
to compute its reference): ``add_adapter(name, ...)`` records the new rows as they are then, and
``set_adapter(name)`` switches them in while that adapter is active (``set_adapter`` back to an
adapter the model had when it was constrained switches the trained rows back in, bitwise).

It also tells PEFT wrappers apart (by duck typing, without importing ``peft``): a LoRA (or other
tuner) layer on the embedding or the head changes every row, pinned ones included.

>>> import torch
>>> from embconstraint import constrain
>>> emb = constrain(torch.nn.Embedding(4, 2), torch.zeros(3, 2))
>>> record_base_rows(emb)                                   # row 3, the free row, as it is now
>>> base = emb.weight[3].tolist()
>>> with torch.no_grad():
...     _ = emb.parametrizations.weight.original.fill_(7.0)  # row 3 "trained"
>>> with base_rows(emb):
...     emb.weight[3].tolist() == base
True
>>> emb.weight[3].tolist()
[7.0, 7.0]
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._mechanism import PinnedRows, pin_of
from ..files.rows import check_rows_file, save_rows, write_rows

__all__ = [
    "ROWS_FILE",
    "is_peft_model",
    "base_model_of",
    "peft_wrapper_problem",
    "record_base_rows",
    "base_rows",
    "save_pretrained_with_rows",
    "load_adapter_with_rows",
    "disable_adapter_with_rows",
    "restored_rows",
    "constrained_pins",
    "record_trained_rows",
    "frozen_new_rows",
    "retrain_rows",
    "add_adapter_with_rows",
    "set_adapter_with_rows",
]

ROWS_FILE = "embconstraint_rows.safetensors"

# pin -> the free rows' values when they were constrained (the base model's new rows)
_BASE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the rows file its load_adapter last loaded (what SaveRowsCallback checks after a resume)
_RESTORED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the pins whose free rows constrain_new_tokens made trainable (what retrain_rows switches back on)
_TRAINED: weakref.WeakSet = weakref.WeakSet()
# model -> {name of an adapter added after constraining: the free rows when it was added}
_ADDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the trained free rows, set aside while an adapter added later is active
_SET_ASIDE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (duck-typed: ``peft_config`` and ``get_base_model``)."""
    return (
        isinstance(model, nn.Module)
        and hasattr(model, "peft_config")
        and callable(getattr(type(model), "get_base_model", None))
    )


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel``; ``model`` itself otherwise."""
    return model.get_base_model() if is_peft_model(model) else model


def peft_wrapper_problem(module: Any, what: str) -> str | None:
    """Why a PEFT wrapper ``module`` (what ``what`` returned) cannot be constrained, else None."""
    if not isinstance(module, nn.Module):
        return None
    name = type(module).__name__
    if isinstance(getattr(module, "base_layer", None), nn.Module):  # a tuner layer: LoRA, LoHa, IA3, ...
        return (
            f"{what} is a PEFT adapter layer ({type(module).__module__}.{name}) around the "
            f"{type(module.base_layer).__name__} (the module is in the "
            "adapter's target_modules): an adapter there adds its own update (LoRA's B @ A) to every row, "
            "pinned rows included, so they cannot stay exact. Leave the embedding and the output head out of "
            "target_modules (e.g. LoraConfig(target_modules=['q_proj', 'v_proj'])); constrain_new_tokens "
            "trains their new rows itself"
        )
    if hasattr(module, "token_adapter") and hasattr(module, "original_module"):  # TrainableTokensWrapper
        return (
            f"{what} is PEFT's {name} (trainable_token_indices): PEFT already trains those rows and keeps the "
            "others. Use one of the two: drop trainable_token_indices from the PEFT config, or do not call "
            "constrain_new_tokens"
        )
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):  # ModulesToSaveWrapper
        return (
            f"{what} is PEFT's {name} (the module is in modules_to_save): PEFT trains a full copy of the "
            "table, pinned rows included. Leave it out of modules_to_save; constrain_new_tokens trains the "
            "new rows in the table itself"
        )
    return None


def constrained_pins(model: nn.Module) -> Iterator[PinnedRows]:
    """The :class:`PinnedRows` of every constrained weight of ``model`` (ties excluded)."""
    for m in model.modules():
        for name in list(getattr(m, "parametrizations", {}).keys()):
            pin = pin_of(m, name)
            if pin is not None:
                yield pin


def record_base_rows(model: nn.Module, *, again: bool = False) -> None:
    """Remember the current free rows of every constrained weight of ``model`` as its base rows
    (kept for the weights that already have some, unless ``again``): what :func:`base_rows` puts in."""
    for pin in constrained_pins(model):
        if (again or pin not in _BASE) and pin.storage != "split":
            _BASE[pin] = pin.free_parameter.detach().clone()


def record_trained_rows(model: nn.Module) -> None:
    """Remember which constrained weights of ``model`` have trainable free rows now."""
    _TRAINED.update(pin for pin in constrained_pins(model) if pin.free_parameter.requires_grad)


def frozen_new_rows(module: nn.Module) -> bool:
    """Whether the free rows that :func:`record_trained_rows` saw trainable in ``module`` are frozen now."""
    pin = pin_of(module)
    return pin is not None and pin in _TRAINED and not pin.free_parameter.requires_grad


def retrain_rows(model: nn.Module) -> list[nn.Parameter]:
    """Make the free rows :func:`record_trained_rows` saw trainable trainable again (after
    ``get_peft_model``, which freezes every parameter but the adapter's); returns them."""
    params = [pin.free_parameter for pin in constrained_pins(model) if pin in _TRAINED]
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def base_rows(model: nn.Module) -> Iterator[None]:
    """Inside, the free rows of every constrained weight of ``model`` hold their base rows (see
    :func:`record_base_rows`); on exit they hold their own values again, bitwise. Only the
    ``(k, D)`` free rows are copied, twice. Entered under ``torch.no_grad()``, the graph of a
    forward made before stays valid: its backward, run after the context, computes what it
    would have without it (run it after the context, not inside). Entered with gradients on, a
    graph that crosses the context raises torch's in-place modification error at backward."""
    # Under no_grad (how TRL computes a reference) the rows are written through .data, which autograd
    # does not version: a graph made before the context saw these very rows and sees them again when
    # its backward runs after it. With gradients on, a graph that crosses the context raises torch's
    # in-place error instead of computing with rows that changed under it.
    versioned = torch.is_grad_enabled()
    swapped: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for pin in constrained_pins(model):
                base = _BASE.get(pin)
                if base is None:
                    continue
                free = pin.free_parameter
                if pin.storage == "split" or free.shape != base.shape:
                    raise RuntimeError(
                        "the new rows cannot be switched off here: a sharded (fully_shard) or "
                        "re-shaped constrained weight; compute the reference with a separate model"
                    )
                target = free if versioned else free.data
                swapped.append((target, target.clone()))
                target.copy_(base.to(free))
        yield
    finally:
        with torch.no_grad():
            for target, own in reversed(swapped):
                target.copy_(own)


def _free_rows(model: nn.Module) -> list[Tensor]:
    """The free rows of every constrained weight of ``model``, as written by :func:`_write_rows`."""
    pins = list(constrained_pins(model))
    if any(pin.storage == "split" for pin in pins):
        raise RuntimeError(
            "the new rows cannot follow another adapter here: a sharded (fully_shard) constrained weight; "
            "compute the reference with a separate model"
        )
    return [pin.free_parameter for pin in pins]


def _write_rows(model: nn.Module, values: list[Tensor]) -> None:
    """Write ``values`` into the free rows (through ``.data`` under ``no_grad``, as :func:`base_rows`)."""
    versioned = torch.is_grad_enabled()
    with torch.no_grad():
        for free, value in zip(_free_rows(model), values, strict=True):
            (free if versioned else free.data).copy_(value)


def add_adapter_with_rows(model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    """``PeftModel.add_adapter``, and the new rows as they are now recorded as that adapter's."""
    aside = _SET_ASIDE.get(model)
    rows = [
        r.clone() for r in (aside if aside is not None else [free.detach() for free in _free_rows(model)])
    ]
    result = type(model).add_adapter(model, adapter_name, *args, **kwargs)  # (after _free_rows' refusal)
    _ADDED.setdefault(model, {})[adapter_name] = rows
    return result


def set_adapter_with_rows(model: nn.Module, adapter_name: Any, *args: Any, **kwargs: Any) -> Any:
    """``PeftModel.set_adapter``, and the rows of the adapter made active: the rows recorded when it
    was added for an adapter added later, the trained rows for the others."""
    added = _ADDED.get(model, {})
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    later = [n for n in names if n in added]
    if later and len(names) > 1:
        raise ValueError(
            f"cannot activate {names} together: the new rows of a constrained PeftModel follow one adapter, "
            f"and {later} were added after it was constrained (each with the rows it was added with)"
        )
    result = type(model).set_adapter(model, adapter_name, *args, **kwargs)
    aside = _SET_ASIDE.get(model)
    if later:
        if aside is None:
            _SET_ASIDE[model] = [free.detach().clone() for free in _free_rows(model)]
        _write_rows(model, added[later[0]])
    elif aside is not None:
        _write_rows(model, _SET_ASIDE.pop(model))
    return result


def restored_rows(model: nn.Module) -> str | None:
    """The rows file that ``model``'s ``load_adapter`` last loaded (``None``: none); reading it forgets it."""
    return _RESTORED.pop(model, None)


def _rows_file_in(folder: Any) -> Path | None:
    try:
        path = Path(folder) / ROWS_FILE
    except TypeError:
        return None
    return path if path.is_file() else None


def save_pretrained_with_rows(model: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """``PeftModel.save_pretrained``, then the rows file into the same folder (main process only).
    Given a ``state_dict`` (the ``Trainer`` under DeepSpeed ZeRO-3 passes the consolidated one, the
    model's own rows being partitioned), the rows are taken from it, as the adapter is."""
    method = type(model).save_pretrained
    result = method(model, save_directory, *args, **kwargs)
    bound = inspect.signature(method).bind(model, save_directory, *args, **kwargs)
    if bound.arguments.get("is_main_process", True):
        state_dict = bound.arguments.get("state_dict", bound.arguments.get("kwargs", {}).get("state_dict"))
        save_rows(model, Path(save_directory) / ROWS_FILE, state_dict=state_dict if state_dict else None)
    return result


def load_adapter_with_rows(model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> Any:
    """``PeftModel.load_adapter``, and the rows of ``model_id``'s rows file when it has one (every
    check of ``load_rows`` made before the adapter is loaded)."""
    path = _rows_file_in(model_id)
    steps = check_rows_file(model, path) if path is not None else None
    result = type(model).load_adapter(model, model_id, *args, **kwargs)
    if steps is not None:
        write_rows(steps, path)
        _RESTORED[model] = str(path)
    return result


def disable_adapter_with_rows(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``PeftModel.disable_adapter()``, with the new rows switched off inside it as well."""
    return _disabled(model, *args, **kwargs)


@contextmanager
def _disabled(model: nn.Module, *args: Any, **kwargs: Any) -> Iterator[None]:
    with type(model).disable_adapter(model, *args, **kwargs), base_rows(model):
        yield
