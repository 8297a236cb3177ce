"""What a build starts from: its options (`exporter build`'s flags, one to one) and the weights it exports — a
checkpoint, the model's own checkpoint, a fresh training run, or randomly initialised weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from exporter.checkpoint import load_checkpoint, resolve_checkpoint
from exporter.data import DIGITS5K, check_channels, load_split
from exporter.errors import ExporterError, UsageError
from exporter.fileio import sha256_file
from exporter.machine import available_memory_bytes
from exporter.models import check_input_shape, create_model, get_spec
from exporter.paths import checkpoint_paths, default_artifacts_dir
from exporter.train import train


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
    artifacts_dir: Path = field(default_factory=default_artifacts_dir)
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
    dataset = sidecar.get("dataset") or {}
    if not isinstance(dataset, dict) or dataset.get("name") in (None, DIGITS5K):
        return None
    return dataset.get("source") or None


def _check_checkpoint_size(path: Path, input_shape: tuple[int, ...], opts: BuildOptions) -> None:
    if opts.input_size is not None and input_shape[1:] != (opts.input_size, opts.input_size):
        raise BuildError(f"checkpoint {path} was trained at {'×'.join(map(str, input_shape))}, not "
                         f"{opts.input_size}×{opts.input_size}; drop --input-size or retrain at that size")


def _from_checkpoint(path: Path, opts: BuildOptions, *, trained_now: bool) -> Weights:
    state, sidecar = load_checkpoint(path, expect_model=opts.model)
    input_shape = tuple(int(d) for d in sidecar["input_shape"])
    _check_checkpoint_size(path, input_shape, opts)
    model = create_model(opts.model, in_channels=int(sidecar["in_channels"]), num_classes=int(sidecar["num_classes"]))
    model.load_state_dict(state)
    weights_path, _ = resolve_checkpoint(path)
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


BATCH_MEMORY_SHARE = 4  # one input batch may take at most 1/4 of the available memory (outputs, copies, runtimes)


def _existing_checkpoint(opts: BuildOptions) -> Path | None:
    """The checkpoint `resolve_weights` will export (None: untrained, or none yet so it trains one first)."""
    if opts.untrained:
        return None
    if opts.checkpoint is not None:
        return Path(opts.checkpoint)
    weights_path, sidecar_path = checkpoint_paths(opts.model, opts.artifacts_dir)
    return weights_path if weights_path.exists() or sidecar_path.exists() else None


def check_inputs(opts: BuildOptions) -> None:
    """What a build can check before it writes or prints anything, each refused in one line: the checkpoint, the
    data set (readable, enough test images for the quick parity check, no colour images into a 1-channel
    checkpoint), the input size, and one input batch of the largest size against the memory available."""
    spec = get_spec(opts.model)
    checkpoint, sidecar = _existing_checkpoint(opts), None
    if checkpoint is not None:
        _, sidecar = load_checkpoint(checkpoint, expect_model=opts.model)
    dataset = opts.data if opts.data is not None or sidecar is None else _dataset_arg(sidecar)
    test = load_split(dataset, "test")
    if sidecar is not None:
        input_shape = tuple(int(d) for d in sidecar["input_shape"])
        _check_checkpoint_size(checkpoint, input_shape, opts)
        check_channels(test, input_shape[0])
    else:  # untrained or trained first: colour data makes a 3-channel model (as `_untrained` and `train` do)
        channels = 3 if test.channels == 3 else spec.input_shape[0]
        size = opts.input_size
        input_shape = (channels, size, size) if size else (channels, *spec.input_shape[1:])
        check_input_shape(opts.model, input_shape)
    static = opts.batch or (1 if opts.max_batch == 1 else None)
    largest, flag = (static, "--batch") if opts.batch else (opts.max_batch, "--max-batch")
    per_image = math.prod(input_shape) * 4
    available = available_memory_bytes()
    if available is not None and largest * per_image * BATCH_MEMORY_SHARE > available:
        limit = max(available // (per_image * BATCH_MEMORY_SHARE), 1)
        raise UsageError(f"{flag} {largest}: one batch at {'×'.join(map(str, input_shape))} takes "
                         f"{largest * per_image / 2**30:.1f} GiB as input alone; with {available / 2**30:.1f} GiB "
                         f"available this machine allows at most {flag} {limit}")
    needed = max(static, opts.parity_samples - opts.parity_samples % static) if static else opts.parity_samples
    if needed > len(test):
        raise UsageError(f"the quick parity check needs {needed} test images but {test.name} has only {len(test)}; "
                         f"lower --parity-samples" + (" or --batch" if static else ""))


def resolve_weights(opts: BuildOptions, say: Callable[[str], None]) -> Weights:
    """The model with its weights: `--checkpoint`, the model's checkpoint, a fresh training run, or `--untrained`."""
    if opts.untrained:
        say(f"  {opts.model}: --untrained: exporting randomly initialised weights (seed {opts.seed}); "
                     "every artifact is marked untrained")
        return _untrained(opts)
    if opts.checkpoint is not None:
        return _from_checkpoint(Path(opts.checkpoint), opts, trained_now=False)
    weights_path, sidecar_path = checkpoint_paths(opts.model, opts.artifacts_dir)
    if weights_path.exists() or sidecar_path.exists():
        return _from_checkpoint(weights_path, opts, trained_now=False)
    say(f"  no checkpoint for {opts.model} in {opts.artifacts_dir}: training it first with the default "
                 f"budget (`exporter train {opts.model}`; pass --untrained to skip)")
    train(opts.model, data=opts.data, resize=opts.input_size, seed=opts.seed, artifacts_dir=opts.artifacts_dir,
          progress=opts.progress)
    return _from_checkpoint(weights_path, opts, trained_now=True)
