"""The one timing method of `exporter bench`, the same for every backend, batch size and device.

1. Load the artifact (load time recorded) and prepare a seeded random batch with `Runner.prepare` — input
   conversion and host→device copies happen here, outside every timed region.
2. First call, timed on its own (`first_call_ms`: lazy compilation, allocator warm-up, autotuning), then
   `warmup` more calls, counted separately and never mixed into the statistics. Peak memory is read over
   these calls (`exporter.machine.MemoryProbe`).
3. Timed calls, interleaved: every round runs a short block (`block_s`) of calls of every cell in turn, so
   machine drift (other processes, clocks, thermals) hits every backend alike. Switching runtimes is charged to no
   one: a block of several calls starts with one untimed call, and after another runtime's block with `settle_s`
   of untimed calls (a sleep where one call is longer than a block), until that runtime's spin-waiting threads
   have stopped competing for the cores (`SETTLE_S`). A cell stops after `min_runs` calls and
   `budget_s` seconds of timed calls, or at `max_runs`. A cell whose coefficient of variation exceeds
   `UNSTABLE_CV` is measured once more and keeps the steadier series; if it stays unstable it is flagged, and
   `select` will not pick it. CPU: `time.perf_counter_ns` around `Runner.run` alone. CUDA: CUDA events around
   `Runner.run` + `Runner.sync`, inputs already on the device; copies are timed separately.
4. Statistics per cell: min, p50, p90, p99, mean, stdev, cv, throughput (batch / p50), achieved GFLOP/s
   (2 × MACs / p50) against the best GEMM peak any runtime reached in the same process
   (`exporter.machine.measure_peaks`), and the runner's overhead against the runtime's bare call
   (`Runner.bare_call_impl`; compared on the fastest calls of each, timed back to back in every round).

A cell that fails (out of memory, runtime crash) is recorded with its error and the others continue.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from exporter.backends.base import Artifact, BackendUnavailable, Runner, Variant
from exporter.errors import ExporterError, UsageError, one_line
from exporter.machine import (
    PEAK_PRECISIONS,
    MemoryProbe,
    available_memory_bytes,
    library_versions,
    machine_info,
    measure_peaks,
    set_threads,
    usable_cores,
)
from exporter.results import BENCH_FORMAT, UNVERIFIED, ParityRecord

DEFAULT_BATCH_SIZES = (1, 8, 32)
UNSTABLE_CV = 0.10  # stdev / mean above this: the cell is measured again, then flagged unstable
OVERHEAD_MAX_FRACTION = 0.03  # runner overhead budget: ≤ 3 % of the bare call …
OVERHEAD_MAX_US = 20.0  # … or ≤ 20 µs, whichever is larger
REDUCED_PRECISIONS = ("bf16", "fp16")  # compared with the bf16 GEMM peak; fp32/tf32 with the fp32 peak
INPUT_SEED = 1234
# Each runtime's pool threads spin-wait for a while after its calls and slow the next runtime's first calls on a
# small machine: densenet's openvino-int8 after a 20 ms block of ONNX Runtime ran 1.31× its steady p50 over the next
# 30 ms; after 20 ms of untimed calls 1.02×, after 50 ms 1.00× (a 50 ms sleep: 1.01×; bench/settle_probe.py).
SETTLE_S = 0.05
MAX_THREADS_PER_CORE = 4  # beyond this a thread count only oversubscribes the cores (and some runtimes crash)


class BenchError(ExporterError):
    """A benchmark that cannot run at all (no device, nothing to run, no results to read)."""


@dataclass
class BenchSettings:
    """How every cell is timed; recorded with the results."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    device: str = "cpu"
    threads: int | None = None  # None: every core the process may use
    warmup: int = 3  # calls after the first call, not timed
    min_runs: int = 10  # timed calls per cell, at least …
    max_runs: int = 1000  # … and at most
    budget_s: float = 1.0  # seconds of timed calls per cell (reached after min_runs)
    block_s: float = 0.05  # seconds of calls per cell per round (interleaving granularity)
    settle_s: float = SETTLE_S  # untimed, after a block of another runtime (see SETTLE_S)
    gemm_size: int = 2048  # n of the n×n×n matmul that measures the machine's peak
    overhead: bool = True  # time a bare runtime call beside the runner at the smallest batch

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) <= 0 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        self.batch_sizes = tuple(sorted({int(b) for b in self.batch_sizes}))
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"unknown device {self.device!r}; choose cpu or cuda")
        if self.threads is not None and self.threads <= 0:
            raise UsageError(f"--threads must be a positive integer, got {self.threads}")
        limit = MAX_THREADS_PER_CORE * usable_cores()
        if self.threads is not None and self.threads > limit:
            raise UsageError(f"--threads {self.threads} is more than {MAX_THREADS_PER_CORE} per usable core; "
                             f"this machine allows at most {limit}")
        if not 64 <= self.gemm_size <= 16384:
            raise UsageError(f"--gemm-size must be between 64 and 16384, got {self.gemm_size}")
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs:
            raise UsageError("need warmup ≥ 0, min_runs ≥ 1 and max_runs ≥ min_runs")
        if not (math.isfinite(self.budget_s) and 0 <= self.budget_s <= 3600) or not (
                math.isfinite(self.block_s) and self.block_s > 0):
            raise UsageError(f"--budget must be a number of seconds between 0 and 3600, got {self.budget_s}")
        if not (math.isfinite(self.settle_s) and 0 <= self.settle_s <= 10):
            raise UsageError(f"settle_s must be a number of seconds between 0 and 10, got {self.settle_s}")

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "device": self.device, "threads": self.threads,
                "warmup": self.warmup, "min_runs": self.min_runs, "max_runs": self.max_runs,
                "budget_s": self.budget_s, "block_s": self.block_s, "settle_s": self.settle_s,
                "gemm_size": self.gemm_size,
                "clock": "cuda events" if self.device == "cuda" else "time.perf_counter_ns",
                "unstable_cv": UNSTABLE_CV}


