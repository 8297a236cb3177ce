"""The parity suite (`exporter/parity.py`): metrics, tolerance classes, every backend on real builds, and negative
tests proving it fails when it must (perturbed weights, bf16 judged as fp32, a batch-specialised artifact, NaN).

The per-backend tests verify `exporter build`'s own build of each cheap model (shared with the export tests, one
verify run per model). The negative tests use a small build made here from the backends' export functions
(eager fp32/bf16/fp16 weights, ONNX, OpenVINO) with briefly trained weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporter import parity
from exporter.backends import BACKENDS, Artifact, BuildContext
from exporter.backends.base import PRECISIONS
from exporter.backends.eager import EagerRunner
from exporter.manifest import file_entries, load_build, write_json_atomic
from exporter.models import create_model
from tests.conftest import TEST_NUM_CLASSES
from tests.export_builds import MAX_BATCH, full_build, model_params  # noqa: F401  (fixture)

SAMPLES = 32
# The negative tests' own build: lenet_bn trained briefly (trained logits make the low-precision checks
# meaningful; an untrained head has near-tied logits).
OWN_MODEL, OWN_SHAPE, OWN_TRAIN_STEPS = "lenet_bn", (1, 28, 28), 60


def _train(net: torch.nn.Module, shape: tuple[int, int, int], steps: int) -> None:
    from exporter.data import sample_images

    images, labels, _ = sample_images(None, "train", shape, 64 * 10, seed=1)
    labels = labels % TEST_NUM_CLASSES
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    for step in range(steps):
        rows = slice((step % 10) * 64, (step % 10 + 1) * 64)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(images[rows])), torch.from_numpy(labels[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def make_build(directory: Path, model: str, shape: tuple[int, int, int], *, train_steps: int = 0,
               exports: tuple[str, ...] = ("onnx", "openvino"), max_batch: int = 16) -> Path:
    """A build directory with a manifest `load_build` accepts: eager fp32/bf16/fp16 + the requested exports."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = create_model(model, in_channels=shape[0], num_classes=TEST_NUM_CLASSES)
    if train_steps:
        _train(net, shape, train_steps)
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "weights.safetensors"))
    options = {"model": model, "in_channels": shape[0], "num_classes": TEST_NUM_CLASSES}
    artifacts = [Artifact(f"eager-{p}" if p != "fp32" else "eager", "eager", "weights.safetensors", p,
                          options=options) for p in ("fp32", "bf16", "fp16")]
    ctx = BuildContext(model_name=model, model=net, input_shape=shape, out_dir=directory, max_batch=max_batch)
    if "onnx" in exports:
        from exporter.backends.onnx import export_onnx

        ctx.artifacts += export_onnx(ctx)
    if "openvino" in exports and BACKENDS["openvino"].unavailable_reason("cpu") is None:
        from exporter.backends.openvino import export_openvino

        ctx.artifacts += export_openvino(ctx)
    artifacts += ctx.artifacts
    manifest = {"format": 1, "model": model, "num_classes": TEST_NUM_CLASSES, "in_channels": shape[0],
                "input_shape": list(shape), "dataset": None,
                "batch": {"dynamic": True, "static": None, "max": max_batch},
                "files": file_entries(directory), "artifacts": [a.to_dict() for a in artifacts]}
    write_json_atomic(directory / "manifest.json", manifest)
    return directory


def rewrite_manifest(directory: Path, **changes: Any) -> None:
    """Change manifest keys and re-hash the build's files (a consistent build, unlike a tampered one)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(changes)
    outputs = ("parity.json", "parity_reference.npz")  # verify's own outputs are not part of the build
    manifest["files"] = {k: v for k, v in file_entries(directory).items() if k not in outputs}
    write_json_atomic(directory / "manifest.json", manifest)


@pytest.fixture(scope="module")
def own_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_build(tmp_path_factory.mktemp(OWN_MODEL), OWN_MODEL, OWN_SHAPE, train_steps=OWN_TRAIN_STEPS)


_REPORTS: dict[str, parity.ParityReport] = {}


def _real_report(model: str, full_build) -> tuple[Any, parity.ParityReport]:
    """`exporter build`'s build of `model` (shared with the export tests) and one verify run over all of it."""
    build = load_build(full_build(model).build_dir)
    if model not in _REPORTS:
        _REPORTS[model] = parity.verify_build(build, samples=SAMPLES, cache_reference=False, progress=False)
    return build, _REPORTS[model]


