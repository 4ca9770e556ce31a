"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): a constrained model trains exactly, only the
free rows are communicated, and state dicts / DCP / merged_state_dict work (issue 11). The model
has a token embedding (prefix; free rows sharded on rows, the default), an EmbeddingBag (scattered
rows; free rows sharded on columns with ``shard_placement_fn``) and a constrained output head.

One spawned run (~6 s on an idle machine); tests/_fsdp_script.py records, this file asserts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fsdp_script import N_BAG, N_HEAD, N_TOK, STEPS, V_BAG, D, H, V  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "_fsdp_script.py"
ROOT = SCRIPT.parent.parent
PINNED = (N_TOK + N_BAG) * D  # pinned elements of the embeddings (each its own FSDP unit)
PINNED_HEAD = N_HEAD * H  # pinned elements of the head (in the root unit, not resharded after forward)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SCRIPT), str(out)],
                         capture_output=True, text=True, timeout=180, env=env)
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)
               if (out / f"rank{r}.pt").exists()]
    assert len(records) == 2, run.stdout[-2000:] + run.stderr[-4000:]
    for r in records:
        assert "error" not in r, r["error"]
    return records


def test_pinned_rows_exact_and_free_rows_match_one_process(ranks):
    for r in ranks:
        steps = r["constrained"]
        assert len(steps) == STEPS
        assert [s["pinned_exact"] for s in steps] == [True] * STEPS
        assert all(s["free_maxdiff"] <= 1e-5 for s in steps), [s["free_maxdiff"] for s in steps]
        assert torch.equal(r["refs"]["tok"], ranks[0]["refs"]["tok"])


def test_only_free_rows_are_sharded_and_communicated(ranks):
    for r in ranks:
        params = dict(r["fsdp_params"])
        assert params["tok.parametrizations.weight.original"] == (V - N_TOK, D)
        assert params["bag.parametrizations.weight.original"] == (V_BAG - N_BAG, D)
        assert params["head.parametrizations.weight.original"] == (V - N_HEAD, H)
        # the free rows are sharded on rows (tok, the default) or on columns (bag, shard_placement_fn)
        assert r["placements"] == {"tok": "(Shard(dim=0),)", "bag": "(Shard(dim=1),)"}
        assert r["storage"] == ["split", "split", "split"]  # the (V, D) tables were dropped: no unsharded copy
        # forward sees FSDP's all-gathered plain free rows, never the sharded DTensor
        assert r["free_in_forward"] == ["Parameter"] * (2 * STEPS)
        for plain, con in zip(r["plain"], r["constrained"], strict=True):
            # the embeddings' groups are all-gathered twice a step (forward, and again in backward
            # since non-root modules reshard after forward), reduce-scattered once
            assert plain["all_gather"] - con["all_gather"] == 2 * PINNED + PINNED_HEAD
            assert plain["reduce_scatter"] - con["reduce_scatter"] == PINNED + PINNED_HEAD


def test_no_vocab_sized_table_is_built_per_step(ranks):
    for r in ranks:
        assert all(s["vd_ops"] == [] for s in r["constrained"]), [s["vd_ops"] for s in r["constrained"]]
        assert all(s["vd_ops"] for s in r["plain"])  # the probe sees the plain model's (V, D) gradient


def test_full_and_sharded_state_dicts(ranks):
    keys = ["bag.weight", "body.bias", "body.weight", "head.weight", "tok.weight"]
    for r in ranks:
        assert r["read_weights"] is True
        assert r["full_state_dict"]["keys"] == (keys if r["rank"] == 0 else [])  # cpu_offload: rank 0 only
        assert r["full_state_dict"]["plain_load_equal"] is True  # loads into the plain model, bitwise
        assert r["sharded_state_dict"] == {"keys": keys, "types": ["DTensor"], "tok_shape": (V, D)}
        assert r["set_full_state_dict"] is True
        assert r["set_sharded_state_dict"] is True


def test_dcp_round_trip_and_merged_state_dict(ranks):
    for r in ranks:
        assert r["dcp"] is True
        keys = ["bag.weight", "body.bias", "body.weight", "head.weight", "tok.weight"]
        # plain full tensors on every rank (safetensors-ready), merged weights bitwise
        assert r["merged_state_dict"] == {"keys": keys, "types": ["Tensor"], "equal": True}


def test_constrain_after_fully_shard_is_refused(ranks):
    for r in ranks:
        msg = r["bad_input"]
        assert msg.startswith("ValueError") and "fully_shard" in msg and msg.endswith("unchanged=True"), msg

