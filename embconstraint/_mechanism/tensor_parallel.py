"""Tensor parallelism: a constrained table whose rows (the vocabulary) are sharded over a mesh.

``RowwiseParallel`` on an ``nn.Embedding`` and ``ColwiseParallel`` on an ``nn.Linear`` head both
shard the ``(V, D)`` weight on its rows (``Shard(0)``, torch.chunk's split): rank ``r`` of a 1-D mesh
of ``T`` holds the user rows ``[lo, hi)``. A constrained table keeps that split and holds, on each
rank, a constraint of its own rows: its pinned rows (those of ``[lo, hi)`` that are pinned, a plain
tensor never communicated) and its free rows, a plain Parameter of the rank's own (``(k_r, D)``,
``k_r`` differs between ranks, so it is not a DTensor; ``fully_shard`` on a data-parallel mesh
shards it further). The module computes on its local rows with the usual kernels; the hooks here
turn the DTensors around it into local tensors and back, as DTensor's own sharding rules would:

- embedding (vocabulary-parallel lookup): ids outside ``[lo, hi)`` look up a local row and their
  output rows are zeroed; the output is a ``Partial`` DTensor (summed over the mesh by the style's
  output function: an all-reduce or a reduce-scatter of activations);
- head (column-parallel logits): the input is taken as replicated, its gradient as ``Partial``; the
  output is the local logits as a DTensor sharded on its last dimension (``Shard(-1)``: the loss
  can stay parallel, or the style all-gathers it).

The hooks run inside the style's own hooks: after its input function, before its output function.
transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")``) shards the same way but
replaces the module's ``forward`` by its style's wrapper instead of registering hooks: the module then
gets a forward that runs the same functions inside that wrapper's (:func:`hf_styled_forward`).
:class:`RowShard` is what :class:`~.parametrization.PinnedRows` keeps (``shard``) for the state dicts:
the merged weight is saved as the DTensor the style would hold, ``(V, D)`` sharded on rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:  # torch.distributed may be missing on some builds
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # pragma: no cover
    DTensor = None

from .layout import Layout

__all__ = [
    "RowShard",
    "row_shard",
    "rows_on",
    "local_layout",
    "install_tp_hooks",
    "hf_styled_forward",
    "as_global",
    "local_part",
    "TP_REFUSED",
]

TP_REFUSED = (
    "a constrained embedding supports tensor parallelism that shards its rows (the vocabulary): RowwiseParallel "
    "on an nn.Embedding, ColwiseParallel on an nn.Linear head (the weight is Shard(0) over a 1-D mesh)"
)


@dataclass(frozen=True)
class RowShard:
    """Rows ``[lo, hi)`` of a ``num_rows``-row table, on this rank of ``mesh`` (1-D); ``pinned``: which
    rows of the whole table's reference (a bool mask, reference order) are this rank's pinned rows."""

    mesh: Any
    lo: int
    hi: int
    num_rows: int
    pinned: Tensor | None = None


def rows_on(mesh: Any, num_rows: int) -> RowShard:
    """This rank's rows of ``num_rows`` split over the 1-D ``mesh`` as ``Shard(0)`` splits them
    (torch.chunk: ``ceil(V / T)`` rows a rank, the last ranks fewer, or none)."""
    size, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-num_rows // size)
    lo = min(num_rows, rank * chunk)
    return RowShard(mesh, lo, min(num_rows, lo + chunk), num_rows)


def row_shard(weight: Tensor) -> RowShard | None:
    """The :class:`RowShard` of a DTensor ``weight`` sharded on its rows over a 1-D mesh (what
    ``RowwiseParallel`` makes of an embedding's weight and ``ColwiseParallel`` of a head's); None
    for anything else (a plain tensor, other placements, a mesh of more dimensions)."""
    if DTensor is None or not isinstance(weight, DTensor):
        return None
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        return None
    shard = rows_on(mesh, weight.shape[0])
    return shard if weight.to_local().shape[0] == shard.hi - shard.lo else None


def local_layout(layout: Layout, shard: RowShard) -> tuple[RowShard, Layout]:
    """The shard with its ``pinned`` mask (which reference rows fall in it), and the layout of the
    shard's rows: those pinned rows at their local positions, in reference order."""
    rows = layout.pinned_rows()
    mine = (rows >= shard.lo) & (rows < shard.hi)
    local = rows[mine] - shard.lo
    n = int(local.numel())
    indices = None if torch.equal(local, torch.arange(n)) else local
    shard = RowShard(shard.mesh, shard.lo, shard.hi, shard.num_rows, mine)
    return shard, Layout.from_indices(indices, n, shard.hi - shard.lo)


def as_global(local: Tensor, shard: RowShard) -> Tensor:
    """The ``(V, ...)`` DTensor, sharded on rows over the shard's mesh, whose local rows are ``local``."""
    shape = (shard.num_rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local.contiguous(), shard.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride
    )


