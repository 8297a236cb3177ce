"""Pre-export lint: the CNN export pitfalls users hit with other toolkits, found before (and just after) tracing.

`lint_model` runs on the eval() model before `torch.export`; `lint_exported` on the traced program. Each finding
is a `LintWarning` (a stable `code` plus a one-line message); `exporter build` prints them, records them in the
manifest and, with `--strict`, refuses to continue.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from exporter.errors import ExporterError


class LintError(ExporterError):
    """`--strict` and at least one lint warning."""


@dataclass(frozen=True)
class LintWarning:
    code: str  # "training-mode", "adaptive-pool", "batch-specialised", "int64-constant"
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _training_mode(model: nn.Module, sample: torch.Tensor) -> list[LintWarning]:
    """Modules still in training mode, and modules that behave as if they were (batch statistics, dropout)."""
    found = []
    stuck = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if stuck:
        found.append(LintWarning("training-mode", f"{len(stuck)} module(s) are in training mode "
                                 f"({', '.join(stuck[:3])}{'…' if len(stuck) > 3 else ''}); call model.eval() "
                                 "before export so BatchNorm uses running statistics and Dropout is off"))
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    alone = None
    try:
        with torch.enable_grad():  # as a user calls it: a module keyed on grad mode (seed 001) must show up
            first = model(sample).detach()
            second = model(sample).detach()
            changed = [name for name, b in model.named_buffers()
                       if name in buffers and b.is_floating_point() and not torch.equal(buffers[name], b)]
            with contextlib.suppress(Exception):  # BatchNorm1d in train() refuses a batch of one
                alone = model(sample[:1]).detach()
    except Exception:  # noqa: BLE001  (a model that fails at batch 4 is reported by _batch_handling)
        return found
    finally:  # put the statistics back: lint must not change the weights it exports
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    if changed:
        found.append(LintWarning("training-mode", f"running a forward pass in eval() changed buffer(s) "
                                 f"{', '.join(changed[:3])}: a module updates its statistics at inference"))
    if not torch.allclose(first, second, rtol=1e-5, atol=1e-6):
        found.append(LintWarning("training-mode", "two forward passes on the same batch differ in eval(): "
                                 "a random layer (Dropout) is active at inference"))
    elif alone is not None and not torch.allclose(alone, first[:1], rtol=1e-4, atol=1e-5):
        found.append(LintWarning("training-mode", "an image's output depends on the rest of its batch in eval(): "
                                 "a normalisation layer uses batch statistics at inference"))
    return found


def _adaptive_pools(model: nn.Module, sample: torch.Tensor) -> list[LintWarning]:
    """Adaptive pools whose output size does not divide their input size (uneven windows at this input)."""
    found: list[LintWarning] = []
    names = {m: name for name, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        spatial_in = tuple(inputs[0].shape[2:])
        spatial_out = tuple(output.shape[2:])
        if any(o and i % o for i, o in zip(spatial_in, spatial_out)):
            found.append(LintWarning(
                "adaptive-pool",
                f"{names.get(module, type(module).__name__)}: {type(module).__name__} maps "
                f"{'×'.join(map(str, spatial_in))} to {'×'.join(map(str, spatial_out))}, which does not divide: "
                "uneven windows that TensorRT and fixed-kernel runtimes cannot express (choose an input size "
                "whose feature map is a multiple of the pool output)"))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _POOLS)]
    try:
        with torch.no_grad():
            model(sample[:1])
    except Exception:  # noqa: BLE001  (a model that fails at this input is reported by _batch_handling)
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


def _batch_handling(model: nn.Module, sample: torch.Tensor) -> list[LintWarning]:
    """A forward pass that does not keep the batch dimension (e.g. `x.view(1, -1)`) at batch 1 and 3."""
    for batch in (1, 3):
        x = sample[:1].expand(batch, *sample.shape[1:]).contiguous()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as exc:  # noqa: BLE001  (the failure itself is the finding)
            return [LintWarning("batch-specialised", f"the model fails at batch {batch} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                                "its code assumes a fixed batch size")]
        if out.shape[0] != batch:
            return [LintWarning("batch-specialised", f"batch {batch} in gives batch {out.shape[0]} out; "
                                "the model reshapes with a constant batch size (use flatten(1) / view(x.size(0), -1))")]
    return []


def _int64_tensors(model: nn.Module) -> list[LintWarning]:
    """int64 parameters and buffers that inference uses (BatchNorm's num_batches_tracked is ignored: unused)."""
    names = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
             if t.dtype == torch.int64 and not name.endswith("num_batches_tracked")]
    if not names:
        return []
    return [LintWarning("int64-constant", f"int64 weight(s) {', '.join(names[:3])}: TensorRT's ONNX parser "
                        "rejects int64 weights; store them as int32 or float")]


def lint_model(model: nn.Module, input_shape: tuple[int, int, int], *, seed: int = 0) -> list[LintWarning]:
    """Lint an (eval-mode) model at one input shape before tracing; the model's weights are left unchanged."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.rand((4, *input_shape), generator=generator)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        warnings = _training_mode(model, sample) + _adaptive_pools(model, sample)
        if not any(m.training for m in model.modules()):  # in train() batch-size checks only repeat the above
            warnings += _batch_handling(model, sample)
    finally:  # a model in train() updates its statistics on every pass: put them back
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    warnings += _int64_tensors(model)
    return warnings


def lint_exported(program: Any, *, dynamic_batch: bool) -> list[LintWarning]:
    """Lint a traced `torch.export.ExportedProgram`: a batch that became a constant, int64 constants in use."""
    warnings: list[LintWarning] = []
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        value = node.meta.get("val")
        if value is None:
            continue
        if node.name in user_inputs:
            if dynamic_batch and isinstance(value.shape[0], int):
                warnings.append(LintWarning("batch-specialised", f"input {node.name}: the traced program fixed "
                                            f"the batch to {value.shape[0]}; the code specialises on the batch size"))
        elif value.dtype == torch.int64 and node.users:
            warnings.append(LintWarning("int64-constant", f"{node.target}: int64 constant used by the traced graph; "
                                        "TensorRT's ONNX parser rejects int64 weights"))
    for node in program.graph.nodes:  # lifted tensor constants and get_attr constants
        if node.op == "get_attr":
            value = getattr(program.graph_module, str(node.target), None)
            if isinstance(value, torch.Tensor) and value.dtype == torch.int64:
                warnings.append(LintWarning("int64-constant", f"{node.target}: int64 constant in the traced graph"))
    return warnings


def check_strict(warnings: list[LintWarning], strict: bool) -> None:
    """Raise LintError listing the warnings when `strict` and there are any."""
    if strict and warnings:
        listed = "; ".join(str(w) for w in warnings)
        raise LintError(f"--strict: {len(warnings)} lint warning(s): {listed}")
