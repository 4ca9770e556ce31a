"""Tensor parallelism of a constrained model on CPU processes (gloo): ``parallelize_module`` with the
vocabulary sharded (an embedding under ``RowwiseParallel``, the output head under ``ColwiseParallel``,
torchtitan's Llama plan), on a 1-D mesh of 2 processes (``1d``), and on a 2 x 2 (data x tensor)
mesh with ``fully_shard`` over the data-parallel dimension (``2d``, 4 processes).

Usage: PYTHONPATH=tests:. python tests/scripts/tensor_parallel.py OUT_DIR {1d,2d}
(tests/test_tensor_parallel.py runs it).

Each rank writes OUT_DIR/rank<r>.pt with, per model and step: whether its pinned rows were bitwise
the reference, its rows of every merged weight against one process on the global batch, the
elements through the functional collectives (DTensor's: activations) and through FSDP's all-gather
and reduce-scatter, against the same model unconstrained; whether any op built a (V, D) tensor; state
dicts (``get_model_state_dict``, DCP, ``merged_state_dict``); the refusals. Failures are recorded.
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

from benchmarks.harness import CollectiveCounter, FunctionalCollectiveCounter, free_port

V, D, N_TOK = 98, 16, 60  # token embedding: the first 60 rows pinned (rank 0 of 2 holds only pinned rows)
H, N_HEAD = 24, 40  # untied head (V, H): its first 40 rows pinned
HEAD_ROWS = list(range(3, 83, 2))  # the tied model pins these 40 rows instead (scattered)
STEPS, BATCH, SEQ, LR = 4, 4, 6, 0.5
SIZES = {"V": V, "D": D, "N_TOK": N_TOK, "H": H, "N_HEAD": N_HEAD, "STEPS": STEPS}


class TinyLM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.body = nn.Linear(D, D if tied else H)
        self.head = nn.Linear(D if tied else H, V, bias=not tied)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.tok(x))))


def refs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "tok": torch.randn(N_TOK, D, generator=g),
        "head": torch.randn(N_HEAD, H, generator=g),
        "tied": torch.randn(len(HEAD_ROWS), D, generator=g),
    }


def build(tied: bool = False, constrained: bool = False, r: dict | None = None) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(tied)
    if constrained:
        constrain_model(model, r)
    return model


def constrain_model(model: TinyLM, r: dict) -> None:
    from embconstraint import constrain

    if model.head.weight is model.tok.weight or "weight" in getattr(model.head, "parametrizations", {}):
        constrain(model.tok, r["tied"], indices=HEAD_ROWS, root=model)
    else:
        constrain(model.tok, r["tok"])
        constrain(model.head, r["head"])


def plan(loss_parallel: bool, ours: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard

    if ours:
        from embconstraint.parallel import ColwiseParallel, RowwiseParallel
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    head = (
        ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        if loss_parallel
        else ColwiseParallel(output_layouts=Replicate())
    )
    return {"tok": RowwiseParallel(input_layouts=Replicate()), "head": head}


def loss_fn(model, x, y, loss_parallel: bool):
    logits = model(x)
    if loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as parallel_loss

        with parallel_loss():
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
        return loss
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    return loss


def local_rows(t: torch.Tensor) -> torch.Tensor:
    """A weight as this rank holds it: a DTensor's local rows, FSDP's (data-parallel) ones gathered."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def own_rows(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """This rank's rows of a module's merged weight (its tensor-parallel shard), read outside forward."""
    with torch.no_grad():
        return local_rows(getattr(module, name)).detach().clone()


def check_step(model, single, tp_rank_rows, r: dict, tied: bool) -> dict:
    """Pinned rows bitwise; this rank's rows of each merged weight against the single process."""
    from embconstraint._mechanism import pin_of

    out = {}
    names = [("tok", "weight")] if tied else [("tok", "weight"), ("head", "weight"), ("head", "bias")]
    pinned_ok, diff = True, 0.0
    for mod, attr in names:
        m = getattr(model, mod)
        mine = own_rows(m, attr)
        pin = pin_of(m, attr)
        lo, hi = pin.shard.lo, pin.shard.hi
        ref_rows = getattr(getattr(single, mod), attr).detach()[lo:hi]
        diff = max(diff, (mine - ref_rows).abs().max().item() if mine.numel() else 0.0)
        # the pinned rows at their local positions, bitwise the reference's rows that fall here
        local_pinned = pin.pinned_rows()
        if attr == "weight":
            reference = r["tied"] if tied else r[mod]
            pinned_ok &= torch.equal(mine[local_pinned], reference[pin.shard.pinned])
        tp_rank_rows.append((mod, attr, lo, hi))
    out["pinned_exact"], out["maxdiff"] = pinned_ok, diff
    return out


