"""Training-step time and memory of every way to pin embedding rows, in one process and one run.

One training step, eight ways to train the new rows of an embedding while keeping the old ones.
Every method trains the same tiny model, ``embedding -> mean over the sequence -> linear``, with
AdamW on the same batches (token ids of shape ``(batch, seq)``), from the same initial weights:
rows ``0 .. n-1`` of the ``(V, D)`` embedding are the *pinned* rows (equal to a reference), rows
``n .. V-1`` are the *free* (new) rows. The methods (keys of :data:`METHODS`):

``unconstrained``
    a plain ``nn.Embedding(V, D)``: every row trains, pinned rows drift (the cost of doing nothing).
``callback``
    the original Lightning callback's method: train the whole table, then copy the reference back
    into the pinned rows after every optimizer step (``weight.data[idx] = ref``).
``grad_hook``
    ``weight.register_hook`` zeroes the pinned rows' gradient. AdamW's decoupled weight decay
    still shrinks them: they drift (the reported deviation is not 0).
``cat``
    the literal parametrization: ``torch.nn.utils.parametrize`` with forward
    ``torch.cat([reference_buffer, free])``.
``peft``
    PEFT's trainable tokens (``TrainableTokensConfig(token_indices=<the free rows>)`` injected
    into the embedding with ``peft.inject_adapter_in_model``).
``embconstraint``
    ``constrain(model.emb, reference)``.
``free_only``
    a table that holds only the ``V - n`` free rows, plus one padding row (``padding_idx``, no
    gradient) that every pinned id looks up: the lower limit. Ids are mapped into it when the
    batches are made, outside the timed step, so the same rows receive gradients as under the
    other methods. (This matters beyond the gradient itself: AdamW's state stays exactly 0 for
    rows that never had a gradient, and on this project's CPU ``torch.sqrt`` of 0.0 is about 5x
    slower than of a normal float, so a lower limit whose every row gets a gradient at every step
    would be unfairly fast.)
``full_table``
    the second lower limit, for methods that keep the pinned rows in the model: one ``(V, D)``
    table, never a parameter itself, from which every id is looked up (a plain gather, with
    the pinned rows' memory traffic), and a parameter that is a view of its free rows and gets
    the only gradient, built by a separate small path (``embedding_dense_backward`` into the
    free rows plus one sink row that pinned ids hit). The ids of that path are mapped when the
    batches are made, outside the timed step. No tensor subclass, no parametrization: the
    fixed cost a pinning mechanism adds above this is its own.

:func:`run_one` runs one method on one :class:`Config` in the current process and measures it
(step times, peak memory, optimizer state, pinned-row deviation); :func:`main` runs it in a fresh
worker process per method and configuration (forked from a forkserver that has already imported
torch, peft and embconstraint, so each run gets a clean peak-memory reading and no run pays for
another's allocations). Rounds interleave the methods (the order is rotated from round to round),
all methods train on the same batches from the same seeds.

Examples (from the repository root)::

    python -m benchmarks.step_time --issue          # the headline figures: V=10k,100k,1M, D=128, 90%
    python -m benchmarks.step_time --quick          # < 2 minutes on 2 cores
    python -m benchmarks.step_time                  # the default sweep (see --help)
    python -m benchmarks.step_time --sizes 1M --dims 128 --pinned 90 --methods embconstraint,free_only

Outputs in ``--out`` (default ``./bench-out``): ``results.md``, ``results.json``, ``step_time.png``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.harness import (
    STEADY_MALLOC,
    GiB,
    LoadMeter,
    MiB,
    PeakMemory,
    comma_list,
    machine_info,
    markdown_table,
    mem_available,
    parse_size,
    run_in_worker,
    sync,
    tensor_bytes,
    timed_ms,
    wait_idle,
    worker_context,
    write_json,
)

METHODS: dict[str, str] = {
    "unconstrained": "unconstrained nn.Embedding(V, D)",
    "callback": "copy reference after each step (original callback)",
    "grad_hook": "gradient hook zeroing pinned rows",
    "cat": "parametrize: torch.cat([reference, free])",
    "peft": "PEFT trainable tokens",
    "embconstraint": "embconstraint.constrain",
    "free_only": "free rows only, (V-n+1, D) with a padding row for pinned ids (lower limit)",
    "full_table": "full-table limit: frozen (V, D) lookup, gradient for the free rows only (lower limit)",
}

# The two lower limits: every method's step time is also reported as a ratio to each.
LIMITS: dict[str, str] = {"free_only": "free", "full_table": "full"}

ID_DISTRIBUTIONS = ("uniform", "new")

# Peak memory of each method's training step, in rows of D floats (V: all rows, n: pinned, f: free),
# calibrated on measured peaks (V=1M, D=128, CPU). AdamW (single-tensor) holds 2 states per
# trainable element and 2 temporaries of the parameter's size at once (sqrt, then the division).
_ROW_MODEL: dict[str, Callable[[int, int, int], int]] = {
    "unconstrained": lambda V, n, f: 6 * V,  # weight, grad, 2 states, 2 temporaries
    "callback": lambda V, n, f: 6 * V,
    "grad_hook": lambda V, n, f: 6 * V,  # the hook's masked copy lives before AdamW's temporaries
    "cat": lambda V, n, f: n + f + V + 4 * f,  # buffer, free; the (V, D) grad (kept alive by the
    # free rows' grad, a view of it), 2 states, 2 temporaries; the cat output is freed after forward
    "peft": lambda V, n, f: V + 2 * f + V + 3 * f,  # base, original + delta; merged weight's grad,
    # delta's grad, 2 states
    "embconstraint": lambda V, n, f: V + 5 * f,  # table; (f + 1, D) grad, 2 states, 2 temporaries
    "free_only": lambda V, n, f: 6 * (f + 1),
    "full_table": lambda V, n, f: V + 5 * f,  # table; (f + 1, D) grad, 2 states, 2 temporaries
}


@dataclass(frozen=True)
class Config:
    """One benchmark configuration (the same for every method).

    >>> c = Config(vocab=1000, dim=8, pinned=0.9)
    >>> c.num_pinned, c.num_free
    (900, 100)
    """

    vocab: int
    dim: int
    pinned: float
    batch: int = 256
    seq: int = 32
    classes: int = 16
    ids: str = "uniform"
    steps: int = 10
    warmup: int = 3
    max_seconds: float = 20.0
    min_seconds: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    num_batches: int = 4
    compile: bool = False  # torch.compile every method's model (compiled in the warm-up steps)

    def __post_init__(self) -> None:
        if not isinstance(self.vocab, int) or self.vocab < 2:
            raise ValueError(f"vocab must be an int >= 2, got {self.vocab!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not 0.0 < float(self.pinned) < 1.0:
            raise ValueError(f"pinned must be a fraction in (0, 1), got {self.pinned!r}")
        if self.ids not in ID_DISTRIBUTIONS:
            raise ValueError(f"ids must be one of {ID_DISTRIBUTIONS}, got {self.ids!r}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(
                f"steps must be >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}"
            )

    @property
    def num_pinned(self) -> int:
        """Number of pinned rows ``n`` (at least 1, at most ``V - 1``)."""
        return min(max(round(self.vocab * self.pinned), 1), self.vocab - 1)

    @property
    def num_free(self) -> int:
        """Number of free rows ``V - n``."""
        return self.vocab - self.num_pinned


def estimate_bytes(method: str, config: Config) -> int:
    """Rough peak memory of one run of ``method`` (bytes), reference and batches included.

    Used to skip configurations that would not fit, before anything is allocated.

    >>> gib = estimate_bytes("unconstrained", Config(vocab=1_000_000, dim=1024, pinned=0.9)) / 2**30
    >>> 20 < gib < 30
    True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return _method_bytes(method, config) + _shared_bytes(config)


