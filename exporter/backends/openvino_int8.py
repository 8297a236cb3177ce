"""OpenVINO int8: `openvino-int8`, NNCF post-training quantization of the IR, judged on held-back images.

Used by `exporter.backends.openvino.export_openvino` when the build asks for int8; see `quantize_int8`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    INT8_MIN_AGREEMENT,
    INT8_MIN_COSINE,
    Artifact,
    BackendUnavailable,
    BuildContext,
    held_back_images_phrase,
    import_optional,
    int8_build_bars,
    int8_held_back_verdict,
    stdout_to_stderr,
)
from exporter.backends.openvino import (
    IR_FILE,
    IR_INT8_DIR,
    cpu_supports_bf16,
    label_ir,
    run_compiled,
    save_ir,
    shared_core,
)
from exporter.backends.openvino_strides import propagate_strides
from exporter.errors import one_line
from exporter.judge import allowed_error, row_cosines
from exporter.machine import int8_dot_product_saturates

# NNCF accuracy control's bounds. It ranks every quantized layer group (one compile and inference on the ranking
# images each) and ranks the rest again after each step back: unbounded, on a trained resnet101 (~100 groups) it
# was still ranking after 18 minutes on 2 cores. Past the wall-clock budget the closest candidate before it is kept.
ACCURACY_CONTROL_MAX_REVERTED = 32
ACCURACY_CONTROL_RANKING_IMAGES = 64
ACCURACY_CONTROL_BUDGET_S = 600.0
# the operations whose weights int8 quantizes (and whose multiply-adds an fp32 layer keeps)
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul")
QDQ_METHOD = "ONNX Runtime's int8 QDQ file"


class _OutOfBudget(Exception):
    """Raised from NNCF's validation function to end accuracy control at ACCURACY_CONTROL_BUDGET_S."""


def held_back_score(compiled: Any, items: Any, pool: int | None = None) -> float:
    """NNCF's validation metric for accuracy control: 1 for fp32, and at least INT8_MIN_COSINE exactly when the
    int8 class's build-time bars (`int8_build_bars`) all hold: min(the worst cosine with the fp32 logits, the
    top-1 agreement and the worst |error| / (atol + rtol·|fp32|), each mapped so that its bar lands on
    INT8_MIN_COSINE). Without the last term a model whose large logits miss the absolute bar scored as fp32
    (googlenet) and nothing was reverted. NNCF passes an iterable without a length. Flips count against `pool`
    when the images are the hardest of that many (`int8_held_back_verdict`)."""
    bars = int8_build_bars()
    worst, worst_excess, flips, count = 1.0, 0.0, 0, 0
    for x, expected in items:
        got = np.asarray(run_compiled(compiled, x)[0], dtype=np.float64).ravel()
        expected = np.asarray(expected, np.float64).ravel()
        worst = min(worst, float(row_cosines(expected[None], got[None])[0]))
        excess = np.abs(got - expected) / allowed_error(expected, bars)
        worst_excess = max(worst_excess, float(excess.max(initial=0.0)))
        flips += int(got.argmax() != expected.argmax())
        count += 1
    agreement = 1.0 - flips / max(count, pool or 0, 1)
    return min(worst, 1.0 - (1.0 - agreement) * (1.0 - INT8_MIN_COSINE) / (1.0 - INT8_MIN_AGREEMENT),
               1.0 - worst_excess * (1.0 - INT8_MIN_COSINE))


