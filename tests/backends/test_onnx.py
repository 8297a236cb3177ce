"""The ONNX artifact (`export_onnx`), the reference-evaluator runner and the bisection helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from exporter.backends import BACKENDS, runner_for
from exporter.backends.onnx import (
    BATCH_DIM,
    ONNX_OPSET,
    OnnxExportError,
    OnnxReferenceRunner,
    add_intermediate_outputs,
    check_and_save,
    export_onnx,
    module_output_tensors,
    read_metadata,
    reference_evaluator,
    topological_sort,
)
from tests.backends.onnx_builds import CHEAP_MODELS, FP32_ATOL, METADATA, make_context, onnx_build  # noqa: F401
from tests.conftest import TEST_NUM_CLASSES

# Loose enough for fp16 / bf16 / int8 rounding of random-weight logits, tight enough to catch a wrong graph.
CLASS_TOLERANCE = {"fp32": FP32_ATOL, "tf32": 1e-3, "bf16": 2e-2, "fp16": 1e-2, "int8": 5e-2}


@pytest.mark.parametrize("model_name", CHEAP_MODELS)
def test_onnx_file_is_checked_dynamic_and_self_describing(onnx_build, model_name: str) -> None:
    build = onnx_build(model_name)
    path = build.path("onnx-fp32")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= ONNX_OPSET
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == [BATCH_DIM, *build.ctx.input_shape]
    assert out_dims == [BATCH_DIM, TEST_NUM_CLASSES]
    meta = read_metadata(path)
    assert meta["model_name"] == model_name and meta["input_layout"] == "NCHW"
    assert meta["input_shape"] == ",".join(map(str, build.ctx.input_shape))
    for key, value in METADATA.items():
        assert meta[key] == value
    assert build.ctx.diagnostics["onnx"]["opset"] >= ONNX_OPSET


@pytest.mark.parametrize("model_name", CHEAP_MODELS)
@pytest.mark.parametrize("batch_size", [1, 7])
def test_reference_evaluator_matches_eager(onnx_build, model_name: str, batch_size: int) -> None:
    build = onnx_build(model_name)
    assert build.artifacts["onnx-reference"].backend == "onnx_reference"
    batch = build.batch(batch_size)
    with OnnxReferenceRunner(build.path("onnx-reference")) as runner:
        out = runner.infer(batch)
    assert out.shape == (batch_size, TEST_NUM_CLASSES)
    np.testing.assert_allclose(out, build.eager(batch), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("model_name", CHEAP_MODELS)
def test_every_artifact_runs_and_matches_eager(onnx_build, model_name: str) -> None:
    """Each artifact of the ONNX-family exports, through its registered runner, within its precision class."""
    build = onnx_build(model_name)
    batch = build.batch(7)
    reference = build.eager(batch)
    ran = []
    for artifact in build.artifacts.values():
        if BACKENDS[artifact.backend].unavailable_reason(artifact.device):
            continue
        with runner_for(artifact, build.out_dir) as runner:
            out = runner.infer(batch)
        error = float(np.abs(out - reference).max())
        assert np.isfinite(out).all(), artifact.name
        assert error <= CLASS_TOLERANCE[artifact.precision], f"{artifact.name}: max abs error {error:.3g}"
        ran.append(artifact.name)
    assert {"onnx-fp32", "onnx-reference", "onnx-fp16", "openvino-fp32"} <= set(ran)


@pytest.mark.parametrize("model_name", CHEAP_MODELS)
def test_fp16_onnx_keeps_fp32_io_and_stores_fp16_weights(onnx_build, model_name: str) -> None:
    build = onnx_build(model_name)
    assert build.artifacts["onnx-fp16"].precision == "fp16"
    model = onnx.load(str(build.path("onnx-fp16")))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if len(t.dims) > 1]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert read_metadata(build.path("onnx-fp16"))["precision"] == "fp16"
    assert build.path("onnx-fp16").stat().st_size < 0.6 * build.path("onnx-fp32").stat().st_size


def test_static_batch_export_from_the_module(tmp_path) -> None:
    """Without an ExportedProgram the module itself is exported; a static batch stays static."""
    ctx = make_context("lenet", tmp_path, trace=False, static_batch=3)
    artifacts = export_onnx(ctx)
    model = onnx.load(str(tmp_path / artifacts[0].path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, *ctx.input_shape]
    assert read_metadata(tmp_path / artifacts[0].path)["batch"] == "3"
    batch = np.random.default_rng(0).random((3, *ctx.input_shape), dtype=np.float32)
    with OnnxReferenceRunner(tmp_path / artifacts[0].path) as runner:
        np.testing.assert_allclose(runner.infer(batch), ctx.model(torch.from_numpy(batch)).detach().numpy(),
                                   atol=FP32_ATOL, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("model_name", ["lenet_bn", "resnet18"])
def test_intermediate_outputs_map_back_to_pytorch_modules(onnx_build, tmp_path, model_name: str) -> None:
    """Every module the bisection finds in the ONNX graph computes the same tensor as in PyTorch."""
    import onnxruntime as ort

    build = onnx_build(model_name)
    mapping = add_intermediate_outputs(build.path("onnx-fp32"), tmp_path / "all.onnx")
    modules = dict(build.model.named_modules())
    assert mapping and set(mapping.values()) <= set(modules)
    by_module = module_output_tensors(mapping)
    assert by_module[""] == "logits"

    captured: dict[str, np.ndarray] = {}

    def keep(name: str):
        return lambda m, i, o: captured.__setitem__(name, o.detach().clone().numpy())

    hooks = [module.register_forward_hook(keep(name)) for name, module in modules.items() if name in by_module and name]
    batch = build.batch(2)
    try:
        build.eager(batch)
    finally:
        for hook in hooks:
            hook.remove()
    session = ort.InferenceSession(str(tmp_path / "all.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"input": batch})))
    compared = 0
    for module_name, tensor in by_module.items():
        if module_name:
            np.testing.assert_allclose(values[tensor], captured[module_name], atol=FP32_ATOL, rtol=0,
                                       err_msg=f"{module_name} ↔ {tensor}")
            compared += 1
    assert compared >= 5


def test_topological_sort_fixes_out_of_order_nodes(tmp_path) -> None:
    from onnx import TensorProto, helper

    relu = helper.make_node("Relu", ["mid"], ["y"], name="relu")
    neg = helper.make_node("Neg", ["x"], ["mid"], name="neg")
    graph = helper.make_graph([relu, neg], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(OnnxExportError, match="fails the ONNX checker"):
        check_and_save(model, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    topological_sort(model.graph)
    assert [n.name for n in model.graph.node] == ["neg", "relu"]
    check_and_save(model, tmp_path / "good.onnx")
    with OnnxReferenceRunner(tmp_path / "good.onnx") as runner:
        np.testing.assert_array_equal(runner.run(np.array([1.0, -2.0], dtype=np.float32))[0], [0.0, 2.0])


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_evaluator_pools_in_ceil_mode_like_torch(tmp_path, stride: int) -> None:
    """onnx 1.23's own evaluator gives 14×14 for this stride-1 pool (torchvision's GoogLeNet has it)."""
    from onnx import TensorProto, helper

    pool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[stride, stride],
                            pads=[1, 1, 1, 1], ceil_mode=1)
    graph = helper.make_graph([pool], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    check_and_save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "pool.onnx")
    x = torch.rand(1, 2, 12, 12)
    expected = torch.nn.MaxPool2d(3, stride=stride, padding=1, ceil_mode=True)(x).numpy()
    (result,) = reference_evaluator(tmp_path / "pool.onnx").run(None, {"x": x.numpy()})
    np.testing.assert_array_equal(result, expected)


def test_reference_runner_reports_a_missing_file(tmp_path) -> None:
    from exporter.backends import RunnerError

    with pytest.raises(RunnerError, match="does not exist"):
        OnnxReferenceRunner(tmp_path / "missing.onnx").activate()


class _DataDependent(torch.nn.Module):
    """A model torch.export cannot trace: Python control flow on a tensor value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x.flatten(1)[:, :TEST_NUM_CLASSES]
        return -x.flatten(1)[:, :TEST_NUM_CLASSES]


