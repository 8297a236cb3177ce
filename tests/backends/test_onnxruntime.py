"""ONNX Runtime: the runner (CPU EP, no silent fallback) and the int8 QDQ model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporter.backends import BackendUnavailable
from exporter.backends.onnx import export_onnx, read_metadata
from exporter.backends.onnxruntime import OnnxRuntimeRunner, export_onnxruntime
from exporter.backends.onnxruntime_int8 import (
    INT8_FILE,
    CalibrationDataError,
    batchnorms_as_convolutions,
    fewest_fp32_nodes,
    node_costs,
    quantize_int8,
    write_qdq,
)
from exporter.errors import ExporterError, UsageError
from exporter.machine import int8_dot_product_saturates
from tests.backends.onnx_builds import (  # noqa: F401  (onnx_build is a fixture)
    CHEAP_MODELS,
    FP32_ATOL,
    make_context,
    onnx_build,
    trained_lenet_bn,
)
from tests.conftest import TEST_NUM_CLASSES


@pytest.mark.parametrize("model_name", CHEAP_MODELS)
@pytest.mark.parametrize("artifact", ["onnx-fp32"])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_onnxruntime_cpu_matches_eager(onnx_build, model_name: str, artifact: str, batch_size: int) -> None:
    build = onnx_build(model_name)
    batch = build.batch(batch_size)
    with OnnxRuntimeRunner(build.path(artifact), **build.artifacts[artifact].options) as runner:
        assert runner.session.get_providers()[0] == "CPUExecutionProvider"
        out = runner.infer(batch)
    assert out.shape == (batch_size, TEST_NUM_CLASSES)
    np.testing.assert_allclose(out, build.eager(batch), atol=FP32_ATOL, rtol=0)


def test_session_options_come_from_runner_options(onnx_build) -> None:
    build = onnx_build("lenet")
    runner = OnnxRuntimeRunner(build.path("onnx-fp32"), intra_op_num_threads=1, graph_optimization_level="basic",
                               execution_mode="sequential")
    with runner:
        assert runner.session.get_session_options().intra_op_num_threads == 1
        assert runner.session.get_session_options().graph_optimization_level == \
            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with pytest.raises(UsageError, match="graph_optimization_level"):
        OnnxRuntimeRunner(build.path("onnx-fp32"), graph_optimization_level="max").activate()
    with pytest.raises(UsageError, match="provider 'tensorrt' does not run on device 'cpu'"):
        OnnxRuntimeRunner(build.path("onnx-fp32"), provider="tensorrt").activate()


def test_missing_gpu_provider_is_unavailable_not_a_cpu_fallback(onnx_build) -> None:
    build = onnx_build("lenet")
    # The TensorRT EP is reported missing, or the CUDA EP it needs for the device check before it.
    for provider, name, reason in (
            ("cuda", "CUDAExecutionProvider", "has no CUDAExecutionProvider"),
            ("tensorrt", "TensorrtExecutionProvider", "has no (CUDA|Tensorrt)ExecutionProvider")):
        if name in ort.get_available_providers():
            continue
        with pytest.raises(BackendUnavailable, match=reason):
            OnnxRuntimeRunner(build.path("onnx-fp32"), device="cuda", provider=provider).activate()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDAExecutionProvider" in OnnxRuntimeRunner.unavailable_reason("cuda")


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    """A briefly trained lenet_bn exported to fp32 ONNX and quantized on real training images."""
    model, calibration, test_images, test_labels = trained_lenet_bn()
    ctx = make_context("lenet_bn", tmp_path_factory.mktemp("int8"), model=model, int8=True, calibration=calibration)
    ctx.artifacts += export_onnx(ctx)
    ctx.artifacts += export_onnxruntime(ctx)
    return ctx, test_images, test_labels


def test_int8_qdq_runs_and_keeps_top1_on_real_images(int8_build) -> None:
    ctx, images, labels = int8_build
    artifact = ctx.artifact("onnx-int8")
    assert artifact is not None and artifact.precision == "int8" and artifact.path == INT8_FILE
    model = onnx.load(str(ctx.out_dir / artifact.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    _assert_cpu_int8_layout(model)
    assert read_metadata(ctx.out_dir / artifact.path)["precision"] == "int8"

    with OnnxRuntimeRunner(ctx.out_dir / ctx.artifact("onnx-fp32").path) as fp32, \
            OnnxRuntimeRunner(ctx.out_dir / artifact.path, precision="int8") as int8:
        reference, quantized = fp32.infer(images), int8.infer(images)
    assert not np.array_equal(reference, quantized)  # it really is a different (quantized) computation
    fp32_acc = float((reference.argmax(1) == labels).mean())
    int8_acc = float((quantized.argmax(1) == labels).mean())
    agreement = float((reference.argmax(1) == quantized.argmax(1)).mean())
    assert fp32_acc > 0.8, f"the test model did not train (accuracy {fp32_acc:.2f})"
    assert agreement >= 0.95, f"int8 top-1 agreement {agreement:.3f}"
    assert int8_acc >= fp32_acc - 0.03
    held_back = ctx.diagnostics["onnxruntime"]["int8"]
    assert held_back["calibration_images"] == 192 and held_back["held_back_images"] == 64
    assert held_back["agreement"] >= 0.99 and not held_back["default_failures"] and not held_back["fp32_nodes"]
    # without VNNI, 8-bit weights saturate ORT's u8s8 kernels (on an AVX2 EPYC: 2 of 64 held-back images flipped)
    assert held_back["reduce_range"] == int8_dot_product_saturates()
    assert ("7 bits" in read_metadata(ctx.out_dir / artifact.path)["int8_calibration"]) == held_back["reduce_range"]


def _assert_cpu_int8_layout(model) -> None:
    """uint8 activations (any zero point), per-channel int8 weights with zero point 0: ORT's fast x86 layout."""
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    activations = [initializers[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and {z.dtype for z in activations} == {np.dtype(np.uint8)}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers
               and initializers[n.input[0]].dtype == np.int8]
    assert weights and not any(initializers[n.input[2]].any() for n in weights)
    assert any(initializers[n.input[2]].size > 1 for n in weights)  # per-channel


def test_cpu_int8_file_has_uint8_activations_and_int8_weights(tmp_path) -> None:
    ctx = make_context("lenet_bn", tmp_path, trace=False)
    fp32 = export_onnx(ctx)[0]
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    artifact = quantize_int8(tmp_path / fp32.path, tmp_path / INT8_FILE, calibration, progress=False)
    assert artifact.name == "onnx-int8" and "asymmetric uint8 activations" in artifact.notes[0]
    _assert_cpu_int8_layout(onnx.load(str(tmp_path / INT8_FILE)))


def test_calibration_reads_one_batch_range_at_a_time_and_caches_the_ranges(tmp_path, monkeypatch) -> None:
    from exporter.backends import onnxruntime_int8

    images = np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)
    reader = onnxruntime_int8.ImageCalibrationReader(images, "x", batch_size=16, progress=False)
    assert len(reader) == 3
    reader.set_range(1, 3)
    assert [len(b["x"]) for b in iter(reader.get_next, None)] == [16, 8]

    ctx = make_context("lenet_bn", tmp_path, trace=False)
    fp32 = tmp_path / export_onnx(ctx)[0].path
    seen: list[int] = []
    real_run = onnxruntime_int8.ImageCalibrationReader._batches

    def counting(self):
        for batch in real_run(self):
            seen.append(len(next(iter(batch.values()))))
            yield batch

    monkeypatch.setattr(onnxruntime_int8.ImageCalibrationReader, "_batches", counting)
    cache = tmp_path / "ranges.json"
    first = tmp_path / "first.onnx"
    onnxruntime_int8.write_qdq(fp32, first, images, activation_type="uint8", extra_options={}, layout="test",
                               progress=False, method="Percentile", ranges_cache=cache)
    assert cache.is_file() and seen == [16, 16, 8]  # one batch per collection: memory bounded by one batch
    second = tmp_path / "second.onnx"
    onnxruntime_int8.write_qdq(fp32, second, images, activation_type="uint8", extra_options={}, layout="test",
                               progress=False, method="Percentile", ranges_cache=cache,
                               nodes_to_exclude=[onnx.load(str(fp32)).graph.node[0].name])
    assert seen == [16, 16, 8]  # the second file reused the calibrated ranges


