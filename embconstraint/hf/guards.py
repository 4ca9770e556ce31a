"""Guards a transformers model's ``tie_weights`` and ``resize_token_embeddings`` while an
embedding of it is constrained: a tie to a constrained embedding is a parametrization and cannot
be re-made by assignment, and a resize would replace the constrained weight.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> from embconstraint import constrain
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
>>> _ = constrain(model.get_input_embeddings(), torch.zeros(4, 8), root=model)
>>> guard_while_constrained(model)
>>> model.resize_token_embeddings(12)
Traceback (most recent call last):
...
RuntimeError: model.resize_token_embeddings() would replace the weight of a constrained embedding; call embconstraint.release(model) first, resize, then constrain the input embeddings again
"""

from __future__ import annotations

import inspect
import re
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._mechanism import pin_of, tie_of
from ..core import is_constrained, merged_state_dict
from .adapters import (
    add_adapter_with_rows,
    base_model_of,
    disable_adapter_with_rows,
    frozen_new_rows,
    is_peft_model,
    load_adapter_with_rows,
    record_base_rows,
    retrain_rows,
    save_pretrained_with_rows,
    set_adapter_with_rows,
)

__all__ = [
    "guard_while_constrained",
    "guard_peft_model",
    "adopt_peft_wrapper",
    "warn_when_new_rows_freeze",
    "is_guarded",
]


def guard_while_constrained(model: nn.Module) -> None:
    """Guard ``model.tie_weights()`` (it only checks that every tie holds) and
    ``model.resize_token_embeddings()`` (it raises) while an embedding of ``model`` is constrained,
    and make ``model.save_pretrained(..., state_dict=sd)`` write plain merged weights where ``sd``
    holds raw free-row entries (the ``Trainer`` under DeepSpeed ZeRO-3 saves DeepSpeed's
    consolidated state dict, named by Parameter); each guard removes itself once nothing is
    constrained. On a ``PeftModel`` the guards go on
    the transformers model inside it (which the ``PeftModel`` forwards those calls to), and its
    ``save_pretrained``, ``load_adapter`` and ``disable_adapter`` take the trained rows along
    (see :mod:`embconstraint.hf.adapters`; ``disable_adapter`` only where the base rows were
    recorded, by ``constrain_new_tokens`` or ``constrain_input_embeddings``)."""
    base = base_model_of(model)
    _guard(base, "tie_weights", _tie_weights_while_constrained)
    _guard(base, "resize_token_embeddings", _resize_while_constrained)
    _guard(base, "save_pretrained", _save_pretrained_merged)
    if base is not model:
        guard_peft_model(model)


def guard_peft_model(model: nn.Module, *, rows_off: bool = True) -> None:
    """The ``PeftModel`` hooks of :mod:`embconstraint.hf.adapters` (``rows_off``: ``disable_adapter``,
    ``add_adapter`` and ``set_adapter`` too)."""
    _guard(model, "save_pretrained", save_pretrained_with_rows)
    _guard(model, "load_adapter", load_adapter_with_rows)
    if rows_off:
        _guard(model, "disable_adapter", disable_adapter_with_rows)
        _guard(model, "add_adapter", add_adapter_with_rows)
        _guard(model, "set_adapter", set_adapter_with_rows)


FROZEN_NEW_ROWS = (
    "embconstraint: the model is training but the new rows of its input embedding do not (their Parameter "
    "has requires_grad=False). A PeftModel made around the constrained model (get_peft_model, or TRL's "
    "peft_config=) freezes every parameter but the adapter's: pass embconstraint.hf.SaveRowsCallback() to "
    "the trainer, which makes them trainable again, or call get_peft_model before constrain_new_tokens. "
    "(Frozen on purpose? Then ignore this warning; it is given once.)"
)
_WARNED: weakref.WeakSet = weakref.WeakSet()


def warn_when_new_rows_freeze(model: nn.Module) -> None:
    """Once, a warning when ``model`` trains (training mode, gradients on) while the new rows of its
    input embedding that ``constrain_new_tokens`` made trainable are frozen: a forward pre-hook on the
    input embedding (a no-op inside ``torch.compile``)."""
    embedding = base_model_of(model).get_input_embeddings()
    if _check_new_rows_train not in embedding._forward_pre_hooks.values():
        embedding.register_forward_pre_hook(_check_new_rows_train)


def _check_new_rows_train(module: nn.Module, args: Any) -> None:
    if not module.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    if module not in _WARNED and frozen_new_rows(module):
        _WARNED.add(module)
        warnings.warn(FROZEN_NEW_ROWS, UserWarning, stacklevel=2)


def adopt_peft_wrapper(model: nn.Module) -> bool:
    """A ``PeftModel`` made around a model already constrained through :mod:`embconstraint.hf` (TRL's
    ``SFTTrainer(model, peft_config=...)`` calls ``get_peft_model`` on the model it is given): PEFT froze
    every parameter but the adapter's, the new rows included, and its methods know nothing of them.
    Make the new rows that ``constrain_new_tokens`` made trainable trainable again, record them as they
    are now as the base model's (what ``disable_adapter()`` puts in) and install the ``PeftModel`` hooks,
    as if ``model`` had been constrained after ``get_peft_model``. Returns whether it did: ``False`` for
    another model, one constrained otherwise or one already hooked."""
    if not is_peft_model(model) or is_guarded(model, "disable_adapter") or not _constrained(model):
        return False
    if not is_guarded(base_model_of(model), "resize_token_embeddings"):
        return False  # constrained with embconstraint.constrain: the rows have no base values to switch to
    retrain_rows(model)
    record_base_rows(model, again=True)
    guard_peft_model(model)
    return True


