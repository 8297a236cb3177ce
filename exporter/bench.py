"""`exporter bench`: one timing method for every backend, so latency numbers are comparable.

Method (the same for every artifact, backend and batch size):

1. Load the artifact (load time recorded) and prepare a seeded random batch with `Runner.prepare` — input
   conversion and host→device copies happen here, outside every timed region.
2. First call, timed on its own (`first_call_ms`: lazy compilation, allocator warm-up, autotuning), then
   `warmup` more calls, counted separately and never mixed into the statistics. Peak memory is read over
   these calls (RSS high-water on the CPU, `torch.cuda.max_memory_allocated` on CUDA).
3. Timed calls, interleaved: every round runs a short block (`block_s`) of calls of every cell in turn, so
   machine drift (other processes, clocks, thermals) hits every backend alike; a block of several calls starts
   with one untimed call so that switching runtimes (caches, thread pools waking up) is charged to no one. A cell
   stops after `min_runs` calls and `budget_s` seconds of timed calls, or at `max_runs`.
   CPU: `time.perf_counter_ns` around `Runner.run` alone. CUDA: CUDA events around `Runner.run` +
   `Runner.sync`, inputs already on the device; host→device and device→host copies are timed separately.
4. Statistics per cell: min, p50, p90, p99, mean, stdev, coefficient of variation (a cell above
   `UNSTABLE_CV` is flagged `unstable`), throughput (batch / p50), achieved GFLOP/s (2 × MACs / p50) against
   the machine's fp32 and bf16 GEMM peak measured by the same process (`gemm_peak_gflops`), and the
   runner's overhead against a bare call of the same runtime on the same input (`bare_call`; compared on the
   fastest calls of each, timed back to back in every round).

Each cell carries the precision the runtime executed and the artifact's parity status, so a fast but wrong
artifact is never shown unmarked. A cell that fails (out of memory, runtime crash) is recorded with its error
and the others continue.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from exporter.backends.base import Artifact, BackendUnavailable, Runner, get_backend
from exporter.errors import ExporterError, UsageError

BENCH_FILE = "bench.json"
RESULT_FORMAT = 1
DEFAULT_BATCH_SIZES = (1, 8, 32)
UNSTABLE_CV = 0.10  # stdev / mean above this: the cell's timing is flagged unstable
OVERHEAD_MAX_FRACTION = 0.03  # runner overhead budget: ≤ 3 % of the bare call …
OVERHEAD_MAX_US = 20.0  # … or ≤ 20 µs, whichever is larger
REDUCED_PRECISIONS = ("bf16", "fp16")  # compared with the bf16 GEMM peak; fp32/tf32 with the fp32 peak
INPUT_SEED = 1234
ORACLE_BACKENDS = ("onnx_reference",)  # benchmarked only when named with --backends
DEVICE_AGNOSTIC_BACKENDS = ("eager", "inductor")  # artifacts are weights: they run on any device
# The runner option through which each runtime takes its CPU thread count (torch-based runners follow
# torch.set_num_threads, which bench sets for the whole process).
THREAD_OPTIONS = {"onnxruntime": "intra_op_num_threads", "openvino": "inference_num_threads"}
LIBRARIES = ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt",
             "onnxscript", "matplotlib")


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
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs:
            raise UsageError("need warmup ≥ 0, min_runs ≥ 1 and max_runs ≥ min_runs")
        if self.budget_s < 0 or self.block_s <= 0:
            raise UsageError("need budget_s ≥ 0 and block_s > 0")

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "device": self.device, "threads": self.threads,
                "warmup": self.warmup, "min_runs": self.min_runs, "max_runs": self.max_runs,
                "budget_s": self.budget_s, "block_s": self.block_s, "gemm_size": self.gemm_size,
                "clock": "cuda events" if self.device == "cuda" else "time.perf_counter_ns",
                "unstable_cv": UNSTABLE_CV}


@dataclass
class BenchTarget:
    """One thing to time: an artifact of a build, run with its options (`variant` "default") or tuned ones."""

    artifact: Artifact
    build_dir: Path
    variant: str = "default"  # "default", "tuned", or a tuning candidate label
    extra_options: dict[str, Any] = field(default_factory=dict)  # on top of the artifact's own options
    parity: dict[str, Any] = field(default_factory=lambda: {"status": "unverified"})

    @property
    def label(self) -> str:
        return self.artifact.name if self.variant == "default" else f"{self.artifact.name}+{self.variant}"

    def make_runner(self, device: str, threads: int | None = None) -> Runner:
        """An inactive runner; on the CPU the runtime's own thread option is set to `threads` unless given."""
        cls = get_backend(self.artifact.backend)
        options = {**self.artifact.options, **self.extra_options}
        thread_option = THREAD_OPTIONS.get(self.artifact.backend)
        if device == "cpu" and threads and thread_option and options.get(thread_option) is None:
            options[thread_option] = threads
        return cls(self.build_dir / self.artifact.path, precision=self.artifact.precision, device=device,
                   **options)


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
    """Which GEMM peak an executed precision is compared with (None: int8, no float peak applies)."""
    if precision in ("fp32", "tf32"):
        return "fp32"
    if precision in REDUCED_PRECISIONS:
        return "bf16"
    return None


