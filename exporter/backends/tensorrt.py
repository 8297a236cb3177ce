"""TensorRT: engines built from the build's ONNX files with the TensorRT Python API, and their runner.

Written against the TensorRT 11 API, which removed weak typing (no `BuilderFlag.FP16` / `INT8`, no calibrators),
and kept working on 10.8+: every network is created STRONGLY_TYPED (required for this on 10.x, implied on 11.x),
so each layer runs in the type its ONNX file gives it and no precision builder flag is ever set.

`export_tensorrt(ctx)` (needs `tensorrt` and a CUDA device) builds, into `tensorrt/`:
- `model.fp32.engine` from `model.onnx` (TF32 cleared: fp32 means fp32),
- with `ctx.fp16`, `model.fp16.engine` from the fp16 ONNX `model.fp16.onnx` (onnx stage),
- with `ctx.int8`, `model.int8.engine` from `model.int8-tensorrt.onnx`, a QDQ file written here for TensorRT alone
  (symmetric int8 activations and per-channel weights, float biases — TensorRT's parser rejects the int32 bias
  behind a DequantizeLinear that ONNX Runtime writes by default) and calibrated on `ctx.calibration`,
each with an optimization profile over the batch dimension (1 … opt … `ctx.max_batch`) and a sidecar
`model.<precision>.json`. A precision that fails is recorded (warning + diagnostics) and the others are kept. The
timing cache `tensorrt/timing.cache` starts from, and is saved back to, a per-GPU / TensorRT-version cache in the
user cache dir (`exporter.fileio.user_cache_dir`), so each build reuses the tactic timings of the ones before.

Engines are not portable across GPUs or TensorRT versions, so the sidecar records the ONNX file's sha256, the
TensorRT version, the GPU name and compute capability and the build flags; the runner compares them with the
machine it runs on and refuses to load on a mismatch, with the rebuild command in the message.

The runner uses torch CUDA tensors as I/O buffers (`set_tensor_address` + `execute_async_v3`) and a CUDA stream
of its own for copies, enqueue and sync (never the legacy default stream, which serialises with everything), so no
pycuda / cuda-python dependency is needed.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    Artifact,
    BackendUnavailable,
    BuildContext,
    Runner,
    RunnerError,
    register_backend,
    register_stage,
)
from exporter.errors import ExporterError
from exporter.fileio import atomic_path, sha256_file, user_cache_dir

ENGINE_DIR = "tensorrt"
TIMING_CACHE = "timing.cache"
TRT_QDQ_FILE = "model.int8-tensorrt.onnx"  # the int8 engine's source; not an artifact (ORT's CPU file is faster)
SIDECAR_FORMAT = 2  # 2: strongly typed engines (fp16 from the fp16 ONNX, int8 from TensorRT's own QDQ file)
SUPPORTED_VERSIONS = ((10, 8), (12, 0))  # [low, high): the gpu extra's `tensorrt>=10.8,<12`
WORKSPACE_BYTES = 4 << 30
OPT_BATCH_LIMIT = 16  # the batch TensorRT tunes kernels for: typical serving batches, not the largest one
# The sidecar facts that must match the running machine for an engine to load.
COMPATIBILITY_KEYS = {"tensorrt_version": "TensorRT", "gpu_name": "GPU", "compute_capability": "compute capability"}


class TensorRTBuildError(ExporterError):
    """TensorRT could not parse the ONNX file or build an engine."""

    def __init__(self, message: str, *, unsupported_nodes: list[str] | None = None,
                 errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.unsupported_nodes = unsupported_nodes or []
        self.errors = errors or []


def unavailable_reason() -> str | None:
    """None when TensorRT engines can be built and run here, else why not (one line)."""
    try:
        import tensorrt
    except ImportError as exc:
        return f"tensorrt is not installed ({exc}); install the gpu extra on a CUDA machine: pip install -e '.[gpu]'"
    version = tuple(int(p) for p in re.findall(r"\d+", str(getattr(tensorrt, "__version__", "")))[:2])
    low, high = SUPPORTED_VERSIONS
    if len(version) < 2 or not low <= version < high:
        return (f"tensorrt {getattr(tensorrt, '__version__', '?')} is outside the supported range "
                f">={low[0]}.{low[1]},<{high[0]} (strongly typed networks, the TensorRT 11 API)")
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def current_environment() -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine (needs tensorrt and CUDA)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


def rebuild_command(sidecar: dict[str, Any]) -> str:
    """The `exporter build` command that rebuilds the engine a sidecar describes."""
    flags = sidecar.get("build_flags", {})
    # The tensorrt stage writes the int8 engine's QDQ file itself; `--backends tensorrt` adds the onnx stage.
    parts = ["exporter", "build", str(sidecar.get("model_name") or "MODEL"), "--backends", "tensorrt"]
    if flags.get("fp16"):
        parts.append("--fp16")
    if flags.get("int8"):
        parts.append("--int8")
    if flags.get("static_batch"):
        parts += ["--batch", str(flags["static_batch"])]
    return " ".join(parts)


def engine_compatibility_problems(sidecar: dict[str, Any], current: dict[str, str],
                                  onnx_sha256: str | None = None) -> list[str]:
    """What differs between the machine/ONNX an engine was built for (`sidecar`) and this one (`current`).

    `onnx_sha256` is the hash of the ONNX file now beside the engine (None: not checked). Empty: compatible.
    """
    problems = []
    if sidecar.get("format") != SIDECAR_FORMAT:
        problems.append(f"sidecar format {sidecar.get('format')!r} (expected {SIDECAR_FORMAT})")
    for key, label in COMPATIBILITY_KEYS.items():
        built, here = sidecar.get(key), current.get(key)
        if built != here:
            problems.append(f"built for {label} {built} but this machine has {here}")
    if onnx_sha256 is not None and sidecar.get("onnx_sha256") != onnx_sha256:
        problems.append(f"built from an ONNX file with sha256 {str(sidecar.get('onnx_sha256'))[:12]}… but "
                        f"{sidecar.get('onnx_file', 'the ONNX file')} now has {onnx_sha256[:12]}…")
    return problems


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(engine_path).with_suffix(".json")


def check_engine_sidecar(engine_path: str | Path, current: dict[str, str]) -> dict[str, Any]:
    """Load the engine's sidecar and raise RunnerError (with the rebuild command) unless it fits `current`."""
    engine_path = Path(engine_path)
    side = sidecar_path(engine_path)
    try:
        sidecar = json.loads(side.read_text())
    except FileNotFoundError:
        raise RunnerError(f"tensorrt: {engine_path.name} has no sidecar {side.name}, so its build machine is "
                          "unknown; rebuild it with `exporter build MODEL --backends tensorrt`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunnerError(f"tensorrt: sidecar {side.name} is unreadable ({exc}); rebuild with "
                          "`exporter build MODEL --backends tensorrt`") from None
    onnx_file = engine_path.parent / sidecar.get("onnx_file", "")
    onnx_hash = sha256_file(onnx_file) if sidecar.get("onnx_file") and onnx_file.is_file() else None
    problems = engine_compatibility_problems(sidecar, current, onnx_hash)
    if problems:
        raise RunnerError(f"tensorrt: refusing to load {engine_path.name}: {'; '.join(problems)}; rebuild it with "
                          f"`{rebuild_command(sidecar)}`")
    return sidecar


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors and warnings (for the build report) instead of only printing."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)

    return CollectingLogger()


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        for attr in ("node_name", "node_operator"):  # TensorRT ≥ 8.6
            value = getattr(err, attr, None)
            if callable(value) and value():
                where += f" {attr.split('_')[1]}={value()}"
        errors.append(f"{err.desc()}{where}")
    return errors


