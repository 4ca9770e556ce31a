"""Add domain words and chat tokens to a model, give them a good start, train only them.

Everything is built in code (nothing is downloaded): a byte-level BPE tokenizer trained on
generated "general" text (``tokenizers``, wrapped in ``PreTrainedTokenizerFast``) and a tiny
untied Llama pretrained for a few seconds on general and domain text, which it reads as pieces.
Then the whole recipe:

1. ``tokenizer.add_tokens`` for the domain words, ``add_special_tokens`` for the chat markers;
2. ``model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)``;
3. ``init_new_tokens``: the domain words from their pieces under the old tokenizer, the chat
   markers from a short description each (their own text, ``<|user|>``, means nothing);
4. ``constrain_new_tokens``: the old rows of the embedding and the head are pinned, only the new
   rows train (a few steps of AdamW on chat-formatted domain text);
5. ``release``, ``save_pretrained`` (model and tokenizer), reload with the ``Auto`` classes.

It prints the held-out loss (nats per word) under the old tokenization, and with the new tokens
after ``resize_token_embeddings``' default, after ``init_new_tokens`` and after training.

Run: ``python examples/new_tokens_init.py [OUTPUT_DIR]`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from embconstraint import release
from embconstraint.hf import constrain_new_tokens, init_new_tokens

GENERAL = [
    "the",
    "a",
    "cell",
    "plant",
    "light",
    "water",
    "makes",
    "uses",
    "needs",
    "green",
    "small",
    "energy",
    "leaf",
    "sun",
    "grows",
    "in",
    "with",
    "and",
    "of",
    "root",
]
DOMAIN = ["chlorophyll", "photosynthesis", "mitochondria", "stomata"]  # frequent here, several pieces each
CHAT = {
    "<|user|>": "user:",
    "<|assistant|>": " assistant:",
}  # chat markers, described by the plain-text turns


def sentence(rng: random.Random, domain: bool) -> str:
    words = rng.choices(GENERAL, k=5)
    if domain:
        words[rng.randrange(5)] = rng.choice(DOMAIN)
    return " ".join(words)


def chat(rng: random.Random, markers: bool = True) -> str:
    """A domain exchange: with the chat markers, or as a plain-text transcript (pretraining)."""
    user, assistant = CHAT if markers else [text.strip() for text in CHAT.values()]
    return f"{user} {sentence(rng, True)} {assistant} {sentence(rng, True)}"


def make_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([sentence(rng, False) for _ in range(500)], trainer)  # general text only
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(["<s>" + t for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    return {**enc, "labels": enc.input_ids.masked_fill(enc.attention_mask == 0, -100)}


def nats_per_word(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    data = batch(tokenizer, texts)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), data["labels"][:, 1:].flatten(), reduction="sum"
    )
    return nll.item() / sum(len(t.split()) for t in texts)


def train(model: LlamaForCausalLM, params: list[torch.Tensor], batches: list[dict], lr: float) -> None:
    opt = torch.optim.AdamW(params, lr=lr)
    for data in batches:
        opt.zero_grad()
        model(**data).loss.backward()
        opt.step()
    opt.zero_grad()  # no stale gradient survives resize_token_embeddings (which swaps the weights' data)


def main(output_dir: Path) -> None:
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    rng = random.Random(0)
    torch.manual_seed(0)
    tokenizer = make_tokenizer(rng)
    old_vocab, old_tokenizer = len(tokenizer), copy.deepcopy(tokenizer)
    print("old tokenization:", {w: tokenizer.tokenize(" " + w) for w in DOMAIN[:2]})
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=old_vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    train(
        model,
        list(model.parameters()),
        [
            batch(tokenizer, [chat(rng, False) if i % 2 else sentence(rng, False) for _ in range(16)])
            for i in range(150)
        ],
        3e-3,
    )
    held_out = [chat(rng) for _ in range(32)]  # as the old model saw them: the markers as plain-text turns
    old_text = [t.replace("<|user|>", "user:").replace("<|assistant|>", "assistant:") for t in held_out]
    print(
        f"held-out loss, old tokenization:          {nats_per_word(model, tokenizer, old_text):.3f} nats/word"
    )

    # 1-2. Add the tokens (with the leading space: a byte-level tokenizer sees " word" inside text), resize.
    new_words = [" " + w for w in DOMAIN]
    tokenizer.add_tokens(new_words)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT)})
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)  # transformers' default init
    print(
        f"held-out loss, new tokens, resize default: {nats_per_word(model, tokenizer, held_out):.3f} nats/word"
    )

    # 3. Initialise: one call, domain words from their pieces, chat markers from their descriptions.
    #    Initialising costs no training: try each method on a copy and keep the best start.
    old_rows = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = {}
    for method in ("subwords", "ends", "mean"):
        trial = copy.deepcopy(model)
        init_new_tokens(trial, tokenizer, new_words + list(CHAT), method=method, descriptions=CHAT)
        start[method] = nats_per_word(trial, tokenizer, held_out)
        print(f"held-out loss, new tokens, {method + ':':<16}{start[method]:.3f} nats/word")
    best = min(start, key=start.get)
    report = init_new_tokens(model, tokenizer, new_words + list(CHAT), method=best, descriptions=CHAT)
    for t in report:
        print(
            f"  row {t.row}: {t.token!r} <- {t.method} of {old_tokenizer.convert_ids_to_tokens(list(t.pieces))}"
        )

    # 4. Train only the new rows: the old ones are pinned in the embedding and in the head.
    model.requires_grad_(False)
    new_rows = constrain_new_tokens(model, old_vocab)
    train(model, new_rows, [batch(tokenizer, [chat(rng) for _ in range(16)]) for _ in range(40)], 1e-2)
    print(
        f"held-out loss, new tokens, 40 steps:       {nats_per_word(model, tokenizer, held_out):.3f} nats/word"
    )
    same = all(
        torch.equal(p[:old_vocab], old_rows[n][:old_vocab])
        for n, p in [
            ("model.embed_tokens.weight", model.get_input_embeddings().weight),
            ("lm_head.weight", model.get_output_embeddings().weight),
        ]
    )
    print(f"old rows bitwise equal after training: {same}")

    # 5. Save the model and the tokenizer, reload both with the Auto classes.
    release(model)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    again, tokenizer_again = (
        AutoModelForCausalLM.from_pretrained(output_dir),
        AutoTokenizer.from_pretrained(output_dir),
    )
    weights = all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in model.named_parameters())
    text = held_out[0]
    tokens = tokenizer_again.tokenize(text) == tokenizer.tokenize(text)
    print(f"  {tokenizer_again.tokenize(text)[:6]} ...")
    print(f"reloaded: same weights, same tokenization: {weights and tokens}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "output_dir", nargs="?", type=Path, help="where to write (default: a temporary directory)"
    )
    out = parser.parse_args().output_dir
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        main(out)