def test_int8_that_fails_its_class_on_held_back_images_leaves_layers_in_fp32(int8_build, tmp_path, capfd) -> None:
    ctx, images, _ = int8_build
    # Calibrated on dimmed images, checked on real ones: MinMax ranges clip the held-back quarter.
    calibration = np.concatenate([images[:48] * 0.1, images[48:64]])
    info: dict = {}
    artifact = quantize_int8(ctx.out_dir / ctx.artifact("onnx-fp32").path, tmp_path / INT8_FILE, calibration,
                             progress=False, info=info)
    assert info["calibration_images"] == 48 and info["held_back_images"] == 16
    measured = info["methods_measured"]
    assert set(measured) == {"MinMax", "Percentile"}
    closer = max(measured, key=lambda m: (measured[m]["agreement"], measured[m]["min_cosine"]))
    assert info["method"] == closer  # the fallback bisects from the method closer to fp32
    assert capfd.readouterr().out == ""  # ORT's histogram calibrator prints; `--json` keeps stdout for the result
    assert info["default_failures"] and info["fp32_nodes"] and info["fp32_layers"]
    assert info["min_cosine"] >= 0.99 and info["agreement"] >= 0.99  # the kept file passes on the held-back images
    assert info["failures"] == []
    assert f"layers left in fp32: {len(info['fp32_layers'])}" in " ".join(artifact.notes)
    assert 0 < info["fp32_share_of_macs"] <= 1
    assert f"{info['fp32_share_of_macs']:.0%} of the multiply-adds" in " ".join(artifact.notes)
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / INT8_FILE)).metadata_props}
    assert stored["int8_fp32_nodes"].split(",") == info["fp32_nodes"]


