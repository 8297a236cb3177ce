"""Checkpoint and training-state files: deterministic safetensors, validated sidecars, a crash-safe pair switch.

A checkpoint is a pair, `checkpoint.safetensors` (weights, never a pickle) + `checkpoint.json` (the sidecar naming
the weights' sha256). `write_checkpoint` never leaves the model without a complete pair:

1. the new pair is written as `checkpoint.new.*`;
2. the current pair is kept as `checkpoint.prev.*` (hard links, so the current names stay in place);
3. the current sidecar is removed, then the new weights and the new sidecar are renamed into place.

A crash at any point leaves either the final pair complete or one of its files missing; `resolve_checkpoint`
then falls back to the complete pair among `checkpoint.new.*`, the new weights with `checkpoint.new.json`, and
`checkpoint.prev.*`. A new pair that scores lower than the current one is kept as `checkpoint.rejected.*`
unless `force`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.errors import ExporterError
from exporter.fileio import atomic_write_bytes, atomic_write_json, read_json_object, sha256_file
from exporter.paths import CHECKPOINT_SIDECAR, CHECKPOINT_WEIGHTS, STATE_DIR, state_paths

CHECKPOINT_FORMAT = "exporter-checkpoint/1"
STATE_FORMAT = "exporter-train-state/1"
NEW, PREVIOUS, REJECTED = "new", "prev", "rejected"
# Recipe fields that must match for --resume to continue a run (epochs may grow: the schedule is constant).
RESUME_KEYS = ("lr", "batch_size", "max_steps", "resize", "test_images", "seed", "world_size")


class CheckpointError(ExporterError):
    """A checkpoint or training state that is missing, corrupt, or belongs to another model / input shape."""


# --- tensors and sidecars ----------------------------------------------------------------------------------------


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so equal tensors give equal bytes.

    safetensors serialises `__metadata__` from a Rust HashMap whose order changes from one process to the next.
    """
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + blob[8 + header_len:]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically with a canonical header; returns its sha256."""
    from safetensors.torch import save

    # safetensors refuses shared or non-contiguous storage: give it independent contiguous copies.
    blob = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    blob = canonical_safetensors(blob)
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def read_sidecar(path: Path, kind: str) -> dict:
    """A sidecar's JSON object; CheckpointError in one line when missing or unreadable."""
    return read_json_object(path, CheckpointError, f"{kind} sidecar")


