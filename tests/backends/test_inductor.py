"""torch.compile (inductor): the build's diagnostics and the runner's compile-at-activate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.backends import runner_for
from exporter.backends.inductor import compile_diagnostics
from exporter.manifest import artifact_from_entry
from tests.export_builds import FAST_MODELS, full_build  # noqa: F401  (fixture)


def test_build_records_compile_diagnostics(full_build) -> None:
    result = full_build(FAST_MODELS[0])
    diagnostics = result.manifest["diagnostics"]["inductor"]
    assert diagnostics["backend"] == "eager" and "compile_s" not in diagnostics  # Dynamo's decisions, no codegen
    assert diagnostics["graphs"] == 1 and diagnostics["graph_breaks"] == 0
    assert diagnostics["batch_sizes_run"][:3] == [2, 7, 1]
    assert diagnostics["recompilations"] >= 1  # batch 1 is always specialised by Dynamo
    compiled = next(r for r in result.parity["results"] if r["artifact"] == "inductor")
    assert compiled["activate_s"] > 0  # the real compile: the quick parity's runner at activate


def test_dynamo_splits_the_batch_range_at_16_which_the_quick_check_avoids() -> None:
    from exporter.comparison import QUICK_BATCH, make_input_sets

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    result = compile_diagnostics(model, torch.rand(2, 1, 8, 8), dynamic_batch=True,
                                 batch_sizes=(2, QUICK_BATCH, 15, 16))
    assert result["recompilations"] == 1  # 2, 8 and 15 share a graph; 16 is another (a conv guard in torch)
    images = np.zeros((32, 1, 8, 8), np.float32)
    real = make_input_sets(images, None, max_batch=32, quick=True)[0]
    assert max(real.batches) == QUICK_BATCH < 16


def test_graph_break_is_reported() -> None:
    class Breaks(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            print("host side effect")  # Dynamo cannot trace print: a graph break
            return y.flatten(1) + 1

    result = compile_diagnostics(Breaks().eval(), torch.rand(2, 1, 4, 4), dynamic_batch=True, batch_sizes=(2,))
    assert result["graph_breaks"] >= 1 and result["graphs"] >= 2
    assert result["graph_break_reasons"] and result["graph_break_reasons"][0]["reason"]


def test_runner_compiles_at_activate(full_build) -> None:
    result = full_build(FAST_MODELS[0])
    entry = next(a for a in result.manifest["artifacts"] if a["backend"] == "inductor")
    runner = runner_for(artifact_from_entry(entry), result.build_dir)
    with runner:
        assert runner.compile_seconds is not None and runner.graphs_compiled >= 1
        batch = np.random.default_rng(0).random((3, *result.manifest["input_shape"]), dtype=np.float32)
        assert runner.infer(batch).shape == (3, result.manifest["num_classes"])


def test_freezing_option_matches_eager(full_build) -> None:
    result = full_build(FAST_MODELS[0])
    entries = {a["name"]: artifact_from_entry(a) for a in result.manifest["artifacts"]}
    artifact = entries["inductor"]
    artifact.options = dict(artifact.options, freezing=True)
    batch = np.random.default_rng(1).random((4, *result.manifest["input_shape"]), dtype=np.float32)
    with runner_for(entries["eager"], result.build_dir) as eager, runner_for(artifact, result.build_dir) as frozen:
        np.testing.assert_allclose(frozen.infer(batch), eager.infer(batch), rtol=0, atol=1e-4)


@pytest.mark.parametrize("freezing", [True, False])
def test_freezing_really_freezes_every_traced_batch_size(full_build, freezing: bool) -> None:
    """With freezing the convolutions run oneDNN's prepacked kernels (weights folded in as constants) — for the
    graph compiled at activate and for one a new batch size traces later; without it, plain convolutions."""
    from torch._inductor.utils import run_and_get_code

    result = full_build(FAST_MODELS[0])
    entries = {a["name"]: artifact_from_entry(a) for a in result.manifest["artifacts"]}
    artifact = entries["inductor"]
    artifact.options = dict(artifact.options, freezing=freezing)
    torch._dynamo.reset()
    runner = runner_for(artifact, result.build_dir)
    _, at_activate = run_and_get_code(runner.activate)
    try:
        one = np.zeros((1, *result.manifest["input_shape"]), np.float32)  # batch 1: its own graph
        _, later = run_and_get_code(runner.infer, one)
    finally:
        runner.deactivate()
    for code in (at_activate, later):
        assert code, "nothing was compiled"
        assert ("mkldnn._convolution_pointwise" in "\n".join(code)) is freezing


def test_a_bf16_artifact_keeps_the_fp32_interface_where_the_cpu_has_native_bf16(full_build) -> None:
    from exporter.backends.eager import cpu_has_native_bf16

    result = full_build(FAST_MODELS[0])
    entries = {a["name"]: a for a in result.manifest["artifacts"] if a["backend"] == "inductor"}
    if not cpu_has_native_bf16():
        assert set(entries) == {"inductor"}
        return
    bf16 = artifact_from_entry(entries["inductor-bf16"])
    assert bf16.precision == "bf16" and bf16.options == entries["inductor"]["options"]
    images = np.random.default_rng(0).random((3, *result.manifest["input_shape"]), dtype=np.float32)
    eager = artifact_from_entry(next(a for a in result.manifest["artifacts"] if a["name"] == "eager"))
    with runner_for(bf16, result.build_dir) as runner, runner_for(eager, result.build_dir) as reference:
        got, want = runner.infer(images), reference.infer(images)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert not np.array_equal(got, want) and np.abs(got - want).max() < 0.25  # bf16 arithmetic, bf16-class error
    assert result.manifest["parity"]["results"]["inductor-bf16"] == "pass"


def test_build_adds_cuda_compile_diagnostics_where_torch_sees_cuda(tmp_path, monkeypatch) -> None:
    from exporter.backends import inductor
    from exporter.backends.base import Artifact
    from tests.backends.onnx_builds import make_context

    devices = []

    def diagnose(model, sample, *, dynamic_batch, batch_sizes, device="cpu", backend="eager"):
        devices.append(device)
        assert backend == ("inductor" if device == "cuda" else "eager")  # only CUDA is compiled for real here
        return {"compile_s": 1.0, "graph_breaks": 0, "graph_break_reasons": [], "device": device}

    monkeypatch.setattr(inductor, "compile_diagnostics", diagnose)
    ctx = make_context("lenet", tmp_path, trace=False)
    ctx.artifacts.append(Artifact(name="eager", backend="eager", path="weights.safetensors", precision="fp32",
                                  options={"model": "lenet", "in_channels": 1, "num_classes": 7}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inductor.export_inductor(ctx)
    assert devices == ["cpu"] and ctx.diagnostics["inductor"]["cuda"] == {"skipped": "no CUDA device visible to torch"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    inductor.export_inductor(ctx)
    assert devices == ["cpu", "cpu", "cuda"] and ctx.diagnostics["inductor"]["cuda"]["device"] == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling for CUDA needs a CUDA device; torch sees none")
def test_compile_diagnostics_compile_for_cuda_without_moving_the_model() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    before = torch.backends.cudnn.allow_tf32
    result = compile_diagnostics(model, torch.rand(2, 1, 8, 8), dynamic_batch=True, batch_sizes=(2, 5),
                                 device="cuda", backend="inductor")  # what the build asks for on CUDA
    assert result["device"] == "cuda" and result["graphs"] == 1 and result["compile_s"] > 0
    assert next(model.parameters()).device.type == "cpu"  # a copy went to the GPU
    assert torch.backends.cudnn.allow_tf32 == before  # TF32 was off for the compile only


def test_activate_raises_dynamo_graph_limit(full_build) -> None:
    """Many inductor runners in one process (a bench's tuning candidates) must not hit Dynamo's graph limit,
    past which it silently runs eager code under inductor's name."""
    from exporter.backends.inductor import RECOMPILE_LIMIT, allow_compiled_graphs

    # config.patch restores the value on exit (monkeypatch's undo can delete a Dynamo config key instead)
    with torch._dynamo.config.patch(recompile_limit=8):
        allow_compiled_graphs()
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    with torch._dynamo.config.patch(recompile_limit=8):
        result = full_build(FAST_MODELS[0])
        entry = next(a for a in result.manifest["artifacts"] if a["backend"] == "inductor")
        with runner_for(artifact_from_entry(entry), result.build_dir):
            assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT * 2):
        allow_compiled_graphs()  # never lowers a limit set higher
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT * 2
