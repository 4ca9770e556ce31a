"""The rows-only file: save_rows / load_rows / extract_rows and ``embconstraint rows``."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.hf import tiny_llama_config
from torch import nn

from embconstraint import constrain, is_constrained, load_rows, release, save_rows
from embconstraint.cli import main
from embconstraint.files import extract_rows
from embconstraint.files.rows_file import METADATA_KEY
from embconstraint.hf import constrain_input_embeddings

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

OLD, NEW, DIM = 40, 6, 16


def _llama(tied: bool = True, seed: int = 0) -> nn.Module:
    """A tiny "pretrained" Llama (the same for one seed) grown by NEW tokens; the new rows come
    from the global RNG."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    config = tiny_llama_config(OLD, DIM, tied=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    torch.random.set_rng_state(state)
    model.resize_token_embeddings(OLD + NEW, mean_resizing=False)
    return model


def _train(model: nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    ids = torch.arange(OLD - 8, OLD + NEW).repeat(2, 1)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _trained(tied: bool = True) -> nn.Module:
    torch.manual_seed(1)
    model = _llama(tied)
    model.requires_grad_(False)
    constrain_input_embeddings(model, OLD).requires_grad_(True)
    _train(model)
    return model


def _emb(model: nn.Module) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().clone()


def test_save_rows_holds_only_the_new_rows(tmp_path):
    model = _trained()
    path = tmp_path / "rows.safetensors"
    assert save_rows(model, path) == ["model.embed_tokens.weight"]  # the tied head is saved once, with it
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["model.embed_tokens.weight", "model.embed_tokens.weight.free_rows"]
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), _emb(model)[OLD:])
        assert f.get_tensor("model.embed_tokens.weight.free_rows").tolist() == list(range(OLD, OLD + NEW))
        meta = json.loads(f.metadata()[METADATA_KEY])
    assert meta["model.embed_tokens.weight"]["num_rows"] == OLD + NEW
    assert len(meta["model.embed_tokens.weight"]["sha256"]) == 64
    assert path.stat().st_size < NEW * DIM * 4 + 2048  # k x D values, not the (V, D) table


@pytest.mark.parametrize("constrained_target", [False, True], ids=["plain", "constrained"])
def test_load_rows_on_a_fresh_base_is_bitwise(tmp_path, constrained_target):
    model = _trained()
    save_rows(model, tmp_path / "rows.safetensors")
    torch.manual_seed(7)
    fresh = _llama()  # same old rows, other new rows
    assert not torch.equal(_emb(fresh), _emb(model))
    if constrained_target:
        constrain_input_embeddings(fresh, OLD)
    assert load_rows(fresh, tmp_path / "rows.safetensors") == ["model.embed_tokens.weight"]
    assert torch.equal(_emb(fresh), _emb(model))
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)  # the tied head follows
    ids = torch.arange(OLD - 4, OLD + NEW)[None]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert is_constrained(fresh.get_input_embeddings()) is constrained_target


def test_scattered_free_rows_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = torch.randn(7, 4)
    pinned = [9, 0, 3, 4, 5, 7, 1]
    trained = constrain(nn.Embedding(10, 4), ref, indices=pinned)
    with torch.no_grad():
        trained.parametrizations.weight.original.add_(1.0)
    save_rows(trained, tmp_path / "r.safetensors")
    fresh = nn.Embedding(10, 4)
    with torch.no_grad():
        fresh.weight[pinned] = ref
    load_rows(fresh, tmp_path / "r.safetensors")
    assert torch.equal(fresh.weight, trained.weight)
    target = constrain(nn.Embedding(10, 4), ref, indices=pinned)
    load_rows(target, tmp_path / "r.safetensors")
    assert torch.equal(target.weight, trained.weight)


