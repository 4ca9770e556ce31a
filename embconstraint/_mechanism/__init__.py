"""How embconstraint pins rows: the mechanism, private to the package.

Layers, each importing only those above it:

- :mod:`.layout`: user row order <-> table order (no autograd, no ``nn.Module``).
- :mod:`.kernels`: the autograd kernels (lookup, bag) whose backward reaches the free rows only;
  :mod:`.head_kernels`: those of an output head.
- :mod:`.sharded`: the few conversions FSDP2's ``DTensor`` free rows need.
- :mod:`.dispatch`: what a guarded weight reads of the torch call it intercepts (writes, setters).
- :mod:`.weight`: the tensor a constrained module computes with (a write-guarding subclass);
  :mod:`.handlers`: the ops it sends to the kernels (entered in ``weight.HANDLED`` when imported,
  below); :mod:`.traced`: the one it computes with inside ``torch.compile``.
- :mod:`.storage`: how the rows are stored (the table, or the split storage of sharded training);
  :mod:`.guards`: what the parametrizations notice of the torch code around them.
- :mod:`.parametrization`: :class:`PinnedRows` (owns the table) and :class:`TiedTo` (a tied head).
- :mod:`.accessors`: the fast getter and the ``_apply`` installed on a constrained module's class.
- :mod:`.checks`: what ``constrain`` refuses, checked before anything changes.
- :mod:`.hooks`: plain-key state dicts; :mod:`.ties`: who else holds a Parameter; :mod:`.queries`.
- :mod:`.zero`: a module DeepSpeed ZeRO-3 partitioned, gathered while it is constrained.
- :mod:`.tensor_parallel`: a table whose rows are sharded over a mesh (vocabulary-parallel), each rank
  constraining its own rows.
- :mod:`.optimizer`: what ``release(module, optimizer=)`` does to the optimizer's state (widened to every row).

The names below are the interface the front door (:mod:`embconstraint.core`), the file formats
(:mod:`embconstraint.files`) and the integrations (:mod:`embconstraint.lightning`,
:mod:`embconstraint.hf`) use; nothing outside this package imports its modules directly.
The mechanism never imports the file formats, the integrations, the CLI or the demo.
"""

from __future__ import annotations

# (handlers: imported for what it does, filling weight.HANDLED: the kernels of every constrained weight's
# lookups, bags and heads; importing any module of this package runs this file first)
from . import handlers  # noqa: F401
from .accessors import install_accessors
from .checks import (
    as_reference,
    check_constrain_args,
    check_on_mismatch,
    check_reference,
    checked_indices,
    reference_bias,
)
from .hooks import install_hooks, remove_hooks
from .layout import Layout
from .optimizer import check_optimizer, widened, widening_plan
from .parametrization import PinnedRows, TiedTo, parametrization_list, pin_of, tie_of
from .queries import pinned_deviation, pinned_values, tied_modules
from .sharded import full, is_sharded, zero_managed, zero_partitioned
from .tensor_parallel import (
    RowShard,
    hf_styled_forward,
    install_tp_hooks,
    local_layout,
    local_part,
    row_shard,
    rows_on,
)
from .ties import shared
from .zero import gathered, gathered_params

__all__ = [
    "Layout",
    "PinnedRows",
    "TiedTo",
    "pin_of",
    "tie_of",
    "parametrization_list",
    "install_accessors",
    "install_hooks",
    "remove_hooks",
    "shared",
    "tied_modules",
    "pinned_values",
    "pinned_deviation",
    "as_reference",
    "check_constrain_args",
    "check_on_mismatch",
    "check_reference",
    "checked_indices",
    "reference_bias",
    "full",
    "is_sharded",
    "zero_managed",
    "zero_partitioned",
    "gathered",
    "gathered_params",
    "RowShard",
    "row_shard",
    "rows_on",
    "local_layout",
    "local_part",
    "install_tp_hooks",
    "hf_styled_forward",
    "check_optimizer",
    "widening_plan",
    "widened",
]
