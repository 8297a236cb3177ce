"""Training with the seeds' d2l recipe (`train_ch6`): Xavier-normal init, SGD without momentum, cross-entropy.

`train()` writes, under `<artifacts>/<model>/`:

- `checkpoint.safetensors` + `checkpoint.json`: the final weights (never a pickle) and a sidecar with the recipe
  actually used, the data set's name and digest, class names, accuracies, seed, versions, input shape and the
  weights' sha256. Both are written to temporary names and renamed, weights first; the sidecar's sha256 ties
  the pair together, so an interrupted run never leaves a checkpoint that loads half-trained as if final.
- `train_state/state.safetensors` + `state.json`: weights, optimizer and RNG state after every completed epoch,
  what `resume=True` continues from (same seed → the same result as an uninterrupted run).
- `training_curve.png`: loss, train and test accuracy per epoch, like the seeds' `Animator`.

Under `torchrun --nproc_per_node=N` the same call trains with DistributedDataParallel (gloo on CPU, nccl on
CUDA): each rank reads its shard (DistributedSampler), gradients are averaged, and only rank 0 writes.
`batch_size` stays the global batch (each rank takes batch_size / N), so the recipe's lr keeps its meaning.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from exporter.data import Dataset, load_split, to_model_tensor
from exporter.errors import ExporterError, UsageError
from exporter.fileio import atomic_write_bytes, atomic_write_json, sha256_file

CHECKPOINT_FORMAT = "exporter-checkpoint/1"
STATE_FORMAT = "exporter-train-state/1"
CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_SIDECAR = "checkpoint.json"
STATE_DIR = "train_state"
CURVE_NAME = "training_curve.png"
EVAL_BATCH = 256
# Recipe fields that must match for --resume to continue a run (epochs may grow: the schedule is constant).
RESUME_KEYS = ("lr", "batch_size", "max_steps", "resize", "test_images", "seed", "world_size")
CPU_BUDGET_TEST_IMAGES = 128  # test images evaluated per epoch under a step-capped CPU budget
TEST_SUBSET_SEED = 0  # which test images a --test-images subset holds (fixed, so runs compare)


class CheckpointError(ExporterError):
    """A checkpoint or training state that is missing, corrupt, or belongs to another model / input shape."""


# --- checkpoint files ----------------------------------------------------------------------------------------


def checkpoint_paths(model: str, artifacts_dir: Path = Path("artifacts")) -> tuple[Path, Path]:
    """(weights, sidecar) paths of a model's checkpoint: `<artifacts>/<model>/checkpoint.{safetensors,json}`."""
    directory = Path(artifacts_dir) / model
    return directory / CHECKPOINT_WEIGHTS, directory / CHECKPOINT_SIDECAR


def default_artifacts_dir() -> Path:
    """`$EXPORTER_ARTIFACTS` if set, else `artifacts` (relative to the working directory)."""
    return Path(os.environ.get("EXPORTER_ARTIFACTS") or "artifacts")


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically; returns its sha256."""
    from safetensors.torch import save

    # safetensors refuses shared or non-contiguous storage: give it independent contiguous copies.
    blob = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def _read_sidecar(path: Path, kind: str) -> dict:
    try:
        sidecar = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {kind} sidecar not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {kind} sidecar ({type(exc).__name__}: {exc})") from None
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{path}: {kind} sidecar is not a JSON object")
    return sidecar


def _load_tensors(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path}: sha256 {actual[:12]}… does not match its sidecar's {str(expected_sha256)[:12]}… "
                f"(corrupt, or weights and sidecar from different runs)"
            )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _check_state_dict(model_name: str, state: dict[str, torch.Tensor], sidecar: dict, where: Path) -> None:
    """The tensors must be exactly the state dict of `model_name` at the sidecar's channels / classes."""
    from exporter.models import create_model

    try:
        with torch.device("meta"):
            reference = create_model(model_name, in_channels=int(sidecar["in_channels"]),
                                     num_classes=int(sidecar["num_classes"])).state_dict()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: sidecar lacks a valid in_channels / num_classes ({exc})") from None
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{where}: tensors do not match model {model_name!r} ({detail})")
    for key, ref in reference.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(state[key].shape)}, model {model_name!r} expects {tuple(ref.shape)}"
            )


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a path that is either file of the pair or the model directory holding them."""
    path = Path(path)
    if path.is_dir():
        return path / CHECKPOINT_WEIGHTS, path / CHECKPOINT_SIDECAR
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path, path.with_suffix(".json")


def load_checkpoint(path: Path, *, expect_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint (weights file, sidecar or model directory) → (state_dict, sidecar).

    Checks the sidecar's format, the weights' sha256, the model name (`expect_model`) and that the tensors are
    exactly the model's state dict; any mismatch raises CheckpointError with one line saying which.
    """
    weights, sidecar_path = resolve_checkpoint(path)
    if not weights.exists() and not sidecar_path.exists():
        raise CheckpointError(f"{path}: no checkpoint there (train one with `exporter train MODEL`)")
    sidecar = _read_sidecar(sidecar_path, "checkpoint")
    if sidecar.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{sidecar_path}: not an exporter checkpoint (format {sidecar.get('format')!r})")
    model_name = sidecar.get("model")
    if expect_model is not None and model_name != expect_model:
        raise CheckpointError(f"{sidecar_path}: checkpoint is for model {model_name!r}, not {expect_model!r}")
    state = _load_tensors(weights, sidecar.get("weights_sha256"))
    _check_state_dict(str(model_name), state, sidecar, weights)
    return state, sidecar


