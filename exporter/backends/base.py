"""The backend protocol: how an artifact is produced (`BuildContext` → `Artifact`) and how it is run (`Runner`).

A backend is one file under `exporter/backends/` holding a `Runner` subclass registered with
`@register_backend`, plus (when the backend has an artifact of its own) an `export_*(ctx) -> list[Artifact]`
function that `exporter.export` calls during a build. Optional libraries are imported inside methods only, so
a missing library makes the backend *unavailable* (with a reason), never an import error.

Runners follow Polygraphy's shape: the public methods (`activate`, `infer`, `deactivate`) do the checks and
the `*_impl` methods are the only thing a backend overrides. `infer` is split into `prepare_impl` (input
conversion, outside any timed region), `run_impl` (the runtime call alone, what a benchmark times) and
`finish_impl` (output conversion back to numpy).
"""

from __future__ import annotations

import difflib
import importlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from exporter.errors import ExporterError, UsageError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8")
DEVICES = ("cpu", "cuda")


class BackendUnavailable(ExporterError):
    """The backend cannot run here (library missing, no CUDA device, …); the message says why."""


class RunnerError(ExporterError):
    """A runner was misused or its runtime failed (bad input, artifact that does not load, …)."""


@dataclass
class Artifact:
    """One runnable product of a build, as recorded in `manifest.json`.

    `path` is relative to the build directory. `options` are passed to the runner's constructor (for example
    OpenVINO's `inference_precision`), so a manifest entry alone says how to run the artifact.
    """

    name: str  # unique within a build, e.g. "onnx-fp32", "openvino-bf16", "aoti"
    backend: str  # the runner's registry name
    path: str
    precision: str  # the precision it executes in
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"artifact {self.name}: unknown precision {self.precision!r} (one of {PRECISIONS})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildContext:
    """What an `export_*` function gets: the model, its traced program and where to write."""

    model_name: str
    model: Any  # torch.nn.Module in eval() mode, fp32, on the CPU
    input_shape: tuple[int, int, int]  # (C, H, W)
    out_dir: Path  # the (temporary) build directory; write files here only
    exported_program: Any = None  # torch.export.ExportedProgram, dynamic batch unless `static_batch`
    static_batch: int | None = None  # None: dynamic batch dimension
    max_batch: int = 64  # the largest batch an artifact must accept (TensorRT profiles, sweeps)
    fp16: bool = False
    int8: bool = False
    calibration: np.ndarray | None = None  # real training images, float32 NCHW, for int8 calibration
    metadata: dict[str, str] = field(default_factory=dict)  # model name, recipe, scaling, class names, hashes
    device: str = "cpu"
    artifacts: list[Artifact] = field(default_factory=list)  # produced so far (later stages find the ONNX here)
    warnings: list[str] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # per-stage facts for the manifest

    def artifact(self, name: str) -> Artifact | None:
        """A previously produced artifact by name, or None."""
        return next((a for a in self.artifacts if a.name == name), None)


