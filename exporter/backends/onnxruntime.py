"""ONNX Runtime: the runner for every ONNX artifact (CPU, CUDA and TensorRT execution providers), the
ORT-optimized CPU copy and the int8 QDQ model.

Runner options (from the manifest or the command line): `provider` ("cpu", "cuda", "tensorrt"; default from
the device), `intra_op_num_threads`, `inter_op_num_threads`, `graph_optimization_level` ("disable", "basic",
"extended", "all"), `execution_mode` ("sequential", "parallel"). A requested execution provider that is not
installed makes the runner unavailable; one that fails to load is an error — never a silent CPU fallback.

`export_onnxruntime(ctx)` needs the "onnx-fp32" artifact of `export_onnx` and writes:
- `model.ort-cpu.onnx`: the graph after ONNX Runtime's extended (hardware-independent) optimizations for the CPU
  execution provider (`SessionOptions.optimized_model_filepath`), so sessions start without re-optimizing;
- with `ctx.int8`: `model.int8.onnx`, a QDQ model (`quantize_static`, per-channel symmetric int8 weights,
  symmetric int8 activations as TensorRT requires) calibrated on `ctx.calibration`, real training images.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    Artifact, BackendUnavailable, BuildContext, Runner, import_optional, register_backend,
)
from exporter.backends.onnx import INPUT_NAME, read_metadata, set_metadata
from exporter.errors import ExporterError, UsageError
from exporter.fileio import atomic_path

OPTIMIZED_FILE = "model.ort-cpu.onnx"
INT8_FILE = "model.int8.onnx"
CALIBRATION_BATCH = 16

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class CalibrationDataError(UsageError):
    """int8 quantization was asked for without usable calibration images."""


def session_options(ort: Any, options: dict[str, Any]) -> Any:
    """`onnxruntime.SessionOptions` from runner options (threads, optimization level, execution mode)."""
    so = ort.SessionOptions()
    level = options.get("graph_optimization_level", "all")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise UsageError(f"onnxruntime: graph_optimization_level must be one of {', '.join(levels)}, got {level!r}")
    so.graph_optimization_level = levels[level]
    for key in ("intra_op_num_threads", "inter_op_num_threads"):
        if options.get(key) is not None:
            value = options[key]
            if not isinstance(value, int) or value < 0:
                raise UsageError(f"onnxruntime: {key} must be a non-negative integer (0 = default), got {value!r}")
            setattr(so, key, value)
    mode = options.get("execution_mode", "sequential")
    if mode not in ("sequential", "parallel"):
        raise UsageError(f"onnxruntime: execution_mode must be sequential or parallel, got {mode!r}")
    so.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if mode == "sequential"
                         else ort.ExecutionMode.ORT_PARALLEL)
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return so


@register_backend
class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file with ONNX Runtime on the CPU, CUDA or TensorRT execution provider."""

    backend = "onnxruntime"
    description = "ONNX Runtime (CPU EP; CUDA / TensorRT EPs with option provider=)"
    devices = ("cpu", "cuda")

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc})"
        if device == "cuda":
            if PROVIDERS["cuda"] not in ort.get_available_providers():
                return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu; "
                        f"available: {', '.join(ort.get_available_providers())})")
            import torch

            # onnxruntime-gpu lists its GPU providers whether or not a GPU is present.
            if not torch.cuda.is_available():
                return "no CUDA device visible (onnxruntime-gpu is installed but cannot run without one)"
        return None

    @property
    def provider(self) -> str:
        provider = self.options.get("provider") or ("cuda" if self.device == "cuda" else "cpu")
        if provider not in PROVIDERS:
            raise UsageError(f"onnxruntime: provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        if (provider == "cpu") != (self.device == "cpu"):
            raise UsageError(f"onnxruntime: provider {provider!r} does not run on device {self.device!r}")
        return provider

    def _provider_options(self) -> dict[str, str]:
        if self.provider == "cuda":
            # The CUDA EP uses TF32 for fp32 matmuls/convs by default: only when tf32 was asked for.
            return {"use_tf32": "1" if self.precision == "tf32" else "0"}
        if self.provider == "tensorrt":
            return {"trt_fp16_enable": "1" if self.precision == "fp16" else "0",
                    "trt_int8_enable": "1" if self.precision == "int8" else "0"}
        return {}

    def activate_impl(self) -> None:
        ort = import_optional("onnxruntime")
        name = PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if name not in available:
            raise BackendUnavailable(f"onnxruntime {ort.__version__} has no {name} (available: {', '.join(available)})")
        providers = [(name, self._provider_options())]
        if self.provider == "tensorrt" and PROVIDERS["cuda"] in available:
            providers.append((PROVIDERS["cuda"], {"use_tf32": "0"}))  # for the nodes TensorRT does not take
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options(ort, self.options),
                                            providers=providers)
        loaded = self.session.get_providers()
        if name not in loaded:  # ORT logs and falls back to the CPU when an EP fails to initialise
            raise BackendUnavailable(f"onnxruntime: {name} failed to load (session runs on {', '.join(loaded)}); "
                                     "refusing to fall back silently")
        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self._output_name = self.session.get_outputs()[0].name
        if self.device == "cuda":
            self._binding = self.session.io_binding()

    def prepare_impl(self, batch: np.ndarray) -> Any:
        batch = batch.astype(self._input_dtype, copy=False)
        if self.device == "cpu":
            return batch
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        self._binding.bind_ortvalue_input(self._input_name, value)
        self._binding.bind_output(self._output_name, "cuda")
        return value

    def run_impl(self, prepared: Any) -> Any:
        if self.device == "cpu":
            return self.session.run([self._output_name], {self._input_name: prepared})[0]
        self.session.run_with_iobinding(self._binding)
        return self._binding

    def finish_impl(self, raw: Any) -> np.ndarray:
        if self.device == "cpu":
            return raw
        return raw.copy_outputs_to_cpu()[0]

    def deactivate_impl(self) -> None:
        self.session = None
        self._binding = None


