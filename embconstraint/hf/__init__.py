"""Hugging Face ``transformers`` integration: constrain a model's input embeddings.

:func:`constrain_input_embeddings` pins rows of ``model.get_input_embeddings()`` and keeps
an output head that shares the embedding's Parameter (``tie_word_embeddings=True``) tied:
the head computes with the constrained (merged) weight, so pinned rows stay exact on both
sides. :func:`embconstraint.release` undoes it and re-ties the head to one plain Parameter,
after which ``save_pretrained`` / ``from_pretrained`` behave as for any model.

This module does not import ``transformers``: it only calls the model's own methods.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> from embconstraint import release
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10,
...                                    bos_token_id=0, eos_token_id=0))
>>> old = model.get_input_embeddings().weight.detach().clone()
>>> _ = model.resize_token_embeddings(12)          # two new tokens
>>> emb = constrain_input_embeddings(model, 10)    # rows 0..9 pinned to their current values
>>> [tuple(p.shape) for p in emb.parameters()]     # only the new rows are trainable
[(2, 8)]
>>> torch.equal(model.lm_head.weight[:10], old)   # the tied head computes with the merged weight
True
>>> _ = release(model)
>>> model.lm_head.weight is model.get_input_embeddings().weight
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .._mechanism import check_constrain_args, gathered, pin_of
from ..core import Indices, Reference, check_constrain
from .adapters import ROWS_FILE, is_peft_model, peft_wrapper_problem, record_base_rows, record_trained_rows
from .guards import guard_while_constrained, warn_when_new_rows_freeze
from .init import InitializedToken, init_new_tokens

if TYPE_CHECKING:  # pragma: no cover - typing only; transformers is an optional extra
    from transformers import PreTrainedModel

__all__ = [
    "constrain_input_embeddings",
    "constrain_new_tokens",
    "SaveRowsCallback",
    "ROWS_FILE",
    "init_new_tokens",
    "InitializedToken",
]  # noqa: F822 (lazy)


def constrain_input_embeddings(
    model: PreTrainedModel | nn.Module,
    reference: Reference | int,
    *,
    indices: Indices = None,
) -> nn.Embedding:
    """Pin rows of ``model.get_input_embeddings()``; a tied output head stays tied.

    Same semantics as :func:`embconstraint.constrain` (the embedding is constrained in place
    and returned; only its free rows remain trainable), plus: every module of ``model`` that
    shares the embedding's Parameter (the output head of a model with
    ``tie_word_embeddings=True``) is re-parametrized to compute with the merged weight, and
    ``model.tie_weights()`` / ``model.resize_token_embeddings()`` are guarded while the
    constraint is on (``tie_weights`` only checks that the ties still hold; resizing raises).
    :func:`embconstraint.release` (on ``model``) removes the constraint and re-ties the head.

    Args:
        model: a ``transformers`` model, or any ``nn.Module`` with ``get_input_embeddings()``
            returning an ``nn.Embedding``.
        reference: the pinned rows' values, an ``(n, D)`` tensor or an embedding; or an ``int``
            ``n``: pin the first ``n`` rows to their current values (after
            ``resize_token_embeddings``, those are the old vocabulary's rows, copied exactly).
        indices: ``n`` distinct rows at which to pin the reference rows (default: the first
            ``n``). Only with a tensor/embedding ``reference``.

    Returns:
        The constrained input embedding.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12,
    ...                                    bos_token_id=0, eos_token_id=0))
    >>> ref = torch.zeros(2, 8)
    >>> emb = constrain_input_embeddings(model, ref, indices=[3, 7])
    >>> bool((model.lm_head.weight[[3, 7]] == 0).all())
    True
    """
    with gathered(*_embedding_modules(model)):  # built under deepspeed.zero.Init: the whole weights, once
        return _constrain_input_embeddings(model, reference, indices)


def _constrain_input_embeddings(
    model: nn.Module, reference: Reference | int, indices: Indices
) -> nn.Embedding:
    embedding = _input_embeddings(model)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if (
        getattr(getattr(head, "base_layer", None), "weight", None) is embedding.weight
    ):  # a tied head PEFT wraps
        raise ValueError(peft_wrapper_problem(head, "model.get_output_embeddings()"))
    if isinstance(reference, bool) or not isinstance(reference, (int, Tensor, nn.Embedding, nn.EmbeddingBag)):
        raise TypeError(
            "reference must be an int (number of leading rows to pin at their current values), "
            f"an (n, D) tensor or an nn.Embedding, got {type(reference).__name__}"
        )
    if isinstance(reference, int):
        num_rows = embedding.num_embeddings
        if indices is not None:
            raise ValueError(
                "reference=int pins the first n rows; to pin other rows pass their values, "
                "e.g. reference=embedding.weight[indices].detach(), with indices=indices"
            )
        if not 0 <= reference <= num_rows:
            raise ValueError(
                f"reference (number of pinned rows) must lie in [0, {num_rows}], got {reference}"
            )
        reference = embedding.weight.detach()[:reference]
    check_constrain(embedding, reference, root=model, indices=indices).apply()
    _after_constraining(model)
    return embedding


def _after_constraining(model: nn.Module) -> None:
    """The guards; which new rows are trainable (what a ``PeftModel`` made around ``model`` later makes
    trainable again: :func:`~embconstraint.hf.guards.adopt_peft_wrapper`); on a ``PeftModel``, the hooks,
    and the new rows' values now (what ``disable_adapter()`` puts in: a copy of the free rows)."""
    guard_while_constrained(model)
    record_trained_rows(model)
    warn_when_new_rows_freeze(model)
    if is_peft_model(model):
        record_base_rows(model)