def load_tensors(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose sha256 must equal `expected_sha256` (when given)."""
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


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_checkpoint_sidecar(sidecar: dict, where: Path) -> None:
    """Types and ranges of the sidecar fields that loading and exporting rely on; one line per problem."""
    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{where}: sidecar field {field!r} must be {expected}, got {sidecar.get(field)!r}")

    if not isinstance(sidecar.get("model"), str) or not sidecar["model"]:
        raise bad("model", "a model name")
    for field in ("in_channels", "num_classes"):
        if not _is_positive_int(sidecar.get(field)):
            raise bad(field, "a positive integer")
    shape = sidecar.get("input_shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_positive_int(d) for d in shape):
        raise bad("input_shape", "[C, H, W] of positive integers")
    if shape[0] != sidecar["in_channels"]:
        raise bad("input_shape", f"[C, H, W] with C = in_channels ({sidecar['in_channels']})")
    names = sidecar.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != sidecar["num_classes"]
                              or not all(isinstance(n, str) for n in names)):
        raise bad("class_names", f"a list of {sidecar['num_classes']} strings")
    digest = sidecar.get("weights_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise bad("weights_sha256", "a sha256 hex digest")
    for field in ("test_accuracy", "train_accuracy"):
        value = sidecar.get(field)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or not 0.0 <= value <= 1.0):
            raise bad(field, "a number in [0, 1]")


def check_state_dict(model_name: str, state: dict[str, torch.Tensor], sidecar: dict, where: Path) -> None:
    """The tensors must be exactly the state dict of `model_name` at the sidecar's channels / classes."""
    from exporter.models import create_model

    with torch.device("meta"):
        reference = create_model(model_name, in_channels=sidecar["in_channels"],
                                 num_classes=sidecar["num_classes"]).state_dict()
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


# --- finding the pair --------------------------------------------------------------------------------------------


def pair_paths(directory: Path, tag: str | None = None) -> tuple[Path, Path]:
    """(weights, sidecar) named `checkpoint[.tag].{safetensors,json}` in `directory`."""
    stem = "checkpoint" if tag is None else f"checkpoint.{tag}"
    return directory / f"{stem}.safetensors", directory / f"{stem}.json"


def _consistent(weights: Path, sidecar: Path) -> bool:
    """Both files exist and the sidecar names the weights' sha256 (what a finished write leaves)."""
    if not (weights.is_file() and sidecar.is_file()):
        return False
    with contextlib.suppress(OSError, ValueError):
        return json.loads(sidecar.read_text()).get("weights_sha256") == sha256_file(weights)
    return False


def _fallback_pair(directory: Path) -> tuple[Path, Path] | None:
    """The complete pair an interrupted `write_checkpoint` left, newest first."""
    new_weights, new_sidecar = pair_paths(directory, NEW)
    final_weights, _ = pair_paths(directory)
    for candidate in ((new_weights, new_sidecar), (final_weights, new_sidecar), pair_paths(directory, PREVIOUS)):
        if _consistent(*candidate):
            return candidate
    return None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a path that is either file of the pair or the model directory holding them.

    When the final pair lacks a file (a write interrupted mid-switch), the complete pair it left is returned.
    """
    path = Path(path)
    if path.is_dir():
        weights, sidecar = path / CHECKPOINT_WEIGHTS, path / CHECKPOINT_SIDECAR
    elif path.suffix == ".json":
        weights, sidecar = path.with_suffix(".safetensors"), path
    else:
        weights, sidecar = path, path.with_suffix(".json")
    if weights.name == CHECKPOINT_WEIGHTS and not (weights.is_file() and sidecar.is_file()):
        return _fallback_pair(weights.parent) or (weights, sidecar)
    return weights, sidecar


def load_checkpoint(path: Path, *, expect_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint (weights file, sidecar or model directory) → (state_dict, sidecar).

    Checks the sidecar's format and fields, the weights' sha256, the model name (`expect_model`) and that the
    tensors are exactly the model's state dict; any mismatch raises CheckpointError with one line saying which.
    """
    weights, sidecar_path = resolve_checkpoint(path)
    if not weights.exists() and not sidecar_path.exists():
        raise CheckpointError(f"{path}: no checkpoint there (train one with `exporter train MODEL`)")
    sidecar = read_sidecar(sidecar_path, "checkpoint")
    if sidecar.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{sidecar_path}: not an exporter checkpoint (format {sidecar.get('format')!r})")
    model_name = sidecar.get("model")
    if expect_model is not None and model_name != expect_model:
        raise CheckpointError(f"{sidecar_path}: checkpoint is for model {model_name!r}, not {expect_model!r}")
    validate_checkpoint_sidecar(sidecar, sidecar_path)
    state = load_tensors(weights, sidecar["weights_sha256"])
    check_state_dict(sidecar["model"], state, sidecar, weights)
    return state, sidecar


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`model.load_state_dict(state)` for tensors read from a file: safetensors keeps no `_metadata`, and some
    modules' loaders require their version in it (torchvision's MNASNet), so the model's own is attached."""
    from collections import OrderedDict

    own = getattr(model.state_dict(), "_metadata", None)
    if own is not None and getattr(state, "_metadata", None) is None:
        state = OrderedDict(state)
        state._metadata = own  # type: ignore[attr-defined]
    model.load_state_dict(state)
    return model


def load_trained_model(path: Path, *, expect_model: str | None = None) -> tuple[nn.Module, dict]:
    """Build the checkpoint's model, load its weights and return it in eval() mode with the sidecar."""
    from exporter.models import create_model

    state, sidecar = load_checkpoint(path, expect_model=expect_model)
    model = create_model(sidecar["model"], in_channels=sidecar["in_channels"], num_classes=sidecar["num_classes"])
    load_weights(model, state)
    return model.eval(), sidecar


# --- writing the pair --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointWrite:
    """What `write_checkpoint` did: "written" (none before), "replaced" (old kept as prev) or "kept" (old better)."""

    action: str
    weights: Path  # where this run's weights are
    sidecar: Path
    previous_accuracy: float | None  # test accuracy of the checkpoint that was there before, if any

    def describe(self) -> str:
        """Half a line for the log: where the weights went and why."""
        if self.action == "kept":
            return (f"kept the existing checkpoint (test acc {self.previous_accuracy:.3f} is better); this run's "
                    f"is {self.weights} (--force replaces)")
        if self.action == "replaced":
            was = "?" if self.previous_accuracy is None else f"{self.previous_accuracy:.3f}"
            return f"→ {self.weights} (replaced a checkpoint with test acc {was}, kept as checkpoint.prev.*)"
        return f"→ {self.weights}"


