"""`exporter select`: the fastest artifact within an accuracy budget, from synthetic and real results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.select import Budget, SelectError, describe_choice, parse_budget, select_artifact, select_build
from tests.test_benchmark import TINY_MODEL, make_tiny_build, noise_tolerated


def _cell(label: str, p50: float, parity: dict | None, *, batch: int = 1, status: str = "ok", **extra) -> dict:
    return {"label": label, "artifact": label.split("+")[0], "backend": label.split("-")[0], "variant": "default",
            "precision": "fp32", "executed_precision": extra.pop("precision", "fp32"), "batch": batch,
            "status": status, "error": extra.pop("error", None), "p50_ms": p50 if status == "ok" else None,
            "p99_ms": p50 * 1.2 if status == "ok" else None, "throughput_ips": batch * 1000 / p50,
            "parity": parity or {"status": "unverified"}, **extra}


def _verified(flips: int, samples: int = 1000, acc_drop: float = 0.0, status: str = "pass") -> dict:
    return {"status": status, "flips": flips, "samples": samples, "flip_rate": flips / samples, "acc_drop": acc_drop}


CELLS = [
    _cell("openvino-bf16", 1.0, None, precision="bf16"),  # fastest but never verified
    _cell("onnx-int8", 1.5, _verified(flips=20, acc_drop=0.6), precision="int8"),  # 2 % flips: over budget
    _cell("trt-fp16", 1.7, None, status="failed", error="out of memory: CUDA OOM"),
    _cell("onnx-fp16", 1.8, _verified(flips=30, status="fail"), precision="fp16"),  # failed its class
    _cell("onnxruntime-fp32", 2.0, _verified(flips=3, acc_drop=0.1)),  # 0.3 %: the winner
    _cell("openvino-fp32", 2.2, _verified(flips=0)),  # runner-up
    _cell("eager", 4.0, {"status": "reference", "flips": 0, "samples": None, "flip_rate": 0.0, "acc_drop": 0.0}),
    _cell("onnxruntime-fp32", 0.5, _verified(flips=0), batch=8),  # another batch: ignored at batch 1
]


def test_fastest_within_flip_budget_with_reasons() -> None:
    choice = select_artifact(CELLS, parse_budget("0.5%"), batch=1)
    assert choice["recommended"]["label"] == "onnxruntime-fp32" and choice["recommended"]["p50_ms"] == 2.0
    assert choice["runner_up"]["label"] == "openvino-fp32"
    reasons = {r["label"]: " ".join(r["reasons"]) for r in choice["rejected_faster"]}
    assert list(reasons) == ["openvino-bf16", "onnx-int8", "onnx-fp16"]
    assert "exporter verify" in reasons["openvino-bf16"]
    assert "2.00% > 0.5%" in reasons["onnx-int8"]
    assert "parity fail" in reasons["onnx-fp16"]
    failed = next(r for r in choice["rejected"] if r["label"] == "trt-fp16")  # no timing: not "faster"
    assert "out of memory" in failed["reasons"][0]
    text = "\n".join(describe_choice(choice))
    assert "rejected (faster, p50 1.000 ms): openvino-bf16" in text and "not timed: trt-fp16" in text
    assert choice["candidates"] == 7


def test_accuracy_drop_budget_and_combined_budget() -> None:
    loose_flips = select_artifact(CELLS, parse_budget("5%"), batch=1)
    assert loose_flips["recommended"]["label"] == "onnx-int8"
    both = select_artifact(CELLS, parse_budget("5%", "0.2"), batch=1)
    assert both["recommended"]["label"] == "onnxruntime-fp32"
    assert "accuracy drop 0.60 points > 0.2" in both["rejected_faster"][1]["reasons"][0]
    strict = select_artifact(CELLS, parse_budget("0%"), batch=1)
    assert strict["recommended"]["label"] == "openvino-fp32" and strict["runner_up"]["label"] == "eager"


def test_nothing_qualifies_or_no_results_at_batch() -> None:
    unverified = [c for c in CELLS if c["parity"]["status"] == "unverified"]
    with pytest.raises(SelectError, match="no artifact meets the budget.*openvino-bf16: no parity results"):
        select_artifact(unverified, Budget(max_flip_rate=0.01), batch=1)
    with pytest.raises(SelectError, match="no benchmark results at batch 32"):
        select_artifact(CELLS, Budget(max_flip_rate=0.01), batch=32)


@pytest.mark.parametrize(("flips", "drop", "expected"), [
    ("0.5%", None, Budget(0.005, None)), ("0.005", None, Budget(0.005, None)), (None, "0.2", Budget(None, 0.2)),
    ("1%", "0.5", Budget(0.01, 0.5)),
])
def test_parse_budget(flips, drop, expected) -> None:
    assert parse_budget(flips, drop) == expected


@pytest.mark.parametrize(("flips", "drop"), [(None, None), ("abc", None), ("150%", None), (None, "-1"),
                                              (None, "x")])
def test_parse_budget_rejects_bad_input(flips, drop) -> None:
    from exporter.errors import UsageError

    with pytest.raises(UsageError):
        parse_budget(flips, drop)


def test_an_unstable_cell_wins_only_when_no_steady_candidate_is_within_its_spread() -> None:
    ahead = [_cell("fast-but-noisy", 0.5, _verified(flips=0), unstable=True, cv=0.4), *CELLS]
    choice = select_artifact(ahead, parse_budget("0.5%"), batch=1)
    assert choice["recommended"]["label"] == "fast-but-noisy"  # 0.5 · (1 + 2 · 0.4) = 0.9 < 2.0: a measured lead
    assert "timing unstable, cv 40%" in describe_choice(choice)[0]

    close = [_cell("fast-but-noisy", 1.9, _verified(flips=0), unstable=True, cv=0.4), *CELLS]
    choice = select_artifact(close, parse_budget("0.5%"), batch=1)
    assert choice["recommended"]["label"] == "onnxruntime-fp32"  # steady, and inside the noisy one's spread
    noisy = next(r for r in choice["rejected_faster"] if r["label"] == "fast-but-noisy")
    assert "timing unstable (cv 40%" in noisy["reasons"][0] and "onnxruntime-fp32" in noisy["reasons"][0]


def test_rare_spikes_do_not_stretch_an_unstable_cells_spread_past_its_p90() -> None:
    """lenet's onnx-fp32: p50 16 µs, cv 589 % from a few stalls; 90 % of its calls beat a steady 76 µs artifact."""
    spiky = [_cell("onnxruntime-fp32", 0.016, _verified(flips=0), unstable=True, cv=5.89, p90_ms=0.02),
             _cell("openvino-bf16", 0.076, _verified(flips=0), unstable=False, cv=0.05)]
    assert select_artifact(spiky, parse_budget("0.5%"), batch=1)["recommended"]["label"] == "onnxruntime-fp32"
    spiky[0]["p90_ms"] = 0.08  # the steady one inside its p90: the lead is not measured
    assert select_artifact(spiky, parse_budget("0.5%"), batch=1)["recommended"]["label"] == "openvino-bf16"


