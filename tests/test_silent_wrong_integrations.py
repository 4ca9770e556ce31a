"""Issue 12: silent wrong results in the integrations (Lightning, transformers) and the CLI.

Same convention as ``test_silent_wrong_core.py``: each ``xfail(strict=True)`` test states the
behaviour the issue asks for; a fix makes it pass and removes the marker.
"""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from _lightning_helpers import PLTinyLM, loader, reference, trainer_kwargs
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrizations

from embconstraint import release
from embconstraint.cli import main
from embconstraint.lightning import EmbeddingConstraint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's hints; torch's nested-tensor prototype warning
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("embconstraint: error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- 12.4 (Lightning): no stale (V - n, D) grad after fit -------------------------------------

def test_backward_after_fit_with_the_callback(tmp_path) -> None:
    model = PLTinyLM()
    pl.Trainer(callbacks=[EmbeddingConstraint(model.embedding, reference())],
               **trainer_kwargs(tmp_path)).fit(model, loader())
    grad = model.embedding.weight.grad
    assert grad is None or grad.shape == model.embedding.weight.shape
    model.zero_grad(set_to_none=True)
    x, _ = next(iter(loader()))
    model(x).sum().backward()  # e.g. a saliency map on the trained model
    assert model.embedding.weight.grad.shape == model.embedding.weight.shape


# -- 12.11 (Lightning): a param group naming self.embedding.weight ----------------------------

class _NamedWeightGroups(PLTinyLM):
    def configure_optimizers(self):
        rest = list(self.head.parameters()) + list(self.proj.parameters())
        return torch.optim.SGD([{"params": [self.embedding.weight], "lr": 0.1}, {"params": rest}], lr=0.1)


def test_param_group_naming_embedding_weight_names_the_fix(tmp_path) -> None:
    model = _NamedWeightGroups()
    trainer = pl.Trainer(callbacks=[EmbeddingConstraint(model.embedding, reference())], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError) as info:
        trainer.fit(model, loader())
    text = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert "embedding.parameters()" in text
    assert "embedding.parametrizations.weight.original" in text


class _NameBasedNoDecay(PLTinyLM):
    """The usual "no weight decay for embeddings" groups, selected by the plain name."""

    def configure_optimizers(self):
        named = list(self.named_parameters())
        no_decay = [p for n, p in named if n.endswith("embedding.weight")]  # empty while constrained
        decay = [p for n, p in named if not n.endswith("embedding.weight")]
        return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=0.1)


class _EmbeddingLeftOut(PLTinyLM):
    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("embedding.")], lr=0.1)


@pytest.mark.parametrize(("cls", "fragment"), [(_NameBasedNoDecay, "param group is empty"),
                                               (_EmbeddingLeftOut, "in no optimizer param group")])
def test_name_based_param_groups_that_miss_the_rows_warn(cls, fragment, tmp_path) -> None:
    model = cls()
    trainer = pl.Trainer(callbacks=[EmbeddingConstraint(model.embedding, reference())], **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="EmbeddingConstraint: .*" + fragment) as record:
        trainer.fit(model, loader())
    assert any("'embedding.parametrizations.weight.original'" in str(w.message) for w in record)


def test_parameters_based_groups_do_not_warn(tmp_path, recwarn) -> None:
    model = PLTinyLM()
    pl.Trainer(callbacks=[EmbeddingConstraint(model.embedding, reference())],
               **trainer_kwargs(tmp_path)).fit(model, loader())
    assert not [w for w in recwarn if "EmbeddingConstraint" in str(w.message)]


# -- 12.10 (hf): releasing the returned embedding releases its tied head ----------------------

