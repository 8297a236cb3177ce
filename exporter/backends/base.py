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

import contextlib
import difflib
import importlib
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from exporter.errors import ExporterError, UsageError, one_line

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8")
DEVICES = ("cpu", "cuda")
# Every int8 artifact's build-time goal on held-back calibration images: the judge's int8 class with this top-1
# agreement and worst cosine; below it, the backend leaves its most sensitive layers in fp32. Stricter than the
# class itself (0.99 / 0.99): `exporter verify` judges twice as many images, and the worst of more images is worse
# (densenet: 0.991 on 128 held-back images, 0.986 on 256 test images; resnet50v2's onnx-int8 built to 0.99 agreed
# on 0.988 of 256 test images). A default build's 128 held-back images are the hardest of 1,024 and their flips
# count against the 1,024 (`exporter.build_inputs.HELD_BACK_POOL`): 0.995 admits 5. They carry no labels, so the
# class's accuracy-drop bar is judged at verification only (a flip is the only way to lose).
INT8_MIN_AGREEMENT = 0.995
INT8_MIN_COSINE = 0.995
# and this share of the class's atol / rtol (googlenet's openvino-int8 passed the full bars on 128 held-back images
# and missed them on one logit of 320 test images: 3.01 > 2.91 allowed)
INT8_ABS_SHARE = 0.75


def int8_build_bars() -> Any:
    """The judge's int8 class at the build-time bars above (a `Tolerance`)."""
    from exporter.judge import tolerance_for

    tol = tolerance_for("int8", min_agreement=INT8_MIN_AGREEMENT)
    return replace(tol, min_cosine=INT8_MIN_COSINE, atol=tol.atol * INT8_ABS_SHARE, rtol=tol.rtol * INT8_ABS_SHARE,
                   slack_images=0, max_outlier_share=0.0)


# past this share of its multiply-adds in fp32 an int8 file is int8 in name only: the build warns (trained resnet152,
# a 0.36 model whose top-1 margins are near ties, kept 136 layers in fp32 to pass)
MOSTLY_FP32 = 0.5


def mostly_fp32_warning(artifact: str, info: dict[str, Any]) -> str | None:
    """The build's warning for an int8 artifact whose fp32 layers (`info`: `fp32_share_of_macs`, `fp32_layers`) do
    most of its multiply-adds; None when they do not."""
    share = info.get("fp32_share_of_macs") or 0.0
    if share <= MOSTLY_FP32:
        return None
    return (f"{artifact} computes {share:.0%} of its multiply-adds in fp32 ({len(info.get('fp32_layers') or [])} "
            "layers, left there because int8 flipped held-back images): expect little of int8's speed; the model's "
            "top-1 margins may be too small for int8")


def held_back_images_phrase(count: int, pool: int | None) -> str:
    """'128 held-back training images (the hardest of 1024)': what an int8 verdict was judged on, for notes."""
    return f"{count} held-back training images" + (f" (the hardest of {pool})" if pool and pool > count else "")


def int8_held_back_verdict(reference: np.ndarray, output: np.ndarray,
                           pool: int | None = None) -> tuple[list[str], float, float]:
    """(failures, top-1 agreement, worst cosine) of an int8 model's logits on held-back images: the judge's int8
    class at the build-time bars (`int8_build_bars`). Images chosen as the hardest of `pool` training images
    count their flips against the pool (`exporter.build_inputs.HELD_BACK_POOL`)."""
    from exporter.judge import compute_metrics, judge

    metrics = compute_metrics(reference, output)
    if pool is not None and pool > metrics.n:
        metrics = replace(metrics, n=pool, agreement=1.0 - metrics.flipped / pool)
    return judge(reference, output, metrics, int8_build_bars()), metrics.agreement, metrics.min_cosine


class BackendUnavailable(ExporterError):
    """The backend cannot run here (library missing, no CUDA device, …); the message says why."""


class RunnerError(ExporterError):
    """A runner was misused or its runtime failed (bad input, artifact that does not load, …)."""


class BisectionUnsupported(ExporterError):
    """The artifact's runtime exposes no intermediate outputs to compare."""


