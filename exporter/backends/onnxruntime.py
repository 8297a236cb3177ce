"""ONNX Runtime: the runner for every ONNX artifact (CPU, CUDA and TensorRT execution providers) and the int8
QDQ model.

Runner options (from the manifest or the command line): `provider` ("cpu", "cuda", "tensorrt"; default from
the device), `intra_op_num_threads`, `inter_op_num_threads`, `graph_optimization_level` ("disable", "basic",
"extended", "all"), `execution_mode` ("sequential", "parallel"); for the TensorRT EP also `min_batch` /
`max_batch` (its optimization profile over the batch dimension) and `trt_cache_dir` (its engine and timing caches;
default: a folder per ONNX file's sha256 in the user cache dir, so a later session reuses the engines and a
re-exported model never loads a stale one). A requested execution provider that is not installed makes the runner
unavailable; one that fails to load is an error — never a silent CPU fallback.

`export_onnxruntime(ctx)` needs the "onnx-fp32" artifact of `export_onnx` and writes:
- with `ctx.int8`: `model.int8.onnx`, a QDQ model (`quantize_static`) in the layout ONNX Runtime's x86 kernels
  are fast at — asymmetric uint8 activations, per-channel symmetric int8 weights — calibrated on `ctx.calibration`,
  real training images, with the layers that cost agreement left in fp32 (`exporter/backends/onnxruntime_int8.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    Artifact,
    BackendUnavailable,
    BuildContext,
    Runner,
    best_gemm_gflops,
    import_optional,
    mostly_fp32_warning,
    register_backend,
    register_peer,
    register_stage,
)
from exporter.backends.onnx import module_outputs
from exporter.backends.onnxruntime_int8 import INT8_FILE, check_calibration, quantize_int8
from exporter.errors import UsageError
from exporter.fileio import sha256_file, user_cache_dir

TRT_OPT_BATCH_LIMIT = 16  # the batch the TensorRT EP tunes for (as the tensorrt backend's engines)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


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
    library = "onnxruntime"
    thread_option = "intra_op_num_threads"

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
                    "trt_int8_enable": "1" if self.precision == "int8" else "0", **self._tensorrt_caches(),
                    **self._tensorrt_profile()}
        return {}

    def _tensorrt_caches(self) -> dict[str, str]:
        """Engine and timing caches of the TensorRT EP: without them every session rebuilds every engine.

        ORT keys cached engines by graph structure, not weights, so the default folder is per ONNX file content.
        """
        folder = self.options.get("trt_cache_dir") or user_cache_dir("ort-tensorrt", sha256_file(self.path)[:16])
        return {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(folder),
                "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(folder)}

    def _tensorrt_profile(self) -> dict[str, str]:
        """`trt_profile_min/opt/max_shapes` over the batch dimension from the `min_batch` / `max_batch` options, so
        one engine serves every batch in range (without them the EP rebuilds it for each new batch size)."""
        if self.options.get("max_batch") is None:
            return {}
        import onnx

        graph_input = onnx.load(str(self.path), load_external_data=False).graph.input[0]
        dims = graph_input.type.tensor_type.shape.dim
        if dims[0].HasField("dim_value") or not all(d.HasField("dim_value") for d in dims[1:]):
            return {}  # a static batch needs no profile; unknown image dimensions cannot be given one
        low, high = int(self.options.get("min_batch") or 1), int(self.options["max_batch"])
        batches = {"min": low, "opt": max(low, min(high, TRT_OPT_BATCH_LIMIT)), "max": high}
        image = "x".join(str(d.dim_value) for d in dims[1:])
        return {f"trt_profile_{key}_shapes": f"{graph_input.name}:{n}x{image}" for key, n in batches.items()}

    def activate_impl(self) -> None:
        ort = import_optional("onnxruntime")
        name = PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if name not in available:
            raise BackendUnavailable(f"onnxruntime {ort.__version__} has no {name} (available: {', '.join(available)})")
        provider_options = self._provider_options()
        if "trt_engine_cache_path" in provider_options:
            Path(provider_options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        providers = [(name, provider_options)]
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

    @classmethod
    def gemm_peak_gflops(cls, precision: str, *, size: int, device: str, threads: int | None) -> float | None:
        """A one-MatMul ONNX model in an ONNX Runtime CPU session: fp32 (its CPU MatMul has no bf16), or int8 as
        `model.int8.onnx` lays a layer out — uint8 activations and int8 weights in QDQ form around the MatMul, which
        the session fuses into one QLinearMatMul."""
        if device != "cpu" or precision not in ("fp32", "int8") or cls.unavailable_reason("cpu"):
            return None
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        ort = import_optional("onnxruntime")
        rng = np.random.default_rng(0)
        if precision == "fp32":
            initializers = [numpy_helper.from_array(rng.random((size, size), dtype=np.float32), "b")]
            nodes = [helper.make_node("MatMul", ["a", "b"], ["c"])]
        else:
            scales = {"a": (1 / 255, np.uint8(0)), "b": (1 / 254, np.int8(0)), "c": (size / 4, np.uint8(128))}
            initializers = [numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "b_q")]
            for name, (scale, zero) in scales.items():
                initializers += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
                                 numpy_helper.from_array(np.array(zero), f"{name}_zero")]
            nodes = [helper.make_node("QuantizeLinear", ["a", "a_scale", "a_zero"], ["a_q"]),
                     helper.make_node("DequantizeLinear", ["a_q", "a_scale", "a_zero"], ["a_dq"]),
                     helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b_dq"]),
                     helper.make_node("MatMul", ["a_dq", "b_dq"], ["c_f"]),
                     helper.make_node("QuantizeLinear", ["c_f", "c_scale", "c_zero"], ["c_q"]),
                     helper.make_node("DequantizeLinear", ["c_q", "c_scale", "c_zero"], ["c"])]
        graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        session = ort.InferenceSession(onnx.shape_inference.infer_shapes(model).SerializeToString(),
                                       session_options(ort, {"intra_op_num_threads": threads or 0}),
                                       providers=["CPUExecutionProvider"])
        x = rng.random((size, size), dtype=np.float32)
        return best_gemm_gflops(lambda: session.run(None, {"a": x}), size)

    def bare_call_impl(self, prepared: Any) -> Any:
        """`InferenceSession.run` (CPU) or `run_with_iobinding` (CUDA, inputs and outputs already bound)."""
        session = self.session
        if self.device == "cuda":
            binding = self._binding
            return lambda: session.run_with_iobinding(binding)
        feeds, outputs = {self._input_name: prepared}, [self._output_name]
        return lambda: session.run(outputs, feeds)

    @classmethod
    def tuning_candidates(cls, artifact: Artifact, *, device: str, threads: int, allow_bf16: bool
                          ) -> list[tuple[str, dict[str, Any]]]:
        """CPU: graph optimisation level, one intra-op thread, parallel execution mode."""
        if device != "cpu":
            return []
        candidates = [(f"opt={level}", {"graph_optimization_level": level}) for level in ("all", "extended", "basic")
                      if artifact.options.get("graph_optimization_level", "all") != level]
        if threads > 1:
            candidates.append(("intra=1", {"intra_op_num_threads": 1}))
        candidates.append(("parallel", {"execution_mode": "parallel"}))
        return candidates

    def layer_outputs(self, batch: np.ndarray, *, onnx_source: Path | None, scope_source: Path | None,
                      reference_model: Any) -> tuple[dict[str, list[np.ndarray]], str]:
        """Every node output of the ONNX file, run in an ONNX Runtime CPU session with this runner's options."""
        ort = import_optional("onnxruntime")

        def run_outputs(path: Path, names: set[str]) -> dict[str, np.ndarray]:
            session = ort.InferenceSession(str(path), session_options(ort, self.options),
                                           providers=["CPUExecutionProvider"])
            outputs = [o.name for o in session.get_outputs()]
            feed = batch.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else batch
            return dict(zip(outputs, session.run(outputs, {session.get_inputs()[0].name: feed})))

        source = onnx_source or self.path
        return (module_outputs(source, run_outputs, scope_source=scope_source),
                f"{source.name} with every node output exposed, run in onnxruntime")


