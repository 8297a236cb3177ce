"""Training with the seeds' d2l recipe (`train_ch6`): Xavier-normal init, SGD without momentum, cross-entropy.

`train()` writes, under `<artifacts>/<model>/`:

- `checkpoint.safetensors` + `checkpoint.json`: the final weights (never a pickle) and a sidecar with the recipe
  actually used, the data set's name and digest, class names, accuracies, seed, versions, input shape and the
  weights' sha256. `exporter.checkpoint.write_checkpoint` switches the pair so that a crash never leaves the
  model without a complete one, keeps the replaced pair as `checkpoint.prev.*`, and keeps a better-scoring
  checkpoint unless `force` (this run's pair is then `checkpoint.rejected.*`).
- `train_state/state.safetensors` + `state.json`: weights, optimizer and RNG state after every completed epoch,
  what `resume=True` continues from (same seed → the same result as an uninterrupted run).
- `training_curve.png`: loss, train and test accuracy per epoch, like the seeds' `Animator`.

Every input is checked before the first step (recipe bounds, threads, data channels and labels, a writable
output directory), so a bad run fails in one line instead of after an epoch. SIGTERM ends the run with one line
saying which epoch is saved, and exit code 143.

Under `torchrun --nproc_per_node=N` the same call trains with DistributedDataParallel (gloo on CPU, nccl on
CUDA): each rank reads its shard (DistributedSampler), gradients are averaged, and only rank 0 writes.
`batch_size` stays the global batch (each rank takes batch_size / N), so the recipe's lr keeps its meaning.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from exporter import paths
from exporter.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointWrite,
    check_resumable,
    load_state,
    optimizer_state,
    save_state,
    write_checkpoint,
)
from exporter.data import Dataset, check_channels, load_split
from exporter.errors import UsageError
from exporter.evaluation import accuracy, test_subset
from exporter.fileio import atomic_write_bytes
from exporter.machine import available_memory_bytes, library_versions
from exporter.recipe import (
    check_batch_memory,
    check_seed,
    check_threads,
    lr_at,
    resolve_recipe,
)
from exporter.training_runtime import (
    Dist,
    ResizedImages,
    SigtermGuard,
    Throughput,
    pick_device,
    reused_heap,
    thread_count,
)

CURVE_NAME = "training_curve.png"
EPOCH_TEST_IMAGES = 256  # test images evaluated after an epoch that is not the last (CPU recipe)


# --- helpers -----------------------------------------------------------------------------------------------------


INITS = ("xavier_normal_", "kaiming_normal_", "model's own")


def _init_weights(net: nn.Module, init: str) -> None:
    """The seed's train_ch6: Xavier-normal weights for every Linear and Conv2d, biases left at PyTorch's default.

    "kaiming_normal_" (fan-in, ReLU gain) instead keeps the signal's variance through deep ReLU stacks without
    BatchNorm, where Xavier's halves it at every layer; "model's own" keeps the library's init (model sources)."""
    if init == "model's own":
        return
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if init.startswith("kaiming_normal_"):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                nn.init.xavier_normal_(module.weight)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- curve and evaluation ----------------------------------------------------------------------------------------


def plot_curve(history: list[dict], points: list[dict], path: Path, title: str) -> None:
    """Loss, train accuracy (intra-epoch points) and test accuracy (per epoch) like d2l's Animator."""
    from matplotlib.figure import (
        Figure,  # a bare Figure renders with Agg; pyplot's global state is untouched
    )

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


