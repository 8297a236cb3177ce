"""The committed bench scripts still run against today's manifest and CLI (they are not imported by the package)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_all_reports_a_build_and_its_parity(tmp_path: Path) -> None:
    out = tmp_path / "build.md"
    code = _script("build_all").main(["--models", "lenet_bn", "--modes", "untrained", "--out", str(out),
                                      "--extra=--backends onnx,onnxruntime --parity-samples 4"])
    assert code == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["status"] == "ok", row.get("error")
    assert row["parity_ok"] is True
    assert {a["name"]: a["parity"] for a in row["artifacts"]}["onnx-fp32"] == "pass"
    assert "| lenet_bn | untrained --backends onnx,onnxruntime" in out.read_text()


def test_heap_probe_times_both_heaps_in_their_own_processes(capsys: pytest.CaptureFixture[str]) -> None:
    code = _script("heap_probe").main(["--model", "lenet_bn", "--shape", "1,28,28", "--batch", "8", "--steps", "2",
                                       "--rounds", "1"])
    assert code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  heap ")]
    assert [row[1] for row in rows] == ["default", "reused"]
    assert all(float(row[2]) > 0 for row in rows)


def test_held_back_probe_finds_where_an_int8_artifact_flips(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.export import build
    from tests.export_builds import build_options

    result = build(build_options("lenet", tmp_path, int8=True, backends=["onnxruntime"], calibration_samples=32))
    probe = _script("held_back_probe")
    assert probe.main([str(result.build_dir), "--images", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["artifact"], r["split"], r["images"]) for r in rows] == [("onnx-int8", "test", 16),
                                                                        ("onnx-int8", "train", 16)]
    reference = np.array([[5.0, 0.0]] * 14 + [[1.0, 0.9], [0.2, 0.0]])
    output = reference.copy()
    output[14], output[15] = [0.9, 1.0], [0.1, 0.1]  # the least sure by margin flips; the smallest logits turn
    row = probe.where_it_fails(reference, output)
    assert row["flips"] == 1 and row["least_margin"]["images"] == 2 and row["least_margin"]["flips"] == 1
    assert row["least_norm"]["min_cosine"] == pytest.approx(np.sqrt(0.5)) == row["min_cosine"]


def test_a_timed_out_command_says_so() -> None:
    from bench import common

    finished = common.run_exporter(["list"], timeout=0.001)
    assert finished.code is None
    text = "warning: x\nexporter build: error: bad input\ntrailing"
    assert common.error_line(text) == "exporter build: error: bad input"


def test_two_runs_over_different_models_share_one_table(tmp_path: Path) -> None:
    """A row another run wrote to the store while this one worked is kept, not overwritten."""
    from bench.common import run_rows

    store = tmp_path / "table.json"
    rows: dict[str, dict] = {}

    def work(name: str) -> dict:
        if name == "a":  # the other run finishes "z" meanwhile
            store.write_text(json.dumps({"meta": {}, "rows": {"z": {"by": "other run"}}}))
        return {"by": "this run"}

    run_rows(["a", "b"], rows, work, store=store, header={"run": 1}, outcome=str,
             render=lambda rows, header: "\n".join(sorted(rows)))
    saved = json.loads(store.read_text())
    assert saved["rows"] == {"z": {"by": "other run"}, "a": {"by": "this run"}, "b": {"by": "this run"}}
    assert store.with_suffix(".md").read_text() == "a\nb\nz"


@pytest.mark.parametrize("model,label", [("densenet161", "3×96×96"), ("vit_b_32", "3×224×224")])  # vit: own size
def test_a_timed_out_compile_build_keeps_the_rows_onnx_columns(monkeypatch: pytest.MonkeyPatch, model: str,
                                                               label: str) -> None:
    """A build killed at its time limit labels its input as a finished build's manifest does."""
    from bench.common import Finished

    zoo = _script("zoo_coverage")
    monkeypatch.setattr(zoo, "run_exporter", lambda args, timeout: Finished(None, "", "", timeout))
    row = zoo.cover(model, size=96, backends=("inductor", "aoti"), build_timeout=480.0, bench_timeout=1.0)
    assert row["input"] == label and row["error"] == "build exceeded 480 s"
    fast = {"model": model, "input": label, "cells": {"onnx-fp32": {"status": "pass"}}}
    merged = zoo.merge_row(fast, row)
    assert merged["cells"]["onnx-fp32"] == {"status": "pass"}
    assert merged["cells"]["inductor"]["reason"] == "the build failed: build exceeded 480 s"
    # where the CPU has no native bf16 the build would not have made the bf16 columns: not run, not failed
    assert ("inductor-bf16" in merged["cells"]) == row["native_bf16"]
    assert "aoti-bf16" not in zoo.merge_row(fast, {**row, "native_bf16": False})["cells"]