def estimate_interleaved_bytes(methods: list[str], config: Config) -> int:
    """Rough peak memory of :func:`run_interleaved` (every model of ``methods`` at once).

    >>> c = Config(vocab=10_000, dim=64, pinned=0.9)
    >>> estimate_interleaved_bytes(["free_only"], c) == estimate_bytes("free_only", c)
    True
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {m!r}")
    return sum(_method_bytes(m, config) for m in methods) + _shared_bytes(config)


def _method_bytes(method: str, config: Config) -> int:
    rows = _ROW_MODEL[method](config.vocab, config.num_pinned, config.num_free)
    return rows * 4 * config.dim


def _shared_bytes(config: Config) -> int:
    """The reference rows, batches, activations and the process itself."""
    tokens = config.batch * config.seq
    activations = 4 * tokens * 4 * config.dim + config.num_batches * tokens * 8 * 2
    overhead = 64 * 2**20 if config.device.startswith("cuda") else 384 * 2**20  # allocator, libraries
    return config.num_pinned * 4 * config.dim + activations + overhead


class _Pooled(nn.Module):
    """``embedding -> mean over the sequence -> linear``."""

    def __init__(self, emb: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.emb = emb
        self.head = head

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.emb(ids).mean(1))


class _FullTableLookup(torch.autograd.Function):
    """A gather from the whole table; backward: the free rows' gradient only (``fids``: each id's
    free row, ``k`` = a sink row for pinned ids, sliced off)."""

    @staticmethod
    def forward(ctx, free: Tensor, table: Tensor, ids: Tensor, fids: Tensor) -> Tensor:
        ctx.save_for_backward(fids)
        ctx.num_free = free.shape[0]
        return torch.embedding(table, ids)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (fids,) = ctx.saved_tensors
        k = ctx.num_free
        return torch.ops.aten.embedding_dense_backward(grad, fids, k + 1, k, False)[:k], None, None, None


class _FullTable(nn.Module):
    """The full-table limit: a ``(V, D)`` table (a buffer) looked up directly; the parameter
    ``free`` is a view of its last ``V - n`` rows, so the optimizer updates the table in place.
    Takes ``torch.stack([ids, free_ids])`` (the free-row ids are mapped with the batches)."""

    def __init__(self, table: Tensor, num_pinned: int) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.free = nn.Parameter(table[num_pinned:])

    def forward(self, ids_and_free_ids: Tensor) -> Tensor:
        ids, fids = ids_and_free_ids
        return _FullTableLookup.apply(self.free, self.table, ids, fids)


class _CatReference(nn.Module):
    """The literal parametrization: ``weight = torch.cat([reference, free])``."""

    def __init__(self, reference: Tensor) -> None:
        super().__init__()
        self.register_buffer("reference", reference)

    def forward(self, free: Tensor) -> Tensor:
        return torch.cat([self.reference, free])

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight[self.reference.shape[0] :].clone()


@dataclass
class _Setup:
    model: nn.Module
    post_step: Callable[[], None] | None = None
    pinned_rows: Callable[[], Tensor] | None = None  # current pinned rows, for the deviation
    map_ids: Callable[[Tensor], Tensor] | None = None  # applied when the batches are made


def _build(method: str, config: Config, reference: Tensor, free_init: Tensor, head: nn.Linear) -> _Setup:
    """The model of ``method``, initialised to ``[reference; free_init]`` (consumes ``free_init``)."""
    n, V = config.num_pinned, config.vocab

    def full_weight() -> Tensor:
        return torch.cat([reference, free_init])

    if method in ("unconstrained", "callback", "grad_hook"):
        emb = nn.Embedding(V, config.dim, _weight=full_weight())
        setup = _Setup(_Pooled(emb, head), pinned_rows=lambda: emb.weight[:n])
        if method == "callback":
            idx = torch.arange(n, device=reference.device)

            def copy_back() -> None:
                emb.weight.data[idx] = reference

            setup.post_step = copy_back
        elif method == "grad_hook":
            idx = torch.arange(n, device=reference.device)
            emb.weight.register_hook(lambda g: g.index_fill(0, idx, 0.0))
        return setup
    if method == "cat":
        from torch.nn.utils import parametrize

        emb = nn.Embedding(V, config.dim, _weight=full_weight())
        parametrize.register_parametrization(emb, "weight", _CatReference(reference.clone()))
        return _Setup(_Pooled(emb, head), pinned_rows=lambda: emb.weight[:n])
    if method == "peft":
        from peft import TrainableTokensConfig, inject_adapter_in_model

        model = _Pooled(nn.Embedding(V, config.dim, _weight=full_weight()), head)
        peft_config = TrainableTokensConfig(target_modules=["emb"], token_indices=list(range(n, V)))
        model = inject_adapter_in_model(peft_config, model)
        model.head.requires_grad_(True)  # inject_adapter_in_model froze every non-adapter parameter
        layer = model.emb

        def pinned_rows() -> Tensor:
            # The merged weight is base_layer.weight with the token_indices rows replaced
            # (get_merged_weights: index_copy); no token index is a pinned row, so its pinned rows
            # are the base weight's (read without building a (V, D) merged copy).
            assert min(layer.token_indices[layer.active_adapters[0]]) >= n
            return layer.base_layer.weight[:n]

        return _Setup(model, pinned_rows=pinned_rows)
    if method == "embconstraint":
        from embconstraint import constrain

        emb = nn.Embedding(V, config.dim, _weight=full_weight())
        constrain(emb, reference)
        return _Setup(_Pooled(emb, head), pinned_rows=lambda: emb.weight[:n])
    if method == "free_only":
        # The V - n free rows and one padding row that every pinned id looks up (no gradient), so
        # that exactly the rows that train under the other methods receive gradients here.
        pad = torch.zeros(1, config.dim, dtype=free_init.dtype, device=free_init.device)
        emb = nn.Embedding(V - n + 1, config.dim, padding_idx=V - n, _weight=torch.cat([free_init, pad]))
        return _Setup(_Pooled(emb, head), map_ids=lambda ids: torch.where(ids >= n, ids - n, V - n))
    if method == "full_table":
        emb = _FullTable(full_weight(), n)
        f = V - n
        return _Setup(
            _Pooled(emb, head),
            pinned_rows=lambda: emb.table[:n],
            map_ids=lambda ids: torch.stack([ids, torch.where(ids >= n, ids - n, f)]),
        )
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


def make_batches(config: Config) -> list[tuple[Tensor, Tensor]]:
    """The ``(ids, targets)`` batches every method trains on (CPU, seeded by ``config.seed``).

    ``ids="uniform"`` draws ids uniformly over the ``V`` rows; ``ids="new"`` draws each id from the
    free (new) rows with probability 1/2 and uniformly over all rows otherwise.

    >>> (ids, y), *_ = make_batches(Config(vocab=100, dim=4, pinned=0.5, batch=3, seq=5))
    >>> tuple(ids.shape), tuple(y.shape), bool((ids >= 0).all() and (ids < 100).all())
    ((3, 5), (3,), True)
    """
    g = torch.Generator().manual_seed(config.seed)
    shape = (config.batch, config.seq)
    out = []
    for _ in range(config.num_batches):
        ids = torch.randint(0, config.vocab, shape, generator=g)
        if config.ids == "new":
            new = torch.randint(config.num_pinned, config.vocab, shape, generator=g)
            ids = torch.where(torch.rand(shape, generator=g) < 0.5, new, ids)
        out.append((ids, torch.randint(0, config.classes, (config.batch,), generator=g)))
    return out


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What :func:`run_one` measured (times in milliseconds, memory in bytes)."""

    method: str
    config: dict
    step_ms: list[float] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)
    median_ms: float = math.nan
    peak_bytes: int = 0  # peak during the steps, above the process before the model was built
    train_bytes: int = 0  # peak during the steps, above the process after the model was built
    model_bytes: int = 0  # the built model at rest (parameters, buffers, copies of the reference)
    build_peak_bytes: int = 0  # peak while building (e.g. constrain's transients), above the same baseline
    optimizer_state_bytes: int = 0
    trainable_params: int = 0
    max_pinned_deviation: float | None = None  # max |pinned rows - reference|; None: no pinned rows
    pinned_exact: bool | None = None
    final_loss: float = math.nan
    threads: int = 0
    memory_method: str = ""
    estimate_bytes: int = 0
    build_s: float = 0.0
    background_cpu: float | None = None  # share of all cores used by other processes while timing
    pid: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class _Trainer:
    """One method's model, optimizer and batches, ready to step."""

    def __init__(
        self,
        method: str,
        config: Config,
        reference: Tensor,
        free_init: Tensor,
        batches: list[tuple[Tensor, Tensor]],
    ) -> None:
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed + 2)
        head = nn.Linear(config.dim, config.classes).to(self.device)
        self.setup = _build(method, config, reference, free_init, head)
        self.model = self.setup.model
        if self.setup.map_ids is not None:
            batches = [(self.setup.map_ids(ids), y) for ids, y in batches]
        self.batches = batches
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.loss = torch.zeros(())
        self.forward = torch.compile(self.model) if config.compile else self.model

    def _step(self, ids: Tensor, y: Tensor) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(ids), y)
        loss.backward()
        self.opt.step()
        if self.setup.post_step is not None:
            self.setup.post_step()
        return loss

    def step(self, i: int) -> float:
        """One training step on batch ``i``; its wall time in milliseconds."""
        loss, ms = timed_ms(lambda: self._step(*self.batches[i % len(self.batches)]), self.device)
        self.loss = loss.detach()
        return ms