def test_a_percentile_calibration_that_cannot_run_leaves_the_fallback_to_minmax(int8_build, tmp_path,
                                                                                 monkeypatch) -> None:
    from exporter.backends import onnxruntime_int8

    ctx, images, _ = int8_build
    calibration = np.concatenate([images[:48] * 0.1, images[48:64]])  # MinMax fails on the held-back quarter
    real_write_qdq = onnxruntime_int8.write_qdq

    def write_qdq(*args, method: str = "MinMax", **kwargs):
        if method == "Percentile":  # what numpy says of activations that vanish (untrained mobilenet_v3_large)
            raise ExporterError("int8 quantization failed: ValueError: Too many bins for data range. Cannot "
                                "create 2048 finite-sized bins.")
        return real_write_qdq(*args, method=method, **kwargs)

    monkeypatch.setattr(onnxruntime_int8, "write_qdq", write_qdq)
    info: dict = {}
    quantize_int8(ctx.out_dir / ctx.artifact("onnx-fp32").path, tmp_path / INT8_FILE, calibration, progress=False,
                  info=info)
    assert info["default_failures"] and "Too many bins" in info["methods_measured"]["Percentile"]["error"]
    assert info["method"] == "MinMax" and info["fp32_nodes"] and info["failures"] == []


@pytest.mark.parametrize("share, warned", [(0.9, True), (0.3, False)])
def test_an_int8_file_computing_mostly_in_fp32_is_warned_about(int8_build, monkeypatch: pytest.MonkeyPatch,
                                                               share: float, warned: bool) -> None:
    """No silent downgrade of speed: a file named int8 that runs most of its multiply-adds in fp32 says so."""
    import dataclasses

    from exporter.backends import onnxruntime as ortb

    ctx, _, _ = int8_build
    int8 = ctx.artifact("onnx-int8")

    def quantized(source, target, calibration, *, info, held_back_pool=None, **kwargs):
        info.update(fp32_share_of_macs=share, fp32_layers=["conv1", "conv2"])
        return int8

    monkeypatch.setattr(ortb, "quantize_int8", quantized)
    checked = dataclasses.replace(ctx, warnings=[], artifacts=[a for a in ctx.artifacts if a.name == "onnx-fp32"])
    export_onnxruntime(checked)
    assert any(f"{share:.0%} of its multiply-adds in fp32 (2 layers" in w for w in checked.warnings) is warned


