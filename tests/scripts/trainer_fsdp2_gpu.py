"""The transformers ``Trainer`` with FSDP2 (accelerate's ``fully_shard``), new tokens trained with
``constrain_new_tokens``, on CUDA: accelerate enables FSDP for GPU backends only (on CPU the Trainer
silently runs DDP instead; FSDP2 on CPU is tested through torch directly, tests/test_sharded.py).

Usage: PYTHONPATH=tests:. torchrun --nproc_per_node N tests/scripts/trainer_fsdp2_gpu.py OUT_DIR [--cpu]
(tests/test_trainer_fsdp_gpu.py runs it; ``--cpu`` only checks the script itself: DDP, no FSDP).

Rank 0 writes OUT_DIR/result.json: whether the Trainer's model was FSDP2-managed (the free rows a
sharded DTensor), whether only the free rows were sharded, the pinned rows of embedding and head bitwise
their values before training after every step (merged weights, all-gathered), whether the free rows
trained, and whether the folder ``save_model`` wrote loads into a plain ``LlamaForCausalLM`` with the
merged weights, bitwise.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
from helpers.hf import tiny_llama_config

OLD, NEW, DIM, STEPS = 40, 48, 32, 4


class Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, NEW, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def main(out: Path, cpu: bool) -> dict:
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from embconstraint import merged_state_dict
    from embconstraint.hf import SaveRowsCallback, constrain_new_tokens

    fsdp = (
        {}
        if cpu
        else {
            "fsdp": "full_shard",
            "fsdp_config": {
                "version": 2,
                "reshard_after_forward": True,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            },
        }
    )
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        optim="sgd",
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=cpu,
        **fsdp,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        tiny_llama_config(
            OLD, DIM, tied=False, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
        )
    )
    model.resize_token_embeddings(NEW)
    constrain_new_tokens(model, OLD)
    before = {k: v.clone() for k, v in merged_state_dict(model).items()}
    result: dict = {"steps": []}

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            merged = merged_state_dict(model)  # (all-gathers FSDP's shards: every rank)
            result["steps"].append(
                all(
                    torch.equal(merged[k][:OLD].cpu(), before[k][:OLD])
                    for k in ("model.embed_tokens.weight", "lm_head.weight")
                )
            )

    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[SaveRowsCallback(), Check()])
    trainer.train()
    free = trainer.model.model.embed_tokens.parametrizations.weight.original
    result["fsdp_engaged"] = type(free).__name__ == "DTensor"
    result["sharded"] = sorted(
        (n, tuple(p.shape))
        for n, p in trainer.model.named_parameters()
        if type(p).__name__ == "DTensor" and ("embed_tokens" in n or "lm_head" in n)
    )
    merged = merged_state_dict(trainer.model)
    result["trained"] = not torch.equal(
        merged["model.embed_tokens.weight"][OLD:].cpu(), before["model.embed_tokens.weight"][OLD:]
    )
    trainer.save_model(str(out / "final"))
    if trainer.args.process_index == 0:
        plain = LlamaForCausalLM.from_pretrained(out / "final")
        sd = plain.state_dict()
        result["saved_plain"] = all(torch.equal(sd[k].cpu(), merged[k].cpu()) for k in sd if k in merged)
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    try:
        res = main(out, "--cpu" in sys.argv[2:])
    except Exception:
        res = {"error": traceback.format_exc()[-4000:]}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(res))
