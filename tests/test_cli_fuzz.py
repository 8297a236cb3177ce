"""Issue 13 as a table: bad input through the whole command line, each answered by one clear line.

Every case runs `exporter.cli.main([...])` in-process and must end with a non-zero exit code, no traceback, and
exactly one non-empty line on stderr — `exporter CMD: error: …` naming the option or file (a failure in the
middle of a build may follow its progress lines; the error is then the one and last such line). Every case runs
beside one good lenet_bn build, its checkpoint and its results (`ARTIFACTS`, built once for the module), and
those files must be byte-identical afterwards: a bad input never costs what was there.

The cases' outcomes are also the table of `docs/reliability.md`. Regenerate it after changing a case:

    EXPORTER_RELIABILITY_DOC=docs/reliability.md .venv/bin/python -m pytest tests/test_cli_fuzz.py \
        -m "slow or not slow" -q
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from exporter import cli
from exporter.backends import STAGES
from exporter.backends.base import Stage
from exporter.manifest import file_entries

MODEL = "lenet_bn"
NUM_CLASSES = "7"
QUICK_BENCH = ["--budget", "0.01", "--min-runs", "1", "--max-runs", "3", "--warmup", "0", "--gemm-size", "64",
               "--no-overhead", "--json"]
DOC_ENV = "EXPORTER_RELIABILITY_DOC"
REPO = Path(__file__).resolve().parents[1]


# --- running the command line ------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process `exporter` run (argparse's exits included)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse, or a signal turned into an exit that nothing caught
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: file → sha256, link → its target, directory → "dir"."""
    entries = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@dataclass
class Fixture:
    """The good files every case runs beside: a build (onnx, onnxruntime; 7 classes), a checkpoint, results."""

    root: Path  # ARTIFACTS
    build: Path  # ARTIFACTS/lenet_bn/<build id>


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    root = tmp_path_factory.mktemp("fuzz-artifacts")
    steps = [
        ["build", MODEL, "--untrained", "--backends", "onnx,onnxruntime", "--num-classes", NUM_CLASSES,
         "--parity-samples", "16", "--artifacts", str(root)],
        ["train", MODEL, "--epochs", "1", "--max-steps", "5", "--artifacts", str(root), "--json"],
        ["bench", MODEL, "--backends", "onnx-fp32", "--batch-sizes", "1", "--artifacts", str(root), *QUICK_BENCH],
    ]
    for argv in steps:
        assert cli.main(argv) == 0, argv
    build = (root / MODEL / "latest").resolve()
    assert {"parity.json", "bench.json", "manifest.json"} <= {p.name for p in build.iterdir()}
    assert (root / MODEL / "checkpoint.safetensors").is_file()
    GOOD.append(Fixture(root, build))
    return GOOD[-1]


GOOD: list[Fixture] = []  # the module's good files, for the doc's path replacements


@dataclass
class Env:
    """What a case's set-up may use: the good files (read only!), a scratch directory, monkeypatch."""

    good: Fixture
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    calls: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        return str(self.good.root)

    def build_copy(self) -> Path:
        """A copy of the good build in TMP/art/lenet_bn/<id>, `latest` pointing at it."""
        target = self.tmp / "art" / MODEL / self.good.build.name
        shutil.copytree(self.good.build, target)
        (target.parent / "latest").symlink_to(target.name)
        return target

    def model_copy(self) -> Path:
        """A copy of ARTIFACTS/lenet_bn without its builds (checkpoint and train_state) in TMP/art/lenet_bn."""
        source, target = self.good.root / MODEL, self.tmp / "art" / MODEL
        target.mkdir(parents=True)
        for name in ("checkpoint.safetensors", "checkpoint.json"):
            shutil.copyfile(source / name, target / name)
        shutil.copytree(source / "train_state", target / "train_state")
        return target

    def forbid(self, target: Any, name: str) -> None:
        """Replace `target.name` by a function that records the call and fails: the case must stop before it."""
        def called(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            raise AssertionError(f"{name} ran although the input was refused")
        self.monkeypatch.setattr(target, name, called)


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def rehash(build: Path) -> None:
    """Make the manifest's hash list match the (tampered) files again: only the checks beyond hashes remain."""
    edit_json(build / "manifest.json", lambda m: m.update(files=file_entries(build)))


def read_only(env: Env, directory: Path) -> None:
    """Simulate a read-only directory (we run as root, so chmod would not stop a write): creating a file in it
    fails with EROFS exactly where the OS would say so."""
    real = tempfile.mkstemp
    directory = directory.resolve()

    def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> tuple[int, str]:  # noqa: A002
        if dir is not None and (Path(dir).resolve() == directory or directory in Path(dir).resolve().parents):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    env.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def below_a_file(env: Env) -> str:
    """A path whose parent is a regular file: no one, root included, can create anything there."""
    (env.tmp / "a-file").write_text("not a directory\n")
    return str(env.tmp / "a-file" / "artifacts")


def idx_dir(root: Path, *, n_train: int = 12, n_test: int = 6, labels: list[int] | None = None) -> str:
    """A small MNIST-layout IDX data set (28×28, 3 classes); `labels` replaces the training labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.asarray(labels if split == "train" and labels is not None else np.arange(n) % 3, np.uint8)
        for stem, array, magic in ((names[split][0], images, 0x803), (names[split][1], y, 0x801)):
            blob = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
            (root / f"{stem}.gz").write_bytes(gzip.compress(blob))
    return str(root)


def colour_folder(root: Path) -> str:
    """An image folder of RGB PNGs (train/test × 2 classes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), "RGB").save(
                    root / split / name / f"{i}.png")
    return str(root)


