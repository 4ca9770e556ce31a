"""Training a constrained embedding: every optimizer keeps the pinned rows bitwise and keeps state
for the free rows only; no (V, D) tensor is built in a step; ``torch.compile`` trains as eager."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import OPTIMIZERS, D, N, StorageRecorder, V, constrained_and_plain, reference
from torch import nn

from embconstraint import constrain


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_pinned_rows_exact_after_steps(opt_name, layout):
    sparse = opt_name == "sparse_adam"
    emb, _, ref = constrained_and_plain(indices=layout.indices, sparse=sparse)
    opt = OPTIMIZERS[opt_name](emb.parameters())
    before = emb.weight.detach().clone()
    for step in range(6):
        x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(step))
        loss = emb(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.equal(emb.weight[layout.pinned], ref)
    assert not torch.equal(emb.weight[layout.free], before[layout.free])  # the free rows did train
    for state in opt.state.values():  # optimizer state only for the free rows
        for value in state.values():
            if torch.is_tensor(value) and value.dim() == 2:
                assert tuple(value.shape) == (V - N, D)


@pytest.mark.parametrize("module_cls", [nn.Embedding, nn.EmbeddingBag])
def test_no_full_size_tensor_in_a_training_step(module_cls, layout):
    """Neither a (V, D) copy of the weight nor a (V, D) gradient is ever built."""
    big_v, n = 1000, 900
    emb = constrain(
        module_cls(big_v, 4),
        torch.randn(n, 4),
        indices=None if layout.name == "prefix" else torch.randperm(big_v)[:n],
    )
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randint(0, big_v, (8, 3))
    emb(x).sum().backward()  # warm up (the lazy per-device index cache)
    opt.step()
    with StorageRecorder() as rec:
        loss = emb(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    too_big = [(f, s) for f, s in rec.sizes if s > (big_v - n + 1) * 4]
    assert too_big == []


def _train_clone(model, steps, compiled):
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(steps):
        x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(step))
        loss = run(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("module_cls", [nn.Embedding, nn.EmbeddingBag])
def test_torch_compile_trains_like_eager(module_cls):
    torch.manual_seed(0)
    ref = reference()
    model = nn.Sequential(constrain(module_cls(V, D), ref), nn.Linear(D, 1))
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    _train_clone(model, 4, compiled=False)
    _train_clone(twin, 4, compiled=True)
    assert torch.equal(twin[0].weight[:N], ref)
    torch.testing.assert_close(twin[0].weight, model[0].weight, rtol=1e-5, atol=1e-6)
