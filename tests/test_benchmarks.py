"""The benchmarks: the step-time benchmark runs end to end at tiny sizes and measures what it
claims (no timing assertions); every benchmark module is a ``python -m benchmarks.NAME`` command
that imports only the shared harness and the library."""

from __future__ import annotations

import ast
import importlib
import json

import pytest
import torch
from helpers import ROOT, run_python

from benchmarks import harness, step_time

TINY = {"vocab": 300, "dim": 8, "pinned": 0.9, "batch": 16, "seq": 4, "steps": 3, "warmup": 1}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The real command line, in quick mode at tiny sizes (every method, one process each)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_python(
        "-m",
        "benchmarks.step_time",
        "--quick",
        "--sizes",
        "2k",
        "--dims",
        "8",
        "--pinned",
        "90",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--batch",
        "16",
        "--seq",
        "4",
        "--busy-retries",
        "0",  # no re-runs: the suite itself loads the machine
        "--out",
        out,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def _result(data: dict, method: str, vocab: int) -> dict:
    (r,) = [r for r in data["results"] if r["method"] == method and r["vocab"] == vocab]
    return r


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_run_writes_markdown_json_and_png(quick_run):
    out, stdout, data = quick_run
    md = (out / "results.md").read_text()
    for section in (
        "## Targets",
        "## Median step time",
        "## Median step time (ms; ratio to the full-table limit)",
        "## Peak memory",
        "## Optimizer state",
        "## Max |pinned row - reference|",
    ):
        assert section in md
    assert "time vs full-table limit" in md
    for method in step_time.METHODS:
        assert method in md
    assert (out / "step_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["meta"]["torch_threads"] == data["results"][0]["threads"] >= 1
    assert {r["method"] for r in data["results"]} == set(step_time.METHODS)
    assert {r["vocab"] for r in data["results"]} == {2000}
    assert all(r["status"] == "ok" for r in data["results"]), [r.get("reason") for r in data["results"]]
    assert "wrote" in stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_run_measures_each_method(quick_run):
    _, _, data = quick_run
    for r in data["results"]:
        assert r["measured_steps"] >= 3 and r["median_ms"] > 0
        assert r["interleaved_median_ms"] is not None  # tiny models all fit together
        assert r["runs_timed"] == 2  # one isolated round (quick mode) + the interleaved run
        assert r["median_ms"] == min(r["isolated_median_ms"], r["interleaved_median_ms"])
        assert len(r["isolated_step_ms"]) == 3 and len(r["interleaved_step_ms"]) == 3
        assert r["train_bytes"] == r["peak_bytes"] - r["model_bytes"]  # one round: same baseline
    free = _result(data, "free_only", 2000)
    assert free["median_ms_vs_free"] == 1.0
    full = _result(data, "full_table", 2000)
    assert full["median_ms_vs_full"] == 1.0
    ec = _result(data, "embconstraint", 2000)  # both lower limits, as ratios of the same median
    assert ec["median_ms_vs_free"] == pytest.approx(ec["median_ms"] / free["median_ms"])
    assert ec["median_ms_vs_full"] == pytest.approx(ec["median_ms"] / full["median_ms"])
    # Optimizer state: AdamW keeps 2 floats per trainable element (+ a step counter per parameter).
    head = 8 * 16 + 16
    n_free = 2000 - 1800
    for method, trainable in (
        ("unconstrained", 2000 * 8 + head),
        ("embconstraint", n_free * 8 + head),
        ("cat", n_free * 8 + head),
        ("peft", n_free * 8 + head),
        ("full_table", n_free * 8 + head),
        ("free_only", (n_free + 1) * 8 + head),
    ):  # + its padding row
        r = _result(data, method, 2000)
        assert r["trainable_params"] == trainable, method
        assert 8 * trainable <= r["optimizer_state_bytes"] <= 8 * trainable + 64, method


@pytest.mark.slow
@pytest.mark.subprocess
def test_pinned_rows_exact_for_embconstraint_and_drift_under_grad_hook(quick_run):
    _, _, data = quick_run
    for vocab in (2000,):
        ec = _result(data, "embconstraint", vocab)
        assert ec["max_pinned_deviation"] == 0.0 and ec["pinned_exact"] is True
        hook = _result(data, "grad_hook", vocab)  # AdamW's weight decay moves the "frozen" rows
        assert hook["max_pinned_deviation"] > 0 and hook["pinned_exact"] is False
        for exact in ("callback", "cat", "peft", "full_table"):
            assert _result(data, exact, vocab)["max_pinned_deviation"] == 0.0, exact
        assert _result(data, "unconstrained", vocab)["max_pinned_deviation"] > 0
        assert _result(data, "free_only", vocab)["max_pinned_deviation"] is None


def test_run_one_in_process_matches_the_semantics():
    config = step_time.Config(**TINY)
    hook = step_time.run_one("grad_hook", config)
    no_decay = step_time.run_one("grad_hook", step_time.Config(**TINY, weight_decay=0.0))
    ec = step_time.run_one("embconstraint", config)
    assert hook.max_pinned_deviation > 0
    assert no_decay.max_pinned_deviation == 0.0 and no_decay.pinned_exact  # decay is the culprit
    assert ec.pinned_exact and ec.max_pinned_deviation == 0.0
    assert len(ec.step_ms) == 3 and len(ec.warmup_ms) == 1
    # Same batches, same initial weights: the first losses agree across exact methods.
    cat = step_time.run_one("cat", config)
    assert cat.final_loss == pytest.approx(ec.final_loss, rel=1e-5)
    # The full-table limit trains exactly like embconstraint (same rows read, same gradients).
    full = step_time.run_one("full_table", config)
    assert (
        full.final_loss == ec.final_loss
        and full.pinned_exact
        and full.trainable_params == ec.trainable_params
    )


def test_interleaved_timing_returns_every_method():
    out = step_time.run_interleaved(["embconstraint", "cat", "free_only"], step_time.Config(**TINY))
    assert {m: len(t) for m, t in out["step_ms"].items()} == {"embconstraint": 3, "cat": 3, "free_only": 3}


def test_batches_favouring_new_rows():
    config = step_time.Config(vocab=1000, dim=4, pinned=0.9, ids="new", num_batches=1)
    ((ids, _),) = step_time.make_batches(config)
    share_new = (ids >= config.num_pinned).float().mean().item()
    assert 0.45 < share_new < 0.65  # 1/2 + 1/2 * 10%
    ((uniform, _),) = step_time.make_batches(step_time.Config(vocab=1000, dim=4, pinned=0.9, num_batches=1))
    assert (uniform >= 900).float().mean().item() < 0.2
    assert torch.equal(step_time.make_batches(config)[0][0], ids)  # seeded


def test_memory_estimate_skips_instead_of_crashing(tmp_path):
    assert (
        step_time.main(
            [
                "--sizes",
                "1M",
                "--dims",
                "1024",
                "--pinned",
                "90",
                "--methods",
                "unconstrained,free_only",
                "--mem-limit",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in data["results"]] == ["skipped", "skipped"]
    unconstrained = _result(data, "unconstrained", 1_000_000)
    assert unconstrained["reason"].startswith("needs ~")
    assert 15 * 2**30 < unconstrained["estimate_bytes"] < 30 * 2**30
    assert "skipped: needs ~" in (tmp_path / "results.md").read_text()


def test_estimates_order_methods_by_memory():
    c = step_time.Config(vocab=1_000_000, dim=128, pinned=0.9)
    est = {m: step_time.estimate_bytes(m, c) for m in step_time.METHODS}
    assert est["free_only"] < est["embconstraint"] < est["cat"] < est["unconstrained"]
    assert est["full_table"] == est["embconstraint"]
    assert est["embconstraint"] < est["peft"]


@pytest.mark.parametrize(("text", "value"), [("10k", 10_000), ("1M", 1_000_000), ("2500", 2500)])
def test_parse_size(text, value):
    assert harness.parse_size(text) == value


@pytest.mark.parametrize("bad", ["ten", "0", "1.5", "-3k"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="expected"):
        harness.parse_size(bad)


def test_parse_fraction_and_cli_errors(capsys):
    assert [step_time.parse_fraction(t) for t in ("90", "99%", "0.5")] == [0.9, 0.99, 0.5]
    with pytest.raises(ValueError, match="pinned fraction"):
        step_time.parse_fraction("100")
    with pytest.raises(SystemExit):
        step_time.build_parser().parse_args(["--methods", "embconstraint,nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pinned"):
        step_time.Config(vocab=10, dim=2, pinned=1.0)
    with pytest.raises(ValueError, match="ids"):
        step_time.Config(vocab=10, dim=2, pinned=0.5, ids="zipf")
    with pytest.raises(ValueError, match="method"):
        step_time.run_one("lora", step_time.Config(vocab=10, dim=2, pinned=0.5))


BENCHMARKS = sorted(
    p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "harness")
)


def test_the_benchmarks_are_found():
    assert {"step_time", "llm_new_tokens", "fixed_cost", "fsdp_comm", "ab_step"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_imports_only_the_harness(name):
    """No benchmark reaches into another's names, the tests, or sys.path; none reads sys.argv
    outside ``main``."""
    tree = ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.split(".")[0] == "benchmarks"} <= {"benchmarks.harness"}, imported
    private = {m for m in imported - {"__future__"} if any(part.startswith("_") for part in m.split("."))}
    assert not private and not imported & {"tests", "conftest"}, imported
    names = {
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "benchmarks.harness"
        for a in n.names
    }
    assert not any(name.startswith("_") for name in names), names
    assert "sys.path" not in ast.unparse(tree)
    outside_main = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "main")]
    assert "sys.argv" not in "\n".join(ast.unparse(n) for n in outside_main)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_is_a_module_with_a_main(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{name}")
