"""The transformers ``Trainer`` with DeepSpeed ZeRO-3 on 2 CPU processes (gloo), new tokens trained
with ``constrain_new_tokens``.

Usage: PYTHONPATH=tests:. python -m torch.distributed.run --nproc_per_node 2 tests/scripts/trainer_zero3.py OUT_DIR [RUN ...]
(tests/test_trainer_deepspeed.py runs it). RUN is one of ``untied`` (a model built under
``deepspeed.zero.Init`` and resized under ZeRO-3, as ``from_pretrained`` does once a ZeRO-3
``TrainingArguments`` exists), ``tied``, ``lora_tied`` and ``lora_untied`` (LoRA on the attention).

Each rank writes OUT_DIR/rank<r>.pt with, per run and step: whether the pinned rows of the
embedding and the head were bitwise their values when training started, and the free rows (and every
other trainable Parameter) against one process trained with the same SGD on the global batch
(the batches both ranks saw, gathered; SGD: Adam's first steps move each element by +-lr,
whatever the size of its gradient, so that rounding noise in a near-zero gradient flips them); the checkpoint folders' files; a resume from the first
checkpoint against the uninterrupted run (bitwise); the merged weights at the end (rank 0), which
the test compares with what ``save_model`` wrote. Failures are recorded, not raised.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.hf import tiny_llama_config

OLD, NEW, DIM = 40, 48, 16
STEPS, SAVE_STEPS, BATCH, SEQ, LR = 4, 2, 2, 8, 0.5


def zero3() -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the Trainer's SGD (Adam's first steps amplify rounding)
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
            "memory_efficient_linear": False,
        },
    }


def arguments(out: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        optim="sgd",
        use_cpu=True,
        deepspeed=zero3(),
        report_to=[],
        save_steps=SAVE_STEPS,
        save_strategy="steps",
        logging_steps=10**6,
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
        save_only_model=False,
    )


class Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2 * BATCH * STEPS

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, NEW, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def config(tied: bool):
    return tiny_llama_config(OLD, DIM, tied=tied)


def build(run: str, zero_init: bool, state: dict | None = None):
    """The model of ``run``, new rows constrained (from the plain ``state``, when given)."""
    from transformers import LlamaForCausalLM

    from embconstraint.hf import constrain_new_tokens

    torch.manual_seed(0)
    cfg = config(run.endswith("_tied") or run == "tied")
    # _from_config runs under deepspeed.zero.Init where a ZeRO-3 TrainingArguments exists (as from_pretrained)
    model = LlamaForCausalLM._from_config(cfg) if zero_init else LlamaForCausalLM(cfg)
    model.resize_token_embeddings(NEW)
    if run.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if state is not None:  # before constraining: the pinned rows are the state's too
        model.load_state_dict(state)
    constrain_new_tokens(model, OLD)
    return model


def gathered(model):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every trainable Parameter (gathered), by name."""
    with gathered(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def pinned(model) -> dict[str, torch.Tensor]:
    """The merged weights' first OLD rows: the embedding and the output head."""
    with gathered(model), torch.no_grad():
        return {
            "emb": model.get_input_embeddings().weight[:OLD].clone(),
            "head": model.get_output_embeddings().weight[:OLD].clone(),
        }


class Record:
    """A TrainerCallback (built lazily: transformers is imported in main) that checks every step."""

    def __new__(cls, *args, **kwargs):
        from transformers import TrainerCallback

        class _Record(TrainerCallback):
            def __init__(self, model, run, args, reference: bool) -> None:
                self.model, self.run, self.args, self.want_reference = model, run, args, reference
                self.before, self.reference, self.steps, self.batches = None, None, [], []

            def on_train_begin(self, args, state, control, **kwargs):
                # after deepspeed.initialize, which broadcast rank 0's values of the Parameters it had not
                # partitioned yet (transformers' resize under ZeRO-3 samples new rows on each rank)
                self.before = pinned(self.model)
                if self.want_reference:
                    self.reference = Reference(self.run, self.model, self.args)

            def on_step_end(self, args, state, control, **kwargs):
                ids = torch.cat(self.batches)  # this rank's rows of the step
                self.batches.clear()
                both = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
                dist.all_gather(both, ids)
                entry = {
                    "pinned_exact": all(torch.equal(v, self.before[k]) for k, v in pinned(self.model).items())
                }
                if self.reference is not None:
                    mine, ref = snapshot(self.model), self.reference.step(torch.cat(both))
                    entry["maxdiff"] = max((mine[n] - ref[n]).abs().max().item() for n in mine)
                    entry["names"] = sorted(mine) == sorted(ref)
                self.steps.append(entry)

        return _Record(*args, **kwargs)


class Reference:
    """One process: the same model (its initial state, pinned rows included), the same SGD, the global batch."""

    def __init__(self, run: str, model, args) -> None:
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        from embconstraint import merged_state_dict

        with gathered(model):  # every value, the pinned rows and the buffers included
            state = merged_state_dict(model)
        unset_hf_deepspeed_config()  # a plain model: no deepspeed.zero.Init in resize_token_embeddings
        try:
            self.model = build(run, zero_init=False, state=state)
        finally:
            set_hf_deepspeed_config(args.hf_deepspeed_config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=LR)

    def step(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}


def train(run: str, out: Path, record: dict, resume: str | None = None, reference: bool = True):
    from transformers import Trainer

    from embconstraint.hf import SaveRowsCallback

    args = arguments(out)  # before the model: transformers then builds it under deepspeed.zero.Init
    model = build(run, zero_init=run == "untied")
    rec = Record(model, run, args, reference)
    model.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: rec.batches.append(a[0].detach().clone())
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[SaveRowsCallback(), rec])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


def one_run(run: str, root: Path, rank: int, record: dict) -> None:
    out = root / run
    trainer, rec = train(run, out, record)
    record[f"{run}_steps"] = rec.steps
    record[f"{run}_zero_init"] = run != "untied" or all(
        getattr(p, "ds_id", None) is not None for p in trainer.model.parameters()
    )
    final = snapshot(trainer.model)
    trainer.save_model(str(out / "final"))
    from embconstraint import merged_state_dict

    with gathered(trainer.model):
        merged = merged_state_dict(trainer.model)
    if rank == 0:
        torch.save(merged, out / "merged.pt")
        record[f"{run}_files"] = {
            p.name: sorted(f.name for f in p.iterdir()) for p in sorted(out.iterdir()) if p.is_dir()
        }
    dist.barrier()
    again, rec = train(
        run, root / f"{run}_resumed", record, resume=str(out / f"checkpoint-{SAVE_STEPS}"), reference=False
    )
    mine = snapshot(again.model)
    record[f"{run}_resume"] = {
        "bitwise": all(torch.equal(mine[n], final[n]) for n in final),
        "steps": len(rec.steps),
        "pinned": [s["pinned_exact"] for s in rec.steps],
    }


def main(out_dir: str, runs: list[str]) -> None:
    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (see tests/scripts/deepspeed_zero.py)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    root = Path(out_dir)
    record: dict = {"rank": rank, "runs": runs}
    try:
        for run in runs:
            one_run(run, root, rank, record)
    except Exception:
        record["error"] = traceback.format_exc()[-4000:]
    torch.save(record, root / f"rank{rank}.pt")
    del deepspeed


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["untied", "lora_tied"])
