"""What a training run uses: the recipe (user overrides, the spec's CPU budget, the seed's values) and the limits
the machine puts on it (epochs, steps, input size, threads, one batch's memory), each refused in one line."""

from __future__ import annotations

import math
from typing import Any

import torch

from exporter.errors import UsageError
from exporter.machine import available_memory_bytes, cpu_flags, usable_cores

CPU_BUDGET_TEST_IMAGES = 128  # test images evaluated per epoch under a step-capped CPU budget
MAX_EPOCHS = 10_000
MAX_STEPS = 10**7
MAX_RESIZE = 1024  # 4.6× the largest input any model here trains at (224); one 256-batch is 3 GiB at 3×1024²
THREADS_PER_CORE = 4  # more intra-op threads than this per usable core only adds contention


RECIPES = ("cpu", "seed")


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
    recipe: str | None = None,
) -> dict[str, Any]:
    """The values this run uses, user overrides first.

    `recipe` "cpu" (the default on a CPU for a model that has one, see `exporter.models.CpuRecipe`): SGD with
    Nesterov momentum, one-cycle lr, bf16 autocast where the CPU has it, channels-last, progressive resizing.
    `recipe` "seed" (the default on a GPU, and for the LeNets): the seed's d2l recipe; on a CPU, with `cpu_budget`,
    the smaller epochs / steps / batch its spec records. A budget that caps the steps also caps the test set
    evaluated after each epoch at CPU_BUDGET_TEST_IMAGES (a fixed seeded subset).
    """
    from exporter.models import get_spec

    spec = get_spec(model)
    if recipe is not None and recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if recipe == "cpu" and spec.cpu_recipe is None:
        raise UsageError(f"{model} has no CPU recipe (its seed's recipe trains it on a CPU); use --recipe seed")
    if recipe is None:
        recipe = "cpu" if device.type == "cpu" and spec.cpu_recipe is not None else "seed"
    if recipe == "cpu":
        values = _cpu_values(spec, epochs=epochs, lr=lr, batch_size=batch_size, resize=resize, max_steps=max_steps,
                             test_images=test_images, device=device)
    else:
        values = _seed_values(spec, epochs=epochs, lr=lr, batch_size=batch_size, resize=resize, max_steps=max_steps,
                              test_images=test_images, budget_active=cpu_budget and device.type == "cpu")
    _check_recipe_values(values)
    source = spec.recipe
    values["seed_recipe"] = {"lr": source.lr, "batch_size": source.batch_size, "epochs": source.epochs,
                             "resize": source.resize, "source": source.source}
    return values


def _seed_values(spec: Any, *, epochs: int | None, lr: float | None, batch_size: int | None, resize: int | None,
                 max_steps: int | None, test_images: int | None, budget_active: bool) -> dict[str, Any]:
    recipe = spec.recipe
    from_budget: list[str] = []

    def pick(user: Any, seed_value: Any, cpu_value: Any, key: str) -> Any:
        if user is not None:
            return user
        if budget_active and cpu_value is not None:
            from_budget.append(key)
            return cpu_value
        return seed_value

    values = {
        "name": "seed",
        "epochs": pick(epochs, recipe.epochs, recipe.cpu_epochs, "epochs"),
        "batch_size": pick(batch_size, recipe.batch_size, recipe.cpu_batch_size, "batch_size"),
        "max_steps": pick(max_steps, None, recipe.cpu_max_steps, "max_steps"),
        "test_images": pick(test_images, None,
                            CPU_BUDGET_TEST_IMAGES if recipe.cpu_max_steps is not None else None, "test_images"),
        "lr": float(lr if lr is not None else recipe.lr),
        "resize": int(resize if resize is not None else recipe.resize),
    }
    values.update(
        optimizer="SGD", momentum=0.0, nesterov=False, weight_decay=0.0, schedule="constant", loss="cross_entropy",
        label_smoothing=0.0, init="xavier_normal_" if spec.source == "zoo" else "model's own", autocast=None,
        channels_last=False,
        stages=[[values["resize"], values["epochs"]]],
        budget="cpu" if from_budget else "seed", from_cpu_budget=from_budget,
    )
    return values


def _cpu_values(spec: Any, *, epochs: int | None, lr: float | None, batch_size: int | None, resize: int | None,
                max_steps: int | None, test_images: int | None, device: torch.device) -> dict[str, Any]:
    cpu = spec.cpu_recipe
    target = int(resize if resize is not None else spec.recipe.resize)
    if epochs is not None:  # an explicit epoch count trains at the target size throughout
        stages = [[target, int(epochs)]]
    else:
        stages = [[target if fraction == 1.0 else _stage_size(spec, fraction, target), count]
                  for fraction, count in cpu.stages]
    zero_init = spec.family in ("resnet", "resnet_v2")  # their blocks have a residual branch to zero
    return {
        "name": "cpu", "epochs": math.ceil(sum(count for _, count in stages)), "stages": stages,
        "batch_size": int(batch_size if batch_size is not None else cpu.batch_size),
        "max_steps": max_steps,
        "test_images": test_images, "lr": float(lr if lr is not None else cpu.lr), "resize": target,
        "optimizer": cpu.optimizer, "momentum": 0.9 if cpu.optimizer == "SGD" else None,
        "nesterov": cpu.optimizer == "SGD", "weight_decay": cpu.weight_decay,
        "schedule": "one-cycle", "warmup": cpu.warmup, "loss": "cross_entropy",
        "label_smoothing": cpu.label_smoothing, "zero_init_residuals": zero_init,
        "init": cpu.init + (" + zero-init residuals" if zero_init else ""),
        "autocast": "bf16" if bf16_autocast_supported(device) else None,
        "channels_last": True, "budget": "recipe", "from_cpu_budget": [],
    }


def _stage_size(spec: Any, fraction: float, target: int) -> int:
    """`fraction` of the target size, a multiple of 8, at least 32 px (or the target), and one the model takes."""
    from exporter.models import InputShapeError, check_input_shape

    wanted = max(min(32, target), int(round(fraction * target / 8)) * 8)
    for size in range(wanted, target, 8):
        try:
            check_input_shape(spec.name, (spec.input_shape[0], size, size))
            return size
        except InputShapeError:
            continue
    return target


def bf16_autocast_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively here: AVX-512 BF16 or AMX on a CPU, bf16 support on a GPU."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    flags = set(cpu_flags())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_at(step: int, total: int, recipe: dict[str, Any]) -> float:
    """The learning rate of `step` (0-based) of `total`: constant for the seed recipe; for "one-cycle", a cosine
    warm-up from lr/20 to lr over the first `warmup` of the steps, then cosine annealing to lr/4000."""
    peak = recipe["lr"]
    if recipe["schedule"] != "one-cycle" or total <= 1:
        return peak
    warm = max(int(total * recipe["warmup"]), 1)
    start, end = peak / 20, peak / 4000
    if step < warm:
        return start + (peak - start) * (1 - math.cos(math.pi * step / warm)) / 2
    progress = (step - warm) / max(total - warm - 1, 1)
    return end + (peak - end) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


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


def check_batch_memory(input_shape: tuple[int, int, int], batch_size: int) -> None:
    """Refuse a batch whose float32 input alone would not fit in the memory available now."""
    available = available_memory_bytes()
    needed = batch_size * math.prod(input_shape) * 4
    if available is not None and needed > available:
        raise UsageError(
            f"one batch of {batch_size} images at {'×'.join(map(str, input_shape))} needs {needed / 2**30:.1f} GiB "
            f"as input alone, more than the {available / 2**30:.1f} GiB available; lower --batch-size or --resize"
        )
