"""What the distributed test scripts (``tests/scripts``: FSDP2, DeepSpeed, tensor parallelism) and
their pytest wrappers share: the global batch each rank takes its part of, the probe for tensors of a
given shape built in a step, and running a script whose ranks each record what they saw."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import TESTS, run_python, run_script

__all__ = ["ShapeProbe", "global_batch", "rank_records", "attempt", "save_record"]


def global_batch(step: int, rows: int, seq: int, vocab: int, bag_vocab: int):
    """The global batch of ``step``: ids ``(rows, seq)``, bag features ``(rows, 3)``, targets
    ``(rows, seq)``; rank ``r`` of ``w`` takes rows ``r * rows // w`` to ``(r + 1) * rows // w``."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, vocab, (rows, seq), generator=g)
    feats = torch.randint(0, bag_vocab, (rows, 3), generator=g)
    y = torch.randint(0, vocab, (rows, seq), generator=g)
    return x, feats, y


class ShapeProbe(TorchDispatchMode):
    """Records, in :attr:`hits`, every op that built a tensor of one of ``shapes``: new memory of
    that size (a view of an input, or a zero-stride stand-in, does not count)."""

    def __init__(self, shapes) -> None:
        super().__init__()
        self.shapes, self.hits = {tuple(s) for s in shapes}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [
            t
            for t in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes and t.layout == torch.strided
        ]
        if not outs:
            return out
        inputs = {
            _ptr(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in outs:
            if t.untyped_storage().nbytes() >= t.numel() * t.element_size() and _ptr(t) not in inputs:
                self.hits.append(str(func))
        return out


def _ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def rank_records(
    script: str,
    out: Path,
    *args: str,
    ranks: int = 2,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
) -> list[dict]:
    """Run ``tests/scripts/<script>.py OUT *args`` (after ``python *launcher``, e.g. ``["-m",
    "torch.distributed.run", "--nproc_per_node", "2"]``), whose ranks each save ``OUT/rank<r>.pt``;
    return the records, each checked for a recorded ``error`` (the assertion names it, or the output)."""
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    if launcher:
        run = run_python(*launcher, TESTS / "scripts" / f"{script}.py", out, *args, timeout=timeout, env=env)
    else:
        run = run_script(script, out, *args, timeout=timeout, env=env)
    paths = [Path(out) / f"rank{r}.pt" for r in range(ranks)]
    records = [torch.load(p, weights_only=False) for p in paths if os.path.exists(p)]
    assert len(records) == ranks, run.stdout[-2000:] + run.stderr[-4000:]
    for r in records:
        assert "error" not in r, r["error"]
    return records


def attempt(record: dict, name: str, fn) -> None:
    """``record[name] = fn()``; a failure is recorded (its traceback) for the wrapper to name."""
    try:
        record[name] = fn()
    except Exception:  # recorded, not raised: the other checks still run
        record[name] = "error: " + traceback.format_exc()[-3000:]


def save_record(record: dict, out: Path, rank: int) -> None:
    """A rank's last step: save its record as ``OUT/rank<r>.pt``, wait for the others, leave the group."""
    import torch.distributed as dist

    torch.save(record, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