@dataclass
class Artifact:
    """One runnable product of a build, as recorded in `manifest.json`.

    `path` is relative to the build directory. `options` are passed to the runner's constructor (for example
    OpenVINO's `inference_precision`), so a manifest entry alone says how to run the artifact.
    """

    name: str  # unique within a build, e.g. "onnx-fp32", "openvino-bf16", "aoti"
    backend: str  # the runner's registry name
    path: str
    precision: str  # what the file stores / is made for (fp16 weights, int8 QDQ); the runner says what it executes
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"artifact {self.name}: unknown precision {self.precision!r} (one of {PRECISIONS})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Variant:
    """An artifact run with extra runner options on top of its own (a tuning candidate); "default" runs it as built."""

    artifact: Artifact
    name: str = "default"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`onnx-fp32` for the default variant, `onnx-fp32+opt=basic` for a candidate."""
        return self.artifact.name if self.name == "default" else f"{self.artifact.name}+{self.name}"

    def runner(self, build_dir: str | Path, *, device: str | None = None, threads: int | None = None) -> Runner:
        """An inactive runner; on the CPU the runtime's own thread option is set to `threads` unless given."""
        cls = get_backend(self.artifact.backend)
        options = {**self.artifact.options, **self.options}
        device = device or self.artifact.device
        if device == "cpu" and threads and cls.thread_option and options.get(cls.thread_option) is None:
            options[cls.thread_option] = threads
        return cls(Path(build_dir) / self.artifact.path, precision=self.artifact.precision, device=device, **options)


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
    # the last quarter of `calibration` (held back to judge int8) is the hardest of this many training images; its
    # flips count against them (a random quarter stands for itself: its own size; None: not given)
    held_back_pool: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # model name, recipe, scaling, class names, hashes
    onnx_source: Path | None = None  # an ONNX file given as the model: no PyTorch model, no traced program
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
    library: ClassVar[str | None] = None  # the optional distribution it needs (its version goes in every report)
    thread_option: ClassVar[str | None] = None  # the option taking a CPU thread count (torch runners: process-wide)

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
            raise RunnerError(f"{self.backend}: cannot load {self.path.name}: {one_line(exc)}") from exc
        self.is_active = True
        return self

    def prepare(self, batch: np.ndarray) -> Any:
        """Check a float32 NCHW batch and convert it to the runtime's input (not timed by benchmarks)."""
        if not self.is_active:
            raise RunnerError(f"{self.backend}: call activate() before infer()")
        if not isinstance(batch, np.ndarray) or batch.ndim != 4:
            got = getattr(batch, "shape", type(batch))
            raise RunnerError(f"{self.backend}: expected a 4-D NCHW numpy array, got {got}")
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
            raise RunnerError(f"{self.backend}: inference failed on {tuple(batch.shape)}: {one_line(exc)}") from exc

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

    def bare_call_impl(self, prepared: Any) -> Callable[[], Any] | None:
        """A zero-argument call of the runtime on `prepared` with nothing of ours around it, or None.

        `exporter bench` times it beside `run` to measure the runner's overhead; None means the backend has no
        separate runtime call to compare with (the benchmark says so).
        """
        return None

    @classmethod
    def gemm_peak_gflops(cls, precision: str, *, size: int, device: str, threads: int | None) -> float | None:
        """This runtime's n×n×n matmul rate in GFLOP/s at `precision` (a probe of the machine's peak), or None
        when the backend brings no matmul of its own or cannot run `precision` natively here."""
        return None

    @classmethod
    def tuning_candidates(cls, artifact: Artifact, *, device: str, threads: int, allow_bf16: bool
                          ) -> list[tuple[str, dict[str, Any]]]:
        """Option sets a skilled user would try by hand for `artifact`, as (label, options); none by default.

        `allow_bf16`: the user accepts a candidate that computes in bf16 (it is judged in the bf16 class).
        """
        return []

    def layer_outputs(self, batch: np.ndarray, *, onnx_source: Path | None, scope_source: Path | None,
                      reference_model: Any) -> tuple[dict[str, list[np.ndarray]], str]:
        """PyTorch module name → its output per call on `batch`, as this runtime computes them, and how.

        What bisection compares layer by layer with eager; raises BisectionUnsupported where the runtime exposes
        no intermediate tensors.
        """
        raise BisectionUnsupported(f"{self.backend} exposes no intermediate outputs (bisection covers eager and "
                                   "ONNX-based artifacts: bisect this build's onnx-fp32 to locate a model-level "
                                   "divergence)")