# --- on a build: the saved results, read through exporter.results ----------------------------------------------

TUNED = {"inference_precision": "bf16"}


def _bench_cell(label: str, p50: float, *, options: dict | None = None, unstable: bool = False,
                batch: int = 1) -> dict:
    from tests.test_results import bench_cell

    return bench_cell(label, batch, p50, options=options or {}, unstable=unstable, cv=0.3 if unstable else 0.01,
                      p99_ms=p50 * 1.1, throughput_ips=1000.0 * batch / p50)


def _saved_build(root: Path, cells: list[dict], records: list[dict]):
    """A tiny build with the given bench cells in bench.json and parity records in parity.json (format 2)."""
    from exporter.manifest import load_build
    from exporter.results import write_bench, write_parity
    from tests.test_results import bench_document, parity_document

    make_tiny_build(root)
    build = load_build(TINY_MODEL, root)
    write_bench(build.dir, bench_document(*cells))
    write_parity(build.dir, parity_document(*records), [a.name for a in build.artifacts])
    return build


def _record(label: str, status: str = "pass", *, options: dict | None = None, flips: int = 0) -> dict:
    from tests.test_results import parity_entry

    return parity_entry(label, status, options=options, flips=flips, reason="" if status == "pass" else "bad")


BASE_CELLS = [_bench_cell("openvino-fp32", 2.0), _bench_cell("eager", 4.0)]
BASE_RECORDS = [_record("openvino-fp32")]


@pytest.mark.parametrize("tuned_record, reason", [
    (_record("openvino-fp32+tuned", "fail", options=TUNED), "parity fail: bad"),
    (_record("openvino-fp32+tuned", options={"inference_precision": "f32"}), "judged with options"),
    (None, "no parity results"),  # the artifact's own record (a pass) must not vouch for the tuned variant
])
def test_a_tuned_variant_without_its_own_passing_record_is_never_selected(tmp_path: Path, tuned_record, reason):
    records = BASE_RECORDS + ([tuned_record] if tuned_record else [])
    build = _saved_build(tmp_path, [_bench_cell("openvino-fp32+tuned", 0.5, options=TUNED), *BASE_CELLS], records)
    choice = select_build(build, parse_budget("1%"), 1)
    assert choice["recommended"]["label"] == "openvino-fp32" and choice["runner_up"]["label"] == "eager"
    (rejected,) = choice["rejected_faster"]
    assert rejected["label"] == "openvino-fp32+tuned" and reason in rejected["reasons"][0]
    text = "\n".join(describe_choice(choice))
    assert "rejected (faster, p50 0.500 ms): openvino-fp32+tuned" in text


