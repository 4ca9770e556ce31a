"""Tensor parallelism of a constrained model on CPU processes (gloo), torchtitan's Llama plan: the
embedding under ``RowwiseParallel`` (vocabulary-parallel lookup), the head under ``ColwiseParallel``.

tests/scripts/tensor_parallel.py runs on a 1-D mesh of 2 processes (``1d``, ~8 s on an idle machine:
torch's styles then ``constrain``; ``constrain`` then :mod:`embconstraint.parallel`'s styles with
``loss_parallel``; a tied head) and, marked slow, on a 2 x 2 (data x tensor) mesh with ``fully_shard``
over the data-parallel dimension (``2d``, 4 processes, ~13 s). Every step, on every rank: its pinned rows bitwise the
reference, its rows of every merged weight within 1e-5 of one process on the global batch, nothing
of size (V, D) built; the activations communicated are the plain model's (the pinned rows never are),
and fully_shard gathers and reduces the free rows only. State dicts are the plain model's
(``get_model_state_dict`` full and sharded, DCP, ``merged_state_dict``).

tests/scripts/hf_tensor_parallel.py (~8 s, 2 processes under ``torch.distributed.run``) runs
transformers' own tensor parallelism: a tiny Llama grown by ``resize_token_embeddings``, loaded with
``from_pretrained(..., tp_plan="auto")`` (the vocabulary of ``embed_tokens`` and ``lm_head`` sharded,
each module's forward replaced by its style's wrapper), ``constrain_new_tokens``, SGD steps; untied
and tied, against the plain model trained in one process; ``merged_state_dict`` and ``save_pretrained``.
"""

from __future__ import annotations

import math

import pytest
from helpers.distributed import rank_records

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]

KEYS = ["body.bias", "body.weight", "head.bias", "head.weight", "tok.weight"]


@pytest.fixture(scope="module")
def one_d(tmp_path_factory):
    return rank_records("tensor_parallel", tmp_path_factory.mktemp("tp1d"), "1d", timeout=180)


@pytest.fixture(scope="module")
def two_d(tmp_path_factory):  # (4 processes: the tests that use it are marked slow)
    return rank_records("tensor_parallel", tmp_path_factory.mktemp("tp2d"), "2d", ranks=4, timeout=240)


def _exact(steps, n):
    """Pinned rows bitwise, this rank's rows within 1e-5 of one process, nothing of the size of the
    whole table built on any rank (no rank gathers the table)."""
    assert len(steps) == n
    assert [s["pinned_exact"] for s in steps] == [True] * n
    assert all(s["maxdiff"] <= 1e-5 for s in steps), [s["maxdiff"] for s in steps]
    assert all(s["vd_ops"] == [] for s in steps), [s["vd_ops"] for s in steps]


@pytest.mark.parametrize("run", ["after", "first_loss_parallel", "tied"])
def test_1d_pinned_rows_exact_and_rows_match_one_process(one_d, run):
    for r in one_d:
        _exact(r[run], r["sizes"]["STEPS"])


def test_1d_each_rank_holds_and_trains_its_rows(one_d):
    v, d, h = (one_d[0]["sizes"][k] for k in ("V", "D", "H"))
    n_tok, n_head = one_d[0]["sizes"]["N_TOK"], one_d[0]["sizes"]["N_HEAD"]
    half = math.ceil(v / 2)
    assert one_d[0]["shards"] == {"tok": (0, half), "head": (0, half)}
    assert one_d[1]["shards"] == {"tok": (half, v), "head": (half, v)}
    free_tok = [max(0, half - n_tok), v - max(half, n_tok)]  # rank 0 holds only pinned rows of tok
    free_head = [max(0, half - n_head), v - max(half, n_head)]
    for rank, r in enumerate(one_d):
        params = {n: s for n, s, _ in r["params"]}
        assert params["tok.parametrizations.weight.original"] == (free_tok[rank], d)
        assert params["head.parametrizations.weight.original"] == (free_head[rank], h)
        assert params["head.parametrizations.bias.original"] == (free_head[rank],)
        assert all(
            kind == "Parameter" for _, _, kind in r["params"]
        )  # plain: this rank's rows, not a DTensor


def test_1d_only_activations_are_communicated(one_d):
    for r in one_d:
        for plain, con in zip(r["plain"], r["after"], strict=True):
            assert con["functional"] == plain["functional"] and con["functional"]["all_reduce"] > 0
            assert con["all_gather"] == con["reduce_scatter"] == 0
        for plain, con in zip(r["plain_loss_parallel"], r["first_loss_parallel"], strict=True):
            assert con["functional"] == plain["functional"]  # loss_parallel: no all-gather of the logits
            assert "all_gather_into_tensor" not in con["functional"]


def test_1d_tied_head_shares_the_rows(one_d):
    for r in one_d:
        names = [n for n, _ in r["tied_params"]]
        assert names == ["body.bias", "body.weight", "tok.parametrizations.weight.original"]


@pytest.mark.parametrize("fixture", ["one_d", pytest.param("two_d", marks=pytest.mark.slow)])
def test_state_dicts_are_plain(request, fixture):
    for r in request.getfixturevalue(fixture):
        v, d = r["sizes"]["V"], r["sizes"]["D"]
        assert r["merged_sd"] == {"keys": KEYS, "types": ["Tensor"], "tok_shape": (v, d), "pinned": True}
        assert r["full_state_dict"] == {"keys": KEYS, "equal": True}  # loads into the plain model, bitwise
        # sharded: the DTensor sharded on rows that RowwiseParallel would hold
        assert r["sharded_state_dict"] == {"keys": KEYS, "tok": ("DTensor", (v, d), "(Shard(dim=0),)")}
        assert r["round_trip"] is True and r["dcp"] is True and r["plain_load"] is True


