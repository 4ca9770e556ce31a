"""Add tokens to a Hugging Face causal LM and train only the new tokens' embeddings.

A tiny GPT-2 (built from a config, nothing is downloaded) whose output head is tied to its
input embeddings stands in for a pretrained model. We

1. grow its vocabulary with ``resize_token_embeddings``,
2. pin the old rows with ``embconstraint.hf.constrain_input_embeddings`` and freeze the rest of
   the model, so the only trainable parameter is the block of new rows,
3. train the new tokens in a plain PyTorch loop (token ids are generated in code: no tokenizer),
4. ``release`` the constraint, ``save_pretrained`` the merged model, reload it with plain
   ``transformers`` and check that the old rows are bitwise unchanged and the head still tied.

Run: ``python examples/new_tokens_transformers.py [OUTPUT_DIR]`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from embconstraint import release
from embconstraint.hf import constrain_input_embeddings

OLD_VOCAB, NUM_NEW, SEQ, STEPS = 64, 8, 16, 30


def make_batch(generator: torch.Generator, batch: int = 8) -> torch.Tensor:
    """Sequences where each new token ``OLD_VOCAB + k`` is always followed by old token ``k``:
    a pattern the model can only learn through the new tokens' embeddings."""
    ids = torch.randint(0, OLD_VOCAB, (batch, SEQ), generator=generator)
    new = torch.randint(0, NUM_NEW, (batch, SEQ // 2), generator=generator)
    ids[:, 0::2] = OLD_VOCAB + new
    ids[:, 1::2] = new
    return ids


def main(output_dir: Path) -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=SEQ,
        vocab_size=OLD_VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)  # stands in for a pretrained model
    old_rows = model.get_input_embeddings().weight.detach().clone()

    # 1. Grow the vocabulary: new rows are appended, the old ones are copied exactly.
    model.resize_token_embeddings(OLD_VOCAB + NUM_NEW)
    print(f"vocabulary grown from {OLD_VOCAB} to {OLD_VOCAB + NUM_NEW} tokens")

    # 2. Pin the old rows; freeze everything else. The tied head now computes with the merged weight.
    model.requires_grad_(False)
    embedding = constrain_input_embeddings(model, OLD_VOCAB).requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [(NUM_NEW, config.n_embd)]
    print(f"trainable parameters: {[tuple(p.shape) for p in trainable]} (the new rows only)")

    # 3. Train the new tokens.
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(STEPS):
        ids = make_batch(generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0 or (step + 1) % 10 == 0:
            print(f"step {step + 1:3d}  loss {loss.item():.3f}")
    deviation = (embedding.weight[:OLD_VOCAB] - old_rows).abs().max().item()
    print(f"max |Δ| of the old rows after training: {deviation}")
    assert torch.equal(embedding.weight[:OLD_VOCAB], old_rows)

    # 4. Release, save, reload with plain transformers.
    release(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(output_dir)
    print(f"saved to {output_dir}: {sorted(p.name for p in output_dir.iterdir())}")

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    weight = reloaded.get_input_embeddings().weight
    assert torch.equal(weight[:OLD_VOCAB], old_rows), "old rows changed"
    assert torch.equal(weight, model.get_input_embeddings().weight), "new rows not saved"
    assert reloaded.get_output_embeddings().weight is weight, "head not tied"
    print(f"reloaded {type(reloaded).__name__}: old rows bitwise equal, new rows as trained, head tied")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "output_dir", nargs="?", type=Path, help="where to save the model (default: a temp dir)"
    )
    args = parser.parse_args()
    if args.output_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        main(args.output_dir)
