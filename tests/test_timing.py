"""`exporter/timing.py`: the one timing method — statistics, settings, the interleaved timed run, re-measuring
unstable cells, the bare-call overhead, CUDA transfer timing, failures that do not stop the run.

The run is exercised with test-only runners (registered for the test's duration); where a test needs exact
latencies the clock is replaced by one that reports what the runner says its call took, so nothing here depends
on how busy the machine is.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter import timing
from exporter.backends import BACKENDS, Artifact, Variant
from exporter.backends.base import Runner
from exporter.errors import UsageError
from exporter.results import BENCH_FORMAT, ParityRecord
from exporter.timing import BenchSettings, BenchTarget

SHAPE = (1, 4, 4)
FAST = dict(warmup=1, min_runs=3, max_runs=30, budget_s=0.02, block_s=0.005, gemm_size=128)
PEAKS = {"fp32": 100.0, "bf16": 200.0, "best": {"fp32": "torch", "bf16": "torch"}}


# --- statistics ---------------------------------------------------------------------------------------------


def test_latency_stats_on_known_samples() -> None:
    stats = timing.latency_stats(list(range(1, 101)))  # 1..100 ms
    assert stats["n"] == 100 and stats["min_ms"] == 1.0
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["stdev_ms"] == pytest.approx(29.011491975882016)
    assert stats["cv"] == pytest.approx(29.011491975882016 / 50.5)


def test_latency_stats_edge_cases() -> None:
    one = timing.latency_stats([2.5])
    assert one["p50_ms"] == one["p99_ms"] == 2.5 and one["stdev_ms"] == 0.0 and one["cv"] == 0.0
    skewed = timing.latency_stats([1.0] * 98 + [10.0, 10.0])
    assert skewed["p50_ms"] == 1.0 and skewed["p99_ms"] == pytest.approx(10.0)
    assert timing.is_unstable(skewed) and not timing.is_unstable(timing.latency_stats([1.0, 1.01, 0.99]))
    for bad in ([], [1.0, float("nan")], [-1.0]):
        with pytest.raises(ValueError):
            timing.latency_stats(bad)


def test_overhead_verdict_uses_the_larger_of_3_percent_and_20_us() -> None:
    assert timing.overhead_verdict(0.110, 0.100)["overhead_ok"]  # +10 µs on 100 µs: within 20 µs
    assert not timing.overhead_verdict(0.150, 0.100)["overhead_ok"]  # +50 µs
    assert timing.overhead_verdict(103.0, 100.0)["overhead_ok"]  # +3 % exactly
    slow = timing.overhead_verdict(110.0, 100.0)
    assert not slow["overhead_ok"] and slow["overhead_pct"] == pytest.approx(10.0)


def test_peak_class_per_precision() -> None:
    assert timing.peak_class("fp32") == timing.peak_class("tf32") == "fp32"
    assert timing.peak_class("bf16") == timing.peak_class("fp16") == "bf16"
    assert timing.peak_class("int8") == "int8"  # against the int8 matmul's GOP/s
    assert timing.peak_class("fp8") is None


@pytest.mark.parametrize("bad, needle", [
    (dict(batch_sizes=()), "batch sizes"), (dict(batch_sizes=(0,)), "batch sizes"), (dict(threads=0), "--threads"),
    (dict(min_runs=5, max_runs=2), "min_runs"), (dict(device="tpu"), "unknown device"),
    (dict(gemm_size=32), "--gemm-size"), (dict(gemm_size=20000), "--gemm-size"),
    (dict(budget_s=float("inf")), "--budget"), (dict(budget_s=float("nan")), "--budget"),
    (dict(block_s=0.0), "--budget"), (dict(warmup=-1), "warmup"),
    (dict(settle_s=-0.01), "settle_s"), (dict(settle_s=float("nan")), "settle_s"),
])
def test_settings_reject_nonsense(bad: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        BenchSettings(**bad)


def test_threads_are_limited_by_the_cores() -> None:
    from exporter.machine import usable_cores

    limit = timing.MAX_THREADS_PER_CORE * usable_cores()
    assert BenchSettings(threads=limit).threads == limit
    with pytest.raises(UsageError, match=f"at most {limit}"):
        BenchSettings(threads=limit + 1)
    assert BenchSettings(batch_sizes=(8, 1, 8)).batch_sizes == (1, 8)


def test_cuda_without_gpu_is_a_bench_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(timing.BenchError, match="no CUDA device"):
        timing.check_device("cuda")
    timing.check_device("cpu")


def test_activation_bytes_count_every_leaf_output() -> None:
    import torch

    from exporter.models import create_model

    net = create_model("lenet", num_classes=7).eval()
    expected = []
    hooks = [m.register_forward_hook(lambda m, i, o: expected.append(o.numel() * 4))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    with torch.device("meta"):  # as `bench.model_costs` calls it: nothing is allocated or computed
        meta = create_model("lenet", num_classes=7).eval()
    assert timing.activation_bytes_per_image(meta, (1, 28, 28)) == sum(expected) > 0


# --- the timed run, with test runners ----------------------------------------------------------------------------

LAST_MS = {"value": 1.0}


class ScriptedRunner(Runner):
    """Returns zeros; each call "takes" the next latency of its `latencies` option (read by `ScriptedClock`).

    `prepare` binds the input on the runner (like TensorRT / ORT I/O binding) and `run` checks the binding;
    `crash_batch` / `crash_after` make it fail mid-run; `bare` chooses what `bare_call_impl` returns.
    """

    backend = "test_scripted"
    calls = 0

    def activate_impl(self) -> None:
        self.bound = None
        self.schedule = itertools.cycle(self.options.get("latencies") or [1.0])

    def prepare_impl(self, batch: np.ndarray) -> Any:
        self.bound = batch
        return batch

    def run_impl(self, prepared: Any) -> Any:
        if self.bound is not prepared:
            raise RuntimeError("runner state belongs to another input")
        return self._compute(prepared)

    def _compute(self, prepared: Any) -> Any:
        type(self).calls += 1
        if prepared.shape[0] == self.options.get("crash_batch") and type(self).calls > self.options["crash_after"]:
            raise RuntimeError("device lost")
        LAST_MS["value"] = next(self.schedule)
        return np.zeros((prepared.shape[0], 3), np.float32)

    @property
    def executed_precision(self) -> str:
        return self.options.get("executes") or self.precision

    def bare_call_impl(self, prepared: Any) -> Any:
        if self.options.get("bare") == "none":
            return None
        return lambda: self._compute(prepared)  # the runtime on the prepared value, none of the runner's checks


class ScriptedClock:
    """A clock that calls like the real one and reports the latency the runner scripted for the call."""

    def __init__(self, device: str) -> None:
        self.device = device

    def time_ms(self, call, sync) -> float:
        call()
        sync()
        return LAST_MS["value"]


@pytest.fixture()
def scripted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(BACKENDS, ScriptedRunner.backend, ScriptedRunner)
    ScriptedRunner.calls = 0
    (tmp_path / "fake.bin").write_bytes(b"x")
    return tmp_path


@pytest.fixture()
def scripted_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "_Clock", ScriptedClock)


def _target(build_dir: Path, name: str = "fake", *, variant: str = "default", variant_options: dict | None = None,
            parity: ParityRecord | None = None, precision: str = "fp32", **options: Any) -> BenchTarget:
    artifact = Artifact(name, ScriptedRunner.backend, "fake.bin", precision, options=options)
    return BenchTarget(Variant(artifact, variant, variant_options or {}), build_dir,
                       parity or ParityRecord("pass", source="verify"))


def _run(targets: list[BenchTarget], batches: tuple[int, ...] = (1,), **settings: Any) -> dict[str, Any]:
    return timing.run_bench(targets, input_shape=SHAPE, macs_per_image=1000, peaks=PEAKS,
                            settings=BenchSettings(batch_sizes=batches, **{**FAST, **settings}))


def test_result_document_and_cells(scripted: Path, scripted_clock) -> None:
    tuned = _target(scripted, variant="tuned", variant_options={"executes": "bf16"},
                    parity=ParityRecord("pass", source="tune", judged_as="bf16"))
    results = _run([_target(scripted), tuned], (1, 2))
    assert results["format"] == BENCH_FORMAT and results["peaks_gflops"] == PEAKS and results["rounds"] >= 1
    assert results["settings"]["batch_sizes"] == [1, 2] and results["settings"]["threads"] >= 1
    assert {"cpu", "usable_cores"} <= set(results["machine"]) and results["versions"]["torch"]
    cells = {(c["label"], c["batch"]): c for c in results["cells"]}
    assert set(cells) == {(label, b) for label in ("fake", "fake+tuned") for b in (1, 2)}
    for cell in cells.values():
        assert cell["status"] == "ok" and cell["n"] >= 3 and cell["first_call_ms"] > 0
        assert cell["memory"]["peak_mb"] > 0 and cell["unstable"] is False
    default, fast = cells[("fake", 1)], cells[("fake+tuned", 2)]
    assert default["variant"] == "default" and default["options"] == {} and default["parity"]["source"] == "verify"
    assert fast["variant"] == "tuned" and fast["options"] == {"executes": "bf16"}
    assert fast["executed_precision"] == "bf16" and fast["peak_class"] == "bf16"
    assert fast["parity"]["judged_as"] == "bf16"
    # 1000 MACs/image at batch 2 in 1 ms: 4 MFLOP/s, 0.002 % of the 200 GFLOP/s bf16 peak
    assert fast["p50_ms"] == 1.0 and fast["gflops"] == pytest.approx(0.004) and fast["throughput_ips"] == 2000
    assert fast["pct_of_peak"] == pytest.approx(0.002) and fast["peak_source"] == "torch"


@pytest.mark.parametrize("probes, expected_calls", [([0.001, 0.001, 1.0], 3), ([1.0, 1.0], 2)])
def test_a_cell_over_both_peak_probes_makes_a_third(scripted: Path, scripted_clock, monkeypatch: pytest.MonkeyPatch,
                                                    probes: list[float], expected_calls: int) -> None:
    """The peak is probed before and after the cells; a cell above it (2 MFLOP/s against 1) makes a third probe,
    and the best of the three is the peak; below it, two are enough."""
    calls = []

    def measure_peaks(**kwargs: Any) -> dict[str, Any]:
        best = max([probes[len(calls)], (kwargs.get("previous") or {}).get("fp32", 0.0)])
        calls.append(kwargs)
        return {"fp32": best, "bf16": best, "best": {"fp32": "torch", "bf16": "torch"}}

    monkeypatch.setattr(timing, "measure_peaks", measure_peaks)
    results = timing.run_bench([_target(scripted)], input_shape=SHAPE, macs_per_image=1000, peaks=None,
                               settings=BenchSettings(batch_sizes=(1,), **FAST))
    assert len(calls) == expected_calls and all(c["previous"] for c in calls[1:])
    cell = results["cells"][0]
    assert results["peaks_gflops"]["fp32"] == 1.0 and cell["pct_of_peak"] == pytest.approx(0.2)
    assert not [w for w in results["warnings"] if "exceed" in w]


def test_unstable_cell_is_measured_again_and_keeps_the_steadier_series(scripted: Path, scripted_clock,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The first series is noisy (other processes), the second steady: the steady one is kept."""
    original, phase = timing._run_rounds, {"n": 0}

    def rounds(cells, *args, **kwargs):
        phase["n"] += 1
        for cell in cells:
            if cell.runner is not None:
                cell.runner.schedule = itertools.cycle([1.0, 3.0] if phase["n"] == 1 else [1.0])
        return original(cells, *args, **kwargs)

    monkeypatch.setattr(timing, "_run_rounds", rounds)
    results = _run([_target(scripted)])
    (cell,) = results["cells"]
    assert phase["n"] == 2 and cell["remeasured"] is True
    assert cell["unstable"] is False and cell["cv"] == 0.0 and cell["p50_ms"] == 1.0
    assert not any("unstable" in w for w in results["warnings"])