def _fp32_layers(model: Any) -> list[str]:
    """Convolutions / MatMuls of a quantized model whose weights are not quantized (they compute in fp32)."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHTED_OPS:
            continue
        weight = op.input_value(1).get_node()
        while weight.get_type_name() in ("Convert", "Reshape", "Unsqueeze", "Subtract"):
            weight = weight.input_value(0).get_node()
        if weight.get_type_name() not in ("FakeQuantize", "Multiply"):  # Multiply: a dequantization scale
            found.append(op.get_friendly_name())
    return found


def end_layers(model: Any, which: str = "both") -> list[str]:
    """The friendly names of a model's first and/or last Convolution / MatMul ("first", "last", "both"): the stem that
    sees raw pixels and the classifier whose output is the logits, the layers int8 toolkits most often leave in higher
    precision — together a few % of a CNN's multiply-adds, the head alone ~0 with 10 classes."""
    weighted = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in WEIGHTED_OPS]
    if not weighted:
        return []
    chosen = {"first": weighted[:1], "last": weighted[-1:], "both": list(dict.fromkeys([weighted[0], weighted[-1]]))}
    return chosen[which]


def _multiply_adds(op: Any) -> float:
    """Multiply-adds per image of a Convolution / GroupConvolution / MatMul (a dynamic dimension counts as 1)."""
    def dims(shape: Any) -> list[int]:
        return [d.get_length() if d.is_static else 1 for d in shape]

    outputs = float(np.prod(dims(op.get_output_partial_shape(0))[1:]))
    weight = dims(op.get_input_partial_shape(1))
    if op.get_type_name() == "MatMul":
        return outputs * dims(op.get_input_partial_shape(0))[-1]
    return outputs * float(np.prod(weight[2:] if op.get_type_name() == "GroupConvolution" else weight[1:]))


def _fp32_share_of_macs(model: Any, fp32_layers: list[str]) -> float:
    """The share of the model's convolution / MatMul multiply-adds done by `fp32_layers`."""
    layers = {op.get_friendly_name(): _multiply_adds(op) for op in model.get_ordered_ops()
              if op.get_type_name() in WEIGHTED_OPS}
    total = sum(layers.values())
    return sum(layers.get(name, 0.0) for name in fp32_layers) / total if total else 0.0


def ignored_scope_from_onnxruntime(ctx: BuildContext, model: Any) -> list[str]:
    """The IR operations of the layers the build's ORT int8 bisection left in fp32 (`onnx-int8`): the IR converted
    from that ONNX file names a Conv node's convolution `NAME` or `NAME/WithoutBiases`."""
    onnx_layers = set(ctx.diagnostics.get("onnxruntime", {}).get("int8", {}).get("fp32_layers") or [])
    if not onnx_layers:
        return []
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in WEIGHTED_OPS
            and op.get_friendly_name().split("/")[0] in onnx_layers]


def onnxruntime_qdq_file(ctx: BuildContext) -> Path | None:
    """The build's `onnx-int8` file (ORT's QDQ model with its fp32 layers), if this build made one."""
    artifact = ctx.artifact("onnx-int8")
    return ctx.out_dir / artifact.path if artifact is not None else None


