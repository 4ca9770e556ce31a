"""The ``weight`` of a constrained module: reading it keeps ``parametrize``'s semantics (hooks,
``parametrize.cached()``, the same values as parametrize's own getter), any use of it other than a
lookup is differentiable into the free rows, and a wrapper's non-Parameter free rows still work."""

from __future__ import annotations

import torch
from helpers import N, constrained, constrained_and_plain, free_param
from torch.nn.utils import parametrize


def test_fast_getter_falls_back_to_parametrize_for_hooks() -> None:
    emb = constrained()
    pin = emb.parametrizations.weight[0]
    seen = []
    handle = pin.register_forward_hook(lambda m, args, out: seen.append(out))
    w = emb.weight
    handle.remove()
    assert len(seen) == 1 and seen[0] is w
    emb.weight  # noqa: B018 - the hook is gone: not called again
    assert len(seen) == 1


def test_fast_getter_keeps_parametrize_cached() -> None:
    emb = constrained()
    with parametrize.cached():
        assert emb.weight is emb.weight
    assert emb.weight is not emb.weight


def test_fast_getter_equals_parametrize_getter_after_a_step() -> None:
    emb = constrained()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1)
    emb(torch.tensor([[0, 5, 9]])).sum().backward()
    opt.step()
    fast = emb.weight
    slow = emb.parametrizations.weight()  # parametrize's ParametrizationList.forward
    assert torch.equal(fast.detach().as_subclass(torch.Tensor), slow.detach().as_subclass(torch.Tensor))


def test_lookup_builds_no_merge_node_but_other_uses_do() -> None:
    emb = constrained()
    w = emb.weight
    out = torch.nn.functional.embedding(torch.tensor([1, 6]), w)
    assert "_merged" not in w.__dict__  # the lookup needs no (V, D) autograd node
    assert w.requires_grad and w.grad_fn is not None  # any other use sees the merged tensor
    assert out.grad_fn is not None
    with torch.no_grad():
        assert not emb.weight.requires_grad
    assert not w.detach().requires_grad


def test_generic_uses_of_weight_are_differentiable(layout):
    """A tied-head style use (weight @ h) gets the right gradient for the free rows."""
    emb, plain, _ = constrained_and_plain(indices=layout.indices)
    h = torch.randn(3, emb.weight.shape[1])
    (h @ emb.weight.t()).sin().sum().backward()
    (h @ plain.weight.t()).sin().sum().backward()
    torch.testing.assert_close(free_param(emb).grad, plain.weight.grad[layout.free])


def test_non_parameter_free_rows_take_the_copy_path():
    """When a wrapper replaces the free rows by a tensor that is not the aliased Parameter
    (as some distributed strategies do), the merged weight is rebuilt (and says so)."""
    emb, _, ref = constrained_and_plain()
    plist = emb.parametrizations.weight
    replacement = plist.original.detach().clone() + 1.0
    del plist._parameters["original"]
    plist.original = replacement  # a plain tensor attribute, as a wrapper might leave it
    assert torch.equal(emb.weight[N:], replacement)
    assert torch.equal(emb.weight[:N], ref)
    assert "storage=copy" in repr(emb)
