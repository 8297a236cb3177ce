"""Where every stage finds a model's files: `<artifacts>/<model>/` with its checkpoint and training state.

One module below the stages (train, export, parity, report, bench) so they agree on names without importing
each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from exporter.errors import ExporterError
from exporter.fileio import check_writable

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_SIDECAR = "checkpoint.json"
STATE_DIR = "train_state"
STATE_WEIGHTS = "state.safetensors"
STATE_SIDECAR = "state.json"


class OutputDirError(ExporterError):
    """An output directory that cannot be created or written."""


def default_artifacts_dir() -> Path:
    """`$EXPORTER_ARTIFACTS` if set, else `artifacts` (relative to the working directory)."""
    return Path(os.environ.get("EXPORTER_ARTIFACTS") or "artifacts")


def model_dir(model: str, artifacts_dir: str | Path | None = None) -> Path:
    """`<artifacts>/<model>/`: the directory holding everything written for one model (None: the default root).

    A model source (`torchvision:NAME`, `file.py:factory`, …) gets its spec's folder name, free of `:` and `/`.
    """
    from exporter.models.sources import is_source, source_folder

    folder = source_folder(model) if is_source(model) else model
    return (Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir()) / folder


def checkpoint_paths(model: str, artifacts_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(weights, sidecar) paths of a model's checkpoint: `<artifacts>/<model>/checkpoint.{safetensors,json}`."""
    directory = model_dir(model, artifacts_dir)
    return directory / CHECKPOINT_WEIGHTS, directory / CHECKPOINT_SIDECAR


def state_dir(model: str, artifacts_dir: str | Path | None = None) -> Path:
    """`<artifacts>/<model>/train_state/`: the per-epoch training state that `train --resume` continues from."""
    return model_dir(model, artifacts_dir) / STATE_DIR


def state_paths(directory: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) of the training state inside a train-state directory."""
    directory = Path(directory)
    return directory / STATE_WEIGHTS, directory / STATE_SIDECAR


def ensure_writable_dir(directory: str | Path) -> Path:
    """Create `directory` if needed and prove it writable; OutputDirError in one line if not.

    Checked before a long run starts, so a read-only destination fails in seconds rather than after an epoch.
    """
    try:
        check_writable(directory, "this run's output")
    except ExporterError as exc:
        raise OutputDirError(str(exc)) from None
    return Path(directory)