def test_refusals(one_d):
    for r in one_d:
        ref = r["refusals"]
        # torch's own styles on a constrained module: torch's KeyError (embconstraint.parallel's styles work)
        assert ref["torch_style_on_constrained"].startswith("KeyError"), ref
        assert (
            ref["colwise_embedding"].startswith("NotImplementedError")
            and "RowwiseParallel" in ref["colwise_embedding"]
        )
        msg = ref["constrain_shard1"]
        assert msg.startswith("ValueError") and "Shard(dim=1)" in msg and msg.endswith("unchanged=True"), msg
        assert ref["release"].startswith("RuntimeError") and "tensor parallelism" in ref["release"]
        assert ref["save_rows"].startswith("ValueError") and "merged_state_dict" in ref["save_rows"]


def _padded(shape: tuple, dp: int) -> int:
    """Elements fully_shard all-gathers for a Parameter of ``shape`` (dim 0 padded to a multiple of dp)."""
    if not shape:
        return 0
    return math.ceil(shape[0] / dp) * dp * math.prod(shape[1:])


@pytest.mark.slow
def test_2d_fsdp_and_tensor_parallel(two_d):
    for r in two_d:
        _exact(r["fsdp_tp"], r["sizes"]["STEPS"])
        assert r["storage"] == ["split", "split"]
        for name, local in (("tp_local", r["tp_local"]), ("tp_local_plain", r["tp_local_plain"])):
            tok = sum(_padded(s, 2) for n, s in local.items() if n.startswith("tok."))
            root = sum(_padded(s, 2) for n, s in local.items() if not n.startswith("tok."))
            steps = r["fsdp_tp" if name == "tp_local" else "plain"]
            for s in steps:  # tok's unit is gathered in forward and again in backward, the root's once
                assert s["all_gather"] == 2 * tok + root, (name, s["all_gather"], tok, root)
                assert s["reduce_scatter"] == tok + root
        # fully_shard shards this rank's free rows only: the pinned ones are neither gathered nor reduced
        free = {n: s for n, s in r["tp_local"].items() if "parametrizations" in n}
        assert set(free) == {
            "tok.parametrizations.weight.original",
            "head.parametrizations.weight.original",
            "head.parametrizations.bias.original",
        }
        for plain, con in zip(r["plain"], r["fsdp_tp"], strict=True):
            assert con["functional"] == plain["functional"]


@pytest.fixture(scope="module")
def hf_tp(tmp_path_factory):
    pytest.importorskip("transformers")
    return rank_records(
        "hf_tensor_parallel",
        tmp_path_factory.mktemp("hf_tp"),
        timeout=240,
        launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )


@pytest.mark.parametrize("run", ["untied", "tied"])
def test_transformers_tp_plan_auto(hf_tp, run):
    """``from_pretrained(tp_plan="auto")`` then ``constrain_new_tokens``: each rank trains its new rows
    (a plain Parameter, rank 0 none: it holds only old rows), pinned rows bitwise, every weight within
    1e-5 of one process, in training and in eval (transformers' local inference path for the head)."""
    n_steps, old, new = (hf_tp[0]["sizes"][k] for k in ("STEPS", "OLD", "NEW"))
    heads = 1 if run == "tied" else 2
    for rank, r in enumerate(hf_tp):
        # transformers shards both on the vocabulary and wraps their forwards
        assert r[f"{run}_loaded"] == {
            m: ("DTensor", "(Shard(dim=0),)", True) for m in ("embed_tokens", "lm_head")
        }
        free = [0, new - old][rank]  # rows 0..50 on rank 0 (all old), 51..100 on rank 1
        assert r[f"{run}_params"] == [("Parameter", (free, r["sizes"]["DIM"]))] * heads
        _exact_hf(r[f"{run}_steps"], n_steps)
        assert r[f"{run}_eval"] <= 1e-5


def _exact_hf(steps, n):
    assert len(steps) == n
    assert [s["pinned_exact"] for s in steps] == [True] * n
    assert all(s["maxdiff"] <= 1e-5 and s["maxdiff_other"] <= 1e-5 for s in steps), steps


@pytest.mark.parametrize("run", ["untied", "tied"])
def test_transformers_tp_plan_auto_saves_the_plain_model(hf_tp, run):
    for r in hf_tp:
        # merged_state_dict: plain whole tensors, the unconstrained model's keys, the one process's values
        merged = r[f"{run}_merged"]
        assert merged["keys"] and merged["types"] == ["Tensor"] and merged["pinned"], merged
        assert merged["maxdiff"] <= 1e-5
        # save_pretrained (transformers gathers the shards) writes what from_pretrained loads into a plain model
        assert r[f"{run}_saved"] == {
            "file_keys": True,
            "constrained": False,
            "equal": True,
            "tied": run == "tied",
        }


def test_transformers_tp_unknown_forward_wrapper_refused(hf_tp):
    for r in hf_tp:
        msg = r["refused"]
        assert (
            msg.startswith("ValueError") and "parallelize_module" in msg and msg.endswith("unchanged=True")
        ), msg
