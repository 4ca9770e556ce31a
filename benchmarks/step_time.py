"""Training-step time and memory of every way to pin embedding rows, in one process and one run.

Every (configuration, method, round) runs in a fresh worker process forked from a forkserver
that has already imported torch, peft and embconstraint, so each run gets a clean peak-memory
reading and no run pays for another's allocations. Rounds interleave the methods (the order
is rotated from round to round), all methods train on the same batches from the same seeds.

Examples (from the repository root)::

    python benchmarks/step_time.py --issue          # the core issue's figures: V=10k,100k,1M, D=128, 90%
    python benchmarks/step_time.py --quick          # < 2 minutes on 2 cores
    python benchmarks/step_time.py                  # the default sweep (see --help)
    python benchmarks/step_time.py --sizes 1M --dims 128 --pinned 90 --methods embconstraint,free_only

Outputs in ``--out`` (default ``./bench-out``): ``results.md``, ``results.json``, ``step_time.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.methods import (  # noqa: E402
    ID_DISTRIBUTIONS,
    LIMITS,
    METHODS,
    Config,
    estimate_bytes,
    estimate_interleaved_bytes,
)

# When not every method of a configuration fits in memory at once, these are interleaved first.
INTERLEAVE_PRIORITY = ("free_only", "full_table", "embconstraint", "cat", "peft", "unconstrained", "callback", "grad_hook")

GiB = 2**30
MiB = 2**20

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
LARGE_SIZES = (10_000_000,)
DEFAULT_DIMS = (64, 128, 1024)
DEFAULT_PINNED = (0.5, 0.9, 0.99)
DEFAULT_MEM_LIMIT_GIB = 12.0
ISSUE = {"sizes": (10_000, 100_000, 1_000_000), "dims": (128,), "pinned": (0.9,)}
QUICK = {"sizes": (10_000, 100_000), "dims": (64, 128), "pinned": (0.9,), "steps": 5, "warmup": 1,
         "rounds": 1, "max_seconds": 3.0, "min_seconds": 0.0}
# glibc returns freed blocks above its (dynamic) mmap threshold to the OS, so a step whose
# temporaries are a few MiB page-faults them in again at random steps (at V=10k: 0.6 ms steps
# become 1.5-3 ms, for every method). "steady" keeps freed memory in the process for the workers.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


# -- argument parsing ----------------------------------------------------------------------------
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


def _list(parse):
    def parse_list(text: str) -> list:
        try:
            return [parse(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse_list


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
    """The command-line interface (``python benchmarks/step_time.py --help``)."""
    p = argparse.ArgumentParser(
        prog="step_time.py",
        description=(
            "Time one training step (embedding -> mean -> linear, AdamW, batch 256x32) for every way of "
            "pinning embedding rows. Default sweep: V in {10k,100k,1M} x D in {64,128,1024} x pinned in "
            "{50,90,99}%%, every method; runs needing more than --mem-limit GiB are skipped (reported)."
        ),
    )
    p.add_argument("--sizes", type=_list(parse_size), help="vocabulary sizes V, e.g. 10k,100k,1M")
    p.add_argument("--dims", type=_list(_dim), help="embedding dimensions D, e.g. 64,128,1024")
    p.add_argument("--pinned", type=_list(parse_fraction), help="pinned fractions, e.g. 50,90,99 (or 0.9)")
    p.add_argument("--methods", type=_list(_method), help=f"subset of: {','.join(METHODS)}")
    p.add_argument("--ids", type=_list(_ids), default=["uniform"],
                   help="token-id distributions: uniform (default) and/or new (half the ids are new rows)")
    p.add_argument("--quick", action="store_true",
                   help="V=10k,100k; D=64,128; 90%%; 1 warm-up + 5 steps, 1 round (about a minute on 2 idle cores)")
    p.add_argument("--issue", action="store_true",
                   help="the core issue's figures: V=10k,100k,1M; D=128; 90%% pinned")
    p.add_argument("--large", action="store_true", help="add V=10M to the default sizes")
    p.add_argument("--steps", type=int, help="measured steps per run (default 10)")
    p.add_argument("--warmup", type=int, help="warm-up steps per run, not measured (default 3)")
    p.add_argument("--rounds", type=int, help="rounds; each runs every method once, rotated order (default 2)")
    p.add_argument("--max-seconds", type=float,
                   help="stop measuring a run after this many seconds of steps (at least 3 steps; default 20)")
    p.add_argument("--min-seconds", type=float,
                   help="go on measuring a run past --steps until this many seconds of steps (default 2; "
                        "0 with --quick): small tables get hundreds of steps")
    p.add_argument("--malloc", choices=("steady", "default"), default="steady",
                   help="steady (default): the workers keep freed memory (glibc MALLOC_MMAP_THRESHOLD_ and "
                        "MALLOC_TRIM_THRESHOLD_ at 1 GiB) instead of page-faulting temporaries in at random "
                        "steps; default: glibc's own settings")
    p.add_argument("--batch", type=int, default=256, help="sequences per batch (default 256)")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--mem-limit", type=float, default=None,
                   help=f"skip runs estimated above this many GiB (default {DEFAULT_MEM_LIMIT_GIB:g} on CPU, "
                        "90%% of the GPU on CUDA; never above 90%% of the memory available at start)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time from the isolated runs only (default: also time all methods of a configuration "
                        "step by step in turn in one process, where they fit together, and report that)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each run, wait up to SECONDS for other processes to use < 25%% of the CPU")
    p.add_argument("--busy-threshold", type=float, default=0.15, metavar="FRACTION",
                   help="a run during which other processes used more than this share of the CPU is run "
                        "again (default 0.15)")
    p.add_argument("--busy-retries", type=int, default=None,
                   help="how many times to run a busy run again (default 2, 0 with --quick; 0 disables)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a worker is killed")
    p.add_argument("--out", default="bench-out", help="output directory (default ./bench-out)")
    return p


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from parsed arguments: presets first, then explicit options win."""
    s: dict[str, Any] = {"sizes": list(DEFAULT_SIZES), "dims": list(DEFAULT_DIMS), "pinned": list(DEFAULT_PINNED),
                         "steps": 10, "warmup": 3, "rounds": 2, "max_seconds": 20.0, "min_seconds": 2.0}
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


