"""TRL's trainers on a model whose new tokens' rows are trained and old rows pinned: ``SFTTrainer``
(tied and untied head, with and without ``peft_config``), its saving and resuming; the reference model of
``DPOTrainer`` and ``KTOTrainer`` (an explicit copy, precomputed log-probabilities, the adapter disabled,
TRL's ``"ref"`` adapter); ``GRPOTrainer`` and ``RLOOTrainer``, which generate with the constrained model
(no reference, the adapter disabled or the ``"ref"`` adapter, a reference loaded from the model's folder).

Tiny Llamas built from a config and a BPE tokenizer trained in code: nothing is downloaded. The chat
tokens are added the TRL way (``trl.clone_chat_template`` from a tokenizer folder written here). Every
check is against an independent reference: a copy of the model taken before the tokens were added or
before training.
"""

from __future__ import annotations

import copy
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers.hf import SYLLABLES, bpe_tokenizer_json, fast_tokenizer, tiny_llama_config

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402
from trl.experimental.utils import create_reference_model  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from embconstraint import load_rows, merged_state_dict  # noqa: E402
from embconstraint.hf import ROWS_FILE, SaveRowsCallback, constrain_new_tokens, init_new_tokens  # noqa: E402
from embconstraint.hf.adapters import base_model_of  # noqa: E402

D = 16
CHAT = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
QUIET = dict(report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0)


@pytest.fixture(scope="module")
def backend() -> str:
    return bpe_tokenizer_json()


@pytest.fixture(scope="module")
def chat_source(backend, tmp_path_factory) -> str:
    """A tokenizer folder with a chat template and its two chat tokens (what clone_chat_template reads)."""
    source = fast_tokenizer(backend)
    source.add_special_tokens({"additional_special_tokens": CHAT})
    source.chat_template, source.eos_token = TEMPLATE, "<|im_end|>"
    folder = tmp_path_factory.mktemp("chat_source")
    source.save_pretrained(folder)
    return str(folder)


def grown(backend: str, chat_source: str, *, tied: bool):
    """(model, tokenizer, old vocabulary size, plain): a Llama "pretrained" on the old vocabulary and a copy
    of it (``plain``), then the chat tokens added by ``clone_chat_template`` (resized to a multiple of 8) and
    initialised from descriptions. Not constrained yet."""
    tok = fast_tokenizer(backend, pad_token="</s>")
    old_vocab = len(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        tiny_llama_config(old_vocab, D, tied=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    )
    plain = copy.deepcopy(model)
    model, tok, added = trl.clone_chat_template(model, tok, chat_source, resize_to_multiple_of=8)
    assert sorted(added)[0] == old_vocab and model.get_input_embeddings().num_embeddings % 8 == 0
    init_new_tokens(model, tok, CHAT, descriptions={"<|im_start|>": "ka", "<|im_end|>": "lo mi"})
    return model, tok, old_vocab, plain


def conversations(n: int = 16, seed: int = 0):
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(30)]

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = [
        {"messages": [{"role": "user", "content": say(4)}, {"role": "assistant", "content": say(4)}]}
        for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def tables(model) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        model.get_input_embeddings().weight.detach().clone(),
        model.get_output_embeddings().weight.detach().clone(),
    )


def assert_old_rows_pinned(model, plain, old_vocab: int) -> None:
    emb, head = tables(model)
    assert torch.equal(emb[:old_vocab], plain.get_input_embeddings().weight)
    assert torch.equal(head[:old_vocab], plain.get_output_embeddings().weight)


