"""The Runner protocol, for every registered backend × the cheap models, on the artifacts of a real build.

Parametrized over `exporter.backends.BACKENDS`, so a new backend is tested here with no new code: each of its
artifacts in the build must run batches 1 and 7 (dynamic batch) and match eager fp32 within the judge's tolerance
class of the precision it really uses, misuse must raise `RunnerError` with one line, and the hooks other stages
call (`bare_call_impl` for bench, `tuning_candidates` for --tune, `layer_outputs` for bisection) must keep their
contract. Backends that cannot run here are skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from exporter.backends import BACKENDS, RunnerError, Variant, runner_for
from exporter.backends.base import Artifact, BisectionUnsupported
from exporter.judge import compute_metrics, judge, judged_class, tolerance_for
from tests.export_builds import FAST_MODELS, full_build, model_params  # noqa: F401  (fixture)


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
                    else:  # the judge's class of what it really uses (top-1 of random inputs is not judged)
                        klass, _ = judged_class(artifact.precision, runner.executed_precision)
                        tol = tolerance_for(klass)
                        failures = judge(want, got, compute_metrics(want, got, rel_floor=tol.rel_floor), tol,
                                         check_agreement=False)
                        assert not failures, (artifact.name, failures)
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


# --- the hooks other stages call ----------------------------------------------------------------------------------


def _available(backend: str) -> None:
    reason = BACKENDS[backend].unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bare_call_of_an_active_runner_is_a_callable_or_none(full_build, backend: str) -> None:
    """What `exporter bench` times beside `run` to measure the runner's overhead."""
    _available(backend)
    result = full_build(FAST_MODELS[0])
    artifact = _artifacts(result, backend)[0]
    batch = _images(result, 2)
    with runner_for(artifact, result.build_dir) as runner:
        call = runner.bare_call_impl(runner.prepare(batch))
        assert call is None or callable(call)
        if call is not None:  # callable with no argument, any number of times, on the active runtime
            call()
            call()
        assert runner.infer(batch).shape == (2, result.manifest["num_classes"])  # the runner is unharmed


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_tuning_candidates_are_options_the_runner_accepts(full_build, backend: str) -> None:
    """Each candidate is a (label, options) pair; its runner can be built (and, for the quick runtimes, activated
    and run) with those options on top of the artifact's own — as `bench --tune` will."""
    _available(backend)
    result = full_build(FAST_MODELS[0])
    artifacts = _artifacts(result, backend)
    cls = BACKENDS[backend]
    batch = _images(result, 2)
    for artifact in artifacts:
        candidates = cls.tuning_candidates(artifact, device="cpu", threads=2, allow_bf16=True)
        assert isinstance(candidates, list)
        labels = [label for label, _ in candidates]
        assert len(set(labels)) == len(labels), labels
        for label, options in candidates:
            assert isinstance(label, str) and label and isinstance(options, dict) and options
            variant = Variant(artifact, label, options)
            runner = variant.runner(result.build_dir, threads=2)
            for key, value in options.items():  # kept as a runner option, or as the attribute of that name
                assert runner.options.get(key, getattr(runner, key, None)) == value, (label, key)
            if backend in ("onnxruntime", "openvino"):  # compiling every inductor candidate takes minutes
                with runner:
                    assert runner.infer(batch).shape == (2, result.manifest["num_classes"]), label
        assert cls.tuning_candidates(artifact, device="cpu", threads=1, allow_bf16=False) is not None


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_layer_outputs_map_module_names_or_say_unsupported(full_build, backend: str) -> None:
    """Bisection's hook: PyTorch module name → outputs, or BisectionUnsupported with one line."""
    _available(backend)
    from exporter.backends.eager import load_torch_model

    result = full_build(FAST_MODELS[0])
    artifact = _artifacts(result, backend)[0]
    eager = _eager(result)
    model = load_torch_model(result.build_dir / eager.path, **eager.options)
    modules = {name for name, _ in model.named_modules()}
    onnx = next((a for a in result.manifest["artifacts"] if a["name"] == "onnx-fp32"), None)
    source = result.build_dir / onnx["path"] if onnx else None
    with runner_for(artifact, result.build_dir) as runner:
        try:
            found, method = runner.layer_outputs(_images(result, 2), onnx_source=source, scope_source=source,
                                                 reference_model=model)
        except BisectionUnsupported as exc:
            assert str(exc) and "\n" not in str(exc)
            return
    assert found and set(found) <= modules and method
    assert all(isinstance(v, list) and all(o.shape[0] == 2 for o in v) for v in found.values())