# --- export --------------------------------------------------------------------------------------------------


def _onnx_input(ctx: BuildContext) -> Path:
    artifact = ctx.artifact("onnx-fp32")
    if artifact is None:
        raise BackendUnavailable("needs the fp32 ONNX model, which this build did not produce (onnx stage skipped "
                                 "or failed)")
    return ctx.out_dir / artifact.path


def export_onnxruntime(ctx: BuildContext) -> list[Artifact]:
    """The ORT-optimized CPU copy of the ONNX model, and with `ctx.int8` the calibrated QDQ int8 model."""
    ort = import_optional("onnxruntime")
    source = _onnx_input(ctx)
    if ctx.int8:  # fail on missing calibration data before spending time on anything else
        _check_calibration(ctx.calibration, ctx.input_shape)
    artifacts = [optimize_for_cpu(source, ctx.out_dir / OPTIMIZED_FILE)]
    info: dict[str, Any] = {"onnxruntime_version": ort.__version__, "providers": ort.get_available_providers()}
    if ctx.int8:
        artifacts.append(quantize_int8(source, ctx.out_dir / INT8_FILE, ctx.calibration))
        info["int8_calibration_images"] = int(len(ctx.calibration))
    # The GPU execution providers run the plain ONNX file: listed only where they are installed.
    gpu_ready = OnnxRuntimeRunner.unavailable_reason("cuda") is None
    if gpu_ready:
        artifacts.append(Artifact(name="onnxruntime-cuda-fp32", backend="onnxruntime", path=source.name,
                                  precision="fp32", device="cuda", options={"provider": "cuda"},
                                  notes=["CUDA execution provider, TF32 disabled"]))
        fp16 = ctx.artifact("onnx-fp16")
        if fp16 is not None:  # on a GPU the fp16 file really computes in fp16 (the CPU EP mostly upcasts)
            artifacts.append(Artifact(name="onnxruntime-cuda-fp16", backend="onnxruntime", path=fp16.path,
                                      precision="fp16", device="cuda", options={"provider": "cuda"},
                                      notes=["CUDA execution provider, fp16 ONNX"]))
    if gpu_ready and PROVIDERS["tensorrt"] in ort.get_available_providers():
        # The TensorRT EP has no switch for TensorRT's default TF32 tactics, so its "fp32" is declared tf32.
        artifacts.append(Artifact(name="onnxruntime-trt-tf32", backend="onnxruntime", path=source.name,
                                  precision="tf32", device="cuda", options={"provider": "tensorrt"},
                                  notes=["TensorRT execution provider (engine built on first run); TensorRT may "
                                         "use TF32 for fp32 layers"]))
    ctx.diagnostics["onnxruntime"] = info
    return artifacts