# --- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """One training run: model, recipe, data, device and process group, driven by `run()` through named steps."""

    model: str
    recipe: dict[str, Any]
    train_data: Dataset
    test_data: Dataset
    input_shape: tuple[int, int, int]
    device: torch.device
    dist: Dist
    seed: int
    model_dir: Path
    data_arg: str | Path | None
    say: Callable[[str], None]
    guard: SigtermGuard
    progress: bool = True
    force: bool = False
    started: float = field(default_factory=time.perf_counter)
    heap_reused: bool = False  # see training_runtime.reused_heap
    # Run state, filled by setup() / resume() / run_epoch().
    start_epoch: int = 0
    steps: int = 0
    history: list[dict] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    examples_seen: int = 0
    resumed_from: int | None = None
    written: CheckpointWrite | None = None

    @property
    def world(self) -> int:
        """Processes training together (1 outside torchrun)."""
        return self.dist.world_size

    @property
    def dataset_info(self) -> dict[str, Any]:
        """The data set as the checkpoint and the training state record it."""
        return {"name": self.train_data.name, "digest": self.train_data.digest, "source": self.train_data.source,
                "train_examples": len(self.train_data), "test_examples": len(self.test_data),
                "test_examples_evaluated": len(self.test_index)}

    @property
    def identity(self) -> dict[str, Any]:
        """What a saved state must match to be resumed (see `check_resumable`)."""
        return {"model": self.model, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "dataset": self.dataset_info, "seed": self.seed, "world_size": self.world, "recipe": self.recipe}

    def run(self, resume: bool | str | Path) -> dict:
        """Train from scratch or from a saved state, write the checkpoint, return the summary."""
        self.setup()
        if resume:
            self.resume(self.model_dir if resume is True else Path(resume))
        else:
            # Dropout draws from the global generator: one stream per rank, reproducible from the seed.
            torch.manual_seed(self.seed + self.dist.rank)
        self.wrap_for_ddp()
        self.announce()
        max_steps = self.recipe["max_steps"]
        for epoch in range(self.start_epoch, self.recipe["epochs"]):
            if self.steps >= self.total_steps:
                break
            self.run_epoch(epoch)
        if not self.history:
            raise CheckpointError(f"{self.model}: nothing trained (max_steps {max_steps} already reached at resume)")
        self.speed = self.throughput.report(self.train_seconds, "bf16" if self.recipe["autocast"] else "fp32",
                                            self.device) if self.dist.is_main else {}
        self.write_checkpoint()
        summary = self.summary()
        self.finish(summary)
        return summary

    def setup(self) -> None:
        """Model (seeded Xavier init), optimizer, loss, sampler, the evaluated test subset and the images."""
        from exporter.models import create_model

        if self.recipe["batch_size"] % self.world:
            raise UsageError(f"batch size {self.recipe['batch_size']} does not split over {self.world} processes; "
                             f"pick a multiple of {self.world}")
        self.per_rank_batch = self.recipe["batch_size"] // self.world
        self.num_classes = self.train_data.num_classes
        self.test_index = test_subset(len(self.test_data), self.recipe["test_images"])
        torch.manual_seed(self.seed)  # the init draws from the global generator (as the seed's net.apply did)
        self.net = create_model(self.model, in_channels=self.input_shape[0], num_classes=self.num_classes)
        _init_weights(self.net, self.recipe.get("init", "xavier_normal_"))
        if self.recipe.get("zero_init_residuals") and hasattr(self.net, "zero_init_residuals"):
            self.net.zero_init_residuals()
        self.net.to(self.device, memory_format=torch.channels_last if self.recipe["channels_last"]
                    else torch.preserve_format)
        self.ddp_net: nn.Module = self.net
        decayed = [p for p in self.net.parameters() if p.ndim > 1]  # no weight decay on biases and norms
        rest = [p for p in self.net.parameters() if p.ndim <= 1]
        groups = [{"params": decayed, "weight_decay": self.recipe["weight_decay"]},
                  {"params": rest, "weight_decay": 0.0}]
        # One fused kernel per step instead of a chain of foreach ops: vgg11's AdamW step (129 M parameters, 2 idle
        # cores) 409 → 85 ms, resnet50's SGD step 46 → 17 ms (bench/results/README.md, seventh session).
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        if self.recipe["optimizer"] == "AdamW":  # the CPU recipe of the nets without BatchNorm
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=self.recipe["lr"], **fused)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.recipe["lr"], momentum=self.recipe["momentum"],
                                             nesterov=self.recipe["nesterov"], **fused)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.recipe["label_smoothing"])
        self.sampler = DistributedSampler(range(len(self.train_data)), num_replicas=self.world,
                                          rank=self.dist.rank, shuffle=True, seed=self.seed, drop_last=False)
        self.images = ResizedImages(self.train_data.images, self.input_shape[0], available_memory_bytes())
        self.throughput = Throughput(self.model, self.input_shape[0], self.num_classes)
        per_epoch = len(self.epoch_batches(0, capped=False))
        planned = sum(count for _, count in self.recipe["stages"])  # a last stage may be a fraction of an epoch
        self.total_steps = max(int(round(per_epoch * planned)), 1)
        if self.recipe["max_steps"] is not None:
            self.total_steps = min(self.total_steps, self.recipe["max_steps"])

    def stage_size(self, step: int) -> int:
        """The input size step `step` trains at. Progressive resizing: the recipe's stages, in order, each over its
        share of the run's steps (so a run cut short by max_steps still ends at the full size)."""
        stages = self.recipe["stages"]
        total_epochs = sum(count for _, count in stages)
        position = (step + 0.5) / max(self.total_steps, 1) * total_epochs
        end = 0
        for size, count in stages:
            end += count
            if position < end:
                return int(size)
        return int(stages[-1][0])

    def resume(self, location: Path) -> None:
        """Weights, optimizer, RNG and history from the state in `location`; refuses a state past --epochs."""
        tensors, meta = load_state(location)
        check_resumable(meta, self.identity, location)
        saved_epoch = int(meta["epoch"])
        if saved_epoch > self.recipe["epochs"]:
            raise UsageError(f"cannot resume: the training state in {location} is at epoch {saved_epoch}, past "
                             f"--epochs {self.recipe['epochs']}; pass --epochs {saved_epoch} or more to continue, "
                             f"or drop --resume to start over")
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.net.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"cannot resume from {location}: weights do not fit "
                                  f"({str(exc).splitlines()[0]})") from None
        self.optimizer.load_state_dict(optimizer_state(tensors, meta))
        rank = self.dist.rank
        if f"rng.torch.{rank}" in tensors:
            torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        if self.device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], self.device)
        self.start_epoch, self.steps = saved_epoch, int(meta["steps"])
        self.history, self.points = list(meta["history"]), list(meta["points"])
        self.train_seconds, self.examples_seen = float(meta["train_seconds"]), int(meta["train_examples_seen"])
        self.resumed_from = self.guard.last_epoch = saved_epoch
        self.say(f"resuming {self.model} from epoch {saved_epoch} ({location})")

    def wrap_for_ddp(self) -> None:
        """Under torchrun, train through DistributedDataParallel (gradients averaged over the ranks)."""
        if self.dist.enabled:
            self.ddp_net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def announce(self) -> None:
        """The run's first lines: the CPU budget when it applies, then data, shape, device and recipe."""
        from exporter.models import get_spec

        recipe, spec_recipe = self.recipe, get_spec(self.model).recipe
        if recipe["budget"] == "cpu":
            self.say(f"{self.model}: using the CPU budget "
                     f"({', '.join(f'{k}={recipe[k]}' for k in recipe['from_cpu_budget'])}) instead of the full "
                     f"recipe (epochs={spec_recipe.epochs}, batch_size={spec_recipe.batch_size}); "
                     f"override with --epochs/--batch-size/--max-steps")
        evaluated = "" if len(self.test_index) == len(self.test_data) else \
            f", accuracy on {len(self.test_index)} of them"
        self.say(f"training {self.model} on {self.train_data.name} ({len(self.train_data)} train / "
                 f"{len(self.test_data)} test{evaluated}, {'×'.join(map(str, self.input_shape))}) on {self.device}"
                 + (f" × {self.world} processes ({self.dist.backend})" if self.dist.enabled else "")
                 + f": {recipe['name']} recipe, lr={recipe['lr']} batch={recipe['batch_size']} "
                 + f"epochs={recipe['epochs']}" + (f" max_steps={recipe['max_steps']}" if recipe["max_steps"] else "")
                 + (f", sizes {' → '.join(f'{size}px×{count}' for size, count in recipe['stages'])}, "
                    f"{recipe['optimizer']}" + (f" momentum {recipe['momentum']}" if recipe.get("momentum") else "")
                    + f", {recipe['schedule']} lr, "
                    f"autocast {recipe['autocast'] or 'off (fp32)'}" if recipe["name"] == "cpu" else ""))

    def epoch_batches(self, epoch: int, *, capped: bool = True) -> list[np.ndarray]:
        """This rank's shuffled batches of `epoch`, cut at max_steps."""
        self.sampler.set_epoch(epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        size = self.per_rank_batch
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()  # BatchNorm cannot train on a batch of one; the seed's loader never produced one here
        if capped:
            batches = batches[:self.total_steps - self.steps]
        return batches

    def train_step(self, batch: np.ndarray, size: int) -> tuple[float, float]:
        """One SGD step on `batch` at size×size, at the schedule's learning rate; returns (summed loss, correct)."""
        x = self.images.batch(batch, size, channels_last=self.recipe["channels_last"]).to(self.device,
                                                                                        non_blocking=True)
        y = torch.from_numpy(self.train_data.labels[batch]).to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.steps, self.total_steps, self.recipe)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe["autocast"] == "bf16"):
            logits = self.ddp_net(x)
        loss = self.criterion(logits.float(), y)  # fp32 loss; the master weights stay fp32 too
        loss.backward()
        self.optimizer.step()
        self.throughput.add(len(batch) * self.world, size)
        with torch.no_grad():
            return float(loss) * len(batch), float((logits.argmax(dim=1) == y).sum())

    def run_epoch(self, epoch: int) -> None:
        """Train one epoch (progress bar, intra-epoch curve points), then evaluate and save the state."""
        batches = self.epoch_batches(epoch)
        report_every = max(len(batches) // 5, 1)
        self.ddp_net.train()
        loss_sum = correct = count = epoch_time = 0.0
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{self.recipe['epochs']}", unit="batch",
                   disable=not (self.progress and self.dist.is_main), file=sys.stderr, leave=True,
                   dynamic_ncols=True)
        for i, batch in enumerate(batches):
            tick = time.perf_counter()
            batch_loss, batch_correct = self.train_step(batch, self.stage_size(self.steps))
            loss_sum, correct, count = loss_sum + batch_loss, correct + batch_correct, count + len(batch)
            epoch_time += time.perf_counter() - tick
            self.steps += 1
            if (i + 1) % report_every == 0 or i == len(batches) - 1:
                g_loss, g_correct, g_count = self.dist.sum([loss_sum, correct, count], self.device)
                self.points.append({"epoch": epoch + (i + 1) / len(batches), "loss": g_loss / g_count,
                                    "accuracy": g_correct / g_count})
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}",
                            ex_s=f"{count * self.world / max(epoch_time, 1e-9):.0f}", refresh=False)
            bar.update(1)
        bar.close()
        self.end_epoch(epoch, loss_sum, correct, count, epoch_time)

    def end_epoch(self, epoch: int, loss_sum: float, correct: float, count: float, epoch_time: float) -> None:
        """Sum the ranks' counts, evaluate, record the epoch, log it and save the state."""
        g_loss, g_correct, g_count = self.dist.sum([loss_sum, correct, count], self.device)
        if self.dist.enabled:
            # BatchNorm running stats drift apart per rank after the last step; evaluate (and save) rank 0's.
            for buffer in self.net.buffers():
                self.dist.dist.broadcast(buffer, src=0)
        final = epoch + 1 >= self.recipe["epochs"] or self.steps >= self.total_steps
        test_acc = self.evaluate(final)
        self.throughput.sample_load()
        epoch_time = max(self.dist.sum([epoch_time], self.device)[0] / self.world, 1e-9)
        self.train_seconds += epoch_time
        self.examples_seen += int(g_count)
        self.history.append({"epoch": epoch + 1, "steps": self.steps, "train_loss": g_loss / g_count,
                             "train_accuracy": g_correct / g_count, "test_accuracy": test_acc,
                             "test_images": len(self.test_index) if final or self.recipe["name"] != "cpu"
                             else min(len(self.test_index), EPOCH_TEST_IMAGES),
                             "input_size": self.stage_size(self.steps - 1),
                             "examples_per_s": g_count / epoch_time, "train_seconds": epoch_time})
        self.say(f"epoch {epoch + 1}: loss {g_loss / g_count:.3f}, train acc {g_correct / g_count:.3f}, "
                 f"test acc {test_acc:.3f}, {g_count / epoch_time:.1f} examples/s")
        self.save_state(epoch + 1)

    def evaluate(self, final: bool = True) -> float:
        """Test accuracy (summed over ranks): the final epoch on every evaluated test image in fp32 at the full size
        (what the checkpoint scores); earlier epochs of the CPU recipe on a fixed seeded EPOCH_TEST_IMAGES of them
        at the size they train at, in the training's autocast precision (a progress signal that costs little)."""
        if final or self.recipe["name"] != "cpu":
            return accuracy(self.net, self.test_data, self.test_index, self.input_shape, self.device, self.dist)
        size = self.stage_size(self.steps - 1)  # the size it trains at now (BatchNorm's statistics are for it)
        # a seeded sample, not the first images: digits5k's test split is sorted by class (the first 256: 0, 1, 2)
        signal = self.test_index[test_subset(len(self.test_index), EPOCH_TEST_IMAGES)]
        return accuracy(self.net, self.test_data, signal,
                        (self.input_shape[0], size, size), self.device, self.dist, autocast=self.recipe["autocast"])

    def save_state(self, epoch: int) -> None:
        """Weights, optimizer and every rank's RNG after `epoch`, what --resume continues from."""
        rng_states = self.dist.gather_objects(torch.get_rng_state())
        cuda_rng = self.dist.gather_objects(torch.cuda.get_rng_state(self.device)) \
            if self.device.type == "cuda" else []
        with self.guard.writing():
            if self.dist.is_main:
                save_state(self.guard.state_dir, self.net, self.optimizer, rng_states, cuda_rng, dict(
                    self.identity, epoch=epoch, steps=self.steps, history=self.history, points=self.points,
                    train_seconds=self.train_seconds, train_examples_seen=self.examples_seen, saved=_now()))
            self.guard.last_epoch = epoch
        self.dist.barrier()

    def write_checkpoint(self) -> None:
        """Rank 0: the curve, then the checkpoint pair (kept, written or replaced; see `write_checkpoint`)."""
        if not self.dist.is_main:
            return
        last = self.history[-1]
        plot_curve(self.history, self.points, self.model_dir / CURVE_NAME,
                   f"{self.model} on {self.train_data.name}: test acc {last['test_accuracy']:.3f} after "
                   f"{last['epoch']} epoch(s)")
        metadata = {"format": CHECKPOINT_FORMAT, "model": self.model, "input_shape": json.dumps(list(self.input_shape)),
                    "num_classes": str(self.num_classes)}
        with self.guard.writing():
            self.written = write_checkpoint(self.model_dir, self.net.state_dict(), self.checkpoint_sidecar(),
                                            metadata, force=self.force)

    def checkpoint_sidecar(self) -> dict[str, Any]:
        """The checkpoint's JSON sidecar (the timestamp lives here, never in the weights file)."""
        from exporter.models import get_spec

        spec, last = get_spec(self.model), self.history[-1]
        return {
            "format": CHECKPOINT_FORMAT, "model": self.model, "family": spec.family,
            "num_classes": self.num_classes, "in_channels": self.input_shape[0],
            "input_shape": list(self.input_shape), "input_scaling": spec.input_scaling,
            "class_names": self.train_data.class_names, "dataset": self.dataset_info, "recipe": self.recipe,
            "seed": self.seed, "epoch": last["epoch"], "steps": self.steps,
            "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"],
            "test_accuracy": last["test_accuracy"], "examples_per_s": self.examples_per_s,
            "train_seconds": self.train_seconds, "history": self.history, "device": str(self.device),
            "world_size": self.world, "threads": torch.get_num_threads(), "versions": library_versions(),
            "speed": self.speed, "created": _now(),
        }

    @property
    def examples_per_s(self) -> float:
        """Training throughput over every epoch so far (resumed ones included)."""
        return self.examples_seen / max(self.train_seconds, 1e-9)

    def summary(self) -> dict[str, Any]:
        """The run's JSON summary (`exporter train --json`)."""
        last = self.history[-1]
        weights, sidecar = paths.checkpoint_paths(self.model, self.model_dir.parent)
        if self.written is not None:
            weights, sidecar = self.written.weights, self.written.sidecar
        return {
            "model": self.model, "dataset": self.train_data.name, "dataset_digest": self.train_data.digest,
            "data": None if self.data_arg is None else str(self.data_arg), "epochs": last["epoch"],
            "steps": self.steps, "train_examples_seen": self.examples_seen, "input_shape": list(self.input_shape),
            "lr": self.recipe["lr"], "batch_size": self.recipe["batch_size"], "max_steps": self.recipe["max_steps"],
            "recipe": self.recipe["name"], "stages": self.recipe["stages"], "autocast": self.recipe["autocast"],
            "budget": self.recipe["budget"], "train_loss": last["train_loss"], **self.speed,
            "train_accuracy": last["train_accuracy"], "test_accuracy": last["test_accuracy"],
            "test_examples": len(self.test_index), "examples_per_s": self.examples_per_s,
            "train_seconds": self.train_seconds, "seconds": time.perf_counter() - self.started,
            "device": str(self.device), "world_size": self.world, "rank": self.dist.rank,
            "threads": torch.get_num_threads(), "heap_reused": self.heap_reused, "seed": self.seed,
            "resumed_from_epoch": self.resumed_from,
            "checkpoint": str(weights), "sidecar": str(sidecar),
            "checkpoint_action": None if self.written is None else self.written.action,
            "curve": str(self.model_dir / CURVE_NAME),
        }

    def finish(self, summary: dict[str, Any]) -> None:
        """The closing line (accuracy, speed and what happened to the checkpoint), then wait for every rank."""
        if self.written is not None:
            self.say(f"{self.model}: test acc {summary['test_accuracy']:.3f}, train acc "
                     f"{summary['train_accuracy']:.3f} after {summary['epochs']} epoch(s) / {self.steps} steps, "
                     f"{self.examples_per_s:.1f} examples/s, {summary['seconds']:.1f} s {self.written.describe()}")
        self.dist.barrier()


