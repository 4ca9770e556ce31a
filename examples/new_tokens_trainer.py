"""New tokens + LoRA with ``transformers.Trainer``: ship an adapter and a rows-only file.

A tiny Llama with an untied output head (``tie_word_embeddings=False``, as in Llama 3 or Mistral),
built from a config (nothing is downloaded), stands in for a pretrained model. We

1. grow its vocabulary by 64 tokens with ``resize_token_embeddings``,
2. wrap it with LoRA on the attention projections (``peft.get_peft_model``, which freezes every
   non-LoRA parameter), then pin the old rows of the input embedding and of the output head with
   ``embconstraint.hf.constrain_new_tokens``, which makes the new tokens' rows trainable (two
   (64, D) blocks: one in the embedding, one in the head),
3. train LoRA and the new rows together with ``transformers.Trainer`` (CPU, ``report_to="none"``, a
   small data set generated in code: no tokenizer),
4. save the LoRA adapter (``save_pretrained``, which holds only the LoRA weights) and the new rows
   (``embconstraint.save_rows``: 64 x D values per weight, not the table),
5. load both onto a fresh copy of the base model (``embconstraint.load_rows`` on the resized base,
   then ``PeftModel.from_pretrained``) and check that its logits equal the trained model's, bitwise.

Run: ``python examples/new_tokens_trainer.py [OUTPUT_DIR]`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from embconstraint import load_rows, save_rows
from embconstraint.hf import constrain_new_tokens

OLD_VOCAB, NUM_NEW, DIM, SEQ = 256, 64, 64, 32


def pretrained_base() -> LlamaForCausalLM:
    """The same "pretrained" model every time (seeded), with the 64 new tokens appended. The new
    rows are initialised from the global RNG, so they differ between calls."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=OLD_VOCAB,
        hidden_size=DIM,
        intermediate_size=2 * DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.resize_token_embeddings(OLD_VOCAB + NUM_NEW, mean_resizing=False)
    return model


def make_dataset(num: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences where old token ``k`` is always followed by new token ``OLD_VOCAB + k``: learnable
    only through the new tokens' rows of the head (and LoRA)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randint(0, NUM_NEW, (num, SEQ // 2), generator=g)
    ids = torch.stack([old, OLD_VOCAB + old], dim=-1).reshape(num, SEQ)
    return [{"input_ids": row, "labels": row} for row in ids]


def main(output_dir: Path) -> None:
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    torch.manual_seed(1)
    model = pretrained_base()
    old_input = model.get_input_embeddings().weight[:OLD_VOCAB].detach().clone()
    old_head = model.get_output_embeddings().weight[:OLD_VOCAB].detach().clone()

    # 1-2. LoRA on attention (freezes everything else), then the new rows (made trainable here).
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    new_rows = constrain_new_tokens(model, OLD_VOCAB)
    assert [tuple(p.shape) for p in new_rows] == [(NUM_NEW, DIM)] * 2  # embedding and head (untied)
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    lora = sum(1 for n in trainable if "lora_" in n)
    print(f"trainable: {lora} LoRA tensors + new rows {[tuple(p.shape) for p in new_rows]}")

    # 3. Train with the Trainer.
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=16,
        max_steps=60,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=20,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(512, seed=0))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print("training loss: " + " -> ".join(f"{x:.2f}" for x in losses))
    assert losses[-1] < losses[0]
    assert torch.equal(model.get_input_embeddings().weight[:OLD_VOCAB], old_input)
    assert torch.equal(model.get_output_embeddings().weight[:OLD_VOCAB], old_head)
    print("old rows of the embedding and of the head: bitwise unchanged")

    # 4. Save the adapter (LoRA weights only) and the new rows.
    model.save_pretrained(output_dir / "adapter")
    rows_file = output_dir / "new_rows.safetensors"
    save_rows(model, rows_file)
    print(
        f"saved {output_dir / 'adapter'} and {rows_file.name} ({rows_file.stat().st_size / 1024:.0f} KiB; "
        f"the two tables would be {2 * (OLD_VOCAB + NUM_NEW) * DIM * 4 / 1024:.0f} KiB)"
    )

    # 5. A fresh base (same pretrained weights, other new rows), the rows file, then the adapter.
    ids = torch.stack([d["input_ids"] for d in make_dataset(8, seed=1)])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    base = pretrained_base()
    with torch.no_grad():
        before = base(input_ids=ids).logits
    load_rows(base, rows_file)
    reloaded = PeftModel.from_pretrained(base, output_dir / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    assert not torch.equal(before, expected)  # the fresh base alone is not the trained model
    assert torch.equal(logits, expected)
    print("fresh base + rows file + adapter: logits bitwise equal to the trained model's")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "output_dir", nargs="?", type=Path, help="where to write (default: a temporary directory)"
    )
    out = parser.parse_args().output_dir
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        main(out)
