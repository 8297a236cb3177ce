"""The verify stage (`exporter/parity.py`): every backend on real builds, what `verify_build` chooses to run and
writes, and negative tests proving it fails when it must (perturbed weights, bf16 judged as fp32, a
batch-specialised artifact, NaN, wrong shapes, a reference that cannot run).

The per-backend tests verify `exporter build`'s own build of each cheap model (shared with the export tests, one
verify run per model). The other tests use the shared small build of `tests/parity_builds.py` (eager
fp32/bf16/fp16 weights, ONNX, OpenVINO) with briefly trained weights; the judge's rules themselves are tested in
`test_judge.py`, the per-variant comparison in `test_comparison.py` and the bisection in `test_bisect.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter import parity
from exporter.backends import BACKENDS, Artifact, Variant
from exporter.backends.eager import EagerRunner
from exporter.comparison import ERROR, FAIL, NOT_RUN, PASS, Overrides
from exporter.errors import UsageError
from exporter.judge import ParityError
from exporter.manifest import Build, load_build
from exporter.results import parity_records, read_parity
from tests.export_builds import MAX_BATCH, full_build, model_params  # noqa: F401  (fixture)
from tests.parity_builds import SAMPLES, copy_build, own_build, perturbed_copy, rewrite_manifest  # noqa: F401

_REPORTS: dict[str, parity.ParityReport] = {}


def _real_report(model: str, full_build) -> tuple[Any, parity.ParityReport]:
    """`exporter build`'s build of `model` (shared with the export tests) and one verify run over all of it."""
    build = load_build(full_build(model).build_dir)
    if model not in _REPORTS:
        _REPORTS[model] = parity.verify_build(build, samples=SAMPLES, cache_reference=False, progress=False)
    return build, _REPORTS[model]


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
    assert report.reference["accuracy"] is not None and report.source == "verify"
    if backend == "eager":
        assert report.reference["artifact"] in {a.name for a in build.artifacts}
        return
    results = [r for r in report.results if r.backend == backend]
    if not results:
        skipped = [s for s in build.manifest.get("skipped", []) if s.get("backend") == backend]
        pytest.skip(f"the build has no {backend} artifact" + (f": {skipped[0].get('reason')}" if skipped else ""))
    for result in results:
        assert result.status == PASS, f"{result.artifact}: {result.failures}"
        assert bool(result)
        real = result.set("real")
        assert real.metrics.n == SAMPLES and real.metrics.accuracy is not None
        # the sweep really ran batch 1, an odd size and the largest batch, plus zeros and large inputs
        assert {s.name for s in result.sets} == {"real", "batch=1", "batch=7", f"batch={MAX_BATCH}", "zeros",
                                                 "large"}
        artifact = next(a for a in build.artifacts if a.name == result.artifact)
        assert result.tolerance.precision in (artifact.precision, result.executed_precision)
        if result.tolerance.precision == "fp32":  # fp32 artifacts of a small model: far inside the class
            assert max(s.metrics.max_abs for s in result.sets if s.name != "large") < result.tolerance.atol / 10
            assert real.metrics.flipped == 0


def test_low_precision_artifacts_pass_their_own_class(own_build: Path) -> None:
    """Trained weights: eager bf16/fp16 (and OpenVINO bf16 where the CPU has it) pass their classes."""
    report = parity.verify_build(load_build(own_build), samples=SAMPLES, progress=False)
    assert report, report.problems
    assert {"eager-bf16", "eager-fp16", "onnx-fp32"} <= {r.artifact for r in report.ran}
    assert report.result("eager-bf16").tolerance.precision == "bf16"
    assert report.reference["accuracy"] > 0.5  # really trained, so agreement is judged on meaningful logits


def test_report_is_saved_as_json_and_linked_in_the_manifest(own_build: Path, tmp_path: Path) -> None:
    build = load_build(copy_build(own_build, tmp_path / "build"))
    report = parity.verify_build(build, backends=["onnx-fp32", "eager-fp16"], samples=SAMPLES, progress=False)
    path = parity.save_report(report, build)
    data = read_parity(build.dir)
    assert data == json.loads(path.read_text()) and data["format"] == 2 and data["source"] == "verify"
    assert data["passed"] is True and data["samples"] == SAMPLES and data["dataset"] == "digits5k"
    assert {r["label"] for r in data["results"]} == {r.label for r in report.results}
    assert all(r["source"] == "verify" and r["judged_at"] == data["created"] for r in data["results"])
    section = json.loads((build.dir / "manifest.json").read_text())["parity"]
    assert section == {"file": "parity.json", "passed": True, "created": data["created"], "source": "verify",
                       "samples": SAMPLES, "dataset": "digits5k",
                       "results": {"onnx-fp32": "pass", "eager-fp16": "pass"}}
    load_build(build.dir)  # parity.json and the reference cache do not break the build's hashes


