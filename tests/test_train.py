"""exporter.train: real training on digits5k, checkpoints, resume, the CPU budget, DDP and the CLI."""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import cli
from exporter.checkpoint import CheckpointError, load_checkpoint, load_trained_model
from exporter.data import IDX_IMAGES_MAGIC, load_split, to_model_input
from exporter.errors import ExporterError, UsageError
from exporter.evaluation import inference_copy
from exporter.models import create_model, get_spec, list_models
from exporter.paths import checkpoint_paths
from exporter.recipe import CPU_BUDGET_TEST_IMAGES, resolve_recipe
from exporter.train import train
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
    assert sidecar["versions"]["torch"] == importlib.metadata.version("torch")
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

    from exporter.train import Trainer

    real = Trainer.train_step
    calls = {"n": 0}

    def interrupting(self, batch, size):
        calls["n"] += 1
        if calls["n"] == 16 // 8 + 2:  # the second training step of epoch 2
            raise _Interrupt()
        return real(self, batch, size)

    monkeypatch.setattr(Trainer, "train_step", interrupting)
    with pytest.raises(_Interrupt):
        train(model, artifacts_dir=tmp_path / "cut", **common)
    monkeypatch.setattr(Trainer, "train_step", real)
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
def test_seed_recipe_cpu_budget_applies_only_on_cpu_and_without_overrides(name: str) -> None:
    recipe = get_spec(name).recipe
    cpu = resolve_recipe(name, device=torch.device("cpu"), epochs=None, lr=None, batch_size=None, resize=None,
                         max_steps=None, cpu_budget=True, recipe="seed")
    assert cpu["epochs"] == (recipe.cpu_epochs or recipe.epochs)
    assert cpu["batch_size"] == (recipe.cpu_batch_size or recipe.batch_size)
    assert cpu["max_steps"] == recipe.cpu_max_steps
    assert cpu["test_images"] == (CPU_BUDGET_TEST_IMAGES if recipe.cpu_max_steps else None)
    has_budget = any(v is not None for v in (recipe.cpu_epochs, recipe.cpu_batch_size, recipe.cpu_max_steps))
    assert cpu["budget"] == ("cpu" if has_budget else "seed")
    assert (cpu["name"], cpu["momentum"], cpu["autocast"]) == ("seed", 0.0, None)  # the seed's d2l recipe
    gpu = resolve_recipe(name, device=torch.device("cuda"), epochs=None, lr=None, batch_size=None, resize=None,
                         max_steps=None, cpu_budget=True)
    assert (gpu["name"], gpu["epochs"], gpu["batch_size"], gpu["max_steps"], gpu["test_images"], gpu["budget"]) == (
        "seed", recipe.epochs, recipe.batch_size, None, None, "seed")  # a GPU defaults to the seed's recipe
    user = resolve_recipe(name, device=torch.device("cpu"), epochs=3, lr=0.5, batch_size=8, resize=99,
                          max_steps=7, cpu_budget=True, test_images=50, recipe="seed")
    assert (user["epochs"], user["lr"], user["batch_size"], user["resize"], user["max_steps"],
            user["test_images"]) == (3, 0.5, 8, 99, 7, 50)
    assert user["budget"] == "seed" and user["from_cpu_budget"] == []
    assert resolve_recipe(name, device=torch.device("cpu"), epochs=None, lr=None, batch_size=None, resize=None,
                          max_steps=None, cpu_budget=False, recipe="seed")["epochs"] == recipe.epochs


