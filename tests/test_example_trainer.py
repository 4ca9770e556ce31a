"""examples/new_tokens_trainer.py runs (LoRA + new rows with the Trainer, adapter + rows file on a fresh base).

Skipped until the core of issue 10 provides ``constrain_new_tokens``, ``save_rows`` and ``load_rows``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import embconstraint
import embconstraint.hf

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "new_tokens_trainer.py"
pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (hasattr(embconstraint.hf, "constrain_new_tokens") and hasattr(embconstraint, "save_rows")
                         and hasattr(embconstraint, "load_rows")),
                    reason="needs embconstraint.hf.constrain_new_tokens and embconstraint.save_rows/load_rows")
def test_new_tokens_trainer_example(tmp_path):
    pytest.importorskip("peft")
    result = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "new rows [(64, 64), (64, 64)]" in result.stdout
    assert "old rows of the embedding and of the head: bitwise unchanged" in result.stdout
    assert "logits bitwise equal to the trained model's" in result.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # The rows file holds the 2 x 64 new rows of D=64 floats (plus names, indices, fingerprints), not the tables.
    size = (tmp_path / "new_rows.safetensors").stat().st_size
    assert 2 * 64 * 64 * 4 <= size < 2 * 64 * 64 * 4 + 64 * 1024
