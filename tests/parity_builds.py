"""Shared small builds for the parity tests (`test_parity`, `test_bisect`, `test_tuning`, `test_verify_cli`).

`make_build` writes a build directory `load_build` accepts (manifest format 2) from the backends' own export
functions: eager fp32/bf16/fp16 weights, ONNX and OpenVINO, optionally with briefly trained weights (trained
logits make the low-precision checks meaningful; an untrained head has near-tied logits). The session-scoped
`own_build` fixture is one such build of lenet_bn; tests that write into a build work on a copy (`copy_build`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporter.backends import BACKENDS, Artifact, BuildContext
from exporter.manifest import FORMAT_VERSION, RESULT_FILES, file_entries, write_json_atomic
from exporter.models import create_model
from tests.conftest import TEST_NUM_CLASSES

SAMPLES = 32
OWN_MODEL, OWN_SHAPE, OWN_TRAIN_STEPS = "lenet_bn", (1, 28, 28), 60


def _train(net: torch.nn.Module, shape: tuple[int, int, int], steps: int) -> None:
    from exporter.data import sample_images

    images, labels, _ = sample_images(None, "train", shape, 64 * 10, seed=1)
    labels = labels % TEST_NUM_CLASSES
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    for step in range(steps):
        rows = slice((step % 10) * 64, (step % 10 + 1) * 64)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(images[rows])), torch.from_numpy(labels[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def make_build(directory: Path, model: str, shape: tuple[int, int, int], *, train_steps: int = 0,
               exports: tuple[str, ...] = ("onnx", "openvino"), max_batch: int = 16) -> Path:
    """A build directory with a manifest `load_build` accepts: eager fp32/bf16/fp16 + the requested exports."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = create_model(model, in_channels=shape[0], num_classes=TEST_NUM_CLASSES)
    if train_steps:
        _train(net, shape, train_steps)
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "weights.safetensors"))
    options = {"model": model, "in_channels": shape[0], "num_classes": TEST_NUM_CLASSES}
    artifacts = [Artifact(f"eager-{p}" if p != "fp32" else "eager", "eager", "weights.safetensors", p,
                          options=options) for p in ("fp32", "bf16", "fp16")]
    ctx = BuildContext(model_name=model, model=net, input_shape=shape, out_dir=directory, max_batch=max_batch)
    if "onnx" in exports:
        from exporter.backends.onnx import export_onnx

        ctx.artifacts += export_onnx(ctx)
    if "openvino" in exports and BACKENDS["openvino"].unavailable_reason("cpu") is None:
        from exporter.backends.openvino import export_openvino

        ctx.artifacts += export_openvino(ctx)
    artifacts += ctx.artifacts
    manifest = {"format": FORMAT_VERSION, "build_id": directory.name, "model": model,
                "num_classes": TEST_NUM_CLASSES, "in_channels": shape[0], "input_shape": list(shape),
                "dataset": None, "batch": {"dynamic": True, "static": None, "max": max_batch},
                "files": file_entries(directory), "artifacts": [a.to_dict() for a in artifacts]}
    write_json_atomic(directory / "manifest.json", manifest)
    return directory


def rewrite_manifest(directory: Path, **changes: Any) -> None:
    """Change manifest keys and re-hash the build's files (a consistent build, unlike a tampered one)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(changes)
    manifest["files"] = {k: v for k, v in file_entries(directory).items() if k not in RESULT_FILES}
    write_json_atomic(directory / "manifest.json", manifest)


def copy_build(source: Path, target: Path) -> Path:
    """A copy of a build without the results earlier tests wrote into it (parity.json, bench.json, cache)."""
    shutil.copytree(source, target)
    for name in RESULT_FILES[1:]:
        (target / name).unlink(missing_ok=True)
    manifest = json.loads((target / "manifest.json").read_text())
    for key in ("parity", "bench", "tuning", "recommended"):
        manifest.pop(key, None)
    write_json_atomic(target / "manifest.json", manifest)
    return target


def perturbed_copy(source: Path, target: Path, initializer: str, factor: float = 1.05) -> Path:
    """A copy of a build whose `model.onnx` has one initializer scaled by `factor` (manifest re-hashed)."""
    import onnx
    from onnx import numpy_helper

    copy_build(source, target)
    model = onnx.load(str(target / "model.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == initializer)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), initializer))
    onnx.save(model, str(target / "model.onnx"))
    rewrite_manifest(target)
    return target


_OWN: dict[str, Path] = {}


@pytest.fixture(scope="session")
def own_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's briefly trained lenet_bn build (eager fp32/bf16/fp16, ONNX, OpenVINO). Do not write into it:
    tests that save results use `copy_build` first."""
    if "own" not in _OWN:
        _OWN["own"] = make_build(tmp_path_factory.mktemp(OWN_MODEL) / "b1", OWN_MODEL, OWN_SHAPE,
                                 train_steps=OWN_TRAIN_STEPS)
    return _OWN["own"]