def _unsupported_nodes(parser: Any, model_bytes: bytes, onnx_path: Path) -> list[str]:
    """ONNX nodes TensorRT's parser cannot take (empty when all are supported or the API is missing)."""
    import onnx

    check = getattr(parser, "supports_model_v2", None)
    if check is None:
        return []
    if check(model_bytes, str(onnx_path)):
        return []
    graph = onnx.load_from_string(model_bytes).graph
    unsupported = []
    for i in range(parser.num_subgraphs):
        if not parser.is_subgraph_supported(i):
            for index in parser.get_subgraph_nodes(i):
                node = graph.node[index]
                unsupported.append(f"{node.op_type} {node.name}")
    return unsupported


def _layer_precisions(trt: Any, engine: Any) -> dict[str, Any]:
    """Per-precision layer counts from the engine inspector, and the layers left in fp32 (needs DETAILED)."""
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    counts: dict[str, int] = {}
    fp32_layers = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        # TensorRT 10 writes "Format/Datatype"; 11 split it into "Format" and "DataType".
        formats = " ".join(str(o.get("DataType") or o.get("Format/Datatype") or o.get("Format") or "")
                           for o in layer.get("Outputs", []) if isinstance(o, dict))
        kind = ("int8" if "Int8" in formats or "INT8" in formats else
                "fp16" if "FP16" in formats or "Half" in formats else
                "fp32" if "FP32" in formats or "Float" in formats else "other")
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "fp32":
            fp32_layers.append(f"{layer.get('LayerType', '?')} {layer.get('Name', '?')}")
    return {"layer_precisions": counts, "fp32_layers": fp32_layers[:50]}


