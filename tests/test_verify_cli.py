"""`exporter verify` on the command line: table, --json, parity.json, exit codes, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporter.backends import BACKENDS
from exporter.cli import main
from exporter.manifest import point_latest
from tests.parity_builds import make_build, rewrite_manifest

SAMPLES = "16"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """artifacts/lenet/<build>/ (eager + ONNX) with artifacts/lenet/latest pointing at it."""
    root = tmp_path_factory.mktemp("artifacts")
    build = make_build(root / "lenet" / "b1", "lenet", (1, 28, 28), exports=("onnx",))
    point_latest(root / "lenet", build)
    return root


@pytest.fixture()
def build_copy(artifacts: Path, tmp_path: Path) -> Path:
    target = tmp_path / "build"
    shutil.copytree(artifacts / "lenet" / "b1", target)
    return target


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_model_name_verifies_latest_build_prints_table_and_saves_report(artifacts, capsys) -> None:
    assert main(["verify", "lenet", "--artifacts", str(artifacts), "--samples", SAMPLES]) == 0
    out = capsys.readouterr().out
    for text in ("onnx-fp32", "onnx-reference", "eager-bf16", "PASS", "max abs", "top-1 (flips)", "reference"):
        assert text in out
    build = artifacts / "lenet" / "b1"
    report = json.loads((build / "parity.json").read_text())
    assert report["passed"] and report["samples"] == 16 and report["format"] == 2 and report["source"] == "verify"
    section = json.loads((build / "manifest.json").read_text())["parity"]
    assert section["file"] == "parity.json" and section["passed"] and section["source"] == "verify"
    assert set(section["results"]) == {r["label"] for r in report["results"]}


def test_json_output(build_copy, capsys) -> None:
    assert main(["verify", str(build_copy), "--backends", "onnxruntime", "--samples", SAMPLES, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (result,) = data["results"]
    assert result["artifact"] == result["label"] == "onnx-fp32" and result["passed"] and result["status"] == "pass"
    assert result["judged_as"] == "fp32" and result["judged_by"] == "stored weights and compute"
    assert result["variant"] == "default" and result["options"] == {} and data["format"] == 2
    real = next(s for s in result["sets"] if s["name"] == "real")
    assert set(real["metrics"]) >= {"max_abs", "max_rel", "rel_floor", "mean_abs", "min_cosine", "kl", "agreement",
                                    "flipped", "top5_overlap", "accuracy", "reference_accuracy"}


def test_tolerance_override_can_fail_a_good_artifact(build_copy, capsys) -> None:
    assert main(["verify", str(build_copy), "--backends", "eager-fp16", "--samples", SAMPLES, "--atol", "0",
                 "--rtol", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_build_dir_without_manifest(tmp_path, capsys) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a build")
    assert main(["verify", str(tmp_path)]) == 1
    assert "manifest.json" in _one_error_line(capsys)


def test_model_never_built(tmp_path, capsys) -> None:
    assert main(["verify", "lenet_bn", "--artifacts", str(tmp_path)]) == 1
    assert "exporter build lenet_bn" in _one_error_line(capsys)


def test_tampered_artifact_is_refused(build_copy, capsys) -> None:
    (build_copy / "parity.json").unlink(missing_ok=True)
    with open(build_copy / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    assert main(["verify", str(build_copy), "--samples", SAMPLES]) == 1
    assert "sha256" in _one_error_line(capsys)
    assert not (build_copy / "parity.json").exists()


def test_truncated_artifact_is_refused(build_copy, capsys) -> None:
    data = (build_copy / "model.onnx").read_bytes()
    (build_copy / "model.onnx").write_bytes(data[: len(data) // 2])
    assert main(["verify", str(build_copy), "--samples", SAMPLES]) == 1
    assert "truncated" in _one_error_line(capsys)


def test_input_shape_that_does_not_fit(build_copy, capsys) -> None:
    rewrite_manifest(build_copy, input_shape=[1, 64, 64])
    assert main(["verify", str(build_copy), "--samples", SAMPLES]) == 2
    line = _one_error_line(capsys)
    assert "64×64" in line or "1×64×64" in line


def test_data_with_more_channels_than_the_model(build_copy, tmp_path, capsys) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / "rgb" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (28, 28), (i * 40, 0, 200)).save(folder / f"{i}.png")
    assert main(["verify", str(build_copy), "--samples", "4", "--data", str(tmp_path / "rgb")]) != 0
    assert "channel" in _one_error_line(capsys)


def test_unknown_backend_name(build_copy, capsys) -> None:
    assert main(["verify", str(build_copy), "--backends", "onnxruntme"]) == 2
    assert "onnxruntime" in _one_error_line(capsys)


def test_missing_backend_library(build_copy, capsys, monkeypatch) -> None:
    monkeypatch.setattr(BACKENDS["onnxruntime"], "available_impl",
                        classmethod(lambda cls, device: "onnxruntime is not installed (test)"))
    # not named: shown as not run, never as a pass; the artifacts that ran decide the exit code
    assert main(["verify", str(build_copy), "--samples", SAMPLES]) == 0
    out = capsys.readouterr().out
    assert "NOT RUN" in out and "onnxruntime is not installed" in out
    # named: the run fails
    assert main(["verify", str(build_copy), "--backends", "onnx-fp32", "--samples", SAMPLES]) == 1
    out = capsys.readouterr().out
    assert "not run" in out and "FAIL" in out and "PASS" not in out.replace("PASS:", "")


def test_help_explains_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--bisect" in out and "not run" in out and "Exit status" in out


@pytest.mark.parametrize("flag, value", [("--min-agreement", "1.5"), ("--atol", "-1"), ("--rtol", "nan")])
def test_bad_option_values(build_copy, capsys, flag: str, value: str) -> None:
    assert main(["verify", str(build_copy), flag, value]) == 2
    assert flag.lstrip("-").split("-")[0] in _one_error_line(capsys)


@pytest.mark.parametrize("flag, value", [("--samples", "0"), ("--samples", "-3"), ("--samples", str(10**7 + 1)),
                                         ("--samples", "many"), ("--tolerance-class", "fp64"),
                                         ("--artifacts-dir", ".")])
def test_bad_option_syntax_is_one_usage_line(build_copy, capsys, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(build_copy), flag, value])
    assert exc.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith("exporter") and "error:" in line and flag in line  # unknown options: the top parser
