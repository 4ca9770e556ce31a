"""The vocabulary-growth demo's models and training run (``embconstraint demo``)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .data import make_data
from .report import DemoResult, RunResult, format_table, plot_embeddings

__all__ = ["ProduceModel", "accuracy", "grow", "run_demo", "train"]

DEFAULT_EPOCHS = 12
_INIT_STD = 0.1


class ProduceModel(pl.LightningModule):
    """Context words (mean of an ``nn.EmbeddingBag``) -> linear map -> dot product with every
    row of ``items`` (an ``nn.Embedding``: the vocabulary that grows)."""

    def __init__(self, num_items: int, num_words: int, dim: int = 16, lr: float = 0.03) -> None:
        super().__init__()
        self.context = nn.EmbeddingBag(num_words, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)
        self.items = nn.Embedding(num_items, dim)
        nn.init.normal_(self.items.weight, std=_INIT_STD)
        self.lr = lr

    def forward(self, contexts: Tensor) -> Tensor:
        return self.proj(self.context(contexts)) @ self.items.weight.T

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        contexts, targets = batch
        loss = nn.functional.cross_entropy(self(contexts), targets)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def grow(model: ProduceModel, num_items: int, seed: int = 0) -> ProduceModel:
    """A copy of ``model`` with ``num_items`` item rows: old rows and the context encoder
    copied, the new rows freshly initialized.

    >>> old = ProduceModel(12, 40)
    >>> new = grow(old, 16)
    >>> new.items.weight.shape[0], torch.equal(new.items.weight[:12], old.items.weight)
    (16, True)
    """
    torch.manual_seed(seed)
    new = ProduceModel(num_items, model.context.num_embeddings, model.items.embedding_dim, model.lr)
    old_rows = model.items.num_embeddings
    with torch.no_grad():
        new.context.load_state_dict(model.context.state_dict())
        new.proj.load_state_dict(model.proj.state_dict())
        new.items.weight[:old_rows] = model.items.weight.detach().cpu()
    return new


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info lines (GPU available..., tips) and the num_workers hint."""
    # Both packages may be loaded (the callback subclasses both); each routes its info lines
    # through its own loggers.
    loggers = [
        logging.getLogger(name)
        for pkg in ("pytorch_lightning", "lightning.pytorch")
        for name in (pkg, f"{pkg}.utilities.rank_zero")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def train(
    model: ProduceModel,
    contexts: Tensor,
    targets: Tensor,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    accelerator: str = "cpu",
    callbacks: list | None = None,
    progress_bar: bool = True,
    checkpoint: str | Path | None = None,
) -> float:
    """Fit ``model`` with a Lightning ``Trainer``; returns the wall time of ``fit`` in seconds.

    ``checkpoint``: if given, the trained model is saved there (``Trainer.save_checkpoint``).

    >>> data = make_data(seed=0)
    >>> model = ProduceModel(12, len(data.words))
    >>> seconds = train(model, *data.subset("train", 12), epochs=1, progress_bar=False)
    >>> accuracy(model, *data.subset("test", 12)) > 1 / 12       # better than chance after one epoch
    True
    """
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(contexts, targets),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    with _quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            callbacks=callbacks or [],
        )
        start = time.perf_counter()
        trainer.fit(model, loader)
        seconds = time.perf_counter() - start
        if checkpoint is not None:
            trainer.save_checkpoint(checkpoint, weights_only=True)
    model.cpu()
    return seconds


@torch.no_grad()
def accuracy(model: ProduceModel, contexts: Tensor, targets: Tensor) -> float:
    """Share of ``targets`` that ``model`` ranks first (nan when there are none).

    >>> model = ProduceModel(3, 5)
    >>> accuracy(model, torch.tensor([[0, 1]]), model(torch.tensor([[0, 1]])).argmax(dim=1))
    1.0
    """
    if targets.numel() == 0:
        return math.nan
    model.eval()
    hits = model.cpu()(contexts).argmax(dim=1) == targets
    return float(hits.float().mean())


