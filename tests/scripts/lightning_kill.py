"""Train with EmbeddingConstraint and a ModelCheckpoint every N steps, then SIGKILL this process.

Usage: PYTHONPATH=tests:. python tests/scripts/lightning_kill.py OUT_DIR EVERY_N_STEPS KILL_AT_STEP
(tests/test_lightning_faults.py runs it)

The process kills itself with SIGKILL in ``on_train_batch_end`` once ``global_step`` reaches
KILL_AT_STEP (mid-epoch, after the checkpoint at the last multiple of EVERY_N_STEPS was
written): no teardown, no ``on_exception``, nothing flushed, as when a node dies.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import pytorch_lightning as pl
import torch
from helpers.lightning import PLTinyLM, loader, reference, trainer_kwargs
from pytorch_lightning.callbacks import ModelCheckpoint

from embconstraint import EmbeddingConstraint


class _Kill(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out_dir: str, every: int, kill_at: int) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = PLTinyLM(step_data=True)
    checkpoints = ModelCheckpoint(
        dirpath=out_dir, filename="{step}", every_n_train_steps=every, save_top_k=-1
    )
    trainer = pl.Trainer(
        callbacks=[EmbeddingConstraint(model.embedding, reference()), _Kill(kill_at), checkpoints],
        **trainer_kwargs(out_dir, enable_checkpointing=True, max_steps=100),
    )
    trainer.fit(model, loader(), loader(batches=1, seed=5))
    raise SystemExit("not killed")  # reaching this line is a failure


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
