"""The vocabulary-growth demo (``embconstraint demo``), as functions usable from Python.

Model 1 learns 12 produce items (6 fruits, 6 vegetables) from context sentences. Then 4 new
items join; model 2 starts from model 1 (old rows copied, new rows fresh) and is trained on all
16 items twice: without a constraint, and with :class:`~embconstraint.EmbeddingConstraint`
pinning the 12 old item rows to model 1's. Everything is generated in code (:mod:`.data`, no
download) and runs in seconds on a CPU; :mod:`.run` trains, :mod:`.report` prints and plots.

>>> data = make_data(seed=0)
>>> len(data.items), len(data.old_items)
(16, 12)
"""

from __future__ import annotations

from .data import DemoData, make_data
from .report import DemoResult, RunResult, format_table, plot_embeddings
from .run import ProduceModel, accuracy, grow, run_demo, train

__all__ = [
    "DemoData",
    "DemoResult",
    "ProduceModel",
    "RunResult",
    "accuracy",
    "format_table",
    "grow",
    "make_data",
    "plot_embeddings",
    "run_demo",
    "train",
]
