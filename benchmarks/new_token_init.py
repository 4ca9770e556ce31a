"""New tokens that start well: how each initialisation of the new rows starts and trains.

A generated language and a tiny Llama, all built in the process (nothing is downloaded):

* **The language.** Words are syllables (consonant + vowel) plus a class suffix (nouns end in
  ``-ra``, verbs in ``-ki``, adjectives in ``-lu``); sentences follow ``F [A] N V F [A] N``, with
  word-to-word affinities (each noun prefers a few verbs and adjectives, each verb a few objects).
  *General* text uses general words (Zipf frequencies). *Domain* text is the same language where
  the most frequent general words are mostly replaced by domain words: jargon, 3-4 syllables long,
  that stands for them (the domain word behaves as its general word does).
* **The tokenizer**: a byte-level BPE (``tokenizers``) trained on general text only, wrapped in
  ``PreTrainedTokenizerFast``: frequent general words are single tokens, domain words take 3-5
  pieces.
* **The model**: a ``LlamaForCausalLM`` (untied head) pretrained on general and domain text under
  that tokenization: it knows the domain words as piece sequences.
* **New tokens**: the domain words are added (``add_tokens``, content with the leading space, as a
  byte-level tokenizer sees a word inside text); ``resize_token_embeddings``; the new rows are
  initialised by each method; then only the new rows train (``constrain_new_tokens``; AdamW) on
  domain text under the new tokenization.

Methods: ``random`` (``resize_token_embeddings(mean_resizing=False)``: N(0, initializer_range)),
``hf-default`` (``resize_token_embeddings()``'s default: the old mean plus a 1e-9-scaled covariance
sample), and ``init_new_tokens``' ``mean``, ``subwords``, ``ends`` and ``description`` (the
description of a domain word is the general word it stands for, which this language guarantees).

Reported: the loss of held-out domain text in nats per word (total negative log-likelihood of each
text divided by its number of words: comparable across tokenizations) at step 0 and along the
training, next to the same text's loss under the old tokenization (the pretrained model on the
pieces): what a perfect start would reproduce.

Run from the repository root::

    python -m benchmarks.new_token_init --plot docs/new_token_init.png   # 3 seeds, 2 processes
    python -m benchmarks.new_token_init --tied          # a tied head (one table)
    python -m benchmarks.new_token_init --quick         # 1 seed, shorter: a smoke test

Seeds run in parallel processes (``--workers``, default 2), each with ``--threads`` (default 1)
torch threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from benchmarks.harness import machine_info
from embconstraint.hf import constrain_new_tokens, init_new_tokens

METHODS = ("random", "hf-default", "mean", "subwords", "ends", "description")
CONSONANTS, VOWELS = "ptkbdgmnlsvz", "aeiou"
SUFFIX = {"N": "ra", "V": "ki", "A": "lu"}
FUNCTION = (("ta", "po", "me"), ("si", "vo", "de"))
GENERAL = {"N": 60, "V": 30, "A": 30}  # general words per class
DOMAIN = {"N": 8, "V": 6, "A": 6}  # domain words per class: stand for the most frequent general ones


@dataclass
class Language:
    general: dict[str, list[str]]  # class -> general words, most frequent first
    domain: dict[str, str]  # domain word -> the general word it stands for
    prefer: dict[str, list[str]]  # word -> the words it prefers next (verb after noun, object after verb...)
    adjective: dict[str, list[str]]  # noun -> preferred adjectives
    rng: random.Random

    def zipf(self, cls: str) -> str:
        words = self.general[cls]
        weights = [1 / (r + 1) for r in range(len(words))]
        return self.rng.choices(words, weights)[0]

    def pick(self, cls: str, after: str | None) -> str:
        if after is not None and self.rng.random() < 0.7:
            return self.rng.choice(self.prefer[after])
        return self.zipf(cls)

    def sentence(self, domain: bool) -> list[str]:
        subject = self.zipf("N")
        verb = self.pick("V", subject)
        obj = self.pick("N", verb)
        words: list[str] = [self.rng.choice(FUNCTION[0])]
        for noun, then in ((subject, [verb]), (obj, [])):
            if self.rng.random() < 0.5:
                adj = self.rng.choice(self.adjective[noun]) if self.rng.random() < 0.7 else self.zipf("A")
                words.append(adj)
            words.append(noun)
            words += then
            if then:
                words.append(self.rng.choice(FUNCTION[1]))
        if domain:
            jargon = {g: d for d, g in self.domain.items()}
            words = [jargon[w] if w in jargon and self.rng.random() < 0.9 else w for w in words]
        return words

    def text(self, sentences: int, domain: bool) -> str:
        return " " + " ".join(w for _ in range(sentences) for w in self.sentence(domain))


def make_language(seed: int) -> Language:
    rng = random.Random(seed)
    syllables = [c + v for c in CONSONANTS for v in VOWELS if c + v not in SUFFIX.values()]
    used: set[str] = set(w for group in FUNCTION for w in group)

    def word(cls: str, stem_syllables: tuple[int, int]) -> str:
        while True:
            w = "".join(rng.choice(syllables) for _ in range(rng.randint(*stem_syllables))) + SUFFIX[cls]
            if w not in used:
                used.add(w)
                return w

    general = {cls: [word(cls, (1, 2)) for _ in range(n)] for cls, n in GENERAL.items()}
    domain = {word(cls, (2, 3)): general[cls][i] for cls, n in DOMAIN.items() for i in range(n)}
    prefer: dict[str, list[str]] = {}
    for noun in general["N"]:
        prefer[noun] = rng.sample(general["V"], 3)
    for verb in general["V"]:
        prefer[verb] = rng.sample(general["N"], 3)
    adjective = {noun: rng.sample(general["A"], 2) for noun in general["N"]}
    return Language(general, domain, prefer, adjective, rng)


def make_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def batch(tok: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tok([tok.bos_token + t for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


@torch.no_grad()
def nats_per_word(model: LlamaForCausalLM, data: dict[str, torch.Tensor], words: int) -> float:
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    labels = data["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll.item() / words


def train(
    model: LlamaForCausalLM,
    params: list[torch.Tensor],
    batches: list[dict[str, torch.Tensor]],
    lr: float,
    evaluate: Any,
    every: int,
) -> list[tuple[int, float]]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = [(0, evaluate())]
    for step, data in enumerate(batches, 1):
        loss = model(**data).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == len(batches):
            curve.append((step, evaluate()))
    return curve


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # resize_token_embeddings' notes on mean resizing
    lang = make_language(seed)
    general = [lang.text(args.sentences, domain=False) for _ in range(args.tokenizer_texts)]
    tok = make_tokenizer(general, args.vocab)
    old_vocab = len(tok)
    pieces = {d: len(tok.tokenize(" " + d)) for d in lang.domain}

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=old_vocab,
        hidden_size=args.dim,
        intermediate_size=2 * args.dim,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=args.tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base = LlamaForCausalLM(cfg)
    pre_batches = [
        batch(tok, [lang.text(args.sentences, domain=b % 2 == 1) for _ in range(args.batch)])
        for b in range(args.pretrain_steps)
    ]
    t0 = time.perf_counter()
    train(base, list(base.parameters()), pre_batches, args.pretrain_lr, lambda: 0.0, args.pretrain_steps)
    pretrain_s = time.perf_counter() - t0
    base.zero_grad(set_to_none=True)  # no stale (V, D) gradient survives resize_token_embeddings
    base.eval()

    held_out = [lang.text(args.sentences, domain=True) for _ in range(args.eval_texts)]
    words = sum(len(t.split()) for t in held_out)
    old_loss = nats_per_word(base, batch(tok, held_out), words)
    train_texts = [
        [lang.text(args.sentences, domain=True) for _ in range(args.batch)] for _ in range(args.steps)
    ]

    new_tokens = [" " + d for d in lang.domain]
    new_tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    new_tok.add_tokens(new_tokens)
    eval_new = batch(new_tok, held_out)
    train_new = [batch(new_tok, texts) for texts in train_texts]
    descriptions = {" " + d: " " + g for d, g in lang.domain.items()}

    curves = {}
    for method in args.methods:
        model = copy.deepcopy(base)
        torch.manual_seed(seed + 1)
        model.resize_token_embeddings(len(new_tok), mean_resizing=method == "hf-default")
        if method in ("mean", "subwords", "ends"):
            init_new_tokens(model, new_tok, new_tokens, method=method)
        elif method == "description":
            init_new_tokens(model, new_tok, new_tokens, method="description", descriptions=descriptions)
        model.requires_grad_(False)
        params = constrain_new_tokens(model, old_vocab)
        curves[method] = train(
            model,
            params,
            train_new,
            args.lr,
            lambda m=model: nats_per_word(m, eval_new, words),
            args.eval_every,
        )
    return {
        "seed": seed,
        "old_vocab": old_vocab,
        "new_tokens": len(new_tokens),
        "pieces_per_new_token": statistics.mean(pieces.values()),
        "old_tokenization": old_loss,
        "pretrain_s": pretrain_s,
        "curves": curves,
    }


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v <= target), None)


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Medians over seeds: the curve of each method, its step-0 and final loss, and the step at
    which it first reaches the mean's final loss."""
    steps = [s for s, _ in runs[0]["curves"][methods[0]]]
    med = {
        m: [statistics.median(r["curves"][m][i][1] for r in runs) for i in range(len(steps))] for m in methods
    }
    old = statistics.median(r["old_tokenization"] for r in runs)
    out = {"steps": steps, "seeds": len(runs), "median_curves": med, "old_tokenization": old, "methods": {}}
    for m in methods:
        reach = (
            [steps_to_reach(r["curves"][m], r["curves"]["mean"][-1][1]) for r in runs]
            if "mean" in methods
            else []
        )
        gap0 = statistics.median(r["curves"][m][0][1] - r["old_tokenization"] for r in runs)
        out["methods"][m] = {"step0": med[m][0], "final": med[m][-1], "gap0": gap0, "reach_mean_final": reach}
    return out


