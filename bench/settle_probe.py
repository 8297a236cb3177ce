"""How long another runtime's threads slow a runtime's next calls: the measurement behind `exporter.timing.SETTLE_S`.

    .venv/bin/python bench/settle_probe.py densenet                    # openvino-int8 after ORT on model.onnx
    .venv/bin/python bench/settle_probe.py resnet18 --artifact openvino-bf16 --rounds 100

Each round runs `--other-ms` of ONNX Runtime calls (the build's `model.onnx`, default session at the bench's thread
count), then one of the settle conditions below, then one untimed call of the OpenVINO artifact (what the bench did
before `settle_s`) and `--window-ms` of its timed calls; a last condition follows a block of the artifact itself
(no switch). Printed: each condition's median of the windows' p50 and the median of its ratio to the no-switch
window of the same round (the machine's phases, which move both, cancel out of the ratio).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def calls_for(call, seconds: float) -> None:
    """Call `call` back to back for `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        call()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built model (its latest build) or a build directory")
    parser.add_argument("--artifact", default="openvino-int8",
                        help="the OpenVINO artifact timed (default openvino-int8)")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--other-ms", type=float, default=20.0, help="ONNX Runtime block before each window")
    parser.add_argument("--window-ms", type=float, default=30.0, help="timed calls after the settle")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from exporter.backends.openvino import shared_core
    from exporter.machine import usable_cores
    from exporter.manifest import load_build

    build = load_build(args.model)
    artifact = build.artifact(args.artifact)
    threads = usable_cores()
    x = np.random.default_rng(0).random((1, *build.input_shape), dtype=np.float32)
    compiled = shared_core().compile_model(str(Path(build.dir) / artifact.path), "CPU", {
        "INFERENCE_PRECISION_HINT": artifact.options.get("inference_precision", "f32"),
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(Path(build.dir) / build.artifact("onnx-fp32").path), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def ours() -> None:
        request.infer({0: x})

    def other() -> None:
        session.run(None, {name: x})

    conditions = {
        "none (one untimed call)": lambda: None,
        "sleep 20 ms": lambda: time.sleep(0.02), "sleep 50 ms": lambda: time.sleep(0.05),
        "calls 20 ms": lambda: calls_for(ours, 0.02), "calls 50 ms": lambda: calls_for(ours, 0.05),
        "no switch": lambda: None,
    }
    windows: dict[str, list[float]] = {k: [] for k in conditions}
    for call in (ours, other):
        calls_for(call, 0.2)
    for _ in range(args.rounds):
        for label, settle in conditions.items():
            calls_for(ours if label == "no switch" else other, args.other_ms / 1000)
            settle()
            ours()
            times = []
            end = time.perf_counter() + args.window_ms / 1000
            while time.perf_counter() < end:
                start = time.perf_counter()
                ours()
                times.append(time.perf_counter() - start)
            windows[label].append(float(np.median(times)) * 1e3)
    steady = np.asarray(windows["no switch"])
    print(f"{build.model} {args.artifact} after {args.other_ms:.0f} ms of ONNX Runtime ({threads} threads), "
          f"{args.rounds} rounds, {args.window_ms:.0f} ms windows")
    for label, values in windows.items():
        values = np.asarray(values)
        print(f"  {label:<24} window p50 {np.median(values):.3f} ms, ÷ no switch {np.median(values / steady):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
