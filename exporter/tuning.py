"""`exporter bench --tune`: the runtime settings a skilled user would try by hand, timed against the defaults,
and the winners verified by the judge before anything may recommend them.

Each backend's runner names its own candidates (`Runner.tuning_candidates`: ONNX Runtime's optimisation level and
threads, OpenVINO's hints, streams, pinning and bf16 inference, inductor's freezing and max-autotune). Candidates
are timed with the one method of `exporter.timing`, interleaved with their default; the winner per artifact must be
≥ `TUNE_MIN_GAIN` faster and timed steadily (an unstable candidate cannot win). Every winner is then run through
`exporter verify`'s judge as the variant `ARTIFACT+tuned` — in the tolerance class of the lowest precision it
really uses, so a candidate that makes an fp32 artifact compute in bf16 is judged as bf16 — and its record goes
into `parity.json`. `select` refuses a tuned variant without a passing record for exactly its options.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from exporter.backends import Variant, get_backend
from exporter.benchmark import TUNED, model_costs, targets_for_build
from exporter.machine import machine_slug, set_threads
from exporter.manifest import Build, update_manifest
from exporter.parity import save_report, verify_build
from exporter.timing import BenchError, BenchSettings, BenchTarget, run_bench

TUNE_MIN_GAIN = 0.03  # a candidate must beat the runtime's default by 3 % to win (else noise picks winners)
TUNE_PARITY_SAMPLES = 256


def candidate_targets(build: Build, settings: BenchSettings, *, threads: int, backends: Iterable[str] | None,
                      allow_bf16: bool) -> tuple[list[BenchTarget], list[BenchTarget]]:
    """(the default targets, the defaults followed by each one's candidates)."""
    defaults = [t for t in targets_for_build(build, backends, tuned=False, device=settings.device)
                if t.artifact.backend != "eager"]
    targets: list[BenchTarget] = []
    for default in defaults:
        targets.append(default)
        cls = get_backend(default.artifact.backend)
        for label, options in cls.tuning_candidates(default.artifact, device=settings.device, threads=threads,
                                                    allow_bf16=allow_bf16):
            targets.append(BenchTarget(Variant(default.artifact, label, options), build.dir))
    return defaults, targets


def pick_winner(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The tuning entry of one artifact from its timed cells: the fastest steady candidate that beats the default
    by ≥ TUNE_MIN_GAIN, else the default."""
    base = next((c for c in cells if c["variant"] == "default"), None)
    steady = [c for c in cells if c["status"] == "ok" and not c.get("unstable")]
    entry: dict[str, Any] = {"candidates": [
        {"variant": c["variant"], "options": c["options"], "status": c["status"], "p50_ms": c.get("p50_ms"),
         "cv": c.get("cv"), "unstable": c.get("unstable"), "executed_precision": c.get("executed_precision"),
         "error": c.get("error")} for c in cells]}
    base_p50 = base.get("p50_ms") if base and base["status"] == "ok" else None
    entry["default_p50_ms"] = base_p50
    best = min(steady, key=lambda c: c["p50_ms"], default=None)
    if best is not None and best["variant"] != "default" and (
            base_p50 is None or best["p50_ms"] < base_p50 * (1 - TUNE_MIN_GAIN)):
        entry.update(variant=best["variant"], options=best["options"], p50_ms=best["p50_ms"],
                     speedup=base_p50 / best["p50_ms"] if base_p50 else None,
                     executed_precision=best.get("executed_precision"))
    else:
        entry.update(variant="default", options={}, p50_ms=base_p50, speedup=1.0 if base_p50 else None)
    return entry


def tune_build(build: Build, settings: BenchSettings, *, batch: int | None = None,
               backends: Iterable[str] | None = None, allow_bf16: bool = False, progress: bool = False,
               save: bool = True) -> dict[str, Any]:
    """Time every artifact's tuning candidates against its default at one batch, verify the winners, and write the
    manifest's `tuning` section (later `bench` runs on the same machine time the winners as `+tuned` variants).

    `allow_bf16` (the user accepts reduced precision; implied by a build made with `--fp16`) adds candidates that
    compute in bf16; they are judged in the bf16 class like any bf16 artifact.
    """
    threads = set_threads(settings.threads)
    batch = batch or min(settings.batch_sizes)
    allow_bf16 = allow_bf16 or bool((build.manifest.get("options") or {}).get("fp16"))
    defaults, targets = candidate_targets(build, settings, threads=threads, backends=backends, allow_bf16=allow_bf16)
    if not defaults:
        raise BenchError(f"build {build.dir} has nothing to tune (no artifact other than eager)")
    tune_settings = BenchSettings(**{**settings.__dict__, "batch_sizes": (batch,), "overhead": False})
    macs, _ = model_costs(build)
    results = run_bench(targets, input_shape=build.input_shape, macs_per_image=macs, settings=tune_settings,
                        progress=progress, label=f"tune {build.model}")
    torch._dynamo.reset()  # the candidates' compiled graphs are gone with their runners: start the bench clean
    tuning: dict[str, Any] = {"created": results["created"], "machine": machine_slug(results["machine"]),
                              "threads": threads, "device": settings.device, "batch": batch,
                              "min_gain": TUNE_MIN_GAIN, "artifacts": {}}
    for default in defaults:
        name = default.artifact.name
        tuning["artifacts"][name] = pick_winner([c for c in results["cells"] if c["artifact"] == name])
    winners = [Variant(d.artifact, TUNED, dict(tuning["artifacts"][d.artifact.name]["options"])) for d in defaults
               if tuning["artifacts"][d.artifact.name]["variant"] != "default"]
    if winners:
        report = verify_build(build, variants=winners, samples=TUNE_PARITY_SAMPLES, progress=progress, source="tune")
        if save:
            save_report(report, build)
        for result in report.results:
            tuning["artifacts"][result.artifact]["parity"] = {
                "status": result.status, "judged_as": result.tolerance.precision, "judged_by": result.judged_by,
                "reason": result.reason or None}
    previous = build.manifest.get("tuning") or {}
    if previous.get("machine") == tuning["machine"] and previous.get("threads") == threads:
        # tuning a subset of backends keeps the winners of the others
        tuning["artifacts"] = {**(previous.get("artifacts") or {}), **tuning["artifacts"]}
    if save:
        update_manifest(build, "tuning", tuning)
    return tuning
