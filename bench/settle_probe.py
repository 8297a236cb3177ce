"""How long another runtime's threads slow a runtime's next calls: the measurement behind `exporter.timing.SETTLE_S`.

    .venv/bin/python bench/settle_probe.py densenet                    # openvino-int8 after onnx-fp32
    .venv/bin/python bench/settle_probe.py densenet --decay            # its calls by time since the switch
    .venv/bin/python bench/settle_probe.py resnet18 --artifact openvino-bf16 --rounds 100

Both artifacts run through the runners `exporter bench` times (`Runner.run` on a prepared batch-1 input, the bench's
thread count). Each round runs `--other-ms` of the `--other` artifact's calls, then one of the settle conditions
below, then one untimed call of `--artifact` (what the bench did before `settle_s`) and `--window-ms` of its timed
calls; a last condition follows a block of `--artifact` itself (no switch). Printed: each condition's median of the
windows' p50 and the median of its ratio to the no-switch window of the same round (the machine's phases, which
move both, cancel out of the ratio). `--decay`: instead, 150 ms of `--artifact` after each block of `--other`
(and after a block of itself), the p50 of its calls by when they started.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import calls_for, timed_calls  # noqa: E402

DECAY_BUCKETS_MS = (0, 2, 5, 10, 20, 50, 100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built model (its latest build) or a build directory")
    parser.add_argument("--artifact", default="openvino-int8", help="the artifact timed (default openvino-int8)")
    parser.add_argument("--other", default="onnx-fp32", help="the artifact of the other runtime (default onnx-fp32)")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--other-ms", type=float, default=20.0, help="the other runtime's block before each window")
    parser.add_argument("--window-ms", type=float, default=30.0, help="timed calls after the settle")
    parser.add_argument("--decay", action="store_true", help="time calls by how long after the switch they start")
    args = parser.parse_args(argv)

    from exporter.backends import Variant
    from exporter.machine import set_threads
    from exporter.manifest import load_build

    build = load_build(args.model)
    threads = set_threads(None)
    x = np.random.default_rng(0).random((1, *build.input_shape), dtype=np.float32)

    def call_of(name: str):
        runner = Variant(build.artifact(name)).runner(build.dir, threads=threads).activate()
        prepared = runner.prepare(x)
        return lambda: runner.run(prepared)

    ours, other = call_of(args.artifact), call_of(args.other)
    for call in (ours, other):
        calls_for(call, 0.2)
    print(f"{build.model} {args.artifact} after {args.other_ms:.0f} ms of {args.other} ({threads} threads), "
          f"{args.rounds} rounds")
    if args.decay:
        for label, before in ((f"after {args.other}", other), ("after itself", ours)):
            calls: list[tuple[float, float]] = []
            for _ in range(args.rounds):
                calls_for(before, args.other_ms / 1000)
                calls += timed_calls(ours, 0.15)
            starts, latencies = np.asarray(calls).T * 1e3
            bucket = np.searchsorted(DECAY_BUCKETS_MS, starts, side="right") - 1
            print(f"  {label:<24} " + "  ".join(f"{edge}+ ms {np.median(latencies[bucket == i]):.3f}"
                                               for i, edge in enumerate(DECAY_BUCKETS_MS) if (bucket == i).any()))
        return 0
    conditions = {
        "none (one untimed call)": lambda: None,
        "sleep 20 ms": lambda: time.sleep(0.02), "sleep 50 ms": lambda: time.sleep(0.05),
        "calls 20 ms": lambda: calls_for(ours, 0.02), "calls 50 ms": lambda: calls_for(ours, 0.05),
        "no switch": lambda: None,
    }
    windows: dict[str, list[float]] = {k: [] for k in conditions}
    for _ in range(args.rounds):
        for label, settle in conditions.items():
            calls_for(ours if label == "no switch" else other, args.other_ms / 1000)
            settle()
            ours()
            latencies = [latency for _, latency in timed_calls(ours, args.window_ms / 1000)]
            windows[label].append(float(np.median(latencies)) * 1e3)
    steady = np.asarray(windows["no switch"])
    for label, values in windows.items():
        values = np.asarray(values)
        print(f"  {label:<24} window p50 {np.median(values):.3f} ms, ÷ no switch {np.median(values / steady):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