@pytest.mark.parametrize("name", list_models())
def test_cpu_recipe_is_the_cpu_default_and_ends_at_the_full_size(name: str) -> None:
    spec = get_spec(name)
    values = resolve_recipe(name, device=torch.device("cpu"), epochs=None, lr=None, batch_size=None, resize=None,
                            max_steps=None, cpu_budget=True)
    if spec.cpu_recipe is None:  # the LeNets keep the seed's recipe
        assert values["name"] == "seed"
        with pytest.raises(UsageError, match="has no CPU recipe"):
            resolve_recipe(name, device=torch.device("cpu"), epochs=None, lr=None, batch_size=None, resize=None,
                           max_steps=None, cpu_budget=True, recipe="cpu")
        return
    assert values["name"] == "cpu" and values["schedule"] == "one-cycle"
    # SGD with Nesterov momentum, or AdamW (no momentum setting) for the nets without BatchNorm
    assert (values["optimizer"], values["momentum"]) in (("SGD", 0.9), ("AdamW", None))
    assert values["stages"][-1][0] == spec.input_shape[1]  # BatchNorm statistics at the exported size
    assert all(size <= spec.input_shape[1] for size, _ in values["stages"])
    assert values["epochs"] == math.ceil(sum(count for _, count in values["stages"]))
    override = resolve_recipe(name, device=torch.device("cpu"), epochs=2, lr=None, batch_size=None, resize=None,
                              max_steps=None, cpu_budget=True)
    assert override["stages"] == [[spec.input_shape[1], 2]]


def test_one_cycle_schedule_warms_up_then_anneals() -> None:
    from exporter.recipe import lr_at

    recipe = {"lr": 0.1, "schedule": "one-cycle", "warmup": 0.25}
    lrs = [lr_at(step, 100, recipe) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1 / 20)
    assert max(lrs) == pytest.approx(0.1) and int(np.argmax(lrs)) == 25
    assert all(a <= b for a, b in zip(lrs[:25], lrs[1:26])) and all(a >= b for a, b in zip(lrs[25:], lrs[26:]))
    assert lrs[-1] == pytest.approx(0.1 / 4000)
    assert lr_at(7, 100, {"lr": 0.3, "schedule": "constant", "warmup": 0.0}) == 0.3


def test_cpu_recipe_moves_a_small_model_well_above_chance(tmp_path: Path) -> None:
    """40 steps of the CPU recipe (bf16 autocast where the CPU has it, progressive sizes) on real digits."""
    summary = train("resnet18", resize=32, max_steps=40, test_images=300, artifacts_dir=tmp_path, **QUIET)
    assert summary["recipe"] == "cpu" and summary["stages"][-1][0] == 32
    assert summary["test_accuracy"] >= 0.6, summary["test_accuracy"]  # chance is 0.1; measured 0.88
    sidecar = json.loads(checkpoint_paths("resnet18", tmp_path)[1].read_text())
    assert sidecar["recipe"]["name"] == "cpu" and sidecar["recipe"]["autocast"] in ("bf16", None)
    assert sidecar["speed"]["train_gflops"] > 0


def test_epoch_progress_signal_samples_every_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """digits5k's test split is stored sorted by class: the first 256 images are only 0s, 1s and 2s."""
    import exporter.train as train_module

    evaluated: list[np.ndarray] = []
    real = train_module.accuracy

    def spy(net, data, subset, *args, **kwargs):
        evaluated.append(data.labels[subset])
        return real(net, data, subset, *args, **kwargs)

    monkeypatch.setattr(train_module, "accuracy", spy)
    train("resnet18", resize=16, batch_size=2000, max_steps=3, artifacts_dir=tmp_path, **QUIET)
    progress, final = evaluated  # 2 steps per epoch: one progress evaluation, then the final one
    assert len(progress) == train_module.EPOCH_TEST_IMAGES and len(final) == 1000
    assert set(progress.tolist()) == set(range(10)), np.bincount(progress)


@pytest.mark.slow
def test_resnet18_default_cpu_recipe_reaches_95_percent(tmp_path: Path) -> None:
    summary = train("resnet18", artifacts_dir=tmp_path, **QUIET)
    assert summary["test_examples"] == 1000 and summary["test_accuracy"] >= 0.95, summary["test_accuracy"]


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
    earlier = {"model": "lenet_bn", "error": "an earlier failed run", "wall_seconds": 3.0, "load_at_start": 0.5,
               "machine": "Another CPU (avx2), 2 cores"}
    (results / "training.json").write_text(json.dumps({"machine": {}, "rows": {"lenet_bn": earlier}}))
    common = ["--results", str(results), "--artifacts", str(tmp_path / "art"), "--threads", "1"]
    assert train_all.main(["--models", "lenet", *common, "--max-steps", "1", "--device", "cpu"]) == 0
    rows = json.loads((results / "training.json").read_text())["rows"]
    assert rows["lenet_bn"] == earlier and rows["lenet"]["steps"] == 1 and rows["lenet"]["test_examples"] == 1000
    table = (results / "training.md").read_text()
    assert "| lenet | seed | 28×150 | 1 × 1 × 256 | 1×28×28 |" in table  # 150 epochs: the seed's 600k images
    assert "| lenet ‡" not in table and "| lenet_bn ‡ | failed: an earlier failed run |" in table
    assert "‡ trained on Another CPU (avx2), 2 cores: lenet_bn." in table  # its times are not this machine's
    assert "| 0.824 |" in table  # the seed's Fashion-MNIST accuracy next to ours
    with pytest.raises(UnknownModelError):
        train_all.main(["--models", "lenett", *common])


