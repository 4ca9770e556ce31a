"""``torch.func`` on constrained modules: ``functional_call`` + ``vmap(grad(...))`` (per-sample
gradients, as in differentially private training) see the free rows only and give each sample's
own gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import IDS, D, V, constrained, reference
from torch import nn

from embconstraint import constrain

_FUNC_MODULES = {
    "Embedding": lambda idx: constrained(idx),
    "EmbeddingBag": lambda idx: constrained(idx, nn.EmbeddingBag, mode="sum"),
    "Linear head": lambda idx: constrain(nn.Linear(D, V), reference(), indices=idx),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback for bags
@pytest.mark.parametrize("kind", list(_FUNC_MODULES))
def test_torch_func_per_sample_grads(layout, kind) -> None:
    """Each sample's gradient of the free rows (and free bias entries) is the one a backward of
    that sample alone gives, and the pinned rows hold."""
    from torch.func import functional_call, grad, vmap

    module = _FUNC_MODULES[kind](layout.indices)
    inputs = (
        torch.randn(len(IDS), D, generator=torch.Generator().manual_seed(2))
        if kind == "Linear head"
        else IDS.view(-1, 1)
    )
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p: dict, x: torch.Tensor) -> torch.Tensor:
        return (functional_call(module, p, (x.unsqueeze(0),)) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, inputs)
    assert set(per_sample) == set(params) and params  # only the free rows (and free bias entries)
    for i, x in enumerate(inputs):  # each equals the gradient of that sample alone
        module.zero_grad()
        (module(x.unsqueeze(0)) ** 2).sum().backward()
        for name, p in module.named_parameters():
            assert per_sample[name][i].shape == p.shape
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-6, atol=1e-7)
            if kind != "Linear head":  # one looked-up row: the same sums, bitwise
                assert torch.equal(per_sample[name][i], p.grad)
    assert torch.equal(module.weight.detach()[layout.pinned], reference())
