"""Two-process CPU DDP (gloo) run with EmbeddingConstraint; each rank saves what it saw.

Usage: PYTHONPATH=tests:. python tests/scripts/lightning_ddp.py OUT_DIR   (tests/test_lightning_distributed.py runs it)

Lightning's DDP launcher re-runs this script for rank 1. Each rank writes OUT_DIR/rank<r>.pt
with its final state dict, a per-step record (constrained? pinned rows exact? weights), the
parameters and buffers of the DDP-wrapped module, and the logged deviation.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from helpers.lightning import PLTinyLM, loader, probe, reference, trainer_kwargs

from embconstraint import EmbeddingConstraint


class _Wrapped(pl.Callback):
    """What DDP holds: its parameters (gradients all-reduced) and buffers (broadcast each step)."""

    def on_train_start(self, trainer, pl_module):
        ddp = trainer.strategy.model
        self.wrapper = type(ddp).__name__
        self.broadcast_buffers = bool(getattr(ddp, "broadcast_buffers", False))
        self.params = [(n, tuple(p.shape)) for n, p in ddp.named_parameters()]
        self.buffers = [(n, tuple(b.shape)) for n, b in ddp.named_buffers()]
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].clone())  # each rank gets its own shard of the data


def main(out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = PLTinyLM(tie=True)
    ref = reference()
    seen, wrapped = probe("pytorch_lightning", ref.weight.detach()), _Wrapped()
    trainer = pl.Trainer(
        callbacks=[EmbeddingConstraint(model.embedding, ref), seen, wrapped],
        **trainer_kwargs(out_dir, strategy="ddp", devices=2, max_steps=4, deterministic=False),
    )
    trainer.fit(model, loader(), loader(batches=2, seed=5))
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "tied": model.head.weight is model.embedding.weight,
            "weight_type": type(model.embedding.weight).__name__,
            "seen": seen.seen,
            "weights": seen.weights,
            "optimizer_shapes": seen.optimizer_shapes,
            "wrapper": wrapped.wrapper,
            "broadcast_buffers": wrapped.broadcast_buffers,
            "params": wrapped.params,
            "buffers": wrapped.buffers,
            "batches": wrapped.batches,
            "metric": trainer.callback_metrics["constraint/max_abs_deviation"].item(),
            "reference": ref.weight.detach().clone(),
        },
        Path(out_dir) / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    # Lightning leaves the gloo process group alive; torn down at interpreter exit it can abort
    # ("terminate called without an active exception", exit -6, seen once in CI): end it here.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