def local_part(t: Tensor, shard: RowShard) -> Tensor:
    """This rank's rows of ``t``: a DTensor's local tensor (sharded that way already), a plain
    tensor's rows ``[lo, hi)`` (a copy), detached."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local().detach()
    return t.detach()[shard.lo : shard.hi].clone()


def _local(t: Any, grad_partial: bool = False) -> Any:
    if DTensor is None or not isinstance(t, DTensor):
        return t
    return t.to_local(grad_placements=(Partial(),) if grad_partial else None)


# the methods of a transformers tensor-parallel style that its forward wrapper calls
_HF_STYLE = ("transform_inputs_pre_forward", "context_around_forward", "transform_output_post_forward")


def hf_styled_forward(module: nn.Module) -> tuple[Any, Any, Any] | None:
    """What transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")``) wrapped the
    module's forward in: it replaces ``module.forward`` by its style's ``tp_forward``, which turns the
    input into DTensors, runs the module's own forward and turns the output back (all-reducing a
    ``Partial`` lookup, all-gathering the logits). Returns ``(style, own forward, mesh)``; None for a
    module whose forward is not so replaced; ``ValueError`` for one transformers hooked (``_is_hooked``)
    whose wrapper is not of that shape (checked before anything changes)."""
    forward = module.__dict__.get("forward")
    if forward is None:
        return None
    code, cells = getattr(forward, "__code__", None), getattr(forward, "__closure__", None) or ()
    found = dict(zip(code.co_freevars, (c.cell_contents for c in cells), strict=False)) if code else {}
    style, own, mesh = (found.get(k) for k in ("self", "original_forward", "mesh"))
    if callable(own) and mesh is not None and all(callable(getattr(style, n, None)) for n in _HF_STYLE):
        return style, own, mesh
    if getattr(module, "_is_hooked", False):
        raise ValueError(
            f"{type(module).__name__}.forward was replaced by a tensor-parallel wrapper embconstraint does not "
            "recognise (transformers' from_pretrained(tp_plan=...) of another version?); shard the model with "
            "torch's parallelize_module (RowwiseParallel on the embedding, ColwiseParallel on the head), then "
            "constrain"
        )
    return None


def install_tp_hooks(module: nn.Module, shard_of: Any) -> list:
    """The hooks of a module that computes on its shard's rows (see the module docstring):
    vocabulary-parallel lookup for an ``nn.Embedding``, column-parallel logits for an ``nn.Linear``.
    ``shard_of()`` returns the :class:`RowShard` when the module runs (a tied head reads its
    embedding's). Call after the style registered its own hooks; returns the handles. A module whose
    forward transformers' tensor parallelism wrapped (:func:`hf_styled_forward`) gets a forward of
    its own instead, the same functions inside the style's (no handles)."""
    before, after = _tp_functions(module, shard_of)
    styled = hf_styled_forward(module)
    if styled is None:
        return [module.register_forward_pre_hook(before), module.register_forward_hook(after, prepend=True)]
    style, own, mesh = styled

    def forward(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = style.transform_inputs_pre_forward(module, args, kwargs, mesh)
        args = before(module, args)
        with style.context_around_forward(module, mesh):
            out = own(*args, **kwargs)
        return style.transform_output_post_forward(module, after(module, args, out), mesh)

    module.forward = forward
    return []


def _tp_functions(module: nn.Module, shard_of: Any) -> tuple[Any, Any]:
    """The functions before and after the module's forward (see :func:`install_tp_hooks`)."""
    if isinstance(module, nn.Embedding):
        masks: list[Tensor] = []

        def before(mod: nn.Module, args: tuple) -> tuple:
            shard = shard_of()
            ids = _local(args[0])
            outside = (ids < shard.lo) | (ids >= shard.hi)
            masks.append(outside)
            return ((ids - shard.lo).masked_fill(outside, 0), *args[1:])

        def after(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            shard = shard_of()
            out = out.masked_fill(masks.pop().unsqueeze(-1), 0.0)
            return DTensor.from_local(out, shard.mesh, [Partial()], run_check=False)

    elif isinstance(module, nn.Linear):

        def before(mod: nn.Module, args: tuple) -> tuple:
            return (_local(args[0], grad_partial=True), *args[1:])

        def after(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            shard = shard_of()
            shape = (*out.shape[:-1], shard.num_rows)
            stride = torch.empty(shape, device="meta").stride()
            return DTensor.from_local(
                out.contiguous(),
                shard.mesh,
                [Shard(out.dim() - 1)],
                run_check=False,
                shape=shape,
                stride=stride,
            )
    else:
        raise TypeError(f"{TP_REFUSED}; got {type(module).__name__}")
    return before, after
