"""LeNet-5 and its batch-normalised variants (seed 001 §1, §6)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from exporter.models.registry import Recipe, register_model


class ScratchBatchNorm(nn.Module):
    """The seed's from-scratch batch normalisation (seed 001 §6.2), with its bugs fixed.

    * `moving_mean` / `moving_var` are registered buffers, so they are saved in `state_dict()` and exported.
    * Train vs inference is keyed on `self.training`, not `torch.is_grad_enabled()`, so `eval()` uses the
      moving statistics even under autograd.
    * The seed's momentum convention is kept: `moving = momentum * moving + (1 - momentum) * batch` with
      `momentum=0.9`, the reverse of `nn.BatchNorm2d(momentum=0.1)` (which weighs the *new* batch by 0.1); the
      two give the same update. The batch variance is the biased one in both the normalisation and the update.
    """

    def __init__(self, num_features: int, num_dims: int, *, eps: float = 1e-5, momentum: float = 0.9) -> None:
        super().__init__()
        if num_dims not in (2, 4):
            raise ValueError(f"num_dims must be 2 (fully connected) or 4 (convolution), got {num_dims}")
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.eps = eps
        self.momentum = momentum
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.register_buffer("moving_mean", torch.zeros(shape))
        self.register_buffer("moving_var", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            x_hat = (x - self.moving_mean) / torch.sqrt(self.moving_var + self.eps)
        else:
            dims = (0,) if x.dim() == 2 else (0, 2, 3)
            mean = x.mean(dim=dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
            x_hat = (x - mean) / torch.sqrt(var + self.eps)
            with torch.no_grad():
                self.moving_mean.mul_(self.momentum).add_((1.0 - self.momentum) * mean)
                self.moving_var.mul_(self.momentum).add_((1.0 - self.momentum) * var)
        return self.gamma * x_hat + self.beta


class LeNet(nn.Sequential):
    """LeNet-5 as in d2l: two conv/sigmoid/avg-pool stages and three linear layers.

    `norm2d` / `norm1d` (callables taking the feature count) insert a normalisation after every conv and
    linear layer but the last, which is how the seed builds its BatchNorm variants.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        conv1_padding: int = 2,
        norm2d: Callable[[int], nn.Module] | None = None,
        norm1d: Callable[[int], nn.Module] | None = None,
    ) -> None:
        def norm(factory: Callable[[int], nn.Module] | None, features: int) -> list[nn.Module]:
            return [factory(features)] if factory else []

        flat = 16 * 5 * 5 if conv1_padding == 2 else 16 * 4 * 4
        super().__init__(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=conv1_padding), *norm(norm2d, 6), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), *norm(norm2d, 16), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(flat, 120), *norm(norm1d, 120), nn.Sigmoid(),
            nn.Linear(120, 84), *norm(norm1d, 84), nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )  # fmt: skip


@register_model(family="lenet", seed="001 §1", input_shape=(1, 28, 28), seed_test_acc=0.824,
                seed_examples_per_s=84970,
                # 150 epochs of digits5k's 4,000 images = the 600,000 images of the seed's 10 Fashion-MNIST epochs:
                # the sigmoid net leaves its plateau (0.100 after 10 epochs, 0.936 after 150; ~25 s on 2 cores)
                recipe=Recipe(lr=0.9, batch_size=256, epochs=10, resize=28, cpu_epochs=150))
def lenet(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """LeNet-5 with sigmoid activations and average pooling (d2l)."""
    return LeNet(in_channels=in_channels, num_classes=num_classes)


@register_model(family="lenet", seed="001 §6.4", input_shape=(1, 28, 28), seed_test_acc=0.883,
                seed_examples_per_s=53287, recipe=Recipe(lr=1.0, batch_size=256, epochs=10, resize=28))
def lenet_bn(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """LeNet with nn.BatchNorm after every conv/linear but the last, unpadded first conv."""
    return LeNet(in_channels=in_channels, num_classes=num_classes, conv1_padding=0,
                 norm2d=nn.BatchNorm2d, norm1d=nn.BatchNorm1d)


@register_model(family="lenet", seed="001 §6.2-6.3", input_shape=(1, 28, 28), seed_test_acc=0.874,
                seed_examples_per_s=29145, recipe=Recipe(lr=1.0, batch_size=256, epochs=10, resize=28))
def lenet_bn_scratch(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """LeNet with the seed's from-scratch BatchNorm (moving statistics as buffers)."""
    return LeNet(in_channels=in_channels, num_classes=num_classes, conv1_padding=0,
                 norm2d=lambda n: ScratchBatchNorm(n, num_dims=4),
                 norm1d=lambda n: ScratchBatchNorm(n, num_dims=2))
