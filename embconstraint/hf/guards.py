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

from collections.abc import Callable
from typing import Any

from torch import nn

from .._mechanism import tie_of
from ..core import is_constrained

__all__ = ["guard_while_constrained"]


def guard_while_constrained(model: nn.Module) -> None:
    """Guard ``model.tie_weights()`` (it only checks that every tie holds) and
    ``model.resize_token_embeddings()`` (it raises) while an embedding of ``model`` is constrained;
    each guard removes itself once nothing is constrained."""
    _guard(model, "tie_weights", _tie_weights_while_constrained)
    _guard(model, "resize_token_embeddings", _resize_while_constrained)


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


def _guard(model: nn.Module, name: str, action: Callable[..., Any]) -> None:
    if callable(getattr(type(model), name, None)) and not isinstance(model.__dict__.get(name), _WhileConstrained):
        model.__dict__[name] = _WhileConstrained(model, name, action)


def _split(name: str) -> tuple[str, str]:
    path, _, attr = name.rpartition(".")
    return path, attr


def _tie_weights_while_constrained(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """``model.tie_weights()`` while constrained: a check that every tie holds, since a tie to a
    constrained embedding is a parametrization and cannot be re-made by assignment."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    hint = ("call embconstraint.release(model) first, tie (or resize), then constrain the input "
            "embeddings again")
    if not callable(expand):
        raise RuntimeError(f"model.tie_weights() is not supported while an embedding is constrained; {hint}")
    for target, source in expand(all_submodels=True).items():
        (tpath, tattr), (spath, sattr) = _split(target), _split(source)
        try:
            tmod, smod = model.get_submodule(tpath), model.get_submodule(spath)
        except AttributeError as err:
            raise RuntimeError(f"model.tie_weights(): cannot resolve {target} -> {source} ({err}); {hint}") from err
        if is_constrained(smod) and sattr == "weight":
            tie = tie_of(tmod, tattr)
            if tie is not None and tie.embedding is smod:
                continue  # the head already computes with the constrained weight
            problem = f"{target} does not compute with the constrained {source}"
        elif is_constrained(tmod) and tattr == "weight":
            problem = f"tying would replace the constrained {target}"
        elif getattr(tmod, tattr, None) is getattr(smod, sattr, object()):
            continue  # a tie unrelated to the constraint, which holds
        else:
            problem = f"{target} is not tied to {source}"
        raise RuntimeError(f"model.tie_weights() while an embedding is constrained: {problem}; {hint}")


def _resize_while_constrained(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        "model.resize_token_embeddings() would replace the weight of a constrained embedding; "
        "call embconstraint.release(model) first, resize, then constrain the input embeddings again"
    )