# --- machine ---------------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (None: every core this process may use); returns the count."""
    import torch

    if threads is None:
        threads = usable_cores()
    torch.set_num_threads(threads)
    return threads


def usable_cores() -> int:
    """Cores this process may run on (affinity mask where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gemm_peak_gflops(precision: str = "fp32", *, size: int = 2048, device: str = "cpu", repeats: int = 5,
                     budget_s: float = 2.0) -> float:
    """The machine's matrix-multiply peak in GFLOP/s: best of `repeats` n×n×n torch matmuls (2·n³ FLOPs).

    Measured in the calling process with its thread setting, so it is the bar that process's models can reach.
    """
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise UsageError(f"GEMM peak is measured for {', '.join(dtypes)}, not {precision}")
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator).to(device, dtypes[precision])
    b = torch.rand(size, size, generator=generator).to(device, dtypes[precision])
    flops = 2.0 * size**3
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        torch.mm(a, b)  # first call: library dispatch, packing buffers
        sync()
        best = math.inf
        deadline = time.perf_counter() + budget_s
        for i in range(repeats):
            start = time.perf_counter_ns()
            torch.mm(a, b)
            sync()
            best = min(best, (time.perf_counter_ns() - start) / 1e9)
            if i >= 1 and time.perf_counter() > deadline:
                break
    return flops / best / 1e9


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return []


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and driver: the facts a latency number depends on."""
    info: dict[str, Any] = {
        "hostname": platform.node(), "os": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_flags": _cpu_flags(), "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(), "gpu": None, "gpu_driver": None, "cuda": None,
    }
    with contextlib.suppress(OSError, ValueError):
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * page_size / 2**30, 1)
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            major, minor = torch.cuda.get_device_capability(0)
            info["gpu_compute_capability"] = f"{major}.{minor}"
    if info["gpu"] and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            info["gpu_driver"] = out.splitlines()[0] if out else None
    return info


def machine_slug(info: dict[str, Any] | None = None) -> str:
    """A short file-name-safe machine name: CPU model, usable cores and GPU (e.g. `amd-epyc-2c`)."""
    info = info or machine_info()
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", "", info["cpu"].lower())
    parts = [re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "cpu", f"{info['usable_cores']}c"]
    if info.get("gpu"):
        parts.append(re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower().replace("nvidia", "")).strip("-"))
    return "-".join(parts)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the runtimes (None where not installed), read without importing them."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --- memory ----------------------------------------------------------------------------------------------------


