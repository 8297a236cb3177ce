"""What NNCF's quantization options do to a built model: flips, accuracy, the int8 verdict and batch-1 latency.

    .venv/bin/python bench/nncf_options.py resnet50                   # every option, latest build
    .venv/bin/python bench/nncf_options.py resnet18 --options default,mixed --images 200

Each option is `nncf.quantize` of the build's fp32 IR (`openvino-fp32`) on `--calibration` training images (seed 0,
as the benchmark's NNCF peer), run with a bf16 rest where the CPU has it; judged against the fp32 IR on `--images`
test images in the judge's int8 class (`exporter.judge`), as `exporter verify` would. The first row is the fp32 IR
itself at the same rest precision: what the model's margins allow before any int8. The measurement behind
bench/results/README.md's seventeenth-, eighteenth- and twentieth-session tables.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS = ("default", "mixed", "no_fast_bc", "histogram", "mixed_histogram", "mixed_no_fast_bc", "head_fp32",
           "ends_fp32", "head_fp32_no_fast_bc", "head_fp32_histogram", "head_fp32_mixed", "overflow_off",
           "mixed_overflow_off", "head_fp32_mixed_overflow_off", "align", "mixed_align", "head_fp32_mixed_align",
           "sq15", "sq50", "head_fp32_mixed_sq50", "head_fp32_mixed_no_fast_bc", "head_fp32_mixed_mean_minmax",
           "head_fp32_mixed_mean_quantile")


def option_arguments(name: str, model=None) -> dict:
    """`nncf.quantize` keyword arguments of an option name in OPTIONS (`model`: the IR, for the head_/ends_ options,
    which leave its last / first and last Convolution or MatMul unquantized)."""
    import nncf
    from nncf.quantization.advanced_parameters import OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    mixed = {"preset": nncf.QuantizationPreset.MIXED} if "mixed" in name else {}
    slow = {"fast_bias_correction": False} if "no_fast_bc" in name else {}
    advanced = {}
    for ranges in ("histogram", "mean_minmax", "mean_quantile"):  # activation ranges other than min / max
        if ranges in name:
            advanced["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, ranges.upper())
    if "overflow_off" in name:  # NNCF's default gives the first layer 7-bit weights, for CPUs without VNNI
        advanced["overflow_fix"] = OverflowFix.DISABLE
    if "align" in name:  # NNCF's ChannelAlignment (off by default): equalises consecutive convolutions' channel ranges
        advanced["disable_channel_alignment"] = False
    sq = re.search(r"sq(\d+)", name)
    model_type = {}
    if sq:  # SmoothQuant on convolutions, alpha = digits / 100: NNCF runs it only for ModelType.TRANSFORMER
        from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(convolution=int(sq.group(1)) / 100, matmul=-1)
        model_type = {"model_type": nncf.ModelType.TRANSFORMER}
    advanced_arguments = {"advanced_parameters": nncf.AdvancedQuantizationParameters(**advanced)} if advanced else {}
    ignored = {}
    if name.startswith(("head_", "ends_")) and model is not None:
        from exporter.backends.openvino_int8 import end_layers

        names = end_layers(model, "last" if name.startswith("head_") else "both")
        ignored = {"ignored_scope": nncf.IgnoredScope(names=names, validate=False)}
    return {**mixed, **slow, **advanced_arguments, **ignored, **model_type}


def p50_ms(compiled, image: np.ndarray, calls: int = 150) -> float:
    """Median latency of `calls` synchronous batch-1 inferences, after 20 untimed ones."""
    request = compiled.create_infer_request()
    for _ in range(20):
        request.infer([image])
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        request.infer([image])
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built model (its latest build) or a build directory")
    parser.add_argument("--artifacts", type=Path, default=None, help="the artifacts directory (default: artifacts/)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from {', '.join(OPTIONS)}")
    parser.add_argument("--images", type=int, default=1000, help="test images judged (default 1000)")
    parser.add_argument("--calibration", type=int, default=300, help="training images (default 300, NNCF's)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.options.split(",")) - set(OPTIONS))
    if unknown:
        parser.error(f"unknown option(s) {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")

    import nncf

    from exporter.backends.openvino import cpu_supports_bf16, run_compiled, shared_core
    from exporter.data import sample_images
    from exporter.judge import compute_metrics, judge, row_cosines, tolerance_for
    from exporter.manifest import load_build

    build = load_build(args.model, args.artifacts)
    core = shared_core()
    fp32 = core.read_model(str(Path(build.dir) / build.artifact("openvino-fp32").path))
    test, labels, _ = sample_images(build.dataset, "test", build.input_shape, args.images, seed=0)
    calibration, _, _ = sample_images(build.dataset, "train", build.input_shape, args.calibration, seed=0)
    rest = "bf16" if cpu_supports_bf16() else "f32"

    def outputs(model, precision: str) -> tuple[np.ndarray, object]:
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        output = np.concatenate([np.asarray(run_compiled(compiled, test[i:i + 1])[0]) for i in range(len(test))])
        return output, compiled

    reference, _ = outputs(fp32, "f32")
    print(f"{build.model}: fp32 accuracy {(reference.argmax(1) == labels).mean():.3f} on {len(test)} test images; "
          f"rest {rest}")

    def row(name: str, model, seconds: float) -> None:
        output, compiled = outputs(model, rest)
        failures = judge(reference, output, compute_metrics(reference, output), tolerance_for("int8"))
        cosine = row_cosines(reference.astype(np.float64), output.astype(np.float64)).min()
        print(f"{name:<18} flips {int((output.argmax(1) != reference.argmax(1)).sum()):>3}  accuracy "
              f"{(output.argmax(1) == labels).mean():.3f}  worst cosine {cosine:.4f}  p50 "
              f"{p50_ms(compiled, test[:1]):.2f} ms  quantized in {seconds:.0f} s  "
              + ("PASS" if not failures else "FAIL: " + "; ".join(failures)), flush=True)

    row(f"fp32 IR in {rest}", fp32, 0.0)
    dataset = nncf.Dataset([calibration[i:i + 1].copy() for i in range(len(calibration))])
    for name in args.options.split(","):
        started = time.perf_counter()
        quantized = nncf.quantize(fp32, dataset, subset_size=len(calibration), **option_arguments(name, fp32))
        row(name, quantized, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
