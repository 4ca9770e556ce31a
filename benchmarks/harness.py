"""What every benchmark here shares: worker processes, timing, memory, load, machine info, tables.

A benchmark script imports this module, the library and torch (transformers, peft where it
compares with them), and nothing else of ``benchmarks``; it runs as ``python -m benchmarks.NAME``
from the repository root, with its arguments parsed in its ``main(argv)``.

- **Worker processes**: :func:`worker_context` (a forkserver that has imported the heavy modules
  once) and :func:`run_in_worker` (one call in a fresh process: a clean peak-memory reading).
- **Timing**: :func:`timed_ms` (wall time of one call, synchronised on CUDA); per-call timings of
  tiny operations use ``torch.utils.benchmark.Timer`` directly (``fixed_cost``).
- **Memory**: :class:`PeakMemory` (RSS high-water mark on CPU, the allocator's peak on CUDA),
  :data:`STEADY_MALLOC` (glibc settings that keep freed memory in the process),
  :func:`tensor_bytes`.
- **Load and machine**: :class:`LoadMeter` (other processes' share of the CPU while timing),
  :func:`wait_idle`, :func:`load_average`, :func:`machine_info`.
- **Distributed**: :class:`CollectiveCounter` (elements through the collectives of FSDP2 and DeepSpeed),
  :class:`FunctionalCollectiveCounter` (DTensor's, tensor parallelism's), :func:`free_port`.
- **Reporting**: :func:`markdown_table` (every table of every report), :func:`write_json`.
- **Arguments**: :func:`parse_size`, :func:`comma_list`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import functools
import importlib
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
GiB = 2**30
MiB = 2**20

# glibc returns freed blocks above its (dynamic) mmap threshold to the OS, so a step whose
# temporaries are a few MiB page-faults them in again at random steps (at V=10k: 0.6 ms steps
# become 1.5-3 ms, for every method). These settings keep freed memory in the process; set them
# in os.environ before the worker context starts its first process.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


# -- arguments ---------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``"10k"`` -> 10000, ``"1M"`` -> 1000000, ``"2500"`` -> 2500.

    >>> [parse_size(s) for s in ("10k", "1M", "2500", "1.5k")]
    [10000, 1000000, 2500, 1500]
    """
    t = text.strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:], 1)
    num = t[:-1] if mult != 1 else t
    try:
        value = float(num) * mult
    except ValueError:
        raise ValueError(f"expected a size such as 10k, 1M or 2500, got {text!r}") from None
    if value != int(value) or value < 2:
        raise ValueError(f"expected a whole number of rows >= 2, got {text!r}")
    return int(value)