def test_hf_release_of_the_embedding_releases_the_tied_head(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from embconstraint.hf import constrain_input_embeddings

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    emb = constrain_input_embeddings(model, torch.zeros(2, 8), indices=[3, 7])
    merged = emb.weight.detach().clone()
    release(emb)
    sd = model.state_dict()
    assert torch.equal(sd["transformer.wte.weight"], merged)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again, one Parameter
    assert not hasattr(model.lm_head, "parametrizations")
    model.save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(again.lm_head.weight, merged)


def test_hf_release_of_the_tied_head_releases_its_embedding() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from embconstraint import is_constrained
    from embconstraint.hf import constrain_input_embeddings

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    emb = constrain_input_embeddings(model, torch.zeros(2, 8), indices=[3, 7])
    merged = emb.weight.detach().clone()
    release(model.lm_head)  # never a head left holding the (V - n, D) free rows
    assert not is_constrained(emb) and not hasattr(model.lm_head, "parametrizations")
    assert model.lm_head.weight is emb.weight and torch.equal(emb.weight, merged)
    assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, 12)


# -- 12.9: CLI export ------------------------------------------------------------------------

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
    code, _, err = _run(["export", tmp_path / "a.ckpt", tmp_path / "a.pt"], capsys)
    assert code == 0, err
    written = torch.load(tmp_path / "a.pt")
    assert list(written) == list(sd)
    assert all(torch.equal(written[k], sd[k]) for k in sd)


def test_export_never_merges_a_reference_into_torch_parametrizations(tmp_path, capsys) -> None:
    sd = _torch_parametrized("orthogonal")
    torch.save({"state_dict": sd}, tmp_path / "a.ckpt")
    torch.save(torch.randn(4, 3), tmp_path / "ref.pt")
    code, _, err = _run(["export", tmp_path / "a.ckpt", tmp_path / "a.pt", "--reference", tmp_path / "ref.pt"], capsys)
    if code == 2:  # refusing (nothing to merge the reference into) is fine: one line, no file
        _one_line_error(code, err, "reference")
        assert not (tmp_path / "a.pt").exists()
        return
    written = torch.load(tmp_path / "a.pt")
    assert code == 0 and list(written) == list(sd)
    assert all(torch.equal(written[k], sd[k]) for k in sd)


