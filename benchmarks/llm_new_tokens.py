"""New tokens in a Llama-shaped model: one training step, four ways to train only the new rows.

A tiny ``LlamaForCausalLM`` built from a ``LlamaConfig`` (2 layers, hidden size D, a vocabulary of V
"pretrained" tokens) gains ``--new`` tokens (64) with ``resize_token_embeddings``; everything but the
new tokens' rows is frozen; AdamW(lr=1e-3, weight_decay=0.01); causal-LM loss on batches of 4 x 128
token ids (each id is a new token with probability 1/8, else uniform over the old vocabulary). Tied
(``tie_word_embeddings=True``) and untied heads. Methods (keys of :data:`METHODS`):

``embconstraint``
    ``embconstraint.hf.constrain_new_tokens(model, V)``: the old rows of the input embedding and of
    the head are pinned.
``peft``
    PEFT trainable tokens: ``get_peft_model(model, TrainableTokensConfig(target_modules=...,
    token_indices=<the new ids>))`` with ``target_modules=["embed_tokens"]`` when tied (PEFT ties the
    head's adapter to the embedding's) and ``["embed_tokens", "lm_head"]`` when untied.
``whole``
    the whole input embedding and head train (one Parameter when tied): old rows drift.
``floor``
    the head-frozen floor: the head keeps its (V + new, D) weight frozen (no weight gradient; the new
    tokens' logits never learn), and the input embedding is a frozen (V + new, D) table for lookups
    plus a trainable (new, D) block whose rows replace the new tokens' vectors. Below what any
    method that also trains the head's new rows can reach; the target is within 1.10x of it.

Timing: all methods of a configuration live in one process and step in turn (the order rotates every
round), after warm-up steps; the median over rounds is reported. Peak memory: each method again in a
fresh process forked from a forkserver that has imported torch/transformers/peft: the RSS high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is built) above the RSS before
the model was built (on CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before it).

Run from the repository root::

    python -m benchmarks.llm_new_tokens --quick --threads 2
    python -m benchmarks.llm_new_tokens --threads 2 --out bench-llm     # V=32k,128k x D=256,1024
"""

from __future__ import annotations

import argparse
import gc
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.harness import (
    MiB,
    PeakMemory,
    comma_list,
    load_average,
    machine_info,
    markdown_table,
    parse_size,
    run_in_worker,
    sync,
    timed_ms,
    worker_context,
    write_json,
)

METHODS: dict[str, str] = {
    "embconstraint": "embconstraint.hf.constrain_new_tokens",
    "peft": "PEFT trainable tokens (embed_tokens, + lm_head when untied)",
    "whole": "whole input embedding and head trained",
    "floor": "head frozen, only the new input rows trained (floor)",
}


@dataclass(frozen=True)
class Config:
    """One configuration: ``vocab`` old tokens, ``new`` added, hidden size ``dim``."""

    vocab: int
    dim: int
    tied: bool
    new: int = 64
    layers: int = 2
    batch: int = 4
    seq: int = 128
    new_share: float = 0.125
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    num_batches: int = 4
    compile: bool = False  # torch.compile the model (every method alike)


class Unavailable(Exception):
    """The method cannot run in this installation (reported, not raised)."""


class NewRowsEmbedding(nn.Module):
    """The floor's input embedding: a frozen ``(V + k, D)`` lookup table plus a trainable ``(k, D)``
    block that replaces the vectors of ids ``>= V`` (only those k rows get a gradient)."""

    def __init__(self, table: Tensor, old_vocab: int) -> None:
        super().__init__()
        self.old_vocab = old_vocab
        self.register_buffer("table", table.detach(), persistent=False)
        self.new_rows = nn.Parameter(table[old_vocab:].detach().clone())

    def forward(self, ids: Tensor) -> Tensor:
        is_new = ids >= self.old_vocab
        new = F.embedding((ids - self.old_vocab).clamp(min=0), self.new_rows)
        return torch.where(is_new.unsqueeze(-1), new, F.embedding(ids, self.table))


