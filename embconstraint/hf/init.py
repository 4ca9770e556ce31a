"""Give new tokens a good start: initialise their rows of the input embedding and of the output head.

:func:`init_new_tokens` writes, for each new token, its row of ``model.get_input_embeddings()``
and, for an untied head, its row (and bias entry) of ``model.get_output_embeddings()``, and
nothing else. Methods:

``"subwords"`` (default)
    the mean of the rows of the pieces the token's text splits into under the *old* tokenizer
    (for the head, the head's rows and bias entries of those pieces: the new token's logit is
    the mean of its pieces' logits).
``"ends"``
    from the same pieces, the ends of the word: the input row is the row of the *last* piece (in
    a causal model, what the model has just read when it predicts the next word), the head row
    and bias entry those of the *first* piece (the only piece predicted where the word starts;
    the later pieces' logits are low there). A tied table, one row for both, gets the mean of
    the first and the last piece's rows.
``"mean"``
    the mean of every old row; with ``covariance_scale=s > 0``, plus a sample of
    ``N(0, s * Sigma)``, Sigma the old rows' covariance (Hewitt's recipe is ``s = 1e-5``),
    drawn from a ``torch.Generator`` seeded with ``seed``.
``"description"``
    the mean of the rows of the pieces of a text given per token in ``descriptions`` (for chat
    markers or tool-call tokens, whose own text means nothing). A token with a description uses
    it whatever ``method`` says, so one call initialises domain words by their subwords and chat
    tokens by their descriptions; under ``method="ends"`` it takes the ends of its description
    (recorded as ``"description-ends"``), otherwise the mean of its pieces.

The old tokenizer (:mod:`.tokenizer`) is ``old_tokenizer`` when given (a copy taken before
``add_tokens``), else the tokenizer's own ``tokenizers`` backend without the tokens being
initialised (their added-token entries are removed from a copy; ``tokenizer`` itself is not
changed). "Old rows" are the rows of the tokens that old tokenizer knows; a piece that is its
unknown token is skipped. Rows that belong to no token (the padding rows of
``resize_token_embeddings(..., pad_to_multiple_of=...)``) are left as they are.

Everything is checked before anything is written. The weights may be plain or constrained
(:func:`embconstraint.hf.constrain_new_tokens`, any layout of free rows): writes go through
``weight[rows] = values`` under ``torch.no_grad()``, so pinned rows stay bitwise; a new token
whose row is pinned is refused. Works on a ``peft.PeftModel`` as on its base model.

This module imports neither ``transformers`` nor ``tokenizers``: it calls the model's and the
tokenizer's own methods.

>>> import torch
>>> from tokenizers import Tokenizer, models, pre_tokenizers
>>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
>>> vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4}
>>> backend = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="<unk>"))
>>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
>>> tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
>>> tok.add_tokens(["abc"])
1
>>> model = LlamaForCausalLM(LlamaConfig(vocab_size=5, hidden_size=8, intermediate_size=16,
...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
>>> _ = model.resize_token_embeddings(len(tok))
>>> [(t.token, t.row, t.pieces) for t in init_new_tokens(model, tok, ["abc"])]   # "abc" -> "ab" "c"
[('abc', 5, (4, 3))]
>>> emb = model.get_input_embeddings().weight
>>> torch.equal(emb[5], emb[[4, 3]].mean(0))
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._mechanism import pin_of, tie_of
from .tokenizer import old_tokenizer_of, pieces_of

__all__ = ["init_new_tokens", "InitializedToken", "METHODS"]

METHODS = ("subwords", "ends", "mean", "description")
Method = Literal["subwords", "ends", "mean", "description"]
_CHUNK = 64  # new rows drawn at once for the covariance sample (bounds a (chunk, old rows) buffer)


@dataclass(frozen=True)
class InitializedToken:
    """What :func:`init_new_tokens` wrote for one token.

    ``token``: the token's text; ``row``: its row (its id); ``method``: ``"subwords"``,
    ``"ends"``, ``"mean"``, ``"description"`` or ``"description-ends"``; ``text``: the text that was split (the token's
    own text, its description, or ``""`` for ``"mean"``); ``pieces``: its pieces' ids under the
    old tokenizer, in order (``()`` for ``"mean"``, which averages every old row).
    """

    token: str
    row: int
    method: str
    text: str
    pieces: tuple[int, ...]


def init_new_tokens(
    model: nn.Module,
    tokenizer: Any,
    new_tokens: Sequence[Any],
    *,
    method: Method = "subwords",
    descriptions: Mapping[str, str] | None = None,
    old_tokenizer: Any = None,
    covariance_scale: float = 0.0,
    seed: int = 0,
) -> list[InitializedToken]:
    """Initialise the rows of ``new_tokens`` in the input embedding and the output head.

    Call it after ``tokenizer.add_tokens(new_tokens)`` (or ``add_special_tokens``) and
    ``model.resize_token_embeddings(len(tokenizer), ...)``, before or after
    :func:`embconstraint.hf.constrain_new_tokens`. Each new token's row of
    ``model.get_input_embeddings()`` is written, and for an untied ``nn.Linear`` head its row and
    bias entry of ``model.get_output_embeddings()`` (a tied head is the embedding: written once).
    No other row changes, bitwise.

    Args:
        model: a ``transformers`` model or ``peft.PeftModel`` (anything whose
            ``get_input_embeddings()`` is an ``nn.Embedding``), resized to the new vocabulary.
        tokenizer: the tokenizer the tokens were added to (a ``transformers`` tokenizer).
        new_tokens: the added tokens (``str`` or ``tokenizers.AddedToken``), as given to
            ``add_tokens``; each must be known to ``tokenizer`` and not to the old tokenizer.
        method: ``"subwords"``, ``"ends"``, ``"mean"`` or ``"description"`` (see the module
            docstring), for every token without a description.
        descriptions: ``{token: text}``: these tokens are initialised from ``text``'s pieces (their
            mean; their ends under ``method="ends"``). Every key must be one of ``new_tokens``; with
            ``method="description"`` every token needs one.
        old_tokenizer: the tokenizer before the tokens were added (e.g. ``copy.deepcopy`` of it,
            or a ``tokenizers.Tokenizer``). Default: ``tokenizer``'s backend without
            ``new_tokens`` (needs a fast tokenizer). Pass it to have "not new" checked against
            the real old vocabulary.
        covariance_scale: with ``method="mean"``, add a sample of ``N(0, covariance_scale *
            Sigma)`` (Sigma: the old rows' covariance, normalised by their number) to each mean
            row; ``0`` (default) writes the mean itself. Hewitt's recipe: ``1e-5``.
        seed: seeds the ``torch.Generator`` of that sample.

    Returns:
        One :class:`InitializedToken` per token, in the order of ``new_tokens``.

    Raises:
        TypeError: a model without an ``nn.Embedding`` input embedding, an output head neither
            tied nor an ``nn.Linear``, a tokenizer without a vocabulary, arguments of the wrong type.
        ValueError: a token the tokenizer does not know, a token that is not new (the old
            tokenizer knows it), a row beyond the model's rows (not resized), a pinned row, a
            text that splits into no old piece, a description for a token not being added, a
            token without a description under ``method="description"``. Nothing is written.

    >>> import torch
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    >>> from embconstraint.hf import constrain_new_tokens
    >>> backend = Tokenizer(models.WordLevel({"<unk>": 0, "start": 1, "of": 2, "turn": 3}, unk_token="<unk>"))
    >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=4))
    >>> tok.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    1
    >>> _ = model.resize_token_embeddings(len(tok))
    >>> _ = constrain_new_tokens(model, 4)                  # before or after: pinned rows stay bitwise
    >>> done = init_new_tokens(model, tok, ["<|turn|>"], descriptions={"<|turn|>": "start of turn"})
    >>> done[0].method, done[0].pieces
    ('description', (1, 2, 3))
    >>> w = model.get_input_embeddings().weight
    >>> torch.equal(w[4], w[1:4].mean(0))
    True
    """
    embedding, head, tied = _tables(model)
    tokens = _token_texts(new_tokens)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    descriptions = _descriptions(descriptions, tokens, method)
    if (
        isinstance(covariance_scale, bool)
        or not isinstance(covariance_scale, (int, float))
        or not math.isfinite(covariance_scale)
        or covariance_scale < 0
    ):
        raise ValueError(f"covariance_scale must be a finite number >= 0, got {covariance_scale!r}")
    if covariance_scale and method != "mean":
        raise ValueError(f"covariance_scale applies to method='mean' only, got method={method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    rows = _rows(tokenizer, tokens, embedding.num_embeddings)
    old = old_tokenizer_of(tokenizer, old_tokenizer, tokens, rows)
    _check_not_pinned(embedding, head, tokens, rows)
    new_rows = set(rows)
    plan: list[InitializedToken] = []
    for token, row in zip(tokens, rows, strict=True):
        if token in descriptions or method != "mean":
            how = (
                method
                if token not in descriptions
                else "description-ends"
                if method == "ends"
                else "description"
            )
            text = descriptions.get(token, token)
            plan.append(
                InitializedToken(
                    token,
                    row,
                    how,
                    text,
                    pieces_of(old, token, text, how, new_rows, embedding.num_embeddings),
                )
            )
        else:
            plan.append(InitializedToken(token, row, "mean", "", ()))
    old_rows = sorted(i for i in old.ids if i < embedding.num_embeddings and i not in new_rows)
    if not old_rows and any(p.method == "mean" for p in plan):
        raise ValueError("method='mean': the old tokenizer knows no row of the model besides the new tokens")

    generator = torch.Generator().manual_seed(seed)
    writes = [(embedding, "weight")]
    (values,) = _values(
        [embedding.weight.detach()], "tied" if tied else "input", plan, old_rows, covariance_scale, generator
    )
    results = [values]
    if head is not None:
        names = ["weight"] + (["bias"] if head.bias is not None else [])
        writes += [(head, name) for name in names]
        results += _values(
            [getattr(head, name).detach() for name in names],
            "head",
            plan,
            old_rows,
            covariance_scale,
            generator,
        )
    index = torch.tensor(rows, dtype=torch.long)
    with torch.no_grad():
        for (module, name), values in zip(writes, results, strict=True):
            target = getattr(module, name)
            target[index.to(target.device)] = values.to(device=target.device, dtype=target.dtype)
    return plan


def _tables(model: Any) -> tuple[nn.Embedding, nn.Linear | None, bool]:
    """The input embedding, the untied output head (None when tied or absent), and whether a head
    is tied to the embedding."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        raise TypeError(
            f"model must have a get_input_embeddings() method (a transformers model), "
            f"got {type(model).__name__}"
        )
    embedding = getter()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(
            f"model.get_input_embeddings() must return an nn.Embedding, got {type(embedding).__name__}"
        )
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None:
        return embedding, None, False
    tie = tie_of(head, "weight")
    if (
        head is embedding
        or getattr(head, "weight", None) is embedding.weight
        or (tie is not None and tie.embedding is embedding)
    ):
        return embedding, None, True
    if not isinstance(head, nn.Linear):
        raise TypeError(
            "model.get_output_embeddings() must be an nn.Linear or share the input embedding's "
            f"weight, got {type(head).__name__}"
        )
    if head.weight.shape[0] != embedding.num_embeddings:
        raise ValueError(
            f"model.get_output_embeddings() has {head.weight.shape[0]} rows but the input "
            f"embeddings have {embedding.num_embeddings}; resize both (model.resize_token_embeddings) first"
        )
    return embedding, head, False