@dataclass
class BenchTarget:
    """One thing to time: a variant of a build's artifact, with the parity record that vouches for it."""

    variant: Variant
    build_dir: Path
    parity: ParityRecord = UNVERIFIED
    overhead: bool = True  # time a bare-call twin (settings.overhead); off for a peer, whose runner is not ours

    @property
    def artifact(self) -> Artifact:
        return self.variant.artifact

    @property
    def label(self) -> str:
        return self.variant.label


# --- statistics -----------------------------------------------------------------------------------------------


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """min, p50, p90, p99, mean, stdev (sample, n-1) and coefficient of variation of latencies in ms.

    Percentiles interpolate linearly between order statistics (numpy's default), so [1..100] has p50 = 50.5.
    """
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("latency samples must be finite and non-negative")
    mean = float(values.mean())
    stdev = float(values.std(ddof=1)) if values.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    return {"n": int(values.size), "min_ms": float(values.min()), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "mean_ms": mean, "stdev_ms": stdev, "cv": stdev / mean if mean > 0 else 0.0}


def is_unstable(stats: dict[str, float]) -> bool:
    """A cell whose coefficient of variation exceeds UNSTABLE_CV."""
    return stats["cv"] > UNSTABLE_CV


def overhead_verdict(runner_ms: float, bare_ms: float) -> dict[str, Any]:
    """The runner's overhead over a bare runtime call: µs, %, and whether it is within max(3 %, 20 µs)."""
    overhead_us = (runner_ms - bare_ms) * 1000.0
    allowed_us = max(OVERHEAD_MAX_US, OVERHEAD_MAX_FRACTION * bare_ms * 1000.0)
    return {"overhead_us": overhead_us, "overhead_pct": 100.0 * overhead_us / (bare_ms * 1000.0)
            if bare_ms > 0 else 0.0, "overhead_allowed_us": allowed_us, "overhead_ok": overhead_us <= allowed_us}


def peak_class(precision: str) -> str | None:
    """Which GEMM peak an executed precision is compared with (int8 with the int8 matmul's, in GOP/s)."""
    if precision in ("fp32", "tf32"):
        return "fp32"
    if precision in REDUCED_PRECISIONS:
        return "bf16"
    return "int8" if precision == "int8" else None