def build_model(config: Config) -> nn.Module:
    """The "pretrained" model (seeded) after ``resize_token_embeddings(V + new)``, all frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, config.dim // 64)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab,
            hidden_size=config.dim,
            intermediate_size=4 * config.dim,
            num_hidden_layers=config.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=config.seq,
            tie_word_embeddings=config.tied,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )
    model.resize_token_embeddings(config.vocab + config.new, mean_resizing=False)
    return model.to(config.device).requires_grad_(False)


def apply_method(method: str, model: nn.Module, config: Config) -> tuple[nn.Module, list[nn.Parameter]]:
    """Make ``model`` train its new rows the ``method`` way; the model to step and its trainable
    parameters. Raises :class:`Unavailable` when the method cannot run here."""
    V = config.vocab
    new_ids = list(range(V, V + config.new))
    if method == "embconstraint":
        try:
            from embconstraint.hf import constrain_new_tokens
        except ImportError as err:
            raise Unavailable(f"embconstraint.hf.constrain_new_tokens cannot be imported: {err}") from err
        return model, list(constrain_new_tokens(model, V))
    if method == "peft":
        from peft import TrainableTokensConfig, get_peft_model

        targets = ["embed_tokens"] if config.tied else ["embed_tokens", "lm_head"]
        model = get_peft_model(model, TrainableTokensConfig(target_modules=targets, token_indices=new_ids))
    elif method == "whole":
        model.get_input_embeddings().weight.requires_grad_(True)
        model.get_output_embeddings().weight.requires_grad_(True)
    elif method == "floor":
        model.set_input_embeddings(NewRowsEmbedding(model.get_input_embeddings().weight, V))
    else:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return model, [p for p in model.parameters() if p.requires_grad]


def pinned_rows(model: nn.Module, vocab: int) -> list[Tensor]:
    """The old rows the model computes with now: input embedding and head (one tensor when the
    model of ``method`` shares them). PEFT's merged weight replaces only the new rows (index_copy of
    ``token_indices``), so its old rows are those of each ``base_layer.weight``."""
    out = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get)()
        if hasattr(module, "base_layer"):  # PEFT's TrainableTokensLayer
            module = module.base_layer
        weight = module.table if isinstance(module, NewRowsEmbedding) else module.weight
        if not any(weight is w for w in out):
            out.append(weight)
    return [w[:vocab] for w in out]


def make_batches(config: Config) -> list[Tensor]:
    """Token ids ``(batch, seq)``: new ids with probability ``new_share``, else uniform old ids."""
    g = torch.Generator().manual_seed(config.seed + 1)
    shape = (config.batch, config.seq)
    out = []
    for _ in range(config.num_batches):
        ids = torch.randint(0, config.vocab, shape, generator=g)
        new = torch.randint(config.vocab, config.vocab + config.new, shape, generator=g)
        out.append(torch.where(torch.rand(shape, generator=g) < config.new_share, new, ids).to(config.device))
    return out


class Stepper:
    """One method's model, optimizer and batches."""

    def __init__(self, method: str, config: Config) -> None:
        self.device = torch.device(config.device)
        self.model, self.params = apply_method(method, build_model(config), config)
        self.model.train()
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.batches = make_batches(config)
        self.loss = float("nan")

    def _step(self, ids: Tensor) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        return loss

    def step(self, i: int) -> float:
        """One step on batch ``i``; its wall time in ms."""
        loss, ms = timed_ms(lambda: self._step(self.batches[i % len(self.batches)]), self.device)
        self.loss = float(loss.detach())
        return ms


def time_interleaved(methods: list[str], config: Config, rounds: int, warmup: int) -> dict[str, dict]:
    """Every method of ``methods`` in this process, one step each in turn (rotated every round)."""
    reference = [w.detach().clone() for w in pinned_rows(build_model(config), config.vocab)]
    out: dict[str, dict] = {}
    steppers = {}
    for m in methods:
        try:
            steppers[m] = Stepper(m, config)
        except Unavailable as err:
            out[m] = {"status": "unavailable", "reason": str(err)}
    names = list(steppers)
    for i in range(warmup):
        for m in names:
            steppers[m].step(i)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        k = r % max(len(names), 1)
        for m in names[k:] + names[:k]:
            times[m].append(steppers[m].step(warmup + r))
    for m in names:
        with torch.no_grad():
            rows = pinned_rows(steppers[m].model, config.vocab)
            ref = reference if len(rows) == len(reference) else reference * len(rows)  # tied: one
            dev = max(float((a.double() - b.double()).abs().max()) for a, b in zip(rows, ref, strict=True))
            exact = all(torch.equal(a, b) for a, b in zip(rows, ref, strict=True))
        out[m] = {
            "status": "ok",
            "step_ms": times[m],
            "median_ms": statistics.median(times[m]),
            "max_pinned_deviation": dev,
            "pinned_exact": exact,
            "final_loss": steppers[m].loss,
            "trainable_params": sum(p.numel() for p in steppers[m].params),
        }
    return out


