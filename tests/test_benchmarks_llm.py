"""The Llama-shaped new-tokens benchmark runs end to end (quick mode, tiny sizes, the baselines)."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, run_python

pytestmark = pytest.mark.slow
pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-llm")
    proc = run_python(
        "-m",
        "benchmarks.llm_new_tokens",
        "--quick",
        "--sizes",
        "500",
        "--dims",
        "64",
        "--rounds",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--methods",
        "peft,whole,floor,embconstraint",
        "--out",
        out,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "llm_new_tokens.json").read_text())


def _result(data: dict, method: str, tied: bool) -> dict:
    (r,) = [r for r in data["results"] if r["method"] == method and r["tied"] is tied]
    return r


def test_quick_run_writes_both_tyings_and_every_method(quick_run):
    out, data = quick_run
    md = (out / "llm_new_tokens.md").read_text()
    assert "## V=500, D=64, tied" in md and "## V=500, D=64, untied" in md
    assert {(r["method"], r["tied"]) for r in data["results"]} == {
        (m, t) for m in ("peft", "whole", "floor", "embconstraint") for t in (True, False)
    }
    assert data["meta"]["torch_threads"] == 1 and data["meta"]["rounds"] == 3


@pytest.mark.parametrize("tied", [True, False])
def test_baselines_measured_and_peft_pinned_rows_exact(quick_run, tied):
    _, data = quick_run
    d = 64
    for method in ("peft", "whole", "floor"):
        r = _result(data, method, tied)
        assert r["status"] == "ok", r
        assert len(r["step_ms"]) == 3 and r["median_ms"] > 0
        assert r["peak_bytes"] > 0 and r["train_bytes"] > 0, r.get("memory_error")
    peft = _result(data, "peft", tied)
    assert peft["pinned_exact"] is True and peft["max_pinned_deviation"] == 0.0
    # PEFT trains a (64, D) delta for the embedding, and one for the head when untied.
    assert peft["trainable_params"] == (1 if tied else 2) * 64 * d
    assert _result(data, "floor", tied)["trainable_params"] == 64 * d
    whole = _result(data, "whole", tied)
    assert whole["trainable_params"] == (1 if tied else 2) * 564 * d
    assert whole["max_pinned_deviation"] > 0 and whole["pinned_exact"] is False  # the old rows drift


@pytest.mark.parametrize("tied", [True, False])
def test_embconstraint_trains_only_the_new_rows_and_keeps_the_old_ones_exact(quick_run, tied):
    _, data = quick_run
    r = _result(data, "embconstraint", tied)
    assert r["status"] == "ok", r
    assert len(r["step_ms"]) == 3 and r["median_ms"] > 0
    assert r["pinned_exact"] is True and r["max_pinned_deviation"] == 0.0
    # the new rows of the embedding, and of the head when untied: (64, D) each
    assert r["trainable_params"] == (1 if tied else 2) * 64 * 64
