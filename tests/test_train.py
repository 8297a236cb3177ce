"""exporter.train: real training on digits5k, checkpoints, resume, the CPU budget, DDP and the CLI."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import cli
from exporter.data import IDX_IMAGES_MAGIC, load_split, to_model_input
from exporter.errors import UsageError
from exporter.models import get_spec, list_models
from exporter.train import (
    CPU_BUDGET_TEST_IMAGES,
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    load_trained_model,
    resolve_recipe,
    train,
)
from tests.test_data import idx_bytes, write_idx_dir

REPO = Path(__file__).resolve().parents[1]
# CPU (determinism to 1e-6 is a CPU promise) with 1 thread: tiny ops on shared cores run fastest that way.
QUIET = {"progress": False, "log": lambda line: None, "threads": 1, "device": "cpu"}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _accuracy(model: torch.nn.Module, split: str, data=None) -> float:
    ds = load_split(data, split)
    shape = tuple(int(d) for d in next(iter(model.parameters())).shape[1:2]) + (28, 28)
    with torch.no_grad():
        logits = model(torch.from_numpy(to_model_input(ds.images, shape)))
    return float((logits.argmax(1).numpy() == ds.labels).mean())


# --- learning on real data ----------------------------------------------------------------------------------------


def test_lenet_bn_learns_digits5k(tmp_path: Path) -> None:
    """The seed's recipe for lenet_bn (lr 1.0, batch 256, 10 epochs) on the real digits.

    Measured over seeds 0-7 on this data: 0.90-0.94; chance is 0.10, so 0.85 fails any broken pipeline (labels
    misaligned with images, no learning, eval-mode BatchNorm statistics not kept).
    """
    summary = train("lenet_bn", seed=0, artifacts_dir=tmp_path, **QUIET)
    assert summary["epochs"] == 10 and summary["steps"] == 160 and summary["budget"] == "seed"
    assert summary["test_accuracy"] >= 0.85, summary
    assert summary["train_accuracy"] >= 0.85
    assert summary["dataset"] == "digits5k" and summary["train_examples_seen"] == 40000

    # Round trip: the reloaded model reproduces the recorded test accuracy exactly (BatchNorm buffers included).
    model, sidecar = load_trained_model(tmp_path / "lenet_bn", expect_model="lenet_bn")
    assert _accuracy(model, "test") == pytest.approx(sidecar["test_accuracy"], abs=1e-9)
    assert sidecar["history"][-1]["test_accuracy"] == summary["test_accuracy"]
    assert sidecar["input_shape"] == [1, 28, 28] and sidecar["class_names"] == [str(d) for d in range(10)]
    assert sidecar["dataset"]["name"] == "digits5k" and sidecar["dataset"]["digest"] == load_split(None, "test").digest
    assert sidecar["recipe"]["lr"] == 1.0 and sidecar["recipe"]["init"] == "xavier_normal_"
    assert sidecar["versions"]["torch"] == torch.__version__
    assert (tmp_path / "lenet_bn" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- checkpoints --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    train("lenet", max_steps=3, artifacts_dir=root, **QUIET)
    return root


def test_checkpoint_files_and_round_trip(lenet_checkpoint: Path) -> None:
    weights, sidecar_path = checkpoint_paths("lenet", lenet_checkpoint)
    assert weights.name == "checkpoint.safetensors" and sidecar_path.name == "checkpoint.json"
    state, sidecar = load_checkpoint(weights, expect_model="lenet")
    # The same pair loads from the sidecar path and the directory, and equals the last training state.
    for other in (sidecar_path, weights.parent):
        again, _ = load_checkpoint(other)
        assert all(torch.equal(again[k], state[k]) for k in state)
    last_state = _tensors(weights.parent / "train_state" / "state.safetensors")
    assert all(torch.equal(last_state[f"model.{k}"], v) for k, v in state.items())
    assert sidecar["steps"] == 3 and sidecar["epoch"] == 1 and sidecar["seed"] == 0
    assert oct(weights.stat().st_mode & 0o777) != oct(0o600)
    from exporter.models import create_model

    model = create_model("lenet")
    model.load_state_dict(state)
    x = torch.rand(3, 1, 28, 28)
    reloaded, _ = load_trained_model(weights)
    torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=0, atol=0)


def test_checkpoint_rejects_corruption_and_mismatch(lenet_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "lenet"
    shutil.copytree(lenet_checkpoint / "lenet", copy)
    with pytest.raises(CheckpointError, match="checkpoint is for model 'lenet', not 'lenet_bn'"):
        load_checkpoint(copy, expect_model="lenet_bn")
    blob = bytearray((copy / "checkpoint.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (copy / "checkpoint.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        load_checkpoint(copy)
    # A sidecar claiming another architecture for these tensors (sha256 fixed up so only the shapes differ).
    shutil.copy(lenet_checkpoint / "lenet" / "checkpoint.safetensors", copy / "checkpoint.safetensors")
    sidecar = json.loads((copy / "checkpoint.json").read_text())
    sidecar["model"] = "lenet_bn"
    (copy / "checkpoint.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="tensors do not match model 'lenet_bn'"):
        load_checkpoint(copy)
    (copy / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint sidecar"):
        load_checkpoint(copy)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "nothing")


# --- resume -------------------------------------------------------------------------------------------------------


class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("model,resize", [("lenet_bn_scratch", 28), ("nin", 67)])  # BN buffers; dropout RNG
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        model: str, resize: int) -> None:
    data = tmp_path / "data"
    write_idx_dir(data, n_train=16, n_test=8, size=28, classes=4)
    common = dict(data=data, epochs=3, batch_size=8, lr=0.1, resize=resize, seed=5, **QUIET)
    full = train(model, artifacts_dir=tmp_path / "full", **common)

    import exporter.train as train_module

    real = train_module.to_model_tensor
    calls = {"n": 0}
    per_epoch = 16 // 8 + 1  # training batches + one test batch

    def interrupting(images, shape):
        calls["n"] += 1
        if calls["n"] == per_epoch + 2:  # the second training batch of epoch 2
            raise _Interrupt()
        return real(images, shape)

    monkeypatch.setattr(train_module, "to_model_tensor", interrupting)
    with pytest.raises(_Interrupt):
        train(model, artifacts_dir=tmp_path / "cut", **common)
    monkeypatch.setattr(train_module, "to_model_tensor", real)
    weights, sidecar = checkpoint_paths(model, tmp_path / "cut")
    assert not weights.exists() and not sidecar.exists()  # nothing that could pass for a finished run
    assert json.loads((weights.parent / "train_state" / "state.json").read_text())["epoch"] == 1
    assert not [p for p in weights.parent.rglob("*.tmp")]

    resumed = train(model, artifacts_dir=tmp_path / "cut", resume=True, **common)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == 3
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"], abs=1e-6)
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-6)
    a = _tensors(checkpoint_paths(model, tmp_path / "full")[0])
    b = _tensors(weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_resume_refuses_other_model_shape_or_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_idx_dir(data, n_train=32, n_test=8, size=28, classes=3)
    common = dict(data=data, epochs=1, batch_size=16, **QUIET)
    train("lenet", artifacts_dir=tmp_path / "a", **common)
    train("lenet_bn", artifacts_dir=tmp_path / "a", **common)
    weights = checkpoint_paths("lenet_bn", tmp_path / "a")[0]
    before = weights.read_bytes()
    with pytest.raises(CheckpointError, match="trained for model 'lenet', this run uses 'lenet_bn'"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", resume=tmp_path / "a" / "lenet", **common)
    with pytest.raises(CheckpointError, match=r"input shape \[1, 28, 28\], this run uses \[1, 30, 30\]"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", resume=True, resize=30, **{**common, "epochs": 2})
    with pytest.raises(CheckpointError, match="it used lr=1.0, this run lr=0.5"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", resume=True, lr=0.5, **{**common, "epochs": 2})
    # Same layout and labels, other pixels: the data set's digest differs.
    write_idx_dir(tmp_path / "other2", n_train=32, n_test=8, size=28, classes=3)
    (tmp_path / "other2" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((32, 28, 28), np.uint8), IDX_IMAGES_MAGIC)))
    with pytest.raises(CheckpointError, match="digest differs"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", resume=True, **{**common, "data": tmp_path / "other2"})
    assert weights.read_bytes() == before  # no refused run touched the finished checkpoint


# --- recipe / CPU budget ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_cpu_budget_applies_only_on_cpu_and_without_overrides(name: str) -> None:
    recipe = get_spec(name).recipe
    cpu = resolve_recipe(name, device=torch.device("cpu"), epochs=None, lr=None, batch_size=None, resize=None,
                         max_steps=None, cpu_budget=True)
    assert cpu["epochs"] == (recipe.cpu_epochs or recipe.epochs)
    assert cpu["batch_size"] == (recipe.cpu_batch_size or recipe.batch_size)
    assert cpu["max_steps"] == recipe.cpu_max_steps
    assert cpu["test_images"] == (CPU_BUDGET_TEST_IMAGES if recipe.cpu_max_steps else None)
    has_budget = any(v is not None for v in (recipe.cpu_epochs, recipe.cpu_batch_size, recipe.cpu_max_steps))
    assert cpu["budget"] == ("cpu" if has_budget else "seed")
    gpu = resolve_recipe(name, device=torch.device("cuda"), epochs=None, lr=None, batch_size=None, resize=None,
                         max_steps=None, cpu_budget=True)
    assert (gpu["epochs"], gpu["batch_size"], gpu["max_steps"], gpu["test_images"], gpu["budget"]) == (
        recipe.epochs, recipe.batch_size, None, None, "seed")
    user = resolve_recipe(name, device=torch.device("cpu"), epochs=3, lr=0.5, batch_size=8, resize=99,
                          max_steps=7, cpu_budget=True, test_images=50)
    assert (user["epochs"], user["lr"], user["batch_size"], user["resize"], user["max_steps"],
            user["test_images"]) == (3, 0.5, 8, 99, 7, 50)
    assert user["budget"] == "seed" and user["from_cpu_budget"] == []
    assert resolve_recipe(name, device=torch.device("cpu"), epochs=None, lr=None, batch_size=None, resize=None,
                          max_steps=None, cpu_budget=False)["epochs"] == recipe.epochs


def test_bad_values_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="lr must be a positive number"):
        train("lenet", lr=-1.0, artifacts_dir=tmp_path, **QUIET)
    with pytest.raises(UsageError, match="batch_size must be a positive integer"):
        train("lenet", batch_size=0, artifacts_dir=tmp_path, **QUIET)
    with pytest.raises(Exception, match="does not fit the model"):
        train("alexnet", resize=28, artifacts_dir=tmp_path, **QUIET)
    assert not list(tmp_path.iterdir())


# --- CLI ----------------------------------------------------------------------------------------------------------


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_train_json_and_bad_input(tmp_path: Path) -> None:
    code, out, err = _cli("train", "lenet", "--max-steps", "2", "--batch-size", "64", "--artifacts", str(tmp_path),
                          "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == "lenet" and summary["steps"] == 2 and summary["batch_size"] == 64
    assert summary["dataset"] == "digits5k" and 0.0 <= summary["test_accuracy"] <= 1.0
    assert Path(summary["checkpoint"]).is_file() and Path(summary["curve"]).is_file()
    weights = Path(summary["checkpoint"])
    before = weights.read_bytes()

    for argv, expected_code, message in (
        (("train", "lenett"), 2, "unknown model 'lenett': did you mean lenet"),
        (("train", "lenet", "--data", str(tmp_path / "missing")), 1, "does not exist"),
        (("train", "lenet_bn", "--resume", str(tmp_path / "lenet")), 1, "trained for model 'lenet'"),
        (("train", "lenet", "--resume", "--resize", "30"), 1, "input shape"),
    ):
        code, out, err = _cli(*argv, "--artifacts", str(tmp_path))
        assert code == expected_code, (argv, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert out == ""
    assert weights.read_bytes() == before


def test_cli_env_artifacts_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_ARTIFACTS", str(tmp_path / "env"))
    code, out, err = _cli("train", "lenet", "--max-steps", "1", "--json")
    assert code == 0, err
    assert Path(json.loads(out)["checkpoint"]) == tmp_path / "env" / "lenet" / "checkpoint.safetensors"


# --- distributed --------------------------------------------------------------------------------------------------


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    """2 ranks × 128 images reproduce the single-process run of batch 256 (lenet: no BatchNorm, no dropout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "exporter", "train", "lenet", "--max-steps", "4", "--artifacts", str(tmp_path / "ddp"), "--json",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: only rank 0 prints
    assert summary["world_size"] == 2 and summary["rank"] == 0 and summary["steps"] == 4
    files = sorted(p.relative_to(tmp_path / "ddp").as_posix() for p in (tmp_path / "ddp").rglob("*") if p.is_file())
    assert files == ["lenet/checkpoint.json", "lenet/checkpoint.safetensors", "lenet/train_state/state.json",
                     "lenet/train_state/state.safetensors", "lenet/training_curve.png"]
    state, sidecar = load_checkpoint(tmp_path / "ddp" / "lenet", expect_model="lenet")
    assert sidecar["world_size"] == 2 and sidecar["recipe"]["batch_size"] == 256
    assert "gloo" in proc.stderr

    single = train("lenet", max_steps=4, artifacts_dir=tmp_path / "single", **QUIET)
    reference, _ = load_checkpoint(Path(single["checkpoint"]))
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5)