def table(summary: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    steps = summary["steps"]
    mid = steps[len(steps) // 2]
    lines = [
        f"held-out domain text, nats per word (median of {len(runs)} seed(s)); old tokenization: "
        f"{summary['old_tokenization']:.3f}",
        "",
        f"| method | step 0 | step 0 minus old tokenization | step {mid} | step {steps[-1]} | "
        "steps to reach mean's final loss (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in summary["methods"].items():
        curve = summary["median_curves"][m]
        reach = ", ".join("-" if s is None else str(s) for s in r["reach_mean_final"])
        lines.append(
            f"| {m} | {r['step0']:.3f} | {r['gap0']:+.3f} | {curve[steps.index(mid)]:.3f} | "
            f"{r['final']:.3f} | {reach} |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, curve in summary[
        "median_curves"
    ].items():  # hf-default lies on mean: drawn wide and dashed below it
        style = (
            {"linestyle": "--", "linewidth": 4, "alpha": 0.5, "zorder": 1}
            if m == "hf-default"
            else {"zorder": 2}
        )
        ax.plot(summary["steps"], curve, marker="o", markersize=3, label=m, **style)
    ax.axhline(
        summary["old_tokenization"],
        color="black",
        linestyle="--",
        linewidth=1,
        label="old tokenization (perfect start)",
    )
    ax.set_xlabel("training steps of the new rows only")
    ax.set_ylabel("held-out loss (nats per word)")
    ax.set_title(f"New tokens: held-out loss from each initialisation (median of {summary['seeds']} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.new_token_init",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=120, help="training steps of the new rows")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sentences", type=int, default=4, help="sentences per text")
    p.add_argument(
        "--vocab", type=int, default=420, help="BPE vocabulary size (256 bytes + merges + 2 specials)"
    )
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokenizer-texts", type=int, default=2000)
    p.add_argument("--eval-texts", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=2, help="processes running seeds in parallel")
    p.add_argument("--tied", action="store_true", help="tie the head to the input embedding")
    p.add_argument(
        "--quick", action="store_true", help="1 seed, 150 pretraining steps, 20 steps: a smoke test"
    )
    p.add_argument("--json", type=Path, default=None, help="write the runs and the summary here")
    p.add_argument("--plot", type=Path, default=None, help="write the PNG here (default: none)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    if args.quick:
        args.seeds, args.pretrain_steps, args.steps, args.eval_every = 1, 150, 20, 10
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.workers > 1 and args.seeds > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.workers, args.seeds), mp_context=ctx) as pool:
            runs = list(pool.map(run_seed, range(args.seeds), [args] * args.seeds))
    else:
        runs = [run_seed(seed, args) for seed in range(args.seeds)]
    summary = summarize(runs, args.methods)
    wall = time.perf_counter() - t0
    print(table(summary, runs))
    print(
        f"\n{runs[0]['new_tokens']} new tokens, {statistics.mean(r['pieces_per_new_token'] for r in runs):.1f} "
        f"old pieces each on average; old vocabulary {runs[0]['old_vocab']}; "
        f"{'tied' if args.tied else 'untied'} head; wall {wall:.0f} s ({args.workers} processes x "
        f"{args.threads} thread(s))"
    )
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info("cpu"),
        "wall_s": wall,
        "summary": summary,
        "runs": runs,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot and plot(summary, args.plot):
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    main()
