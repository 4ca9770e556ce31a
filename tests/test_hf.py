"""embconstraint.hf: constrained input embeddings of transformers models (tiny, built from configs)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import run_python
from helpers.hf import tiny_llama_config
from torch import nn
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from embconstraint import is_constrained, merged_state_dict, release  # noqa: E402
from embconstraint._mechanism import tie_of  # noqa: E402
from embconstraint.hf import constrain_input_embeddings  # noqa: E402

OLD, NEW, DIM = 40, 48, 16

transformers.logging.set_verbosity_error()


def gpt2(vocab: int = OLD, tied: bool = True, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=1,
        n_embd=DIM,
        n_head=2,
        n_positions=32,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    return GPT2LMHeadModel(cfg).eval()


def llama(vocab: int = NEW, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        vocab,
        DIM,
        tied=True,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def grown(tied: bool = True) -> tuple[GPT2LMHeadModel, torch.Tensor]:
    """A GPT-2 of OLD tokens, grown to NEW with resize_token_embeddings; returns it and the old rows."""
    model = gpt2(tied=tied)
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(NEW, mean_resizing=False)
    return model, old


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, NEW, (4, 12), generator=g)
    ids[:, ::3] = torch.randint(OLD, NEW, (4, 4), generator=g)  # every batch uses new tokens
    return ids


def train(model: nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for step in range(steps):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- training ---------------------------------------------------------------------------------------


def test_tied_gpt2_pinned_rows_exact_and_head_tied_after_adamw():
    model, old = grown()
    model.requires_grad_(False)
    emb = constrain_input_embeddings(model, OLD).requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [(NEW - OLD, DIM)]
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "wte" not in k and "lm_head" not in k}
    new_before = emb.weight[OLD:].detach().clone()

    train(model)

    assert torch.equal(emb.weight[:OLD], old)
    assert not torch.equal(emb.weight[OLD:], new_before)
    assert (emb.weight[OLD:] - new_before).abs().min() > 0  # every new row moved
    assert_state_equal({k: v for k, v in model.state_dict().items() if k in frozen}, frozen)
    tie = tie_of(model.lm_head, "weight")
    assert tie is not None and tie.embedding is emb
    assert torch.equal(model.lm_head.weight, emb.weight)


def test_gradients_reach_only_new_rows_and_match_a_plain_model():
    model, _ = grown()
    constrain_input_embeddings(model, OLD)
    plain = gpt2(NEW)
    plain.load_state_dict(merged_state_dict(model))
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    plain(input_ids=ids, labels=ids).loss.backward()

    emb = model.get_input_embeddings()
    assert [tuple(p.shape) for p in emb.parameters()] == [(NEW - OLD, DIM)]
    assert all(p.shape != (NEW, DIM) for p in model.parameters())
    free_grad = emb.parametrizations.weight.original.grad
    # lookup + tied head: the same gradient the plain model gives its new rows
    torch.testing.assert_close(free_grad, plain.transformer.wte.weight.grad[OLD:], rtol=1e-5, atol=1e-7)
    assert free_grad.abs().sum() > 0


def test_head_computes_with_the_merged_weight():
    model, _ = grown()
    constrain_input_embeddings(model, OLD)
    train(model, steps=2)  # new rows differ from what resize gave them
    plain = gpt2(NEW)
    plain.load_state_dict(merged_state_dict(model))
    assert plain.lm_head.weight is plain.transformer.wte.weight
    ids = batch(7)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_scattered_indices_on_llama():
    model = llama()
    emb = model.get_input_embeddings()
    rows = [5, 1, 30, 47]
    ref = torch.randn(4, DIM)
    constrain_input_embeddings(model, ref, indices=rows)
    assert tie_of(model.lm_head, "weight").embedding is emb
    train(model, steps=2)
    assert torch.equal(emb.weight[rows], ref)
    assert torch.equal(model.lm_head.weight[rows], ref)


def test_untied_gpt2_head_is_left_alone():
    model, old = grown(tied=False)
    head = model.lm_head.weight
    assert head is not model.transformer.wte.weight
    emb = constrain_input_embeddings(model, OLD)
    assert not parametrize.is_parametrized(model.lm_head)
    assert model.lm_head.weight is head and head.shape == (NEW, DIM)
    head_before = head.detach().clone()
    train(model, steps=2)
    assert torch.equal(emb.weight[:OLD], old)
    assert not torch.equal(model.lm_head.weight, head_before)  # trained as usual


# -- saving and loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_release_save_pretrained_from_pretrained_round_trip(tmp_path, tied):
    model, old = grown(tied=tied)
    constrain_input_embeddings(model, OLD)
    train(model, steps=2)
    merged = merged_state_dict(model)
    release(model)
    emb = model.get_input_embeddings()
    assert type(emb.weight) is nn.Parameter and not is_constrained(emb)
    assert (model.lm_head.weight is emb.weight) is tied
    assert_state_equal(model.state_dict(), merged)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is GPT2LMHeadModel
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) is tied
    assert_state_equal(loaded.state_dict(), merged)
    assert torch.equal(loaded.transformer.wte.weight[:OLD], old)
    ids = batch(3)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("indices", [None, [0, 3, 9, 41]])
def test_save_pretrained_while_constrained(tmp_path, indices):
    model, _ = grown()
    emb = model.get_input_embeddings()
    ref = emb.weight.detach()[:OLD] if indices is None else torch.randn(4, DIM)
    constrain_input_embeddings(model, ref, indices=indices)
    train(model, steps=1)
    merged = merged_state_dict(model)
    model.save_pretrained(tmp_path)
    assert is_constrained(emb)  # saving leaves the constraint on

    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert_state_equal(loaded.state_dict(), merged)


def test_release_of_the_embedding_releases_the_tied_head(tmp_path) -> None:
    model = gpt2(vocab=12)
    emb = constrain_input_embeddings(model, torch.zeros(2, DIM), indices=[3, 7])
    merged = emb.weight.detach().clone()
    release(emb)
    sd = model.state_dict()
    assert torch.equal(sd["transformer.wte.weight"], merged)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again, one Parameter
    assert not hasattr(model.lm_head, "parametrizations")
    model.save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(again.lm_head.weight, merged)


def test_release_of_the_tied_head_releases_its_embedding() -> None:
    model = gpt2(vocab=12)
    emb = constrain_input_embeddings(model, torch.zeros(2, DIM), indices=[3, 7])
    merged = emb.weight.detach().clone()
    release(model.lm_head)  # never a head left holding the (V - n, D) free rows
    assert not is_constrained(emb) and not hasattr(model.lm_head, "parametrizations")
    assert model.lm_head.weight is emb.weight and torch.equal(emb.weight, merged)
    assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, 12)


# -- transformers methods while constrained -----------------------------------------------------------


def test_tie_weights_while_constrained_checks_the_ties():
    model, _ = grown()
    emb = constrain_input_embeddings(model, OLD)
    model.tie_weights()  # the tie holds: nothing to do
    assert tie_of(model.lm_head, "weight").embedding is emb and is_constrained(emb)

    untied, _ = grown(tied=False)
    constrain_input_embeddings(untied, OLD)
    untied.tie_weights()  # no tie requested
    untied.config.tie_word_embeddings = True
    with pytest.raises(RuntimeError, match=r"lm_head.weight does not compute with the constrained.*release"):
        untied.tie_weights()


def test_resize_token_embeddings_while_constrained_is_refused_before_anything_changes():
    model, _ = grown()
    emb = constrain_input_embeddings(model, OLD)
    head = model.lm_head
    with pytest.raises(RuntimeError, match="resize_token_embeddings.*release"):
        model.resize_token_embeddings(NEW + 8)
    assert emb.num_embeddings == NEW and emb.weight.shape == (NEW, DIM)
    assert model.lm_head is head and model.config.vocab_size == NEW


def test_after_release_transformers_methods_are_the_plain_ones():
    model, _ = grown()
    emb = constrain_input_embeddings(model, OLD)
    copied = copy.deepcopy(model)
    assert is_constrained(copied.get_input_embeddings())
    copied.tie_weights()  # the guard follows the copy
    release(model)
    model.tie_weights()
    model.resize_token_embeddings(NEW + 8, mean_resizing=False)
    assert "tie_weights" not in vars(model) and "resize_token_embeddings" not in vars(model)
    assert model.get_input_embeddings().weight.shape == (NEW + 8, DIM)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    # constrain again after resizing: the old rows are still the pinned ones
    pinned = emb.weight[:OLD].detach().clone()
    constrain_input_embeddings(model, NEW)
    assert torch.equal(model.lm_head.weight[:OLD], pinned)


# -- bad input ------------------------------------------------------------------------------------


class _NotAnEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.proj


class _Unimplemented(nn.Module):
    def get_input_embeddings(self) -> nn.Module:
        raise NotImplementedError("no embeddings here")


def test_model_without_input_embeddings():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        constrain_input_embeddings(nn.Linear(2, 2), torch.zeros(1, 2))
    with pytest.raises(TypeError, match="must return an nn.Embedding, got Linear"):
        constrain_input_embeddings(_NotAnEmbedding(), torch.zeros(1, 2))
    with pytest.raises(TypeError, match="does not expose its input embeddings"):
        constrain_input_embeddings(_Unimplemented(), torch.zeros(1, 2))


@pytest.mark.parametrize(
    ("reference", "kwargs", "error", "match"),
    [
        (torch.zeros(3, DIM + 1), {}, ValueError, "embedding dimension"),
        (torch.zeros(NEW + 1, DIM), {}, ValueError, "only has 48"),
        (NEW + 1, {}, ValueError, r"must lie in \[0, 48\]"),
        (-1, {}, ValueError, r"must lie in \[0, 48\]"),
        (True, {}, TypeError, "reference must be an int"),
        ("40", {}, TypeError, "reference must be an int"),
        (4, {"indices": [0, 1, 2, 3]}, ValueError, "reference=int pins the first n rows"),
        (torch.zeros(2, DIM), {"indices": [0, 0]}, ValueError, "distinct"),
    ],
)
def test_bad_reference_changes_nothing(reference, kwargs, error, match):
    model, _ = grown()
    before = merged_state_dict(model)
    with pytest.raises(error, match=match):
        constrain_input_embeddings(model, reference, **kwargs)
    assert not is_constrained(model.get_input_embeddings())
    assert not parametrize.is_parametrized(model.lm_head)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "tie_weights" not in vars(model)
    assert_state_equal(model.state_dict(), before)


def test_constraining_twice_is_refused():
    model, _ = grown()
    constrain_input_embeddings(model, OLD)
    with pytest.raises(ValueError, match="already constrained"):
        constrain_input_embeddings(model, OLD)


@pytest.mark.subprocess
def test_module_does_not_import_transformers():
    code = "import sys, embconstraint.hf; assert 'transformers' not in sys.modules, 'imported'"
    run = run_python("-c", code)
    assert run.returncode == 0, run.stderr
