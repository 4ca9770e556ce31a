"""``embconstraint.hf.constrain_new_tokens``: tied and untied Llama heads, base model and LoRA."""

from __future__ import annotations

import pytest
import torch
from helpers.hf import tiny_llama_config
from torch import nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import LlamaForCausalLM  # noqa: E402

from embconstraint import is_constrained, release  # noqa: E402
from embconstraint._mechanism import pin_of, tie_of  # noqa: E402
from embconstraint.hf import constrain_new_tokens  # noqa: E402

OLD, NEW, D = 20, 24, 8


def llama(tied: bool, lora: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_llama_config(OLD, D, tied=tied)
    model = LlamaForCausalLM(cfg)
    model.resize_token_embeddings(NEW, mean_resizing=False)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    return model


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _steps(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, NEW, (2, 6), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_new_rows_train_old_rows_stay_bitwise(tied, lora):
    model = llama(tied, lora)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    e0, h0 = emb.weight.detach().clone(), head.weight.detach().clone()
    before = _trainable(model)
    params = constrain_new_tokens(model, OLD)
    assert [tuple(p.shape) for p in params] == [(NEW - OLD, D)] * (1 if tied else 2)
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in params)
    assert params[0] is pin_of(emb).free_parameter
    if tied:
        assert tie_of(head, "weight").embedding is emb
    else:
        assert params[1] is pin_of(head).free_parameter
    ours = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    others = {n for n in before if "embed_tokens" not in n and "lm_head" not in n}
    assert _trainable(model) == ours | others  # nothing else was switched on (or off)
    _steps(model)
    assert torch.equal(emb.weight[:OLD], e0[:OLD]) and torch.equal(head.weight[:OLD], h0[:OLD])
    assert not torch.equal(emb.weight[OLD:], e0[OLD:])
    assert not torch.equal(head.weight[OLD:], h0[OLD:])
    if tied:
        assert torch.equal(head.weight, emb.weight)
    release(model)
    assert not any(is_constrained(m) for m in model.modules())


def test_indices_pin_the_given_rows():
    model = llama(tied=False)
    rows = list(range(4, NEW))  # keep everything but rows 0..3
    h0 = model.lm_head.weight.detach().clone()
    params = constrain_new_tokens(model, len(rows), indices=rows)
    assert [tuple(p.shape) for p in params] == [(4, D), (4, D)]
    _steps(model)
    assert torch.equal(model.lm_head.weight[rows], h0[rows])
    assert not torch.equal(model.lm_head.weight[:4], h0[:4])


def test_untied_head_with_bias_gets_its_bias_entries_pinned():
    model = llama(tied=False)
    model.lm_head = nn.Linear(D, NEW, bias=True)
    b0 = model.lm_head.bias.detach().clone()
    params = constrain_new_tokens(model, OLD)
    assert [tuple(p.shape) for p in params] == [(NEW - OLD, D), (NEW - OLD, D), (NEW - OLD,)]
    _steps(model)
    assert torch.equal(model.lm_head.bias[:OLD], b0[:OLD])
    assert not torch.equal(model.lm_head.bias[OLD:], b0[OLD:])


def test_tied_checkpoint_without_the_head_key_reports_what_the_plain_model_reports():
    """What Trainer's resume does: a safetensors checkpoint drops the tied head's key; the
    constrained model names it as the plain tied model does (its loaders expect that)."""
    model, plain = llama(tied=True), llama(tied=True)
    constrain_new_tokens(model, OLD)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    result, plain_result = model.load_state_dict(sd, strict=False), plain.load_state_dict(sd, strict=False)
    assert result.missing_keys == plain_result.missing_keys == ["lm_head.weight"]
    assert result.unexpected_keys == plain_result.unexpected_keys == []
    del sd["model.embed_tokens.weight"]  # a truly missing embedding is reported, under its plain key
    assert (
        model.load_state_dict(sd, strict=False).missing_keys
        == plain.load_state_dict(sd, strict=False).missing_keys
        == ["model.embed_tokens.weight", "lm_head.weight"]
    )


class _Odd(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(NEW, D), head

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def get_output_embeddings(self) -> nn.Module:
        return self.head


@pytest.mark.parametrize(
    ("make", "old", "error", "match"),
    [
        (lambda: llama(False), 20.0, TypeError, "old_vocab_size must be an int, got float"),
        (lambda: llama(False), True, TypeError, "old_vocab_size must be an int, got bool"),
        (lambda: llama(False), NEW + 1, ValueError, r"old_vocab_size must lie in \[0, 24\], got 25"),
        (lambda: llama(False), -1, ValueError, r"old_vocab_size must lie in \[0, 24\], got -1"),
        (
            lambda: _Odd(nn.Conv1d(D, NEW, 1)),
            OLD,
            TypeError,
            "model.get_output_embeddings.. must be an nn.Linear or share the input embedding's weight, got Conv1d",
        ),
        (
            lambda: _Odd(nn.Linear(D, NEW - 1)),
            OLD,
            ValueError,
            r"model.get_output_embeddings\(\) has 23 rows but the input embeddings have 24",
        ),
    ],
)
def test_bad_input_changes_nothing(make, old, error, match):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        constrain_new_tokens(model, old)
    assert not any(is_constrained(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_gradient_from_before_the_resize_is_refused_before_anything_changes():
    """transformers' resize keeps the Parameter (new data) and its stale ``.grad``."""
    model = llama(tied=False)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    model.resize_token_embeddings(NEW + 4)
    assert model.get_input_embeddings().weight.grad.shape == (NEW, D)  # (the stale gradient)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"embedding.weight.grad has shape .* \(a gradient from before a resize\?\)"
    ):
        constrain_new_tokens(model, NEW)
    assert not any(is_constrained(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.zero_grad(set_to_none=True)
    assert len(constrain_new_tokens(model, NEW)) == 2
