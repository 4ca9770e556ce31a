"""Shared test helpers and the markers (registered in setup.cfg):

- ``slow``: long-running (thousands of steps, the benchmark's quick run).
- ``subprocess``: starts a Python subprocess (CLI, demo, examples, killed runs).
- ``distributed``: starts a process group (DDP on CPU).
- ``gpu``: needs CUDA (skipped without it).

Run the quick part with ``python -m pytest -m "not slow and not subprocess"``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from embconstraint._mechanism import pin_of


def free_param(emb: nn.Module) -> torch.Tensor:
    """The trainable ``(V - n, D)`` tensor of a constrained embedding."""
    return pin_of(emb).free_parameter


def run_python(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """``python *args`` in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
