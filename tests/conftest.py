"""Shared fixtures and the markers (registered in setup.cfg):

- ``slow``: long-running (thousands of steps, the benchmarks' quick runs, the examples).
- ``subprocess``: starts a Python subprocess (CLI, demo, examples, killed runs).
- ``distributed``: starts a process group (2 CPU processes with gloo).
- ``gpu``: needs CUDA (skipped without it).

``python -m pytest`` leaves out ``slow`` (setup.cfg's ``addopts``); ``-m slow`` runs those,
``-m "slow or not slow"`` everything, ``-m "not subprocess"`` the in-process part.

Helpers that are not fixtures are in ``tests/helpers`` (``from helpers import ...``); the scripts
that tests run in subprocesses are in ``tests/scripts`` (not collected).
"""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, Rows

collect_ignore = ["scripts"]


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Rows:
    """Each pinned-row layout in turn: ``prefix`` (``indices=None``) and ``scattered``."""
    return Rows.of(request.param)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
