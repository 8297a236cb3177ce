"""Parity on real weights: build every trained model and verify every artifact on real test images.

    .venv/bin/python bench/parity_all.py                        # every model with a checkpoint in artifacts/
    .venv/bin/python bench/parity_all.py --models resnet18,densenet

For each model with a checkpoint (`bench/train_all.py` writes them), runs `exporter build MODEL --fp16 --int8
--backends …` and `exporter verify MODEL --samples N --json` in their own processes, and renders the verdicts into
`bench/results/parity.md` (rows kept in `parity.json` there; `--models` re-runs some and merges).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    atomic_write_text,
    elsewhere_notes,
    error_line,
    header_machine,
    machine_label,
    registry_order,
    rows_from_elsewhere,
    run_exporter,
    run_rows,
    script_parser,
)
from exporter.models import list_models  # noqa: E402
from exporter.paths import checkpoint_paths  # noqa: E402

BACKENDS = "inductor,onnx,onnxruntime,openvino"


def check_model(name: str, *, artifacts: Path, samples: int, backends: str, timeout: float,
                built: dict | None = None) -> dict:
    """Build (fp16 + int8) and verify one trained model; the verify report's per-artifact rows. With `built` (this
    script's earlier row for the model) the latest build is verified again instead, e.g. on more images."""
    started = time.perf_counter()
    row: dict = {"model": name, "machine": machine_label(), "backends": backends,
                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if built is None:
        build = run_exporter(["build", name, "--fp16", "--int8", "--backends", backends, "--artifacts",
                              str(artifacts), "--json"], timeout)
        if not build.stdout.strip():
            row["error"] = f"build: {_failure(build, timeout)}"
            return row
        row["failed"] = json.loads(build.stdout)["failed"]
    else:
        row.update(backends=built["backends"], failed=built.get("failed") or [])
    verify = run_exporter(["verify", name, "--samples", str(samples), "--artifacts", str(artifacts), "--json"],
                          timeout)
    if not verify.stdout.strip():
        row["error"] = f"verify: {_failure(verify, timeout)}"
        return row
    report = json.loads(verify.stdout)
    row.update(reference=report["reference"], samples=report["samples"], dataset=report["dataset"],
               passed=report["passed"], seconds=round(time.perf_counter() - started, 1),
               results=[{"label": r["label"], "backend": r["backend"], "precision": r["precision"],
                         "executed": r["executed_precision"], "judged_as": r["judged_as"], "status": r["status"],
                         "reason": r["reason"], "failures": r["failures"][:2], **r["summary"]}
                        for r in report["results"]])
    return row


def _failure(finished, timeout: float) -> str:
    return f"exceeded {timeout:.0f} s" if finished.code is None else error_line(finished.stderr)


def _f(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def current_count_failures(result: dict) -> list[str]:
    """What today's class of `result` says of its stored flip and accuracy counts, where the record was judged by an
    older class (the other bars are unchanged): rows stay truthful until their model is verified again."""
    from exporter.judge import TOLERANCES

    tol, n = TOLERANCES.get(result.get("judged_as")), result.get("samples")
    if tol is None or not n or result.get("status") != "pass":
        return []
    failures = []
    if result.get("flips") is not None and result["flips"] > tol.allowed_flips(n):
        failures.append(f"{result['flips']} of {n} images flip, {tol.allowed_flips(n)} allowed")
    if isinstance(result.get("acc_drop"), (int, float)):
        lost = round(result["acc_drop"] / 100.0 * n)
        if lost > tol.allowed_images_lost(n):
            failures.append(f"{lost} of {n} images lost net ({result['acc_drop']:.2f} points), "
                            f"{tol.allowed_images_lost(n)} allowed")
    return failures


def render(rows: dict[str, dict], meta: dict) -> str:
    here = header_machine(meta)
    order = registry_order(rows)
    elsewhere = rows_from_elsewhere({n: rows[n] for n in order}, here)
    lines = [
        "# Parity on trained weights",
        "",
        "Produced by `.venv/bin/python bench/parity_all.py` after `bench/train_all.py`. Each model's checkpoint "
        f"is built with `exporter build MODEL --fp16 --int8 --backends {meta['backends']}` and checked with "
        f"`exporter verify MODEL --samples {meta['samples']}`: every artifact against eager PyTorch fp32 on real "
        "digits5k test images, a batch sweep and adversarial inputs, judged in its precision's class "
        "(`exporter/judge.py`). *max abs* and *min cos* are over the real images and the batch sweep; *top-1* is "
        "the agreement with eager's class (*flips* images differ); *acc* is the artifact's own test accuracy "
        "and *Δacc* its drop against eager's, in points. "
        + ("" if "inductor" in meta["backends"] and "aoti" in meta["backends"] else
           "Stages left out of this run for time (2 cores): "
           + ", ".join(b for b in ("inductor", "aoti") if b not in meta["backends"])
           + " (`exporter build MODEL` builds and checks them)."),
        "",
        f"Machine: {here}, torch {meta['torch']}, last run {meta['date']}."
        + (" Models marked ‡ were verified on another machine (named below)." if elsewhere else ""),
        "",
        "| model | eager acc | artifact | runs in | judged as | verdict | max abs | min cos | top-1 (flips) | acc "
        "| Δacc |",
        "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    findings = []
    for name in order:
        row = rows[name]
        label = name + (" ‡" if name in elsewhere else "")
        if "error" in row:
            lines.append(f"| {label} | | failed: {row['error'].replace('|', '/')} | | | | | | | | |")
            findings.append(f"- **{name}** not checked: {row['error']}")
            continue
        eager_acc = _f(row["reference"].get("accuracy"), ".3f")
        for r in row["results"]:
            top1 = (f"{1 - r['flips'] / r['samples']:.3f} ({r['flips']})" if r.get("samples") else "–")
            drop = _f(r.get("acc_drop"), ".1f")  # in points already
            stale = current_count_failures(r)
            verdict = "FAIL*" if stale else r["status"].upper()
            lines.append(f"| {label} | {eager_acc} | {r['label']} | {r['executed']} | {r['judged_as']} "
                         f"| {verdict} | {_f(r.get('max_abs'), '.2e')} | {_f(r.get('min_cosine'), '.5f')} "
                         f"| {top1} | {_f(r.get('accuracy'), '.3f')} | {drop} |")
            if stale:
                findings.append(f"- **{name} {r['label']}** (FAIL*: passed when verified, fails today's "
                                f"{r['judged_as']} class): " + "; ".join(stale))
            elif r["status"] != "pass":
                findings.append(f"- **{name} {r['label']}** ({r['status']}): "
                                + (r.get("reason") or "; ".join(r.get("failures") or []) or "see parity.json"))
        for failure in row.get("failed") or []:
            findings.append(f"- **{name}** build stage {failure['backend']} failed: {failure['error']}")
    other_stages = {n: rows[n]["backends"] for n in order
                    if rows[n].get("backends", meta["backends"]) != meta["backends"]}
    other_samples = {n: rows[n]["samples"] for n in order if rows[n].get("samples", meta["samples"]) != meta["samples"]}
    for count in sorted(set(other_samples.values())):
        lines += ["", f"Verified on {count} test images instead: "
                  + ", ".join(n for n, c in other_samples.items() if c == count) + "."]
    for stages in sorted(set(other_stages.values())):
        lines += ["", f"Built with `--backends {stages}` instead: "
                  + ", ".join(n for n, b in other_stages.items() if b == stages) + "."]
    lines += [""] + elsewhere_notes(elsewhere, "verified")
    lines += ["## Findings", ""] + (findings or ["Every artifact of every model passed its class."])
    if any("(FAIL*" in f for f in findings):
        lines += ["", "FAIL\\* — verified under an earlier class and passed; today's judge (since 2026-12-02 every "
                  "class below fp32 needs top-1 agreement ≥ 0.99 and at most 0.5 points of accuracy lost, counted in "
                  "images with one always allowed — docs/parity.md) fails its stored counts. Re-run "
                  "`bench/parity_all.py --models …` after `bench/train_all.py` to rebuild (the int8 build now aims "
                  "at 0.995 agreement on its held-back images) and re-verify."]
    if findings and not any("(fail)" in f or "build stage" in f or "(FAIL*" in f for f in findings):
        lines += ["", "Every artifact that was checked passed its class."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, models="every model with a checkpoint",
                           artifacts="where checkpoints and builds are")
    parser.add_argument("--samples", type=int, default=256, help="real test images per verify (default 256)")
    parser.add_argument("--backends", default=BACKENDS, help=f"build stages (default {BACKENDS})")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per build or verify (default 900)")
    parser.add_argument("--render-only", action="store_true", help="re-render parity.md from parity.json")
    parser.add_argument("--verify-only", action="store_true", help="verify each model's latest build again (the "
                        "one this script built before, e.g. with more --samples) instead of building it")
    args = parser.parse_args(argv)
    artifacts = Path(args.artifacts)
    names = ([n.strip() for n in args.models.split(",")] if args.models
             else [n for n in list_models() if checkpoint_paths(n, artifacts)[0].exists()])
    store = Path(args.results) / "parity.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    rows: dict[str, dict] = saved.get("rows", {})
    if args.render_only:
        atomic_write_text(Path(args.results) / "parity.md", render(rows, saved["meta"]))
        return 0
    import torch

    from exporter.machine import machine_info

    meta = {"machine": machine_label(), "cpu": machine_info()["cpu"], "cpus": os.cpu_count(),
            "torch": torch.__version__, "backends": args.backends, "samples": args.samples,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if args.verify_only and saved.get("meta"):  # the table's usual stages and image count; this run's rows differ
        meta.update(backends=saved["meta"]["backends"], samples=saved["meta"]["samples"])
    if args.verify_only and (unbuilt := [n for n in names if "results" not in rows.get(n, {})]):
        parser.error(f"--verify-only: no earlier build by this script for {', '.join(unbuilt)}; run without it")
    run_rows(names, rows, lambda name: check_model(name, artifacts=artifacts, samples=args.samples,
                                                   backends=args.backends, timeout=args.timeout,
                                                   built=rows[name] if args.verify_only else None),
             store=store, header=meta, render=render,
             outcome=lambda row: row.get("error") or ("PASS" if row["passed"] else "FAIL"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