def test_subset_run_keeps_the_other_artifacts_results(own_build: Path, tmp_path: Path) -> None:
    build = load_build(copy_build(own_build, tmp_path / "build"))
    first = parity.verify_build(build, backends=["onnx-fp32", "eager-fp16"], samples=8, progress=False)
    parity.save_report(first, build)
    subset = parity.verify_build(build, backends=["eager-fp16"], overrides=Overrides("fp32"), samples=8,
                                 progress=False)
    parity.save_report(subset, build)
    data = read_parity(build.dir)
    status = {r["label"]: (r["status"], r["judged_at"]) for r in data["results"]}
    assert status == {"onnx-fp32": ("pass", first.created), "eager-fp16": ("fail", subset.created)}
    assert data["passed"] is False and data["problems"] and all(p.startswith("eager-fp16") for p in data["problems"])
    assert json.loads((build.dir / "manifest.json").read_text())["parity"]["results"] == {
        "onnx-fp32": "pass", "eager-fp16": "fail"}
    records = parity_records(build)
    assert records["eager-fp16"].judged_as == "fp32" and records["eager-fp16"].judged_by.startswith("forced")
    assert records["onnx-fp32"].passed and records["eager"].status == "reference"


def test_results_of_other_weights_are_not_kept(own_build: Path, tmp_path: Path) -> None:
    """A rebuilt model's old records say nothing about the new weights: a later run replaces them all."""
    build = load_build(copy_build(own_build, tmp_path / "build"))
    parity.save_report(parity.verify_build(build, backends=["onnx-fp32"], samples=8, progress=False), build)
    document = read_parity(build.dir)
    document["reference"]["weights_sha256"] = "0" * 64
    (build.dir / "parity.json").write_text(json.dumps(document))
    parity.save_report(parity.verify_build(build, backends=["eager-fp16"], samples=8, progress=False), build)
    assert [r["label"] for r in read_parity(build.dir)["results"]] == ["eager-fp16"]


def test_reference_is_computed_once_and_cached(own_build: Path, tmp_path: Path) -> None:
    parity.ReferenceCache._memory.clear()
    build = load_build(copy_build(own_build, tmp_path / "build"))
    first = parity.verify_build(build, backends=["eager-fp16"], samples=SAMPLES, progress=False)
    assert (build.dir / "parity_reference.npz").exists() and first.cache["misses"] > 0
    parity.ReferenceCache._memory.clear()  # a new process: only the file remains
    second = parity.verify_build(build, backends=["eager-fp16"], samples=SAMPLES, progress=False)
    assert second.cache["hits"] == first.cache["hits"] + first.cache["misses"] and second.cache["misses"] == 0
    np.testing.assert_array_equal(
        [s.metrics.max_abs for s in first.results[0].sets], [s.metrics.max_abs for s in second.results[0].sets])


def test_given_variants_run_as_requested_with_their_source(own_build: Path) -> None:
    build = load_build(own_build)
    variant = Variant(build.artifact("eager-fp16"), "tuned", {})
    report = parity.verify_build(build, variants=[variant], samples=8, progress=False, source="tune")
    (result,) = report.results
    assert report.source == "tune" and result.label == "eager-fp16+tuned" and result.requested and result


# --- choosing what to verify --------------------------------------------------------------------------------------


def _artifacts() -> list[Artifact]:
    return [Artifact("eager", "eager", "w", "fp32"), Artifact("eager-bf16", "eager", "w", "bf16"),
            Artifact("onnx-fp32", "onnxruntime", "m.onnx", "fp32"),
            Artifact("onnx-fp16", "onnxruntime", "m16.onnx", "fp16")]


