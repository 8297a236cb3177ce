"""PyTorch eager: the fp32 reference every other backend is compared against."""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.backends.base import Runner, register_backend


def load_torch_model(path, *, model: str, in_channels: int, num_classes: int, device: str = "cpu",
                     **options: Any):
    """A registered model in eval() mode with the weights of a safetensors file."""
    from safetensors.torch import load_file

    from exporter.models import create_model

    net = create_model(model, in_channels=in_channels, num_classes=num_classes, **options)
    net.load_state_dict(load_file(str(path)))
    return net.eval().to(device)


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

    def deactivate_impl(self) -> None:
        del self.model


@register_backend
class EagerRunner(TorchRunner):
    """Runs the model's Python code with the build's weights (`weights.safetensors`)."""

    backend = "eager"
    description = "PyTorch eager (reference)"

    def activate_impl(self) -> None:
        import torch

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