def _network_flags(trt: Any) -> int:
    """STRONGLY_TYPED: on 10.x the switch that makes the ONNX types decide; on 11.x accepted and always on."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _attach_timing_cache(config: Any, timing_cache: Path) -> str:
    """Give the builder the timing cache saved in `timing_cache` (a fresh one when there is none or TensorRT
    rejects it); returns what happened, for the diagnostics."""
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return f"reused ({len(blob)} bytes)"
        except Exception:  # noqa: BLE001  (a cache from another GPU / TensorRT only costs the build time)
            pass
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return "rejected (another GPU or TensorRT version); started afresh" if blob else "fresh"


def shared_timing_cache(env: dict[str, str]) -> Path:
    """The user-level timing cache for this GPU and TensorRT version (tactic timings do not depend on weights)."""
    key = f"{env['gpu_name']}-sm{env['compute_capability']}-trt{env['tensorrt_version']}"
    return user_cache_dir("tensorrt") / f"{re.sub(r'[^A-Za-z0-9.]+', '-', key).strip('-')}.timing.cache"


def write_tensorrt_qdq(source: Path, target: Path, calibration: np.ndarray | None, *,
                       progress: bool = True) -> list[str]:
    """Write TensorRT's own int8 QDQ copy of `source`: symmetric int8 activations (zero point 0), per-channel
    symmetric int8 weights and float biases, MinMax-calibrated on `calibration`; returns notes.

    TensorRT takes only symmetric int8 scales and its ONNX parser rejects the int32 biases behind a
    DequantizeLinear that ONNX Runtime's quantizer writes by default (`QuantizeBias`), so the CPU file
    (`model.int8.onnx`, uint8 activations) cannot serve. ONNX Runtime's quantizer writes it (lazily imported).
    """
    from exporter.backends.onnxruntime_int8 import write_qdq

    return write_qdq(source, target, calibration, activation_type="int8",
                     extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
                     layout="TensorRT: per-channel symmetric int8 weights, symmetric int8 activations, float biases",
                     progress=progress)


def build_engine(onnx_path: Path, engine_path: Path, *, precision: str, input_shape: tuple[int, int, int],
                 max_batch: int, static_batch: int | None, timing_cache: Path,
                 workspace_bytes: int = WORKSPACE_BYTES) -> dict[str, Any]:
    """Build and serialize one strongly typed engine from an ONNX file whose types are `precision`'s; return the
    build facts (for sidecar and manifest). The timing cache in `timing_cache` is used and written back."""
    import tensorrt as trt

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = _network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: resolves external weights beside it
        errors = _parser_errors(parser) or logger.errors
        # TensorRT has no per-layer fallback: name every node it cannot take. The check fills a network of its
        # own, so it runs on a throwaway one.
        unsupported = _unsupported_nodes(trt.OnnxParser(builder.create_network(flags), logger),
                                         onnx_path.read_bytes(), onnx_path)
        listed = f" (unsupported nodes: {', '.join(unsupported[:5])})" if unsupported else ""
        raise TensorRTBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: "
                                 f"{'; '.join(errors[:3]) or 'unknown parser error'}{listed}",
                                 unsupported_nodes=unsupported, errors=errors)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default; fp32 layers of a strongly typed network stay IEEE fp32
        config.clear_flag(trt.BuilderFlag.TF32)

    inp = network.get_input(0)
    if static_batch:
        shapes = {"min": static_batch, "opt": static_batch, "max": static_batch}
    else:
        shapes = {"min": 1, "opt": min(max_batch, OPT_BATCH_LIMIT), "max": max_batch}
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, *((shapes[k], *input_shape) for k in ("min", "opt", "max")))
        config.add_optimization_profile(profile)

    cache_status = _attach_timing_cache(config, timing_cache)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT {trt.__version__} failed to build the {precision} engine: "
                                 f"{'; '.join(logger.errors[:3]) or 'no error message'}", errors=logger.errors)
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))

    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    facts: dict[str, Any] = {"build_seconds": round(seconds, 3), "batch_profile": shapes, "strongly_typed": True,
                             "timing_cache": cache_status, "input_name": inp.name,
                             "output_name": network.get_output(0).name, "builder_warnings": logger.warnings[:20]}
    if engine is not None:
        facts.update(_layer_precisions(trt, engine))
    return facts


def _engine_source(ctx: BuildContext, precision: str, onnx_fp32: Artifact) -> str:
    """The ONNX file (relative to the build) whose types make `precision`'s engine; writes the int8 QDQ file."""
    if precision == "fp32":
        return onnx_fp32.path
    if precision == "fp16":
        fp16 = ctx.artifact("onnx-fp16")
        if fp16 is None:
            raise TensorRTBuildError("no fp16 ONNX (model.fp16.onnx): the onnx stage did not write it")
        return fp16.path
    write_tensorrt_qdq(ctx.out_dir / onnx_fp32.path, ctx.out_dir / TRT_QDQ_FILE, ctx.calibration)
    return TRT_QDQ_FILE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@register_stage("tensorrt", needs_onnx=True, needs_torch=False)
