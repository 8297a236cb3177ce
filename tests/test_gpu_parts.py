"""bench/gpu_parts.py: the parts `make gpu-parts` writes for the lent GPU machine, and how they come back there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench import gpu_parts

MODELS = ("lenet_bn", "resnet50")


def _parts(folder: Path, wheel: bytes, size: int = 4) -> None:
    """Parts as `make gpu-parts` writes them: `split -b SIZE -d -a 2` pieces and `sha256sum` lines."""
    folder.mkdir()
    name = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    lines = [f"{hashlib.sha256(wheel).hexdigest()}  {name}"]
    for index in range(0, len(wheel), size):
        part = f"{name}.part-{index // size:02d}"
        (folder / part).write_bytes(wheel[index:index + size])
        lines.append(f"{hashlib.sha256(wheel[index:index + size]).hexdigest()}  {part}")
    (folder / "mnist_5k.csv.gz").write_bytes(b"csv")
    lines.append(f"{hashlib.sha256(b'csv').hexdigest()}  mnist_5k.csv.gz")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_parts_are_checked_and_rejoined(tmp_path) -> None:
    wheel = bytes(range(11)) * 3
    _parts(tmp_path / "parts", wheel)
    joined = gpu_parts.assemble_wheel(tmp_path / "parts", tmp_path / "work")
    assert joined.name.endswith(".whl") and joined.read_bytes() == wheel


def test_a_missing_or_damaged_part_is_named(tmp_path) -> None:
    _parts(tmp_path / "parts", bytes(range(30)))
    part = sorted((tmp_path / "parts").glob("*.part-*"))[2]
    part.write_bytes(b"xx")
    with pytest.raises(gpu_parts.ProofError, match=f"{part.name} does not match its sha256"):
        gpu_parts.assemble_wheel(tmp_path / "parts", tmp_path / "work")
    part.unlink()
    with pytest.raises(gpu_parts.ProofError, match=f"parts missing in .*: {part.name} "):
        gpu_parts.assemble_wheel(tmp_path / "parts", tmp_path / "work")
    with pytest.raises(gpu_parts.ProofError, match="SHA256SUMS is missing: run `make gpu-parts`"):
        gpu_parts.assemble_wheel(tmp_path / "nowhere", tmp_path / "work")


def _checkpoint(folder: Path, weights: bytes) -> None:
    folder.mkdir(parents=True)
    (folder / "checkpoint.safetensors").write_bytes(weights)
    (folder / "checkpoint.json").write_text(json.dumps({"weights_sha256": hashlib.sha256(weights).hexdigest()}))


def test_make_parts_plans_calls_that_fit_and_the_checkpoints_come_back(tmp_path) -> None:
    wheel = tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    digits = tmp_path / "mnist_5k.csv.gz"
    digits.write_bytes(b"0,1,2\n" * 10)
    _checkpoint(tmp_path / "ckpt" / "lenet_bn", b"L" * 300)
    _checkpoint(tmp_path / "ckpt" / "resnet50", b"R" * 5000)
    parts = tmp_path / "parts"
    calls = gpu_parts.make_parts(wheel, parts, tmp_path / "ckpt", MODELS, digits, part_bytes=3000,
                                 capacity=4000)
    carried = [line.split("carry ", 1)[1].split(" → ")[0].split() for line in calls]
    assert all(sum((tmp_path / p).stat().st_size for p in call) <= 4000 and len(call) <= 8 for call in carried)
    assert sorted(p for call in carried for p in call) == sorted(f"parts/{f.name}" for f in parts.iterdir())
    assert calls[0].endswith("--step tests") and calls[-1].endswith("--step ort")
    torch_call = next(i for i, call in enumerate(carried) if "parts/resnet50.checkpoint.safetensors.part-01" in call)
    assert "--step torch" in calls[torch_call] and all(
        line.endswith("ls") for i, line in enumerate(calls[1:-1], 1) if i != torch_call)

    artifacts = tmp_path / "artifacts"
    assert gpu_parts.restore_checkpoints(parts, artifacts, MODELS) == [
        f"{m}: carried checkpoint in {artifacts / m}" for m in ("lenet_bn", "resnet50")]
    for model in ("lenet_bn", "resnet50"):
        for file in ("checkpoint.safetensors", "checkpoint.json"):
            assert (artifacts / model / file).read_bytes() == (tmp_path / "ckpt" / model / file).read_bytes()
    assert gpu_parts.assemble_wheel(parts, tmp_path / "work").read_bytes() == wheel.read_bytes()
    for part in parts.glob("resnet50.checkpoint.safetensors.part-*"):  # already in place: the parts may be gone
        part.unlink()
    assert len(gpu_parts.restore_checkpoints(parts, artifacts, MODELS)) == 2
    (artifacts / "lenet_bn" / "checkpoint.safetensors").write_bytes(b"mine")
    with pytest.raises(gpu_parts.ProofError, match="lenet_bn/checkpoint.safetensors: another checkpoint than"):
        gpu_parts.restore_checkpoints(parts, artifacts, MODELS)
    assert (artifacts / "lenet_bn" / "checkpoint.safetensors").read_bytes() == b"mine"
    (artifacts / "lenet_bn" / "checkpoint.safetensors").unlink()
    (artifacts / "resnet50" / "checkpoint.safetensors").unlink()
    with pytest.raises(gpu_parts.ProofError, match="parts missing in .*resnet50.checkpoint.safetensors.part-00"):
        gpu_parts.restore_checkpoints(parts, artifacts, MODELS)
