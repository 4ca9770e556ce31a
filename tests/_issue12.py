"""Shared fixtures of the issue-12 tests (``test_silent_wrong_*.py``): a small constrained
embedding in the prefix and a scattered layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embconstraint import constrain

V, D, N = 6, 3, 3
LAYOUTS = [pytest.param(None, id="prefix"), pytest.param([4, 0, 2], id="scattered")]
IDS = torch.tensor([0, 1, 3, 5])


def pinned_rows(indices: list[int] | None) -> list[int]:
    return list(range(N)) if indices is None else list(indices)


def free_rows(indices: list[int] | None) -> list[int]:
    return [r for r in range(V) if r not in pinned_rows(indices)]


def reference() -> torch.Tensor:
    # values float16/bfloat16 cannot hold exactly (the half round trip must not round them)
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def emb_of(indices: list[int] | None, cls: type = nn.Embedding, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return constrain(cls(V, D, **kwargs), reference(), indices=indices)


def free_grad(emb: nn.Module) -> torch.Tensor | None:
    return emb.parametrizations.weight.original.grad


def loss_of(emb: nn.Module) -> torch.Tensor:
    """A loss that reads every id of ``IDS``."""
    return (emb(IDS) ** 2).sum() if isinstance(emb, nn.Embedding) else (emb(IDS.view(1, -1)) ** 2).sum()