def test_zoo_coverage_merges_the_compile_columns_into_a_fast_row() -> None:
    zoo = _script("zoo_coverage")
    fast = {"model": "resnet18", "input": "3×96×96", "build_seconds": 40.0,
            "cells": {"torch.export": {"status": "ok"}, "onnx-fp32": {"status": "pass", "p50_ms": 3.0},
                      "eager": {"status": "reference", "p50_ms": 9.0}}}
    compiled = {"model": "resnet18", "input": "3×96×96", "build_seconds": 100.0, "backends": ["inductor", "aoti"],
                "inductor_frozen": True,
                "cells": {"torch.export": {"status": "ok"}, "inductor": {"status": "pass", "p50_ms": 4.0},
                          "aoti": {"status": "fail", "reason": "boom"}, "eager": {"status": "reference"}}}
    merged = zoo.merge_row(fast, compiled)
    assert merged["backends"] == ["onnx", "onnxruntime", "openvino", "inductor", "aoti"]
    assert merged["cells"]["onnx-fp32"]["p50_ms"] == 3.0 and merged["cells"]["inductor"]["p50_ms"] == 4.0
    assert merged["build_seconds"] == 140.0
    failed = zoo.merge_row(fast, {"model": "resnet18", "input": "3×96×96", "backends": ["inductor", "aoti"],
                                  "error": "killed", "build_seconds": 300.0})
    assert "error" not in failed and failed["cells"]["onnx-fp32"]["status"] == "pass"
    assert failed["cells"]["aoti"] == {"status": "fail", "reason": "the build failed: killed"}
    assert zoo.merge_row(fast, {**compiled, "input": "3×224×224"})["input"] == "3×224×224"  # replaced, not merged

    meta = {"machine": "test cpu, 2 cores", "cpu": "test cpu", "cpus": 2, "torch": "t", "torchvision": "v",
            "date": "today",
            "backends": ["onnx", "onnxruntime", "openvino", "inductor", "aoti"]}
    text = zoo.render({"resnet18": merged, "alexnet": {**fast, "model": "alexnet", "error": "oom"},
                       "resnet34": {**fast, "model": "resnet34"}}, meta)
    # onnx-reference: skipped by its MAC limit (²); bf16 cells not built without native bf16: plain "not run"
    assert ("| resnet18 | 3×96×96 | ✓ | ✓ 3.0 ms | skipped² | not run | not run | ✓ 4.0 ms | not run | FAIL "
            "| not run |") in text
    # a row whose compile columns were never run says so (³), with the command that adds them under the table
    assert ("| resnet34 | 3×96×96 | ✓ | ✓ 3.0 ms | skipped² | not run | not run | not run³ | not run³ | not run³ "
            "| not run³ |") in text
    assert "³ not compiled" in text and "--backends inductor,aoti --missing" in text
    row = "| alexnet | 3×96×96 | FAIL¹ | FAIL¹ | FAIL¹ | FAIL¹ | FAIL¹ | not run | not run | not run | not run |"
    assert row in text
    assert "- **resnet18** aoti: boom" in text and "inductor on 1 of" in text
    unfrozen = {**merged, "inductor_frozen": False}  # compiled before the runner's freezing took effect
    assert "| ✓ 4.0 ms † |" in zoo.render({"resnet18": unfrozen}, meta)
    # compile columns added on another machine: marked ‡ with that machine under the table, the others not
    elsewhere = zoo.merge_row({**fast, "machines_by": {"onnx,onnxruntime,openvino": "test cpu, 2 cores"}},
                              {**compiled, "machines_by": {"inductor,aoti": "other cpu (avx2), 2 cores"}})
    text = zoo.render({"resnet18": elsewhere}, meta)
    assert "| ✓ 3.0 ms | skipped² |" in text and "| ✓ 4.0 ms ‡ |" in text and "| FAIL ‡ |" in text
    assert "‡ built and timed on other cpu (avx2), 2 cores" in text
    assert "‡ built" not in zoo.render({"resnet18": merged}, meta)


