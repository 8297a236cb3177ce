"""torch.compile (inductor): the build's diagnostics and the runner's compile-at-activate."""

from __future__ import annotations

import numpy as np
import torch

from exporter.backends import runner_for
from exporter.backends.inductor import compile_diagnostics
from exporter.manifest import artifact_from_entry
from tests.export_builds import FAST_MODELS, full_build  # noqa: F401  (fixture)


def test_build_records_compile_diagnostics(full_build) -> None:
    diagnostics = full_build(FAST_MODELS[0]).manifest["diagnostics"]["inductor"]
    assert diagnostics["compile_s"] > 0 and diagnostics["graphs"] == 1 and diagnostics["graph_breaks"] == 0
    assert diagnostics["batch_sizes_run"][:3] == [2, 7, 1]
    assert diagnostics["recompilations"] >= 1  # batch 1 is always specialised by Dynamo


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
    entries = {a["backend"]: artifact_from_entry(a) for a in result.manifest["artifacts"]}
    artifact = entries["inductor"]
    artifact.options = dict(artifact.options, freezing=True)
    batch = np.random.default_rng(1).random((4, *result.manifest["input_shape"]), dtype=np.float32)
    with runner_for(entries["eager"], result.build_dir) as eager, runner_for(artifact, result.build_dir) as frozen:
        np.testing.assert_allclose(frozen.infer(batch), eager.infer(batch), rtol=0, atol=1e-4)