def _default_out() -> Path:
    base = Path.cwd() / f"embconstraint-demo-{datetime.now():%Y%m%d-%H%M%S}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it (shorter to read)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _check_accelerator(accelerator: str) -> None:
    if accelerator not in ("cpu", "gpu", "auto"):
        raise ValueError(f"accelerator must be 'cpu', 'gpu' or 'auto', got {accelerator!r}")
    if accelerator == "gpu" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        raise ValueError(
            "accelerator 'gpu' was requested but no GPU is available "
            "(torch.cuda.is_available() is False); use --accelerator cpu"
        )


def run_demo(
    epochs: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    accelerator: str = "cpu",
    progress_bar: bool = True,
    verbose: bool = True,
) -> DemoResult:
    """Run the whole demo; prints the table and writes ``embeddings.png`` and the three models'
    checkpoints (``model1.ckpt``, ``model2_unconstrained.ckpt``, ``model2_constrained.ckpt``)
    into ``out`` (default: a new ``./embconstraint-demo-YYYYmmdd-HHMMSS`` folder).

    >>> result = run_demo(epochs=2, out="demo-out")            # doctest: +SKIP
    >>> [run.max_dev for run in result.runs[1:]]                # doctest: +SKIP
    [0.61..., 0.0]
    """
    from ..files import verify
    from ..lightning import EmbeddingConstraint

    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    _check_accelerator(accelerator)
    out = _default_out() if out is None else Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)

    data = make_data(seed)
    n_old, n_all = data.num_old, len(data.items)
    say(
        f"embconstraint demo: predict a produce item from its context ({n_old} items, then "
        f"{n_all - n_old} new ones join)"
    )
    for i in (0, len(data.train_targets) - 1):
        say(f"  e.g. '{data.describe(i)}'")
    test_old = data.subset("test", n_old)
    keep_new = data.test_targets >= n_old
    test_new = (data.test_contexts[keep_new], data.test_targets[keep_new])
    ckpts = {name: out / f"{name}.ckpt" for name in ("model1", "model2_unconstrained", "model2_constrained")}

    say(f"\n[1/3] model 1: {n_old} items")
    torch.manual_seed(seed)
    model1 = ProduceModel(n_old, len(data.words))
    t1 = train(
        model1,
        *data.subset("train", n_old),
        epochs=epochs,
        seed=seed,
        accelerator=accelerator,
        progress_bar=progress_bar,
        checkpoint=ckpts["model1"],
    )
    ref = model1.items.weight.detach().clone()
    runs = [RunResult("model 1", n_old, t1, accuracy(model1, *test_old), weights=ref)]

    grown_train = data.subset("train", n_all)
    for step, constrained in ((2, False), (3, True)):
        name = "model 2, EmbeddingConstraint" if constrained else "model 2, no constraint"
        say(f"\n[{step}/3] {name}: {n_all} items, starting from model 1")
        model2 = grow(model1, n_all, seed=seed + 1)
        callbacks = [EmbeddingConstraint(model2.items, ref)] if constrained else []
        key = "model2_constrained" if constrained else "model2_unconstrained"
        seconds = train(
            model2,
            *grown_train,
            epochs=epochs,
            seed=seed,
            accelerator=accelerator,
            callbacks=callbacks,
            progress_bar=progress_bar,
            checkpoint=ckpts[key],
        )
        weights = model2.items.weight.detach().clone()
        check = verify({"items.weight": weights}, ref)
        runs.append(
            RunResult(
                name,
                n_all,
                seconds,
                accuracy(model2, *test_old),
                accuracy(model2, *test_new),
                max_dev=check.max_deviation,
                weights=weights,
            )
        )

    png = plot_embeddings(runs, data, out / "embeddings.png")
    say("\n" + format_table(runs))
    shown = {k: _shown(p) for k, p in ckpts.items()}
    say(
        f"\nwrote {_shown(out)}: {'embeddings.png, ' if png else ''}"
        f"{', '.join(p.name for p in ckpts.values())}"
    )
    say(
        "check the old rows with:\n"
        f"  embconstraint verify {shown['model2_constrained']} --reference {shown['model1']} --key items.weight\n"
        f"  embconstraint verify {shown['model2_unconstrained']} --reference {shown['model1']} --key items.weight"
    )
    return DemoResult(runs, out, png, ckpts, data)
