"""`exporter bench --tune` (`exporter/tuning.py`): each runtime's candidates, how a winner is picked (steady and
≥ 3 % faster), and that every winner is judged — in the class of the precision it really computes in — before
`bench` times it as `ARTIFACT+tuned` and `select` may recommend it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter import tuning
from exporter.backends import BACKENDS, Artifact, Variant
from exporter.benchmark import BenchSettings, targets_for_build
from exporter.comparison import Overrides
from exporter.machine import machine_info
from exporter.manifest import load_build, update_manifest
from exporter.parity import save_report, verify_build
from exporter.results import parity_of, parity_records, write_bench
from exporter.select import parse_budget, select_build
from tests.parity_builds import copy_build, own_build  # noqa: F401  (fixture)
from tests.test_benchmark import FAST, TINY_MODEL, _need, make_tiny_build

ONNX = Artifact("onnx-fp32", "onnxruntime", "model.onnx", "fp32")
IR = Artifact("openvino-fp32", "openvino", "openvino/model.xml", "fp32", options={"inference_precision": "f32"})


def _cell(variant: str, p50: float | None, *, status: str = "ok", unstable: bool = False, **options: Any) -> dict:
    return {"artifact": "onnx-fp32", "variant": variant, "options": options, "status": status,
            "p50_ms": p50 if status == "ok" else None, "cv": 0.3 if unstable else 0.01, "unstable": unstable,
            "executed_precision": "fp32", "error": None if status == "ok" else "crashed"}


# --- picking a winner ---------------------------------------------------------------------------------------------


def test_fastest_steady_candidate_wins() -> None:
    entry = tuning.pick_winner([_cell("default", 2.0), _cell("opt=basic", 1.5, graph_optimization_level="basic"),
                                _cell("intra=1", 1.8, intra_op_num_threads=1)])
    assert entry["variant"] == "opt=basic" and entry["options"] == {"graph_optimization_level": "basic"}
    assert entry["speedup"] == pytest.approx(2.0 / 1.5) and entry["default_p50_ms"] == 2.0
    assert [c["variant"] for c in entry["candidates"]] == ["default", "opt=basic", "intra=1"]


def test_an_unstable_candidate_cannot_win() -> None:
    entry = tuning.pick_winner([_cell("default", 2.0), _cell("opt=basic", 1.0, unstable=True),
                                _cell("intra=1", 1.8, intra_op_num_threads=1)])
    assert entry["variant"] == "intra=1"
    only_unstable = tuning.pick_winner([_cell("default", 2.0), _cell("opt=basic", 1.0, unstable=True)])
    assert only_unstable["variant"] == "default" and only_unstable["options"] == {}


def test_a_win_within_the_noise_is_no_win() -> None:
    gain = 1 - tuning.TUNE_MIN_GAIN
    close = tuning.pick_winner([_cell("default", 2.0), _cell("parallel", 2.0 * gain * 1.001)])
    assert close["variant"] == "default" and close["speedup"] == 1.0
    clear = tuning.pick_winner([_cell("default", 2.0), _cell("parallel", 2.0 * gain * 0.99)])
    assert clear["variant"] == "parallel"


def test_failed_candidates_lose_and_a_failed_default_still_has_a_winner() -> None:
    entry = tuning.pick_winner([_cell("default", 2.0), _cell("opt=basic", None, status="failed")])
    assert entry["variant"] == "default" and entry["candidates"][1]["error"] == "crashed"
    no_default = tuning.pick_winner([_cell("default", None, status="failed"), _cell("opt=basic", 1.0)])
    assert no_default["variant"] == "opt=basic" and no_default["speedup"] is None


# --- candidates ---------------------------------------------------------------------------------------------------


def test_candidates_per_runtime() -> None:
    ort = dict(BACKENDS["onnxruntime"].tuning_candidates(ONNX, device="cpu", threads=2, allow_bf16=False))
    assert {"opt=extended", "opt=basic", "intra=1", "parallel"} <= set(ort) and "opt=all" not in ort
    assert "intra=1" not in dict(BACKENDS["onnxruntime"].tuning_candidates(ONNX, device="cpu", threads=1,
                                                                           allow_bf16=False))
    assert BACKENDS["onnxruntime"].tuning_candidates(ONNX, device="cuda", threads=2, allow_bf16=False) == []
    ov = dict(BACKENDS["openvino"].tuning_candidates(IR, device="cpu", threads=2, allow_bf16=False))
    assert {"hint=LATENCY", "hint=THROUGHPUT", "streams=1"} <= set(ov) and "bf16" not in ov
    from exporter.backends.openvino import cpu_supports_bf16

    with_bf16 = dict(BACKENDS["openvino"].tuning_candidates(IR, device="cpu", threads=2, allow_bf16=True))
    assert ("bf16" in with_bf16) == cpu_supports_bf16()
    bf16_ir = Artifact("openvino-bf16", "openvino", IR.path, "bf16", options={"inference_precision": "bf16"})
    assert "bf16" not in dict(BACKENDS["openvino"].tuning_candidates(bf16_ir, device="cpu", threads=2,
                                                                     allow_bf16=True))
    inductor = Artifact("inductor", "inductor", "w", "fp32")
    assert {"max-autotune", "freezing"} <= set(dict(BACKENDS["inductor"].tuning_candidates(
        inductor, device="cpu", threads=2, allow_bf16=False)))
    assert BACKENDS["eager"].tuning_candidates(Artifact("e", "eager", "w", "fp32"), device="cpu", threads=2,
                                               allow_bf16=True) == []


def test_candidate_targets_follow_each_default(tmp_path: Path) -> None:
    _need("onnxruntime")
    make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    defaults, targets = tuning.candidate_targets(build, BenchSettings(batch_sizes=(1,), **FAST), threads=2,
                                                 backends=None, allow_bf16=False)
    assert [t.label for t in defaults] == ["onnx-fp32"]  # eager has nothing to tune
    labels = [t.label for t in targets]
    assert labels[0] == "onnx-fp32" and "onnx-fp32+opt=basic" in labels and "onnx-fp32+intra=1" in labels
    assert all(t.parity.status == "unverified" for t in targets[1:])  # candidates are judged only once they win


# --- tuning a build ------------------------------------------------------------------------------------------------


def _fake_run_bench(latencies: dict[str, float], seen: list | None = None):
    """A run_bench that reports the given p50 per variant name (others 5 ms) instead of timing."""

    def run_bench(targets, **kwargs):
        if seen is not None:
            seen.extend(targets)
        cells = [{"label": t.label, "artifact": t.artifact.name, "variant": t.variant.name,
                  "options": dict(t.variant.options), "status": "ok", "p50_ms": latencies.get(t.variant.name, 5.0),
                  "cv": 0.01, "unstable": False, "executed_precision": t.artifact.precision} for t in targets]
        return {"created": "2026-01-01T00:00:00+00:00", "machine": machine_info(), "cells": cells}

    return run_bench


def test_tuned_winner_is_verified_recorded_and_benchmarked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need("onnxruntime")
    make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    monkeypatch.setattr(tuning, "run_bench", _fake_run_bench({"default": 2.0, "opt=basic": 1.0}))
    entry = tuning.tune_build(build, BenchSettings(batch_sizes=(1,), **FAST), backends=["onnxruntime"])["artifacts"]
    winner = entry["onnx-fp32"]
    assert winner["variant"] == "opt=basic" and winner["options"] == {"graph_optimization_level": "basic"}
    assert winner["parity"]["status"] == "pass" and winner["parity"]["judged_as"] == "fp32"
    manifest = load_build(TINY_MODEL, tmp_path).manifest
    assert manifest["tuning"]["artifacts"]["onnx-fp32"] == json.loads(json.dumps(winner))
    assert manifest["parity"]["results"] == {"onnx-fp32+tuned": "pass"} and manifest["parity"]["source"] == "tune"
    record = parity_records(build)["onnx-fp32+tuned"]
    assert record.source == "tune" and record.options == {"graph_optimization_level": "basic"} and record.passed
    targets = {t.label: t for t in targets_for_build(load_build(TINY_MODEL, tmp_path), ["onnxruntime"])}
    assert targets["onnx-fp32+tuned"].parity.passed  # benchmarked with the record of exactly its options
    assert targets["onnx-fp32"].parity.status == "unverified"  # the artifact itself was never verified


def test_a_failed_winner_is_recorded_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The judge's verdict on the winner goes with it: a failing record, which `select` refuses."""
    _need("onnxruntime")
    make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    monkeypatch.setattr(tuning, "run_bench", _fake_run_bench({"default": 2.0, "parallel": 1.0}))
    runner_class = BACKENDS["onnxruntime"]
    real_run = runner_class.run_impl

    def wrong_when_parallel(self, prepared):  # a candidate whose setting breaks the maths
        out = real_run(self, prepared)
        return out * 1.5 if self.options.get("execution_mode") == "parallel" else out

    monkeypatch.setattr(runner_class, "run_impl", wrong_when_parallel)
    entry = tuning.tune_build(build, BenchSettings(batch_sizes=(1,), **FAST), backends=["onnxruntime"])
    winner = entry["artifacts"]["onnx-fp32"]
    assert winner["variant"] == "parallel" and winner["parity"]["status"] == "fail" and winner["parity"]["reason"]
    assert parity_of(build, "onnx-fp32+tuned", {"execution_mode": "parallel"}).status == "fail"


