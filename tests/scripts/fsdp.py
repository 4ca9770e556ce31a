"""Two CPU processes (gloo) training a constrained model sharded with FSDP2 ``fully_shard``.

Usage: PYTHONPATH=tests:. python tests/scripts/fsdp.py OUT_DIR   (tests/test_sharded.py runs it)

Each rank writes OUT_DIR/rank<r>.pt with the model's sizes and what it saw: per step, whether the pinned rows were bitwise the reference
and the free rows against a single-process run on the global batch; elements all-gathered and
reduce-scattered per step (constrained and unconstrained model); whether any op built a (V, D)
tensor in a step; state-dict / DCP round trips. Failures are recorded, not raised, so that the
pytest wrapper can name them.
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
from helpers.distributed import ShapeProbe, global_batch, save_record
from torch import nn

from benchmarks.harness import CollectiveCounter, free_port

V, D, N_TOK = 98, 16, 60  # token embedding: the first 60 rows pinned (vocabulary growth)
V_BAG, N_BAG = 50, 20  # bag embedding: 20 scattered rows pinned
BAG_ROWS = list(range(1, 40, 2))  # 20 rows
H = 24
N_HEAD = 40  # output head (V, H): its first 40 rows pinned (root FSDP unit)
STEPS, BATCH, SEQ, LR = 4, 4, 6, 0.5
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


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.bag = nn.EmbeddingBag(V_BAG, D, mode="mean")
        self.body = nn.Linear(D, H)
        self.head = nn.Linear(H, V, bias=False)  # (V, H): no (V, D) parameter besides the embedding

    def forward(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.bag(feats).unsqueeze(1)
        return self.head(torch.tanh(self.body(h)))


def build(constrained: bool, refs) -> TinyLM:
    from embconstraint import constrain

    torch.manual_seed(0)
    model = TinyLM()
    if constrained:
        constrain(model.tok, refs["tok"])
        constrain(model.bag, refs["bag"], indices=BAG_ROWS)
        constrain(model.head, refs["head"])
    return model


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    fully_shard(model.tok, mesh=mesh)  # rows (dim 0), fully_shard's default
    fully_shard(model.bag, mesh=mesh, shard_placement_fn=lambda p: Shard(1))  # columns: works the same
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int):
    return global_batch(step, 2 * BATCH, SEQ, V, V_BAG)  # rank r takes half r


def loss_fn(model, x, feats, y):
    return F.cross_entropy(model(x, feats).flatten(0, 1), y.flatten())


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def train(model, rank: int, record: dict, name: str, refs=None, single=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        x, feats, y = batch(step)
        part = slice(rank * BATCH, (rank + 1) * BATCH)
        with CollectiveCounter() as comm, ShapeProbe([(V, D), (V_BAG, D), (V, H)]) as shapes:
            loss_fn(model, x[part], feats[part], y[part]).backward()
            opt.step()
            opt.zero_grad()
        entry = {
            "all_gather": comm.counts["all_gather"],
            "reduce_scatter": comm.counts["reduce_scatter"],
            "vd_ops": shapes.hits,
        }
        if single is not None:  # the trainable rows, against one process on the global batch
            s_model, s_opt = single
            loss_fn(s_model, x, feats, y).backward()
            s_opt.step()
            s_opt.zero_grad()
            diffs = [
                (
                    full(getattr(model, m).parametrizations.weight.original.detach())
                    - getattr(s_model, m).parametrizations.weight.original.detach()
                )
                .abs()
                .max()
                .item()
                for m in ("tok", "bag", "head")
            ]
            entry["free_maxdiff"] = max(diffs)
        if refs is not None:
            try:  # the merged weights, read outside forward
                with torch.no_grad():
                    tok, bag, head = full(model.tok.weight), full(model.bag.weight), full(model.head.weight)
                entry["pinned_exact"] = (
                    torch.equal(tok[:N_TOK], refs["tok"])
                    and torch.equal(bag[BAG_ROWS], refs["bag"])
                    and torch.equal(head[:N_HEAD], refs["head"])
                )
            except Exception as err:
                entry["pinned_exact"] = f"error: {type(err).__name__}: {err}"[:300]
        steps.append(entry)
    record[name] = steps


def state_checks(model, refs, mesh, out_dir: Path, rank: int, record: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    def attempt(name, fn):
        try:
            record[name] = fn()
        except Exception:  # recorded for the wrapper, which names the failure
            record[name] = "error: " + traceback.format_exc(limit=3)[-1500:]

    merged = {}

    def read_weights():
        with torch.no_grad():
            merged.update(
                {f"{m}.weight": full(getattr(model, m).weight).clone() for m in ("tok", "bag", "head")}
            )
        return True

    def full_sd():
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        keys = sorted(sd)
        plain = TinyLM()
        plain.load_state_dict(sd) if rank == 0 else None
        ok = rank != 0 or all(torch.equal(plain.state_dict()[k], merged[k]) for k in merged)
        return {"keys": keys, "plain_load_equal": ok, "rank0_has_values": rank != 0 or len(sd) == 5}

    def sharded_sd():
        sd = get_model_state_dict(model)
        return {
            "keys": sorted(sd),
            "types": sorted({type(v).__name__ for v in sd.values()}),
            "tok_shape": tuple(sd["tok.weight"].shape) if "tok.weight" in sd else None,
        }

    def set_full():
        sd = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        fresh = shard(build(True, refs), mesh)
        set_model_state_dict(
            fresh, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        return all(torch.equal(full(fresh.get_submodule(k[:-7]).weight), v) for k, v in merged.items())

    def set_sharded():
        sd = get_model_state_dict(model)
        fresh = shard(build(True, refs), mesh)
        set_model_state_dict(fresh, sd)
        return all(torch.equal(full(fresh.get_submodule(k[:-7]).weight), v) for k, v in merged.items())

    def dcp_roundtrip():
        path = out_dir / "dcp"
        dcp.save(get_model_state_dict(model), checkpoint_id=str(path))
        fresh = shard(build(True, refs), mesh)
        sd = get_model_state_dict(fresh)
        dcp.load(sd, checkpoint_id=str(path))
        set_model_state_dict(fresh, sd)
        return all(torch.equal(full(fresh.get_submodule(k[:-7]).weight), v) for k, v in merged.items())

    def merged_sd():
        from embconstraint import merged_state_dict

        sd = merged_state_dict(model)
        return {
            "keys": sorted(sd),
            "types": sorted({type(v).__name__ for v in sd.values()}),
            "equal": all(torch.equal(sd[k], v) for k, v in merged.items()),
        }

    attempt("read_weights", read_weights)
    attempt("full_state_dict", full_sd)
    attempt("sharded_state_dict", sharded_sd)
    attempt("set_full_state_dict", set_full)
    attempt("set_sharded_state_dict", set_sharded)
    attempt("dcp", dcp_roundtrip)
    attempt("merged_state_dict", merged_sd)


def bad_input(sharded_plain, refs) -> str:
    """constrain() on an embedding already sharded by fully_shard: the error, and whether the
    module was left unchanged."""
    from torch.nn.utils import parametrize

    before = type(sharded_plain.tok.weight).__name__
    try:
        from embconstraint import constrain

        constrain(sharded_plain.tok, refs["tok"])
    except Exception as err:
        unchanged = (
            not parametrize.is_parametrized(sharded_plain.tok)
            and type(sharded_plain.tok.weight).__name__ == before
        )
        return f"{type(err).__name__}: {err} | unchanged={unchanged}"
    return "no error"


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    out = Path(out_dir)
    g = torch.Generator().manual_seed(7)
    refs = {
        "tok": torch.randn(N_TOK, D, generator=g),
        "bag": torch.randn(N_BAG, D, generator=g),
        "head": torch.randn(N_HEAD, H, generator=g),
    }
    record: dict = {"rank": rank, "refs": refs, "sizes": SIZES}
    try:
        plain = shard(build(False, refs), mesh)
        train(plain, rank, record, "plain")
        record["bad_input"] = bad_input(plain, refs)
        single = build(True, refs)
        single_opt = torch.optim.SGD(single.parameters(), lr=LR)
        model = shard(build(True, refs), mesh)
        record["fsdp_params"] = sorted((n, tuple(p.shape)) for n, p in model.named_parameters())
        record["placements"] = {
            m: str(getattr(model, m).parametrizations.weight.original.placements) for m in ("tok", "bag")
        }
        seen = record["free_in_forward"] = []
        for m in (model.tok, model.bag):  # runs after FSDP's pre-forward all-gather
            m.register_forward_pre_hook(
                lambda mod, args: seen.append(type(mod.parametrizations.weight.original).__name__)
            )
        train(model, rank, record, "constrained", refs, (single, single_opt))
        record["storage"] = [m.parametrizations.weight[0].storage for m in (model.tok, model.bag, model.head)]
        state_checks(model, refs, mesh, out, rank, record)
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
    save_record(record, out, rank)


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=2, join=True)