class Runner(ABC):
    """Loads one artifact and runs float32 NCHW numpy batches through it."""

    backend: ClassVar[str]  # registry name
    description: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def __init__(self, path: str | Path, *, precision: str = "fp32", device: str = "cpu", **options: Any) -> None:
        if precision not in PRECISIONS:
            raise UsageError(f"{self.backend}: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if device not in DEVICES:
            raise UsageError(f"{self.backend}: unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        self.path = Path(path)
        self.precision = precision
        self.device = device
        self.options = options
        self.is_active = False

    # --- public API: checks around the *_impl methods --------------------------------------------------------

    @classmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        """None when the backend can run on `device` here, else a one-line reason."""
        if device not in cls.devices:
            return f"{cls.backend} does not run on {device}"
        return cls.available_impl(device)

    def activate(self) -> Runner:
        """Load the artifact; raises BackendUnavailable or RunnerError with a one-line reason."""
        reason = self.unavailable_reason(self.device)
        if reason:
            raise BackendUnavailable(reason)
        if not self.path.exists():
            raise RunnerError(f"{self.backend}: artifact {self.path} does not exist")
        try:
            self.activate_impl()
        except ExporterError:
            raise
        except Exception as exc:  # a runtime that cannot load the file: say which and why, in one line
            raise RunnerError(f"{self.backend}: cannot load {self.path.name}: {_one_line(exc)}") from exc
        self.is_active = True
        return self

    def prepare(self, batch: np.ndarray) -> Any:
        """Check a float32 NCHW batch and convert it to the runtime's input (not timed by benchmarks)."""
        if not self.is_active:
            raise RunnerError(f"{self.backend}: call activate() before infer()")
        if not isinstance(batch, np.ndarray) or batch.ndim != 4:
            raise RunnerError(f"{self.backend}: expected a 4-D NCHW numpy array, got {getattr(batch, 'shape', type(batch))}")
        if batch.dtype != np.float32:
            raise RunnerError(f"{self.backend}: expected float32 input, got {batch.dtype}")
        return self.prepare_impl(np.ascontiguousarray(batch))

    def run(self, prepared: Any) -> Any:
        """The runtime call alone, on an input from `prepare` (what benchmarks time)."""
        return self.run_impl(prepared)

    def finish(self, raw: Any, batch_size: int) -> np.ndarray:
        """Convert the runtime's output to a float32 numpy array and check its batch size."""
        out = np.asarray(self.finish_impl(raw), dtype=np.float32)
        if out.ndim < 1 or out.shape[0] != batch_size:
            raise RunnerError(f"{self.backend}: output batch {out.shape} does not match input batch {batch_size}")
        return out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch end to end: prepare, run, finish."""
        try:
            return self.finish(self.run(self.prepare(batch)), batch.shape[0])
        except ExporterError:
            raise
        except Exception as exc:
            raise RunnerError(f"{self.backend}: inference failed on {tuple(batch.shape)}: {_one_line(exc)}") from exc

    def deactivate(self) -> None:
        """Release the runtime's resources."""
        if self.is_active:
            self.deactivate_impl()
        self.is_active = False

    def sync(self) -> None:
        """Wait for queued device work (CUDA); a no-op on the CPU."""

    @property
    def executed_precision(self) -> str:
        """The precision the runtime actually executes (backends that can tell override this)."""
        return self.precision

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # --- what a backend overrides -----------------------------------------------------------------------------

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        """Import the backend's libraries and probe the device; return a reason when it cannot run."""
        return None

    @abstractmethod
    def activate_impl(self) -> None:
        """Load `self.path` into the runtime."""

    def prepare_impl(self, batch: np.ndarray) -> Any:
        return batch

    @abstractmethod
    def run_impl(self, prepared: Any) -> Any:
        """Run the runtime on a prepared input and return its raw output."""

    def finish_impl(self, raw: Any) -> np.ndarray:
        return np.asarray(raw)

    def deactivate_impl(self) -> None:
        pass

    def bare_call_impl(self, prepared: Any) -> Any:
        """Optional: a zero-argument callable running the runtime on `prepared` with nothing of ours around it.

        `exporter bench` times it beside `run` to measure the runner's overhead. None (the default) lets bench
        find the runtime object on the runner by type (ONNX Runtime session, OpenVINO request, torch module).
        """
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def import_optional(module: str) -> Any:
    """Import an optional library; a missing one raises BackendUnavailable naming it (never an ImportError)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{module} is not installed ({exc})") from exc


BACKENDS: dict[str, type[Runner]] = {}


def register_backend(cls: type[Runner]) -> type[Runner]:
    """Class decorator adding a Runner to the backend registry under `cls.backend`."""
    if cls.backend in BACKENDS:
        raise ValueError(f"backend {cls.backend!r} is registered twice")
    BACKENDS[cls.backend] = cls
    return cls


def get_backend(name: str) -> type[Runner]:
    """The Runner class of a backend name; an unknown name raises a UsageError naming the close matches."""
    try:
        return BACKENDS[name]
    except KeyError:
        close = difflib.get_close_matches(name, BACKENDS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known backends: {', '.join(BACKENDS)}"
        raise UsageError(f"unknown backend {name!r}: {hint}") from None


def runner_for(artifact: Artifact, build_dir: str | Path) -> Runner:
    """An (inactive) runner for a manifest artifact inside `build_dir`."""
    cls = get_backend(artifact.backend)
    return cls(Path(build_dir) / artifact.path, precision=artifact.precision, device=artifact.device,
               **artifact.options)