class MemoryProbe:
    """Peak memory over a region: RSS high-water (Linux `VmHWM`, reset through `clear_refs`) or CUDA allocator."""

    def __init__(self, device: str) -> None:
        self.device = device

    @staticmethod
    def _status_kb(key: str) -> int | None:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return None

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(OSError):  # "5" resets the high-water mark to the current RSS (Linux ≥ 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        self._base = self._status_kb("VmRSS")

    def stop(self) -> dict[str, float | None]:
        """{"peak_mb", "delta_mb"}: the high-water mark during the region and its rise over the start."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"peak_mb": peak / 2**20, "delta_mb": (peak - self._base) / 2**20, "kind": "cuda allocated"}
        peak_kb = self._status_kb("VmHWM")
        if peak_kb is None:
            import resource

            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not resettable: process-wide
        delta = (peak_kb - self._base) / 1024 if self._base is not None else None
        return {"peak_mb": peak_kb / 1024, "delta_mb": delta, "kind": "process RSS high-water"}


# --- bare runtime calls ----------------------------------------------------------------------------------------


def bare_call(runner: Runner, prepared: Any) -> tuple[Callable[[], Any] | None, str]:
    """A zero-argument call of the runner's runtime on `prepared` with nothing of ours around it.

    A runner may provide it (`bare_call_impl(prepared)`); otherwise the runtime object is found on the runner
    by type: an ONNX Runtime session, an OpenVINO compiled model or infer request, an AOTInductor package or a
    torch module. Returns (callable or None, how it was found or why not).
    """
    hook = getattr(runner, "bare_call_impl", None)
    if callable(hook):
        call = hook(prepared)
        if call is not None:
            return call, "runner.bare_call_impl"
    found: dict[str, tuple[str, Any]] = {}
    for attr, value in vars(runner).items():
        cls = type(value)
        module, name = cls.__module__, cls.__name__
        if module.startswith("onnxruntime") and name == "InferenceSession":
            found.setdefault("ort", (attr, value))
        elif module.startswith("openvino") and name == "InferRequest":
            found.setdefault("ov_request", (attr, value))
        elif module.startswith("openvino") and name == "CompiledModel":
            found.setdefault("ov_compiled", (attr, value))
        elif "AOTICompiledModel" in name or "aoti" in name.lower():
            found.setdefault("aoti", (attr, value))
        elif name == "OptimizedModule":
            found.setdefault("compiled", (attr, value))
        elif _is_torch_module(value):
            found.setdefault("module", (attr, value))
    if "ort" in found:
        attr, session = found["ort"]
        binding = next((v for v in vars(runner).values() if type(v).__name__ in ("SessionIOBinding", "IOBinding")),
                       None)
        if binding is not None and runner.device == "cuda":  # inputs and outputs already bound on the device
            return (lambda: session.run_with_iobinding(binding)), f"onnxruntime run_with_iobinding (runner.{attr})"
        feeds = prepared if isinstance(prepared, dict) else {session.get_inputs()[0].name: prepared}
        return (lambda: session.run(None, feeds)), f"onnxruntime InferenceSession.run (runner.{attr})"
    if "ov_request" in found:
        attr, request = found["ov_request"]
        return (lambda: request.infer(prepared)), f"openvino InferRequest.infer (runner.{attr})"
    if "ov_compiled" in found:
        attr, compiled = found["ov_compiled"]
        return (lambda: compiled(prepared)), f"openvino CompiledModel call (runner.{attr})"
    args = prepared if isinstance(prepared, (list, tuple)) else (prepared,)
    for kind in ("aoti", "compiled", "module"):
        if kind in found:
            attr, module = found[kind]
            if kind == "aoti":
                return (lambda: module(*args)), f"AOTInductor package call under inference_mode (runner.{attr})"
            return (lambda: module(*args)), f"torch module call under inference_mode (runner.{attr})"
    return None, f"{runner.backend} runner exposes no runtime object to call directly"


def _is_torch_module(value: Any) -> bool:
    with contextlib.suppress(ImportError):
        import torch

        return isinstance(value, torch.nn.Module)
    return False


# --- timing ----------------------------------------------------------------------------------------------------


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


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}"
    if "out of memory" in message.lower():
        message = "out of memory: " + message
    return message[:300]


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where the OS does not say)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


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
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device="meta"))
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
        warm_s = time.perf_counter() - warm_start
        cell.info.update(first_call_ms=first_ms, warmup_runs=settings.warmup + 1,
                         warmup_ms=warm_s * 1000, memory=memory.stop())
        per_call = max(warm_s / max(settings.warmup, 1), first_ms / 1000 if settings.warmup == 0 else 0.0, 1e-6)
        cell.block = max(1, min(settings.max_runs, int(settings.block_s / per_call)))
        cell.status = "ok"
        if settings.device == "cuda":
            cell.info["transfers"] = _time_transfers(runner, batch, raw, clock)
    except Exception as exc:  # one bad cell (OOM, crash, wrong output) must not stop the others
        cell.status, cell.error = "failed", _one_line(exc)
        cell.prepared = cell.call = None
        gc.collect()
        if settings.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def _time_transfers(runner: Runner, batch: np.ndarray, raw: Any, clock: _Clock, repeats: int = 5) -> dict:
    """CUDA: host→device (prepare), compute (run) and device→host (finish) in ms, p50 of `repeats` each."""
    h2d = [clock.time_ms(lambda: runner.prepare(batch), runner.sync) for _ in range(repeats)]
    d2h = [clock.time_ms(lambda: runner.finish(raw, batch.shape[0]), runner.sync) for _ in range(repeats)]
    prepared = runner.prepare(batch)
    total = [clock.time_ms(lambda: runner.finish(runner.run(prepared), batch.shape[0]), runner.sync)
             for _ in range(repeats)]
    return {"h2d_ms": float(np.median(h2d)), "d2h_ms": float(np.median(d2h)),
            "run_with_d2h_ms": float(np.median(total)),
            "end_to_end_ms": float(np.median(h2d)) + float(np.median(total))}


def _bare_context(cell: Cell) -> contextlib.AbstractContextManager:
    if cell.kind == "bare" and "inference_mode" in cell.info.get("bare_call", ""):
        import torch

        return torch.inference_mode()
    return contextlib.nullcontext()


def _run_rounds(cells: list[Cell], settings: BenchSettings, clock: _Clock, progress: Any = None) -> int:
    """Timed calls, round by round: each round runs one block of every unfinished cell in turn."""
    rounds = 0
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
                with _bare_context(cell):
                    if cell.block > 1:  # untimed: the switch from the previous runtime is charged to no one
                        cell.call()  # (a call longer than a block dwarfs the switch, so it is not repeated)
                        runner.sync()
                    for _ in range(cell.block):
                        ms = clock.time_ms(cell.call, runner.sync)
                        cell.samples_ms.append(ms)
                        cell.timed_s += ms / 1000
                        if len(cell.samples_ms) >= settings.max_runs:
                            break
            except Exception as exc:
                cell.status, cell.error = "failed", f"failed after {len(cell.samples_ms)} timed calls: " \
                                                     f"{_one_line(exc)}"
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
              settings: BenchSettings, peaks: dict[str, float] | None = None, progress: bool = False,
              label: str = "", activation_bytes: int | None = None) -> dict[str, Any]:
    """Time every target at every batch size with the one method above; returns the results document.

    `peaks` ({"fp32": GFLOP/s, "bf16": GFLOP/s}) are measured here when not given. `activation_bytes` (all
    layer outputs of one image) lets a CPU batch that cannot fit in the available memory be reported as a failed
    cell up front instead of inviting the kernel's OOM killer, which would end the whole run.
    """
    check_device(settings.device)
    threads = set_threads(settings.threads)
    if any(t.artifact.backend == "inductor" for t in targets):
        _allow_compiled_graphs(RECOMPILE_LIMIT)
    measured_here = peaks is None
    if peaks is None:
        peaks = measure_peaks(settings)
    clock = _Clock(settings.device)
    memory = MemoryProbe(settings.device)
    cells: list[Cell] = []
    loads: dict[str, dict[str, Any]] = {}
    for target in targets:
        runner = None
        load_start = time.perf_counter()
        try:
            runner = target.make_runner(settings.device, threads)
            runner.activate()
            loads[target.label] = {"status": "ok", "load_s": time.perf_counter() - load_start,
                                   "executed_precision": runner.executed_precision}
        except BackendUnavailable as exc:
            loads[target.label] = {"status": "unavailable", "error": str(exc)}
        except Exception as exc:
            loads[target.label] = {"status": "failed", "error": _one_line(exc)}
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

    for target in targets:
        runner = next((c.runner for c in cells if c.target is target and c.runner is not None), None)
        if runner is not None:
            with contextlib.suppress(Exception):
                runner.deactivate()
    if measured_here:  # once more after the runners are gone: the best of both is the machine's peak
        peaks = measure_peaks(settings, previous=peaks)
    results = [_cell_result(c, cells, loads, macs_per_image, peaks, threads) for c in cells if c.kind == "runner"]
    return {"format": RESULT_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "warnings": _warnings(results), "machine": machine_info(), "versions": library_versions(),
            "settings": {**settings.to_dict(), "threads": threads}, "peaks_gflops": peaks, "rounds": rounds,
            "input_shape": list(input_shape), "macs_per_image": macs_per_image, "cells": results}


def _warnings(cells: list[dict[str, Any]]) -> list[str]:
    """What makes this run's numbers less trustworthy, in words."""
    warnings = []
    over = [c["label"] for c in cells if (c.get("pct_of_peak") or 0) > 100]
    if over:
        warnings.append(f"{len(over)} cell(s) exceed the measured GEMM peak ({', '.join(sorted(set(over)))}): the "
                        "peak probe ran while the machine was busy; rerun on a quiet machine")
    unstable = [c for c in cells if c.get("unstable")]
    if unstable and len(unstable) * 2 >= len(cells):
        warnings.append(f"{len(unstable)} of {len(cells)} cells are unstable (cv > {UNSTABLE_CV:.0%}): other "
                        "processes are competing for the cores")
    return warnings


