"""What a training run uses: the recipe (user overrides, the spec's CPU budget, the seed's values) and the limits
the machine puts on it (epochs, steps, input size, threads, one batch's memory), each refused in one line."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from exporter.errors import UsageError
from exporter.machine import usable_cores

CPU_BUDGET_TEST_IMAGES = 128  # test images evaluated per epoch under a step-capped CPU budget
MAX_EPOCHS = 10_000
MAX_STEPS = 10**7
MAX_RESIZE = 1024  # 4.6× the largest input any model here trains at (224); one 256-batch is 3 GiB at 3×1024²
THREADS_PER_CORE = 4  # more intra-op threads than this per usable core only adds contention


def resolve_recipe(
    model: str,
    *,
    device: torch.device,
    epochs: int | None,
    lr: float | None,
    batch_size: int | None,
    resize: int | None,
    max_steps: int | None,
    cpu_budget: bool,
    test_images: int | None = None,
) -> dict[str, Any]:
    """The values this run uses: user overrides, else the CPU budget (on a CPU, when enabled), else the seed's.

    A budget that caps the steps also caps the test set evaluated after each epoch at CPU_BUDGET_TEST_IMAGES
    (a fixed seeded subset): evaluating 1,000 images at 224×224 would cost more than the capped training.
    """
    from exporter.models import get_spec

    recipe = get_spec(model).recipe
    budget_active = cpu_budget and device.type == "cpu"
    from_budget: list[str] = []

    def pick(user: Any, seed_value: Any, cpu_value: Any, key: str) -> Any:
        if user is not None:
            return user
        if budget_active and cpu_value is not None:
            from_budget.append(key)
            return cpu_value
        return seed_value

    values = {
        "epochs": pick(epochs, recipe.epochs, recipe.cpu_epochs, "epochs"),
        "batch_size": pick(batch_size, recipe.batch_size, recipe.cpu_batch_size, "batch_size"),
        "max_steps": pick(max_steps, None, recipe.cpu_max_steps, "max_steps"),
        "test_images": pick(test_images, None,
                            CPU_BUDGET_TEST_IMAGES if recipe.cpu_max_steps is not None else None, "test_images"),
        "lr": float(lr if lr is not None else recipe.lr),
        "resize": int(resize if resize is not None else recipe.resize),
    }
    _check_recipe_values(values)
    values.update(
        optimizer="SGD", momentum=0.0, weight_decay=0.0, loss="cross_entropy", init="xavier_normal_",
        seed_recipe={"lr": recipe.lr, "batch_size": recipe.batch_size, "epochs": recipe.epochs,
                     "resize": recipe.resize, "source": recipe.source},
        budget="cpu" if from_budget else "seed",
        from_cpu_budget=from_budget,
    )
    return values


def _check_recipe_values(values: dict[str, Any]) -> None:
    """Positive integers within the machine's reach, a positive finite lr; UsageError in one line otherwise."""
    limits = {"epochs": (MAX_EPOCHS, ""), "max_steps": (MAX_STEPS, ""),
              "resize": (MAX_RESIZE, " pixels (the largest input a model here trains at is 224)"),
              "batch_size": (None, ""), "test_images": (None, "")}
    for key, (limit, why) in limits.items():
        value = values[key]
        if value is None and key in ("max_steps", "test_images"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{key} must be a positive integer, got {value!r}")
        if limit is not None and value > limit:
            raise UsageError(f"{key} must be at most {limit}{why}, got {value}")
    if not math.isfinite(values["lr"]) or values["lr"] <= 0:
        raise UsageError(f"lr must be a positive number, got {values['lr']!r}")


def check_seed(seed: int) -> None:
    """`seed` must be a non-negative integer."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")


def check_threads(threads: int | None) -> None:
    """`threads` must be a positive integer of at most THREADS_PER_CORE × the usable cores."""
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0:
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    cores = usable_cores()
    if threads > THREADS_PER_CORE * cores:
        raise UsageError(f"threads must be at most {THREADS_PER_CORE * cores} ({THREADS_PER_CORE} × the {cores} "
                         f"usable cores), got {threads}")


def _available_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_batch_memory(input_shape: tuple[int, int, int], batch_size: int) -> None:
    """Refuse a batch whose float32 input alone would not fit in the memory available now."""
    available = _available_memory()
    needed = batch_size * math.prod(input_shape) * 4
    if available is not None and needed > available:
        raise UsageError(
            f"one batch of {batch_size} images at {'×'.join(map(str, input_shape))} needs {needed / 2**30:.1f} GiB "
            f"as input alone, more than the {available / 2**30:.1f} GiB available; lower --batch-size or --resize"
        )
