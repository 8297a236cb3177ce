"""OpenVINO: the IR export and the runner's explicit, read-back inference precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from exporter.backends import RunnerError, runner_for
from exporter.backends.openvino import (
    MAX_STATIC_SHAPES,
    OpenVinoRunner,
    cpu_supports_bf16,
    export_openvino,
    ov_type_to_precision,
)
from exporter.errors import UsageError
from tests.backends.onnx_builds import CHEAP_MODELS, FP32_ATOL, make_context, onnx_build  # noqa: F401
from tests.conftest import TEST_NUM_CLASSES

HAS_BF16 = cpu_supports_bf16()
HAS_FP16 = "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize("model_name", CHEAP_MODELS)
@pytest.mark.parametrize("source", ["ir", "onnx"])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_f32_executes_f32_and_matches_eager(onnx_build, model_name: str, source: str, batch_size: int) -> None:
    build = onnx_build(model_name)
    path = build.path("openvino-fp32" if source == "ir" else "onnx-fp32")  # OpenVINO reads the ONNX file too
    batch = build.batch(batch_size)
    with OpenVinoRunner(path, precision="fp32", inference_precision="f32") as runner:
        assert runner.executed_precision == "fp32"
        out = runner.infer(batch)
    assert out.shape == (batch_size, TEST_NUM_CLASSES)
    np.testing.assert_allclose(out, build.eager(batch), atol=FP32_ATOL, rtol=0)


def test_fp32_is_the_default_even_where_the_plugin_prefers_bf16(onnx_build) -> None:
    """With no option at all, an fp32 runner compiles with an explicit f32 hint, never the CPU's bf16 default."""
    build = onnx_build("lenet")
    runner = OpenVinoRunner(build.path("openvino-fp32"))
    assert runner.compile_config()["INFERENCE_PRECISION_HINT"] == "f32"
    with runner:
        assert runner.executed_precision == "fp32"
        assert ov_type_to_precision(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) == "fp32"


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (no AVX-512 bf16 / AMX)")
@pytest.mark.parametrize("model_name", CHEAP_MODELS)
def test_bf16_variant_is_explicit_and_really_runs_bf16(onnx_build, model_name: str) -> None:
    build = onnx_build(model_name)
    artifact = build.artifacts["openvino-bf16"]
    assert artifact.precision == "bf16" and artifact.options == {"inference_precision": "bf16"}
    assert artifact.path == build.artifacts["openvino-fp32"].path  # the same IR, another precision
    batch = build.batch(7)
    with OpenVinoRunner(build.path("openvino-bf16"), precision="bf16", **artifact.options) as bf16, \
            OpenVinoRunner(build.path("openvino-fp32"), precision="fp32", inference_precision="f32") as f32:
        assert bf16.executed_precision == "bf16"
        low, high = bf16.infer(batch), f32.infer(batch)
    reference = build.eager(batch)
    # bf16 has an 8-bit mantissa (relative rounding ~4e-3): visibly different from f32, whose relative error is
    # ~1e-6 (proves the hint is applied), yet close.
    assert np.abs(low - high).max() > 1e-4 * float(np.abs(high).max())
    assert np.abs(low - reference).max() <= 2e-2 * max(1.0, float(np.abs(reference).max()))


@pytest.mark.skipif(HAS_FP16, reason="this CPU executes f16 natively")
def test_f16_request_on_a_cpu_without_fp16_is_refused(onnx_build) -> None:
    build = onnx_build("lenet")
    with pytest.raises(RunnerError, match="asked for f16 inference but the CPU plugin would execute"):
        OpenVinoRunner(build.path("openvino-fp32"), precision="fp16").activate()


