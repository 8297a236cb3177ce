"""AOTInductor: the traced program compiled ahead of time into a `.pt2` package (a shared library + weights).

The package loads with `torch._inductor.aoti_load_package` alone — no model code, no `exporter` import — so it is
what a C++ or Python server without this repository runs. The batch range it was compiled for is recorded in the
artifact options; the runner refuses a batch outside it with a one-line error instead of a runtime crash.

A dynamic-batch CPU package holds two compiled models: `model` (every batch in its range; what
`aoti_load_package(path)` loads) and `batch1` (batch 1 only), which the runner calls for a single image. Inductor
prepacks convolution weights for oneDNN only when the input shape is static — with a dynamic batch it reorders
them on every call — so the batch-1 model is faster (`bench/compile_variants.py aoti_dynamic aoti_dynamic_bf16`,
resnet50 batch 1, 2 cores, one run: fp32 59.9 → 50.7 ms, bf16 28.9 → 27.8 ms; bench/results/README.md) for twice
the weights in the file. A server loads it with `torch._inductor.package.load_package(path, model_name="batch1")`.

A package holds kernels for one device: the build compiles `model.aoti.pt2` for the CPU and, where torch sees a
CUDA device, `model.aoti.cuda.pt2` from the model moved there (TF32 off: fp32 means fp32); without one the CUDA
package is skipped with the reason in the diagnostics.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    Artifact,
    BackendUnavailable,
    BuildContext,
    RunnerError,
    register_backend,
    register_stage,
)
from exporter.backends.eager import TorchRunner, bf16_inside, cpu_has_native_bf16, strict_fp32
from exporter.backends.inductor import _cpp_compiler_reason
from exporter.tracing import trace

PACKAGE_FILE = "model.aoti.pt2"
BF16_PACKAGE_FILE = "model.aoti.bf16.pt2"
CUDA_PACKAGE_FILE = "model.aoti.cuda.pt2"
# Weights folded in as constants and prepacked for oneDNN (resnet50, batch 1, 2 cores: 93 → 51 ms; bf16 25 ms;
# bench/compile_variants.py).
CPU_INDUCTOR_CONFIGS = {"freezing": True}
BATCH1_MODEL = "batch1"  # the batch-1 model inside a dynamic-batch CPU package (see the module docstring)


@register_backend
class AOTIRunner(TorchRunner):
    """Runs an AOTInductor package (`aoti_compile_and_package` output)."""

    backend = "aoti"
    description = "AOTInductor package (.pt2)"

    def __init__(self, path, *, precision: str = "fp32", device: str = "cpu", min_batch: int = 1,
                 max_batch: int | None = None, batch1_model: str | None = None, **options: Any) -> None:
        super().__init__(path, precision=precision, device=device, **options)
        self.min_batch = int(min_batch)
        self.max_batch = None if max_batch is None else int(max_batch)
        self.batch1_model = batch1_model
        self.load_seconds: float | None = None

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        import torch

        if device == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device visible to torch"
        if not hasattr(torch._inductor, "aoti_load_package"):
            return f"torch {torch.__version__} has no torch._inductor.aoti_load_package"
        return None

    def activate_impl(self) -> None:
        import torch
        import torch._inductor

        self.use_strict_fp32()
        self._torch = torch
        start = time.perf_counter()
        every_batch = torch._inductor.aoti_load_package(str(self.path))
        if self.batch1_model:
            from torch._inductor.package import load_package

            batch1 = load_package(str(self.path), model_name=self.batch1_model)
            self.model = lambda x: (batch1 if x.shape[0] == 1 else every_batch)(x)
        else:
            self.model = every_batch
        self.load_seconds = time.perf_counter() - start

    def prepare_impl(self, batch: np.ndarray) -> Any:
        n = batch.shape[0]
        if n < self.min_batch or (self.max_batch is not None and n > self.max_batch):
            compiled = (f"batch {self.min_batch}" if self.min_batch == self.max_batch
                        else f"batches {self.min_batch}..{self.max_batch}")
            raise RunnerError(f"aoti: the package was compiled for {compiled}, got batch {n} "
                              "(rebuild with a larger --max-batch or without --batch)")
        return self._torch.from_numpy(batch).to(self.device)



def compile_package(model: Any, input_shape: tuple[int, int, int], path: Path, *, device: str,
                    static_batch: int | None, max_batch: int, inductor_configs: dict[str, Any] | None = None,
                    program: Any = None) -> float:
    """Compile `model` with AOTInductor into `path` for batch 1..`max_batch` (or exactly `static_batch`); returns
    the seconds it took. `program`: `model` already exported that way. A dynamic-batch CPU package also gets the
    batch-1 model `BATCH1_MODEL`. Off the CPU a copy of the model is moved to `device`."""
    import torch
    import torch._inductor
    from torch._inductor.package import package_aoti

    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    start = time.perf_counter()
    # no_grad: inductor applies `freezing` (conv-BN folding, prepacked oneDNN weights) only to a graph compiled
    # without autograd; with grad enabled the option was silently ignored (bench/results/compile-profile.md)
    with strict_fp32() if device == "cuda" else contextlib.nullcontext(), torch.no_grad():
        programs = {"model": program if program is not None else trace(
            model.eval(), input_shape, static_batch=static_batch, max_batch=max_batch, device=device)}
        if device == "cpu" and not static_batch:
            programs[BATCH1_MODEL] = trace(model.eval(), input_shape, static_batch=1, max_batch=1, device=device)
        if len(programs) == 1:
            torch._inductor.aoti_compile_and_package(programs["model"], package_path=str(path),
                                                     inductor_configs=dict(inductor_configs or {}))
        else:  # several models in one package: torch's documented recipe (aoti_compile_and_package's docstring)
            files = {}
            for name, exported in programs.items():
                args, kwargs = exported.example_inputs
                files[name] = torch._inductor.aot_compile(
                    exported.module(check_guards=False), args, kwargs,
                    options={**(inductor_configs or {}), "aot_inductor.package": True})
            package_aoti(str(path), files)
    return time.perf_counter() - start


def _package_artifact(ctx: BuildContext, name: str, path: str, device: str, precision: str = "fp32",
                      note: str = "") -> Artifact:
    import torch

    min_batch, max_batch = (ctx.static_batch, ctx.static_batch) if ctx.static_batch else (1, ctx.max_batch)
    options: dict[str, Any] = {"min_batch": min_batch, "max_batch": max_batch}
    notes = [f"AOTInductor {device} package for torch {torch.__version__}; loads without the model code" + note]
    if device == "cpu" and not ctx.static_batch:
        options["batch1_model"] = BATCH1_MODEL
        notes.append(f"holds a batch-1 model ('{BATCH1_MODEL}', prepacked weights) beside the dynamic-batch one")
    return Artifact(name=name, backend="aoti", path=path, precision=precision, device=device, options=options,
                    notes=notes)


@register_stage("aoti")
def export_aoti(ctx: BuildContext) -> list[Artifact]:
    """Compile the build's ExportedProgram with AOTInductor into `model.aoti.pt2`, and where a CUDA device is
    present a CUDA package `model.aoti.cuda.pt2` (compile times, or why CUDA was skipped, in diagnostics)."""
    import torch
    import torch._inductor

    reason = AOTIRunner.unavailable_reason(ctx.device) or (ctx.device == "cpu" and _cpp_compiler_reason())
    if reason:
        raise BackendUnavailable(reason)
    ctx.diagnostics["aoti"] = {"torch": torch.__version__}
    artifacts = []
    if ctx.device == "cpu":
        if ctx.exported_program is None:
            from exporter.errors import ExporterError

            raise ExporterError("AOTInductor compiles the build's ExportedProgram, and torch.export failed (see "
                                "the torch.export entry)")
        seconds = compile_package(ctx.model, ctx.input_shape, ctx.out_dir / PACKAGE_FILE, device="cpu",
                                  static_batch=ctx.static_batch, max_batch=ctx.max_batch,
                                  inductor_configs=CPU_INDUCTOR_CONFIGS, program=ctx.exported_program)
        ctx.diagnostics["aoti"].update(compile_s=round(seconds, 3), inductor_configs=CPU_INDUCTOR_CONFIGS)
        artifacts.append(_package_artifact(ctx, "aoti", PACKAGE_FILE, "cpu", note=", frozen weights"))
        if cpu_has_native_bf16():  # like openvino-bf16: only where bf16 is native, never an emulated slow path
            seconds = compile_package(bf16_inside(ctx.model), ctx.input_shape, ctx.out_dir / BF16_PACKAGE_FILE,
                                      device="cpu", static_batch=ctx.static_batch, max_batch=ctx.max_batch,
                                      inductor_configs=CPU_INDUCTOR_CONFIGS)
            ctx.diagnostics["aoti"]["bf16_compile_s"] = round(seconds, 3)
            artifacts.append(_package_artifact(ctx, "aoti-bf16", BF16_PACKAGE_FILE, "cpu", precision="bf16",
                                               note=", bf16 weights and arithmetic behind fp32 input/output"))
        else:
            ctx.diagnostics["aoti"]["bf16"] = {"skipped": "this CPU has no native bf16 (oneDNN)"}
    return artifacts + export_aoti_cuda(ctx)


def export_aoti_cuda(ctx: BuildContext) -> list[Artifact]:
    """The CUDA package `model.aoti.cuda.pt2`, compiled from the model moved to the GPU; none (the reason in
    `ctx.diagnostics["aoti"]["cuda"]`) without a CUDA device or when compiling fails (also a warning)."""
    import torch

    info = ctx.diagnostics.setdefault("aoti", {"torch": torch.__version__})
    reason = AOTIRunner.unavailable_reason("cuda")
    if reason:
        info["cuda"] = {"skipped": reason}
        return []
    try:
        seconds = compile_package(ctx.model, ctx.input_shape, ctx.out_dir / CUDA_PACKAGE_FILE, device="cuda",
                                  static_batch=ctx.static_batch, max_batch=ctx.max_batch)
    except Exception as exc:  # noqa: BLE001  (the CPU package stays; the failure is reported, not raised)
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        info["cuda"] = {"error": f"{type(exc).__name__}: {text}"}
        ctx.warnings.append(f"aoti: no CUDA package: {type(exc).__name__}: {text}")
        return []
    info["cuda"] = {"compile_s": round(seconds, 3), "gpu": torch.cuda.get_device_name()}
    return [_package_artifact(ctx, "aoti-cuda", CUDA_PACKAGE_FILE, "cuda")]
