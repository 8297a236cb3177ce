"""`exporter build`: weights → lint → torch.export → every artifact this machine can produce → quick parity → manifest.

The build is written into a hidden temporary directory beside its final place (`artifacts/<model>/.tmp-…`) and
renamed to `artifacts/<model>/<build-id>/` only once the manifest is complete; `artifacts/<model>/latest` is then
re-pointed (a relative symlink, swapped atomically). A failed or interrupted build removes its temporary
directory, so nothing half-written ever looks like a build.

Backend stages run in a fixed order, each an `export_*(ctx) -> list[Artifact]` function of a backend module. A
stage raising `BackendUnavailable` is recorded as skipped with its reason — or is an error when the user named
that backend in `--backends`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from exporter.backends.base import Artifact, BackendUnavailable, BuildContext, runner_for
from exporter.errors import ExporterError, UsageError
from exporter.manifest import FORMAT_VERSION, MANIFEST_NAME, file_entries, point_latest, write_json_atomic

# (stage name as used by --backends, module, function). Order matters: later stages read earlier artifacts.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("inductor", "exporter.backends.inductor", "export_inductor"),
    ("aoti", "exporter.backends.aoti", "export_aoti"),
    ("onnx", "exporter.backends.onnx", "export_onnx"),
    ("onnxruntime", "exporter.backends.onnxruntime", "export_onnxruntime"),
    ("openvino", "exporter.backends.openvino", "export_openvino"),
    ("tensorrt", "exporter.backends.tensorrt", "export_tensorrt"),
)
STAGE_NAMES = tuple(name for name, _, _ in STAGES)
NEEDS_ONNX = ("onnxruntime", "tensorrt")  # stages that consume the ONNX file
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "exported_program.pt2"
# Quick-parity tolerance on max |artifact − eager fp32|, relative to the reference's largest |logit| (floor 1).
PARITY_RTOL = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 6e-2, "fp16": 3e-2}
INT8_MIN_TOP1 = 0.9  # int8 is judged on top-1 agreement only: its logits differ by design
LIBRARIES = ("torch", "torchvision", "numpy", "onnx", "onnxscript", "onnxruntime", "openvino", "tensorrt",
             "safetensors")


class BuildError(ExporterError):
    """The build cannot go on (bad checkpoint, tracing failure, a named backend that failed, …)."""


@dataclass
class BuildOptions:
    """Everything `exporter build` takes; the CLI flags map one to one."""

    model: str
    backends: list[str] | None = None  # stage names; None = every stage
    checkpoint: Path | None = None
    untrained: bool = False
    data: str | None = None
    artifacts_dir: Path = Path("artifacts")
    batch: int | None = None  # static batch; None = dynamic
    max_batch: int = 64
    fp16: bool = False
    int8: bool = False
    strict: bool = False
    input_size: int | None = None  # square H = W; only without a checkpoint (a checkpoint fixes it)
    num_classes: int | None = None  # only with untrained (a checkpoint fixes it)
    parity_samples: int = 32
    calibration_samples: int = 256
    seed: int = 0
    progress: bool = True


@dataclass
class BuildResult:
    build_dir: Path
    manifest: dict[str, Any]

    @property
    def manifest_path(self) -> Path:
        return self.build_dir / MANIFEST_NAME

    def summary(self) -> dict[str, Any]:
        """What `--json` prints: where the build is and what it holds."""
        m = self.manifest
        return {
            "model": m["model"], "build_id": m["build_id"], "build_dir": str(self.build_dir),
            "manifest": str(self.manifest_path), "untrained": m["untrained"],
            "artifacts": [{"name": a["name"], "backend": a["backend"], "precision": a["precision"],
                           "size": a.get("size"), "parity": m["parity"]["artifacts"].get(a["name"])}
                          for a in m["artifacts"]],
            "skipped": m["skipped"], "failed": m["failed"], "lint": m["lint"], "timings": m["timings"],
            "parity_ok": m["parity"]["ok"],
        }


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
    if opts.untrained and opts.checkpoint is not None:
        raise UsageError("--untrained and --checkpoint contradict each other; pick one")
    if opts.num_classes is not None and not opts.untrained:
        raise UsageError("--num-classes applies to --untrained builds only (a checkpoint fixes the class count)")
    if opts.backends is not None:
        parse_backends(",".join(opts.backends))


def _prepare_model_dir(model_dir: Path) -> None:
    """Create `artifacts/<model>` and prove it is writable, before any long work."""
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = model_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BuildError(f"cannot write to output directory {model_dir}: {exc.strerror or exc}") from None


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


# --- weights ---------------------------------------------------------------------------------------------------


@dataclass
class Weights:
    """The model to export and where its weights came from."""

    model: Any
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    info: dict[str, Any]  # manifest["weights"]
    dataset: str | None  # the --data the weights were trained on (None = digits5k)
    recipe: dict[str, Any] = field(default_factory=dict)


def _dataset_arg(sidecar: dict[str, Any]) -> str | None:
    """The `--data` value that reads the data set a checkpoint was trained on (None = digits5k)."""
    from exporter.data import DIGITS5K

    dataset = sidecar.get("dataset") or {}
    if not isinstance(dataset, dict) or dataset.get("name") in (None, DIGITS5K):
        return None
    return dataset.get("source") or None


def _from_checkpoint(path: Path, opts: BuildOptions, *, trained_now: bool) -> Weights:
    from exporter.models import create_model
    from exporter.train import load_checkpoint, resolve_checkpoint

    state, sidecar = load_checkpoint(path, expect_model=opts.model)
    input_shape = tuple(int(d) for d in sidecar["input_shape"])
    if opts.input_size is not None and input_shape[1:] != (opts.input_size, opts.input_size):
        raise BuildError(f"checkpoint {path} was trained at {'×'.join(map(str, input_shape))}, not "
                         f"{opts.input_size}×{opts.input_size}; drop --input-size or retrain at that size")
    model = create_model(opts.model, in_channels=int(sidecar["in_channels"]), num_classes=int(sidecar["num_classes"]))
    model.load_state_dict(state)
    weights_path, _ = resolve_checkpoint(path)
    from exporter.manifest import sha256_file

    info = {
        "source": "trained now" if trained_now else "checkpoint",
        "checkpoint": str(weights_path),
        "sha256": sha256_file(weights_path),
        "trained": True,
        "dataset": (sidecar.get("dataset") or {}).get("name") if isinstance(sidecar.get("dataset"), dict) else None,
        "epochs": sidecar.get("epoch"),
        "steps": sidecar.get("steps"),
        "train_accuracy": sidecar.get("train_accuracy"),
        "test_accuracy": sidecar.get("test_accuracy"),
        "created": sidecar.get("created"),
    }
    return Weights(model=model.eval(), input_shape=input_shape, num_classes=int(sidecar["num_classes"]),
                   class_names=[str(c) for c in sidecar.get("class_names") or range(int(sidecar["num_classes"]))],
                   info=info, dataset=opts.data if opts.data is not None else _dataset_arg(sidecar),
                   recipe=dict(sidecar.get("recipe") or {}))


def _untrained(opts: BuildOptions) -> Weights:
    import torch

    from exporter.data import load_split
    from exporter.models import check_input_shape, create_model, get_spec

    spec = get_spec(opts.model)
    test = load_split(opts.data, "test")
    channels = 3 if test.channels == 3 else spec.input_shape[0]
    size = opts.input_size
    input_shape = (channels, size, size) if size else (channels, *spec.input_shape[1:])
    check_input_shape(opts.model, input_shape)
    num_classes = opts.num_classes or test.num_classes
    class_names = test.class_names if num_classes == test.num_classes else [str(i) for i in range(num_classes)]
    torch.manual_seed(opts.seed)
    model = create_model(opts.model, in_channels=channels, num_classes=num_classes)
    info = {"source": "untrained", "trained": False, "seed": opts.seed, "checkpoint": None, "sha256": None,
            "train_accuracy": None, "test_accuracy": None}
    return Weights(model=model.eval(), input_shape=input_shape, num_classes=num_classes, class_names=class_names,
                   info=info, dataset=opts.data)


def resolve_weights(opts: BuildOptions, progress: Progress) -> Weights:
    """The model with its weights: `--checkpoint`, the model's checkpoint, a fresh training run, or `--untrained`."""
    from exporter.train import checkpoint_paths, train

    if opts.untrained:
        progress.say(f"  {opts.model}: --untrained: exporting randomly initialised weights (seed {opts.seed}); "
                     "every artifact is marked untrained")
        return _untrained(opts)
    if opts.checkpoint is not None:
        return _from_checkpoint(Path(opts.checkpoint), opts, trained_now=False)
    weights_path, sidecar_path = checkpoint_paths(opts.model, opts.artifacts_dir)
    if weights_path.exists() or sidecar_path.exists():
        return _from_checkpoint(weights_path, opts, trained_now=False)
    progress.say(f"  no checkpoint for {opts.model} in {opts.artifacts_dir}: training it first with the default "
                 f"budget (`exporter train {opts.model}`; pass --untrained to skip)")
    train(opts.model, data=opts.data, resize=opts.input_size, seed=opts.seed, artifacts_dir=opts.artifacts_dir,
          progress=opts.progress)
    return _from_checkpoint(weights_path, opts, trained_now=True)


