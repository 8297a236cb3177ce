"""AOTInductor: the package runs in a fresh Python process that never imports the model code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.backends import RunnerError, runner_for
from tests.export_builds import FAST_MODELS, MAX_BATCH, full_build  # noqa: F401  (fixture)

FRESH_PROCESS = """
import json, sys
import numpy as np, torch, torch._inductor
package = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.inference_mode():
    out = package(x)
out = out[0] if isinstance(out, (list, tuple)) else out
np.save(sys.argv[3], out.numpy())
print(json.dumps(sorted(m for m in sys.modules if m == "exporter" or m.startswith("exporter."))))
"""


def _aoti(result):
    from exporter.manifest import artifact_from_entry

    entries = [a for a in result.manifest["artifacts"] if a["backend"] == "aoti"]
    if not entries:
        pytest.skip(next((s["reason"] for s in result.manifest["skipped"] if s["backend"] == "aoti"), "no aoti"))
    return artifact_from_entry(entries[0])


def test_package_runs_in_a_fresh_process_without_model_code(full_build, tmp_path: Path) -> None:
    result = full_build(FAST_MODELS[0])
    artifact = _aoti(result)
    images = np.random.default_rng(0).random((5, *result.manifest["input_shape"]), dtype=np.float32)
    np.save(tmp_path / "in.npy", images)
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can make `exporter` importable
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS, str(result.build_dir / artifact.path),
                           str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    with runner_for(_eager(result), result.build_dir) as eager:
        want = eager.infer(images)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=0, atol=1e-4)


def _eager(result):
    from exporter.manifest import artifact_from_entry

    return artifact_from_entry(result.manifest["artifacts"][0])


def test_batch_outside_the_compiled_range_is_one_line(full_build) -> None:
    result = full_build(FAST_MODELS[0])
    with runner_for(_aoti(result), result.build_dir) as runner:
        too_big = np.zeros((MAX_BATCH + 1, *result.manifest["input_shape"]), np.float32)
        with pytest.raises(RunnerError, match=f"compiled for batches 1..{MAX_BATCH}, got batch {MAX_BATCH + 1}"):
            runner.infer(too_big)
