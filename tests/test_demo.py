"""The vocabulary-growth demo, run for real (few epochs): once as ``python -m embconstraint demo``
in a subprocess, once in-process through ``main`` without matplotlib."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from helpers import run_python

from embconstraint.cli import main
from embconstraint.demo import make_data, plot_embeddings
from embconstraint.files import verify

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW = re.compile(
    r"^(model 1|model 2, no constraint|model 2, EmbeddingConstraint)\s+(\d+)\s+(\S+)\s+"
    r"(\S+)\s+(\S+)\s+([\d.]+) s$",
    re.M,
)


def parse_table(text: str) -> dict[str, dict[str, str]]:
    rows = {m[1]: {"items": m[2], "dev": m[3], "acc_old": m[4], "acc_new": m[5]} for m in ROW.finditer(text)}
    assert set(rows) == {"model 1", "model 2, no constraint", "model 2, EmbeddingConstraint"}, text
    return rows


@pytest.mark.subprocess
def test_demo_subprocess_table_png_and_checkpoints(tmp_path):
    out = tmp_path / "demo"
    proc = run_python(
        "-m", "embconstraint", "demo", "--epochs", "2", "--seed", "3", "--out", out, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = parse_table(proc.stdout)
    assert rows["model 1"]["items"] == "12" and rows["model 1"]["dev"] == "—"
    assert rows["model 2, EmbeddingConstraint"]["dev"] == "0"
    unconstrained = float(rows["model 2, no constraint"]["dev"])
    assert unconstrained > 0
    for row in rows.values():
        assert row["acc_old"].endswith("%")
    assert rows["model 1"]["acc_new"] == "—" and rows["model 2, no constraint"]["acc_new"].endswith("%")

    png = out / "embeddings.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 3 * image.shape[0] // 2

    # the printed deviations are those of the saved checkpoints, checked independently
    ref = torch.load(out / "model1.ckpt", weights_only=True)["state_dict"]["items.weight"]
    assert ref.shape == (12, 16)
    for name, ok in (("model2_constrained", True), ("model2_unconstrained", False)):
        weights = torch.load(out / f"{name}.ckpt", weights_only=True)["state_dict"]["items.weight"]
        assert weights.shape == (16, 16)
        assert torch.equal(weights[:12], ref) is ok
        result = verify(out / f"{name}.ckpt", out / "model1.ckpt", key="items.weight")
        assert result.ok is ok
        if not ok:
            assert (
                f"{result.max_deviation:.3g}" == rows["model 2, no constraint"]["dev"]
            )  # 3 significant digits
            assert result.max_deviation == (weights[:12].double() - ref.double()).abs().max().item()


def test_demo_in_process_without_matplotlib_and_default_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert main(["demo", "--epochs", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "matplotlib is not installed" in stdout and "embconstraint[demo]" in stdout
    rows = parse_table(stdout)
    assert rows["model 2, EmbeddingConstraint"]["dev"] == "0"
    assert float(rows["model 2, no constraint"]["dev"]) > 0
    (out,) = tmp_path.glob("embconstraint-demo-*")
    assert re.fullmatch(r"embconstraint-demo-\d{8}-\d{6}", out.name)
    assert sorted(p.name for p in out.iterdir()) == [
        "model1.ckpt",
        "model2_constrained.ckpt",
        "model2_unconstrained.ckpt",
    ]


def test_demo_gpu_without_gpu_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("a GPU is available")
    assert main(["demo", "--accelerator", "gpu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embconstraint: error: accelerator 'gpu'") and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_make_data_is_deterministic_and_category_revealing():
    a, b, c = make_data(0), make_data(0), make_data(1)
    assert torch.equal(a.train_contexts, b.train_contexts) and torch.equal(a.test_targets, b.test_targets)
    assert not torch.equal(a.train_contexts, c.train_contexts)
    assert len(a.items) == 16 and a.num_old == 12
    assert a.categories[:12].count("fruit") == 6 and a.categories[12:].count("fruit") == 2
    # a sentence's category word matches its item's category, apart from a little noise
    fruit_words = {a.words.index(w) for w in ("sweet", "dessert", "smoothie", "snack", "jam", "tart")}
    is_fruit = torch.tensor([a.categories[t] == "fruit" for t in a.test_targets.tolist()])
    says_fruit = torch.tensor([bool(set(ctx) & fruit_words) for ctx in a.test_contexts.tolist()])
    agreement = (is_fruit == says_fruit).float().mean().item()
    assert 0.9 < agreement < 1.0


def test_plot_embeddings_writes_a_png(tmp_path):
    from embconstraint.demo import RunResult

    data = make_data(0)
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(12, 4, generator=g)
    runs = [
        RunResult("model 1", 12, 0.0, 1.0, weights=w1),
        RunResult(
            "model 2", 16, 0.0, 1.0, 1.0, max_dev=0.0, weights=torch.cat([w1, torch.randn(4, 4, generator=g)])
        ),
    ]
    path = plot_embeddings(runs, data, tmp_path / "p.png")
    assert path == tmp_path / "p.png" and path.read_bytes()[:8] == PNG_SIGNATURE