# --- metrics and tolerance classes ---------------------------------------------------------------------------


def test_every_precision_has_a_tolerance_class_and_fp32_is_strictest() -> None:
    assert set(parity.TOLERANCES) == set(PRECISIONS)
    fp32 = parity.TOLERANCES["fp32"]
    for tol in parity.TOLERANCES.values():
        assert tol.atol >= fp32.atol and tol.rtol >= fp32.rtol and tol.min_agreement <= fp32.min_agreement
        assert tol.min_cosine <= fp32.min_cosine and tol.why


def test_tolerance_overrides_and_bad_values() -> None:
    tol = parity.tolerance_for("bf16", atol=1e-3, min_agreement=0.5)
    assert (tol.atol, tol.rtol, tol.min_agreement) == (1e-3, parity.TOLERANCES["bf16"].rtol, 0.5)
    assert "overridden" in tol.why
    with pytest.raises(parity.UsageError, match="min-agreement"):
        parity.tolerance_for("fp32", min_agreement=1.5)
    with pytest.raises(parity.UsageError, match="tolerance class"):
        parity.tolerance_for("fp64")


def test_metrics_on_known_values() -> None:
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]], np.float32)
    same = parity.compute_metrics(ref, ref.copy(), labels=np.array([0, 1]))
    assert same.max_abs == 0 and same.min_cosine == pytest.approx(1.0) and same.kl == pytest.approx(0, abs=1e-12)
    assert same.agreement == 1 and same.flipped == 0 and same.top5_overlap == 1
    assert same.accuracy == same.reference_accuracy == 0.5
    flipped = ref.copy()
    flipped[1] = [3.0, 1.0, 0.0]  # image 1 now predicts class 0
    m = parity.compute_metrics(ref, flipped, rel_floor=1.0)
    assert m.flipped == 1 and m.flipped_indices == [1] and m.agreement == 0.5
    assert m.max_abs == 3.0 and m.max_rel == 3.0  # |3 − 0| / max(|0|, floor 1)
    assert m.kl > 0 and m.min_cosine < 0.5
    assert parity.judge(ref, flipped, m, parity.TOLERANCES["int8"])  # fails even the loosest class


def test_nan_or_inf_is_a_failure_in_every_class() -> None:
    ref = np.ones((4, 3), np.float32)
    out = ref.copy()
    out[2, 1] = np.nan
    out[3, 0] = np.inf
    m = parity.compute_metrics(ref, out)
    assert m.nonfinite == 2 and m.max_abs == float("inf")
    for tol in parity.TOLERANCES.values():
        assert "non-finite" in parity.judge(ref, out, m, tol)[0]
    assert json.loads(json.dumps(m.to_dict()))["max_abs"] == "inf"  # valid JSON


def test_input_sets_sweep_batch_sizes_and_adversarial_inputs() -> None:
    images = np.random.default_rng(0).random((10, 1, 28, 28), dtype=np.float32)
    sets = {s.name: s for s in parity.make_input_sets(images, None, max_batch=16)}
    assert [name for name in sets] == ["real", "batch=1", "batch=7", "batch=16", "zeros", "large"]
    assert sets["real"].batches == [10]
    assert len(sets["batch=16"].images) == 16 and list(sets["batch=16"].reference_rows[10:]) == list(range(6))
    assert not sets["zeros"].images.any() and sets["large"].images.max() > 100
    static = parity.make_input_sets(images, None, max_batch=16, static_batch=4)
    assert [s.name for s in static] == ["real", "batch=4", "zeros", "large"]
    assert static[0].batches == [4, 4, 2] and all(b == 4 for s in static[1:] for b in s.batches)


def test_static_batch_runs_pad_and_trim() -> None:
    class Doubler:
        calls: list[int] = []

        def infer(self, batch: np.ndarray) -> np.ndarray:
            assert len(batch) == 4
            self.calls.append(len(batch))
            return batch.reshape(len(batch), -1)[:, :3] * 2

    images = np.arange(6 * 3, dtype=np.float32).reshape(6, 3, 1, 1)
    out = parity.run_batches(Doubler(), images, [4, 2], static_batch=4)
    np.testing.assert_array_equal(out, images.reshape(6, 3) * 2)


# --- every backend on real builds --------------------------------------------------------------------------


