"""``constrain`` and ``is_constrained``: the pinned rows come from the reference (in any form),
only the free rows are a Parameter, the embedding's own storage is reused, copies stay constrained."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import SCATTERED, D, N, V, constrained_and_plain, free_param, reference
from torch import nn

from embconstraint import constrain, is_constrained


def test_weight_holds_reference_and_only_free_rows_train(layout):
    emb, _, ref = constrained_and_plain(indices=layout.indices)
    assert is_constrained(emb)
    assert torch.equal(emb.weight[layout.pinned], ref)
    assert [tuple(p.shape) for p in emb.parameters()] == [(V - N, D)]
    assert emb.weight.shape == (V, D)
    assert f"layout={layout.name}" in repr(emb) and "storage=aliased" in repr(emb)


def test_prefix_constraint_reuses_the_embedding_storage():
    """Constraining allocates no second (V, D) table: the embedding's own storage is reused."""
    emb = nn.Embedding(V, D)
    storage = emb.weight.untyped_storage().data_ptr()
    ref = torch.randn(N, D)
    constrain(emb, ref)
    assert free_param(emb).untyped_storage().data_ptr() == storage
    assert emb.state_dict()["weight"].untyped_storage().data_ptr() == storage
    assert torch.equal(emb.weight[:N], ref)


def test_reference_aliasing_the_embedding():
    """Pinning rows at their current values, or at other rows' values, from the weight itself."""
    emb = nn.Embedding(V, D)
    before = emb.weight.detach().clone()
    constrain(emb, emb.weight[:N])
    assert torch.equal(emb.weight, before)
    emb = nn.Embedding(V, D)
    before = emb.weight.detach().clone()
    constrain(emb, emb.weight[2 : N + 2])
    assert torch.equal(emb.weight[:N], before[2 : N + 2]) and torch.equal(emb.weight[N:], before[N:])


def test_reference_is_copied():
    ref = torch.randn(N, D)
    emb = constrain(nn.Embedding(V, D), ref)
    kept = ref.clone()
    ref.add_(1.0)
    assert torch.equal(emb.weight[:N], kept)


def test_reference_module_and_parameter():
    old = nn.Embedding(N, D)
    emb = constrain(nn.Embedding(V, D), old)
    assert torch.equal(emb.weight[:N], old.weight)
    emb2 = constrain(nn.Embedding(V, D), old.weight)
    assert torch.equal(emb2.weight[:N], old.weight)
    # a constrained embedding can be the reference of another one
    emb3 = constrain(nn.Embedding(V + 3, D), emb)
    assert torch.equal(emb3.weight[:V], emb.weight)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_numpy_indices_are_accepted(dtype) -> None:
    emb = constrain(nn.Embedding(V, D), reference(), indices=np.array(SCATTERED, dtype=dtype))
    assert torch.equal(emb.weight[SCATTERED], reference())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.empty(N, D, device="meta"), id="meta"),
        pytest.param(lambda: reference().to_sparse(), id="sparse"),
    ],
)
def test_meta_or_sparse_reference_is_refused_in_one_line(make) -> None:
    emb = nn.Embedding(V, D)
    with pytest.raises((TypeError, ValueError)) as info:
        constrain(emb, make())
    message = str(info.value)
    assert "reference" in message and "\n" not in message
    assert not hasattr(emb, "parametrizations")


def test_deepcopy(layout):
    emb, _, ref = constrained_and_plain(indices=layout.indices)
    twin = copy.deepcopy(emb)
    assert is_constrained(twin) and torch.equal(twin.weight, emb.weight)
    opt = torch.optim.SGD(twin.parameters(), lr=1.0)
    twin(torch.arange(V)).sum().backward()
    opt.step()
    assert torch.equal(twin.weight[layout.pinned], ref)
    assert not torch.equal(twin.weight, emb.weight)  # the copy trains alone
    assert "storage=aliased" in repr(twin)


def test_sharing_is_ruled_out_without_walking_the_heap(monkeypatch):
    """A Parameter that only its module holds is recognised by its reference count: constrain
    never asks the garbage collector who refers to it (a walk over every live object, tens of
    milliseconds in a process holding a language model); a shared one is still found."""
    import embconstraint._mechanism.ties as ties

    walks = []
    real = ties.gc.get_referrers

    def counting(*objs):
        walks.append(len(objs))
        return real(*objs)

    monkeypatch.setattr(ties.gc, "get_referrers", counting)
    constrain(nn.Embedding(V, D), reference(), indices=SCATTERED)
    constrain(nn.Linear(D, V), reference())  # a head: its bias is checked too
    emb, head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    constrain(emb, reference(), root=nn.ModuleList([emb, head]))  # the tie named by root
    assert walks == []
    emb, head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    with pytest.raises(RuntimeError, match=r"embedding.weight is shared with Linear.weight"):
        constrain(emb, reference())
    assert walks
