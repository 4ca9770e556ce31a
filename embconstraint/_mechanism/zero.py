"""DeepSpeed ZeRO-3 at constrain time: a module built under ``deepspeed.zero.Init`` (what
``transformers`` does in ``from_pretrained`` once a ZeRO-3 config is active, and in
``resize_token_embeddings``) holds only its partition of each Parameter. Constraining it needs
the whole weight once, on every rank (the pinned rows' values, the free rows' initial values):
:func:`gathered` gathers the module's own partitioned Parameters for that time, with DeepSpeed's
``GatheredParameters`` (a collective). The free rows Parameter that ``constrain`` creates is
plain; ``deepspeed.initialize`` partitions it like any Parameter it has not seen.

Nothing here imports DeepSpeed unless a partitioned Parameter is present (DeepSpeed made it).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from .sharded import zero_partitioned

__all__ = ["gathered", "gathered_params"]


@contextlib.contextmanager
def gathered(*modules: nn.Module | None) -> Iterator[bool]:
    """Gather the ZeRO-3 partitioned Parameters of ``modules`` (their own, not their children's)
    while the block runs (every rank must enter it); yields whether there were any. Partitions
    them again on exit (unchanged: nothing is broadcast)."""
    # (a generator, not a list: a list held by this frame would keep every Parameter referenced while
    # the block runs, and constrain's refcount test for "no one else holds it" would fail: ties.shared)
    owned = (p for m in modules if isinstance(m, nn.Module) for p in m._parameters.values() if p is not None)
    with gathered_params(owned) as any_:
        yield any_


@contextlib.contextmanager
def gathered_params(params: Iterable[Tensor]) -> Iterator[bool]:
    """Gather those of ``params`` that ZeRO-3 partitioned while the block runs (every rank must
    enter it, with the same Parameters); yields whether there were any. Partitions them again on
    exit (unchanged: nothing is broadcast)."""
    params = [p for p in params if zero_partitioned(p)]
    if not params:
        yield False
        return
    deepspeed = importlib.import_module("deepspeed")  # imported already: it partitioned them
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield True
