"""The fixed cost of a constrained lookup: forward + backward on a tiny table, against plain.

    python -m benchmarks.fixed_cost                 # V=100, D=8, ids (4, 8), 1 thread
    python -m benchmarks.fixed_cost --rounds 80     # more rounds on a noisy machine

On a tiny table the kernels take a few microseconds, so what a constrained embedding costs
above a plain ``nn.Embedding`` is its fixed per-call cost: the parametrization, the tensor
subclass's dispatch, the autograd nodes. Both embeddings run ``emb(ids).sum().backward()`` in the
same process, interleaved in blocks (``torch.utils.benchmark.Timer``, rotated order), with
``torch.set_num_threads(1)``; the figure is the median of the per-call block times. The
target is a ratio (machines differ several-fold in Python speed from day to day): the constrained
call costs at most twice the plain one.

``--clock wall`` (default) is the target's protocol, valid on a quiet machine; ``--clock thread``
times with the thread's CPU time (``time.thread_time``), which leaves out the time the thread
waits for a core: use it when other processes load the machine (``uptime``), and say so.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from benchmarks.harness import load_average
from embconstraint import constrain

TARGET_RATIO = 2.0
_CLOCKS = {"wall": timeit.default_timer, "thread": time.thread_time}


def _embeddings(vocab: int, dim: int, pinned: int, seed: int) -> dict[str, nn.Embedding]:
    torch.manual_seed(seed)
    plain = nn.Embedding(vocab, dim)
    constrained = nn.Embedding(vocab, dim)
    constrained.load_state_dict(plain.state_dict())
    constrain(constrained, plain.weight.detach()[:pinned].clone())
    return {"plain": plain, "embconstraint": constrained}


def _step(emb: nn.Embedding, ids: torch.Tensor) -> None:
    emb(ids).sum().backward()


def measure(
    vocab: int = 100,
    dim: int = 8,
    pinned: int = 90,
    batch: int = 4,
    seq: int = 8,
    rounds: int = 40,
    number: int = 100,
    seed: int = 0,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Per-call times (seconds) of each embedding: ``rounds`` blocks of ``number`` calls each,
    the embeddings in turn (rotated order), all in this process.

    >>> t = measure(rounds=2, number=5)
    >>> sorted(t), len(t["plain"])
    (['embconstraint', 'plain'], 2)
    """
    embs = _embeddings(vocab, dim, pinned, seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    timers = {
        name: benchmark.Timer(
            "step(emb, ids)",
            globals={"step": _step, "emb": emb, "ids": ids},
            num_threads=1,
            timer=_CLOCKS[clock],
        )
        for name, emb in embs.items()
    }
    for timer in timers.values():  # warm-up
        timer.timeit(number)
    times: dict[str, list[float]] = {name: [] for name in timers}
    names = list(timers)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timers[name].timeit(number).median)
    return times


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0],) * 3
    return q1, med, q3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fixed_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--vocab", type=int, default=100)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--pinned", type=int, default=90, help="pinned rows (the first ones)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--number", type=int, default=100, help="calls per block")
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="wall time (default; a quiet machine) or the thread's CPU time (a loaded one)",
    )
    args = parser.parse_args(argv)
    load = load_average()
    times = measure(
        args.vocab, args.dim, args.pinned, rounds=args.rounds, number=args.number, clock=args.clock
    )
    med = {}
    for name, xs in times.items():
        q1, m, q3 = _quartiles([x * 1e6 for x in xs])
        med[name] = m
        print(
            f"{name:>14}: median {m:6.1f} us per forward+backward (IQR {q3 - q1:.1f} us, "
            f"{len(xs)} blocks of {args.number})"
        )
    extra, ratio = med["embconstraint"] - med["plain"], med["embconstraint"] / med["plain"]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(
        f"fixed cost: +{extra:.1f} us over plain nn.Embedding, {ratio:.2f}x its forward+backward "
        f"(target <= {TARGET_RATIO:g}x: {verdict}); V={args.vocab}, D={args.dim}, 1 thread, {args.clock} clock"
    )
    after = load_average()
    if load is not None and after is not None:
        print(f"load average before {load[0]:.2f}, after {after[0]:.2f} (noisy if above ~1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
