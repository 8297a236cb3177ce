"""The parity suite behind `exporter verify`: does every artifact of a build compute what PyTorch computes?

Every artifact runs the same inputs as the eager fp32 model (the reference, computed once per run and cached):
real test images of the dataset the model was trained on, a dynamic-batch sweep (batch 1, an odd size, the
largest batch the artifact allows) and adversarial inputs (all zeros, unscaled 0–255 pixels). Per artifact we
measure max/mean absolute error, max relative error, cosine similarity and KL divergence of the logits, top-1
agreement (and which images flip), top-5 overlap and the artifact's own test accuracy, and judge them against
the tolerance class of the precision the artifact executes in (`TOLERANCES`, the one place those numbers live).
When an artifact fails (or on request) the layer-by-layer comparison names the first diverging layer.

The API collects every failure into a `ParityReport` and, with `check=True`, raises one `ParityError` whose
message lists them all (Optimum's style); the CLI prints the table and exits non-zero instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from exporter.errors import ExporterError, UsageError
from exporter.fileio import atomic_write_json

# --- tolerance classes --------------------------------------------------------------------------------------

DEFAULT_SAMPLES = 256
ODD_BATCH = 7
LARGE_PIXEL_SCALE = 255.0  # "large values": real images left unscaled (0–255), the classic preprocessing slip


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact of one precision may be from eager fp32 and still pass.

    An output element passes when |out − ref| ≤ atol + rtol·|ref| (numpy's `allclose` rule); on top of that
    the real-image top-1 agreement must reach `min_agreement` and every image's logit vector must have cosine
    similarity ≥ `min_cosine` with the reference. `rel_floor` is the floor of the *reported* relative error
    |out − ref| / max(|ref|, rel_floor): below it a logit is ~0 and only the absolute error means anything.
    `layer_tol` is the bisection threshold on a layer's error normalised by that layer's activation scale,
    max|out − ref| / max|ref|.
    """

    precision: str
    atol: float
    rtol: float
    rel_floor: float
    min_agreement: float
    min_cosine: float
    layer_tol: float
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The reasoning, one row per precision (u = unit roundoff of the format the arithmetic is done in; logits of a
# trained classifier are O(1–30); errors grow roughly with sqrt(depth·fan-in)·u·|activation|):
#
# | class | u       | atol  | rtol  | min top-1 | min cosine | layer | why                                          |
# |-------|---------|-------|-------|-----------|------------|-------|----------------------------------------------|
# | fp32  | 6.0e-8  | 1e-3  | 1e-3  | 1.000     | 0.99999    | 1e-3  | same maths, other kernels (Winograd, fused  |
# |       |         |       |       |           |            |       | conv+BN, other summation order). Measured:  |
# |       |         |       |       |           |            |       | ≤ 6e-6 on trained lenet_bn/resnet18, 7e-5 on |
# |       |         |       |       |           |            |       | a BN-calibrated resnet50 (logits ~2); deeper |
# |       |         |       |       |           |            |       | nets with logits ~20 reach ~10× that, so     |
# |       |         |       |       |           |            |       | 1e-3. Cosine ≥ 0.99999 still catches a ~0.5 %|
# |       |         |       |       |           |            |       | change of direction at any logit scale, and  |
# |       |         |       |       |           |            |       | a single flipped image is a bug in fp32.     |
# | tf32  | 4.9e-4  | 1e-2  | 1e-2  | 0.99      | 0.9999     | 1e-2  | 10-bit mantissa in matmul/conv inputs only,  |
# |       |         |       |       |           |            |       | fp32 accumulation: ~20·u on O(10) logits.    |
# | fp16  | 4.9e-4  | 5e-2  | 2e-2  | 0.99      | 0.9995     | 2e-2  | tf32's mantissa but also fp16 storage of     |
# |       |         |       |       |           |            |       | every activation: errors compound per layer. |
# | bf16  | 3.9e-3  | 2.5e-1| 5e-2  | 0.98      | 0.998      | 1e-1  | 8-bit mantissa everywhere: 8× fp16's u; near-|
# |       |         |       |       |           |            |       | tied images may flip (≤ 2 %).                |
# | int8  | ~4e-3·s | 1.0   | 1e-1  | 0.95      | 0.99       | 2.5e-1| per-tensor quantisation noise ~ scale/255 per|
# |       |         |       |       |           |            |       | layer; judged mainly on agreement + cosine.  |
#
# fp32's bound is what makes a bf16 run judged as fp32 fail (errors ~1e-2–1e-1 on trained logits) and a single
# layer scaled by 1 % fail (6e-2 on resnet18); the low-precision bounds are what their formats reach on this zoo
# (trained lenet_bn/resnet18 in bf16: max abs ≤ 4e-2, ≤ 1 flip in 256).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance("fp32", atol=1e-3, rtol=1e-3, rel_floor=1e-3, min_agreement=1.0, min_cosine=0.99999,
                      layer_tol=1e-3, why="same arithmetic, other kernels/summation order; no image may flip"),
    "tf32": Tolerance("tf32", atol=1e-2, rtol=1e-2, rel_floor=1e-2, min_agreement=0.99, min_cosine=0.9999,
                      layer_tol=1e-2, why="10-bit mantissa in conv/matmul inputs, fp32 accumulation"),
    "fp16": Tolerance("fp16", atol=5e-2, rtol=2e-2, rel_floor=1e-1, min_agreement=0.99, min_cosine=0.9995,
                      layer_tol=2e-2, why="10-bit mantissa and fp16 activations, error compounds per layer"),
    "bf16": Tolerance("bf16", atol=2.5e-1, rtol=5e-2, rel_floor=1.0, min_agreement=0.98, min_cosine=0.998,
                      layer_tol=1e-1, why="8-bit mantissa everywhere; near-tied images may flip"),
    "int8": Tolerance("int8", atol=1.0, rtol=1e-1, rel_floor=1.0, min_agreement=0.95, min_cosine=0.99,
                      layer_tol=2.5e-1, why="per-tensor quantisation noise; judged mainly on agreement/cosine"),
}