def _inputs(config: Config) -> tuple[Tensor, Callable[[], Tensor], list[tuple[Tensor, Tensor]]]:
    """The reference rows, a maker of the initial free rows, and the batches (seeded)."""
    device = torch.device(config.device)
    g = torch.Generator().manual_seed(config.seed + 1)
    reference = torch.randn(config.num_pinned, config.dim, generator=g).to(device)
    state = g.get_state()

    def free_init() -> Tensor:
        g.set_state(state)
        return torch.randn(config.num_free, config.dim, generator=g).to(device)

    batches = [(ids.to(device), y.to(device)) for ids, y in make_batches(config)]
    return reference, free_init, batches


def _prewarm(method: str, config: Config) -> None:
    """One step of ``method`` on a tiny model: loads the code pages, lazy imports and kernels
    that any first step touches, so that the memory reading counts tensors, not libraries."""
    tiny = replace(
        config,
        vocab=min(config.vocab, 256),
        dim=min(config.dim, 16),
        batch=8,
        seq=4,
        num_batches=1,
        compile=False,
    )
    reference, free_init, batches = _inputs(tiny)
    trainer = _Trainer(method, tiny, reference, free_init(), batches)
    trainer.step(0)
    if trainer.setup.pinned_rows is not None:
        with torch.no_grad():
            torch.equal(trainer.setup.pinned_rows(), reference)
    del trainer
    gc.collect()


def run_one(method: str, config: Config) -> RunResult:
    """Build ``method`` for ``config``, train it for ``warmup + steps`` AdamW steps, measure.

    Runs in the current process; peak memory is only clean in a fresh process (what
    :func:`main` does). Step times are wall-clock times of the measured steps (after the
    warm-up), at least ``config.steps`` of them and on until ``config.min_seconds`` have been
    spent; measuring stops early once ``config.max_seconds`` have been spent (with at least 3
    measured steps).

    >>> r = run_one("embconstraint", Config(vocab=200, dim=4, pinned=0.5, batch=8, seq=4, steps=2, warmup=1))
    >>> len(r.step_ms), r.max_pinned_deviation, r.pinned_exact
    (2, 0.0, True)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    device = torch.device(config.device)
    result = RunResult(
        method=method,
        config=asdict(config),
        threads=torch.get_num_threads(),
        pid=os.getpid(),
        estimate_bytes=estimate_bytes(method, config),
    )
    _prewarm(method, config)

    # Inputs shared by every method: reference rows, initial free rows, batches.
    reference, free_init, batches = _inputs(config)
    mem = PeakMemory(device)
    result.memory_method = mem.method
    gc.collect()
    base = mem.current()

    t0 = time.perf_counter()
    trainer = _Trainer(method, config, reference, free_init(), batches)
    result.trainable_params = sum(p.numel() for p in trainer.params)
    gc.collect()
    sync(device)
    result.build_s = time.perf_counter() - t0
    built = mem.current()
    result.model_bytes = built - base
    result.build_peak_bytes = mem.peak() - base
    mem.reset_peak()

    result.warmup_ms = [trainer.step(i) for i in range(config.warmup)]
    load = LoadMeter()
    spent, i = 0.0, config.warmup
    while len(result.step_ms) < config.steps or spent < config.min_seconds:
        result.step_ms.append(trainer.step(i))
        spent += result.step_ms[-1] / 1e3
        i += 1
        if spent > config.max_seconds and len(result.step_ms) >= min(3, config.steps):
            break
    result.background_cpu = load.background()
    peak = mem.peak()
    result.peak_bytes = peak - base
    result.train_bytes = peak - built
    result.median_ms = statistics.median(result.step_ms)
    result.final_loss = float(trainer.loss)
    result.optimizer_state_bytes = sum(tensor_bytes(s) for s in trainer.opt.state.values())
    pinned_rows = trainer.setup.pinned_rows
    if pinned_rows is not None:
        with torch.no_grad():
            rows = pinned_rows()
            result.pinned_exact = bool(torch.equal(rows, reference))
            result.max_pinned_deviation = _max_abs_diff(rows, reference)
    return result


def _max_abs_diff(a: Tensor, b: Tensor, chunk_bytes: int = 2**26) -> float:
    """``max |a - b|`` in float64, a block of rows at a time (a whole (n, D) float64 copy of a
    large reference would need more memory than the training step itself)."""
    step = max(1, chunk_bytes // (8 * max(a.shape[1], 1)))
    return max(
        (
            float((a[i : i + step].double() - b[i : i + step].double()).abs().max())
            for i in range(0, a.shape[0], step)
        ),
        default=0.0,
    )


def run_interleaved(methods: list[str], config: Config) -> dict[str, Any]:
    """Time ``methods`` in one process, step by step in turn (the order rotates every step), so
    that every method sees the same background load. Memory is not measured here.

    Returns ``{"step_ms": {method: [ms, ...]}, "background_cpu": share or None}``.

    >>> out = run_interleaved(["embconstraint", "free_only"],
    ...                       Config(vocab=200, dim=4, pinned=0.5, batch=8, seq=4, steps=3, warmup=1))
    >>> {m: len(t) for m, t in out["step_ms"].items()}
    {'embconstraint': 3, 'free_only': 3}
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {m!r}")
    reference, free_init, batches = _inputs(config)
    trainers = {m: _Trainer(m, config, reference, free_init(), batches) for m in methods}
    for i in range(config.warmup):
        for t in trainers.values():
            t.step(i)
    times: dict[str, list[float]] = {m: [] for m in methods}
    load = LoadMeter()
    spent, i = 0.0, config.warmup
    while i - config.warmup < config.steps or spent < config.min_seconds * len(methods):
        k = i % len(methods)
        for m in methods[k:] + methods[:k]:
            times[m].append(trainers[m].step(i))
            spent += times[m][-1] / 1e3
        i += 1
        if spent > config.max_seconds * len(methods) and i - config.warmup >= min(3, config.steps):
            break
    return {"step_ms": times, "background_cpu": load.background()}


