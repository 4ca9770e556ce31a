"""``SaveRowsCallback``: the rows file in every ``transformers.Trainer`` checkpoint (exposed by
:mod:`embconstraint.hf`; this module imports ``transformers``).

A ``Trainer`` checkpoint of a ``PeftModel`` holds the adapter only, so the trained new rows of a
constrained embedding (or head) would be missing from it. The callback writes them with
:func:`embconstraint.save_rows` into each checkpoint folder, as :data:`ROWS_FILE`. To resume,
call ``load_rows(model, Path(checkpoint) / ROWS_FILE)`` before
``trainer.train(resume_from_checkpoint=checkpoint)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files import save_rows

__all__ = ["SaveRowsCallback", "ROWS_FILE"]

ROWS_FILE = "embconstraint_rows.safetensors"


class SaveRowsCallback(TrainerCallback):
    """Write the free rows of every constrained weight into each checkpoint folder (``on_save``).

    Only the main process writes. ``filename`` is the file's name in the folder
    (default :data:`ROWS_FILE`).

    >>> SaveRowsCallback().filename
    'embconstraint_rows.safetensors'
    """

    def __init__(self, filename: str = ROWS_FILE) -> None:
        if not isinstance(filename, str) or not filename.endswith(".safetensors"):
            raise ValueError(f"filename must be a name ending in .safetensors, got {filename!r}")
        self.filename = filename

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            save_rows(model, folder / self.filename)
