"""AlexNet as in d2l (seed 001 §2): one input channel, 224×224 inputs."""

from __future__ import annotations

from torch import nn

from exporter.models.registry import CpuRecipe, Recipe, register_model


class AlexNet(nn.Sequential):
    """Five convolutions and three linear layers; the classifier expects 5×5 feature maps (224×224 inputs)."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Flatten(),
            nn.Linear(6400, 4096), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )  # fmt: skip


@register_model(family="alexnet", seed="001 §2", input_shape=(1, 224, 224), seed_test_acc=0.859,
                seed_examples_per_s=3433,
                recipe=Recipe(lr=0.01, batch_size=256, epochs=10, resize=224,
                              cpu_epochs=1, cpu_max_steps=30, cpu_batch_size=64),
                cpu_recipe=CpuRecipe(stages=((1.0, 3),), batch_size=64, lr=5e-4, optimizer="AdamW",
                                     weight_decay=0.05, init="kaiming_normal_"))  # fixed input: no resizing
def alexnet(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """AlexNet (d2l), ReLU, max-pooling and dropout, 224×224 input."""
    return AlexNet(in_channels=in_channels, num_classes=num_classes)