def _worker(method: str | list[str], config: dict) -> dict[str, Any]:
    """A worker process's job: run one method (or, given a list, time them interleaved)."""
    if isinstance(method, list):
        return run_interleaved(method, Config(**config))
    return run_one(method, Config(**config)).to_dict()


# -- the sweep ---------------------------------------------------------------------------------------

# When not every method of a configuration fits in memory at once, these are interleaved first.
INTERLEAVE_PRIORITY = (
    "free_only",
    "full_table",
    "embconstraint",
    "cat",
    "peft",
    "unconstrained",
    "callback",
    "grad_hook",
)

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
LARGE_SIZES = (10_000_000,)
DEFAULT_DIMS = (64, 128, 1024)
DEFAULT_PINNED = (0.5, 0.9, 0.99)
DEFAULT_MEM_LIMIT_GIB = 12.0
ISSUE = {"sizes": (10_000, 100_000, 1_000_000), "dims": (128,), "pinned": (0.9,)}
QUICK = {
    "sizes": (10_000, 100_000),
    "dims": (64, 128),
    "pinned": (0.9,),
    "steps": 5,
    "warmup": 1,
    "rounds": 1,
    "max_seconds": 3.0,
    "min_seconds": 0.0,
}


# -- arguments ---------------------------------------------------------------------------------------
def parse_fraction(text: str) -> float:
    """A pinned fraction: ``"90"``, ``"90%"`` and ``"0.9"`` all mean 0.9.

    >>> [parse_fraction(s) for s in ("90", "99%", "0.5")]
    [0.9, 0.99, 0.5]
    """
    t = text.strip().rstrip("%")
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"expected a pinned fraction such as 90, 90% or 0.9, got {text!r}") from None
    if value >= 1 or text.strip().endswith("%"):
        value /= 100
    if not 0 < value < 1:
        raise ValueError(f"a pinned fraction must lie strictly between 0% and 100%, got {text!r}")
    return round(value, 6)


def _method(text: str) -> str:
    if text.strip() not in METHODS:
        raise ValueError(f"unknown method {text!r}; expected one of {', '.join(METHODS)}")
    return text.strip()


def _ids(text: str) -> str:
    if text.strip() not in ID_DISTRIBUTIONS:
        raise ValueError(f"unknown id distribution {text!r}; expected one of {', '.join(ID_DISTRIBUTIONS)}")
    return text.strip()


def _dim(text: str) -> int:
    value = parse_size(text) if text.strip() else 0
    if value < 1:
        raise ValueError(f"expected a positive dimension, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (``python -m benchmarks.step_time --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.step_time",
        description=(
            "Time one training step (embedding -> mean -> linear, AdamW, batch 256x32) for every way of "
            "pinning embedding rows. Default sweep: V in {10k,100k,1M} x D in {64,128,1024} x pinned in "
            "{50,90,99}%%, every method; runs needing more than --mem-limit GiB are skipped (reported)."
        ),
    )
    p.add_argument("--sizes", type=comma_list(parse_size), help="vocabulary sizes V, e.g. 10k,100k,1M")
    p.add_argument("--dims", type=comma_list(_dim), help="embedding dimensions D, e.g. 64,128,1024")
    p.add_argument(
        "--pinned", type=comma_list(parse_fraction), help="pinned fractions, e.g. 50,90,99 (or 0.9)"
    )
    p.add_argument("--methods", type=comma_list(_method), help=f"subset of: {','.join(METHODS)}")
    p.add_argument(
        "--ids",
        type=comma_list(_ids),
        default=["uniform"],
        help="token-id distributions: uniform (default) and/or new (half the ids are new rows)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="V=10k,100k; D=64,128; 90%%; 1 warm-up + 5 steps, 1 round (about a minute on 2 idle cores)",
    )
    p.add_argument(
        "--issue", action="store_true", help="the headline figures: V=10k,100k,1M; D=128; 90%% pinned"
    )
    p.add_argument("--large", action="store_true", help="add V=10M to the default sizes")
    p.add_argument("--steps", type=int, help="measured steps per run (default 10)")
    p.add_argument("--warmup", type=int, help="warm-up steps per run, not measured (default 3)")
    p.add_argument(
        "--rounds", type=int, help="rounds; each runs every method once, rotated order (default 2)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        help="stop measuring a run after this many seconds of steps (at least 3 steps; default 20)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        help="go on measuring a run past --steps until this many seconds of steps (default 2; "
        "0 with --quick): small tables get hundreds of steps",
    )
    p.add_argument(
        "--malloc",
        choices=("steady", "default"),
        default="steady",
        help="steady (default): the workers keep freed memory (glibc MALLOC_MMAP_THRESHOLD_ and "
        "MALLOC_TRIM_THRESHOLD_ at 1 GiB) instead of page-faulting temporaries in at random "
        "steps; default: glibc's own settings",
    )
    p.add_argument("--batch", type=int, default=256, help="sequences per batch (default 256)")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every method's model (default backend; compiled in the warm-up steps)",
    )
    p.add_argument(
        "--mem-limit",
        type=float,
        default=None,
        help=f"skip runs estimated above this many GiB (default {DEFAULT_MEM_LIMIT_GIB:g} on CPU, "
        "90%% of the GPU on CUDA; never above 90%% of the memory available at start)",
    )
    p.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="time from the isolated runs only (default: also time all methods of a configuration "
        "step by step in turn in one process, where they fit together, and report that)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to SECONDS for other processes to use < 25%% of the CPU",
    )
    p.add_argument(
        "--busy-threshold",
        type=float,
        default=0.15,
        metavar="FRACTION",
        help="a run during which other processes used more than this share of the CPU is run "
        "again (default 0.15)",
    )
    p.add_argument(
        "--busy-retries",
        type=int,
        default=None,
        help="how many times to run a busy run again (default 2, 0 with --quick; 0 disables)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a worker is killed")
    p.add_argument("--out", default="bench-out", help="output directory (default ./bench-out)")
    return p


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from parsed arguments: presets first, then explicit options win."""
    s: dict[str, Any] = {
        "sizes": list(DEFAULT_SIZES),
        "dims": list(DEFAULT_DIMS),
        "pinned": list(DEFAULT_PINNED),
        "steps": 10,
        "warmup": 3,
        "rounds": 2,
        "max_seconds": 20.0,
        "min_seconds": 2.0,
    }
    if args.issue:
        s.update({k: list(v) for k, v in ISSUE.items()}, rounds=3)
    if args.quick:
        s.update({k: list(v) if isinstance(v, tuple) else v for k, v in QUICK.items()})
    if args.large:
        s["sizes"] = sorted(set(s["sizes"]) | set(LARGE_SIZES))
    for key in ("sizes", "dims", "pinned", "steps", "warmup", "rounds", "max_seconds", "min_seconds"):
        value = getattr(args, key)
        if value is not None:
            s[key] = value
    s["methods"] = args.methods or list(METHODS)
    s["ids"] = args.ids
    s["interleave"] = args.interleave
    s["wait_idle"] = args.wait_idle
    s["busy_threshold"] = args.busy_threshold
    s["busy_retries"] = args.busy_retries if args.busy_retries is not None else (0 if args.quick else 2)
    if not 0 <= args.busy_threshold <= 1 or s["busy_retries"] < 0:
        raise SystemExit("--busy-threshold must be in [0, 1] and --busy-retries >= 0")
    for key in ("sizes", "dims", "pinned", "methods", "ids"):
        if not s[key]:
            raise SystemExit(f"--{key} must not be empty")
    if s["steps"] < 1 or s["warmup"] < 0 or s["rounds"] < 1:
        raise SystemExit("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.batch < 1 or args.seq < 1:
        raise SystemExit("--batch and --seq must be >= 1")
    return s


def _context(methods: list[str]) -> Any:
    """The workers' forkserver, with what they need imported once (imports cost seconds each)."""
    preload = ["torch"]
    if "embconstraint" in methods:
        preload.append("embconstraint")
    if "peft" in methods:
        preload.append("peft")
    return worker_context(preload)


