"""The Python API: `build`, `verify` and `bench`, the CLI's subcommands as functions returning what the CLI prints.

    import torch, torchvision, exporter
    result = exporter.build(torchvision.models.mobilenet_v3_small(num_classes=10),
                            example_input=torch.rand(1, 3, 96, 96), int8=True)
    report = exporter.verify(result)          # ParityReport: bool(report) is the verdict
    timings = exporter.bench(result, batch_sizes=(1,))

A model is a registered name, a model source (`torchvision:NAME`, `timm:NAME`, `file.py:factory`, `model.onnx`) or
an `nn.Module` object; an object is exported with the weights it has and can be verified and benchmarked in this
process (another process needs it as a `file.py:factory` source).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from exporter.build_inputs import BuildOptions
from exporter.comparison import ParityReport
from exporter.errors import UsageError
from exporter.export import BuildResult
from exporter.manifest import Build, load_build


def build(model: Any, *, example_input: Any = None, fp16: bool = False, int8: bool = False,
          **options: Any) -> BuildResult:
    """Build every artifact of `model` (a name, a model source or an `nn.Module`) and check their parity.

    `example_input`: a (1, C, H, W) tensor or a (C, H, W) shape fixing the input (default: the model's own).
    `options`: the other `BuildOptions` fields (`backends`, `batch`, `checkpoint`, `artifacts_dir`, …). A module
    object is exported with its current weights (as `--checkpoint`): nothing is trained.
    """
    from torch import nn

    from exporter.export import build as run_build

    shape = _input_shape(example_input)
    name = options.pop("name", None)
    known = {f.name for f in dataclasses.fields(BuildOptions)} - {"model", "fp16", "int8", "input_shape"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown build option(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if isinstance(options.get("backends"), str):
        options["backends"] = [b.strip() for b in options["backends"].split(",") if b.strip()]
    if isinstance(model, nn.Module):
        from exporter.models.sources import register_object

        if shape is None:
            raise UsageError("exporter.build(module) needs example_input (a tensor or a C,H,W shape)")
        model = register_object(model, shape, name).name
    elif name is not None:
        raise UsageError("name= names a module object; a model given by name already has one")
    elif not isinstance(model, str):
        raise UsageError(f"model must be a name, a model source or an nn.Module, not {type(model).__name__}")
    if shape is not None:
        options["input_shape"] = shape
    options.setdefault("progress", False)
    return run_build(BuildOptions(model=model, fp16=fp16, int8=int8, **options))


def verify(target: BuildResult | Build | str | Path, *, check: bool = False, artifacts_dir: str | Path | None = None,
           **options: Any) -> ParityReport:
    """Verify a build's artifacts against its reference; `check=True` raises ParityError on any failure.

    `options` are `exporter.parity.verify_build`'s (`samples`, `backends`, `bisect`, …).
    """
    from exporter.parity import save_report, verify_build

    loaded = _load(target, artifacts_dir)
    options.setdefault("progress", False)
    report = verify_build(loaded, **options)
    save_report(report, loaded)
    if check:
        report.raise_for_failures()
    return report


def bench(target: BuildResult | Build | str | Path, *, batch_sizes: tuple[int, ...] = (1,),
          backends: list[str] | None = None, artifacts_dir: str | Path | None = None,
          **settings: Any) -> dict[str, Any]:
    """Time a build's artifacts (the `exporter bench` results: cells with latency percentiles, throughput and each
    artifact's parity); `settings` are `exporter.timing.BenchSettings` fields."""
    from exporter.benchmark import bench_build
    from exporter.timing import BenchSettings

    return bench_build(_load(target, artifacts_dir), BenchSettings(batch_sizes=tuple(batch_sizes), **settings),
                       backends=backends)


def _load(target: BuildResult | Build | str | Path, artifacts_dir: str | Path | None = None) -> Build:
    if isinstance(target, Build):
        return target
    if isinstance(target, BuildResult):
        return load_build(target.build_dir)
    return load_build(target, Path(artifacts_dir) if artifacts_dir is not None else None)


def _input_shape(example: Any) -> tuple[int, int, int] | None:
    if example is None:
        return None
    shape = tuple(int(d) for d in getattr(example, "shape", example))
    if len(shape) == 4 and shape[0] >= 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) <= 0:
        raise UsageError(f"example_input must be a (1, C, H, W) tensor or a (C, H, W) shape, got {shape}")
    return shape  # type: ignore[return-value]
