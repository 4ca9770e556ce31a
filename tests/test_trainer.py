"""transformers.Trainer end to end: train, checkpoint, resume bit-exact, no missing-keys message,
release + save_pretrained + from_pretrained; a PeftModel resumes through SaveRowsCallback's rows file."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from helpers.hf import tiny_llama_config
from torch import nn

from embconstraint import is_constrained, load_rows, release
from embconstraint.hf import ROWS_FILE, SaveRowsCallback, constrain_new_tokens

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

OLD, NEW, DIM, SEQ = 40, 6, 16, 8


def _base(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_llama_config(OLD, DIM, tied=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    model.resize_token_embeddings(OLD + NEW, mean_resizing=False)
    return model


def _constrained(tied: bool, peft: bool = False) -> nn.Module:
    model = _base(tied)
    if peft:
        import peft as peft_

        model = peft_.get_peft_model(model, peft_.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    else:
        model.requires_grad_(False)
    constrain_new_tokens(model, OLD)
    return model


def _data() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, OLD + NEW, (32, SEQ), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(model: nn.Module, out: Path, callbacks=None) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=6,
        save_steps=3,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=100,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_data(), callbacks=callbacks)


@pytest.fixture
def transformers_log():
    """Everything the transformers loggers write while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = transformers.logging.get_logger("transformers")
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def _tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        model.get_input_embeddings().weight.detach().clone(),
        model.get_output_embeddings().weight.detach().clone(),
    )


TIED = [pytest.param(True, id="tied"), pytest.param(False, id="untied")]


@pytest.mark.slow
@pytest.mark.parametrize("tied", TIED)
def test_trainer_resume_is_bit_exact_and_reports_what_the_plain_model_does(tmp_path, tied, transformers_log):
    start = _tables(_constrained(tied))
    full = _constrained(tied)
    _trainer(full, tmp_path / "full").train()
    trained = _tables(full)
    assert not torch.equal(trained[0], start[0]) and not torch.equal(trained[1], start[1])
    assert torch.equal(trained[0][:OLD], start[0][:OLD]) and torch.equal(trained[1][:OLD], start[1][:OLD])
    resumed = _constrained(tied)
    _trainer(resumed, tmp_path / "resumed").train(
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3")
    )
    for a, b in zip(_tables(resumed), trained, strict=True):
        assert torch.equal(a, b)
    log = transformers_log.getvalue()
    # the Trainer may warn about the tied head's key its safetensors checkpoint leaves out, for the
    # plain tied model as for this one; nothing else is missing, nothing is unexpected
    tied_key = "There were missing keys in the checkpoint model loaded: ['lm_head.weight']"
    assert "missing keys" not in (log.replace(tied_key, "") if tied else log), log
    assert "unexpected keys" not in log, log


@pytest.mark.slow
@pytest.mark.parametrize("tied", TIED)
def test_trainer_then_release_save_pretrained_from_pretrained(tmp_path, tied):
    model = _constrained(tied)
    _trainer(model, tmp_path / "run").train()
    trained = _tables(model)
    release(model)
    assert not any(is_constrained(m) for m in model.modules())
    model.save_pretrained(tmp_path / "final")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for a, b in zip(_tables(loaded), trained, strict=True):
        assert torch.equal(a, b)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied


@pytest.mark.slow
@pytest.mark.parametrize("tied", TIED)
def test_peft_checkpoints_carry_the_rows_file_and_resume_bit_exact(tmp_path, tied):
    pytest.importorskip("peft")
    full = _constrained(tied, peft=True)
    _trainer(full, tmp_path / "full", callbacks=[SaveRowsCallback()]).train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / ROWS_FILE).is_file() and (tmp_path / "full" / "checkpoint-6" / ROWS_FILE).is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the adapter only: the rows are in ROWS_FILE

    resumed = _constrained(tied, peft=True)
    new_rows = [p for n, p in resumed.named_parameters() if n.endswith("parametrizations.weight.original")]
    assert len(new_rows) == (1 if tied else 2)
    with torch.no_grad():
        for p in new_rows:
            p.zero_()  # a fresh base with other new rows: the adapter checkpoint alone cannot restore them
    assert load_rows(resumed, checkpoint / ROWS_FILE)
    assert all(p.abs().sum() > 0 for p in new_rows)
    _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(_tables(resumed), _tables(full), strict=True):
        assert torch.equal(a, b)
    lora = {n: p for n, p in full.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, dict(resumed.named_parameters())[n]) for n, p in lora.items())


def test_save_rows_callback_refuses_a_bad_filename():
    with pytest.raises(ValueError, match="filename must be a name ending in .safetensors, got 'rows.pt'"):
        SaveRowsCallback("rows.pt")
