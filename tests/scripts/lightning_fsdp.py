"""Lightning on 2 CPU processes (gloo) with EmbeddingConstraint: ModelParallelStrategy (FSDP2
applied in configure_model, ``mp``; or tensor parallelism, ``tp``: the embeddings under
embconstraint.parallel's RowwiseParallel, the head under torch's ColwiseParallel) or DDP, an embedding
built in ``__init__`` (``emb``) and one built in ``configure_model`` (``late``), both constrained by
the callback.

Usage: PYTHONPATH=tests:. python tests/scripts/lightning_fsdp.py OUT_DIR {mp,tp,ddp}   (tests/test_lightning_distributed.py runs it)

Lightning's launcher re-runs this script for rank 1. Each rank writes OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

V, D, N = 98, 16, 60
STEPS = 3
REFS = {
    name: torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
    for name, seed in (("emb", 3), ("late", 4))
}


def _full(w: torch.Tensor) -> torch.Tensor:
    return w.full_tensor() if isinstance(w, DTensor) else w


class LM(L.LightningModule):
    def __init__(self, shard: bool | str) -> None:
        super().__init__()
        self.shard = shard
        self.emb = nn.Embedding(V, D)  # built in __init__
        self.head = nn.Linear(D, V)
        self.seen: list[bool] = []

    def configure_model(self) -> None:
        if not hasattr(self, "late"):
            self.late = nn.Embedding(V, D)  # built here, as large models are
        if self.shard == "tp":  # the vocabulary sharded over the tensor-parallel mesh (torchtitan's plan)
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            from embconstraint.parallel import RowwiseParallel

            style = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
            parallelize_module(
                self,
                self.device_mesh["tensor_parallel"],
                {"emb": style, "late": style, "head": ColwiseParallel(output_layouts=Replicate())},
            )
        elif self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            # training_step calls the layers (not self.forward), so each is its own FSDP unit
            for layer in (self.emb, self.late, self.head):
                fully_shard(layer, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.emb(x) + self.late(x)), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.shard == "tp":  # each rank holds its rows: the merged weights, gathered
            from embconstraint import merged_state_dict

            merged = merged_state_dict(self)
            self.seen.append(all(torch.equal(merged[f"{n}.weight"][:N], REFS[n]) for n in REFS))
            return
        with torch.no_grad():
            self.seen.append(all(torch.equal(_full(getattr(self, n).weight)[:N], REFS[n]) for n in REFS))

    def configure_optimizers(self):
        self.optim_shapes = sorted(tuple(p.shape) for p in self.parameters())
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _callbacks() -> list:
    from embconstraint.lightning import EmbeddingConstraint

    return [EmbeddingConstraint(n, REFS[n]) for n in REFS]


def main(out: str, strategy: str) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = LM(shard="tp" if strategy == "tp" else strategy == "mp")
    if strategy in ("mp", "tp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        # the default mesh is (data_parallel=num_nodes, tensor_parallel=devices): shard over data_parallel
        strat = (
            ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
            if strategy == "mp"
            else ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
        )
    else:
        strat = "ddp"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strat,
        max_steps=STEPS,
        callbacks=_callbacks(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(0, V, (48,), generator=g), torch.randint(0, V, (48,), generator=g))
    record: dict = {}
    try:
        trainer.fit(model, DataLoader(data, batch_size=8))
        record.update(
            seen=model.seen, optim_shapes=model.optim_shapes, strategy=type(trainer.strategy).__name__
        )
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
    torch.save({**record, "rank": trainer.global_rank}, Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Lightning leaves the gloo process group alive; torn down at interpreter exit it can abort
    # ("terminate called without an active exception", exit -6, seen once in CI): end it here.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