def _input_shape(model: str, train_data: Dataset, test_data: Dataset, in_channels: int | None,
                 resize: int) -> tuple[int, int, int]:
    """(C, H, W) the model trains at; colour data into fewer than 3 channels is refused here, before any output."""
    from exporter.models import check_input_shape, get_spec

    channels = in_channels if in_channels is not None else get_spec(model).input_shape[0]
    if train_data.channels == 3 and channels == 1 and in_channels is None:
        channels = 3  # colour data: build the model with 3 input channels rather than fail
    for split in (train_data, test_data):
        check_channels(split, channels)
    input_shape = (int(channels), resize, resize)
    check_input_shape(model, input_shape)
    return input_shape


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
    artifacts_dir: Path | None = None,
    progress: bool = True,
    cpu_budget: bool = True,
    in_channels: int | None = None,
    device: str | None = None,
    test_images: int | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    recipe: str | None = None,
) -> dict:
    """Train `model` and write its checkpoint; returns the JSON summary.

    `recipe` "cpu" (default on a CPU where the model has one) or "seed" (the seeds' d2l recipe; default on a GPU);
    every explicit value overrides the recipe's.

    `resume=True` continues from `<artifacts>/<model>/train_state` (a path continues from that directory);
    `cpu_budget` uses the spec's smaller CPU epochs / steps / batch when on a CPU and not overridden.
    `test_images` evaluates accuracy on a fixed subset of that many test images (default: all, or
    CPU_BUDGET_TEST_IMAGES under a step-capped CPU budget).
    `force` replaces an existing checkpoint even when it has a better test accuracy.
    `log` is a callable for the human-readable lines (default: print to stderr on rank 0).
    """
    from exporter.models import get_spec

    spec = get_spec(model)
    if spec.source in ("onnx", "python"):
        raise UsageError(f"{spec.name} cannot be trained here: "
                         + ("an ONNX file has no PyTorch model" if spec.source == "onnx" else
                            "a Python object is trained in your own code (then export it with exporter.build)"))
    model = spec.name  # a source's canonical name (an absolute path for file.py:factory), as `build` looks it up
    started = time.perf_counter()
    with SigtermGuard(paths.state_dir(model, artifacts_dir)) as guard:
        run_device = pick_device(device)
        check_seed(seed)
        check_threads(threads)
        recipe = resolve_recipe(model, device=run_device, epochs=epochs, lr=lr, batch_size=batch_size,
                                resize=resize, max_steps=max_steps, cpu_budget=cpu_budget, test_images=test_images,
                                recipe=recipe)
        train_data, test_data = load_split(data, "train"), load_split(data, "test")
        input_shape = _input_shape(model, train_data, test_data, in_channels, recipe["resize"])
        check_batch_memory(input_shape, recipe["batch_size"])
        model_dir = paths.ensure_writable_dir(paths.model_dir(model, artifacts_dir))
        paths.ensure_writable_dir(guard.state_dir)
        with thread_count(threads), _device_rng(run_device), reused_heap(run_device) as heap_reused:
            dist = Dist(run_device)
            try:
                trainer = Trainer(model=model, recipe=recipe, train_data=train_data, test_data=test_data,
                                  input_shape=input_shape, device=run_device, dist=dist, seed=seed,
                                  model_dir=model_dir, data_arg=data, say=_logger(log, dist), guard=guard,
                                  progress=progress, force=force, started=started, heap_reused=heap_reused)
                return trainer.run(resume)
            finally:
                dist.close()


def _device_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """The RNG fork a run trains under (CUDA's too on a GPU), so the caller's generators are left as they were."""
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) use the current device
    return torch.random.fork_rng(devices=[device.index or 0])


def _logger(log: Callable[[str], None] | None, dist: Dist) -> Callable[[str], None]:
    """Where the run's lines go: `log`, else stderr; nowhere on ranks other than 0."""
    if not dist.is_main:
        return lambda line: None
    return log if log is not None else (lambda line: print(line, file=sys.stderr, flush=True))
