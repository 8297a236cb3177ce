"""OpenVINO: the IR artifact (`openvino.convert_model` + `save_model`) and its CPU runner.

OpenVINO's CPU plugin picks its inference precision by itself: on a CPU with AVX-512 bf16 or AMX its default
is bf16, and an "f16" request on a CPU without native fp16 silently becomes bf16 too. The runner therefore
always sets `INFERENCE_PRECISION_HINT` explicitly, reads back what the compiled model executes, and refuses to
run when that differs from what was asked.

Artifacts written by `export_openvino(ctx)`:
- "openvino-fp32": `openvino/model.xml` (fp32 weights), executed in f32;
- "openvino-bf16": the same IR executed in bf16, only when the CPU has bf16 (an explicit variant, never a
  silent default);
- with `ctx.fp16`, "openvino-fp16": `openvino-fp16/model.xml` with weights compressed to fp16, decompressed and
  executed in f32 on a CPU (precision class fp16: the weights carry fp16 rounding).

Runner options: `inference_precision` ("f32", "bf16", "f16"; default from the artifact's precision),
`performance_hint` ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"), `num_streams`, `inference_num_threads`,
`enable_cpu_pinning` (bool), `device_name` (OpenVINO device, default "CPU").
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    INT8_MIN_AGREEMENT,
    INT8_MIN_COSINE,
    Artifact,
    BackendUnavailable,
    BisectionUnsupported,
    BuildContext,
    Runner,
    RunnerError,
    best_gemm_gflops,
    import_optional,
    int8_build_bars,
    int8_held_back_verdict,
    register_backend,
    register_peer,
    register_stage,
    stdout_to_stderr,
)
from exporter.backends.onnx import module_outputs
from exporter.errors import UsageError, one_line
from exporter.judge import allowed_error, row_cosines
from exporter.machine import int8_dot_product_saturates

IR_DIR = "openvino"
IR_FP16_DIR = "openvino-fp16"
IR_INT8_DIR = "openvino-int8"
IR_FILE = "model.xml"
PLUGIN_DEFAULT = "default"  # `inference_precision` that sets no hint (what a bare `compile_model` does)
PEER_DIR = "peers"  # the peer baseline's NNCF-default int8 IR, made by `exporter bench --peers`
# OpenVINO's inference-precision names ↔ our precision names.
OV_TO_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
PRECISION_TO_OV = {v: k for k, v in OV_TO_PRECISION.items()}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# NNCF accuracy control's bounds: it ranks every quantized layer group on the ranking images (one compile and
# inference each) and ranks again after each step back; unbounded, a trained resnet101 ran past 18 minutes.
ACCURACY_CONTROL_MAX_REVERTED = 32
ACCURACY_CONTROL_RANKING_IMAGES = 64


def ov_type_to_precision(value: Any) -> str:
    """Map an OpenVINO element type (`<Type: 'bfloat16'>`, "f32", …) to "fp32" / "bf16" / "fp16"."""
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    text = text.replace("<type: '", "").replace("'>", "")
    names = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16", "float16": "fp16"}
    if text not in names:
        raise RunnerError(f"openvino: unknown inference precision {value!r}")
    return names[text]


@functools.lru_cache(maxsize=1)
def shared_core() -> Any:
    """The process's one `ov.Core`, never released.

    When the last Core dies OpenVINO unloads its CPU plugin, which had installed a signal alternate stack on the
    main thread; Python's next SIGTERM handler then runs on freed memory and the process segfaults.
    """
    return import_optional("openvino").Core()


def cpu_supports_bf16(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 (AVX-512 bf16 or AMX) on this machine."""
    core = core or shared_core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@register_backend
class OpenVinoRunner(Runner):
    """Runs an OpenVINO IR (or an ONNX file) on OpenVINO's CPU plugin at an explicit inference precision."""

    backend = "openvino"
    description = "OpenVINO CPU plugin (explicit f32 / bf16 / f16 inference precision)"
    devices = ("cpu",)
    library = "openvino"
    thread_option = "inference_num_threads"

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return f"openvino is not installed ({exc})"
        if "CPU" not in shared_core().available_devices:
            return "OpenVINO reports no CPU device"
        return None

    @property
    def inference_precision(self) -> str:
        requested = self.options.get("inference_precision") or PRECISION_TO_OV.get(self.precision)
        if requested == PLUGIN_DEFAULT:  # OpenVINO's own choice: only the peer baseline asks for it
            return requested
        if requested not in OV_TO_PRECISION:
            raise UsageError(f"openvino: inference_precision must be one of {', '.join(OV_TO_PRECISION)} "
                             f"(precision {self.precision} has no OpenVINO equivalent), got {requested!r}")
        return requested

    def compile_config(self) -> dict[str, Any]:
        """The `compile_model` config: the precision hint always, the performance options when given."""
        config: dict[str, Any] = {}
        if self.inference_precision != PLUGIN_DEFAULT:
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
        hint = self.options.get("performance_hint")
        if hint is not None:
            if str(hint).upper() not in PERFORMANCE_HINTS:
                raise UsageError(f"openvino: performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}")
            config["PERFORMANCE_HINT"] = str(hint).upper()
        for option, key in (("num_streams", "NUM_STREAMS"), ("inference_num_threads", "INFERENCE_NUM_THREADS")):
            value = self.options.get(option)
            if value is not None:
                if not isinstance(value, int) or value < 0:
                    raise UsageError(f"openvino: {option} must be a non-negative integer, got {value!r}")
                config[key] = value
        if self.options.get("enable_cpu_pinning") is not None:
            config["ENABLE_CPU_PINNING"] = bool(self.options["enable_cpu_pinning"])
        return config

    def activate_impl(self) -> None:
        core = shared_core()
        model = core.read_model(str(self.path))
        self.compiled = core.compile_model(model, self.options.get("device_name", "CPU"), self.compile_config())
        self._executed = ov_type_to_precision(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        asked = OV_TO_PRECISION.get(self.inference_precision, self._executed)
        if self._executed != asked:
            raise RunnerError(f"openvino: asked for {self.inference_precision} inference but the CPU plugin would "
                              f"execute {self._executed} (this CPU has no native {asked}); refusing a silent change")
        self.request = self.compiled.create_infer_request()

    @property
    def executed_precision(self) -> str:
        """What the compiled model executes, read back from OpenVINO (not what was asked)."""
        executed = getattr(self, "_executed", None) or OV_TO_PRECISION.get(self.inference_precision)
        return "int8" if self.precision == "int8" else executed  # its quantized layers run int8, the rest above

    def run_impl(self, prepared: np.ndarray) -> Any:
        self.request.infer({0: prepared})
        return self.request.get_output_tensor(0).data

    def finish_impl(self, raw: Any) -> np.ndarray:
        return np.array(raw, dtype=np.float32, copy=True)  # the request reuses its output buffer

    def deactivate_impl(self) -> None:
        self.request = None
        self.compiled = None

    @classmethod
    def gemm_peak_gflops(cls, precision: str, *, size: int, device: str, threads: int | None) -> float | None:
        """A one-MatMul OpenVINO model on the CPU plugin at an explicit inference precision."""
        if device != "cpu" or precision not in PRECISION_TO_OV or cls.unavailable_reason("cpu"):
            return None
        import openvino as ov
        import openvino.opset13 as ops

        rng = np.random.default_rng(0)
        a = ops.parameter([size, size], ov.Type.f32)
        b = ops.constant(rng.random((size, size), dtype=np.float32))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_TO_OV[precision],
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = shared_core().compile_model(ov.Model([ops.matmul(a, b, False, False)], [a]), "CPU", config)
        if ov_type_to_precision(compiled.get_property("INFERENCE_PRECISION_HINT")) != precision:
            return None  # this CPU would run another precision: no peak for this one
        request, x = compiled.create_infer_request(), rng.random((size, size), dtype=np.float32)
        return best_gemm_gflops(lambda: request.infer({0: x}), size)

    def bare_call_impl(self, prepared: Any) -> Any:
        """`InferRequest.infer` on the prepared input."""
        request, feeds = self.request, {0: prepared}
        return lambda: request.infer(feeds)

    @classmethod
    def tuning_candidates(cls, artifact: Artifact, *, device: str, threads: int, allow_bf16: bool
                          ) -> list[tuple[str, dict[str, Any]]]:
        """CPU: performance hint, streams, CPU pinning, and bf16 inference when the user accepts it."""
        if device != "cpu":
            return []
        candidates: list[tuple[str, dict[str, Any]]] = [
            ("hint=LATENCY", {"performance_hint": "LATENCY"}),
            ("hint=THROUGHPUT", {"performance_hint": "THROUGHPUT"}),
            ("streams=1", {"num_streams": 1}),
            ("hint=LATENCY,pinning", {"performance_hint": "LATENCY", "enable_cpu_pinning": True}),
        ]
        if threads > 1:
            candidates.append(("hint=THROUGHPUT,streams=2", {"performance_hint": "THROUGHPUT", "num_streams": 2}))
        if allow_bf16 and artifact.options.get("inference_precision") != "bf16" and cpu_supports_bf16():
            candidates.append(("bf16", {"inference_precision": "bf16", "performance_hint": "LATENCY"}))
        return candidates

    def layer_outputs(self, batch: np.ndarray, *, onnx_source: Path | None, scope_source: Path | None,
                      reference_model: Any) -> tuple[dict[str, list[np.ndarray]], str]:
        """The IR itself with the ONNX tensors it kept made extra outputs (so compressed weights and the IR's own
        graph are compared); an IR that kept none runs the instrumented ONNX in OpenVINO instead."""
        if onnx_source is None:
            raise BisectionUnsupported("openvino: the build has no ONNX file whose tensors map to PyTorch modules")
        core, used_ir = shared_core(), False
        config = {k: v for k, v in self.compile_config().items() if k == "INFERENCE_PRECISION_HINT"}

        def outputs_of(compiled: Any) -> dict[str, np.ndarray]:
            result = compiled({0: batch})
            return {name: np.asarray(result[port]) for port in compiled.outputs for name in port.get_names()}

        def run_outputs(path: Path, names: set[str]) -> dict[str, np.ndarray]:
            nonlocal used_ir
            model = core.read_model(str(self.path))
            extra = [out for op in model.get_ordered_ops() for out in op.outputs() if out.get_names() & names]
            if extra:
                model.add_outputs(extra)
                used_ir = True
                return outputs_of(core.compile_model(model, "CPU", config))
            return outputs_of(core.compile_model(str(path), "CPU", config))

        found = module_outputs(onnx_source, run_outputs, scope_source=scope_source)
        precision = OV_TO_PRECISION[self.inference_precision]
        if used_ir:
            return found, (f"{self.path.name} with the tensors of {onnx_source.name} exposed, run in openvino at "
                           f"{precision}")
        return found, f"{onnx_source.name} with every node output exposed, run in openvino at {precision}"


# --- export --------------------------------------------------------------------------------------------------


def _convert(ctx: BuildContext) -> Any:
    """An `openvino.Model` from the build's ONNX file when there is one, else from the ExportedProgram."""
    ov = import_optional("openvino")
    onnx_artifact = ctx.artifact("onnx-fp32")
    if onnx_artifact is not None:
        return ov.convert_model(str(ctx.out_dir / onnx_artifact.path)), "onnx"
    if ctx.exported_program is not None:
        model = ov.convert_model(ctx.exported_program)
    else:
        import torch

        example = torch.zeros((ctx.static_batch or 2, *ctx.input_shape))
        model = ov.convert_model(ctx.model, example_input=example)
    batch = ctx.static_batch or -1
    model.reshape([batch, *ctx.input_shape])
    model.inputs[0].get_tensor().set_names({"input"})
    model.outputs[0].get_tensor().set_names({"logits"})
    return model, "torch"


def _save_ir(ov: Any, model: Any, target_dir: Path, *, compress_to_fp16: bool) -> None:
    """Save `model` as `target_dir/model.xml` + `.bin`, written in a temporary folder and renamed into place."""
    tmp = target_dir.with_name(f".{target_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ov.save_model(model, str(tmp / IR_FILE), compress_to_fp16=compress_to_fp16)
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(tmp, target_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@register_stage("openvino", needs_torch=False)
def export_openvino(ctx: BuildContext) -> list[Artifact]:
    """Convert the model to OpenVINO IR (fp32 weights; with `ctx.fp16` also fp16-compressed weights)."""
    ov = import_optional("openvino")
    reason = OpenVinoRunner.unavailable_reason("cpu")
    if reason:
        raise BackendUnavailable(reason)
    model, source = _convert(ctx)
    for key, value in ctx.metadata.items():  # so the IR alone says what it is, like the ONNX metadata_props
        model.set_rt_info(value if isinstance(value, str) else str(value), ["exporter", str(key)])
    model.set_rt_info(ctx.model_name, ["exporter", "model_name"])
    model.set_rt_info("NCHW", ["exporter", "input_layout"])

    core = shared_core()
    _save_ir(ov, model, ctx.out_dir / IR_DIR, compress_to_fp16=False)
    ir = f"{IR_DIR}/{IR_FILE}"
    artifacts = [Artifact(name="openvino-fp32", backend="openvino", path=ir, precision="fp32",
                          options={"inference_precision": "f32"},
                          notes=[f"converted from {source}; INFERENCE_PRECISION_HINT=f32 set explicitly"])]
    bf16 = cpu_supports_bf16(core)
    if bf16:
        artifacts.append(Artifact(name="openvino-bf16", backend="openvino", path=ir, precision="bf16",
                                  options={"inference_precision": "bf16"},
                                  notes=["same IR, INFERENCE_PRECISION_HINT=bf16 (the CPU plugin's default "
                                         "on this CPU, made explicit)"]))
    if ctx.fp16:
        _save_ir(ov, model, ctx.out_dir / IR_FP16_DIR, compress_to_fp16=True)
        artifacts.append(Artifact(name="openvino-fp16", backend="openvino", path=f"{IR_FP16_DIR}/{IR_FILE}",
                                  precision="fp16", options={"inference_precision": "f32"},
                                  notes=["weights compressed to fp16; decompressed and executed in f32 on the CPU"]))
    int8_info: dict[str, Any] = {}
    if ctx.int8:
        try:
            artifacts.append(quantize_int8(ctx, model, int8_info))
        except BackendUnavailable as exc:  # NNCF missing: the other OpenVINO artifacts still count
            int8_info["skipped"] = str(exc)
            ctx.warnings.append(f"openvino-int8 not built: {exc}")
        except Exception as exc:  # noqa: BLE001  (NNCF failing on one model must not cost the fp32/bf16 IR)
            int8_info["error"] = one_line(exc)
            ctx.warnings.append(f"openvino-int8 not built: NNCF failed: {one_line(exc)}")
    ctx.diagnostics["openvino"] = {
        "int8": int8_info,
        "openvino_version": ov.__version__, "converted_from": source, "cpu_bf16": bf16,
        "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "cpu_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
    }
    return artifacts


def _held_back_score(compiled: Any, items: Any) -> float:
    """NNCF's validation metric for accuracy control: 1 for fp32, and at least INT8_MIN_COSINE exactly when the
    int8 class's build-time bars (`int8_build_bars`) all hold: min(the worst cosine with the fp32 logits, the
    top-1 agreement and the worst |error| / (atol + rtol·|fp32|), each mapped so that its bar lands on
    INT8_MIN_COSINE). Without the last term a model whose large logits miss the absolute bar scored as fp32
    (googlenet) and nothing was reverted. NNCF passes an iterable without a length."""
    bars = int8_build_bars()
    worst, worst_excess, flips, count = 1.0, 0.0, 0, 0
    for x, expected in items:
        got = np.asarray(compiled(x)[0], dtype=np.float64).ravel()
        expected = np.asarray(expected, np.float64).ravel()
        worst = min(worst, float(row_cosines(expected[None], got[None])[0]))
        excess = np.abs(got - expected) / allowed_error(expected, bars)
        worst_excess = max(worst_excess, float(excess.max(initial=0.0)))
        flips += int(got.argmax() != expected.argmax())
        count += 1
    agreement = 1.0 - flips / max(count, 1)
    return min(worst, 1.0 - (1.0 - agreement) * (1.0 - INT8_MIN_COSINE) / (1.0 - INT8_MIN_AGREEMENT),
               1.0 - worst_excess * (1.0 - INT8_MIN_COSINE))


def _fp32_layers(model: Any) -> list[str]:
    """Convolutions / MatMuls of a quantized model whose weights are not quantized (they compute in fp32)."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        weight = op.input_value(1).get_node()
        while weight.get_type_name() in ("Convert", "Reshape", "Unsqueeze", "Subtract"):
            weight = weight.input_value(0).get_node()
        if weight.get_type_name() not in ("FakeQuantize", "Multiply"):  # Multiply: a dequantization scale
            found.append(op.get_friendly_name())
    return found


def _ignored_scope_from_onnxruntime(ctx: BuildContext, model: Any) -> list[str]:
    """The IR operations of the layers the build's ORT int8 bisection left in fp32 (`onnx-int8`): the IR converted
    from that ONNX file names a Conv node's convolution `NAME` or `NAME/WithoutBiases`."""
    onnx_layers = set(ctx.diagnostics.get("onnxruntime", {}).get("int8", {}).get("fp32_layers") or [])
    if not onnx_layers:
        return []
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")
            and op.get_friendly_name().split("/")[0] in onnx_layers]


def quantize_int8(ctx: BuildContext, model: Any, info: dict[str, Any]) -> Artifact:
    """`openvino-int8`: NNCF post-training quantization of the IR, calibrated on real training images.

    Each candidate is judged on the held-back quarter of the images in the int8 class at the build-time bars
    (INT8_MIN_AGREEMENT, INT8_MIN_COSINE), and the first that passes is kept: NNCF's default `nncf.quantize`;
    histogram activation ranges (kept as the base if closer); the same with the layers that the build's ORT int8
    bisection left in fp32 ignored (`_ignored_scope_from_onnxruntime`); then `nncf.quantize_with_accuracy_control`
    from there, which reverts the most sensitive layers to fp32 until its metric (`_held_back_score`) holds — at
    most ACCURACY_CONTROL_MAX_REVERTED layers, ranked on ACCURACY_CONTROL_RANKING_IMAGES images, so a deep model
    that cannot reach the bars ends in bounded time and fails its verdict instead. `info` records which was kept,
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
        reference = np.concatenate([np.asarray(compiled(validation[i:i + 1])[0]) for i in range(len(validation))])
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
            output = np.concatenate([np.asarray(compiled(x)[0]) for x, _ in items])
            judged.append((*int8_held_back_verdict(reference, output), rest))
            if not judged[-1][0]:
                return judged[-1]
        return judged[0]

    calibration_data = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])

    def scope(names: list[str]) -> Any:
        return nncf.IgnoredScope(names=names, validate=False) if names else None

    def quantize(ranges: Any = None, ignored: list[str] = ()) -> Any:
        with stdout_to_stderr():
            return nncf.quantize(model, calibration_data, subset_size=len(calibration),
                                 advanced_parameters=parameters(ranges), ignored_scope=scope(list(ignored)))

    quantized, ranges, ignored = quantize(), None, []
    failures, agreement, cosine, rest = verdict(quantized)
    info.update(method="nncf.quantize (default: MinMax, symmetric int8 weights per channel)",
                calibration_images=len(calibration), held_back_images=len(validation), default_agreement=agreement,
                default_min_cosine=cosine, default_failures=failures, agreement=agreement, min_cosine=cosine,
                failures=failures)
    if failures:
        # Histogram activation ranges clip the outliers NNCF's default min/max keeps, as Percentile does for ORT:
        # trained googlenet, 1,000 test images, worst cosine with fp32 0.925 → 0.998 (bench/results/README.md).
        # Tried only when the default fails; what follows starts from the closer of the two.
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        histogram = RangeEstimatorParametersSet.HISTOGRAM
        candidate = quantize(histogram)
        judged = verdict(candidate)
        measured = {"default": (agreement, cosine), "histogram": judged[1:3]}
        info["methods_measured"] = {m: {"agreement": a, "min_cosine": c} for m, (a, c) in measured.items()}
        if measured["histogram"] > measured["default"]:
            quantized, ranges = candidate, histogram
            failures, agreement, cosine, rest = judged
            info.update(method="nncf.quantize (histogram activation ranges, symmetric int8 weights per channel)",
                        agreement=agreement, min_cosine=cosine, failures=failures)
    ranges_note = "; histogram activation ranges" if ranges is not None else ""
    if failures and (seed := _ignored_scope_from_onnxruntime(ctx, model)):
        candidate = quantize(ranges, seed)
        judged = verdict(candidate)
        info["methods_measured"]["onnxruntime_fp32_layers"] = {"agreement": judged[1], "min_cosine": judged[2]}
        if judged[1:3] > (agreement, cosine):
            quantized, ignored = candidate, seed
            failures, agreement, cosine, rest = judged
            info.update(method=f"nncf.quantize ({len(seed)} layers ignored: those ORT's int8 bisection left in "
                               f"fp32{ranges_note})", agreement=agreement, min_cosine=cosine, failures=failures)
    if failures:
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=ACCURACY_CONTROL_MAX_REVERTED,
                                                      ranking_subset_size=ACCURACY_CONTROL_RANKING_IMAGES)
        with stdout_to_stderr():
            quantized = nncf.quantize_with_accuracy_control(
                model, calibration_data, nncf.Dataset(items), validation_fn=_held_back_score,
                max_drop=1 - INT8_MIN_COSINE, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration),
                ignored_scope=scope(ignored), advanced_quantization_parameters=parameters(ranges),
                advanced_accuracy_restorer_parameters=restorer)
        failures, agreement, cosine, rest = verdict(quantized)
        info.update(method="nncf.quantize_with_accuracy_control (metric: worst cosine with fp32, top-1 "
                           "agreement and absolute error on held-back images, max drop "
                           f"{1 - INT8_MIN_COSINE:g}, at most {ACCURACY_CONTROL_MAX_REVERTED} layers reverted"
                           + ranges_note + (f"; from {len(ignored)} layers ignored as in ORT's int8" if ignored
                                            else "") + ")",
                    agreement=agreement, min_cosine=cosine, failures=failures)
    info["unquantized_layers_run_in"] = rest
    info["fp32_layers"] = _fp32_layers(quantized)
    info["fp32_layers_why"] = ("left unquantized by NNCF (its defaults skip some layers; the ignored scope holds the "
                               "layers ORT's int8 bisection left in fp32; accuracy control reverts the layers whose "
                               "quantization costs the most on the held-back images)")
    _save_ir(ov, quantized, ctx.out_dir / IR_INT8_DIR, compress_to_fp16=False)
    return Artifact(name="openvino-int8", backend="openvino", path=f"{IR_INT8_DIR}/{IR_FILE}", precision="int8",
                    options={"inference_precision": rest},
                    notes=[f"NNCF int8 ({info['method']}), calibrated on {len(calibration)} training images; "
                           f"on {len(validation)} held-back images: top-1 agreement with fp32 "
                           f"{info['agreement']:.3f}, min cosine {info['min_cosine']:.4f}; layers left unquantized: "
                           f"{len(info['fp32_layers'])}; what is not quantized runs in {rest}"
                           + ("; weights in 7 bits (this CPU has no VNNI)" if saturates else "")])


def _peer(name: str, path: str, precision: str, hint: str, note: str) -> Artifact:
    return Artifact(name=f"peer:{name}", backend="openvino", path=path, precision=precision,
                    options={"inference_precision": hint, "inference_num_threads": 0}, notes=[note])


@register_peer("openvino-f32")
def openvino_f32_peer(build_dir: Path, artifacts: dict[str, Artifact], calibration: Any) -> Artifact | None:
    """`compile_model(model.xml, "CPU", {INFERENCE_PRECISION_HINT: f32})`, OpenVINO's other defaults."""
    ir = artifacts.get("openvino-fp32")
    return ir and _peer("openvino-f32", ir.path, "fp32", "f32", "OpenVINO CPU, explicit f32, default threads")


@register_peer("openvino-default")
def openvino_default_peer(build_dir: Path, artifacts: dict[str, Artifact], calibration: Any) -> Artifact | None:
    """`compile_model(model.xml, "CPU")`: OpenVINO's own precision choice (bf16 on a CPU with native bf16)."""
    ir = artifacts.get("openvino-fp32")
    return ir and _peer("openvino-default", ir.path, "fp32", PLUGIN_DEFAULT,
                        "OpenVINO CPU, no config (it picks its inference precision)")


@register_peer("openvino-on-int8-onnx")
def openvino_int8_onnx_peer(build_dir: Path, artifacts: dict[str, Artifact], calibration: Any) -> Artifact | None:
    """OpenVINO reading the build's ORT int8 QDQ file directly, no config."""
    int8 = artifacts.get("onnx-int8")
    return int8 and _peer("openvino-on-int8-onnx", int8.path, "int8", PLUGIN_DEFAULT,
                          "OpenVINO CPU running model.int8.onnx, no config")


@register_peer("nncf-default-int8")
def nncf_default_peer(build_dir: Path, artifacts: dict[str, Artifact], calibration: Any) -> Artifact | None:
    """NNCF's default `nncf.quantize` of the fp32 IR on real training images, run with no config: the int8 an
    OpenVINO user makes by hand. Made once per build under `peers/nncf-default/`."""
    ir = artifacts.get("openvino-fp32")
    if ir is None:
        return None
    ov, nncf = import_optional("openvino"), import_optional("nncf")
    target = Path(build_dir) / PEER_DIR / "nncf-default"
    if not (target / IR_FILE).is_file():
        images = calibration()
        with stdout_to_stderr():
            quantized = nncf.quantize(shared_core().read_model(str(Path(build_dir) / ir.path)),
                                      nncf.Dataset([images[i:i + 1] for i in range(len(images))]),
                                      subset_size=len(images))
        _save_ir(ov, quantized, target, compress_to_fp16=False)
    return _peer("nncf-default-int8", f"{PEER_DIR}/nncf-default/{IR_FILE}", "int8", PLUGIN_DEFAULT,
                 "NNCF default nncf.quantize of the fp32 IR, OpenVINO CPU with no config")