def test_select_variants_by_artifact_or_backend_name() -> None:
    artifacts = _artifacts()
    default = parity.select_variants(artifacts, None)
    assert [(v.label, asked) for v, asked in default] == [("eager-bf16", False), ("onnx-fp32", False),
                                                          ("onnx-fp16", False)]
    chosen = parity.select_variants(artifacts, ["onnxruntime", "onnx-fp32", "eager-bf16"])
    assert [(v.label, asked) for v, asked in chosen] == [("onnx-fp32", True), ("onnx-fp16", True),
                                                         ("eager-bf16", True)]  # no duplicates
    (missing, asked), = parity.select_variants(artifacts, ["openvino"])
    assert asked and missing.artifact.path == "" and missing.label == "openvino"
    with pytest.raises(UsageError, match="did you mean onnx-fp32"):
        parity.select_variants(artifacts, ["onnx-fp23"])


def test_batch_limits_from_the_manifest() -> None:
    def build(batch: Any) -> Build:
        return Build(Path("."), {"batch": batch})

    assert parity.batch_limits(build({"dynamic": True, "static": None, "max": 16})) == (16, None)
    assert parity.batch_limits(build({"dynamic": False, "static": 4, "max": 4})) == (4, 4)
    assert parity.batch_limits(build(None)) == (64, None)


def test_input_key_depends_on_reference_and_bytes() -> None:
    images = np.zeros((2, 1, 4, 4), np.float32)
    key = parity.input_key("ref", images)
    assert key == parity.input_key("ref", images.copy())
    assert key != parity.input_key("other", images)
    assert key != parity.input_key("ref", images + 1) != parity.input_key("ref", images.reshape(1, 2, 4, 4))


# --- negative tests: the suite must be able to fail ------------------------------------------------------------


def test_verify_api_raises_one_error_listing_every_failure(own_build: Path, tmp_path: Path) -> None:
    perturbed = perturbed_copy(own_build, tmp_path / "perturbed", "15.weight", 1.05)
    with pytest.raises(ParityError) as caught:
        parity.verify(perturbed, backends=["onnx-fp32", "eager-bf16"], overrides=Overrides("fp32"),
                      samples=SAMPLES, progress=False)
    message = str(caught.value)
    assert "onnx-fp32" in message and "eager-bf16" in message and len(message.splitlines()) == 1
    saved = read_parity(perturbed)  # written before raising
    assert saved["passed"] is False and caught.value.report is not None
    report = parity.verify(perturbed, backends=["eager-fp16"], samples=SAMPLES, progress=False)  # passes: no raise
    section = json.loads((perturbed / "manifest.json").read_text())["parity"]
    assert report and section["results"]["eager-fp16"] == "pass"
    assert section["passed"] is False  # the earlier failures of the other artifacts are kept in parity.json


def test_bf16_judged_as_fp32_fails(own_build: Path) -> None:
    build = load_build(own_build)
    names = ["eager-bf16"] + (["openvino-bf16"] if any(a.name == "openvino-bf16" for a in build.artifacts) else [])
    report = parity.verify_build(build, backends=names, samples=SAMPLES, overrides=Overrides("fp32"),
                                 progress=False)
    for result in report.results:
        assert result.status == FAIL, result.artifact
        assert result.executed_precision == "bf16" and result.tolerance.precision == "fp32"
        assert result.bisection and result.bisection.first_diverging is not None
    if len(names) == 1:
        pytest.skip("this CPU has no bf16, so OpenVINO cannot run bf16 (checked eager bf16 only)")


