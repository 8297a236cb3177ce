"""GoogLeNet with Inception blocks (seed 001 §5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from exporter.models.registry import CpuRecipe, Recipe, register_model


class Inception(nn.Module):
    """Four parallel paths (1×1; 1×1→3×3; 1×1→5×5; 3×3 max-pool→1×1), ReLU each, concatenated on channels."""

    def __init__(self, in_channels: int, c1: int, c2: tuple[int, int], c3: tuple[int, int], c4: int) -> None:
        super().__init__()
        self.p1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        self.p2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.p3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.p4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = F.relu(self.p1_1(x))
        p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
        p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
        p4 = F.relu(self.p4_2(self.p4_1(x)))
        return torch.cat((p1, p2, p3, p4), dim=1)


class GoogLeNet(nn.Sequential):
    """Stem (b1, b2), nine Inception blocks in b3-b5, global average pooling and one linear layer."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10) -> None:
        b1 = nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3), nn.ReLU(),
                           nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        b2 = nn.Sequential(nn.Conv2d(64, 64, kernel_size=1), nn.ReLU(),
                           nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(),
                           nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        b3 = nn.Sequential(Inception(192, 64, (96, 128), (16, 32), 32),
                           Inception(256, 128, (128, 192), (32, 96), 64),
                           nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        b4 = nn.Sequential(Inception(480, 192, (96, 208), (16, 48), 64),
                           Inception(512, 160, (112, 224), (24, 64), 64),
                           Inception(512, 128, (128, 256), (24, 64), 64),
                           Inception(512, 112, (144, 288), (32, 64), 64),
                           Inception(528, 256, (160, 320), (32, 128), 128),
                           nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        b5 = nn.Sequential(Inception(832, 256, (160, 320), (32, 128), 128),
                           Inception(832, 384, (192, 384), (48, 128), 128),
                           nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
        super().__init__(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes))


@register_model(family="googlenet", seed="001 §5", input_shape=(1, 96, 96), seed_test_acc=0.893,
                seed_examples_per_s=720,
                recipe=Recipe(lr=0.1, batch_size=128, epochs=10, resize=96, cpu_epochs=2, cpu_batch_size=128),
                cpu_recipe=CpuRecipe(stages=((0.5, 6), (1.0, 5)), batch_size=64, lr=2e-3, optimizer="AdamW",
                                     weight_decay=0.05, init="kaiming_normal_"))
def googlenet(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """GoogLeNet (d2l): nine Inception blocks, 96×96 input."""
    return GoogLeNet(in_channels=in_channels, num_classes=num_classes)