def _constrained(model: nn.Module) -> bool:
    return any(is_constrained(m) for m in model.modules())


class _WhileConstrained:
    """Stands in for a model method (an instance attribute) while an embedding of the model is
    constrained; once nothing is constrained it removes itself and calls the method."""

    def __init__(self, model: nn.Module, name: str, action: Callable[..., Any]) -> None:
        self.model, self.name, self.action = model, name, action

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if _constrained(model):
            return self.action(model, *args, **kwargs)
        if model.__dict__.get(self.name) is self:
            del model.__dict__[self.name]
        return getattr(model, self.name)(*args, **kwargs)


def is_guarded(model: nn.Module, name: str) -> bool:
    """Whether ``model.<name>`` is one of these guards (or hooks)."""
    return isinstance(model.__dict__.get(name), _WhileConstrained)


def _guard(model: nn.Module, name: str, action: Callable[..., Any]) -> None:
    if callable(getattr(type(model), name, None)) and not isinstance(
        model.__dict__.get(name), _WhileConstrained
    ):
        model.__dict__[name] = _WhileConstrained(model, name, action)


def _split(name: str) -> tuple[str, str]:
    path, _, attr = name.rpartition(".")
    return path, attr


def _tie_weights_while_constrained(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """``model.tie_weights()`` while constrained: a check that every tie holds, since a tie to a
    constrained embedding is a parametrization and cannot be re-made by assignment."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    hint = (
        "call embconstraint.release(model) first, tie (or resize), then constrain the input embeddings again"
    )
    if not callable(expand):
        raise RuntimeError(f"model.tie_weights() is not supported while an embedding is constrained; {hint}")
    for target, source in _tied_keys(model, expand, hint).items():
        (tpath, tattr), (spath, sattr) = _split(target), _split(source)
        try:
            tmod, smod = model.get_submodule(tpath), model.get_submodule(spath)
        except AttributeError as err:
            raise RuntimeError(
                f"model.tie_weights(): cannot resolve {target} -> {source} ({err}); {hint}"
            ) from err
        if _tied(tmod, tattr, smod, sattr) or _tied(smod, sattr, tmod, tattr):
            continue  # one side already computes with the other's constrained tensor
        if pin_of(smod, sattr) is not None:
            problem = f"{target} does not compute with the constrained {source}"
        elif pin_of(tmod, tattr) is not None:
            problem = f"tying would replace the constrained {target}"
        elif getattr(tmod, tattr, None) is getattr(smod, sattr, object()):
            continue  # a tie unrelated to the constraint, which holds
        else:
            problem = f"{target} is not tied to {source}"
        raise RuntimeError(f"model.tie_weights() while an embedding is constrained: {problem}; {hint}")


def _tied_keys(model: nn.Module, expand: Callable[..., dict], hint: str) -> dict[str, str]:
    """transformers' tied-weight mapping. Its expansion looks names up among the parameters,
    where a constrained weight is ``...parametrizations.weight.original``; it fails then for a
    mapping it does not take as literal names (BERT's ``cls.predictions.bias``), whose
    ``_tied_weights_keys`` are used as they are."""
    try:
        return expand(all_submodels=True)
    except ValueError:
        pass
    literal = re.compile(r"[A-Za-z0-9_.]+")
    out: dict[str, str] = {}
    for prefix, sub in model.named_modules():
        mapping = getattr(sub, "_tied_weights_keys", None)
        if not isinstance(mapping, dict) or not getattr(
            getattr(sub, "config", None), "tie_word_embeddings", False
        ):
            continue
        if not all(literal.fullmatch(k) for k in (*mapping, *mapping.values())):
            raise RuntimeError(
                f"model.tie_weights(): cannot read the tied weights of {type(sub).__name__} while an "
                f"embedding is constrained; {hint}"
            )
        dot = f"{prefix}." if prefix else ""
        out.update({dot + k: dot + v for k, v in mapping.items()})
    return out


def _tied(module: nn.Module, name: str, owner: nn.Module, owner_name: str) -> bool:
    """Whether ``module.<name>`` is tied to the constrained ``owner.<owner_name>``."""
    tie = tie_of(module, name)
    return tie is not None and tie.pin is pin_of(owner, owner_name)


def _save_pretrained_merged(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``model.save_pretrained(...)``; a given ``state_dict`` is saved with its raw free-row entries
    merged into plain weights (:func:`embconstraint.merged_state_dict`)."""
    method = type(model).save_pretrained
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    state_dict = bound.arguments.get("state_dict")
    if isinstance(state_dict, Mapping):
        bound.arguments["state_dict"] = merged_state_dict(model, state_dict)
    return method(*bound.args, **bound.kwargs)


def _resize_while_constrained(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        "model.resize_token_embeddings() would replace the weight of a constrained embedding; "
        "call embconstraint.release(model) first, resize, then constrain the input embeddings again"
    )
