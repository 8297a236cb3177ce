"""AOTInductor: the traced program compiled ahead of time into a `.pt2` package (a shared library + weights).

The package loads with `torch._inductor.aoti_load_package` alone — no model code, no `exporter` import — so it is
what a C++ or Python server without this repository runs. The batch range it was compiled for is recorded in the
artifact options; the runner refuses a batch outside it with a one-line error instead of a runtime crash.

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

PACKAGE_FILE = "model.aoti.pt2"
BF16_PACKAGE_FILE = "model.aoti.bf16.pt2"
CUDA_PACKAGE_FILE = "model.aoti.cuda.pt2"
# Weights folded in as constants and prepacked for oneDNN (resnet50, batch 1, 2 cores: 93 → 51 ms; bf16 25 ms;
# bench/compile_variants.py).
CPU_INDUCTOR_CONFIGS = {"freezing": True}


@register_backend
class AOTIRunner(TorchRunner):
    """Runs an AOTInductor package (`aoti_compile_and_package` output)."""

    backend = "aoti"
    description = "AOTInductor package (.pt2)"

    def __init__(self, path, *, precision: str = "fp32", device: str = "cpu", min_batch: int = 1,
                 max_batch: int | None = None, **options: Any) -> None:
        super().__init__(path, precision=precision, device=device, **options)
        self.min_batch = int(min_batch)
        self.max_batch = None if max_batch is None else int(max_batch)
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
        self.model = torch._inductor.aoti_load_package(str(self.path))
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
                    static_batch: int | None, max_batch: int, inductor_configs: dict[str, Any] | None = None) -> float:
    """Export `model` on `device` (batch 1..`max_batch`, or exactly `static_batch`) and compile it with AOTInductor
    into `path`; returns the seconds it took. Off the CPU a copy of the model is moved to `device`."""
    import torch
    import torch._inductor

    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    example_batch = static_batch or 2  # torch.export specialises a batch of 1
    example = torch.rand((example_batch, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    dynamic = None if static_batch else ({0: torch.export.Dim("batch", min=1, max=max(max_batch, 2))},)
    start = time.perf_counter()
    # no_grad: inductor applies `freezing` (conv-BN folding, prepacked oneDNN weights) only to a graph compiled
    # without autograd; with grad enabled the option was silently ignored (bench/results/compile-profile.md)
    with strict_fp32() if device == "cuda" else contextlib.nullcontext(), torch.no_grad():
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs=dict(inductor_configs or {}))
    return time.perf_counter() - start


def _package_artifact(ctx: BuildContext, name: str, path: str, device: str, precision: str = "fp32",
                      note: str = "") -> Artifact:
    import torch

    min_batch, max_batch = (ctx.static_batch, ctx.static_batch) if ctx.static_batch else (1, ctx.max_batch)
    return Artifact(name=name, backend="aoti", path=path, precision=precision, device=device,
                    options={"min_batch": min_batch, "max_batch": max_batch},
                    notes=[f"AOTInductor {device} package for torch {torch.__version__}; loads without the model "
                           "code" + note])


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
        start = time.perf_counter()
        with torch.no_grad():  # freezing applies only without autograd (see compile_package)
            torch._inductor.aoti_compile_and_package(ctx.exported_program,
                                                     package_path=str(ctx.out_dir / PACKAGE_FILE),
                                                     inductor_configs=dict(CPU_INDUCTOR_CONFIGS))
        ctx.diagnostics["aoti"].update(compile_s=round(time.perf_counter() - start, 3),
                                       inductor_configs=CPU_INDUCTOR_CONFIGS)
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
