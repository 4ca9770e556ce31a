"""Two CPU processes (gloo) training a constrained model with DeepSpeed (``deepspeed.initialize``),
ZeRO stage 3, and stages 1 and 2.

Usage: PYTHONPATH=tests:. python tests/scripts/deepspeed_zero.py OUT_DIR   (tests/test_deepspeed.py runs it)

Each rank writes OUT_DIR/rank<r>.pt with what it saw: per step, whether the pinned rows were bitwise
the reference, the free rows against one process on the global batch, the elements DeepSpeed
all-gathered and reduce-scattered (constrained and plain model), whether any op built a (V, D)
tensor; the Parameters DeepSpeed partitions; a resume from ``save_checkpoint`` against an
uninterrupted run; ``zero_to_fp32``, the consolidated 16-bit state dict, ``save_rows``; a model
built under ``deepspeed.zero.Init``; the error for a weight read while partitioned. Failures are
recorded, not raised, so that the pytest wrapper can name them.

DeepSpeed's CPU backend compiles a shared-memory all-reduce for inference on its first start
(about a minute, cached under ~/.cache/torch_extensions); training does not use it, so it is
switched off here and every collective goes through gloo.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers.distributed import ShapeProbe, attempt, global_batch, save_record
from torch import nn

from benchmarks.harness import CollectiveCounter, free_port

V, D, N_TOK = 98, 16, 60  # token embedding: the first 60 rows pinned (vocabulary growth)
V_BAG, N_BAG = 50, 20  # bag embedding: 20 scattered rows pinned
BAG_ROWS = list(range(1, 40, 2))
H = 24
N_HEAD = 40  # untied output head (V, H): its first 40 rows pinned
STEPS, BATCH, SEQ, LR = 4, 2, 6, 0.05
SIZES = {
    "V": V,
    "D": D,
    "N_TOK": N_TOK,
    "V_BAG": V_BAG,
    "N_BAG": N_BAG,
    "H": H,
    "N_HEAD": N_HEAD,
    "STEPS": STEPS,
}
ADAMW = {"lr": LR, "weight_decay": 0.01}


class TinyLM(nn.Module):
    """Untied: a token embedding, a bag, a constrained head of its own; tied: the head is the
    token embedding (``D`` wide, no body)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tied = tied
        self.tok = nn.Embedding(V, D)
        self.bag = nn.EmbeddingBag(V_BAG, D, mode="mean")
        self.body = nn.Linear(D, D if tied else H)
        self.head = nn.Linear(D if tied else H, V, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.bag(feats).unsqueeze(1)
        return self.head(torch.tanh(self.body(h)))


def refs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "tok": torch.randn(N_TOK, D, generator=g),
        "bag": torch.randn(N_BAG, D, generator=g),
        "head": torch.randn(N_HEAD, H, generator=g),
    }


def constrain_model(model: TinyLM, r: dict) -> TinyLM:
    from embconstraint import constrain

    constrain(model.tok, r["tok"], root=model)
    constrain(model.bag, r["bag"], indices=BAG_ROWS)
    if not model.tied:
        constrain(model.head, r["head"])
    return model


def build(constrained: bool, tied: bool, r: dict) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(tied)
    return constrain_model(model, r) if constrained else model


def config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise; the reference does not
        "optimizer": {"type": "AdamW", "params": {**ADAMW, "torch_adam": True}},
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,  # partition every one
            "stage3_gather_16bit_weights_on_model_save": True,
            # on (the default), DeepSpeed replaces F.linear by its own autograd function: a
            # constrained head then computes with its merged weight, (V, H) gradient included
            "memory_efficient_linear": False,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def batch(step: int):
    return global_batch(step, 2 * BATCH, SEQ, V, V_BAG)  # rank r takes half r


def loss_fn(model, x, feats, y):
    return F.cross_entropy(model(x, feats).flatten(0, 1), y.flatten())