def test_peft_model_and_base_model_share_rows_files(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(_llama(), lora)
    constrain_input_embeddings(wrapped, OLD).requires_grad_(True)
    _train(wrapped)
    assert save_rows(wrapped, tmp_path / "peft.safetensors") == ["model.embed_tokens.weight"]
    base = _llama()
    load_rows(base, tmp_path / "peft.safetensors")  # PeftModel -> base model, before from_pretrained
    assert torch.equal(_emb(base), _emb(wrapped))
    # base model -> PeftModel
    save_rows(_llama_constrained_copy(base), tmp_path / "b.safetensors")
    torch.manual_seed(3)
    other = peft.get_peft_model(_llama(), lora)
    load_rows(other, tmp_path / "b.safetensors")
    assert torch.equal(_emb(other), _emb(wrapped))


def _llama_constrained_copy(model: nn.Module) -> nn.Module:
    constrain_input_embeddings(model, OLD)
    return model


def test_untied_heads_are_matched_separately(tmp_path):
    """A plain untied model: the rows file of its embedding leaves the head alone."""
    model = _trained(tied=False)
    save_rows(model, tmp_path / "rows.safetensors")
    fresh = _llama(tied=False)
    head = fresh.lm_head.weight.detach().clone()
    load_rows(fresh, tmp_path / "rows.safetensors")
    assert torch.equal(_emb(fresh), _emb(model))
    assert torch.equal(fresh.lm_head.weight, head)


def _refused(module: nn.Module, path, match: str) -> None:
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_rows(module, path)
    after = module.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_load_rows_refusals_change_nothing(tmp_path):
    model = _trained()
    path = tmp_path / "rows.safetensors"
    save_rows(model, path)
    other = _llama(seed=5)  # other pretrained (pinned) rows
    _refused(other, path, r"pinned rows of model\.embed_tokens\.weight differ .*SHA-256")
    _refused(_llama_constrained_copy(_llama(seed=5)), path, "SHA-256 fingerprint mismatch")
    bigger = _llama()
    bigger.resize_token_embeddings(OLD + NEW + 1, mean_resizing=False)
    _refused(bigger, path, r"model\.embed_tokens\.weight has shape \(47, 16\) in the model, .*\(46, 16\)")
    _refused(
        nn.Sequential(nn.Embedding(OLD + NEW, DIM)), path, "the model has no module 'model.embed_tokens'"
    )
    fewer = _llama()
    constrain_input_embeddings(fewer, OLD - 1)
    _refused(fewer, path, "constrained with 7 free rows in the model, other than the file's 6 free rows")


def test_load_rows_refuses_an_untied_head_entry_for_a_tied_model_and_missing_weights(tmp_path):
    emb = _trained()
    save_rows(emb, tmp_path / "emb.safetensors")
    # an untied file entry for a head that is tied to the constrained embedding in the model
    head_file = tmp_path / "head.safetensors"
    torch.manual_seed(0)
    holder = nn.ModuleDict({"lm_head": constrain(nn.Embedding(OLD + NEW, DIM), torch.zeros(OLD, DIM))})
    save_rows(holder, head_file)
    _refused(
        _llama_constrained_copy(_llama()), head_file, "lm_head.weight is tied to a constrained embedding"
    )
    # a constrained weight the file does not hold
    two = nn.ModuleDict(
        {
            "model": nn.ModuleDict(
                {"embed_tokens": constrain(nn.Embedding(OLD + NEW, DIM), _emb(emb)[:OLD])}
            ),
            "extra": constrain(nn.Embedding(4, 2), torch.zeros(2, 2)),
        }
    )
    _refused(
        two,
        tmp_path / "emb.safetensors",
        r"constrained weight\(s\) \['extra.weight'\] are not in the rows file",
    )


def test_bad_files(tmp_path):
    emb = nn.Embedding(4, 2)
    with pytest.raises(FileNotFoundError):
        load_rows(emb, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="a rows file is a .safetensors file, got extension '.pt'"):
        load_rows(emb, tmp_path / "rows.pt")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="has no 'embconstraint_rows' metadata: not written by save_rows"):
        load_rows(emb, tmp_path / "plain.safetensors")
    save_file(
        {"weight": torch.zeros(2, 2), "weight.free_rows": torch.tensor([3, 3])},
        str(tmp_path / "bad.safetensors"),
        metadata={METADATA_KEY: json.dumps({"weight": {"num_rows": 4, "sha256": "0"}})},
    )
    with pytest.raises(ValueError, match="entry 'weight' has inconsistent rows"):
        load_rows(emb, tmp_path / "bad.safetensors")
    with pytest.raises(TypeError, match="module must be an nn.Module, got Parameter"):
        load_rows(emb.weight, tmp_path / "plain.safetensors")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        save_rows(constrain(nn.Embedding(4, 2), torch.zeros(2, 2)), 3)


