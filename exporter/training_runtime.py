"""The process around a training run: which device, the torchrun process group, torch's thread count, SIGTERM
turned into a clean one-line exit (code 143) that says which epoch is saved, the images resized once per input
size, and the run's throughput against the machine's GEMM peak."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from exporter.data import to_model_tensor
from exporter.errors import ExporterError, UsageError

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by it


class TrainingInterrupted(ExporterError):
    """SIGTERM arrived during training; the message says which epoch's state is saved."""

    exit_code = SIGTERM_EXIT_CODE


def pick_device(device: str | None) -> torch.device:
    """The run's device: `device` if given, else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    run_device = torch.device(device) if device else torch.device(
        f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if run_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if run_device.type == "cuda" and run_device.index is None:
        run_device = torch.device(f"cuda:{local_rank}")
    if run_device.type == "cuda" and run_device.index >= torch.cuda.device_count():
        raise UsageError(f"process {run_device.index} has no GPU ({torch.cuda.device_count()} visible); "
                         f"start fewer processes or use --device cpu")
    return run_device


class Dist:
    """Rank / world size and collective helpers; a no-op world of one when not under torchrun."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = self.world_size > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        self.rank = dist.get_rank() if self.enabled else 0
        self.backend = dist.get_backend() if self.enabled else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        self.dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            self.dist.destroy_process_group()


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` for the block (unchanged when None)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_GLIBC_DEFAULT_TRIM_THRESHOLD, _GLIBC_DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def reused_heap(device: torch.device) -> Iterator[bool]:
    """On a CPU with glibc: keep freed memory in the process heap for the block, so every training step reuses the
    last step's pages instead of mapping (and zero-filling) fresh ones. Yields whether it applied.

    glibc maps each large block (an activation or its gradient) separately and unmaps it when freed: a step's
    hundreds of megabytes are page-faulted in again on every step. resnet50 at 224 px, batch 32, bf16 on 2 cores
    (`bench/heap_probe.py`): 271–305 k → 0–15 k minor page faults per step, 9.7–13.4 → 22.9–23.4 img/s. On exit the
    defaults come back and the heap is trimmed."""
    libc = None
    if device.type == "cpu" and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
    applied = bool(libc is not None and libc.mallopt(_M_MMAP_MAX, 0) and
                   libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    try:
        yield applied
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


class SigtermGuard:
    """While active, SIGTERM raises TrainingInterrupted naming the last saved epoch; deferred while writing files
    (an interrupted write would only be cleaned up, but the state it replaces is what the message promises)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.last_epoch: int | None = None
        self._writing = 0
        self._pending = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def message(self) -> str:
        if self.last_epoch is None:
            return "interrupted by SIGTERM before the first epoch completed; nothing saved"
        return (f"interrupted by SIGTERM; last completed epoch ({self.last_epoch}) saved in {self.state_dir} "
                f"(continue with --resume)")

    def _handle(self, signum: int, frame: object) -> None:
        if self._writing:
            self._pending = True
            return
        raise TrainingInterrupted(self.message())

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold SIGTERM back until the block's files are written."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        if not self._writing and self._pending:
            raise TrainingInterrupted(self.message())


# --- images and throughput -----------------------------------------------------------------------------------------


class ResizedImages:
    """A split's images decoded and resized once per input size, kept as uint8 (N, C, H, W) tensors, so a training
    step only indexes and scales a batch — no per-image Python work, no resize per step.

    Resizing follows `to_model_tensor` (bilinear, antialiased) and is rounded back to whole pixel values, as a
    resized image file would be. A size whose images would take more than half the memory available is not kept:
    its batches are resized one by one instead.
    """

    def __init__(self, images: np.ndarray, channels: int, memory_bytes: int | None) -> None:
        self.images = images
        self.channels = channels  # the model's; grayscale data is expanded to them per batch (a view, no copy)
        self.data_channels = 3 if images.ndim == 4 else 1
        self.memory_bytes = memory_bytes
        self._by_size: dict[int, torch.Tensor | None] = {}

    def _resized(self, size: int) -> torch.Tensor | None:
        if size not in self._by_size:
            needed = len(self.images) * self.data_channels * size * size
            if self.memory_bytes is not None and needed > self.memory_bytes // 2:
                self._by_size[size] = None
            else:
                parts = [to_model_tensor(self.images[i:i + 512], (self.data_channels, size, size))
                         .mul_(255).round_().to(torch.uint8) for i in range(0, len(self.images), 512)]
                self._by_size = {size: torch.cat(parts)}  # one size at a time: stages only go up
        return self._by_size[size]

    def batch(self, index: np.ndarray, size: int, *, channels_last: bool) -> torch.Tensor:
        """float32 NCHW images in [0, 1] of `index` at size×size."""
        cached = self._resized(size)
        if cached is None:
            x = to_model_tensor(self.images[index], (self.channels, size, size))
        else:
            x = cached[torch.from_numpy(index)].to(torch.float32).div_(255.0)
            if self.data_channels == 1 and self.channels != 1:
                x = x.expand(-1, self.channels, -1, -1)
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class Throughput:
    """Examples, seconds and training FLOPs (3 × the forward pass: forward, input and weight gradients) of a run,
    and the load average while it ran (a loaded machine's numbers are marked, not published as its speed)."""

    def __init__(self, model: str, channels: int, num_classes: int) -> None:
        self.model, self.channels, self.num_classes = model, channels, num_classes
        self._macs: dict[int, int] = {}
        self.flops = 0.0
        self.load_averages: list[float] = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []

    def add(self, examples: int, size: int) -> None:
        if size not in self._macs:
            from exporter.models import count_macs, create_model

            with torch.device("meta"):
                net = create_model(self.model, in_channels=self.channels, num_classes=self.num_classes).eval()
            self._macs[size] = count_macs(net, (1, self.channels, size, size))
        self.flops += 3 * 2 * self._macs[size] * examples

    def sample_load(self) -> None:
        if hasattr(os, "getloadavg"):
            self.load_averages.append(os.getloadavg()[0])

    def report(self, seconds: float, precision: str, device: torch.device) -> dict[str, Any]:
        """GFLOP/s and its share of the GEMM peak at `precision` measured now, with every runtime's probe."""
        from exporter.machine import measure_peaks, usable_cores

        gflops = self.flops / max(seconds, 1e-9) / 1e9
        out: dict[str, Any] = {"train_gflops": gflops, "peak_precision": precision, "peak_gflops": None,
                               "pct_of_peak": None, "load_average": max(self.load_averages, default=None)}
        if device.type == "cpu":
            peaks = measure_peaks(size=2048, device="cpu", threads=torch.get_num_threads())
            peak = peaks.get(precision)
            if peak and math.isfinite(peak):
                out.update(peak_gflops=peak, peak_source=peaks["best"].get(precision),
                           pct_of_peak=100.0 * gflops / peak)
            load = out["load_average"]
            out["loaded"] = load is not None and load > usable_cores() + 0.5
        return out