# -- machine -------------------------------------------------------------------------------------
def _mem_available() -> int | None:
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
    import torch

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


# -- running -------------------------------------------------------------------------------------
def _context(methods: list[str]) -> mp.context.BaseContext:
    """A forkserver that has imported everything the workers need (imports cost seconds each)."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # no forkserver on this platform
        return mp.get_context("spawn")
    preload = ["torch", "benchmarks.methods"]
    if "embconstraint" in methods:
        preload.append("embconstraint")
    if "peft" in methods:
        preload.append("peft")
    ctx.set_forkserver_preload(preload)
    return ctx


def _run_worker(ctx: mp.context.BaseContext, method: str, config: Config, timeout: float) -> dict[str, Any]:
    from benchmarks.methods import _child

    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(method, asdict(config), send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            proc.kill()
            proc.join()
            return {"status": "failed", "reason": f"timed out after {timeout:g} s"}
        kind, payload = recv.recv()
    except EOFError:
        proc.join()
        return {"status": "failed", "reason": f"worker died (exit code {proc.exitcode}; out of memory?)"}
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): do not leave the worker running
        proc.kill()
        proc.join()
        raise
    finally:
        recv.close()
    proc.join()
    if kind != "ok":
        return {"status": "failed", "reason": payload}
    return {"status": "ok", **payload}


def _config_key(c: Config) -> tuple:
    return (c.vocab, c.dim, c.pinned, c.ids)


def _wait_idle(max_wait: float, log) -> None:
    """Wait (up to ``max_wait`` s) until other processes use under 25% of the CPU over 1 s."""
    from benchmarks.methods import _cpu_jiffies

    deadline = time.monotonic() + max_wait
    waited = False
    while time.monotonic() < deadline:
        a = _cpu_jiffies()
        time.sleep(1.0)
        b = _cpu_jiffies()
        if a is None or b is None or b[1] <= a[1] or (b[0] - a[0]) / (b[1] - a[1]) < 0.25:
            break
        waited = True
    if waited:
        log(f"  (waited for an idle CPU{'; gave up' if time.monotonic() >= deadline else ''})")


def _run_quiet(ctx: mp.context.BaseContext, method: str | list[str], config: Config, timeout: float,
               settings: dict[str, Any], log) -> dict[str, Any]:
    """One worker run; run again (up to ``settings["busy_retries"]`` times, after waiting for an
    idle CPU) while other processes used more than ``settings["busy_threshold"]`` of the CPU
    during its timed steps. Returns the attempt with the least background load."""
    attempts = []
    for attempt in range(1 + settings["busy_retries"]):
        if settings["wait_idle"] or attempt:
            _wait_idle(max(settings["wait_idle"], 30.0 if attempt else 0.0), log)
        out = _run_worker(ctx, method, config, timeout)
        if out["status"] != "ok":
            return out
        attempts.append(out)
        bg = out["background_cpu"]
        if bg is None or bg <= settings["busy_threshold"]:
            break
        log(f"  (background load {bg:.0%} while timing {_describe(config)} "
            f"{method if isinstance(method, str) else 'interleaved'}; "
            f"{'running it again' if attempt < settings['busy_retries'] else 'keeping the quietest attempt'})")
    best = min(attempts, key=lambda o: o["background_cpu"] if o["background_cpu"] is not None else 0.0)
    best["attempts"] = len(attempts)
    return best


def run_sweep(settings: dict[str, Any], base: Config, mem_limit: int, timeout: float,
              log=print) -> list[dict[str, Any]]:
    """Run every (configuration, method): ``settings["rounds"]`` isolated rounds (fresh process
    each, rotated order: memory, deviation, isolated step times), then, where all the methods of
    a configuration fit in memory together and ``settings["interleave"]`` is set, one process
    that times them step by step in turn (where not all fit, the first of
    :data:`INTERLEAVE_PRIORITY` that do). One record per (configuration, method)."""
    configs = [replace(base, vocab=v, dim=d, pinned=p, ids=ids)
               for ids in settings["ids"] for p in settings["pinned"] for d in settings["dims"]
               for v in settings["sizes"]]
    methods = settings["methods"]
    records: dict[tuple, dict[str, Any]] = {}
    for c in configs:
        for m in methods:
            est = estimate_bytes(m, c)
            rec = {"method": m, "label": METHODS[m], "vocab": c.vocab, "dim": c.dim, "pinned": c.pinned,
                   "ids": c.ids, "num_pinned": c.num_pinned, "estimate_bytes": est, "rounds": []}
            if est > mem_limit:
                rec.update(status="skipped", reason=f"needs ~{est / GiB:.1f} GiB (limit {mem_limit / GiB:.1f} GiB)")
            else:
                rec["status"] = "pending"
            records[(*_config_key(c), m)] = rec
    ctx = _context(methods)
    pending = sum(r["status"] == "pending" for r in records.values())
    total = pending * settings["rounds"] + (len(configs) if settings["interleave"] else 0)
    done = 0
    started = time.perf_counter()

    def progress(text: str) -> None:
        log(f"[{done}/{total}] {text}  ({time.perf_counter() - started:.0f} s)")

    for ci, c in enumerate(configs):
        runnable = [m for m in methods if records[(*_config_key(c), m)]["status"] == "pending"]
        for r in range(settings["rounds"]):
            k = (r + ci) % max(len(runnable), 1)
            for m in runnable[k:] + runnable[:k]:
                rec = records[(*_config_key(c), m)]
                if rec.get("failed"):
                    continue
                out = _run_quiet(ctx, m, c, timeout, settings, log)
                done += 1
                if out["status"] != "ok":
                    rec["failed"] = out["reason"]
                    progress(f"{_describe(c)} {m}: FAILED {out['reason']}")
                    continue
                rec["rounds"].append(out)
                progress(f"{_describe(c)} {m:<14} round {r + 1}: {out['median_ms']:9.2f} ms  "
                         f"peak {out['peak_bytes'] / MiB:9.1f} MiB  bg {_pct(out['background_cpu'])}")
        if not settings["interleave"]:
            continue
        ok = [m for m in runnable if records[(*_config_key(c), m)]["rounds"]]
        chosen: list[str] = []  # the methods that fit in memory together, most interesting first
        for m in sorted(ok, key=INTERLEAVE_PRIORITY.index):
            if estimate_interleaved_bytes([*chosen, m], c) <= mem_limit:
                chosen.append(m)
        ok = [m for m in ok if m in chosen]
        done += 1
        if len(ok) < 2:
            progress(f"{_describe(c)} interleaved: not run (fewer than 2 methods fit in memory together); "
                     "isolated timings are reported")
            continue
        ic = replace(c, steps=c.steps * settings["rounds"], max_seconds=c.max_seconds * settings["rounds"])
        out = _run_quiet(ctx, ok, ic, timeout, settings, log)
        if out["status"] != "ok":
            progress(f"{_describe(c)} interleaved: FAILED {out['reason']}; isolated timings are reported")
            continue
        for m in ok:
            records[(*_config_key(c), m)]["interleaved"] = {"step_ms": out["step_ms"][m],
                                                            "background_cpu": out["background_cpu"]}
        progress(f"{_describe(c)} interleaved: " + ", ".join(
            f"{m} {statistics.median(out['step_ms'][m]):.2f}" for m in ok) + f" ms  bg {_pct(out['background_cpu'])}")
    return [_aggregate(rec) for rec in records.values()]


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
    candidates = [(r["median_ms"], f"isolated round {i + 1}", r["background_cpu"], len(r["step_ms"]))
                  for i, r in enumerate(rounds)]
    rec.update(interleaved_median_ms=None, interleaved_background_cpu=None)
    if inter is not None:
        rec.update(interleaved_median_ms=statistics.median(inter["step_ms"]),
                   interleaved_step_ms=inter["step_ms"], interleaved_background_cpu=inter["background_cpu"])
        candidates.append((rec["interleaved_median_ms"], "interleaved", inter["background_cpu"],
                           len(inter["step_ms"])))
    best = min(candidates, key=lambda c: c[0])
    rec.update(median_ms=best[0], timing=best[1], background_cpu=best[2], measured_steps=best[3],
               runs_timed=len(candidates))
    if failed:
        rec["reason"] = f"some rounds failed: {failed}"
    return rec


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Ratios of time and memory to each lower limit of the same configuration: ``*_vs_free``
    (the free-rows-only model) and ``*_vs_full`` (the full-table limit); None where not measured."""
    for limit, suffix in LIMITS.items():
        base = {(r["vocab"], r["dim"], r["pinned"], r["ids"]): r for r in results
                if r["method"] == limit and r["status"] == "ok"}
        for r in results:
            f = base.get((r["vocab"], r["dim"], r["pinned"], r["ids"]))
            for key in ("median_ms", "isolated_median_ms", "interleaved_median_ms", "peak_bytes", "train_bytes"):
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


