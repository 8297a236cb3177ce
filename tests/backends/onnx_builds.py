"""Shared, cached builds of the ONNX-family artifacts for the backend tests (no dependency on `exporter build`).

Each cheap registry model is traced with a dynamic batch, exported once per test session with `export_onnx`
(fp16 too), `export_onnxruntime` and `export_openvino`, and the tests of `test_onnx.py`, `test_onnxruntime.py`
and `test_openvino.py` read the same files. Test files import the `onnx_build` fixture from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporter.backends.base import Artifact, BuildContext
from tests.conftest import ALL_MODELS, TEST_NUM_CLASSES

# Cheap models and the (small) input each is tested at: the default run must stay fast on a 2-core CPU.
CHEAP_INPUTS = {"lenet": (1, 28, 28), "lenet_bn": (1, 28, 28), "resnet18": (1, 32, 32)}
CHEAP_MODELS = [name for name in ALL_MODELS if name in CHEAP_INPUTS]
FP32_ATOL = 1e-4
METADATA = {"checkpoint_sha256": "0" * 64, "recipe": '{"lr": 0.1}', "class_names": '["a","b","c","d","e","f","g"]',
            "input_scaling": "pixels/255, no mean/std"}


@dataclass
class Build:
    """One model's exported files and the eager model they came from."""

    model_name: str
    model: Any
    ctx: BuildContext
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return self.ctx.out_dir

    def path(self, name: str) -> Path:
        return self.out_dir / self.artifacts[name].path

    def eager(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()

    def batch(self, n: int, seed: int = 1) -> np.ndarray:
        return np.random.default_rng(seed).random((n, *self.ctx.input_shape), dtype=np.float32)


def make_context(model_name: str, out_dir: Path, *, model: Any = None, trace: bool = True,
                 **kwargs: Any) -> BuildContext:
    """A BuildContext like a build's: eval model, dynamic-batch ExportedProgram (unless `trace=False`)."""
    from exporter.models import create_model

    input_shape = CHEAP_INPUTS.get(model_name) or kwargs.pop("input_shape")
    if model is None:
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=TEST_NUM_CLASSES).eval()
    program = None
    if trace and not kwargs.get("static_batch"):
        example = torch.rand(2, *input_shape)
        program = torch.export.export(model, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    out_dir.mkdir(parents=True, exist_ok=True)
    return BuildContext(model_name=model_name, model=model, input_shape=input_shape, out_dir=out_dir,
                        exported_program=program, metadata=dict(METADATA), **kwargs)


def _build(model_name: str, out_dir: Path) -> Build:
    from exporter.backends.onnx import export_onnx
    from exporter.backends.onnxruntime import export_onnxruntime
    from exporter.backends.openvino import export_openvino

    ctx = make_context(model_name, out_dir, fp16=True)
    build = Build(model_name, ctx.model, ctx)
    for export in (export_onnx, export_onnxruntime, export_openvino):
        for artifact in export(ctx):
            ctx.artifacts.append(artifact)
            build.artifacts[artifact.name] = artifact
    return build


_BUILDS: dict[str, Build] = {}


@pytest.fixture(scope="session")
def onnx_build(tmp_path_factory: pytest.TempPathFactory):
    """`onnx_build(model_name)` → the session's cached Build of that model."""

    def get(model_name: str) -> Build:
        if model_name not in _BUILDS:
            _BUILDS[model_name] = _build(model_name, tmp_path_factory.mktemp(f"onnx-{model_name}"))
        return _BUILDS[model_name]

    return get


def trained_lenet_bn(steps: int = 100) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """lenet_bn trained briefly on real digits of classes 0..6 (TEST_NUM_CLASSES), with test images/labels.

    Returns (eval model, calibration images from the training split, test images, test labels). A trained
    model has well-separated logits, so int8 top-1 agreement is a meaningful check (random weights are not).
    """
    from exporter.data import load_split, to_model_input
    from exporter.models import create_model

    shape = CHEAP_INPUTS["lenet_bn"]
    train, test = load_split(None, "train"), load_split(None, "test")
    keep_train = np.flatnonzero(train.labels < TEST_NUM_CLASSES)
    keep_test = np.flatnonzero(test.labels < TEST_NUM_CLASSES)
    images = torch.from_numpy(to_model_input(train.images[keep_train], shape))
    labels = torch.from_numpy(train.labels[keep_train]).long()
    torch.manual_seed(0)
    model = create_model("lenet_bn", num_classes=TEST_NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is ~5× faster than several fighting over 2 cores
    try:
        for _ in range(steps):
            index = torch.randint(len(images), (64,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    calibration = images[:256].numpy()
    test_images = to_model_input(test.images[keep_test][:300], shape)
    return model, calibration, test_images, test.labels[keep_test][:300]