@pytest.mark.parametrize("model_name", CHEAP_MODELS)
def test_fp16_compressed_ir_is_smaller_and_close(onnx_build, model_name: str) -> None:
    build = onnx_build(model_name)
    artifact = build.artifacts["openvino-fp16"]
    assert artifact.precision == "fp16" and artifact.options["inference_precision"] == "f32"
    fp32_bin = build.path("openvino-fp32").with_suffix(".bin").stat().st_size
    fp16_bin = build.path("openvino-fp16").with_suffix(".bin").stat().st_size
    assert fp16_bin < 0.6 * fp32_bin
    batch = build.batch(7)
    with OpenVinoRunner(build.path("openvino-fp16"), precision="fp16", **artifact.options) as runner:
        assert runner.executed_precision == "fp32"  # fp16 weights, f32 arithmetic on this CPU
        out = runner.infer(batch)
    reference = build.eager(batch)
    assert 0 < np.abs(out - reference).max() <= 1e-2 * max(1.0, float(np.abs(reference).max()))


def test_ir_carries_the_build_metadata(onnx_build) -> None:
    build = onnx_build("lenet")
    model = ov.Core().read_model(str(build.path("openvino-fp32")))
    assert model.get_rt_info(["exporter", "model_name"]).astype(str) == "lenet"
    assert model.get_rt_info(["exporter", "input_layout"]).astype(str) == "NCHW"
    assert model.get_rt_info(["exporter", "checkpoint_sha256"]).astype(str) == "0" * 64


