"""What :func:`embconstraint.constrain` refuses, checked before anything changes.

The error-type policy is in :mod:`embconstraint.exceptions`.

>>> import torch
>>> check_constrain_args(torch.nn.Embedding(4, 2), torch.zeros(5, 2), None, "error")
Traceback (most recent call last):
...
ValueError: reference has 5 rows but the embedding only has 4 (reference shape (5, 2), embedding weight shape (4, 2))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._common import casts_exactly, check_rows, index_tensor
from .parametrization import pin_of, tie_of
from .sharded import fsdp_managed, full, is_sharded, zero_partitioned
from .tensor_parallel import TP_REFUSED, row_shard
from .weight import plain

__all__ = [
    "ON_MISMATCH",
    "check_on_mismatch",
    "as_reference",
    "check_reference",
    "checked_indices",
    "check_embedding",
    "reference_bias",
    "check_bias",
    "check_constrain_args",
]

ON_MISMATCH = ("error", "checkpoint")


def check_on_mismatch(on_mismatch: Any) -> None:
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")


def as_reference(reference: Any) -> Tensor:
    """The ``(n, D)`` floating-point tensor of an embedding, output head (``nn.Linear``: its
    weight rows) or tensor ``reference`` (detached; a DTensor is all-gathered, a collective: under
    tensor parallelism every rank constrains)."""
    if isinstance(reference, (nn.Embedding, nn.EmbeddingBag, nn.Linear)):
        reference = reference.weight
    if not isinstance(reference, Tensor):
        raise TypeError(
            "reference must be an nn.Embedding, nn.EmbeddingBag, nn.Linear, Tensor or Parameter of shape (n, D), "
            f"got {type(reference).__name__}"
        )
    if reference.layout != torch.strided or reference.is_nested:
        raise ValueError(f"reference must be a dense (strided) tensor, got layout {reference.layout}")
    if reference.is_meta:
        raise ValueError("reference is on the meta device (no values); pass a materialised tensor")
    reference = plain(full(reference.detach()))  # a DTensor (a sharded weight's rows): all-gathered
    if reference.dim() != 2:
        raise ValueError(f"reference must have shape (n, D), got shape {tuple(reference.shape)}")
    if not reference.is_floating_point():
        raise TypeError(f"reference must be a floating-point tensor, got dtype {reference.dtype}")
    return reference


def check_reference(reference: Tensor, weight: Tensor) -> Tensor:
    """Check an :func:`as_reference` tensor against the ``(V, D)`` weight it will be pinned in
    (``weight`` may be on the meta device)."""
    num_rows, dim = weight.shape
    if reference.shape[1] != dim:
        raise ValueError(
            f"reference has embedding dimension {reference.shape[1]} but the embedding has {dim} "
            f"(reference shape {tuple(reference.shape)}, embedding weight shape {tuple(weight.shape)})"
        )
    if reference.shape[0] > num_rows:
        raise ValueError(
            f"reference has {reference.shape[0]} rows but the embedding only has {num_rows} "
            f"(reference shape {tuple(reference.shape)}, embedding weight shape {tuple(weight.shape)})"
        )
    # aminmax propagates nan and surfaces +-inf in one pass; isfinite(reference) would allocate an
    # |x| copy and three bool masks (1.6x the reference's size) and take ~25x longer on CPU.
    if reference.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(reference))).all()):
        raise ValueError("reference holds non-finite values (nan or inf); pinned rows must be finite")
    if not casts_exactly(reference, weight.dtype):
        raise ValueError(
            f"reference dtype {reference.dtype} cannot be cast exactly to the embedding's dtype "
            f"{weight.dtype}; cast the embedding (or the reference) first"
        )
    return reference


def checked_indices(indices: Any, num_pinned: int, num_rows: int | None) -> Tensor | None:
    """Validated ``indices`` (CPU int64), or None for the default (the first ``num_pinned`` rows)."""
    if indices is None:
        return None
    idx = index_tensor(indices)
    check_rows(idx, num_pinned, num_rows)
    return idx


def reference_bias(reference: Any) -> Tensor | None:
    """The bias of an ``nn.Linear`` ``reference`` (detached), None for anything else."""
    if isinstance(reference, nn.Linear) and reference.bias is not None:
        return plain(reference.bias.detach())
    return None


def check_bias(module: nn.Module, reference: Any, num_pinned: int) -> None:
    """A head's bias against an ``nn.Linear`` reference: both or neither have one, and a head
    bias is a floating-point ``nn.Parameter`` (checked for any reference)."""
    bias = getattr(module, "bias", None) if isinstance(module, nn.Linear) else None
    if isinstance(reference, nn.Linear) and reference.bias is not None and bias is None:
        raise ValueError(
            f"reference is an nn.Linear with a bias but embedding ({type(module).__name__}) has none; "
            "pass reference.weight to pin the weight rows only"
        )
    if isinstance(reference, nn.Linear) and reference.bias is None and bias is not None:
        raise ValueError(
            f"reference is an nn.Linear without a bias but embedding ({type(module).__name__}) has one; "
            "pass reference.weight to pin the bias entries at their current values"
        )
    if bias is None:
        return
    if not isinstance(bias, nn.Parameter) or not bias.is_floating_point():
        raise TypeError("embedding.bias must be a floating-point nn.Parameter")
    ref_bias = reference_bias(reference)
    if ref_bias is not None:
        if ref_bias.shape != (num_pinned,):
            raise ValueError(f"reference.bias must have shape ({num_pinned},), got {tuple(ref_bias.shape)}")
        if not bool(torch.isfinite(ref_bias).all()) or not casts_exactly(ref_bias, bias.dtype):
            raise ValueError(
                "reference.bias must be finite and exactly representable in the module's bias dtype"
            )


def check_embedding(embedding: Any, parametrized: bool, constrained: bool, heads: bool = False) -> None:
    """What :func:`embconstraint.constrain` refuses of the module itself (``heads``: an
    ``nn.Linear`` output head is accepted too)."""
    kinds = (nn.Embedding, nn.EmbeddingBag, nn.Linear) if heads else (nn.Embedding, nn.EmbeddingBag)
    if not isinstance(embedding, kinds):
        expected = (
            "an nn.Embedding, nn.EmbeddingBag or nn.Linear (an output head)"
            if heads
            else "an nn.Embedding or nn.EmbeddingBag"
        )
        raise TypeError(f"embedding must be {expected}, got {type(embedding).__name__}")
    if constrained:
        raise ValueError("embedding is already constrained; call release() first")
    tie = next((t for name in ("weight", "bias") if (t := tie_of(embedding, name)) is not None), None)
    if tie is not None:
        cls = type(tie.embedding)
        what = (
            cls.__bases__[0] if parametrize.is_parametrized(tie.embedding) else cls
        ).__name__  # not Parametrized*
        raise ValueError(
            f"embedding is tied to a constrained {what} (it shares that module's Parameter, as a tied output "
            f"head does), so it computes with the {what}'s merged weight and its pinned rows: a tied module cannot "
            "pin rows of its own. Pin the rows on the module it is tied to (constrain that one with these "
            "indices), or untie it: release(model), give it its own Parameter "
            "(head.weight = nn.Parameter(head.weight.detach().clone()); for transformers also "
            "config.tie_word_embeddings=False), then constrain each"
        )
    if parametrized:
        raise ValueError("embedding.weight already has a parametrization; embconstraint must be the only one")
    if not isinstance(embedding.weight, nn.Parameter):
        raise TypeError("embedding.weight must be an nn.Parameter")
    if not embedding.weight.is_floating_point():
        raise TypeError(f"embedding.weight must be floating point, got {embedding.weight.dtype}")
    if getattr(embedding, "max_norm", None) is not None:
        raise ValueError(
            "embedding.max_norm renormalizes rows in place and would move pinned rows; "
            "constrained embeddings need max_norm=None"
        )


def check_constrain_args(
    embedding: Any, reference: Any, indices: Any, on_mismatch: str, *, heads: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Everything :func:`embconstraint.constrain` refuses, checked without changing anything;
    returns the reference tensor and the validated indices (None for the first ``n`` rows).
    ``heads``: accept an ``nn.Linear`` output head (and an ``nn.Linear`` reference with a bias)."""
    parametrized = isinstance(embedding, nn.Module) and any(
        parametrize.is_parametrized(embedding, name) for name in ("weight", "bias")
    )
    constrained = isinstance(embedding, nn.Module) and pin_of(embedding) is not None
    check_embedding(embedding, parametrized, constrained, heads=heads)
    check_on_mismatch(on_mismatch)
    if is_sharded(embedding.weight) and (fsdp_managed(embedding) or row_shard(embedding.weight) is None):
        if fsdp_managed(embedding):
            raise ValueError(
                f"embedding.weight is already sharded (a {type(embedding.weight).__name__}, e.g. by fully_shard); "
                "call constrain() before fully_shard(), which then shards only the free rows"
            )
        raise ValueError(
            f"embedding.weight is a DTensor with placements {tuple(embedding.weight.placements)} on a "
            f"{embedding.weight.device_mesh.ndim}-D mesh: {TP_REFUSED}"
        )
    if "ds_id" in embedding.__dict__ or "_hp_mapping" in getattr(embedding.weight, "__dict__", {}):
        raise ValueError(
            "embedding is already managed by a DeepSpeed engine (deepspeed.initialize ran): its optimizer holds "
            "the whole weight. Call constrain() before deepspeed.initialize (and before the transformers Trainer "
            "starts training), which then partitions only the free rows"
        )
    if zero_partitioned(embedding.weight):
        raise ValueError(
            "embedding.weight is partitioned by DeepSpeed ZeRO-3 (built under deepspeed.zero.Init): constrain() "
            "gathers it for the time it takes; to check it first, gather it on every rank "
            "(with deepspeed.zero.GatheredParameters([embedding.weight]): ...)"
        )
    weight = embedding.weight.detach()
    ref = check_reference(as_reference(reference), weight)
    check_bias(embedding, reference, ref.shape[0])
    _check_pending_grads(embedding)
    return ref, checked_indices(indices, ref.shape[0], weight.shape[0])


def _check_pending_grads(module: nn.Module) -> None:
    """A pending ``.grad`` keeps its free rows when constrained; one of another shape than its
    tensor (left from before a resize, which replaced the data but not the gradient) cannot."""
    for name in ("weight", "bias"):
        param = getattr(module, name, None) if name in module._parameters else None
        grad = None if param is None else param.grad
        if grad is not None and grad.shape != param.shape:
            raise ValueError(
                f"embedding.{name}.grad has shape {tuple(grad.shape)} but embedding.{name} has shape "
                f"{tuple(param.shape)} (a gradient from before a resize?); clear it first: "
                "model.zero_grad(set_to_none=True) or optimizer.zero_grad()"
            )
