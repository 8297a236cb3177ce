"""`exporter bench`: time every artifact of a build with the one method of `exporter.timing`.

Each cell carries the precision the runtime executed and the parity record that vouches for it (from the
build's `parity.json`, read through `exporter.results`), so a fast but wrong artifact is never shown unmarked.
Results are merged cell by cell into the build's `bench.json`; a later run with a `--backends` subset or other
batch sizes never wipes what it did not measure. `--tune` (see `exporter.tuning`) adds verified `+tuned` variants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from exporter.backends import Variant, get_backend
from exporter.errors import UsageError
from exporter.machine import machine_slug
from exporter.manifest import Build, update_manifest
from exporter.models import count_macs, create_model
from exporter.results import parity_of, parity_records, write_bench
from exporter.timing import (  # noqa: F401  (BenchSettings, BenchError, run_bench: this stage's public API)
    BenchError,
    BenchSettings,
    BenchTarget,
    activation_bytes_per_image,
    check_device,
    run_bench,
)

ORACLE_BACKENDS = ("onnx_reference",)  # benchmarked only when named with --backends
DEVICE_AGNOSTIC_BACKENDS = ("eager", "inductor")  # artifacts are weights: they run on any device
TUNED = "tuned"


def targets_for_build(build: Build, backends: Iterable[str] | None = None, *, tuned: bool = True,
                      device: str = "cpu") -> list[BenchTarget]:
    """Bench targets of a build: every artifact for `device` (or those of `backends`), plus the tuned variants
    `exporter bench --tune` recorded for this machine, each with its own parity record.

    An artifact compiled for one device (an AOTI package, a TensorRT engine, a CUDA-provider session) runs only
    there; the weights-based ones (eager, inductor) run wherever their runner does.
    """
    wanted = set(backends) if backends else None
    artifacts = build.artifacts
    if not wanted:  # oracles check correctness; nobody deploys them, and they take seconds per image
        artifacts = [a for a in artifacts if a.backend not in ORACLE_BACKENDS]
    artifacts = [a for a in artifacts if a.device == device or a.backend in DEVICE_AGNOSTIC_BACKENDS]
    if wanted:
        unknown = wanted - {a.backend for a in artifacts} - {a.name for a in artifacts}
        for name in unknown:
            get_backend(name)  # an unknown backend name raises with close matches
        if unknown:
            have = ", ".join(sorted({a.backend for a in artifacts}))
            raise UsageError(f"build {build.dir} has no artifact of {', '.join(sorted(unknown))} (it has: {have})")
        artifacts = [a for a in artifacts if a.backend in wanted or a.name in wanted]
    tuning = build.manifest.get("tuning") or {}
    if tuned and tuning and tuning.get("machine") != machine_slug():
        tuned = False  # settings tuned on another machine say nothing about this one
    records = parity_records(build)
    targets = []
    for artifact in artifacts:
        default = Variant(artifact)
        targets.append(BenchTarget(default, build.dir, parity_of(build, default.label, records=records)))
        winner = (tuning.get("artifacts") or {}).get(artifact.name)
        if tuned and winner and winner.get("options"):
            variant = Variant(artifact, TUNED, dict(winner["options"]))
            targets.append(BenchTarget(variant, build.dir,
                                       parity_of(build, variant.label, variant.options, records=records)))
    return targets


def model_costs(build: Build) -> tuple[int, int]:
    """(MACs, bytes of all layer outputs) of one image through the build's model, computed on meta tensors (from
    the ONNX graph's shapes for a build of an ONNX file)."""
    from exporter.backends.onnx import FP32_FILE, graph_costs

    onnx_file = Path(build.dir) / FP32_FILE
    if build.manifest.get("source") == "onnx":
        return graph_costs(onnx_file)
    try:
        with torch.device("meta"):
            net = create_model(build.model, in_channels=build.input_shape[0], num_classes=build.num_classes).eval()
        return count_macs(net, (1, *build.input_shape)), activation_bytes_per_image(net, build.input_shape)
    except Exception:  # a model source that cannot run on meta tensors or be re-created here: count its ONNX graph
        if onnx_file.is_file():
            return graph_costs(onnx_file)
        raise


def bench_build(build: Build, settings: BenchSettings, *, backends: Iterable[str] | None = None,
                peaks: dict[str, Any] | None = None, progress: bool = False, save: bool = True) -> dict[str, Any]:
    """Benchmark a loaded build; merges the cells into `bench.json` and the manifest's `bench` section.

    Batch sizes a static-batch build cannot run are refused up front (UsageError), not timed as failures.
    """
    static = (build.manifest.get("batch") or {}).get("static")
    if static and set(settings.batch_sizes) != {static}:
        raise UsageError(f"build {build.dir} has a static batch of {static}: bench it with --batch-sizes {static}")
    targets = targets_for_build(build, backends, device=settings.device)
    if not targets:
        raise BenchError(f"build {build.dir} has no artifacts to benchmark")
    macs, activation_bytes = model_costs(build)
    results = run_bench(targets, input_shape=build.input_shape, macs_per_image=macs, settings=settings,
                        peaks=peaks, progress=progress, label=build.model, activation_bytes=activation_bytes)
    results.update(model=build.model, build_dir=str(build.dir), build_id=build.build_id)
    if save:
        merged = write_bench(build.dir, dict(results, cells=[dict(c) for c in results["cells"]]))
        update_manifest(build, "bench", {"file": "bench.json", "created": results["created"],
                                         "machine": machine_slug(results["machine"]),
                                         "threads": results["settings"]["threads"], "device": settings.device,
                                         "summary": summarize(merged)})
    return results


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: label, batch, status, p50 ms, throughput, executed precision, parity status (for manifests)."""
    return [{"label": c["label"], "batch": c["batch"], "status": c["status"], "p50_ms": c.get("p50_ms"),
             "throughput_ips": c.get("throughput_ips"), "executed_precision": c.get("executed_precision"),
             "parity": c["parity"].get("status"), "unstable": c.get("unstable")} for c in results["cells"]]
