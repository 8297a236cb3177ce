"""Running artifacts against the eager fp32 reference and recording the judge's verdict: input sets, the
per-variant comparison and the records every parity run writes (`parity.json`).

The build's quick check, `exporter verify` and the verification of tuned benchmark variants all call
`compare_variant` and produce the same `ComparisonResult` / `ParityReport` records; only the input sets differ
(`make_input_sets(..., quick=True)` for the build).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from exporter.backends.base import Artifact, BackendUnavailable, Runner, Variant
from exporter.errors import ExporterError, UsageError, one_line
from exporter.judge import (
    TOLERANCES,
    Metrics,
    ParityError,
    Tolerance,
    compute_metrics,
    judge,
    judged_class,
    near_tie_note,
    tolerance_for,
)

PARITY_FORMAT = 2
ODD_BATCH = 7
# The build's quick check runs the real images in batches of at most this: torch.compile gives batches 2–15 one
# graph (the runner compiles it at activate) and ≥ 16 another, and the quick check should not pay for a third.
QUICK_BATCH = 8
LARGE_PIXEL_SCALE = 255.0  # "large values": real images left unscaled (0–255), the classic preprocessing slip
PASS, FAIL, ERROR, NOT_RUN = "pass", "fail", "error", "not run"
NATURAL_SETS = ("real", "batch=")  # sets of real images: their errors are the ones summaries show


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


def chunks(n: int, size: int) -> list[int]:
    """Batch sizes covering `n` images in batches of at most `size`."""
    return [min(size, n - start) for start in range(0, n, size)]


def make_input_sets(images: np.ndarray, labels: np.ndarray | None, *, max_batch: int,
                    static_batch: int | None = None, seed: int = 0, quick: bool = False) -> list[InputSet]:
    """Real images in batches of `max_batch`, the batch sweep (1, odd, max) and the adversarial inputs.

    `quick` (the build's check): the real images in batches of at most QUICK_BATCH, and a batch of one only.
    """
    if images.ndim != 4 or not len(images):
        raise UsageError(f"parity needs a non-empty NCHW image batch, got shape {images.shape}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    n = len(images)
    biggest = static_batch or (min(max_batch, QUICK_BATCH) if quick else max_batch)
    sets = [InputSet("real", f"{n} real test images", images, chunks(n, biggest), labels=labels,
                     check_agreement=True)]
    if static_batch:
        sweep = [static_batch]
    elif quick:
        sweep = [1]
    else:
        sweep = sorted({1, min(ODD_BATCH, max_batch), max_batch})
    for b in sweep:
        rows = np.arange(b) % n  # tile when there are fewer images than the batch
        sets.append(InputSet(f"batch={b}", f"first {b} real images as one batch of {b}", images[rows], [b],
                             reference_rows=rows))
    if quick:
        return sets
    odd = static_batch or min(ODD_BATCH, max_batch)
    shape = (odd, *images.shape[1:])
    sets.append(InputSet("zeros", f"{odd} all-zero images", np.zeros(shape, np.float32), [odd], scale_atol=True))
    rows = np.random.default_rng(seed).permutation(n)[:odd] if n >= odd else np.arange(odd) % n
    sets.append(InputSet("large", f"{odd} real images ×{LARGE_PIXEL_SCALE:g} (unscaled pixels)",
                         images[rows] * np.float32(LARGE_PIXEL_SCALE), [odd], scale_atol=True,
                         beyond_calibration=True))
    return sets


def run_batches(runner: Runner, images: np.ndarray, batches: Sequence[int], *, static_batch: int | None = None,
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


def reference_outputs(sets: list[InputSet], compute: Callable[[InputSet], np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's logits per set: `compute` for sets of new images, rows of "real" for the batch sweep."""
    refs = {s.name: compute(s) for s in sets if s.reference_rows is None}
    for s in sets:
        if s.reference_rows is not None:
            refs[s.name] = refs["real"][s.reference_rows]
    return refs


def reference_info(eager: Artifact, weights_digest: str, refs: dict[str, np.ndarray],
                   labels: np.ndarray | None) -> dict[str, Any]:
    """What a parity report says about its reference."""
    return {"artifact": eager.name, "backend": eager.backend, "precision": eager.precision,
            "weights_sha256": weights_digest,
            "accuracy": float((refs["real"].argmax(1) == labels).mean()) if labels is not None else None}


# --- records --------------------------------------------------------------------------------------------------


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
class ComparisonResult:
    """One variant's verdict: `bool(result)` is True only when it ran and passed its tolerance class."""

    variant: Variant
    tolerance: Tolerance
    status: str  # pass / fail / error / not run
    judged_by: str = ""  # what chose the tolerance class: stored weights, compute, or --tolerance-class
    executed_precision: str = "-"  # as the runtime reports it
    reason: str = ""  # why it failed, errored or did not run (one line)
    requested: bool = False  # named by the user (then "not run" fails the run)
    sets: list[SetResult] = field(default_factory=list)
    bisection: Any = None  # exporter.bisect.Bisection
    bisection_error: str = ""
    seconds: float = 0.0
    activate_seconds: float | None = None  # load, session creation or compile (torch.compile's happens here)

    def __bool__(self) -> bool:
        return self.status == PASS

    @property
    def label(self) -> str:
        return self.variant.label

    @property
    def artifact(self) -> str:
        return self.variant.artifact.name

    @property
    def backend(self) -> str:
        return self.variant.artifact.backend

    @property
    def failures(self) -> list[str]:
        """Every failure of this variant, each prefixed with the input set."""
        found = [f"{s.name}: {f}" for s in self.sets for f in s.failures]
        return found or ([self.reason] if self.status in (FAIL, ERROR) and self.reason else [])

    def set(self, name: str) -> SetResult | None:
        return next((s for s in self.sets if s.name == name), None)

    def summary(self) -> dict[str, Any]:
        """The numbers `select` and reports read: flips and accuracy on the real images, worst natural error."""
        real = self.set("real")
        natural = [s for s in self.sets if s.name.startswith(NATURAL_SETS)]
        out: dict[str, Any] = {"flips": None, "samples": None, "flip_rate": None, "accuracy": None,
                               "reference_accuracy": None, "acc_drop": None, "max_abs": None, "min_cosine": None}
        if real is not None:
            m = real.metrics
            out.update(flips=m.flipped, samples=m.n, flip_rate=m.flipped / m.n if m.n else None,
                       accuracy=m.accuracy, reference_accuracy=m.reference_accuracy)
            if m.accuracy is not None and m.reference_accuracy is not None:
                out["acc_drop"] = 100.0 * (m.reference_accuracy - m.accuracy)  # percentage points
        if natural:
            out["max_abs"] = max(s.metrics.max_abs for s in natural)
            out["min_cosine"] = min(s.metrics.min_cosine for s in natural)
        return {k: (_finite_or_text(v) if isinstance(v, float) else v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        artifact = self.variant.artifact
        return {"label": self.label, "artifact": artifact.name, "variant": self.variant.name,
                "options": dict(self.variant.options), "backend": artifact.backend, "precision": artifact.precision,
                "executed_precision": self.executed_precision, "device": artifact.device,
                "judged_as": self.tolerance.precision, "judged_by": self.judged_by, "status": self.status,
                "passed": bool(self), "reason": self.reason, "requested": self.requested,
                "tolerance": self.tolerance.to_dict(), "failures": self.failures, "summary": self.summary(),
                "sets": [s.to_dict() for s in self.sets],
                "bisection": self.bisection.to_dict() if self.bisection else None,
                "bisection_error": self.bisection_error, "seconds": round(self.seconds, 3),
                "activate_s": None if self.activate_seconds is None else round(self.activate_seconds, 3)}


def _finite_or_text(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no inf/nan


@dataclass
class ParityReport:
    """Every variant's result for one parity run; `bool(report)` is the run's verdict."""

    model: str
    build_dir: str | None
    source: str  # "build" (the build's quick check), "verify", or "tune" (tuned benchmark variants)
    dataset: str
    samples: int
    inputs: list[dict[str, Any]]
    reference: dict[str, Any]
    results: list[ComparisonResult]
    tolerance_class: str | None = None  # forced class, else each variant's own
    cache: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def ran(self) -> list[ComparisonResult]:
        return [r for r in self.results if r.status != NOT_RUN]

    @property
    def problems(self) -> list[str]:
        """Why the run does not pass: failures, errors, requested variants that did not run, nothing run."""
        problems = []
        for r in self.results:
            if r.status in (FAIL, ERROR):
                problems += [f"{r.label}: {f}" for f in r.failures]
            elif r.status == NOT_RUN and r.requested:
                problems.append(f"{r.label}: not run ({r.reason})")
        if not self.ran:
            problems.append("no artifact could run, so nothing was verified")
        return problems

    def __bool__(self) -> bool:
        return not self.problems

    def result(self, label: str) -> ComparisonResult | None:
        return next((r for r in self.results if r.label == label), None)

    def raise_for_failures(self) -> None:
        """Raise one ParityError listing every problem (does nothing when the run passed)."""
        problems = self.problems
        if problems:
            raise ParityError(f"{len(problems)} parity problem(s) for {self.model}: " + "; ".join(problems), self)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PARITY_FORMAT, "model": self.model, "build_dir": self.build_dir, "source": self.source,
                "passed": bool(self), "problems": self.problems, "dataset": self.dataset, "samples": self.samples,
                "inputs": self.inputs, "reference": self.reference, "tolerance_class": self.tolerance_class,
                "tolerances": {k: v.to_dict() for k, v in TOLERANCES.items()}, "cache": self.cache,
                "seconds": round(self.seconds, 3), "created": self.created,
                "results": [r.to_dict() for r in self.results]}


# --- one variant against the reference ------------------------------------------------------------------------


@dataclass
class Overrides:
    """What the user changed about the judge: a forced class and any of atol / rtol / min_agreement / max_acc_drop."""

    tolerance_class: str | None = None
    atol: float | None = None
    rtol: float | None = None
    min_agreement: float | None = None
    max_acc_drop: float | None = None

    def __post_init__(self) -> None:
        if self.tolerance_class is not None:
            tolerance_for(self.tolerance_class)
        self.tolerance("fp32", None)  # validate early

    def tolerance(self, stored: str, executed: str | None) -> tuple[Tolerance, str]:
        klass, by = judged_class(stored, executed, self.tolerance_class)
        return tolerance_for(klass, atol=self.atol, rtol=self.rtol, min_agreement=self.min_agreement,
                             max_acc_drop=self.max_acc_drop), by


def compare_variant(variant: Variant, build_dir: Path, sets: list[InputSet], refs: dict[str, np.ndarray], *,
                    static_batch: int | None, overrides: Overrides | None = None, requested: bool = False,
                    progress: Any = None) -> tuple[ComparisonResult, dict[str, np.ndarray]]:
    """Run one variant on every input set and judge it; returns the result and its outputs per set."""
    overrides = overrides or Overrides()
    started = time.perf_counter()
    images = sum(len(s.images) for s in sets)
    tol, by = overrides.tolerance(variant.artifact.precision, None)
    result = ComparisonResult(variant, tol, PASS, judged_by=by, requested=requested)
    outputs: dict[str, np.ndarray] = {}
    try:
        runner = variant.runner(build_dir)
        activating = time.perf_counter()
        runner.activate()
        result.activate_seconds = time.perf_counter() - activating
    except BackendUnavailable as exc:
        result.status, result.reason = NOT_RUN, str(exc)
    except ExporterError as exc:
        result.status, result.reason = ERROR, f"cannot load: {exc}"
    if result.status != PASS:
        if progress is not None:
            progress.update(images)
        result.seconds = time.perf_counter() - started
        return result, outputs
    try:
        result.executed_precision = runner.executed_precision
        result.tolerance, result.judged_by = tol, by = overrides.tolerance(variant.artifact.precision,
                                                                          runner.executed_precision)
        real_scale = float(np.abs(refs["real"]).max(initial=0.0)) or 1.0
        for s in sets:
            ref = refs[s.name]
            out = run_batches(runner, s.images, s.batches, static_batch=static_batch, progress=progress)
            if out.shape != ref.shape:
                raise ParityError(f"{s.name}: output shape {out.shape[1:]} per image, eager gives {ref.shape[1:]}")
            outputs[s.name] = out
            metrics = compute_metrics(ref, out, labels=s.labels, rel_floor=tol.rel_floor)
            scale = max(1.0, metrics.ref_scale / real_scale) if s.scale_atol else 1.0
            failures = judge(ref, out, metrics, tol, atol_scale=scale, check_agreement=s.check_agreement,
                             logit_scale=real_scale)
            notes: list[str] = []
            if s.beyond_calibration and tol.precision == "int8":
                notes = [f"not judged for int8 (outside the calibration range, activations saturate): {f}"
                         for f in failures]
                failures = []
            elif any(f.startswith("top-1 agreement") for f in failures) and (
                    note := near_tie_note(ref, out, tol, scale)):
                notes = [note]
            result.sets.append(SetResult(s.name, s.description, sorted(set(s.batches)), metrics, failures,
                                         tol.atol * scale, notes))
    except ExporterError as exc:
        result.status, result.reason = ERROR, str(exc)
    except Exception as exc:  # a runtime crash on one variant must not hide the others' verdicts
        result.status, result.reason = ERROR, one_line(exc)
    finally:
        runner.deactivate()
    if result.status == PASS and any(s.failures for s in result.sets):
        result.status, result.reason = FAIL, result.failures[0]
    result.seconds = time.perf_counter() - started
    return result, outputs


def not_run(variant: Variant, reason: str, *, requested: bool = True) -> ComparisonResult:
    """The record of a variant that was not run (its backend has no artifact in the build, …)."""
    return ComparisonResult(variant, tolerance_for("fp32"), NOT_RUN, reason=reason, requested=requested)