def import_optional(module: str) -> Any:
    """Import an optional library; a missing one raises BackendUnavailable naming it (never an ImportError)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{module} is not installed ({exc})") from exc


def best_gemm_gflops(call: Callable[[], Any], size: int, *, min_repeats: int = 5, max_repeats: int = 50,
                     budget_s: float = 1.0, flops: float | None = None) -> float:
    """GFLOP/s of the fastest call of an n×n×n matmul (2·n³ FLOPs, or `flops`), after one untimed call: at least
    `min_repeats` calls, then more until `budget_s` or `max_repeats`. A peak is a best case: with 5 calls (0.2 s at
    n = 2048) whole models on this VM ran up to 6 % above it (bench/results/README.md)."""
    call()  # library dispatch, packing buffers, compilation
    best = math.inf
    deadline = time.perf_counter() + budget_s
    for i in range(max_repeats):
        start = time.perf_counter_ns()
        call()
        best = min(best, (time.perf_counter_ns() - start) / 1e9)
        if i + 1 >= min_repeats and time.perf_counter() > deadline:
            break
    return (2.0 * size**3 if flops is None else flops) / best / 1e9


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
    """An (inactive) runner for a manifest artifact inside `build_dir`, with the artifact's own options."""
    return Variant(artifact).runner(build_dir)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what a library prints on stdout (NNCF's progress bars, ONNX Runtime's calibrators) to stderr, since
    `--json` keeps stdout for the result: at the file descriptor (a console may hold the stream it found at import)
    and at `sys.stdout` (or it may look it up)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):  # and the Python stream, for a console that looks it up
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# --- peer baseline ---------------------------------------------------------------------------------------------

PeerFactory = Callable[[Path, dict[str, "Artifact"], Callable[[], np.ndarray]], "Artifact | None"]
PEERS: dict[str, PeerFactory] = {}  # in registration order


def register_peer(name: str) -> Callable[[PeerFactory], PeerFactory]:
    """Decorator registering a peer baseline: what a user of one runtime does by hand with the build's files.

    The factory gets (build dir, the build's artifacts by name, a function returning calibration images) and
    returns an Artifact named `peer:NAME` (not in the manifest; timed and judged like one), or None when the build
    has no file it starts from.
    """
    def wrap(factory: PeerFactory) -> PeerFactory:
        if name in PEERS:
            raise ValueError(f"peer {name!r} is registered twice")
        PEERS[name] = factory
        return factory

    return wrap


# --- export stages -------------------------------------------------------------------------------------------

ExportFunction = Callable[[BuildContext], list[Artifact]]


@dataclass(frozen=True)
class Stage:
    """One step of `exporter build`: a backend module's `export_*` function, under the name `--backends` takes."""

    name: str
    export: ExportFunction
    needs_onnx: bool = False  # converts the onnx stage's file: `--backends NAME` adds onnx
    needs_torch: bool = True  # needs the PyTorch model (so a build of an ONNX file skips it)


STAGES: dict[str, Stage] = {}  # in build order (registration order: later stages read earlier artifacts)


def register_stage(name: str, *, needs_onnx: bool = False,
                   needs_torch: bool = True) -> Callable[[ExportFunction], ExportFunction]:
    """Decorator registering a backend module's export function as a build stage named `name`; `needs_torch=False`
    for a stage that also works from an ONNX file alone (`BuildContext.onnx_source`)."""
    def wrap(function: ExportFunction) -> ExportFunction:
        if name in STAGES:
            raise ValueError(f"build stage {name!r} is registered twice")
        STAGES[name] = Stage(name, function, needs_onnx, needs_torch)
        return function
    return wrap