# --- export --------------------------------------------------------------------------------------------------


def _onnx_input(ctx: BuildContext) -> Path:
    artifact = ctx.artifact("onnx-fp32")
    if artifact is None:
        raise BackendUnavailable("needs the fp32 ONNX model, which this build did not produce (onnx stage skipped "
                                 "or failed)")
    return ctx.out_dir / artifact.path


@register_stage("onnxruntime", needs_onnx=True, needs_torch=False)
def export_onnxruntime(ctx: BuildContext) -> list[Artifact]:
    """With `ctx.int8` the calibrated QDQ int8 model; on a GPU machine the CUDA / TensorRT provider artifacts.

    No ORT-"optimized" copy of the ONNX file is written: ONNX Runtime repeats those optimizations at session
    creation, and a saved 'extended' model carries machine-specific fused ops — measured 2.8× slower than the plain
    ONNX for resnet50 at batch 1 on this project's CPU (49.4 vs 17.6 ms).
    """
    ort = import_optional("onnxruntime")
    source = _onnx_input(ctx)
    if ctx.int8:  # fail on missing calibration data before spending time on anything else
        check_calibration(ctx.calibration, ctx.input_shape)
    artifacts: list[Artifact] = []
    info: dict[str, Any] = {"onnxruntime_version": ort.__version__, "providers": ort.get_available_providers()}
    if ctx.int8:
        int8_info: dict[str, Any] = {}
        artifacts.append(quantize_int8(source, ctx.out_dir / INT8_FILE, ctx.calibration, info=int8_info,
                                       held_back_pool=ctx.held_back_pool))
        info["int8"] = int8_info
        if warning := mostly_fp32_warning("onnx-int8", int8_info):
            ctx.warnings.append(warning)
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
        low, high = (ctx.static_batch, ctx.static_batch) if ctx.static_batch else (1, ctx.max_batch)
        artifacts.append(Artifact(name="onnxruntime-trt-tf32", backend="onnxruntime", path=source.name,
                                  precision="tf32", device="cuda",
                                  options={"provider": "tensorrt", "min_batch": low, "max_batch": high},
                                  notes=["TensorRT execution provider (engine built on first run for the batch "
                                         f"profile {low}..{high}, then cached); TensorRT may use TF32 for fp32 "
                                         "layers"]))
    ctx.diagnostics["onnxruntime"] = info
    return artifacts


@register_peer("ort-default")
def ort_default_peer(build_dir: Path, artifacts: dict[str, Artifact], calibration: Any) -> Artifact | None:
    """`InferenceSession("model.onnx")` with default SessionOptions: what an ONNX Runtime user starts from."""
    fp32 = artifacts.get("onnx-fp32")
    if fp32 is None:
        return None
    return Artifact(name="peer:ort-default", backend="onnxruntime", path=fp32.path, precision="fp32",
                    options={"intra_op_num_threads": 0}, notes=["ONNX Runtime CPU, default SessionOptions"])