def sft(model, tok, out: Path, *, steps: int = 3, peft_config=None, callbacks=None, **overrides):
    args = trl.SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        save_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        **{**QUIET, **overrides},
    )  # TRL's defaults otherwise: gradient checkpointing, bf16 autocast on CPU, its fused LM head
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=conversations(),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sft_trains_the_new_rows_only_and_saves_the_plain_merged_model(backend, chat_source, tied, tmp_path):
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=tied)
    model.requires_grad_(False)
    constrain_new_tokens(model, old_vocab)
    start = tables(model)
    trainer = sft(model, tok, tmp_path / "run")
    expected = {"model.embed_tokens.parametrizations.weight.original"}
    assert set(trainable(trainer.model)) == expected | (
        set() if tied else {"lm_head.parametrizations.weight.original"}
    )
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    emb, head = tables(model)
    assert not torch.equal(emb[old_vocab:], start[0][old_vocab:])
    assert tied or not torch.equal(head[old_vocab:], start[1][old_vocab:])

    out = tmp_path / "final"
    trainer.save_model(str(out))  # the plain merged model, with the tokenizer
    again = LlamaForCausalLM.from_pretrained(out)
    assert list(again.state_dict()) == list(plain.state_dict())  # plain keys
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert torch.equal(again.get_input_embeddings().weight, emb) and torch.equal(again.lm_head.weight, head)
    assert (again.lm_head.weight is again.get_input_embeddings().weight) == tied
    tok_again = AutoTokenizer.from_pretrained(out)
    assert [tok_again.convert_tokens_to_ids(t) for t in CHAT] == [tok.convert_tokens_to_ids(t) for t in CHAT]
    assert tok_again.chat_template == TEMPLATE


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sft_with_peft_config_trains_the_rows_with_the_adapter(backend, chat_source, tied, tmp_path):
    """SFTTrainer(peft_config=...) calls get_peft_model on the constrained model, which freezes the new rows;
    SaveRowsCallback makes them trainable again and gives the PeftModel its hooks."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=tied)
    constrain_new_tokens(model, old_vocab)
    start = tables(model)
    trainer = sft(
        model,
        tok,
        tmp_path / "run",
        peft_config=peft.LoraConfig(**LORA),
        callbacks=[SaveRowsCallback()],
        bf16=False,
    )  # (bf16 autocast stays on the trained model's forward: the logits below are compared in float32)
    peft_model = trainer.model
    names = trainable(peft_model)
    assert "base_model.model.model.embed_tokens.parametrizations.weight.original" in names
    assert ("base_model.model.lm_head.parametrizations.weight.original" in names) != tied
    assert sum("lora_" in n for n in names) == 4 and len(names) == 4 + (1 if tied else 2)
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    assert not torch.equal(tables(model)[0][old_vocab:], start[0][old_vocab:])
    assert (tmp_path / "run" / "checkpoint-3" / ROWS_FILE).is_file()

    with peft_model.disable_adapter():  # the base model: the new rows as they were when TRL wrapped it
        assert torch.equal(tables(model)[0], start[0])
    ids = tok("ka lo <|im_start|> mi <|im_end|>", return_tensors="pt").input_ids
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits

    out = tmp_path / "adapter"
    trainer.save_model(str(out))  # the adapter, and the rows file next to it
    assert (out / ROWS_FILE).is_file() and (out / "adapter_model.safetensors").is_file()
    base, _, _, _ = grown(backend, chat_source, tied=tied)  # a fresh copy of the grown model
    load_rows(base, out / ROWS_FILE)
    reloaded = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    merged = reloaded.merge_and_unload()
    assert_old_rows_pinned(merged, plain, old_vocab)
    assert torch.equal(tables(merged)[0], tables(model)[0])


def test_sft_with_peft_config_without_the_callback_warns_that_the_rows_are_frozen(
    backend, chat_source, tmp_path
):
    """The documented limit: without SaveRowsCallback, PEFT's freezing stands (the rows stay exact,
    untrained), and the first training forward says so, once, naming the way out."""
    from embconstraint.hf.guards import FROZEN_NEW_ROWS

    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    constrain_new_tokens(model, old_vocab)
    start = tables(model)
    trainer = sft(model, tok, tmp_path, peft_config=peft.LoraConfig(**LORA), save_strategy="no")
    assert all("lora_" in n for n in trainable(trainer.model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert [str(w.message) for w in caught if "new rows" in str(w.message)] == [FROZEN_NEW_ROWS]
    assert torch.equal(tables(model)[0], start[0]) and torch.equal(tables(model)[1], start[1])


def test_no_frozen_rows_warning_where_the_rows_train_or_nothing_trains(backend, chat_source):
    """Not given when the new rows train, in eval mode, or under no_grad (a reference model's
    forward); given for a model constrained and frozen by hand, once."""
    from embconstraint.hf.guards import FROZEN_NEW_ROWS

    model, tok, old_vocab, _ = grown(backend, chat_source, tied=True)
    (free,) = constrain_new_tokens(model, old_vocab)
    ids = torch.tensor([[1, 2, old_vocab]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()
        model(ids)  # the rows train
        free.requires_grad_(False)
        with torch.no_grad():
            model(ids)
        model.eval()
        model(ids)
    model.train()
    with pytest.warns(UserWarning) as record:
        model(ids)
        model(ids)
    assert [str(w.message) for w in record if "new rows" in str(w.message)] == [FROZEN_NEW_ROWS]


@pytest.mark.parametrize(
    "lora", [pytest.param(False, marks=pytest.mark.slow), True], ids=["full", "lora"]
)  # (the whole model's resume is the Trainer's own path, tested in test_trainer_checkpoints.py)
def test_sft_resume_from_checkpoint_is_bit_exact(backend, chat_source, lora, tmp_path):
    def run(out: Path, resume: bool):
        model, tok, old_vocab, _ = grown(backend, chat_source, tied=False)
        if not lora:
            model.requires_grad_(False)
        constrain_new_tokens(model, old_vocab)
        trainer = sft(
            model,
            tok,
            out,
            steps=6,
            peft_config=peft.LoraConfig(**LORA) if lora else None,
            callbacks=[SaveRowsCallback()],
            bf16=False,
        )
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-3") if resume else None)
        lora_weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        return tables(model), lora_weights

    (emb, head), adapter = run(tmp_path / "a", resume=False)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    (emb_b, head_b), adapter_b = run(tmp_path / "b", resume=True)
    assert torch.equal(emb, emb_b) and torch.equal(head, head_b)
    assert adapter.keys() == adapter_b.keys() and all(torch.equal(adapter[k], adapter_b[k]) for k in adapter)
    assert bool(adapter) == lora


def preferences(n: int = 8):
    rng = random.Random(1)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(2)) for _ in range(20)]
    rows = [
        {
            "prompt": " ".join(rng.choice(words) for _ in range(3)),
            "chosen": " <|im_start|> " + rng.choice(words),
            "rejected": " <|im_end|> " + rng.choice(words),
        }
        for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def _offline(
    trainer, config, dataset, model, tok, out: Path, *, ref_model=None, peft_config=None, **overrides
):
    """A two-step preference trainer (``trl.DPOTrainer``, ``trl.KTOTrainer``) with its reference."""
    args = config(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_strategy="no",
        bf16=False,  # (autocast stays on the trained model: the logits are compared in float32)
        **{**QUIET, **overrides},
    )
    return trainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[SaveRowsCallback()],
    )


def dpo(model, tok, out: Path, **kwargs):
    return _offline(trl.DPOTrainer, trl.DPOConfig, preferences(), model, tok, out, **kwargs)


def logits(model, tok) -> torch.Tensor:
    ids = tok("ka lo <|im_start|> mi <|im_end|>", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_dpo_with_a_copy_of_the_constrained_model_as_reference(backend, chat_source, tmp_path):
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    model.requires_grad_(False)
    constrain_new_tokens(model, old_vocab)
    ref = create_reference_model(model)  # a deepcopy, frozen
    start = tables(model)
    assert torch.equal(tables(ref)[0], start[0]) and not trainable(ref)
    trainer = dpo(model, tok, tmp_path, ref_model=ref)
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    assert_old_rows_pinned(ref, plain, old_vocab)
    assert not torch.equal(tables(model)[0][old_vocab:], start[0][old_vocab:])
    assert torch.equal(tables(ref)[0], start[0]) and torch.equal(tables(ref)[1], start[1])  # frozen


def test_dpo_with_peft_config_computes_the_reference_with_the_base_rows(backend, chat_source, tmp_path):
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=True)
    constrain_new_tokens(model, old_vocab)
    before = copy.deepcopy(model).eval()
    trainer = dpo(model, tok, tmp_path, peft_config=peft.LoraConfig(**LORA))
    trainer.train()
    peft_model = trainer.model.eval()
    trained = tables(model)
    assert not torch.equal(trained[0][old_vocab:], tables(before)[0][old_vocab:])
    assert_old_rows_pinned(model, plain, old_vocab)
    with peft_model.disable_adapter():  # what TRL runs for the reference
        assert torch.equal(logits(peft_model, tok), logits(before, tok))
    assert torch.equal(tables(model)[0], trained[0])


def test_dpo_on_a_peft_model_computes_the_reference_with_the_rows_its_ref_adapter_was_added_with(
    backend, chat_source, tmp_path
):
    """Given a constrained PeftModel and no reference, TRL adds a "ref" copy of the adapter and switches to it
    (set_adapter): the reference is the model as it was when DPO started, rows included."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    constrain_new_tokens(model, old_vocab)
    with torch.no_grad():  # an adapter trained before (B is zero after get_peft_model)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model).eval()
    trainer = dpo(model, tok, tmp_path)
    assert set(model.peft_config) == {"default", "ref"}
    trainer.train()
    model.eval()
    trained = tables(model)
    assert not torch.equal(trained[0][old_vocab:], tables(before)[0][old_vocab:])
    assert_old_rows_pinned(model, plain, old_vocab)
    with torch.no_grad(), use_adapter(model, "ref"):  # what TRL runs for the reference
        assert torch.equal(logits(model, tok), logits(before, tok))
    assert torch.equal(tables(model)[0], trained[0]) and torch.equal(tables(model)[1], trained[1])


