"""ONNX: the dynamo exporter's artifact (fp32, optional fp16), and the ONNX reference evaluator as a runner.

`export_onnx` writes `model.onnx` (opset ≥ 18, dynamic batch named "batch" unless the build is static, input
"input" NCHW float32, output "logits") checked with `onnx.checker.check_model(full_check=True)` and strict
shape inference, carrying the build's metadata in `metadata_props` so another runtime can use the file
alone. With `ctx.fp16` it also writes `model.fp16.onnx`: fp16 weights and compute, float32 inputs/outputs.
A model whose weights do not fit protobuf's 2 GiB keeps them in `model.onnx.data` beside the file (ONNX external
data, read by ONNX Runtime, OpenVINO and TensorRT from there; `save_onnx` decides).

The file is run by three runners: `onnxruntime` (see `onnxruntime.py`), `openvino` (which reads ONNX too) and
`onnx_reference` here — `onnx.reference.ReferenceEvaluator`, a pure-numpy implementation of the ONNX spec
that shares no kernel with any runtime, so it is an independent oracle (slow: used for small models only).

`add_intermediate_outputs` turns every node output into a graph output and maps it back to the PyTorch module
that produced it (from the exporter's `pkg.torch.onnx.name_scopes` node metadata), for the parity suite's
first-diverging-layer bisection.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporter.backends.base import (
    Artifact,
    BackendUnavailable,
    BuildContext,
    Runner,
    import_optional,
    register_backend,
    register_stage,
)
from exporter.errors import ExporterError
from exporter.fileio import atomic_path

ONNX_OPSET = 18  # the lowest opset the issue allows: the widest runtime support (TensorRT's parser included)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
FP32_FILE = "model.onnx"
FP16_FILE = "model.fp16.onnx"
# The reference evaluator is numpy code: resnet18 at 96×96 (0.32 GMACs) takes 0.17 s per image on 2 cores,
# alexnet (0.94 GMACs) 0.56 s. Above this many multiply-accumulates per image a parity run over a few hundred
# images takes minutes, so builds skip its artifact for bigger models (the runner still works on them).
REFERENCE_MAX_MACS = 400_000_000


PROTOBUF_LIMIT_BYTES = 2**31 - 1  # a serialized ONNX ModelProto (weights inside) must stay under this
# Tensors past this many bytes in all go to an external-data file (the 64 MiB left are for the graph itself).
INLINE_WEIGHTS_LIMIT_BYTES = PROTOBUF_LIMIT_BYTES - 2**26
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx → model.onnx.data
EXTERNAL_MIN_TENSOR_BYTES = 1024  # smaller tensors (shapes, scalars) stay inline: shape inference reads them


class OnnxExportError(ExporterError):
    """The ONNX export or its checks failed."""


def _example_input(ctx: BuildContext) -> Any:
    import torch

    # A batch of 2 when dynamic: torch.export specialises batch sizes 0 and 1.
    return torch.rand((ctx.static_batch or 2, *ctx.input_shape), generator=torch.Generator().manual_seed(0))


def _rename_batch_dim(model: Any) -> None:
    """Name the symbolic batch dimension "batch" everywhere (the exporter calls it s0, s31, …)."""
    first = model.graph.input[0].type.tensor_type.shape.dim
    if not first or not first[0].dim_param:
        return
    symbol = first[0].dim_param
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM


def _metadata(ctx: BuildContext, precision: str) -> dict[str, str]:
    meta = {
        "model_name": ctx.model_name,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NCHW",
        "input_shape": ",".join(map(str, ctx.input_shape)),
        "input_dtype": "float32",
        "batch": str(ctx.static_batch) if ctx.static_batch else "dynamic",
    }
    for key, value in ctx.metadata.items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    meta["precision"] = precision
    return meta


def set_metadata(model: Any, meta: dict[str, str]) -> None:
    """Replace the model's `metadata_props` with `meta` (keys sorted, values strings)."""
    del model.metadata_props[:]
    for key in sorted(meta):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, meta[key]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file, without loading its weights."""
    onnx = import_optional("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def external_data_file(path: str | Path) -> Path:
    """Where `save_onnx` puts the weights of a model too big for one file: `<path>.data` beside it."""
    path = Path(path)
    return path.with_name(path.name + EXTERNAL_DATA_SUFFIX)


def _tensors(model: Any) -> list[Any]:
    return list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]


def _inline_bytes(model: Any) -> int:
    onnx = import_optional("onnx")
    return sum(t.ByteSize() for t in _tensors(model) if t.data_location != onnx.TensorProto.EXTERNAL)


def uses_external_data(model: Any) -> bool:
    """Whether any tensor of `model` keeps its data in an external file."""
    onnx = import_optional("onnx")
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model))


def check_external_data(path: Path, build_dir: Path, listed: set[str]) -> None:
    """Refuse an ONNX file whose external-data locations leave the build directory, go through a symbolic link or
    name a file the manifest does not hash — checked here, before any runtime opens the file."""
    onnx = import_optional("onnx")
    model = onnx.load(str(path), load_external_data=False)
    build_dir = Path(build_dir).resolve()
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (path.parent / location)
        rel = target.resolve().relative_to(build_dir).as_posix() if build_dir in target.resolve().parents else None
        if (not location or Path(location).is_absolute() or ".." in Path(location).parts or target.is_symlink()
                or rel is None or rel not in listed):
            raise ExporterError(f"{path.name}: tensor {tensor.name!r} keeps its data in {location!r}, outside the "
                                "build's hashed files; refusing to load it (rebuild the model)")


def save_onnx(model: Any, path: Path) -> None:
    """Save `model` to `path` atomically: its tensors inline while they fit protobuf's 2 GiB, else in
    `external_data_file(path)` (then moved out of `model`, which keeps references to that file). A model that
    already references external data beside `path` is saved as it is."""
    onnx = import_optional("onnx")
    path = Path(path)
    with atomic_path(path) as tmp:
        if _inline_bytes(model) < INLINE_WEIGHTS_LIMIT_BYTES:
            onnx.save(model, str(tmp))
            return
        data = external_data_file(path)
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=EXTERNAL_MIN_TENSOR_BYTES)


def check_and_save(model: Any, path: Path) -> Any:
    """Run the full checker and strict shape inference, then save the inferred model atomically to `path`
    (through `save_onnx`). Returns the inferred model; for one with external data, without its weights."""
    onnx = import_optional("onnx")
    path = Path(path)
    try:
        if not uses_external_data(model) and _inline_bytes(model) < INLINE_WEIGHTS_LIMIT_BYTES:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
            onnx.checker.check_model(inferred, full_check=True)
            save_onnx(inferred, path)
            return inferred
        save_onnx(model, path)  # too big for the in-memory checks: they read the files
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True,
                                                   data_prop=True)
            onnx.checker.check_model(str(path), full_check=True)
        except BaseException:
            path.unlink(missing_ok=True)
            external_data_file(path).unlink(missing_ok=True)
            raise
        return onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxExportError(f"{path.name} fails the ONNX checker: {first}") from exc


@register_stage("onnx", needs_torch=False)
def export_onnx(ctx: BuildContext) -> list[Artifact]:
    """Export `ctx` to `model.onnx` (and `model.fp16.onnx` with `ctx.fp16`) and return the runnable artifacts."""
    if ctx.onnx_source is not None:
        return _import_onnx_source(ctx)
    onnx = import_optional("onnx")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise BackendUnavailable(f"onnxscript is not installed ({exc}); the dynamo ONNX exporter needs it") from exc
    import torch

    weight_bytes = sum(t.numel() * t.element_size() for t in (*ctx.model.parameters(), *ctx.model.buffers()))
    example = _example_input(ctx)
    kwargs: dict[str, Any] = {}
    if ctx.exported_program is not None:
        source = ctx.exported_program  # already traced with the build's batch policy
    else:
        source = ctx.model
        if not ctx.static_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim(BATCH_DIM, min=1, max=max(ctx.max_batch, 2))},)
    try:
        program = torch.onnx.export(source, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
                                    verbose=False, **kwargs)
    except Exception as exc:
        raise OnnxExportError(f"torch.onnx.export failed for {ctx.model_name}: {_root_cause(exc)}") from exc
    if weight_bytes < INLINE_WEIGHTS_LIMIT_BYTES:
        model = program.model_proto
    else:  # never one >2 GiB proto in memory: onnx_ir writes the weights out, the graph is read back without them
        import onnx_ir

        onnx_ir.save(program.model, str(ctx.out_dir / FP32_FILE),
                     external_data=external_data_file(FP32_FILE).name, size_threshold_bytes=EXTERNAL_MIN_TENSOR_BYTES)
        model = onnx.load(str(ctx.out_dir / FP32_FILE), load_external_data=False)
    _rename_batch_dim(model)
    set_metadata(model, _metadata(ctx, "fp32"))
    model.doc_string = f"{ctx.model_name} exported by exporter (torch {torch.__version__})"
    fp32 = check_and_save(model, ctx.out_dir / FP32_FILE)

    opset = next(o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx"))
    ctx.diagnostics["onnx"] = {"opset": opset, "ir_version": fp32.ir_version, "nodes": len(fp32.graph.node),
                               "batch": "dynamic" if not ctx.static_batch else ctx.static_batch,
                               "onnx_version": onnx.__version__}
    if uses_external_data(fp32):
        ctx.diagnostics["onnx"]["external_data"] = (f"{weight_bytes / 2**30:.2f} GiB of weights in "
                                                    f"{external_data_file(FP32_FILE).name} (protobuf's limit is 2 GiB)")
    artifacts = [Artifact(name="onnx-fp32", backend="onnxruntime", path=FP32_FILE, precision="fp32",
                          notes=[f"opset {opset}; ONNX Runtime CPU execution provider"])]

    macs = _macs_per_image(ctx)
    if macs is not None and macs <= REFERENCE_MAX_MACS:
        artifacts.append(Artifact(name="onnx-reference", backend="onnx_reference", path=FP32_FILE, precision="fp32",
                                  notes=["onnx.reference.ReferenceEvaluator: independent numpy oracle"]))
    else:
        ctx.diagnostics["onnx"]["reference_skipped"] = (
            f"{macs / 1e9:.1f} GMACs per image is too slow for the numpy reference evaluator "
            f"(limit {REFERENCE_MAX_MACS / 1e9:.1f})" if macs is not None else "could not count MACs")

    if ctx.fp16:
        artifacts.append(export_onnx_fp16(ctx, fp32))
    return artifacts


def _import_onnx_source(ctx: BuildContext) -> list[Artifact]:
    """An ONNX file given as the model: checked and copied as `model.onnx` with the build's metadata added to its
    own; the ONNX reference evaluator joins (first: it is then the build's reference) when the graph's MACs are
    within REFERENCE_MAX_MACS and it can run the file, else ONNX Runtime fp32 is the reference."""
    onnx = import_optional("onnx")
    source = Path(ctx.onnx_source)
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"{source.name} cannot be loaded: {_root_cause(exc)}") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update(_metadata(ctx, "fp32"))
    meta.update(input_name=model.graph.input[0].name, output_name=model.graph.output[0].name,
                source_file=str(source))
    set_metadata(model, meta)
    fp32 = check_and_save(model, ctx.out_dir / FP32_FILE)
    opset = next((o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")), None)
    info: dict[str, Any] = {"opset": opset, "ir_version": fp32.ir_version, "nodes": len(fp32.graph.node),
                            "onnx_version": onnx.__version__, "source_file": str(source)}
    ctx.diagnostics["onnx"] = info
    artifacts = [Artifact(name="onnx-fp32", backend="onnxruntime", path=FP32_FILE, precision="fp32",
                          notes=[f"{source.name} as given (opset {opset}); ONNX Runtime CPU execution provider"])]
    macs = graph_costs(ctx.out_dir / FP32_FILE)[0]
    info["macs_per_image"] = macs
    if macs > REFERENCE_MAX_MACS:
        info["reference_skipped"] = (f"{macs / 1e9:.1f} GMACs per image is too slow for the numpy reference "
                                     f"evaluator (limit {REFERENCE_MAX_MACS / 1e9:.1f})")
    else:
        try:  # an op the evaluator lacks (e.g. ONNX Runtime's com.microsoft fused ops) shows on its first run
            evaluator = reference_evaluator(ctx.out_dir / FP32_FILE)
            image = np.zeros((ctx.static_batch or 1, *ctx.input_shape), dtype=np.float32)
            with np.errstate(all="ignore"):
                evaluator.run(None, {evaluator.input_names[0]: image})
            artifacts.insert(0, Artifact(name="onnx-reference", backend="onnx_reference", path=FP32_FILE,
                                         precision="fp32",
                                         notes=["onnx.reference.ReferenceEvaluator: independent numpy oracle"]))
        except Exception as exc:  # noqa: BLE001  (the runtimes are then compared against ONNX Runtime fp32)
            info["reference_skipped"] = f"the ONNX reference evaluator cannot run it: {_root_cause(exc)}"
    if ctx.fp16:
        artifacts.append(export_onnx_fp16(ctx, fp32))
    return artifacts


def graph_costs(path: Path) -> tuple[int, int]:
    """(MACs, bytes of all node outputs) of one image through an ONNX file, from its shapes at batch 1: the
    multiply-accumulates of its Conv, Gemm and MatMul nodes, as `count_macs` counts a PyTorch model's."""
    onnx = import_optional("onnx")
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and not dims[0].HasField("dim_value"):
        dims[0].dim_value = 1
    batch = dims[0].dim_value if dims else 1
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    macs = activation = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or 0 in out:
            continue
        elements = int(np.prod(out))
        activation += sum(int(np.prod(shapes[o])) * 4 for o in node.output if shapes.get(o) and 0 not in shapes[o])
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv" and weight:
            macs += elements * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul") and weight:
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            macs += elements * int(weight[-1] if transposed else weight[-2] if len(weight) > 1 else weight[0])
    return macs // max(batch, 1), activation // max(batch, 1)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain as one line: the exporter wraps the useful message (which op, which
    guard) in generic "step 1/3" text with terminal colours."""

    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"[:300]


def _macs_per_image(ctx: BuildContext) -> int | None:
    from exporter.models.registry import count_macs

    try:
        return count_macs(ctx.model, (1, *ctx.input_shape))
    except Exception:  # a model the hooks cannot count: treat as too big for the slow oracle
        return None


def export_onnx_fp16(ctx: BuildContext, fp32_model: Any) -> Artifact:
    """Write `model.fp16.onnx`: fp16 weights and arithmetic, float32 input/output (casts at the boundary)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise BackendUnavailable(f"the fp16 ONNX needs onnxruntime's float16 converter ({exc})") from exc

    onnx = import_optional("onnx")
    source = (onnx.load(str(ctx.out_dir / FP32_FILE)) if uses_external_data(fp32_model)  # its weights, in memory
              else copy.deepcopy(fp32_model))
    model = convert_float_to_float16(source, keep_io_types=True, disable_shape_infer=uses_external_data(fp32_model))
    topological_sort(model.graph)  # the converter appends its input casts after their consumers
    meta = {p.key: p.value for p in fp32_model.metadata_props}
    meta["precision"] = "fp16"
    set_metadata(model, meta)
    check_and_save(model, ctx.out_dir / FP16_FILE)
    return Artifact(name="onnx-fp16", backend="onnxruntime", path=FP16_FILE, precision="fp16",
                    notes=["fp16 weights and compute, float32 input/output; on a CPU ONNX Runtime may compute "
                           "some fp16 nodes in fp32 (its CPU kernels are mostly fp32)"])


