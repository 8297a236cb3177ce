"""`exporter build`: the pipeline end to end, its manifest, atomicity and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from exporter.backends import STAGES, Stage
from exporter.build_inputs import HELD_BACK_POOL
from exporter.cli import main
from exporter.errors import UsageError
from exporter.export import STAGE_NAMES, BuildError, build, parse_backends
from exporter.manifest import RESULT_FILES, ManifestError, load_build, sha256_file
from exporter.results import parity_summary, read_parity
from tests.conftest import TEST_NUM_CLASSES
from tests.export_builds import FAST_MODELS, build_options, full_build, model_params  # noqa: F401  (fixture)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line on stderr (progress lines before it are fine)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


@pytest.mark.parametrize("model", model_params())
def test_build_produces_a_complete_build(full_build, model: str) -> None:
    result = full_build(model)
    manifest = result.manifest
    assert result.build_dir.name == manifest["build_id"] and result.build_dir.parent.name == model
    assert (result.build_dir.parent / "latest").resolve() == result.build_dir.resolve()
    names = [a["name"] for a in manifest["artifacts"]]
    assert names[0] == "eager" and "inductor" in names and "aoti" in names
    assert manifest["untrained"] is True and all(a["untrained"] for a in manifest["artifacts"])
    assert manifest["num_classes"] == TEST_NUM_CLASSES
    assert manifest["batch"] == {"dynamic": True, "static": None, "min": 1, "max": 16}
    # every stage is accounted for: produced, skipped (with a reason) or failed
    accounted = {s["backend"] for s in manifest["skipped"]} | {f["backend"] for f in manifest["failed"]}
    assert set(STAGE_NAMES) - accounted <= set(manifest["timings"])
    assert all(s["reason"] for s in manifest["skipped"])
    assert manifest["failed"] == []
    # quick parity: the judge's record of every artifact (parity.json), and they pass
    parity = manifest["parity"]
    assert parity == parity_summary(result.parity) and result.parity == read_parity(result.build_dir)
    assert parity["file"] == "parity.json" and parity["source"] == "build" and parity["samples"] == 16
    assert set(parity["results"]) == set(names) - {"eager"} and parity["passed"] is True
    assert set(parity["results"].values()) == {"pass"}, parity["results"]
    summary = {a["name"]: a["parity"] for a in result.summary()["artifacts"]}
    assert summary.pop("eager") == {"status": "reference"} and result.summary()["parity_passed"] is True
    for name, entry in summary.items():
        assert entry["status"] == "pass" and entry["judged_as"] in ("fp32", "bf16", "fp16", "int8"), (name, entry)
        assert 0.0 <= entry["max_abs"] and entry["flips"] == 0 and entry["samples"] == 16
    assert manifest["diagnostics"]["export"]["tracer"] == "dynamo (strict)"
    assert manifest["diagnostics"]["inductor"]["graph_breaks"] == 0
    assert manifest["diagnostics"]["aoti"]["compile_s"] > 0
    assert manifest["versions"]["torch"] and manifest["timings"]["total"] > 0


def test_manifest_hashes_match_every_file(full_build) -> None:
    result = full_build(FAST_MODELS[0])
    files = result.manifest["files"]
    on_disk = {p.relative_to(result.build_dir).as_posix() for p in result.build_dir.rglob("*")
               if p.is_file() and p.name not in RESULT_FILES}
    assert (result.build_dir / "parity.json").is_file()  # a result, written by the build but not hashed
    assert set(files) == on_disk
    for rel, entry in files.items():
        path = result.build_dir / rel
        assert entry["size"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
    for artifact in result.manifest["artifacts"]:
        assert artifact["files"] and all(f in files for f in artifact["files"])
    assert load_build(result.build_dir).model == FAST_MODELS[0]


def test_onnx_metadata_says_untrained(full_build) -> None:
    result = full_build(FAST_MODELS[0])
    if not any(a["name"] == "onnx-fp32" for a in result.manifest["artifacts"]):
        pytest.skip("the onnx stage did not run here")
    from exporter.backends.onnx import read_metadata

    meta = read_metadata(result.build_dir / "model.onnx")
    assert meta["weights"] == "untrained" and meta["model_name"] == FAST_MODELS[0]
    assert json.loads(meta["class_names"]) == [str(i) for i in range(TEST_NUM_CLASSES)]
    assert result.manifest["diagnostics"]["onnx"]["opset"] >= 18


def test_static_batch_build(tmp_path: Path) -> None:
    result = build(build_options("lenet", tmp_path, batch=4, backends=["onnx"], parity_samples=10))
    manifest = result.manifest
    assert manifest["batch"] == {"dynamic": False, "static": 4, "min": 4, "max": 4}
    assert manifest["input"]["shape"] == [4, 1, 28, 28]
    assert manifest["parity"]["samples"] == 8  # whole static batches only
    assert manifest["parity"]["passed"] and set(manifest["parity"]["results"].values()) == {"pass"}
    assert {i["name"]: i["batch_sizes"] for i in result.parity["inputs"]} == {"real": [4], "batch=4": [4]}
    from exporter.fileio import default_file_mode

    modes = {p.name: p.stat().st_mode & 0o777 for p in result.build_dir.iterdir() if p.is_file()}
    assert set(modes.values()) == {default_file_mode()}, modes  # weights.safetensors too


def test_external_weights_are_hashed_with_their_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build whose ONNX weights went to `model.onnx.data` lists that file under its artifacts and in the hashed
    files: a modified data file fails loading like a modified model file."""
    from exporter.backends import onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "INLINE_WEIGHTS_LIMIT_BYTES", 20_000)
    result = build(build_options("lenet", tmp_path, backends=["onnx", "onnxruntime"], parity_samples=8))
    entries = {a["name"]: a for a in result.manifest["artifacts"]}
    assert entries["onnx-fp32"]["files"] == ["model.onnx", "model.onnx.data"]
    assert "model.onnx.data" in result.manifest["files"] and result.manifest["parity"]["passed"]
    data = result.build_dir / "model.onnx.data"
    damaged = bytearray(data.read_bytes())
    damaged[100] ^= 0xFF
    data.write_bytes(bytes(damaged))
    with pytest.raises(ManifestError, match="model.onnx.data"):
        load_build(result.build_dir)


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = build(build_options("lenet", tmp_path, backends=["onnx"]))
    model_dir = good.build_dir.parent
    before = _listing(model_dir)

    def broken(ctx):
        (ctx.out_dir / "model.onnx").write_bytes(b"half")  # a stage that dies half-way through writing
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(STAGES, "onnx", Stage("onnx", broken))
    with pytest.raises(BuildError, match="backend onnx failed: RuntimeError: disk on fire"):
        build(build_options("lenet", tmp_path, backends=["onnx"]))
    assert _listing(model_dir) == before
    assert (model_dir / "latest").resolve() == good.build_dir.resolve()

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "onnx", Stage("onnx", interrupted))
    with pytest.raises(KeyboardInterrupt):
        build(build_options("lenet", tmp_path, backends=["onnx"]))
    assert _listing(model_dir) == before


