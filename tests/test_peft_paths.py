"""``embconstraint.hf`` with PEFT and the models users bring: a BERT masked LM whose head bias is
shared by two modules, the guards on a ``PeftModel``, PEFT layers on the embedding or the head,
``disable_adapter`` (TRL's reference model), and PEFT's save / load / merge / unload."""

from __future__ import annotations

import pytest
import torch
from helpers.hf import tiny_llama_config
from torch import nn

from embconstraint import constrain, is_constrained, load_rows, release
from embconstraint._mechanism import tie_of
from embconstraint.hf import ROWS_FILE, constrain_input_embeddings, constrain_new_tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

OLD, NEW, DIM = 20, 24, 8


def _llama(tied: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_llama_config(OLD, DIM, tied=tied)
    model = transformers.LlamaForCausalLM(cfg)
    model.resize_token_embeddings(NEW, mean_resizing=False)
    return model


def _lora(model: nn.Module, **kw) -> nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], **kw))


def _bert(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=OLD,
        hidden_size=DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        tie_word_embeddings=tied,
    )
    model = transformers.BertForMaskedLM(cfg)
    model.resize_token_embeddings(NEW, mean_resizing=False)
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # a bias worth pinning (it starts at zero)
    return model


def _steps(model: nn.Module, params, steps: int = 3) -> None:
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for step in range(steps):
        ids = torch.randint(0, NEW, (2, 6), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(OLD - 4, NEW)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- a head bias shared between two modules (BERT) -------------------------------------------------


def test_bert_untied_head_with_a_shared_bias_trains_new_rows_only():
    model = _bert()
    head, holder = model.cls.predictions.decoder, model.cls.predictions
    assert head.bias is holder.bias  # what resize_token_embeddings leaves
    plain = _snapshot(model)
    params = constrain_new_tokens(model, OLD)
    assert [tuple(p.shape) for p in params] == [(NEW - OLD, DIM), (NEW - OLD, DIM), (NEW - OLD,)]
    assert tie_of(holder, "bias") is not None  # the second holder computes with the constrained bias
    assert sorted(model.state_dict()) == sorted(plain)  # the plain keys, both holders of the bias included
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    _steps(model, params)
    trained = _snapshot(model)
    for key in (
        "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.weight",
        "cls.predictions.decoder.bias",
        "cls.predictions.bias",
    ):
        assert torch.equal(trained[key][:OLD], plain[key][:OLD]), key
        assert not torch.equal(trained[key][OLD:], plain[key][OLD:]), key
    assert torch.equal(trained["cls.predictions.bias"], trained["cls.predictions.decoder.bias"])
    release(model)
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias  # one Parameter again
    assert all(torch.equal(v, trained[k]) for k, v in _snapshot(model).items())


def _round_trip(model: nn.Module, folder) -> dict[str, torch.Tensor]:
    model.save_pretrained(folder)
    return _snapshot(type(model).from_pretrained(folder))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bert_saves_and_loads_as_the_same_plain_model(tmp_path, tied):
    """save_pretrained (constrained, and after release) then from_pretrained gives what the plain
    model with the same values gives (transformers itself reports the untied decoder bias missing)."""
    model = _bert(tied)
    params = constrain_new_tokens(model, OLD)
    _steps(model, params)
    twin = _bert(tied)
    twin.load_state_dict(model.state_dict())  # a plain model with the trained values
    expected = _round_trip(twin, tmp_path / "plain")
    assert _round_trip(model, tmp_path / "constrained").keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in _round_trip(model, tmp_path / "constrained").items())
    release(model)
    assert all(torch.equal(v, expected[k]) for k, v in _round_trip(model, tmp_path / "released").items())


def test_constrain_an_output_head_whose_bias_another_module_holds():
    model = _bert()
    head = model.cls.predictions.decoder
    with pytest.raises(
        RuntimeError,
        match=r"embedding\.bias is shared with BertLMPredictionHead\.bias .*pass "
        r"root=<the model>",
    ):
        constrain(head, head.weight.detach()[:OLD])
    assert not is_constrained(head)
    constrain(head, head.weight.detach()[:OLD], root=model)  # the advice works
    assert torch.equal(model.cls.predictions.bias, head.bias)


