"""A/B of one training step: embconstraint against the free-rows-only model, same process.

    python -m benchmarks.ab_step 10000      # V = 10k, D = 128, 90% pinned

Prints, for 3 rounds, the median over 200 steps (after 10 warm-up steps) of
embedding -> mean -> linear(16) -> cross-entropy -> AdamW, batches of 256 x 32 ids.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from benchmarks.harness import parse_size, timed_ms
from embconstraint import constrain

D = 128
CPU = torch.device("cpu")


def model(rows: int) -> nn.ModuleDict:
    return nn.ModuleDict(dict(emb=nn.Embedding(rows, D), lin=nn.Linear(D, 16)))


def step(m: nn.ModuleDict, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(m["lin"](m["emb"](x).mean(1)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench(m: nn.ModuleDict, rows: int, reps: int = 200) -> float:
    """Median ms of ``reps`` steps of ``m`` (ids over ``rows`` rows), after 10 warm-up steps."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
    xs = [torch.randint(0, rows, (256, 32)) for _ in range(8)]
    y = torch.randint(0, 16, (256,))
    for i in range(10):
        step(m, opt, xs[i % 8], y)
    return statistics.median(timed_ms(lambda i=i: step(m, opt, xs[i % 8], y), CPU)[1] for i in range(reps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab_step", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("vocab", type=parse_size, help="rows V, e.g. 10000 or 10k (90%% of them pinned)")
    V = parser.parse_args(argv).vocab
    torch.manual_seed(0)
    n = int(V * 0.9)
    free = model(V - n)
    con = model(V)
    constrain(con["emb"], con["emb"].weight[:n].detach().clone())
    for _ in range(3):
        print(f"free {bench(free, V - n):.3f}  con {bench(con, V):.3f}  (median ms/step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
