"""The transformers ``Trainer`` with FSDP2 on CUDA (accelerate enables FSDP for GPU backends only: on
CPU the Trainer runs DDP instead, so FSDP2 on CPU is tested through torch directly, in
tests/test_sharded.py). tests/scripts/trainer_fsdp2_gpu.py under ``torchrun``, on up to 2 GPUs; the
``--cpu`` run checks the script itself everywhere (no FSDP there)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_python

pytest.importorskip("transformers")

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]


def _run(tmp_path, nproc: int, *extra: str) -> dict:
    from helpers import TESTS

    run = run_python(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        TESTS / "scripts" / "trainer_fsdp2_gpu.py",
        tmp_path,
        *extra,
        timeout=420,
        env={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )
    path = tmp_path / "result.json"
    assert path.exists(), run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(path.read_text())
    assert "error" not in result, result["error"]
    return result


@pytest.mark.gpu
def test_trainer_fsdp2_on_cuda(tmp_path):
    result = _run(tmp_path, min(2, torch.cuda.device_count()))
    assert result["fsdp_engaged"] is True
    # FSDP2 shards the free rows only (the raw Parameters), the pinned rows stay exact every step
    assert [n for n, _ in result["sharded"]] == [
        "lm_head.parametrizations.weight.original",
        "model.embed_tokens.parametrizations.weight.original",
    ]
    assert all(shape[0] == 8 for _, shape in result["sharded"])  # NEW - OLD rows
    assert result["steps"] == [True] * 4 and result["trained"] is True and result["saved_plain"] is True


@pytest.mark.slow
def test_the_script_on_cpu_runs_ddp(tmp_path):
    result = _run(tmp_path, 1, "--cpu")
    assert result["fsdp_engaged"] is False  # what accelerate does on CPU
    assert result["steps"] == [True] * 4 and result["trained"] is True and result["saved_plain"] is True
