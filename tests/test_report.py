"""`exporter report`: Markdown + JSON + CSV + a valid PNG, per model and across models, from saved results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from exporter.bench import BenchSettings, bench_build
from exporter.cli import main
from exporter.report import report
from tests.test_bench import FAST, TINY_MODEL, make_tiny_build

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models with builds; one benchmarked (batches 1 and 2) and given a recommendation."""
    from exporter.manifest import load_build
    from exporter.select import parse_budget, select_build

    root = tmp_path_factory.mktemp("report")
    make_tiny_build(root)
    make_tiny_build(root, "lenet_bn")
    for model in (TINY_MODEL, "lenet_bn"):
        build = load_build(model, root)
        bench_build(build, BenchSettings(batch_sizes=(1, 2), **FAST))
    select_build(load_build(TINY_MODEL, root), parse_budget("1%"), 1)
    return root


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
    assert "? unverified" in markdown and "reference" in markdown
    assert "lenet_bn" in markdown or "lenet_bn" not in written[TINY_MODEL]["json"].read_text()
    index = written["index"]["md"].read_text()
    assert "## Across models" in index and "## lenet_bn" in index and "No recommendation yet" in index
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
    make_tiny_build(tmp_path / "artifacts")
    out = tmp_path / "results"
    assert run_matrix.main(["--models", f"{TINY_MODEL},lenet_bn", "--artifacts", str(tmp_path / "artifacts"),
                            "--out", str(out), "--batch-sizes", "1", "--budget", "0.01", "--min-runs", "3",
                            "--gemm-size", "128", "--machine", "testbox"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and all(name.startswith("testbox-") for name in written)
    markdown = next(out.glob("*.md")).read_text()
    assert "lenet_bn: no build" in markdown and "recommended at batch 1" in markdown
    _check_png(next(out.glob("*.png")))
