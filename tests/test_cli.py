"""The command line: ``embconstraint export`` / ``verify`` (in-process through ``main``, and once
through a subprocess), and the library functions behind them; unusual inputs (torch's own
parametrizations, sparse/meta/nested tensors, renamed files, hard links) are passed through or
refused in one line."""

from __future__ import annotations

import os
import zipfile

import pytest
import pytorch_lightning as pl
import torch
from helpers import run_python
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrizations

from embconstraint import constrain, merged_state_dict
from embconstraint.cli import main
from embconstraint.files import export_checkpoint, read_indices, verify
from embconstraint.lightning import EmbeddingConstraint

V, N, D = 7, 4, 3


def run(argv, capsys):
    """``main(argv)`` -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code, out, err, *fragments):
    """Exit 2, one line on stderr starting with 'embconstraint: error:', no traceback."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("embconstraint: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def files(tmp_path):
    """A reference (N, D), a weight (V, D) whose first N rows are the reference, in several formats."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(N, D, generator=g)
    weight = torch.cat([ref, torch.randn(V - N, D, generator=g)])
    sd = {"emb.weight": weight, "emb_bias": torch.randn(D, generator=g)}
    paths = {
        "ref_pt": tmp_path / "ref.pt",
        "ref_st": tmp_path / "ref.safetensors",
        "w_pt": tmp_path / "w.pt",
        "w_st": tmp_path / "w.safetensors",
        "w_bare": tmp_path / "w_bare.pt",
    }
    torch.save(ref, paths["ref_pt"])
    save_file({"old.weight": ref}, paths["ref_st"])
    torch.save(sd, paths["w_pt"])
    save_file(sd, paths["w_st"])
    torch.save(weight, paths["w_bare"])
    return ref, weight, paths


# -- verify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("w", ["w_pt", "w_st", "w_bare"])
@pytest.mark.parametrize("r", ["ref_pt", "ref_st"])
def test_verify_equal_rows_exit_0(files, capsys, w, r):
    _, _, paths = files
    code, out, err = run(["verify", paths[w], "--reference", paths[r]], capsys)
    assert (code, err) == (0, "")
    assert f"{N} pinned rows checked (of {V})" in out
    assert "max |Δ| = 0.0," in out and "all bitwise equal" in out


def test_verify_reports_exact_deviation_exit_1(files, tmp_path, capsys):
    ref, weight, paths = files
    moved = weight.clone()
    moved[2, 1] = torch.nextafter(moved[2, 1], torch.tensor(float("inf")))  # one ulp
    moved[3, 0] += 0.25
    path = tmp_path / "moved.safetensors"
    save_file({"emb.weight": moved}, path)
    code, out, _ = run(["verify", path, "--reference", paths["ref_pt"]], capsys)
    expected = (moved[:N].double() - ref.double()).abs().max().item()
    assert code == 1
    assert f"max |Δ| = {expected!r}," in out and "2 row(s) differ" in out
    result = verify(path, paths["ref_pt"])
    assert (result.ok, result.rows_differing, result.max_deviation) == (False, 2, expected)


def test_verify_one_ulp_is_a_deviation(files):
    ref, weight, _ = files
    moved = weight.clone()
    moved[0, 0] = torch.nextafter(moved[0, 0], torch.tensor(float("-inf")))
    result = verify(moved, ref)
    assert not result.ok and result.rows_differing == 1
    assert result.max_deviation == abs(moved[0, 0].double() - ref[0, 0].double()).item() > 0


def test_verify_is_bitwise_signed_zero_and_nan(tmp_path):
    ref = torch.tensor([[0.0, float("nan")], [1.0, 2.0]])
    same = torch.tensor([[0.0, float("nan")], [1.0, 2.0], [5.0, 6.0]])
    assert verify(same, ref).ok  # nan with the same bits is the same row
    neg = same.clone()
    neg[0, 0] = -0.0
    result = verify(neg, ref)
    assert (result.ok, result.rows_differing, result.max_deviation) == (False, 1, 0.0)


def test_verify_indices_text_and_tensor(files, tmp_path, capsys):
    ref, _, paths = files
    rows = [5, 0, 3, 6]
    scattered = torch.randn(V, D)
    scattered[rows] = ref
    w = tmp_path / "scattered.pt"
    torch.save({"emb.weight": scattered}, w)
    txt = tmp_path / "rows.txt"
    txt.write_text("5, 0\n3   6  # pinned rows\n")
    pt = tmp_path / "rows.pt"
    torch.save(torch.tensor(rows), pt)
    assert read_indices(txt).tolist() == rows
    for idx in (txt, pt):
        code, out, _ = run(["verify", w, "--reference", paths["ref_pt"], "--indices", idx], capsys)
        assert code == 0 and "4 pinned rows checked" in out
    code, out, _ = run(["verify", w, "--reference", paths["ref_pt"]], capsys)  # rows 0..3: wrong
    assert code == 1


def test_verify_key_selection(files, tmp_path, capsys):
    ref, weight, paths = files
    two = tmp_path / "two.pt"
    torch.save({"emb.weight": weight, "head.weight": torch.randn(5, D)}, two)
    code, out, err = run(["verify", two, "--reference", paths["ref_pt"]], capsys)
    assert_error(code, out, err, "2 2-D tensors", "--key", "'emb.weight'", "'head.weight'")
    code, out, _ = run(["verify", two, "--reference", paths["ref_pt"], "--key", "emb.weight"], capsys)
    assert code == 0 and out.startswith("emb.weight:")
    # REF with several tensors: --key picks the same name there
    ref_two = tmp_path / "ref_two.safetensors"
    save_file({"emb.weight": ref, "head.weight": torch.randn(5, D)}, ref_two)
    code, out, _ = run(["verify", two, "--reference", ref_two, "--key", "emb.weight"], capsys)
    assert code == 0
    code, out, err = run(["verify", two, "--reference", ref_two, "--key", "head.weight"], capsys)
    assert code == 1  # head.weight (5 rows of randn) vs emb.weight's first 5 rows
    # a Lightning checkpoint as REF: its state_dict is used
    ckpt = tmp_path / "old.ckpt"
    torch.save({"epoch": 1, "state_dict": {"emb.weight": ref, "lin.weight": torch.randn(2, D)}}, ckpt)
    code, out, _ = run(["verify", two, "--reference", ckpt, "--key", "emb.weight"], capsys)
    assert code == 0


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing_weights", ["weights", "does not exist"]),
        ("missing_reference", ["reference", "does not exist"]),
        ("missing_key", ["has no tensor 'nope'", "'emb.weight'"]),
        ("dim_mismatch", ["shape mismatch", "(7, 3)", "(4, 5)"]),
        ("too_many_rows", ["shape mismatch", "9 rows"]),
        ("indices_range", ["[0, 7)", "max 7"]),
        ("indices_count", ["3 entries", "4 rows"]),
        ("indices_text", ["line 2", "'x'", "not an integer"]),
        ("indices_missing", ["indices file", "does not exist"]),
        ("garbage_pt", ["not a readable torch file"]),
        ("truncated_pt", ["truncated or corrupted"]),
        ("bitflip_pt", ["corrupted torch file", "CRC-32"]),
        ("truncated_st", ["not a readable .safetensors file"]),
        ("unknown_ext", ["unknown extension '.npy'"]),
        ("directory", ["is a directory"]),
        ("inexact_dtype", ["cannot be represented exactly", "torch.float16"]),
        ("integer_weight", ["floating point", "torch.int64"]),
        ("pickled_object", ["weights_only"]),
    ],
)
def test_verify_errors_exit_2(files, tmp_path, capsys, case, fragments):
    ref, weight, paths = files
    w, r, extra = paths["w_pt"], paths["ref_pt"], []
    if case == "missing_weights":
        w = tmp_path / "nope.pt"
    elif case == "missing_reference":
        r = tmp_path / "nope.safetensors"
    elif case == "missing_key":
        extra = ["--key", "nope"]
    elif case == "dim_mismatch":
        r = tmp_path / "r5.pt"
        torch.save(torch.randn(4, 5), r)
    elif case == "too_many_rows":
        r = tmp_path / "r9.pt"
        torch.save(torch.randn(9, D), r)
    elif case in ("indices_range", "indices_count", "indices_text"):
        text = {"indices_range": "0 1 2 7", "indices_count": "0,1,2", "indices_text": "0 1\n2 x"}[case]
        (tmp_path / "i.txt").write_text(text)
        extra = ["--indices", tmp_path / "i.txt"]
    elif case == "indices_missing":
        extra = ["--indices", tmp_path / "none.txt"]
    elif case == "garbage_pt":
        w = tmp_path / "garbage.pt"
        w.write_bytes(b"this is not a checkpoint at all" * 10)
    elif case == "truncated_pt":
        w = tmp_path / "trunc.pt"
        w.write_bytes(paths["w_pt"].read_bytes()[:500])
    elif case == "bitflip_pt":
        w = tmp_path / "flip.pt"
        data = bytearray(paths["w_pt"].read_bytes())
        with zipfile.ZipFile(paths["w_pt"]) as z:
            info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 8)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data[start + 5] ^= 0x10  # a bit of the stored tensor data
        w.write_bytes(bytes(data))
    elif case == "truncated_st":
        w = tmp_path / "trunc.safetensors"
        w.write_bytes(paths["w_st"].read_bytes()[:60])
    elif case == "unknown_ext":
        w = tmp_path / "w.npy"
        w.write_bytes(b"x")
    elif case == "directory":
        w = tmp_path
    elif case == "inexact_dtype":
        w = tmp_path / "half.pt"
        torch.save({"emb.weight": weight.half()}, w)
    elif case == "integer_weight":
        w = tmp_path / "int.pt"
        torch.save({"emb.weight": torch.arange(V * D).reshape(V, D)}, w)
    elif case == "pickled_object":
        w = tmp_path / "obj.pt"
        torch.save({"emb.weight": weight, "config": zipfile.ZipInfo("x")}, w)
    code, out, err = run(["verify", w, "--reference", r, *extra], capsys)
    assert_error(code, out, err, *fragments)


def test_bitflip_fixture_really_changes_the_values(files, tmp_path):
    """The bit-flip case above is refused by the checksum, not by luck: torch.load alone reads
    the flipped file without complaint and gets different values."""
    _, weight, paths = files
    data = bytearray(paths["w_pt"].read_bytes())
    with zipfile.ZipFile(paths["w_pt"]) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 8)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 5] ^= 0x10
    flipped = tmp_path / "flip.pt"
    flipped.write_bytes(bytes(data))
    loaded = torch.load(flipped, weights_only=True)
    assert not all(torch.equal(loaded[k], v) for k, v in torch.load(paths["w_pt"]).items())


# -- export ---------------------------------------------------------------------------------


class _Tiny(pl.LightningModule):
    def __init__(self, vocab: int = V, dim: int = D) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return nn.functional.cross_entropy(self.head(self.emb(x)), (x + 1) % self.emb.num_embeddings)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_export_lightning_checkpoint_saved_while_constrained(tmp_path, capsys):
    """A checkpoint written by ModelCheckpoint during a constrained fit -> export -> verify."""
    torch.manual_seed(0)
    old = nn.Embedding(N, D)
    model = _Tiny()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            EmbeddingConstraint(model.emb, old),
            pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt"),
        ],
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(V)), batch_size=V)
    trainer.fit(model, data)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert "emb.weight" in state and not any("parametrizations" in k for k in state)
    for out in ("model.safetensors", "model.pt", "model.pth"):
        code, stdout, err = run(["export", ckpt, tmp_path / out], capsys)
        assert (code, err) == (0, ""), err
        assert f"wrote {len(state)} tensors" in stdout
        written = load_file(tmp_path / out) if out.endswith(".safetensors") else torch.load(tmp_path / out)
        assert written.keys() == state.keys()
        assert all(torch.equal(written[k], v) for k, v in state.items())
        assert torch.equal(written["emb.weight"], model.emb.weight)
        assert not torch.equal(written["emb.weight"][N:], torch.zeros(V - N, D))
    torch.save(old.weight.detach(), tmp_path / "old.pt")
    code, out, _ = run(
        ["verify", tmp_path / "model.safetensors", "--reference", tmp_path / "old.pt", "--key", "emb.weight"],
        capsys,
    )
    assert code == 0 and "max |Δ| = 0.0," in out


@pytest.mark.parametrize("indices", [None, [5, 0, 3, 6]])
def test_export_raw_parametrization_keys_refused_or_merged(tmp_path, capsys, indices):
    """named_parameters() of a constrained model holds the free rows only: export refuses them,
    and merges them exactly when given the pinned rows."""
    torch.manual_seed(1)
    ref = torch.randn(N, D)
    model = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, 2))
    constrain(model[0], ref, indices=indices)
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(1.0)  # train-like change of the free rows
    raw = {k: p.detach() for k, p in model.named_parameters()}
    assert "0.parametrizations.weight.original" in raw
    ckpt = tmp_path / "raw.ckpt"
    torch.save({"state_dict": raw}, ckpt)
    code, out, err = run(["export", ckpt, tmp_path / "m.safetensors"], capsys)
    assert_error(code, out, err, "'0.parametrizations.weight.original'", "--reference")
    assert not (tmp_path / "m.safetensors").exists()
    torch.save({"pinned": ref}, tmp_path / "ref.pt")
    argv = ["export", ckpt, tmp_path / "m.safetensors", "--reference", tmp_path / "ref.pt"]
    if indices is not None:
        (tmp_path / "rows.txt").write_text(" ".join(map(str, indices)))
        argv += ["--indices", tmp_path / "rows.txt"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    written = load_file(tmp_path / "m.safetensors")
    expected = merged_state_dict(model)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], v) for k, v in expected.items())


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("unknown_ext", ["unknown extension '.npz'", ".safetensors"]),
        ("missing_dir", ["output directory", "does not exist"]),
        ("missing_ckpt", ["checkpoint", "does not exist"]),
        ("not_a_checkpoint", ["neither a Lightning checkpoint", "'epoch'"]),
        ("bare_tensor", ["bare tensor"]),
        ("truncated", ["truncated or corrupted"]),
        ("non_tensor_safetensors", ["not tensors", ".pt instead"]),
        ("useless_reference", ["no raw"]),
        ("reference_dim", ["shape mismatch", "(4, 5)"]),
    ],
)
def test_export_errors_exit_2(tmp_path, capsys, case, fragments):
    good = tmp_path / "good.ckpt"
    torch.save({"epoch": 0, "state_dict": {"emb.weight": torch.randn(V, D)}}, good)
    ckpt, out, extra = good, tmp_path / "out.safetensors", []
    if case == "unknown_ext":
        out = tmp_path / "out.npz"
    elif case == "missing_dir":
        out = tmp_path / "no" / "such" / "out.pt"
    elif case == "missing_ckpt":
        ckpt = tmp_path / "none.ckpt"
    elif case == "not_a_checkpoint":
        ckpt = tmp_path / "odd.ckpt"
        torch.save({"epoch": 3, "weights": [1, 2]}, ckpt)
    elif case == "bare_tensor":
        ckpt = tmp_path / "t.pt"
        torch.save(torch.zeros(2, 2), ckpt)
    elif case == "truncated":
        ckpt = tmp_path / "trunc.ckpt"
        ckpt.write_bytes(good.read_bytes()[:-100])
    elif case == "non_tensor_safetensors":
        ckpt = tmp_path / "extra.ckpt"
        torch.save({"state_dict": {"emb.weight": torch.zeros(2, 2), "step": 3}}, ckpt)
    elif case in ("useless_reference", "reference_dim"):
        if case == "reference_dim":
            ckpt = tmp_path / "raw.ckpt"
            torch.save({"state_dict": {"e.parametrizations.weight.original": torch.zeros(3, D)}}, ckpt)
        torch.save(torch.zeros(4, 5 if case == "reference_dim" else D), tmp_path / "ref.pt")
        extra = ["--reference", tmp_path / "ref.pt"]
    code, stdout, err = run(["export", ckpt, out, *extra], capsys)
    assert_error(code, stdout, err, *fragments)
    assert not out.exists()


def test_export_checkpoint_function_returns_what_it_wrote(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(2)}
    torch.save({"state_dict": sd, "epoch": 4}, tmp_path / "c.ckpt")
    written = export_checkpoint(tmp_path / "c.ckpt", tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt")
    assert all(torch.equal(written[k], sd[k]) and torch.equal(back[k], sd[k]) for k in sd)
    assert not list(tmp_path.glob(".c.pt.*"))  # no temporary file left behind


# -- unusual inputs ---------------------------------------------------------------------------------


def _torch_parametrized(kind: str) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    if kind == "orthogonal":
        parametrizations.orthogonal(model[0])
    else:
        parametrizations.spectral_norm(model[0])
    return model.state_dict()


@pytest.mark.parametrize("kind", ["orthogonal", "spectral_norm"])
def test_export_passes_torch_parametrizations_through(kind, tmp_path, capsys) -> None:
    sd = _torch_parametrized(kind)
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "a.ckpt")
    code, out, err = run(["export", tmp_path / "a.ckpt", tmp_path / "a.pt"], capsys)
    assert code == 0, err
    written = torch.load(tmp_path / "a.pt")
    assert list(written) == list(sd)
    assert all(torch.equal(written[k], sd[k]) for k in sd)


def test_export_never_merges_a_reference_into_torch_parametrizations(tmp_path, capsys) -> None:
    sd = _torch_parametrized("orthogonal")
    torch.save({"state_dict": sd}, tmp_path / "a.ckpt")
    torch.save(torch.randn(4, 3), tmp_path / "ref.pt")
    code, out, err = run(
        ["export", tmp_path / "a.ckpt", tmp_path / "a.pt", "--reference", tmp_path / "ref.pt"], capsys
    )
    if code == 2:  # refusing (nothing to merge the reference into) is fine: one line, no file
        assert_error(code, out, err, "reference")
        assert not (tmp_path / "a.pt").exists()
        return
    written = torch.load(tmp_path / "a.pt")
    assert code == 0 and list(written) == list(sd)
    assert all(torch.equal(written[k], sd[k]) for k in sd)


def test_exported_file_mode_follows_the_umask(tmp_path, capsys) -> None:
    torch.save({"state_dict": {"e.weight": torch.ones(5, 3)}}, tmp_path / "a.ckpt")
    old = os.umask(0o022)
    try:
        code, out, err = run(["export", tmp_path / "a.ckpt", tmp_path / "a.safetensors"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644


def test_export_onto_its_own_input_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "train.pt"  # a full Lightning checkpoint saved with a .pt name
    torch.save({"state_dict": {"e.weight": torch.ones(5, 3)}, "epoch": 4, "optimizer_states": [{}]}, path)
    before = path.read_bytes()
    code, out, err = run(["export", path, path], capsys)
    assert_error(code, out, err, "train.pt")
    assert path.read_bytes() == before


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    torch.save(w[:2].clone(), tmp_path / "ref.pt")
    return w


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda w: w.to_sparse(), id="sparse"),
        pytest.param(lambda w: torch.empty_like(w, device="meta"), id="meta"),
        pytest.param(lambda w: torch.nested.nested_tensor([w, w[:2]]), id="nested"),
    ],
)
def test_verify_unusual_tensor_is_a_one_line_error(make, weights, tmp_path, capsys) -> None:
    torch.save({"w": make(weights)}, tmp_path / "w.pt")
    code, out, err = run(["verify", tmp_path / "w.pt", "--reference", tmp_path / "ref.pt"], capsys)
    assert_error(code, out, err, "'w'")


def test_verify_key_missing_from_reference_is_an_error(weights, tmp_path, capsys) -> None:
    torch.save({"w": weights}, tmp_path / "w.pt")
    torch.save({"other.weight": weights[:2].clone()}, tmp_path / "ref2.pt")
    code, out, err = run(
        ["verify", tmp_path / "w.pt", "--reference", tmp_path / "ref2.pt", "--key", "w"], capsys
    )
    assert_error(code, out, err, "'w'", "ref2.pt")


def test_verify_raw_parametrization_entry_is_an_error(weights, tmp_path, capsys) -> None:
    torch.save({"e.parametrizations.weight.original": weights[2:].clone()}, tmp_path / "raw.pt")
    code, out, err = run(["verify", tmp_path / "raw.pt", "--reference", tmp_path / "ref.pt"], capsys)
    assert_error(code, out, err, "e.parametrizations.weight.original")


def test_verify_safetensors_renamed_pt(weights, tmp_path, capsys) -> None:
    save_file({"w": weights}, str(tmp_path / "w.pt"))
    code, out, err = run(["verify", tmp_path / "w.pt", "--reference", tmp_path / "ref.pt"], capsys)
    if code == 0:  # reading it by its content is fine
        assert "all bitwise equal" in out
        return
    assert_error(code, out, err, "safetensors")
    assert "export_state_dict" not in err


def test_export_onto_a_hard_link_of_its_input_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "train.pt"
    torch.save({"state_dict": {"e.weight": torch.ones(5, 3)}, "epoch": 4}, path)
    os.link(path, tmp_path / "link.pt")
    before = path.read_bytes()
    code, out, err = run(["export", path, tmp_path / "link.pt"], capsys)
    assert_error(code, out, err, "link.pt", "checkpoint itself")
    assert path.read_bytes() == before


def test_torch_file_renamed_safetensors_is_read_by_content(weights, tmp_path, capsys) -> None:
    torch.save({"w": weights}, tmp_path / "w.safetensors")
    code, out, err = run(["verify", tmp_path / "w.safetensors", "--reference", tmp_path / "ref.pt"], capsys)
    assert code == 0 and "all bitwise equal" in out, err


def test_verify_reference_key_names_the_tensor_in_ref(weights, tmp_path, capsys) -> None:
    torch.save({"w": weights}, tmp_path / "w.pt")
    torch.save({"other.weight": weights[:2].clone()}, tmp_path / "ref2.pt")
    code, out, err = run(
        [
            "verify",
            tmp_path / "w.pt",
            "--reference",
            tmp_path / "ref2.pt",
            "--key",
            "w",
            "--reference-key",
            "other.weight",
        ],
        capsys,
    )
    assert code == 0 and out.startswith("w: 2 pinned rows checked"), err


def test_export_merges_an_embconstraint_raw_entry_next_to_a_torch_parametrization(tmp_path, capsys) -> None:
    sd = _torch_parametrized("spectral_norm")
    free, ref = torch.randn(2, 3), torch.randn(3, 3)
    sd["e.parametrizations.weight.original"] = free
    torch.save(sd, tmp_path / "a.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code, out, err = run(
        ["export", tmp_path / "a.pt", tmp_path / "b.pt", "--reference", tmp_path / "ref.pt"], capsys
    )
    assert code == 0, err
    written = torch.load(tmp_path / "b.pt")
    assert torch.equal(written["e.weight"], torch.cat([ref, free]))
    assert "0.parametrizations.weight.original" in written  # torch's own: passed through


@pytest.mark.parametrize(
    ("make", "ext"),
    [
        pytest.param(lambda w: w.to_sparse(), "safetensors", id="sparse-safetensors"),
        pytest.param(
            lambda w: torch.nested.nested_tensor([w, w[:2]]), "safetensors", id="nested-safetensors"
        ),
        pytest.param(lambda w: torch.empty_like(w, device="meta"), "pt", id="meta-pt"),
        pytest.param(lambda w: torch.empty_like(w, device="meta"), "safetensors", id="meta-safetensors"),
    ],
)
def test_export_unusable_tensor_is_a_one_line_error(make, ext, weights, tmp_path, capsys) -> None:
    torch.save({"state_dict": {"w": make(weights)}}, tmp_path / "a.ckpt")
    code, out, err = run(["export", tmp_path / "a.ckpt", tmp_path / f"a.{ext}"], capsys)
    assert_error(code, out, err, "'w'")
    assert not (tmp_path / f"a.{ext}").exists()


def test_export_sparse_tensor_to_pt_passes_through(weights, tmp_path, capsys) -> None:
    torch.save({"state_dict": {"w": weights.to_sparse()}}, tmp_path / "a.ckpt")
    code, out, err = run(["export", tmp_path / "a.ckpt", tmp_path / "a.pt"], capsys)
    assert code == 0, err
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"].to_dense(), weights)


# -- the parser -----------------------------------------------------------------------------


def test_help_version_and_usage_errors(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(c in out for c in ("demo", "export", "verify"))
    code, out, _ = run(["demo", "--help"], capsys)
    assert code == 0 and all(o in out for o in ("--epochs", "--seed", "--out", "--accelerator"))
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("embconstraint 0.")
    code, _, err = run([], capsys)
    assert code == 2 and "a command is required" in err
    code, _, err = run(["verify", "w.pt"], capsys)  # --reference is required
    assert code == 2 and "--reference" in err
    code, _, err = run(["demo", "--epochs", "0"], capsys)
    assert code == 2 and "positive integer" in err
    code, _, err = run(["demo", "--accelerator", "tpu"], capsys)
    assert code == 2 and "invalid choice" in err


@pytest.mark.subprocess
def test_python_dash_m_subprocess(files, tmp_path):
    _, _, paths = files
    help_ = run_python("-m", "embconstraint", "--help", timeout=120)
    assert help_.returncode == 0 and "verify" in help_.stdout
    bad = run_python(
        "-m", "embconstraint", "verify", tmp_path / "nope.pt", "--reference", paths["ref_pt"], timeout=120
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("embconstraint: error: ") and len(bad.stderr.strip().splitlines()) == 1
    ok = run_python(
        "-m", "embconstraint", "verify", paths["w_st"], "--reference", paths["ref_st"], timeout=120
    )
    assert ok.returncode == 0 and "max |Δ| = 0.0," in ok.stdout