def external_data(env: Env, location: str, *, link_to: str | None = None) -> Path:
    """A build copy whose model.onnx keeps its first weight in `location` (hash list updated to match)."""
    import onnx

    build = env.build_copy()
    model = onnx.load(str(build / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    onnx.save(model, str(build / "model.onnx"))
    if link_to is not None:
        (build / location).symlink_to(link_to)
    rehash(build)
    return build


def crash_onnxruntime(env: Env) -> None:
    """Every ONNX Runtime session fails to load (what a broken runtime or a full memory looks like)."""
    from exporter.backends.onnxruntime import OnnxRuntimeRunner

    def boom(self: Any) -> None:
        raise RuntimeError("simulated runtime crash")

    env.monkeypatch.setattr(OnnxRuntimeRunner, "activate_impl", boom)


def failing_stage(env: Env, name: str, action: Callable[[Any], Any]) -> None:
    env.monkeypatch.setitem(STAGES, name, Stage(name, action, STAGES[name].needs_onnx))


def _disk_full(ctx: Any) -> Any:
    (Path(ctx.out_dir) / "half-written.onnx").write_bytes(b"\0" * 1024)
    raise OSError(errno.ENOSPC, "No space left on device")


def _sigterm(ctx: Any) -> Any:
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise AssertionError("the build installed no SIGTERM handler; not sending SIGTERM to the test process")
    if ctx is not None:
        (Path(ctx.out_dir) / "half-written.onnx").write_bytes(b"\0" * 1024)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises in the main thread at once
    raise AssertionError("SIGTERM did not stop the build")


# --- set-ups of the cases that need files --------------------------------------------------------------------


def _escape(env: Env) -> list[str]:
    build = env.build_copy()
    edit_json(build / "manifest.json", lambda m: m["artifacts"][1].update(path="../../../etc/passwd"))
    return ["verify", str(build)]


def _absolute(env: Env) -> list[str]:
    build = env.build_copy()
    edit_json(build / "manifest.json", lambda m: m["files"].update({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}))
    return ["bench", str(build)]


def _unlisted(env: Env) -> list[str]:
    build = env.build_copy()
    shutil.copyfile(build / "model.onnx", build / "other.onnx")
    edit_json(build / "manifest.json", lambda m: m["artifacts"][1].update(path="other.onnx"))
    return ["verify", str(build)]


def _symlinked_artifact(env: Env) -> list[str]:
    build = env.build_copy()
    outside = env.tmp / "outside.onnx"
    shutil.move(build / "model.onnx", outside)
    (build / "model.onnx").symlink_to(outside)
    return ["verify", str(build)]


def _tampered(env: Env) -> list[str]:
    build = env.build_copy()
    data = bytearray((build / "model.onnx").read_bytes())
    data[-5] ^= 0xFF
    (build / "model.onnx").write_bytes(bytes(data))
    return ["verify", str(build)]


def _truncated(env: Env) -> list[str]:
    build = env.build_copy()
    path = build / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return ["bench", str(build)]


def _aoti_modified(env: Env) -> list[str]:
    """An AOTInductor package is native code: one that does not match its hash is never loaded."""
    import torch._inductor

    build = env.build_copy()
    package = build / "model.aoti.pt2"
    package.write_bytes(b"PK\x03\x04 a package")
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    package.write_bytes(b"PK\x03\x04 a package, swapped")

    def add(m: dict) -> None:
        m["files"]["model.aoti.pt2"] = {"size": len(b"PK\x03\x04 a package"), "sha256": digest}
        m["artifacts"].append({"name": "aoti-cpu", "backend": "aoti", "path": "model.aoti.pt2", "precision": "fp32",
                               "options": {}, "device": "cpu"})
    edit_json(build / "manifest.json", add)
    env.forbid(torch._inductor, "aoti_load_package")
    return ["verify", str(build), "--backends", "aoti"]


def _ext(location: str, command: str, link_to: str | None = None) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        build = external_data(env, location, link_to=link_to)
        return [command, str(build), "--backends", "onnx-fp32"] + (QUICK_BENCH if command == "bench" else [])
    return setup


def _checkpoint_pair(env: Env, change: Callable[[Path, Path], None]) -> str:
    directory = env.tmp / "ckpt"
    directory.mkdir()
    for name in ("checkpoint.safetensors", "checkpoint.json"):
        shutil.copyfile(env.good.root / MODEL / name, directory / name)
    change(directory / "checkpoint.safetensors", directory / "checkpoint.json")
    return str(directory / "checkpoint.safetensors")


def _flip_weights(weights: Path, sidecar: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))


def _state_at_epoch(env: Env, epoch: int) -> str:
    model_dir = env.model_copy()
    edit_json(model_dir / "train_state" / "state.json", lambda s: s.update(epoch=epoch))
    return str(model_dir.parent)


def _verify_read_only(env: Env) -> list[str]:
    from exporter import parity

    read_only(env, env.good.build)
    env.forbid(parity, "verify_build")
    return ["verify", MODEL, "--artifacts", env.root]


def _bench_read_only(env: Env) -> list[str]:
    from exporter import benchmark as bench

    read_only(env, env.good.build)
    env.forbid(bench, "bench_build")
    return ["bench", MODEL, "--artifacts", env.root]


def _select_read_only(env: Env) -> list[str]:
    from exporter import select

    read_only(env, env.good.build)
    env.forbid(select, "select_build")
    return ["select", MODEL, "--max-flips", "1%", "--artifacts", env.root]


def _static_build(env: Env) -> list[str]:
    build = env.build_copy()
    edit_json(build / "manifest.json", lambda m: m["batch"].update(static=4, max=4, dynamic=False))
    return ["bench", str(build), "--batch-sizes", "1,8"]


def _damaged(name: str, command: str, change: Callable[[Any], Any] | str) -> Callable[[Env], list[str]]:
    """A build copy whose `name` holds valid JSON of the wrong shape (or the text `change`)."""
    def setup(env: Env) -> list[str]:
        build = env.build_copy()
        if isinstance(change, str):
            (build / name).write_text(change)
        else:
            edit_json(build / name, change)
        if command == "report":
            return ["report", MODEL, "--artifacts", str(build.parent.parent), "--out", str(env.tmp / "reports")]
        extra = {"select": ["--max-flips", "1%", "--dry-run"], "verify": ["--samples", "8"]}[command]
        return [command, str(build), *extra]
    return setup


def _memory_8gib(env: Env) -> list[str]:
    from exporter import build_inputs

    env.monkeypatch.setattr(build_inputs, "available_memory_bytes", lambda: 8 * 2**30)
    return ["build", MODEL, "--untrained", "--max-batch", "10000000", "--artifacts", env.root]


def _enospc_build(env: Env) -> list[str]:
    failing_stage(env, "onnx", _disk_full)
    return ["build", MODEL, "--untrained", "--num-classes", NUM_CLASSES, "--backends", "onnx", "--artifacts",
            env.root]


def _sigterm_build(env: Env) -> list[str]:
    failing_stage(env, "onnx", _sigterm)
    return ["build", MODEL, "--untrained", "--num-classes", NUM_CLASSES, "--backends", "onnx", "--artifacts",
            env.root]


def _enospc_late_build(env: Env) -> list[str]:
    """The disk fills after every artifact is written, when the build saves its parity records."""
    from exporter import export

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    env.monkeypatch.setattr(export, "write_parity", full)
    return ["build", MODEL, "--untrained", "--num-classes", NUM_CLASSES, "--backends", "onnx", "--artifacts",
            env.root]


def _sigterm_training_build(env: Env) -> list[str]:
    """A build with no checkpoint trains first: SIGTERM then ends the training part with its own line."""
    from exporter.train import Trainer

    env.monkeypatch.setattr(Trainer, "run_epoch", lambda self, epoch: _sigterm(None))
    return ["build", MODEL, "--artifacts", str(env.tmp / "art")]


# --- the table ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    row: int  # the row of issue 13 it covers (0: the obvious ones)
    what: str  # the bad input, in words (the doc's first column)
    argv: Callable[[Env], list[str]]
    code: int  # the exit code
    match: str  # a regex the error line must match
    after_progress: bool = False  # fails in the middle of a build: its progress lines come first
    slow: bool = False


def _args(*argv: str) -> Callable[[Env], list[str]]:
    """Plain arguments; {root} is ARTIFACTS (the good files), {tmp} the case's scratch directory."""
    return lambda env: [a.format(root=env.root, tmp=env.tmp) for a in argv]


C = Case
CASES: list[Case] = [
    # 0: the obvious ones
    C("unknown-model", 0, "a model name that does not exist", _args("build", "lenet5", "--artifacts", "{root}"), 2,
      r"unknown model 'lenet5': did you mean"),
    C("unknown-backend", 0, "a backend that does not exist",
      _args("build", MODEL, "--untrained", "--backends", "onnx,tensorflow", "--artifacts", "{root}"), 2,
      r"unknown backend 'tensorflow' in --backends"),
    C("bench-unknown-artifact", 0, "bench --backends naming nothing the build has",
      _args("bench", MODEL, "--backends", "nosuch", "--artifacts", "{root}"), 2, r"unknown backend 'nosuch'"),
    C("verify-missing-dir", 0, "a build directory that does not exist", _args("verify", "{tmp}/no/such/build"), 1,
      r"build directory .*/no/such/build does not exist"),
    C("verify-never-built", 0, "a model that has no build", _args("verify", "lenet", "--artifacts", "{root}"), 1,
      r"no build of lenet in .* \(run `exporter build lenet` first\)"),
    C("build-data-missing", 0, "--data naming a missing directory",
      _args("build", MODEL, "--data", "{tmp}/nowhere", "--artifacts", "{root}"), 1,
      r"data directory '.*/nowhere' does not exist"),
    C("untrained-and-checkpoint", 0, "--untrained with --checkpoint",
      _args("build", MODEL, "--untrained", "--checkpoint", "{root}/lenet_bn", "--artifacts", "{root}"), 2,
      r"--untrained and --checkpoint contradict each other"),
    C("num-classes-without-untrained", 0, "--num-classes for a checkpoint build",
      _args("build", MODEL, "--num-classes", "3", "--artifacts", "{root}"), 2,
      r"--num-classes applies to --untrained builds, bare state dicts and model sources only"),
    C("bench-model-and-all", 0, "bench with MODEL and --all", _args("bench", MODEL, "--all", "--artifacts", "{root}"),
      2, r"give MODEL or BUILD_DIR arguments, or --all \(not both\)"),
    C("batch-sizes-zero", 0, "--batch-sizes 1,0",
      _args("bench", MODEL, "--batch-sizes", "1,0", "--artifacts", "{root}"), 2,
      r"argument --batch-sizes: batch sizes must be comma-separated positive integers, got '1,0'"),
    C("batch-sizes-text", 0, "--batch-sizes a,b",
      _args("bench", MODEL, "--batch-sizes", "a,b", "--artifacts", "{root}"), 2,
      r"argument --batch-sizes: .* got 'a,b'"),
    C("samples-zero", 0, "verify --samples 0", _args("verify", MODEL, "--samples", "0", "--artifacts", "{root}"), 2,
      r"argument --samples: expected a positive integer"),
    C("samples-more-than-data", 0, "verify --samples past the test set",
      _args("verify", MODEL, "--samples", "100000", "--artifacts", "{root}"), 1,
      r"asked for 100000 images but digits5k test has only 1000"),
    C("seed-negative", 0, "verify --seed -1", _args("verify", MODEL, "--seed", "-1", "--artifacts", "{root}"), 2,
      r"argument --seed: expected an integer from 0 to"),
    C("seed-huge", 0, "build --seed 10**23",
      _args("build", MODEL, "--untrained", "--seed", "99999999999999999999999", "--artifacts", "{root}"), 2,
      r"argument --seed: expected an integer from 0 to"),
    C("lr-nan", 0, "train --lr nan", _args("train", MODEL, "--lr", "nan", "--artifacts", "{root}"), 2,
      r"argument --lr: expected a positive finite number, got 'nan'"),
    C("max-steps-zero", 0, "train --max-steps 0", _args("train", MODEL, "--max-steps", "0", "--artifacts", "{root}"),
      2, r"argument --max-steps: expected a positive integer"),
    C("max-flips-text", 0, "select --max-flips abc",
      _args("select", MODEL, "--max-flips", "abc", "--artifacts", "{root}"), 2,
      r"--max-flips must be a percentage like 0.5% or a fraction"),
    C("select-unbenched-batch", 0, "select --batch 3 with results at batch 1 only",
      _args("select", MODEL, "--max-flips", "1%", "--batch", "3", "--dry-run", "--artifacts", "{root}"), 1,
      r"no benchmark results at batch 3 \(benchmarked: 1;"),
    # 1: nothing outside the build is trusted
    C("manifest-path-escapes", 1, "a manifest artifact path ../../../etc/passwd", _escape, 1,
      r"names '\.\./\.\./\.\./etc/passwd', a path outside the build directory"),
    C("manifest-absolute-path", 1, "a manifest file entry /etc/passwd", _absolute, 1,
      r"names '/etc/passwd', a path outside the build directory"),
    C("artifact-not-hashed", 1, "an artifact file missing from the sha256 list", _unlisted, 1,
      r"names 'other.onnx', which is not in the manifest's sha256 list"),
    C("artifact-symlink", 1, "an artifact file that is a symbolic link out of the build", _symlinked_artifact, 1,
      r"model.onnx is reached through a symbolic link"),
    C("artifact-modified", 1, "an artifact file changed after the build", _tampered, 1,
      r"model.onnx does not match its sha256 in the manifest"),
    C("artifact-truncated", 1, "an artifact file cut short", _truncated, 1,
      r"weights.safetensors has 1000 bytes, the manifest says"),
    C("onnx-external-parent", 1, "ONNX external data at ../../etc/passwd", _ext("../../etc/passwd", "verify"), 1,
      r"keeps its data in '\.\./\.\./etc/passwd', outside the build's hashed files"),
    C("onnx-external-absolute", 1, "ONNX external data at /etc/passwd", _ext("/etc/passwd", "bench"), 1,
      r"keeps its data in '/etc/passwd', outside the build's hashed files"),
    C("onnx-external-symlink", 1, "ONNX external data through a link to /etc/passwd",
      _ext("weights.bin", "verify", link_to="/etc/passwd"), 1, r"keeps its data in 'weights.bin', outside"),
    C("aoti-package-modified", 1, "an AOTInductor package (native code) changed after the build", _aoti_modified, 1,
      r"model.aoti.pt2 has \d+ bytes, the manifest says"),
    # 3: checkpoints
    C("checkpoint-other-model", 3, "a lenet_bn checkpoint for a resnet18 build",
      _args("build", "resnet18", "--checkpoint", "{root}/lenet_bn", "--artifacts", "{root}"), 1,
      r"checkpoint is for model 'lenet_bn', not 'resnet18'"),
    C("checkpoint-missing", 3, "--checkpoint naming nothing",
      _args("build", MODEL, "--checkpoint", "{tmp}/none.safetensors", "--artifacts", "{root}"), 1,
      r"none.safetensors: no checkpoint there"),
    C("checkpoint-weights-changed", 3, "checkpoint weights that do not match their sidecar's sha256",
      lambda env: ["build", MODEL, "--checkpoint", _checkpoint_pair(env, _flip_weights), "--artifacts", env.root], 1,
      r"checkpoint.safetensors: sha256 .* does not match its sidecar's"),
    C("checkpoint-sidecar-corrupt", 3, "a checkpoint sidecar that is not JSON",
      lambda env: ["build", MODEL, "--checkpoint", _checkpoint_pair(env, lambda w, s: s.write_text("{oops")),
                   "--artifacts", env.root], 1, r"checkpoint.json: unreadable checkpoint sidecar"),
    C("checkpoint-negative-shape", 3, "a sidecar input_shape [1, -5, 28]",
      lambda env: ["build", MODEL, "--checkpoint", _checkpoint_pair(
          env, lambda w, s: edit_json(s, lambda j: j.update(input_shape=[1, -5, 28]))), "--artifacts", env.root], 1,
      r"sidecar field 'input_shape' must be \[C, H, W\] of positive integers"),
    C("checkpoint-weights-gone", 3, "a sidecar whose weights file is gone (no complete pair left)",
      lambda env: ["build", MODEL, "--checkpoint", _checkpoint_pair(env, lambda w, s: w.unlink()),
                   "--artifacts", env.root], 1, r"checkpoint.safetensors: weights file not found"),
    C("checkpoint-other-size", 3, "--input-size 32 with a 28×28 checkpoint",
      _args("build", MODEL, "--input-size", "32", "--artifacts", "{root}"), 1,
      r"was trained at 1×28×28, not 32×32; drop --input-size"),
    C("resume-nothing", 3, "train --resume with no saved state",
      _args("train", MODEL, "--resume", "--artifacts", "{tmp}/art"), 1, r"nothing to resume: no training state in"),
    C("resume-other-model", 3, "train lenet --resume from lenet_bn's state",
      _args("train", "lenet", "--resume", "{root}/lenet_bn", "--artifacts", "{tmp}/art"), 1,
      r"it was trained for model 'lenet_bn', this run uses 'lenet'"),
    C("resume-past-epochs", 3, "train --resume --epochs 10 from a state at epoch 20",
      lambda env: ["train", MODEL, "--resume", "--epochs", "10", "--max-steps", "5", "--artifacts",
                   _state_at_epoch(env, 20)], 2, r"is at epoch 20, past --epochs 10"),
    # 4: outputs that cannot be written are refused before the work
    C("verify-read-only", 4, "verify a build whose directory is read-only", _verify_read_only, 1,
      r"cannot write to .* \(Read-only file system\), so the parity records of `exporter verify` would be lost"),
    C("bench-read-only", 4, "bench a build whose directory is read-only", _bench_read_only, 1,
      r"cannot write to .* \(Read-only file system\), so the results of `exporter bench` would be lost"),
    C("select-read-only", 4, "select (writes the manifest) on a read-only build", _select_read_only, 1,
      r"cannot write to .* \(Read-only file system\), so the choice written into its manifest"),
    C("train-below-a-file", 4, "train --artifacts below a regular file",
      lambda env: ["train", MODEL, "--max-steps", "1", "--artifacts", below_a_file(env)], 1,
      r"cannot write .*\(Not a directory\)"),
    C("build-below-a-file", 4, "build --artifacts below a regular file",
      lambda env: ["build", MODEL, "--untrained", "--artifacts", below_a_file(env)], 1,
      r"cannot write to .* \(Not a directory\), so the build would be lost"),
    C("report-below-a-file", 4, "report --out below a regular file",
      lambda env: ["report", MODEL, "--artifacts", env.root, "--out", below_a_file(env)], 1,
      r"cannot create report directory"),
    # 5: resource limits
    C("bench-threads", 5, "bench --threads 100000",
      _args("bench", MODEL, "--threads", "100000", "--artifacts", "{root}"), 2,
      r"--threads 100000 is more than 4 per usable core; this machine allows at most \d+"),
    C("train-threads", 5, "train --threads 100000",
      _args("train", MODEL, "--threads", "100000", "--artifacts", "{root}"), 2,
      r"threads must be at most \d+"),
    C("build-input-size", 5, "build --input-size 100000",
      _args("build", "resnet18", "--untrained", "--input-size", "100000", "--artifacts", "{root}"), 2,
      r"--input-size must be at most 1024 pixels"),
    C("build-input-size-unfit", 5, "build --input-size 1000 for a model that takes 28–31",
      _args("build", MODEL, "--untrained", "--input-size", "1000", "--artifacts", "{root}"), 2,
      r"input 1×1000×1000 does not fit the model; smallest valid size is 1×28×28"),
    C("train-resize", 5, "train --resize 100000", _args("train", MODEL, "--resize", "100000", "--artifacts", "{root}"),
      2, r"resize must be at most 1024"),
    C("train-epochs-huge", 5, "train --epochs 99999999999999999999",
      _args("train", MODEL, "--epochs", "99999999999999999999", "--artifacts", "{root}"), 2,
      r"argument --epochs: expected a positive integer up to 10,000,000"),
    C("build-max-batch-memory", 5, "build --max-batch 10000000 with 8 GiB of memory available", _memory_8gib, 2,
      r"--max-batch 10000000: one batch at 1×28×28 takes 29.2 GiB as input alone; with 8.0 GiB available this "
      r"machine allows at most --max-batch 684784"),
    C("build-parity-samples", 5, "build --parity-samples past the test set",
      _args("build", MODEL, "--untrained", "--parity-samples", "5000", "--artifacts", "{root}"), 2,
      r"the quick parity check needs 5000 test images but digits5k has only 1000; lower --parity-samples"),
    # 6: a full disk in the middle of a build
    C("build-disk-full", 6, "ENOSPC while a build writes an artifact", _enospc_build, 1,
      r"cannot write the build into .*: No space left on device \(the partial build was removed\)",
      after_progress=True),
    C("build-disk-full-late", 6, "ENOSPC when the build saves its parity records (after every artifact)",
      _enospc_late_build, 1, r"cannot write the build into .*: No space left on device \(the partial build was "
      r"removed\)", after_progress=True, slow=True),
    # 7: exit codes
    C("bench-static-batch", 7, "bench a static --batch 4 build at batch sizes 1,8", _static_build, 2,
      r"has a static batch of 4: bench it with --batch-sizes 4"),
    C("build-sigterm", 7, "SIGTERM during a build", _sigterm_build, 143,
      r"^exporter build: error: interrupted by SIGTERM; the partial build was removed$", after_progress=True),
    C("build-sigterm-training", 7, "SIGTERM while a build trains its missing checkpoint", _sigterm_training_build,
      143, r"interrupted by SIGTERM before the first epoch completed; nothing saved", after_progress=True),
    # 8: valid JSON of the wrong shape, corrupt files
    C("manifest-input-shape", 8, 'manifest.json with "input_shape": "abc" (verify)',
      _damaged("manifest.json", "verify", lambda m: m.update(input_shape="abc")), 1,
      r"manifest.json is damaged: `input_shape` must be three positive integers"),
    C("manifest-artifacts", 8, 'manifest.json with "artifacts": "x" (select)',
      _damaged("manifest.json", "select", lambda m: m.update(artifacts="x")), 1,
      r"manifest.json is damaged: `artifacts` must be a list"),
    C("manifest-recommended", 8, 'manifest.json with "recommended": "x" (report)',
      _damaged("manifest.json", "report", lambda m: m.update(recommended="x")), 1,
      r"manifest.json is damaged: `recommended` must be an object"),
    C("manifest-not-json", 8, "manifest.json that is not JSON (verify)", _damaged("manifest.json", "verify", "{oops"),
      1, r"manifest.json.*(cannot read|unreadable).*Expecting property name"),
    C("bench-cells", 8, 'bench.json with "cells": "x" (select)',
      _damaged("bench.json", "select", lambda b: b.update(cells="x")), 1,
      r"bench.json does not have the benchmark file's cells"),
    C("bench-settings", 8, 'bench.json with "settings": "x" (report)',
      _damaged("bench.json", "report", lambda b: b.update(settings="x")), 1,
      r"bench.json: `settings` must be an object"),
    C("bench-not-json", 8, "bench.json cut short (report)", _damaged("bench.json", "report", '{"format": 2, "ce'), 1,
      r"bench.json.*(cannot read|unreadable)"),
    C("parity-results", 8, 'parity.json with "results": "x" (report)',
      _damaged("parity.json", "report", lambda p: p.update(results="x")), 1,
      r"parity.json does not have the parity file's fields"),
    C("parity-flip-rate", 8, 'parity.json with a flip_rate "x" (select)',
      _damaged("parity.json", "select", lambda p: p["results"][0]["summary"].update(flip_rate="x")), 1,
      r"parity.json: the record of '.*' has a malformed flip_rate"),
    C("report-recommended-shape", 8, "manifest.json whose `recommended` lacks its fields (report)",
      _damaged("manifest.json", "report", lambda m: m.update(recommended={"recommended": 5})), 1,
      r"the saved results of build .* have an unexpected shape"),
    C("idx-zero-images", 8, "IDX training files with 0 images",
      lambda env: ["train", MODEL, "--data", idx_dir(env.tmp / "idx", n_train=0), "--artifacts", str(env.tmp / "art")],
      1, r"train-images-idx3-ubyte.gz: holds 0 images"),
    # 9: silent nonsense
    C("idx-labels-out-of-range", 9, "IDX labels with a stray 200 among 0..2",
      lambda env: ["train", MODEL, "--data", idx_dir(env.tmp / "idx", labels=[0, 1, 2] * 3 + [0, 1, 200]),
                   "--artifacts", str(env.tmp / "art")], 1, r"labels must be 0..N-1 without gaps"),
    C("budget-nan", 9, "bench --budget nan", _args("bench", MODEL, "--budget", "nan", "--artifacts", "{root}"), 2,
      r"argument --budget: expected a positive finite number, got 'nan'"),
    C("budget-inf", 9, "bench --budget inf", _args("bench", MODEL, "--budget", "inf", "--artifacts", "{root}"), 2,
      r"argument --budget: expected a positive finite number, got 'inf'"),
    C("gemm-size-zero", 9, "bench --gemm-size 0", _args("bench", MODEL, "--gemm-size", "0", "--artifacts", "{root}"),
      2, r"argument --gemm-size: expected a positive integer"),
    C("gemm-size-tiny", 9, "bench --gemm-size 10", _args("bench", MODEL, "--gemm-size", "10", "--artifacts", "{root}"),
      2, r"--gemm-size must be between 64 and 16384, got 10"),
    C("atol-nan", 9, "verify --atol nan", _args("verify", MODEL, "--atol", "nan", "--artifacts", "{root}"), 2,
      r"--atol must be a finite number ≥ 0, got nan"),
    C("min-agreement-2", 9, "verify --min-agreement 2", _args("verify", MODEL, "--min-agreement", "2", "--artifacts",
                                                             "{root}"), 2, r"--min-agreement must be between 0 and 1"),
    C("max-acc-drop-negative", 9, "verify --max-acc-drop -1",
      _args("verify", MODEL, "--max-acc-drop=-1", "--artifacts", "{root}"), 2,
      r"--max-acc-drop must be between 0 and 100 accuracy points, got -1.0"),
    C("colour-into-one-channel", 9, "build from a 1-channel checkpoint with --data of RGB images",
      lambda env: ["build", MODEL, "--data", colour_folder(env.tmp / "rgb"), "--artifacts", env.root], 1,
      r"imagefolder:rgb \(test split\) is colour \(3 channels\) but the model takes 1 channel"),
]

OUTCOMES: dict[str, tuple[list[str], int, str]] = {}  # case id → (argv, exit code, error line), for the doc


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case: Case, good: Fixture, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(good.root)
    env = Env(good, tmp_path, monkeypatch)
    argv = case.argv(env)
    code, _, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith(f"exporter {argv[0]}: ")]
    assert len(errors) == 1, lines
    assert lines == errors or (case.after_progress and lines[-1] == errors[0]), lines
    assert code == case.code != 0, (code, errors[0])
    assert re.search(case.match, errors[0]), errors[0]
    assert not env.calls, env.calls
    assert snapshot(good.root) == before, "a bad input changed the good build, checkpoint or results"
    scratch = str(tmp_path)
    OUTCOMES[case.id] = ([a.replace(scratch, "TMP") for a in argv], code, errors[0].replace(scratch, "TMP"))