def test_sft_chat_template_path_on_a_constrained_model_is_refused(backend, chat_source, tmp_path):
    """SFTConfig(chat_template_path=<a tokenizer>) adds the tokens inside the trainer (PEFT's trainable tokens):
    its resize of a constrained model is refused, the weights unchanged."""
    model, tok, old_vocab, _ = grown(backend, chat_source, tied=False)
    constrain_new_tokens(model, old_vocab)
    start = tables(model)
    other = fast_tokenizer(backend, pad_token="</s>")
    other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    other.chat_template = TEMPLATE
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(RuntimeError, match="resize_token_embeddings"):
        sft(model, tok, tmp_path, chat_template_path=str(tmp_path / "other"), save_strategy="no")
    assert torch.equal(tables(model)[0], start[0]) and torch.equal(tables(model)[1], start[1])


# GRPO and RLOO: online trainers that generate completions with the constrained model, score them with a
# reward function and, with beta > 0, compute a KL term against a reference.


def prompts(n: int = 4):
    rng = random.Random(2)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(2)) for _ in range(20)]
    rows = [
        {"prompt": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(3))}]}
        for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)  # conversational: the chat template puts the new tokens in


def reward_length(completions, **kwargs) -> list[float]:
    """A reward that differs between the generations of a prompt (the advantages are not all zero)."""
    return [float(len(str(c))) for c in completions]