def _backend_params() -> list[Any]:
    """Every registered backend; the GPU-only ones carry the `gpu` marker."""
    return [pytest.param(name, marks=pytest.mark.gpu) if "cpu" not in cls.devices else name
            for name, cls in BACKENDS.items()]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("model", model_params())
def test_every_artifact_passes_its_precision_class(model: str, backend: str, full_build) -> None:
    """Each artifact `exporter build` made for a cheap model passes its class on real images and the sweep."""
    cls = BACKENDS[backend]
    device = "cpu" if "cpu" in cls.devices else "cuda"
    reason = cls.unavailable_reason(device)
    if reason:
        pytest.skip(f"{backend} unavailable here: {reason}")
    build, report = _real_report(model, full_build)
    assert report.reference["accuracy"] is not None
    if backend == "eager":
        assert report.reference["artifact"] in {a.name for a in build.artifacts}
        return
    results = [r for r in report.results if r.backend == backend]
    if not results:
        skipped = [s for s in build.manifest.get("skipped", []) if s.get("backend") == backend]
        pytest.skip(f"the build has no {backend} artifact" + (f": {skipped[0].get('reason')}" if skipped else ""))
    for result in results:
        assert result.status == parity.PASS, f"{result.artifact}: {result.failures}"
        assert bool(result)
        real = result.set("real")
        assert real.metrics.n == SAMPLES and real.metrics.accuracy is not None
        # the sweep really ran batch 1, an odd size and the largest batch, plus zeros and large inputs
        assert {s.name for s in result.sets} == {"real", "batch=1", "batch=7", f"batch={MAX_BATCH}", "zeros",
                                                 "large"}
        if result.tolerance.precision == "fp32":  # fp32 artifacts of a small model: far inside the class
            assert max(s.metrics.max_abs for s in result.sets if s.name != "large") < result.tolerance.atol / 10
            assert real.metrics.flipped == 0


def test_low_precision_artifacts_pass_their_own_class(own_build: Path) -> None:
    """Trained weights: eager bf16/fp16 (and OpenVINO bf16 where the CPU has it) pass their classes."""
    report = parity.verify_build(load_build(own_build), samples=SAMPLES, progress=False)
    assert report, report.problems
    assert {"eager-bf16", "eager-fp16", "onnx-fp32"} <= {r.artifact for r in report.ran}
    assert report.reference["accuracy"] > 0.5  # really trained, so agreement is judged on meaningful logits


def test_report_is_saved_as_json_and_linked_in_the_manifest(own_build: Path) -> None:
    build = load_build(own_build)
    report = parity.verify_build(build, backends=["onnx-fp32", "eager-fp16"], samples=SAMPLES, progress=False)
    path = parity.save_report(report, build)
    data = json.loads(path.read_text())
    assert data["passed"] is True and data["samples"] == SAMPLES and data["dataset"] == "digits5k"
    assert {r["artifact"] for r in data["results"]} == {r.artifact for r in report.results}
    manifest = json.loads((build.dir / "manifest.json").read_text())
    assert manifest["verify"]["report"] == "parity.json" and manifest["verify"]["passed"] is True
    load_build(build.dir)  # parity.json and the reference cache do not break the build's hashes


def test_subset_run_keeps_the_other_artifacts_results(own_build: Path, tmp_path: Path) -> None:
    target = tmp_path / "build"
    shutil.copytree(own_build, target)
    build = load_build(target)
    parity.save_report(parity.verify_build(build, backends=["onnx-fp32", "eager-fp16"], samples=8, progress=False),
                       build)
    subset = parity.verify_build(build, backends=["eager-fp16"], tolerance_class="fp32", samples=8, progress=False)
    parity.save_report(subset, build)
    data = json.loads((target / "parity.json").read_text())
    status = {r["artifact"]: (r["status"], "carried_over_from" in r) for r in data["results"]}
    assert status == {"onnx-fp32": ("pass", True), "eager-fp16": ("fail", False)}
    assert data["passed"] is False and json.loads((target / "manifest.json").read_text())["verify"]["results"] == {
        "onnx-fp32": "pass", "eager-fp16": "fail"}


def test_reference_is_computed_once_and_cached(own_build: Path) -> None:
    parity.ReferenceCache._memory.clear()
    build = load_build(own_build)
    first = parity.verify_build(build, backends=["eager-fp16"], samples=SAMPLES, progress=False)
    assert (build.dir / "parity_reference.npz").exists()
    parity.ReferenceCache._memory.clear()  # a new process: only the file remains
    second = parity.verify_build(build, backends=["eager-fp16"], samples=SAMPLES, progress=False)
    assert second.cache["hits"] == first.cache["hits"] + first.cache["misses"] and second.cache["misses"] == 0
    np.testing.assert_array_equal(
        [s.metrics.max_abs for s in first.results[0].sets], [s.metrics.max_abs for s in second.results[0].sets])