def test_an_untraceable_model_is_one_clear_error_and_writes_nothing(tmp_path) -> None:
    ctx = make_context("lenet", tmp_path, model=_DataDependent().eval(), trace=False)
    with pytest.raises(OnnxExportError) as info:
        export_onnx(ctx)
    message = str(info.value)
    assert message.startswith("torch.onnx.export failed for lenet: ") and "\n" not in message
    assert "data-dependent" in message and "\x1b" not in message  # the root cause, without terminal colours
    assert list(tmp_path.iterdir()) == []


def test_weights_past_protobufs_limit_go_to_an_external_data_file(tmp_path, monkeypatch) -> None:
    """A model too big for one protobuf keeps its weights in `<file>.data` beside the file, checked like any other;
    every runner reads it, and the bisection's instrumented copy works from elsewhere (lenet's ~0.2 MB of weights
    stand in for 2 GiB)."""
    import onnxruntime as ort

    from exporter.backends import onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "INLINE_WEIGHTS_LIMIT_BYTES", 20_000)
    ctx = make_context("lenet", tmp_path / "build", fp16=True)
    artifacts = {a.name: a for a in export_onnx(ctx)}
    assert {"onnx-fp32", "onnx-fp16", "onnx-reference"} <= set(artifacts)
    for name in ("onnx-fp32", "onnx-fp16"):
        path = ctx.out_dir / artifacts[name].path
        data = onnx_backend.external_data_file(path)
        assert data.stat().st_size > 20_000 > path.stat().st_size, name
        assert onnx_backend.uses_external_data(onnx.load(str(path), load_external_data=False))
        onnx.checker.check_model(str(path), full_check=True)
        assert read_metadata(path)["model_name"] == "lenet"
    assert "GiB of weights in model.onnx.data" in ctx.diagnostics["onnx"]["external_data"]
    assert sorted(p.name for p in ctx.out_dir.iterdir()) == ["model.fp16.onnx", "model.fp16.onnx.data",
                                                            "model.onnx", "model.onnx.data"]
    batch = np.random.default_rng(0).random((3, *ctx.input_shape), dtype=np.float32)
    reference = ctx.model(torch.from_numpy(batch)).detach().numpy()
    for artifact in artifacts.values():
        with runner_for(artifact, ctx.out_dir) as runner:
            out = runner.infer(batch)
        assert np.abs(out - reference).max() <= CLASS_TOLERANCE[artifact.precision], artifact.name

    elsewhere = tmp_path / "bisect" / "all.onnx"
    elsewhere.parent.mkdir()
    mapping = add_intermediate_outputs(ctx.out_dir / "model.onnx", elsewhere)
    assert mapping and onnx_backend.external_data_file(elsewhere).is_file()
    session = ort.InferenceSession(str(elsewhere), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": batch})[0]
    np.testing.assert_allclose(logits, reference, atol=FP32_ATOL, rtol=0)


def test_a_model_under_the_limit_keeps_its_weights_inside(onnx_build) -> None:
    build = onnx_build("lenet")
    assert not list(build.out_dir.glob("*.data"))
    assert "external_data" not in build.ctx.diagnostics["onnx"]
