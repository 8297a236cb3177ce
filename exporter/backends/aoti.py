"""AOTInductor: the traced program compiled ahead of time into a `.pt2` package (a shared library + weights).

The package loads with `torch._inductor.aoti_load_package` alone — no model code, no `exporter` import — so it is
what a C++ or Python server without this repository runs. The batch range it was compiled for is recorded in the
artifact options; the runner refuses a batch outside it with a one-line error instead of a runtime crash.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from exporter.backends.base import Artifact, BackendUnavailable, BuildContext, RunnerError, register_backend
from exporter.backends.eager import TorchRunner
from exporter.backends.inductor import _cpp_compiler_reason

PACKAGE_FILE = "model.aoti.pt2"


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



def export_aoti(ctx: BuildContext) -> list[Artifact]:
    """Compile the build's ExportedProgram with AOTInductor into `model.aoti.pt2` (compile time in diagnostics)."""
    import torch
    import torch._inductor

    reason = AOTIRunner.unavailable_reason(ctx.device) or (ctx.device == "cpu" and _cpp_compiler_reason())
    if reason:
        raise BackendUnavailable(reason)
    if ctx.exported_program is None:
        raise RuntimeError("export_aoti needs the build's ExportedProgram")
    start = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ctx.exported_program, package_path=str(ctx.out_dir / PACKAGE_FILE))
    seconds = time.perf_counter() - start
    ctx.diagnostics["aoti"] = {"compile_s": round(seconds, 3), "torch": torch.__version__}
    min_batch, max_batch = (ctx.static_batch, ctx.static_batch) if ctx.static_batch else (1, ctx.max_batch)
    return [Artifact(name="aoti", backend="aoti", path=PACKAGE_FILE, precision="fp32", device=ctx.device,
                     options={"min_batch": min_batch, "max_batch": max_batch},
                     notes=[f"AOTInductor package for torch {torch.__version__}; loads without the model code"])]