def test_tied_bert_keeps_its_ties_and_tie_weights_passes():
    model = _bert(tied=True)
    constrain_new_tokens(model, OLD)
    model.tie_weights()  # the head's weight is tied to the constrained embedding, the bias tie holds
    assert tie_of(model.cls.predictions.decoder, "weight") is not None
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def test_everything_is_checked_before_the_embedding_changes():
    """A head whose weight a module outside the model holds too: refused, and the embedding is untouched."""
    model = _llama()
    outside = nn.Linear(DIM, NEW, bias=False)
    outside.weight = model.lm_head.weight
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"embedding\.weight is shared with Linear\.weight"):
        constrain_new_tokens(model, OLD)
    assert not any(is_constrained(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())


# -- guards on a PeftModel ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_model_resize_and_tie_weights_are_guarded(tied):
    model = _lora(_llama(tied))
    constrain_new_tokens(model, OLD)
    before = _snapshot(model)
    for call in (model.resize_token_embeddings, model.get_base_model().resize_token_embeddings):
        with pytest.raises(
            RuntimeError,
            match=r"resize_token_embeddings\(\) would replace the weight of a constrained "
            r"embedding; call embconstraint\.release\(model\) first",
        ):
            call(NEW + 4)
    model.tie_weights()  # checks that every tie holds
    model.get_base_model().tie_weights()
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())
    release(model)
    model.resize_token_embeddings(NEW + 4)  # plain transformers again
    assert model.get_input_embeddings().weight.shape == (NEW + 4, DIM)


