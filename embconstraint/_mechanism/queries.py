"""Questions the integrations ask of a constrained model: which modules are tied to an embedding,
what its pinned rows hold now, and how far they are from a target (the Lightning callback's metric).

>>> import torch
>>> from embconstraint import constrain
>>> emb = constrain(torch.nn.Embedding(4, 2), torch.ones(3, 2))
>>> pinned_values(emb).shape, float(pinned_deviation(emb, torch.zeros(3, 2)))
(torch.Size([3, 2]), 1.0)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parametrization import pin_of, tie_of

__all__ = ["tied_modules", "pinned_values", "pinned_deviation"]


def tied_modules(root: nn.Module, embedding: nn.Module) -> list[nn.Module]:
    """The modules of ``root`` (``embedding`` aside) with a weight tied to ``embedding``."""
    return [
        m
        for m in root.modules()
        if m is not embedding
        and any(
            (t := tie_of(m, n)) is not None and t.embedding is embedding
            for n in getattr(m, "parametrizations", {})
        )
    ]


def pinned_values(embedding: nn.Module) -> Tensor:
    """The pinned rows of a constrained ``embedding`` as they are, in reference order ``(n, D)``
    (under tensor parallelism, this rank's)."""
    pin = pin_of(embedding)
    if pin.storage == "split":  # read apart from the free rows: no collective under FSDP2
        return pin.pinned_block()
    weight = embedding.weight  # user order through its __torch_function__
    if pin.layout.kind == "prefix":
        return weight[: pin.num_pinned]
    return weight.index_select(0, pin.pinned_rows().to(weight.device))


@torch.no_grad()
def pinned_deviation(embedding: nn.Module, target: Tensor) -> Tensor:
    """Largest ``|pinned row - target|`` of a constrained ``embedding`` (0-dim tensor on the
    weight's device; 0.0 when nothing is pinned). Under tensor parallelism, over this rank's
    pinned rows (``target`` holds every one)."""
    rows = pinned_values(embedding)
    shard = pin_of(embedding).shard
    if shard is not None and target.shape[0] == shard.pinned.numel():  # tensor parallel: this rank's rows
        target = target[shard.pinned.to(target.device)]
    if rows.numel() == 0:
        return rows.new_zeros(())
    return (rows - target.to(device=rows.device, dtype=rows.dtype)).abs().max()