def export_tensorrt(ctx: BuildContext) -> list[Artifact]:
    """Build the strongly typed TensorRT engines (fp32; fp16 / int8 when asked) with sidecars; unavailable
    without CUDA. A precision that fails is recorded and skipped; only when none builds is it an error."""
    reason = unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    onnx_fp32 = ctx.artifact("onnx-fp32")
    if onnx_fp32 is None:
        raise BackendUnavailable("needs the fp32 ONNX model, which this build did not produce")
    precisions = ["fp32"] + ["fp16"] * ctx.fp16 + ["int8"] * ctx.int8

    engine_dir = ctx.out_dir / ENGINE_DIR
    engine_dir.mkdir(parents=True, exist_ok=True)
    env = current_environment()
    timing_cache, shared = engine_dir / TIMING_CACHE, shared_timing_cache(env)
    if not timing_cache.is_file() and shared.is_file():
        shutil.copyfile(shared, timing_cache)  # the tactic timings measured by earlier builds on this GPU
    diagnostics: dict[str, Any] = {**env, "strongly_typed": True, "shared_timing_cache": str(shared), "engines": {}}
    ctx.diagnostics["tensorrt"] = diagnostics
    artifacts = []
    for precision in precisions:
        engine_path = engine_dir / f"model.{precision}.engine"
        try:
            source = _engine_source(ctx, precision, onnx_fp32)
            facts = build_engine(ctx.out_dir / source, engine_path, precision=precision,
                                 input_shape=ctx.input_shape, max_batch=ctx.max_batch,
                                 static_batch=ctx.static_batch, timing_cache=timing_cache)
        except Exception as exc:  # noqa: BLE001  (the engines already built stay; the manifest says what failed)
            diagnostics["engines"][precision] = {"error": f"{type(exc).__name__}: {_first_line(exc)}",
                                                 "parser_errors": getattr(exc, "errors", [])[:20],
                                                 "unsupported_nodes": getattr(exc, "unsupported_nodes", [])}
            ctx.warnings.append(f"tensorrt: no {precision} engine: {_first_line(exc)}")
            continue
        diagnostics["engines"][precision] = facts
        artifacts.append(_write_sidecar(ctx, env, precision, source, engine_path, facts))
    if timing_cache.is_file():
        try:
            shared.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(shared) as tmp:
                shutil.copyfile(timing_cache, tmp)
        except OSError as exc:  # a read-only home only costs the next build its tactic timings
            diagnostics["shared_timing_cache_error"] = _first_line(exc)
    if not artifacts:
        failures = "; ".join(f"{p}: {diagnostics['engines'][p]['error']}" for p in precisions)
        raise TensorRTBuildError(f"no TensorRT engine could be built ({failures})")
    return artifacts