def _cell(r: dict[str, Any], what: str) -> str:
    if r["status"] == "skipped":
        return "skipped: " + r["reason"].split(" (")[0]
    if r["status"] != "ok":
        return "failed"
    if what == "time":
        return f"{_ms(r['median_ms'])}{_ratio(r['median_ms_vs_free'])}"
    if what == "time_full":
        return f"{_ms(r['median_ms'])}{_ratio(r.get('median_ms_vs_full'))}"
    if what == "both":
        ratios = [f"{r[k]:.2f}x {name}" for k, name in (("median_ms_vs_free", "free"), ("median_ms_vs_full", "full"))
                  if r.get(k) is not None]
        return _ms(r["median_ms"]) + (f" ({', '.join(ratios)})" if ratios else "")
    if what == "iso":
        return f"{_ms(r['isolated_median_ms'])}{_ratio(r['isolated_median_ms_vs_free'])}"
    if what == "inter":
        if r["interleaved_median_ms"] is None:
            return "not run"
        return f"{_ms(r['interleaved_median_ms'])}{_ratio(r['interleaved_median_ms_vs_free'])}"
    if what == "source":
        return r["timing"].replace("isolated round ", "round ")
    if what == "bg":
        return _pct(r["background_cpu"])
    if what == "peak":
        return f"{r['peak_bytes'] / MiB:.0f}{_ratio(r['peak_bytes_vs_free'])}"
    if what == "train":
        return f"{r['train_bytes'] / MiB:.0f}{_ratio(r['train_bytes_vs_free'])}"
    if what == "build":
        return f"{r['build_peak_bytes'] / MiB:.0f}"
    if what == "opt":
        return f"{r['optimizer_state_bytes'] / MiB:.1f}"
    if what == "dev":
        if r["max_pinned_deviation"] is None:
            return "n/a"
        return "0 (exact)" if r["pinned_exact"] else f"{r['max_pinned_deviation']:.3g}"
    raise ValueError(what)


