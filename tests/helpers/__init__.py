"""What the tests share that is not a fixture: the small constrained embeddings, their sizes and
pinned-row layouts, and running Python in a subprocess.

Every test of the mechanism uses one table of ``V`` rows of ``D`` floats with ``N`` pinned rows, in
two layouts (:data:`LAYOUTS`): ``prefix`` (``indices=None``: rows ``0 .. N-1``) and ``scattered``
(:data:`SCATTERED`: neither a prefix nor sorted). The ``layout`` fixture (``conftest.py``) runs a
test once per layout with a :class:`Rows`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from embconstraint import constrain
from embconstraint._mechanism import pin_of

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent

V, D, N = 12, 5, 7
SCATTERED = [11, 0, 4, 7, 2, 9, 5]  # N distinct rows, neither a prefix nor sorted
LAYOUTS: dict[str, list[int] | None] = {"prefix": None, "scattered": SCATTERED}
# Ids that read pinned and free rows in both layouts (2 of each), row 0 (pinned) first and row
# V - 1 (free in the prefix layout, pinned in the scattered one) last.
IDS = torch.tensor([0, 3, 8, V - 1])

OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.01),
    "sparse_adam": lambda p: torch.optim.SparseAdam(list(p), lr=0.05),  # sparse embeddings only
}
DENSE_OPTIMIZERS = {k: v for k, v in OPTIMIZERS.items() if k != "sparse_adam"}


@dataclass(frozen=True)
class Rows:
    """A layout of the ``N`` pinned rows among the ``V``: what ``constrain`` is given
    (``indices``), the pinned rows in reference order and the free rows in table order.

    >>> Rows.of("scattered").free
    [1, 3, 6, 8, 10]
    """

    name: str
    indices: list[int] | None
    pinned: list[int]
    free: list[int]

    @classmethod
    def of(cls, name: str) -> Rows:
        indices = LAYOUTS[name]
        pinned = list(range(N)) if indices is None else list(indices)
        return cls(name, indices, pinned, [r for r in range(V) if r not in pinned])


def reference() -> torch.Tensor:
    """The ``(N, D)`` pinned rows (float32 values that float16 and bfloat16 cannot hold exactly)."""
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def constrained(indices: list[int] | None = None, cls: type = nn.Embedding, **kwargs) -> nn.Module:
    """``cls(V, D, **kwargs)`` (seeded) constrained to :func:`reference` at ``indices``."""
    torch.manual_seed(0)
    return constrain(cls(V, D, **kwargs), reference(), indices=indices)


def constrained_and_plain(
    cls: type = nn.Embedding, indices: list[int] | None = None, **kwargs
) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """:func:`constrained`, a plain twin holding the same merged weight, and the reference."""
    emb = constrained(indices, cls, **kwargs)
    plain = cls(V, D, **kwargs)
    with torch.no_grad():
        plain.weight.copy_(emb.weight)
    return emb, plain, reference()


class CatRows(nn.Module):
    """The independent reference: a literal ``torch.cat`` parametrization, ``weight = cat([pinned,
    free])`` put in user order (differentiable, (V, D) in forward and backward)."""

    def __init__(self, pinned: torch.Tensor, indices: list[int] | None) -> None:
        super().__init__()
        rows = list(range(pinned.shape[0])) if indices is None else list(indices)
        self.register_buffer("pinned", pinned.clone())
        order = torch.tensor(rows + [r for r in range(V) if r not in rows])
        self.register_buffer("inverse", torch.argsort(order))
        self.free_rows = order[len(rows) :]

    def forward(self, free: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pinned, free]).index_select(0, self.inverse)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_select(0, self.free_rows).clone()


def free_param(emb: nn.Module) -> torch.Tensor:
    """The trainable ``(V - n, D)`` tensor of a constrained embedding."""
    return pin_of(emb).free_parameter


def loss_of(emb: nn.Module) -> torch.Tensor:
    """A loss that reads every id of :data:`IDS` (one bag for an ``nn.EmbeddingBag``)."""
    return (emb(IDS) ** 2).sum() if isinstance(emb, nn.Embedding) else (emb(IDS.view(1, -1)) ** 2).sum()


class StorageRecorder(TorchDispatchMode):
    """Records the size (elements) of every new storage an aten op produces, as
    ``(op, elements)`` in :attr:`sizes` (views and aliases of its inputs do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {
            t.untyped_storage().data_ptr()
            for t in inputs
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.layout == torch.strided
                and t.untyped_storage().data_ptr() not in seen
            ):
                self.sizes.append((str(func), t.untyped_storage().nbytes() // t.element_size()))
        return out


def run_python(
    *args: str | os.PathLike, timeout: float = 240, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """``python *args`` in a subprocess, output captured as text. The subprocess imports this
    checkout's ``embconstraint`` and ``benchmarks`` and the tests' ``helpers`` (``PYTHONPATH``),
    whatever is installed; ``env`` adds to (or, with None values, removes from) the environment."""
    full = {**os.environ}
    full["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full, **kwargs
    )


def run_script(name: str, *args: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess:
    """``tests/scripts/<name>.py *args`` through :func:`run_python`."""
    return run_python(TESTS / "scripts" / f"{name}.py", *args, **kwargs)
