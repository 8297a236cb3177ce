"""`exporter report`: Markdown + JSON + CSV + a valid PNG, per model and across models, from saved results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from exporter.benchmark import BenchSettings, bench_build
from exporter.cli import main
from exporter.report import report
from tests.test_benchmark import FAST, TINY_MODEL, make_tiny_build, noise_tolerated

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models with builds; one benchmarked (batches 1 and 2) and given a recommendation."""
    from exporter.manifest import load_build
    from exporter.select import parse_budget, select_build

    root = tmp_path_factory.mktemp("report")
    make_tiny_build(root)
    make_tiny_build(root, "lenet_bn")
    verify(load_build(TINY_MODEL, root), samples=16, progress=False)  # lenet_bn stays unverified
    with noise_tolerated():
        for model in (TINY_MODEL, "lenet_bn"):
            build = load_build(model, root)
            bench_build(build, BenchSettings(batch_sizes=(1, 2), **FAST))
    select_build(load_build(TINY_MODEL, root), parse_budget("5%"), 1)
    return root


def verify(build, **options):
    """`exporter verify` on a build: its records in parity.json."""
    from exporter.parity import save_report, verify_build

    save_report(verify_build(build, **options), build)


def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_report_files_per_model_and_across(benched: Path, tmp_path: Path) -> None:
    written = report([], artifacts_dir=benched, out_dir=tmp_path)
    assert set(written) == {TINY_MODEL, "lenet_bn", "index"}
    for paths in written.values():
        assert {p.suffix for p in paths.values()} == {".md", ".json", ".csv", ".png"}
        _check_png(paths["png"])
    markdown = written[TINY_MODEL]["md"].read_text()
    # the recommendation comes first, then parity and latency; machine and versions are stated
    assert markdown.index("**Recommended**") < markdown.index("### Parity") < markdown.index("### Latency")
    assert "recommended at batch 1" in markdown and "GEMM peak" in markdown and "torch 2." in markdown
    assert "interleaved round by round (0.05 s untimed after a switch of runtime)" in markdown
    assert "✓ pass" in markdown and "reference" in markdown and "? unverified" not in markdown
    assert "| eager-bf16 | eager | bf16 | ✓ pass |" in markdown and "| bf16 | verify |" in markdown
    index = written["index"]["md"].read_text()
    assert "## Across models" in index and "## lenet_bn" in index and "No recommendation yet" in index
    assert "? unverified" in index  # lenet_bn was never verified
    rows = list(csv.DictReader(written["index"]["csv"].open()))
    assert len(rows) == 8 and {r["model"] for r in rows} == {TINY_MODEL, "lenet_bn"}
    assert all(float(r["p50_ms"]) > 0 for r in rows)
    document = json.loads(written["index"]["json"].read_text())
    assert [m["model"] for m in document["models"]] == ["lenet", "lenet_bn"] and document["machine"]["cpu"]


def test_report_cli_and_no_builds(benched: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", TINY_MODEL, "--artifacts", str(benched), "--out", str(tmp_path), "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)[TINY_MODEL]
    _check_png(Path(paths["png"]))
    assert main(["report", "--artifacts", str(tmp_path / "empty")]) == 1
    assert "no builds" in capsys.readouterr().err
    assert main(["report", "resnet5", "--artifacts", str(benched)]) == 2


def test_report_without_bench_results(tmp_path: Path) -> None:
    make_tiny_build(tmp_path / "a")
    written = report([TINY_MODEL], artifacts_dir=tmp_path / "a", out_dir=tmp_path / "out")
    assert "png" not in written[TINY_MODEL]  # nothing to plot
    assert "No benchmark results" in written[TINY_MODEL]["md"].read_text()


def test_run_matrix_on_a_subset(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_matrix", Path(__file__).parents[1] / "bench" / "run_matrix.py")
    run_matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_matrix)
    from exporter.manifest import load_build

    make_tiny_build(tmp_path / "artifacts")
    verify(load_build(TINY_MODEL, tmp_path / "artifacts"), samples=16, progress=False)
    out = tmp_path / "results"
    with noise_tolerated():
        code = run_matrix.main(["--models", f"{TINY_MODEL},lenet_bn", "--artifacts", str(tmp_path / "artifacts"),
                                "--out", str(out), "--batch-sizes", "1", "--budget", "0.01", "--min-runs", "3",
                                "--max-flips", "5%", "--gemm-size", "128", "--machine", "testbox"])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and all(name.startswith("testbox-") for name in written)
    markdown = next(out.glob("*.md")).read_text()
    assert "lenet_bn: no build" in markdown and "recommended at batch 1" in markdown
    _check_png(next(out.glob("*.png")))