# --- what is not an error line: merged results, partial exit codes, the help text ------------------------------


def _cells(build: Path) -> dict[tuple[str, int], dict]:
    return {(c["label"], c["batch"]): c for c in json.loads((build / "bench.json").read_text())["cells"]}


def test_bench_merges_cell_by_cell_and_a_failed_run_keeps_the_measurement(good: Fixture, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from exporter import timing

    monkeypatch.setattr(timing, "UNSTABLE_CV", 1e9)  # a few timed calls on a shared machine: never "unstable"
    env = Env(good, tmp_path, monkeypatch)
    build = env.build_copy()
    first = _cells(build)[("onnx-fp32", 1)]
    assert first["status"] == "ok"
    # a --backends subset, then another batch size: the earlier cells stay
    assert run_cli(["bench", str(build), "--backends", "eager", "--batch-sizes", "1", *QUICK_BENCH], capsys)[0] == 0
    assert run_cli(["bench", str(build), "--backends", "eager", "--batch-sizes", "2", *QUICK_BENCH], capsys)[0] == 0
    assert set(_cells(build)) == {("onnx-fp32", 1), ("eager", 1), ("eager", 2)}
    assert _cells(build)[("onnx-fp32", 1)]["p50_ms"] == first["p50_ms"]
    # an all-failed run: exit 1, every other cell kept, the failed cell keeps what it measured before
    crash_onnxruntime(env)
    code, _, err = run_cli(["bench", str(build), "--backends", "onnx-fp32", "--batch-sizes", "1", *QUICK_BENCH], capsys)
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "exporter bench: onnx-fp32 at batch 1: failed: RunnerError: onnxruntime: cannot load model.onnx: "
        "RuntimeError: simulated runtime crash"]
    cells = _cells(build)
    assert set(cells) == {("onnx-fp32", 1), ("eager", 1), ("eager", 2)}
    assert cells[("onnx-fp32", 1)]["status"] == "failed"
    assert cells[("onnx-fp32", 1)]["previous"]["p50_ms"] == first["p50_ms"]
    # select still finds the batch-1 results (and does not pick the artifact that fails now)
    code, out, _ = run_cli(["select", str(build), "--max-flips", "100%", "--dry-run", "--json"], capsys)
    choice = json.loads(out)
    assert code == 0 and choice["batch"] == 1 and choice["recommended"]["label"] == "eager"