def load_trained_model(path: Path, *, expect_model: str | None = None) -> tuple[nn.Module, dict]:
    """Build the checkpoint's model, load its weights and return it in eval() mode with the sidecar."""
    from exporter.models import create_model

    state, sidecar = load_checkpoint(path, expect_model=expect_model)
    model = create_model(sidecar["model"], in_channels=int(sidecar["in_channels"]),
                         num_classes=int(sidecar["num_classes"]))
    model.load_state_dict(state)
    return model.eval(), sidecar


# --- distributed helpers ---------------------------------------------------------------------------------------


class _Dist:
    """Rank / world size and collective helpers; a no-op world of one when not under torchrun."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = self.world_size > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        self.rank = dist.get_rank() if self.enabled else 0
        self.backend = dist.get_backend() if self.enabled else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        self.dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            self.dist.destroy_process_group()


# --- recipe ------------------------------------------------------------------------------------------------------


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
    for key in ("epochs", "batch_size", "resize"):
        value = values[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{key} must be a positive integer, got {value!r}")
    for key in ("max_steps", "test_images"):
        value = values[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UsageError(f"{key} must be a positive integer, got {value!r}")
    if not math.isfinite(values["lr"]) or values["lr"] <= 0:
        raise UsageError(f"lr must be a positive number, got {values['lr']!r}")
    values.update(
        optimizer="SGD", momentum=0.0, weight_decay=0.0, loss="cross_entropy", init="xavier_normal_",
        seed_recipe={"lr": recipe.lr, "batch_size": recipe.batch_size, "epochs": recipe.epochs,
                     "resize": recipe.resize, "source": recipe.source},
        budget="cpu" if from_budget else "seed",
        from_cpu_budget=from_budget,
    )
    return values


def _init_weights(module: nn.Module) -> None:
    # The seed's train_ch6: Xavier-normal weights for every Linear and Conv2d, biases left at PyTorch's default.
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for package in ("torchvision", "safetensors", "exporter"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[package] = md.version(package)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- training state (resume) -----------------------------------------------------------------------------------


def _state_paths(model_dir: Path) -> tuple[Path, Path]:
    return model_dir / STATE_DIR / "state.safetensors", model_dir / STATE_DIR / "state.json"


def _save_state(model_dir: Path, net: nn.Module, optimizer: torch.optim.Optimizer, rng_states: list[torch.Tensor],
                cuda_rng: list[torch.Tensor], meta: dict) -> None:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    opt = optimizer.state_dict()
    opt_state_keys: dict[str, list[str]] = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
                opt_state_keys.setdefault(str(index), []).append(key)
    for rank, state in enumerate(rng_states):
        tensors[f"rng.torch.{rank}"] = state
    for index, state in enumerate(cuda_rng):
        tensors[f"rng.cuda.{index}"] = state
    weights, sidecar = _state_paths(model_dir)
    meta = dict(meta, format=STATE_FORMAT, optimizer_param_groups=opt["param_groups"],
                optimizer_state_keys=opt_state_keys)
    meta["weights_sha256"] = _atomic_save_tensors(weights, tensors, {"format": STATE_FORMAT})
    atomic_write_json(sidecar, meta)


def _load_state(location: Path) -> tuple[dict[str, torch.Tensor], dict]:
    directory = location / STATE_DIR if (location / STATE_DIR).is_dir() else location
    weights, sidecar_path = directory / "state.safetensors", directory / "state.json"
    if not sidecar_path.exists():
        raise CheckpointError(f"nothing to resume: no training state in {directory} (run without --resume first)")
    meta = _read_sidecar(sidecar_path, "training-state")
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{sidecar_path}: not an exporter training state (format {meta.get('format')!r})")
    return _load_tensors(weights, meta.get("weights_sha256")), meta


def _check_resumable(meta: dict, expected: dict, where: Path) -> None:
    for key, label in (("model", "model"), ("input_shape", "input shape"), ("num_classes", "class count")):
        if meta.get(key) != expected[key]:
            raise CheckpointError(
                f"cannot resume from {where}: it was trained for {label} {meta.get(key)!r}, this run uses "
                f"{expected[key]!r}"
            )
    if meta.get("dataset", {}).get("digest") != expected["dataset"]["digest"]:
        raise CheckpointError(
            f"cannot resume from {where}: it was trained on {meta.get('dataset', {}).get('name')!r} with other "
            f"files (digest differs from {expected['dataset']['name']!r})"
        )
    for key in RESUME_KEYS:
        ours = expected["seed"] if key == "seed" else expected["world_size"] if key == "world_size" else \
            expected["recipe"][key]
        theirs = meta.get(key) if key in ("seed", "world_size") else meta.get("recipe", {}).get(key)
        if theirs != ours:
            raise CheckpointError(f"cannot resume from {where}: it used {key}={theirs!r}, this run {key}={ours!r}")


# --- the curve ---------------------------------------------------------------------------------------------------


def plot_curve(history: list[dict], points: list[dict], path: Path, title: str) -> None:
    """Loss, train accuracy (intra-epoch points) and test accuracy (per epoch) like d2l's Animator."""
    import io

    from matplotlib.figure import Figure  # a bare Figure renders with Agg; pyplot's global state is untouched

    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p["epoch"] for p in points]
    ax.plot(xs, [p["loss"] for p in points], "-", label="train loss")
    ax.plot(xs, [p["accuracy"] for p in points], "m--", label="train acc")
    ax.plot([h["epoch"] for h in history], [h["test_accuracy"] for h in history], "g-.o", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0, max([1.0] + xs))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


