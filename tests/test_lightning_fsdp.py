"""EmbeddingConstraint under Lightning's ModelParallelStrategy (FSDP2 in configure_model) and DDP,
2 CPU processes, with an embedding built in configure_model (issue 11)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "_lightning_fsdp_script.py"
ROOT = SCRIPT.parent.parent
V, D, N = 98, 16, 60



@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["mp", "ddp"])
def test_two_cpu_processes_constrain_both_embeddings(strategy, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), strategy],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    for r in (0, 1):
        rec = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert "error" not in rec, rec["error"]
        assert rec["strategy"] == ("ModelParallelStrategy" if strategy == "mp" else "DDPStrategy")
        # both embeddings constrained before configure_optimizers: only their free rows are trained
        assert rec["optim_shapes"] == sorted([(V - N, D), (V - N, D), (V, D), (V,)])
        assert rec["seen"] == [True] * 3  # pinned rows bitwise the reference after every step, every rank


def test_embedding_created_in_configure_model_is_constrained_before_the_optimizer():
    """One process: the callback constrains an embedding that configure_model creates (when it is
    assigned), before configure_optimizers; a path that never appears is a clear error."""
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from embconstraint.lightning import EmbeddingConstraint

    ref = torch.randn(N, D, generator=torch.Generator().manual_seed(3))

    class LM(pl.LightningModule):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def configure_model(self):
            if not hasattr(self, "block"):
                self.block = nn.ModuleDict({"tok": nn.Embedding(V, D)})
            self.constrained_in_configure_model = type(self.block["tok"].weight).__name__ == "PinnedWeight"

        def training_step(self, batch, batch_idx):
            return self.block["tok"](batch[0]).pow(2).mean()

        def configure_optimizers(self):
            self.shapes = [tuple(p.shape) for p in self.parameters()]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(model, name):
        trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[EmbeddingConstraint(name, ref)],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(model, DataLoader(TensorDataset(torch.randint(0, V, (8,))), batch_size=4))

    model = LM("block.tok")
    fit(model, "block.tok")
    assert model.constrained_in_configure_model is True and model.shapes == [(V - N, D)]
    assert "configure_model" not in model.__dict__  # the hook is the class's again
    assert torch.equal(model.block["tok"].weight[:N], ref)  # released after fit: a plain Parameter
    assert type(model.block["tok"].weight).__name__ == "Parameter"
    with pytest.raises(ValueError, match="has no submodule .block.other..*configure_model"):
        fit(LM("block.other"), "block.other")
