"""What `exporter.backends.openvino_strides.propagate_strides` (which `openvino-int8` is saved with) gains on an IR.

    .venv/bin/python bench/strides_probe.py resnet50                          # NNCF's default int8 (the peer)
    .venv/bin/python bench/strides_probe.py artifacts/resnet50/BUILD --artifacts openvino-int8,peer:nncf-default-int8

Each OpenVINO artifact (of the build, or `peer:nncf-default-int8`: the IR `exporter bench --peers` made under
BUILD/peers/) is rewritten into a temporary copy of its directory; an IR with nothing to rewrite (an `openvino-int8`
built since the rewrite) is reported and skipped. Both versions run through the runner `exporter bench` times (its
options; the bench's thread count), interleaved: each of `--rounds` rounds runs every runner for 50 ms untimed, then
`--window-ms` of timed calls. Printed: the convolutions rewritten, the largest |difference| between the two
versions' outputs on random images, and per batch size each version's median of the windows' p50 and the median of
rewritten ÷ as saved within a round (the VM's phases move both and cancel out of the ratio).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import NNCF_PEER, openvino_artifacts, openvino_probe_parser, windowed_p50s  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = openvino_probe_parser(__doc__, NNCF_PEER)
    args = parser.parse_args(argv)

    import openvino as ov

    from exporter.backends import Variant
    from exporter.backends.openvino import shared_core
    from exporter.backends.openvino_strides import propagate_strides
    from exporter.machine import set_threads
    from exporter.manifest import load_build

    build = load_build(args.model)
    threads = set_threads(None)
    artifacts = openvino_artifacts(parser, build, args.artifacts, args.model)
    print(f"{build.model} ({build.dir}), {threads} threads, {args.rounds} rounds of {args.window_ms:.0f} ms")
    with tempfile.TemporaryDirectory() as scratch:
        runners = {}
        for name, artifact in artifacts.items():
            model = shared_core().read_model(str(Path(build.dir) / artifact.path))
            rewritten = propagate_strides(model)
            if not rewritten:
                print(f"  {name}: nothing to rewrite")
                continue
            ov.save_model(model, str(Path(scratch) / artifact.path), compress_to_fp16=False)
            print(f"  {name}: {len(rewritten)} convolutions rewritten ({', '.join(rewritten)})")
            for version, directory in (("as saved", build.dir), ("rewritten", scratch)):
                runners[name, version] = Variant(artifact).runner(directory, threads=threads).activate()
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            x = np.random.default_rng(0).random((batch, *build.input_shape), dtype=np.float32)
            names = sorted({name for name, _ in runners})
            for name in names:
                difference = np.abs(runners[name, "rewritten"].infer(x) - runners[name, "as saved"].infer(x)).max()
                print(f"  batch {batch:<3} {name:<24} max |rewritten − as saved| {difference:.3g}")
            calls = {key: (lambda r=runner, p=runner.prepare(x): r.run(p)) for key, runner in runners.items()}
            windows = windowed_p50s(calls, args.rounds, args.window_ms)
            for name in names:
                saved, rewritten_ms = (np.asarray(windows[name, v]) for v in ("as saved", "rewritten"))
                print(f"  batch {batch:<3} {name:<24} as saved {np.median(saved):.3f} ms, rewritten "
                      f"{np.median(rewritten_ms):.3f} ms, rewritten ÷ as saved {np.median(rewritten_ms / saved):.3f}")
        for runner in runners.values():
            runner.deactivate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
