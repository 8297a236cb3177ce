"""`exporter.manifest`: resolving, loading and verifying builds; atomic manifest updates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporter.backends.base import Artifact
from exporter.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RESULT_FILES,
    Build,
    ManifestError,
    file_entries,
    json_default,
    load_build,
    point_latest,
    resolve_build,
    sha256_file,
    update_manifest,
    write_json_atomic,
)
from exporter.models import UnknownModelError


def _fake_build(root: Path, model: str = "lenet", build_id: str = "b1") -> Path:
    """A small but complete build directory: two files, a manifest listing them, and `latest`."""
    build_dir = root / model / build_id
    (build_dir / "sub").mkdir(parents=True)
    (build_dir / "weights.safetensors").write_bytes(b"w" * 100)
    (build_dir / "sub" / "model.xml").write_text("<xml/>")
    manifest = {
        "format": FORMAT_VERSION, "build_id": build_id, "model": model, "input_shape": [1, 28, 28], "num_classes": 7,
        "dataset": None, "untrained": True, "batch": {"dynamic": True, "static": None, "min": 1, "max": 16},
        "files": file_entries(build_dir),
        "artifacts": [Artifact("eager", "eager", "weights.safetensors", "fp32",
                               options={"model": model, "in_channels": 1, "num_classes": 7}).to_dict()
                      | {"files": ["weights.safetensors"], "size": 100}],
    }
    write_json_atomic(build_dir / MANIFEST_NAME, manifest)
    point_latest(root / model, build_dir)
    return build_dir


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_load_build_by_name_dir_and_model_dir(tmp_path: Path) -> None:
    build_dir = _fake_build(tmp_path)
    by_name = load_build("lenet", tmp_path)
    assert by_name.dir.resolve() == build_dir.resolve()
    assert load_build(build_dir).manifest == by_name.manifest
    assert resolve_build(tmp_path / "lenet").resolve() == build_dir.resolve()
    assert by_name.model == "lenet" and by_name.input_shape == (1, 28, 28) and by_name.dataset is None
    assert by_name.num_classes == 7 and by_name.untrained
    [artifact] = by_name.artifacts
    assert isinstance(artifact, Artifact) and artifact.options["num_classes"] == 7
    assert by_name.artifact("eager") == artifact
    with pytest.raises(ManifestError, match="has no artifact 'onnx'.*eager"):
        by_name.artifact("onnx")


def test_latest_follows_the_newest_build(tmp_path: Path) -> None:
    _fake_build(tmp_path, build_id="b1")
    second = _fake_build(tmp_path, build_id="b2")
    assert (tmp_path / "lenet" / "latest").is_symlink()
    assert load_build("lenet", tmp_path).dir.resolve() == second.resolve()
    assert not list((tmp_path / "lenet").glob(".latest*"))  # the temporary link was renamed away


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampered_file_is_a_manifest_error(tmp_path: Path, damage: str) -> None:
    build_dir = _fake_build(tmp_path)
    target = build_dir / "sub" / "model.xml"
    if damage == "flip":
        target.write_text("<xmm/>")  # same size, different bytes
    elif damage == "truncate":
        target.write_text("<x")
    else:
        target.unlink()
    with pytest.raises(ManifestError, match="model.xml"):
        load_build("lenet", tmp_path)
    assert load_build("lenet", tmp_path, verify_hashes=False).model == "lenet"


def test_missing_or_corrupt_manifest(tmp_path: Path) -> None:
    build_dir = _fake_build(tmp_path)
    (build_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        load_build(build_dir)
    (build_dir / MANIFEST_NAME).write_text(json.dumps({"hello": 1}))
    with pytest.raises(ManifestError, match="not an exporter build manifest"):
        load_build(build_dir)
    (build_dir / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="not a build directory"):
        load_build(build_dir)
    with pytest.raises(ManifestError, match="does not point at a finished build"):
        load_build("lenet", tmp_path)


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="did you mean lenet"):
        resolve_build("lenett", tmp_path)
    with pytest.raises(ManifestError, match="no build of resnet18.*exporter build resnet18"):
        resolve_build("resnet18", tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        resolve_build(tmp_path / "nowhere")


def test_update_manifest_is_atomic_and_keeps_other_keys(tmp_path: Path) -> None:
    build_dir = _fake_build(tmp_path)
    build = load_build(build_dir)
    other = load_build(build_dir)  # a second process' stale view
    update_manifest(build, "bench", {"p50_ms": 1.5})
    update_manifest(other, "parity", {"passed": True})  # must not drop "bench"
    on_disk = json.loads((build_dir / MANIFEST_NAME).read_text())
    assert on_disk["bench"] == {"p50_ms": 1.5} and on_disk["parity"] == {"passed": True}
    assert other.manifest == on_disk
    assert [p.name for p in build_dir.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ManifestError, match="written by `exporter build` only"):
        update_manifest(build, "files", {})
    load_build(build_dir)  # hashes still verify: the manifest is not in its own file list


def test_copied_build_still_verifies(tmp_path: Path) -> None:
    build_dir = _fake_build(tmp_path / "a")
    copy = tmp_path / "copy"
    shutil.copytree(build_dir, copy)
    build = load_build(copy)
    assert isinstance(build, Build) and build.dir == copy


def test_an_older_manifest_is_refused_in_one_line_saying_rebuild(tmp_path: Path) -> None:
    build_dir = _fake_build(tmp_path)
    manifest = json.loads((build_dir / MANIFEST_NAME).read_text())
    write_json_atomic(build_dir / MANIFEST_NAME, {**manifest, "format": 1})
    with pytest.raises(ManifestError) as caught:
        load_build("lenet", tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "older exporter (format 1" in message
    assert "rebuild with `exporter build lenet`" in message
    with pytest.raises(ManifestError, match="rebuild"):
        load_build("lenet", tmp_path, verify_hashes=False)  # also when only reading results
    write_json_atomic(build_dir / MANIFEST_NAME, {**manifest, "format": FORMAT_VERSION + 1})
    with pytest.raises(ManifestError, match="upgrade exporter"):
        load_build("lenet", tmp_path)
    write_json_atomic(build_dir / MANIFEST_NAME, {**manifest, "format": "2"})
    with pytest.raises(ManifestError, match="does not read"):
        load_build("lenet", tmp_path)


def test_an_older_manifest_on_the_command_line_is_one_line(tmp_path: Path, capsys) -> None:
    from exporter.cli import main

    build_dir = _fake_build(tmp_path)
    manifest = json.loads((build_dir / MANIFEST_NAME).read_text())
    write_json_atomic(build_dir / MANIFEST_NAME, {**manifest, "format": 1})
    for argv in (["verify", "lenet"], ["bench", "lenet"], ["select", "lenet", "--max-flips", "1%"], ["report"]):
        assert main([*argv, "--artifacts", str(tmp_path)]) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "rebuild" in err[0], (argv, err)


def test_result_files_are_not_hashed(tmp_path: Path) -> None:
    """parity.json, bench.json and the reference cache are written after the build: not artifacts."""
    build_dir = _fake_build(tmp_path)
    for name in RESULT_FILES:
        if name != MANIFEST_NAME:
            (build_dir / name).write_text("{}")
    assert set(file_entries(build_dir)) == {"weights.safetensors", "sub/model.xml"}
    (build_dir / "sub" / "parity.json").write_text("{}")  # only at the top level
    assert "sub/parity.json" in file_entries(build_dir)
    load_build(build_dir)


def test_json_default_for_result_values(tmp_path: Path) -> None:
    import numpy as np

    from exporter.results import ParityRecord

    data = {"path": tmp_path, "scalar": np.float32(1.5), "array": np.arange(2), "record": ParityRecord("pass"),
            "set": {3}, "tuple": (1, 2)}
    decoded = json.loads(json.dumps(data, default=json_default))
    assert decoded["path"] == str(tmp_path) and decoded["scalar"] == 1.5 and decoded["array"] == [0, 1]
    assert decoded["record"]["status"] == "pass" and decoded["set"] == [3] and decoded["tuple"] == [1, 2]
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        json.dumps({"x": object()}, default=json_default)
