"""`exporter/bisect.py`: the layer-by-layer comparison that names where an artifact starts to diverge.

`compare_layers` is checked on synthetic layers; `bisect_variant` (through `verify_build`, as users reach it) on
the shared trained lenet_bn build with one ONNX layer perturbed, with each runtime supplying its own layer outputs
(`Runner.layer_outputs`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from exporter import parity
from exporter.backends import BACKENDS, Variant
from exporter.backends.base import BisectionUnsupported, Runner
from exporter.backends.eager import EagerRunner, leaf_module_outputs
from exporter.bisect import bisect_variant, compare_layers
from exporter.comparison import FAIL
from exporter.judge import TOLERANCES, ParityError
from exporter.manifest import load_build
from tests.parity_builds import SAMPLES, copy_build, own_build, perturbed_copy, rewrite_manifest  # noqa: F401

TOL = 1e-3


def _layers(*values: float) -> list[tuple[str, np.ndarray]]:
    return [(name, np.full((2, 3), v, np.float32)) for name, v in zip("abcdef", values)]


def test_first_layer_over_the_tolerance_is_named_with_the_ones_before() -> None:
    reference = _layers(1.0, 2.0, 3.0, 4.0, 5.0)
    candidate = {name: [ref.copy()] for name, ref in reference}
    candidate["d"] = [reference[3][1] * 1.01]  # 1 % off from layer d on …
    candidate["e"] = [reference[4][1] * 1.05]
    result = compare_layers(reference, candidate, layer_tol=TOL, method="test", input_set="real", context=2,
                            kinds={"d": "Conv2d"})
    first = result.first_diverging
    assert first.layer == "d" and first.kind == "Conv2d" and first.normalized == pytest.approx(0.01, rel=1e-4)
    assert [e.layer for e in result.preceding] == ["b", "c"] and result.unmatched == []
    assert "first diverging layer: d (Conv2d)" in result.describe()
    json.dumps(result.to_dict())


def test_no_divergence_reports_the_largest_error() -> None:
    reference = _layers(1.0, 2.0)
    candidate = {"a": [reference[0][1]], "b": [reference[1][1] * (1 + 1e-5)]}
    result = compare_layers(reference, candidate, layer_tol=TOL, method="test", input_set="real")
    assert result.first_diverging is None and result.preceding == []
    assert "largest normalised error" in result.note and "at b" in result.note
    assert result.describe().startswith("no layer exceeds")


def test_fused_layers_are_attached_to_the_next_compared_one() -> None:
    """A Conv whose BatchNorm was folded in has no output of its own: the divergence shows at the BatchNorm."""
    reference = _layers(1.0, 2.0, 3.0)  # a = conv, b = bn, c = relu
    candidate = {"b": [reference[1][1] * 1.1], "c": [reference[2][1]]}
    result = compare_layers(reference, candidate, layer_tol=TOL, method="test", input_set="real")
    assert result.unmatched == ["a"]
    assert result.first_diverging.layer == "b" and result.first_diverging.fused_with == ["a"]
    assert result.first_diverging.layers == ["a", "b"] and "with a fused in" in result.first_diverging.label()


def test_repeated_calls_and_nonfinite_and_shape_mismatch() -> None:
    ref = np.ones((1, 4), np.float32)
    reference = [("relu", ref), ("relu#2", ref * 2), ("fc", ref * 3)]
    candidate = {"relu": [ref, ref * 2], "fc": [np.full((1, 5), 3.0, np.float32)]}  # fc: wrong size
    result = compare_layers(reference, candidate, layer_tol=TOL, method="test", input_set="real")
    assert [e.layer for e in result.layers] == ["relu", "relu#2"] and result.unmatched == ["fc"]
    bad = compare_layers([("x", ref)], {"x": [np.full((1, 4), np.nan, np.float32)]}, layer_tol=TOL,
                         method="test", input_set="real")
    assert bad.first_diverging.layer == "x" and math.isinf(bad.first_diverging.normalized)


def test_nothing_comparable_says_so() -> None:
    result = compare_layers(_layers(1.0), {}, layer_tol=TOL, method="test", input_set="real")
    assert result.layers == [] and result.first_diverging is None
    assert result.describe().startswith("no layer could be compared")


def test_leaf_module_outputs_follow_execution_order() -> None:
    from exporter.models import create_model

    net = create_model("lenet_bn", num_classes=7).eval()
    outputs = leaf_module_outputs(net, np.zeros((2, 1, 28, 28), np.float32))
    leaves = [name for name, m in net.named_modules() if name and not list(m.children())]
    assert [name for name, _ in outputs] == leaves and all(o.shape[0] == 2 for _, o in outputs)


# --- on a real build, through verify ------------------------------------------------------------------------------


# lenet_bn is Sequential: module 4 is the second conv, whose BatchNorm (5) the ONNX exporter folds into it, so
# the divergence shows at 5 "with 4 fused in"; module 15 is the last Linear, which has its own ONNX output.
@pytest.mark.parametrize("initializer, layer", [("4.weight", "4"), ("15.weight", "15")])
def test_perturbed_onnx_layer_fails_and_bisection_names_it(initializer, layer, own_build, tmp_path) -> None:
    build = load_build(perturbed_copy(own_build, tmp_path / "perturbed", initializer, 1.05))
    report = parity.verify_build(build, backends=["onnx-fp32"], samples=SAMPLES, progress=False)
    (result,) = report.results
    assert result.status == FAIL and not report
    bisection = result.bisection
    assert bisection is not None, result.bisection_error
    assert layer in bisection.first_diverging.layers and "onnxruntime" in bisection.method
    if layer == "15":
        assert bisection.first_diverging.layer == "15" and bisection.first_diverging.kind == "Linear"
    assert all(e.normalized <= bisection.layer_tol for e in bisection.preceding) and bisection.preceding
    assert bisection.layer_tol == TOLERANCES["fp32"].layer_tol
    with pytest.raises(ParityError, match="onnx-fp32"):
        report.raise_for_failures()


def test_bisect_variant_on_the_reference_evaluator_and_eager(own_build) -> None:
    """Each runtime supplies the layers of its own computation: an exact copy diverges nowhere."""
    build = load_build(own_build)
    from exporter.backends.eager import load_torch_model

    eager = build.artifact("eager")
    model = load_torch_model(Path(build.dir) / eager.path, **eager.options)
    batch = np.random.default_rng(0).random((2, *build.input_shape), dtype=np.float32)
    for name in ("onnx-reference", "eager"):
        bisection = bisect_variant(Variant(build.artifact(name)), build, model, batch, TOLERANCES["fp32"],
                                   input_set="real")
        assert bisection.layers and bisection.first_diverging is None, (name, bisection.describe())
    # eager bf16 really computes in bf16: judged by the fp32 layer tolerance, a layer diverges
    bf16 = bisect_variant(Variant(build.artifact("eager-bf16")), build, model, batch, TOLERANCES["fp32"],
                          input_set="real")
    assert bf16.first_diverging is not None and "bf16" in bf16.method


class OpaqueRunner(EagerRunner):
    """A runtime that exposes no intermediate tensors (like a TensorRT engine), wrong at every batch size."""

    backend = "test_opaque"
    layer_outputs = Runner.layer_outputs

    def run_impl(self, prepared):
        return super().run_impl(prepared) * 1.1


def test_runtime_without_layer_outputs_keeps_its_verdict(own_build, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(BACKENDS, OpaqueRunner.backend, OpaqueRunner)
    target = copy_build(own_build, tmp_path / "opaque")
    manifest = json.loads((target / "manifest.json").read_text())
    eager = manifest["artifacts"][0]
    rewrite_manifest(target, artifacts=manifest["artifacts"] + [dict(eager, name="opaque", backend="test_opaque")])
    report = parity.verify_build(load_build(target), backends=["opaque"], samples=8, progress=False)
    (result,) = report.results
    assert result.status == FAIL and result.bisection is None
    assert "exposes no intermediate outputs" in result.bisection_error
    with pytest.raises(BisectionUnsupported):
        OpaqueRunner(Path("x")).layer_outputs(np.zeros((1, 1, 28, 28), np.float32), onnx_source=None,
                                              scope_source=None, reference_model=None)


def test_bisection_of_a_static_batch_build_feeds_whole_batches(tmp_path) -> None:
    """A build exported at a fixed batch (`--batch 1`) is bisected one such batch at a time."""
    from exporter.export import build
    from tests.export_builds import build_options

    result = build(build_options("lenet_bn", tmp_path, batch=1, backends=["onnx"], parity_samples=4))
    report = parity.verify_build(load_build(result.build_dir), backends=["onnx-fp32"], samples=8, bisect=True,
                                 progress=False)
    (checked,) = report.results
    assert not checked.bisection_error and checked.bisection is not None
    assert checked.bisection.layers and checked.bisection.first_diverging is None
