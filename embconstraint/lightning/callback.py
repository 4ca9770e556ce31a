"""Lightning callback: keep rows of a LightningModule's embedding pinned during fit/validate/test/predict.

The callback is glue around :func:`embconstraint.constrain`: it installs the constraint in
``setup`` (before ``configure_optimizers``, so an optimizer built from ``self.parameters()``
holds only the trainable rows) and removes it in ``teardown`` or ``on_exception``, leaving the
merged weight as a plain ``nn.Parameter``. Checkpoints hold the plain ``(V, D)`` weight, so they
load into the module without the callback.

One class serves both Lightning packages: :class:`EmbeddingConstraint` subclasses
``pytorch_lightning.Callback`` and, when the ``lightning`` package is installed,
``lightning.pytorch.Callback`` too.

>>> import torch
>>> from embconstraint.lightning import EmbeddingConstraint
>>> old = torch.nn.Embedding(3, 4)
>>> EmbeddingConstraint("encoder.tok_emb", old)
EmbeddingConstraint(embedding='encoder.tok_emb', pinned=3, on_mismatch='error')
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._mechanism import (
    as_reference,
    check_constrain_args,
    check_on_mismatch,
    checked_indices,
    pin_of,
    pinned_deviation,
    pinned_values,
)
from ..core import constrain, is_constrained
from ..exceptions import CheckpointError, PinnedRowsError
from ..files import checkpoint_problem
from .support import (
    add_note,
    check_trainer,
    defer_until_configured,
    install_in_configure_model,
    lightning_classes,
    non_leaf_hint,
    optimizer_groups_problem,
    optimizer_state_problem,
    release_installed,
)

__all__ = ["EmbeddingConstraint"]


LOG_KEY = "constraint/max_abs_deviation"


def _callback_bases() -> tuple[type, ...]:
    bases = lightning_classes("Callback")
    if not bases:
        raise ImportError(
            "EmbeddingConstraint needs pytorch-lightning (or lightning): pip install 'embconstraint[lightning]'"
        )
    return tuple(bases)


class EmbeddingConstraint(*_callback_bases()):
    """Pin rows of a LightningModule's embedding to ``reference`` while the Trainer runs.

    Reference row ``i`` is pinned at row ``indices[i]`` (default: the first ``n`` rows), exactly,
    from the sanity-check validation on; only the other rows are trained. The callback installs
    :func:`embconstraint.constrain` in ``setup`` (so ``configure_optimizers`` sees only the
    trainable rows) and removes it in ``teardown``, or in ``on_exception`` when the run fails,
    leaving the merged weight as a plain ``nn.Parameter`` in the module. A weight tied to the
    embedding (an output head sharing its Parameter) computes with the constrained weight, and
    shares one plain Parameter with it again afterwards. Each train/validation/test epoch logs
    ``constraint/max_abs_deviation`` (largest ``|weight - reference|`` over the pinned rows; 0.0).

    Args:
        embedding: the ``nn.Embedding``/``nn.EmbeddingBag``, or its dotted path on the
            LightningModule (``"encoder.tok_emb"``), resolved in ``setup``.
        reference: an ``nn.Embedding``/``nn.EmbeddingBag`` or a ``(n, D)`` tensor; its values are
            read when the constraint is installed (at each ``fit``/``validate``/... call).
        indices: ``n`` distinct rows of ``embedding`` to pin (1-D integer tensor or sequence).
        on_mismatch: when a checkpoint (``ckpt_path=``) holds pinned rows that differ from
            ``reference``: ``"error"`` (default) or ``"checkpoint"`` (take the rows from it).
        log_key: metric name for the deviation, or ``None`` not to log it.

    >>> import torch, pytorch_lightning as pl
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> class LM(pl.LightningModule):
    ...     def __init__(self, vocab_dim, embedding_dim):
    ...         super().__init__()
    ...         self.embedding = torch.nn.Embedding(vocab_dim, embedding_dim)
    ...     def training_step(self, batch, batch_idx):
    ...         return self.embedding(batch[0]).pow(2).sum()
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> model, model_2 = LM(3, 2), LM(5, 2)
    >>> constraint = EmbeddingConstraint(model_2.embedding, model.embedding)
    >>> trainer_2 = pl.Trainer(callbacks=[constraint], max_steps=2, logger=False, enable_progress_bar=False,
    ...                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    >>> data = DataLoader(TensorDataset(torch.arange(5)), batch_size=5)
    >>> trainer_2.fit(model_2, data)
    >>> torch.equal(model_2.embedding.weight[:3], model.embedding.weight)   # old rows kept exactly
    True
    >>> type(model_2.embedding.weight).__name__, trainer_2.callback_metrics["constraint/max_abs_deviation"].item()
    ('Parameter', 0.0)
    """

    def __init__(
        self,
        embedding: nn.Module | str,
        reference: nn.Module | Tensor,
        *,
        indices: Tensor | Sequence[int] | None = None,
        on_mismatch: Literal["error", "checkpoint"] = "error",
        log_key: str | None = LOG_KEY,
    ) -> None:
        super().__init__()
        if isinstance(embedding, str):
            if not embedding or not all(part.isidentifier() for part in embedding.split(".")):
                raise ValueError(
                    f"embedding path must be a dotted attribute path such as 'encoder.tok_emb', got {embedding!r}"
                )
        elif not isinstance(embedding, (nn.Embedding, nn.EmbeddingBag)):
            raise TypeError(
                "embedding must be an nn.Embedding, an nn.EmbeddingBag or a dotted path on the LightningModule "
                f"(str), got {type(embedding).__name__}"
            )
        check_on_mismatch(on_mismatch)
        if log_key is not None and (not isinstance(log_key, str) or not log_key):
            raise TypeError(f"log_key must be a non-empty str or None, got {log_key!r}")
        if isinstance(embedding, nn.Module):
            check_constrain_args(embedding, reference, indices, on_mismatch)  # what constrain() would refuse
        else:  # the embedding's size is known in setup
            checked_indices(indices, as_reference(reference).shape[0], None)
        self.embedding = embedding
        self.reference = reference
        self.indices = indices
        self.on_mismatch = on_mismatch
        self.log_key = log_key
        self._installed: nn.Module | None = None  # the embedding while constrained by this callback
        self._root: nn.Module | None = None  # the LightningModule it was installed in
        self._target: Tensor | None = None  # pinned rows taken from a checkpoint (on_mismatch="checkpoint")
        self._loaded: dict[str, Any] | None = None  # a checkpoint being restored, until on_fit_start

    # -- identity -----------------------------------------------------------------------------
    def _name(self) -> str:
        if isinstance(self.embedding, str):
            return self.embedding
        return f"{type(self.embedding).__name__}@{id(self.embedding):x}"

    @property
    def state_key(self) -> str:
        # Unique per constrained embedding, so that several constraints can share a Trainer.
        return self._generate_state_key(embedding=self._name())

    def __repr__(self) -> str:
        pinned = as_reference(self.reference).shape[0]
        return (
            f"{type(self).__name__}(embedding={self._name()!r}, pinned={pinned}, "
            f"on_mismatch={self.on_mismatch!r})"
        )

    # -- checks ---------------------------------------------------------------------------------
    def _resolve(self, pl_module: nn.Module) -> nn.Module:
        if not isinstance(self.embedding, str):
            if not any(m is self.embedding for m in pl_module.modules()):
                raise ValueError(
                    f"EmbeddingConstraint: the embedding is not a submodule of {type(pl_module).__name__}; "
                    "pass the embedding of the model given to the Trainer (or its dotted path)"
                )
            return self.embedding
        try:
            module = pl_module.get_submodule(self.embedding)
        except AttributeError as err:
            raise ValueError(
                f"EmbeddingConstraint: {type(pl_module).__name__} has no submodule {self.embedding!r} ({err}); "
                "the embedding must exist when the Trainer calls setup, or be created by LightningModule.configure_model"
            ) from None
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            raise TypeError(
                f"EmbeddingConstraint: {type(pl_module).__name__}.{self.embedding} must be an nn.Embedding or "
                f"nn.EmbeddingBag, got {type(module).__name__}"
            )
        return module

    # -- install / remove -----------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Install the constraint (runs before ``configure_optimizers`` and checkpoint restore).

        An embedding (named by its path) that does not exist yet is constrained while the
        module's ``configure_model`` creates it: the moment it (or its parent) is assigned, so
        before a ``fully_shard`` there, and at the latest right after ``configure_model``.
        """
        if self._installed is not None and is_constrained(self._installed):
            return
        if isinstance(self.embedding, str) and defer_until_configured(pl_module, self.embedding):
            install_in_configure_model(
                pl_module,
                self.embedding,
                lambda: self._installed is not None,
                lambda: self._install(trainer, pl_module, self._resolve(pl_module)),
            )
            return
        self._install(trainer, pl_module, self._resolve(pl_module))

    def _install(self, trainer: Any, pl_module: nn.Module, embedding: nn.Module) -> None:
        check_trainer(trainer, embedding, self.reference)
        try:
            constrain(
                embedding, self.reference, root=pl_module, indices=self.indices, on_mismatch=self.on_mismatch
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"EmbeddingConstraint({self._name()!r}): {err}") from None
        self._installed, self._root, self._target = embedding, pl_module, None

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Remove the constraint; the module keeps the merged weight as a plain Parameter."""
        self._remove()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        """Remove the constraint when the run fails, so that the module is left usable.

        When the failure came from an unreadable ``ckpt_path`` or from pinned rows that differ
        from the reference, a note saying so is added to the exception.
        """
        hint = (
            None
            if self._installed is None or self._root is None
            else non_leaf_hint(exception, self._root, self._installed)
        )
        self._remove()
        if hint is not None:
            add_note(exception, hint)
        if not hasattr(exception, "add_note") or isinstance(exception, CheckpointError):  # add_note: 3.11+
            return
        path = getattr(trainer, "ckpt_path", None)
        problem = checkpoint_problem(path) if path else None
        if problem is not None:  # whatever failed, a damaged checkpoint is the news
            exception.add_note(
                f"EmbeddingConstraint: cannot resume from checkpoint {os.fspath(path)!r}: {problem}."
            )
        elif isinstance(exception, PinnedRowsError):
            exception.add_note(
                "EmbeddingConstraint: the checkpoint's pinned rows differ from the reference; pass "
                "EmbeddingConstraint(..., on_mismatch='checkpoint') to take them from the checkpoint."
            )

    def on_load_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint file that loaded but fails its CRC check (silently flipped bits);
        keep the checkpoint until ``on_fit_start`` checks its optimizer states."""
        path = getattr(trainer, "ckpt_path", None)
        problem = checkpoint_problem(path) if path else None
        if problem is not None:
            raise CheckpointError(
                f"EmbeddingConstraint: cannot resume from checkpoint {os.fspath(path)!r}: {problem}. "
                "Resume from another checkpoint; the module's weights now hold the damaged values."
            )
        self._loaded = checkpoint

    def _remove(self) -> None:
        embedding, self._installed, self._target, self._loaded = self._installed, None, None, None
        if embedding is None:
            return
        root, self._root = self._root, None
        release_installed(embedding, root)

    # -- the deviation metric --------------------------------------------------------------------
    @torch.no_grad()
    def max_abs_deviation(self) -> Tensor:
        """Largest ``|weight - reference|`` over the pinned rows (0-dim tensor on the weight's device).

        With ``on_mismatch="checkpoint"`` the pinned rows are compared with the values they held when
        the run started (after a checkpoint was restored) instead of the reference. The hooks can be
        called by hand, outside a Trainer:

        >>> import torch
        >>> emb = torch.nn.Embedding(5, 2)
        >>> model = torch.nn.Sequential(emb)
        >>> constraint = EmbeddingConstraint(emb, torch.zeros(3, 2))
        >>> constraint.setup(None, model, "fit")
        >>> constraint.max_abs_deviation().item(), tuple(emb.weight.shape)
        (0.0, (5, 2))
        >>> constraint.teardown(None, model, "fit")
        >>> type(emb.weight).__name__, torch.equal(emb.weight[:3], torch.zeros(3, 2))
        ('Parameter', True)
        """
        embedding = self._installed
        if embedding is None:
            raise RuntimeError("EmbeddingConstraint.max_abs_deviation: the constraint is not installed")
        target = self._target if self._target is not None else as_reference(self.reference)
        return pinned_deviation(embedding, target)

    def _capture_target(self) -> None:
        # With on_mismatch="checkpoint" the pinned rows may come from a checkpoint restored after
        # setup: they, not the reference, are what the run must keep.
        if self.on_mismatch == "checkpoint" and self._installed is not None and self._target is None:
            self._target = pinned_values(self._installed).detach().clone()

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # Runs after the optimizers are built and before Lightning loads their checkpointed state.
        self._capture_target()
        if self._installed is not None and self._root is not None:
            name = next(
                (n for n, p in self._root.named_parameters() if p is pin_of(self._installed).free_parameter),
                "parametrizations.weight.original",
            )
            problem = optimizer_groups_problem(pin_of(self._installed), name, trainer.optimizers)
            if problem is not None:
                warnings.warn(f"EmbeddingConstraint: {problem}", UserWarning, stacklevel=2)
        checkpoint, self._loaded = self._loaded, None
        if checkpoint is not None and self._installed is not None:
            problem = optimizer_state_problem(
                pin_of(self._installed), trainer.optimizers, checkpoint.get("optimizer_states", ())
            )
            if problem is not None:
                raise ValueError(
                    f"EmbeddingConstraint: {problem}: the checkpoint was written without this constraint. To start "
                    "from its weights, load them (MyModule.load_from_checkpoint(path)) and fit without ckpt_path."
                )

    def on_validation_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._capture_target()

    def on_test_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._capture_target()

    def on_predict_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._capture_target()

    def _log(self, trainer: Any, pl_module: Any) -> None:
        if self.log_key is None or self._installed is None or getattr(trainer, "barebones", False):
            return  # barebones Trainers refuse self.log
        pl_module.log(
            self.log_key,
            self.max_abs_deviation().float(),
            on_step=False,
            on_epoch=True,
            sync_dist=trainer.world_size > 1,
            reduce_fx="max",
            batch_size=1,
        )

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._log(trainer, pl_module)