def tolerance_for(precision: str, *, atol: float | None = None, rtol: float | None = None,
                  min_agreement: float | None = None) -> Tolerance:
    """The tolerance class of `precision`, with any of atol / rtol / min_agreement overridden."""
    if precision not in TOLERANCES:
        raise UsageError(f"unknown tolerance class {precision!r}; choose one of {', '.join(TOLERANCES)}")
    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"--{label} must be a finite number ≥ 0, got {value}")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise UsageError(f"--min-agreement must be between 0 and 1, got {min_agreement}")
    tol = TOLERANCES[precision]
    overrides = {k: v for k, v in (("atol", atol), ("rtol", rtol), ("min_agreement", min_agreement)) if v is not None}
    return replace(tol, **overrides, why=tol.why + (" (overridden: " + ", ".join(overrides) + ")" if overrides else ""))


# --- metrics --------------------------------------------------------------------------------------------------


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else str(x)  # JSON has no inf/nan


@dataclass
class Metrics:
    """Errors of one output array against the reference (rows = images, columns = logits)."""

    n: int
    nonfinite: int  # NaN/Inf values in the artifact's output
    max_abs: float
    mean_abs: float
    max_rel: float  # |out − ref| / max(|ref|, rel_floor)
    rel_floor: float
    min_cosine: float  # the worst image
    mean_cosine: float
    kl: float  # mean KL(softmax(ref) ‖ softmax(out)) in nats
    agreement: float  # top-1
    flipped: int
    flipped_indices: list[int]
    top5_overlap: float  # mean |top-k(ref) ∩ top-k(out)| / k, k = min(5, classes)
    accuracy: float | None = None  # the artifact's own accuracy on labelled inputs
    reference_accuracy: float | None = None
    ref_scale: float = 0.0  # max |ref|

    def to_dict(self) -> dict[str, Any]:
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compute_metrics(reference: np.ndarray, output: np.ndarray, *, labels: np.ndarray | None = None,
                    rel_floor: float = 1e-3) -> Metrics:
    """Every parity metric of `output` against `reference` (both (N, classes) logits)."""
    if reference.shape != output.shape:
        raise ParityError(f"output shape {output.shape} does not match the reference {reference.shape}")
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    n, classes = ref.shape
    finite = np.isfinite(out)
    nonfinite = int((~finite).sum())
    diff = np.abs(out - ref)
    rel = diff / np.maximum(np.abs(ref), rel_floor)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        dots = (ref * out).sum(1)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                          np.where(np.linalg.norm(ref, axis=1) == np.linalg.norm(out, axis=1), 1.0, 0.0))
        log_p = ref - ref.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        log_q = out - out.max(1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
        kl = (np.exp(log_p) * (log_p - log_q)).sum(1)
    top_ref, top_out = ref.argmax(1), np.where(finite.all(1), np.nan_to_num(out).argmax(1), -1)
    flips = np.flatnonzero(top_ref != top_out)
    k = min(5, classes)
    top5_ref = np.argsort(-ref, axis=1)[:, :k]
    top5_out = np.argsort(-np.nan_to_num(out, nan=-np.inf), axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top5_ref, top5_out)]) if n else 1.0
    bad = nonfinite > 0
    metrics = Metrics(
        n=n, nonfinite=nonfinite,
        max_abs=math.inf if bad else float(diff.max(initial=0.0)),
        mean_abs=math.inf if bad else float(diff.mean()) if diff.size else 0.0,
        max_rel=math.inf if bad else float(rel.max(initial=0.0)), rel_floor=rel_floor,
        min_cosine=-math.inf if bad else float(cosine.min(initial=1.0)),
        mean_cosine=-math.inf if bad else float(cosine.mean()) if n else 1.0,
        kl=math.inf if bad else float(np.maximum(kl, 0.0).mean()) if n else 0.0,
        agreement=float(1.0 - len(flips) / n) if n else 1.0, flipped=int(len(flips)),
        flipped_indices=[int(i) for i in flips[:20]], top5_overlap=float(overlap),
        ref_scale=float(np.abs(ref).max(initial=0.0)),
    )
    if labels is not None:
        metrics.accuracy = float((top_out == labels).mean())
        metrics.reference_accuracy = float((top_ref == labels).mean())
    return metrics


def judge(reference: np.ndarray, output: np.ndarray, metrics: Metrics, tol: Tolerance, *, atol_scale: float = 1.0,
          check_agreement: bool = True) -> list[str]:
    """The reasons `output` fails `tol` (empty when it passes)."""
    if metrics.nonfinite:
        return [f"{metrics.nonfinite} non-finite values (NaN/Inf) in the output"]
    failures = []
    atol = tol.atol * atol_scale
    allowed = atol + tol.rtol * np.abs(reference.astype(np.float64))
    excess = np.abs(output.astype(np.float64) - reference) - allowed
    if (excess > 0).any():
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        failures.append(
            f"max abs error {metrics.max_abs:.3g} > atol {atol:.3g} + rtol {tol.rtol:.3g}·|ref| at "
            f"{int((excess > 0).sum())}/{excess.size} values (worst: image {worst[0]}, error "
            f"{abs(float(output[worst]) - float(reference[worst])):.3g}, allowed {float(allowed[worst]):.3g})")
    if metrics.min_cosine < tol.min_cosine:
        failures.append(f"cosine similarity {metrics.min_cosine:.6f} < {tol.min_cosine}")
    if check_agreement and metrics.agreement < tol.min_agreement:
        failures.append(f"top-1 agreement {metrics.agreement:.4f} < {tol.min_agreement} "
                        f"({metrics.flipped} of {metrics.n} images flip)")
    return failures


# --- inputs ---------------------------------------------------------------------------------------------------


@dataclass
class InputSet:
    """One family of inputs and the batch sizes it is fed in."""

    name: str
    description: str
    images: np.ndarray  # float32 NCHW
    batches: list[int]  # chunk sizes, summing to len(images)
    labels: np.ndarray | None = None
    reference_rows: np.ndarray | None = None  # rows of the "real" reference these images are (no extra eager run)
    check_agreement: bool = False  # top-1 is judged on the real-image set only (tiny sets flip on near-ties)
    scale_atol: bool = False  # adversarial sets: atol scales with how much larger the logits are than on real ones
    # Inputs outside the range the data (and so an int8 calibration) spans: int8 saturates there by design, so
    # an int8 artifact's errors on such a set are reported as notes, not judged.
    beyond_calibration: bool = False

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "images": int(len(self.images)),
                "batch_sizes": sorted(set(self.batches))}


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


