"""A stand-in `tensorrt` module holding only the TensorRT 11 Python API that exporter may call (contract tests).

TensorRT cannot be installed here, so `install(monkeypatch)` puts this module into `sys.modules["tensorrt"]`. Each
class defines exactly the documented TensorRT 11 members exporter uses, with `__slots__`, so anything else raises
AttributeError as the real module would: `BuilderFlag.FP16` / `INT8` (weak typing, removed in 11),
`NetworkDefinitionCreationFlag.EXPLICIT_BATCH` (removed), calibrators, `config.max_workspace_size` and so on.
Every call is appended to `CALLS` as (name, arguments) for the tests to read.

The ONNX parser behaves like TensorRT's where exporter depends on it: a strongly typed network takes its tensor
types from the file, and explicit quantization takes only symmetric int8 QuantizeLinear nodes and no int32
initializer behind a DequantizeLinear (ONNX Runtime's default quantized biases). Engines are JSON descriptions.
"""

from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path
from typing import Any

VERSION = "11.4.0.7"
ENGINE_MAGIC = b"FAKE-TRT-ENGINE\n"
CACHE_MAGIC = b"FAKE-TRT-TIMING " + VERSION.encode() + b"\n"


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0  # deprecated in 11 (always on) but still accepted
    PREFER_AOT_PYTHON_PLUGINS = 1
    PREFER_JIT_PYTHON_PLUGINS = 2