def test_fp32_fallback_bisects_to_the_culprit_nodes() -> None:
    nodes = [f"n{i}" for i in range(32)]
    calls: list[int] = []

    def needs(*culprits: str):
        def passes(run) -> bool:
            calls.append(len(run))
            return set(culprits) <= set(run)
        return passes

    assert fewest_fp32_nodes(nodes, needs("n3")) == ["n3"]
    assert len(calls) <= 2 * 5
    assert fewest_fp32_nodes(nodes, needs("n3", "n17", "n18")) == ["n3", "n17", "n18"]
    calls.clear()
    assert fewest_fp32_nodes(nodes, needs(*nodes), max_trials=6) == nodes  # only the fp32 model passes
    assert len(calls) <= 6


def test_fp32_fallback_tries_the_costliest_kept_nodes_back_in_int8() -> None:
    nodes = [f"n{i}" for i in range(8)]
    calls: list[list[str]] = []

    def passes(run) -> bool:
        calls.append(list(run))
        return "n6" in run

    # two rounds of bisection only find that the right half passes; the pruning rounds, costliest first, find n6
    assert fewest_fp32_nodes(nodes, passes, cost=nodes.index, max_trials=2) == ["n6"]
    assert calls[2:] == [["n4", "n5", "n6"], ["n4", "n5"], ["n4", "n6"], ["n6"]]
    calls.clear()
    assert fewest_fp32_nodes(nodes, passes, cost=nodes.index, max_trials=2, prune_trials=1) == ["n4", "n5", "n6"]
    assert len(calls) == 3


def test_node_costs_are_multiply_adds_for_convolutions_and_elements_elsewhere(tmp_path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 5])
    weights = [numpy_helper.from_array(np.zeros((4, 2, 3, 3), np.float32), "w"),
               numpy_helper.from_array(np.zeros((5, 4), np.float32), "fc"),
               numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")]
    graph = helper.make_graph([
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["out"], name="head", transB=1),
    ], "tiny", [x], [y], weights)
    onnx.save(onnx.shape_inference.infer_shapes(helper.make_model(graph)), str(tmp_path / "m.onnx"))
    costs = node_costs(tmp_path / "m.onnx")
    assert list(costs) == ["conv", "relu", "pool", "flat", "head"]  # topological order
    assert costs["conv"] == 4 * 8 * 8 * (2 * 3 * 3) and costs["relu"] == 4 * 8 * 8
    assert costs["head"] == 5 * 4 and costs["pool"] == 4