def make_input_sets(images: np.ndarray, labels: np.ndarray | None, *, max_batch: int,
                    static_batch: int | None = None, seed: int = 0) -> list[InputSet]:
    """Real images in batches of `max_batch`, the batch sweep (1, odd, max) and the adversarial inputs."""
    if images.ndim != 4 or not len(images):
        raise UsageError(f"parity needs a non-empty NCHW image batch, got shape {images.shape}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    n = len(images)
    biggest = static_batch or max_batch
    sets = [InputSet("real", f"{n} real test images", images, _chunks(n, biggest), labels=labels,
                     check_agreement=True)]
    sweep = [static_batch] if static_batch else sorted({1, min(ODD_BATCH, max_batch), max_batch})
    for b in sweep:
        rows = np.arange(b) % n  # tile when there are fewer images than the batch
        sets.append(InputSet(f"batch={b}", f"first {b} real images as one batch of {b}", images[rows], [b],
                             reference_rows=rows))
    odd = static_batch or min(ODD_BATCH, max_batch)
    shape = (odd, *images.shape[1:])
    sets.append(InputSet("zeros", f"{odd} all-zero images", np.zeros(shape, np.float32), [odd], scale_atol=True))
    rows = np.random.default_rng(seed).permutation(n)[:odd] if n >= odd else np.arange(odd) % n
    sets.append(InputSet("large", f"{odd} real images ×{LARGE_PIXEL_SCALE:g} (unscaled pixels)",
                         images[rows] * np.float32(LARGE_PIXEL_SCALE), [odd], scale_atol=True,
                         beyond_calibration=True))
    return sets


def run_batches(runner: Any, images: np.ndarray, batches: Sequence[int], *, static_batch: int | None = None,
                progress: Any = None) -> np.ndarray:
    """Run `images` through an active runner in chunks of `batches`; a static-batch artifact gets padded chunks."""
    outputs, start = [], 0
    with np.errstate(all="ignore"):  # numpy runtimes (the reference evaluator) warn on overflow: we judge it
        for size in batches:
            chunk = images[start:start + size]
            start += size
            if static_batch and size != static_batch:
                pad = np.arange(static_batch) % size
                out = runner.infer(np.ascontiguousarray(chunk[pad]))[:size]
            else:
                out = runner.infer(chunk)
            outputs.append(np.asarray(out, np.float32).reshape(size, -1))
            if progress is not None:
                progress.update(size)
    return np.concatenate(outputs)


# --- the reference (eager fp32), computed once and cached ---------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_key(reference_id: str, images: np.ndarray) -> str:
    """Cache key of a reference output: what the reference is (weights, options, torch) and the exact input bytes."""
    h = hashlib.sha256(reference_id.encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images, np.float32).tobytes())
    return h.hexdigest()[:32]


class ReferenceCache:
    """Eager fp32 outputs keyed by (reference, input bytes): in memory, and in `parity_reference.npz` if given."""

    _memory: dict[str, np.ndarray] = {}  # shared across runs in one process

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.hits = 0
        self.misses = 0
        self._new: dict[str, np.ndarray] = {}
        if path is not None and path.exists():
            try:
                with np.load(path) as stored:
                    for key in stored.files:
                        self._memory.setdefault(key, stored[key])
            except (OSError, ValueError):  # a damaged cache is recomputed, never trusted
                pass

    def get(self, key: str, compute: Any) -> np.ndarray:
        """The cached output of `key`, or `compute()`'s (then cached)."""
        if key in self._memory:
            self.hits += 1
        else:
            self.misses += 1
            self._memory[key] = np.asarray(compute(), np.float32)
        self._new[key] = self._memory[key]
        return self._memory[key]

    def save(self) -> None:
        """Write this run's references (only them, so the file never grows) atomically."""
        if self.path is None or not self._new:
            return
        try:
            with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=".parity_reference.", suffix=".npz",
                                             delete=False) as f:
                np.savez(f, **self._new)
            os.replace(f.name, self.path)
        except OSError:
            Path(f.name).unlink(missing_ok=True)  # a read-only build dir just means no on-disk cache


# --- results --------------------------------------------------------------------------------------------------

PASS, FAIL, ERROR, NOT_RUN = "pass", "fail", "error", "not run"


@dataclass
class SetResult:
    """One input set's metrics and verdict."""

    name: str
    description: str
    batch_sizes: list[int]
    metrics: Metrics
    failures: list[str]
    atol_used: float
    notes: list[str] = field(default_factory=list)  # deviations reported but not judged

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "batch_sizes": self.batch_sizes,
                "passed": self.passed, "failures": self.failures, "notes": self.notes,
                "atol_used": self.atol_used, "metrics": self.metrics.to_dict()}


@dataclass
class LayerError:
    """One layer's error against eager, in eager execution order."""

    layer: str  # PyTorch module name (`#2` for its second call)
    max_abs: float
    normalized: float  # max|out − ref| / max|ref|
    shape: list[int]
    kind: str = ""  # module class, e.g. Conv2d
    # Eager layers just before this one that the artifact has no output for: fused into it (a Conv whose
    # BatchNorm was folded in shows up as the BatchNorm), so a divergence here may come from any of them.
    fused_with: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "fused_with": self.fused_with,
                "max_abs": _json_float(self.max_abs), "normalized": _json_float(self.normalized),
                "shape": self.shape}

    def label(self) -> str:
        text = f"{self.layer} ({self.kind})" if self.kind else self.layer
        return text + (f" with {', '.join(self.fused_with)} fused in" if self.fused_with else "")

    @property
    def layers(self) -> list[str]:
        """This layer and the layers fused into it."""
        return [*self.fused_with, self.layer]