def comma_list(parse: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse ``type`` for comma-separated values, each read by ``parse`` (its ValueError
    becomes argparse's usage error).

    >>> comma_list(parse_size)("10k, 1M,")
    [10000, 1000000]
    """

    def parse_list(text: str) -> list[T]:
        try:
            return [parse(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse_list


# -- worker processes --------------------------------------------------------------------------------
def add_table_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The optional positionals ``V D N_PINNED STEPS`` of the communication benchmarks: a table of
    ``V`` rows of ``D``, its first ``N_PINNED`` pinned, ``STEPS`` measured steps per run."""
    for name, default, text in (
        ("V", 32768, "rows"),
        ("D", 256, "embedding dimension"),
        ("N_PINNED", 32000, "pinned rows (the first ones)"),
        ("STEPS", steps, "measured steps per run"),
    ):
        parser.add_argument(
            name.lower(),
            metavar=name,
            type=int,
            nargs="?",
            default=default,
            help=f"{text} (default {default})",
        )


def worker_context(preload: Sequence[str]) -> mp.context.BaseContext:
    """A forkserver that imports ``preload`` (module names) once; every worker forks from it, so
    no worker pays for the imports (seconds each for torch, transformers, peft). ``spawn`` where
    there is no forkserver.

    List libraries, not the benchmark's own module: multiprocessing runs the main module again
    in each worker (as ``__mp_main__``), and warns when it is already imported there."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # no forkserver on this platform
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["benchmarks.harness", *preload])
    return ctx


def _worker_main(target: str, args: tuple, conn: Any) -> None:
    """A worker process: call ``target`` ("module:function") and send back its result or error."""
    try:
        module, _, name = target.partition(":")
        conn.send(("ok", getattr(importlib.import_module(module), name)(*args)))
    except BaseException as err:  # reported by the parent, which carries on
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def run_in_worker(
    ctx: mp.context.BaseContext, target: str, args: tuple = (), timeout: float = 3600.0
) -> tuple[str, Any]:
    """``target(*args)`` in a fresh process of ``ctx``; ``("ok", result)`` or ``("error", reason)``.

    ``target`` names a module-level function as ``"package.module:function"`` (imported in the
    worker, so it works whether the caller runs as a script, ``-m`` or a test); its arguments and
    result must pickle. A worker past ``timeout`` seconds is killed; an interrupted parent
    (Ctrl-C, SIGTERM) kills its worker before it unwinds.

    >>> ctx = mp.get_context("fork")  # a benchmark passes worker_context([...])
    >>> run_in_worker(ctx, "math:gcd", (12, 18))
    ('ok', 6)
    >>> run_in_worker(ctx, "math:sqrt", (-1.0,))
    ('error', 'ValueError: math domain error')
    """
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_main, args=(target, args, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            proc.kill()
            proc.join()
            return "error", f"timed out after {timeout:g} s"
        kind, payload = recv.recv()
    except EOFError:
        proc.join()
        return "error", f"worker died (exit code {proc.exitcode}; out of memory?)"
    except BaseException:  # interrupted: do not leave the worker running
        proc.kill()
        proc.join()
        raise
    finally:
        recv.close()
    proc.join()
    return kind, payload


# -- timing ------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall time in milliseconds, ``device`` synchronised before and after.

    >>> out, ms = timed_ms(lambda: sum(range(1000)), torch.device("cpu"))
    >>> out, ms > 0
    (499500, True)
    """
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, 1e3 * (time.perf_counter() - start)


# -- memory ------------------------------------------------------------------------------------------
def status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), None where there is none."""
    try:
        with open("/proc/self/status") as fh:
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


def malloc_trim() -> None:
    """Return the free memory of glibc's heap to the OS (a no-op elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak memory of this process: the RSS high-water mark on CPU (``VmHWM``, reset through
    ``/proc/self/clear_refs`` where Linux allows it; ``ru_maxrss`` elsewhere, not resettable),
    ``torch.cuda.max_memory_allocated`` on CUDA.

    ``reset`` says when the caller resets the high-water mark (it goes into :attr:`method`, the
    description a report prints); ``trim``: :func:`malloc_trim` before each :meth:`current`
    reading on CPU (freed heap memory kept by a steady allocator is no baseline).

    >>> mem = PeakMemory(torch.device("cpu"))
    >>> mem.current() > 0 and mem.peak() >= mem.current()
    True
    """

    def __init__(self, device: torch.device, reset: str = "per phase", trim: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.trim = trim
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
        elif status_kib("VmHWM") is not None and self._clear_hwm():
            self.method = f"RSS high-water mark (VmHWM, reset {reset})"
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
        """Bytes in use now (RSS on CPU, allocated on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.trim:
            malloc_trim()
        kib = status_kib("VmRSS")
        return 1024 * kib if kib is not None else self.peak()

    def reset_peak(self) -> None:
        """Start a new peak from here (where the platform allows it)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("RSS"):
            self._clear_hwm()

    def peak(self) -> int:
        """The peak since the last :meth:`reset_peak`, in bytes."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        kib = status_kib("VmHWM")
        if kib is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 1024 * kib


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or a dict of them, nested), e.g. an optimizer's
    state.

    >>> tensor_bytes({"exp_avg": torch.zeros(4, 2), "step": torch.tensor(1.0), "lr": 0.1})
    36
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