def test_parity_report_marks_rows_todays_judge_would_fail() -> None:
    """A stored pass whose flip or accuracy counts miss today's class is rendered FAIL* with the count that fails."""
    parity_all = _script("parity_all")
    base = {"label": "onnx-int8", "backend": "onnxruntime", "precision": "int8", "executed": "int8",
            "judged_as": "int8", "status": "pass", "reason": "", "failures": [], "samples": 256, "flips": 2,
            "accuracy": 0.918, "reference_accuracy": 0.922, "acc_drop": 100 * 1 / 256, "max_abs": 0.3,
            "min_cosine": 0.997}
    assert parity_all.current_count_failures(base) == []
    assert parity_all.current_count_failures({**base, "flips": 3}) == ["3 of 256 images flip, 2 allowed"]
    assert parity_all.current_count_failures({**base, "acc_drop": 100 * 2 / 256}) == [
        "2 of 256 images lost net (0.78 points), 1 allowed"]
    assert parity_all.current_count_failures({**base, "flips": 9, "status": "fail"}) == []  # already a failure
    row = {"model": "lenet", "reference": {"accuracy": 0.922}, "samples": 256, "results": [{**base, "flips": 3}]}
    meta = {"backends": "onnx,onnxruntime", "samples": 256, "cpus": 2, "torch": "t", "date": "today"}
    text = parity_all.render({"lenet": row}, meta)
    assert "| onnx-int8 | int8 | int8 | FAIL* |" in text and "fails today's int8 class): 3 of 256" in text
    assert "FAIL\\* — verified under an earlier class" in text
    assert "FAIL*" not in parity_all.render({"lenet": {**row, "results": [base]}}, meta)
    # a model verified on another machine than the header's (or before machines were recorded) is marked ‡
    here = {**meta, "machine": "this cpu (avx512-bf16), 2 cores"}
    text = parity_all.render({"lenet": {**row, "machine": here["machine"]}, "lenet_bn": row}, here)
    assert "| lenet | 0.922 |" in text and "| lenet_bn ‡ | 0.922 |" in text
    assert "‡ verified on a machine not recorded (an earlier session): lenet_bn." in text
    assert "Built with" not in text  # every row with the header's stages
    text = parity_all.render({"lenet": {**row, "backends": "onnx,onnxruntime,aoti"}, "lenet_bn": row}, here)
    assert "Built with `--backends onnx,onnxruntime,aoti` instead: lenet." in text
    assert "Verified on 1000 test images instead: lenet." in parity_all.render(
        {"lenet": {**row, "samples": 1000}, "lenet_bn": row}, here)


def test_parity_verify_only_refuses_a_model_it_never_built(tmp_path: Path) -> None:
    """`--verify-only` re-verifies a build this script made; for any other model it says so and exits 2."""
    with pytest.raises(SystemExit) as exc:
        _script("parity_all").main(["--models", "lenet", "--verify-only", "--results", str(tmp_path)])
    assert exc.value.code == 2