def test_unnamed_failing_backend_is_recorded_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import exporter.export as export_module

    stages = {"onnx": STAGES["onnx"], "openvino": Stage("openvino", lambda ctx: 1 / 0)}
    monkeypatch.setattr(export_module, "STAGES", stages)
    # exit status 3: the build is done, one backend failed
    assert main(["build", "lenet", "--untrained", "--num-classes", str(TEST_NUM_CLASSES), "--parity-samples", "8",
                 "--artifacts", str(tmp_path)]) == 3
    assert "FAILED openvino: ZeroDivisionError: division by zero" in capsys.readouterr().out
    manifest = load_build("lenet", tmp_path).manifest
    assert manifest["failed"] == [{"backend": "openvino", "error": "ZeroDivisionError: division by zero"}]
    with pytest.raises(BuildError, match="openvino failed"):
        build(build_options("lenet", tmp_path, strict=True))


def test_strict_turns_lint_warnings_into_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.export as export_module
    from exporter import lint

    monkeypatch.setattr(export_module, "lint_model",
                        lambda *a, **k: [lint.LintWarning("adaptive-pool", "uneven pool")])
    result = build(build_options("lenet", tmp_path, backends=["onnx"]))
    assert result.manifest["lint"] == [{"code": "adaptive-pool", "message": "uneven pool"}]
    with pytest.raises(lint.LintError, match="uneven pool"):
        build(build_options("lenet", tmp_path / "strict", backends=["onnx"], strict=True))
    assert not (tmp_path / "strict" / "lenet" / "latest").exists()


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny: 3 steps) lenet checkpoint written by `exporter.train.train`."""
    from exporter.paths import checkpoint_paths
    from exporter.train import train

    root = tmp_path_factory.mktemp("ckpt")
    train("lenet", epochs=1, max_steps=3, batch_size=32, artifacts_dir=root, progress=False, log=lambda *_: None)
    return checkpoint_paths("lenet", root)[0]


def test_build_from_checkpoint_records_it(tmp_path: Path, lenet_checkpoint: Path) -> None:
    result = build(build_options("lenet", tmp_path, untrained=False, num_classes=None, input_size=None,
                                 checkpoint=lenet_checkpoint, backends=["onnx"]))
    weights = result.manifest["weights"]
    assert result.manifest["untrained"] is False and weights["source"] == "checkpoint"
    assert weights["sha256"] == sha256_file(lenet_checkpoint)
    assert weights["sha256"] == result.manifest["files"]["weights.safetensors"]["sha256"]
    assert weights["test_accuracy"] is not None and result.manifest["dataset"] is None


def test_checkpoint_of_another_model_or_shape_is_one_line(tmp_path: Path, lenet_checkpoint: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    art = str(tmp_path)
    assert main(["build", "lenet_bn", "--checkpoint", str(lenet_checkpoint), "--artifacts", art]) != 0
    err = _error_line(capsys)
    assert "'lenet'" in err and "lenet_bn" in err
    assert main(["build", "lenet", "--checkpoint", str(lenet_checkpoint), "--input-size", "32",
                 "--artifacts", art]) != 0
    assert "1×28×28" in _error_line(capsys)
    assert not any(tmp_path.rglob("manifest.json"))
    assert not any((tmp_path / m / "latest").exists() for m in ("lenet", "lenet_bn"))


@pytest.mark.parametrize("argv, needle, code", [
    (["build", "lenet_bm", "--untrained"], "did you mean lenet_bn", 2),
    (["build", "lenet", "--untrained", "--backends", "onnx,openvno"], "did you mean openvino", 2),
    (["build", "lenet", "--untrained", "--backends", ","], "--backends is empty", 2),
    (["build", "lenet", "--untrained", "--checkpoint", "x.safetensors"], "contradict", 2),
    (["build", "lenet", "--untrained", "--input-size", "3"], "smallest valid size", 2),
])
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str,
                               code: int) -> None:
    assert main([*argv, "--artifacts", str(tmp_path)]) == code
    assert needle in _error_line(capsys)
    assert not any(tmp_path.rglob("manifest.json"))


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--max-batch", "-2"), ("--parity-samples", "0"),
                                         ("--num-classes", str(10**7 + 1)), ("--input-size", "x")])
def test_bad_counts_are_one_usage_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                                       value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["build", "lenet", "--untrained", flag, value, "--artifacts", str(tmp_path)])
    assert exc.value.code == 2
    line = _error_line(capsys)
    assert f"argument {flag}: expected a positive integer" in line
    assert not any(tmp_path.rglob("manifest.json"))


def test_unwritable_output_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the artifacts directory should be")
    assert main(["build", "lenet", "--untrained", "--backends", "onnx", "--artifacts", str(blocker)]) == 1
    line = _error_line(capsys)
    assert "cannot write to" in line and "not-a-dir" in line and "--artifacts" in line
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["build", "lenet", "--untrained", "--backends", "onnx", "--artifacts", str(locked)]) == 1


def test_named_unavailable_backend_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.backends import BACKENDS

    reason = BACKENDS["tensorrt"].unavailable_reason("cuda") if "tensorrt" in BACKENDS else "not registered"
    if reason is None:
        pytest.skip("TensorRT is available here")
    assert main(["build", "lenet", "--untrained", "--backends", "tensorrt", "--artifacts", str(tmp_path)]) == 1
    assert "tensorrt was asked for but is unavailable" in _error_line(capsys)
    assert not any(tmp_path.rglob("manifest.json"))


def test_cli_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "lenet", "--untrained", "--backends", "onnx", "--parity-samples", "8", "--json",
                 "--artifacts", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["manifest"]).is_file() and out["untrained"] is True and out["parity_passed"] is True
    assert {a["name"] for a in out["artifacts"]} >= {"eager", "onnx-fp32"}
    assert all(a["parity"]["status"] in ("pass", "reference") for a in out["artifacts"])


def test_parse_backends() -> None:
    assert parse_backends("onnx, openvino,onnx") == ["onnx", "openvino"]
    assert parse_backends(None) is None
    with pytest.raises(UsageError):
        parse_backends("onnx,trt")


def test_int8_needs_real_calibration_images(tmp_path: Path) -> None:
    result = build(build_options("lenet", tmp_path, int8=True, backends=["onnxruntime"], calibration_samples=32))
    assert any(a["precision"] == "int8" for a in result.manifest["artifacts"])
    int8 = result.manifest["diagnostics"]["onnxruntime"]["int8"]
    assert int8["calibration_images"] == 24 and int8["held_back_images"] == 8
    assert int8["held_back_pool"] == 8 * HELD_BACK_POOL  # the hardest 8 of 64 training images


@pytest.mark.slow
def test_resnet50v2_fp16_end_to_end(tmp_path: Path) -> None:
    """The issue's headline command (untrained weights, to keep it to minutes): every artifact, fp16 included."""
    result = build(build_options("resnet50v2", tmp_path, num_classes=None, input_size=None, fp16=True,
                                 parity_samples=8, max_batch=8))
    manifest = result.manifest
    precisions = {a["precision"] for a in manifest["artifacts"]}
    assert "fp16" in precisions and manifest["input_shape"] == [3, 224, 224]
    assert manifest["parity"]["passed"], manifest["parity"]
    assert load_build(result.build_dir).model == "resnet50v2"
    assert np.isfinite(manifest["timings"]["total"])


