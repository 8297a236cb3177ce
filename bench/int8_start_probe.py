"""Which int8 starting point reaches the build's held-back bar: NNCF on the fp32 IR or on the PyTorch checkpoint.

    .venv/bin/python bench/int8_start_probe.py resnet50                                # every candidate
    .venv/bin/python bench/int8_start_probe.py resnet50 --candidates torch_mixed_head \\
        --torch-ignore layer1.1.conv2,layer3.3.conv1                                   # and these convs unquantized

The build's own split (`exporter.build_inputs.calibration_images`: 384 calibration images and the hardest 128 of a
1,024-image pool held back), the verdict `openvino-int8` is kept by (`int8_held_back_verdict`, bars 0.995) and the
judge's int8 class on `--images` test images, both against the PyTorch checkpoint's fp32 logits, rest bf16 where
the CPU has it. IR candidates are `bench/nncf_options.py`'s option names (`--ir-ignore` adds IR layer names to their
ignored scope); `torch*` candidates quantize the checkpoint with NNCF (`torch_mixed`: MIXED preset, `_head`: its
Linear unquantized; `--torch-ignore` names Conv2d modules) and convert it with `ov.convert_model`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import int8_split, int8_verdicts  # noqa: E402
from bench.nncf_options import OPTIONS, option_arguments  # noqa: E402

TORCH_CANDIDATES = ("torch", "torch_mixed", "torch_head", "torch_mixed_head")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built model (its latest build) with a checkpoint")
    parser.add_argument("--candidates", default="default,head_fp32_mixed," + ",".join(TORCH_CANDIDATES),
                        help=f"comma-separated, from {', '.join(OPTIONS + TORCH_CANDIDATES)}")
    parser.add_argument("--ir-ignore", default="", help="IR layer names left unquantized in IR candidates")
    parser.add_argument("--torch-ignore", default="", help="Conv2d module names left unquantized in torch candidates")
    parser.add_argument("--images", type=int, default=1000, help="test images judged (default 1000)")
    args = parser.parse_args(argv)
    candidates = args.candidates.split(",")
    unknown = sorted(set(candidates) - set(OPTIONS + TORCH_CANDIDATES))
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(unknown)}")

    import nncf
    import openvino as ov
    import torch

    from exporter.backends.openvino import cpu_supports_bf16, shared_core

    split = int8_split(args.model, args.images)
    build, model, calibration = split.build, split.model, split.calibration
    shape = tuple(build.input_shape)
    rest = "bf16" if cpu_supports_bf16() else "f32"
    fp32_ir = shared_core().read_model(str(Path(build.dir) / build.artifact("openvino-fp32").path))
    data = nncf.Dataset([calibration[i:i + 1].copy() for i in range(len(calibration))])
    ir_ignore = [n for n in args.ir_ignore.split(",") if n]
    torch_ignore = [n.replace(".", "/") + "/conv2d/0" for n in args.torch_ignore.split(",") if n]
    print(f"{args.model}: {len(calibration)} calibration images, {len(split.held_back)} held back (hardest of "
          f"{split.pool}), {len(split.test)} test images; rest {rest}", flush=True)

    def quantize(name: str):
        if name in TORCH_CANDIDATES:
            types = ["linear"] if name.endswith("_head") else []
            scope = nncf.IgnoredScope(types=types, names=torch_ignore, validate=False) if types or torch_ignore \
                else None
            preset = nncf.QuantizationPreset.MIXED if "mixed" in name else None
            quantized = nncf.quantize(model, nncf.Dataset([torch.from_numpy(x) for x in data.get_inference_data()]),
                                      subset_size=len(calibration), preset=preset, ignored_scope=scope)
            return ov.convert_model(quantized, example_input=torch.zeros(1, *shape))
        arguments = option_arguments(name, fp32_ir)
        if ir_ignore:
            names = list(getattr(arguments.get("ignored_scope"), "names", [])) + ir_ignore
            arguments["ignored_scope"] = nncf.IgnoredScope(names=names, validate=False)
        return nncf.quantize(fp32_ir, data, subset_size=len(calibration), **arguments)

    for name in candidates:
        started = time.perf_counter()
        quantized = quantize(name)
        seconds = time.perf_counter() - started
        print(f"{name:<22} {int8_verdicts(split, quantized, rest)[1]} | {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