# -- PEFT layers on the embedding or the head -----------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            dict(target_modules=["q_proj", "embed_tokens"]),
            r"model\.get_input_embeddings\(\) is a PEFT adapter layer \(peft\.tuners\.lora\.layer\.Embedding\) around the "
            r"Embedding .* adds its own update \(LoRA's B @ A\) to every row, pinned rows included.* Leave the embedding "
            r"and the output head out of target_modules",
        ),
        (
            dict(target_modules=["q_proj", "lm_head"]),
            r"model\.get_output_embeddings\(\) is a PEFT adapter layer \(peft\.tuners\.lora\.layer\.Linear\)",
        ),
        (
            dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
            r"ModulesToSaveWrapper \(the module is in modules_to_save\): PEFT trains a full copy of the table",
        ),
        (
            dict(target_modules=["q_proj"], trainable_token_indices=[21, 22]),
            r"TrainableTokensWrapper \(trainable_token_indices\): PEFT already trains those rows",
        ),
    ],
    ids=["lora embed_tokens", "lora lm_head", "modules_to_save", "trainable tokens"],
)
def test_peft_layers_on_the_embedding_or_head_are_refused(config, message):
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, **config))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        constrain_new_tokens(model, OLD)
    if "lm_head" not in str(config):  # constrain_input_embeddings leaves an untied head alone
        with pytest.raises(ValueError, match=message):
            constrain_input_embeddings(model, OLD)
    assert not any(is_constrained(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in _snapshot(model).items())


def test_lora_on_a_tied_head_is_refused_by_constrain_input_embeddings():
    model = peft.get_peft_model(_llama(tied=True), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"model\.get_output_embeddings\(\) is a PEFT adapter layer"):
        constrain_input_embeddings(model, OLD)
    assert not any(is_constrained(m) for m in model.modules())


# -- disable_adapter: the rows follow the adapter ----------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_disable_adapter_switches_the_new_rows_off(tied):
    base = _llama(tied)
    reference = _logits(base)  # the base model: no LoRA, the new rows as resize_token_embeddings made them
    model = _lora(base)
    params = constrain_new_tokens(model, OLD)
    _steps(model, [p for p in model.parameters() if p.requires_grad])
    trained = _logits(model)
    rows = [p.detach().clone() for p in params]
    assert not torch.equal(trained, reference)
    with model.disable_adapter():
        assert torch.equal(_logits(model), reference)  # LoRA off and the rows off: the base model, bitwise
    assert torch.equal(_logits(model), trained)
    assert all(torch.equal(p, r) for p, r in zip(params, rows, strict=True))


def test_a_graph_made_before_disable_adapter_backpropagates_as_without_it():
    """TRL's DPO: the policy's forward, the reference's forward under disable_adapter, then backward."""
    grads = []
    for with_reference in (False, True):
        model = _lora(_llama())
        params = constrain_new_tokens(model, OLD)
        ids = torch.arange(OLD - 4, NEW)[None]
        loss = model(input_ids=ids, labels=ids).loss
        if with_reference:
            with torch.no_grad(), model.disable_adapter():
                model(input_ids=ids)
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_with_gradients_on_a_graph_that_crosses_disable_adapter_raises():
    model = _lora(_llama())
    constrain_new_tokens(model, OLD)
    ids = torch.arange(OLD - 4, NEW)[None]
    loss = model(input_ids=ids, labels=ids).loss
    with model.disable_adapter():
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_after_release_disable_adapter_is_peft_s_own():
    model = _lora(_llama())
    constrain_new_tokens(model, OLD)
    assert "disable_adapter" in model.__dict__
    release(model)
    with model.disable_adapter():
        pass
    assert "disable_adapter" not in model.__dict__


# -- PEFT save / load / merge / unload ----------------------------------------------------------------


def _trained_peft(tied: bool = False) -> nn.Module:
    model = _lora(_llama(tied))
    constrain_new_tokens(model, OLD)
    _steps(model, [p for p in model.parameters() if p.requires_grad])
    return model


def test_save_pretrained_writes_the_rows_and_load_adapter_reads_them(tmp_path):
    model = _trained_peft()
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / ROWS_FILE).is_file() and (
        tmp_path / "adapter" / "adapter_model.safetensors"
    ).is_file()
    fresh = _lora(_llama(seed=0))
    constrain_new_tokens(fresh, OLD)
    fresh.load_adapter(tmp_path / "adapter", "default")  # the adapter and the rows of that folder
    assert torch.equal(_logits(fresh), _logits(model))
    base = _llama(seed=0)  # from_pretrained on a fresh base: load the rows into the base first
    load_rows(base, tmp_path / "adapter" / ROWS_FILE)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(_logits(loaded), _logits(model))


def test_load_adapter_checks_the_rows_before_loading_the_adapter(tmp_path):
    model = _trained_peft()
    model.save_pretrained(tmp_path / "adapter")
    other = _lora(_llama(seed=5))  # other pretrained rows: the rows file is not for it
    constrain_new_tokens(other, OLD)
    before = _snapshot(other)
    with pytest.raises(ValueError, match="SHA-256 fingerprint mismatch"):
        other.load_adapter(tmp_path / "adapter", "default")
    assert all(
        torch.equal(v, before[k]) for k, v in _snapshot(other).items()
    )  # the adapter did not load either


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_merge_and_unload_keep_the_rows(how):
    model = _trained_peft()
    tables = [
        model.get_input_embeddings().weight.detach().clone(),
        model.get_output_embeddings().weight.detach().clone(),
    ]
    logits = _logits(model)
    base = getattr(model, how)()
    assert is_constrained(base.get_input_embeddings()) and is_constrained(base.get_output_embeddings())
    assert torch.equal(base.get_input_embeddings().weight, tables[0])
    assert torch.equal(base.get_output_embeddings().weight, tables[1])
    if how == "merge_and_unload":
        assert torch.allclose(_logits(base), logits, atol=1e-5)  # LoRA merged into q_proj: equal to rounding
    release(base)
    assert torch.equal(base.get_input_embeddings().weight, tables[0])