@dataclass
class Bisection:
    """Where an artifact starts to diverge from eager, layer by layer."""

    method: str  # how the artifact's intermediates were obtained
    input_set: str
    images: int
    layer_tol: float
    first_diverging: LayerError | None
    preceding: list[LayerError]  # the layers just before it (closest last)
    layers: list[LayerError]  # every compared layer
    unmatched: list[str] = field(default_factory=list)  # eager layers the artifact exposes no output for
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "input_set": self.input_set, "images": self.images,
                "layer_tol": self.layer_tol,
                "first_diverging": self.first_diverging.to_dict() if self.first_diverging else None,
                "preceding": [e.to_dict() for e in self.preceding], "layers": [e.to_dict() for e in self.layers],
                "unmatched": self.unmatched, "note": self.note}

    def describe(self) -> str:
        if not self.layers:
            return f"no layer could be compared: {self.note}"
        if self.first_diverging is None:
            return f"no layer exceeds {self.layer_tol:g} (normalised) on {self.input_set}. {self.note}".strip()
        first = self.first_diverging
        before = ", ".join(f"{e.label()} {e.normalized:.2g}" for e in self.preceding) or "none"
        return (f"first diverging layer: {first.label()} (normalised error {first.normalized:.3g} > "
                f"{self.layer_tol:g}, max abs {first.max_abs:.3g}); layers before it: {before}")