def test_openvino_bf16_under_fp32_class_fails_via_cli(own_build: Path, tmp_path: Path, capsys) -> None:
    from exporter.cli import main

    build = load_build(own_build)
    if not any(a.name == "openvino-bf16" for a in build.artifacts):
        pytest.skip("this CPU has no bf16, so the build has no openvino-bf16 artifact")
    target = copy_build(own_build, tmp_path / "build")
    assert main(["verify", str(target), "--backends", "openvino-bf16", "--samples", "16",
                 "--tolerance-class", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "first diverging layer" in out and "judged in the fp32 class" in out


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
    target = copy_build(own_build, tmp_path / "faulty")
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
    assert result.status == FAIL and "non-finite" in result.reason


def test_output_of_the_wrong_shape_is_an_error_not_a_crash(fake_backends: Path) -> None:
    report = parity.verify_build(load_build(fake_backends), backends=["test_wrong_shape"], samples=SAMPLES,
                                 progress=False)
    (result,) = report.results
    assert result.status == ERROR and "output shape" in result.reason and not report


def test_reference_that_cannot_run_is_an_error_not_a_verdict(own_build, monkeypatch) -> None:
    build = load_build(own_build)
    monkeypatch.setattr(EagerRunner, "available_impl", classmethod(lambda cls, device: "torch is gone (test)"))
    with pytest.raises(ParityError, match="reference .* cannot run.*torch is gone"):
        parity.verify_build(build, samples=SAMPLES, progress=False)


def test_build_without_a_reference_is_refused(own_build, tmp_path) -> None:
    target = copy_build(own_build, tmp_path / "noref")
    manifest = json.loads((target / "manifest.json").read_text())
    rewrite_manifest(target, artifacts=[a for a in manifest["artifacts"] if a["name"] != "eager"])
    with pytest.raises(ParityError, match="no reference artifact"):
        parity.verify_build(load_build(target), samples=8, progress=False)


def test_missing_library_not_requested_vs_requested(own_build, monkeypatch) -> None:
    build = load_build(own_build)
    monkeypatch.setattr(BACKENDS["onnxruntime"], "available_impl",
                        classmethod(lambda cls, device: "onnxruntime is not installed (test)"))
    everything = parity.verify_build(build, samples=8, progress=False)
    ort = [r for r in everything.results if r.backend == "onnxruntime"]
    assert ort and all(r.status == NOT_RUN and not r for r in ort)
    assert bool(everything)  # not asked for by name: shown as not run, the others decide
    asked = parity.verify_build(build, backends=["onnx-fp32"], samples=8, progress=False)
    assert not asked and "not run" in asked.problems[0] and "no artifact could run" in asked.problems[1]


def test_backend_without_artifact_in_build_is_not_run(own_build) -> None:
    build = load_build(own_build)
    report = parity.verify_build(build, backends=["eager-fp16", "tensorrt" if "tensorrt" in BACKENDS else "aoti"],
                                 samples=SAMPLES, progress=False)
    assert [r.status for r in report.results] == [PASS, NOT_RUN] and not report
    assert "no artifact for this backend" in report.results[1].reason


def test_unknown_backend_name_is_a_usage_error(own_build) -> None:
    build = load_build(own_build)
    with pytest.raises(UsageError, match="did you mean onnx-fp32"):
        parity.verify_build(build, backends=["onnx-fp23"], samples=SAMPLES, progress=False)
    with pytest.raises(UsageError, match="--samples"):
        parity.verify_build(build, samples=0, progress=False)


def test_images_of_the_wrong_shape_are_a_usage_error(own_build) -> None:
    with pytest.raises(UsageError, match="the build's artifacts take 1×28×28"):
        parity.verify_build(load_build(own_build), images=np.zeros((4, 1, 32, 32), np.float32), progress=False)


# --- presentation ---------------------------------------------------------------------------------------------


def test_table_and_details_show_every_verdict(fake_backends: Path) -> None:
    report = parity.verify_build(load_build(fake_backends), backends=["eager-bf16", "test_nan", "test_wrong_shape"],
                                 samples=8, progress=False)
    rows = {row["artifact"]: row for row in parity.report_rows(report)}
    assert rows["eager"]["status"] == "reference"
    assert rows["eager-bf16"]["status"] == "PASS" and rows["eager-bf16"]["class"] == "bf16"
    assert rows["test_nan"]["status"] == "FAIL" and rows["test_wrong_shape"]["status"] == "ERROR"
    assert {key for key, _ in parity.TABLE_COLUMNS} >= set(rows["eager-bf16"])
    # the table's errors are the natural images' (an int8 artifact's saturated "large" set is a note, not its cosine)
    bf16 = report.result("eager-bf16")
    bf16.set("large").metrics.min_cosine = 0.1
    natural = min(s.metrics.min_cosine for s in bf16.sets if s.name == "real" or s.name.startswith("batch="))
    assert {row["artifact"]: row for row in parity.report_rows(report)}["eager-bf16"]["cosine"] == f"{natural:.6f}"
    details = parity.report_details(report)
    assert any(line.startswith("test_wrong_shape: error") for line in details)
    assert any(line.startswith("test_nan: FAIL on real") for line in details)
    assert details[-1].startswith("FAIL: 1/3 artifacts pass")
