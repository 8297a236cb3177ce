"""`exporter/results.py`: the one reader and writer of `parity.json` and `bench.json` — validation, merging, and
the parity record `select`, `bench` and `report` read (a record judged with other options does not count)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from exporter.manifest import Build
from exporter.results import (
    BENCH_FORMAT,
    UNVERIFIED,
    ResultsError,
    parity_of,
    parity_records,
    parity_summary,
    read_bench,
    read_parity,
    write_bench,
    write_parity,
)

ORDER = ["eager", "onnx-fp32", "openvino-fp32"]


def parity_entry(label: str, status: str = "pass", *, options: dict | None = None, flips: int = 0,
                 samples: int = 100, acc: float = 0.9, ref_acc: float = 0.9, judged_as: str = "fp32",
                 reason: str = "", **extra: Any) -> dict[str, Any]:
    """One record as `ComparisonResult.to_dict` writes it (the fields the readers use)."""
    artifact, _, variant = label.partition("+")
    return {"label": label, "artifact": artifact, "variant": variant or "default", "options": options or {},
            "backend": "x", "precision": "fp32", "executed_precision": judged_as, "judged_as": judged_as,
            "judged_by": "stored weights and compute", "status": status, "passed": status == "pass",
            "reason": reason, "failures": [reason] if reason else [],
            "summary": {"flips": flips, "samples": samples, "flip_rate": flips / samples, "accuracy": acc,
                        "reference_accuracy": ref_acc, "acc_drop": 100 * (ref_acc - acc), "max_abs": 1e-5,
                        "min_cosine": 1.0}, **extra}


def parity_document(*entries: dict[str, Any], source: str = "verify", weights: str = "w1",
                    created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    problems = [f"{e['label']}: {e['reason']}" for e in entries if e["status"] in ("fail", "error")]
    return {"format": 2, "model": "lenet", "build_dir": None, "source": source, "passed": not problems,
            "problems": problems, "dataset": "digits5k", "samples": 100, "inputs": [],
            "reference": {"artifact": "eager", "accuracy": 0.9, "weights_sha256": weights},
            "created": created, "results": [copy.deepcopy(e) for e in entries]}


def bench_cell(label: str, batch: int = 1, p50: float | None = 1.0, *, status: str = "ok", threads: int = 2,
               options: dict | None = None, **extra: Any) -> dict[str, Any]:
    artifact, _, variant = label.partition("+")
    return {"label": label, "artifact": artifact, "backend": "x", "variant": variant or "default",
            "options": options or {}, "precision": "fp32", "executed_precision": "fp32", "device": "cpu",
            "batch": batch, "threads": threads, "status": status, "p50_ms": p50 if status == "ok" else None,
            "parity": {"status": "unverified"}, **extra}


def bench_document(*cells: dict[str, Any], created: str = "2026-01-01T00:00:00+00:00") -> dict[str, Any]:
    return {"format": BENCH_FORMAT, "created": created, "settings": {"threads": 2, "device": "cpu"},
            "cells": [dict(c) for c in cells]}


def _build(directory: Path) -> Build:
    return Build(directory, {"model": "lenet", "artifacts": []})


# --- parity.json --------------------------------------------------------------------------------------------------


def test_no_file_is_none_and_no_records(tmp_path: Path) -> None:
    assert read_parity(tmp_path) is None and read_bench(tmp_path) is None
    assert parity_records(_build(tmp_path)) == {}
    assert parity_of(_build(tmp_path), "onnx-fp32") is UNVERIFIED and not UNVERIFIED.passed


def test_records_carry_the_judge_and_the_reference(tmp_path: Path) -> None:
    write_parity(tmp_path, parity_document(parity_entry("onnx-fp32", flips=1, acc=0.895),
                                           parity_entry("openvino-fp32", "fail", reason="max abs 0.4 > 0.25")),
                 ORDER)
    records = parity_records(_build(tmp_path))
    onnx = records["onnx-fp32"]
    assert onnx.passed and onnx.flips == 1 and onnx.flip_rate == pytest.approx(0.01) and onnx.samples == 100
    assert onnx.acc_drop == pytest.approx(0.5) and onnx.judged_as == "fp32" and onnx.source == "verify"
    assert onnx.created == "2026-01-01T00:00:00Z" and onnx.options == {}
    failed = records["openvino-fp32"]
    assert not failed.passed and failed.reason == "max abs 0.4 > 0.25"
    reference = records["eager"]
    assert reference.status == "reference" and reference.passed and reference.flips == 0
    assert reference.acc_drop == 0.0 and reference.accuracy == 0.9
    assert set(onnx.to_dict()) == {"status", "source", "judged_as", "judged_by", "executed_precision", "options",
                                   "flips", "samples", "flip_rate", "accuracy", "reference_accuracy", "acc_drop",
                                   "max_abs", "reason", "created"}


def test_a_record_judged_with_other_options_does_not_count(tmp_path: Path) -> None:
    tuned = parity_entry("onnx-fp32+tuned", options={"graph_optimization_level": "basic"})
    write_parity(tmp_path, parity_document(tuned, parity_entry("onnx-fp32")), ORDER)
    build = _build(tmp_path)
    assert parity_of(build, "onnx-fp32+tuned", {"graph_optimization_level": "basic"}).passed
    other = parity_of(build, "onnx-fp32+tuned", {"graph_optimization_level": "extended"})
    assert other.status == "unverified" and "judged with options" in other.reason
    assert parity_of(build, "onnx-fp32", {}).passed and parity_of(build, "onnx-fp32").passed
    assert parity_of(build, "eager", {"anything": 1}).status == "reference"
    assert parity_of(build, "openvino-fp32").status == "unverified"


def test_write_parity_merges_per_label_and_recomputes_the_verdict(tmp_path: Path) -> None:
    write_parity(tmp_path, parity_document(parity_entry("onnx-fp32"), parity_entry("openvino-fp32", "fail",
                                                                                   reason="bad")), ORDER)
    merged = write_parity(tmp_path, parity_document(parity_entry("openvino-fp32"),
                                                    parity_entry("onnx-fp32+tuned", options={"x": 1}),
                                                    source="tune", created="2026-02-01T00:00:00Z"), ORDER)
    assert merged == read_parity(tmp_path)
    labels = [(r["label"], r["status"], r["source"], r["judged_at"]) for r in merged["results"]]
    assert labels == [("onnx-fp32", "pass", "verify", "2026-01-01T00:00:00Z"),
                      ("onnx-fp32+tuned", "pass", "tune", "2026-02-01T00:00:00Z"),
                      ("openvino-fp32", "pass", "tune", "2026-02-01T00:00:00Z")]
    assert merged["passed"] is True and merged["problems"] == []
    records = parity_records(_build(tmp_path))
    assert records["onnx-fp32"].source == "verify" and records["onnx-fp32+tuned"].source == "tune"
    assert records["onnx-fp32"].created == "2026-01-01T00:00:00Z"
    failing = write_parity(tmp_path, parity_document(parity_entry("onnx-fp32", "fail", reason="worse")), ORDER)
    assert failing["passed"] is False and failing["problems"] == ["onnx-fp32: worse"]
    assert parity_summary(failing) == {"file": "parity.json", "passed": False, "created": "2026-01-01T00:00:00Z",
                                       "source": "verify", "samples": 100, "dataset": "digits5k",
                                       "results": {"onnx-fp32": "fail", "onnx-fp32+tuned": "pass",
                                                   "openvino-fp32": "pass"}}


def test_damaged_or_other_weights_parity_file_is_replaced_not_merged(tmp_path: Path) -> None:
    write_parity(tmp_path, parity_document(parity_entry("onnx-fp32")), ORDER)
    replaced = write_parity(tmp_path, parity_document(parity_entry("openvino-fp32"), weights="w2"), ORDER)
    assert [r["label"] for r in replaced["results"]] == ["openvino-fp32"]
    (tmp_path / "parity.json").write_text("{broken")
    again = write_parity(tmp_path, parity_document(parity_entry("onnx-fp32")), ORDER)
    assert [r["label"] for r in again["results"]] == ["onnx-fp32"]


@pytest.mark.parametrize("document", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"format": 1, "results": [], "reference": {}}),  # the old format
    json.dumps({"format": 2, "results": "x", "reference": {}}),
    json.dumps({"format": 2, "results": [], "reference": None}),
    json.dumps({"format": 2, "reference": {}}),
    json.dumps({"format": 2, "results": [{"label": "a", "status": "pass"}], "reference": {}}),  # no summary
    json.dumps({"format": 2, "results": [{"status": "pass", "summary": {}}], "reference": {}}),  # no label
    json.dumps({"format": 2, "results": [{"label": "a", "status": 1, "summary": {}}], "reference": {}}),
])
def test_wrong_schema_parity_file_is_one_line(tmp_path: Path, document: str) -> None:
    (tmp_path / "parity.json").write_text(document)
    with pytest.raises(ResultsError) as caught:
        read_parity(tmp_path)
    message = str(caught.value)
    assert "parity.json" in message and "\n" not in message
    assert "exporter verify" in message or "cannot read" in message
    with pytest.raises(ResultsError):
        parity_records(_build(tmp_path))


# --- bench.json ---------------------------------------------------------------------------------------------------


def test_write_bench_merges_cell_by_cell(tmp_path: Path) -> None:
    """A later run with a --backends subset or other batch sizes keeps the cells it did not measure."""
    first = write_bench(tmp_path, bench_document(bench_cell("eager", 1, 2.0), bench_cell("onnx-fp32", 1, 1.0),
                                                 bench_cell("onnx-fp32", 8, 4.0)))
    assert [c["measured_at"] for c in first["cells"]] == ["2026-01-01T00:00:00+00:00"] * 3
    later = "2026-03-01T00:00:00+00:00"
    merged = write_bench(tmp_path, bench_document(bench_cell("onnx-fp32", 1, 0.9), bench_cell("onnx-fp32", 32, 9.0),
                                                  created=later))
    assert merged == read_bench(tmp_path)
    cells = {(c["label"], c["batch"]): (c["p50_ms"], c["measured_at"]) for c in merged["cells"]}
    assert cells == {("eager", 1): (2.0, "2026-01-01T00:00:00+00:00"), ("onnx-fp32", 1): (0.9, later),
                     ("onnx-fp32", 8): (4.0, "2026-01-01T00:00:00+00:00"), ("onnx-fp32", 32): (9.0, later)}
    assert [(c["batch"], c["label"]) for c in merged["cells"]] == sorted((b, lab) for lab, b in cells)
    assert merged["created"] == later
    # other threads are another cell: both kept
    threads = write_bench(tmp_path, bench_document(bench_cell("eager", 1, 3.0, threads=1), created=later))
    assert sorted(c["threads"] for c in threads["cells"] if c["label"] == "eager") == [1, 2]


def test_a_damaged_bench_file_is_replaced_not_merged(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text(json.dumps({"format": 1, "results": []}))
    merged = write_bench(tmp_path, bench_document(bench_cell("eager")))
    assert [c["label"] for c in merged["cells"]] == ["eager"]


@pytest.mark.parametrize("document", [
    "[]",
    json.dumps({"format": 1, "cells": []}),  # the old format
    json.dumps({"format": 2, "cells": "x"}),
    json.dumps({"format": 2}),
    json.dumps({"format": 2, "cells": [{"batch": 1, "status": "ok", "p50_ms": 1.0}]}),  # no label
    json.dumps({"format": 2, "cells": [{"label": "a", "batch": "1", "status": "ok", "p50_ms": 1.0}]}),
    json.dumps({"format": 2, "cells": [{"label": "a", "batch": 1, "p50_ms": 1.0}]}),  # no status
    json.dumps({"format": 2, "cells": [{"label": "a", "batch": 1, "status": "ok", "p50_ms": "fast"}]}),
    json.dumps({"format": 2, "cells": [{"label": "a", "batch": 1, "status": "ok", "p50_ms": -1.0}]}),
    '{"format": 2, "cells": [{"label": "a", "batch": 1, "status": "ok", "p50_ms": NaN}]}',
    json.dumps({"format": 2, "cells": [{"label": "a", "batch": 1, "status": "ok", "p50_ms": True}]}),
])
def test_wrong_schema_bench_file_is_one_line(tmp_path: Path, document: str) -> None:
    (tmp_path / "bench.json").write_text(document)
    with pytest.raises(ResultsError) as caught:
        read_bench(tmp_path)
    message = str(caught.value)
    assert "bench.json" in message and "\n" not in message and "exporter bench" in message


def test_valid_bench_cells_pass_validation(tmp_path: Path) -> None:
    write_bench(tmp_path, bench_document(bench_cell("eager"), bench_cell("gone", status="failed", error="x")))
    assert [c["status"] for c in read_bench(tmp_path)["cells"]] == ["ok", "failed"]