def online(trainer_cls, model, tok, out: Path, *, beta: float, peft_config=None):
    config_cls = {trl.GRPOTrainer: trl.GRPOConfig, trl.RLOOTrainer: trl.RLOOConfig}[trainer_cls]
    args = config_cls(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        learning_rate=5e-2,
        beta=beta,
        save_strategy="no",
        bf16=False,  # (autocast stays on the trained model: the logits are compared in float32)
        **QUIET,
    )
    return trainer_cls(
        model=model,
        reward_funcs=reward_length,
        args=args,
        train_dataset=prompts(),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[SaveRowsCallback()],
    )


def rows_seen(model, old_vocab: int, state) -> list[tuple[object, torch.Tensor]]:
    """(``state()``, the new rows of the input embedding) at every forward of the embedding from now on."""
    seen: list[tuple[object, torch.Tensor]] = []
    embedding = base_model_of(model).get_input_embeddings()
    embedding.register_forward_hook(
        lambda m, a, o: seen.append((state(), m.weight[old_vocab:].detach().clone()))
    )
    return seen


def lora_disabled(peft_model) -> bool:
    return any(m.disable_adapters for m in peft_model.modules() if hasattr(m, "lora_A"))


def assert_generates_as_the_merged_model(model, tok) -> None:
    """Greedy generation on the constrained model gives the tokens a plain copy of its merged weights gives."""
    model.eval()
    plain = LlamaForCausalLM(base_model_of(model).config).eval()
    plain.load_state_dict(merged_state_dict(base_model_of(model)))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "ka lo"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1] and torch.equal(
        out, plain.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    )


