"""DeepSpeed ZeRO and tensor parallelism on 2 CPU gloo ranks: elements communicated per step, and the
median step time, for the same model with and without ``embconstraint.constrain`` on its embedding and
output head (docs/guides/deepspeed-and-tensor-parallel.md).

Usage: python -m benchmarks.sharded_comm [--engines zero3,zero2,tp] [V D N_PINNED STEPS]
(default 32768 256 32000 10)

Model: ``Embedding(V, D) -> Linear(D, D) -> tanh -> Linear(D, V)`` (an untied head; the first N_PINNED
rows of both pinned), cross-entropy over a batch of 8 x 128 ids per rank.

- ``zero3`` / ``zero2``: ``deepspeed.initialize`` (AdamW, ``torch_adam``, every Parameter partitioned:
  ``stage3_param_persistence_threshold`` 0), each rank its half of the global batch; the elements
  all-gathered, reduce-scattered and all-reduced per step (DeepSpeed's own collectives).
- ``tp``: ``parallelize_module`` with the embedding under ``RowwiseParallel`` and the head under
  ``ColwiseParallel`` (torchtitan's plan, ``loss_parallel``), then ``constrain``; every rank computes on
  the whole batch; the elements through DTensor's functional collectives (activations) per step.

Each variant runs once (after 3 warm-up steps); the counts are per rank, the time is rank 0's median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import (
    CollectiveCounter,
    FunctionalCollectiveCounter,
    add_table_arguments,
    comma_list,
    free_port,
    load_average,
)

ENGINES = ("zero3", "zero2", "tp")


class Net(nn.Module):
    def __init__(self, V: int, D: int) -> None:
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.emb(x))))


def _build(V: int, D: int, N: int, constrained: bool) -> Net:
    from embconstraint import constrain

    torch.manual_seed(0)
    model = Net(V, D)
    if constrained:
        g = torch.Generator().manual_seed(1)
        constrain(model.emb, torch.randn(N, D, generator=g))
        constrain(model.head, torch.randn(N, D, generator=g))
    return model


def _zero_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,
            "memory_efficient_linear": False,
        },
        "steps_per_print": 10**9,
    }


def _steps(step_fn, steps: int) -> tuple[float, dict]:
    """Median step seconds (after 3 warm-up steps) and the last step's counts."""
    times, counts = [], {}
    for step in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        with CollectiveCounter() as comm, FunctionalCollectiveCounter() as fcomm:
            step_fn(step)
        dist.barrier()
        if step >= 3:
            times.append(time.perf_counter() - start)
            counts = {
                **{k: v for k, v in comm.counts.items() if v},
                **{f"dtensor {k}": v for k, v in fcomm.counts.items()},
            }
    return statistics.median(times), counts


def _zero(rank: int, stage: int, V: int, D: int, N: int, steps: int, constrained: bool) -> tuple[float, dict]:
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=(m := _build(V, D, N, constrained)), model_parameters=m.parameters(), config=_zero_config(stage)
    )

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(2 * i + rank)
        x, y = torch.randint(0, V, (8, 128), generator=g), torch.randint(0, V, (8, 128), generator=g)
        engine.backward(F.cross_entropy(engine(x).flatten(0, 1), y.flatten()))
        engine.step()

    return _steps(step, steps)


def _tp(rank: int, V: int, D: int, N: int, steps: int, constrained: bool) -> tuple[float, dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    from embconstraint import constrain

    mesh = init_device_mesh("cpu", (2,))
    model = parallelize_module(
        _build(V, D, N, False),
        mesh,
        {
            "emb": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        },
    )
    if constrained:  # torchtitan's order: tensor parallelism, then the constraint
        g = torch.Generator().manual_seed(1)
        constrain(model.emb, torch.randn(N, D, generator=g))
        constrain(model.head, torch.randn(N, D, generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        x, y = torch.randint(0, V, (8, 128), generator=g), torch.randint(0, V, (8, 128), generator=g)
        with loss_parallel():
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()

    return _steps(step, steps)


def run(rank: int, port: int, engines: list[str], V: int, D: int, N: int, steps: int) -> None:
    """One rank: every engine, plain then constrained; rank 0 prints the figures."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    if any(e.startswith("zero") for e in engines):
        import deepspeed

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (an inference all-reduce: compiles)
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=2)
    results = []
    for engine in engines:
        for constrained in (False, True):
            if engine == "tp":
                ms, counts = _tp(rank, V, D, N, steps, constrained)
            else:
                ms, counts = _zero(rank, int(engine[-1]), V, D, N, steps, constrained)
            results.append((engine, "constrained" if constrained else "plain", ms, counts))
    if rank == 0:
        print(
            f"V={V} D={D} pinned={N} (embedding and head) steps={steps}, 2 gloo ranks, load average {load_average()}"
        )
        for engine, kind, sec, counts in results:
            print(f"{engine:6s} {kind:12s} median step {sec * 1e3:8.1f} ms  elements per step {counts}")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sharded_comm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--engines",
        type=comma_list(str),
        default=list(ENGINES),
        help=f"comma-separated, among {', '.join(ENGINES)} (default: all)",
    )
    add_table_arguments(parser, steps=10)
    args = parser.parse_args(argv)
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose among {', '.join(ENGINES)}")
    mp.spawn(
        run, args=(free_port(), args.engines, args.v, args.d, args.n_pinned, args.steps), nprocs=2, join=True
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
