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

from exporter.backends import BackendUnavailable, Variant, get_backend
from exporter.backends.base import PEERS
from exporter.errors import UsageError, one_line
from exporter.machine import machine_slug
from exporter.manifest import Build, update_manifest
from exporter.models import count_macs, create_model
from exporter.results import UNVERIFIED, parity_of, parity_records, report_records, write_bench
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
PEER_PREFIX = "peer:"
PEER_PARITY_SAMPLES = 64  # real test images each peer is judged on before it is timed
PEER_CALIBRATION_IMAGES = 300  # NNCF's default subset size


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
                peaks: dict[str, Any] | None = None, progress: bool = False, save: bool = True,
                with_peers: bool = False) -> dict[str, Any]:
    """Benchmark a loaded build; merges the cells into `bench.json` and the manifest's `bench` section.

    `with_peers` also times, in the same rounds, what a user of each runtime does by hand with the build's files
    (`PEERS`), each judged first on real images; `results["peers"]["versus"]` compares our fastest passing
    artifact with the fastest peer at every batch size.

    Batch sizes a static-batch build cannot run are refused up front (UsageError), not timed as failures.
    """
    static = (build.manifest.get("batch") or {}).get("static")
    if static and set(settings.batch_sizes) != {static}:
        raise UsageError(f"build {build.dir} has a static batch of {static}: bench it with --batch-sizes {static}")
    targets = targets_for_build(build, backends, device=settings.device)
    if not targets:
        raise BenchError(f"build {build.dir} has no artifacts to benchmark")
    peer_notes: list[dict[str, Any]] = []
    if with_peers:
        peer_list, peer_notes = peer_targets(build, progress=progress)
        targets += peer_list
    macs, activation_bytes = model_costs(build)
    results = run_bench(targets, input_shape=build.input_shape, macs_per_image=macs, settings=settings,
                        peaks=peaks, progress=progress, label=build.model, activation_bytes=activation_bytes)
    results.update(model=build.model, build_dir=str(build.dir), build_id=build.build_id)
    if with_peers:
        cells = results["cells"]
        results["cells"] = [c for c in cells if not c["label"].startswith(PEER_PREFIX)]
        results["peers"] = {"cells": [c for c in cells if c["label"].startswith(PEER_PREFIX)],
                            "not_run": peer_notes, "versus": versus_peers(cells)}
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


def peer_targets(build: Build, *, progress: bool = False) -> tuple[list[BenchTarget], list[dict[str, Any]]]:
    """The peer baseline of a build, each judged on PEER_PARITY_SAMPLES real test images; (targets, not run)."""
    from exporter.data import sample_images
    from exporter.parity import verify_build

    artifacts = {a.name: a for a in build.artifacts}

    def calibration() -> Any:
        return sample_images(build.dataset, "train", build.input_shape, PEER_CALIBRATION_IMAGES, seed=0)[0]

    peers, not_run = [], []
    for name, factory in PEERS.items():
        try:
            artifact = factory(Path(build.dir), artifacts, calibration)
        except BackendUnavailable as exc:
            not_run.append({"peer": name, "reason": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001  (one peer failing to build must not stop the benchmark)
            not_run.append({"peer": name, "reason": f"failed: {one_line(exc)}"})
            continue
        if artifact is None:
            not_run.append({"peer": name, "reason": "the build has no file it starts from"})
        else:
            peers.append(Variant(artifact))
    if not peers:
        return [], not_run
    report = verify_build(build, variants=peers, samples=PEER_PARITY_SAMPLES, progress=progress, source="peers")
    records = report_records(report.to_dict())
    return [BenchTarget(v, build.dir, records.get(v.label, UNVERIFIED), overhead=False) for v in peers], not_run


def versus_peers(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: our fastest artifact that passed parity against the fastest peer (any verdict, shown)."""
    rows = []
    for batch in sorted({c["batch"] for c in cells}):
        timed = [c for c in cells if c["batch"] == batch and c["status"] == "ok"]
        ours = [c for c in timed if not c["label"].startswith(PEER_PREFIX)
                and (c.get("parity") or {}).get("status") in ("pass", "reference")]
        peers = [c for c in timed if c["label"].startswith(PEER_PREFIX)]
        if not ours or not peers:
            continue
        best, peer = min(ours, key=lambda c: c["p50_ms"]), min(peers, key=lambda c: c["p50_ms"])
        rows.append({"batch": batch, "ours": best["label"], "ours_p50_ms": best["p50_ms"],
                     "ours_parity": best["parity"].get("status"), "peer": peer["label"],
                     "peer_p50_ms": peer["p50_ms"], "peer_parity": (peer.get("parity") or {}).get("status"),
                     "ratio": best["p50_ms"] / peer["p50_ms"]})
    return rows