def test_cell_that_stays_unstable_is_flagged_and_warned(scripted: Path, scripted_clock) -> None:
    results = _run([_target(scripted, latencies=[1.0, 3.0]), _target(scripted, "steady")])
    cells = {c["label"]: c for c in results["cells"]}
    assert cells["fake"]["unstable"] is True and cells["fake"]["remeasured"] is True
    assert cells["fake"]["cv"] > timing.UNSTABLE_CV
    assert cells["steady"]["unstable"] is False and "remeasured" not in cells["steady"]
    assert any("1 of 2 cells stayed unstable" in w and "select" in w for w in results["warnings"])


def test_bare_call_twin_measures_the_runner_overhead(scripted: Path, scripted_clock) -> None:
    results = _run([_target(scripted), _target(scripted, "nobare", bare="none"),
                    _target(scripted, "tunedfake", variant="tuned")], (1, 2))
    cells = {(c["label"], c["batch"]): c for c in results["cells"]}
    measured = cells[("fake", 1)]
    assert measured["bare_p50_ms"] == 1.0 and measured["overhead_us"] == 0.0 and measured["overhead_ok"]
    assert "bare_call_impl" in measured["bare_call"]
    assert "overhead_us" not in cells[("fake", 2)]  # the smallest batch only
    assert "no bare runtime call" in cells[("nobare", 1)]["bare_call"] and "overhead_us" not in cells[("nobare", 1)]
    assert "overhead_us" not in cells[("tunedfake+tuned", 1)]  # tuned variants: the default's twin is enough
    none = _run([_target(scripted)], overhead=False)["cells"][0]
    assert "overhead_us" not in none and "bare_call" not in none


