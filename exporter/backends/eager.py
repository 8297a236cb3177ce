"""PyTorch eager: the fp32 reference every other backend is compared against."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import Runner, best_gemm_gflops, register_backend


def load_torch_model(path, *, model: str, in_channels: int, num_classes: int, device: str = "cpu",
                     **options: Any):
    """A registered model in eval() mode with the weights of a safetensors file."""
    from safetensors.torch import load_file

    from exporter.models import create_model

    net = create_model(model, in_channels=in_channels, num_classes=num_classes, **options)
    from exporter.checkpoint import load_weights

    load_weights(net, load_file(str(path)))
    return net.eval().to(device)


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


_strict_fp32_users = 0
_saved_tf32: tuple[Any, ...] | None = None


def _tf32_state(torch: Any) -> tuple[Any, ...]:
    try:
        return ("allow_tf32", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the legacy getters refuse once the fp32_precision API set conv and RNN apart
        return ("fp32_precision", torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision)


def _set_tf32_state(torch: Any, state: tuple[Any, ...]) -> None:
    if state[0] == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state[1], state[2]
    else:
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
         torch.backends.cudnn.rnn.fp32_precision) = state[1:]


def acquire_strict_fp32() -> None:
    """Turn TF32 off for CUDA matmuls and cuDNN convolutions until the matching `release_strict_fp32`.

    torch lets cuDNN convolutions round fp32 inputs to TF32 by default, so an "fp32" CUDA cell would not be fp32.
    The flags are process-wide: nested users share one saved setting, restored when the last one releases.
    """
    global _strict_fp32_users, _saved_tf32
    import torch

    if _strict_fp32_users == 0:
        _saved_tf32 = _tf32_state(torch)
        _set_tf32_state(torch, ("allow_tf32", False, False))
    _strict_fp32_users += 1


def release_strict_fp32() -> None:
    """Undo one `acquire_strict_fp32`; the last release restores the TF32 settings found by the first."""
    global _strict_fp32_users, _saved_tf32
    import torch

    if _strict_fp32_users == 0:
        return
    _strict_fp32_users -= 1
    if _strict_fp32_users == 0 and _saved_tf32 is not None:
        _set_tf32_state(torch, _saved_tf32)
        _saved_tf32 = None


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off inside the block (compiling for CUDA bakes the setting into the generated kernels)."""
    acquire_strict_fp32()
    try:
        yield
    finally:
        release_strict_fp32()


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN reports native bf16 kernels (AVX-512 bf16 or AMX) on this CPU."""
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe and probe())


def batchnorm_folded_copy(model: Any) -> Any:
    """An eval-mode copy of `model` with each BatchNorm that follows a convolution folded into it (torch.fx);
    a plain copy where torch.fx cannot trace the model."""
    from torch.fx.experimental.optimization import fuse

    from exporter.errors import ExporterError

    try:
        return fuse(copy.deepcopy(model).eval())
    except ExporterError:  # ours, e.g. training's SIGTERM arriving mid-trace: never swallowed as "untraceable"
        raise
    except Exception:  # noqa: BLE001  (not symbolically traceable: keep the BatchNorms)
        return copy.deepcopy(model).eval()


def bf16_inside(model: Any) -> Any:
    """A copy of `model` with bf16 weights and arithmetic behind an fp32 interface (input cast in, logits cast
    out), so the artifact takes and returns what every other artifact does.

    BatchNorms are folded into their convolutions in fp32 first, so each folded weight is rounded to bf16 once:
    inductor's freezing otherwise folds them from bf16 weights and statistics, and trained resnet50 dropped from
    cosine 0.9991 to 0.9975 against fp32 (under the bf16 class's 0.998). A model torch.fx cannot trace keeps its
    BatchNorms (then folded by the compiler)."""
    import torch

    class Bf16Inside(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(torch.bfloat16)).float()

    return Bf16Inside(batchnorm_folded_copy(model).to(torch.bfloat16)).eval()  # untraceable: the compiler folds


class TorchRunner(Runner):
    """Base of the runners that call a torch callable (`self.model`: a module, a compiled module or an AOTI
    package) on torch tensors; subclasses load it in `activate_impl` and set `self._torch`."""

    devices = ("cpu", "cuda")

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        return None

    def prepare_impl(self, batch: np.ndarray) -> Any:
        return self._torch.from_numpy(batch).to(self.device)

    def run_impl(self, prepared: Any) -> Any:
        with self._torch.inference_mode():
            return self.model(prepared)

    def finish_impl(self, raw: Any) -> np.ndarray:
        if isinstance(raw, (list, tuple)):  # an AOTI package returns its outputs as a list
            raw = raw[0]
        return raw.float().cpu().numpy()

    def bare_call_impl(self, prepared: Any) -> Any:
        """The loaded callable called directly (benchmarks compare the runner's overhead against it)."""
        fn, inference_mode = self.model, self._torch.inference_mode

        def call() -> Any:
            with inference_mode():
                return fn(prepared)

        return call

    def sync(self) -> None:
        if self.device == "cuda":
            self._torch.cuda.synchronize()

    def use_strict_fp32(self) -> None:
        """fp32 on CUDA means IEEE fp32: TF32 off while this runner is active (subclasses call it first thing in
        `activate_impl`; `deactivate_impl` restores the previous setting)."""
        if self.device == "cuda" and self.precision == "fp32" and not getattr(self, "_holds_strict_fp32", False):
            acquire_strict_fp32()
            self._holds_strict_fp32 = True

    def deactivate_impl(self) -> None:
        if getattr(self, "_holds_strict_fp32", False):
            release_strict_fp32()
            self._holds_strict_fp32 = False
        del self.model


@register_backend
class EagerRunner(TorchRunner):
    """Runs the model's Python code with the build's weights (`weights.safetensors`)."""

    backend = "eager"
    description = "PyTorch eager (reference)"
    library = "torch"

    @classmethod
    def gemm_peak_gflops(cls, precision: str, *, size: int, device: str, threads: int | None) -> float | None:
        """torch.mm (MKL / oneDNN on the CPU, cuBLAS on CUDA)."""
        import torch

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if dtype is None or (device == "cpu" and precision == "bf16" and not cpu_has_native_bf16()):
            return None  # an emulated bf16 matmul is no peak (AMD EPYC with AVX2: ~3 GFLOP/s, seconds a call)
        generator = torch.Generator().manual_seed(0)
        a = torch.rand(size, size, generator=generator).to(device, dtype)
        b = torch.rand(size, size, generator=generator).to(device, dtype)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def call() -> None:
            with torch.inference_mode():
                torch.mm(a, b)
            sync()

        return best_gemm_gflops(call, size)

    def activate_impl(self) -> None:
        import torch

        self.use_strict_fp32()
        self._torch = torch
        self.model = load_torch_model(self.path, device=self.device, **self.options)
        if self.precision != "fp32":
            dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
            if self.precision not in dtypes:
                raise ValueError(f"eager runs fp32, fp16 or bf16, not {self.precision}")
            self.model = self.model.to(dtypes[self.precision])
        self._dtype = next(self.model.parameters()).dtype

    def prepare_impl(self, batch: np.ndarray) -> Any:
        return self._torch.from_numpy(batch).to(self.device, self._dtype)

    def layer_outputs(self, batch: np.ndarray, *, onnx_source: Path | None, scope_source: Path | None,
                      reference_model: Any) -> tuple[dict[str, list[np.ndarray]], str]:
        """Forward hooks on this runner's own model (at its precision)."""
        found: dict[str, list[np.ndarray]] = {}
        for label, out in leaf_module_outputs(self.model, batch, dtype=self._dtype):
            found.setdefault(label.split("#")[0], []).append(out)
        return found, f"forward hooks on a {self.precision} copy of the eager model"
