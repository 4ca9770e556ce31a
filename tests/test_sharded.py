"""Sharded training. In one process, the split storage: the pinned rows kept apart from the free
rows (``PinnedRows.split_storage()``, what FSDP2 triggers) compute bitwise what the aliased table
computes (bags: the gradient to rounding), with the same gradients, state dicts and write checks.
On 2 CPU processes (gloo), FSDP2 (``fully_shard``): a constrained model trains exactly, only the
free rows are communicated, and state dicts / DCP / merged_state_dict work. The model has a token
embedding (prefix; free rows sharded on rows, the default), an EmbeddingBag (scattered rows; free
rows sharded on columns with ``shard_placement_fn``) and a constrained output head: one spawned run
(~6 s on an idle machine) of tests/scripts/fsdp.py records, the tests below assert.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import D, N, Rows, V
from helpers.distributed import rank_records
from torch import nn

from embconstraint import PinnedRowsError, constrain, merged_state_dict, release
from embconstraint._mechanism import pin_of


def _pair(cls, layout: Rows, **kwargs):
    torch.manual_seed(0)
    emb = cls(V, D, **kwargs)
    ref = torch.randn(N, D)
    aliased = constrain(emb, ref, indices=layout.indices)
    split = copy.deepcopy(aliased)
    pin_of(split).split_storage()
    return aliased, split, ref


def _grads(emb, run):
    emb.zero_grad()
    out = run(emb)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    (p,) = emb.parameters()
    return out.detach(), p.grad.clone()


@pytest.mark.parametrize("padding_idx", [None, 5, 8])
def test_lookup_bitwise_with_the_same_gradient(layout, padding_idx):
    aliased, split, ref = _pair(nn.Embedding, layout, padding_idx=padding_idx)
    assert pin_of(split).storage == "split" and pin_of(aliased).storage == "aliased"
    assert "storage=split" in repr(split)
    ids = torch.tensor([[0, 5, 8, 10, 11], [2, 2, 9, 1, 3]])
    for kwargs in ({}, {"scale_grad_by_freq": True}):
        a = _grads(aliased, lambda e, kw=kwargs: F.embedding(ids, e.weight, padding_idx, **kw))
        s = _grads(split, lambda e, kw=kwargs: F.embedding(ids, e.weight, padding_idx, **kw))
        assert torch.equal(a[0], s[0]) and torch.equal(a[1], s[1])
    assert torch.equal(split.weight, aliased.weight)
    assert type(split.weight).__name__ == "PinnedWeight"


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 8])
def test_bag_bitwise_with_the_same_gradient(layout, mode, padding_idx):
    aliased, split, _ = _pair(nn.EmbeddingBag, layout, mode=mode, padding_idx=padding_idx)
    ids = torch.tensor([0, 5, 8, 10, 11, 2, 2, 9, 8, 3])
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


def test_other_uses_state_dict_and_writes(layout):
    aliased, split, ref = _pair(nn.Embedding, layout)
    rows = torch.tensor(layout.pinned)
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
    _, split, ref = _pair(nn.Embedding, Rows.of("prefix"))
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
        release(split)
    assert torch.equal(split.weight[:N], ref)


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
            constrain(emb, torch.randn(N, D), root=model, indices=layout.indices)
        else:
            model = nn.ModuleDict(
                {"emb": emb, "head": constrain(head, torch.randn(N, D), indices=layout.indices)}
            )
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
        outs.append(
            (out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], probe.seen[:])
        )
        Shapes.seen = []
    (a, ga, _), (s, gs, seen) = outs
    assert torch.allclose(a, s, rtol=0, atol=1e-6)
    assert len(ga) == (1 if tied else 2)
    assert all(torch.allclose(x_, y_, rtol=0, atol=1e-5) for x_, y_ in zip(ga, gs, strict=True))
    assert seen == []


# -- FSDP2 on 2 CPU processes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks of tests/scripts/fsdp.py recorded."""
    return rank_records("fsdp", tmp_path_factory.mktemp("fsdp"), timeout=180)


@pytest.fixture(scope="module")
def sizes(ranks) -> dict[str, int]:
    """The script's model: V, D, N_TOK (token embedding), V_BAG, N_BAG (bag), H, N_HEAD (head), STEPS."""
    return ranks[0]["sizes"]


