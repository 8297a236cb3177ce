"""`exporter/comparison.py`: input sets, batched runs, the per-variant comparison and the records it writes.

`compare_variant` is exercised with test-only runners (registered for the test's duration) on a tiny fake
artifact, so each rule — the judged class, error vs not run, the int8 exemption, the summary numbers — is checked
without a real build; the real backends are verified on real builds in `test_parity.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.backends import BACKENDS, Artifact, BackendUnavailable, Variant
from exporter.backends.base import Runner, RunnerError
from exporter.comparison import (
    ERROR,
    FAIL,
    NOT_RUN,
    PARITY_FORMAT,
    PASS,
    QUICK_BATCH,
    ComparisonResult,
    Overrides,
    ParityReport,
    compare_variant,
    make_input_sets,
    not_run,
    reference_outputs,
    run_batches,
)
from exporter.errors import UsageError
from exporter.judge import TOLERANCES

CLASSES = 5


def _logits(images: np.ndarray) -> np.ndarray:
    """The fake model: the first CLASSES pixels of each image are its logits."""
    return images.reshape(len(images), -1)[:, :CLASSES].astype(np.float32)


class FakeRunner(Runner):
    """Computes `_logits` × `scale`; option `executes` is the precision it reports, `flip` negates the first N
    images, `crash` raises at run time, `load` raises at activate (`unavailable` or `broken`)."""

    backend = "test_fake"

    def activate_impl(self) -> None:
        if self.options.get("load") == "unavailable":
            raise BackendUnavailable("test runtime is not installed")
        if self.options.get("load") == "broken":
            raise RunnerError("test runtime cannot read the file")

    @property
    def executed_precision(self) -> str:
        return self.options.get("executes") or self.precision

    def run_impl(self, prepared: np.ndarray) -> Any:
        if self.options.get("crash"):
            raise RuntimeError("segfault-like crash\nwith a second line")
        out = _logits(prepared) * np.float32(self.options.get("scale", 1.0))
        flip = int(self.options.get("flip", 0))
        out[:flip] = -out[:flip]
        return out


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(BACKENDS, FakeRunner.backend, FakeRunner)
    (tmp_path / "model.bin").write_bytes(b"fake")
    return tmp_path


def _images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 2, 3), dtype=np.float32) + np.float32(0.1)


def _compare(build_dir: Path, precision: str = "fp32", *, variant_options: dict | None = None,
             overrides: Overrides | None = None, labels: bool = True, **options: Any) -> ComparisonResult:
    images = _images()
    labels_ = _logits(images).argmax(1) if labels else None  # the reference is right on every image
    sets = make_input_sets(images, labels_, max_batch=8)
    refs = reference_outputs(sets, lambda s: _logits(s.images))
    artifact = Artifact("fake-" + precision, FakeRunner.backend, "model.bin", precision, options=options)
    variant = Variant(artifact, "tuned", variant_options) if variant_options is not None else Variant(artifact)
    result, outputs = compare_variant(variant, build_dir, sets, refs, static_batch=None, overrides=overrides)
    assert set(outputs) == ({s.name for s in sets} if result.sets else set())
    return result


# --- input sets ---------------------------------------------------------------------------------------------------


def test_input_sets_sweep_batch_sizes_and_adversarial_inputs() -> None:
    images = np.random.default_rng(0).random((10, 1, 28, 28), dtype=np.float32)
    sets = {s.name: s for s in make_input_sets(images, None, max_batch=16)}
    assert list(sets) == ["real", "batch=1", "batch=7", "batch=16", "zeros", "large"]
    assert sets["real"].batches == [10] and sets["real"].check_agreement
    assert not any(s.check_agreement for name, s in sets.items() if name != "real")
    assert len(sets["batch=16"].images) == 16 and list(sets["batch=16"].reference_rows[10:]) == list(range(6))
    assert not sets["zeros"].images.any() and sets["large"].images.max() > 100
    assert sets["zeros"].scale_atol and sets["large"].scale_atol
    static = make_input_sets(images, None, max_batch=16, static_batch=4)
    assert [s.name for s in static] == ["real", "batch=4", "zeros", "large"]
    assert static[0].batches == [4, 4, 2] and all(b == 4 for s in static[1:] for b in s.batches)


def test_quick_sets_are_the_real_images_and_a_batch_of_one() -> None:
    """The build's check: the same images as verify's first two sets (the real ones in batches of at most
    QUICK_BATCH, one torch.compile graph), nothing else."""
    images = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    quick = make_input_sets(images, None, max_batch=16, quick=True)
    assert [s.name for s in quick] == ["real", "batch=1"]
    assert quick[0].batches == [QUICK_BATCH, 10 - QUICK_BATCH]
    full = make_input_sets(images, None, max_batch=16)
    assert full[0].batches == [10]
    for a, b in zip(quick, full[:2]):
        assert a.name == b.name and np.array_equal(a.images, b.images)
    assert quick[1].summary() == full[1].summary()
    static = make_input_sets(images, None, max_batch=4, static_batch=4, quick=True)
    assert [s.name for s in static] == ["real", "batch=4"]


def test_bad_images_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="non-empty NCHW"):
        make_input_sets(np.zeros((0, 1, 4, 4), np.float32), None, max_batch=4)
    with pytest.raises(UsageError, match="non-empty NCHW"):
        make_input_sets(np.zeros((4, 4, 4), np.float32), None, max_batch=4)


def test_only_out_of_range_inputs_are_exempt_for_int8() -> None:
    images = np.random.default_rng(0).random((9, 1, 28, 28), dtype=np.float32)
    sets = make_input_sets(images, None, max_batch=8)
    assert [s.name for s in sets if s.beyond_calibration] == ["large"]


def test_static_batch_runs_pad_and_trim() -> None:
    class Doubler:
        calls: list[int] = []

        def infer(self, batch: np.ndarray) -> np.ndarray:
            assert len(batch) == 4
            self.calls.append(len(batch))
            return batch.reshape(len(batch), -1)[:, :3] * 2

    images = np.arange(6 * 3, dtype=np.float32).reshape(6, 3, 1, 1)
    runner = Doubler()
    out = run_batches(runner, images, [4, 2], static_batch=4)
    np.testing.assert_array_equal(out, images.reshape(6, 3) * 2)
    assert runner.calls == [4, 4]


def test_reference_rows_are_reused_not_recomputed() -> None:
    images = _images(5)
    sets = make_input_sets(images, None, max_batch=8)
    computed = []
    refs = reference_outputs(sets, lambda s: computed.append(s.name) or _logits(s.images))
    assert computed == ["real", "zeros", "large"]  # the batch sweep reuses rows of the real images
    np.testing.assert_array_equal(refs["batch=8"], _logits(images)[np.arange(8) % 5])


# --- one variant --------------------------------------------------------------------------------------------------


def test_exact_variant_passes_every_set(fake: Path) -> None:
    result = _compare(fake)
    assert result.status == PASS and bool(result) and not result.failures
    assert [s.name for s in result.sets] == ["real", "batch=1", "batch=7", "batch=8", "zeros", "large"]
    assert result.tolerance.precision == "fp32" and result.judged_by == "stored weights and compute"
    assert result.executed_precision == "fp32" and result.label == "fake-fp32" and result.backend == "test_fake"


def test_one_percent_error_fails_fp32_and_names_the_set(fake: Path) -> None:
    result = _compare(fake, scale=1.01)
    assert result.status == FAIL and not result
    assert result.failures[0].startswith("real: max abs error") and result.reason == result.failures[0]


def test_variant_computing_lower_than_its_file_is_judged_by_its_compute(fake: Path) -> None:
    """An fp32 artifact run with options that make it compute in bf16 gets the bf16 class, and says why."""
    result = _compare(fake, variant_options={"executes": "bf16", "scale": 1.01})
    assert result.label == "fake-fp32+tuned" and result.status == PASS
    assert result.tolerance.precision == "bf16" and result.executed_precision == "bf16"
    assert result.judged_by.startswith("compute") and "fp32" in result.judged_by
    record = result.to_dict()
    assert record["judged_as"] == "bf16" and record["precision"] == "fp32" and record["variant"] == "tuned"
    assert record["options"] == {"executes": "bf16", "scale": 1.01}
    # the same numbers from a runtime that says it computes in fp32 fail: the class decides, not the label
    assert _compare(fake, variant_options={"scale": 1.01}).status == FAIL


def test_stored_precision_decides_when_lower(fake: Path) -> None:
    result = _compare(fake, "int8", scale=1.01)
    assert result.tolerance.precision == "int8" and result.judged_by.startswith("stored weights")


def test_overrides_force_the_class_and_tolerances(fake: Path) -> None:
    forced = _compare(fake, overrides=Overrides("fp32"), variant_options={"executes": "bf16", "scale": 1.01})
    assert forced.status == FAIL and forced.judged_by == "forced (--tolerance-class)"
    loose = _compare(fake, overrides=Overrides(atol=1.0, rtol=0.1), scale=1.01)
    assert loose.status == PASS and loose.tolerance.atol == 1.0 and "overridden" in loose.tolerance.why
    with pytest.raises(UsageError):
        Overrides("fp64")
    with pytest.raises(UsageError, match="min-agreement"):
        Overrides(min_agreement=2.0)
    with pytest.raises(UsageError, match="max-acc-drop"):
        Overrides(max_acc_drop=101.0)
    assert Overrides(max_acc_drop=2.0).tolerance("int8", None)[0].max_acc_drop == 2.0


def test_flipped_images_count_in_the_summary(fake: Path) -> None:
    result = _compare(fake, "int8", flip=3)  # the 12 real images run as batches of 8 and 4: 3 flips in each
    summary = result.summary()
    assert summary["flips"] == 6 and summary["samples"] == 12 and summary["flip_rate"] == pytest.approx(0.5)
    assert summary["reference_accuracy"] == 1.0 and summary["accuracy"] == pytest.approx(0.5)
    assert summary["acc_drop"] == pytest.approx(50.0)  # percentage points
    assert summary["max_abs"] > 0 and summary["min_cosine"] < 0
    assert result.status == FAIL and any("top-1 agreement" in f for f in result.failures)
    assert any("50.00 points below eager's 1.0000" in f for f in result.failures)


def test_summary_without_labels_has_no_accuracy(fake: Path) -> None:
    summary = _compare(fake, labels=False).summary()
    assert summary["flips"] == 0 and summary["accuracy"] is None and summary["acc_drop"] is None


def test_int8_errors_on_out_of_range_inputs_are_notes(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 artifacts saturate beyond their calibration range: the "large" set's failures become notes."""
    original = FakeRunner.run_impl

    def saturating(self, prepared):
        out = original(self, prepared)
        return np.minimum(out, 10.0) if self.precision == "int8" else out

    monkeypatch.setattr(FakeRunner, "run_impl", saturating)
    result = _compare(fake, "int8")
    large = result.set("large")
    assert result.status == PASS and not large.failures and large.notes and "not judged for int8" in large.notes[0]


