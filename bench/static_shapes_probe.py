"""What compiling an OpenVINO IR for the batch shape it is called with gains: the measurement behind the OpenVINO
runner's `static_shapes` (`exporter.backends.openvino.MAX_STATIC_SHAPES`).

    .venv/bin/python bench/static_shapes_probe.py resnet50                       # openvino-int8 and NNCF's default
    .venv/bin/python bench/static_shapes_probe.py densenet --artifacts openvino-int8,openvino-bf16 --batch-sizes 1,8

Each artifact (an artifact name of the build, or `peer:nncf-default-int8`: the IR `exporter bench --peers` made under
BUILD/peers/) runs through the runner `exporter bench` times (`Runner.run` on a prepared input, the bench's thread
count) twice: with `static_shapes` (compiled for the batch shape) and without (the IR's dynamic batch, as the peers
run). Each of `--rounds` rounds runs every runner for 50 ms untimed and then `--window-ms` of timed calls; printed per
batch size: each runner's median of the windows' p50, and per artifact the median of static ÷ dynamic within a round
(the VM's phases move both and cancel out of the ratio).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import NNCF_PEER, openvino_artifacts, openvino_probe_parser, windowed_p50s  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = openvino_probe_parser(__doc__, f"openvino-int8,{NNCF_PEER}")
    args = parser.parse_args(argv)

    from exporter.backends import Variant
    from exporter.machine import set_threads
    from exporter.manifest import load_build

    build = load_build(args.model)
    threads = set_threads(None)
    artifacts = openvino_artifacts(parser, build, args.artifacts, args.model)
    print(f"{build.model} ({build.dir}), {threads} threads, {args.rounds} rounds of {args.window_ms:.0f} ms")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        x = np.random.default_rng(0).random((batch, *build.input_shape), dtype=np.float32)
        calls = {}
        for name, artifact in artifacts.items():
            for static in (True, False):
                runner = Variant(artifact, options={"static_shapes": static}).runner(build.dir, threads=threads)
                prepared = runner.activate().prepare(x)
                calls[name, static] = lambda r=runner, p=prepared: r.run(p)
        windows = windowed_p50s(calls, args.rounds, args.window_ms)
        for name in artifacts:
            static, dynamic = (np.asarray(windows[name, s]) for s in (True, False))
            print(f"  batch {batch:<3} {name:<24} static {np.median(static):.3f} ms, dynamic {np.median(dynamic):.3f} "
                  f"ms, static ÷ dynamic {np.median(static / dynamic):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