@dataclass
class ComparisonResult:
    """One artifact's verdict: `bool(result)` is True only when it ran and passed its tolerance class."""

    artifact: str
    backend: str
    precision: str  # as recorded in the manifest
    executed_precision: str  # as the runtime reports it
    device: str
    tolerance: Tolerance
    status: str  # pass / fail / error / not run
    reason: str = ""  # why it failed, errored or did not run (one line)
    requested: bool = False  # named by the user (then "not run" fails the run)
    sets: list[SetResult] = field(default_factory=list)
    bisection: Bisection | None = None
    bisection_error: str = ""
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.status == PASS

    @property
    def failures(self) -> list[str]:
        """Every failure of this artifact, each prefixed with the input set."""
        found = [f"{s.name}: {f}" for s in self.sets for f in s.failures]
        return found or ([self.reason] if self.status in (FAIL, ERROR) and self.reason else [])

    def set(self, name: str) -> SetResult | None:
        return next((s for s in self.sets if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "backend": self.backend, "precision": self.precision,
                "executed_precision": self.executed_precision, "device": self.device, "status": self.status,
                "passed": bool(self), "reason": self.reason, "requested": self.requested,
                "tolerance": self.tolerance.to_dict(), "failures": self.failures,
                "sets": [s.to_dict() for s in self.sets],
                "bisection": self.bisection.to_dict() if self.bisection else None,
                "bisection_error": self.bisection_error, "seconds": round(self.seconds, 3)}

    def save_json(self, path: str | Path) -> Path:
        """Write this result as JSON (atomically)."""
        return _write_json(Path(path), self.to_dict())


class BisectionUnsupported(ExporterError):
    """The artifact's runtime exposes no intermediate outputs to compare."""


class ParityError(ExporterError):
    """One or more artifacts failed verification; the message lists every failure."""

    exit_code = 1

    def __init__(self, message: str, report: ParityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ParityReport:
    """Every artifact's result for one verify run; `bool(report)` is the run's verdict."""

    model: str
    build_dir: str | None
    dataset: str
    samples: int
    inputs: list[dict[str, Any]]
    reference: dict[str, Any]
    results: list[ComparisonResult]
    tolerance_class: str | None = None  # forced class, else each artifact's own precision
    cache: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def ran(self) -> list[ComparisonResult]:
        return [r for r in self.results if r.status != NOT_RUN]

    @property
    def problems(self) -> list[str]:
        """Why the run does not pass: failures, errors, requested artifacts that did not run, nothing run."""
        problems = []
        for r in self.results:
            if r.status in (FAIL, ERROR):
                problems += [f"{r.artifact}: {f}" for f in r.failures]
            elif r.status == NOT_RUN and r.requested:
                problems.append(f"{r.artifact}: not run ({r.reason})")
        if not self.ran:
            problems.append("no artifact could run, so nothing was verified")
        return problems

    def __bool__(self) -> bool:
        return not self.problems

    def raise_for_failures(self) -> None:
        """Raise one ParityError listing every problem (does nothing when the run passed)."""
        problems = self.problems
        if problems:
            raise ParityError(f"{len(problems)} parity problem(s) for {self.model}: " + "; ".join(problems), self)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "build_dir": self.build_dir, "passed": bool(self), "problems": self.problems,
                "dataset": self.dataset, "samples": self.samples, "inputs": self.inputs,
                "reference": self.reference, "tolerance_class": self.tolerance_class,
                "tolerances": {k: v.to_dict() for k, v in TOLERANCES.items()}, "cache": self.cache,
                "seconds": round(self.seconds, 3), "created": self.created,
                "results": [r.to_dict() for r in self.results]}

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return _write_json(Path(path), self.to_dict())


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    atomic_write_json(path, data, allow_nan=False)
    return path


# --- layer-by-layer comparison (bisection) ------------------------------------------------------------------


def leaf_module_outputs(model: Any, batch: np.ndarray, *, dtype: Any = None) -> list[tuple[str, np.ndarray]]:
    """(module name, output) of every leaf module call in execution order; repeated calls get `#2`, `#3` …"""
    import torch

    records: list[tuple[str, np.ndarray]] = []
    calls: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                calls[name] = calls.get(name, 0) + 1
                label = name if calls[name] == 1 else f"{name}#{calls[name]}"
                records.append((label, output.detach().float().cpu().numpy().copy()))
        return record

    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        x = torch.from_numpy(np.ascontiguousarray(batch))
        param = next(model.parameters(), None)
        x = x.to(param.device if param is not None else "cpu", dtype or (param.dtype if param is not None else None))
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _layer_error(name: str, ref: np.ndarray, out: np.ndarray) -> LayerError:
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    if not np.isfinite(out64).all():
        return LayerError(name, math.inf, math.inf, list(ref.shape))
    err = float(np.abs(out64 - ref64).max(initial=0.0))
    scale = float(np.abs(ref64).max(initial=0.0))
    return LayerError(name, err, err / scale if scale > 0 else (0.0 if err == 0 else math.inf), list(ref.shape))


def compare_layers(reference: list[tuple[str, np.ndarray]], candidate: dict[str, list[np.ndarray]], *,
                   layer_tol: float, method: str, input_set: str, context: int = 3,
                   kinds: dict[str, str] | None = None) -> Bisection:
    """Walk the eager layers in execution order and find the first whose error exceeds `layer_tol`."""
    seen: dict[str, int] = {}
    layers, unmatched, pending = [], [], []
    kinds = kinds or {}
    for label, ref in reference:
        base = label.split("#")[0]
        index = seen.get(base, 0)
        seen[base] = index + 1
        outs = candidate.get(base, [])
        if index >= len(outs) or outs[index].size != ref.size:
            unmatched.append(label)
            pending.append(label)
            continue
        error = _layer_error(label, ref, outs[index].reshape(ref.shape))
        error.kind, error.fused_with, pending = kinds.get(base, ""), pending, []
        layers.append(error)
    first = next((i for i, e in enumerate(layers) if not e.normalized <= layer_tol), None)
    note = "" if layers else ("the artifact exposes no output that maps to a PyTorch module (a graph rewritten by "
                              "an optimizer loses the exporter's module scopes; bisect its source artifact)")
    if first is None and layers:
        worst = max(layers, key=lambda e: e.normalized)
        note = f"largest normalised error {worst.normalized:.3g} at {worst.label()}"
    return Bisection(method=method, input_set=input_set, images=int(reference[0][1].shape[0]) if reference else 0,
                     layer_tol=layer_tol, first_diverging=layers[first] if first is not None else None,
                     preceding=layers[max(0, first - context):first] if first is not None else [],
                     layers=layers, unmatched=unmatched, note=note)


_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _openvino_ir_outputs(ir_path: Path, names: set[str], batch: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    """Tensor name → value for every tensor of an OpenVINO IR whose name is in `names` (made extra outputs)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(ir_path))
    extra = [out for op in model.get_ordered_ops() for out in op.outputs() if out.get_names() & names]
    if not extra:
        return {}
    model.add_outputs(extra)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision]})
    result = compiled({0: batch})
    return {name: np.asarray(result[port]) for port in compiled.outputs for name in port.get_names()}


def _run_instrumented(path: Path, batch: np.ndarray, runtime: str, precision: str) -> dict[str, np.ndarray]:
    """Every output of an ONNX file, by name, run in `runtime` (onnxruntime, onnx_reference or openvino)."""
    if runtime == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision]})
        result = compiled({0: batch})
        return {name: np.asarray(result[port]) for port in compiled.outputs for name in port.get_names()}
    if runtime == "onnx_reference":
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(path))
        with np.errstate(all="ignore"):
            return dict(zip(evaluator.output_names, evaluator.run(None, {evaluator.input_names[0]: batch})))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: batch})))


def onnx_module_outputs(onnx_path: Path, batch: np.ndarray, *, runtime: str = "onnxruntime",
                        precision: str = "fp32", ir_path: Path | None = None, scope_source: Path | None = None
                        ) -> tuple[dict[str, list[np.ndarray]], bool]:
    """Module name → its output per call, from the ONNX graph with every node output exposed, run in `runtime`.

    `add_intermediate_outputs` maps each node's tensor to the module that produced it; consecutive tensors of one
    module are one call of it (a BatchNorm may be several nodes) and the call's output is the last of them. With
    `ir_path` (OpenVINO) the IR itself is run when it kept the ONNX tensor names (it was converted from this
    ONNX), so compressed weights and the IR's own graph are what is compared; else the ONNX runs in OpenVINO.
    A file whose nodes lost the module scopes (an optimizer's rewrite) borrows the tensor → module map of
    `scope_source` for the tensor names it kept. Returns the outputs and whether the IR itself was run.
    """
    from exporter.backends.onnx import add_intermediate_outputs

    if runtime == "openvino" and precision not in _OV_PRECISION:
        raise RuntimeError(f"OpenVINO bisection runs f32/bf16/f16, not {precision}")
    with tempfile.TemporaryDirectory(prefix="exporter-bisect-") as tmp:
        instrumented = Path(tmp) / "instrumented.onnx"
        mapping = add_intermediate_outputs(onnx_path, instrumented)
        if not mapping and scope_source is not None and Path(scope_source) != Path(onnx_path):
            mapping = add_intermediate_outputs(scope_source, Path(tmp) / "scopes.onnx")
        values = _openvino_ir_outputs(ir_path, set(mapping), batch, precision) if ir_path is not None else {}
        used_ir = bool(values)
        if not used_ir:
            values = _run_instrumented(instrumented, batch, runtime, precision)
    by_module: dict[str, list[np.ndarray]] = {}
    previous = None
    for tensor, module in mapping.items():  # graph (topological) order
        if tensor not in values:
            continue
        if module and module == previous:
            by_module[module][-1] = np.asarray(values[tensor], np.float32)  # same call, a later node
        elif module:
            by_module.setdefault(module, []).append(np.asarray(values[tensor], np.float32))
        previous = module
    return by_module, used_ir


# --- running a build ------------------------------------------------------------------------------------------


def _artifact_onnx_source(artifact: Any, build: Any) -> Path | None:
    """The ONNX file an artifact was made from (itself for ONNX artifacts), if the build has one."""
    if str(artifact.path).endswith(".onnx"):
        return Path(build.dir) / artifact.path
    source = (artifact.options or {}).get("source_onnx") or getattr(artifact, "source", None)
    if source:
        return Path(build.dir) / source
    return _build_fp32_onnx(build)


def _build_fp32_onnx(build: Any) -> Path | None:
    """The build's fp32 ONNX file as the exporter wrote it (its nodes carry the PyTorch module scopes)."""
    candidates = [a for a in build.artifacts if str(a.path).endswith(".onnx") and a.precision == "fp32"]
    candidates.sort(key=lambda a: a.name != "onnx-fp32")
    return Path(build.dir) / candidates[0].path if candidates else None


def bisect_artifact(artifact: Any, build: Any, reference_model: Any, batch: np.ndarray, tol: Tolerance, *,
                    input_set: str) -> Bisection:
    """Layer-by-layer comparison of one artifact against eager on `batch`."""
    reference = leaf_module_outputs(reference_model, batch)
    kinds = {name: type(m).__name__ for name, m in reference_model.named_modules()}
    if artifact.backend == "eager":
        import copy

        import torch

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(artifact.precision)
        if dtype is None:
            raise RuntimeError(f"eager bisection runs fp32/fp16/bf16, not {artifact.precision}")
        model = copy.deepcopy(reference_model).to(dtype)
        candidate: dict[str, list[np.ndarray]] = {}
        for label, out in leaf_module_outputs(model, batch, dtype=dtype):
            candidate.setdefault(label.split("#")[0], []).append(out)
        return compare_layers(reference, candidate, layer_tol=tol.layer_tol, input_set=input_set, kinds=kinds,
                              method=f"forward hooks on a {artifact.precision} copy of the eager model")
    source = _artifact_onnx_source(artifact, build)
    if source is None or artifact.backend not in ("onnxruntime", "onnx_reference", "openvino"):
        raise BisectionUnsupported(f"{artifact.backend} exposes no intermediate outputs (bisection covers eager "
                                   "and ONNX-based artifacts: bisect this build's onnx-fp32 to locate a model-level "
                                   "divergence)")
    runtime = artifact.backend if artifact.backend in ("openvino", "onnx_reference") else "onnxruntime"
    precision = (artifact.options or {}).get("inference_precision", artifact.precision)
    precision = {"f32": "fp32", "f16": "fp16"}.get(precision, precision)
    ir_path = Path(build.dir) / artifact.path if runtime == "openvino" else None
    candidate, used_ir = onnx_module_outputs(source, batch, runtime=runtime, precision=precision, ir_path=ir_path,
                                             scope_source=_build_fp32_onnx(build))
    via = f"{source.name} with every node output exposed, run in {runtime}"
    if runtime == "openvino":
        via = (f"{artifact.path} with the tensors of {source.name} exposed, run in openvino at {precision}"
               if used_ir else via + f" at {precision}")
    return compare_layers(reference, candidate, layer_tol=tol.layer_tol, method=via, input_set=input_set,
                          kinds=kinds)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _worst_images(sets: list[SetResult], outputs: dict[str, np.ndarray], refs: dict[str, np.ndarray],
                  inputs: dict[str, InputSet], count: int = 4) -> tuple[str, np.ndarray]:
    """The failing set and its images with the largest error (a small batch for bisection)."""
    failing = next((s for s in sets if s.failures), sets[0])
    images = inputs[failing.name].images
    err = np.abs(np.nan_to_num(outputs[failing.name], nan=np.inf) - refs[failing.name]).max(1)
    rows = np.sort(np.argsort(-err, kind="stable")[:count])
    return failing.name, np.ascontiguousarray(images[rows])


def select_artifacts(artifacts: list[Any], names: Iterable[str] | None) -> list[tuple[Any, bool]]:
    """(artifact, requested) pairs for `--backends` (artifact or backend names); all but the reference by default."""
    if not names:
        return [(a, False) for a in artifacts if not (a.backend == "eager" and a.precision == "fp32")]
    chosen, wanted = [], list(names)
    for name in wanted:
        matches = [a for a in artifacts if name in (a.name, a.backend)]
        if not matches:
            from exporter.backends import BACKENDS

            if name not in BACKENDS:
                import difflib

                known = sorted({a.name for a in artifacts} | set(BACKENDS))
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(known)}"
                raise UsageError(f"unknown backend or artifact {name!r}: {hint}")
            chosen.append((name, True))  # a real backend this build has no artifact for: reported as not run
            continue
        chosen += [(a, True) for a in matches if all(a is not c for c, _ in chosen)]
    return chosen


def _max_batch(build: Any) -> tuple[int, int | None]:
    """(largest batch the artifacts allow, static batch or None) from the manifest."""
    manifest = build.manifest or {}
    batch = manifest.get("batch") if isinstance(manifest.get("batch"), dict) else {}
    static = manifest.get("static_batch") or batch.get("static")
    max_batch = manifest.get("max_batch") or batch.get("max") or static or 64
    return int(max_batch), (int(static) if static else None)


def verify_build(build: Any, *, backends: Iterable[str] | None = None, samples: int = DEFAULT_SAMPLES,
                 data: str | Path | None = None, seed: int = 0, bisect: bool = False,
                 tolerance_class: str | None = None, atol: float | None = None, rtol: float | None = None,
                 min_agreement: float | None = None, images: np.ndarray | None = None,
                 labels: np.ndarray | None = None, dataset: str | None = None, cache_reference: bool = True,
                 progress: bool = True) -> ParityReport:
    """Verify every artifact of a loaded build (see `verify`); never raises for parity failures."""
    from tqdm import tqdm

    from exporter.backends import runner_for

    started = time.perf_counter()
    if samples <= 0:
        raise UsageError(f"--samples must be positive, got {samples}")
    if tolerance_class is not None:
        tolerance_for(tolerance_class)  # validate early
    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None:
            tolerance_for("fp32", **{label: value})
    if min_agreement is not None:
        tolerance_for("fp32", min_agreement=min_agreement)
    input_shape = tuple(int(d) for d in build.input_shape)
    from exporter.models import check_input_shape

    check_input_shape(build.model, input_shape)  # a manifest shape the model cannot take: one line, valid sizes
    if data is None:
        data = build.dataset  # the data the weights were trained on (None: the embedded digits5k)
    if images is None:
        from exporter.data import sample_images

        images, labels, ds = sample_images(data, "test", input_shape, samples, seed=seed)
        dataset = dataset or getattr(ds, "name", str(ds))
    images = np.ascontiguousarray(images, np.float32)
    if tuple(images.shape[1:]) != input_shape:
        raise UsageError(f"the images are {'×'.join(map(str, images.shape[1:]))} but the build's artifacts take "
                         f"{'×'.join(map(str, input_shape))}")
    max_batch, static_batch = _max_batch(build)
    sets = make_input_sets(images, labels, max_batch=max_batch, static_batch=static_batch, seed=seed)

    chosen = select_artifacts(build.artifacts, backends)  # unknown names fail before any work
    eager = next((a for a in build.artifacts if a.backend == "eager" and a.precision == "fp32"), None)
    if eager is None:
        raise ParityError(f"build {build.dir} has no eager fp32 weights artifact, so there is no reference")
    reference_runner = runner_for(eager, build.dir)
    try:
        reference_runner.activate()
    except ExporterError as exc:
        raise ParityError(f"the reference ({eager.name}, eager fp32) cannot run, so nothing can be verified: "
                          f"{exc}") from exc
    try:
        refs, reference_info, cache = _reference_outputs(reference_runner, eager, build, sets, labels, max_batch,
                                                         cache_reference)
        context = _RunContext(build=build, sets=sets, refs=refs, static_batch=static_batch, bisect=bisect,
                              reference_model=reference_runner.model,
                              real_scale=float(np.abs(refs["real"]).max(initial=0.0)) or 1.0)
        results = []
        total = sum(len(s.images) for s in sets) * len(chosen)
        with tqdm(total=total, desc="verify", unit="img", disable=not progress, leave=False) as bar:
            for artifact, requested in chosen:
                bar.set_postfix_str(artifact if isinstance(artifact, str) else artifact.name)
                results.append(_verify_artifact(artifact, requested, context, tolerance_class=tolerance_class,
                                                atol=atol, rtol=rtol, min_agreement=min_agreement, bar=bar))
    finally:
        reference_runner.deactivate()
    return ParityReport(model=build.model, build_dir=str(build.dir), dataset=dataset or "given images",
                        samples=int(len(images)), inputs=[s.summary() for s in sets], reference=reference_info,
                        results=results, tolerance_class=tolerance_class,
                        cache={"hits": cache.hits, "misses": cache.misses}, seconds=time.perf_counter() - started)


def _reference_outputs(runner: Any, eager: Any, build: Any, sets: list[InputSet], labels: np.ndarray | None,
                       max_batch: int, use_disk_cache: bool) -> tuple[dict[str, np.ndarray], dict[str, Any],
                                                                      ReferenceCache]:
    """Eager fp32 logits of every input set (cached), and what the report says about the reference."""
    import torch

    weights_digest = _file_digest(runner.path)
    # what the reference depends on besides the input: weights, model options, torch (kernels, model code)
    reference_id = hashlib.sha256(f"{weights_digest} {json.dumps(eager.options, sort_keys=True)} "
                                  f"{torch.__version__}".encode()).hexdigest()
    cache = ReferenceCache(Path(build.dir) / "parity_reference.npz" if use_disk_cache else None)
    refs: dict[str, np.ndarray] = {}
    for s in sets:
        if s.reference_rows is None:
            chunks = _chunks(len(s.images), max_batch)
            refs[s.name] = cache.get(input_key(reference_id, s.images),
                                     lambda s=s, chunks=chunks: run_batches(runner, s.images, chunks))
    for s in sets:
        if s.reference_rows is not None:  # the sweep's images are real images: reuse their rows
            refs[s.name] = refs["real"][s.reference_rows]
    cache.save()
    info = {"artifact": eager.name, "backend": "eager", "precision": "fp32", "weights_sha256": weights_digest,
            "accuracy": float((refs["real"].argmax(1) == labels).mean()) if labels is not None else None}
    return refs, info, cache


@dataclass
class _RunContext:
    """What every artifact of one verify run is compared with."""

    build: Any
    sets: list[InputSet]
    refs: dict[str, np.ndarray]
    static_batch: int | None
    bisect: bool
    reference_model: Any
    real_scale: float


def _verify_artifact(artifact: Any, requested: bool, ctx: _RunContext, *, tolerance_class: str | None,
                     atol: float | None, rtol: float | None, min_agreement: float | None,
                     bar: Any) -> ComparisonResult:
    """Run one artifact on every input set and judge it (a backend name without artifact: "not run")."""
    from exporter.backends import BackendUnavailable, runner_for

    images_per_artifact = sum(len(s.images) for s in ctx.sets)
    if isinstance(artifact, str):  # a backend name this build has no artifact for
        skipped = [s.get("reason", "") for s in (ctx.build.manifest or {}).get("skipped", [])
                   if isinstance(s, dict) and s.get("backend") == artifact]
        reason = "the build has no artifact for this backend" + (f" (skipped at build: {skipped[0]})"
                                                                if skipped else "")
        bar.update(images_per_artifact)
        return ComparisonResult(artifact, artifact, "-", "-", "-", tolerance_for("fp32"), NOT_RUN, reason,
                                requested=True)
    tol = tolerance_for(tolerance_class or artifact.precision, atol=atol, rtol=rtol, min_agreement=min_agreement)
    result = ComparisonResult(artifact.name, artifact.backend, artifact.precision, artifact.precision,
                              artifact.device, tol, PASS, requested=requested)
    started = time.perf_counter()
    try:
        runner = runner_for(artifact, ctx.build.dir)
        runner.activate()
    except BackendUnavailable as exc:
        result.status, result.reason = NOT_RUN, str(exc)
        bar.update(images_per_artifact)
        return result
    except ExporterError as exc:
        result.status, result.reason = ERROR, f"cannot load: {exc}"
        bar.update(images_per_artifact)
        return result
    outputs: dict[str, np.ndarray] = {}
    try:
        result.executed_precision = runner.executed_precision
        for s in ctx.sets:
            ref = ctx.refs[s.name]
            out = run_batches(runner, s.images, s.batches, static_batch=ctx.static_batch, progress=bar)
            if out.shape != ref.shape:
                raise ParityError(f"{s.name}: output shape {out.shape[1:]} per image, eager gives {ref.shape[1:]}")
            outputs[s.name] = out
            metrics = compute_metrics(ref, out, labels=s.labels, rel_floor=tol.rel_floor)
            scale = max(1.0, metrics.ref_scale / ctx.real_scale) if s.scale_atol else 1.0
            failures = judge(ref, out, metrics, tol, atol_scale=scale, check_agreement=s.check_agreement)
            notes: list[str] = []
            if s.beyond_calibration and tol.precision == "int8":
                notes = [f"not judged for int8 (outside the calibration range, activations saturate): {f}"
                         for f in failures]
                failures = []
            result.sets.append(SetResult(s.name, s.description, sorted(set(s.batches)), metrics, failures,
                                         tol.atol * scale, notes))
    except ExporterError as exc:
        result.status, result.reason = ERROR, str(exc)
    finally:
        runner.deactivate()
    if result.status == PASS and any(s.failures for s in result.sets):
        result.status, result.reason = FAIL, result.failures[0]
    if result.sets and (ctx.bisect or result.status == FAIL):
        name, batch = _worst_images(result.sets, outputs, ctx.refs, {s.name: s for s in ctx.sets})
        try:
            result.bisection = bisect_artifact(artifact, ctx.build, ctx.reference_model, batch, tol, input_set=name)
        except BisectionUnsupported as exc:
            result.bisection_error = str(exc)
        except Exception as exc:  # bisection is a diagnosis: its failure must not hide the verdict
            result.bisection_error = _one_line(exc)
    result.seconds = time.perf_counter() - started
    return result


def verify(target: str | Path, *, artifacts_dir: str | Path | None = None, save: bool = True, check: bool = True,
           **options: Any) -> ParityReport:
    """Verify a build (a model name → its latest build, or a build directory) against eager fp32.

    Writes `parity.json` into the build directory and links it in the manifest (`save`), then raises one
    `ParityError` listing every failure when anything failed (`check`). `options` are `verify_build`'s.
    """
    from exporter.manifest import load_build
    from exporter.train import default_artifacts_dir

    build = load_build(target, Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir())
    report = verify_build(build, **options)
    if save:
        save_report(report, build)
    if check:
        report.raise_for_failures()
    return report


def save_report(report: ParityReport, build: Any) -> Path:
    """Write `parity.json` into the build directory and link it from the manifest.

    Results of artifacts this run did not cover (a `--backends` subset) are carried over from the previous
    `parity.json` when it compared against the same reference weights, marked `carried_over_from` with the
    time of the run that produced them; the file's `passed` covers every result it holds.
    """
    from exporter.manifest import update_manifest

    path = Path(build.dir) / "parity.json"
    data = report.to_dict()
    carried = _carried_results(path, report, [a.name for a in build.artifacts])
    if carried:
        data["results"] += carried
        order = {a.name: i for i, a in enumerate(build.artifacts)}
        data["results"].sort(key=lambda r: order.get(r["artifact"], len(order)))
        data["problems"] += [f"{r['artifact']}: {f}" for r in carried if r["status"] in (FAIL, ERROR)
                             for f in r.get("failures") or [r.get("reason", "")]]
        data["passed"] = not data["problems"]
    _write_json(path, data)
    update_manifest(build, "verify", {"report": path.name, "passed": data["passed"], "created": report.created,
                                      "samples": report.samples, "dataset": report.dataset,
                                      "results": {r["artifact"]: r["status"] for r in data["results"]}})
    return path


def _carried_results(path: Path, report: ParityReport, artifacts: list[str]) -> list[dict[str, Any]]:
    """The previous report's results for artifacts of the build that this run did not verify."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict) or (previous.get("reference") or {}).get("weights_sha256") != \
            report.reference.get("weights_sha256"):
        return []  # other weights (a rebuilt model): old results say nothing about these artifacts
    done = {r.artifact for r in report.results}
    return [dict(r, carried_over_from=r.get("carried_over_from") or previous.get("created"))
            for r in previous.get("results") or []
            if isinstance(r, dict) and r.get("artifact") in artifacts and r.get("artifact") not in done]


# --- presentation ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2e") -> str:
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


def report_rows(report: ParityReport) -> list[dict[str, str]]:
    """One table row per artifact: the worst error over the real images and the batch sweep (the adversarial
    sets' logits are orders of magnitude larger, so their errors are judged scaled and listed in the JSON),
    top-1/top-5/KL/accuracy on the real images."""
    rows = [{"artifact": report.reference["artifact"], "backend": "eager", "precision": "fp32", "class": "-",
             "status": "reference",
             "acc": _fmt(report.reference.get("accuracy"), ".4f")}]
    for r in report.results:
        row = {"artifact": r.artifact, "backend": r.backend, "precision": r.executed_precision,
               "class": r.tolerance.precision if r.status != NOT_RUN else "-", "status": r.status.upper()}
        if r.sets:
            real = r.set("real")
            natural = [s for s in r.sets if s.name == "real" or s.name.startswith("batch=")] or r.sets
            row.update(
                max_abs=_fmt(max(s.metrics.max_abs for s in natural)),
                max_rel=_fmt(max(s.metrics.max_rel for s in natural)),
                mean_abs=_fmt(real.metrics.mean_abs if real else None),
                cosine=_fmt(min(s.metrics.min_cosine for s in r.sets), ".6f"),
                kl=_fmt(real.metrics.kl if real else None),
                top1=f"{real.metrics.agreement:.4f} ({real.metrics.flipped})" if real else "-",
                top5=_fmt(real.metrics.top5_overlap if real else None, ".4f"),
                acc=_fmt(real.metrics.accuracy if real else None, ".4f"),
            )
        rows.append(row)
    return rows


TABLE_COLUMNS = [("artifact", "artifact"), ("backend", "backend"), ("precision", "runs"), ("class", "class"),
                 ("status", "verdict"), ("max_abs", "max abs"), ("max_rel", "max rel"), ("mean_abs", "mean abs"),
                 ("cosine", "min cos"), ("kl", "KL"), ("top1", "top-1 (flips)"), ("top5", "top-5"),
                 ("acc", "acc")]


def report_details(report: ParityReport) -> list[str]:
    """The lines under the table: reasons, failures per set, bisection results, verdict."""
    lines = []
    for r in report.results:
        if r.status == NOT_RUN:
            asked = " (requested, so the run fails)" if r.requested else ""
            lines.append(f"{r.artifact}: not run — {r.reason}{asked}")
        elif r.status == ERROR:
            lines.append(f"{r.artifact}: error — {r.reason}")
        for s in r.sets:
            if s.failures:
                lines.append(f"{r.artifact}: FAIL on {s.name}: " + "; ".join(s.failures))
            if s.notes:
                lines.append(f"{r.artifact}: note on {s.name}: " + "; ".join(s.notes))
        if r.bisection:
            lines.append(f"{r.artifact}: {r.bisection.describe()} [{r.bisection.method}]")
        elif r.bisection_error:
            lines.append(f"{r.artifact}: bisection not possible — {r.bisection_error}")
    ran = report.ran
    passed = sum(1 for r in ran if r)
    not_run = len(report.results) - len(ran)
    sweep = sorted({b for i in report.inputs if i["name"].startswith("batch=") for b in i["batch_sizes"]})
    lines.append(f"{'PASS' if report else 'FAIL'}: {passed}/{len(ran)} artifacts pass"
                 + (f", {not_run} not run" if not_run else "")
                 + f" — {report.samples} {report.dataset} images + batch sweep {'/'.join(map(str, sweep))}"
                 + " + zeros/large, reference " + ("from cache" if report.cache.get("hits") else "computed")
                 + f", {report.seconds:.1f}s")
    return lines