# --- negative tests: the suite must be able to fail ------------------------------------------------------------


def _perturbed_copy(source: Path, target: Path, initializer: str, factor: float = 1.05) -> Path:
    import onnx
    from onnx import numpy_helper

    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), initializer))
    onnx.save(model, str(target / "model.onnx"))
    rewrite_manifest(target)
    return target


# lenet_bn is Sequential: module 4 is the second conv, whose BatchNorm (5) the ONNX exporter folds into it, so
# the divergence shows at 5 "with 4 fused in"; module 15 is the last Linear, which has its own ONNX output.
@pytest.mark.parametrize("initializer, layer", [("4.weight", "4"), ("15.weight", "15")])
def test_perturbed_onnx_layer_fails_and_bisection_names_it(initializer, layer, own_build, tmp_path) -> None:
    build = load_build(_perturbed_copy(own_build, tmp_path / "perturbed", initializer, 1.05))
    report = parity.verify_build(build, backends=["onnx-fp32"], samples=SAMPLES, progress=False)
    (result,) = report.results
    assert result.status == parity.FAIL and not report
    bisection = result.bisection
    assert bisection is not None, result.bisection_error
    assert layer in bisection.first_diverging.layers
    if layer == "15":
        assert bisection.first_diverging.layer == "15" and bisection.first_diverging.kind == "Linear"
    assert all(e.normalized <= bisection.layer_tol for e in bisection.preceding) and bisection.preceding
    with pytest.raises(parity.ParityError, match="onnx-fp32"):
        report.raise_for_failures()


def test_verify_api_raises_one_error_listing_every_failure(own_build: Path, tmp_path: Path) -> None:
    perturbed = _perturbed_copy(own_build, tmp_path / "perturbed", "15.weight", 1.05)
    with pytest.raises(parity.ParityError) as caught:
        parity.verify(perturbed, backends=["onnx-fp32", "eager-bf16"], tolerance_class="fp32", samples=SAMPLES,
                      progress=False)
    message = str(caught.value)
    assert "onnx-fp32" in message and "eager-bf16" in message and len(message.splitlines()) == 1
    saved = json.loads((perturbed / "parity.json").read_text())  # written before raising
    assert saved["passed"] is False and caught.value.report is not None
    report = parity.verify(perturbed, backends=["eager-fp16"], samples=SAMPLES, progress=False)  # passes: no raise
    verify = json.loads((perturbed / "manifest.json").read_text())["verify"]
    assert report and verify["results"]["eager-fp16"] == "pass"
    assert verify["passed"] is False  # the earlier failures of the other artifacts are kept in parity.json


def test_bf16_judged_as_fp32_fails(own_build: Path) -> None:
    build = load_build(own_build)
    names = ["eager-bf16"] + (["openvino-bf16"] if any(a.name == "openvino-bf16" for a in build.artifacts) else [])
    report = parity.verify_build(build, backends=names, samples=SAMPLES, tolerance_class="fp32", progress=False)
    for result in report.results:
        assert result.status == parity.FAIL, result.artifact
        assert result.executed_precision == "bf16" and result.tolerance.precision == "fp32"
        assert result.bisection and result.bisection.first_diverging is not None
    if len(names) == 1:
        pytest.skip("this CPU has no bf16, so OpenVINO cannot run bf16 (checked eager bf16 only)")


