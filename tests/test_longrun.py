"""Long runs: many steps keep the pinned rows bitwise, and nothing accumulates across steps
(no autograd graph, tensor, storage, cache entry or hook outlives the step that made it)."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from helpers import free_param
from torch import nn
from torch.nn.utils import parametrize

from embconstraint import constrain, is_constrained, release
from embconstraint._mechanism import pin_of

V, D, N = 50, 8, 30  # bigger than the other tests' table: 64 batches of 32 ids train every free row


def _batches(count: int = 64) -> torch.Tensor:
    return torch.randint(0, V, (count, 4, 8), generator=torch.Generator().manual_seed(0))


class _NewTensors:
    """Counts the live tensors created since it was made (at the start of a test): tensors that
    earlier tests left to the garbage collector (or to a library's cache) may be freed while the
    test runs, which must not read as a change in the test's own."""

    def __init__(self) -> None:
        self._before = {id(t): weakref.ref(t) for t in self._live()}

    @staticmethod
    def _live() -> list[torch.Tensor]:
        gc.collect()
        return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)]

    def __call__(self) -> int:
        return sum(1 for t in self._live() if (old := self._before.get(id(t))) is None or old() is not t)


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return None


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one intra-op thread avoids thread hand-offs that dominate (and vary wildly on a
    busy machine) at this size. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_ten_thousand_adamw_steps_keep_pinned_rows_bitwise():
    torch.manual_seed(0)
    reference = torch.randn(N, D)
    emb = constrain(nn.Embedding(V, D), reference)
    storage = free_param(emb).untyped_storage().data_ptr()
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-2, weight_decay=0.1)
    start = emb.weight.detach().clone()
    xs = _batches()
    for step in range(10_000):
        loss = emb(xs[step % len(xs)]).sub(1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2500 == 0:
            assert torch.equal(emb.weight[:N], reference), step
    weight = emb.weight.detach()
    assert torch.equal(weight[:N], reference)
    assert torch.isfinite(weight).all()
    assert (weight[N:] - start[N:]).abs().min() > 0  # every free row trained (all are looked up)
    # the free rows are still the same storage as the merged weight: no re-allocation happened
    assert free_param(emb).untyped_storage().data_ptr() == storage
    assert "storage=aliased" in repr(emb)


@pytest.mark.parametrize(
    ("module_cls", "kwargs", "scattered"),
    [
        (nn.Embedding, {}, False),
        pytest.param(nn.EmbeddingBag, {"mode": "mean"}, True, marks=pytest.mark.slow),
        pytest.param(nn.Embedding, {"sparse": True}, True, marks=pytest.mark.slow),
    ],
    ids=["embedding-prefix", "bag-scattered", "sparse-scattered"],
)
def test_nothing_accumulates_across_steps(module_cls, kwargs, scattered):
    _live_tensors = _NewTensors()
    torch.manual_seed(0)
    indices = torch.randperm(V)[:N] if scattered else None
    reference = torch.randn(N, D)
    emb = constrain(module_cls(V, D, **kwargs), reference, indices=indices)
    pinned = list(range(N)) if indices is None else indices.tolist()
    pin = pin_of(emb)
    opt = (
        torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2)
        if kwargs.get("sparse")
        else torch.optim.AdamW(emb.parameters(), lr=1e-2, weight_decay=0.1)
    )
    merged_weights: list[weakref.ref] = []  # every merged weight the parametrization returns
    handle = pin.register_forward_hook(lambda m, args, out: merged_weights.append(weakref.ref(out)))
    graphs: list[weakref.ref] = []
    xs = _batches()

    def run(steps: int) -> None:
        for step in range(steps):
            out = emb(xs[step % len(xs)])
            graphs.append(weakref.ref(out.grad_fn))
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0:  # state_dict() and no-grad reads build merged tensors too
                emb.state_dict()
                with torch.no_grad():
                    emb(xs[0])

    run(200)  # warm up: optimizer state, per-device index cache, allocator
    tensors, rss = _live_tensors(), _rss_mib()
    run(1000)
    tensors_mid, rss_mid = _live_tensors(), _rss_mib()
    run(1000)
    tensors_end, rss_end = _live_tensors(), _rss_mib()
    handle.remove()

    assert tensors == tensors_mid == tensors_end, (tensors, tensors_mid, tensors_end)
    gc.collect()
    assert len(graphs) == 2200 and sum(ref() is not None for ref in graphs) == 0
    assert len(merged_weights) >= 2200 and sum(ref() is not None for ref in merged_weights) == 0
    assert len(pin.layout.cached_devices) == (1 if scattered else 0)
    assert len(opt.state) == 1
    if rss is not None:  # a coarse check; the counts above are the exact ones
        assert rss_end - rss_mid < 4.0, (rss, rss_mid, rss_end)
    assert torch.equal(emb.weight[pinned], reference)


@pytest.mark.slow
def test_constrain_release_cycles_leave_nothing_behind():
    _live_tensors = _NewTensors()
    torch.manual_seed(0)
    emb = nn.Embedding(V, D)
    hooks = (len(emb._state_dict_hooks), len(emb._load_state_dict_pre_hooks))
    attrs = sorted(vars(emb))
    reference = torch.randn(N, D)
    opt = None

    def cycle(i: int) -> None:
        nonlocal opt
        constrain(emb, reference, indices=None if i % 2 else torch.arange(N).flip(0))
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        emb(torch.arange(V)).sum().backward()
        opt.step()
        emb.state_dict()
        release(emb)

    for i in range(10):
        cycle(i)
    tensors = _live_tensors()
    for i in range(40):  # (exact counts: a leak of one tensor a cycle shows after one cycle)
        cycle(i)
    assert _live_tensors() == tensors
    assert type(emb) is nn.Embedding and not is_constrained(emb)
    assert not parametrize.is_parametrized(emb)
    assert (len(emb._state_dict_hooks), len(emb._load_state_dict_pre_hooks)) == hooks
    assert sorted(vars(emb)) == attrs
    assert type(emb.weight) is nn.Parameter and emb.weight.shape == (V, D)
    assert torch.equal(emb.weight[:N], reference)  # the last cycle (i = 39) pinned the prefix layout