def optimize_for_cpu(source: Path, target: Path, level: str = "extended") -> Artifact:
    """Save ONNX Runtime's optimized graph of `source` for the CPU execution provider to `target`.

    "extended" fusions are hardware-independent; "all" adds layout changes tuned to this CPU's vector width,
    which would make the file unportable.
    """
    ort = import_optional("onnxruntime")
    with atomic_path(target) as tmp:
        so = session_options(ort, {"graph_optimization_level": level})
        so.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(source), sess_options=so, providers=[PROVIDERS["cpu"]])
        _copy_metadata(source, tmp)
    return Artifact(name="onnxruntime-optimized", backend="onnxruntime", path=target.name, precision="fp32",
                    options={"graph_optimization_level": "disable"},
                    notes=[f"ONNX Runtime {ort.__version__} '{level}' graph optimizations, CPU execution provider "
                           "only (contains fused contrib ops)"])


def _copy_metadata(source: Path, target: Path) -> None:
    import onnx

    model = onnx.load(str(target))
    set_metadata(model, read_metadata(source))
    onnx.save(model, str(target))


def _check_calibration(images: np.ndarray | None, input_shape: tuple[int, int, int]) -> np.ndarray:
    if images is None or len(images) == 0:
        raise CalibrationDataError("--int8 needs calibration images (real training images) and none were given")
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
        raise CalibrationDataError(f"calibration images have shape {images.shape}, expected N×"
                                   f"{'×'.join(map(str, input_shape))}")
    if not np.isfinite(images).all():
        raise CalibrationDataError("calibration images contain NaN or Inf")
    return images.astype(np.float32, copy=False)


class ImageCalibrationReader:
    """`onnxruntime.quantization.CalibrationDataReader` over an N×C×H×W float32 array, in fixed batches."""

    def __init__(self, images: np.ndarray, input_name: str = INPUT_NAME, batch_size: int = CALIBRATION_BATCH,
                 progress: bool = True) -> None:
        self.images = images
        self.input_name = input_name
        self.batch_size = batch_size
        self.progress = progress
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        from tqdm import tqdm

        with tqdm(total=len(self.images), desc="int8 calibration", unit="img", disable=not self.progress) as bar:
            for start in range(0, len(self.images), self.batch_size):
                batch = np.ascontiguousarray(self.images[start:start + self.batch_size], dtype=np.float32)
                bar.update(len(batch))
                yield {self.input_name: batch}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._batches()


def quantize_int8(source: Path, target: Path, calibration: np.ndarray | None, *, progress: bool = True) -> Artifact:
    """Write a QDQ int8 copy of `source` calibrated (MinMax) on `calibration` images; return its artifact."""
    import tempfile

    import_optional("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    meta = read_metadata(source)
    graph_input = onnx.load(str(source), load_external_data=False).graph.input[0]
    expected = tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:])
    images = _check_calibration(calibration, expected)
    input_name = graph_input.name
    with tempfile.TemporaryDirectory(prefix="exporter-int8-") as work, atomic_path(target) as tmp, \
            _captured_root_log() as quantizer_log:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        try:
            quantize_static(
                str(prepared), str(tmp), ImageCalibrationReader(images, input_name, progress=progress),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                # TensorRT takes only symmetric (zero-point 0) int8 scales.
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise ExporterError(f"int8 quantization failed: {type(exc).__name__}: {text[0] if text else ''}") from exc
        model = onnx.load(str(tmp))
        meta.update(precision="int8", int8_calibration=f"MinMax on {len(images)} images, per-channel symmetric QDQ")
        set_metadata(model, meta)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    notes = [f"QDQ int8 (per-channel symmetric weights, symmetric activations), MinMax calibration on "
             f"{len(images)} training images; runs on ONNX Runtime CPU and TensorRT"]
    per_tensor = [m for m in quantizer_log if "out-of-range for weight" in m]
    if per_tensor:  # rank-1 weights (a BatchNorm not folded into a conv) cannot be per-channel
        notes.append(f"{len(per_tensor)} rank-1 weights (unfolded BatchNorm scales) quantized per-tensor")
    notes += [m for m in quantizer_log if m not in per_tensor][:5]
    return Artifact(name="onnx-int8", backend="onnxruntime", path=target.name, precision="int8", notes=notes)


@contextlib.contextmanager
def _captured_root_log() -> Iterator[list[str]]:
    """Collect the warnings ONNX Runtime's quantizer sends to the root logger (one per weight) instead of
    printing them; with a handler in place `logging.warning` does not install its own stderr handler either."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    root = logging.getLogger()
    handler = Collect(level=logging.WARNING)
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        yield messages
    finally:
        root.handlers = saved