# -- load and machine --------------------------------------------------------------------------------
def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine, in clock ticks (Linux)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class LoadMeter:
    """Share of the machine's CPU time used by *other* processes since this meter was made.

    >>> 0.0 <= (LoadMeter().background() or 0.0) <= 1.0
    True
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = cpu_jiffies()
        self.own = time.process_time()

    def background(self) -> float | None:
        end = cpu_jiffies()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        own = (time.process_time() - self.own) * self.hz
        busy = end[0] - self.start[0] - own
        return max(0.0, min(1.0, busy / (end[1] - self.start[1])))


def wait_idle(max_wait: float, log: Callable[[str], None] = print) -> None:
    """Wait (up to ``max_wait`` s) until other processes use under 25% of the CPU over 1 s."""
    deadline = time.monotonic() + max_wait
    waited = False
    while time.monotonic() < deadline:
        a = cpu_jiffies()
        time.sleep(1.0)
        b = cpu_jiffies()
        if a is None or b is None or b[1] <= a[1] or (b[0] - a[0]) / (b[1] - a[1]) < 0.25:
            break
        waited = True
    if waited:
        log(f"  (waited for an idle CPU{'; gave up' if time.monotonic() >= deadline else ''})")


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages, None where the platform has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """Date, Python, torch (and its threads), peft, CPUs, memory, platform, GPU: the header of
    every report.

    >>> info = machine_info("cpu")
    >>> info["device"], info["torch_threads"] == torch.get_num_threads()
    ('cpu', True)
    """
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "platform": platform.platform(),
        "device": device,
        "mem_total_gib": None,
    }
    try:  # not imported here: importing peft takes seconds
        info["peft"] = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        info["peft"] = None
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# -- distributed -------------------------------------------------------------------------------------
class CollectiveCounter:
    """Counts the elements that go through the collectives of ``torch.distributed`` while it is
    entered: ``counts["all_gather"]`` (output elements), ``counts["reduce_scatter"]`` (input
    elements) and ``counts["all_reduce"]`` (elements reduced). FSDP2 (torch 2.13 calls
    ``dist.all_gather_single`` / ``dist.reduce_scatter_single``, older ones the
    ``*_into_tensor`` names) and DeepSpeed (its backend keeps the all-gather and reduce-scatter
    functions it found at start: those are counted too) go through these. The functional
    collectives DTensor uses (tensor parallelism) are counted by :class:`FunctionalCollectiveCounter`."""

    NAMES = {
        "all_gather": ("all_gather_single", "all_gather_into_tensor", "_all_gather_base"),
        "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base"),
        "all_reduce": ("all_reduce",),
    }
    # DeepSpeed's TorchBackend: attribute -> kind (the functions it bound when it started)
    DEEPSPEED = {"all_gather_function": "all_gather", "reduce_scatter_function": "reduce_scatter"}

    def __init__(self) -> None:
        self.counts = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        self.saved: list[tuple[Any, str, Callable]] = []

    def _wrap(self, fn: Callable, kind: str) -> Callable:
        def wrapped(*args, **kwargs):
            if kind == "all_gather":
                t = kwargs.get("output", kwargs.get("output_tensor", args[0] if args else None))
            elif kind == "reduce_scatter":
                t = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
            else:
                t = kwargs.get("tensor", args[0] if args else None)
            self.counts[kind] += t.numel()
            return fn(*args, **kwargs)

        return wrapped

    def _patch(self, owner: Any, name: str, kind: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return
        self.saved.append((owner, name, fn))
        setattr(owner, name, self._wrap(fn, kind))

    def __enter__(self) -> CollectiveCounter:
        import sys

        import torch.distributed as dist

        for kind, names in self.NAMES.items():
            for name in names:
                self._patch(dist, name, kind)
        comm = sys.modules.get("deepspeed.comm.comm")
        backend = getattr(comm, "cdb", None) if comm is not None else None
        if backend is not None:
            for name, kind in self.DEEPSPEED.items():
                self._patch(backend, name, kind)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)
        self.saved.clear()


class FunctionalCollectiveCounter:
    """Counts the elements through the functional collectives (``torch.ops._c10d_functional``:
    what DTensor's redistributions, tensor parallelism's among them, run) while it is entered:
    ``counts[op]`` for ``all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``,
    ``all_to_all_single``, ``broadcast`` and their coalesced forms (input elements), through a
    ``TorchDispatchMode``."""

    OPS = frozenset(
        {
            "all_reduce",
            "all_reduce_coalesced",
            "all_gather_into_tensor",
            "all_gather_into_tensor_coalesced",
            "reduce_scatter_tensor",
            "reduce_scatter_tensor_coalesced",
            "all_to_all_single",
            "broadcast",
        }
    )

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[str, int] = {}
        self.counts = counts

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if func.namespace == "_c10d_functional" and name in FunctionalCollectiveCounter.OPS:
                    first = args[0] if args else None
                    tensors = first if isinstance(first, (list, tuple)) else [first]
                    counts[name] = counts.get(name, 0) + sum(
                        t.numel() for t in tensors if isinstance(t, torch.Tensor)
                    )
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self) -> FunctionalCollectiveCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- reporting ---------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, one line per row.

    >>> print("\\n".join(markdown_table(["method", "ms"], [["a", "1.0"], ["b", "2.5"]])))
    | method | ms |
    |---|---|
    | a | 1.0 |
    | b | 2.5 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> None:
    """``data`` as strict JSON (NaN and inf as null; what JSON cannot hold as its ``str``)."""
    Path(path).write_text(json.dumps(_finite(data), indent=1, allow_nan=False, default=str))