def test_parity_rows_are_the_records(benched: Path) -> None:
    from exporter.manifest import load_build
    from exporter.report import _parity_mark, parity_rows

    rows = {r["artifact"]: r for r in parity_rows(load_build(TINY_MODEL, benched))}
    assert list(rows) == ["eager", "eager-bf16"]
    assert rows["eager"]["status"] == "reference" and rows["eager-bf16"]["judged_as"] == "bf16"
    assert rows["eager-bf16"]["source"] == "verify" and isinstance(rows["eager-bf16"]["max_abs"], float)
    unverified = parity_rows(load_build("lenet_bn", benched))
    assert [r["status"] for r in unverified] == ["unverified", "unverified"]
    assert _parity_mark({"status": "pass", "source": "build"}) == "✓ pass (quick)"
    assert _parity_mark({"status": "fail", "source": "tune"}) == "✗ FAIL"


def test_report_lists_a_tuned_record(tmp_path: Path) -> None:
    from exporter.manifest import load_build
    from exporter.report import parity_rows
    from exporter.results import write_parity
    from tests.test_results import parity_document, parity_entry

    make_tiny_build(tmp_path)
    build = load_build(TINY_MODEL, tmp_path)
    write_parity(build.dir, parity_document(parity_entry("eager-bf16+tuned", options={"x": 1}, source="tune")),
                 ["eager", "eager-bf16"])
    rows = {r["artifact"]: r for r in parity_rows(build)}
    assert list(rows) == ["eager", "eager-bf16", "eager-bf16+tuned"]
    assert rows["eager-bf16"]["status"] == "unverified" and rows["eager-bf16+tuned"]["source"] == "tune"
    assert rows["eager-bf16+tuned"]["backend"] == "eager" and rows["eager-bf16+tuned"]["options"] == {"x": 1}


def test_latency_rows_show_the_parity_records_of_now(tmp_path: Path) -> None:
    """Cells benchmarked before `exporter verify` ran show the records verify wrote (as `select` reads them), and a
    tuned cell shows its own record, never its artifact's."""
    from exporter.manifest import load_build
    from exporter.report import _parity_mark, collect
    from exporter.results import write_bench, write_parity
    from tests.test_results import bench_cell, bench_document, parity_document, parity_entry

    make_tiny_build(tmp_path)
    build = load_build(TINY_MODEL, tmp_path)
    write_bench(build.dir, bench_document(bench_cell("eager", 1, 2.0), bench_cell("eager-bf16", 1, 1.0),
                                          bench_cell("eager-bf16+tuned", 1, 0.5, options={"x": 1})))
    assert {c["parity"]["status"] for c in collect(build)["cells"]} == {"unverified"}
    write_parity(build.dir, parity_document(parity_entry("eager-bf16")), ["eager", "eager-bf16"])
    cells = {c["label"]: c["parity"] for c in collect(build)["cells"]}
    assert cells["eager"]["status"] == "reference" and cells["eager-bf16"]["status"] == "pass"
    assert cells["eager-bf16+tuned"]["status"] == "unverified"  # the artifact's pass does not vouch for it
    assert _parity_mark(cells["eager-bf16"]) == "✓ pass" and _parity_mark(cells["eager-bf16+tuned"]) == "? unverified"


def test_across_models_compares_the_recommendation_with_the_fastest_peer() -> None:
    from exporter.report import summary_rows

    def cell(label: str, p50: float, batch: int = 1, **extra) -> dict:
        return {"label": label, "artifact": label, "backend": label.split("-")[0], "batch": batch, "status": "ok",
                "p50_ms": p50, "variant": "default", "parity": {"status": "pass"}, **extra}

    data = {"model": "m", "recommended": {"recommended": cell("onnx-fp32", 3.0), "batch": 1},
            "cells": [cell("onnx-fp32", 3.0), cell("eager", 9.0), cell("onnx-fp32", 20.0, batch=8)],
            "peers": {"cells": [cell("peer:ort-default", 4.0), cell("peer:openvino-default", 2.0, batch=8),
                                {**cell("peer:nncf-default-int8", 1.0), "status": "error"}]}}
    (row,) = summary_rows([data])
    assert row[4] == "ort-default (4.000 ms, ✓ pass)" and row[5] == "0.75"  # batch 1 only; errors left out
    assert summary_rows([{**data, "peers": None}])[0][4:6] == ["not run (`bench --peers`)", "–"]
