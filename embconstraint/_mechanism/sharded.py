"""Sharded tensors (FSDP2 ``fully_shard``, DTensor, DeepSpeed ZeRO): the few conversions the split storage needs.

Under FSDP2 the free rows (``parametrizations.weight.original``) are a sharded ``DTensor``
outside forward and FSDP's all-gathered plain Parameter inside it; the pinned rows are never
sharded (see :mod:`.storage`). Under DeepSpeed ZeRO-3 the free rows are a Parameter
whose data DeepSpeed swaps between its partition (outside the forward and backward of the
modules that use it) and the gathered rows; under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) a
view of DeepSpeed's flat buffer. Everything here is a no-op for plain tensors, and nothing here
communicates except :func:`full` on a DTensor (an all-gather: a collective, every rank must call
it). Works where ``torch.distributed`` or DeepSpeed is unavailable (then nothing is sharded).
"""

from __future__ import annotations

from torch import Tensor, nn

try:  # torch.distributed may be missing on some builds
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None

__all__ = [
    "is_sharded",
    "full",
    "like",
    "as_shards",
    "fsdp_managed",
    "zero_managed",
    "zero_partitioned",
    "ZERO_PARTITIONED",
]

# FSDP2's fully_shard marks every module whose parameters it manages (torch >= 2.4; used by Dynamo).
_FSDP_MANAGED = "_is_fsdp_managed_module"


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated distributed tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages ``module``'s parameters (an instance attribute it
    sets: read from ``__dict__``, since a missing one would cost ``Module.__getattr__``'s raise)."""
    return bool(module.__dict__.get(_FSDP_MANAGED, False))


_NONE: dict = {}


def zero_managed(t: Tensor) -> bool:
    """Whether DeepSpeed manages the Parameter ``t``: ZeRO-3 partitions it (``ds_id``), ZeRO-1/2
    and DeepSpeed's bf16 optimizer made it a view of their flat buffer (``_hp_mapping``). Read
    from ``__dict__``, where DeepSpeed sets them: no import, no raise for a missing attribute."""
    d = getattr(t, "__dict__", _NONE)
    return "ds_id" in d or "_hp_mapping" in d


def zero_partitioned(t: Tensor) -> bool:
    """Whether ``t`` is a ZeRO-3 Parameter holding only its partition now (outside the forward
    and backward of the modules that use it, and outside ``deepspeed.zero.GatheredParameters``)."""
    status = getattr(t, "__dict__", _NONE).get("ds_status")  # DeepSpeed's ZeroParamStatus
    return status is not None and status.name != "AVAILABLE"


ZERO_PARTITIONED = (
    "the free rows of this constrained embedding are partitioned by DeepSpeed ZeRO-3 (each rank holds its "
    "partition only): read the weight inside the engine's forward, or gather them first on every rank: "
    "with deepspeed.zero.GatheredParameters(list(module.parameters())): ..."
)


def full(t: Tensor) -> Tensor:
    """``t`` as a plain, whole tensor: a DTensor is all-gathered (a collective), anything else
    is returned as it is; a partitioned ZeRO-3 Parameter raises (``RuntimeError``: gathering it
    is DeepSpeed's ``GatheredParameters``, on every rank)."""
    if is_sharded(t):
        return t.full_tensor()
    if zero_partitioned(t):
        raise RuntimeError(ZERO_PARTITIONED)
    return t


def like(value: Tensor, live: Tensor) -> Tensor:
    """The plain, whole ``value`` sharded the way ``live`` is (the same mesh and placements;
    each rank keeps its own chunk, nothing is communicated); ``value`` itself if ``live`` is plain."""
    if not is_sharded(live):
        return value
    return distribute_tensor(value, live.device_mesh, live.placements, src_data_rank=None)


def as_shards(value: Tensor, live: Tensor) -> Tensor:
    """The plain, whole ``value`` sharded on dim 0 over ``live``'s mesh (how a merged ``(V, D)``
    weight of sharded free rows is saved); ``value`` itself if ``live`` is plain."""
    if not is_sharded(live):
        return value
    return distribute_tensor(value, live.device_mesh, [Shard(0)] * live.device_mesh.ndim, src_data_rank=None)
