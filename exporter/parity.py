"""`exporter verify`: does every artifact of a build compute what PyTorch computes?

Every artifact runs the same inputs as the eager fp32 model (the reference, computed once per run and cached):
real test images of the dataset the model was trained on, a dynamic-batch sweep (batch 1, an odd size, the
largest batch the artifact allows) and adversarial inputs (all zeros, unscaled 0–255 pixels). The metrics and
the verdict are the one judge's (`exporter.judge`): each variant is judged by the class of the lowest precision
it really uses. When an artifact fails (or on request) the layer-by-layer comparison (`exporter.bisect`) names
the first diverging layer.

The API collects every failure into a `ParityReport` and, with `check=True`, raises one `ParityError` whose
message lists them all (Optimum's style); the CLI prints the table and exits non-zero instead. Records are
written into the build's `parity.json` through `exporter.results`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from exporter.backends import BACKENDS, Artifact, Variant, runner_for
from exporter.backends.base import BisectionUnsupported, Runner
from exporter.bisect import bisect_variant
from exporter.comparison import (
    ERROR,
    FAIL,
    NOT_RUN,
    ComparisonResult,
    InputSet,
    Overrides,
    ParityReport,
    chunks,
    compare_variant,
    make_input_sets,
    not_run,
    reference_info,
    reference_outputs,
    run_batches,
)
from exporter.data import sample_images
from exporter.errors import ExporterError, UsageError, one_line
from exporter.fileio import sha256_file
from exporter.judge import ParityError
from exporter.manifest import REFERENCE_CACHE_FILE, Build, load_build, update_manifest
from exporter.models import check_input_shape
from exporter.paths import default_artifacts_dir
from exporter.results import parity_summary, write_parity

DEFAULT_SAMPLES = 256


# --- the reference (eager fp32), computed once and cached ---------------------------------------------------


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

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached output of `key`, or `compute()`'s (then cached)."""
        if key in self._memory:
            self.hits += 1
        else:
            self.misses += 1
            self._memory[key] = np.asarray(compute(), np.float32)
        self._new[key] = self._memory[key]
        return self._memory[key]

    def save(self) -> str | None:
        """Write this run's references (only them, so the file never grows) atomically; a warning when the build
        directory cannot be written (the cache is then skipped, nothing else changes)."""
        if self.path is None or not self._new:
            return None
        tmp = None
        try:
            with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=".parity_reference.", suffix=".npz",
                                             delete=False) as f:
                tmp = f.name
                np.savez(f, **self._new)
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return f"reference cache not written ({exc.strerror or exc}); it is recomputed next time"
        return None