def _table(results: list[dict[str, Any]], methods: list[str], what: str) -> list[str]:
    by = {(r["vocab"], r["dim"], r["pinned"], r["ids"], r["method"]): r for r in results}
    keys = sorted({(r["ids"], r["pinned"], r["dim"], r["vocab"]) for r in results})
    lines = ["| V | D | pinned | ids | " + " | ".join(methods) + " |",
             "|" + "---|" * (4 + len(methods))]
    for ids, p, d, v in keys:
        cells = [_cell(by[(v, d, p, ids, m)], what) for m in methods]
        lines.append(f"| {_fmt_size(v)} | {d} | {p:.0%} | {ids} | " + " | ".join(cells) + " |")
    return lines


def targets(results: list[dict[str, Any]]) -> list[str]:
    """Whether the measured figures meet the issue's targets (measured, not asserted)."""
    lines = []
    ec = [r for r in results if r["method"] == "embconstraint" and r["status"] == "ok"
          and r["median_ms_vs_free"] is not None]
    if ec:
        lines.append("Target 1: embconstraint within 1.10x of the free-rows-only model, at every V "
                     "(time; peak memory; training memory = peak above the built model), and of the "
                     "full-table limit (time):")
        lines.append("")
        lines.append("| V | D | pinned | ids | time | peak memory | training memory | time vs full-table limit |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(ec, key=lambda r: (r["ids"], r["pinned"], r["dim"], r["vocab"])):
            cells = []
            for key in ("median_ms_vs_free", "peak_bytes_vs_free", "train_bytes_vs_free", "median_ms_vs_full"):
                x = r.get(key)
                cells.append("n/a" if x is None else f"{x:.2f}x {'met' if x <= 1.10 else 'MISSED'}")
            lines.append(f"| {_fmt_size(r['vocab'])} | {r['dim']} | {r['pinned']:.0%} | {r['ids']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    # Issue 13's step-time bounds against the free-rows-only model, where it applies them.
    bound = {10_000: 1.25, 100_000: 1.15}
    t13 = [f"- V={_fmt_size(r['vocab'])} D={r['dim']} {r['pinned']:.0%} {r['ids']}: {r['median_ms_vs_free']:.2f}x "
           f"free-rows-only (bound {bound[r['vocab']]:.2f}x: {'met' if r['median_ms_vs_free'] <= bound[r['vocab']] else 'MISSED'})"
           for r in ec if r["vocab"] in bound]
    if t13:
        lines += ["Small tables: embconstraint within 1.25x of free-rows-only at V=10k, 1.15x at V=100k:", "",
                  *t13, ""]
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
            t2.append(f"- D={r['dim']} {r['ids']}: embconstraint {r['median_ms']:.1f} ms vs {other} "
                      f"{o['median_ms']:.1f} ms: {speedup:.2f}x faster ({'met' if speedup >= 4 else 'MISSED'})")
    if t2:
        lines.append("Target 2: at V=1M with 90% pinned, embconstraint at least 4x faster than the cat "
                     "parametrization and than PEFT:")
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
    methods = [m for m in ("embconstraint", "unconstrained", "free_only", "full_table", "cat", "peft")
               if any((v, m) in by for v in sizes)]
    lines = ["Core issue figures (D=128, 90% pinned, batch 256x32, AdamW): median step ms "
             "(x free-rows-only limit, x full-table limit)",
             "", "| method | " + " | ".join(f"V={_fmt_size(v)}" for v in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for m in methods:
        cells = [_cell(by[(v, m)], "both") if (v, m) in by else "" for v in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    out = ["# Training-step benchmark: pinning embedding rows", ""]
    out += [f"- command: `{meta['command']}`", f"- date: {meta['date']}",
            f"- machine: {meta['cpu_count']} CPU ({meta['cpu']}), {meta['mem_total_gib']} GiB, {meta['platform']}",
            f"- torch {meta['torch']} (threads: {meta['torch_threads']}), peft {meta['peft']}, "
            f"python {meta['python']}, device {meta['device']}",
            f"- step: embedding -> mean -> linear({meta['classes']} classes), cross-entropy, AdamW(lr={meta['lr']}, "
            f"weight_decay={meta['weight_decay']}), batch {meta['batch']}x{meta['seq']} ids; "
            f"{meta['warmup']} warm-up + at least {meta['steps']} measured steps per run, on to "
            f"{meta.get('min_seconds', 0):g} s of steps (at most {meta['max_seconds']:g} s), {meta['rounds']} round(s), "
            "methods in rotated order, each run in a fresh process; allocator: "
            f"{meta.get('malloc', 'default')} (see benchmarks/README.md)",
            f"- memory: {meta['memory_method']}; skipped above ~{meta['mem_limit_gib']:.1f} GiB (estimated)",
            f"- total wall time: {meta['wall_s']:.0f} s", ""]
    out += issue_figures(results)
    out += ["## Targets", ""] + targets(results)
    out += ["## Median step time (ms; ratio to the free-rows-only model)", "",
            "Each method is timed in every isolated round (a fresh process) and, where it fits in memory "
            "with the others, in the interleaved run (all methods in one process, one step each in turn). "
            "Each of these runs gives a median over its measured steps; the table shows the lowest of "
            "them (interference from the rest of the machine only adds time; every method gets the same "
            "number of runs). The next tables show each protocol on its own.", ""]
    out += _table(results, methods, "time") + [""]
    if any(r.get("median_ms_vs_full") is not None for r in results):
        out += ["## Median step time (ms; ratio to the full-table limit)", "",
                "The same headline medians, as a ratio to `full_table`: a lookup of every id in the full "
                "(V, D) table (pinned rows' memory traffic included) with a gradient for the free rows "
                "only, and nothing else. It is the limit for any method that keeps the pinned rows in "
                "the model; `free_only` is the limit for one that does not.", ""]
        out += _table(results, methods, "time_full") + [""]
    out += ["## Median step time, isolated runs only (ms; ratio to free-rows-only)", "",
            "Median over every measured step of every isolated round.", ""] + _table(results, methods, "iso")
    out += ["", "## Median step time, interleaved run only (ms; ratio to free-rows-only)", ""]
    out += _table(results, methods, "inter") + [""]
    out += ["## Which run gave the headline median", ""] + _table(results, methods, "source") + [""]
    out += ["## Background load during that run", "",
            "Share of all CPU time used by other processes while its steps were timed (this machine was "
            "shared).", ""] + _table(results, methods, "bg") + [""]
    out += ["## Peak memory (MiB; ratio to free-rows-only)", "",
            "Peak during the training steps, above the process before the model was built (the reference "
            "rows and the batches, common to all methods, are not counted).", ""]
    out += _table(results, methods, "peak") + [""]
    out += ["## Training memory (MiB; ratio to free-rows-only)", "",
            "Peak during the training steps above the built model at rest: gradients, optimizer state, "
            "temporaries.", ""] + _table(results, methods, "train") + [""]
    out += ["## Peak while building the model (MiB)", "",
            "From the same baseline as the peak memory above: the method's set-up transients (e.g. the "
            "initial (V, D) weight and what constrain() or the parametrization allocate).", ""]
    out += _table(results, methods, "build") + [""]
    out += ["## Optimizer state (MiB)", ""] + _table(results, methods, "opt") + [""]
    out += ["## Max |pinned row - reference| after the run", ""] + _table(results, methods, "dev") + [""]
    out += ["Methods: " + "; ".join(f"`{m}`: {METHODS[m]}" for m in methods), ""]
    return "\n".join(out)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    rows = sorted({(r["ids"], r["pinned"]) for r in results})
    dims = sorted({r["dim"] for r in results})
    fig, axes = plt.subplots(len(rows), len(dims), figsize=(4.2 * len(dims), 3.4 * len(rows)),
                             squeeze=False, sharex=True)
    for i, (ids, p) in enumerate(rows):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            for m in methods:
                pts = sorted((r["vocab"], r["median_ms"]) for r in results
                             if r["method"] == m and r["dim"] == d and r["pinned"] == p and r["ids"] == ids
                             and r["status"] == "ok")
                if pts:
                    style = {"embconstraint": {"linewidth": 2.6},
                             "free_only": {"linestyle": "--", "color": "black"},
                             "full_table": {"linestyle": ":", "color": "black"}}.get(m, {"linewidth": 1.2})
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


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through _run_worker, which kills the running worker


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write ``results.md``, ``results.json`` and ``step_time.png`` to ``--out``."""
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    settings = resolve(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        mem_limit = args.mem_limit * GiB if args.mem_limit else 0.9 * total
    else:
        mem_limit = (args.mem_limit or DEFAULT_MEM_LIMIT_GIB) * GiB
        avail = _mem_available()
        if avail is not None:
            mem_limit = min(mem_limit, 0.9 * avail)
    base = Config(vocab=2, dim=1, pinned=0.5, batch=args.batch, seq=args.seq, steps=settings["steps"],
                  warmup=settings["warmup"], max_seconds=settings["max_seconds"],
                  min_seconds=settings["min_seconds"], seed=args.seed, device=device)
    if args.malloc == "steady":  # read by the forkserver (and so every worker) when it starts
        os.environ.update(STEADY_MALLOC)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = machine_info(device)
    argv_text = sys.argv[1:] if argv is None else argv
    meta.update(command=shlex.join(["python", "benchmarks/step_time.py", *argv_text]),
                mem_limit_gib=mem_limit / GiB, rounds=settings["rounds"], batch=base.batch, seq=base.seq,
                steps=base.steps, warmup=base.warmup, max_seconds=base.max_seconds,
                min_seconds=base.min_seconds, malloc=args.malloc, lr=base.lr,
                weight_decay=base.weight_decay, classes=base.classes, seed=base.seed, settings=settings)
    print(f"torch {meta['torch']}, {meta['torch_threads']} threads, {meta['cpu_count']} CPUs, device {device}; "
          f"memory limit {mem_limit / GiB:.1f} GiB", flush=True)
    started = time.perf_counter()
    results = run_sweep(settings, base, int(mem_limit), args.timeout, log=lambda s: print(s, flush=True))
    add_ratios(results)
    meta["wall_s"] = time.perf_counter() - started
    ok = [r for r in results if r["status"] == "ok"]
    meta["memory_method"] = ok[0]["memory_method"] if ok else "n/a"
    md = render_markdown(results, meta)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(_finite({"meta": meta, "results": results}), indent=1,
                                                  allow_nan=False, default=str))
    plot(results, out / "step_time.png")
    print()
    print("\n".join(issue_figures(results) + targets(results)))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'step_time.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
