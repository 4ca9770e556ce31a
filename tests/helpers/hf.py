"""Tiny transformers models for the tests (built from a config: nothing is downloaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers


def tiny_llama_config(
    vocab_size: int, hidden_size: int, *, tied: bool, **overrides: Any
) -> transformers.LlamaConfig:
    """A one-layer Llama config: 2 attention heads (2 key/value heads), an MLP twice as wide as
    ``hidden_size``; ``overrides`` replace any field or add one (token ids, more layers...)."""
    import transformers  # (here: a test module that skips without transformers imports this one)

    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "tie_word_embeddings": tied,
    }
    return transformers.LlamaConfig(**{**fields, **overrides})