def _reference_outputs(runner: Runner, eager: Artifact, sets: list[InputSet], labels: np.ndarray | None,
                       max_batch: int, cache: ReferenceCache) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Eager fp32 logits of every input set (cached), and what the report says about the reference."""
    weights_digest = sha256_file(runner.path)
    # what the reference depends on besides the input: weights, model options, torch (kernels, model code)
    reference_id = hashlib.sha256(f"{weights_digest} {json.dumps(eager.options, sort_keys=True)} "
                                  f"{torch.__version__}".encode()).hexdigest()
    refs = reference_outputs(sets, lambda s: cache.get(
        input_key(reference_id, s.images), lambda: run_batches(runner, s.images, chunks(len(s.images), max_batch))))
    return refs, reference_info(eager, weights_digest, refs, labels)


# --- choosing what to verify ----------------------------------------------------------------------------------


def select_variants(artifacts: list[Artifact], names: Iterable[str] | None,
                    reference: Artifact | None = None) -> list[tuple[Variant, bool]]:
    """(variant, requested) pairs for `--backends` (artifact or backend names); all but the reference by default.

    A real backend this build has no artifact for becomes a placeholder that is reported as not run.
    """
    if not names:
        if reference is None:  # the eager fp32 weights, as in a build whose manifest names no other reference
            reference = next((a for a in artifacts if a.backend == "eager" and a.precision == "fp32"), None)
        return [(Variant(a), False) for a in artifacts if reference is None or a.name != reference.name]
    chosen: list[tuple[Variant, bool]] = []
    for name in names:
        matches = [a for a in artifacts if name in (a.name, a.backend)]
        if not matches:
            if name not in BACKENDS:
                known = sorted({a.name for a in artifacts} | set(BACKENDS))
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(known)}"
                raise UsageError(f"unknown backend or artifact {name!r}: {hint}")
            chosen.append((Variant(Artifact(name=name, backend=name, path="", precision="fp32")), True))
            continue
        chosen += [(Variant(a), True) for a in matches if all(a is not c.artifact for c, _ in chosen)]
    return chosen


def batch_limits(build: Build) -> tuple[int, int | None]:
    """(largest batch the artifacts allow, static batch or None) from the manifest."""
    batch = build.manifest.get("batch") if isinstance(build.manifest.get("batch"), dict) else {}
    static = batch.get("static")
    return int(batch.get("max") or static or 64), (int(static) if static else None)


# --- running a build ------------------------------------------------------------------------------------------


def verify_build(build: Build, *, backends: Iterable[str] | None = None, variants: list[Variant] | None = None,
                 samples: int = DEFAULT_SAMPLES, data: str | Path | None = None, seed: int = 0,
                 bisect: bool = False, overrides: Overrides | None = None, images: np.ndarray | None = None,
                 labels: np.ndarray | None = None, dataset: str | None = None, cache_reference: bool = True,
                 progress: bool = True, source: str = "verify") -> ParityReport:
    """Verify the artifacts of a loaded build (or given `variants`) against eager fp32; never raises for parity
    failures (see `verify`)."""
    started = time.perf_counter()
    if samples <= 0:
        raise UsageError(f"--samples must be a positive integer, got {samples}")
    overrides = overrides or Overrides()
    input_shape = build.input_shape
    if build.manifest.get("source") != "onnx":  # an ONNX file's build holds its own copy, which fixes the shape
        check_input_shape(build.model, input_shape)  # a manifest shape the model cannot take: one line, valid sizes
    if images is None:
        images, labels, ds = sample_images(build.dataset if data is None else data, "test", input_shape, samples,
                                           seed=seed)
        dataset = dataset or getattr(ds, "name", str(ds))
    images = np.ascontiguousarray(images, np.float32)
    if tuple(images.shape[1:]) != input_shape:
        raise UsageError(f"the images are {'×'.join(map(str, images.shape[1:]))} but the build's artifacts take "
                         f"{'×'.join(map(str, input_shape))}")
    max_batch, static_batch = batch_limits(build)
    sets = make_input_sets(images, labels, max_batch=max_batch, static_batch=static_batch, seed=seed)
    eager = build.reference
    if eager is None:
        raise ParityError(f"build {build.dir} has no reference artifact "
                          f"({build.manifest.get('reference') or 'eager fp32 weights'}), so nothing can be verified")
    chosen = ([(v, True) for v in variants] if variants is not None
              else select_variants(build.artifacts, backends, eager))
    reference_runner = runner_for(eager, build.dir)
    try:
        reference_runner.activate()
    except ExporterError as exc:
        raise ParityError(f"the reference ({eager.name}, {eager.backend} {eager.precision}) cannot run, so nothing "
                          f"can be verified: {exc}") from exc
    cache = ReferenceCache(Path(build.dir) / REFERENCE_CACHE_FILE if cache_reference else None)
    try:
        refs, info = _reference_outputs(reference_runner, eager, sets, labels, max_batch, cache)
        warning = cache.save()
        if warning:
            info["warning"] = warning
        results = []
        total = sum(len(s.images) for s in sets) * len(chosen)
        with tqdm(total=total, desc="verify", unit="img", disable=not progress, leave=False) as bar:
            for variant, requested in chosen:
                bar.set_postfix_str(variant.label)
                if not variant.artifact.path:
                    results.append(_missing_backend(build, variant))
                    bar.update(total // max(len(chosen), 1))
                    continue
                result, outputs = compare_variant(variant, build.dir, sets, refs, static_batch=static_batch,
                                                  overrides=overrides, requested=requested, progress=bar)
                if result.sets and (bisect or result.status == FAIL):
                    _bisect_into(result, outputs, refs, sets, build, getattr(reference_runner, "model", None),
                                 count=static_batch or 4)
                results.append(result)
    finally:
        reference_runner.deactivate()
    return ParityReport(model=build.model, build_dir=str(build.dir), source=source,
                        dataset=dataset or "given images", samples=int(len(images)),
                        inputs=[s.summary() for s in sets], reference=info, results=results,
                        tolerance_class=overrides.tolerance_class, cache={"hits": cache.hits, "misses": cache.misses},
                        seconds=time.perf_counter() - started)


def _missing_backend(build: Build, variant: Variant) -> ComparisonResult:
    skipped = [s.get("reason", "") for s in build.manifest.get("skipped") or []
               if isinstance(s, dict) and s.get("backend") == variant.artifact.backend]
    return not_run(variant, "the build has no artifact for this backend"
                   + (f" (skipped at build: {skipped[0]})" if skipped else ""))


def _bisect_into(result: ComparisonResult, outputs: dict[str, np.ndarray], refs: dict[str, np.ndarray],
                 sets: list[InputSet], build: Build, reference_model: Any, count: int = 4) -> None:
    """Bisect the failing set's `count` worst images — one static batch of a static-batch build — (a diagnosis:
    its own failure never hides the verdict)."""
    failing = next((s for s in result.sets if s.failures), result.sets[0])
    images = next(s.images for s in sets if s.name == failing.name)
    err = np.abs(np.nan_to_num(outputs[failing.name], nan=np.inf) - refs[failing.name]).max(1)
    rows = np.sort(np.argsort(-err, kind="stable")[:count])
    try:
        result.bisection = bisect_variant(result.variant, build, reference_model, np.ascontiguousarray(images[rows]),
                                          result.tolerance, input_set=failing.name)
    except BisectionUnsupported as exc:
        result.bisection_error = str(exc)
    except Exception as exc:  # noqa: BLE001
        result.bisection_error = one_line(exc)


def verify(target: str | Path, *, artifacts_dir: str | Path | None = None, save: bool = True, check: bool = True,
           **options: Any) -> ParityReport:
    """Verify a build (a model name → its latest build, or a build directory) against eager fp32.

    Writes the records into the build's `parity.json` (`save`), then raises one `ParityError` listing every
    failure when anything failed (`check`). `options` are `verify_build`'s.
    """
    build = load_build(target, Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir())
    report = verify_build(build, **options)
    if save:
        save_report(report, build)
    if check:
        report.raise_for_failures()
    return report


def save_report(report: ParityReport, build: Build) -> Path:
    """Merge the report's records into the build's `parity.json` and update the manifest's `parity` section."""
    document = write_parity(build.dir, report.to_dict(), [a.name for a in build.artifacts])
    update_manifest(build, "parity", parity_summary(document))
    return Path(build.dir) / "parity.json"


