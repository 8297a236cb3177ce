"""Test accuracy during and after training: which test images, the fp32 copy they run through, the batched loop."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from exporter.data import Dataset, to_model_tensor
from exporter.training_runtime import Dist

# Smaller batches stay in cache: folded fp32 resnet50 at 224 px on 2 AVX-512 cores 28–34 img/s at 16, 40–42 at 8;
# resnet50v2 21–27 → 40, densenet 634 → 1091, googlenet 484–523 → 519, alexnet 183–189 → 173 (thirteenth session).
EVAL_BATCH = 8
TEST_SUBSET_SEED = 0  # which test images a --test-images subset holds (fixed, so runs compare)


def test_subset(size: int, limit: int | None) -> np.ndarray:
    """Indices of the test images evaluated: all of them, or a fixed seeded subset of `limit` (sorted)."""
    if limit is None or limit >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(TEST_SUBSET_SEED).permutation(size)[:limit])


def inference_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` for fp32 evaluation: BatchNorm folded into the convolutions, channels-last (probe on 2 AVX2
    cores, batch 16: resnet50 at 224 px 5.8 → 10.1 img/s, googlenet 75 → 116, alexnet 39 → 57; logits equal to
    1e-7)."""
    from exporter.backends.eager import batchnorm_folded_copy

    return batchnorm_folded_copy(net).to(memory_format=torch.channels_last)


def accuracy(net: nn.Module, data: Dataset, subset: np.ndarray, input_shape: tuple[int, int, int],
             device: torch.device, dist: Dist, autocast: str | None = None) -> float:
    """Accuracy on `subset` of the split; under DDP each rank takes every world_size-th image, counts are summed."""
    net.eval()
    if autocast is None:
        net = inference_copy(net)
    memory_format = torch.channels_last if autocast is None else torch.contiguous_format
    index = subset[dist.rank::dist.world_size]
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        for start in range(0, len(index), EVAL_BATCH):
            batch = index[start:start + EVAL_BATCH]
            x = to_model_tensor(data.images[batch], input_shape).to(device, memory_format=memory_format)
            y = torch.from_numpy(data.labels[batch]).to(device)
            correct += int((net(x).argmax(dim=1) == y).sum())
    total_correct, total = dist.sum([float(correct), float(len(index))], device)
    return total_correct / max(total, 1.0)