class BuilderFlag(enum.IntEnum):  # TensorRT 11: no FP16, INT8, BF16, FP8, INT4, FP4, *_PRECISION_CONSTRAINTS
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 4
    DISABLE_TIMING_CACHE = 5
    TF32 = 6
    SPARSE_WEIGHTS = 7
    SAFETY_SCOPE = 8
    VERSION_COMPATIBLE = 12
    EXCLUDE_LEAN_RUNTIME = 13
    ERROR_ON_TIMING_CACHE_MISS = 15
    DISABLE_COMPILATION_CACHE = 17
    STRIP_PLAN = 18
    REFIT_IDENTICAL = 19
    WEIGHT_STREAMING = 20
    REFIT_INDIVIDUAL = 22
    STRICT_NANS = 23
    MONITOR_MEMORY = 24
    EDITABLE_TIMING_CACHE = 26
    DISTRIBUTIVE_INDEPENDENCE = 27
    REQUIRE_USER_ALLOCATION = 28


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class ProfilingVerbosity(enum.IntEnum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class LayerInformationFormat(enum.IntEnum):
    ONELINE = 0
    JSON = 1


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


CALLS: list[tuple[str, tuple[Any, ...]]] = []
FAIL_PARSE: set[str] = set()  # ONNX file names whose parse fails (a test's way to make one precision fail)


def _record(name: str, *args: Any) -> None:
    CALLS.append((name, args))


class ILogger:
    __slots__ = ("__weakref__",)

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        _record("ILogger.__init__")

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    __slots__ = ("min_severity",)

    def __init__(self, min_severity: ILogger.Severity = ILogger.Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        pass


class ITensor:
    __slots__ = ("name", "shape", "dtype")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class INetworkDefinition:
    __slots__ = ("flags", "inputs", "outputs", "layer_type", "__weakref__")

    def __init__(self, flags: int) -> None:
        self.flags, self.inputs, self.outputs, self.layer_type = flags, [], [], "Float"

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> ITensor:
        _record("INetworkDefinition.get_input", index)
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        _record("INetworkDefinition.get_output", index)
        return self.outputs[index]


class IParserError:
    __slots__ = ("_desc", "_node", "_op")

    def __init__(self, desc: str, node: str, op: str) -> None:
        self._desc, self._node, self._op = desc, node, op

    def desc(self) -> str:
        return self._desc

    def node_name(self) -> str:
        return self._node

    def node_operator(self) -> str:
        return self._op


_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 2: DataType.UINT8, 6: DataType.INT32}


class OnnxParser:
    __slots__ = ("network", "logger", "errors", "bad_nodes")

    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        _record("OnnxParser", network.flags)
        self.network, self.logger, self.errors, self.bad_nodes = network, logger, [], []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> IParserError:
        return self.errors[index]

    def clear_errors(self) -> None:
        self.errors = []

    def parse_from_file(self, model: str) -> bool:
        _record("OnnxParser.parse_from_file", Path(model).name)
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(model)
        if Path(model).name in FAIL_PARSE:
            self.errors.append(IParserError("injected parse failure", "node0", "Conv"))
            return False
        initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        for index, node in enumerate(proto.graph.node):
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers \
                    and initializers[node.input[0]].dtype.name == "int32":
                self.errors.append(IParserError("int32 DequantizeLinear input (quantized bias) is not supported",
                                                node.name, node.op_type))
                self.bad_nodes.append(index)
            if node.op_type == "QuantizeLinear" and len(node.input) > 2:
                zero = initializers.get(node.input[2])
                if zero is None or zero.dtype.name != "int8" or zero.any():
                    self.errors.append(IParserError("QuantizeLinear needs a symmetric int8 zero point (0)",
                                                    node.name, node.op_type))
                    self.bad_nodes.append(index)
        if self.errors:
            return False
        for value, target in ((proto.graph.input[0], self.network.inputs), (proto.graph.output[0],
                                                                             self.network.outputs)):
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            target.append(ITensor(value.name, dims, _ONNX_TYPES[value.type.tensor_type.elem_type]))
        # Strongly typed: the layers compute in the file's types (fp16 weights, int8 Q/DQ).
        kinds = {a.dtype.name for a in initializers.values()}
        ops = {n.op_type for n in proto.graph.node}
        self.network.layer_type = "Int8" if "QuantizeLinear" in ops else "Half" if "float16" in kinds else "Float"
        return True

    def supports_model_v2(self, model: bytes, path: str | None = None) -> bool:
        _record("OnnxParser.supports_model_v2", path)
        return self.parse_from_file(path) if path else False

    @property
    def num_subgraphs(self) -> int:
        return 1 if self.bad_nodes else 0

    def is_subgraph_supported(self, index: int) -> bool:
        return False

    def get_subgraph_nodes(self, index: int) -> list[int]:
        return list(self.bad_nodes)


class IOptimizationProfile:
    __slots__ = ("shapes",)

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: tuple[int, ...], opt: tuple[int, ...], max: tuple[int, ...]) -> None:
        _record("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, input: str) -> tuple[tuple[int, ...], ...]:
        return self.shapes[input]


class ITimingCache:
    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def serialize(self) -> bytes:
        return self.blob


class IBuilderConfig:
    __slots__ = ("flags", "pools", "profiles", "timing_cache", "_verbosity")

    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self._verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY

    @property
    def profiling_verbosity(self) -> ProfilingVerbosity:
        return self._verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: ProfilingVerbosity) -> None:
        _record("IBuilderConfig.profiling_verbosity", value)
        self._verbosity = ProfilingVerbosity(value)

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        _record("IBuilderConfig.set_memory_pool_limit", MemoryPoolType(pool), pool_size)
        self.pools[MemoryPoolType(pool)] = pool_size

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self.pools.get(MemoryPoolType(pool), 0)

    def set_flag(self, flag: BuilderFlag) -> None:
        _record("IBuilderConfig.set_flag", BuilderFlag(flag))
        self.flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        _record("IBuilderConfig.clear_flag", BuilderFlag(flag))
        self.flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return BuilderFlag(flag) in self.flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        _record("IBuilderConfig.add_optimization_profile", dict(profile.shapes))
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        _record("IBuilderConfig.create_timing_cache", len(serialized_timing_cache))
        return ITimingCache(bytes(serialized_timing_cache) or CACHE_MAGIC)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        _record("IBuilderConfig.set_timing_cache", cache.blob[:len(CACHE_MAGIC)] == CACHE_MAGIC, ignore_mismatch)
        if not cache.blob.startswith(CACHE_MAGIC) and not ignore_mismatch:
            return False  # built by another TensorRT version / GPU
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        return self.timing_cache


