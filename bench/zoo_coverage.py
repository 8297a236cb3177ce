"""Which torchvision classification models build, verify and bench on which backend — and why the others fail.

    .venv/bin/python bench/zoo_coverage.py                          # every model (the full table)
    .venv/bin/python bench/zoo_coverage.py --models resnet18,vit_b_16 # only these; merged into the existing rows
    .venv/bin/python bench/zoo_coverage.py --backends inductor,aoti --missing  # add the torch.compile columns

Each model runs as `exporter build torchvision:NAME --json` in its own process (fresh memory, a time limit),
then `exporter bench` at batch 1 with a short budget (0.3 s of timed calls per artifact); the build is deleted
afterwards. The build is untrained (no weights can be downloaded here), static batch 1, at a reduced input
(`--size`, 96 px by default: op support, not resolution, is what is tested) unless the model only takes its own
size. Backends are ONNX (dynamo exporter),
ONNX Runtime and OpenVINO by default; `--backends inductor,aoti` builds torch.compile (inductor) and AOTInductor, which
take minutes per model on 2 cores, and merges their columns into the rows already there (a run replaces only the
columns of its own backends). Rows accumulate in `bench/results/zoo-coverage.json`; `zoo-coverage.md` is rendered
from them.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    error_line,
    header_machine,
    machine_label,
    run_exporter,
    run_rows,
    script_parser,
)

FAST_BACKENDS = ("onnx", "onnxruntime", "openvino")
COMPILE_BACKENDS = ("inductor", "aoti")
STAGE_COLUMNS = {"onnx": ("onnx-fp32", "onnx-reference"), "onnxruntime": ("onnx-fp32",),
                 "openvino": ("openvino-fp32", "openvino-bf16"), "inductor": ("inductor", "inductor-bf16"),
                 "aoti": ("aoti", "aoti-bf16")}
# the bf16 ones are built only where oneDNN has native bf16; a row without them has no cell there ("not run")


def _input_size(name: str, size: int) -> tuple[str, list[str]]:
    """The input the build will use, labelled as its manifest does (3×SIZE×SIZE when the model takes it, else its
    own), and the `--input-shape` option that asks for it (none for the model's own)."""
    from exporter.models import check_input_shape, get_spec
    from exporter.models.registry import InputShapeError

    try:
        check_input_shape(f"torchvision:{name}", (3, size, size))
    except InputShapeError:
        return "×".join(map(str, get_spec(f"torchvision:{name}").input_shape)), []
    return f"3×{size}×{size}", ["--input-shape", f"3,{size},{size}"]


def cover(name: str, *, size: int, backends: tuple[str, ...], build_timeout: float, bench_timeout: float) -> dict:
    """Build, verify (the build's quick parity on real images) and bench one torchvision model; one row."""
    row: dict = {"model": name, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "backends": list(backends), "machines_by": {",".join(backends): machine_label()}}
    if "inductor" in backends:
        row["inductor_frozen"] = True  # since the runner's freezing took effect (see render's footnote)
    with tempfile.TemporaryDirectory(prefix="zoo-coverage-") as art:
        label, shape = _input_size(name, size)
        build = run_exporter(["build", f"torchvision:{name}", "--untrained", "--batch", "1", "--backends",
                              ",".join(backends), "--keep-going", "--parity-samples", "8", "--artifacts", art,
                              "--json", *shape], build_timeout)
        # labelled before the build so that a timed-out compile build merges into the row instead of replacing it
        row.update(build_seconds=round(build.seconds, 1), input=label)
        if build.code is None:
            row["error"] = f"build exceeded {build_timeout:.0f} s"
            if set(backends) & set(COMPILE_BACKENDS):
                from exporter.backends.eager import cpu_has_native_bf16

                row["native_bf16"] = cpu_has_native_bf16()  # without it no bf16 column was to be built
            return row
        if not build.stdout.strip():
            row["error"] = error_line(build.stderr)
            return row
        summary = json.loads(build.stdout)
        row["input"] = "×".join(map(str, json.loads(Path(summary["manifest"]).read_text())["input_shape"]))
        cells: dict[str, dict] = {}
        failed = {f["backend"]: f["error"] for f in summary["failed"]}
        skipped = {s["backend"]: s["reason"] for s in summary["skipped"]}
        cells["torch.export"] = ({"status": "fail", "reason": failed["torch.export"]} if "torch.export" in failed
                                 else {"status": "ok"})
        for artifact in summary["artifacts"]:
            parity = artifact["parity"] or {}
            if parity.get("status") == "reference":
                continue
            cells[artifact["name"]] = {"status": parity.get("status", "?"), "reason": parity.get("reason"),
                                       "max_abs": parity.get("max_abs")}
        for backend, error in failed.items():
            for column in STAGE_COLUMNS.get(backend, ()):
                cells.setdefault(column, {"status": "fail", "reason": f"{backend}: {error}"})
        for backend, reason in skipped.items():
            for column in STAGE_COLUMNS.get(backend, ()):
                cells.setdefault(column, {"status": "skipped", "reason": reason})
        row["cells"] = cells
        bench = run_exporter(["bench", f"torchvision:{name}", "--batch-sizes", "1", "--budget", "0.3", "--min-runs",
                              "5", "--warmup", "2", "--no-overhead", "--gemm-size", "512", "--artifacts", art,
                              "--json"], bench_timeout)
        row["bench_seconds"] = round(bench.seconds, 1)
        if bench.code is None or not bench.stdout.strip():
            row["bench_error"] = (f"bench exceeded {bench_timeout:.0f} s" if bench.code is None
                                  else error_line(bench.stderr))
        else:
            for cell in json.loads(bench.stdout)["cells"]:
                target = cells.setdefault(cell["label"], {"status": "reference"})
                target["p50_ms"] = cell.get("p50_ms")
                if cell.get("status") != "ok":
                    target["bench_error"] = cell.get("error")
    return row


def row_backends(row: dict) -> list[str]:
    """The backends whose columns `row` holds (rows from before `--backends` hold the fast three)."""
    return row.get("backends", list(FAST_BACKENDS))


def _failed_cells(row: dict) -> dict[str, dict]:
    """A whole-build failure as one failed cell per column of the backends that build ran."""
    return {column: {"status": "fail", "reason": f"the build failed: {row['error']}"}
            for backend in row_backends(row) for column in STAGE_COLUMNS.get(backend, ())
            if row.get("native_bf16", True) or not column.endswith("-bf16")}


def merge_row(old: dict | None, new: dict) -> dict:
    """`new`'s columns over `old`'s: a run replaces only the columns of the backends it built, so the torch.compile
    columns can be added to (or re-run in) a table built without them. A different input size replaces the row."""
    if old is None or old.get("input") != new.get("input") or set(row_backends(new)) >= set(row_backends(old)):
        return new
    backends = list(dict.fromkeys(row_backends(old) + row_backends(new)))
    replaced = {column for backend in row_backends(new) for column in STAGE_COLUMNS.get(backend, ())}
    cells = {column: cell for column, cell in (old.get("cells") or _failed_cells(old)).items()
             if column not in replaced}
    if "error" in new:
        cells.update(_failed_cells(new))
    else:
        cells.update(new["cells"])
    seconds = {**old.get("build_seconds_by", {",".join(row_backends(old)): old.get("build_seconds", 0.0)}),
               ",".join(row_backends(new)): new.get("build_seconds", 0.0)}
    machines = {**old.get("machines_by", {}), **new.get("machines_by", {})}
    merged = {**old, **{k: v for k, v in new.items() if k not in ("error", "cells")}, "backends": backends,
              "cells": cells, "build_seconds_by": seconds, "build_seconds": round(sum(seconds.values()), 1),
              "machines_by": machines}
    merged.pop("error", None)
    return merged


def _cell_text(cell: dict) -> str:
    status = cell["status"]
    text = {"pass": "✓", "ok": "✓", "reference": "ref"}.get(status, status.upper())
    if cell.get("p50_ms") is not None:
        text += f" {cell['p50_ms']:.1f} ms"
    if cell.get("bench_error"):
        text += " (bench failed)"
    return text


# Why a cell of a row that ran has no verdict: a footnote mark per column kind (explained under the table).
NOT_RUN_MARKS = {"onnx-reference": "²", **{c: "³" for b in COMPILE_BACKENDS for c in STAGE_COLUMNS[b]}}


def _not_run_text(column: str, row: dict) -> str:
    """A column's text in a row that has no cell there, with the footnote mark that says why."""
    if column not in NOT_RUN_MARKS:
        return "not run"
    if column == "onnx-reference":
        return f"skipped{NOT_RUN_MARKS[column]}" if "onnx-fp32" in row["cells"] else "not run"
    compiled = any(column in STAGE_COLUMNS[b] for b in row_backends(row))
    return "not run" if compiled else f"not run{NOT_RUN_MARKS[column]}"  # compiled: a bf16 cell needs native bf16


def _columns_run_elsewhere(row: dict, machine: str) -> dict[str, str]:
    """The columns of `row` built on a machine other than `machine` (rows from before machines were recorded ran on
    the header's machine), each with that machine."""
    return {column: label for group, label in row.get("machines_by", {}).items() if label and label != machine
            for backend in group.split(",") for column in STAGE_COLUMNS.get(backend, ())}


def render(rows: dict[str, dict], meta: dict) -> str:
    from exporter.backends.onnx import REFERENCE_MAX_MACS
    from exporter.models.sources import torchvision_classification_models

    every = torchvision_classification_models()
    lines = [
        "# torchvision classification models: what builds, verifies and benches where",
        "",
        "Produced by `.venv/bin/python bench/zoo_coverage.py` (re-run it to refresh; `--models a,b` re-runs some). "
        "Each row is `exporter build torchvision:NAME --untrained --batch 1` (random weights: nothing can be "
        "downloaded here; tensors torchvision initialises to (almost) zero — ViT heads, ConvNeXt layer scales — "
        "are redrawn so that parity sees them) at the *input* shown — a reduced size where the model takes it, "
        "since op support and not resolution is tested — then `exporter bench --batch-sizes 1`. A cell is the "
        "artifact's verdict from the build's quick parity check against eager PyTorch fp32 (8 real digits5k test "
        "images and a batch of one, the judge of `exporter verify`) with its batch-1 p50 latency; `FAIL` / "
        "`skipped` cells have their reason under the table. *torch.export* is the program AOTInductor compiles; "
        "when it fails the other "
        f"backends still build. Backends run: {', '.join(meta['backends'])}"
        + "".join(f"; {backend} on {sum(backend in row_backends(r) for r in rows.values())} of {len(every)} models"
                  for backend in meta["backends"] if backend in COMPILE_BACKENDS)
        + f". Machine: {header_machine(meta)} (cells marked ‡ ran on another), torch {meta['torch']}, torchvision "
        f"{meta['torchvision']}, last run {meta['date']}.",
        "",
    ]
    columns = ["torch.export", *dict.fromkeys(c for b in meta["backends"] for c in STAGE_COLUMNS.get(b, ()))]
    lines += ["| model | input | " + " | ".join(columns) + " | eager p50 | build s |",
              "| --- | --- | " + " | ".join("---" for _ in columns) + " | ---: | ---: |"]
    notes: list[str] = []
    other_machines: set[str] = set()
    counts = {c: 0 for c in columns}
    for name in every:
        row = rows.get(name)
        if row is None:
            lines.append(f"| {name} | | " + " | ".join("not run" for _ in columns) + " | | |")
            continue
        if "error" in row:
            notes.append(f"- **{name}**: the build failed: {row['error']}")
            failed = {"torch.export", *_failed_cells(row)}
            lines.append(f"| {name} | {row.get('input', '')} | "
                         + " | ".join("FAIL¹" if c in failed else "not run" for c in columns)
                         + f" | | {row.get('build_seconds', '')} |")
            continue
        cells = row["cells"]
        elsewhere = _columns_run_elsewhere(row, header_machine(meta))
        texts = []
        for column in columns:
            cell = cells.get(column)
            text = _cell_text(cell) if cell else _not_run_text(column, row)
            if cell and column in STAGE_COLUMNS["inductor"] and not row.get("inductor_frozen"):
                text += " †"
            if cell and column in elsewhere:
                text += " ‡"
                other_machines.add(elsewhere[column])
            if cell and cell["status"] in ("pass", "ok"):
                counts[column] += 1
            if cell and cell["status"] not in ("pass", "ok", "reference") and cell.get("reason"):
                notes.append(f"- **{name}** {column}: {str(cell['reason'])[:300]}")
            if cell and cell.get("bench_error"):
                notes.append(f"- **{name}** {column} bench: {str(cell['bench_error'])[:300]}")
            texts.append(text)
        eager = cells.get("eager", {}).get("p50_ms")
        if row.get("bench_error"):
            notes.append(f"- **{name}** bench: {row['bench_error']}")
        lines.append(f"| {name} | {row['input']} | " + " | ".join(texts)
                     + f" | {f'{eager:.1f} ms' if eager is not None else '–'} | {row['build_seconds']:.0f} |")
    done = sum(1 for n in every if n in rows)
    lines += ["", f"{done} of {len(every)} models run; passing per column: "
              + ", ".join(f"{c} {counts[c]}" for c in columns) + ".", "",
              "¹ the whole build failed (reason below).",
              "",
              f"² the ONNX reference evaluator (numpy, `onnx.reference`) joins only graphs it can run "
              f"within {REFERENCE_MAX_MACS / 1e9:.1f} GMACs per image (numpy code: resnet18 at 96×96, 0.32 GMACs, "
              "takes 0.17 s per image on 2 cores); ONNX Runtime fp32 is then the other runtime the others are "
              "compared with.",
              "",
              "³ not compiled: the torch.compile columns (inductor, AOTI; 2–8 min per model on 2 cores) were run with "
              "`--backends inductor,aoti` on the models counted in the header only; "
              "`bench/zoo_coverage.py --backends inductor,aoti --missing` adds the others.",
              "",
              "† compiled before the inductor runner's `freezing` took effect (2026-11-27 21:45 UTC; "
              "[compile-profile.md](compile-profile.md)): no conv-BN folding, unpacked oneDNN weights, so slower than "
              "the artifact is now; the verdict stands. `--backends inductor --models …` refreshes them.",
              ""]
    if other_machines:
        lines += ["‡ built and timed on " + " and ".join(sorted(other_machines)) + ", not on the machine in the "
                  "header: the verdict stands, the latency is that machine's and not comparable with the row's "
                  "other cells.", ""]
    lines += ["## Why the others failed", ""]
    lines += notes or ["Nothing failed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from exporter.models.sources import torchvision_classification_models

    parser = script_parser(__doc__, models="every torchvision classification model")
    parser.add_argument("--size", type=int, default=96, help="input size where the model takes it (default 96)")
    parser.add_argument("--backends", default=",".join(FAST_BACKENDS), metavar="A,B",
                        help=f"stages to build, from {', '.join(STAGE_COLUMNS)} (default: {','.join(FAST_BACKENDS)})")
    parser.add_argument("--build-timeout", type=float, default=300.0, help="seconds per build (default 300)")
    parser.add_argument("--bench-timeout", type=float, default=180.0, help="seconds per bench (default 180)")
    parser.add_argument("--missing", action="store_true",
                        help="only the models without a row, or without the --backends columns, yet")
    args = parser.parse_args(argv)
    every = torchvision_classification_models()
    names = [n.strip() for n in args.models.split(",")] if args.models else every
    unknown = sorted(set(names) - set(every))
    if unknown:
        parser.error(f"not torchvision classification models: {', '.join(unknown)}")
    backends = tuple(dict.fromkeys(b.strip() for b in args.backends.split(",") if b.strip()))
    if not backends or set(backends) - set(STAGE_COLUMNS):
        parser.error(f"--backends takes stages from {', '.join(STAGE_COLUMNS)}, got {args.backends!r}")
    store = Path(args.results) / "zoo-coverage.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    rows: dict[str, dict] = saved.get("rows", {})
    if args.missing:
        names = [n for n in names if n not in rows or not set(backends) <= set(row_backends(rows[n]))]
    import torch
    import torchvision

    from exporter.machine import machine_info

    known = saved.get("meta", {}).get("backends", [])
    # the header's machine stays the one most of the table ran on; columns from another one are marked in it
    first = header_machine(saved["meta"]) if saved.get("meta") else machine_label()
    meta = {"machine": first, "cpu": machine_info()["cpu"], "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "backends": list(dict.fromkeys([*known, *backends])),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    started = time.perf_counter()
    run_rows(names, rows, lambda name: merge_row(rows.get(name), cover(
                 name, size=args.size, backends=backends, build_timeout=args.build_timeout,
                 bench_timeout=args.bench_timeout)),
             store=store, header=meta, render=render,
             outcome=lambda row: f"{row.get('error') or 'built'} ({row.get('build_seconds', 0):.0f} s)")
    print(f"{len(names)} model(s) in {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
