"""pytorch-lightning is an extra: the core works without it, the callback names the extra."""

from __future__ import annotations

import pytest
from helpers import run_python

_BLOCK = "import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None\n"


@pytest.mark.subprocess
def test_core_without_lightning_and_the_callback_names_the_extra():
    code = _BLOCK + (
        "import torch, embconstraint\n"
        "emb = embconstraint.constrain(torch.nn.Embedding(4, 2), torch.zeros(2, 2))\n"
        "assert embconstraint.is_constrained(emb)\n"
        "try:\n"
        "    embconstraint.EmbeddingConstraint\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    run = run_python("-c", code)
    assert run.returncode == 0, run.stderr
    assert "pip install 'embconstraint[lightning]'" in run.stdout
