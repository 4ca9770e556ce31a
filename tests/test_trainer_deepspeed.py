"""The transformers ``Trainer`` with DeepSpeed ZeRO-3 on 2 CPU processes (gloo), new tokens trained
with ``constrain_new_tokens`` and ``SaveRowsCallback``.

tests/scripts/trainer_zero3.py runs under ``torch.distributed.run`` (marked slow: ~12 s a launch on an
idle machine), twice: an untied Llama built under ``deepspeed.zero.Init`` and resized under ZeRO-3, as
``from_pretrained`` does once a ZeRO-3 ``TrainingArguments`` exists, with LoRA on a tied head; then a
tied model and LoRA with an untied head. Every step: the pinned
rows of the embedding and the head bitwise their values before training, every trainable Parameter
within 1e-5 of one process on the global batch. A resume from the first checkpoint ends bitwise
where the uninterrupted run ended. ``save_model`` writes a plain model (loads into an unconstrained
``LlamaForCausalLM``) or the adapter with the rows file; ``zero_to_fp32`` of a checkpoint, completed
by ``merged_state_dict(model, state_dict)``, is the merged model.
"""

from __future__ import annotations

import glob
import os
import sys

import pytest
import torch
from helpers.distributed import rank_records

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

# slow: transformers, peft and DeepSpeed imported in 2 processes, 4 Trainer runs (~12 s a launch on an idle
# machine); the default suite has the engine itself (tests/test_deepspeed.py) and, in one process, what the
# Trainer's ZeRO-3 path asks of embconstraint (tests/test_engines_unit.py)
pytestmark = [pytest.mark.distributed, pytest.mark.subprocess, pytest.mark.slow]

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import trainer_zero3 as script  # noqa: E402  (its sizes and model config, no process group)


def _launch(out, runs: list[str]) -> list[dict]:
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    try:
        return rank_records(
            "trainer_zero3",
            out,
            *runs,
            timeout=420,
            launcher=["-m", "torch.distributed.run", "--nproc_per_node", "2"],
        )
    finally:
        for path in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
            os.remove(path)


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_zero3")
    return out, _launch(out, ["untied", "lora_tied"])


def _check_run(out, ranks: list[dict], run: str) -> None:
    for r in ranks:
        steps = r[f"{run}_steps"]
        assert len(steps) == script.STEPS
        assert all(s["pinned_exact"] is True for s in steps), steps
        assert all(s["names"] for s in steps)
        assert all(s["maxdiff"] <= 1e-5 for s in steps), [s["maxdiff"] for s in steps]
        assert r[f"{run}_resume"] == {
            "bitwise": True,
            "steps": script.STEPS - script.SAVE_STEPS,
            "pinned": [True] * (script.STEPS - script.SAVE_STEPS),
        }
    files = ranks[0][f"{run}_files"]
    for step in (script.SAVE_STEPS, script.STEPS):
        ckpt = files[f"checkpoint-{step}"]
        assert f"global_step{step}" in ckpt and "zero_to_fp32.py" in ckpt  # DeepSpeed's own checkpoint
        assert "embconstraint_rows.safetensors" in ckpt  # the rows, from every rank's gathered Parameters
    merged = torch.load(out / run / "merged.pt", weights_only=True)
    if run.startswith("lora"):
        _check_adapter_folder(out / run / "final", merged, tied=run.endswith("_tied"))
    else:
        _check_plain_folder(out / run / "final", merged, tied=run == "tied")
        _check_zero_to_fp32(out / run / f"checkpoint-{script.STEPS}", merged, tied=run == "tied")


def _plain_model(tied: bool):
    from transformers import LlamaForCausalLM

    cfg = script.config(tied)
    cfg.vocab_size = script.NEW
    return LlamaForCausalLM(cfg)


def _check_plain_folder(folder, merged: dict, tied: bool) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder)  # a plain model: merged weights under plain keys
    sd = model.state_dict()
    assert model.get_input_embeddings().weight.shape[0] == script.NEW
    assert all(torch.equal(sd[k], merged[k]) for k in merged), [
        k for k in merged if not torch.equal(sd[k], merged[k])
    ]


def _check_zero_to_fp32(ckpt, merged: dict, tied: bool) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from embconstraint import merged_state_dict
    from embconstraint.hf import constrain_new_tokens

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert (
        "model.embed_tokens.parametrizations.weight.original" in sd
    )  # DeepSpeed names the free rows by Parameter
    model = _plain_model(tied)
    model.load_state_dict(merged)
    constrain_new_tokens(model, script.OLD)  # the pinned rows, which a DeepSpeed checkpoint does not hold
    plain = merged_state_dict(model, sd)
    assert all(torch.equal(plain[k], merged[k]) for k in merged if k in plain)
    assert "model.embed_tokens.weight" in plain and "parametrizations" not in " ".join(plain)


def _check_adapter_folder(folder, merged: dict, tied: bool) -> None:
    from embconstraint import load_rows

    names = sorted(os.listdir(folder))
    assert "adapter_model.safetensors" in names and "embconstraint_rows.safetensors" in names, names
    prefix = "base_model.model."
    base = {k[len(prefix) :].replace(".base_layer", ""): v for k, v in merged.items() if "lora_" not in k}
    model = _plain_model(tied)
    model.load_state_dict(base)  # the final weights, then other new rows: the file must bring them back
    with torch.no_grad():
        model.get_input_embeddings().weight[script.OLD :] = 0.0
        if not tied:
            model.get_output_embeddings().weight[script.OLD :] = 0.0
    load_rows(model, folder / "embconstraint_rows.safetensors")
    sd = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(sd[key], base[key]), key


def test_untied_model_built_under_zero_init(default_runs):
    out, ranks = default_runs
    assert all(r["untied_zero_init"] for r in ranks)
    _check_run(out, ranks, "untied")


def test_lora_with_a_tied_head(default_runs):
    out, ranks = default_runs
    _check_run(out, ranks, "lora_tied")


def test_tied_and_lora_untied(tmp_path):
    ranks = _launch(tmp_path, ["tied", "lora_untied"])
    _check_run(tmp_path, ranks, "tied")
    _check_run(tmp_path, ranks, "lora_untied")
