"""A/B of one training step: embconstraint against the free-rows-only model, same process.

    python benchmarks/ab_step.py 10000      # V = 10k, D = 128, 90% pinned

Prints, for 3 rounds, the median over 200 steps (after 10 warm-up steps) of
embedding -> mean -> linear(16) -> cross-entropy -> AdamW, batches of 256 x 32 ids.
"""

import statistics
import sys
import time

import torch
from torch import nn

from embconstraint import constrain

torch.manual_seed(0)
V = int(sys.argv[1])
D = 128
n = int(V * 0.9)


def model(rows):
    return nn.ModuleDict(dict(emb=nn.Embedding(rows, D), lin=nn.Linear(D, 16)))


def step(m, opt, x, y):
    loss = nn.functional.cross_entropy(m["lin"](m["emb"](x).mean(1)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench(m, rows, reps=200):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
    xs = [torch.randint(0, rows, (256, 32)) for _ in range(8)]
    y = torch.randint(0, 16, (256,))
    for i in range(10):
        step(m, opt, xs[i % 8], y)
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        step(m, opt, xs[i % 8], y)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


free = model(V - n)
con = model(V)
constrain(con["emb"], con["emb"].weight[:n].detach().clone())
for _ in range(3):
    print(f"free {bench(free, V - n):.3f}  con {bench(con, V):.3f}  (median ms/step)")
