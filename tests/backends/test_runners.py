"""The Runner protocol, for every registered backend × the cheap models, on the artifacts of a real build.

Parametrized over `exporter.backends.BACKENDS`, so a new backend is tested here with no new code: each of its
artifacts in the build must run batches 1 and 7 (dynamic batch) and match eager fp32 within the tolerance of its
precision, and misuse must raise `RunnerError` with one line. Backends that cannot run here are skipped with the
reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.backends import BACKENDS, RunnerError, runner_for
from exporter.backends.base import Artifact
from exporter.export import PARITY_RTOL
from tests.export_builds import full_build, model_params  # noqa: F401  (fixture)


def _artifacts(result, backend: str) -> list[Artifact]:
    from exporter.manifest import artifact_from_entry

    found = [artifact_from_entry(a) for a in result.manifest["artifacts"] if a["backend"] == backend]
    if not found:
        reason = BACKENDS[backend].unavailable_reason("cpu")
        skipped = [s["reason"] for s in result.manifest["skipped"] if s["backend"] in backend]
        pytest.skip(reason or (skipped[0] if skipped else f"the build produced no {backend} artifact on this machine"))
    return found


def _images(result, n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, *result.manifest["input_shape"]), dtype=np.float32)


@pytest.mark.parametrize("model", model_params())
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_dynamic_batch_1_and_7_match_eager(full_build, backend: str, model: str) -> None:
    result = full_build(model)
    artifacts = _artifacts(result, backend)
    eager = runner_for(_eager(result), result.build_dir).activate()
    try:
        for artifact in artifacts:
            with runner_for(artifact, result.build_dir) as runner:
                for n in (1, 7):
                    batch = _images(result, n)
                    want = eager.infer(batch)
                    got = runner.infer(batch)
                    assert got.shape == want.shape == (n, result.manifest["num_classes"]), artifact.name
                    assert got.dtype == np.float32
                    if artifact.precision == "int8":  # logits differ by design; judged on real images by parity
                        assert np.isfinite(got).all(), artifact.name
                    else:
                        tol = PARITY_RTOL[artifact.precision] * max(1.0, float(np.abs(want).max()))
                        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=artifact.name)
    finally:
        eager.deactivate()


def _eager(result) -> Artifact:
    from exporter.manifest import artifact_from_entry

    return artifact_from_entry(next(a for a in result.manifest["artifacts"] if a["backend"] == "eager"))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_misuse_is_a_runner_error(full_build, backend: str) -> None:
    result = full_build(model_params()[0].values[0])
    artifact = _artifacts(result, backend)[0]
    runner = runner_for(artifact, result.build_dir)
    good = _images(result, 2)
    with pytest.raises(RunnerError, match="activate"):
        runner.infer(good)
    with runner:
        with pytest.raises(RunnerError, match="float32"):
            runner.infer(good.astype(np.float64))
        with pytest.raises(RunnerError, match="4-D"):
            runner.infer(good[0])
        assert runner.infer(good).shape[0] == 2  # still usable after refused input
    assert not runner.is_active
    with pytest.raises(RunnerError, match="activate"):
        runner.infer(good)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_missing_artifact_file(tmp_path, backend: str) -> None:
    cls = BACKENDS[backend]
    reason = cls.unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)
    runner = cls(tmp_path / "missing.file", model="lenet", in_channels=1, num_classes=7) if backend in (
        "eager", "inductor") else cls(tmp_path / "missing.file")
    with pytest.raises(RunnerError, match="does not exist"):
        runner.activate()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_unavailable_reason_is_none_or_one_line(backend: str) -> None:
    for device in ("cpu", "cuda"):
        reason = BACKENDS[backend].unavailable_reason(device)
        assert reason is None or (isinstance(reason, str) and reason and "\n" not in reason)