# --- reliability: checkpoints, bounds, signals ---------------------------------------------------------------------


def _tiny_data(root: Path) -> Path:
    """16 train / 8 test 28×28 images in 3 classes: a non-default class count, one epoch in milliseconds."""
    write_idx_dir(root, n_train=16, n_test=8, size=28, classes=3)
    return root


def _tiny(tmp_path: Path, **overrides) -> dict:
    return {"data": _tiny_data(tmp_path / "data"), "epochs": 1, "batch_size": 8, "lr": 0.1, **QUIET, **overrides}


class _Crash(Exception):
    pass


def test_crash_before_the_sidecar_keeps_the_previous_checkpoint(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights written, sidecar not yet: the previous pair must still load (it used to fail its sha256 check)."""
    common = _tiny(tmp_path)
    first = train("lenet_bn", artifacts_dir=tmp_path / "a", **common)
    before = json.loads(Path(first["sidecar"]).read_text())["weights_sha256"]
    real_dumps = json.dumps

    def crash_on_checkpoint_sidecar(data, *args, **kwargs):
        if isinstance(data, dict) and data.get("format") == "exporter-checkpoint/1":
            raise _Crash("power cut between the weights and the sidecar")
        return real_dumps(data, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", crash_on_checkpoint_sidecar)
    with pytest.raises(_Crash):
        train("lenet_bn", artifacts_dir=tmp_path / "a", **{**common, "seed": 1})
    monkeypatch.setattr(json, "dumps", real_dumps)
    state, sidecar = load_checkpoint(tmp_path / "a" / "lenet_bn", expect_model="lenet_bn")
    assert sidecar["weights_sha256"] == before and sidecar["seed"] == 0 and sidecar["num_classes"] == 3


def test_interrupted_switch_falls_back_to_a_complete_pair(tmp_path: Path) -> None:
    """Each step of the switch leaves a complete pair that load_checkpoint finds: new, new weights + new sidecar."""
    import shutil

    common = _tiny(tmp_path)
    old = train("lenet_bn", artifacts_dir=tmp_path / "old", **common)
    new = train("lenet_bn", artifacts_dir=tmp_path / "new", **{**common, "seed": 1})
    directory = tmp_path / "switch"
    shutil.copytree(Path(old["checkpoint"]).parent, directory)
    shutil.copy(new["checkpoint"], directory / "checkpoint.new.safetensors")
    shutil.copy(new["sidecar"], directory / "checkpoint.new.json")
    new_sha = json.loads(Path(new["sidecar"]).read_text())["weights_sha256"]
    (directory / "checkpoint.json").unlink()  # step 3: the old sidecar is gone
    assert load_checkpoint(directory)[1]["weights_sha256"] == new_sha
    os.replace(directory / "checkpoint.new.safetensors", directory / "checkpoint.safetensors")  # step 4
    assert load_checkpoint(directory / "checkpoint.safetensors")[1]["weights_sha256"] == new_sha


def test_a_worse_run_keeps_the_better_checkpoint_unless_forced(tmp_path: Path) -> None:
    common = _tiny(tmp_path)
    train("lenet_bn", artifacts_dir=tmp_path / "a", **common)
    weights, sidecar_path = checkpoint_paths("lenet_bn", tmp_path / "a")
    better = json.loads(sidecar_path.read_text())
    better["test_accuracy"] = 1.0  # the checkpoint already there scores better than this recipe can
    sidecar_path.write_text(json.dumps(better))
    kept_bytes = weights.read_bytes(), sidecar_path.read_bytes()

    lines: list[str] = []
    again = train("lenet_bn", artifacts_dir=tmp_path / "a", **{**common, "log": lines.append})
    assert again["test_accuracy"] < 1.0 and again["checkpoint_action"] == "kept"
    assert (weights.read_bytes(), sidecar_path.read_bytes()) == kept_bytes
    assert [line for line in lines if "checkpoint" in line] == [lines[-1]]
    assert "kept the existing checkpoint (test acc 1.000 is better)" in lines[-1] and "--force" in lines[-1]
    rejected, _ = load_checkpoint(Path(again["checkpoint"]), expect_model="lenet_bn")
    assert Path(again["checkpoint"]).name == "checkpoint.rejected.safetensors"

    code, out, err = _cli("train", "lenet_bn", "--data", str(common["data"]), "--epochs", "1", "--batch-size", "8",
                          "--lr", "0.1", "--threads", "1", "--device", "cpu", "--artifacts", str(tmp_path / "a"),
                          "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["checkpoint_action"] == "replaced"
    assert "replaced a checkpoint with test acc 1.000, kept as checkpoint.prev.*" in err
    assert (weights.with_name("checkpoint.prev.safetensors").read_bytes(),
            sidecar_path.with_name("checkpoint.prev.json").read_bytes()) == kept_bytes
    state, sidecar = load_checkpoint(weights, expect_model="lenet_bn")
    assert sidecar["test_accuracy"] == again["test_accuracy"]
    assert all(torch.equal(state[k], rejected[k]) for k in state)


def test_checkpoint_bytes_are_deterministic(tmp_path: Path) -> None:
    """Same seed, same weights → same sha256: sorted safetensors metadata, timestamps only in the sidecar."""
    from exporter.checkpoint import save_tensors

    common = _tiny(tmp_path, max_steps=2)
    a = train("lenet_bn", artifacts_dir=tmp_path / "a", **common)
    b = train("lenet_bn", artifacts_dir=tmp_path / "b", **common)
    assert Path(a["checkpoint"]).read_bytes() == Path(b["checkpoint"]).read_bytes()
    blob = Path(a["checkpoint"]).read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    metadata = header["__metadata__"]
    assert list(metadata) == sorted(metadata) and "created" not in metadata
    assert list(header) == sorted(header)
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    many = {"format": "x", "model": "m", "input_shape": "[1, 28, 28]", "num_classes": "3", "z": "1", "a": "2"}
    digests = {save_tensors(tmp_path / f"t{i}.safetensors", tensors, dict(reversed(many.items()) if i % 2
                                                                          else many.items())) for i in range(6)}
    assert len(digests) == 1


def test_resume_refuses_an_epoch_count_below_the_saved_state(tmp_path: Path) -> None:
    common = _tiny(tmp_path, epochs=2)
    train("lenet_bn", artifacts_dir=tmp_path / "a", **common)
    weights = checkpoint_paths("lenet_bn", tmp_path / "a")[0]
    before = weights.read_bytes()
    with pytest.raises(UsageError, match=r"training state in .* is at epoch 2, past --epochs 1; pass --epochs 2 or "
                                         r"more to continue, or drop --resume to start over"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", resume=True, **{**common, "epochs": 1})
    assert weights.read_bytes() == before


def test_sidecar_fields_are_validated(lenet_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    original = json.loads((lenet_checkpoint / "lenet" / "checkpoint.json").read_text())
    for field, value, message in (
        ("input_shape", [1, -5, 28], r"'input_shape' must be \[C, H, W\] of positive integers, got \[1, -5, 28\]"),
        ("input_shape", [3, 28, 28], r"'input_shape' must be \[C, H, W\] with C = in_channels \(1\)"),
        ("in_channels", "1", "'in_channels' must be a positive integer, got '1'"),
        ("num_classes", 0, "'num_classes' must be a positive integer, got 0"),
        ("class_names", ["0", "1"], "'class_names' must be a list of 10 strings"),
        ("test_accuracy", 7.5, r"'test_accuracy' must be a number in \[0, 1\]"),
        ("weights_sha256", None, "'weights_sha256' must be a sha256 hex digest"),
    ):
        copy = tmp_path / f"{field}-{value}"
        shutil.copytree(lenet_checkpoint / "lenet", copy)
        (copy / "checkpoint.json").write_text(json.dumps({**original, field: value}))
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(copy)
        assert "\n" not in str(info.value)


def test_unwritable_output_is_refused_before_training(tmp_path: Path) -> None:
    lines: list[str] = []
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the artifacts directory should be")
    with pytest.raises(ExporterError, match=r"cannot write to .*not-a-dir/lenet_bn") as info:
        train("lenet_bn", artifacts_dir=blocker, **_tiny(tmp_path, log=lines.append))
    assert lines == [] and "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(ExporterError, match="cannot write to"):
            train("lenet_bn", artifacts_dir=tmp_path / "ro", **_tiny(tmp_path))
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_values_past_the_machine_are_refused_with_the_limit(tmp_path: Path) -> None:
    from exporter.recipe import usable_cores

    common = _tiny(tmp_path, max_steps=1)
    limit = 4 * usable_cores()
    with pytest.raises(UsageError, match=rf"threads must be at most {limit} \(4 × the {usable_cores()} usable"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", **{**common, "threads": limit + 1})
    with pytest.raises(UsageError, match=r"resize must be at most 1024 pixels"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", **{**common, "resize": 100000})
    with pytest.raises(UsageError, match="epochs must be at most 10000, got 100000000000000000000"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", **{**common, "epochs": 10**20})
    with pytest.raises(UsageError, match="max_steps must be at most 10000000"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", **{**common, "max_steps": 10**7 + 1})
    with pytest.raises(UsageError, match=r"one batch of 1000000000 images at 1×28×28 needs 2920.6 GiB as input"):
        train("lenet_bn", artifacts_dir=tmp_path / "a", **{**common, "batch_size": 10**9})
    assert not (tmp_path / "a").exists()
    for argv in (("--threads", "100000"), ("--resize", "100000"), ("--epochs", "20000")):
        code, out, err = _cli("train", "lenet_bn", *argv, "--artifacts", str(tmp_path / "a"))
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "at most" in err, (argv, err)


def test_colour_data_into_one_channel_is_the_first_and_only_message(tmp_path: Path) -> None:
    from tests.test_data import write_image_folder

    write_image_folder(tmp_path / "pets", colour=True, size=28)
    code, out, err = _cli("train", "lenet", "--data", str(tmp_path / "pets"), "--in-channels", "1",
                          "--max-steps", "1", "--artifacts", str(tmp_path / "a"))
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        "exporter train: error: imagefolder:pets (train split) is colour (3 channels) but the model takes 1 "
        "channel(s); train a model with --in-channels 3 or use grayscale data"]
    assert not (tmp_path / "a").exists()


def test_sigterm_ends_training_with_one_line_and_exit_143(tmp_path: Path) -> None:
    import signal
    import time

    data = _tiny_data(tmp_path / "data")
    state = tmp_path / "a" / "lenet_bn" / "train_state" / "state.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "exporter", "train", "lenet_bn", "--data", str(data), "--epochs", "10000",
           "--batch-size", "8", "--threads", "1", "--device", "cpu", "--artifacts", str(tmp_path / "a")]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("exporter train: error: interrupted by SIGTERM; last completed epoch (")
    assert f"saved in {state.parent} (continue with --resume)" in last
    assert "Traceback" not in err and out == ""
    saved = json.loads(state.read_text())["epoch"]
    assert f"last completed epoch ({saved})" in last


def _accepts(net: torch.nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        with torch.no_grad():
            net(torch.zeros(shape))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("name", list_models())
def test_the_evaluation_copy_computes_the_same_logits(name: str) -> None:
    """The final fp32 evaluation runs a BatchNorm-folded channels-last copy: same logits, the model untouched."""
    in_channels = get_spec(name).input_shape[0]
    net = create_model(name, num_classes=7).eval()
    size = next(s for s in (28, 32, 64, 96, 128, 224) if _accepts(net, (1, in_channels, s, s)))
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():  # statistics that are not the identity, or folding them would change nothing
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(3, in_channels, size, size, generator=generator)
    folded = inference_copy(net)
    with torch.no_grad():
        expected, got = net(x), folded(x.contiguous(memory_format=torch.channels_last))
    assert folded is not net and got.shape == (3, 7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())