def gathered(model: nn.Module):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def merged(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged weights (gathered on every rank)."""
    from embconstraint import merged_state_dict

    with gathered(model):
        return {k: v for k, v in merged_state_dict(model).items()}


def free_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    with gathered(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def pinned_exact(model: TinyLM, r: dict) -> bool | str:
    try:
        with gathered(model), torch.no_grad():
            ok = torch.equal(model.tok.weight[:N_TOK], r["tok"]) and torch.equal(
                model.bag.weight[BAG_ROWS], r["bag"]
            )
            if model.tied:
                return ok and torch.equal(model.head.weight[:N_TOK], r["tok"])
            return ok and torch.equal(model.head.weight[:N_HEAD], r["head"])
    except Exception as err:
        return f"error: {type(err).__name__}: {err}"[:300]


def initialize(model: nn.Module, stage: int):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config(stage))
    return engine


def train(engine, rank: int, steps: range, r: dict | None = None, single=None) -> list[dict]:
    out = []
    model = engine.module
    for step in steps:
        x, feats, y = batch(step)
        part = slice(rank * BATCH, (rank + 1) * BATCH)
        with CollectiveCounter() as comm, ShapeProbe([(V, D), (V_BAG, D), (V, H)]) as shapes:
            engine.backward(loss_fn(engine, x[part], feats[part], y[part]))
            engine.step()
        entry = {
            "all_gather": comm.counts["all_gather"],
            "reduce_scatter": comm.counts["reduce_scatter"],
            "all_reduce": comm.counts["all_reduce"],
            "vd_ops": shapes.hits,
        }
        if single is not None:
            s_model, s_opt = single
            loss_fn(s_model, x, feats, y).backward()
            s_opt.step()
            s_opt.zero_grad()
            mine, ref = free_rows(model), dict(s_model.named_parameters())
            entry["free_maxdiff"] = max((mine[n] - ref[n].detach()).abs().max().item() for n in mine)
        if r is not None:
            entry["pinned_exact"] = pinned_exact(model, r)
        out.append(entry)
    return out


def single_run(tied: bool, r: dict):
    model = build(True, tied, r)
    return model, torch.optim.AdamW(model.parameters(), **ADAMW)


def stage3(rank: int, out: Path, r: dict, record: dict) -> None:
    import deepspeed

    from embconstraint import merged_state_dict, save_rows

    plain = initialize(build(False, False, r), 3)
    record["plain"] = train(plain, rank, range(STEPS))
    record["plain_partitioned"] = sorted((n, tuple(p.ds_shape)) for n, p in plain.module.named_parameters())

    engine = initialize(build(True, False, r), 3)
    record["partitioned"] = sorted(
        (n, tuple(p.ds_shape), p.numel()) for n, p in engine.module.named_parameters()
    )
    record["untied"] = train(engine, rank, range(STEPS), r, single_run(False, r))
    record["storage"] = [
        getattr(engine.module, m).parametrizations.weight[0].storage for m in ("tok", "bag", "head")
    ]

    def read_outside():
        try:
            _ = engine.module.tok.weight
        except RuntimeError as err:
            return f"RuntimeError: {err}"
        return "no error"

    attempt(record, "read_outside_forward", read_outside)
    live = merged(engine.module)

    def consolidated():  # what Trainer.save_model / accelerate's get_state_dict save under ZeRO-3
        sd = engine._zero3_consolidated_16bit_state_dict()
        if rank != 0:
            return None
        plain_sd = merged_state_dict(engine.module, sd)
        fresh = TinyLM(False)
        fresh.load_state_dict(plain_sd)
        return {
            "raw_keys": sorted(k for k in sd if "parametrizations" in k),
            "keys": sorted(plain_sd),
            "equal": all(torch.equal(fresh.state_dict()[k], live[k]) for k in live),
        }

    attempt(record, "consolidated", consolidated)

    def rows():
        path = out / "rows.safetensors"
        with gathered(engine.module):
            names = save_rows(engine.module, path) if rank == 0 else None
        dist.barrier()
        from embconstraint import load_rows

        fresh = TinyLM(False)
        with torch.no_grad():  # the pinned rows, other free rows
            fresh.tok.weight[:N_TOK] = r["tok"]
            fresh.bag.weight[BAG_ROWS] = r["bag"]
            fresh.head.weight[:N_HEAD] = r["head"]
        load_rows(fresh, path)
        keys = ("tok.weight", "bag.weight", "head.weight")
        return {"names": names, "equal": all(torch.equal(fresh.state_dict()[k], live[k]) for k in keys)}

    attempt(record, "save_rows", rows)

    def resume():
        ckpt = out / "ckpt"
        engine.save_checkpoint(str(ckpt), tag="t")
        record["after_save"] = train(engine, rank, range(STEPS, STEPS + 2))
        expected = free_rows(engine.module)
        resumed = initialize(build(True, False, r), 3)
        resumed.load_checkpoint(str(ckpt), tag="t")
        train(resumed, rank, range(STEPS, STEPS + 2))
        got = free_rows(resumed.module)
        return {"bitwise": all(torch.equal(got[n], expected[n]) for n in expected), "names": sorted(got)}

    attempt(record, "resume", resume)

    def zero_to_fp32():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if rank != 0:
            return None
        sd = get_fp32_state_dict_from_zero_checkpoint(str(out / "ckpt"), tag="t")
        plain_sd = merged_state_dict(build(True, False, r), sd)  # the model's pinned rows complete them
        fresh = TinyLM(False)
        fresh.load_state_dict(plain_sd)
        saved = record["checkpointed"] if "checkpointed" in record else None
        return {
            "raw_keys": sorted(k for k in sd if "parametrizations" in k),
            "keys": sorted(plain_sd),
            "equal": saved is None or all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved),
        }

    record["checkpointed"] = live  # the weights at save_checkpoint (nothing trained between)
    attempt(record, "zero_to_fp32", zero_to_fp32)
    del record["checkpointed"]

    tied = initialize(build(True, True, r), 3)
    record["tied"] = train(tied, rank, range(STEPS), r, single_run(True, r))
    record["tied_partitioned"] = sorted((n, tuple(p.ds_shape)) for n, p in tied.module.named_parameters())

    def zero_init():  # built under deepspeed.zero.Init (transformers' from_pretrained under ZeRO-3)
        with deepspeed.zero.Init(config_dict_or_path=config(3)):
            torch.manual_seed(0)
            model = TinyLM(False)
        before = model.tok.weight.numel()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            start = {k: v.clone() for k, v in model.state_dict().items()}
        constrain_model(model, r)
        single = build(True, False, r)
        with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
            for name, p in single.named_parameters():
                p.copy_(dict(model.named_parameters())[name])
        eng = initialize(model, 3)
        steps = train(eng, rank, range(2), r, (single, torch.optim.AdamW(single.parameters(), **ADAMW)))
        with gathered(eng.module), torch.no_grad():
            kept = torch.equal(eng.module.tok.weight[:N_TOK], r["tok"])
        return {
            "partitioned_before": before == 0,
            "pinned": [s["pinned_exact"] for s in steps],
            "kept": kept,
            "maxdiff": max(s["free_maxdiff"] for s in steps),
            "trained": not torch.equal(merged(eng.module)["tok.weight"][N_TOK:], start["tok.weight"][N_TOK:]),
        }

    attempt(record, "zero_init", zero_init)

    def after_initialize():  # constrain() on a module DeepSpeed already manages
        from embconstraint import constrain

        eng = initialize(build(False, False, r), 3)
        try:
            constrain(eng.module.tok, r["tok"])
        except ValueError as err:
            return f"ValueError: {err} | unchanged={not hasattr(eng.module.tok, 'parametrizations')}"
        return "no error"

    attempt(record, "after_initialize", after_initialize)


def stages_1_2(rank: int, r: dict, record: dict) -> None:
    record["stage2_plain"] = train(initialize(build(False, False, r), 2), rank, range(STEPS))
    for stage in (1, 2):
        for tied in (False, True):
            engine = initialize(build(True, tied, r), stage)
            steps = train(engine, rank, range(STEPS), r, single_run(tied, r))
            record[f"stage{stage}_{'tied' if tied else 'untied'}"] = steps
            record[f"stage{stage}_storage"] = engine.module.tok.parametrizations.weight[0].storage


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_SIZE="2",
    )
    torch.set_num_threads(1)
    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # see the module docstring
    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(out_dir)
    r = refs()
    record: dict = {"rank": rank, "refs": r, "sizes": SIZES}
    try:
        stage3(rank, out, r, record)
        stages_1_2(rank, r, record)
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
    save_record(record, out, rank)


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=2, join=True)
