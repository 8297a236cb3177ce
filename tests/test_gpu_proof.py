"""bench/gpu_proof.py: the plan it prints without CUDA, the wheel parts it rejoins, the report it merges.

The proof itself needs the lent GPU machine (docs/gpu.md); everything around it is checked here.
"""

from __future__ import annotations

import hashlib
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
    "torch": ["-m pytest -m gpu", "eager-cuda, inductor-cuda, inductor-cudagraphs, aoti-cuda", "batch 1, 8, 32, 256"],
    "ort": ["pip install --no-index --no-deps --target", "SHA256SUMS", "ort-cuda-fp32, ort-cuda-fp16"],
}


@pytest.mark.parametrize("step", sorted(PLAN_WORDS))
def test_plan_says_what_each_step_runs(proof, capsys, step: str) -> None:
    assert proof.main(["--step", step, "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GPU proof plan (--plan; nothing was run)") and f"step {step}:" in out
    for word in PLAN_WORDS[step]:
        assert word in out


def test_make_gpu_proof_without_cuda_prints_both_plans_and_exits_0() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    before = sorted((REPO / "bench" / "results").iterdir())
    proc = subprocess.run(["make", "-s", "gpu-proof", f"GPU_PYTHON={sys.executable}"], capture_output=True,
                          text=True, env=_no_cuda_env(), cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("GPU proof plan (no CUDA here") == 2 and "nothing was run" in proc.stdout
    for words in PLAN_WORDS.values():
        assert all(word in proc.stdout for word in words)
    assert sorted((REPO / "bench" / "results").iterdir()) == before  # nothing written


def _parts(folder: Path, wheel: bytes, size: int = 4) -> None:
    """Parts as `make gpu-parts` writes them: `split -b SIZE -d -a 2` pieces and `sha256sum` lines."""
    folder.mkdir()
    name = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    lines = [f"{hashlib.sha256(wheel).hexdigest()}  {name}"]
    for index in range(0, len(wheel), size):
        part = f"{name}.part-{index // size:02d}"
        (folder / part).write_bytes(wheel[index:index + size])
        lines.append(f"{hashlib.sha256(wheel[index:index + size]).hexdigest()}  {part}")
    (folder / "mnist_5k.csv.gz").write_bytes(b"csv")
    lines.append(f"{hashlib.sha256(b'csv').hexdigest()}  mnist_5k.csv.gz")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_parts_are_checked_and_rejoined(proof, tmp_path) -> None:
    wheel = bytes(range(11)) * 3
    _parts(tmp_path / "parts", wheel)
    joined = proof.assemble_wheel(tmp_path / "parts", tmp_path / "work")
    assert joined.name.endswith(".whl") and joined.read_bytes() == wheel


def test_a_missing_or_damaged_part_is_named(proof, tmp_path) -> None:
    _parts(tmp_path / "parts", bytes(range(30)))
    part = sorted((tmp_path / "parts").glob("*.part-*"))[2]
    part.write_bytes(b"xx")
    with pytest.raises(proof.ProofError, match=f"{part.name} does not match its sha256"):
        proof.assemble_wheel(tmp_path / "parts", tmp_path / "work")
    part.unlink()
    with pytest.raises(proof.ProofError, match=f"parts missing in .*: {part.name} "):
        proof.assemble_wheel(tmp_path / "parts", tmp_path / "work")
    with pytest.raises(proof.ProofError, match="SHA256SUMS is missing: run `make gpu-parts`"):
        proof.assemble_wheel(tmp_path / "nowhere", tmp_path / "work")


def test_parity_numbers(proof) -> None:
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    same = proof.parity(ref, ref, np.array([0, 1]))
    assert same == {"max_abs": 0.0, "max_abs_rel": 0.0, "cosine": pytest.approx(1.0), "top1_agreement": 1.0,
                    "accuracy": 1.0}
    off = proof.parity(np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]), ref, np.array([0, 0]))
    assert off["max_abs"] == 1.0 and off["max_abs_rel"] == 0.5 and off["top1_agreement"] == 0.5
    assert off["cosine"] == pytest.approx(0.5) and off["accuracy"] == 0.0


def test_the_two_steps_merge_into_one_report(proof, tmp_path) -> None:
    env = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "torch": "2.11.0+cu130", "cuda": "13.0",
           "python": "3.12.3", "host": "gpu-box"}
    latency = {str(b): {"median_ms": 0.5 * b, "min_ms": 0.4 * b} for b in proof.BATCHES}
    good = {"activate_s": 1.0, "parity": proof.parity(np.eye(3), np.eye(3), np.arange(3)), "latency": latency}
    model = {"weights": "untrained weights (seed 0)", "input_shape": [1, 28, 28], "images": "digits5k"}
    torch_step = {"pytest": {"command": "-m pytest -m gpu -q", "exit_code": 0, "summary": "9 passed"},
                  "models": {"lenet_bn": {**model, "cells": {"eager-cuda": good,
                                                             "aoti-cuda": {"skipped": "step time budget"}}}}}
    ort_step = {"wheel": "onnxruntime_gpu.whl", "onnxruntime": {"version": "1.31.1", "providers": ["CUDA"]},
                "models": {"lenet_bn": {**model, "cells": {"ort-cuda-fp32": good}}}}
    proof.write_report("torch", torch_step, env, tmp_path / "results", today="2026-11-27", spare=tmp_path / "tmp")
    shutil.rmtree(tmp_path / "results")  # a later call on the lent machine gets a fresh copy of the repository
    md, js = proof.write_report("ort", ort_step, env, tmp_path / "results", tmp_path / "out", today="2026-11-27",
                                spare=tmp_path / "tmp")
    assert md.name == "nvidia-h200-2026-11-27.md" and js.name == "nvidia-h200-2026-11-27.json"
    data = json.loads(js.read_text())
    assert set(data["steps"]) == {"torch", "ort"} and data["environment"]["gpu"] == "NVIDIA H200"
    text = md.read_text()
    assert "`pytest -m gpu -q`: 9 passed (exit 0)" in text and "onnxruntime 1.31.1" in text
    assert "| eager-cuda | 1.0 |" in text and "| ort-cuda-fp32 | 1.0 |" in text
    assert "| aoti-cuda | step time budget |" in text and "| 128.000 |" in text
    assert (tmp_path / "out" / md.name).read_text() == text