# --- tracing ---------------------------------------------------------------------------------------------------


def trace(model: Any, input_shape: tuple[int, int, int], *, static_batch: int | None, max_batch: int,
          diagnostics: dict[str, Any] | None = None) -> Any:
    """`torch.export` the model once, with a dynamic batch dimension 1..max_batch unless `static_batch`.

    The Dynamo tracer (`strict=True`, what torch.compile uses) goes first; if it cannot trace the code, the
    non-strict tracer is tried and the fallback is recorded in `diagnostics["export"]`.
    """
    import torch

    example_batch = static_batch or 2  # torch.export specialises a batch of 1
    example = torch.rand((example_batch, *input_shape), generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None if static_batch else ({0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))},)
    info: dict[str, Any] = {"example_batch": example_batch, "dynamic_batch": static_batch is None}
    if diagnostics is not None:
        diagnostics["export"] = info
    errors = []
    for strict in (True, False):
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as exc:  # noqa: BLE001  (reported below, or by the fallback's success)
            errors.append(exc)
            info[f"{'strict' if strict else 'non_strict'}_error"] = _first_line(exc)
            continue
        info["tracer"] = "dynamo (strict)" if strict else "non-strict (Dynamo could not trace the code)"
        return program
    exc = errors[-1]
    text = f"{exc}"
    hint = (" (the code fixes the batch size: fix it or build with --batch N)"
            if "Constraints violated" in text or "specializ" in text else "")
    raise BuildError(f"torch.export failed for the model: {_first_line(errors[0])}{hint}") from exc


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _check_program_batches(program: Any, model: Any, input_shape: tuple[int, int, int], batches: tuple[int, ...]) -> None:
    """The traced program must match eager at each batch size (catches a silently specialised batch)."""
    import torch

    module = program.module()
    for batch in batches:
        x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            try:
                got = module(x)
            except Exception as exc:
                raise BuildError(f"the traced program fails at batch {batch}: "
                                 f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
            want = model(x)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise BuildError(f"the traced program differs from the model at batch {batch}")


# --- parity ----------------------------------------------------------------------------------------------------


def _batches(images: np.ndarray, static_batch: int | None) -> list[np.ndarray]:
    if not static_batch:
        return [images]
    usable = len(images) - len(images) % static_batch
    return [images[i:i + static_batch] for i in range(0, usable, static_batch)]


def quick_parity(build_dir: Path, artifacts: list[Artifact], images: np.ndarray, labels: np.ndarray,
                 static_batch: int | None, progress: Progress) -> dict[str, Any]:
    """Run every artifact on the same real images; max abs error and top-1 agreement vs eager fp32."""
    batches = _batches(images, static_batch)
    if not batches:
        raise BuildError(f"quick parity needs at least {static_batch} images for the static batch")
    labels = labels[: sum(len(b) for b in batches)]
    with runner_for(artifacts[0], build_dir) as eager:
        reference = np.concatenate([eager.infer(b) for b in batches])
    ref_top1 = reference.argmax(1)
    scale = max(1.0, float(np.abs(reference).max()))
    results: dict[str, Any] = {}
    for artifact in artifacts:
        entry: dict[str, Any] = {"precision": artifact.precision}
        try:
            with runner_for(artifact, build_dir) as runner:
                out = np.concatenate([runner.infer(b) for b in batches])
                entry["executed_precision"] = runner.executed_precision
        except ExporterError as exc:
            entry.update(ok=False, error=str(exc))
            results[artifact.name] = entry
            progress.say(f"  ✗ {artifact.name:<24} could not run: {exc}")
            continue
        if out.shape != reference.shape:
            entry.update(ok=False, error=f"output shape {out.shape} != eager {reference.shape}")
            results[artifact.name] = entry
            continue
        max_abs = float(np.abs(out - reference).max())
        agree = float((out.argmax(1) == ref_top1).mean())
        accuracy = float((out.argmax(1) == labels).mean())
        if artifact.precision == "int8":
            ok, rule = agree >= INT8_MIN_TOP1, f"top-1 agreement ≥ {INT8_MIN_TOP1}"
        else:
            tol = PARITY_RTOL[artifact.precision] * scale
            ok, rule = max_abs <= tol, f"max |Δ| ≤ {tol:.2g}"
        entry.update(max_abs_err=max_abs, top1_agreement=agree, accuracy=accuracy, ok=bool(ok), rule=rule)
        results[artifact.name] = entry
        progress.say(f"  {'✓' if ok else '✗'} {artifact.name:<24} {artifact.precision:<5} max|Δ| {max_abs:.2e}  "
                     f"top-1 agree {agree:.3f}  acc {accuracy:.3f}{'' if ok else '  MISMATCH (' + rule + ')'}")
    return {"images": int(len(labels)), "reference": artifacts[0].name, "logit_scale": scale,
            "artifacts": results, "ok": all(r.get("ok") for r in results.values())}


# --- the build -------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _build_id(weights_sha: str | None, opts: BuildOptions) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    key = json.dumps([weights_sha, opts.batch, opts.max_batch, opts.fp16, opts.int8, opts.backends, os.getpid(),
                      time.time_ns()])
    return f"{stamp}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def _run_stage(name: str, module: str, function: str, ctx: BuildContext) -> list[Artifact]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # the backend module itself is absent from this install
            raise BackendUnavailable(f"{module} is not part of this installation") from None
        raise BackendUnavailable(f"{name} needs {exc.name}, which is not installed") from None
    return list(getattr(mod, function)(ctx))