def _run_worker(ctx: Any, method: str | list[str], config: Config, timeout: float) -> dict[str, Any]:
    kind, payload = run_in_worker(ctx, "benchmarks.step_time:_worker", (method, asdict(config)), timeout)
    if kind != "ok":
        return {"status": "failed", "reason": payload}
    return {"status": "ok", **payload}


def _config_key(c: Config) -> tuple:
    return (c.vocab, c.dim, c.pinned, c.ids)


def _run_quiet(
    ctx: Any, method: str | list[str], config: Config, timeout: float, settings: dict[str, Any], log
) -> dict[str, Any]:
    """One worker run; run again (up to ``settings["busy_retries"]`` times, after waiting for an
    idle CPU) while other processes used more than ``settings["busy_threshold"]`` of the CPU
    during its timed steps. Returns the attempt with the least background load."""
    attempts = []
    for attempt in range(1 + settings["busy_retries"]):
        if settings["wait_idle"] or attempt:
            wait_idle(max(settings["wait_idle"], 30.0 if attempt else 0.0), log)
        out = _run_worker(ctx, method, config, timeout)
        if out["status"] != "ok":
            return out
        attempts.append(out)
        bg = out["background_cpu"]
        if bg is None or bg <= settings["busy_threshold"]:
            break
        log(
            f"  (background load {bg:.0%} while timing {_describe(config)} "
            f"{method if isinstance(method, str) else 'interleaved'}; "
            f"{'running it again' if attempt < settings['busy_retries'] else 'keeping the quietest attempt'})"
        )
    best = min(attempts, key=lambda o: o["background_cpu"] if o["background_cpu"] is not None else 0.0)
    best["attempts"] = len(attempts)
    return best


def run_sweep(
    settings: dict[str, Any], base: Config, mem_limit: int, timeout: float, log=print
) -> list[dict[str, Any]]:
    """Run every (configuration, method): ``settings["rounds"]`` isolated rounds (fresh process
    each, rotated order: memory, deviation, isolated step times), then, where all the methods of
    a configuration fit in memory together and ``settings["interleave"]`` is set, one process
    that times them step by step in turn (where not all fit, the first of
    :data:`INTERLEAVE_PRIORITY` that do). One record per (configuration, method)."""
    configs = [
        replace(base, vocab=v, dim=d, pinned=p, ids=ids)
        for ids in settings["ids"]
        for p in settings["pinned"]
        for d in settings["dims"]
        for v in settings["sizes"]
    ]
    methods = settings["methods"]
    records = _sweep_records(configs, methods, mem_limit)
    ctx = _context(methods)
    pending = sum(r["status"] == "pending" for r in records.values())
    total = pending * settings["rounds"] + (len(configs) if settings["interleave"] else 0)
    sweep = _Sweep(ctx, records, settings, mem_limit, timeout, _Progress(total, log))
    for ci, c in enumerate(configs):
        runnable = [m for m in methods if records[(*_config_key(c), m)]["status"] == "pending"]
        sweep.isolated(c, ci, runnable)
        if settings["interleave"]:
            sweep.interleaved(c, runnable)
    return [_aggregate(rec) for rec in records.values()]


def _sweep_records(configs: list[Config], methods: list[str], mem_limit: int) -> dict[tuple, dict[str, Any]]:
    """One record per (configuration, method), keyed by :func:`_config_key` and the method: ``"pending"``,
    or ``"skipped"`` when its estimated memory is above ``mem_limit``."""
    records: dict[tuple, dict[str, Any]] = {}
    for c in configs:
        for m in methods:
            est = estimate_bytes(m, c)
            rec = {
                "method": m,
                "label": METHODS[m],
                "vocab": c.vocab,
                "dim": c.dim,
                "pinned": c.pinned,
                "ids": c.ids,
                "num_pinned": c.num_pinned,
                "estimate_bytes": est,
                "rounds": [],
            }
            if est > mem_limit:
                rec.update(
                    status="skipped", reason=f"needs ~{est / GiB:.1f} GiB (limit {mem_limit / GiB:.1f} GiB)"
                )
            else:
                rec["status"] = "pending"
            records[(*_config_key(c), m)] = rec
    return records


class _Progress:
    """The sweep's progress lines: ``[done/total] text  (seconds since the sweep started)``."""

    def __init__(self, total: int, log) -> None:
        self.done, self.total, self.log = 0, total, log
        self.started = time.perf_counter()

    def __call__(self, text: str) -> None:
        self.log(f"[{self.done}/{self.total}] {text}  ({time.perf_counter() - self.started:.0f} s)")