RECOMPILE_LIMIT = 64


def _allow_compiled_graphs(limit: int) -> None:
    """Raise Dynamo's per-function graph limit (default 8) for a bench process.

    Every inductor runner in one process compiles the same `forward` (one graph per batch-size range, per runner
    and per mode); past the limit Dynamo silently runs eager code, which would be timed under inductor's name.
    """
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) < limit:
            setattr(config, name, limit)


def measure_peaks(settings: BenchSettings, previous: dict[str, float] | None = None) -> dict[str, float]:
    """fp32 and bf16 GEMM peaks (GFLOP/s) on the bench device, with the bench's thread setting.

    With `previous`, the best of it and this measurement (a peak is the best the machine reached: on a shared
    machine one probe can land in a busy moment, so callers probe at the start and at the end of a run).
    """
    set_threads(settings.threads)
    peaks = {}
    for precision in ("fp32", "bf16"):
        try:
            peaks[precision] = gemm_peak_gflops(precision, size=settings.gemm_size, device=settings.device)
        except Exception:  # a CPU without bf16 matmul support: no bf16 bar rather than no benchmark
            peaks[precision] = float("nan")
        old = (previous or {}).get(precision)
        if old is not None and math.isfinite(old) and not old < peaks[precision]:
            peaks[precision] = old
    return peaks


