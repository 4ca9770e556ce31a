"""The fast paths of issue 13 (fixed per-call cost) keep parametrize's semantics."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from embconstraint import constrain


def _emb() -> nn.Embedding:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3)
    return constrain(emb, torch.randn(4, 3))


def test_fast_getter_falls_back_to_parametrize_for_hooks() -> None:
    emb = _emb()
    pin = emb.parametrizations.weight[0]
    seen = []
    handle = pin.register_forward_hook(lambda m, args, out: seen.append(out))
    w = emb.weight
    handle.remove()
    assert len(seen) == 1 and seen[0] is w
    emb.weight  # noqa: B018 - the hook is gone: not called again
    assert len(seen) == 1


def test_fast_getter_keeps_parametrize_cached() -> None:
    emb = _emb()
    with parametrize.cached():
        assert emb.weight is emb.weight
    assert emb.weight is not emb.weight


def test_fast_getter_equals_parametrize_getter_after_a_step() -> None:
    emb = _emb()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1)
    emb(torch.tensor([[0, 5, 9]])).sum().backward()
    opt.step()
    fast = emb.weight
    slow = emb.parametrizations.weight()  # parametrize's ParametrizationList.forward
    assert torch.equal(fast.detach().as_subclass(torch.Tensor), slow.detach().as_subclass(torch.Tensor))


def test_lookup_builds_no_merge_node_but_other_uses_do() -> None:
    emb = _emb()
    w = emb.weight
    out = torch.nn.functional.embedding(torch.tensor([1, 6]), w)
    assert "_merged" not in w.__dict__  # the lookup needs no (V, D) autograd node
    assert w.requires_grad and w.grad_fn is not None  # any other use sees the merged tensor
    assert out.grad_fn is not None
    with torch.no_grad():
        assert not emb.weight.requires_grad
    assert not w.detach().requires_grad
