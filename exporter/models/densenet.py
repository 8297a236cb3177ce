"""DenseNet as in d2l (seed 001 §8)."""

from __future__ import annotations

import torch
from torch import nn

from exporter.models.registry import CpuRecipe, Recipe, register_model


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Pre-activation 3×3 convolution: BN, ReLU, conv."""
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(),
                         nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))


def transition_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN, ReLU, 1×1 conv to `out_channels`, 2×2 average pool halving the size."""
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(),
                         nn.Conv2d(in_channels, out_channels, kernel_size=1),
                         nn.AvgPool2d(kernel_size=2, stride=2))


class DenseBlock(nn.Module):
    """`num_convs` conv blocks, each fed the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_convs: int, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*(conv_block(in_channels + i * growth_rate, growth_rate) for i in range(num_convs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.net:
            x = torch.cat((x, block(x)), dim=1)
        return x


class DenseNet(nn.Sequential):
    """ResNet stem, dense blocks separated by channel-halving transitions, BN-ReLU, global pool, linear."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, growth_rate: int = 32,
                 num_convs_in_dense_blocks: tuple[int, ...] = (4, 4, 4, 4), stem_channels: int = 64) -> None:
        stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, kernel_size=7, stride=2, padding=3),
                             nn.BatchNorm2d(stem_channels), nn.ReLU(),
                             nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        blocks: list[nn.Module] = []
        channels = stem_channels
        for i, num_convs in enumerate(num_convs_in_dense_blocks):
            blocks.append(DenseBlock(num_convs, channels, growth_rate))
            channels += num_convs * growth_rate
            if i != len(num_convs_in_dense_blocks) - 1:
                blocks.append(transition_block(channels, channels // 2))
                channels //= 2
        super().__init__(stem, *blocks, nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(channels, num_classes))


@register_model(family="densenet", seed="001 §8", input_shape=(1, 96, 96), seed_test_acc=0.848,
                seed_examples_per_s=4122,
                recipe=Recipe(lr=0.1, batch_size=256, epochs=10, resize=96, cpu_epochs=2, cpu_batch_size=128),
                cpu_recipe=CpuRecipe(stages=((0.5, 4), (1.0, 2)), batch_size=64, lr=0.1))
def densenet(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """DenseNet (d2l): 4 dense blocks of 4 conv blocks, growth rate 32, 96×96 input."""
    return DenseNet(in_channels=in_channels, num_classes=num_classes)