class OtherRuntime(ScriptedRunner):
    """A second runtime (another backend name), as ONNX Runtime is to OpenVINO."""

    backend = "test_other"


@pytest.mark.parametrize("settle_s", [0.0, 0.02])
def test_switching_runtimes_settles_before_timing(scripted: Path, scripted_clock, monkeypatch: pytest.MonkeyPatch,
                                                  settle_s: float) -> None:
    """Each runtime's block after the other's starts with `settle_s` of untimed calls (with 0, one untimed call);
    the timed calls per cell and the rounds do not change."""
    monkeypatch.setitem(BACKENDS, OtherRuntime.backend, OtherRuntime)
    monkeypatch.setattr(OtherRuntime, "calls", 0)
    other = BenchTarget(Variant(Artifact("other", OtherRuntime.backend, "fake.bin", "fp32")), scripted,
                        ParityRecord("pass", source="verify"))
    # no warm-up: a block is sized by the first call's scripted 1 ms, 5 calls per 5 ms block, 20 per 20 ms budget
    results = _run([_target(scripted), other], overhead=False, warmup=0, settle_s=settle_s)
    cells = {c["label"]: c for c in results["cells"]}
    assert all(c["status"] == "ok" and c["n"] == 20 for c in cells.values()) and results["rounds"] == 4
    untimed = ScriptedRunner.calls + OtherRuntime.calls - 40 - 2 * 2  # timed; first call + output check per cell
    if settle_s == 0:
        assert untimed == 2 * 4  # one per block
    else:  # 20 ms of calls that take microseconds, in every block (the runtimes alternate)
        assert untimed > 50 * 2 * 4