def _bare_cells(cells: list[Cell], settings: BenchSettings) -> list[Cell]:
    """Bare-call twins of each default target's smallest-batch cell (same runner, same prepared input)."""
    if not settings.overhead:
        return []
    twins = []
    for cell in cells:
        if cell.kind != "runner" or cell.status != "ok" or cell.target.variant != "default":
            continue
        if cell.batch != min(c.batch for c in cells if c.target is cell.target and c.status == "ok"):
            continue
        call, how = bare_call(cell.runner, cell.prepared)
        cell.info["bare_call"] = how
        if call is None:
            continue
        twin = Cell(target=cell.target, batch=cell.batch, kind="bare", status="ok", runner=cell.runner,
                    prepared=cell.prepared, call=call, block=cell.block, batch_input=cell.batch_input,
                    info={"bare_call": how})
        try:
            with _bare_context(twin):
                call()
        except Exception as exc:
            cell.info["bare_call"] = f"{how}: failed ({_one_line(exc)})"
            continue
        twins.append(twin)
    return twins


def _cell_result(cell: Cell, cells: list[Cell], loads: dict[str, dict], macs_per_image: int | None,
                 peaks: dict[str, float], threads: int) -> dict[str, Any]:
    target, artifact = cell.target, cell.target.artifact
    load = loads.get(target.label, {})
    result: dict[str, Any] = {
        "label": target.label, "artifact": artifact.name, "backend": artifact.backend, "variant": target.variant,
        "options": dict(target.extra_options),  # what the variant sets on top of the artifact's options
        "precision": artifact.precision, "executed_precision": load.get("executed_precision"),
        "device": cell.runner.device if cell.runner else artifact.device, "batch": cell.batch,
        "threads": threads, "status": cell.status if cell.status != "pending" else "failed",
        "error": cell.error, "load_s": load.get("load_s"), "parity": target.parity,
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


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="cell", disable=not enabled, leave=False)


# --- builds ----------------------------------------------------------------------------------------------------


PARITY_FILE = "parity.json"
REFERENCE_PARITY = {"status": "reference", "source": "reference", "flips": 0, "samples": None, "flip_rate": 0.0,
                    "accuracy": None, "reference_accuracy": None, "acc_drop": 0.0, "max_abs_error": 0.0,
                    "reason": None}


def parity_status(manifest: dict[str, Any], build_dir: Path, artifact: str) -> dict[str, Any]:
    """The parity of one artifact from `exporter verify` (`parity.json`), else the build's quick parity.

    Returns {"status": "pass"|"fail"|"not run"|"unverified", "source": "verify"|"build"|None} plus, where the
    source has them, the numbers `select` needs: "flips", "samples", "flip_rate", "accuracy",
    "reference_accuracy", "acc_drop", "max_abs_error".
    """
    import json

    sources: list[tuple[str, Any]] = []
    path = Path(build_dir) / PARITY_FILE
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            sources.append(("verify", json.loads(path.read_text())))
    for key, source in (("verify", "verify"), ("parity", "build")):
        if isinstance(manifest.get(key), dict):
            sources.append((source, manifest[key]))
    for source, document in sources:
        entry = _find_entry(document, artifact)
        if isinstance(entry, dict):
            return {**_parity_numbers(entry, document), "source": source}
        reference = document.get("reference") if isinstance(document, dict) else None
        if isinstance(reference, dict) and reference.get("artifact") == artifact:
            # the eager fp32 reference: by definition no flips and no accuracy drop
            samples = document.get("samples")
            return {"status": "reference", "source": source, "flips": 0, "samples": samples,
                    "flip_rate": 0.0, "accuracy": reference.get("accuracy"),
                    "reference_accuracy": reference.get("accuracy"), "acc_drop": 0.0, "max_abs_error": 0.0,
                    "reason": None}
    return {"status": "unverified", "source": None}


def _find_entry(document: Any, artifact: str) -> dict[str, Any] | None:
    """The per-artifact entry of a parity document, keyed by artifact name or listed with a name field."""
    if not isinstance(document, dict):
        return None
    containers = [document] + [document[k] for k in ("artifacts", "backends", "results", "summary")
                               if k in document]
    for container in containers:
        if isinstance(container, dict) and isinstance(container.get(artifact), dict):
            return container[artifact]
        if isinstance(container, dict) and isinstance(container.get(artifact), str):
            return {"status": container[artifact]}  # the manifest's `verify` summary: status only
        if isinstance(container, list):
            for entry in container:
                if isinstance(entry, dict) and artifact in (entry.get("artifact"), entry.get("name")):
                    return entry
    return None