@dataclass
class _Sweep:
    """What the runs of one sweep share: the workers' context, the records (:func:`_sweep_records`),
    the settings, the limits and the progress lines."""

    ctx: Any
    records: dict[tuple, dict[str, Any]]
    settings: dict[str, Any]
    mem_limit: int
    timeout: float
    progress: _Progress

    def isolated(self, c: Config, ci: int, runnable: list[str]) -> None:
        """The isolated rounds of configuration ``c`` (number ``ci``): each runnable method in a process of
        its own, the order rotated by round; a method that failed is not run again."""
        for r in range(self.settings["rounds"]):
            k = (r + ci) % max(len(runnable), 1)
            for m in runnable[k:] + runnable[:k]:
                rec = self.records[(*_config_key(c), m)]
                if rec.get("failed"):
                    continue
                out = _run_quiet(self.ctx, m, c, self.timeout, self.settings, self.progress.log)
                self.progress.done += 1
                if out["status"] != "ok":
                    rec["failed"] = out["reason"]
                    self.progress(f"{_describe(c)} {m}: FAILED {out['reason']}")
                    continue
                rec["rounds"].append(out)
                self.progress(
                    f"{_describe(c)} {m:<14} round {r + 1}: {out['median_ms']:9.2f} ms  "
                    f"peak {out['peak_bytes'] / MiB:9.1f} MiB  bg {_pct(out['background_cpu'])}"
                )

    def interleaved(self, c: Config, runnable: list[str]) -> None:
        """Configuration ``c``'s methods that ran, timed step by step in turn in one process (those that fit
        in memory together, most interesting first), into their records' ``"interleaved"``."""
        ok = [m for m in runnable if self.records[(*_config_key(c), m)]["rounds"]]
        chosen: list[str] = []  # the methods that fit in memory together, most interesting first
        for m in sorted(ok, key=INTERLEAVE_PRIORITY.index):
            if estimate_interleaved_bytes([*chosen, m], c) <= self.mem_limit:
                chosen.append(m)
        ok = [m for m in ok if m in chosen]
        self.progress.done += 1
        if len(ok) < 2:
            self.progress(
                f"{_describe(c)} interleaved: not run (fewer than 2 methods fit in memory together); "
                "isolated timings are reported"
            )
            return
        ic = replace(
            c, steps=c.steps * self.settings["rounds"], max_seconds=c.max_seconds * self.settings["rounds"]
        )
        out = _run_quiet(self.ctx, ok, ic, self.timeout, self.settings, self.progress.log)
        if out["status"] != "ok":
            self.progress(
                f"{_describe(c)} interleaved: FAILED {out['reason']}; isolated timings are reported"
            )
            return
        for m in ok:
            self.records[(*_config_key(c), m)]["interleaved"] = {
                "step_ms": out["step_ms"][m],
                "background_cpu": out["background_cpu"],
            }
        self.progress(
            f"{_describe(c)} interleaved: "
            + ", ".join(f"{m} {statistics.median(out['step_ms'][m]):.2f}" for m in ok)
            + f" ms  bg {_pct(out['background_cpu'])}"
        )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _aggregate(rec: dict[str, Any]) -> dict[str, Any]:
    rounds = rec.pop("rounds")
    failed = rec.pop("failed", None)
    inter = rec.pop("interleaved", None)
    if rec["status"] == "skipped":
        return rec
    if failed and not rounds:
        rec.update(status="failed", reason=failed)
        return rec
    steps = [t for r in rounds for t in r["step_ms"]]
    devs = [r["max_pinned_deviation"] for r in rounds]
    bgs = [r["background_cpu"] for r in rounds if r["background_cpu"] is not None]
    rec.update(
        status="ok",
        isolated_median_ms=statistics.median(steps),
        isolated_step_ms=steps,
        round_median_ms=[r["median_ms"] for r in rounds],
        isolated_background_cpu=statistics.mean(bgs) if bgs else None,
        peak_bytes=max(r["peak_bytes"] for r in rounds),
        train_bytes=max(r["train_bytes"] for r in rounds),
        model_bytes=max(r["model_bytes"] for r in rounds),
        build_peak_bytes=max(r["build_peak_bytes"] for r in rounds),
        optimizer_state_bytes=rounds[0]["optimizer_state_bytes"],
        trainable_params=rounds[0]["trainable_params"],
        max_pinned_deviation=None if devs[0] is None else max(devs),
        pinned_exact=None if devs[0] is None else all(r["pinned_exact"] for r in rounds),
        final_loss=rounds[-1]["final_loss"],
        threads=rounds[0]["threads"],
        memory_method=rounds[0]["memory_method"],
        build_s=statistics.median(r["build_s"] for r in rounds),
        busy_reruns=sum(r.get("attempts", 1) - 1 for r in rounds),
    )
    # The headline: the best (lowest) median of the runs: every isolated round and the interleaved
    # run are each a full measurement; interference from the rest of the machine only adds time.
    candidates = [
        (r["median_ms"], f"isolated round {i + 1}", r["background_cpu"], len(r["step_ms"]))
        for i, r in enumerate(rounds)
    ]
    rec.update(interleaved_median_ms=None, interleaved_background_cpu=None)
    if inter is not None:
        rec.update(
            interleaved_median_ms=statistics.median(inter["step_ms"]),
            interleaved_step_ms=inter["step_ms"],
            interleaved_background_cpu=inter["background_cpu"],
        )
        candidates.append(
            (rec["interleaved_median_ms"], "interleaved", inter["background_cpu"], len(inter["step_ms"]))
        )
    best = min(candidates, key=lambda c: c[0])
    rec.update(
        median_ms=best[0],
        timing=best[1],
        background_cpu=best[2],
        measured_steps=best[3],
        runs_timed=len(candidates),
    )
    if failed:
        rec["reason"] = f"some rounds failed: {failed}"
    return rec


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Ratios of time and memory to each lower limit of the same configuration: ``*_vs_free``
    (the free-rows-only model) and ``*_vs_full`` (the full-table limit); None where not measured."""
    for limit, suffix in LIMITS.items():
        base = {
            (r["vocab"], r["dim"], r["pinned"], r["ids"]): r
            for r in results
            if r["method"] == limit and r["status"] == "ok"
        }
        for r in results:
            f = base.get((r["vocab"], r["dim"], r["pinned"], r["ids"]))
            for key in (
                "median_ms",
                "isolated_median_ms",
                "interleaved_median_ms",
                "peak_bytes",
                "train_bytes",
            ):
                ok = f is not None and r["status"] == "ok" and r.get(key) is not None and bool(f.get(key))
                r[f"{key}_vs_{suffix}"] = r[key] / f[key] if ok else None


# -- reporting -----------------------------------------------------------------------------------
def _fmt_size(v: int) -> str:
    for unit, div in (("M", 10**6), ("k", 10**3)):
        if v >= div and v % (div // 10) == 0:
            q = v / div
            return f"{q:g}{unit}"
    return str(v)


def _describe(c: Config) -> str:
    return f"V={_fmt_size(c.vocab):>4} D={c.dim:<4} {c.pinned:.0%} {c.ids}"


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _ratio(x: float | None) -> str:
    return "" if x is None else f" ({x:.2f}x)"


def _both(r: dict[str, Any]) -> str:
    ratios = [
        f"{r[k]:.2f}x {name}"
        for k, name in (("median_ms_vs_free", "free"), ("median_ms_vs_full", "full"))
        if r.get(k) is not None
    ]
    return _ms(r["median_ms"]) + (f" ({', '.join(ratios)})" if ratios else "")


def _inter(r: dict[str, Any]) -> str:
    if r["interleaved_median_ms"] is None:
        return "not run"
    return f"{_ms(r['interleaved_median_ms'])}{_ratio(r['interleaved_median_ms_vs_free'])}"


def _dev(r: dict[str, Any]) -> str:
    if r["max_pinned_deviation"] is None:
        return "n/a"
    return "0 (exact)" if r["pinned_exact"] else f"{r['max_pinned_deviation']:.3g}"


# What a cell of each kind of table shows for one measured record.
CELLS: dict[str, Callable[[dict[str, Any]], str]] = {
    "time": lambda r: f"{_ms(r['median_ms'])}{_ratio(r['median_ms_vs_free'])}",
    "time_full": lambda r: f"{_ms(r['median_ms'])}{_ratio(r.get('median_ms_vs_full'))}",
    "both": _both,
    "iso": lambda r: f"{_ms(r['isolated_median_ms'])}{_ratio(r['isolated_median_ms_vs_free'])}",
    "inter": _inter,
    "source": lambda r: r["timing"].replace("isolated round ", "round "),
    "bg": lambda r: _pct(r["background_cpu"]),
    "peak": lambda r: f"{r['peak_bytes'] / MiB:.0f}{_ratio(r['peak_bytes_vs_free'])}",
    "train": lambda r: f"{r['train_bytes'] / MiB:.0f}{_ratio(r['train_bytes_vs_free'])}",
    "build": lambda r: f"{r['build_peak_bytes'] / MiB:.0f}",
    "opt": lambda r: f"{r['optimizer_state_bytes'] / MiB:.1f}",
    "dev": _dev,
}


def _cell(r: dict[str, Any], what: str) -> str:
    if r["status"] == "skipped":
        return "skipped: " + r["reason"].split(" (")[0]
    if r["status"] != "ok":
        return "failed"
    return CELLS[what](r)


def _table(results: list[dict[str, Any]], methods: list[str], what: str) -> list[str]:
    """One row per configuration, one column per method, ``CELLS[what]`` in each cell."""
    by = {(r["vocab"], r["dim"], r["pinned"], r["ids"], r["method"]): r for r in results}
    keys = sorted({(r["ids"], r["pinned"], r["dim"], r["vocab"]) for r in results})
    return markdown_table(
        ["V", "D", "pinned", "ids", *methods],
        [
            [_fmt_size(v), str(d), f"{p:.0%}", ids, *(_cell(by[(v, d, p, ids, m)], what) for m in methods)]
            for ids, p, d, v in keys
        ],
    )


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Whether the measured figures meet the targets (measured, not asserted)."""
    lines = []
    ec = [
        r
        for r in results
        if r["method"] == "embconstraint" and r["status"] == "ok" and r["median_ms_vs_free"] is not None
    ]
    if ec:
        lines.append(
            "Target 1: embconstraint within 1.10x of the free-rows-only model, at every V "
            "(time; peak memory; training memory = peak above the built model), and of the "
            "full-table limit (time):"
        )
        lines.append("")
        rows = []
        for r in sorted(ec, key=lambda r: (r["ids"], r["pinned"], r["dim"], r["vocab"])):
            ratios = [
                r.get(k)
                for k in (
                    "median_ms_vs_free",
                    "peak_bytes_vs_free",
                    "train_bytes_vs_free",
                    "median_ms_vs_full",
                )
            ]
            rows.append(
                [
                    _fmt_size(r["vocab"]),
                    str(r["dim"]),
                    f"{r['pinned']:.0%}",
                    r["ids"],
                    *("n/a" if x is None else f"{x:.2f}x {'met' if x <= 1.10 else 'MISSED'}" for x in ratios),
                ]
            )
        lines += markdown_table(
            ["V", "D", "pinned", "ids", "time", "peak memory", "training memory", "time vs full-table limit"],
            rows,
        )
        lines.append("")
    # The small-table step-time bounds against the free-rows-only model, where they apply.
    bound = {10_000: 1.25, 100_000: 1.15}
    t13 = [
        f"- V={_fmt_size(r['vocab'])} D={r['dim']} {r['pinned']:.0%} {r['ids']}: {r['median_ms_vs_free']:.2f}x "
        f"free-rows-only (bound {bound[r['vocab']]:.2f}x: {'met' if r['median_ms_vs_free'] <= bound[r['vocab']] else 'MISSED'})"
        for r in ec
        if r["vocab"] in bound
    ]
    if t13:
        lines += [
            "Small tables: embconstraint within 1.25x of free-rows-only at V=10k, 1.15x at V=100k:",
            "",
            *t13,
            "",
        ]
    by = {(r["vocab"], r["dim"], r["pinned"], r["ids"], r["method"]): r for r in results}
    t2 = []
    for r in ec:
        if r["vocab"] != 1_000_000 or r["pinned"] != 0.9:
            continue
        for other in ("cat", "peft"):
            o = by.get((r["vocab"], r["dim"], r["pinned"], r["ids"], other))
            if o is None:
                continue
            if o["status"] != "ok":
                t2.append(f"- D={r['dim']} {r['ids']}: {other} {o['status']} ({o.get('reason', '')})")
                continue
            speedup = o["median_ms"] / r["median_ms"]
            t2.append(
                f"- D={r['dim']} {r['ids']}: embconstraint {r['median_ms']:.1f} ms vs {other} "
                f"{o['median_ms']:.1f} ms: {speedup:.2f}x faster ({'met' if speedup >= 4 else 'MISSED'})"
            )
    if t2:
        lines.append(
            "Target 2: at V=1M with 90% pinned, embconstraint at least 4x faster than the cat "
            "parametrization and than PEFT:"
        )
        lines.append("")
        lines.extend(t2)
        lines.append("")
    return lines