# --- presentation ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2e") -> str:
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


def report_rows(report: ParityReport) -> list[dict[str, str]]:
    """One table row per artifact: the worst error over the real images and the batch sweep (the adversarial
    sets' logits are orders of magnitude larger, so their errors are judged scaled and listed in the JSON),
    top-1/top-5/KL/accuracy on the real images."""
    rows = [{"artifact": report.reference["artifact"], "backend": report.reference.get("backend", "eager"),
             "precision": report.reference.get("precision", "fp32"), "class": "-",
             "status": "reference",
             "acc": _fmt(report.reference.get("accuracy"), ".4f")}]
    for r in report.results:
        row = {"artifact": r.label, "backend": r.backend, "precision": r.executed_precision,
               "class": r.tolerance.precision if r.status != NOT_RUN else "-", "status": r.status.upper()}
        if r.sets:
            real = r.set("real")
            natural = [s for s in r.sets if s.name == "real" or s.name.startswith("batch=")] or r.sets
            row.update(
                max_abs=_fmt(max(s.metrics.max_abs for s in natural)),
                max_rel=_fmt(max(s.metrics.max_rel for s in natural)),
                mean_abs=_fmt(real.metrics.mean_abs if real else None),
                cosine=_fmt(min(s.metrics.min_cosine for s in natural), ".6f"),
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
            lines.append(f"{r.label}: not run — {r.reason}{asked}")
        elif r.status == ERROR:
            lines.append(f"{r.label}: error — {r.reason}")
        if r.status != NOT_RUN and r.judged_by and r.judged_by != "stored weights and compute":
            lines.append(f"{r.label}: judged in the {r.tolerance.precision} class by its {r.judged_by}")
        for s in r.sets:
            if s.failures:
                lines.append(f"{r.label}: FAIL on {s.name}: " + "; ".join(s.failures))
            if s.notes:
                lines.append(f"{r.label}: note on {s.name}: " + "; ".join(s.notes))
        if r.bisection:
            lines.append(f"{r.label}: {r.bisection.describe()} [{r.bisection.method}]")
        elif r.bisection_error:
            lines.append(f"{r.label}: bisection not possible — {r.bisection_error}")
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