def test_colour_image_folder_trains_a_three_channel_model(tmp_path: Path) -> None:
    from tests.test_data import write_image_folder

    write_image_folder(tmp_path / "pets", colour=True, size=28)
    summary = train("lenet", data=tmp_path / "pets", max_steps=1, batch_size=4, artifacts_dir=tmp_path / "a", **QUIET)
    assert summary["input_shape"] == [3, 28, 28] and summary["dataset"] == "imagefolder:pets"
    state, sidecar = load_checkpoint(Path(summary["checkpoint"]), expect_model="lenet")
    assert sidecar["class_names"] == ["cat", "dog"] and sidecar["num_classes"] == 2 and sidecar["in_channels"] == 3
    assert state["0.weight"].shape[1] == 3 and state["11.weight"].shape[0] == 2
    with pytest.raises(Exception, match="colour"):
        train("lenet", data=tmp_path / "pets", in_channels=1, max_steps=1, artifacts_dir=tmp_path / "b", **QUIET)


def test_bench_train_all_merges_runs(tmp_path: Path) -> None:
    """bench/train_all.py: a --models run adds its rows to training.json/.md and keeps the earlier ones."""
    import importlib.util

    from exporter.models import UnknownModelError

    spec = importlib.util.spec_from_file_location("train_all", REPO / "bench" / "train_all.py")
    train_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_all)
    results = tmp_path / "results"
    results.mkdir()
    earlier = {"model": "lenet_bn", "error": "an earlier failed run", "wall_seconds": 3.0, "load_at_start": 0.5}
    (results / "training.json").write_text(json.dumps({"machine": {}, "rows": {"lenet_bn": earlier}}))
    common = ["--results", str(results), "--artifacts", str(tmp_path / "art"), "--threads", "1"]
    assert train_all.main(["--models", "lenet", *common, "--max-steps", "1", "--device", "cpu"]) == 0
    rows = json.loads((results / "training.json").read_text())["rows"]
    assert rows["lenet_bn"] == earlier and rows["lenet"]["steps"] == 1 and rows["lenet"]["test_examples"] == 1000
    table = (results / "training.md").read_text()
    assert "| lenet | seed | 1 | 1 × 256 | 1×28×28 |" in table
    assert "| lenet_bn | failed: an earlier failed run |" in table
    assert "| 0.824 |" in table  # the seed's Fashion-MNIST accuracy next to ours
    with pytest.raises(UnknownModelError):
        train_all.main(["--models", "lenett", *common])
