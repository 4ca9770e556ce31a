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


SYLLABLES = ["ka", "lo", "mi", "ra", "te", "su", "no", "bi", "ve", "do"]


def bpe_tokenizer_json(vocab_size: int = 60, seed: int = 0) -> str:
    """A BPE tokenizer backend trained in code on text of generated words (made of
    :data:`SYLLABLES`; special tokens ``<unk>``, ``<s>``, ``</s>``), serialized: nothing is downloaded."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(40)]
    text = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<s>", "</s>"]
    backend.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    )
    return backend.to_str()


def fast_tokenizer(backend_json: str, **special: str) -> transformers.PreTrainedTokenizerFast:
    """``backend_json`` (see :func:`bpe_tokenizer_json`) as a transformers fast tokenizer; ``special``
    adds or replaces special tokens (``pad_token="</s>"``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokens = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", **special}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend_json), **tokens)
