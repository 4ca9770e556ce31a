"""State dicts of a constrained module: the plain ``weight`` key holding the merged weight, which
loads into constrained and plain modules alike; checkpoints whose pinned rows differ are refused
unless ``on_mismatch="checkpoint"``; ``merged_state_dict`` copies; the table is stored once."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import D, N, V, constrained, constrained_and_plain
from torch import nn

from embconstraint import constrain, merged_state_dict


def test_state_dict_has_plain_keys_and_round_trips(layout):
    emb, plain, ref = constrained_and_plain(indices=layout.indices)
    sd = emb.state_dict()
    assert list(sd) == ["weight"] and sd["weight"].shape == (V, D)
    assert torch.equal(sd["weight"], plain.weight)
    # into a fresh constrained module ...
    fresh = constrain(nn.Embedding(V, D), ref, indices=layout.indices)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, emb.weight)
    assert "storage=aliased" in repr(fresh)
    # ... and into a plain one
    other = nn.Embedding(V, D)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, emb.weight)


def test_plain_checkpoint_loads_and_pinned_mismatch_is_reported():
    emb, plain, ref = constrained_and_plain()
    with torch.no_grad():
        plain.weight[N:] = 3.0
    emb.load_state_dict(plain.state_dict())
    assert torch.equal(emb.weight[N:], torch.full((V - N, D), 3.0))
    with torch.no_grad():
        plain.weight[1] += 1.0
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="pinned rows"):
        emb.load_state_dict(plain.state_dict())
    assert torch.equal(emb.weight, before)  # nothing changed
    adopt = constrain(nn.Embedding(V, D), ref, on_mismatch="checkpoint")
    adopt.load_state_dict(plain.state_dict())
    assert torch.equal(adopt.weight, plain.weight)


def test_wrong_shape_checkpoint_is_reported():
    emb = constrain(nn.Embedding(V, D), torch.zeros(N, D))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        emb.load_state_dict({"weight": torch.zeros(V + 1, D)})


def test_missing_key_error_names_the_plain_key() -> None:
    model = nn.Sequential(constrained())
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict({})
    assert '"0.weight"' in str(info.value)
    assert "parametrizations" not in str(info.value)
    assert model.load_state_dict({}, strict=False).missing_keys == ["0.weight"]


def test_checkpoint_never_stores_the_table_twice():
    big_v, d, n = 4000, 16, 3600
    emb = constrain(nn.Embedding(big_v, d), torch.randn(n, d))
    model = nn.Sequential(emb, nn.Linear(d, 1))
    for sd in (model.state_dict(), merged_state_dict(model)):
        buf = io.BytesIO()
        torch.save(sd, buf)
        table_bytes = big_v * d * 4
        assert table_bytes <= buf.tell() < table_bytes * 1.05


def test_merged_state_dict_shares_no_storage():
    model = nn.Sequential(constrain(nn.Embedding(V, D), torch.zeros(N, D)), nn.Linear(D, 2))
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live.add(model[0].weight.untyped_storage().data_ptr())
    sd = merged_state_dict(model)
    assert sorted(sd) == ["0.weight", "1.bias", "1.weight"]
    assert all(t.untyped_storage().data_ptr() not in live for t in sd.values())