def test_bench_exit_code_3_when_some_cells_fail(good: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    env = Env(good, tmp_path, monkeypatch)
    build = env.build_copy()
    crash_onnxruntime(env)
    code, _, err = run_cli(["bench", str(build), "--backends", "onnx-fp32,eager", "--batch-sizes", "1",
                            *QUICK_BENCH], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 3 and len(lines) == 1 and lines[0].startswith("exporter bench: onnx-fp32 at batch 1: failed")


def test_help_documents_exit_codes_and_native_code(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["verify", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for code in ("0 ", "1 ", "2 ", "3 ", "130 ", "143 "):
            assert f"; {code}" in text or f"status: {code}" in text, (argv, code)
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    assert "AOTInductor package is native code" in " ".join(capsys.readouterr().out.split())


def test_every_case_is_in_the_reliability_doc() -> None:
    if os.environ.get(DOC_ENV):
        pytest.skip("docs/reliability.md is being regenerated by this run")
    text = (REPO / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/reliability.md lacks {missing}: regenerate it (see tests/test_cli_fuzz.py)"


# --- docs/reliability.md ------------------------------------------------------------------------------------------


ROW_TITLES = {
    0: "Obvious bad input", 1: "Nothing outside the build is trusted", 3: "Checkpoints and training state",
    4: "Outputs that cannot be written", 5: "Resource limits", 6: "A full disk during a build",
    7: "Exit codes", 8: "Damaged or wrong-shaped files", 9: "Silent nonsense, now refused",
}


def _shorten(text: str, replacements: dict[str, str], limit: int = 150) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|")


def render_doc(outcomes: dict[str, tuple[list[str], int, str]], replacements: dict[str, str]) -> str:
    """docs/reliability.md from the case table and the outcomes one run recorded."""
    codes = cli.EXIT_CODES.split(": ", 1)[1].split("; ")
    lines = [
        "# Reliability: every bad input is one clear line",
        "",
        "<!-- Generated from tests/test_cli_fuzz.py; do not edit by hand. Regenerate with:",
        f"     {DOC_ENV}=docs/reliability.md .venv/bin/python -m pytest tests/test_cli_fuzz.py -m \"slow or not "
        "slow\" -q -->",
        "",
        "Every command answers a bad input — an unknown name, a value past what the machine allows, a damaged or "
        "hostile file, an output it cannot write, a full disk, SIGTERM — with a non-zero exit code and one line on "
        "stderr, `exporter COMMAND: error: …`, naming the option or file, and without a traceback. A failed run "
        "leaves the builds, checkpoints and results already there byte-identical. `tests/test_cli_fuzz.py` runs "
        "each case below through the command line and checks exactly that.",
        "",
        "## Exit codes",
        "",
        "| code | meaning |",
        "| --- | --- |",
    ]
    for entry in codes:
        code, meaning = entry.split(" ", 1)
        lines.append(f"| {code} | {meaning} |")
    lines += [
        "",
        "`exporter bench` exits 3 when some cells could not run and 1 when none could (each failure is one "
        "line on stderr); a cell that fails keeps the measurement it replaces in `bench.json` (as `previous`).",
        "",
        "## Cases",
        "",
        "ARTIFACTS holds a good lenet_bn build, its checkpoint and results; TMP is a scratch directory; BUILD is the "
        "build's directory name. Messages are one run's (limits that depend on the machine — cores, memory — "
        "differ elsewhere). A build that fails midway prints its progress lines before the error line.",
    ]
    for row, title in ROW_TITLES.items():
        cases = [c for c in CASES if c.row == row]
        lines += ["", f"### {title}" + (f" (issue 13, row {row})" if row else ""), "",
                  "| case | input | command | exit | the one line |", "| --- | --- | --- | --- | --- |"]
        for c in cases:
            if c.id in outcomes:
                argv, code, line = outcomes[c.id]
                command = _shorten("exporter " + " ".join(argv), replacements, 110)
                message = _shorten(line, replacements)
            else:
                command, code, message = "(not run)", c.code, f"matches `{c.match}`"
            lines.append(f"| `{c.id}` | {c.what} | `{command}` | {code} | {message} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _write_doc() -> Any:
    yield
    target = os.environ.get(DOC_ENV)
    if not target or not OUTCOMES or not GOOD:
        return
    good = GOOD[-1]
    replacements = {str(good.build): "ARTIFACTS/lenet_bn/BUILD", str(good.root): "ARTIFACTS",
                    good.build.name: "BUILD"}
    (REPO / target).write_text(render_doc(OUTCOMES, replacements))
