"""`exporter bench`: statistics, the GEMM-peak probe, the timing run on a tiny build, bad input."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from exporter import bench
from exporter.backends import BACKENDS
from exporter.backends.base import Artifact, Runner
from exporter.bench import BenchSettings, BenchTarget
from exporter.cli import main
from tests.conftest import TEST_NUM_CLASSES

TINY_MODEL = "lenet"
TINY_SHAPE = (1, 28, 28)
FAST = dict(warmup=1, min_runs=3, max_runs=30, budget_s=0.02, block_s=0.005, gemm_size=128)


def _export_onnx(path: Path, *, dynamic: bool = True) -> None:
    """A small ONNX file of the tiny model (TorchScript exporter: fast, enough for a latency test)."""
    import torch

    from exporter.models import create_model

    net = create_model(TINY_MODEL, num_classes=TEST_NUM_CLASSES).eval()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, *TINY_SHAPE),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes)


def make_tiny_build(root: Path, model: str = TINY_MODEL, *, onnx: bool = False, static_onnx: bool = False) -> Path:
    """Write `root/<model>/b1` (weights, manifest, `latest` link) as `exporter build` lays it out.

    Artifacts: eager fp32 and bf16, plus ONNX Runtime fp32 (`onnx`) and a batch-1-only ONNX (`static_onnx`).
    """
    import torch
    from safetensors.torch import save_file

    from exporter.manifest import file_entries, point_latest, write_json_atomic
    from exporter.models import create_model

    build = root / model / "b1"
    build.mkdir(parents=True)
    torch.manual_seed(0)
    net = create_model(model, num_classes=TEST_NUM_CLASSES).eval()
    save_file(net.state_dict(), str(build / "weights.safetensors"))
    options = {"model": model, "in_channels": TINY_SHAPE[0], "num_classes": TEST_NUM_CLASSES}
    artifacts = [Artifact("eager", "eager", "weights.safetensors", "fp32", options=options),
                 Artifact("eager-bf16", "eager", "weights.safetensors", "bf16", options=options)]
    if onnx:
        _export_onnx(build / "model.onnx")
        artifacts.append(Artifact("onnx-fp32", "onnxruntime", "model.onnx", "fp32"))
    if static_onnx:
        _export_onnx(build / "model.b1.onnx", dynamic=False)
        artifacts.append(Artifact("onnx-static", "onnxruntime", "model.b1.onnx", "fp32"))
    manifest = {"format": 1, "build_id": "b1", "model": model, "num_classes": TEST_NUM_CLASSES,
                "in_channels": TINY_SHAPE[0], "input_shape": list(TINY_SHAPE), "untrained": True,
                "files": file_entries(build), "artifacts": [a.to_dict() for a in artifacts]}
    write_json_atomic(build / "manifest.json", manifest)
    point_latest(build.parent, build)
    return build


def _need(backend: str) -> None:
    reason = BACKENDS[backend].unavailable_reason("cpu") if backend in BACKENDS else f"{backend} not registered"
    if reason:
        pytest.skip(reason)


# --- statistics ---------------------------------------------------------------------------------------------


def test_latency_stats_on_known_samples() -> None:
    stats = bench.latency_stats(list(range(1, 101)))  # 1..100 ms
    assert stats["n"] == 100 and stats["min_ms"] == 1.0
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["stdev_ms"] == pytest.approx(29.011491975882016)
    assert stats["cv"] == pytest.approx(29.011491975882016 / 50.5)


def test_latency_stats_edge_cases() -> None:
    one = bench.latency_stats([2.5])
    assert one["p50_ms"] == one["p99_ms"] == 2.5 and one["stdev_ms"] == 0.0 and one["cv"] == 0.0
    skewed = bench.latency_stats([1.0] * 98 + [10.0, 10.0])
    assert skewed["p50_ms"] == 1.0 and skewed["p99_ms"] == pytest.approx(10.0)
    assert bench.is_unstable(skewed) and not bench.is_unstable(bench.latency_stats([1.0, 1.01, 0.99]))
    for bad in ([], [1.0, float("nan")], [-1.0]):
        with pytest.raises(ValueError):
            bench.latency_stats(bad)


def test_overhead_verdict_uses_the_larger_of_3_percent_and_20_us() -> None:
    assert bench.overhead_verdict(0.110, 0.100)["overhead_ok"]  # +10 µs on 100 µs: within 20 µs
    assert not bench.overhead_verdict(0.150, 0.100)["overhead_ok"]  # +50 µs
    assert bench.overhead_verdict(103.0, 100.0)["overhead_ok"]  # +3 % exactly
    slow = bench.overhead_verdict(110.0, 100.0)
    assert not slow["overhead_ok"] and slow["overhead_pct"] == pytest.approx(10.0)


def test_peak_class_per_precision() -> None:
    assert bench.peak_class("fp32") == bench.peak_class("tf32") == "fp32"
    assert bench.peak_class("bf16") == bench.peak_class("fp16") == "bf16"
    assert bench.peak_class("int8") is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gemm_peak_probe_is_positive_and_finite(precision: str) -> None:
    gflops = bench.gemm_peak_gflops(precision, size=128, repeats=2)
    assert math.isfinite(gflops) and gflops > 0


def test_machine_info_and_slug() -> None:
    info = bench.machine_info()
    assert info["cpu"] and info["usable_cores"] >= 1
    slug = bench.machine_slug(info)
    assert slug and all(ch.isalnum() or ch == "-" for ch in slug) and slug.endswith(f"{info['usable_cores']}c")
    assert bench.library_versions()["torch"]


# --- the timing run ----------------------------------------------------------------------------------------


def test_bench_tiny_build_two_backends(tmp_path: Path) -> None:
    _need("onnxruntime")
    from exporter.manifest import load_build

    make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    results = bench.bench_build(build, BenchSettings(batch_sizes=(1, 4), threads=1, **FAST))
    cells = {(c["artifact"], c["batch"]): c for c in results["cells"]}
    assert set(cells) == {(a, b) for a in ("eager", "eager-bf16", "onnx-fp32") for b in (1, 4)}
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        assert cell["n"] >= 3 and 0 < cell["min_ms"] <= cell["p50_ms"] <= cell["p99_ms"]
        assert cell["throughput_ips"] > 0 and cell["gflops"] > 0 and cell["first_call_ms"] > 0
        assert cell["threads"] == 1 and cell["memory"]["peak_mb"] > 0
    assert cells[("eager-bf16", 1)]["executed_precision"] == "bf16"
    assert cells[("eager-bf16", 1)]["peak_class"] == "bf16"
    assert cells[("eager", 1)]["parity"]["status"] == "reference"
    assert cells[("onnx-fp32", 1)]["parity"]["status"] == "unverified"
    # the bare-call twin runs at the smallest batch only
    assert "overhead_us" in cells[("onnx-fp32", 1)] and "onnxruntime" in cells[("onnx-fp32", 1)]["bare_call"]
    assert "overhead_us" in cells[("eager", 1)] and "overhead_us" not in cells[("eager", 4)]
    saved = json.loads((build.dir / bench.BENCH_FILE).read_text())
    assert saved["peaks_gflops"]["fp32"] > 0 and len(saved["cells"]) == 6
    assert load_build(TINY_MODEL, tmp_path).manifest["bench"]["file"] == bench.BENCH_FILE


def test_failing_cell_is_recorded_and_others_continue(tmp_path: Path) -> None:
    _need("onnxruntime")
    from exporter.manifest import load_build

    make_tiny_build(tmp_path, static_onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    build.manifest["artifacts"].append(Artifact("gone", "eager", "missing.safetensors", "fp32").to_dict())
    results = bench.bench_build(build, BenchSettings(batch_sizes=(1, 3), **FAST), backends=["onnxruntime", "gone"],
                                save=False)
    cells = {(c["artifact"], c["batch"]): c for c in results["cells"]}
    assert cells[("onnx-static", 1)]["status"] == "ok"
    assert cells[("onnx-static", 3)]["status"] == "failed" and cells[("onnx-static", 3)]["error"]
    assert cells[("gone", 1)]["status"] == "failed" and "does not exist" in cells[("gone", 1)]["error"]


class _StatefulRunner(Runner):
    """Like TensorRT / ORT I/O binding: `prepare` binds the input on the runner, `run` uses the binding."""

    backend = "stateful-test"
    calls = 0

    def activate_impl(self) -> None:
        self.bound = None

    def prepare_impl(self, batch: np.ndarray):
        self.bound = batch
        return batch

    def run_impl(self, prepared):
        if self.bound is not prepared:
            raise RuntimeError("runner state belongs to another input")
        type(self).calls += 1
        if prepared.shape[0] == self.options.get("crash_batch") and type(self).calls > self.options["crash_after"]:
            raise RuntimeError("device lost")
        return np.zeros((prepared.shape[0], 3), np.float32)


def _fake_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options) -> list[BenchTarget]:
    (tmp_path / "fake.bin").write_bytes(b"x")
    monkeypatch.setattr(bench, "get_backend", lambda name: _StatefulRunner)  # not registered: no test leakage
    _StatefulRunner.calls = 0
    return [BenchTarget(Artifact("fake", "stateful-test", "fake.bin", "fp32", options=options), tmp_path)]


def test_runner_state_is_rebound_for_each_batch_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    targets = _fake_targets(tmp_path, monkeypatch)
    results = bench.run_bench(targets, input_shape=TINY_SHAPE, macs_per_image=None, peaks={"fp32": 1.0},
                              settings=BenchSettings(batch_sizes=(1, 2, 5), overhead=False, **FAST))
    assert [c["status"] for c in results["cells"]] == ["ok", "ok", "ok"], results["cells"]
    assert results["rounds"] >= 1 and all(c["n"] >= 3 for c in results["cells"])


def test_backend_crashing_mid_run_keeps_the_other_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    targets = _fake_targets(tmp_path, monkeypatch, crash_batch=2, crash_after=40)
    results = bench.run_bench(targets, input_shape=TINY_SHAPE, macs_per_image=None, peaks={"fp32": 1.0},
                              settings=BenchSettings(batch_sizes=(1, 2), overhead=False, **{**FAST, "min_runs": 30}))
    ok, crashed = results["cells"]
    assert ok["status"] == "ok" and ok["n"] >= 30
    assert crashed["status"] == "failed" and "device lost" in crashed["error"] and "timed calls" in crashed["error"]


def test_batch_that_does_not_fit_memory_is_a_failed_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.manifest import load_build

    make_tiny_build(tmp_path)
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 2 * 2**20)  # 2 MiB: batch 1 fits, 64 does not
    results = bench.bench_build(load_build(TINY_MODEL, tmp_path), BenchSettings(batch_sizes=(1, 64), **FAST),
                                backends=["eager"], save=False)
    cells = {(c["artifact"], c["batch"]): c for c in results["cells"]}
    assert cells[("eager", 1)]["status"] == "ok"
    assert cells[("eager", 64)]["status"] == "failed" and "out of memory (not run)" in cells[("eager", 64)]["error"]


def test_cuda_without_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    make_tiny_build(tmp_path)
    assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err


@pytest.mark.gpu
def test_cuda_events_path(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    from exporter.manifest import load_build

    make_tiny_build(tmp_path)
    build = load_build(TINY_MODEL, tmp_path)
    results = bench.bench_build(build, BenchSettings(batch_sizes=(1,), device="cuda", **FAST), backends=["eager"],
                                save=False)
    cell = next(c for c in results["cells"] if c["artifact"] == "eager")
    assert cell["status"] == "ok" and cell["transfers"]["h2d_ms"] >= 0 and cell["memory"]["kind"] == "cuda allocated"


def test_cli_bench_json_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_build(tmp_path)
    args = ["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--batch-sizes", "2", "--warmup", "1",
            "--min-runs", "3", "--budget", "0.01", "--gemm-size", "128", "--backends", "eager", "--json"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [c["batch"] for c in results["cells"]] == [2, 2] and results["settings"]["warmup"] == 1
    with pytest.raises(SystemExit) as exc:
        main(["bench", TINY_MODEL, "--batch-sizes", "0,8"])
    assert exc.value.code == 2
    capsys.readouterr()
    assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--backends", "onnxruntim"]) == 2
    assert "did you mean onnxruntime" in capsys.readouterr().err
    assert main(["bench", "--all", TINY_MODEL]) == 2


def test_settings_reject_nonsense() -> None:
    for bad in (dict(batch_sizes=()), dict(batch_sizes=(0,)), dict(threads=0), dict(min_runs=5, max_runs=2),
                dict(device="tpu")):
        with pytest.raises(bench.UsageError):
            BenchSettings(**bad)


# --- parity status and tuning ------------------------------------------------------------------------------


def test_parity_status_reads_verify_results(tmp_path: Path) -> None:
    document = {"samples": 200, "reference": {"artifact": "eager", "accuracy": 0.90}, "results": [
        {"artifact": "onnx-fp32", "status": "pass", "sets": [
            {"name": "real", "metrics": {"n": 200, "flipped": 1, "accuracy": 0.895, "reference_accuracy": 0.90,
                                         "max_abs": 1e-5}},
            {"name": "zeros", "metrics": {"n": 4, "flipped": 0, "max_abs": 3e-5}}]},
        {"artifact": "openvino-bf16", "status": "fail", "reason": "max abs 0.4 > 0.25", "sets": []},
        {"artifact": "trt", "status": "not run", "reason": "no GPU", "sets": []}]}
    (tmp_path / bench.PARITY_FILE).write_text(json.dumps(document))
    onnx = bench.parity_status({}, tmp_path, "onnx-fp32")
    assert onnx["status"] == "pass" and onnx["flips"] == 1 and onnx["flip_rate"] == pytest.approx(0.005)
    assert onnx["acc_drop"] == pytest.approx(0.5) and onnx["max_abs_error"] == pytest.approx(3e-5)
    assert bench.parity_status({}, tmp_path, "openvino-bf16")["reason"] == "max abs 0.4 > 0.25"
    assert bench.parity_status({}, tmp_path, "trt")["status"] == "not run"
    assert bench.parity_status({}, tmp_path, "eager")["status"] == "reference"
    assert bench.parity_status({}, tmp_path, "other")["status"] == "unverified"
    manifest_only = {"verify": {"results": {"x": "fail"}}}
    assert bench.parity_status(manifest_only, tmp_path / "nowhere", "x")["status"] == "fail"


def test_tuning_space_covers_the_runtime_knobs() -> None:
    ort = bench.tuning_space(Artifact("o", "onnxruntime", "m.onnx", "fp32"), device="cpu", threads=2)
    assert {"opt=extended", "opt=basic", "intra=1"} <= {label for label, _ in ort}
    ov = bench.tuning_space(Artifact("v", "openvino", "m.xml", "fp32"), device="cpu", threads=2,
                            bf16_parity={"status": "pass"})
    labels = {label for label, _ in ov}
    assert {"hint=LATENCY", "hint=THROUGHPUT", "bf16"} <= labels
    no_bf16 = bench.tuning_space(Artifact("v", "openvino", "m.xml", "fp32"), device="cpu", threads=2,
                                 bf16_parity={"status": "fail"})
    assert "bf16" not in {label for label, _ in no_bf16}
    assert bench.tuning_space(Artifact("e", "eager", "w", "fp32"), device="cpu", threads=2) == []


def test_tune_records_winners_and_bench_uses_them(tmp_path: Path) -> None:
    _need("onnxruntime")
    from exporter.manifest import load_build

    make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    settings = BenchSettings(batch_sizes=(1,), **FAST)
    tuning = bench.tune_build(build, settings, backends=["onnxruntime"])
    entry = load_build(TINY_MODEL, tmp_path).manifest["tuning"]["artifacts"]["onnx-fp32"]
    assert entry == json.loads(json.dumps(tuning["artifacts"]["onnx-fp32"]))
    assert len(entry["candidates"]) >= 4 and entry["default_p50_ms"] > 0
    assert all(c["status"] == "ok" for c in entry["candidates"])
    # force a winner, as a run on a quieter machine would record, and check bench adds the tuned variant
    from exporter.manifest import update_manifest

    update_manifest(build, "tuning", {**tuning, "artifacts": {"onnx-fp32": {
        **entry, "variant": "opt=basic", "options": {"graph_optimization_level": "basic"}}}})
    targets = bench.targets_for_build(load_build(TINY_MODEL, tmp_path), ["onnxruntime"])
    assert [t.label for t in targets] == ["onnx-fp32", "onnx-fp32+tuned"]
    assert targets[1].make_runner("cpu", 2).options == {"graph_optimization_level": "basic",
                                                        "intra_op_num_threads": 2}
    assert isinstance(targets[1], BenchTarget) and np.isfinite(entry["default_p50_ms"])


def test_bench_raises_dynamo_graph_limit() -> None:
    import torch._dynamo

    # config.patch restores the value on exit (monkeypatch's undo can delete a Dynamo config key instead)
    with torch._dynamo.config.patch(recompile_limit=8):
        bench._allow_compiled_graphs(bench.RECOMPILE_LIMIT)
        assert torch._dynamo.config.recompile_limit == bench.RECOMPILE_LIMIT


def test_warnings_for_untrustworthy_runs() -> None:
    cells = [{"label": "a", "pct_of_peak": 150.0, "unstable": True}, {"label": "b", "pct_of_peak": 50.0}]
    warnings = bench._warnings(cells)
    assert len(warnings) == 2 and "exceed the measured GEMM peak (a)" in warnings[0] and "1 of 2" in warnings[1]
    assert bench._warnings([{"label": "b", "pct_of_peak": 50.0, "unstable": False}]) == []