def topological_sort(graph: Any) -> None:
    """Reorder `graph.node` in place so that every node comes after the producers of its inputs (stable)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({n for node in remaining for n in node.input if n not in available})
            raise OnnxExportError(f"ONNX graph has a cycle or undefined inputs: {', '.join(missing[:5])}")
        pending = remaining
    copies = [type(node)() for node in ordered]
    for clone, node in zip(copies, ordered):
        clone.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


# --- bisection support ---------------------------------------------------------------------------------------


def node_module_name(node: Any) -> str | None:
    """The PyTorch module path that produced an ONNX node ("" for the model's own forward), or None if unknown.

    The dynamo exporter writes `pkg.torch.onnx.name_scopes` on each node: the module path at every depth, then
    the op name, e.g. `['', 'layer1', 'layer1.0', 'layer1.0.bn1', '_native_batch_norm…']`. Fused nodes (a
    Conv with its BatchNorm folded in) carry the scope of the last fused module (the BatchNorm).
    """
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if scopes is None:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(names, list) or len(names) < 2:
        return "" if isinstance(names, list) else None
    return str(names[-2])


def add_intermediate_outputs(onnx_path: str | Path, out_path: str | Path) -> dict[str, str]:
    """Write a copy of `onnx_path` whose every float node output is also a graph output.

    Returns {tensor name: PyTorch module path} in the graph's (topological) order, for the tensors whose node
    carries the exporter's scope metadata. Non-float tensors (shapes, indices) are not exposed.
    """
    onnx = import_optional("onnx")
    # shapes from the graph alone: a model with external data may be too big to infer in memory with its weights
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
    known = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    existing = {o.name for o in model.graph.output}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    mapping: dict[str, str] = {}
    for node in model.graph.node:
        module = node_module_name(node)
        for name in node.output:
            info = known.get(name)
            if not name or info is None or info.type.tensor_type.elem_type not in floats:
                continue
            if name not in existing:
                model.graph.output.append(info)
                existing.add(name)
            if module is not None:
                mapping[name] = module
    if uses_external_data(model):  # its own copy of the weights beside `out_path` (locations are relative)
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(Path(onnx_path).parent))
    save_onnx(model, Path(out_path))
    return mapping


def module_output_tensors(mapping: dict[str, str]) -> dict[str, str]:
    """{module path: tensor} where the tensor is the last one computed inside that module (or its children).

    `mapping` is `add_intermediate_outputs`' result. Parents get their last child's tensor too, so a residual
    block maps to the tensor after its final add/activation. Modules with no node of their own (a Conv whose
    BatchNorm was folded into it) are absent.
    """
    outputs: dict[str, str] = {}
    for tensor, module in mapping.items():  # topological order: later tensors overwrite earlier ones
        parts = module.split(".") if module else []
        for depth in range(len(parts) + 1):
            outputs[".".join(parts[:depth])] = tensor
    return outputs


def module_outputs(onnx_path: Path, run_outputs: Callable[[Path, set[str]], dict[str, np.ndarray]], *,
                   scope_source: Path | None = None) -> dict[str, list[np.ndarray]]:
    """PyTorch module name → its output per call, from `onnx_path` with every node output exposed.

    `run_outputs(instrumented_path, tensor_names)` is the runtime's part: run the instrumented file (or its own
    equivalent) and return tensor name → value. Consecutive tensors of one module are one call of it (a BatchNorm
    may be several nodes) and the call's output is the last of them. A file whose nodes lost the module scopes
    (an optimizer's rewrite) borrows the tensor → module map of `scope_source` for the tensor names it kept.
    """
    with tempfile.TemporaryDirectory(prefix="exporter-bisect-") as tmp:
        instrumented = Path(tmp) / "instrumented.onnx"
        mapping = add_intermediate_outputs(onnx_path, instrumented)
        if not mapping and scope_source is not None and Path(scope_source) != Path(onnx_path):
            mapping = add_intermediate_outputs(scope_source, Path(tmp) / "scopes.onnx")
        values = run_outputs(instrumented, set(mapping))
    by_module: dict[str, list[np.ndarray]] = {}
    previous = None
    for tensor, module in mapping.items():  # graph (topological) order
        if tensor not in values:
            continue
        if module and module == previous:
            by_module[module][-1] = np.asarray(values[tensor], np.float32)  # same call, a later node
        elif module:
            by_module.setdefault(module, []).append(np.asarray(values[tensor], np.float32))
        previous = module
    return by_module


def reference_evaluator(path: str | Path) -> Any:
    """`onnx.reference.ReferenceEvaluator` for the ONNX file at `path`, with its MaxPool mended.

    onnx 1.23's evaluator counts the padding twice in a stride-1 `ceil_mode=1` MaxPool's output size (kernel 3, pad
    1: 12×12 → 14×14), so torchvision's GoogLeNet failed in a Concat. With stride 1 the ceil and floor formulas of
    the spec give the same size, so ceil_mode is dropped there and the evaluator's own pooling runs unchanged."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops.op_max_pool import MaxPool as SpecMaxPool

    class MaxPool(SpecMaxPool):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
                 storage_order=None, strides=None):
            if not strides or max(strides) == 1:
                ceil_mode = 0
            return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                kernel_shape=kernel_shape, pads=pads, storage_order=storage_order, strides=strides)

    return ReferenceEvaluator(str(path), new_ops=[MaxPool])