def _write_sidecar(ctx: BuildContext, env: dict[str, str], precision: str, source: str, engine_path: Path,
                   facts: dict[str, Any]) -> Artifact:
    """Write the engine's sidecar (what it was built from and for) and return its artifact."""
    sidecar = {
        "format": SIDECAR_FORMAT, **env, "model_name": ctx.model_name,
        "onnx_file": f"../{source}", "onnx_sha256": sha256_file(ctx.out_dir / source),
        "build_flags": {"precision": precision, "fp16": precision == "fp16", "int8": precision == "int8",
                        "strongly_typed": True, "tf32": False, "static_batch": ctx.static_batch,
                        "max_batch": ctx.max_batch, "workspace_bytes": WORKSPACE_BYTES},
        "input_name": facts["input_name"], "output_name": facts["output_name"],
        "input_shape": list(ctx.input_shape), "batch_profile": facts["batch_profile"],
    }
    sidecar["rebuild_command"] = rebuild_command(sidecar)
    with atomic_path(sidecar_path(engine_path)) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    notes = [f"TensorRT {env['tensorrt_version']} on {env['gpu_name']} (sm {env['compute_capability']}), strongly "
             f"typed from {source}, batch profile {facts['batch_profile']}"]
    if precision != "fp32" and facts.get("fp32_layers"):
        notes.append(f"{len(facts['fp32_layers'])} layers in fp32 (the ONNX file types them so)")
    return Artifact(name=f"tensorrt-{precision}", backend="tensorrt", path=f"{ENGINE_DIR}/{engine_path.name}",
                    precision=precision, device="cuda", notes=notes)


@register_backend
class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine with torch CUDA tensors as I/O buffers, on a CUDA stream of its own."""

    backend = "tensorrt"
    library = "tensorrt"
    description = "TensorRT engine (CUDA; refuses engines built for another GPU / TensorRT / ONNX)"
    devices = ("cuda",)

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        return unavailable_reason()

    def activate_impl(self) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self.sidecar = check_engine_sidecar(self.path, current_environment())
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"tensorrt: cannot deserialize {self.path.name}: "
                              f"{'; '.join(self._logger.errors[:2]) or 'unknown error'}; rebuild it with "
                              f"`{rebuild_command(self.sidecar)}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise RunnerError(f"tensorrt: expected one input and an output, engine has {inputs} → {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        io_types = [self.engine.get_tensor_dtype(self._input), self.engine.get_tensor_dtype(self._output)]
        if any(t not in dtypes for t in io_types):
            raise RunnerError(f"tensorrt: engine I/O types {io_types} are not float32/float16")
        self._input_dtype, self._output_dtype = (dtypes[t] for t in io_types)
        profile = self.sidecar.get("batch_profile", {})
        self._batch_range = (int(profile.get("min", 1)), int(profile.get("max", 1 << 30)))
        # Copies, enqueue and sync on our own stream: torch's current stream is the legacy default stream, which
        # implicitly synchronises with every other stream of the process.
        self._stream = torch.cuda.Stream()

    def prepare_impl(self, batch: np.ndarray) -> Any:
        low, high = self._batch_range
        if not low <= batch.shape[0] <= high:
            raise RunnerError(f"tensorrt: batch {batch.shape[0]} is outside the engine's profile {low}…{high}")
        torch = self._torch
        with torch.cuda.stream(self._stream):  # the buffers belong to our stream (allocator and copy)
            inp = torch.from_numpy(batch).to("cuda", self._input_dtype).contiguous()
            if not self.context.set_input_shape(self._input, tuple(inp.shape)):
                raise RunnerError(f"tensorrt: the engine rejects input shape {tuple(inp.shape)}")
            out = torch.empty(tuple(self.context.get_tensor_shape(self._output)), dtype=self._output_dtype,
                              device="cuda")
        self.context.set_tensor_address(self._input, inp.data_ptr())
        self.context.set_tensor_address(self._output, out.data_ptr())
        return inp, out

    def run_impl(self, prepared: Any) -> Any:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RunnerError("tensorrt: execute_async_v3 failed: "
                              f"{'; '.join(self._logger.errors[-2:]) or 'no error message'}")
        return prepared  # keep the input alive until the stream is done with it

    def finish_impl(self, raw: Any) -> np.ndarray:
        _, out = raw
        with self._torch.cuda.stream(self._stream):  # after the engine on our stream; .cpu() waits for it
            return out.float().cpu().numpy()

    def sync(self) -> None:
        self._stream.synchronize()

    def deactivate_impl(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._stream.synchronize()
        self._stream = None
        self.context = None
        self.engine = None
        self._runtime = None
