"""The split storage (sharded training, issue 11) in one process: the pinned rows kept apart from
the free rows (``PinnedRows.split_storage()``, what FSDP2 triggers) compute bitwise what the
aliased table computes (bags: the gradient to rounding), with the same gradients, state dicts and write checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embconstraint import PinnedRowsError, constrain, merged_state_dict
from embconstraint._mechanism import pin_of

V, D, N = 13, 4, 6
LAYOUTS = {"prefix": None, "scattered": [11, 0, 5, 7, 2, 9]}


def _pair(cls, layout, **kwargs):
    torch.manual_seed(0)
    emb = cls(V, D, **kwargs)
    ref = torch.randn(N, D)
    aliased = constrain(emb, ref, indices=LAYOUTS[layout])
    split = copy.deepcopy(aliased)
    pin_of(split).split_storage()
    return aliased, split, ref


def _grads(emb, run):
    emb.zero_grad()
    out = run(emb)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    (p,) = emb.parameters()
    return out.detach(), p.grad.clone()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding_idx", [None, 5, 8])
def test_lookup_bitwise_with_the_same_gradient(layout, padding_idx):
    aliased, split, ref = _pair(nn.Embedding, layout, padding_idx=padding_idx)
    assert pin_of(split).storage == "split" and pin_of(aliased).storage == "aliased"
    assert "storage=split" in repr(split)
    ids = torch.tensor([[0, 5, 8, 12, 11], [2, 2, 9, 1, 3]])
    for kwargs in ({}, {"scale_grad_by_freq": True}):
        a = _grads(aliased, lambda e, kw=kwargs: F.embedding(ids, e.weight, padding_idx, **kw))
        s = _grads(split, lambda e, kw=kwargs: F.embedding(ids, e.weight, padding_idx, **kw))
        assert torch.equal(a[0], s[0]) and torch.equal(a[1], s[1])
    assert torch.equal(split.weight, aliased.weight)
    assert type(split.weight).__name__ == "PinnedWeight"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 8])
def test_bag_bitwise_with_the_same_gradient(layout, mode, padding_idx):
    aliased, split, _ = _pair(nn.EmbeddingBag, layout, mode=mode, padding_idx=padding_idx)
    ids = torch.tensor([0, 5, 8, 12, 11, 2, 2, 9, 8, 3])
    offsets = torch.tensor([0, 3, 3, 7])
    # forward bitwise; the gradient is accumulated in another order (rows, then bags): to rounding
    a = _grads(aliased, lambda e: e(ids, offsets))
    s = _grads(split, lambda e: e(ids, offsets))
    assert torch.equal(a[0], s[0]) and torch.allclose(a[1], s[1], rtol=0, atol=1e-6)
    if mode == "sum":
        psw = torch.rand(ids.shape, requires_grad=True)
        a = _grads(aliased, lambda e: e(ids, offsets, per_sample_weights=psw))
        s = _grads(split, lambda e: e(ids, offsets, per_sample_weights=psw))
        assert torch.equal(a[0], s[0]) and torch.allclose(a[1], s[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_uses_state_dict_and_writes(layout):
    aliased, split, ref = _pair(nn.Embedding, layout)
    rows = torch.tensor(LAYOUTS[layout] or range(N))
    # a non-lookup use: the merged weight, gradient into the free rows
    a = _grads(aliased, lambda e: e.weight * 2)
    s = _grads(split, lambda e: e.weight * 2)
    assert torch.equal(a[0], s[0]) and torch.equal(a[1], s[1])
    sd = split.state_dict()
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], aliased.weight)
    assert torch.equal(merged_state_dict(split)["weight"], aliased.weight)
    plain = nn.Embedding(V, D)
    plain.load_state_dict(sd)
    with torch.no_grad():
        plain.weight[~torch.isin(torch.arange(V), rows)] += 1.0
    split.load_state_dict(plain.state_dict())
    assert torch.equal(split.weight, plain.weight)
    with pytest.raises(PinnedRowsError), torch.no_grad():
        split.weight[rows[0]] = 0.5  # would change a pinned row
    assert torch.equal(split.weight[rows], ref)


def test_writes_are_checked_and_release_is_refused():
    _, split, ref = _pair(nn.Embedding, "prefix")
    with torch.no_grad():
        split.weight[N:] = 3.0
    assert torch.equal(split.weight[N:], torch.full((V - N, D), 3.0))
    with pytest.raises(PinnedRowsError), torch.no_grad():
        split.weight[0] = 0.0
    assert torch.equal(split.weight[:N], ref)
    bad = split.state_dict()
    bad["weight"] = bad["weight"].clone()
    bad["weight"][1] += 1
    with pytest.raises(PinnedRowsError):
        split.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="sharded training"):
        from embconstraint import release
        release(split)
    assert torch.equal(split.weight[:N], ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tied", [False, True])
def test_head_split_storage_matches_the_aliased_head(layout, tied):
    """A constrained (or tied) output head on the split storage: logits and gradients equal to
    the aliased head to rounding (two matmuls), and no (V, D) weight built."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def build():
        torch.manual_seed(0)
        emb, head = nn.Embedding(V, D), nn.Linear(D, V, bias=not tied)
        if tied:
            head.weight = emb.weight
            model = nn.ModuleDict({"emb": emb, "head": head})
            constrain(emb, torch.randn(N, D), root=model, indices=LAYOUTS[layout])
        else:
            model = nn.ModuleDict({"emb": emb, "head": constrain(head, torch.randn(N, D), indices=LAYOUTS[layout])})
        return model

    aliased, split = build(), build()
    pin_of(split["emb"] if tied else split["head"]).split_storage()
    x = torch.randn(3, D)

    class Shapes(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (V, D) and out.stride() != (0, 0):
                self.seen.append(str(func))
            return out

    outs = []
    for model in (aliased, split):
        model.zero_grad()
        with Shapes() as probe:
            out = model["head"](x)
            out.pow(2).sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                     probe.seen[:]))
        Shapes.seen = []
    (a, ga, _), (s, gs, seen) = outs
    assert torch.allclose(a, s, rtol=0, atol=1e-6)
    assert len(ga) == (1 if tied else 2)
    assert all(torch.allclose(x_, y_, rtol=0, atol=1e-5) for x_, y_ in zip(ga, gs, strict=True))
    assert seen == []