def issue_figures(results: list[dict[str, Any]]) -> list[str]:
    """The core issue's figures: D=128, 90% pinned, uniform ids, for every V measured."""
    rows = [r for r in results if r["dim"] == 128 and r["pinned"] == 0.9 and r["ids"] == "uniform"]
    sizes = sorted({r["vocab"] for r in rows})
    if not sizes:
        return []
    by = {(r["vocab"], r["method"]): r for r in rows}
    methods = [
        m
        for m in ("embconstraint", "unconstrained", "free_only", "full_table", "cat", "peft")
        if any((v, m) in by for v in sizes)
    ]
    lines = [
        "Core issue figures (D=128, 90% pinned, batch 256x32, AdamW): median step ms "
        "(x free-rows-only limit, x full-table limit)",
        "",
    ]
    lines += markdown_table(
        ["method", *(f"V={_fmt_size(v)}" for v in sizes)],
        [[m, *(_cell(by[(v, m)], "both") if (v, m) in by else "" for v in sizes)] for m in methods],
    )
    return lines + [""]


# The report's tables after the targets, in order: (heading, text above the table or None, cell kind).
SECTIONS: list[tuple[str, str | None, str]] = [
    (
        "Median step time (ms; ratio to the free-rows-only model)",
        "Each method is timed in every isolated round (a fresh process) and, where it fits in memory "
        "with the others, in the interleaved run (all methods in one process, one step each in turn). "
        "Each of these runs gives a median over its measured steps; the table shows the lowest of "
        "them (interference from the rest of the machine only adds time; every method gets the same "
        "number of runs). The next tables show each protocol on its own.",
        "time",
    ),
    (
        "Median step time (ms; ratio to the full-table limit)",  # where the full-table limit was measured
        "The same headline medians, as a ratio to `full_table`: a lookup of every id in the full "
        "(V, D) table (pinned rows' memory traffic included) with a gradient for the free rows "
        "only, and nothing else. It is the limit for any method that keeps the pinned rows in "
        "the model; `free_only` is the limit for one that does not.",
        "time_full",
    ),
    (
        "Median step time, isolated runs only (ms; ratio to free-rows-only)",
        "Median over every measured step of every isolated round.",
        "iso",
    ),
    ("Median step time, interleaved run only (ms; ratio to free-rows-only)", None, "inter"),
    ("Which run gave the headline median", None, "source"),
    (
        "Background load during that run",
        "Share of all CPU time used by other processes while its steps were timed (this machine was shared).",
        "bg",
    ),
    (
        "Peak memory (MiB; ratio to free-rows-only)",
        "Peak during the training steps, above the process before the model was built (the reference "
        "rows and the batches, common to all methods, are not counted).",
        "peak",
    ),
    (
        "Training memory (MiB; ratio to free-rows-only)",
        "Peak during the training steps above the built model at rest: gradients, optimizer state, "
        "temporaries.",
        "train",
    ),
    (
        "Peak while building the model (MiB)",
        "From the same baseline as the peak memory above: the method's set-up transients (e.g. the "
        "initial (V, D) weight and what constrain() or the parametrization allocate).",
        "build",
    ),
    ("Optimizer state (MiB)", None, "opt"),
    ("Max |pinned row - reference| after the run", None, "dev"),
]