def _calibration(opts: BuildOptions, input_shape: tuple[int, int, int], dataset: str | None) -> np.ndarray:
    from exporter.data import load_split, sample_images

    available = len(load_split(dataset, "train"))
    if available == 0:
        raise UsageError("--int8 needs calibration data: the training split is empty")
    images, _, _ = sample_images(dataset, "train", input_shape, min(opts.calibration_samples, available),
                                 seed=opts.seed)
    return images


def build(opts: BuildOptions) -> BuildResult:
    """Run the whole build and return where it landed; raises an ExporterError subclass on failure."""
    from exporter.models import get_spec

    _check_options(opts)
    spec = get_spec(opts.model)  # unknown model: one line, exit 2, before anything is written
    opts = dataclasses.replace(opts, model=spec.name, backends=list(opts.backends) if opts.backends else None)
    progress = Progress(opts.progress)
    started = time.perf_counter()
    model_dir = Path(opts.artifacts_dir) / opts.model
    created = not model_dir.exists()
    _prepare_model_dir(model_dir)
    _remove_stale_temp_dirs(model_dir)
    try:
        with _sigterm_as_exit(), _quiet_torch_logs():
            return _build(opts, spec, model_dir, progress, started)
    except BaseException:
        if created:  # leave no empty model directory behind either
            with contextlib.suppress(OSError):
                model_dir.rmdir()
        raise


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (e.g. `timeout`, a job scheduler) into SystemExit so the temporary build is cleaned up."""
    import signal
    import threading

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
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build(opts: BuildOptions, spec: Any, model_dir: Path, progress: Progress, started: float) -> BuildResult:
    if opts.backends:
        missing = [n for n in NEEDS_ONNX if n in opts.backends and "onnx" not in opts.backends]
        if missing:
            progress.say(f"  --backends: adding onnx, which {', '.join(missing)} convert(s) from")
            opts.backends = ["onnx", *opts.backends]

    with progress.stage("weights"):
        weights = resolve_weights(opts, progress)
    build_id = _build_id(weights.info.get("sha256"), opts)
    tmp_dir = model_dir / f".tmp-{build_id}-{platform.node()}-{os.getpid()}"
    tmp_dir.mkdir()
    try:
        manifest = _build_into(tmp_dir, build_id, opts, spec, weights, progress, started)
        final = model_dir / build_id
        os.replace(tmp_dir, final)
        point_latest(model_dir, final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    progress.say(f"{opts.model}: build {build_id} → {final} ({time.perf_counter() - started:.1f}s"
                 f"{', UNTRAINED weights' if weights.info['source'] == 'untrained' else ''}"
                 f"{'' if manifest['parity']['ok'] else ', PARITY MISMATCH'})")
    return BuildResult(build_dir=final, manifest=manifest)


def _build_into(out_dir: Path, build_id: str, opts: BuildOptions, spec: Any, weights: Weights,
                progress: Progress, started: float) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from exporter.data import sample_images
    from exporter.lint import check_strict, lint_exported, lint_model

    model, input_shape = weights.model, weights.input_shape
    static = opts.batch or (1 if opts.max_batch == 1 else None)  # a batch range 1..1 is a static batch
    max_batch = static or opts.max_batch

    with progress.stage("lint", f"{opts.model} at {'×'.join(map(str, input_shape))}"):
        findings = lint_model(model, input_shape, seed=opts.seed)
        for finding in findings:
            progress.say(f"  ⚠ {finding}")
        check_strict(findings, opts.strict)

    with progress.stage("torch.export", f"batch {static if static else f'dynamic 1..{max_batch}'}"):
        diagnostics: dict[str, Any] = {}
        program = trace(model, input_shape, static_batch=static, max_batch=max_batch, diagnostics=diagnostics)
        exported_findings = lint_exported(program, dynamic_batch=static is None)
        for finding in exported_findings:
            progress.say(f"  ⚠ {finding}")
        check_strict(exported_findings, opts.strict)
        findings += exported_findings
        _check_program_batches(program, model, input_shape, (static,) if static else (1, 3))
        torch.export.save(program, str(out_dir / PROGRAM_FILE))

    # The eager reference: the exact weights every artifact was made from.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if weights.info.get("checkpoint"):
        shutil.copyfile(weights.info["checkpoint"], out_dir / WEIGHTS_FILE)
    else:
        save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"model": opts.model, "untrained": "true"})
    eager = Artifact(name="eager", backend="eager", path=WEIGHTS_FILE, precision="fp32",
                     options={"model": opts.model, "in_channels": input_shape[0], "num_classes": weights.num_classes},
                     notes=["PyTorch eager with the build's weights: the fp32 reference"])
    untrained = weights.info["source"] == "untrained"
    metadata = {
        "model_name": opts.model, "family": spec.family, "build_id": build_id,
        "input_scaling": spec.input_scaling, "class_names": json.dumps(weights.class_names),
        "weights": "untrained" if untrained else "trained",
        "checkpoint_sha256": weights.info.get("sha256") or "none (untrained)",
        "recipe": json.dumps(weights.recipe or {"lr": spec.recipe.lr, "batch_size": spec.recipe.batch_size,
                                                "epochs": spec.recipe.epochs, "resize": spec.recipe.resize}),
        "dataset": weights.info.get("dataset") or "none",
    }
    calibration = None
    if opts.int8:
        with progress.stage("calibration data", f"{opts.calibration_samples} training images"):
            calibration = _calibration(opts, input_shape, weights.dataset)
    ctx = BuildContext(model_name=opts.model, model=model, input_shape=input_shape, out_dir=out_dir,
                       exported_program=program, static_batch=static, max_batch=max_batch, fp16=opts.fp16,
                       int8=opts.int8, calibration=calibration, metadata=metadata, artifacts=[eager],
                       diagnostics=diagnostics)

    skipped: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    chosen = opts.backends
    for name, module, function in STAGES:
        if chosen is not None and name not in chosen:
            continue
        named = chosen is not None
        try:
            with progress.stage(name):
                produced = _run_stage(name, module, function, ctx)
        except BackendUnavailable as exc:
            if named:
                raise BuildError(f"backend {name} was asked for but is unavailable: {exc}") from None
            skipped.append({"backend": name, "reason": str(exc)})
            progress.say(f"  – {name} skipped: {exc}")
            continue
        except ExporterError as exc:
            if named or opts.strict:
                raise BuildError(f"backend {name} failed: {exc}") from None
            failed.append({"backend": name, "error": str(exc)})
            progress.say(f"  ✗ {name} FAILED: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001  (one backend's crash must not hide the others' artifacts)
            text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            if named or opts.strict:
                raise BuildError(f"backend {name} failed: {text}") from exc
            failed.append({"backend": name, "error": text})
            progress.say(f"  ✗ {name} FAILED: {text}")
            continue
        for artifact in produced:
            progress.say(f"    + {artifact.name} ({artifact.backend}, {artifact.precision}) {artifact.path}")
        ctx.artifacts.extend(produced)

    with progress.stage("quick parity", f"{len(ctx.artifacts)} artifacts vs eager fp32"):
        if static:  # whole static batches only
            n = max(static, opts.parity_samples - opts.parity_samples % static)
        else:
            n = min(opts.parity_samples, max_batch)
        images, labels, _ = sample_images(weights.dataset, "test", input_shape, n, seed=opts.seed)
        parity = quick_parity(out_dir, ctx.artifacts, images, labels, static, progress)
    if not parity["ok"] and opts.strict:
        bad = [k for k, v in parity["artifacts"].items() if not v.get("ok")]
        raise BuildError(f"--strict: quick parity failed for {', '.join(bad)}")

    files = file_entries(out_dir)
    artifact_entries = []
    for artifact in ctx.artifacts:
        entry = artifact.to_dict()
        own = [artifact.path] + ([str(Path(artifact.path).with_suffix(".bin"))]
                                 if artifact.path.endswith(".xml") else [])
        entry["files"] = [f for f in own if f in files]
        entry["size"] = sum(files[f]["size"] for f in entry["files"])
        entry["untrained"] = untrained
        if artifact.path.endswith(".onnx") and "onnx" in ctx.diagnostics:
            entry["opset"] = ctx.diagnostics["onnx"].get("opset")
        artifact_entries.append(entry)
    progress.timings["total"] = round(time.perf_counter() - started, 3)
    manifest = {
        "format": FORMAT_VERSION,
        "build_id": build_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": opts.model,
        "family": spec.family,
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
        "exported_program": PROGRAM_FILE,
        "files": files,
        "artifacts": artifact_entries,
        "skipped": skipped,
        "failed": failed,
        "lint": [f.to_dict() for f in findings],
        "warnings": ctx.warnings,
        "diagnostics": ctx.diagnostics,
        "timings": progress.timings,
        "versions": _versions(),
        "parity": parity,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest
