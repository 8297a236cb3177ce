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
  executed in f32 on a CPU (precision class fp16: the weights carry fp16 rounding);
- with `ctx.int8`, "openvino-int8" (NNCF, `exporter.backends.openvino_int8`).

Runner options: `inference_precision` ("f32", "bf16", "f16"; default from the artifact's precision),
`performance_hint` ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"), `num_streams`, `inference_num_threads`,
`enable_cpu_pinning` (bool), `device_name` (OpenVINO device, default "CPU"), `static_shapes` (bool, default true:
an IR with a dynamic batch is also compiled for each batch shape it is called with, up to MAX_STATIC_SHAPES; the
peer baselines set it false, as a bare `compile_model` runs).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    Artifact,
    BackendUnavailable,
    BisectionUnsupported,
    BuildContext,
    Runner,
    RunnerError,
    best_gemm_gflops,
    import_optional,
    mostly_fp32_warning,
    register_backend,
    register_peer,
    register_stage,
    stdout_to_stderr,
)
from exporter.backends.onnx import module_outputs
from exporter.errors import UsageError, one_line

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
# Compiled for a static batch the CPU plugin skips per-call shape inference and plans its memory once: batch 1,
# resnet50's openvino-int8 5.105 → 4.966 ms, densenet's 0.630 → 0.424 (`bench/static_shapes_probe.py`;
# bench/results/README.md, "twenty-second session"). One compiled model per batch shape, for this many shapes;
# further shapes run the dynamic one.
MAX_STATIC_SHAPES = 4


def ov_type_to_precision(value: Any) -> str:
    """Map an OpenVINO element type (`<Type: 'bfloat16'>`, "f32", …) to "fp32" / "bf16" / "fp16"."""
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    text = text.replace("<type: '", "").replace("'>", "")
    names = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16", "float16": "fp16"}
    if text not in names:
        raise RunnerError(f"openvino: unknown inference precision {value!r}")
    return names[text]


def run_compiled(compiled: Any, inputs: Any) -> Any:
    """`compiled(inputs)` with the inputs copied into OpenVINO's memory, as every call of ours on a compiled model.

    `CompiledModel.__call__` shares the caller's array by default, and the CPU plugin keeps using it after the call:
    the next inference of *another* request of the same compiled model writes its own input into that array. After
    `compiled(images[i:i + 1])` over a test set, one `create_infer_request().infer(…)` overwrote the last test image
    (OpenVINO 2026.4), so that image alone came back as garbage — held-back and test images must not be shared."""
    return compiled(inputs, share_inputs=False)


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
        static = self.options.get("static_shapes", True)
        if not isinstance(static, bool):
            raise UsageError(f"openvino: static_shapes must be true or false, got {static!r}")
        self.model = shared_core().read_model(str(self.path))
        self.compiled = self._compile(self.model)
        self._executed = ov_type_to_precision(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        asked = OV_TO_PRECISION.get(self.inference_precision, self._executed)
        if self._executed != asked:
            raise RunnerError(f"openvino: asked for {self.inference_precision} inference but the CPU plugin would "
                              f"execute {self._executed} (this CPU has no native {asked}); refusing a silent change")
        self.request = self.compiled.create_infer_request()
        # batch shape → its own compiled model's request (None: that shape runs the dynamic one)
        self.static_requests: dict[tuple[int, ...], Any] = {}
        self.specializes = static and len(self.model.inputs) == 1 and self.model.inputs[0].get_partial_shape(
        ).is_dynamic

    def _compile(self, model: Any) -> Any:
        return shared_core().compile_model(model, self.options.get("device_name", "CPU"), self.compile_config())

    def request_for(self, shape: tuple[int, ...]) -> Any:
        """The infer request that runs a batch of `shape`: a model compiled for exactly that shape when the IR's is
        dynamic (the first MAX_STATIC_SHAPES shapes seen; compiled here, untimed), else the dynamic one."""
        if not self.specializes:
            return self.request
        if shape not in self.static_requests:
            request = None
            # only the dimensions the IR leaves open: an image of the wrong size is refused by the dynamic model
            fits = self.model.inputs[0].get_partial_shape().compatible(import_optional("openvino").PartialShape(
                list(shape)))
            if fits and len(self.static_requests) < MAX_STATIC_SHAPES:
                model = self.model.clone()
                with contextlib.suppress(Exception):  # a shape the IR cannot take statically: the dynamic one runs it
                    model.reshape(list(shape))
                    request = self._compile(model).create_infer_request()
            self.static_requests[shape] = request
        return self.static_requests[shape] or self.request

    def prepare_impl(self, batch: np.ndarray) -> Any:
        return self.request_for(tuple(batch.shape)), batch

    @property
    def executed_precision(self) -> str:
        """What the compiled model executes, read back from OpenVINO (not what was asked)."""
        executed = getattr(self, "_executed", None) or OV_TO_PRECISION.get(self.inference_precision)
        return "int8" if self.precision == "int8" else executed  # its quantized layers run int8, the rest above

    def run_impl(self, prepared: Any) -> Any:
        request, batch = prepared
        request.infer({0: batch})
        return request.get_output_tensor(0).data

    def finish_impl(self, raw: Any) -> np.ndarray:
        return np.array(raw, dtype=np.float32, copy=True)  # the request reuses its output buffer

    def deactivate_impl(self) -> None:
        self.request = self.compiled = self.model = None
        self.static_requests = {}

    @classmethod
    def gemm_peak_gflops(cls, precision: str, *, size: int, device: str, threads: int | None) -> float | None:
        """The faster of a one-MatMul and a one-convolution OpenVINO model on the CPU plugin at an explicit inference
        precision; int8: FakeQuantize'd uint8 activations and int8 weights (how NNCF's models quantize a layer),
        which the plugin runs as integer kernels — no peak unless its runtime model says so.

        The convolution (3×3, n/4 channels in and out, 14×14, batch 8: an implicit GEMM of 2·8·(n/4)²·9·196 FLOPs)
        is what a CNN runs: OpenVINO's brgemm convolutions reached fp32 584, bf16 1,140 and int8 2,065 GOP/s on the
        2-core EPYC where its MatMul and every other library's stayed at 540 / 982 / 1,826, and resnet50's
        openvino-bf16 ran at 107 % of that matmul peak."""
        if device != "cpu" or precision not in (*PRECISION_TO_OV, "int8") or cls.unavailable_reason("cpu"):
            return None
        import openvino as ov
        import openvino.opset13 as ops

        def fake_quantize(node: Any, low: float, high: float, levels: int) -> Any:
            low_, high_ = (ops.constant(np.array(v, np.float32)) for v in (low, high))
            return ops.fake_quantize(node, low_, high_, low_, high_, levels)

        rng = np.random.default_rng(0)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_TO_OV.get(precision, "f32"),
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        channels, side, batch = max(size // 4, 1), 14, 8
        probes = {"MatMul": ([size, size], [size, size], 2.0 * size**3),
                  "Convolution": ([batch, channels, side, side], [channels, channels, 3, 3],
                                  2.0 * batch * channels**2 * 9 * side**2)}
        best = None
        for kind, (shape, weight_shape, flops) in probes.items():
            parameter = ops.parameter(shape, ov.Type.f32)
            a, b = parameter, ops.constant(rng.random(weight_shape, dtype=np.float32) - 0.5)
            if precision == "int8":
                a, b = fake_quantize(a, 0.0, 1.0, 256), fake_quantize(b, -0.5, 0.5, 255)
            node = (ops.matmul(a, b, False, False) if kind == "MatMul"
                    else ops.convolution(a, b, [1, 1], [1, 1], [1, 1], [1, 1]))
            compiled = shared_core().compile_model(ov.Model([node], [parameter]), "CPU", config)
            if precision == "int8":
                info = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
                ran = {i["runtimePrecision"].astype(str) for i in info
                       if i["layerType"].astype(str) in ("FullyConnected", "MatMul", "Convolution")}
                if not ran & {"i8", "u8"}:
                    continue  # the plugin dequantized it: no int8 peak from it
            elif ov_type_to_precision(compiled.get_property("INFERENCE_PRECISION_HINT")) != precision:
                return None  # this CPU would run another precision: no peak for this one
            request, x = compiled.create_infer_request(), rng.random(shape, dtype=np.float32)
            rate = best_gemm_gflops(lambda: request.infer({0: x}), size, flops=flops)
            best = rate if best is None else max(best, rate)
        return best

    def bare_call_impl(self, prepared: Any) -> Any:
        """`InferRequest.infer` on the prepared input (with the request `prepare` chose for its shape)."""
        request, batch = prepared
        feeds = {0: batch}
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
            result = run_compiled(compiled, {0: batch})
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


def save_ir(ov: Any, model: Any, target_dir: Path, *, compress_to_fp16: bool) -> None:
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


def label_ir(ctx: BuildContext, model: Any) -> None:
    """Writes the build's metadata into the model's rt_info, so the IR alone says what it is (like ONNX's
    metadata_props)."""
    for key, value in ctx.metadata.items():
        model.set_rt_info(value if isinstance(value, str) else str(value), ["exporter", str(key)])
    model.set_rt_info(ctx.model_name, ["exporter", "model_name"])
    model.set_rt_info("NCHW", ["exporter", "input_layout"])


@register_stage("openvino", needs_torch=False)
def export_openvino(ctx: BuildContext) -> list[Artifact]:
    """Convert the model to OpenVINO IR (fp32 weights; with `ctx.fp16` also fp16-compressed weights)."""
    ov = import_optional("openvino")
    reason = OpenVinoRunner.unavailable_reason("cpu")
    if reason:
        raise BackendUnavailable(reason)
    model, source = _convert(ctx)
    label_ir(ctx, model)

    core = shared_core()
    save_ir(ov, model, ctx.out_dir / IR_DIR, compress_to_fp16=False)
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
        save_ir(ov, model, ctx.out_dir / IR_FP16_DIR, compress_to_fp16=True)
        artifacts.append(Artifact(name="openvino-fp16", backend="openvino", path=f"{IR_FP16_DIR}/{IR_FILE}",
                                  precision="fp16", options={"inference_precision": "f32"},
                                  notes=["weights compressed to fp16; decompressed and executed in f32 on the CPU"]))
    int8_info: dict[str, Any] = {}
    if ctx.int8:
        try:
            from exporter.backends.openvino_int8 import quantize_int8

            artifacts.append(quantize_int8(ctx, model, int8_info))
            if warning := mostly_fp32_warning("openvino-int8", int8_info):
                ctx.warnings.append(warning)
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


def _peer(name: str, path: str, precision: str, hint: str, note: str) -> Artifact:
    return Artifact(name=f"peer:{name}", backend="openvino", path=path, precision=precision,
                    options={"inference_precision": hint, "inference_num_threads": 0, "static_shapes": False},
                    notes=[f"{note}; the file's dynamic batch (not compiled per batch shape)"])


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
                                      nncf.Dataset([images[i:i + 1].copy() for i in range(len(images))]),
                                      subset_size=len(images))
        save_ir(ov, quantized, target, compress_to_fp16=False)
    return _peer("nncf-default-int8", f"{PEER_DIR}/nncf-default/{IR_FILE}", "int8", PLUGIN_DEFAULT,
                 "NNCF default nncf.quantize of the fp32 IR, OpenVINO CPU with no config")

