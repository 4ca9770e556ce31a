"""``SaveRowsCallback``: the rows file in every ``transformers.Trainer`` checkpoint, and the rows of
the checkpoint the Trainer loads (exposed by :mod:`embconstraint.hf`; this module imports ``transformers``).

A ``Trainer`` checkpoint of a ``PeftModel`` holds the adapter only, so the trained new rows of a
constrained embedding (or head) would be missing from it, and a checkpoint the Trainer loads back
(``resume_from_checkpoint``, ``load_best_model_at_end``) would bring back the adapter of that
checkpoint with the rows of another. The callback writes the rows with
:func:`embconstraint.save_rows` into each checkpoint folder, as :data:`ROWS_FILE`, and makes
every checkpoint the Trainer loads bring its rows back (see :class:`SaveRowsCallback`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._mechanism import gathered_params, zero_managed
from ..core import is_constrained
from ..files import load_rows, loaded_rows, save_rows
from .adapters import ROWS_FILE, constrained_pins, is_peft_model, restored_rows
from .guards import adopt_peft_wrapper, guard_peft_model, is_guarded

__all__ = ["SaveRowsCallback", "ROWS_FILE"]

# What a Trainer checkpoint holds when it holds the whole model (the rows come back with it).
_FULL_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


class SaveRowsCallback(TrainerCallback):
    """Keep the trained rows with the right checkpoint in a ``transformers.Trainer`` run.

    - ``on_save``: write the free rows of every constrained weight into each checkpoint folder
      (main process only; on a ``PeftModel`` constrained through :mod:`embconstraint.hf` its
      ``save_pretrained`` has already written them).
    - When the Trainer is built (``on_init_end``): a ``PeftModel`` the trainer made around a model
      constrained through :mod:`embconstraint.hf` (TRL's ``peft_config=``) gets its new rows trainable
      again and the ``PeftModel`` hooks (:func:`~embconstraint.hf.guards.adopt_peft_wrapper`).
    - When the Trainer is built and when training starts, a constrained
      ``PeftModel``'s ``load_adapter`` is made to load a checkpoint folder's rows file with the
      adapter: ``train(resume_from_checkpoint=...)`` then restores the rows of that checkpoint,
      with no manual :func:`~embconstraint.load_rows` (which still works). A resume of a
      ``PeftModel`` that restored no rows (its checkpoint has no rows file) is refused in
      ``on_train_begin``, before any step.
    - ``on_train_end`` with ``load_best_model_at_end``: the rows of the best checkpoint are
      loaded, as its adapter was; a best checkpoint without a rows file is refused
      (``RuntimeError``). A checkpoint that holds the whole model brings its rows back by itself.

    ``filename`` is the file's name in the folder (default :data:`ROWS_FILE`, the name the
    ``PeftModel`` hooks read and write).

    >>> SaveRowsCallback().filename
    'embconstraint_rows.safetensors'
    """

    def __init__(self, filename: str = ROWS_FILE) -> None:
        if not isinstance(filename, str) or not filename.endswith(".safetensors"):
            raise ValueError(f"filename must be a name ending in .safetensors, got {filename!r}")
        self.filename = filename

    def on_init_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is not None:
            adopt_peft_wrapper(model)  # before the Trainer builds its optimizer (in train())
        _hook(model)

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        _hook(model)
        restored = restored_rows(model) if model is not None else None
        if not _adapter_only(model) or state.global_step == 0 or _deepspeed(model):
            return  # (DeepSpeed's own checkpoint brought back every trainable Parameter, the rows too)
        if restored is None and not loaded_rows(model):
            raise RuntimeError(
                f"resumed a PeftModel at step {state.global_step} without its trained rows: the checkpoint folder "
                f"has no {self.filename}, so the adapter is the checkpoint's and the new rows are not. Load them "
                "first (embconstraint.load_rows(model, rows_file)) and call train(resume_from_checkpoint=...) again"
            )

    def on_save(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self.filename == ROWS_FILE and is_peft_model(model) and is_guarded(model, "save_pretrained"):
            # the PeftModel's save_pretrained wrote it with this checkpoint (from the state dict the Trainer
            # saved: DeepSpeed ZeRO-3's consolidated one where the rows are partitioned)
            if state.is_world_process_zero and folder.is_dir() and not (folder / ROWS_FILE).is_file():
                save_rows(model, folder / self.filename)
            return
        # Under DeepSpeed ZeRO-3 the rows are partitioned: every rank gathers them, the main one writes.
        with gathered_params(pin.free_parameter for pin in constrained_pins(model)):
            if state.is_world_process_zero and folder.is_dir():
                save_rows(model, folder / self.filename)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        best = state.best_model_checkpoint
        if not (args.load_best_model_at_end and best is not None and _adapter_only(model)) or _deepspeed(
            model
        ):
            return  # (DeepSpeed loads the best checkpoint with its own: every trainable Parameter, the rows too)
        if any((Path(best) / name).is_file() for name in _FULL_WEIGHTS):
            return  # the Trainer loaded the whole model: its rows came with it
        path = Path(best) / self.filename
        if not path.is_file():
            raise RuntimeError(
                f"load_best_model_at_end restored the adapter of {best}, but that folder has no {self.filename}: "
                "the model now has that checkpoint's adapter and the last step's new rows. Load the rows saved "
                "with that checkpoint, or train with SaveRowsCallback from the start"
            )
        load_rows(model, path)


def _adapter_only(model: nn.Module | None) -> bool:
    """A constrained ``PeftModel``: its Trainer checkpoints hold the adapter, not the rows."""
    return model is not None and is_peft_model(model) and any(is_constrained(m) for m in model.modules())


def _deepspeed(model: nn.Module | None) -> bool:
    """Whether DeepSpeed manages the constrained weights of ``model`` (its checkpoints then hold their rows)."""
    return model is not None and any(zero_managed(pin.free_parameter) for pin in constrained_pins(model))


def _hook(model: nn.Module | None) -> None:
    if _adapter_only(model):
        guard_peft_model(model, rows_off=False)