def train(model, single, x_of, r, tied, loss_parallel, record_name, record, fsdp: bool):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    s_opt = torch.optim.SGD(single.parameters(), lr=LR) if single is not None else None
    steps = []
    for step in range(STEPS):
        x, y, gx, gy = x_of(step)
        with (
            CollectiveCounter() as comm,
            FunctionalCollectiveCounter() as fcomm,
            ShapeProbe([(V, D), (V, H)]) as shapes,
        ):
            loss_fn(model, x, y, loss_parallel)
            opt.step()
            opt.zero_grad()
        entry = {
            "functional": dict(fcomm.counts),
            "all_gather": comm.counts["all_gather"],
            "reduce_scatter": comm.counts["reduce_scatter"],
            "vd_ops": shapes.hits,
        }
        if single is not None:
            F.cross_entropy(single(gx).flatten(0, 1), gy.flatten()).backward()
            s_opt.step()
            s_opt.zero_grad()
            entry.update(check_step(model, single, [], r, tied))
        steps.append(entry)
    record[record_name] = steps


def one_d(rank: int, out: Path, r: dict, record: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from embconstraint import merged_state_dict

    mesh = init_device_mesh("cpu", (2,))

    def batch(step):  # tensor parallelism: every rank computes on the whole batch
        x, _, y = global_batch(step, BATCH, SEQ, V, 1)
        return x, y, x, y

    plain = parallelize_module(build(), mesh, plan(False, ours=False))
    train(plain, None, batch, r, False, False, "plain", record, fsdp=False)
    plain_lp = parallelize_module(build(), mesh, plan(True, ours=False))
    train(plain_lp, None, batch, r, False, True, "plain_loss_parallel", record, fsdp=False)

    # shard first (torch's styles), then constrain: torchtitan's order
    after = parallelize_module(build(), mesh, plan(False, ours=False))
    constrain_model(after, r)
    record["params"] = sorted((n, tuple(p.shape), type(p).__name__) for n, p in after.named_parameters())
    record["shards"] = {
        m: (
            getattr(after, m).parametrizations.weight[0].shard.lo,
            getattr(after, m).parametrizations.weight[0].shard.hi,
        )
        for m in ("tok", "head")
    }
    train(after, build(constrained=True, r=r), batch, r, False, False, "after", record, fsdp=False)

    # constrain first (the Lightning callback, constrain_new_tokens), then embconstraint.parallel's styles
    first = parallelize_module(build(constrained=True, r=r), mesh, plan(True, ours=True))
    train(
        first, build(constrained=True, r=r), batch, r, False, True, "first_loss_parallel", record, fsdp=False
    )

    tied = parallelize_module(build(tied=True, constrained=True, r=r), mesh, plan(False, ours=True))
    record["tied_params"] = sorted((n, tuple(p.shape)) for n, p in tied.named_parameters())
    train(tied, build(tied=True, constrained=True, r=r), batch, r, True, False, "tied", record, fsdp=False)

    state_checks(
        after, build(constrained=True, r=r), r, out, record, fresh=lambda: _constrained_after(mesh, r)
    )

    def refusals():
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        from embconstraint import constrain
        from embconstraint.parallel import ColwiseParallel as OurColwise

        out_ = {}
        try:
            parallelize_module(build(constrained=True, r=r), mesh, {"tok": RowwiseParallel()})
            out_["torch_style_on_constrained"] = "no error"
        except Exception as err:
            out_["torch_style_on_constrained"] = f"{type(err).__name__}: {err}"
        try:
            parallelize_module(build(constrained=True, r=r), mesh, {"tok": OurColwise()})
            out_["colwise_embedding"] = "no error"
        except Exception as err:
            out_["colwise_embedding"] = f"{type(err).__name__}: {err}"
        model = parallelize_module(
            build(), mesh, {"tok": ColwiseParallel()}
        )  # shards the embedding dimension
        try:
            constrain(model.tok, r["tok"])
            out_["constrain_shard1"] = "no error"
        except Exception as err:
            out_["constrain_shard1"] = (
                f"{type(err).__name__}: {err} | unchanged={not hasattr(model.tok, 'parametrizations')}"
            )
        try:
            from embconstraint import save_rows

            save_rows(after, out / "rows.safetensors")
            out_["save_rows"] = "no error"
        except Exception as err:
            out_["save_rows"] = f"{type(err).__name__}: {err}"
        try:
            from embconstraint import release

            release(after)
            out_["release"] = "no error"
        except Exception as err:
            out_["release"] = f"{type(err).__name__}: {err}"
        return out_

    attempt(record, "refusals", refusals)
    attempt(record, "merged_sd_keys", lambda: sorted(merged_state_dict(after)))


def _constrained_after(mesh, r):
    from torch.distributed.tensor.parallel import parallelize_module

    model = parallelize_module(build(), mesh, plan(False, ours=False))
    constrain_model(model, r)
    return model


def state_checks(model, single_like, r, out: Path, record: dict, fresh) -> None:
    """Full and sharded state dicts, their round trips into a fresh sharded model, DCP, merged_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from embconstraint import merged_state_dict

    keys = ["body.bias", "body.weight", "head.bias", "head.weight", "tok.weight"]
    merged = merged_state_dict(model)  # every rank: plain whole tensors

    def full_sd():
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = TinyLM()
        plain.load_state_dict(sd)  # the plain model loads it: plain keys, whole (V, D) weights
        return {"keys": sorted(sd), "equal": all(torch.equal(plain.state_dict()[k], merged[k]) for k in keys)}

    def sharded_sd():
        sd = get_model_state_dict(model)
        return {
            "keys": sorted(sd),
            "tok": (
                type(sd["tok.weight"]).__name__,
                tuple(sd["tok.weight"].shape),
                str(sd["tok.weight"].placements),
            ),
        }

    def round_trip():
        target = fresh()
        set_model_state_dict(target, get_model_state_dict(model))
        return all(torch.equal(merged_state_dict(target)[k], merged[k]) for k in keys)

    def dcp_round_trip():
        path = out / "dcp"
        dcp.save(get_model_state_dict(model), checkpoint_id=str(path))
        target = fresh()
        sd = get_model_state_dict(target)
        dcp.load(sd, checkpoint_id=str(path))
        set_model_state_dict(target, sd)
        return all(torch.equal(merged_state_dict(target)[k], merged[k]) for k in keys)

    def plain_load():  # a plain checkpoint (one process's merged weights) into the sharded model
        target = fresh()  # (set_model_state_dict distributes the dict it is given in place: a copy)
        set_model_state_dict(
            target, {k: v.clone() for k, v in merged.items()}, options=StateDictOptions(full_state_dict=True)
        )
        return all(torch.equal(merged_state_dict(target)[k], merged[k]) for k in keys)

    record["merged_sd"] = {
        "keys": sorted(merged),
        "types": sorted({type(v).__name__ for v in merged.values()}),
        "tok_shape": tuple(merged["tok.weight"].shape),
        "pinned": torch.equal(merged["tok.weight"][:N_TOK], r["tok"]),
    }
    attempt(record, "full_state_dict", full_sd)
    attempt(record, "sharded_state_dict", sharded_sd)
    attempt(record, "round_trip", round_trip)
    attempt(record, "dcp", dcp_round_trip)
    attempt(record, "plain_load", plain_load)


def two_d(rank: int, out: Path, r: dict, record: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh["dp"].get_local_rank()

    def batch(step):  # data parallel over dp (half d of the global batch), the whole half on each tp rank
        gx, _, gy = global_batch(step, 2 * BATCH, SEQ, V, 1)
        part = slice(dp * BATCH, (dp + 1) * BATCH)
        return gx[part], gy[part], gx, gy

    def sharded(constrained: bool):
        model = parallelize_module(build(), mesh["tp"], plan(False, ours=False))
        if constrained:
            constrain_model(model, r)
        # what fully_shard shards on the data-parallel mesh: this tensor-parallel rank's Parameters
        record.setdefault(
            "tp_local" if constrained else "tp_local_plain",
            {
                n: tuple(p.to_local().shape if hasattr(p, "to_local") else p.shape)
                for n, p in model.named_parameters()
            },
        )
        fully_shard(model.tok, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return model

    train(sharded(False), None, batch, r, False, False, "plain", record, fsdp=True)
    model = sharded(True)
    record["shards"] = {
        m: (
            getattr(model, m).parametrizations.weight[0].shard.lo,
            getattr(model, m).parametrizations.weight[0].shard.hi,
        )
        for m in ("tok", "head")
    }
    record["free_params"] = {
        n: (type(p).__name__, str(getattr(p, "placements", None)), tuple(p.to_local().shape))
        for n, p in model.named_parameters()
        if "parametrizations" in n
    }
    train(model, build(constrained=True, r=r), batch, r, False, False, "fsdp_tp", record, fsdp=True)
    record["storage"] = [getattr(model, m).parametrizations.weight[0].storage for m in ("tok", "head")]
    state_checks(model, None, r, out, record, fresh=lambda: sharded(True))


def worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = Path(out_dir)
    r = refs()
    record: dict = {"rank": rank, "sizes": SIZES, "mode": mode}
    try:
        (one_d if mode == "1d" else two_d)(rank, out, r, record)
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
    save_record(record, out, rank)


if __name__ == "__main__":
    mode = sys.argv[2]
    world = 2 if mode == "1d" else 4
    mp.spawn(worker, args=(world, free_port(), sys.argv[1], mode), nprocs=world, join=True)
