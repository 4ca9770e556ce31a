"""Tiny LightningModules, data and a fit helper for the Lightning tests and scripts.

``PLTinyLM`` subclasses ``pytorch_lightning.LightningModule`` and ``LTinyLM`` subclasses
``lightning.pytorch.LightningModule``; both are the same model: an embedding of ``vocab``
rows, a linear output head (optionally tied to the embedding) and a next-token loss.
Everything is deterministic: the data is generated from fixed seeds, loaders do not shuffle,
the model has no dropout, so two runs of the same steps give bitwise equal weights.
"""

from __future__ import annotations

import lightning.pytorch as lpt
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB_OLD, VOCAB_NEW, DIM = 6, 10, 4
BATCH, BATCHES_PER_EPOCH = 8, 4


def _define(base: type, name: str) -> type:
    class TinyLM(base):
        """Embedding -> (tied) head -> cross entropy on (token, next token) pairs."""

        def __init__(
            self,
            vocab_dim: int = VOCAB_NEW,
            embedding_dim: int = DIM,
            tie: bool = False,
            lr: float = 0.05,
            nested: bool = False,
            step_data: bool = False,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            embedding = nn.Embedding(vocab_dim, embedding_dim)
            if nested:  # reachable as "encoder.tok_emb", for dotted-path tests
                self.encoder = nn.Module()
                self.encoder.tok_emb = embedding
            else:
                self.embedding = embedding
            self.head = nn.Linear(embedding_dim, vocab_dim, bias=False)
            if tie:
                self.head.weight = embedding.weight
            self.proj = nn.Linear(embedding_dim, embedding_dim)

        @property
        def emb(self) -> nn.Embedding:
            return self.encoder.tok_emb if self.hparams.nested else self.embedding

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.proj(self.emb(x))))

        def _loss(self, batch) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def training_step(self, batch, batch_idx):
            if self.hparams.step_data:  # the batch of step s depends on s only (see step_batch)
                batch = step_batch(self.global_step, self.hparams.vocab_dim)
            loss = self._loss(batch)
            self.log("train_loss", loss, batch_size=len(batch[0]))
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self._loss(batch), batch_size=len(batch[0]))

        def test_step(self, batch, batch_idx):
            self.log("test_loss", self._loss(batch), batch_size=len(batch[0]))

        def predict_step(self, batch, batch_idx):
            return self(batch[0])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    TinyLM.__name__ = TinyLM.__qualname__ = name
    return TinyLM


PLTinyLM = _define(pl.LightningModule, "PLTinyLM")
LTinyLM = _define(lpt.LightningModule, "LTinyLM")
PACKAGES = {"pytorch_lightning": (pl, PLTinyLM), "lightning.pytorch": (lpt, LTinyLM)}


def reference(vocab: int = VOCAB_OLD, dim: int = DIM, seed: int = 1) -> nn.Embedding:
    """The "model 1" embedding whose rows the new model must keep."""
    torch.manual_seed(seed)
    return nn.Embedding(vocab, dim)


def loader(vocab: int = VOCAB_NEW, batches: int = BATCHES_PER_EPOCH, seed: int = 0) -> DataLoader:
    """Fixed (token, next token) pairs; tokens of both the old and the new vocabulary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batches * BATCH,), generator=g)
    return DataLoader(TensorDataset(x, (x * 3 + 1) % vocab), batch_size=BATCH, shuffle=False)


def step_batch(step: int, vocab: int = VOCAB_NEW) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of optimizer step ``step`` for ``step_data=True`` models.

    Lightning restarts a plain DataLoader's epoch when it resumes from a mid-epoch checkpoint;
    keying the data on the step makes a resumed run see the same data as an uninterrupted one.
    """
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, vocab, (BATCH,), generator=g)
    return x, (x * 3 + 1) % vocab


def probe(pkg: str, reference_rows: torch.Tensor):
    """A callback (for Lightning package ``pkg``) recording, at each stage of a run, whether the
    embedding is constrained and its pinned rows (the first ``len(reference_rows)``) are exact."""
    from embconstraint import is_constrained

    base = PACKAGES[pkg][0].Callback

    class Probe(base):
        def __init__(self) -> None:
            self.seen: list[tuple[str, bool, bool]] = []  # (event, constrained, pinned rows exact)
            self.optimizer_shapes: list[tuple[int, ...]] = []
            self.weights: list[torch.Tensor] = []  # merged embedding weight after each step

        def _record(self, event: str, pl_module) -> None:
            w = pl_module.emb.weight.detach()
            exact = torch.equal(w[: len(reference_rows)], reference_rows)
            self.seen.append((event, is_constrained(pl_module.emb), exact))

        def on_train_start(self, trainer, pl_module):
            self.optimizer_shapes = [
                tuple(p.shape) for g in trainer.optimizers[0].param_groups for p in g["params"]
            ]
            self._record("train_start", pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._record("train_batch", pl_module)
            self.weights.append(pl_module.emb.weight.detach().clone())

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._record("sanity" if trainer.sanity_checking else "validation", pl_module)

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._record("test", pl_module)

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._record("predict", pl_module)

    return Probe()


def fit(model, callbacks, tmp_path, pkg: str = "pytorch_lightning", val: bool = True, ckpt_path=None, **kw):
    """``Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw)).fit(...)`` on :func:`loader`
    (and a one-batch validation loader when ``val``), for Lightning package ``pkg``; the trainer."""
    trainer = PACKAGES[pkg][0].Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, loader(), loader(batches=1, seed=5) if val else None, ckpt_path=ckpt_path)
    return trainer


def trainer_kwargs(tmp_path=None, **overrides) -> dict:
    """Quiet, fast Trainer arguments for tests."""
    kw = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=1,
        limit_val_batches=1,
        deterministic=True,
    )
    if tmp_path is not None:
        kw["default_root_dir"] = str(tmp_path)
    kw.update(overrides)
    return kw