def test_export_from_the_exported_program_without_onnx(tmp_path) -> None:
    ctx = make_context("lenet_bn", tmp_path)
    artifacts = {a.name: a for a in export_openvino(ctx)}
    assert ctx.diagnostics["openvino"]["converted_from"] == "torch"
    assert ("openvino-bf16" in artifacts) == HAS_BF16 and "openvino-fp16" not in artifacts
    import torch

    for batch_size in (1, 7):
        batch = np.random.default_rng(batch_size).random((batch_size, *ctx.input_shape), dtype=np.float32)
        with OpenVinoRunner(tmp_path / artifacts["openvino-fp32"].path, inference_precision="f32") as runner:
            out = runner.infer(batch)
        with torch.inference_mode():
            np.testing.assert_allclose(out, ctx.model(torch.from_numpy(batch)).numpy(), atol=FP32_ATOL, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_bad_runner_options_are_one_line_usage_errors(onnx_build) -> None:
    path = onnx_build("lenet").path("openvino-fp32")
    with pytest.raises(UsageError, match="inference_precision must be one of"):
        OpenVinoRunner(path, inference_precision="int4").activate()
    with pytest.raises(UsageError, match="performance_hint"):
        OpenVinoRunner(path, performance_hint="FASTEST").activate()
    with OpenVinoRunner(path, performance_hint="latency", num_streams=1, inference_num_threads=1) as runner:
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert runner.infer(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, TEST_NUM_CLASSES)


def test_a_dynamic_ir_is_compiled_once_per_batch_shape_and_computes_the_same(onnx_build) -> None:
    """Each batch shape gets its own statically compiled model (the first MAX_STATIC_SHAPES of them; later ones run
    the dynamic model), with outputs equal to the dynamic model's; `static_shapes=False` (the peers) never does."""
    build = onnx_build("lenet")
    path = build.path("openvino-fp32")
    sizes = list(range(1, MAX_STATIC_SHAPES + 3))
    with OpenVinoRunner(path, static_shapes=False) as dynamic:
        expected = {n: dynamic.infer(build.batch(n)) for n in sizes}
        assert not dynamic.static_requests
    with OpenVinoRunner(path) as runner:
        for n in sizes + sizes:
            np.testing.assert_allclose(runner.infer(build.batch(n)), expected[n], atol=1e-5, rtol=0)
        compiled = [shape for shape, request in runner.static_requests.items() if request is not None]
        assert [shape[0] for shape in compiled] == sizes[:MAX_STATIC_SHAPES]
        assert all(runner.static_requests[(n, *build.batch(n).shape[1:])] is None for n in sizes[MAX_STATIC_SHAPES:])
        request = runner.request_for(build.batch(2).shape)
        assert request.get_compiled_model().inputs[0].get_partial_shape().is_static
    # only the batch is specialised: resnet18 (global pooling) would run 40 × 40 if its IR were reshaped to it
    with OpenVinoRunner(onnx_build("resnet18").path("openvino-fp32")) as runner:
        with pytest.raises(RunnerError, match="inference failed"):
            runner.infer(np.zeros((1, 1, 40, 40), np.float32))
    with pytest.raises(UsageError, match="static_shapes must be true or false"):
        OpenVinoRunner(path, static_shapes="yes").activate()


def test_int8_accuracy_metric_takes_nncf_iterables_and_holds_every_bar() -> None:
    """NNCF's accuracy control hands the validation function an iterable without a length; the score reaches
    INT8_MIN_COSINE only when the worst cosine, the top-1 agreement and the absolute error all meet their bars."""
    from exporter.backends.base import INT8_ABS_SHARE, INT8_MIN_AGREEMENT, INT8_MIN_COSINE
    from exporter.backends.openvino_int8 import held_back_score

    def compiled(x: np.ndarray, share_inputs: bool = True) -> list[np.ndarray]:
        assert not share_inputs  # OpenVINO would keep using the caller's array (`run_compiled`)
        return [np.eye(3, dtype=np.float32)[[int(x.sum()) % 3]]]

    items = [(np.full((1, 1), v, np.float32), np.eye(3)[label]) for v, label in ((0, 0), (1, 1), (2, 0), (4, 1))]
    assert held_back_score(compiled, iter(items)) == pytest.approx(0.0)  # image 2 points elsewhere
    assert held_back_score(compiled, iter(items[:2])) == pytest.approx(1.0)
    assert held_back_score(compiled, []) == 1.0

    def near(x: np.ndarray, share_inputs: bool = True) -> list[np.ndarray]:
        # cosine ≈ 0.9999 everywhere, but image 0's top-1 flips
        return [np.array([[1.0, 1.01, 0.0]]) if x.sum() == 0 else np.array([[1.0, 0.99, 0.0]])]

    tied = [(np.full((1, 1), v, np.float32), np.array([1.0, 0.99, 0.0])) for v in range(50)]
    assert held_back_score(near, iter(tied)) == pytest.approx(1 - 0.02 * (1 - INT8_MIN_COSINE)
                                                                / (1 - INT8_MIN_AGREEMENT))
    assert held_back_score(near, iter(tied)) < INT8_MIN_COSINE  # 1 flip in 50 = agreement 0.98 < 0.995
    # the 50 as the hardest of 1,000 training images: 1 flip in 1,000 = agreement 0.999
    assert held_back_score(near, iter(tied), pool=1000) == pytest.approx(1 - 0.001 * (1 - INT8_MIN_COSINE)
                                                                         / (1 - INT8_MIN_AGREEMENT))
    assert held_back_score(near, iter(tied), pool=1000) > INT8_MIN_COSINE

    def scaled(x: np.ndarray, share_inputs: bool = True) -> list[np.ndarray]:
        # same direction, same top-1, error 4.5 > atol 1 + 0.1·30
        return [np.array([[34.5, 0.0, 0.0]])]

    large = [(np.zeros((1, 1), np.float32), np.array([30.0, 0.0, 0.0]))]
    expected = 1 - 4.5 / (4.0 * INT8_ABS_SHARE) * (1 - INT8_MIN_COSINE)
    assert held_back_score(scaled, iter(large)) == pytest.approx(expected)


def test_nncf_progress_stays_off_json_stdout(tmp_path) -> None:
    """NNCF draws progress bars on stdout; `exporter build --json` must still print one JSON document there."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "exporter", "build", "lenet_bn", "--untrained", "--int8",
                           "--backends", "onnx,openvino", "--parity-samples", "8", "--max-batch", "8",
                           "--artifacts", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert "openvino-int8" in {a["name"] for a in summary["artifacts"]}

    # What NNCF leaves unquantized runs where the plugin would put it (bf16 where native); the runner says int8.
    from exporter.manifest import artifact_from_entry

    manifest = json.loads(Path(summary["manifest"]).read_text())
    entry = next(a for a in manifest["artifacts"] if a["name"] == "openvino-int8")
    rest = "bf16" if cpu_supports_bf16() else "f32"
    assert entry["options"]["inference_precision"] == rest
    assert manifest["diagnostics"]["openvino"]["int8"]["unquantized_layers_run_in"] == rest
    with runner_for(artifact_from_entry(entry), Path(summary["manifest"]).parent) as runner:
        assert runner.executed_precision == "int8"

    # Without VNNI the CPU plugin's int8 dot products saturate: NNCF's overflow fix on every layer (7-bit weights)
    from exporter.machine import int8_dot_product_saturates

    saturates = int8_dot_product_saturates()
    int8 = manifest["diagnostics"]["openvino"]["int8"]
    assert ("7-bit" in int8["overflow_fix"]) == saturates and ("7 bits" in entry["notes"][0]) == saturates
    ir = ov.Core().read_model(str(Path(summary["manifest"]).parent / entry["path"]))
    weights = [op.get_data() for op in ir.get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert len(weights) == 5  # lenet_bn's two convolutions and three linear layers
    assert (max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64) == saturates


def test_run_compiled_never_lets_openvino_write_into_the_callers_images(onnx_build) -> None:
    """After `compiled(images[i:i + 1])` with OpenVINO's default shared inputs, another request of the same compiled
    model wrote its input into the last image (OpenVINO 2026.4); `run_compiled` copies, so the images stay as they
    were."""
    from exporter.backends.openvino import run_compiled, shared_core

    build = onnx_build("lenet_bn")
    compiled = shared_core().compile_model(str(build.path("openvino-fp32")), "CPU")
    images = np.random.default_rng(0).random((4, *build.ctx.input_shape), dtype=np.float32)
    kept = images.copy()
    first = [np.asarray(run_compiled(compiled, images[i:i + 1])[0]).copy() for i in range(len(images))]
    compiled.create_infer_request().infer({0: np.zeros_like(images[:1])})
    np.testing.assert_array_equal(images, kept)
    np.testing.assert_array_equal(np.asarray(run_compiled(compiled, images[3:4])[0]), first[3])


def test_one_core_serves_the_whole_process() -> None:
    # A released Core unloads the CPU plugin and leaves Python's signal handlers on a freed alternate stack.
    from exporter.backends.openvino import shared_core

    assert shared_core() is shared_core()


@pytest.mark.parametrize("histogram_is_closer", [True, False])
@pytest.mark.parametrize("onnxruntime_fp32_layers", [0, 2])
def test_int8_candidates_in_order_until_one_passes(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                   histogram_is_closer: bool, onnxruntime_fp32_layers: int) -> None:
    """NNCF's default failing the build bars: the MIXED preset with the classifier unquantized next (here neither
    passing nor closer); histogram activation ranges, kept when closer; then, where the build's ORT int8 left layers
    in fp32, those layers ignored; accuracy control only if all fail, starting from the kept ranges and ignored
    layers, with bounded iterations."""
    import nncf

    from exporter.backends import openvino_int8 as ovb

    monkeypatch.setattr(ovb, "cpu_supports_bf16", lambda core=None: False)  # one verdict per candidate
    seed = [f"conv{i}" for i in range(onnxruntime_fp32_layers)]
    monkeypatch.setattr(ovb, "ignored_scope_from_onnxruntime", lambda ctx, model: seed)
    verdicts = iter([(["default: cosine"], 0.99, 0.95), (["mixed: flips"], 0.98, 0.97),
                     ([], 1.0, 0.999) if histogram_is_closer else (["histogram: worse"], 0.98, 0.90)]
                    + ([(["seed: closer"], 0.992, 0.99)] if seed and not histogram_is_closer else [])
                    + [([], 1.0, 0.998)])  # after accuracy control
    monkeypatch.setattr(ovb, "int8_held_back_verdict", lambda reference, output, pool=None: next(verdicts))
    ignored_scopes, presets, controlled = [], [], []
    quantize = nncf.quantize

    def recording_quantize(model, dataset, *args, ignored_scope=None, preset=None, **kwargs):
        ignored_scopes.append(ignored_scope and ignored_scope.names)
        presets.append(preset)
        return quantize(model, dataset, *args, preset=preset, **kwargs)

    def accuracy_control(model, *args, advanced_quantization_parameters=None, ignored_scope=None,
                         advanced_accuracy_restorer_parameters=None, **kwargs):
        controlled.append((advanced_quantization_parameters, ignored_scope and ignored_scope.names,
                           advanced_accuracy_restorer_parameters))
        return model

    monkeypatch.setattr(nncf, "quantize", recording_quantize)
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", accuracy_control)
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    ctx = make_context("lenet_bn", tmp_path, int8=True, calibration=calibration)
    artifact = {a.name: a for a in export_openvino(ctx)}["openvino-int8"]
    assert artifact.options == {"inference_precision": "f32"}
    info = ctx.diagnostics["openvino"]["int8"]
    assert info["default_failures"] == ["default: cosine"]
    head = ignored_scopes[1]
    assert len(head) == 1 and presets[:3] == [None, nncf.QuantizationPreset.MIXED, None]  # the classifier's MatMul
    if histogram_is_closer:
        assert info["method"].startswith("nncf.quantize (histogram") and not controlled and not info["failures"]
        assert ignored_scopes == [None, head, None]
        assert set(info["methods_measured"]) == {"default", "mixed_head_fp32", "histogram"}
        return
    assert ignored_scopes == [None, head, None] + ([seed] if seed else [])
    assert set(info["methods_measured"]) == ({"default", "mixed_head_fp32", "histogram", "accuracy_control"}
                                             | ({"onnxruntime_fp32_layers"} if seed else set()))
    assert len(controlled) == 1 and "accuracy_control" in info["method"] and "histogram" not in info["method"]
    ranges, ignored, restorer = controlled[0]
    assert getattr(ranges, "activations_range_estimator_params", None) != \
        nncf.quantization.range_estimator.RangeEstimatorParametersSet.HISTOGRAM  # the default ranges were closer
    assert ignored == (seed or None)  # accuracy control starts from the closer ignored scope
    assert restorer.max_num_iterations == ovb.ACCURACY_CONTROL_MAX_REVERTED
    assert restorer.ranking_subset_size == ovb.ACCURACY_CONTROL_RANKING_IMAGES


def test_histogram_ranges_that_cannot_be_made_are_recorded_and_skipped(tmp_path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy makes no histogram of activations within a few float steps of one value (an untrained torchvision
    mobilenet_v3_large's vanish): that candidate is recorded with its error and the search goes on."""
    import nncf
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from exporter.backends import openvino_int8 as ovb

    monkeypatch.setattr(ovb, "cpu_supports_bf16", lambda core=None: False)
    monkeypatch.setattr(ovb, "ignored_scope_from_onnxruntime", lambda ctx, model: [])
    verdicts = iter([(["default: cosine"], 0.99, 0.95), (["mixed: flips"], 0.98, 0.97), ([], 1.0, 0.998)])
    monkeypatch.setattr(ovb, "int8_held_back_verdict", lambda reference, output, pool=None: next(verdicts))
    quantize, controlled = nncf.quantize, []

    def quantize_without_histograms(model, dataset, *args, advanced_parameters=None, **kwargs):
        ranges = getattr(advanced_parameters, "activations_range_estimator_params", None)
        if ranges == RangeEstimatorParametersSet.HISTOGRAM:
            raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")
        return quantize(model, dataset, *args, advanced_parameters=advanced_parameters, **kwargs)

    def accuracy_control(model, *args, advanced_quantization_parameters=None, **kwargs):
        controlled.append(advanced_quantization_parameters)
        return model

    monkeypatch.setattr(nncf, "quantize", quantize_without_histograms)
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", accuracy_control)
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    ctx = make_context("lenet_bn", tmp_path, int8=True, calibration=calibration)
    assert "openvino-int8" in {a.name for a in export_openvino(ctx)}
    info = ctx.diagnostics["openvino"]["int8"]
    assert "Too many bins" in info["methods_measured"]["histogram"]["error"]
    assert len(controlled) == 1 and not info["failures"] and "accuracy_control" in info["method"]
    assert getattr(controlled[0], "activations_range_estimator_params", None) != \
        RangeEstimatorParametersSet.HISTOGRAM


