"""The old tokenizer of :func:`~embconstraint.hf.init_new_tokens`: the tokenizer as it was before the new
tokens were added, and the old pieces a new token's text (or its description) splits into under it.

It is ``old_tokenizer`` when given, else a copy of the tokenizer's ``tokenizers`` backend without the
new tokens' added-token entries (the tokenizer itself is not changed). Like :mod:`.init`, it imports
neither ``transformers`` nor ``tokenizers``: it calls the tokenizer's own methods.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OldTokenizer", "old_tokenizer_of", "pieces_of"]


@dataclass(frozen=True)
class OldTokenizer:
    """The tokenizer before the new tokens were added: how it splits a text, and the ids it knows."""

    encode: Callable[[str], list[int]]
    ids: frozenset[int]  # every id it knows
    unk: int | None


def old_tokenizer_of(tokenizer: Any, old_tokenizer: Any, tokens: list[str], rows: list[int]) -> OldTokenizer:
    """``old_tokenizer`` (checked to know none of ``tokens``), else ``tokenizer``'s backend without the
    added tokens at ``rows``; raises (``TypeError``, ``ValueError``) before anything changes."""
    if old_tokenizer is not None:
        encode = getattr(old_tokenizer, "encode", None)
        if not callable(encode) or not callable(getattr(old_tokenizer, "get_vocab", None)):
            raise TypeError(
                "old_tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, "
                f"got {type(old_tokenizer).__name__}"
            )
        vocab = old_tokenizer.get_vocab()
        known = [t for t in tokens if t in vocab]
        if known:
            raise ValueError(f"{known} are not new: old_tokenizer already knows them")
        return OldTokenizer(_encoder(old_tokenizer), frozenset(vocab.values()), _unk_id(old_tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} has no tokenizers backend (a slow tokenizer): "
            "pass old_tokenizer, the tokenizer as it was before add_tokens"
        )
    base = backend.get_vocab(with_added_tokens=False)
    in_base = [t for t in tokens if t in base]
    if in_base:
        raise ValueError(f"{in_base} are not new: they are in the tokenizer's base vocabulary")
    state = json.loads(backend.to_str())
    new_rows = set(rows)
    state["added_tokens"] = [t for t in state.get("added_tokens", []) if t["id"] not in new_rows]
    old = type(backend).from_str(json.dumps(state))
    old.no_truncation()
    old.no_padding()
    return OldTokenizer(
        _encoder(old), frozenset(old.get_vocab(with_added_tokens=True).values()), _unk_id(tokenizer)
    )


def _encoder(tok: Any) -> Callable[[str], list[int]]:
    def encode(text: str) -> list[int]:
        out = tok.encode(text, add_special_tokens=False)
        return list(getattr(out, "ids", out))

    return encode


def _unk_id(tok: Any) -> int | None:
    unk = getattr(tok, "unk_token_id", None)  # a transformers tokenizer
    if unk is None and callable(getattr(tok, "token_to_id", None)):  # a tokenizers.Tokenizer
        name = getattr(getattr(tok, "model", None), "unk_token", None)
        unk = tok.token_to_id(name) if name else None
    return unk


def pieces_of(
    old: OldTokenizer, token: str, text: str, how: str, new_rows: set[int], num_rows: int
) -> tuple[int, ...]:
    """The old ids ``text`` (``token``'s own text or its description) splits into, the unknown token
    skipped; refuses (``ValueError``) a text of no old piece, or of new rows or rows beyond the model's."""
    what = f"the description of {token!r}" if how.startswith("description") else f"the text of {token!r}"
    if not text:
        raise ValueError(f"{what} is empty: it splits into no old token")
    ids = [i for i in old.encode(text) if i != old.unk]
    if not ids:
        raise ValueError(
            f"{what} ({text!r}) splits into no old token under the old tokenizer (nothing, or only "
            "the unknown token)"
        )
    bad = sorted({i for i in ids if i in new_rows or i >= num_rows})
    if bad:
        raise ValueError(
            f"{what} ({text!r}) splits into ids {bad}, which are new rows or beyond the model's rows: "
            "is old_tokenizer the tokenizer as it was before add_tokens?"
        )
    return tuple(ids)