def _token_texts(new_tokens: Any) -> list[str]:
    if isinstance(new_tokens, (str, bytes)) or not isinstance(new_tokens, Sequence):
        raise TypeError(
            "new_tokens must be a list of tokens (str or tokenizers.AddedToken), "
            f"got {type(new_tokens).__name__}"
        )
    texts = []
    for t in new_tokens:
        text = t if isinstance(t, str) else getattr(t, "content", None)
        if not isinstance(text, str):
            raise TypeError(f"new_tokens must hold str or tokenizers.AddedToken, got {type(t).__name__}")
        texts.append(text)
    if not texts:
        raise ValueError("new_tokens is empty: nothing to initialise")
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise ValueError(f"new_tokens must be distinct, got {repeated} more than once")
    return texts


def _descriptions(descriptions: Any, tokens: list[str], method: str) -> dict[str, str]:
    if descriptions is None:
        descriptions = {}
    if not isinstance(descriptions, Mapping):
        raise TypeError(f"descriptions must be a mapping {{token: text}}, got {type(descriptions).__name__}")
    for key, text in descriptions.items():
        if not isinstance(key, str) or not isinstance(text, str):
            raise TypeError(f"descriptions must map str to str, got {key!r}: {type(text).__name__}")
    stray = [k for k in descriptions if k not in tokens]
    if stray:
        raise ValueError(f"descriptions name tokens that are not being added: {stray} (new_tokens: {tokens})")
    if method == "description":
        missing = [t for t in tokens if t not in descriptions]
        if missing:
            raise ValueError(f"method='description' needs a description for every token; missing: {missing}")
    return dict(descriptions)