def _preactivation_onnx(path) -> None:
    """conv → add → BatchNormalization → relu → conv → pool → gemm: a BN after an Add, which no convolution absorbs
    (DenseNet's and ResNet v2's pre-activation)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.5, (4, 2, 3, 3)), "w2": rng.normal(0, 0.5, (4, 4, 3, 3)),
               "gamma": rng.uniform(0.5, 2, 4), "beta": rng.normal(0, 1, 4), "mean": rng.normal(0, 1, 4),
               "var": rng.uniform(0.5, 2, 4), "fc": rng.normal(0, 0.5, (5, 4)), "shape": np.array([-1, 4])}
    graph = helper.make_graph([
        helper.make_node("Conv", ["input", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "c"], ["a"], name="add"),
        helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["b"], name="bn",
                         epsilon=1e-3),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="head", transB=1),
    ], "preactivation", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k) for k, v in weights.items()])
    onnx.save(onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17)])), str(path))


def test_a_batchnorm_no_convolution_absorbs_stays_int8_as_a_depthwise_convolution(tmp_path) -> None:
    from exporter.backends.onnxruntime_int8 import prepare_for_quantization

    _preactivation_onnx(tmp_path / "m.onnx")
    images = np.random.default_rng(1).normal(0, 1, (32, 2, 8, 8)).astype(np.float32)
    rewritten = prepare_for_quantization(tmp_path / "m.onnx", tmp_path)
    assert batchnorms_as_convolutions(rewritten) == 1
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(rewritten)).graph.node}

    def logits(path, **options) -> np.ndarray:
        session_options = ort.SessionOptions()
        for key, value in options.items():
            setattr(session_options, key, value)
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        return session.run(None, {"input": images})[0]

    np.testing.assert_allclose(logits(rewritten), logits(tmp_path / "m.onnx"), rtol=1e-5, atol=1e-5)

    info: dict = {}
    artifact = quantize_int8(tmp_path / "m.onnx", tmp_path / INT8_FILE, images, progress=False, info=info)
    assert info["batchnorms_as_convolutions"] == 1
    assert any("1 BatchNormalizations no convolution could absorb" in note for note in artifact.notes)
    # in ONNX Runtime's own optimised graph the BN is an int8 convolution, with no fp32 island around it
    logits(tmp_path / INT8_FILE, optimized_model_filepath=str(tmp_path / "optimized.onnx"))
    optimized = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "BatchNormalization" not in optimized and "QLinearConv" in optimized


def _tiny_onnx(path, offset: float) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 28, 28])
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [1], [offset])
    graph = helper.make_graph([helper.make_node("Add", ["input", "bias"], ["logits"])], "tiny", [x], [y], [bias])
    onnx.save(helper.make_model(graph), str(path))


def test_tensorrt_provider_caches_engines_per_onnx_file_with_a_batch_profile(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EXPORTER_CACHE_DIR", str(tmp_path / "cache"))
    _tiny_onnx(tmp_path / "a.onnx", 1.0)
    _tiny_onnx(tmp_path / "b.onnx", 2.0)  # same graph, other weights: ORT's engine cache key would not tell
    options = OnnxRuntimeRunner(tmp_path / "a.onnx", device="cuda", provider="tensorrt", precision="tf32",
                                min_batch=1, max_batch=64)._provider_options()
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "1"
    folder = Path(options["trt_engine_cache_path"])
    assert options["trt_timing_cache_path"] == str(folder) and folder.parent == tmp_path / "cache" / "ort-tensorrt"
    assert (options["trt_profile_min_shapes"], options["trt_profile_opt_shapes"], options["trt_profile_max_shapes"]) \
        == ("input:1x1x28x28", "input:16x1x28x28", "input:64x1x28x28")
    other = OnnxRuntimeRunner(tmp_path / "b.onnx", device="cuda", provider="tensorrt", max_batch=64)
    assert other._provider_options()["trt_engine_cache_path"] != str(folder)
    chosen = OnnxRuntimeRunner(tmp_path / "a.onnx", device="cuda", provider="tensorrt",
                               trt_cache_dir=str(tmp_path / "mine"))._provider_options()
    assert chosen["trt_engine_cache_path"] == str(tmp_path / "mine") and "trt_profile_min_shapes" not in chosen


def test_int8_without_calibration_is_one_clear_error_and_writes_nothing(tmp_path) -> None:
    ctx = make_context("lenet", tmp_path, int8=True, calibration=None)
    ctx.artifacts += export_onnx(ctx)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CalibrationDataError, match="--int8 needs calibration images"):
        export_onnxruntime(ctx)
    ctx.calibration = np.zeros((4, 3, 28, 28), dtype=np.float32)
    with pytest.raises(CalibrationDataError, match=r"expected N×1×28×28"):
        export_onnxruntime(ctx)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_needs_the_onnx_artifact(tmp_path) -> None:
    ctx = make_context("lenet", tmp_path, trace=False)
    with pytest.raises(BackendUnavailable, match="fp32 ONNX"):
        export_onnxruntime(ctx)


def test_int8_of_a_file_with_external_weights_is_one_clear_error(tmp_path, monkeypatch) -> None:
    from exporter.backends import onnx as onnx_backend
    from exporter.errors import ExporterError

    monkeypatch.setattr(onnx_backend, "INLINE_WEIGHTS_LIMIT_BYTES", 20_000)
    ctx = make_context("lenet", tmp_path, trace=False)
    fp32 = export_onnx(ctx)[0]
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    with pytest.raises(ExporterError, match=r"model.onnx.data \(over 2 GiB\).*openvino-int8"):
        quantize_int8(tmp_path / fp32.path, tmp_path / INT8_FILE, calibration, progress=False)
    with pytest.raises(ExporterError, match=r"model.onnx.data \(over 2 GiB\)"):  # TensorRT's QDQ copy too
        write_qdq(tmp_path / fp32.path, tmp_path / "model.int8-tensorrt.onnx", calibration, activation_type="int8",
                  extra_options={}, layout="symmetric", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
