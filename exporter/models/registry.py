"""Model registry: one `ModelSpec` per architecture name, and `create_model` to build one."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from exporter.errors import ExporterError, UsageError


class UnknownModelError(ExporterError, KeyError):
    """A model name that is not registered."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return self.args[0]


class InputShapeError(UsageError):
    """An input shape the model cannot take."""


@dataclass(frozen=True)
class Recipe:
    """The seed's d2l training recipe (Xavier init, SGD without momentum, cross-entropy)."""

    lr: float
    batch_size: int
    epochs: int
    resize: int
    # A smaller budget for a 2-core CPU; `None` means the seed's recipe runs unchanged.
    cpu_epochs: int | None = None
    cpu_max_steps: int | None = None
    cpu_batch_size: int | None = None
    source: str = "seed"  # "seed" or "chosen" (the seed gives no recipe)


@dataclass(frozen=True)
class CpuRecipe:
    """A recipe made for a CPU (the default there): SGD with Nesterov momentum and weight decay, a one-cycle
    learning rate (warm-up, then cosine annealing), bf16 autocast where the CPU has native bf16 (fp32 master
    weights), channels-last, and — for a model with a global pool — progressive resizing: most epochs at a
    fraction of the input size, the last ones at full size so BatchNorm's statistics match what is exported.
    """

    # (input size as a fraction of the target size, epochs), in order; the last stage may be a fraction of an epoch
    stages: tuple[tuple[float, float], ...]
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup: float = 0.25  # fraction of the steps spent warming up
    label_smoothing: float = 0.0
    init: str = "xavier_normal_"  # the seed's; "kaiming_normal_" for deep ReLU nets without BatchNorm
    optimizer: str = "SGD"  # SGD with Nesterov momentum; "AdamW" (per-weight step sizes) for nets without BatchNorm

    def __post_init__(self) -> None:
        if not self.stages or self.stages[-1][0] != 1.0:
            raise ValueError("a CPU recipe's last stage must train at the full input size (1.0)")
        if self.optimizer not in ("SGD", "AdamW"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: SGD or AdamW")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about an architecture besides its code."""

    name: str
    family: str
    seed: str
    input_shape: tuple[int, int, int]  # default (C, H, W)
    num_classes: int
    recipe: Recipe
    description: str
    builder: Callable[..., nn.Module] = field(repr=False, compare=False)
    seed_test_acc: float | None = None  # the seed's Fashion-MNIST accuracy after 10 epochs
    seed_examples_per_s: float | None = None  # the seed's training throughput on their GPU
    # Inputs are images scaled to [0, 1] (torchvision ToTensor), no mean/std normalisation: the seeds' recipe.
    input_scaling: str = "pixels/255, no mean/std"
    cpu_recipe: CpuRecipe | None = None  # None: the seed's recipe is the default on a CPU too
    # Where the code comes from: "zoo" (registered here), or a model source (`exporter.models.sources`):
    # "torchvision", "timm", "file", "python" or "onnx"; `origin` says which (library version, file and its hash).
    source: str = "zoo"
    dir_name: str = ""  # the model's folder under the artifacts root (a registered model's: its name)
    origin: dict = field(default_factory=dict, compare=False)

    @property
    def folder(self) -> str:
        """The model's folder name under the artifacts root (no `:` or `/`, unlike a source's name)."""
        return self.dir_name or self.name


MODELS: dict[str, ModelSpec] = {}


def register_model(
    *,
    family: str,
    seed: str,
    input_shape: tuple[int, int, int],
    recipe: Recipe,
    num_classes: int = 10,
    seed_test_acc: float | None = None,
    seed_examples_per_s: float | None = None,
    name: str | None = None,
    cpu_recipe: CpuRecipe | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a keyword-only builder under its function name (or `name`)."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        model_name = name or builder.__name__
        if model_name in MODELS:
            raise ValueError(f"model {model_name!r} is registered twice")
        doc = (builder.__doc__ or "").strip().splitlines()
        MODELS[model_name] = ModelSpec(
            name=model_name,
            family=family,
            seed=seed,
            input_shape=input_shape,
            num_classes=num_classes,
            recipe=recipe,
            description=doc[0] if doc else model_name,
            builder=builder,
            seed_test_acc=seed_test_acc,
            seed_examples_per_s=seed_examples_per_s,
            cpu_recipe=cpu_recipe,
        )
        return builder

    return wrap


def list_models() -> list[str]:
    """Registered model names in registration order."""
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model or a model source (`torchvision:NAME`, `timm:NAME`, `file.py:factory`,
    `model.onnx`); an unknown name raises naming the close matches."""
    from exporter.models.sources import is_source, source_spec

    if isinstance(name, str) and is_source(name):
        return source_spec(name)
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `exporter list` to see them"
        raise UnknownModelError(f"unknown model {name!r}: {hint}") from None


def create_model(
    name: str, *, in_channels: int | None = None, num_classes: int | None = None, **options
) -> nn.Module:
    """Build a registered model with the seed's defaults unless overridden."""
    spec = get_spec(name)
    in_channels = spec.input_shape[0] if in_channels is None else in_channels
    num_classes = spec.num_classes if num_classes is None else num_classes
    for label, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{name}: {label} must be a positive integer, got {value!r}")
    try:
        return spec.builder(in_channels=in_channels, num_classes=num_classes, **options)
    except Exception:
        if spec.source == "zoo" or torch.get_default_device().type != "meta":
            raise
    # A library model whose constructor computes with tensors (torchvision's RegNets) cannot be built on the meta
    # device: build it on the CPU (callers run it on its parameters' device).
    with torch.device("cpu"):
        return spec.builder(in_channels=in_channels, num_classes=num_classes, **options)


def _forward_shape(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Output shape of `model` on a meta tensor of `shape`, or None when the shape does not fit."""
    parameter = next(model.parameters(), None)  # a Python object's copy (a model source) keeps real tensors
    device = parameter.device if parameter is not None else torch.device("meta")
    try:
        with torch.no_grad():
            return tuple(model(torch.zeros(shape, device=device)).shape)
    except (RuntimeError, ValueError, IndexError, AssertionError):  # AssertionError: torch._assert on a size
        return None


@functools.lru_cache(maxsize=None)
def valid_sizes(name: str, in_channels: int, limit: int = 512) -> tuple[int, ...]:
    """Square input sizes (H = W) in 1..limit that the model accepts (every 8th size for a model source, whose
    forward pass may be large)."""
    step = 1 if get_spec(name).source == "zoo" else 8
    with torch.device("meta"):
        model = create_model(name, in_channels=in_channels).eval()
    return tuple(s for s in range(step, limit + 1, step) if _forward_shape(model, (1, in_channels, s, s)))


def _describe_sizes(sizes: tuple[int, ...]) -> str:
    if not sizes:
        return "no square size up to 512 fits"
    step = min((b - a for a, b in zip(sizes, sizes[1:])), default=1)
    runs, start = [], sizes[0]
    for prev, cur in zip(sizes, sizes[1:] + (None,)):
        if cur != prev + step:
            runs.append(f"{start}" if start == prev else f"{start}–{prev}" + (f" (every {step})" if step > 1 else ""))
            start = cur
    return ", ".join(runs)


def check_input_shape(name: str, shape: tuple[int, int, int], *, in_channels: int | None = None) -> None:
    """Raise InputShapeError with the valid sizes when a (C, H, W) input does not fit the model."""
    spec = get_spec(name)
    if len(shape) != 3 or any(int(d) <= 0 for d in shape):
        raise InputShapeError(f"{name}: input shape must be C,H,W with positive sizes, got {shape}")
    if spec.source == "onnx":  # the file fixes its input
        if tuple(int(d) for d in shape) != spec.input_shape:
            raise InputShapeError(f"{name}: the ONNX file takes {'×'.join(map(str, spec.input_shape))} inputs, "
                                  f"not {'×'.join(map(str, shape))}")
        return
    channels = shape[0] if in_channels is None else in_channels
    if channels != shape[0]:
        raise InputShapeError(f"{name}: model has {channels} input channels but the input has {shape[0]}")
    with torch.device("meta"):
        model = create_model(name, in_channels=channels).eval()
    if _forward_shape(model, (1, *shape)) is not None:
        return
    if spec.source != "zoo" and _forward_shape(create_model(name, in_channels=channels).eval(), (1, *shape)):
        return  # a model source whose code cannot run on meta tensors (data-dependent control flow)
    sizes = valid_sizes(name, channels)
    smallest = f"{channels}×{sizes[0]}×{sizes[0]}" if sizes else "none"
    raise InputShapeError(
        f"{name}: input {'×'.join(map(str, shape))} does not fit the model; smallest valid size is {smallest} "
        f"(square sizes it accepts: {_describe_sizes(sizes)}; default {'×'.join(map(str, spec.input_shape))})"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (conv and linear layers), measured with hooks on meta tensors."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


def model_summary(name: str) -> dict:
    """Family, seed, default input, parameters and MACs (batch 1) of a registered model, computed from it."""
    spec = get_spec(name)
    with torch.device("meta"):
        model = create_model(name).eval()
    return {
        "name": name,
        "family": spec.family,
        "seed": spec.seed,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "params": count_parameters(model),
        "macs": count_macs(model, (1, *spec.input_shape)),
        "description": spec.description,
    }
