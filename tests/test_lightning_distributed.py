"""EmbeddingConstraint on 2 CPU processes (gloo), each run a subprocess (tests/scripts) whose
ranks record what they saw: ``Trainer(strategy="ddp")`` with a tied head, and
``ModelParallelStrategy`` (FSDP2, or tensor parallelism, applied in configure_model) or DDP with an embedding built in
``__init__`` and one built in ``configure_model``."""

from __future__ import annotations

import pytest
import torch
from helpers import run_script
from helpers.lightning import DIM, VOCAB_NEW, VOCAB_OLD

pytestmark = pytest.mark.distributed
ENV = {"MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore", "LOCAL_RANK": None}


@pytest.mark.slow
@pytest.mark.subprocess
def test_ddp_two_cpu_processes_keep_pinned_rows_exact_and_agree(tmp_path):
    run = run_script("lightning_ddp", tmp_path, timeout=240, env=ENV)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)

    for r in ranks:
        # constrained from the sanity check on, pinned rows exact at every step, on every rank
        assert [e for e, _, _ in r["seen"]].count("train_batch") == 4 and r["seen"][0][0] == "sanity"
        assert all(constrained and exact for _, constrained, exact in r["seen"])
        assert r["metric"] == 0.0
        # DDP holds (and all-reduces) the free rows only; the pinned table is not a buffer, so
        # broadcast_buffers has nothing to send
        assert r["wrapper"] == "DistributedDataParallel" and r["broadcast_buffers"]
        assert r["buffers"] == []
        assert ("module.embedding.parametrizations.weight.original", (VOCAB_NEW - VOCAB_OLD, DIM)) in r[
            "params"
        ]
        assert all(shape != (VOCAB_NEW, DIM) for _, shape in r["params"])  # tied head: no second copy
        assert (
            sum(torch.Size(s).numel() for _, s in r["params"])
            == (VOCAB_NEW - VOCAB_OLD) * DIM + DIM * DIM + DIM
        )
        # released after fit, tie restored, old rows kept
        assert r["weight_type"] == "Parameter" and r["tied"]
        assert torch.equal(r["state"]["embedding.weight"][:VOCAB_OLD], r["reference"])

    # the ranks saw different data, yet agree bitwise at every step and at the end; the free rows trained
    assert not torch.equal(torch.cat(ranks[0]["batches"]), torch.cat(ranks[1]["batches"]))
    assert len(ranks[0]["weights"]) == len(ranks[1]["weights"]) == 4
    for w0, w1 in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        assert torch.equal(w0, w1)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][key], value), key
    assert not torch.equal(ranks[0]["weights"][0][VOCAB_OLD:], ranks[0]["weights"][-1][VOCAB_OLD:])


@pytest.mark.parametrize(
    "strategy",  # the default suite runs tensor parallelism (ModelParallelStrategy); the others are slow
    [pytest.param("mp", marks=pytest.mark.slow), "tp", pytest.param("ddp", marks=pytest.mark.slow)],
)
def test_two_cpu_processes_constrain_both_embeddings(strategy, tmp_path):
    V, D, N = 98, 16, 60  # the sizes of tests/scripts/lightning_fsdp.py
    run = run_script("lightning_fsdp", tmp_path, strategy, timeout=180, env={**ENV, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    for r in (0, 1):
        rec = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert "error" not in rec, rec["error"]
        assert rec["strategy"] == ("DDPStrategy" if strategy == "ddp" else "ModelParallelStrategy")
        # both embeddings constrained before configure_optimizers: only their free rows are trained
        if (
            strategy == "tp"
        ):  # each rank holds its rows (rank 0's 49 rows are all pinned), the head is torch's DTensor
            free = (0, D) if r == 0 else (V - N, D)
            assert rec["optim_shapes"] == sorted([free, free, (V, D), (V,)])
        else:
            assert rec["optim_shapes"] == sorted([(V - N, D), (V - N, D), (V, D), (V,)])
        assert rec["seen"] == [True] * 3  # pinned rows bitwise the reference after every step, every rank