def test_a_long_call_sleeps_out_another_runtimes_threads(scripted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell whose one call fills a block sleeps `settle_s` after a switch instead of calling (no call wasted)."""
    runner = ScriptedRunner(scripted / "fake.bin")
    runner.activate()
    cell = timing.Cell(target=_target(scripted), batch=1, runner=runner, block=1)
    cell.call = lambda: runner.run(runner.prepare(np.zeros((1, *SHAPE), np.float32)))
    slept: list[float] = []
    monkeypatch.setattr(timing.time, "sleep", slept.append)
    settings = BenchSettings(**FAST, settle_s=0.03)
    timing._settle(cell, settings, switched=True)
    assert slept == [0.03] and ScriptedRunner.calls == 0
    timing._settle(cell, settings, switched=False)
    assert slept == [0.03] and ScriptedRunner.calls == 0  # same runtime, one call per block: nothing to absorb
    cell.block = 5
    timing._settle(cell, settings, switched=False)
    assert ScriptedRunner.calls == 1 and slept == [0.03]


def test_runner_state_is_rebound_for_each_batch_size(scripted: Path) -> None:
    results = _run([_target(scripted)], (1, 2, 5), overhead=False)
    assert [c["status"] for c in results["cells"]] == ["ok", "ok", "ok"], results["cells"]
    assert results["rounds"] >= 1 and all(c["n"] >= 3 for c in results["cells"])


def test_backend_crashing_mid_run_keeps_the_other_results(scripted: Path) -> None:
    results = _run([_target(scripted, crash_batch=2, crash_after=40)], (1, 2), overhead=False, min_runs=30)
    ok, crashed = results["cells"]
    assert ok["status"] == "ok" and ok["n"] >= 30
    assert crashed["status"] == "failed" and "device lost" in crashed["error"] and "timed calls" in crashed["error"]


def test_artifacts_that_cannot_load_are_failed_cells(scripted: Path) -> None:
    missing = BenchTarget(Variant(Artifact("gone", ScriptedRunner.backend, "missing.bin", "fp32")), scripted)
    unavailable = BenchTarget(Variant(Artifact("trt", "tensorrt", "e.plan", "fp16", device="cuda")), scripted)
    results = _run([missing, unavailable, _target(scripted)])
    cells = {c["label"]: c for c in results["cells"]}
    assert cells["gone"]["status"] == "failed" and "does not exist" in cells["gone"]["error"]
    assert cells["trt"]["status"] == "unavailable" and cells["trt"]["error"]
    assert cells["fake"]["status"] == "ok"


def test_batch_that_does_not_fit_memory_is_a_failed_cell(scripted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "available_memory_bytes", lambda: 2 * 2**20)  # 2 MiB: batch 1 fits, 64 does not
    results = timing.run_bench([_target(scripted)], input_shape=SHAPE, macs_per_image=None, peaks=PEAKS,
                               settings=BenchSettings(batch_sizes=(1, 64), **FAST), activation_bytes=2**19)
    cells = {c["batch"]: c for c in results["cells"]}
    assert cells[1]["status"] == "ok"
    assert cells[64]["status"] == "failed" and "out of memory (not run)" in cells[64]["error"]


def test_warnings_for_untrustworthy_runs() -> None:
    peaks = {"sources": {"fp32": {"torch": 10.0}, "bf16": {}}}
    cells = [{"label": "a", "pct_of_peak": 150.0, "unstable": True}, {"label": "b", "pct_of_peak": 50.0}]
    warnings = timing._warnings(cells, peaks)
    assert len(warnings) == 2 and "exceed the best measured GEMM peak (a)" in warnings[0]
    assert "torch 10" in warnings[0] and "1 of 2" in warnings[1]
    assert timing._warnings([{"label": "b", "pct_of_peak": 50.0, "unstable": False}], peaks) == []


class BufferRunner(ScriptedRunner):
    """Like a CUDA-graph or I/O-binding runtime: each run overwrites the one output buffer, so only the output of
    the latest run may be read."""

    backend = "test_buffer"

    def activate_impl(self) -> None:
        super().activate_impl()
        self.latest = None

    def run_impl(self, prepared: Any) -> Any:
        super().run_impl(prepared)
        self.latest = object()
        return self.latest

    def finish_impl(self, raw: Any) -> np.ndarray:
        if raw is not self.latest:
            raise RuntimeError("read the output of an earlier run (its buffer was overwritten)")
        return np.zeros((len(self.bound), 3), np.float32)


def test_transfer_timing_reads_each_runs_own_output(tmp_path: Path) -> None:
    (tmp_path / "fake.bin").write_bytes(b"x")
    batch = np.zeros((2, *SHAPE), np.float32)
    with BufferRunner(tmp_path / "fake.bin") as runner:
        transfers = timing._time_transfers(runner, batch, timing._Clock("cpu"))
    assert set(transfers) == {"h2d_ms", "d2h_ms", "run_with_d2h_ms", "end_to_end_ms"}
    assert all(v >= 0 for v in transfers.values())
    assert transfers["end_to_end_ms"] == pytest.approx(transfers["h2d_ms"] + transfers["run_with_d2h_ms"])