def render_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    out = ["# Training-step benchmark: pinning embedding rows", ""]
    out += [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu_count']} CPU ({meta['cpu']}), {meta['mem_total_gib']} GiB, {meta['platform']}",
        f"- torch {meta['torch']} (threads: {meta['torch_threads']}), peft {meta['peft']}, "
        f"python {meta['python']}, device {meta['device']}",
        f"- step: embedding -> mean -> linear({meta['classes']} classes), cross-entropy, AdamW(lr={meta['lr']}, "
        f"weight_decay={meta['weight_decay']}), batch {meta['batch']}x{meta['seq']} ids; "
        f"{meta['warmup']} warm-up + at least {meta['steps']} measured steps per run, on to "
        f"{meta.get('min_seconds', 0):g} s of steps (at most {meta['max_seconds']:g} s), {meta['rounds']} round(s), "
        "methods in rotated order, each run in a fresh process; allocator: "
        f"{meta.get('malloc', 'default')} (see benchmarks/README.md); "
        + ("every model torch.compile-d (default backend)" if meta.get("compiled") else "eager"),
        f"- memory: {meta['memory_method']}; skipped above ~{meta['mem_limit_gib']:.1f} GiB (estimated)",
        f"- total wall time: {meta['wall_s']:.0f} s",
        "",
    ]
    out += issue_figures(results)
    out += ["## Targets", ""] + targets(results)
    for heading, text, what in SECTIONS:
        if what == "time_full" and not any(r.get("median_ms_vs_full") is not None for r in results):
            continue
        out += [f"## {heading}", ""] + ([text, ""] if text else []) + _table(results, methods, what) + [""]
    out += ["Methods: " + "; ".join(f"`{m}`: {METHODS[m]}" for m in methods), ""]
    return "\n".join(out)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    rows = sorted({(r["ids"], r["pinned"]) for r in results})
    dims = sorted({r["dim"] for r in results})
    fig, axes = plt.subplots(
        len(rows), len(dims), figsize=(4.2 * len(dims), 3.4 * len(rows)), squeeze=False, sharex=True
    )
    for i, (ids, p) in enumerate(rows):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            for m in methods:
                pts = sorted(
                    (r["vocab"], r["median_ms"])
                    for r in results
                    if r["method"] == m
                    and r["dim"] == d
                    and r["pinned"] == p
                    and r["ids"] == ids
                    and r["status"] == "ok"
                )
                if pts:
                    style = {
                        "embconstraint": {"linewidth": 2.6},
                        "free_only": {"linestyle": "--", "color": "black"},
                        "full_table": {"linestyle": ":", "color": "black"},
                    }.get(m, {"linewidth": 1.2})
                    ax.plot([v for v, _ in pts], [t for _, t in pts], marker="o", label=m, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"D={d}, {p:.0%} pinned, {ids} ids", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("median step time (ms)")
            if i == len(rows) - 1:
                ax.set_xlabel("V (rows)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        if len(ax.get_legend_handles_labels()[0]) > len(handles):
            handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(rows) > 1 else 0.85))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through _run_worker, which kills the running worker


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write ``results.md``, ``results.json`` and ``step_time.png`` to ``--out``."""
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    settings = resolve(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        mem_limit = args.mem_limit * GiB if args.mem_limit else 0.9 * total
    else:
        mem_limit = (args.mem_limit or DEFAULT_MEM_LIMIT_GIB) * GiB
        avail = mem_available()
        if avail is not None:
            mem_limit = min(mem_limit, 0.9 * avail)
    base = Config(
        vocab=2,
        dim=1,
        pinned=0.5,
        batch=args.batch,
        seq=args.seq,
        steps=settings["steps"],
        warmup=settings["warmup"],
        max_seconds=settings["max_seconds"],
        min_seconds=settings["min_seconds"],
        seed=args.seed,
        device=device,
        compile=args.compile,
    )
    if args.malloc == "steady":  # read by the forkserver (and so every worker) when it starts
        os.environ.update(STEADY_MALLOC)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = machine_info(device)
    argv_text = sys.argv[1:] if argv is None else argv
    meta.update(
        command=shlex.join(["python", "-m", "benchmarks.step_time", *argv_text]),
        mem_limit_gib=mem_limit / GiB,
        rounds=settings["rounds"],
        batch=base.batch,
        seq=base.seq,
        steps=base.steps,
        warmup=base.warmup,
        max_seconds=base.max_seconds,
        min_seconds=base.min_seconds,
        malloc=args.malloc,
        lr=base.lr,
        weight_decay=base.weight_decay,
        classes=base.classes,
        seed=base.seed,
        settings=settings,
        compiled=args.compile,
    )
    print(
        f"torch {meta['torch']}, {meta['torch_threads']} threads, {meta['cpu_count']} CPUs, device {device}; "
        f"memory limit {mem_limit / GiB:.1f} GiB",
        flush=True,
    )
    started = time.perf_counter()
    results = run_sweep(settings, base, int(mem_limit), args.timeout, log=lambda s: print(s, flush=True))
    add_ratios(results)
    meta["wall_s"] = time.perf_counter() - started
    ok = [r for r in results if r["status"] == "ok"]
    meta["memory_method"] = ok[0]["memory_method"] if ok else "n/a"
    md = render_markdown(results, meta)
    (out / "results.md").write_text(md)
    write_json(out / "results.json", {"meta": meta, "results": results})
    plot(results, out / "step_time.png")
    print()
    print("\n".join(issue_figures(results) + targets(results)))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'step_time.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