class Builder:
    __slots__ = ("logger",)

    def __init__(self, logger: ILogger) -> None:
        _record("Builder", type(logger).__name__)
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        _record("Builder.create_network", flags)
        if flags & ~sum(1 << int(f) for f in NetworkDefinitionCreationFlag):
            raise ValueError(f"unknown NetworkDefinitionCreationFlag bits in {flags:#x}")
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        _record("Builder.create_builder_config")
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        _record("Builder.create_optimization_profile")
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        _record("Builder.build_serialized_network", sorted(f.name for f in config.flags))
        inp, out = network.inputs[0], network.outputs[0]
        if any(d < 0 for d in inp.shape) and not config.profiles:
            self.logger.log(ILogger.Severity.ERROR, "dynamic input without an optimization profile")
            return None
        if config.timing_cache is None:
            return None
        config.timing_cache.blob += b"tactics;"  # the build measured (and cached) some tactics
        profile = config.profiles[0].shapes.get(inp.name) if config.profiles else None
        layer_type = network.layer_type
        return ENGINE_MAGIC + json.dumps({
            "input": [inp.name, int(inp.dtype), list(inp.shape)], "output": [out.name, int(out.dtype),
                                                                           list(out.shape)],
            "profile": profile, "layer_type": layer_type}).encode()


class IEngineInspector:
    __slots__ = ("engine",)

    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine

    def get_engine_information(self, format: LayerInformationFormat) -> str:
        _record("IEngineInspector.get_engine_information", LayerInformationFormat(format))
        kind = self.engine.info["layer_type"]
        layers = [{"Name": f"conv{i}", "LayerType": "Convolution",
                   "Outputs": [{"Name": f"t{i}", "Format": "Row major linear format (kLINEAR)", "DataType": kind}]}
                  for i in range(3)]
        layers.append({"Name": "fc", "LayerType": "Gemm", "Outputs": [{"Name": "out", "Format": "kLINEAR",
                                                                        "DataType": "Float"}]})
        return json.dumps({"Layers": layers, "I/O Tensors": []})  # the TensorRT 11 schema


class IExecutionContext:
    __slots__ = ("engine", "shapes", "addresses")

    def __init__(self, engine: ICudaEngine) -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        _record("IExecutionContext.set_input_shape", name, tuple(shape))
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes.get(name) or tuple(self.engine.info["output"][2])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        _record("IExecutionContext.set_tensor_address", name, memory)
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        _record("IExecutionContext.execute_async_v3", stream_handle)
        return True


class ICudaEngine:
    __slots__ = ("info",)

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    @property
    def num_io_tensors(self) -> int:
        return 2

    def get_tensor_name(self, index: int) -> str:
        return [self.info["input"][0], self.info["output"][0]][index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == self.info["input"][0] else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        entry = self.info["input"] if name == self.info["input"][0] else self.info["output"]
        return DataType(entry[1])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        entry = self.info["input"] if name == self.info["input"][0] else self.info["output"]
        return tuple(entry[2])

    def create_execution_context(self) -> IExecutionContext:
        _record("ICudaEngine.create_execution_context")
        return IExecutionContext(self)

    def create_engine_inspector(self) -> IEngineInspector:
        return IEngineInspector(self)


class Runtime:
    __slots__ = ("logger",)

    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        _record("Runtime.deserialize_cuda_engine", len(serialized_engine))
        data = bytes(serialized_engine)
        if not data.startswith(ENGINE_MAGIC):
            self.logger.log(ILogger.Severity.ERROR, "not a serialized engine")
            return None
        return ICudaEngine(json.loads(data[len(ENGINE_MAGIC):]))


PUBLIC = ("NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "ProfilingVerbosity",
          "LayerInformationFormat", "TensorIOMode", "DataType", "ILogger", "Logger", "ITensor", "INetworkDefinition",
          "IParserError", "OnnxParser", "IOptimizationProfile", "ITimingCache", "IBuilderConfig", "Builder",
          "IEngineInspector", "IExecutionContext", "ICudaEngine", "Runtime")


def install(monkeypatch: Any, version: str = VERSION) -> types.ModuleType:
    """Put a fresh fake `tensorrt` (only the names above) into sys.modules for one test; returns it."""
    CALLS.clear()
    FAIL_PARSE.clear()
    module = types.ModuleType("tensorrt", __doc__)
    for name in PUBLIC:
        setattr(module, name, getattr(sys.modules[__name__], name))
    module.__version__ = version
    module.float32, module.float16, module.int8 = DataType.FLOAT, DataType.HALF, DataType.INT8
    module.CALLS, module.FAIL_PARSE = CALLS, FAIL_PARSE
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module
