"""TensorRT: the unavailable reason here, the engine sidecar compatibility check, the build and runner against a
fake module holding only the TensorRT 11 API (TensorRT cannot be installed here), TensorRT's own int8 QDQ file,
and (GPU) a real engine."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from exporter.backends import BACKENDS, BackendUnavailable, RunnerError
from exporter.backends.onnx import INPUT_NAME, export_onnx, read_metadata
from exporter.backends.tensorrt import (
    SIDECAR_FORMAT,
    TIMING_CACHE,
    TRT_QDQ_FILE,
    TensorRTBuildError,
    TensorRTRunner,
    check_engine_sidecar,
    engine_compatibility_problems,
    export_tensorrt,
    rebuild_command,
    sha256_file,
    shared_timing_cache,
    sidecar_path,
    unavailable_reason,
    write_tensorrt_qdq,
)
from tests.backends import fake_tensorrt
from tests.backends.onnx_builds import FP32_ATOL, make_context
from tests.conftest import TEST_NUM_CLASSES

REASON = unavailable_reason()
H100 = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _sidecar(**changes) -> dict:
    sidecar = {"format": SIDECAR_FORMAT, **H100, "model_name": "resnet18", "onnx_file": "../model.onnx",
               "onnx_sha256": "ab" * 32, "build_flags": {"precision": "fp16", "fp16": True, "int8": False,
                                                           "static_batch": None, "max_batch": 64}}
    sidecar.update(changes)
    return sidecar


def test_registered_and_cuda_only() -> None:
    assert BACKENDS["tensorrt"] is TensorRTRunner
    assert TensorRTRunner.unavailable_reason("cpu") == "tensorrt does not run on cpu"
    assert TensorRTRunner.unavailable_reason("cuda") == REASON


@pytest.mark.skipif(REASON is None, reason="TensorRT and a CUDA device are present here")
def test_unavailable_here_with_a_reason(tmp_path) -> None:
    assert ("tensorrt is not installed" in REASON) or ("no CUDA device" in REASON)
    ctx = make_context("lenet", tmp_path, trace=False)
    with pytest.raises(BackendUnavailable) as info:
        export_tensorrt(ctx)
    assert str(info.value) == REASON and "\n" not in REASON
    with pytest.raises(BackendUnavailable):
        TensorRTRunner(tmp_path / "model.fp32.engine", device="cuda").activate()


def test_sidecar_matching_this_machine_is_compatible() -> None:
    assert engine_compatibility_problems(_sidecar(), dict(H100), onnx_sha256="ab" * 32) == []
    assert engine_compatibility_problems(_sidecar(), dict(H100), onnx_sha256=None) == []


@pytest.mark.parametrize("key, value, words", [
    ("gpu_name", "NVIDIA A100-SXM4-40GB", "GPU NVIDIA H100 80GB HBM3 but this machine has NVIDIA A100"),
    ("compute_capability", "8.0", "compute capability 9.0 but this machine has 8.0"),
    ("tensorrt_version", "10.3.0", "TensorRT 10.9.0.34 but this machine has 10.3.0"),
])
def test_each_mismatch_is_named(key: str, value: str, words: str) -> None:
    here = {**H100, key: value}
    problems = engine_compatibility_problems(_sidecar(), here)
    assert len(problems) == 1 and words in problems[0]


def test_changed_onnx_and_old_format_are_mismatches() -> None:
    problems = engine_compatibility_problems(_sidecar(format=0), dict(H100), onnx_sha256="cd" * 32)
    assert any("sidecar format" in p for p in problems)
    assert any("ONNX file with sha256 abababababab" in p and "now has cdcdcdcdcdcd" in p for p in problems)


def test_rebuild_command_repeats_the_build_flags() -> None:
    assert rebuild_command(_sidecar()) == "exporter build resnet18 --backends tensorrt --fp16"
    flags = {"precision": "int8", "int8": True, "static_batch": 8}
    # The tensorrt stage writes the int8 engine's QDQ file itself: no onnxruntime stage needed.
    expected = "exporter build resnet18 --backends tensorrt --int8 --batch 8"
    assert rebuild_command(_sidecar(build_flags=flags)) == expected


def test_check_engine_sidecar_refuses_with_the_rebuild_command(tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"onnx bytes")
    engine_dir = tmp_path / "tensorrt"
    engine_dir.mkdir()
    engine = engine_dir / "model.fp16.engine"
    engine.write_bytes(b"engine bytes")
    with pytest.raises(RunnerError, match="has no sidecar"):
        check_engine_sidecar(engine, dict(H100))

    sidecar = _sidecar(onnx_sha256=sha256_file(tmp_path / "model.onnx"))
    sidecar_path(engine).write_text(json.dumps(sidecar))
    assert check_engine_sidecar(engine, dict(H100)) == sidecar  # compatible: loads

    with pytest.raises(RunnerError) as info:
        check_engine_sidecar(engine, {**H100, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"})
    message = str(info.value)
    assert "refusing to load model.fp16.engine" in message and "NVIDIA L4" in message
    assert message.endswith("rebuild it with `exporter build resnet18 --backends tensorrt --fp16`")

    (tmp_path / "model.onnx").write_bytes(b"re-exported onnx")  # the ONNX changed since the engine was built
    with pytest.raises(RunnerError, match="built from an ONNX file"):
        check_engine_sidecar(engine, dict(H100))

    sidecar_path(engine).write_text("{not json")
    with pytest.raises(RunnerError, match="unreadable"):
        check_engine_sidecar(engine, dict(H100))


# --- contract tests: the build and the runner against a fake holding only the TensorRT 11 API ----------------------

ENV = {"tensorrt_version": fake_tensorrt.VERSION, "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """lenet_bn's model.onnx and model.fp16.onnx (the onnx stage's files), exported once for these tests."""
    out = tmp_path_factory.mktemp("trt-onnx")
    return out, export_onnx(make_context("lenet_bn", out, trace=False, fp16=True, max_batch=32))


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    """The fake `tensorrt` in sys.modules, torch pretending to see an H200, the user cache dir in tmp_path."""
    trt = fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: ENV["gpu_name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    monkeypatch.setenv("EXPORTER_CACHE_DIR", str(tmp_path / "cache"))
    return trt


def _context(onnx_files, out_dir, *, fp16: bool = False, int8: bool = False, calibrate: bool = True):
    source, artifacts = onnx_files
    out_dir.mkdir(parents=True)
    for artifact in artifacts:
        shutil.copyfile(source / artifact.path, out_dir / artifact.path)
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32) if calibrate else None
    ctx = make_context("lenet_bn", out_dir, trace=False, fp16=fp16, int8=int8, max_batch=32,
                       calibration=calibration if int8 else None)
    ctx.artifacts += artifacts
    return ctx


def _calls(trt, name: str) -> list[tuple]:
    return [args for call, args in trt.CALLS if call == name]


def test_the_fake_module_has_no_weak_typing_api(fake_trt) -> None:
    config = fake_trt.Builder(fake_trt.Logger()).create_builder_config()
    for owner, name in ((fake_trt.BuilderFlag, "FP16"), (fake_trt.BuilderFlag, "INT8"),
                        (fake_trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"), (config, "int8_calibrator"),
                        (fake_trt, "IInt8EntropyCalibrator2")):
        with pytest.raises(AttributeError):
            getattr(owner, name)
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1 << 30  # TensorRT 8's attribute: gone


def test_build_calls_only_the_tensorrt_11_api(fake_trt, onnx_files, tmp_path) -> None:
    ctx = _context(onnx_files, tmp_path / "build", fp16=True, int8=True)
    artifacts = {a.name: a for a in export_tensorrt(ctx)}
    assert sorted(artifacts) == ["tensorrt-fp16", "tensorrt-fp32", "tensorrt-int8"] and not ctx.warnings
    strongly_typed = 1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert {args[0] for args in _calls(fake_trt, "Builder.create_network")} == {strongly_typed}
    assert _calls(fake_trt, "IBuilderConfig.set_flag") == []  # no precision flags: the ONNX file's types decide
    assert _calls(fake_trt, "IBuilderConfig.clear_flag") == [(fake_trt.BuilderFlag.TF32,)] * 3  # fp32 is fp32
    assert [a[0] for a in _calls(fake_trt, "OnnxParser.parse_from_file")] == \
        ["model.onnx", "model.fp16.onnx", TRT_QDQ_FILE]
    assert _calls(fake_trt, "IOptimizationProfile.set_shape")[0] == \
        (INPUT_NAME, (1, 1, 28, 28), (16, 1, 28, 28), (32, 1, 28, 28))
    engines = ctx.diagnostics["tensorrt"]["engines"]
    assert engines["fp16"]["layer_precisions"] == {"fp16": 3, "fp32": 1}  # the TensorRT 11 inspector schema
    assert engines["int8"]["layer_precisions"] == {"int8": 3, "fp32": 1}
    for precision, source in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx"), ("int8", TRT_QDQ_FILE)):
        artifact = artifacts[f"tensorrt-{precision}"]
        assert artifact.device == "cuda" and artifact.precision == precision
        sidecar = check_engine_sidecar(tmp_path / "build" / artifact.path, dict(ENV))  # loads: hashes match
        assert sidecar["format"] == SIDECAR_FORMAT and sidecar["onnx_file"] == f"../{source}"
        assert sidecar["build_flags"]["strongly_typed"] and not sidecar["build_flags"]["tf32"]


def test_a_failing_precision_keeps_the_engines_already_built(fake_trt, onnx_files, tmp_path) -> None:
    fake_trt.FAIL_PARSE.add("model.fp16.onnx")
    ctx = _context(onnx_files, tmp_path / "build", fp16=True, int8=True)
    assert [a.name for a in export_tensorrt(ctx)] == ["tensorrt-fp32", "tensorrt-int8"]
    assert (tmp_path / "build" / "tensorrt" / "model.fp32.engine").is_file()
    failed = ctx.diagnostics["tensorrt"]["engines"]["fp16"]
    assert "injected parse failure" in failed["error"] and failed["parser_errors"]
    assert [w for w in ctx.warnings if w.startswith("tensorrt: no fp16 engine: ")]


def test_int8_without_calibration_is_recorded_and_the_rest_built(fake_trt, onnx_files, tmp_path) -> None:
    ctx = _context(onnx_files, tmp_path / "build", int8=True, calibrate=False)
    assert [a.name for a in export_tensorrt(ctx)] == ["tensorrt-fp32"]
    assert "calibration" in ctx.diagnostics["tensorrt"]["engines"]["int8"]["error"]
    assert [w for w in ctx.warnings if w.startswith("tensorrt: no int8 engine: ")]


def test_no_engine_at_all_is_an_error(fake_trt, onnx_files, tmp_path) -> None:
    fake_trt.FAIL_PARSE.add("model.onnx")
    ctx = _context(onnx_files, tmp_path / "build")
    with pytest.raises(TensorRTBuildError, match="no TensorRT engine could be built .*injected parse failure"):
        export_tensorrt(ctx)


def test_timing_cache_is_kept_in_the_build_and_reused_by_the_next(fake_trt, onnx_files, tmp_path) -> None:
    first = _context(onnx_files, tmp_path / "first")
    export_tensorrt(first)
    shared = shared_timing_cache(ENV)
    assert shared.parent.parent == tmp_path / "cache" and shared.is_file()
    assert (tmp_path / "first" / "tensorrt" / TIMING_CACHE).read_bytes() == shared.read_bytes()
    assert first.diagnostics["tensorrt"]["engines"]["fp32"]["timing_cache"] == "fresh"

    second = _context(onnx_files, tmp_path / "second")  # a new build directory, as every build has
    export_tensorrt(second)
    assert second.diagnostics["tensorrt"]["engines"]["fp32"]["timing_cache"].startswith("reused")
    assert len(shared.read_bytes()) > len((tmp_path / "first" / "tensorrt" / TIMING_CACHE).read_bytes())

    shared.write_bytes(b"a timing cache TensorRT does not accept")
    third = _context(onnx_files, tmp_path / "third")
    assert export_tensorrt(third)
    assert third.diagnostics["tensorrt"]["engines"]["fp32"]["timing_cache"].startswith("rejected")


class _Stream:
    cuda_stream = 0x5EED

    def __init__(self) -> None:
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


def test_runner_enqueues_and_syncs_on_its_own_stream(fake_trt, onnx_files, tmp_path, monkeypatch) -> None:
    [artifact] = export_tensorrt(_context(onnx_files, tmp_path / "build"))
    streams: list[_Stream] = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: streams.append(_Stream()) or streams[-1])

    def legacy_stream(*args, **kwargs):
        raise AssertionError("the runner used torch's current stream (the legacy default stream)")

    monkeypatch.setattr(torch.cuda, "current_stream", legacy_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", legacy_stream)
    with TensorRTRunner(tmp_path / "build" / artifact.path, device="cuda") as runner:
        assert runner._batch_range == (1, 32)
        runner.run((None, None))  # the CUDA buffers need a GPU; the enqueue does not
        runner.sync()
    assert _calls(fake_trt, "IExecutionContext.execute_async_v3") == [(_Stream.cuda_stream,)]
    assert len(streams) == 1 and streams[0].synchronized >= 1


@pytest.mark.parametrize("version, supported", [("9.3.0.1", False), ("10.7.0.23", False), ("10.8.0.43", True),
                                                ("11.4.0.7", True), ("12.0.0.1", False)])
def test_supported_tensorrt_versions(fake_trt, monkeypatch, version: str, supported: bool) -> None:
    fake_tensorrt.install(monkeypatch, version=version)
    reason = unavailable_reason()
    assert (reason is None) if supported else ("outside the supported range >=10.8,<12" in reason)


def test_tensorrt_qdq_file_is_symmetric_int8_without_quantized_biases(onnx_files, tmp_path) -> None:
    source, _ = onnx_files
    calibration = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    write_tensorrt_qdq(source / "model.onnx", tmp_path / TRT_QDQ_FILE, calibration, progress=False)
    model = onnx.load(str(tmp_path / TRT_QDQ_FILE))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize, "no QuantizeLinear: the activations were not quantized"
    for node in quantize:  # activations: int8, zero point 0 (TensorRT takes only symmetric scales)
        zero = initializers[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
    dequantized = [initializers[n.input[0]] for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert dequantized and {a.dtype for a in dequantized} == {np.dtype(np.int8)}  # weights only: no int32 biases
    assert read_metadata(tmp_path / TRT_QDQ_FILE)["precision"] == "int8"


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT engine tests need tensorrt and CUDA: {REASON}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_builds_and_matches_eager(tmp_path, monkeypatch, precision: str) -> None:
    from exporter.backends.tensorrt import current_environment

    monkeypatch.setenv("EXPORTER_CACHE_DIR", str(tmp_path / "cache"))  # the shared timing cache
    ctx = make_context("lenet_bn", tmp_path, fp16=precision == "fp16", max_batch=16)
    ctx.artifacts += export_onnx(ctx)
    artifacts = {a.name: a for a in export_tensorrt(ctx)}
    artifact = artifacts[f"tensorrt-{precision}"]
    sidecar = json.loads(sidecar_path(tmp_path / artifact.path).read_text())
    assert {k: sidecar[k] for k in H100} == current_environment()
    assert (tmp_path / "tensorrt" / "timing.cache").stat().st_size > 0
    atol = FP32_ATOL if precision == "fp32" else 1e-2
    for batch_size in (1, 7, 16):
        batch = np.random.default_rng(batch_size).random((batch_size, *ctx.input_shape), dtype=np.float32)
        with TensorRTRunner(tmp_path / artifact.path, precision=precision, device="cuda") as runner:
            out = runner.infer(batch)
        assert out.shape == (batch_size, TEST_NUM_CLASSES)
        with torch.inference_mode():
            np.testing.assert_allclose(out, ctx.model(torch.from_numpy(batch)).numpy(), atol=atol, rtol=0)
    with TensorRTRunner(tmp_path / artifact.path, precision=precision, device="cuda") as runner, \
            pytest.raises(RunnerError, match="outside the engine's profile"):
        runner.infer(np.zeros((17, *ctx.input_shape), np.float32))
