"""Tensor parallelism of a model whose embedding (or head) is already constrained.

torch's ``RowwiseParallel`` and ``ColwiseParallel`` replace each Parameter of the module they shard by
name, and a constrained module's Parameter is ``parametrizations.weight.original``: they fail on it
(``KeyError: 'parameter name can't contain "."'``). Two ways work:

- shard first, then constrain: ``parallelize_module`` with torch's styles, then
  :func:`embconstraint.constrain` on the sharded module (its weight a DTensor sharded on rows), which
  keeps that split (torchtitan's order: tensor parallelism, then ``fully_shard``);
- constrain first (what :class:`~embconstraint.EmbeddingConstraint` does in Lightning's
  ``configure_model``, and ``constrain_new_tokens``), then ``parallelize_module`` with the styles here,
  drop-in subclasses of torch's that shard a constrained module (or a head tied to one) the same way
  and leave every other module to torch's.

Either way each rank holds its rows of the vocabulary, of which it constrains its own pinned rows;
the pinned rows are never communicated; the lookup and the logits communicate activations as the
plain styles do. Supported: ``RowwiseParallel`` on an ``nn.Embedding`` (vocabulary-parallel lookup),
``ColwiseParallel`` on an ``nn.Linear`` head (column-parallel logits, ``output_layouts=Shard(-1)`` for
``loss_parallel``); not ``ColwiseParallel`` on a constrained embedding nor ``RowwiseParallel`` on a
constrained head (they shard the embedding dimension).

>>> from embconstraint.parallel import ColwiseParallel, RowwiseParallel
>>> import torch.distributed.tensor.parallel as tp
>>> issubclass(RowwiseParallel, tp.RowwiseParallel), issubclass(ColwiseParallel, tp.ColwiseParallel)
(True, True)
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel as _ColwiseParallel
from torch.distributed.tensor.parallel import RowwiseParallel as _RowwiseParallel

from ._mechanism import pin_of, pinned_values, rows_on, tie_of
from .core import check_constrain, is_constrained, release

__all__ = ["RowwiseParallel", "ColwiseParallel"]


def _kind(module: nn.Module) -> str:
    """The module's class as the user wrote it (not parametrize's ``Parametrized...`` subclass)."""
    cls = type(module)
    return (cls.__bases__[0] if hasattr(module, "parametrizations") else cls).__name__


def _tie(module: nn.Module) -> Any:
    return tie_of(module, "weight") if hasattr(module, "parametrizations") else None


def _register(style: Any, module: nn.Module, mesh: Any) -> None:
    """The style's own input and output functions, as ``distribute_module`` registers them (it would
    also make every plain Parameter of the module a replicated DTensor: the rows are this rank's),
    around the module's own hooks of its rows: the input function runs first, the output one last."""
    input_fn = partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts)
    output_fn = partial(style._prepare_output_fn, style.output_layouts, style.use_local_output)
    module.register_forward_pre_hook(lambda mod, inputs: input_fn(mod, inputs, mesh), prepend=True)
    module.register_forward_hook(lambda mod, inputs, outputs: output_fn(mod, outputs, mesh))


def _shard_constrained(module: nn.Module, mesh: Any) -> None:
    """Shard a constrained module's rows over ``mesh``: release it (and the modules tied to it), then
    constrain this rank's rows again, with the same pinned rows (see ``ConstrainPlan._apply_sharded``);
    a tied head computes on those rows too (its style adds its input and output functions)."""
    pin = pin_of(module)
    if pin.shard is not None:
        raise ValueError(f"{_kind(module)} is sharded already (tensor parallelism is applied once)")
    if pin.storage == "split":
        raise ValueError("apply tensor parallelism before fully_shard: the module is sharded by FSDP already")
    reference, indices, on_mismatch = (
        pinned_values(module).detach().clone(),
        pin.pinned_rows(),
        pin.on_mismatch,
    )
    ties = [m for m, _ in pin.ties()]
    release(module)
    plan = check_constrain(
        module,
        reference,
        indices=indices,
        on_mismatch=on_mismatch,
        root=nn.ModuleList([module, *ties]) if ties else None,
    )
    plan.shard = rows_on(mesh, module.weight.shape[0])
    plan.apply()


class RowwiseParallel(_RowwiseParallel):
    """torch's ``RowwiseParallel``; on a constrained ``nn.Embedding``: the vocabulary-parallel lookup
    of :mod:`embconstraint.parallel` (every rank holds its rows, constrains its pinned rows among
    them). Same arguments (``input_layouts=Replicate()`` for token ids, as torchtitan's Llama plan)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not is_constrained(module) and _tie(module) is None:
            return super()._apply(module, device_mesh)
        if not isinstance(module, nn.Embedding) or _tie(module) is not None:
            raise NotImplementedError(
                f"RowwiseParallel on a constrained {_kind(module)} would shard its embedding dimension: "
                "use RowwiseParallel on the embedding and ColwiseParallel on the output head (both shard the "
                "vocabulary)"
            )
        self.desired_input_layouts = (Replicate(),)
        _register(self, module, device_mesh)
        _shard_constrained(module, device_mesh)
        return module


class ColwiseParallel(_ColwiseParallel):
    """torch's ``ColwiseParallel``; on a constrained ``nn.Linear`` output head, or one tied to a
    constrained embedding: column-parallel logits on this rank's rows of the vocabulary (shard the
    embedding first, with :class:`RowwiseParallel`, for a tied head). Same arguments
    (``output_layouts=Shard(-1), use_local_output=False`` for ``loss_parallel``)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tie = _tie(module)
        if not is_constrained(module) and tie is None:
            return super()._apply(module, device_mesh)
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(
                f"ColwiseParallel on a constrained {_kind(module)} would shard its embedding dimension: "
                "use RowwiseParallel on the embedding (it shards the vocabulary)"
            )
        if tie is not None:
            if tie.pin.shard is None:
                raise ValueError(
                    "this head is tied to a constrained embedding that is not sharded yet: apply "
                    "RowwiseParallel to the embedding first (earlier in the plan)"
                )
            _register(self, module, device_mesh)  # (its hooks of the rows came with the embedding's)
            return module
        _register(self, module, device_mesh)
        _shard_constrained(module, device_mesh)
        return module