def test_extract_rows_matches_save_rows_and_the_cli(tmp_path):
    model = _trained()
    save_rows(model, tmp_path / "saved.safetensors")
    release(model)
    model.save_pretrained(tmp_path / "full")
    weights = tmp_path / "full" / "model.safetensors"
    assert extract_rows(
        weights, tmp_path / "x.safetensors", num_pinned=OLD, keys=["model.embed_tokens.weight"]
    ) == ["model.embed_tokens.weight"]
    assert (
        main(
            [
                "rows",
                str(weights),
                str(tmp_path / "cli.safetensors"),
                "--pinned",
                str(OLD),
                "--key",
                "model.embed_tokens.weight",
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "saved.safetensors"), "pt") as a:
        for other in ("x.safetensors", "cli.safetensors"):
            with safe_open(str(tmp_path / other), "pt") as b:
                assert a.metadata()[METADATA_KEY] == b.metadata()[METADATA_KEY]
                assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert (
        main(
            [
                "rows",
                str(weights),
                str(tmp_path / "e.safetensors"),
                "--pinned",
                "999",
                "--key",
                "model.embed_tokens.weight",
            ]
        )
        == 2
    )
    with pytest.raises(ValueError, match=r"num_pinned must lie in \[0, 46\]"):
        extract_rows(weights, tmp_path / "e.safetensors", num_pinned=-1, keys=["model.embed_tokens.weight"])


def test_head_weight_and_bias_rows_round_trip(tmp_path):
    """An nn.Linear head with a bias: free weight rows and free bias entries, k values each."""
    torch.manual_seed(0)
    old = nn.Linear(DIM, OLD)
    head = constrain(nn.Linear(DIM, OLD + NEW), old)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    path = tmp_path / "head.safetensors"
    assert sorted(save_rows(nn.ModuleDict({"lm_head": head}), path)) == ["lm_head.bias", "lm_head.weight"]
    with safe_open(str(path), "pt") as f:
        assert tuple(f.get_tensor("lm_head.weight").shape) == (NEW, DIM)
        assert tuple(f.get_tensor("lm_head.bias").shape) == (NEW,)
    fresh = nn.Linear(DIM, OLD + NEW)
    with torch.no_grad():
        fresh.weight[:OLD], fresh.bias[:OLD] = old.weight, old.bias
    load_rows(nn.ModuleDict({"lm_head": fresh}), path)
    assert torch.equal(fresh.weight, head.weight) and torch.equal(fresh.bias, head.bias)
    other = nn.Linear(DIM, OLD + NEW)
    with torch.no_grad():
        other.weight[:OLD] = old.weight  # the bias's pinned entries differ
    _refused(nn.ModuleDict({"lm_head": other}), path, r"pinned rows of lm_head\.bias differ")


def test_untied_new_tokens_with_peft_save_both_tables(tmp_path):
    peft = pytest.importorskip("peft")
    from embconstraint.hf import constrain_new_tokens

    torch.manual_seed(1)
    wrapped = peft.get_peft_model(
        _llama(tied=False), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    constrain_new_tokens(wrapped, OLD)
    _train(wrapped)
    path = tmp_path / "rows.safetensors"
    assert sorted(save_rows(wrapped, path)) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert path.stat().st_size < 2 * NEW * DIM * 4 + 4096
    torch.manual_seed(9)
    base = _llama(tied=False)
    load_rows(base, path)
    for a, b in (
        (base.get_input_embeddings(), wrapped.get_input_embeddings()),
        (base.get_output_embeddings(), wrapped.get_output_embeddings()),
    ):
        assert torch.equal(a.weight, b.weight)
