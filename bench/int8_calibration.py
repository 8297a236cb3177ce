"""Which int8 calibration method: ONNX Runtime's MinMax, Entropy and Percentile, measured on the trained zoo.

    .venv/bin/python bench/int8_calibration.py                     # every model with a build in artifacts/
    .venv/bin/python bench/int8_calibration.py --models densenet,nin

For each model's latest build (`exporter build MODEL`), quantizes its `model.onnx` with each method in the CPU
layout `exporter` ships (uint8 activations, per-channel int8 weights; no fp32 fallback, so the methods are compared
alone) on 256 training images (a build calibrates on 384 of its 512 and judges the rest), and compares the result
with the fp32 file on 1,000 digits5k test images: top-1 agreement, worst cosine, accuracy, and the seconds each
method took. Rows are kept in `bench/results/int8-calibration.json` and rendered to `int8-calibration.md`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run_rows, script_parser  # noqa: E402

TEST_IMAGES = 1000
CALIBRATION_IMAGES = 256


def measure(name: str, *, artifacts: Path) -> dict:
    """Quantize one build's fp32 ONNX with every method; agreement/cosine/accuracy on real test images."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from exporter.backends.onnxruntime_int8 import CALIBRATION_METHODS, CPU_LAYOUT, CPU_OPTIONS, write_qdq
    from exporter.data import sample_images
    from exporter.judge import compute_metrics

    source = artifacts / name / "latest" / "model.onnx"
    if not source.exists():
        return {"model": name, "error": f"no build: run `exporter build {name}` first"}
    graph_input = onnx.load(str(source), load_external_data=False).graph.input[0]
    shape = tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:])
    calibration, _, _ = sample_images(None, "train", shape, CALIBRATION_IMAGES, seed=0)
    images, labels, _ = sample_images(None, "test", shape, TEST_IMAGES, seed=0)

    def logits(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {graph_input.name: images[i:i + 50]})[0]
                               for i in range(0, len(images), 50)])

    reference = logits(source)
    row: dict = {"model": name, "fp32_accuracy": float((reference.argmax(1) == labels).mean()), "methods": {},
                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="int8-calibration-") as work:
        for method in CALIBRATION_METHODS:
            target = Path(work) / f"{method}.onnx"
            started = time.perf_counter()
            write_qdq(source, target, calibration, activation_type="uint8", extra_options=CPU_OPTIONS,
                      layout=CPU_LAYOUT, progress=False, method=method)
            seconds = time.perf_counter() - started
            metrics = compute_metrics(reference, logits(target), labels=labels)
            row["methods"][method] = {"seconds": round(seconds, 1), "agreement": metrics.agreement,
                                      "flips": metrics.flipped, "min_cosine": metrics.min_cosine,
                                      "mean_cosine": metrics.mean_cosine, "accuracy": metrics.accuracy}
    return row


def render(rows: dict[str, dict], meta: dict) -> str:
    """The Markdown table: one row per model, one column group per method."""
    methods = ("MinMax", "Entropy", "Percentile")
    lines = ["# int8 calibration methods, measured", "",
             f"Produced by `.venv/bin/python bench/int8_calibration.py` ({meta['date']}, {meta['cpus']} cores). "
             f"Each trained model's `model.onnx` is quantized by ONNX Runtime in the layout `onnx-int8` ships "
             f"(uint8 activations, per-channel int8 weights) with each calibration method on "
             f"{CALIBRATION_IMAGES} training images, **without** the fp32 fallback, and compared with the fp32 file "
             f"on {TEST_IMAGES} digits5k test images: top-1 agreement (flips), worst cosine, accuracy, seconds to "
             "calibrate and quantize.", "",
             "| model | fp32 acc | " + " | ".join(f"{m} agree (flips) | {m} min cos | {m} acc | {m} s" for m in methods)
             + " |", "| --- | ---: |" + " ---: | ---: | ---: | ---: |" * len(methods)]
    wins: dict[str, int] = {m: 0 for m in methods}
    for name, row in rows.items():
        if row.get("error"):
            lines.append(f"| {name} | {row['error']} |")
            continue
        cells = row["methods"]
        best = max(methods, key=lambda m: (cells[m]["agreement"], cells[m]["min_cosine"], -methods.index(m)))
        wins[best] += 1
        lines.append(f"| {name} | {row['fp32_accuracy']:.3f} | " + " | ".join(
            f"{'**' if m == best else ''}{cells[m]['agreement']:.3f} ({cells[m]['flips']}){'**' if m == best else ''}"
            f" | {cells[m]['min_cosine']:.4f} | {cells[m]['accuracy']:.3f} | {cells[m]['seconds']:.1f}"
            for m in methods) + " |")
    lines += ["", "Best per model (bold: highest agreement, then worst cosine; ties go to the cheaper method): "
              + ", ".join(f"{m} {n}" for m, n in wins.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, models="every model with a build", artifacts="where the builds are")
    args = parser.parse_args(argv)
    artifacts = Path(args.artifacts)
    from exporter.models import list_models

    names = ([n.strip() for n in args.models.split(",")] if args.models
             else [n for n in list_models() if (artifacts / n / "latest" / "model.onnx").exists()])
    store = Path(args.results) / "int8-calibration.json"
    rows: dict[str, dict] = json.loads(store.read_text())["rows"] if store.exists() else {}
    meta = {"cpus": os.cpu_count(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    run_rows(names, rows, lambda name: measure(name, artifacts=artifacts), store=store, header=meta, render=render,
             outcome=lambda row: row.get("error") or ", ".join(
                 f"{m} {c['agreement']:.3f}" for m, c in row["methods"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
