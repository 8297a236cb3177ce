"""The process around a training run: which device, the torchrun process group, torch's thread count, and
SIGTERM turned into a clean one-line exit (code 143) that says which epoch is saved."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

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
