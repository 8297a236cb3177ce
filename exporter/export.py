"""`exporter build`: weights → lint → torch.export → every artifact this machine can produce → quick parity → manifest.

The build is written into a hidden temporary directory beside its final place (`artifacts/<model>/.tmp-…`) and
renamed to `artifacts/<model>/<build-id>/` only once the manifest is complete; `artifacts/<model>/latest` is then
re-pointed (a relative symlink, swapped atomically). A failed or interrupted build removes its temporary
directory, so nothing half-written ever looks like a build.

Backend stages run in registration order (`exporter.backends.STAGES`: each backend module registers its
`export_*(ctx) -> list[Artifact]` function with `@register_stage`). A stage raising `BackendUnavailable` is
recorded as skipped with its reason — or is an error when the user named that backend in `--backends`.

The build ends with the quick parity check: the one judge (`exporter.judge`) on a smaller sample (the real test
images and a batch of one), whose records go into the build's `parity.json` exactly as `exporter verify` writes
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from exporter.backends import (
    STAGES,
    Artifact,
    BackendUnavailable,
    BuildContext,
    Variant,
    runner_for,
)
from exporter.backends.base import held_back_images_phrase
from exporter.build_inputs import (
    BuildError,
    BuildOptions,
    Weights,
    calibration_images,
    check_inputs,
    held_back_count,
    is_bare_state_dict,
    onnx_source_options,
    onnx_weights,
    resolve_weights,
)
from exporter.comparison import (
    ParityReport,
    chunks,
    compare_variant,
    make_input_sets,
    reference_info,
    reference_outputs,
    run_batches,
)
from exporter.data import sample_images
from exporter.errors import ExporterError, UsageError, one_line
from exporter.fileio import check_writable, default_file_mode, sha256_file
from exporter.lint import check_strict, lint_exported, lint_model
from exporter.machine import library_versions
from exporter.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    file_entries,
    point_latest,
    write_json_atomic,
)
from exporter.models import get_spec
from exporter.models.registry import ModelSpec
from exporter.results import parity_summary, write_parity
from exporter.tracing import check_program_batches, trace

STAGE_NAMES = tuple(STAGES)
MAX_INPUT_SIZE = 1024  # as `exporter train --resize`: 4.6× the largest input any model here trains at (224)
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process ended by it


class BuildInterrupted(ExporterError):
    """SIGTERM arrived during the build; the temporary build directory has been removed."""

    exit_code = SIGTERM_EXIT_CODE
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "exported_program.pt2"


@dataclass
class BuildResult:
    build_dir: Path
    manifest: dict[str, Any]

    @property
    def manifest_path(self) -> Path:
        return self.build_dir / MANIFEST_NAME

    parity: dict[str, Any]  # the quick check's parity document (as written to `parity.json`)

    def summary(self) -> dict[str, Any]:
        """What `--json` prints: where the build is and what it holds, each artifact with its parity record."""
        m = self.manifest
        records = {r["label"]: r for r in self.parity["results"]}
        reference = self.parity["reference"]["artifact"]
        return {
            "model": m["model"], "build_id": m["build_id"], "build_dir": str(self.build_dir),
            "manifest": str(self.manifest_path), "untrained": m["untrained"],
            "artifacts": [{"name": a["name"], "backend": a["backend"], "precision": a["precision"],
                           "size": a.get("size"),
                           "parity": _record_line(records.get(a["name"]), reference == a["name"])}
                          for a in m["artifacts"]],
            "skipped": m["skipped"], "failed": m["failed"], "lint": m["lint"], "timings": m["timings"],
            "parity_passed": self.parity["passed"],
        }


def _record_line(record: dict[str, Any] | None, is_reference: bool) -> dict[str, Any] | None:
    if is_reference:
        return {"status": "reference"}
    if record is None:
        return None
    return {"status": record["status"], "judged_as": record["judged_as"], "judged_by": record["judged_by"],
            "executed_precision": record["executed_precision"], "reason": record["reason"] or None,
            **{k: record["summary"].get(k) for k in ("max_abs", "min_cosine", "flips", "samples", "accuracy")}}


class Progress:
    """One line per stage with its time, on stderr (stdout stays clean for --json)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        self.say(f"▸ {name}{' — ' + detail if detail else ''} …")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
        self.say(f"  ✓ {name} {self.timings[name]:.1f}s")