def test_mixed_preset_with_the_classifier_unquantized_is_kept_when_it_passes(tmp_path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where NNCF's default fails, asymmetric activations with the classifier left unquantized come next — as fast
    as the default — and end the search when they pass; the manifest names the unquantized classifier."""
    import nncf

    from exporter.backends import openvino_int8 as ovb

    monkeypatch.setattr(ovb, "cpu_supports_bf16", lambda core=None: False)
    verdicts = iter([(["default: cosine"], 0.99, 0.95), ([], 1.0, 0.998)])
    monkeypatch.setattr(ovb, "int8_held_back_verdict", lambda reference, output, pool=None: next(verdicts))
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", lambda *args, **kwargs: pytest.fail("not needed"))
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    ctx = make_context("lenet_bn", tmp_path, int8=True, calibration=calibration)
    artifact = {a.name: a for a in export_openvino(ctx)}["openvino-int8"]
    info = ctx.diagnostics["openvino"]["int8"]
    assert info["method"].startswith("nncf.quantize (MIXED preset") and not info["failures"]
    assert set(info["methods_measured"]) == {"default", "mixed_head_fp32"}
    ir = ov.Core().read_model(str(tmp_path / artifact.path))
    assert info["fp32_layers"] == ovb.end_layers(ir, "last")  # the classifier alone stays unquantized


@pytest.mark.parametrize("rewrite_passes", [True, False])
def test_the_stride_rewrite_is_judged_again_and_named_in_the_manifest(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                      rewrite_passes: bool) -> None:
    """The kept int8 model is saved with its strides propagated (`propagate_strides`) after a second verdict on
    the held-back images, and the artifact's note says how many convolutions compute fewer positions; a rewrite
    that failed where the model passed would be dropped."""
    from exporter.backends import openvino_int8 as ovb

    monkeypatch.setattr(ovb, "cpu_supports_bf16", lambda core=None: False)
    verdicts = iter([([], 1.0, 0.999), ([], 1.0, 0.998) if rewrite_passes else (["rewrite: cosine"], 0.99, 0.9)])
    monkeypatch.setattr(ovb, "int8_held_back_verdict", lambda reference, output, pool=None: next(verdicts))
    rewritten = []
    monkeypatch.setattr(ovb, "propagate_strides", lambda model: rewritten.append(model) or ["conv_a", "conv_b"])
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    ctx = make_context("lenet_bn", tmp_path, int8=True, calibration=calibration)
    artifact = {a.name: a for a in export_openvino(ctx)}["openvino-int8"]
    info = ctx.diagnostics["openvino"]["int8"]
    assert len(rewritten) == 1 and next(verdicts, None) is None  # judged twice: as quantized, as rewritten
    assert not info["failures"]
    if rewrite_passes:
        assert info["strides_propagated"] == ["conv_a", "conv_b"] and info["min_cosine"] == 0.998
        assert "2 convolutions compute only the positions their strided readers use" in artifact.notes[0]
    else:
        assert info["strides_propagated"] == [] and info["min_cosine"] == 0.999
        assert "strided readers" not in artifact.notes[0]


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16: the rest of an int8 model runs in f32 anyway")
@pytest.mark.parametrize("f32_passes", [True, False])
def test_int8_rest_falls_back_to_f32_only_when_that_passes(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                          f32_passes: bool) -> None:
    """NNCF validates in f32: a candidate failing with its unquantized layers in bf16 is judged again in f32 and
    keeps f32 where that passes (resnet50); where neither passes, the faster bf16 stays and the failure is kept."""
    from exporter.backends import openvino_int8 as ovb

    bf16, f32 = (["bf16: flips"], 0.984, 0.996), ([], 1.0, 0.999) if f32_passes else (["f32: flips"], 0.99, 0.99)
    # default (bf16, then f32); where f32 fails too: MIXED with the classifier unquantized, histogram and accuracy
    # control's result, each bf16 then f32
    verdicts = iter([bf16, f32] * (1 if f32_passes else 4))
    monkeypatch.setattr(ovb, "int8_held_back_verdict", lambda reference, output, pool=None: next(verdicts))
    monkeypatch.setattr(ovb, "ignored_scope_from_onnxruntime", lambda ctx, model: [])
    import nncf

    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", lambda model, *args, **kwargs: model)
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    ctx = make_context("lenet_bn", tmp_path, int8=True, calibration=calibration)
    artifact = {a.name: a for a in export_openvino(ctx)}["openvino-int8"]
    info = ctx.diagnostics["openvino"]["int8"]
    rest = "f32" if f32_passes else "bf16"
    assert artifact.options == {"inference_precision": rest} and info["unquantized_layers_run_in"] == rest
    assert bool(info["failures"]) != f32_passes


def test_ort_qdq_file_is_tried_before_accuracy_control(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where NNCF's candidates fail, the build's own `model.int8.onnx` (ORT's QDQ with its fp32 layers) read by
    OpenVINO is judged next and kept when it passes: no accuracy control, the IR saved from it with the build's
    metadata, and the manifest says where its fp32 layers came from."""
    import nncf

    from exporter.backends import onnxruntime_int8
    from exporter.backends import openvino_int8 as ovb
    from exporter.backends.onnx import export_onnx
    from exporter.backends.onnxruntime import export_onnxruntime

    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    ctx = make_context("lenet_bn", tmp_path, int8=True, calibration=calibration)
    monkeypatch.setattr(onnxruntime_int8, "int8_held_back_verdict", lambda reference, output, pool=None: ([], 1, 1))
    for export in (export_onnx, export_onnxruntime):
        ctx.artifacts.extend(export(ctx))
    qdq = ovb.onnxruntime_qdq_file(ctx)
    assert qdq is not None and qdq.is_file()

    monkeypatch.setattr(ovb, "cpu_supports_bf16", lambda core=None: False)  # one verdict per candidate
    monkeypatch.setattr(ovb, "ignored_scope_from_onnxruntime", lambda ctx, model: [])
    verdicts = iter([(["default: flips"], 0.98, 0.99), (["mixed: flips"], 0.97, 0.99),
                     (["histogram: flips"], 0.97, 0.99), ([], 1.0, 0.999)])
    monkeypatch.setattr(ovb, "int8_held_back_verdict", lambda reference, output, pool=None: next(verdicts))
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", lambda *args, **kwargs: pytest.fail("not needed"))
    artifact = {a.name: a for a in export_openvino(ctx)}["openvino-int8"]
    info = ctx.diagnostics["openvino"]["int8"]
    assert info["method"].startswith(ovb.QDQ_METHOD) and not info["failures"]
    assert set(info["methods_measured"]) == {"default", "mixed_head_fp32", "histogram", "onnxruntime_qdq"}
    assert "accuracy_control" not in info and info["fp32_layers_why"].startswith("left in fp32 by ORT")
    assert artifact.notes[0].startswith("int8 (ONNX Runtime's") and artifact.options == {"inference_precision": "f32"}
    ir = ov.Core().read_model(str(tmp_path / artifact.path))
    assert ir.get_rt_info(["exporter", "model_name"]).astype(str) == "lenet_bn"
    assert any(op.get_type_name() == "FakeQuantize" for op in ir.get_ordered_ops())
    with runner_for(artifact, tmp_path) as runner:
        assert runner.infer(calibration[:2]).shape == (2, TEST_NUM_CLASSES)


def test_accuracy_control_past_its_budget_keeps_the_closest_candidate(tmp_path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """NNCF's accuracy control is ended by its wall-clock budget (raised from the validation function); the
    build keeps the closest candidate before it and says so instead of running on for an hour."""
    from exporter.backends import openvino_int8 as ovb

    monkeypatch.setattr(ovb, "ACCURACY_CONTROL_BUDGET_S", 0.0)
    monkeypatch.setattr(ovb, "ignored_scope_from_onnxruntime", lambda ctx, model: [])
    monkeypatch.setattr(ovb, "int8_held_back_verdict",
                        lambda reference, output, pool=None: (["always: flips"], 0.98, 0.99))
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    ctx = make_context("lenet_bn", tmp_path, int8=True, calibration=calibration)
    artifact = {a.name: a for a in export_openvino(ctx)}["openvino-int8"]
    info = ctx.diagnostics["openvino"]["int8"]
    assert info["accuracy_control"].startswith("stopped at its 0 s budget")
    assert info["method"].startswith("nncf.quantize (default") and info["failures"] == ["always: flips"]
    assert "accuracy_control" not in info["methods_measured"] and (tmp_path / artifact.path).is_file()
    assert 0.0 <= info["fp32_share_of_macs"] <= 1.0


def test_ignored_scope_names_the_ir_operations_of_ort_fp32_layers(onnx_build) -> None:
    """The IR converted from the ONNX file names a Conv node's convolution NAME or NAME/WithoutBiases."""
    import onnx

    from exporter.backends.openvino_int8 import ignored_scope_from_onnxruntime

    build = onnx_build("lenet_bn")
    graph = onnx.load(str(build.path("onnx-fp32")), load_external_data=False).graph
    conv = next(n.name for n in graph.node if n.op_type == "Conv")
    gemm = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    model = ov.Core().read_model(str(build.path("openvino-fp32")))
    ctx = build.ctx
    saved = ctx.diagnostics.get("onnxruntime")
    try:
        ctx.diagnostics["onnxruntime"] = {"int8": {"fp32_layers": [conv, gemm, "node_not_in_this_model"]}}
        names = ignored_scope_from_onnxruntime(ctx, model)
        ctx.diagnostics["onnxruntime"] = {"int8": {"fp32_layers": []}}
        assert ignored_scope_from_onnxruntime(ctx, model) == []
    finally:
        ctx.diagnostics["onnxruntime"] = saved
    assert len(names) == 2 and {n.split("/")[0] for n in names} == {conv, gemm}
    kinds = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    assert {kinds[n] for n in names} <= {"Convolution", "MatMul"}


def test_fp32_share_counts_multiply_adds_of_convolutions_and_matmuls() -> None:
    """An int8 IR's fp32 layers are weighed by their multiply-adds (the build warns past MOSTLY_FP32)."""
    import openvino as ov
    import torch

    from exporter.backends.openvino_int8 import _fp32_share_of_macs, _multiply_adds

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()
    model = ov.convert_model(net, example_input=torch.zeros(1, 1, 8, 8))
    model.reshape([-1, 1, 8, 8])  # as a build's IR: the batch dynamic, the rest static
    layers = {op.get_friendly_name(): _multiply_adds(op) for op in model.get_ordered_ops()
              if op.get_type_name() in ("Convolution", "MatMul")}
    assert sorted(layers.values()) == [4 * 8 * 8 * 9, 256 * 10]
    conv = next(name for name, macs in layers.items() if macs == 4 * 8 * 8 * 9)
    assert _fp32_share_of_macs(model, [conv]) == pytest.approx(2304 / (2304 + 2560))
    assert _fp32_share_of_macs(model, []) == 0.0


def test_end_layers_are_the_first_and_last_weighted_operations() -> None:
    """The stem and the classifier, what an int8 candidate may leave unquantized (`end_layers`)."""
    import torch

    from exporter.backends.openvino_int8 import end_layers

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                              torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()
    model = ov.convert_model(net, example_input=torch.zeros(1, 1, 8, 8))
    kinds = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    first, last = end_layers(model, "first"), end_layers(model, "last")
    assert [kinds[n] for n in first + last] == ["Convolution", "MatMul"]
    assert end_layers(model) == first + last
    assert end_layers(ov.Model([], [], "empty")) == []
