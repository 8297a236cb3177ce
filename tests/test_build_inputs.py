"""The weights a build exports (`exporter/build_inputs.py`): untrained weights that parity can see through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from exporter import build_inputs
from exporter.build_inputs import (
    HELD_BACK_POOL,
    NEAR_ZERO_WEIGHT,
    REDRAW_STD,
    Weights,
    calibration_images,
    hardest_images,
    redraw_near_zero_weights,
)
from exporter.data import sample_images
from tests.export_builds import build_options


class ZeroHeadNet(nn.Module):
    """ViT's zero classifier head and ConvNeXt's 1e-6 layer scale in miniature."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.layer_scale = nn.Parameter(torch.full((4, 1, 1), 1e-6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x + self.layer_scale * self.conv(x)).flatten(1))


def test_near_zero_weights_are_redrawn_and_biases_kept() -> None:
    torch.manual_seed(0)
    net = ZeroHeadNet()
    conv = net.conv.weight.detach().clone()
    assert redraw_near_zero_weights(net) == ["layer_scale", "head.weight"]
    head, scale = net.head.weight.detach(), net.layer_scale.detach()
    assert float(head.abs().max()) > NEAR_ZERO_WEIGHT and float(scale.abs().max()) > 1e-3
    assert 0.5 * REDRAW_STD < float(head.std()) < 2 * REDRAW_STD
    assert torch.equal(net.conv.weight, conv) and not net.head.bias.any()  # the rest as initialised
    assert redraw_near_zero_weights(net) == []


def test_an_untrained_build_of_a_zero_head_model_has_informative_logits(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the redraw every logit is 0 and each backend "agrees" whatever it computes; the names go to the
    manifest's `weights` (the `Weights.info` a build records)."""
    monkeypatch.setattr(build_inputs, "create_model", lambda name, in_channels, num_classes: ZeroHeadNet(
        num_classes=num_classes, in_channels=in_channels))
    said: list[str] = []
    weights = build_inputs.resolve_weights(build_options("lenet", tmp_path), said.append)
    assert weights.info["redrawn_near_zero"] == ["layer_scale", "head.weight"]
    assert any("2 weight tensor(s) initialised to (almost) zero redrawn" in line for line in said)
    with torch.no_grad():
        logits = weights.model(torch.rand(8, 1, 28, 28))
    assert float(logits.std(0).max()) > 1e-3  # they depend on the image


class StoredLogits(nn.Module):
    """Returns the first three values of each image: a model whose certainty the test sets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


def test_hardest_images_are_the_least_sure_by_margin_and_by_logit_norm() -> None:
    """int8 flips where the top-1 margin is small and loses cosine where the logits are small: the held-back
    images need both kinds (either ranking alone would pick a confident image here)."""
    logits = np.array([[10.0, 8.0, 0.0]] * 8 + [[10.0, 9.9, 0.0], [3.0, 0.0, 0.0]], np.float32)
    images = np.zeros((10, 1, 2, 2), np.float32)
    images.reshape(10, -1)[:, :3] = logits
    assert hardest_images(StoredLogits(), images, 2, batch=3).tolist() == [8, 9]


def test_int8_held_back_images_are_the_hardest_of_a_pool(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 7)).eval()
    opts = build_options("lenet", tmp_path, calibration_samples=64)
    weights = Weights(model=model, input_shape=(1, 28, 28), num_classes=7, class_names=[], info={}, dataset=None)
    images, pool = calibration_images(opts, weights)
    assert images.shape == (64, 1, 28, 28) and pool == 16 * HELD_BACK_POOL
    drawn, _, _ = sample_images(None, "train", (1, 28, 28), 48 + pool, seed=opts.seed)
    assert np.array_equal(images[:48], drawn[:48])  # the calibration images: the seed's first draws
    with torch.no_grad():
        top_two = np.sort(model(torch.from_numpy(drawn[48:])).numpy(), axis=1)[:, -2:]
    margins = top_two[:, 1] - top_two[:, 0]
    held_back = [next(i for i in range(pool) if np.array_equal(drawn[48 + i], image)) for image in images[48:]]
    assert np.median(margins[held_back]) < np.percentile(margins, 25)

    random, pool = calibration_images(opts, Weights(model=None, input_shape=(1, 28, 28), num_classes=7,
                                                    class_names=[], info={}, dataset=None))
    assert pool == 16 and np.array_equal(random, sample_images(None, "train", (1, 28, 28), 64, seed=opts.seed)[0])