# --- timing ---------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One (target, batch size) series of timed calls, or the bare-call twin of one."""

    target: BenchTarget
    batch: int
    kind: str = "runner"  # "runner" or "bare"
    status: str = "pending"  # pending → ok | failed | unavailable
    error: str | None = None
    runner: Runner | None = None
    prepared: Any = None
    call: Callable[[], Any] | None = None
    batch_input: np.ndarray | None = None  # the numpy batch, prepared again before every block
    samples_ms: list[float] = field(default_factory=list)
    timed_s: float = 0.0
    block: int = 1  # calls per round
    finished: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class _Clock:
    """The one clock of a run: perf_counter_ns on the CPU, CUDA events (with runner.sync) on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        if device == "cuda":
            import torch

            self._torch = torch

    def time_ms(self, call: Callable[[], Any], sync: Callable[[], None]) -> float:
        if self.device == "cuda":
            start = self._torch.cuda.Event(enable_timing=True)
            end = self._torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            sync()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        start_ns = time.perf_counter_ns()
        call()
        sync()
        return (time.perf_counter_ns() - start_ns) / 1e6


def check_device(device: str) -> None:
    """Raise BenchError with a clear message when `device` cannot be used here."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is "
                             "False); run on a GPU machine or use --device cpu")


def activation_bytes_per_image(model: Any, input_shape: tuple[int, int, int]) -> int:
    """fp32 bytes of every leaf module's output for one image (meta tensors: nothing is computed)."""
    import torch

    total = 0

    def hook(module, inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        parameter = next(model.parameters(), None)  # meta, or a model source's real tensors
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=parameter.device if parameter is not None else "meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total


def _does_not_fit(batch: int, activation_bytes: int | None, device: str) -> str | None:
    """Why a CPU batch will not fit in memory (2 × all activations, a bound for runtimes that keep them), or None."""
    available = available_memory_bytes() if device == "cpu" and activation_bytes else None
    if available is None:
        return None
    need = 2 * batch * activation_bytes
    if need <= available:
        return None
    return (f"out of memory (not run): batch {batch} needs about {need / 2**30:.1f} GiB of activations, "
            f"{available / 2**30:.1f} GiB available")


def _make_input(batch: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A seeded batch of images in [0, 1) (the models' input scaling); latency does not depend on the values."""
    return np.random.default_rng(INPUT_SEED + batch).random((batch, *shape), dtype=np.float32)


def _prepare_cell(cell: Cell, shape: tuple[int, int, int], settings: BenchSettings, clock: _Clock,
                  memory: MemoryProbe) -> None:
    """Prepare the input, time the first call, warm up and read peak memory; marks the cell failed on error."""
    runner = cell.runner
    assert runner is not None
    try:
        batch = cell.batch_input = _make_input(cell.batch, shape)
        cell.prepared = runner.prepare(batch)
        cell.call = (lambda r=runner, c=cell: r.run(c.prepared))
        memory.start()
        first_ms = clock.time_ms(cell.call, runner.sync)
        raw = cell.call()
        runner.sync()
        runner.finish(raw, cell.batch)  # a runtime that returns the wrong batch fails here, not silently
        warm_start = time.perf_counter()
        for _ in range(settings.warmup):
            cell.call()
        runner.sync()
        memory.sample()
        warm_s = time.perf_counter() - warm_start
        cell.info.update(first_call_ms=first_ms, warmup_runs=settings.warmup + 1,
                         warmup_ms=warm_s * 1000, memory=memory.stop())
        per_call = max(warm_s / max(settings.warmup, 1), first_ms / 1000 if settings.warmup == 0 else 0.0, 1e-6)
        cell.block = max(1, min(settings.max_runs, int(settings.block_s / per_call)))
        cell.status = "ok"
        if settings.device == "cuda":
            cell.info["transfers"] = _time_transfers(runner, batch, clock)
    except Exception as exc:  # one bad cell (OOM, crash, wrong output) must not stop the others
        cell.status, cell.error = "failed", one_line(exc)
        cell.prepared = cell.call = None
        gc.collect()
        if settings.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def _time_transfers(runner: Runner, batch: np.ndarray, clock: _Clock, repeats: int = 5) -> dict[str, float]:
    """CUDA: host→device (prepare), device→host (finish) and run + finish in ms, p50 of `repeats` each.

    Every finish reads the output of a run made just before it: with CUDA graphs or I/O bindings the output
    buffer of an earlier call has been overwritten (or re-bound) since.
    """
    h2d = [clock.time_ms(lambda: runner.prepare(batch), runner.sync) for _ in range(repeats)]
    prepared = runner.prepare(batch)
    d2h = []
    for _ in range(repeats):
        raw = runner.run(prepared)
        runner.sync()
        d2h.append(clock.time_ms(lambda raw=raw: runner.finish(raw, batch.shape[0]), runner.sync))
    total = [clock.time_ms(lambda: runner.finish(runner.run(prepared), batch.shape[0]), runner.sync)
             for _ in range(repeats)]
    return {"h2d_ms": float(np.median(h2d)), "d2h_ms": float(np.median(d2h)),
            "run_with_d2h_ms": float(np.median(total)),
            "end_to_end_ms": float(np.median(h2d)) + float(np.median(total))}


def _settle(cell: Cell, settings: BenchSettings, switched: bool) -> None:
    """Untimed, before a cell's block: after another runtime's block, calls for `settle_s` (a cell whose call is
    longer than a block sleeps instead: the other runtime's threads stop spinning and no call of ours is wasted);
    else one call when the block has several (it absorbs re-preparing the input)."""
    runner = cell.runner
    assert runner is not None and cell.call is not None
    if cell.block == 1:
        if switched and settings.settle_s > 0:
            time.sleep(settings.settle_s)
        return
    deadline = time.perf_counter() + (settings.settle_s if switched else 0.0)
    while True:
        cell.call()
        runner.sync()
        if time.perf_counter() >= deadline:
            return


def _run_rounds(cells: list[Cell], settings: BenchSettings, clock: _Clock, progress: Any = None) -> int:
    """Timed calls, round by round: each round runs one block of every unfinished cell in turn."""
    rounds, previous_runtime = 0, None
    while True:
        active = [c for c in cells if c.status == "ok" and not c.finished]
        if not active:
            return rounds
        rounds += 1
        for cell in active:
            runner = cell.runner
            assert runner is not None and cell.call is not None
            try:
                # A runner serves every batch size of its artifact and some keep per-input state (TensorRT
                # tensor addresses, ONNX Runtime I/O bindings): prepare this cell's input again, untimed.
                prepared = runner.prepare(cell.batch_input)
                if cell.kind == "runner":
                    cell.prepared = prepared
                _settle(cell, settings, switched=runner.backend != previous_runtime)
                previous_runtime = runner.backend
                for _ in range(cell.block):
                    ms = clock.time_ms(cell.call, runner.sync)
                    cell.samples_ms.append(ms)
                    cell.timed_s += ms / 1000
                    if len(cell.samples_ms) >= settings.max_runs:
                        break
            except Exception as exc:
                cell.status, cell.error = "failed", f"failed after {len(cell.samples_ms)} timed calls: " \
                                                     f"{one_line(exc)}"
                if progress is not None:
                    progress.update(1)
                continue
            n = len(cell.samples_ms)
            if n >= settings.max_runs or (n >= settings.min_runs and cell.timed_s >= settings.budget_s):
                cell.finished = True
                if progress is not None:
                    progress.update(1)


# --- the benchmark ---------------------------------------------------------------------------------------------


def run_bench(targets: Sequence[BenchTarget], *, input_shape: tuple[int, int, int], macs_per_image: int | None,
              settings: BenchSettings, peaks: dict[str, Any] | None = None, progress: bool = False,
              label: str = "", activation_bytes: int | None = None) -> dict[str, Any]:
    """Time every target at every batch size with the one method above; returns the results document.

    `peaks` ({"fp32": GFLOP/s, "bf16": GFLOP/s, "int8": GOP/s}) are measured here when not given.
    `activation_bytes` (all layer outputs of one image) lets a CPU batch that cannot fit in the available memory be
    reported as a failed cell up front instead of inviting the kernel's OOM killer, which would end the whole run.
    """
    check_device(settings.device)
    threads = set_threads(settings.threads)
    measured_here = peaks is None
    if peaks is None:
        peaks = measure_peaks(size=settings.gemm_size, device=settings.device, threads=settings.threads)
    clock = _Clock(settings.device)
    memory = MemoryProbe(settings.device)
    cells: list[Cell] = []
    loads: dict[str, dict[str, Any]] = {}
    for target in targets:
        runner = None
        load_start = time.perf_counter()
        try:
            runner = target.variant.runner(target.build_dir, device=settings.device, threads=threads)
            runner.activate()
            loads[target.label] = {"status": "ok", "load_s": time.perf_counter() - load_start,
                                   "executed_precision": runner.executed_precision}
        except BackendUnavailable as exc:
            loads[target.label] = {"status": "unavailable", "error": str(exc)}
        except Exception as exc:
            loads[target.label] = {"status": "failed", "error": one_line(exc)}
        for batch in settings.batch_sizes:
            cell = Cell(target=target, batch=batch)
            if loads[target.label]["status"] != "ok":
                cell.status, cell.error = loads[target.label]["status"], loads[target.label]["error"]
            elif (reason := _does_not_fit(batch, activation_bytes, settings.device)) is not None:
                cell.status, cell.error = "failed", reason
            else:
                cell.runner = runner
            cells.append(cell)

    bar = _progress_bar(len(cells), f"bench {label}".strip(), progress)
    with bar:
        for cell in cells:
            if cell.runner is not None:
                bar.set_postfix_str(f"warm-up {cell.target.label} b{cell.batch}")
                _prepare_cell(cell, input_shape, settings, clock, memory)
            if cell.status != "ok":
                bar.update(1)
        twins = {id(twin.target): twin for twin in _bare_cells(cells, settings)}
        # each bare twin runs right after its runner cell in every round, so both see the same machine state
        cells = [c for cell in cells for c in ([cell, twins[id(cell.target)]] if cell.kind == "runner" and
                 id(cell.target) in twins and cell.batch == twins[id(cell.target)].batch else [cell])]
        bar.total = sum(1 for c in cells if c.kind == "runner") + sum(1 for c in cells if c.kind == "bare")
        bar.set_postfix_str("timed rounds")
        rounds = _run_rounds(cells, settings, clock, bar)
        rounds += _remeasure_unstable(cells, settings, clock)

    for target in targets:
        runner = next((c.runner for c in cells if c.target is target and c.runner is not None), None)
        if runner is not None:
            with contextlib.suppress(Exception):
                runner.deactivate()

    def probe_again() -> dict[str, Any]:
        return measure_peaks(size=settings.gemm_size, device=settings.device, threads=settings.threads,
                             previous=peaks)

    def cell_results() -> list[dict[str, Any]]:
        return [_cell_result(c, cells, loads, macs_per_image, peaks, threads) for c in cells if c.kind == "runner"]

    if measured_here:  # once more after the runners are gone: the best of both is the machine's peak
        peaks = probe_again()
    results = cell_results()
    if measured_here and any((r.get("pct_of_peak") or 0) > 100 for r in results):
        # a whole model outran both probes, so they ran in a slow moment (resnet50's openvino-bf16 at 103 % of a
        # 1,016 GFLOP/s probe that reached 1,156 the day before): probe a third time, keep the best
        peaks = probe_again()
        results = cell_results()
    return {"format": BENCH_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "warnings": _warnings(results, peaks), "machine": machine_info(), "versions": library_versions(),
            "settings": {**settings.to_dict(), "threads": threads}, "peaks_gflops": peaks, "rounds": rounds,
            "input_shape": list(input_shape), "macs_per_image": macs_per_image, "cells": results}


def _warnings(cells: list[dict[str, Any]], peaks: dict[str, Any]) -> list[str]:
    """What makes this run's numbers less trustworthy, in words."""
    warnings = []
    over = sorted({c["label"] for c in cells if (c.get("pct_of_peak") or 0) > 100})
    if over:
        probes = "; ".join(f"{p}: " + ", ".join(f"{lib} {v:.0f}" for lib, v in (peaks.get("sources") or {})
                                                  .get(p, {}).items()) for p in PEAK_PRECISIONS)
        warnings.append(f"{len(over)} cell(s) exceed the best measured GEMM peak ({', '.join(over)}): every "
                        f"library's matmul probe lost to a whole model (probes, GFLOP/s — {probes}); the peak probes "
                        "ran while the machine was busy or none of the libraries reaches this CPU's peak")
    unstable = [c for c in cells if c.get("unstable")]
    if unstable:
        warnings.append(f"{len(unstable)} of {len(cells)} cells stayed unstable after a second measurement (cv > "
                        f"{UNSTABLE_CV:.0%}): other processes are competing for the cores; `select` will not pick "
                        "them")
    return warnings


def _remeasure_unstable(cells: list[Cell], settings: BenchSettings, clock: _Clock) -> int:
    """Measure every unstable runner cell (and its bare twin) once more; each keeps its steadier series."""
    again = [c for c in cells if c.kind == "runner" and c.status == "ok" and len(c.samples_ms) > 1
             and is_unstable(latency_stats(c.samples_ms))]
    if not again:
        return 0
    again += [c for c in cells if c.kind == "bare" and any(c.target is r.target and c.batch == r.batch for r in again)]
    first = {id(c): (c.samples_ms, c.timed_s) for c in again}
    for c in again:
        c.samples_ms, c.timed_s, c.finished = [], 0.0, False
    rounds = _run_rounds(again, settings, clock)
    for c in again:
        old, old_timed = first[id(c)]
        if c.status != "ok" or not c.samples_ms or (
                len(old) > 1 and latency_stats(old)["cv"] <= latency_stats(c.samples_ms)["cv"]):
            c.samples_ms, c.timed_s, c.status, c.error = old, old_timed, "ok", None
        c.info["remeasured"] = True
    return rounds


def _bare_cells(cells: list[Cell], settings: BenchSettings) -> list[Cell]:
    """Bare-call twins of each default target's smallest-batch cell (same runner, same prepared input)."""
    if not settings.overhead:
        return []
    twins = []
    for cell in cells:
        if cell.kind != "runner" or cell.status != "ok" or cell.target.variant.name != "default" or \
                not cell.target.overhead:
            continue
        if cell.batch != min(c.batch for c in cells if c.target is cell.target and c.status == "ok"):
            continue
        call = cell.runner.bare_call_impl(cell.prepared)
        how = f"{cell.runner.backend} runner's bare_call_impl" if call else \
            f"{cell.runner.backend} has no bare runtime call to compare with"
        cell.info["bare_call"] = how
        if call is None:
            continue
        twin = Cell(target=cell.target, batch=cell.batch, kind="bare", status="ok", runner=cell.runner,
                    prepared=cell.prepared, call=call, block=cell.block, batch_input=cell.batch_input,
                    info={"bare_call": how})
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            cell.info["bare_call"] = f"{how}: failed ({one_line(exc)})"
            continue
        twins.append(twin)
    return twins


def _cell_result(cell: Cell, cells: list[Cell], loads: dict[str, dict], macs_per_image: int | None,
                 peaks: dict[str, Any], threads: int) -> dict[str, Any]:
    target, artifact = cell.target, cell.target.artifact
    load = loads.get(target.label, {})
    result: dict[str, Any] = {
        "label": target.label, "artifact": artifact.name, "backend": artifact.backend,
        "variant": target.variant.name,
        "options": dict(target.variant.options),  # what the variant sets on top of the artifact's options
        "precision": artifact.precision, "executed_precision": load.get("executed_precision"),
        "device": cell.runner.device if cell.runner else artifact.device, "batch": cell.batch,
        "threads": threads, "status": cell.status if cell.status != "pending" else "failed",
        "error": cell.error, "load_s": load.get("load_s"), "parity": target.parity.to_dict(),
    }
    result.update({k: v for k, v in cell.info.items() if k != "bare_call"})
    if cell.status != "ok" or not cell.samples_ms:
        return result
    stats = latency_stats(cell.samples_ms)
    result.update(stats)
    result["unstable"] = is_unstable(stats)
    p50_s = stats["p50_ms"] / 1000
    result["throughput_ips"] = cell.batch / p50_s if p50_s > 0 else None
    if macs_per_image:
        gflops = 2.0 * macs_per_image * cell.batch / p50_s / 1e9 if p50_s > 0 else None
        result["gflops"] = gflops
        klass = peak_class(result["executed_precision"] or artifact.precision)
        peak = peaks.get(klass) if klass else None
        result["peak_class"] = klass
        result["peak_source"] = (peaks.get("best") or {}).get(klass) if klass else None
        result["pct_of_peak"] = 100.0 * gflops / peak if gflops and peak and math.isfinite(peak) else None
    twin = next((c for c in cells if c.kind == "bare" and c.target is target and c.batch == cell.batch), None)
    if "bare_call" in cell.info:
        result["bare_call"] = cell.info["bare_call"]
    if twin is not None and twin.status == "ok" and twin.samples_ms:
        bare = latency_stats(twin.samples_ms)
        result["bare_p50_ms"], result["bare_min_ms"] = bare["p50_ms"], bare["min_ms"]
        # The overhead is a fixed cost per call: compared on the fastest calls, which other processes disturb
        # least (medians on a busy machine differ by more than the overhead itself).
        result.update(overhead_verdict(stats["min_ms"], bare["min_ms"]))
        result["overhead_p50_us"] = (stats["p50_ms"] - bare["p50_ms"]) * 1000
    elif twin is not None:
        result["bare_call"] = f"{cell.info.get('bare_call')}: {twin.error}"
    return result


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="cell", disable=not enabled, leave=False)