def _existing_accuracy(directory: Path) -> tuple[bool, float | None]:
    """(a complete checkpoint exists, its test accuracy when it records a valid one)."""
    weights, sidecar = resolve_checkpoint(directory / CHECKPOINT_WEIGHTS)
    if not _consistent(weights, sidecar):
        return weights.exists() or sidecar.exists(), None
    accuracy = json.loads(sidecar.read_text()).get("test_accuracy")
    valid = isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and math.isfinite(accuracy)
    return True, float(accuracy) if valid else None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _switch_into_place(directory: Path) -> None:
    """Keep the current pair as prev, then move the new pair into place: each step leaves a complete pair."""
    final_weights, final_sidecar = pair_paths(directory)
    new_weights, new_sidecar = pair_paths(directory, NEW)
    if final_weights.is_file() and final_sidecar.is_file():
        for old in pair_paths(directory, PREVIOUS):
            old.unlink(missing_ok=True)
        prev_weights, prev_sidecar = pair_paths(directory, PREVIOUS)
        _link_or_copy(final_weights, prev_weights)
        _link_or_copy(final_sidecar, prev_sidecar)
    final_sidecar.unlink(missing_ok=True)  # from here on, readers fall back to a complete pair
    os.replace(new_weights, final_weights)
    os.replace(new_sidecar, final_sidecar)


def write_checkpoint(directory: Path, state_dict: dict[str, torch.Tensor], sidecar: dict, metadata: dict[str, str],
                     *, force: bool = False) -> CheckpointWrite:
    """Write a checkpoint pair into `directory` without ever leaving it without a complete one.

    A current checkpoint with a better test accuracy stays unless `force`; this run's pair then becomes
    `checkpoint.rejected.*`. A replaced one is kept as `checkpoint.prev.*`.
    """
    had_one, previous = _existing_accuracy(directory)
    new_weights, new_sidecar = pair_paths(directory, NEW)
    sidecar = dict(sidecar, weights_file=CHECKPOINT_WEIGHTS)
    sidecar["weights_sha256"] = save_tensors(new_weights, state_dict, metadata)
    atomic_write_json(new_sidecar, sidecar)
    accuracy = sidecar.get("test_accuracy")
    if previous is not None and not force and isinstance(accuracy, (int, float)) and previous > accuracy:
        rejected_weights, rejected_sidecar = pair_paths(directory, REJECTED)
        os.replace(new_weights, rejected_weights)
        os.replace(new_sidecar, rejected_sidecar)
        return CheckpointWrite("kept", rejected_weights, rejected_sidecar, previous)
    _switch_into_place(directory)
    final_weights, final_sidecar = pair_paths(directory)
    return CheckpointWrite("replaced" if had_one else "written", final_weights, final_sidecar, previous)


# --- training state (resume) -------------------------------------------------------------------------------------


def save_state(directory: Path, net: nn.Module, optimizer: torch.optim.Optimizer, rng_states: list[torch.Tensor],
               cuda_rng: list[torch.Tensor], meta: dict) -> None:
    """Weights, optimizer and RNG state after an epoch, in `directory` (the model's train_state/)."""
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
    weights, sidecar = state_paths(directory)
    meta = dict(meta, format=STATE_FORMAT, optimizer_param_groups=opt["param_groups"],
                optimizer_state_keys=opt_state_keys)
    meta["weights_sha256"] = save_tensors(weights, tensors, {"format": STATE_FORMAT})
    atomic_write_json(sidecar, meta)


def load_state(location: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, sidecar) of the training state in `location` (a model directory or its train_state/)."""
    directory = location / STATE_DIR if (location / STATE_DIR).is_dir() else location
    weights, sidecar_path = state_paths(directory)
    if not sidecar_path.exists():
        raise CheckpointError(f"nothing to resume: no training state in {directory} (run without --resume first)")
    meta = read_sidecar(sidecar_path, "training-state")
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{sidecar_path}: not an exporter training state (format {meta.get('format')!r})")
    return load_tensors(weights, meta.get("weights_sha256")), meta


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict a training state holds (what `save_state` split into tensors and JSON)."""
    state = {"state": {}, "param_groups": meta["optimizer_param_groups"]}
    for index, keys in meta.get("optimizer_state_keys", {}).items():
        state["state"][int(index)] = {key: tensors[f"optim.{index}.{key}"] for key in keys}
    return state


def check_resumable(meta: dict, expected: dict, where: Path) -> None:
    """A saved state must come from the same model, input shape, classes, data set and recipe."""
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
        if key in ("seed", "world_size"):
            ours, theirs = expected[key], meta.get(key)
        else:
            ours, theirs = expected["recipe"][key], meta.get("recipe", {}).get(key)
        if theirs != ours:
            raise CheckpointError(f"cannot resume from {where}: it used {key}={theirs!r}, this run {key}={ours!r}")