def test_nncf_options_are_arguments_nncf_quantize_takes() -> None:
    nncf = pytest.importorskip("nncf", reason="nncf is not installed (the cpu extra brings it)")
    import inspect

    probe = _script("nncf_options")
    accepted = set(inspect.signature(nncf.quantize).parameters)
    for name in probe.OPTIONS:
        assert set(probe.option_arguments(name)) <= accepted, name
    assert probe.option_arguments("default") == {}
    assert probe.option_arguments("mixed_no_fast_bc") == {"preset": nncf.QuantizationPreset.MIXED,
                                                          "fast_bias_correction": False}
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    ranges = probe.option_arguments("head_fp32_mixed_mean_quantile")["advanced_parameters"]
    assert ranges.activations_range_estimator_params == RangeEstimatorParametersSet.MEAN_QUANTILE
    with pytest.raises(SystemExit):
        probe.main(["resnet18", "--options", "default,nonsense"])


def test_settle_probe_times_every_condition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    from exporter.export import build
    from tests.export_builds import build_options

    result = build(build_options("lenet", tmp_path, backends=["onnxruntime", "openvino"]))
    code = _script("settle_probe").main([str(result.build_dir), "--artifact", "openvino-fp32", "--rounds", "2",
                                         "--other-ms", "2", "--window-ms", "2"])
    assert code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "÷ no switch" in line]
    assert [" ".join(r[:r.index("window")]) for r in rows] == [
        "none (one untimed call)", "sleep 20 ms", "sleep 50 ms", "calls 20 ms", "calls 50 ms", "no switch"]
    assert rows[-1][-1] == "1.000" and all(float(r[-1]) > 0 for r in rows)
    assert _script("settle_probe").main([str(result.build_dir), "--artifact", "openvino-fp32", "--rounds", "1",
                                         "--other-ms", "2", "--decay"]) == 0
    decay = [line.split() for line in capsys.readouterr().out.splitlines() if "+ ms" in line]
    assert [row[:2] for row in decay] == [["after", "onnx-fp32"], ["after", "itself"]]
    assert all(row[2:4] == ["0+", "ms"] and float(row[4]) > 0 for row in decay)


def test_static_shapes_probe_times_both_compilations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino")
    from exporter.export import build
    from tests.export_builds import build_options

    result = build(build_options("lenet", tmp_path, backends=["openvino"]))
    probe = _script("static_shapes_probe")
    assert probe.main([str(result.build_dir), "--artifacts", "openvino-fp32", "--batch-sizes", "1,3", "--rounds", "1",
                       "--window-ms", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "static ÷ dynamic" in line]
    assert [row[:3] for row in rows] == [["batch", "1", "openvino-fp32"], ["batch", "3", "openvino-fp32"]]
    assert all(float(row[-1]) > 0 for row in rows)
    with pytest.raises(SystemExit):  # no NNCF default IR until `exporter bench --peers` has made it
        probe.main([str(result.build_dir), "--artifacts", "peer:nncf-default-int8", "--rounds", "1"])
    assert "run `exporter bench" in capsys.readouterr().err


def test_strides_probe_times_an_ir_as_saved_and_rewritten(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    from exporter.backends import openvino_strides
    from exporter.export import build
    from tests.export_builds import build_options

    result = build(build_options("lenet", tmp_path, backends=["openvino"]))
    probe = _script("strides_probe")
    arguments = [str(result.build_dir), "--artifacts", "openvino-fp32", "--batch-sizes", "1,2", "--rounds", "1",
                 "--window-ms", "2"]
    assert probe.main(arguments) == 0
    assert "openvino-fp32: nothing to rewrite" in capsys.readouterr().out  # lenet has no strided 1×1 convolution
    monkeypatch.setattr(openvino_strides, "propagate_strides", lambda model: ["conv"])  # a rewrite changing nothing
    assert probe.main(arguments) == 0
    out = capsys.readouterr().out
    assert "openvino-fp32: 1 convolutions rewritten (conv)" in out
    assert [line.split()[-1] for line in out.splitlines() if "max |rewritten" in line] == ["0", "0"]
    ratios = [float(line.split()[-1]) for line in out.splitlines() if "rewritten ÷ as saved" in line]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
