"""bench/gpu_proof.py: the plan it prints without CUDA, the parts it makes and rejoins, the report it merges.

The proof itself needs the lent GPU machine (docs/gpu.md); everything around it is checked here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_proof.py"


@pytest.fixture(scope="module")
def proof():
    spec = importlib.util.spec_from_file_location("gpu_proof", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_cuda_env() -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))


PLAN_WORDS = {
    "tests": ["-m pytest -m gpu"],
    "torch": ["rejoin carried checkpoints", "eager-cuda, inductor-cuda, inductor-cudagraphs, aoti-cuda",
              "batch 1, 8, 32, 256"],
    "ort": ["pip install --no-index --no-deps --target", "SHA256SUMS", "ort-cuda-fp32, ort-cuda-fp16"],
}


@pytest.mark.parametrize("step", sorted(PLAN_WORDS))
def test_plan_says_what_each_step_runs(proof, capsys, step: str) -> None:
    assert proof.main(["--step", step, "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GPU proof plan (--plan; nothing was run)") and f"step {step}:" in out
    for word in PLAN_WORDS[step]:
        assert word in out


def test_make_gpu_proof_without_cuda_prints_every_step_and_exits_0() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    before = sorted((REPO / "bench" / "results").iterdir())
    proc = subprocess.run(["make", "-s", "gpu-proof", f"GPU_PYTHON={sys.executable}"], capture_output=True,
                          text=True, env=_no_cuda_env(), cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("GPU proof plan (no CUDA here") == 1 and "nothing was run" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("step ")] == [
        "step tests:", "step torch:", "step ort:"]
    for words in PLAN_WORDS.values():
        assert all(word in proc.stdout for word in words)
    assert sorted((REPO / "bench" / "results").iterdir()) == before  # nothing written


def test_parity_numbers(proof) -> None:
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    same = proof.parity(ref, ref, np.array([0, 1]))
    assert same == {"max_abs": 0.0, "max_abs_rel": 0.0, "cosine": pytest.approx(1.0), "top1_agreement": 1.0,
                    "accuracy": 1.0}
    off = proof.parity(np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]), ref, np.array([0, 0]))
    assert off["max_abs"] == 1.0 and off["max_abs_rel"] == 0.5 and off["top1_agreement"] == 0.5
    assert off["cosine"] == pytest.approx(0.5) and off["accuracy"] == 0.0


def test_the_steps_merge_into_one_report(proof, tmp_path) -> None:
    env = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "torch": "2.11.0+cu130", "cuda": "13.0",
           "python": "3.12.3", "host": "gpu-box"}
    latency = {str(b): {"median_ms": 0.5 * b, "min_ms": 0.4 * b} for b in proof.BATCHES}
    good = {"activate_s": 1.0, "parity": proof.parity(np.eye(3), np.eye(3), np.arange(3)), "latency": latency}
    model = {"weights": "untrained weights (seed 0)", "input_shape": [1, 28, 28], "images": "digits5k"}
    tests_step = {"pytest": {"command": "-m pytest -m gpu -q", "exit_code": 1, "summary": "1 failed, 9 passed",
                             "tail": ["noise", "FAILED tests/x.py::test_y - KeyError"]}}
    torch_step = {"models": {"lenet_bn": {**model, "cells": {"eager-cuda": good,
                                                             "aoti-cuda": {"skipped": "step time budget"}}}}}
    ort_step = {"wheel": "onnxruntime_gpu.whl", "onnxruntime": {"version": "1.31.1", "providers": ["CUDA"]},
                "models": {"lenet_bn": {**model, "cells": {"ort-cuda-fp32": good}}}}
    proof.write_report("tests", tests_step, env, tmp_path / "results", today="2026-11-27", spare=tmp_path / "tmp")
    proof.write_report("torch", torch_step, env, tmp_path / "results", today="2026-11-27", spare=tmp_path / "tmp")
    shutil.rmtree(tmp_path / "results")  # a later call on the lent machine gets a fresh copy of the repository
    md, js = proof.write_report("ort", ort_step, env, tmp_path / "results", tmp_path / "out", today="2026-11-27",
                                spare=tmp_path / "tmp")
    assert md.name == "nvidia-h200-2026-11-27.md" and js.name == "nvidia-h200-2026-11-27.json"
    data = json.loads(js.read_text())
    assert set(data["steps"]) == {"tests", "torch", "ort"} and data["environment"]["gpu"] == "NVIDIA H200"
    text = md.read_text()
    assert "`pytest -m gpu -q`: 1 failed, 9 passed (exit 1)\n- FAILED tests/x.py::test_y - KeyError\n" in text
    assert "onnxruntime 1.31.1" in text and "noise" not in text and "## Notes" not in text
    assert "| eager-cuda | 1.0 |" in text and "| ort-cuda-fp32 | 1.0 |" in text
    assert "| aoti-cuda | step time budget |" in text and "| 128.000 |" in text
    assert (tmp_path / "out" / md.name).read_text() == text
    assert proof.render_markdown({**data, "notes": ["found *this*"]}).endswith("## Notes\n\n- found *this*\n\n")


def test_a_cell_that_kills_its_process_is_described(proof) -> None:
    crash = "import ctypes; ctypes.string_at(0)"  # the innermost Python frame is ctypes' own
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", crash], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode < 0
    assert proof.describe_exit(proc.returncode, proc.stderr).startswith("died of SIGSEGV in string_at (__init__.py:")
    assert proof.describe_exit(1, "x\nValueError: bad\n") == "exited with 1: ValueError: bad"


def test_skip_cell_records_why(proof, monkeypatch, capsys) -> None:
    monkeypatch.setattr(proof, "SKIP_CELLS", {})
    assert proof.main(["--step", "torch", "--plan", "--skip-cell", "aoti-cuda:crashed: twice"]) == 0
    assert proof.SKIP_CELLS == {"aoti-cuda": "crashed: twice"}
    cell = proof._run_cell("lenet_bn/aoti-cuda", proof.Budget(100), 1, lambda: pytest.fail("must not run"))
    assert cell == {"skipped": "--skip-cell: crashed: twice"}