def test_a_fp16_build_allows_bf16_candidates(own_build: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.backends.openvino import cpu_supports_bf16

    if BACKENDS["openvino"].unavailable_reason("cpu") or not cpu_supports_bf16():
        pytest.skip("needs OpenVINO on a CPU with bf16")
    build = load_build(copy_build(own_build, tmp_path / "build"))
    seen: list = []
    monkeypatch.setattr(tuning, "run_bench", _fake_run_bench({}, seen))
    settings = BenchSettings(batch_sizes=(1,), **FAST)
    tuning.tune_build(build, settings, backends=["openvino-fp32"], save=False)
    assert "openvino-fp32+bf16" not in [t.label for t in seen]
    update_manifest(build, "options", {"fp16": True})
    seen.clear()
    tuning.tune_build(build, settings, backends=["openvino-fp32"], save=False)
    assert "openvino-fp32+bf16" in [t.label for t in seen]


def test_tune_runs_every_candidate_for_real(tmp_path: Path) -> None:
    """The candidates' options are accepted by their runners: every candidate cell runs."""
    _need("onnxruntime")
    make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    result = tuning.tune_build(build, BenchSettings(batch_sizes=(1,), **FAST), backends=["onnxruntime"])
    entry = result["artifacts"]["onnx-fp32"]
    assert len(entry["candidates"]) >= 4 and entry["default_p50_ms"] > 0
    assert all(c["status"] == "ok" for c in entry["candidates"]), entry["candidates"]
    assert ("parity" in entry) == (entry["variant"] != "default")
    assert result["machine"] and result["batch"] == 1


# --- a tuned variant is judged by what it computes before select may pick it ----------------------------------------


def test_tuned_bf16_variant_is_judged_as_bf16_before_select(own_build: Path, tmp_path: Path) -> None:
    from exporter.backends.openvino import cpu_supports_bf16

    if BACKENDS["openvino"].unavailable_reason("cpu") or not cpu_supports_bf16():
        pytest.skip("needs OpenVINO on a CPU with bf16")
    build = load_build(copy_build(own_build, tmp_path / "build"))
    fp32 = build.artifact("openvino-fp32")
    variant = Variant(fp32, "tuned", {"inference_precision": "bf16"})
    report = verify_build(build, variants=[variant], samples=64, progress=False, source="tune")
    (result,) = report.results
    assert result.label == "openvino-fp32+tuned" and result.executed_precision == "bf16"
    assert result.tolerance.precision == "bf16" and "compute" in result.judged_by and result, result.failures
    save_report(report, build)
    record = parity_records(build)["openvino-fp32+tuned"]
    assert record.judged_as == "bf16" and record.source == "tune" and record.options == variant.options
    # the same variant judged as fp32 (what its file stores) fails: the class is what makes it pass
    forced = verify_build(build, variants=[variant], samples=64, progress=False, source="tune",
                          overrides=Overrides("fp32"))
    assert not forced.results[0]

    def cell(label: str, p50: float, options: dict) -> dict:
        artifact = label.split("+")[0]
        return {"label": label, "artifact": artifact, "backend": "openvino", "variant": "tuned" if "+" in label
                else "default", "options": options, "precision": "fp32", "executed_precision": "fp32",
                "device": "cpu", "batch": 1, "threads": 2, "status": "ok", "p50_ms": p50, "p99_ms": p50,
                "throughput_ips": 1000 / p50, "unstable": False, "parity": {}}

    write_bench(build.dir, {"format": 2, "created": "2026-01-01T00:00:00+00:00", "settings": {},
                            "cells": [cell("openvino-fp32+tuned", 1.0, variant.options),
                                      cell("eager", 3.0, {})]})
    choice = select_build(build, parse_budget("5%"), 1, save=False)
    assert choice["recommended"]["label"] == "openvino-fp32+tuned"