def _rows(tokenizer: Any, tokens: list[str], num_rows: int) -> list[int]:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer (with get_vocab()), got {type(tokenizer).__name__}"
        )
    vocab = get_vocab()
    unknown = [t for t in tokens if t not in vocab]
    if unknown:
        raise ValueError(f"the tokenizer does not know {unknown}; add them first (tokenizer.add_tokens)")
    rows = [vocab[t] for t in tokens]
    beyond = [(t, r) for t, r in zip(tokens, rows, strict=True) if r >= num_rows]
    if beyond:
        raise ValueError(
            f"the model's input embeddings have {num_rows} rows but {beyond} (token, id) lie beyond; "
            "call model.resize_token_embeddings(len(tokenizer)) first"
        )
    return rows


def _check_not_pinned(
    embedding: nn.Embedding, head: nn.Linear | None, tokens: list[str], rows: list[int]
) -> None:
    for module, what in ((embedding, "input embeddings"), (head, "output head")):
        pin = pin_of(module) if module is not None else None
        if pin is None:
            continue
        pinned = set(pin.pinned_rows().tolist())
        hit = [(t, r) for t, r in zip(tokens, rows, strict=True) if r in pinned]
        if hit:
            raise ValueError(
                f"the rows of {hit} (token, row) are pinned in the {what}: they are old rows, not "
                "new ones (constrain_new_tokens(model, old_vocab_size) frees the new rows)"
            )