def _embedding_modules(model: Any) -> list[nn.Module]:
    """The input and output embeddings of ``model``, where it has them (for :func:`gathered`;
    what is wrong with them is reported by the function that constrains them)."""
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except Exception:  # noqa: BLE001 (reported, with its own message, by the caller)
            continue
        if isinstance(module, nn.Module):
            modules.append(module)
    return modules


def _input_embeddings(model: Any) -> nn.Embedding:
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(
            "model must have a get_input_embeddings() method (a transformers PreTrainedModel), "
            f"got {type(model).__name__}"
        )
    try:
        embedding = model.get_input_embeddings()
    except NotImplementedError as err:
        raise TypeError(f"model {type(model).__name__} does not expose its input embeddings: {err}") from err
    problem = peft_wrapper_problem(embedding, "model.get_input_embeddings()")
    if problem is not None:
        raise ValueError(problem)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(
            f"model.get_input_embeddings() must return an nn.Embedding, got {type(embedding).__name__}"
        )
    return embedding


def constrain_new_tokens(
    model: PreTrainedModel | nn.Module,
    old_vocab_size: int,
    *,
    indices: Indices = None,
) -> list[nn.Parameter]:
    """After ``model.resize_token_embeddings(...)``: train the new tokens' rows only.

    Pins the first ``old_vocab_size`` rows (or the rows ``indices``) of the input embeddings and
    of ``model.get_output_embeddings()`` at their current values. A tied head stays tied (it
    computes with the constrained embedding); an untied ``nn.Linear`` head gets its own pinned
    rows and, if it has a bias, pinned bias entries. Sets ``requires_grad=True`` on the new-row
    parameters (and on nothing else) and returns them: one ``(k, D)`` block for a tied model,
    the embedding's and the head's for an untied one (plus the head's free bias entries).
    Works on a ``peft.PeftModel`` (e.g. LoRA, which freezes the base model) as on the base
    model. :func:`embconstraint.release` (on ``model``) undoes it. Under DeepSpeed ZeRO-3 (a model
    loaded or resized under ``deepspeed.zero.Init``) every rank calls it: the embeddings are gathered
    for the time it takes. On a model transformers loaded with tensor parallelism
    (``from_pretrained(..., tp_plan="auto")``: the vocabulary sharded) every rank calls it too, and
    constrains its own rows.

    Args:
        model: a ``transformers`` model (or ``PeftModel``) whose embeddings were resized.
        old_vocab_size: the number of rows to keep (``0 <= old_vocab_size <= V``).
        indices: ``old_vocab_size`` distinct rows to keep instead of the first ones.

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    >>> model = LlamaForCausalLM(cfg)
    >>> _ = model.resize_token_embeddings(12)
    >>> [tuple(p.shape) for p in constrain_new_tokens(model, 10)]
    [(2, 8), (2, 8)]
    """
    with gathered(*_embedding_modules(model)):  # built under deepspeed.zero.Init: the whole weights, once
        return _constrain_new_tokens(model, old_vocab_size, indices)


def _constrain_new_tokens(model: nn.Module, old_vocab_size: int, indices: Indices) -> list[nn.Parameter]:
    embedding = _input_embeddings(model)
    if isinstance(old_vocab_size, bool) or not isinstance(old_vocab_size, int):
        raise TypeError(f"old_vocab_size must be an int, got {type(old_vocab_size).__name__}")
    num_rows = embedding.num_embeddings
    if not 0 <= old_vocab_size <= num_rows:
        raise ValueError(f"old_vocab_size must lie in [0, {num_rows}], got {old_vocab_size}")
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    problem = peft_wrapper_problem(head, "model.get_output_embeddings()")
    if problem is not None:
        raise ValueError(problem)
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    if head is not None and not tied and not isinstance(head, nn.Linear):
        raise TypeError(
            "model.get_output_embeddings() must be an nn.Linear or share the input embedding's weight, "
            f"got {type(head).__name__}"
        )

    if head is not None and not tied and head.weight.shape[0] != num_rows:
        raise ValueError(
            f"model.get_output_embeddings() has {head.weight.shape[0]} rows but the input embeddings have "
            f"{num_rows}; resize both (model.resize_token_embeddings) first"
        )
    _, rows = check_constrain_args(embedding, embedding.weight.detach()[:old_vocab_size], indices, "error")

    def _reference(weight: Tensor) -> Tensor:
        weight = weight.detach()
        return weight[:old_vocab_size] if rows is None else weight.index_select(0, rows.to(weight.device))

    # everything is checked (the head too, and who shares its tensors) before anything changes
    plans = [check_constrain(embedding, _reference(embedding.weight), indices=rows, root=model)]
    if head is not None and not tied:
        plans.append(check_constrain(head, _reference(head.weight), indices=rows, root=model))
    modules = [plan.apply() for plan in plans]
    params = [
        pin.free_parameter
        for m in modules
        for name in list(m.parametrizations.keys())
        if (pin := pin_of(m, name)) is not None
    ]
    for p in params:
        p.requires_grad_(True)
    _after_constraining(model)
    return params


def __getattr__(name: str) -> Any:
    # SaveRowsCallback subclasses transformers.TrainerCallback: imported on first use only.
    if name == "SaveRowsCallback":
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'embconstraint.hf' has no attribute {name!r}")