@pytest.mark.parametrize("trainer_cls", [trl.GRPOTrainer, trl.RLOOTrainer], ids=["grpo", "rloo"])
def test_online_trainer_trains_the_new_rows_only_and_generates(backend, chat_source, trainer_cls, tmp_path):
    """beta=0: no reference. The completions are generated by the constrained model; the new rows train
    (the embedding's: the chat template puts the new tokens in every prompt) and the old rows stay."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    model.requires_grad_(False)
    constrain_new_tokens(model, old_vocab)
    start = tables(model)
    trainer = online(trainer_cls, model, tok, tmp_path, beta=0.0)
    trainer.train()
    assert trainer.state.global_step == 2
    assert_old_rows_pinned(model, plain, old_vocab)
    emb, head = tables(model)
    assert not torch.equal(emb[old_vocab:], start[0][old_vocab:]) and not torch.equal(
        head[old_vocab:], start[1][old_vocab:]
    )
    assert_generates_as_the_merged_model(model, tok)


@pytest.mark.parametrize("trainer_cls", [trl.GRPOTrainer, trl.RLOOTrainer], ids=["grpo", "rloo"])
def test_online_trainer_with_peft_config_computes_the_reference_with_the_base_rows(
    backend, chat_source, trainer_cls, tmp_path
):
    """beta > 0 with peft_config=: TRL computes the reference with the adapter disabled. Every forward made
    with the adapter disabled saw the new rows as they were when TRL wrapped the model; the trained forwards
    see the trained ones."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=True)
    constrain_new_tokens(model, old_vocab)
    before = copy.deepcopy(model).eval()
    start = tables(model)[0][old_vocab:]
    trainer = online(trainer_cls, model, tok, tmp_path, beta=0.1, peft_config=peft.LoraConfig(**LORA))
    peft_model = trainer.model
    seen = rows_seen(peft_model, old_vocab, lambda: lora_disabled(peft_model))
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    trained = tables(model)[0]
    assert not torch.equal(trained[old_vocab:], start)
    references = [rows for disabled, rows in seen if disabled]
    assert len(references) == 2 and all(torch.equal(rows, start) for rows in references)  # one per step
    assert any(not torch.equal(rows, start) for disabled, rows in seen if not disabled)
    peft_model.eval()
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, tok), logits(before, tok))
    assert torch.equal(tables(model)[0], trained)
    assert_generates_as_the_merged_model(peft_model.merge_and_unload(), tok)


def test_grpo_on_a_peft_model_computes_the_reference_with_its_ref_adapter_and_the_rows_it_started_with(
    backend, chat_source, tmp_path
):
    """Given a constrained PeftModel and beta > 0, GRPO adds a "ref" copy of the adapter and switches to it
    for the reference: those forwards see the new rows as they were when GRPO started."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    constrain_new_tokens(model, old_vocab)
    before = copy.deepcopy(model).eval()
    start = tables(model)[0][old_vocab:]
    trainer = online(trl.GRPOTrainer, model, tok, tmp_path, beta=0.1)
    assert set(model.peft_config) == {"default", "ref"}
    seen = rows_seen(model, old_vocab, lambda: model.active_adapter)
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    assert model.active_adapter == "default" and not torch.equal(tables(model)[0][old_vocab:], start)
    references = [rows for adapter, rows in seen if adapter == "ref"]
    assert len(references) == 2 and all(torch.equal(rows, start) for rows in references)
    model.eval()
    with torch.no_grad(), use_adapter(model, "ref"):
        assert torch.equal(logits(model, tok), logits(before, tok))


def test_online_trainer_with_beta_and_no_peft_builds_its_reference_from_the_model_folder(
    backend, chat_source, tmp_path
):
    """Without PEFT, GRPO and RLOO take no ref_model: with beta > 0 they load the reference from
    model.config._name_or_path. Saved (the plain merged weights) and loaded back before constraining,
    the grown model is its own reference: the rows as at the start, bitwise."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    model.save_pretrained(tmp_path / "grown")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "grown")
    model.requires_grad_(False)
    constrain_new_tokens(model, old_vocab)
    before = copy.deepcopy(model).eval()
    trainer = online(trl.RLOOTrainer, model, tok, tmp_path / "run", beta=0.1)
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    assert not torch.equal(tables(model)[0], tables(before)[0])
    assert torch.equal(logits(trainer.ref_model, tok), logits(before, tok))


