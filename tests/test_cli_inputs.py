"""The command line on inputs that used to lose a file or end in a traceback: ``rows`` onto its own
weights file (a link included), state dicts with keys that are not strings, and any unexpected error
(never Python's exit status 1, which is ``verify``'s "rows differ")."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from embconstraint.cli import main
from embconstraint.files import extract_rows, verify

safetensors_torch = pytest.importorskip("safetensors.torch")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({"emb.weight": torch.randn(6, 3), "proj.bias": torch.randn(3)}, str(path))
    return path


@pytest.mark.parametrize("how", ["same name", "symlink", "hard link", "other spelling"])
def test_rows_refuses_to_write_onto_its_weights_file(tmp_path, capsys, weights, how):
    before = _digest(weights)
    if how == "same name":
        out = weights
    elif how == "symlink":
        out = tmp_path / "link.safetensors"
        os.symlink(weights, out)
    elif how == "hard link":
        out = tmp_path / "hard.safetensors"
        os.link(weights, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "model.safetensors"
    code, stdout, err = _run(capsys, "rows", weights, out, "--pinned", 4, "--key", "emb.weight")
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        "is the weights file itself: writing onto it would replace the weights file by the rows only" in err
    )
    assert _digest(weights) == before  # every tensor is still there
    assert sorted(safetensors_torch.load_file(str(weights))) == ["emb.weight", "proj.bias"]


def test_rows_to_another_file_still_works(tmp_path, capsys, weights):
    out = tmp_path / "rows.safetensors"
    code, stdout, _ = _run(capsys, "rows", weights, out, "--pinned", 4, "--key", "emb.weight")
    assert code == 0 and "wrote the rows 4.. of emb.weight" in stdout
    rows = safetensors_torch.load_file(str(out))
    assert torch.equal(rows["emb.weight"], safetensors_torch.load_file(str(weights))["emb.weight"][4:])


def test_extract_rows_function_refuses_the_same_file(weights):
    with pytest.raises(ValueError, match="is the weights file itself"):
        extract_rows(weights, weights, num_pinned=4, keys=["emb.weight"])


@pytest.fixture
def int_keys(tmp_path):
    """A state dict whose only 2-D tensor has an int key, one with a mix, a checkpoint with one."""
    paths = {
        "only": tmp_path / "only.pt",
        "mixed": tmp_path / "mixed.pt",
        "ckpt": tmp_path / "int.ckpt",
        "ref": tmp_path / "ref.pt",
    }
    torch.save({1: torch.zeros(5, 2)}, paths["only"])
    torch.save({1: torch.zeros(5, 2), "emb.weight": torch.zeros(5, 2)}, paths["mixed"])
    torch.save({"epoch": 1, "state_dict": {0: torch.zeros(5, 2)}}, paths["ckpt"])
    torch.save({"w": torch.zeros(3, 2)}, paths["ref"])
    return paths


@pytest.mark.parametrize(
    ("argv", "which", "key"),
    [
        (["rows", "{only}", "{out}", "--pinned", "3"], "only", "1"),
        (["rows", "{mixed}", "{out}", "--pinned", "3", "--key", "emb.weight"], "mixed", "1"),
        (["verify", "{only}", "--reference", "{ref}"], "only", "1"),
        (["verify", "{mixed}", "--reference", "{ref}", "--key", "emb.weight"], "mixed", "1"),
        (["verify", "{ckpt}", "--reference", "{ref}"], "ckpt", "0"),
        (["export", "{only}", "{out_pt}"], "only", "1"),
        (["export", "{ckpt}", "{out_pt}"], "ckpt", "0"),
    ],
    ids=["rows", "rows --key", "verify", "verify --key", "verify ckpt", "export", "export ckpt"],
)
def test_keys_that_are_not_strings_exit_2_with_one_line(tmp_path, capsys, int_keys, argv, which, key):
    names = {
        **{k: str(v) for k, v in int_keys.items()},
        "out": str(tmp_path / "out.safetensors"),
        "out_pt": str(tmp_path / "out.pt"),
    }
    code, stdout, err = _run(capsys, *[a.format(**names) for a in argv])
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{names[which]!r} has the key {key} (int); the keys of a state dict must be strings" in err
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "out.pt").exists()


def test_verify_function_refuses_an_in_memory_dict_with_int_keys():
    with pytest.raises(ValueError, match=r"weights has the key 3 \(int\)"):
        verify({3: torch.zeros(4, 2)}, torch.zeros(2, 2))


@pytest.mark.parametrize("error", [RuntimeError("boom\nsecond line"), KeyError("k"), AttributeError("a")])
def test_an_unexpected_error_exits_2_not_1(monkeypatch, tmp_path, capsys, weights, error):
    """Python exits 1 on an uncaught exception, which would read as verify's "rows differ"."""
    import embconstraint.files as files

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(files, "verify", broken)
    code, stdout, err = _run(capsys, "verify", weights, "--reference", weights, "--key", "emb.weight")
    assert code == 2 and stdout == ""
    assert err.startswith(f"embconstraint: error: unexpected {type(error).__name__}: ")
    assert err.count("\n") == 1 and "Traceback" not in err
