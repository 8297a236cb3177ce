#!/usr/bin/env python
"""Run the whole latency matrix on this machine and write `bench/results/<machine>-<date>.{md,json,csv,png}`.

For every model (default: DEFAULT_MODELS that have a build) × every artifact of its latest build × every batch
size, with one timing method (`exporter.benchmark`): optional tuning first (`--tune`), then the benchmark, then
`exporter select` under the budget (default: ≤ 0.5 % top-1 flips at batch 1), then one report across models.

    .venv/bin/python bench/run_matrix.py                       # the default matrix (< 25 min on 2 idle cores)
    .venv/bin/python bench/run_matrix.py --models lenet,resnet18 --backends onnxruntime,openvino --batch-sizes 1
    .venv/bin/python bench/run_matrix.py --build-missing --verify-missing --tune

Run it on a quiet machine: other processes show up as unstable cells (cv > 10 %) and lower GEMM peaks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The ResNet-50 the performance goals are stated for (first: it matters most and takes longest, ~8 min), then
# the small-input models: about 20 minutes on 2 idle cores in all, most of it inductor compilation and
# ResNet-50 at batch 32 (~1.8 s per call in eager).
DEFAULT_MODELS = ("resnet50", "resnet18", "googlenet", "densenet", "lenet", "lenet_bn")
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_BUDGET_S = 0.5  # seconds of timed calls per cell (after at least --min-runs calls)
DEFAULT_MIN_RUNS = 10


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv, help=f"comma-separated models (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--backends", type=_csv, help="comma-separated backends or artifact names (default: all)")
    p.add_argument("--batch-sizes", type=lambda t: [int(x) for x in _csv(t)], default=list(DEFAULT_BATCH_SIZES),
                   help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--threads", type=int, help="CPU threads for every runtime (default: all usable cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds of timed calls per cell")
    p.add_argument("--min-runs", type=int, default=DEFAULT_MIN_RUNS, help="timed calls per cell, at least")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n³ matmul measuring the GEMM peak")
    p.add_argument("--tune", action="store_true", help="run `bench --tune` first (records winners per build)")
    p.add_argument("--tune-backends", type=_csv, default=["onnxruntime", "openvino"],
                   help="backends --tune tries settings for (default onnxruntime,openvino; add inductor for "
                   "max-autotune, which compiles for minutes on large models)")
    p.add_argument("--no-peers", action="store_true", help="skip the peer baseline (`exporter bench --peers`)")
    p.add_argument("--max-flips", default="0.5%", help="select budget: top-1 flips vs eager fp32 (default 0.5%%)")
    p.add_argument("--select-batch", type=int, default=1, help="batch size select chooses for (default 1)")
    p.add_argument("--build-missing", action="store_true", help="run `exporter build MODEL` for models without one")
    p.add_argument("--untrained", action="store_true", help="with --build-missing: build untrained weights")
    p.add_argument("--verify-missing", action="store_true", help="run `exporter verify` where no parity.json exists")
    p.add_argument("--artifacts", "--artifacts-dir", dest="artifacts_dir", type=Path,
                   default=Path(os.environ.get("EXPORTER_ARTIFACTS") or ROOT / "artifacts"),
                   help="where builds live (default: $EXPORTER_ARTIFACTS or the repository's artifacts/)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--machine", help="machine name in the file name (default: CPU model + cores [+ GPU])")
    p.add_argument("--deadline-min", type=float, default=30.0,
                   help="skip the remaining models once this many minutes have passed (default 30)")
    return p.parse_args(argv)


def _exporter(*args: str) -> int:
    """Run an `exporter` subcommand in a child process (a crash there must not end the matrix)."""
    command = [sys.executable, "-m", "exporter", *args]
    print("$ " + " ".join(command[2:]), flush=True)
    return subprocess.call(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from exporter.benchmark import BenchSettings, bench_build, check_device
    from exporter.errors import ExporterError
    from exporter.machine import machine_slug
    from exporter.manifest import load_build, update_manifest
    from exporter.models import get_spec
    from exporter.report import collect, write_reports
    from exporter.select import describe_choice, parse_budget, select_build
    from exporter.tuning import tune_build

    check_device(args.device)
    models = [get_spec(m).name for m in (args.models or DEFAULT_MODELS)]
    budget = parse_budget(args.max_flips)
    settings = BenchSettings(batch_sizes=tuple(args.batch_sizes), device=args.device, threads=args.threads,
                             budget_s=args.budget, min_runs=args.min_runs, gemm_size=args.gemm_size)
    started = time.monotonic()
    collected, notes = [], []
    for model in models:
        elapsed_min = (time.monotonic() - started) / 60
        if elapsed_min > args.deadline_min:
            notes.append(f"{model}: skipped, the matrix passed its {args.deadline_min:g}-minute deadline")
            continue
        t0 = time.monotonic()
        try:
            build = load_build(model, args.artifacts_dir, verify_hashes=False)
        except ExporterError as exc:
            if not args.build_missing:
                notes.append(f"{model}: no build ({exc}); run with --build-missing or `exporter build {model}`")
                print(notes[-1], flush=True)
                continue
            if _exporter("build", model, "--artifacts", str(args.artifacts_dir),
                         *(["--untrained"] if args.untrained else [])) != 0:
                notes.append(f"{model}: `exporter build` failed; see its output")
                continue
            build = load_build(model, args.artifacts_dir, verify_hashes=False)
        if args.verify_missing and not (build.dir / "parity.json").is_file():
            if _exporter("verify", str(build.dir)) != 0:
                notes.append(f"{model}: `exporter verify` reported failures (see parity table)")
            build = load_build(str(build.dir), args.artifacts_dir, verify_hashes=False)
        try:
            if args.tune:
                tune_backends = [b for b in args.tune_backends if not args.backends or b in args.backends]
                available = {a.backend for a in build.artifacts}
                if any(b in available for b in tune_backends):
                    tune_build(build, settings, backends=[b for b in tune_backends if b in available],
                               progress=True)
            results = bench_build(build, settings, backends=args.backends, progress=True,
                                  with_peers=not args.no_peers)
            ok = sum(c["status"] == "ok" for c in results["cells"])
            print(f"{model}: {ok}/{len(results['cells'])} cells ok in {time.monotonic() - t0:.0f}s", flush=True)
            try:
                choice = select_build(build, budget, args.select_batch)
                print("\n".join("  " + line for line in describe_choice(choice)), flush=True)
            except ExporterError as exc:
                notes.append(f"{model}: no recommendation: {exc}")
                if "recommended" in build.manifest:  # a stale choice from an earlier run must not be shown
                    update_manifest(build, "recommended", None)
        except ExporterError as exc:
            notes.append(f"{model}: benchmark failed: {exc}")
            print(notes[-1], flush=True)
            continue
        collected.append(collect(load_build(str(build.dir), args.artifacts_dir, verify_hashes=False)))
    if not collected:
        print("nothing was benchmarked:\n" + "\n".join(notes), file=sys.stderr)
        return 1
    machine = args.machine or machine_slug(collected[0]["bench"]["machine"])
    stem = f"{machine}-{datetime.now(timezone.utc):%Y-%m-%d}"
    minutes = (time.monotonic() - started) / 60
    title = (f"Latency matrix on {machine} ({', '.join(d['model'] for d in collected)}; "
             f"batch {','.join(map(str, settings.batch_sizes))}; {minutes:.1f} min)")
    paths = write_reports(collected, args.out, stem, title=title, notes=notes)
    print("\n".join(notes))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
