"""Every ``transformers.Trainer`` path that loads a checkpoint brings back that checkpoint's rows:
``load_best_model_at_end`` and ``resume_from_checkpoint``, on a ``PeftModel`` (whose checkpoints
hold the adapter only) and on a plain model; a checkpoint without its rows is refused, not mixed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.hf import tiny_llama_config
from torch import nn

from embconstraint import load_rows
from embconstraint.hf import ROWS_FILE, SaveRowsCallback, constrain_new_tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

OLD, NEW, DIM, SEQ = 40, 6, 16, 8


def _model(lora: bool, tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_llama_config(OLD, DIM, tied=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    model.resize_token_embeddings(OLD + NEW, mean_resizing=False)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    else:
        model.requires_grad_(False)
    constrain_new_tokens(model, OLD)
    return model


def _data(seed: int, n: int = 24) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, OLD + NEW, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


class _Scores:
    """An eval metric that is best at the first evaluation (so the best checkpoint is not the last)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _prediction) -> dict[str, float]:
        self.calls += 1
        return {"score": 1.0 if self.calls == 1 else 0.0}


def _trainer(model: nn.Module, out: Path, *, best: bool = False, steps: int = 6, callbacks=None):
    extra = (
        dict(
            eval_strategy="steps",
            eval_steps=3,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
            save_total_limit=None,
        )
        if best
        else {}
    )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=steps,
        save_steps=3,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=100,
        **extra,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_data(0),
        eval_dataset=_data(1, 8) if best else None,
        compute_metrics=_Scores() if best else None,
        callbacks=[SaveRowsCallback()] if callbacks is None else callbacks,
    )


def _tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        model.get_input_embeddings().weight.detach().clone(),
        model.get_output_embeddings().weight.detach().clone(),
    )


def _lora(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _file_rows(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows = load_file(str(checkpoint / ROWS_FILE))
    return rows["model.embed_tokens.weight"], rows["lm_head.weight"]


def _adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "adapter_model.safetensors"))


def test_load_best_model_at_end_brings_back_the_best_checkpoints_rows_with_its_adapter(tmp_path):
    model = _model(lora=True)
    trainer = _trainer(model, tmp_path, best=True)
    trainer.train()
    best, last = tmp_path / "checkpoint-3", tmp_path / "checkpoint-6"
    assert trainer.state.best_model_checkpoint == str(best)
    emb, head = _tables(model)
    best_emb, best_head = _file_rows(best)
    last_emb, last_head = _file_rows(last)
    assert not torch.equal(best_emb, last_emb) and not torch.equal(best_head, last_head)  # a real difference
    assert torch.equal(emb[OLD:], best_emb) and torch.equal(head[OLD:], best_head)  # the best rows ...
    adapter = _adapter(best)
    lora = _lora(model)
    assert all(
        torch.equal(lora[k.replace(".weight", ".default.weight")], v) for k, v in adapter.items()
    )  # ... and adapter
    start = _tables(_model(lora=True))
    assert torch.equal(emb[:OLD], start[0][:OLD]) and torch.equal(head[:OLD], start[1][:OLD])


def test_load_best_model_at_end_without_peft_is_the_best_checkpoint(tmp_path):
    model = _model(lora=False)
    trainer = _trainer(model, tmp_path, best=True, callbacks=[])
    trainer.train()
    best = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    emb, head = _tables(model)
    assert torch.equal(emb, best["model.embed_tokens.weight"]) and torch.equal(head, best["lm_head.weight"])


def test_a_best_checkpoint_without_rows_is_refused(tmp_path):
    model = _model(lora=True)
    trainer = _trainer(model, tmp_path, best=True)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SaveRowsCallback))
    original = callback.on_save

    def drop_first(args, state, control, **kwargs):  # the first checkpoint loses its rows file
        original(args, state, control, **kwargs)
        (tmp_path / "checkpoint-3" / ROWS_FILE).unlink(missing_ok=True)

    callback.on_save = drop_first
    with pytest.raises(
        RuntimeError,
        match=r"load_best_model_at_end restored the adapter of .*checkpoint-3, but that "
        "folder has no embconstraint_rows.safetensors",
    ):
        trainer.train()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """An uninterrupted untied LoRA run: its output folder, final tables and LoRA weights."""
    out = tmp_path_factory.mktemp("full")
    model = _model(lora=True)
    _trainer(model, out).train()
    return out, _tables(model), _lora(model)


def _same(model: nn.Module, tables: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(_tables(model), tables, strict=True))


def _resume(out: Path, checkpoint: Path | bool, *, tied: bool = False, manual: bool = False) -> nn.Module:
    """A fresh constrained LoRA model (its new rows zeroed: not the checkpoint's), resumed from ``checkpoint``."""
    resumed = _model(lora=True, tied=tied)
    with torch.no_grad():
        resumed.get_input_embeddings().parametrizations.weight.original.zero_()
    if manual:
        load_rows(resumed, Path(checkpoint) / ROWS_FILE)
    _trainer(resumed, out).train(resume_from_checkpoint=checkpoint if checkpoint is True else str(checkpoint))
    return resumed


def test_resume_restores_the_rows_without_a_manual_load(tmp_path, full_run):
    out, tables, lora = full_run
    resumed = _resume(tmp_path, out / "checkpoint-3")
    assert _same(resumed, tables)  # bit-exact against the uninterrupted run
    assert _lora(resumed).keys() == lora.keys() and all(
        torch.equal(v, lora[k]) for k, v in _lora(resumed).items()
    )


def test_resume_of_a_tied_model(tmp_path):
    full = _model(lora=True, tied=True)
    _trainer(full, tmp_path / "full").train()
    assert _same(_resume(tmp_path / "resumed", tmp_path / "full" / "checkpoint-3", tied=True), _tables(full))


def test_resume_from_the_last_checkpoint_of_the_output_dir(tmp_path, full_run):
    out, tables, _ = full_run
    shutil.copytree(out / "checkpoint-3", tmp_path / "checkpoint-3")
    assert _same(_resume(tmp_path, True), tables)  # get_last_checkpoint(output_dir)


def test_the_manual_load_before_resume_still_works(tmp_path, full_run):
    out, tables, _ = full_run
    assert _same(_resume(tmp_path, out / "checkpoint-3", manual=True), tables)


def test_a_resume_that_restores_no_rows_is_refused_before_any_step(tmp_path, full_run):
    out, _, _ = full_run
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(out / "checkpoint-3", checkpoint)
    (checkpoint / ROWS_FILE).unlink()
    resumed = _model(lora=True)
    before = _tables(resumed)
    with pytest.raises(RuntimeError, match="resumed a PeftModel at step 3 without its trained rows"):
        _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    assert _same(resumed, before)  # no step was taken
