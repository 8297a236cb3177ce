"""AOTInductor: the package runs in a fresh Python process that never imports the model code."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from exporter.backends import RunnerError, runner_for
from tests.export_builds import FAST_MODELS, MAX_BATCH, full_build  # noqa: F401  (fixture)

FRESH_PROCESS = """
import json, sys
import numpy as np, torch, torch._inductor
package = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.inference_mode():
    out = package(x)
out = out[0] if isinstance(out, (list, tuple)) else out
np.save(sys.argv[3], out.numpy())
print(json.dumps(sorted(m for m in sys.modules if m == "exporter" or m.startswith("exporter."))))
"""


def _aoti(result):
    from exporter.manifest import artifact_from_entry

    entries = [a for a in result.manifest["artifacts"] if a["backend"] == "aoti"]
    if not entries:
        pytest.skip(next((s["reason"] for s in result.manifest["skipped"] if s["backend"] == "aoti"), "no aoti"))
    return artifact_from_entry(entries[0])


def test_package_runs_in_a_fresh_process_without_model_code(full_build, tmp_path: Path) -> None:
    result = full_build(FAST_MODELS[0])
    artifact = _aoti(result)
    images = np.random.default_rng(0).random((5, *result.manifest["input_shape"]), dtype=np.float32)
    np.save(tmp_path / "in.npy", images)
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can make `exporter` importable
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS, str(result.build_dir / artifact.path),
                           str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    with runner_for(_eager(result), result.build_dir) as eager:
        want = eager.infer(images)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=0, atol=1e-4)


def _eager(result):
    from exporter.manifest import artifact_from_entry

    return artifact_from_entry(result.manifest["artifacts"][0])


def test_batch_outside_the_compiled_range_is_one_line(full_build) -> None:
    result = full_build(FAST_MODELS[0])
    with runner_for(_aoti(result), result.build_dir) as runner:
        too_big = np.zeros((MAX_BATCH + 1, *result.manifest["input_shape"]), np.float32)
        with pytest.raises(RunnerError, match=f"compiled for batches 1..{MAX_BATCH}, got batch {MAX_BATCH + 1}"):
            runner.infer(too_big)


# --- the CUDA package -------------------------------------------------------------------------------------------


def test_cuda_package_is_skipped_with_the_reason_without_cuda(tmp_path, monkeypatch) -> None:
    import torch

    from exporter.backends.aoti import export_aoti_cuda
    from tests.backends.onnx_builds import make_context

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ctx = make_context("lenet", tmp_path, trace=False)
    assert export_aoti_cuda(ctx) == [] and not ctx.warnings
    assert ctx.diagnostics["aoti"]["cuda"] == {"skipped": "no CUDA device visible to torch"}


def test_cuda_package_is_compiled_on_cuda_and_a_failure_is_recorded(tmp_path, monkeypatch) -> None:
    import torch

    from exporter.backends import aoti
    from tests.backends.onnx_builds import make_context

    calls = []

    def compile_package(model, input_shape, path, *, device, static_batch, max_batch):
        calls.append((device, path.name, static_batch, max_batch))
        path.write_bytes(b"a package")
        return 1.5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    monkeypatch.setattr(aoti, "compile_package", compile_package)
    ctx = make_context("lenet", tmp_path, trace=False, max_batch=32)
    [artifact] = aoti.export_aoti_cuda(ctx)
    assert calls == [("cuda", aoti.CUDA_PACKAGE_FILE, None, 32)]
    assert (artifact.name, artifact.device, artifact.path) == ("aoti-cuda", "cuda", "model.aoti.cuda.pt2")
    assert artifact.options == {"min_batch": 1, "max_batch": 32} and artifact.precision == "fp32"
    assert ctx.diagnostics["aoti"]["cuda"] == {"compile_s": 1.5, "gpu": "NVIDIA H200"}

    def broken(*args, **kwargs):
        raise RuntimeError("nvcc exploded\nmore lines")

    monkeypatch.setattr(aoti, "compile_package", broken)
    assert aoti.export_aoti_cuda(ctx) == []
    assert ctx.diagnostics["aoti"]["cuda"] == {"error": "RuntimeError: nvcc exploded"}
    assert ctx.warnings == ["aoti: no CUDA package: RuntimeError: nvcc exploded"]


def test_a_dynamic_cpu_package_serves_batch_1_from_its_batch_1_model(full_build, monkeypatch) -> None:
    import torch._inductor.package as aoti_package

    from exporter.backends.aoti import BATCH1_MODEL

    result = full_build(FAST_MODELS[0])
    artifact = _aoti(result)
    assert artifact.options["batch1_model"] == BATCH1_MODEL
    with zipfile.ZipFile(result.build_dir / artifact.path) as package:
        models = {n.split("/data/aotinductor/")[1].split("/")[0] for n in package.namelist()
                  if "/data/aotinductor/" in n}
    assert models == {"model", BATCH1_MODEL}
    calls = []
    real = aoti_package.load_package

    def counted(path, model_name="model", **kwargs):
        compiled = real(path, model_name=model_name, **kwargs)

        def call(x):
            calls.append((model_name, x.shape[0]))
            return compiled(x)
        return call

    monkeypatch.setattr(aoti_package, "load_package", counted)
    images = np.random.default_rng(1).random((3, *result.manifest["input_shape"]), dtype=np.float32)
    with runner_for(artifact, result.build_dir) as runner, runner_for(_eager(result), result.build_dir) as eager:
        for batch in (images[:1], images):
            np.testing.assert_allclose(runner.infer(batch), eager.infer(batch), rtol=0, atol=1e-4)
    assert calls == [(BATCH1_MODEL, 1), ("model", 3)]  # aoti_load_package loads "model" through load_package


@pytest.mark.gpu
def test_cuda_package_runs_on_the_gpu_and_matches_eager(tmp_path) -> None:
    import torch

    from exporter.backends.aoti import export_aoti_cuda
    from tests.backends.onnx_builds import make_context

    if not torch.cuda.is_available():
        pytest.skip("the CUDA AOTI package needs a CUDA device; torch sees none")
    ctx = make_context("lenet_bn", tmp_path, trace=False, max_batch=16)
    [artifact] = export_aoti_cuda(ctx)
    images = np.random.default_rng(0).random((7, *ctx.input_shape), dtype=np.float32)
    with runner_for(artifact, tmp_path) as runner:
        assert not torch.backends.cudnn.allow_tf32  # fp32 means fp32 while the runner is active
        out = runner.infer(images)
    with torch.inference_mode():
        np.testing.assert_allclose(out, ctx.model(torch.from_numpy(images)).numpy(), rtol=0, atol=1e-4)


def test_cpu_packages_freeze_and_a_bf16_package_keeps_the_fp32_interface(full_build) -> None:
    from exporter.backends.eager import cpu_has_native_bf16
    from exporter.manifest import artifact_from_entry

    result = full_build(FAST_MODELS[0])
    _aoti(result)
    assert result.manifest["diagnostics"]["aoti"]["inductor_configs"] == {"freezing": True}
    packages = {a["name"]: a for a in result.manifest["artifacts"] if a["backend"] == "aoti"}
    for entry in packages.values():  # frozen for real: the generated C++ calls oneDNN's prepacked convolutions
        with zipfile.ZipFile(result.build_dir / entry["path"]) as package:
            code = b"".join(package.read(n) for n in package.namelist() if n.endswith("wrapper.cpp"))
        assert b"mkldnn__convolution_pointwise" in code and b"aoti_torch_cpu_convolution(" not in code, entry["name"]
    if not cpu_has_native_bf16():
        assert "aoti-bf16" not in packages and "skipped" in result.manifest["diagnostics"]["aoti"]["bf16"]
        return
    bf16 = artifact_from_entry(packages["aoti-bf16"])
    assert bf16.precision == "bf16" and bf16.options == packages["aoti"]["options"]
    images = np.random.default_rng(0).random((3, *result.manifest["input_shape"]), dtype=np.float32)
    with runner_for(bf16, result.build_dir) as runner, runner_for(_eager(result), result.build_dir) as eager:
        got, want = runner.infer(images), eager.infer(images)
        assert runner.executed_precision == "bf16"
    assert got.dtype == np.float32 and got.shape == want.shape
    assert not np.array_equal(got, want) and np.abs(got - want).max() < 0.25  # bf16 arithmetic, bf16-class error
    assert result.manifest["parity"]["results"]["aoti-bf16"] == "pass"