# --- the loop ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _thread_count(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if not isinstance(threads, int) or threads <= 0:
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_subset(size: int, limit: int | None) -> np.ndarray:
    """Indices of the test images evaluated: all of them, or a fixed seeded subset of `limit` (sorted)."""
    if limit is None or limit >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(TEST_SUBSET_SEED).permutation(size)[:limit])


def _evaluate(net: nn.Module, data: Dataset, subset: np.ndarray, input_shape: tuple[int, int, int],
              device: torch.device, dist: _Dist) -> float:
    """Accuracy on `subset` of the split; under DDP each rank takes every world_size-th image, counts are summed."""
    net.eval()
    index = subset[dist.rank::dist.world_size]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(index), EVAL_BATCH):
            batch = index[start:start + EVAL_BATCH]
            x = to_model_tensor(data.images[batch], input_shape).to(device)
            y = torch.from_numpy(data.labels[batch]).to(device)
            correct += int((net(x).argmax(dim=1) == y).sum())
    total_correct, total = dist.sum([float(correct), float(len(index))], device)
    return total_correct / max(total, 1.0)


def train(
    model: str,
    *,
    data: str | Path | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    resize: int | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    resume: bool | str | Path = False,
    artifacts_dir: Path = Path("artifacts"),
    progress: bool = True,
    cpu_budget: bool = True,
    in_channels: int | None = None,
    device: str | None = None,
    test_images: int | None = None,
    log=None,
) -> dict:
    """Train `model` with the seed's recipe (overrides win) and write its checkpoint; returns the JSON summary.

    `resume=True` continues from `<artifacts>/<model>/train_state` (a path continues from that directory);
    `cpu_budget` uses the spec's smaller CPU epochs / steps / batch when on a CPU and not overridden.
    `test_images` evaluates accuracy on a fixed subset of that many test images (default: all, or
    CPU_BUDGET_TEST_IMAGES under a step-capped CPU budget).
    `log` is a callable for the human-readable lines (default: print to stderr on rank 0).
    """
    from exporter.models import check_input_shape, get_spec

    spec = get_spec(model)
    started = time.perf_counter()
    run_device = torch.device(device) if device else torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if run_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if run_device.type == "cuda" and run_device.index is None:
        run_device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    if run_device.type == "cuda" and run_device.index >= torch.cuda.device_count():
        raise UsageError(f"process {run_device.index} has no GPU ({torch.cuda.device_count()} visible); "
                         f"start fewer processes or use --device cpu")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    recipe = resolve_recipe(model, device=run_device, epochs=epochs, lr=lr, batch_size=batch_size, resize=resize,
                            max_steps=max_steps, cpu_budget=cpu_budget, test_images=test_images)
    train_data = load_split(data, "train")
    test_data = load_split(data, "test")
    channels = in_channels if in_channels is not None else spec.input_shape[0]
    if train_data.channels == 3 and channels == 1 and in_channels is None:
        channels = 3  # colour data: build the model with 3 input channels rather than fail
    input_shape = (int(channels), recipe["resize"], recipe["resize"])
    check_input_shape(model, input_shape)
    num_classes = train_data.num_classes
    artifacts_dir = Path(artifacts_dir)
    model_dir = artifacts_dir / model
    weights_path, sidecar_path = checkpoint_paths(model, artifacts_dir)
    curve_path = model_dir / CURVE_NAME

    cuda_devices = [run_device.index or 0] if run_device.type == "cuda" else []
    if run_device.type == "cuda":
        torch.cuda.set_device(run_device)  # NCCL collectives (all_gather_object) use the current device
    with _thread_count(threads), torch.random.fork_rng(devices=cuda_devices):
        dist = _Dist(run_device)
        try:
            return _train_loop(
                model=model, spec=spec, started=started, run_device=run_device, recipe=recipe,
                train_data=train_data, test_data=test_data, input_shape=input_shape, num_classes=num_classes,
                model_dir=model_dir, weights_path=weights_path, sidecar_path=sidecar_path, curve_path=curve_path,
                seed=seed, resume=resume, progress=progress, dist=dist, log=log, data=data)
        finally:
            dist.close()


