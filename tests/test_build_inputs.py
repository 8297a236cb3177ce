"""The weights a build exports (`exporter/build_inputs.py`): untrained weights that parity can see through."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from exporter import build_inputs
from exporter.build_inputs import NEAR_ZERO_WEIGHT, REDRAW_STD, redraw_near_zero_weights
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
