"""Faults in Lightning runs: SIGKILL and resume, exceptions, bad checkpoints, mismatched rows."""

from __future__ import annotations

import signal
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import run_script
from helpers.lightning import PACKAGES, VOCAB_OLD, PLTinyLM, fit, probe, reference
from torch import nn

from embconstraint import is_constrained
from embconstraint.lightning import EmbeddingConstraint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's num_workers/logging hints
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning's own use of torch pytree
]
pl = PACKAGES["pytorch_lightning"][0]
KEY = "constraint/max_abs_deviation"
needs_notes = pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")


def _checkpoint(tmp_path, constrained=True, steps=2, reference_seed=1) -> Path:
    """A checkpoint written by ModelCheckpoint after ``steps`` steps (with or without the constraint)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = PLTinyLM()
    cbs = [ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=steps)]
    if constrained:
        cbs.append(EmbeddingConstraint("embedding", reference(seed=reference_seed)))
    fit(model, cbs, tmp_path, enable_checkpointing=True, max_steps=steps)
    return tmp_path / "ckpt" / f"step={steps}.ckpt"


@pytest.mark.subprocess
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    every, kill_at, steps = 3, 5, 8  # 4 batches an epoch: checkpoint at step 3, killed at step 5 (epoch 2)
    run = run_script("lightning_kill", tmp_path / "killed", every, kill_at, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "killed").glob("*.ckpt")) == ["step=3.ckpt"]

    ref = reference()
    torch.manual_seed(0)
    uninterrupted = PLTinyLM(step_data=True)
    fit(uninterrupted, [EmbeddingConstraint("embedding", ref)], tmp_path, max_steps=steps)

    torch.manual_seed(7)
    resumed = PLTinyLM(step_data=True)
    seen = probe("pytorch_lightning", ref.weight.detach())
    fit(
        resumed,
        [EmbeddingConstraint("embedding", ref), seen],
        tmp_path,
        max_steps=steps,
        ckpt_path=tmp_path / "killed" / "step=3.ckpt",
    )
    assert len(seen.weights) == steps - every and all(c and e for _, c, e in seen.seen)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert torch.equal(resumed.embedding.weight[:VOCAB_OLD], ref.weight)


def test_exception_in_training_releases_the_module_with_its_weights(tmp_path):
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("boom at step 2")

    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM(tie=True)
    seen = probe("pytorch_lightning", ref.weight.detach())  # runs before Boom: records step 2
    constraint = EmbeddingConstraint("embedding", ref)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        fit(model, [constraint, seen, Boom()], tmp_path, max_steps=5)
    assert len(seen.weights) == 2
    assert not is_constrained(model.embedding) and type(model.embedding.weight) is nn.Parameter
    assert model.head.weight is model.embedding.weight
    assert torch.equal(model.embedding.weight, seen.weights[-1])  # nothing lost, nothing changed
    # and the same callback installs again on the next fit
    fit(model, [constraint, seen], tmp_path, max_steps=1)
    assert len(seen.weights) == 3 and all(c and e for _, c, e in seen.seen)
    assert not is_constrained(model.embedding)


def _flip_a_tensor_byte(path: Path, first: bool = False) -> None:
    """Flip one bit of the embedding weight's data in the checkpoint file, in its first (a pinned
    row) or last byte (a free row); the zip archive stays readable."""
    weight = torch.load(path, weights_only=False)["state_dict"]["embedding.weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if archive.read(i) == weight)
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start if first else start + len(weight) - 1] ^= 0x01
    path.write_bytes(bytes(data))


@needs_notes
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unreadable_checkpoint_gets_a_clear_note(tmp_path, damage):
    path = _checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM()
    free = model.embedding.weight.detach()[VOCAB_OLD:].clone()
    with pytest.raises((OSError, EOFError, RuntimeError)) as info:
        fit(model, [EmbeddingConstraint("embedding", ref)], tmp_path, ckpt_path=path)
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert f"cannot resume from checkpoint {str(path)!r}" in note
    assert ("truncated or corrupted" if damage == "truncated" else "the file is empty") in note
    # released; the module holds what the constraint installed and nothing from the file
    assert not is_constrained(model.embedding) and type(model.embedding.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[:VOCAB_OLD], ref.weight)
    assert torch.equal(model.embedding.weight[VOCAB_OLD:], free)


def test_corrupted_checkpoint_is_refused(tmp_path):
    """One flipped bit in a free row: torch.load does not check the zip CRCs; the callback does."""
    path = _checkpoint(tmp_path)
    _flip_a_tensor_byte(path)
    model = PLTinyLM()
    with pytest.raises(
        RuntimeError, match=r"cannot resume from checkpoint .*corrupted torch file \(the CRC-32 of its entry"
    ):
        fit(model, [EmbeddingConstraint("embedding", reference())], tmp_path, ckpt_path=path)
    assert not is_constrained(model.embedding)


@needs_notes
def test_corrupted_pinned_row_is_reported_as_corruption(tmp_path):
    """A flipped bit in a pinned row fails the pinned-row check first; the note names the cause."""
    path = _checkpoint(tmp_path)
    _flip_a_tensor_byte(path, first=True)
    with pytest.raises(RuntimeError, match="would change pinned rows") as info:
        fit(PLTinyLM(), [EmbeddingConstraint("embedding", reference())], tmp_path, ckpt_path=path)
    assert "CRC-32 of its entry" in "\n".join(info.value.__notes__)


def test_a_sound_checkpoint_passes_the_integrity_check(tmp_path):
    from embconstraint.files import checkpoint_problem

    path = _checkpoint(tmp_path)
    assert checkpoint_problem(path) is None
    _flip_a_tensor_byte(path)
    assert "CRC-32" in checkpoint_problem(path)


def test_checkpoint_with_other_pinned_rows_is_an_error_by_default(tmp_path):
    path = _checkpoint(tmp_path, constrained=False)  # trained without the constraint: old rows moved
    model = PLTinyLM()
    with pytest.raises(RuntimeError, match="would change pinned rows") as info:
        fit(model, [EmbeddingConstraint("embedding", reference())], tmp_path, ckpt_path=path)
    if sys.version_info >= (3, 11):
        assert "on_mismatch='checkpoint'" in "\n".join(info.value.__notes__)
    assert not is_constrained(model.embedding)


def test_on_mismatch_checkpoint_takes_the_pinned_rows_from_the_checkpoint(tmp_path):
    """A run constrained to one reference resumed with another: with on_mismatch="checkpoint" the
    checkpoint's rows are kept (and held exactly) instead of an error."""
    path = _checkpoint(tmp_path, reference_seed=1)
    rows = torch.load(path, weights_only=False)["state_dict"]["embedding.weight"][:VOCAB_OLD]
    other = reference(seed=2)
    assert not torch.equal(rows, other.weight)
    with pytest.raises(RuntimeError, match="would change pinned rows"):
        fit(PLTinyLM(), [EmbeddingConstraint("embedding", other)], tmp_path, ckpt_path=path)
    model = PLTinyLM()
    seen = probe("pytorch_lightning", rows)
    trainer = fit(
        model,
        [EmbeddingConstraint("embedding", other, on_mismatch="checkpoint"), seen],
        tmp_path,
        ckpt_path=path,
        max_steps=4,
    )
    assert len(seen.weights) == 2 and all(c and e for _, c, e in seen.seen)
    assert torch.equal(model.embedding.weight[:VOCAB_OLD], rows)
    assert trainer.callback_metrics[KEY].item() == 0.0  # measured against the rows it holds


def test_resuming_an_unconstrained_runs_optimizer_state_is_refused(tmp_path):
    path = _checkpoint(tmp_path, constrained=False)
    model = PLTinyLM()
    with pytest.raises(ValueError, match=r"optimizer state 'exp_avg' for the embedding has shape \(10, 4\)"):
        fit(
            model,
            [EmbeddingConstraint("embedding", reference(), on_mismatch="checkpoint")],
            tmp_path,
            ckpt_path=path,
        )
    assert not is_constrained(model.embedding)