@pytest.mark.distributed
def test_pinned_rows_exact_and_free_rows_match_one_process(ranks, sizes):
    for r in ranks:
        steps = r["constrained"]
        assert len(steps) == sizes["STEPS"]
        assert [s["pinned_exact"] for s in steps] == [True] * sizes["STEPS"]
        assert all(s["free_maxdiff"] <= 1e-5 for s in steps), [s["free_maxdiff"] for s in steps]
        assert torch.equal(r["refs"]["tok"], ranks[0]["refs"]["tok"])


@pytest.mark.distributed
def test_only_free_rows_are_sharded_and_communicated(ranks, sizes):
    v, d, h = sizes["V"], sizes["D"], sizes["H"]
    pinned = (
        sizes["N_TOK"] + sizes["N_BAG"]
    ) * d  # pinned elements of the embeddings (each its own FSDP unit)
    pinned_head = (
        sizes["N_HEAD"] * h
    )  # pinned elements of the head (in the root unit, not resharded after forward)
    for r in ranks:
        params = dict(r["fsdp_params"])
        assert params["tok.parametrizations.weight.original"] == (v - sizes["N_TOK"], d)
        assert params["bag.parametrizations.weight.original"] == (sizes["V_BAG"] - sizes["N_BAG"], d)
        assert params["head.parametrizations.weight.original"] == (v - sizes["N_HEAD"], h)
        # the free rows are sharded on rows (tok, the default) or on columns (bag, shard_placement_fn)
        assert r["placements"] == {"tok": "(Shard(dim=0),)", "bag": "(Shard(dim=1),)"}
        assert r["storage"] == [
            "split",
            "split",
            "split",
        ]  # the (V, D) tables were dropped: no unsharded copy
        # forward sees FSDP's all-gathered plain free rows, never the sharded DTensor
        assert r["free_in_forward"] == ["Parameter"] * (2 * sizes["STEPS"])
        for plain, con in zip(r["plain"], r["constrained"], strict=True):
            # the embeddings' groups are all-gathered twice a step (forward, and again in backward
            # since non-root modules reshard after forward), reduce-scattered once
            assert plain["all_gather"] - con["all_gather"] == 2 * pinned + pinned_head
            assert plain["reduce_scatter"] - con["reduce_scatter"] == pinned + pinned_head


@pytest.mark.distributed
def test_no_vocab_sized_table_is_built_per_step(ranks):
    for r in ranks:
        assert all(s["vd_ops"] == [] for s in r["constrained"]), [s["vd_ops"] for s in r["constrained"]]
        assert all(s["vd_ops"] for s in r["plain"])  # the probe sees the plain model's (V, D) gradient


@pytest.mark.distributed
def test_full_and_sharded_state_dicts(ranks, sizes):
    keys = ["bag.weight", "body.bias", "body.weight", "head.weight", "tok.weight"]
    for r in ranks:
        assert r["read_weights"] is True
        assert r["full_state_dict"]["keys"] == (keys if r["rank"] == 0 else [])  # cpu_offload: rank 0 only
        assert r["full_state_dict"]["plain_load_equal"] is True  # loads into the plain model, bitwise
        assert r["sharded_state_dict"] == {
            "keys": keys,
            "types": ["DTensor"],
            "tok_shape": (sizes["V"], sizes["D"]),
        }
        assert r["set_full_state_dict"] is True
        assert r["set_sharded_state_dict"] is True


@pytest.mark.distributed
def test_dcp_round_trip_and_merged_state_dict(ranks):
    for r in ranks:
        assert r["dcp"] is True
        keys = ["bag.weight", "body.bias", "body.weight", "head.weight", "tok.weight"]
        # plain full tensors on every rank (safetensors-ready), merged weights bitwise
        assert r["merged_state_dict"] == {"keys": keys, "types": ["Tensor"], "equal": True}


@pytest.mark.distributed
def test_constrain_after_fully_shard_is_refused(ranks):
    for r in ranks:
        msg = r["bad_input"]
        assert msg.startswith("ValueError") and "fully_shard" in msg and msg.endswith("unchanged=True"), msg