def test_exported_file_mode_follows_the_umask(tmp_path, capsys) -> None:
    torch.save({"state_dict": {"e.weight": torch.ones(5, 3)}}, tmp_path / "a.ckpt")
    old = os.umask(0o022)
    try:
        code, _, err = _run(["export", tmp_path / "a.ckpt", tmp_path / "a.safetensors"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644


def test_export_onto_its_own_input_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "train.pt"  # a full Lightning checkpoint saved with a .pt name
    torch.save({"state_dict": {"e.weight": torch.ones(5, 3)}, "epoch": 4, "optimizer_states": [{}]}, path)
    before = path.read_bytes()
    code, _, err = _run(["export", path, path], capsys)
    _one_line_error(code, err, "train.pt")
    assert path.read_bytes() == before


# -- 12.9: CLI verify ------------------------------------------------------------------------

@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    torch.save(w[:2].clone(), tmp_path / "ref.pt")
    return w


@pytest.mark.parametrize("make", [pytest.param(lambda w: w.to_sparse(), id="sparse"),
                                  pytest.param(lambda w: torch.empty_like(w, device="meta"), id="meta"),
                                  pytest.param(lambda w: torch.nested.nested_tensor([w, w[:2]]), id="nested")])
def test_verify_unusual_tensor_is_a_one_line_error(make, weights, tmp_path, capsys) -> None:
    torch.save({"w": make(weights)}, tmp_path / "w.pt")
    code, _, err = _run(["verify", tmp_path / "w.pt", "--reference", tmp_path / "ref.pt"], capsys)
    _one_line_error(code, err, "'w'")


def test_verify_key_missing_from_reference_is_an_error(weights, tmp_path, capsys) -> None:
    torch.save({"w": weights}, tmp_path / "w.pt")
    torch.save({"other.weight": weights[:2].clone()}, tmp_path / "ref2.pt")
    code, _, err = _run(["verify", tmp_path / "w.pt", "--reference", tmp_path / "ref2.pt", "--key", "w"], capsys)
    _one_line_error(code, err, "'w'", "ref2.pt")


def test_verify_raw_parametrization_entry_is_an_error(weights, tmp_path, capsys) -> None:
    torch.save({"e.parametrizations.weight.original": weights[2:].clone()}, tmp_path / "raw.pt")
    code, _, err = _run(["verify", tmp_path / "raw.pt", "--reference", tmp_path / "ref.pt"], capsys)
    _one_line_error(code, err, "e.parametrizations.weight.original")


def test_verify_safetensors_renamed_pt(weights, tmp_path, capsys) -> None:
    save_file({"w": weights}, str(tmp_path / "w.pt"))
    code, out, err = _run(["verify", tmp_path / "w.pt", "--reference", tmp_path / "ref.pt"], capsys)
    if code == 0:  # reading it by its content is fine
        assert "all bitwise equal" in out
        return
    _one_line_error(code, err, "safetensors")
    assert "export_state_dict" not in err


def test_export_onto_a_hard_link_of_its_input_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "train.pt"
    torch.save({"state_dict": {"e.weight": torch.ones(5, 3)}, "epoch": 4}, path)
    os.link(path, tmp_path / "link.pt")
    before = path.read_bytes()
    code, _, err = _run(["export", path, tmp_path / "link.pt"], capsys)
    _one_line_error(code, err, "link.pt", "checkpoint itself")
    assert path.read_bytes() == before


def test_torch_file_renamed_safetensors_is_read_by_content(weights, tmp_path, capsys) -> None:
    torch.save({"w": weights}, tmp_path / "w.safetensors")
    code, out, err = _run(["verify", tmp_path / "w.safetensors", "--reference", tmp_path / "ref.pt"], capsys)
    assert code == 0 and "all bitwise equal" in out, err


def test_verify_reference_key_names_the_tensor_in_ref(weights, tmp_path, capsys) -> None:
    torch.save({"w": weights}, tmp_path / "w.pt")
    torch.save({"other.weight": weights[:2].clone()}, tmp_path / "ref2.pt")
    code, out, err = _run(["verify", tmp_path / "w.pt", "--reference", tmp_path / "ref2.pt", "--key", "w",
                           "--reference-key", "other.weight"], capsys)
    assert code == 0 and out.startswith("w: 2 pinned rows checked"), err


def test_export_merges_an_embconstraint_raw_entry_next_to_a_torch_parametrization(tmp_path, capsys) -> None:
    sd = _torch_parametrized("spectral_norm")
    free, ref = torch.randn(2, 3), torch.randn(3, 3)
    sd["e.parametrizations.weight.original"] = free
    torch.save(sd, tmp_path / "a.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code, _, err = _run(["export", tmp_path / "a.pt", tmp_path / "b.pt", "--reference", tmp_path / "ref.pt"], capsys)
    assert code == 0, err
    written = torch.load(tmp_path / "b.pt")
    assert torch.equal(written["e.weight"], torch.cat([ref, free]))
    assert "0.parametrizations.weight.original" in written  # torch's own: passed through


@pytest.mark.parametrize(("make", "ext"), [
    pytest.param(lambda w: w.to_sparse(), "safetensors", id="sparse-safetensors"),
    pytest.param(lambda w: torch.nested.nested_tensor([w, w[:2]]), "safetensors", id="nested-safetensors"),
    pytest.param(lambda w: torch.empty_like(w, device="meta"), "pt", id="meta-pt"),
    pytest.param(lambda w: torch.empty_like(w, device="meta"), "safetensors", id="meta-safetensors"),
])
def test_export_unusable_tensor_is_a_one_line_error(make, ext, weights, tmp_path, capsys) -> None:
    torch.save({"state_dict": {"w": make(weights)}}, tmp_path / "a.ckpt")
    code, _, err = _run(["export", tmp_path / "a.ckpt", tmp_path / f"a.{ext}"], capsys)
    _one_line_error(code, err, "'w'")
    assert not (tmp_path / f"a.{ext}").exists()


def test_export_sparse_tensor_to_pt_passes_through(weights, tmp_path, capsys) -> None:
    torch.save({"state_dict": {"w": weights.to_sparse()}}, tmp_path / "a.ckpt")
    code, _, err = _run(["export", tmp_path / "a.ckpt", tmp_path / "a.pt"], capsys)
    assert code == 0, err
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"].to_dense(), weights)
