"""DeepSpeed on 2 CPU processes (gloo), ``deepspeed.initialize``: ZeRO-3, and ZeRO-1/2.

One spawned run (~15 s on an idle machine) of tests/scripts/deepspeed_zero.py records, the tests below
assert. The model has a token embedding (the first rows pinned), an EmbeddingBag (scattered rows) and
an untied constrained head; a second model ties the head to the token embedding. Every step the
pinned rows are bitwise the reference on every rank, the free rows equal one process trained on the
global batch (AdamW), only the free rows are partitioned, gathered and reduced (the elements are
counted against the plain model), and nothing of size (V, D) is built. ZeRO-3 checkpoints resume
bitwise; ``zero_to_fp32`` and the consolidated 16-bit state dict give the plain model through
``merged_state_dict(model, state_dict)``; ``save_rows`` works inside ``GatheredParameters``; a model
built under ``deepspeed.zero.Init`` is constrained (gathered for the time it takes).

Skipped where DeepSpeed is not installed (``pip install embconstraint[deepspeed]``).
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from helpers.distributed import rank_records

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks of tests/scripts/deepspeed_zero.py recorded."""
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    try:
        return rank_records("deepspeed_zero", tmp_path_factory.mktemp("deepspeed"), timeout=240)
    finally:  # DeepSpeed's CPU shared-memory all-reduce leaves these behind (the script switches it off)
        for path in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
            os.remove(path)


@pytest.fixture(scope="module")
def sizes(ranks) -> dict[str, int]:
    """V, D, N_TOK (token embedding), V_BAG, N_BAG (bag), H, N_HEAD (untied head), STEPS."""
    return ranks[0]["sizes"]


RUNS = ["untied", "tied", "stage1_untied", "stage1_tied", "stage2_untied", "stage2_tied"]


@pytest.mark.parametrize("run", RUNS)
def test_pinned_rows_exact_and_free_rows_match_one_process(ranks, sizes, run):
    for r in ranks:
        steps = r[run]
        assert len(steps) == sizes["STEPS"]
        assert [s["pinned_exact"] for s in steps] == [True] * sizes["STEPS"]
        assert all(s["free_maxdiff"] <= 1e-5 for s in steps), [s["free_maxdiff"] for s in steps]
        assert all(s["vd_ops"] == [] for s in steps), [
            s["vd_ops"] for s in steps
        ]  # no (V, D) tensor in a step
    assert torch.equal(ranks[0]["refs"]["tok"], ranks[1]["refs"]["tok"])


def test_only_free_rows_are_partitioned_gathered_and_reduced(ranks, sizes):
    v, d, h = sizes["V"], sizes["D"], sizes["H"]
    free = {
        "tok.parametrizations.weight.original": (v - sizes["N_TOK"], d),
        "bag.parametrizations.weight.original": (sizes["V_BAG"] - sizes["N_BAG"], d),
        "head.parametrizations.weight.original": (v - sizes["N_HEAD"], h),
    }
    pinned = (sizes["N_TOK"] + sizes["N_BAG"]) * d + sizes["N_HEAD"] * h
    for r in ranks:
        shapes = {n: s for n, s, _ in r["partitioned"]}
        assert {n: shapes[n] for n in free} == free  # what ZeRO-3 partitions: the free rows
        assert all(numel == 0 for _, _, numel in r["partitioned"])  # held as partitions between steps
        assert r["storage"] == ["split", "split", "split"]
        plain_total = sum(torch.Size(s).numel() for _, s in r["plain_partitioned"])
        for plain, con in zip(r["plain"], r["untied"], strict=True):
            for kind in ("all_gather", "reduce_scatter"):
                times, rest = divmod(plain[kind], plain_total)  # each Parameter, this many times a step
                assert rest == 0 and times >= 1, (kind, plain[kind], plain_total)
                assert plain[kind] - con[kind] == times * pinned, (kind, plain, con)
        for plain, con in zip(
            r["stage2_plain"], r["stage2_untied"], strict=True
        ):  # ZeRO-2: grads all-reduced
            assert plain["all_reduce"] - con["all_reduce"] == pinned
            assert plain["all_gather"] - con["all_gather"] == pinned


def test_tied_head_shares_the_free_rows(ranks, sizes):
    for r in ranks:
        names = [n for n, _ in r["tied_partitioned"]]
        assert "head.parametrizations.weight.original" not in names  # one Parameter, the embedding's
        assert dict(r["tied_partitioned"])["tok.parametrizations.weight.original"] == (
            sizes["V"] - sizes["N_TOK"],
            sizes["D"],
        )


def test_checkpoint_resumes_bitwise(ranks):
    for r in ranks:
        assert r["resume"]["bitwise"] is True, r["resume"]


def test_zero_to_fp32_and_consolidated_state_dict_give_the_plain_model(ranks):
    keys = ["bag.weight", "body.bias", "body.weight", "head.weight", "tok.weight"]
    raw = [
        "bag.parametrizations.weight.original",
        "head.parametrizations.weight.original",
        "tok.parametrizations.weight.original",
    ]
    rank0 = ranks[0]
    for what in ("zero_to_fp32", "consolidated"):
        # DeepSpeed names the free rows by Parameter; merged_state_dict(model, sd) makes them plain, bitwise
        assert rank0[what] == {"raw_keys": raw, "keys": keys, "equal": True}, rank0[what]


def test_save_rows_inside_gathered_parameters(ranks):
    assert ranks[0]["save_rows"] == {"names": ["tok.weight", "bag.weight", "head.weight"], "equal": True}
    assert ranks[1]["save_rows"]["equal"] is True  # every rank loads the file rank 0 wrote


def test_model_built_under_zero_init_is_constrained(ranks):
    for r in ranks:
        got = dict(r["zero_init"])
        assert got.pop("maxdiff") <= 1e-5  # against one process started from the same values
        assert got == {"partitioned_before": True, "pinned": [True, True], "kept": True, "trained": True}


def test_clear_errors(ranks):
    for r in ranks:
        msg = r["read_outside_forward"]
        assert msg.startswith("RuntimeError") and "GatheredParameters" in msg, msg
        msg = r["after_initialize"]
        assert msg.startswith("ValueError") and "before deepspeed.initialize" in msg, msg
        assert msg.endswith("unchanged=True"), msg
