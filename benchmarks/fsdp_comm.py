"""Sharded training (FSDP2 ``fully_shard``) on 2 CPU gloo ranks: elements all-gathered and
reduce-scattered per step, and the median step time, for the same model with and without
``embconstraint.constrain`` on its embedding (docs/guides/sharded.md).

Usage: python -m benchmarks.fsdp_comm [V D N_PINNED STEPS]   (default 32768 256 32000 20)

Model: ``Embedding(V, D) -> Linear(D, D) -> mean(square)``, a batch of 8 x 128 ids per rank,
``fully_shard(emb)`` then ``fully_shard(model)``, SGD. Each variant runs twice, interleaved; the
median step (after 3 warm-up steps) of each run is printed, with the load average.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.harness import CollectiveCounter, add_table_arguments, free_port, load_average


class Net(nn.Module):
    def __init__(self, V: int, D: int) -> None:
        super().__init__()
        self.emb, self.body = nn.Embedding(V, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(x)).pow(2).mean()


def run(rank: int, port: int, V: int, D: int, N: int, steps: int) -> None:
    """One rank: both variants, twice each, interleaved; rank 0 prints the figures."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from embconstraint import constrain

    mesh = init_device_mesh("cpu", (2,))
    ref = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    results: dict[str, list] = {}
    for name in ("unconstrained", "constrained") * 2:  # twice, interleaved
        torch.manual_seed(0)
        model = Net(V, D)
        if name == "constrained":
            constrain(model.emb, ref)
        fully_shard(model.emb, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        times, counts = [], None
        for step in range(steps + 3):
            x = torch.randint(0, V, (8, 128), generator=torch.Generator().manual_seed(2 * step + rank))
            dist.barrier()
            start = time.perf_counter()
            with CollectiveCounter() as comm:
                model(x).backward()
                opt.step()
                opt.zero_grad()
            dist.barrier()
            if step >= 3:
                times.append(time.perf_counter() - start)
                counts = comm.counts["all_gather"], comm.counts["reduce_scatter"]
        results.setdefault(name, []).append((statistics.median(times), counts))
    if rank == 0:
        print(f"V={V} D={D} pinned={N} steps={steps}, load average {load_average()}")
        for name, runs in results.items():
            print(
                f"{name:14s} median step ms {[round(t * 1e3, 1) for t, _ in runs]}  "
                f"all-gathered / reduce-scattered elements per step {runs[0][1]}"
            )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fsdp_comm", description=__doc__.split("\n\n")[0]
    )
    add_table_arguments(parser, steps=20)
    args = parser.parse_args(argv)
    mp.spawn(run, args=(free_port(), args.v, args.d, args.n_pinned, args.steps), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