# --- runner --------------------------------------------------------------------------------------------------


@register_backend
class OnnxReferenceRunner(Runner):
    """Runs an ONNX file with `onnx.reference.ReferenceEvaluator` (numpy; slow: small models only)."""

    backend = "onnx_reference"
    description = "ONNX reference evaluator (independent numpy oracle, slow)"
    devices = ("cpu",)

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        try:
            import onnx.reference  # noqa: F401
        except ImportError as exc:
            return f"onnx.reference is not available ({exc})"
        return None

    def activate_impl(self) -> None:
        self._session = reference_evaluator(self.path)
        self._input = self._session.input_names[0]
        self._outputs = self.options.get("output_names") or self._session.output_names[:1]

    def run_impl(self, prepared: np.ndarray) -> Any:
        return self._session.run(self._outputs, {self._input: prepared})

    def finish_impl(self, raw: Any) -> np.ndarray:
        return np.asarray(raw[0])

    def deactivate_impl(self) -> None:
        del self._session

    def layer_outputs(self, batch: np.ndarray, *, onnx_source: Path | None, scope_source: Path | None,
                      reference_model: Any) -> tuple[dict[str, list[np.ndarray]], str]:
        """Every node output of the ONNX file, computed by the reference evaluator."""
        def run_outputs(path: Path, names: set[str]) -> dict[str, np.ndarray]:
            evaluator = reference_evaluator(path)
            with np.errstate(all="ignore"):
                return dict(zip(evaluator.output_names, evaluator.run(None, {evaluator.input_names[0]: batch})))

        source = onnx_source or self.path
        return (module_outputs(source, run_outputs, scope_source=scope_source),
                f"{source.name} with every node output exposed, run in onnx_reference")
