"""TensorRT: the unavailable reason here, the engine sidecar compatibility check, and (GPU) a real engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.backends import BACKENDS, BackendUnavailable, RunnerError
from exporter.backends.tensorrt import (
    SIDECAR_FORMAT,
    TensorRTRunner,
    check_engine_sidecar,
    engine_compatibility_problems,
    export_tensorrt,
    rebuild_command,
    sha256_file,
    sidecar_path,
    unavailable_reason,
)
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
    assert rebuild_command(_sidecar(build_flags=flags)) == \
        "exporter build resnet18 --backends onnxruntime,tensorrt --int8 --batch 8"


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


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT engine tests need tensorrt and CUDA: {REASON}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_builds_and_matches_eager(tmp_path, precision: str) -> None:
    from exporter.backends.onnx import export_onnx
    from exporter.backends.tensorrt import current_environment

    ctx = make_context("lenet_bn", tmp_path, fp16=precision == "fp16", max_batch=16)
    ctx.artifacts += export_onnx(ctx)
    artifacts = {a.name: a for a in export_tensorrt(ctx)}
    artifact = artifacts[f"tensorrt-{precision}"]
    sidecar = json.loads(sidecar_path(tmp_path / artifact.path).read_text())
    assert {k: sidecar[k] for k in H100} == current_environment()
    assert (tmp_path / "tensorrt" / "timing.cache").stat().st_size > 0
    import torch

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