def test_openvino_bf16_under_fp32_class_fails_via_cli(own_build: Path, capsys) -> None:
    from exporter.cli import main

    build = load_build(own_build)
    if not any(a.name == "openvino-bf16" for a in build.artifacts):
        pytest.skip("this CPU has no bf16, so the build has no openvino-bf16 artifact")
    assert main(["verify", str(build.dir), "--backends", "openvino-bf16", "--samples", "16",
                 "--tolerance-class", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "first diverging layer" in out


class BatchOneBugRunner(EagerRunner):
    """An artifact that is right at its traced batch size and wrong at batch 1 (a specialised batch dim)."""

    backend = "test_batch1_bug"

    def run_impl(self, prepared: Any) -> Any:
        out = super().run_impl(prepared)
        return out + 0.5 if out.shape[0] == 1 else out


class NanRunner(EagerRunner):
    backend = "test_nan"

    def run_impl(self, prepared: Any) -> Any:
        out = super().run_impl(prepared).clone()
        out[0, 0] = float("nan")
        return out


class WrongShapeRunner(EagerRunner):
    backend = "test_wrong_shape"

    def run_impl(self, prepared: Any) -> Any:
        return super().run_impl(prepared)[:, :-1]  # one class short


@pytest.fixture()
def fake_backends(monkeypatch: pytest.MonkeyPatch, own_build: Path, tmp_path: Path) -> Path:
    """A copy of the build with one artifact per test-only faulty runner."""
    for cls in (BatchOneBugRunner, NanRunner, WrongShapeRunner):
        monkeypatch.setitem(BACKENDS, cls.backend, cls)
    target = tmp_path / "faulty"
    shutil.copytree(own_build, target)
    manifest = json.loads((target / "manifest.json").read_text())
    eager = manifest["artifacts"][0]
    manifest["artifacts"] += [dict(eager, name=name, backend=name)
                              for name in ("test_batch1_bug", "test_nan", "test_wrong_shape")]
    rewrite_manifest(target, artifacts=manifest["artifacts"])
    return target


def test_batch_sweep_catches_a_batch_specialised_artifact(fake_backends: Path) -> None:
    report = parity.verify_build(load_build(fake_backends), backends=["test_batch1_bug"], samples=SAMPLES,
                                 progress=False)
    (result,) = report.results
    assert not result and [s.name for s in result.sets if s.failures] == ["batch=1"]


def test_nan_output_fails(fake_backends: Path) -> None:
    report = parity.verify_build(load_build(fake_backends), backends=["test_nan"], samples=SAMPLES, progress=False)
    (result,) = report.results
    assert result.status == parity.FAIL and "non-finite" in result.reason


def test_output_of_the_wrong_shape_is_an_error_not_a_crash(fake_backends: Path) -> None:
    report = parity.verify_build(load_build(fake_backends), backends=["test_wrong_shape"], samples=SAMPLES,
                                 progress=False)
    (result,) = report.results
    assert result.status == parity.ERROR and "output shape" in result.reason and not report


def test_reference_that_cannot_run_is_an_error_not_a_verdict(own_build, monkeypatch) -> None:
    build = load_build(own_build)
    monkeypatch.setattr(EagerRunner, "available_impl", classmethod(lambda cls, device: "torch is gone (test)"))
    with pytest.raises(parity.ParityError, match="reference .* cannot run.*torch is gone"):
        parity.verify_build(build, samples=SAMPLES, progress=False)


def test_missing_library_not_requested_vs_requested(own_build, monkeypatch) -> None:
    build = load_build(own_build)
    monkeypatch.setattr(BACKENDS["onnxruntime"], "available_impl",
                        classmethod(lambda cls, device: "onnxruntime is not installed (test)"))
    everything = parity.verify_build(build, samples=8, progress=False)
    ort = [r for r in everything.results if r.backend == "onnxruntime"]
    assert ort and all(r.status == parity.NOT_RUN and not r for r in ort)
    assert bool(everything)  # not asked for by name: shown as not run, the others decide
    asked = parity.verify_build(build, backends=["onnx-fp32"], samples=8, progress=False)
    assert not asked and "not run" in asked.problems[0] and "no artifact could run" in asked.problems[1]


def test_backend_without_artifact_in_build_is_not_run(own_build) -> None:
    build = load_build(own_build)
    report = parity.verify_build(build, backends=["eager-fp16", "tensorrt" if "tensorrt" in BACKENDS else "aoti"],
                                 samples=SAMPLES, progress=False)
    assert [r.status for r in report.results] == [parity.PASS, parity.NOT_RUN] and not report


def test_unknown_backend_name_is_a_usage_error(own_build) -> None:
    build = load_build(own_build)
    with pytest.raises(parity.UsageError, match="did you mean onnx-fp32"):
        parity.verify_build(build, backends=["onnx-fp23"], samples=SAMPLES, progress=False)


def test_only_out_of_range_inputs_are_exempt_for_int8() -> None:
    images = np.random.default_rng(0).random((9, 1, 28, 28), dtype=np.float32)
    sets = parity.make_input_sets(images, None, max_batch=8)
    assert [s.name for s in sets if s.beyond_calibration] == ["large"]