def _first(entry: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if entry.get(key) is not None:
            return entry[key]
    return None


def _parity_numbers(entry: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """Status and select's numbers from one artifact's entry (verify's `sets` layout, or flat keys)."""
    status = _first(entry, "status", "verdict")
    if status is None and _first(entry, "passed", "pass", "ok") is not None:
        status = "pass" if _first(entry, "passed", "pass", "ok") else "fail"
    status = {"passed": "pass", "ok": "pass", "failed": "fail", "skipped": "not run"}.get(
        str(status).lower(), str(status).lower()) if status is not None else "unverified"
    flat = dict(entry)
    sets = entry.get("sets") or []
    real = next((s for s in sets if isinstance(s, dict) and s.get("name") == "real"), None)
    if real is not None:  # `exporter verify`: the real test images carry flips and accuracy
        flat.update({k: v for k, v in (real.get("metrics") or {}).items() if v is not None})
        errors = [s["metrics"].get("max_abs") for s in sets if isinstance(s.get("metrics"), dict)]
        numeric = [float(e) if not isinstance(e, str) else math.inf for e in errors if e is not None]
        if numeric:
            flat["max_abs_error"] = max(numeric)
    samples = _first(flat, "n", "samples", "n_samples", "num_samples", "images") or _first(
        document, "images", "samples")
    flips = _first(flat, "flipped", "flips", "top1_flips", "n_flips")
    agreement = _first(flat, "agreement", "top1_agreement")
    if flips is None and agreement is not None and samples:
        flips = round((1 - float(agreement)) * int(samples))
    accuracy = _first(flat, "accuracy", "test_accuracy", "backend_accuracy")
    reference = _first(flat, "reference_accuracy", "eager_accuracy")
    if reference is None and isinstance(document.get("reference"), dict):  # verify: {"artifact", "accuracy"}
        reference = document["reference"].get("accuracy")
    elif reference is None and isinstance(document.get("reference"), str):  # build's quick parity: a name
        reference = (_find_entry(document, document["reference"]) or {}).get("accuracy")
    out: dict[str, Any] = {"status": status, "flips": flips, "samples": samples,
                           "flip_rate": flips / samples if flips is not None and samples else None,
                           "accuracy": accuracy, "reference_accuracy": reference, "acc_drop": None,
                           "max_abs_error": _first(flat, "max_abs_error", "max_abs", "max_abs_err"),
                           "reason": entry.get("reason") or None}
    if accuracy is not None and reference is not None:
        out["acc_drop"] = _as_percent(reference) - _as_percent(accuracy)
    return out


def _as_percent(value: float) -> float:
    """Accuracy in percentage points whether stored as a fraction (0.91) or a percentage (91.0)."""
    value = float(value)
    return value * 100 if value <= 1.0 else value


def targets_for_build(build: Any, backends: Iterable[str] | None = None, *, tuned: bool = True,
                      device: str = "cpu") -> list[BenchTarget]:
    """Bench targets of a build: every artifact for `device` (or those of `backends`), plus tuned variants.

    An artifact compiled for one device (an AOTI package, a TensorRT engine, a CUDA-provider session) runs only
    there; the weights-based ones (eager, inductor) run wherever their runner does.
    """
    wanted = set(backends) if backends else None
    artifacts = build.artifacts
    if not wanted:  # oracles check correctness; nobody deploys them, and they take seconds per image
        artifacts = [a for a in artifacts if a.backend not in ORACLE_BACKENDS]
    artifacts = [a for a in artifacts if a.device == device or a.backend in DEVICE_AGNOSTIC_BACKENDS]
    if wanted:
        unknown = wanted - {a.backend for a in artifacts} - {a.name for a in artifacts}
        for name in unknown:
            get_backend(name)  # an unknown backend name raises with close matches
        if unknown:
            have = ", ".join(sorted({a.backend for a in artifacts}))
            raise UsageError(f"build {build.dir} has no artifact of {', '.join(sorted(unknown))} (it has: {have})")
        artifacts = [a for a in artifacts if a.backend in wanted or a.name in wanted]
    tuning = build.manifest.get("tuning") or {}
    if tuned and tuning and tuning.get("machine") != machine_slug():
        tuned = False  # settings tuned on another machine say nothing about this one
    targets = []
    for artifact in artifacts:
        parity = parity_status(build.manifest, build.dir, artifact.name)
        if artifact.backend == "eager" and artifact.precision == "fp32" and parity["status"] == "unverified":
            parity = REFERENCE_PARITY  # the fp32 reference that every other artifact is compared with
        targets.append(BenchTarget(artifact, build.dir, parity=parity))
        winner = (tuning.get("artifacts") or {}).get(artifact.name)
        if tuned and winner and winner.get("options"):
            tuned_parity = parity
            if winner["options"].get("inference_precision") == "bf16":  # parity of the bf16 artifact applies
                bf16 = next((a for a in build.artifacts if a.backend == artifact.backend and a.precision == "bf16"),
                            None)
                tuned_parity = parity_status(build.manifest, build.dir, bf16.name) if bf16 else {
                    "status": "unverified", "source": None}
            targets.append(BenchTarget(artifact, build.dir, variant="tuned", extra_options=winner["options"],
                                       parity=tuned_parity))
    return targets


def bench_build(build: Any, settings: BenchSettings, *, backends: Iterable[str] | None = None,
                peaks: dict[str, float] | None = None, progress: bool = False, save: bool = True
                ) -> dict[str, Any]:
    """Benchmark a loaded build (`exporter.manifest.Build`); saves `bench.json` and a manifest `bench` section."""
    from exporter.manifest import update_manifest, write_json_atomic
    from exporter.models import count_macs, create_model

    targets = targets_for_build(build, backends, device=settings.device)
    if not targets:
        raise BenchError(f"build {build.dir} has no artifacts to benchmark")
    import torch

    with torch.device("meta"):
        net = create_model(build.model, in_channels=build.input_shape[0], num_classes=build.num_classes).eval()
    macs = count_macs(net, (1, *build.input_shape))
    results = run_bench(targets, input_shape=build.input_shape, macs_per_image=macs, settings=settings,
                        peaks=peaks, progress=progress, label=build.model,
                        activation_bytes=activation_bytes_per_image(net, build.input_shape))
    results.update(model=build.model, build_dir=str(build.dir), build_id=build.build_id)
    if save:
        write_json_atomic(build.dir / BENCH_FILE, results)
        update_manifest(build, "bench", {"file": BENCH_FILE, "created": results["created"],
                                         "machine": machine_slug(results["machine"]),
                                         "threads": results["settings"]["threads"],
                                         "device": settings.device, "summary": summarize(results)})
    return results


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: label, batch, status, p50 ms, throughput, executed precision, parity status (for manifests)."""
    return [{"label": c["label"], "batch": c["batch"], "status": c["status"], "p50_ms": c.get("p50_ms"),
             "throughput_ips": c.get("throughput_ips"), "executed_precision": c.get("executed_precision"),
             "parity": c["parity"].get("status"), "unstable": c.get("unstable")} for c in results["cells"]]


def load_results(build_dir: Path) -> dict[str, Any] | None:
    """The saved `bench.json` of a build, or None."""
    import json

    path = Path(build_dir) / BENCH_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None


# --- tuning ----------------------------------------------------------------------------------------------------

TUNE_MIN_GAIN = 0.03  # a candidate must beat the runtime's default by 3 % to win (else noise picks winners)


def _accepts_option(backend: str, option: str) -> bool:
    """Whether a runner takes `option` as a named constructor argument or reads it from its options."""
    import inspect

    cls = get_backend(backend)
    if option in inspect.signature(cls.__init__).parameters:
        return True
    module = inspect.getmodule(cls)
    with contextlib.suppress(OSError, TypeError):
        return f'"{option}"' in inspect.getsource(module)  # options read with self.options.get("...")
    return False


def tuning_space(artifact: Artifact, *, device: str, threads: int, bf16_parity: dict[str, Any] | None = None
                 ) -> list[tuple[str, dict[str, Any]]]:
    """Candidate option sets a skilled user would try by hand for one artifact, as (label, options).

    CPU — onnxruntime: graph optimisation level, intra-op threads, execution mode; openvino: performance hint,
    streams, CPU pinning (and bf16 inference when `bf16_parity` shows a passing bf16 parity); inductor:
    max-autotune and freezing where the runner takes them. CUDA — inductor: CUDA graphs (`reduce-overhead`) and
    max-autotune. Eager (the reference) has none.
    """
    backend, candidates = artifact.backend, []
    if device == "cuda":
        if backend == "inductor" and _accepts_option("inductor", "mode"):
            candidates += [("cudagraphs", {"mode": "reduce-overhead"}), ("max-autotune", {"mode": "max-autotune"})]
        return candidates
    if device != "cpu":
        return []
    if backend == "onnxruntime":
        for level in ("all", "extended", "basic"):
            if artifact.options.get("graph_optimization_level", "all") != level:
                candidates.append((f"opt={level}", {"graph_optimization_level": level}))
        if threads > 1:
            candidates.append(("intra=1", {"intra_op_num_threads": 1}))
        candidates.append(("parallel", {"execution_mode": "parallel"}))
    elif backend == "openvino":
        candidates += [("hint=LATENCY", {"performance_hint": "LATENCY"}),
                       ("hint=THROUGHPUT", {"performance_hint": "THROUGHPUT"}),
                       ("streams=1", {"num_streams": 1})]
        if threads > 1:
            candidates.append(("hint=THROUGHPUT,streams=2", {"performance_hint": "THROUGHPUT", "num_streams": 2}))
        if _accepts_option("openvino", "enable_cpu_pinning"):
            candidates.append(("hint=LATENCY,pinning", {"performance_hint": "LATENCY", "enable_cpu_pinning": True}))
        if bf16_parity and bf16_parity.get("status") == "pass" and artifact.precision in ("fp32", "fp16"):
            candidates.append(("bf16", {"inference_precision": "bf16", "performance_hint": "LATENCY"}))
    elif backend == "inductor":
        if _accepts_option("inductor", "mode"):
            candidates.append(("max-autotune", {"mode": "max-autotune-no-cudagraphs"}))
        if _accepts_option("inductor", "freezing"):
            candidates.append(("freezing", {"freezing": True}))
            if _accepts_option("inductor", "mode"):
                candidates.append(("freezing+max-autotune", {"freezing": True, "mode": "max-autotune-no-cudagraphs"}))
    return candidates


def tune_build(build: Any, settings: BenchSettings, *, batch: int | None = None,
               backends: Iterable[str] | None = None, allow_bf16: bool = False, progress: bool = False,
               save: bool = True) -> dict[str, Any]:
    """Time every artifact's tuning candidates against its defaults (same method, interleaved) at one batch.

    The winner per artifact (≥ TUNE_MIN_GAIN faster than the default, else the default) is written to the
    manifest's `tuning` section, which later `bench` runs use as a "tuned" variant on the same machine.
    `allow_bf16` (the user accepts reduced precision; implied by a build made with `--fp16`) adds bf16
    inference where a bf16 artifact of the same backend passed parity.
    """
    from exporter.manifest import update_manifest

    threads = set_threads(settings.threads)
    batch = batch or min(settings.batch_sizes)
    allow_bf16 = allow_bf16 or bool((build.manifest.get("options") or {}).get("fp16"))
    defaults = [t for t in targets_for_build(build, backends, tuned=False, device=settings.device)
                if t.artifact.backend != "eager"]
    targets: list[BenchTarget] = []
    for default in defaults:
        bf16_parity = None
        if allow_bf16:
            bf16 = next((a for a in build.artifacts if a.backend == default.artifact.backend
                         and a.precision == "bf16"), None)
            bf16_parity = parity_status(build.manifest, build.dir, bf16.name) if bf16 else None
        targets.append(default)
        for label, options in tuning_space(default.artifact, device=settings.device, threads=threads,
                                           bf16_parity=bf16_parity):
            parity = bf16_parity if options.get("inference_precision") == "bf16" else default.parity
            targets.append(BenchTarget(default.artifact, build.dir, variant=label, extra_options=options,
                                       parity=parity))
    if not targets:
        raise BenchError(f"build {build.dir} has nothing to tune (no artifact other than eager)")
    tune_settings = BenchSettings(**{**settings.__dict__, "batch_sizes": (batch,), "overhead": False})
    import torch

    from exporter.models import count_macs, create_model

    with torch.device("meta"):
        net = create_model(build.model, in_channels=build.input_shape[0], num_classes=build.num_classes).eval()
    results = run_bench(targets, input_shape=build.input_shape, macs_per_image=count_macs(net, (1, *build.input_shape)),
                        settings=tune_settings, progress=progress, label=f"tune {build.model}")
    if any(t.artifact.backend == "inductor" for t in targets):
        torch._dynamo.reset()  # the candidates' compiled graphs are gone with their runners: start the bench clean
    tuning: dict[str, Any] = {"created": results["created"], "machine": machine_slug(results["machine"]),
                              "threads": threads, "device": settings.device, "batch": batch,
                              "min_gain": TUNE_MIN_GAIN, "artifacts": {}}
    for default in defaults:
        name = default.artifact.name
        cells = [c for c in results["cells"] if c["artifact"] == name]
        base = next((c for c in cells if c["variant"] == "default"), None)
        ok = [c for c in cells if c["status"] == "ok"]
        entry: dict[str, Any] = {"candidates": [
            {"variant": c["variant"], "options": c["options"], "status": c["status"], "p50_ms": c.get("p50_ms"),
             "cv": c.get("cv"), "executed_precision": c.get("executed_precision"), "error": c.get("error")}
            for c in cells]}
        best = min(ok, key=lambda c: c["p50_ms"], default=None)
        base_p50 = base.get("p50_ms") if base and base["status"] == "ok" else None
        entry["default_p50_ms"] = base_p50
        if best is not None and best["variant"] != "default" and (
                base_p50 is None or best["p50_ms"] < base_p50 * (1 - TUNE_MIN_GAIN)):
            entry.update(variant=best["variant"], options=best["options"], p50_ms=best["p50_ms"],
                         speedup=base_p50 / best["p50_ms"] if base_p50 else None,
                         executed_precision=best.get("executed_precision"))
        else:
            entry.update(variant="default", options={}, p50_ms=base_p50, speedup=1.0 if base_p50 else None)
        tuning["artifacts"][name] = entry
    previous = build.manifest.get("tuning") or {}
    if previous.get("machine") == tuning["machine"] and previous.get("threads") == threads:
        # tuning a subset of backends keeps the winners of the others
        tuning["artifacts"] = {**(previous.get("artifacts") or {}), **tuning["artifacts"]}
    if save:
        update_manifest(build, "tuning", tuning)
    return tuning