def _values(
    tables: list[Tensor],
    role: str,
    plan: list[InitializedToken],
    old_rows: list[int],
    covariance_scale: float,
    generator: torch.Generator,
) -> list[Tensor]:
    """The new rows of each ``(V, ...)`` table (a weight, a head's bias; ``role``: "input", "head"
    or "tied"), in float32 or wider: each the mean of its pieces' rows (for "ends", the pieces
    :func:`_ends` picks), or of the old rows plus the covariance sample (one draw shared by the
    tables: a head's weight row and bias entry are sampled jointly)."""
    mean_at = [i for i, p in enumerate(plan) if p.method == "mean"]
    n = len(old_rows)
    dtypes = [torch.promote_types(t.dtype, torch.float32) for t in tables]
    outs = [
        torch.empty(len(plan), *t.shape[1:], dtype=d, device=t.device)
        for t, d in zip(tables, dtypes, strict=True)
    ]
    olds, centers = [], []
    if mean_at:
        for table, dtype, out in zip(tables, dtypes, outs, strict=True):
            old = (
                table[:n]
                if old_rows == list(range(n))
                else table[torch.tensor(old_rows, device=table.device)]
            )
            olds.append(old.reshape(n, -1))
            centers.append(old.mean(0, dtype=dtype))
            out[mean_at] = centers[-1]
    # x = mean + sqrt(s / n) * (olds - mean)^T z, z ~ N(0, I_n): covariance s * Sigma exactly, also when
    # Sigma is singular (n <= D), without building a (D, D) matrix. z is drawn in float64 on the CPU,
    # _CHUNK new rows at a time, so a seed gives the same sample on any device and dtype.
    for start in range(0, len(mean_at) if covariance_scale else 0, _CHUNK):
        at = mean_at[start : start + _CHUNK]
        z = torch.randn(len(at), n, generator=generator, dtype=torch.float64)
        for old, center, dtype, out in zip(olds, centers, dtypes, outs, strict=True):
            zc = z.to(device=old.device, dtype=dtype)
            sample = zc @ old.to(dtype) - zc.sum(1, keepdim=True) * center.reshape(1, -1)
            out[at] = center + math.sqrt(covariance_scale / n) * sample.reshape(len(at), *center.shape)
    for i, p in enumerate(plan):
        if p.method != "mean":
            rows = _ends(p.pieces, role) if p.method.endswith("ends") else list(p.pieces)
            for table, dtype, out in zip(tables, dtypes, outs, strict=True):
                out[i] = table[rows].mean(0, dtype=dtype)
    return outs


def _ends(pieces: tuple[int, ...], role: str) -> list[int]:
    """The pieces method "ends" averages: the last (the input embedding: what the model reads
    before predicting the next word), the first (the head: the only piece predicted where the
    word starts), both (one tied table)."""
    first, last = pieces[0], pieces[-1]
    return [last] if role == "input" else [first] if role == "head" else sorted({first, last})
