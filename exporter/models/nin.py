"""Network in Network (seed 001 §4)."""

from __future__ import annotations

from torch import nn

from exporter.models.registry import CpuRecipe, Recipe, register_model


def nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    """A convolution followed by two 1×1 convolutions, each with ReLU (a per-pixel MLP)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
    )  # fmt: skip


class NiN(nn.Sequential):
    """Four NiN blocks; the last has `num_classes` channels, averaged globally into the logits."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__(
            nin_block(in_channels, 96, kernel_size=11, stride=4, padding=0),
            nn.MaxPool2d(3, stride=2),
            nin_block(96, 256, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(3, stride=2),
            nin_block(256, 384, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(3, stride=2),
            nn.Dropout(dropout),
            nin_block(384, num_classes, kernel_size=3, stride=1, padding=1),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
        )


@register_model(family="nin", seed="001 §4", input_shape=(1, 224, 224), seed_test_acc=0.827,
                seed_examples_per_s=2613,
                recipe=Recipe(lr=0.1, batch_size=256, epochs=10, resize=224,
                              cpu_epochs=1, cpu_max_steps=30, cpu_batch_size=64),
                # no BatchNorm, and the last block's 3×3 conv sees 1×1 maps below 224 px: no resizing. 6 epochs,
                # one run each: batch 64 at lr 1e-3 0.945, with label smoothing 0.1 0.944, at lr 5e-4 0.783, at 2e-3
                # 0.935; batch 32 at lr 1e-3 0.952–0.958 (twice the steps in the same time)
                cpu_recipe=CpuRecipe(stages=((1.0, 6),), batch_size=32, lr=1e-3, optimizer="AdamW",
                                     weight_decay=0.05, init="kaiming_normal_"))
def nin(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Network in Network: NiN blocks and global average pooling, no linear layer."""
    return NiN(in_channels=in_channels, num_classes=num_classes)