def test_int8_without_training_images_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    data = tmp_path / "data"
    for label in ("a", "b"):  # a test split only: nothing to calibrate on
        (data / "test" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(data / "test" / label / f"{i}.png")
    out = tmp_path / "out"
    assert main(["build", "lenet", "--untrained", "--int8", "--backends", "onnxruntime", "--data", str(data),
                 "--artifacts", str(out)]) == 1
    assert "train" in _error_line(capsys)
    assert list(out.rglob("*")) == []  # not even an empty model directory


def test_sigterm_mid_build_leaves_nothing(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "exporter", "build", "lenet", "--untrained", "--backends", "aoti",
                             "--artifacts", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("lenet/.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.rglob("*")) == []


# --- the build's quick parity is the judge of `exporter verify` ------------------------------------------------


def test_build_and_verify_write_the_same_parity_record(tmp_path: Path) -> None:
    """The build's quick check and `exporter verify` write one record format with one set of tolerance rules; only
    the inputs (and `source`) differ."""
    from exporter.parity import verify
    from exporter.results import parity_records

    result = build(build_options("lenet_bn", tmp_path, backends=["onnx", "openvino"], parity_samples=8))
    after_build = read_parity(result.build_dir)
    assert after_build["source"] == "build" and after_build["samples"] == 8
    assert [i["name"] for i in after_build["inputs"]] == ["real", "batch=1"]
    built = {r["label"]: r for r in after_build["results"]}
    assert set(built) >= {"onnx-fp32", "openvino-fp32"}
    assert {r.source for label, r in parity_records(load_build(result.build_dir)).items() if label != "eager"} == {
        "build"}

    verify(result.build_dir, samples=8, progress=False)
    after_verify = read_parity(result.build_dir)
    assert after_verify["source"] == "verify" and len(after_verify["inputs"]) > 2
    verified = {r["label"]: r for r in after_verify["results"]}
    assert set(verified) == set(built)
    assert set(after_verify) == set(after_build) and after_verify["tolerances"] == after_build["tolerances"]
    for label, record in built.items():
        again = verified[label]
        assert set(again) == set(record), label
        assert set(again["summary"]) == set(record["summary"]) and set(again["tolerance"]) == set(record["tolerance"])
        assert again["tolerance"] == record["tolerance"] and again["judged_as"] == record["judged_as"], label
        assert again["judged_by"] == record["judged_by"] and again["status"] == record["status"] == "pass"
        assert (record["source"], again["source"]) == ("build", "verify")
        real = [s for s in record["sets"] if s["name"] == "real"][0]
        assert set(real["metrics"]) == set([s for s in again["sets"] if s["name"] == "real"][0]["metrics"])
    manifest = load_build(result.build_dir).manifest["parity"]
    assert manifest["source"] == "verify" and manifest["results"] == {k: "pass" for k in built}


def test_a_parity_failure_at_build_time_fails_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import exporter.export as export_module
    from exporter.backends import BACKENDS, Artifact
    from exporter.backends.eager import EagerRunner

    class Wrong(EagerRunner):
        backend = "test_wrong"

        def run_impl(self, prepared):
            return super().run_impl(prepared) * 1.1

    def export_wrong(ctx):
        eager = ctx.artifacts[0]
        return [Artifact("wrong", "test_wrong", eager.path, "fp32", options=eager.options)]

    monkeypatch.setitem(BACKENDS, "test_wrong", Wrong)
    monkeypatch.setattr(export_module, "STAGES", {"wrong": Stage("wrong", export_wrong)})
    argv = ["build", "lenet", "--untrained", "--parity-samples", "8", "--artifacts", str(tmp_path)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "wrong" in out
    parity = load_build("lenet", tmp_path).manifest["parity"]
    assert parity["passed"] is False and parity["results"] == {"wrong": "fail"}
    assert read_parity(load_build("lenet", tmp_path).dir)["results"][0]["judged_as"] == "fp32"
    with pytest.raises(BuildError, match="--strict: quick parity failed: wrong: real: max abs error"):
        build(build_options("lenet", tmp_path / "strict", strict=True))


def test_bad_options_through_the_api_are_usage_errors(tmp_path: Path) -> None:
    for bad, needle in ((dict(batch=0), "--batch must be a positive integer"),
                        (dict(parity_samples=-1), "--parity-samples must be a positive integer")):
        with pytest.raises(UsageError, match=needle):
            build(build_options("lenet", tmp_path, **bad))
    assert not any(tmp_path.rglob("manifest.json"))