def measure_memory(method: str, config: Config, steps: int = 2) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps of ``method`` (meant for a fresh process): above the
    process before the model was built (``peak``) and above the built model (``train``)."""
    device = torch.device(config.device)
    tiny = replace(config, vocab=128, dim=64, seq=16, num_batches=1, compile=False)
    Stepper(method, tiny).step(0)  # loads code pages and lazy imports before the baseline
    gc.collect()
    mem = PeakMemory(device, reset="after the build", trim=False)
    sync(device)
    base = mem.current()
    stepper = Stepper(method, config)
    gc.collect()
    sync(device)
    built = mem.current()
    mem.reset_peak()
    for i in range(steps):
        stepper.step(i)
    top = mem.peak()
    return {
        "peak_bytes": top - base,
        "train_bytes": top - built,
        "model_bytes": built - base,
        "memory_method": mem.method,
    }


def _memory_worker(method: str, config: dict, threads: int | None) -> dict[str, Any]:
    """A worker process's job: :func:`measure_memory` with ``threads`` torch threads."""
    if threads:
        torch.set_num_threads(threads)
    return measure_memory(method, Config(**config))


def memory_in_fresh_process(
    ctx: Any, method: str, config: Config, threads: int | None, timeout: float = 1800
) -> dict[str, Any]:
    kind, payload = run_in_worker(
        ctx, "benchmarks.llm_new_tokens:_memory_worker", (method, asdict(config), threads), timeout
    )
    return payload if kind == "ok" else {"memory_error": payload}