def test_a_tuned_variant_with_its_own_passing_record_is_selected(tmp_path: Path) -> None:
    records = BASE_RECORDS + [_record("openvino-fp32+tuned", options=TUNED)]
    build = _saved_build(tmp_path, [_bench_cell("openvino-fp32+tuned", 0.5, options=TUNED), *BASE_CELLS], records)
    choice = select_build(build, parse_budget("1%"), 1)
    assert choice["recommended"]["label"] == "openvino-fp32+tuned" and choice["recommended"]["options"] == TUNED
    from exporter.manifest import load_build

    saved = load_build(TINY_MODEL, tmp_path).manifest["recommended"]
    assert saved["recommended"]["label"] == "openvino-fp32+tuned" and saved["batch"] == 1


def test_an_unstable_fastest_cell_is_refused_on_a_build_when_a_steady_one_is_within_its_spread(
        tmp_path: Path) -> None:
    records = BASE_RECORDS + [_record("openvino-fp32+tuned", options=TUNED)]
    build = _saved_build(tmp_path, [_bench_cell("openvino-fp32+tuned", 1.5, options=TUNED, unstable=True),
                                    *BASE_CELLS], records)
    choice = select_build(build, parse_budget("1%"), 1, save=False)
    assert choice["recommended"]["label"] == "openvino-fp32"  # 2.0 ≤ 1.5 · (1 + 2 · 0.3)
    assert "timing unstable" in choice["rejected_faster"][0]["reasons"][0]


def test_select_on_a_build_writes_recommended(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.manifest import load_build
    from exporter.results import write_parity
    from tests.test_results import parity_document

    make_tiny_build(tmp_path)
    assert main(["select", TINY_MODEL, "--artifacts", str(tmp_path), "--max-flips", "1%"]) == 1
    assert "run `exporter bench" in capsys.readouterr().err
    with noise_tolerated():
        assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--batch-sizes", "1", "--warmup", "1",
                     "--min-runs", "3", "--budget", "0.01", "--gemm-size", "128", "--json"]) == 0
    capsys.readouterr()
    build = load_build(TINY_MODEL, tmp_path)
    write_parity(build.dir, parity_document(_record("eager-bf16")), ["eager", "eager-bf16"])
    # select re-reads parity now (the cells were benchmarked before any record existed)
    assert main(["select", TINY_MODEL, "--artifacts", str(tmp_path), "--max-flips", "1%", "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)
    assert {choice["recommended"]["label"], choice["runner_up"]["label"]} == {"eager", "eager-bf16"}
    recommended = load_build(TINY_MODEL, tmp_path).manifest["recommended"]
    assert recommended["recommended"]["label"] == choice["recommended"]["label"] and recommended["batch"] == 1
    assert main(["select", TINY_MODEL, "--artifacts", str(tmp_path)]) == 2  # no budget given
    assert main(["select", TINY_MODEL, "--artifacts", str(tmp_path), "--max-flips", "1%", "--batch", "8"]) == 1
    assert "no benchmark results at batch 8" in capsys.readouterr().err


@pytest.mark.parametrize("name, content", [
    ("bench.json", '{"format": 2, "cells": "x"}'),
    ("bench.json", '{"format": 2, "cells": [{"label": "eager", "batch": 1}]}'),
    ("bench.json", '{"format": 1, "results": []}'),
    ("parity.json", '{"format": 2, "results": [{"label": "eager"}], "reference": {}}'),
    ("parity.json", "not json at all"),
])
def test_wrong_schema_result_file_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              name: str, content: str) -> None:
    build = _saved_build(tmp_path, BASE_CELLS, BASE_RECORDS)
    (build.dir / name).write_text(content)
    for argv in (["select", TINY_MODEL, "--max-flips", "1%"], ["report", TINY_MODEL, "--out", str(tmp_path / "r")]):
        code = main([*argv, "--artifacts", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1, (argv, err)
        assert name in err[0] and "Traceback" not in err[0] and err[0].startswith(f"exporter {argv[0]}: error:")