# --- input checks ----------------------------------------------------------------------------------------------


def parse_backends(text: str | None) -> list[str] | None:
    """`--backends a,b` → stage names; an unknown name is a UsageError naming the known ones."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--backends is empty; choose from {', '.join(STAGE_NAMES)}")
    for name in names:
        if name not in STAGE_NAMES:
            close = difflib.get_close_matches(name, STAGE_NAMES, n=2, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(STAGE_NAMES)}"
            raise UsageError(f"unknown backend {name!r} in --backends: {hint}")
    return list(dict.fromkeys(names))


def _check_options(opts: BuildOptions) -> None:
    def positive(label: str, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UsageError(f"{label} must be a positive integer, got {value!r}")

    for label in ("batch", "max_batch", "input_size", "num_classes", "parity_samples", "calibration_samples"):
        positive(f"--{label.replace('_', '-')}", getattr(opts, label))
    if opts.input_size is not None and opts.input_size > MAX_INPUT_SIZE:
        raise UsageError(f"--input-size must be at most {MAX_INPUT_SIZE} pixels (the largest input a model here "
                         f"trains at is 224), got {opts.input_size}")
    if opts.untrained and opts.checkpoint is not None:
        raise UsageError("--untrained and --checkpoint contradict each other; pick one")
    if opts.input_shape is not None:
        shape = tuple(opts.input_shape)
        if len(shape) != 3 or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape):
            raise UsageError(f"--input-shape must be C,H,W positive integers, got {opts.input_shape!r}")
        if max(shape[1:]) > MAX_INPUT_SIZE:
            raise UsageError(f"--input-shape: H and W must be at most {MAX_INPUT_SIZE} pixels, got {shape}")
        if opts.input_size is not None:
            raise UsageError("--input-shape and --input-size contradict each other; pick one")
    bare = opts.checkpoint is not None and is_bare_state_dict(Path(opts.checkpoint))
    if opts.num_classes is not None and not (opts.untrained or bare or get_spec(opts.model).source != "zoo"):
        raise UsageError("--num-classes applies to --untrained builds, bare state dicts and model sources only (an "
                         "exporter checkpoint fixes the class count)")
    if opts.backends is not None:
        parse_backends(",".join(opts.backends))


def _prepare_model_dir(model_dir: Path) -> None:
    """Create `artifacts/<model>` and prove it is writable, before any long work."""
    try:
        check_writable(model_dir, "the build")
    except ExporterError as exc:
        raise BuildError(str(exc)) from None


def _remove_stale_temp_dirs(model_dir: Path) -> None:
    """Temporary build dirs left by killed processes of this host (their pid is gone)."""
    host = platform.node()
    for tmp in model_dir.glob(".tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and tmp.name.endswith(f"-{host}-{pid}") and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- quick parity --------------------------------------------------------------------------------------------


def quick_parity(build_dir: Path, artifacts: list[Artifact], images: np.ndarray, labels: np.ndarray, *, model: str,
                 dataset: str, static_batch: int | None, max_batch: int, progress: Progress) -> ParityReport:
    """The one judge on a small sample: every artifact against the eager reference (`artifacts[0]`) on the real
    images and a batch of one — the records `exporter verify` writes, on fewer inputs."""
    started = time.perf_counter()
    sets = make_input_sets(images, labels, max_batch=max_batch, static_batch=static_batch, quick=True)
    eager = artifacts[0]
    with runner_for(eager, build_dir) as reference:
        refs = reference_outputs(sets, lambda s: run_batches(reference, s.images, chunks(len(s.images), max_batch),
                                                             static_batch=static_batch))
    results = []
    for artifact in artifacts[1:]:
        result, _ = compare_variant(Variant(artifact), build_dir, sets, refs, static_batch=static_batch)
        results.append(result)
        real = result.set("real")
        if real is None:
            progress.say(f"  ✗ {artifact.name:<24} {result.status}: {result.reason}")
            continue
        m = real.metrics
        progress.say(f"  {'✓' if result else '✗'} {artifact.name:<24} {result.executed_precision:<5} judged "
                     f"{result.tolerance.precision:<5} max|Δ| {m.max_abs:.2e}  top-1 agree {m.agreement:.3f}  "
                     f"acc {m.accuracy if m.accuracy is not None else float('nan'):.3f}  "
                     f"ready in {result.activate_seconds or 0:.1f}s"
                     + ("" if result else f"  MISMATCH ({result.failures[0]})"))
    info = reference_info(eager, sha256_file(Path(build_dir) / eager.path), refs, labels)
    return ParityReport(model=model, build_dir=None, source="build", dataset=dataset, samples=int(len(images)),
                        inputs=[s.summary() for s in sets], reference=info, results=results,
                        seconds=time.perf_counter() - started)


# --- the build -------------------------------------------------------------------------------------------------


def _build_id(weights_sha: str | None, opts: BuildOptions) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    key = json.dumps([weights_sha, opts.batch, opts.max_batch, opts.fp16, opts.int8, opts.backends, os.getpid(),
                      time.time_ns()])
    return f"{stamp}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def build(opts: BuildOptions) -> BuildResult:
    """Run the whole build and return where it landed; raises an ExporterError subclass on failure."""
    _check_options(opts)
    spec = get_spec(opts.model)  # unknown model: one line, exit 2, before anything is written
    opts = dataclasses.replace(opts, model=spec.name, backends=list(opts.backends) if opts.backends else None)
    if spec.source == "onnx":
        opts = onnx_source_options(opts, spec)
    progress = Progress(opts.progress)
    started = time.perf_counter()
    check_inputs(opts)  # checkpoint, data, input size, batch memory: one line each, before any output
    model_dir = Path(opts.artifacts_dir) / spec.folder
    created = not model_dir.exists()
    _prepare_model_dir(model_dir)
    _remove_stale_temp_dirs(model_dir)
    try:
        with _sigterm_as_exit(), _quiet_torch_logs():
            return _build(opts, spec, model_dir, progress, started)
    except BaseException as exc:
        if created:  # leave no empty model directory behind either
            with contextlib.suppress(OSError):
                model_dir.rmdir()
        if isinstance(exc, SystemExit) and exc.code == SIGTERM_EXIT_CODE:
            raise BuildInterrupted("interrupted by SIGTERM; the partial build was removed") from None
        raise


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (e.g. `timeout`, a job scheduler) into SystemExit so the temporary build is cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Hide torch's "No CUDA runtime is found" notice that inductor's C++ toolchain probe logs on CPU machines."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build(opts: BuildOptions, spec: ModelSpec, model_dir: Path, progress: Progress, started: float) -> BuildResult:
    if opts.backends:
        missing = [n for n in opts.backends if STAGES[n].needs_onnx and "onnx" not in opts.backends]
        if missing:
            progress.say(f"  --backends: adding onnx, which {', '.join(missing)} convert(s) from")
            opts.backends = ["onnx", *opts.backends]

    with progress.stage("weights"):
        weights = onnx_weights(opts, spec) if spec.source == "onnx" else resolve_weights(opts, progress.say)
    build_id = _build_id(weights.info.get("sha256"), opts)
    tmp_dir = model_dir / f".tmp-{build_id}-{platform.node()}-{os.getpid()}"
    tmp_dir.mkdir()
    try:
        manifest, parity = _build_into(tmp_dir, build_id, opts, spec, weights, progress, started)
        final = model_dir / build_id
        os.replace(tmp_dir, final)
        point_latest(model_dir, final)
    except OSError as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise BuildError(f"cannot write the build into {model_dir}: {exc.strerror or exc} (the partial build was "
                         "removed)") from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    progress.say(f"{opts.model}: build {build_id} → {final} ({time.perf_counter() - started:.1f}s"
                 f"{', UNTRAINED weights' if weights.info['source'] == 'untrained' else ''}"
                 f"{'' if parity['passed'] else ', PARITY MISMATCH'})")
    return BuildResult(build_dir=final, manifest=manifest, parity=parity)


def _traced_program(out_dir: Path, opts: BuildOptions, weights: Weights, static: int | None, max_batch: int,
                    progress: Progress) -> tuple[Any, list[Any], dict[str, Any]]:
    """Lint the model, `torch.export` it, lint the program and check it against eager; saves the program."""
    model, input_shape = weights.model, weights.input_shape
    with progress.stage("lint", f"{opts.model} at {'×'.join(map(str, input_shape))}"):
        findings = lint_model(model, input_shape, seed=opts.seed)
        for finding in findings:
            progress.say(f"  ⚠ {finding}")
        check_strict(findings, opts.strict)

    diagnostics: dict[str, Any] = {}
    try:
        with progress.stage("torch.export", f"batch {static if static else f'dynamic 1..{max_batch}'}"):
            program = trace(model, input_shape, static_batch=static, max_batch=max_batch, diagnostics=diagnostics)
            exported_findings = lint_exported(program, dynamic_batch=static is None)
            for finding in exported_findings:
                progress.say(f"  ⚠ {finding}")
            check_strict(exported_findings, opts.strict)
            check_program_batches(program, model, input_shape, (static,) if static else (1, 3))
            torch.export.save(program, str(out_dir / PROGRAM_FILE))
    except Exception as exc:  # noqa: BLE001  (tracing, its checks or saving: user code can fail anywhere here)
        # The stages that do not need the program still build: torch.compile tolerates graph breaks, the ONNX
        # exporter and OpenVINO convert the model themselves; AOTInductor fails with this reason.
        if opts.strict or (opts.backends is not None and "aoti" in opts.backends and not opts.keep_going):
            raise
        (out_dir / PROGRAM_FILE).unlink(missing_ok=True)
        reason = str(exc) if isinstance(exc, ExporterError) else f"torch.export failed: {one_line(exc)}"
        diagnostics.setdefault("export", {})["error"] = reason
        progress.say(f"  ✗ torch.export FAILED: {reason} (the other stages go on without the program)")
        return None, findings, diagnostics
    return program, findings + exported_findings, diagnostics


def _reference_artifact(out_dir: Path, opts: BuildOptions, weights: Weights) -> Artifact:
    """The eager reference: the exact weights every artifact was made from."""
    if weights.info["source"] in ("checkpoint", "trained now"):  # an exporter checkpoint: the same bytes
        shutil.copyfile(weights.info["checkpoint"], out_dir / WEIGHTS_FILE)
    else:  # random init, a bare state dict (maybe a pickle-format torch file) or a Python object
        state = {k: v.detach().contiguous().clone() for k, v in weights.model.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_FILE),
                  metadata={"model": opts.model, "untrained": str(weights.info["source"] == "untrained").lower()})
        os.chmod(out_dir / WEIGHTS_FILE, default_file_mode())  # safetensors writes it 0600, unlike every other file
    return Artifact(name="eager", backend="eager", path=WEIGHTS_FILE, precision="fp32",
                    options={"model": opts.model, "in_channels": weights.input_shape[0],
                             "num_classes": weights.num_classes},
                    notes=["PyTorch eager with the build's weights: the fp32 reference"])


def _metadata(opts: BuildOptions, spec: ModelSpec, weights: Weights, build_id: str) -> dict[str, str]:
    """What every artifact file carries about itself (ONNX metadata_props, OpenVINO rt_info)."""
    untrained = weights.info["source"] == "untrained"
    return {
        "model_name": opts.model, "family": spec.family, "build_id": build_id,
        "input_scaling": spec.input_scaling, "class_names": json.dumps(weights.class_names),
        "weights": "untrained" if untrained else "trained",
        "checkpoint_sha256": weights.info.get("sha256") or "none (untrained)",
        "recipe": json.dumps(weights.recipe or ({"lr": spec.recipe.lr, "batch_size": spec.recipe.batch_size,
                                                 "epochs": spec.recipe.epochs, "resize": spec.recipe.resize}
                                                if spec.source == "zoo" else "unknown (not trained by exporter)")),
        "dataset": weights.info.get("dataset") or "none",
    }


def _run_stages(ctx: BuildContext, opts: BuildOptions, progress: Progress
                ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Every registered stage (or those of `--backends`) in order; returns (skipped, failed)."""
    skipped: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    for name, stage in STAGES.items():
        if opts.backends is not None and name not in opts.backends:
            continue
        named = opts.backends is not None
        if ctx.onnx_source is not None and stage.needs_torch:
            reason = "the model is an ONNX file: there is no PyTorch model to compile"
            if named:
                raise BuildError(f"backend {name} was asked for but {reason}")
            skipped.append({"backend": name, "reason": reason})
            progress.say(f"  – {name} skipped: {reason}")
            continue
        try:
            with progress.stage(name):
                produced = list(stage.export(ctx))
        except BackendUnavailable as exc:
            if named and not opts.keep_going:
                raise BuildError(f"backend {name} was asked for but is unavailable: {exc}") from None
            skipped.append({"backend": name, "reason": str(exc)})
            progress.say(f"  – {name} skipped: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001  (one backend's crash must not hide the others' artifacts)
            text = str(exc) if isinstance(exc, ExporterError) else one_line(exc)
            if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC: nothing later can be written either
                raise
            if (named and not opts.keep_going) or opts.strict:
                raise BuildError(f"backend {name} failed: {text}") from exc
            failed.append({"backend": name, "error": text})
            progress.say(f"  ✗ {name} FAILED: {text}")
            continue
        for artifact in produced:
            progress.say(f"    + {artifact.name} ({artifact.backend}, {artifact.precision}) {artifact.path}")
        ctx.artifacts.extend(produced)
    return skipped, failed


def _build_into(out_dir: Path, build_id: str, opts: BuildOptions, spec: ModelSpec, weights: Weights,
                progress: Progress, started: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write every file of the build into `out_dir`; returns (manifest, quick parity document)."""
    static = opts.batch or (1 if opts.max_batch == 1 else None)  # a batch range 1..1 is a static batch
    max_batch = static or opts.max_batch
    onnx_source = Path(spec.name) if spec.source == "onnx" else None
    if onnx_source is None:
        program, findings, diagnostics = _traced_program(out_dir, opts, weights, static, max_batch, progress)
        first = [_reference_artifact(out_dir, opts, weights)]
    else:  # the ONNX file is the model: nothing to trace; its reference comes from the onnx stage
        program, findings, diagnostics, first = None, [], {}, []
    calibration, held_back_pool = None, None
    if opts.int8:
        with progress.stage("calibration data", f"{opts.calibration_samples} training images"):
            calibration, held_back_pool = calibration_images(opts, weights)
        judged_on = held_back_images_phrase(held_back_count(len(calibration)), held_back_pool)
        progress.say(f"  int8 artifacts are judged on the last quarter: {judged_on}")
    ctx = BuildContext(model_name=opts.model, model=weights.model, input_shape=weights.input_shape, out_dir=out_dir,
                       exported_program=program, static_batch=static, max_batch=max_batch, fp16=opts.fp16,
                       int8=opts.int8, calibration=calibration, held_back_pool=held_back_pool,
                       metadata=_metadata(opts, spec, weights, build_id), artifacts=first, diagnostics=diagnostics,
                       onnx_source=onnx_source)
    skipped, failed = _run_stages(ctx, opts, progress)
    if onnx_source is None and program is None:
        failed.insert(0, {"backend": "torch.export", "error": diagnostics["export"]["error"]})
    reference = _reference_of(ctx)
    ctx.artifacts = [reference, *(a for a in ctx.artifacts if a is not reference)]

    with progress.stage("quick parity", f"{len(ctx.artifacts) - 1} artifacts vs {reference.name} fp32"):
        n = max(static, opts.parity_samples - opts.parity_samples % static) if static else opts.parity_samples
        images, labels, dataset = sample_images(weights.dataset, "test", weights.input_shape, n, seed=opts.seed)
        report = quick_parity(out_dir, ctx.artifacts, images, labels, model=opts.model,
                              dataset=getattr(dataset, "name", str(dataset)), static_batch=static,
                              max_batch=max_batch, progress=progress)
        parity = write_parity(out_dir, report.to_dict(), [a.name for a in ctx.artifacts])
    if not report and opts.strict:
        raise BuildError(f"--strict: quick parity failed: {'; '.join(report.problems)}")
    progress.timings["total"] = round(time.perf_counter() - started, 3)
    manifest = _manifest(out_dir, build_id, opts, spec, weights, ctx, findings, skipped, failed, progress)
    manifest["parity"] = parity_summary(parity)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest, parity


def _reference_of(ctx: BuildContext) -> Artifact:
    """What the build judges every artifact against: the eager weights; for an ONNX file, the ONNX reference
    evaluator where it is fast enough, else ONNX Runtime fp32 (the manifest's `reference` says which)."""
    if ctx.onnx_source is None:
        return ctx.artifacts[0]
    for name in ("onnx-reference", "onnx-fp32"):
        if ctx.artifact(name) is not None:
            return ctx.artifact(name)
    raise BuildError(f"{ctx.onnx_source.name}: the onnx stage produced nothing to compare against (see above)")


def _manifest(out_dir: Path, build_id: str, opts: BuildOptions, spec: ModelSpec, weights: Weights,
              ctx: BuildContext, findings: list[Any], skipped: list[dict[str, str]], failed: list[dict[str, str]],
              progress: Progress) -> dict[str, Any]:
    """The manifest of a finished build directory (see `exporter.manifest` for its keys)."""
    files = file_entries(out_dir)
    untrained = weights.info["source"] == "untrained"
    static, max_batch, input_shape = ctx.static_batch, ctx.max_batch, weights.input_shape
    artifact_entries = []
    for artifact in ctx.artifacts:
        entry = artifact.to_dict()
        # its file, the files named after it (an ONNX file's external data: model.onnx.data), an IR's weights
        own = [artifact.path] + [f for f in files if f.startswith(artifact.path + ".")] + (
            [str(Path(artifact.path).with_suffix(".bin"))] if artifact.path.endswith(".xml") else [])
        entry["files"] = [f for f in own if f in files]
        entry["size"] = sum(files[f]["size"] for f in entry["files"])
        entry["untrained"] = untrained
        if artifact.path.endswith(".onnx") and "onnx" in ctx.diagnostics:
            entry["opset"] = ctx.diagnostics["onnx"].get("opset")
        artifact_entries.append(entry)
    return {
        "format": FORMAT_VERSION,
        "build_id": build_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": opts.model,
        "family": spec.family,
        "source": spec.source,
        "origin": spec.origin,
        "reference": ctx.artifacts[0].name,
        "untrained": untrained,
        "dataset": weights.dataset,
        "input_shape": list(input_shape),
        "in_channels": input_shape[0],
        "num_classes": weights.num_classes,
        "class_names": weights.class_names,
        "input": {"name": "input", "shape": [static or "batch", *input_shape], "dtype": "float32",
                  "layout": "NCHW", "scaling": spec.input_scaling},
        "output": {"name": "logits", "shape": [static or "batch", weights.num_classes], "dtype": "float32"},
        "batch": {"dynamic": static is None, "static": static, "min": static or 1, "max": max_batch},
        "options": {"backends": opts.backends, "fp16": opts.fp16, "int8": opts.int8, "strict": opts.strict,
                    "seed": opts.seed},
        "weights": weights.info,
        "exported_program": PROGRAM_FILE if ctx.exported_program is not None else None,
        "files": files,
        "artifacts": artifact_entries,
        "skipped": skipped,
        "failed": failed,
        "lint": [f.to_dict() for f in findings],
        "warnings": ctx.warnings,
        "diagnostics": ctx.diagnostics,
        "timings": progress.timings,
        "versions": library_versions(),
    }
