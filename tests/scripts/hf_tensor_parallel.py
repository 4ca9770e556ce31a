"""transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")``) of a tiny Llama whose
new tokens ``constrain_new_tokens`` trains, on 2 CPU processes (gloo).

Usage: PYTHONPATH=tests:. python -m torch.distributed.run --standalone --nproc_per_node 2
tests/scripts/hf_tensor_parallel.py OUT_DIR (tests/test_tensor_parallel.py runs it).

transformers shards the vocabulary of ``embed_tokens`` (``embedding_rowwise``) and of ``lm_head``
(``colwise_gather_output``): their weights are DTensors sharded on rows, and it replaces each module's
``forward`` by its style's wrapper. Rank 0 saves a tiny Llama grown by ``resize_token_embeddings``
(untied and tied); every rank loads it with ``tp_plan="auto"``, constrains the new tokens and trains
with SGD on the same batch (tensor parallelism: every rank computes on the whole batch), and trains the
plain model, loaded without ``tp_plan``, constrained the same way, as the one process to compare with.

Each rank writes OUT_DIR/rank<r>.pt with, per model and step: whether its pinned rows were bitwise the
checkpoint's rows, its rows of the merged embedding (and head) against the one process, every other
Parameter (gathered) against it; the logits in eval (transformers' local inference path) against it;
``merged_state_dict``; what ``save_pretrained`` wrote, loaded back into a plain model; the refusal of a
forward wrapper embconstraint does not recognise. Failures are recorded, not raised.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.distributed import attempt, global_batch, save_record
from helpers.hf import tiny_llama_config

OLD, NEW, DIM = 96, 101, 16  # 101 rows over 2 ranks: rank 0 holds rows 0..50 (pinned only), rank 1 51..100
STEPS, BATCH, SEQ, LR = 3, 4, 6, 0.5
SIZES = {"OLD": OLD, "NEW": NEW, "DIM": DIM, "STEPS": STEPS}


def save_checkpoint(path: Path, tied: bool) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(OLD, DIM, tied=tied))
    model.resize_token_embeddings(NEW)
    model.save_pretrained(path)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_step(model, single, pinned: dict[str, torch.Tensor]) -> dict:
    """This rank's pinned rows bitwise the checkpoint's; its rows of each merged weight, and every
    other Parameter gathered, against the one process."""
    from embconstraint._mechanism import pin_of

    exact, diff = True, 0.0
    with torch.no_grad():
        for name, ref in pinned.items():
            mod = model.get_submodule(name)
            shard = pin_of(mod, "weight").shard
            mine = mod.weight.detach().clone()
            want = single.get_submodule(name).weight.detach()[shard.lo : shard.hi]
            diff = max(diff, (mine - want).abs().max().item() if mine.numel() else 0.0)
            n = max(0, min(shard.hi, OLD) - shard.lo)  # the first OLD rows are pinned: this rank's first n
            exact &= torch.equal(mine[:n], ref[shard.lo : shard.lo + n])
        singles = dict(single.named_parameters())
        other = max(
            (full(p.detach()) - singles[n].detach()).abs().max().item()
            for n, p in model.named_parameters()
            if "parametrizations" not in n
        )
    return {"pinned_exact": bool(exact), "maxdiff": diff, "maxdiff_other": other}


def run(name: str, tied: bool, out: Path, rank: int, record: dict) -> None:
    from transformers import AutoModelForCausalLM

    from embconstraint import is_constrained, merged_state_dict
    from embconstraint.hf import constrain_new_tokens

    path = out / name
    if rank == 0:
        save_checkpoint(path, tied)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    single = AutoModelForCausalLM.from_pretrained(path)  # one process: the plain model
    modules = ["model.embed_tokens"] if tied else ["model.embed_tokens", "lm_head"]
    pinned = {m: single.get_submodule(m).weight.detach()[:OLD].clone() for m in modules}
    record[f"{name}_loaded"] = {
        m: (type(w).__name__, str(getattr(w, "placements", None)), "forward" in mod.__dict__)
        for m, mod, w in (
            ("embed_tokens", model.model.embed_tokens, model.model.embed_tokens.weight),
            ("lm_head", model.lm_head, model.lm_head.weight),
        )
    }
    trained = constrain_new_tokens(model, OLD)
    constrain_new_tokens(single, OLD)
    record[f"{name}_params"] = [(type(p).__name__, tuple(p.shape)) for p in trained]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    s_opt = torch.optim.SGD(single.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        x, _, y = global_batch(step, BATCH, SEQ, NEW, 1)
        for m, o in ((model, opt), (single, s_opt)):
            m(input_ids=x, labels=y).loss.backward()
            o.step()
            o.zero_grad()
        steps.append(check_step(model, single, pinned))
    record[f"{name}_steps"] = steps

    def eval_logits():  # no_grad: transformers' local inference path for lm_head
        x, _, _ = global_batch(STEPS, BATCH, SEQ, NEW, 1)
        with torch.no_grad():
            return (model(input_ids=x).logits - single(input_ids=x).logits).abs().max().item()

    def merged():
        sd = merged_state_dict(model)  # (a collective)
        plain = AutoModelForCausalLM.from_pretrained(path).state_dict()  # the unconstrained model's keys
        return {
            "keys": sorted(sd) == sorted(merged_state_dict(single)) == sorted(plain),
            "types": sorted({type(v).__name__ for v in sd.values()}),
            "maxdiff": max((sd[k] - merged_state_dict(single)[k]).abs().max().item() for k in sd),
            "pinned": all(torch.equal(sd[f"{m}.weight"][:OLD], ref) for m, ref in pinned.items()),
        }

    def saved():
        target = out / f"{name}_saved"
        model.save_pretrained(target)  # every rank: transformers gathers, rank 0 writes
        dist.barrier()
        from safetensors.torch import load_file

        files = load_file(str(target / "model.safetensors"))
        back = AutoModelForCausalLM.from_pretrained(target)  # a plain model
        sd = merged_state_dict(model)
        return {
            "file_keys": sorted(files)
            == sorted(sd),  # (tied: lm_head.weight too, as transformers' TP saves it)
            "constrained": is_constrained(back),
            "tied": back.lm_head.weight is back.model.embed_tokens.weight,
            "equal": all(torch.equal(back.state_dict()[k], sd[k]) for k in sd),
        }

    attempt(record, f"{name}_eval", eval_logits)
    attempt(record, f"{name}_merged", merged)
    attempt(record, f"{name}_saved", saved)


def refusal(out: Path, record: dict) -> None:
    """A forward transformers hooked but in a wrapper not of its style's shape: refused, nothing changed."""
    from transformers import AutoModelForCausalLM

    from embconstraint import is_constrained
    from embconstraint.hf import constrain_new_tokens

    model = AutoModelForCausalLM.from_pretrained(out / "untied", tp_plan="auto")
    model.model.embed_tokens.forward = lambda ids: None  # noqa: ARG005 (another wrapper, still _is_hooked)
    try:
        constrain_new_tokens(model, OLD)
        record["refused"] = "no error"
    except Exception as err:
        record["refused"] = f"{type(err).__name__}: {err} | unchanged={not is_constrained(model)}"


def main(out: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record: dict = {"rank": rank, "sizes": SIZES}
    try:
        run("untied", False, out, rank, record)
        run("tied", True, out, rank, record)
        refusal(out, record)
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
    save_record(record, out, rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