def test_unavailable_runtime_is_not_run_and_a_broken_file_is_an_error(fake: Path) -> None:
    unavailable = _compare(fake, load="unavailable")
    assert unavailable.status == NOT_RUN and "not installed" in unavailable.reason and not unavailable.sets
    broken = _compare(fake, load="broken")
    assert broken.status == ERROR and broken.reason.startswith("cannot load") and not broken


def test_runtime_crash_is_one_line_error(fake: Path) -> None:
    result = _compare(fake, crash=True)
    assert result.status == ERROR and "segfault-like crash" in result.reason and "\n" not in result.reason
    assert result.failures == [result.reason]


# --- records ------------------------------------------------------------------------------------------------------


def _report(results: list[ComparisonResult], source: str = "verify") -> ParityReport:
    return ParityReport(model="m", build_dir=None, source=source, dataset="d", samples=12, inputs=[],
                        reference={"artifact": "eager", "accuracy": 1.0}, results=results)


def test_report_verdict_and_problems(fake: Path) -> None:
    good, bad = _compare(fake), _compare(fake, scale=1.01)
    assert _report([good]) and not _report([good, bad])
    assert _report([good, bad]).problems == [f"fake-fp32: {f}" for f in bad.failures]
    artifact = Artifact("trt", "tensorrt", "", "fp32")
    unrequested = not_run(Variant(artifact), "no GPU", requested=False)
    assert _report([good, unrequested])  # not asked for by name: shown, does not fail the run
    requested = not_run(Variant(artifact), "no GPU")
    assert _report([good, requested]).problems == ["trt: not run (no GPU)"]
    assert _report([unrequested]).problems == ["no artifact could run, so nothing was verified"]
    from exporter.judge import ParityError

    with pytest.raises(ParityError, match="fake-fp32"):
        _report([good, bad]).raise_for_failures()
    _report([good]).raise_for_failures()


def test_report_document_is_format_2_json(fake: Path) -> None:
    document = _report([_compare(fake), _compare(fake, variant_options={"executes": "bf16"})], "tune").to_dict()
    assert document["format"] == PARITY_FORMAT == 2 and document["source"] == "tune"
    assert set(document["tolerances"]) == set(TOLERANCES)
    first, tuned = document["results"]
    assert tuned["label"] == "fake-fp32+tuned" and tuned["judged_as"] == "bf16"
    assert set(first) == set(tuned)
    assert set(first["summary"]) == {"flips", "samples", "flip_rate", "accuracy", "reference_accuracy",
                                     "acc_drop", "max_abs", "min_cosine"}
    json.dumps(document, allow_nan=False)  # strict JSON: no NaN/Inf in a passing record