def test_online_trainer_with_a_reference_without_the_new_tokens_fails_before_any_step(
    backend, chat_source, tmp_path
):
    """The limit: a model whose _name_or_path is the pretrained model before the new tokens (from_pretrained,
    then clone_chat_template) gets that model as its reference. Its first forward over the new tokens fails
    (an IndexError from the embedding) before any step; the weights are unchanged."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    plain.save_pretrained(tmp_path / "pretrained")
    model.config._name_or_path = str(tmp_path / "pretrained")  # as from_pretrained sets it
    model.requires_grad_(False)
    constrain_new_tokens(model, old_vocab)
    start = tables(model)
    trainer = online(trl.GRPOTrainer, model, tok, tmp_path / "run", beta=0.1)
    assert trainer.ref_model.get_input_embeddings().num_embeddings == old_vocab
    with pytest.raises(IndexError):
        trainer.train()
    assert trainer.state.global_step == 0
    assert torch.equal(tables(model)[0], start[0]) and torch.equal(tables(model)[1], start[1])


# KTO: unpaired completions labelled desirable or not, against a reference.


def labelled(n: int = 8):
    pairs = preferences(n)
    rows = [
        row
        for p in pairs
        for row in (
            {"prompt": p["prompt"], "completion": p["chosen"], "label": True},
            {"prompt": p["prompt"], "completion": p["rejected"], "label": False},
        )
    ]
    return datasets.Dataset.from_list(rows)


def kto(model, tok, out: Path, **kwargs):
    return _offline(trl.KTOTrainer, trl.KTOConfig, labelled(), model, tok, out, **kwargs)


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_kto_trains_the_new_rows_with_a_copy_or_precomputed_reference(
    backend, chat_source, reference, tmp_path
):
    """ref_model= a frozen copy of the constrained model (it does not change), or no reference model and
    precompute_ref_log_probs=True (the reference log-probs computed by the model before any step)."""
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=False)
    model.requires_grad_(False)
    constrain_new_tokens(model, old_vocab)
    start = tables(model)
    ref = create_reference_model(model) if reference == "copy" else None
    trainer = kto(model, tok, tmp_path, ref_model=ref, precompute_ref_log_probs=reference == "precomputed")
    assert (trainer.ref_model is None) == (reference == "precomputed")
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    emb, head = tables(model)
    assert not torch.equal(emb[old_vocab:], start[0][old_vocab:]) and not torch.equal(
        head[old_vocab:], start[1][old_vocab:]
    )
    if ref is not None:
        assert_old_rows_pinned(ref, plain, old_vocab)
        assert torch.equal(tables(ref)[0], start[0]) and torch.equal(tables(ref)[1], start[1])


def test_kto_with_peft_config_computes_the_reference_with_the_base_rows(backend, chat_source, tmp_path):
    model, tok, old_vocab, plain = grown(backend, chat_source, tied=True)
    constrain_new_tokens(model, old_vocab)
    before = copy.deepcopy(model).eval()
    start = tables(model)[0][old_vocab:]
    trainer = kto(model, tok, tmp_path, peft_config=peft.LoraConfig(**LORA))
    peft_model = trainer.model
    seen = rows_seen(peft_model, old_vocab, lambda: lora_disabled(peft_model))
    trainer.train()
    assert_old_rows_pinned(model, plain, old_vocab)
    assert not torch.equal(tables(model)[0][old_vocab:], start)
    references = [rows for disabled, rows in seen if disabled]
    assert references and all(torch.equal(rows, start) for rows in references)
    peft_model.eval()
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, tok), logits(before, tok))