# -- command line and report ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (``python -m benchmarks.llm_new_tokens --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.llm_new_tokens", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--sizes", type=comma_list(parse_size), help="old vocabulary sizes V (default 32k,128k)")
    p.add_argument("--dims", type=comma_list(int), help="hidden sizes D (default 256,1024)")
    p.add_argument("--tying", type=comma_list(str.strip), default=["tied", "untied"], help="tied,untied")
    p.add_argument("--methods", type=comma_list(str.strip), default=list(METHODS), help=",".join(METHODS))
    p.add_argument("--new", type=int, default=64, help="new tokens (default 64)")
    p.add_argument("--quick", action="store_true", help="V=8k, D=256, 8 rounds (< 2 minutes)")
    p.add_argument("--rounds", type=int, help="timed rounds (one step per method each; default 20)")
    p.add_argument("--warmup", type=int, help="warm-up steps per method (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every method's model (default backend; compiled in the warm-up steps)",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--out", default="bench-llm", help="output directory (default ./bench-llm)")
    return p


COLUMNS = ["method", "median ms/step", "x floor", "x peft", "peak / training MiB", "max pinned abs diff"]


def _row(r: dict[str, Any], floor: dict[str, Any] | None, peft: dict[str, Any] | None) -> list[str]:
    """The cells of ``r``'s row under :data:`COLUMNS` (ratios to the floor's and PEFT's medians)."""
    if r["status"] != "ok":
        return [r["method"], f"{r['status']}: {r.get('reason', '')}", "", "", "", ""]

    def ratio(o: dict[str, Any] | None) -> str:
        return f"{r['median_ms'] / o['median_ms']:.2f}x" if o and o["status"] == "ok" else "-"

    mem = (
        f"{r['peak_bytes'] / MiB:.0f} / {r['train_bytes'] / MiB:.0f}"
        if "peak_bytes" in r
        else r.get("memory_error", "not measured")
    )
    dev = "0 (exact)" if r["pinned_exact"] else f"{r['max_pinned_deviation']:.3g}"
    return [r["method"], f"{r['median_ms']:.1f}", ratio(floor), ratio(peft), mem, dev]


def render_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [
        "# New tokens in a Llama-shaped model: step time, memory, pinned rows",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; {meta['cpu_count']} CPU ({meta['cpu']})",
        f"- torch {meta['torch']} ({meta['torch_threads']} threads), transformers {meta['transformers']}, "
        f"peft {meta['peft']}, device {meta['device']}",
        f"- step: 2-layer LlamaForCausalLM, +{meta['new']} tokens, batch 4x128, AdamW(1e-3, wd 0.01); "
        f"{meta['warmup']} warm-up steps, then {meta['rounds']} rounds of one step per method in rotated "
        "order, one process; median ms/step"
        + (
            "; every model torch.compile-d (default backend, compiled in the warm-up)"
            if meta.get("compiled")
            else "; eager"
        ),
        f"- memory: {meta['memory_method']}; each method in a "
        "fresh process; 'peak / training' MiB = peak above the process before the model was built / above "
        "the built model",
        "",
    ]
    for key in sorted({(r["vocab"], r["dim"], r["tied"]) for r in results}):
        rows = {r["method"]: r for r in results if (r["vocab"], r["dim"], r["tied"]) == key}
        load = next(iter(rows.values()))["loadavg_1min"]
        out += [
            f"## V={key[0]}, D={key[1]}, {'tied' if key[2] else 'untied'}",
            "",
            f"1-minute load average before / after timing: {' / '.join('n/a' if x is None else f'{x:.2f}' for x in load)} "
            f"(machine: {meta['cpu_count']} CPUs; above ~{meta['torch_threads']} the figures are noisy)",
            "",
        ]
        out += markdown_table(
            COLUMNS, [_row(r, rows.get("floor"), rows.get("peft")) for r in rows.values()]
        ) + [""]
    out += ["Methods: " + "; ".join(f"`{k}`: {v}" for k, v in METHODS.items()), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS] + [
        t for t in args.tying if t not in ("tied", "untied")
    ]
    if bad:
        raise SystemExit(f"unknown method or tying {bad}; methods: {','.join(METHODS)}; tying: tied,untied")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([8000] if args.quick else [32000, 128000])
    dims = args.dims or ([256] if args.quick else [256, 1024])
    rounds = args.rounds or (8 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    import transformers

    meta = machine_info(args.device)
    argv_text = sys.argv[1:] if argv is None else argv
    meta.update(
        command=shlex.join(["python", "-m", "benchmarks.llm_new_tokens", *argv_text]),
        rounds=rounds,
        warmup=warmup,
        new=args.new,
        transformers=transformers.__version__,
        memory_method="not measured",
        compiled=args.compile,
    )
    ctx = worker_context(["torch", "transformers", "peft"]) if args.memory else None
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for tying in args.tying:
        for d in dims:
            for v in sizes:
                config = Config(
                    vocab=v,
                    dim=d,
                    tied=tying == "tied",
                    new=args.new,
                    device=args.device,
                    compile=args.compile,
                )
                load_before = load_average()
                timed = time_interleaved(args.methods, config, rounds, warmup)
                load = [None if x is None else x[0] for x in (load_before, load_average())]
                for m in args.methods:
                    r = {
                        "method": m,
                        "vocab": v,
                        "dim": d,
                        "tied": config.tied,
                        "loadavg_1min": load,
                        **timed[m],
                    }
                    if args.memory and r["status"] == "ok":
                        r.update(memory_in_fresh_process(ctx, m, config, args.threads))
                        meta["memory_method"] = r.get("memory_method", meta["memory_method"])
                    results.append(r)
                    print(
                        f"V={v} D={d} {tying:<6} {m:<13} "
                        + (
                            f"{r['median_ms']:8.1f} ms  peak {r.get('peak_bytes', 0) / MiB:7.0f} MiB  "
                            f"max|Δ| {r['max_pinned_deviation']:.3g}"
                            if r["status"] == "ok"
                            else r["status"]
                        )
                        + f"  ({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
    meta["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_new_tokens.md").write_text(render_markdown(results, meta))
    write_json(out / "llm_new_tokens.json", {"meta": meta, "results": results})
    print(f"wrote {out / 'llm_new_tokens.md'}, {out / 'llm_new_tokens.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