def _train_loop(*, model, spec, started, run_device, recipe, train_data, test_data, input_shape, num_classes,
                model_dir, weights_path, sidecar_path, curve_path, seed, resume, progress, dist, log,
                data) -> dict:
    from torch.utils.data import DistributedSampler

    from exporter.models import create_model

    say = log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    if not dist.is_main:
        say = lambda line: None  # noqa: E731
    world = dist.world_size
    if recipe["batch_size"] % world:
        raise UsageError(f"batch size {recipe['batch_size']} does not split over {world} processes; "
                         f"pick a multiple of {world}")
    per_rank_batch = recipe["batch_size"] // world
    test_index = test_subset(len(test_data), recipe["test_images"])
    dataset_info = {"name": train_data.name, "digest": train_data.digest, "source": train_data.source,
                    "train_examples": len(train_data), "test_examples": len(test_data),
                    "test_examples_evaluated": len(test_index)}
    identity = {"model": model, "input_shape": list(input_shape), "num_classes": num_classes,
                "dataset": dataset_info, "seed": seed, "world_size": world, "recipe": recipe}

    torch.manual_seed(seed)  # the init draws from the global generator (as the seed's net.apply did)
    net = create_model(model, in_channels=input_shape[0], num_classes=num_classes)
    net.apply(_init_weights)
    net.to(run_device)
    optimizer = torch.optim.SGD(net.parameters(), lr=recipe["lr"])
    criterion = nn.CrossEntropyLoss()

    start_epoch, steps, history, points, elapsed_train, examples_seen = 0, 0, [], [], 0.0, 0
    resumed_from = None
    if resume:
        location = model_dir if resume is True else Path(resume)
        tensors, meta = _load_state(location)
        _check_resumable(meta, identity, location)
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"cannot resume from {location}: weights do not fit ({str(exc).splitlines()[0]})") \
                from None
        opt_state = {"state": {}, "param_groups": meta["optimizer_param_groups"]}
        for index, keys in meta.get("optimizer_state_keys", {}).items():
            opt_state["state"][int(index)] = {key: tensors[f"optim.{index}.{key}"] for key in keys}
        optimizer.load_state_dict(opt_state)
        rng = tensors.get(f"rng.torch.{dist.rank}")
        if rng is not None:
            torch.set_rng_state(rng)
        if run_device.type == "cuda" and f"rng.cuda.{dist.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{dist.rank}"], run_device)
        start_epoch, steps = int(meta["epoch"]), int(meta["steps"])
        history, points = list(meta["history"]), list(meta["points"])
        elapsed_train, examples_seen = float(meta["train_seconds"]), int(meta["train_examples_seen"])
        resumed_from = start_epoch
        say(f"resuming {model} from epoch {start_epoch} ({location})")
    else:
        # Dropout draws from the global generator: one stream per rank, reproducible from the seed.
        torch.manual_seed(seed + dist.rank)

    if dist.enabled:
        ddp_net = nn.parallel.DistributedDataParallel(
            net, device_ids=[run_device.index] if run_device.type == "cuda" else None)
    else:
        ddp_net = net

    if recipe["budget"] == "cpu":
        say(f"{model}: using the CPU budget ({', '.join(f'{k}={recipe[k]}' for k in recipe['from_cpu_budget'])}) "
            f"instead of the full recipe (epochs={spec.recipe.epochs}, batch_size={spec.recipe.batch_size}); "
            f"override with --epochs/--batch-size/--max-steps")
    evaluated = "" if len(test_index) == len(test_data) else f", accuracy on {len(test_index)} of them"
    say(f"training {model} on {train_data.name} ({len(train_data)} train / {len(test_data)} test{evaluated}, "
        f"{'×'.join(map(str, input_shape))}) on {run_device}"
        + (f" × {world} processes ({dist.backend})" if dist.enabled else "")
        + f": lr={recipe['lr']} batch={recipe['batch_size']} epochs={recipe['epochs']}"
        + (f" max_steps={recipe['max_steps']}" if recipe["max_steps"] else ""))

    from tqdm import tqdm

    sampler = DistributedSampler(range(len(train_data)), num_replicas=world, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    max_steps = recipe["max_steps"]
    for epoch in range(start_epoch, recipe["epochs"]):
        if max_steps is not None and steps >= max_steps:
            break
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        batches = [order[i:i + per_rank_batch] for i in range(0, len(order), per_rank_batch)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()  # BatchNorm cannot train on a batch of one; the seed's loader never produced one here
        if max_steps is not None:
            batches = batches[:max_steps - steps]
        report_every = max(len(batches) // 5, 1)
        ddp_net.train()
        loss_sum = correct = count = 0.0
        epoch_time = 0.0
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{recipe['epochs']}", unit="batch",
                   disable=not (progress and dist.is_main), file=sys.stderr, leave=True, dynamic_ncols=True)
        for i, batch in enumerate(batches):
            tick = time.perf_counter()
            x = to_model_tensor(train_data.images[batch], input_shape).to(run_device, non_blocking=True)
            y = torch.from_numpy(train_data.labels[batch]).to(run_device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = ddp_net(x)
            loss = criterion(logits, y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += float(loss) * len(batch)
                correct += float((logits.argmax(dim=1) == y).sum())
                count += len(batch)
            epoch_time += time.perf_counter() - tick
            steps += 1
            if (i + 1) % report_every == 0 or i == len(batches) - 1:
                g_loss, g_correct, g_count = dist.sum([loss_sum, correct, count], run_device)
                points.append({"epoch": epoch + (i + 1) / len(batches), "loss": g_loss / g_count,
                               "accuracy": g_correct / g_count})
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}",
                            ex_s=f"{count * world / max(epoch_time, 1e-9):.0f}", refresh=False)
            bar.update(1)
        bar.close()
        g_loss, g_correct, g_count = dist.sum([loss_sum, correct, count], run_device)
        if dist.enabled:
            # BatchNorm running stats drift apart per rank after the last step; evaluate (and save) rank 0's.
            for buffer in net.buffers():
                dist.dist.broadcast(buffer, src=0)
        test_acc = _evaluate(net, test_data, test_index, input_shape, run_device, dist)
        epoch_time = max(dist.sum([epoch_time], run_device)[0] / world, 1e-9)
        elapsed_train += epoch_time
        examples_seen += int(g_count)
        history.append({"epoch": epoch + 1, "steps": steps, "train_loss": g_loss / g_count,
                        "train_accuracy": g_correct / g_count, "test_accuracy": test_acc,
                        "examples_per_s": g_count / epoch_time, "train_seconds": epoch_time})
        say(f"epoch {epoch + 1}: loss {g_loss / g_count:.3f}, train acc {g_correct / g_count:.3f}, "
            f"test acc {test_acc:.3f}, {g_count / epoch_time:.1f} examples/s")
        rng_states = dist.gather_objects(torch.get_rng_state())
        cuda_rng = dist.gather_objects(torch.cuda.get_rng_state(run_device)) if run_device.type == "cuda" else []
        if dist.is_main:
            _save_state(model_dir, net, optimizer, rng_states, cuda_rng, dict(
                identity, epoch=epoch + 1, steps=steps, history=history, points=points,
                train_seconds=elapsed_train, train_examples_seen=examples_seen, saved=_now()))
        dist.barrier()

    if not history:
        raise CheckpointError(f"{model}: nothing trained (max_steps {max_steps} already reached at resume)")
    last = history[-1]
    summary = {
        "model": model,
        "dataset": train_data.name,
        "dataset_digest": train_data.digest,
        "data": None if data is None else str(data),
        "epochs": last["epoch"],
        "steps": steps,
        "train_examples_seen": examples_seen,
        "input_shape": list(input_shape),
        "lr": recipe["lr"],
        "batch_size": recipe["batch_size"],
        "max_steps": recipe["max_steps"],
        "budget": recipe["budget"],
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "test_accuracy": last["test_accuracy"],
        "test_examples": len(test_index),
        "examples_per_s": examples_seen / max(elapsed_train, 1e-9),
        "train_seconds": elapsed_train,
        "seconds": time.perf_counter() - started,
        "device": str(run_device),
        "world_size": world,
        "rank": dist.rank,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "resumed_from_epoch": resumed_from,
        "checkpoint": str(weights_path),
        "sidecar": str(sidecar_path),
        "curve": str(curve_path),
    }
    if dist.is_main:
        sidecar = {
            "format": CHECKPOINT_FORMAT,
            "model": model,
            "family": spec.family,
            "num_classes": num_classes,
            "in_channels": input_shape[0],
            "input_shape": list(input_shape),
            "input_scaling": spec.input_scaling,
            "class_names": train_data.class_names,
            "dataset": dataset_info,
            "recipe": recipe,
            "seed": seed,
            "epoch": last["epoch"],
            "steps": steps,
            "train_loss": last["train_loss"],
            "train_accuracy": last["train_accuracy"],
            "test_accuracy": last["test_accuracy"],
            "examples_per_s": summary["examples_per_s"],
            "train_seconds": elapsed_train,
            "history": history,
            "device": str(run_device),
            "world_size": world,
            "threads": summary["threads"],
            "versions": _versions(),
            "created": _now(),
            "weights_file": weights_path.name,
        }
        metadata = {"format": CHECKPOINT_FORMAT, "model": model, "input_shape": json.dumps(list(input_shape)),
                    "num_classes": str(num_classes)}
        plot_curve(history, points, curve_path,
                   f"{model} on {train_data.name}: test acc {last['test_accuracy']:.3f} after {last['epoch']} epoch(s)")
        # Weights first, then the sidecar that names their sha256: a crash in between leaves a pair that
        # load_checkpoint rejects, never stale weights passing as the new run.
        sidecar["weights_sha256"] = _atomic_save_tensors(weights_path, net.state_dict(), metadata)
        atomic_write_json(sidecar_path, sidecar)
        say(f"{model}: test acc {last['test_accuracy']:.3f}, train acc {last['train_accuracy']:.3f} after "
            f"{last['epoch']} epoch(s) / {steps} steps, {summary['examples_per_s']:.1f} examples/s, "
            f"{summary['seconds']:.1f} s → {weights_path}")
    dist.barrier()
    return summary
