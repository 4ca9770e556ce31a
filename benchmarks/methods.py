"""One training step, seven ways to train the new rows of an embedding while keeping the old ones.

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
(step times, peak memory, optimizer state, pinned-row deviation); ``benchmarks/step_time.py``
runs it in a fresh process per method and configuration.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
            raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}")

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
        return weight[self.reference.shape[0]:].clone()


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
        return _Setup(_Pooled(emb, head), pinned_rows=lambda: emb.table[:n],
                      map_ids=lambda ids: torch.stack([ids, torch.where(ids >= n, ids - n, f)]))
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


# -- memory ------------------------------------------------------------------------------------
_STATUS = "/proc/self/status"


def _status_kib(key: str) -> int | None:
    try:
        with open(_STATUS) as fh:
            m = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> None:
    """Return the free memory of glibc's heap to the OS (a no-op elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


class _Memory:
    """Peak memory of this process: RSS high-water mark on CPU (reset through
    ``/proc/self/clear_refs`` where Linux allows it), ``max_memory_allocated`` on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
        elif _status_kib("VmHWM") is not None and self._clear_hwm():
            self.method = "RSS high-water mark (VmHWM, reset per phase)"
        else:
            self.method = "ru_maxrss (not resettable: includes build transients)"

    @staticmethod
    def _clear_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        _malloc_trim()  # freed heap memory (kept there under a steady allocator) is no baseline
        kib = _status_kib("VmRSS")
        return 1024 * kib if kib is not None else self.peak()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("RSS"):
            self._clear_hwm()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        kib = _status_kib("VmHWM")
        if kib is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 1024 * kib


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    return 0


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainer:
    """One method's model, optimizer and batches, ready to step."""

    def __init__(self, method: str, config: Config, reference: Tensor, free_init: Tensor,
                 batches: list[tuple[Tensor, Tensor]]) -> None:
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

    def step(self, i: int) -> float:
        """One training step on batch ``i``; its wall time in milliseconds."""
        ids, y = self.batches[i % len(self.batches)]
        _sync(self.device)
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(ids), y)
        loss.backward()
        self.opt.step()
        if self.setup.post_step is not None:
            self.setup.post_step()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.loss = loss.detach()
        return 1e3 * elapsed


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
    tiny = replace(config, vocab=min(config.vocab, 256), dim=min(config.dim, 16), batch=8, seq=4, num_batches=1)
    reference, free_init, batches = _inputs(tiny)
    trainer = _Trainer(method, tiny, reference, free_init(), batches)
    trainer.step(0)
    if trainer.setup.pinned_rows is not None:
        with torch.no_grad():
            torch.equal(trainer.setup.pinned_rows(), reference)
    del trainer
    gc.collect()


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine, in clock ticks (Linux)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class _LoadMeter:
    """Share of the machine's CPU time used by *other* processes while this one measures."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = _cpu_jiffies()
        self.own = time.process_time()

    def background(self) -> float | None:
        end = _cpu_jiffies()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        own = (time.process_time() - self.own) * self.hz
        busy = end[0] - self.start[0] - own
        return max(0.0, min(1.0, busy / (end[1] - self.start[1])))


def run_one(method: str, config: Config) -> RunResult:
    """Build ``method`` for ``config``, train it for ``warmup + steps`` AdamW steps, measure.

    Runs in the current process; peak memory is only clean in a fresh process (what
    ``step_time.py`` does). Step times are wall-clock times of the measured steps (after the
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
    result = RunResult(method=method, config=asdict(config), threads=torch.get_num_threads(), pid=os.getpid(),
                       estimate_bytes=estimate_bytes(method, config))
    _prewarm(method, config)

    # Inputs shared by every method: reference rows, initial free rows, batches.
    reference, free_init, batches = _inputs(config)
    mem = _Memory(device)
    result.memory_method = mem.method
    gc.collect()
    base = mem.current()

    t0 = time.perf_counter()
    trainer = _Trainer(method, config, reference, free_init(), batches)
    result.trainable_params = sum(p.numel() for p in trainer.params)
    gc.collect()
    _sync(device)
    result.build_s = time.perf_counter() - t0
    built = mem.current()
    result.model_bytes = built - base
    result.build_peak_bytes = mem.peak() - base
    mem.reset_peak()

    result.warmup_ms = [trainer.step(i) for i in range(config.warmup)]
    load = _LoadMeter()
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
    result.optimizer_state_bytes = sum(_tensor_bytes(s) for s in trainer.opt.state.values())
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
    return max((float((a[i:i + step].double() - b[i:i + step].double()).abs().max())
                for i in range(0, a.shape[0], step)), default=0.0)


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
    load = _LoadMeter()
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


def _child(method: str | list[str], config: dict, conn: Any) -> None:
    """Entry point of a worker process: run one method (or, given a list, time them
    interleaved), send the result (or the error) back."""
    try:
        if isinstance(method, list):
            conn.send(("ok", run_interleaved(method, Config(**config))))
        else:
            conn.send(("ok", run_one(method, Config(**config)).to_dict()))
    except BaseException as err:  # reported by the parent, which carries on with the sweep
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()