def quantize_int8(ctx: BuildContext, model: Any, info: dict[str, Any]) -> Artifact:
    """`openvino-int8`: NNCF post-training quantization of the IR (or the build's ORT int8 file), calibrated on real
    training images.

    Each candidate is judged on the held-back quarter of the images in the int8 class at the build-time bars
    (INT8_MIN_AGREEMENT, INT8_MIN_COSINE), and the first that passes is kept: NNCF's default `nncf.quantize`;
    histogram activation ranges (kept as the base if closer); the same with the layers that the build's ORT int8
    bisection left in fp32 ignored (`ignored_scope_from_onnxruntime`); the build's ORT int8 file itself, read by
    OpenVINO (`onnxruntime_qdq_file`: its calibration and fp32 layers passed ORT's bisection, and OpenVINO runs it
    faster than its own fp32 rest); then `nncf.quantize_with_accuracy_control` from the kept ranges and ignored
    layers, which reverts the most sensitive layers to fp32 until its metric (`held_back_score`) holds — at
    most ACCURACY_CONTROL_MAX_REVERTED layers, ranked on ACCURACY_CONTROL_RANKING_IMAGES images, within
    ACCURACY_CONTROL_BUDGET_S seconds (past it, the candidate before it is kept), so a deep model that cannot
    reach the bars ends in bounded time and fails its verdict instead. `info` records which was kept,
    the verdicts and the layers left unquantized, for the manifest.

    What stays unquantized runs in bf16 where the CPU has it natively, else in f32. NNCF's accuracy control
    validates with f32 (NNCF 3.x compiles with INFERENCE_PRECISION_HINT=f32), so a candidate that fails with a
    bf16 rest is judged again with f32 and, if that passes, keeps f32 (resnet50: 0.984 held-back agreement with a
    bf16 rest after accuracy control had reached its target in f32).
    """
    import torch

    ov, nncf = import_optional("openvino"), import_optional("nncf")
    images = ctx.calibration
    if images is None or len(images) < 8:
        raise BackendUnavailable("openvino int8 needs at least 8 calibration images")
    held_back = max(len(images) // 4, 4)
    calibration, validation = images[:-held_back], images[-held_back:]
    if ctx.model is not None:
        with torch.no_grad():
            reference = ctx.model(torch.from_numpy(np.ascontiguousarray(validation))).numpy()
    else:  # an ONNX source: the fp32 IR is the reference
        compiled = shared_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        reference = np.concatenate([np.asarray(run_compiled(compiled, validation[i:i + 1])[0])
                                    for i in range(len(validation))])
    items = [(validation[i:i + 1], reference[i]) for i in range(len(validation))]

    rests = ["bf16", "f32"] if cpu_supports_bf16() else ["f32"]
    # Without VNNI the CPU plugin's u8×i8 dot products sum pairs in saturating int16 (OpenVINO's "saturation issue");
    # NNCF's overflow fix for every layer (not only the first, its default) quantizes weights to 7 bits.
    saturates = int8_dot_product_saturates()
    info["overflow_fix"] = "every layer (7-bit weights: this CPU has no VNNI)" if saturates else "NNCF default"

    def parameters(ranges: Any = None) -> Any:
        options = {"overflow_fix": nncf.OverflowFix.ENABLE} if saturates else {}
        if ranges is not None:
            options["activations_range_estimator_params"] = ranges
        return nncf.AdvancedQuantizationParameters(**options) if options else None

    def verdict(quantized: Any) -> tuple[list[str], float, float, str]:
        """(failures, agreement, worst cosine, precision of the rest): the first rest that passes, else the first."""
        judged = []
        for rest in rests:
            compiled = shared_core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": rest})
            output = np.concatenate([np.asarray(run_compiled(compiled, x)[0]) for x, _ in items])
            judged.append((*int8_held_back_verdict(reference, output, ctx.held_back_pool), rest))
            if not judged[-1][0]:
                return judged[-1]
        return judged[0]

    # NNCF infers with shared inputs (`run_compiled`): it gets copies, so that it can never write into the held-back
    # images or the build's calibration set
    calibration_data = nncf.Dataset([calibration[i:i + 1].copy() for i in range(len(calibration))])

    def scope(names: list[str]) -> Any:
        return nncf.IgnoredScope(names=names, validate=False) if names else None

    def quantize(ranges: Any = None, ignored: list[str] | None = None, preset: Any = None) -> Any:
        with stdout_to_stderr():
            return nncf.quantize(model, calibration_data, subset_size=len(calibration), preset=preset,
                                 advanced_parameters=parameters(ranges), ignored_scope=scope(ignored or []))

    quantized, ranges, ignored, preset = quantize(), None, [], None
    start_note = ""  # what accuracy control starts from besides the default, for the manifest
    failures, agreement, cosine, rest = verdict(quantized)
    info.update(method="nncf.quantize (default: MinMax, symmetric int8 weights per channel)",
                calibration_images=len(calibration), held_back_images=len(validation),
                held_back_pool=ctx.held_back_pool or len(validation), default_agreement=agreement,
                default_min_cosine=cosine, default_failures=failures, agreement=agreement, min_cosine=cosine,
                failures=failures, methods_measured={"default": {"agreement": agreement, "min_cosine": cosine}})

    def keep(candidate: Any, judged: tuple[list[str], float, float, str], name: str, method: str) -> bool:
        """Records the candidate's verdict; keeps it if it passes or is closer than the one kept so far."""
        nonlocal quantized, failures, agreement, cosine, rest
        info["methods_measured"][name] = {"agreement": judged[1], "min_cosine": judged[2]}
        if judged[0] and judged[1:3] <= (agreement, cosine):
            return False
        quantized = candidate
        failures, agreement, cosine, rest = judged
        info.update(method=method, agreement=agreement, min_cosine=cosine, failures=failures)
        return True

    if failures and (head := end_layers(model, "last")):
        # Asymmetric activations (NNCF's MIXED preset, ORT's layout too) and the classifier left unquantized: trained
        # resnet50 on 1,000 test images, 2 flips, worst cosine 0.993 (the judge's class passes) at NNCF default's speed
        # (4.59 vs 4.50 ms), where the default's worst image reached 0.9895 (bench/nncf_options.py). On the held-back
        # images it missed the build's stricter cosine bar (0.990 < 0.995) and became accuracy control's start.
        mixed = nncf.QuantizationPreset.MIXED
        candidate = quantize(ignored=head, preset=mixed)
        if keep(candidate, verdict(candidate), "mixed_head_fp32",
                "nncf.quantize (MIXED preset: asymmetric int8 activations; the classifier unquantized)"):
            ignored, preset = head, mixed
            start_note = "; from the MIXED preset with the classifier unquantized"
    if failures:
        # Histogram activation ranges clip the outliers NNCF's default min/max keeps, as Percentile does for ORT:
        # trained googlenet, 1,000 test images, worst cosine with fp32 0.925 → 0.998 (bench/results/README.md).
        # Tried only when the default fails; what follows starts from the closer of the two.
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        histogram = RangeEstimatorParametersSet.HISTOGRAM
        try:
            candidate = quantize(histogram, ignored, preset)
        except ValueError as exc:  # activations within a few float steps of one value have no histogram (as in ORT)
            info["methods_measured"]["histogram"] = {"error": one_line(exc)}
        else:
            if keep(candidate, verdict(candidate), "histogram",
                    "nncf.quantize (histogram activation ranges, symmetric int8 weights per channel"
                    + ("; MIXED preset, the classifier unquantized)" if preset is not None else ")")):
                ranges = histogram
    ranges_note = "; histogram activation ranges" if ranges is not None else ""
    if failures and (seed := ignored_scope_from_onnxruntime(ctx, model)):
        seed = list(dict.fromkeys([*seed, *ignored]))
        candidate = quantize(ranges, seed, preset)
        if keep(candidate, verdict(candidate), "onnxruntime_fp32_layers",
                f"nncf.quantize ({len(seed)} layers ignored: those ORT's int8 bisection left in fp32{ranges_note})"):
            ignored = seed
            start_note = f"; from {len(seed)} layers ignored as in ORT's int8" + (
                " and the MIXED preset" if preset is not None else "")
    if failures and (qdq := onnxruntime_qdq_file(ctx)) is not None and qdq.is_file():
        # resnet50 (trained, 1,000 test images): NNCF's candidates passed only with accuracy control and an f32 rest
        # (16.0 ms at batch 1); ORT's QDQ file with a bf16 rest passes at 7.1 ms (bench/results/README.md).
        candidate = shared_core().read_model(str(qdq))
        label_ir(ctx, candidate)
        keep(candidate, verdict(candidate), "onnxruntime_qdq",
             f"{QDQ_METHOD} ({qdq.name}: uint8 activations, int8 weights per channel, the layers its bisection left "
             "in fp32), read by OpenVINO")
    if failures:
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=ACCURACY_CONTROL_MAX_REVERTED,
                                                      ranking_subset_size=ACCURACY_CONTROL_RANKING_IMAGES)
        deadline = time.monotonic() + ACCURACY_CONTROL_BUDGET_S

        def score_within_budget(compiled: Any, items: Any) -> float:
            if time.monotonic() > deadline:
                raise _OutOfBudget
            return held_back_score(compiled, items, ctx.held_back_pool)

        started = time.monotonic()
        try:
            with stdout_to_stderr():
                controlled = nncf.quantize_with_accuracy_control(
                    model, calibration_data, nncf.Dataset([(x.copy(), ref) for x, ref in items]),
                    validation_fn=score_within_budget,
                    max_drop=1 - INT8_MIN_COSINE, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration),
                    ignored_scope=scope(ignored), preset=preset, advanced_quantization_parameters=parameters(ranges),
                    advanced_accuracy_restorer_parameters=restorer)
        except _OutOfBudget:
            info["accuracy_control"] = (f"stopped at its {ACCURACY_CONTROL_BUDGET_S:.0f} s budget; the closest "
                                        "candidate before it is kept")
        else:
            info["accuracy_control"] = f"finished in {time.monotonic() - started:.0f} s"
            keep(controlled, verdict(controlled), "accuracy_control",
                 "nncf.quantize_with_accuracy_control (metric: worst cosine with fp32, top-1 agreement and absolute "
                 f"error on held-back images, max drop {1 - INT8_MIN_COSINE:g}, at most "
                 f"{ACCURACY_CONTROL_MAX_REVERTED} layers reverted{ranges_note}"
                 + start_note + ")")
    # FakeQuantize nodes keep OpenVINO from moving strided 1×1 convolutions' stride up (it does for fp32 / bf16):
    # trained resnet50, batch 1, 4.703 → 4.286 ms (bench/strides_probe.py). Exact, and judged again as saved.
    rewritten = quantized.clone()
    info["strides_propagated"] = propagate_strides(rewritten)
    if info["strides_propagated"]:
        judged = verdict(rewritten)
        if judged[0] and not failures:  # cannot happen for an exact rewrite; the judged model is what is saved
            info["strides_propagated"] = []
        else:
            quantized, (failures, agreement, cosine, rest) = rewritten, judged
            info.update(agreement=agreement, min_cosine=cosine, failures=failures)
    from_qdq = info["method"].startswith(QDQ_METHOD)
    info["unquantized_layers_run_in"] = rest
    info["fp32_layers"] = _fp32_layers(quantized)
    info["fp32_share_of_macs"] = _fp32_share_of_macs(quantized, info["fp32_layers"])
    info["fp32_layers_why"] = ("left in fp32 by ORT's int8 bisection (the fewest layers whose fp32 made its held-back "
                               "verdict pass)" if from_qdq else
                               "left unquantized by NNCF (its defaults skip some layers; the ignored scope holds the "
                               "layers ORT's int8 bisection left in fp32; accuracy control reverts the layers whose "
                               "quantization costs the most on the held-back images)")
    save_ir(ov, quantized, ctx.out_dir / IR_INT8_DIR, compress_to_fp16=False)
    return Artifact(name="openvino-int8", backend="openvino", path=f"{IR_INT8_DIR}/{IR_FILE}", precision="int8",
                    options={"inference_precision": rest},
                    notes=[f"{'' if from_qdq else 'NNCF '}int8 ({info['method']}), "
                           f"calibrated on {len(calibration)} training images; "
                           f"on {held_back_images_phrase(len(validation), ctx.held_back_pool)}: top-1 agreement "
                           "with fp32 "
                           f"{info['agreement']:.3f}, min cosine {info['min_cosine']:.4f}; layers left unquantized: "
                           f"{len(info['fp32_layers'])}; what is not quantized runs in {rest}"
                           + ("; weights in 7 bits (this CPU has no VNNI)" if saturates else "")
                           + (f"; {len(info['strides_propagated'])} convolutions compute only the positions their "
                              "strided readers use (an exact rewrite)" if info["strides_propagated"] else "")])
