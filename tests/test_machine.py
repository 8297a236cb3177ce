"""`exporter/machine.py`: the machine facts every result records, the GEMM peak (the best of every runtime's probe,
named) with its ISA estimate, and peak memory."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pytest

from exporter import machine
from exporter.backends import BACKENDS
from exporter.backends.base import Runner


def test_machine_info_and_slug() -> None:
    info = machine.machine_info()
    assert info["cpu"] and info["usable_cores"] == machine.usable_cores() >= 1
    assert info["logical_cpus"] >= info["usable_cores"]
    slug = machine.machine_slug(info)
    assert slug and all(ch.isalnum() or ch == "-" for ch in slug) and slug.endswith(f"{info['usable_cores']}c")
    gpu = dict(info, cpu="Intel(R) Xeon(R) CPU @ 2.10GHz", usable_cores=4, gpu="NVIDIA H100 80GB HBM3",
               cpu_flags=["avx2", "avx512f", "avx512_bf16", "amx_bf16"])
    assert machine.machine_slug(gpu) == "intel-xeon-amx-4c-h100-80gb-hbm3"
    zen3, zen4 = (dict(info, cpu="AMD EPYC", usable_cores=2, gpu=None, cpu_flags=flags)
                  for flags in (["avx", "avx2"], ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]))
    assert (machine.machine_slug(zen3), machine.machine_slug(zen4)) == ("amd-epyc-avx2-2c", "amd-epyc-avx512-bf16-2c")
    assert machine.machine_slug(dict(zen3, cpu_flags=None)) == "amd-epyc-2c"  # a record that did not keep the flags


def test_library_versions_list_every_backend_library() -> None:
    versions = machine.library_versions()
    assert versions["torch"] and versions["numpy"] and versions["python"]
    for cls in BACKENDS.values():
        if cls.library:
            assert cls.library in versions
    assert all(v is None or isinstance(v, str) for v in versions.values())


def test_set_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert machine.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert machine.set_threads(None) == machine.usable_cores()
    finally:
        torch.set_num_threads(before)


def test_available_memory_is_positive_where_the_os_says() -> None:
    available = machine.available_memory_bytes()
    assert available is None or available > 0


# --- the GEMM peak ---------------------------------------------------------------------------------------------


def _probe(library: str, rates: dict[str, float | None], *, fails: bool = False) -> type[Runner]:
    """A backend class whose matmul probe reports `rates` (GFLOP/s per precision)."""

    class Probe(Runner):
        backend = f"probe-{library}"

        def activate_impl(self) -> None: ...

        def run_impl(self, prepared: Any) -> Any: ...

        @classmethod
        def gemm_peak_gflops(cls, precision: str, *, size: int, device: str, threads: int | None) -> float | None:
            if fails:
                raise RuntimeError("probe crashed")
            return rates.get(precision)

    Probe.library = library
    return Probe


@pytest.fixture()
def probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three fake runtimes: torch is slowest in fp32, OpenVINO fastest; only two probe bf16 and two int8 (ONNX
    Runtime faster there); one crashes."""
    fake = {"a": _probe("torch", {"fp32": 100.0, "bf16": 150.0}),
            "b": _probe("openvino", {"fp32": 300.0, "bf16": 500.0, "int8": 900.0}),
            "c": _probe("onnxruntime", {"fp32": 200.0, "int8": 1000.0}),
            "d": _probe("broken", {}, fails=True),
            "e": _probe("nan", {"fp32": float("nan")})}
    monkeypatch.setattr("exporter.backends.BACKENDS", fake)


def test_measure_peaks_takes_the_best_probe_and_names_it(probes: None) -> None:
    peaks = machine.measure_peaks(size=64, threads=1)
    assert peaks["fp32"] == 300.0 and peaks["bf16"] == 500.0 and peaks["int8"] == 1000.0
    assert peaks["best"] == {"fp32": "openvino", "bf16": "openvino", "int8": "onnxruntime"}
    assert peaks["sources"] == {"fp32": {"torch": 100.0, "openvino": 300.0, "onnxruntime": 200.0},
                                "bf16": {"torch": 150.0, "openvino": 500.0},
                                "int8": {"openvino": 900.0, "onnxruntime": 1000.0}}  # NaN and crashes give no number
    assert "isa_estimate" in peaks


def test_measure_peaks_probes_two_sizes_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    class Sized(_probe("torch", {})):
        @classmethod
        def gemm_peak_gflops(cls, precision: str, *, size: int, device: str, threads: int | None) -> float | None:
            asked.append((precision, size))
            return 100.0 if size == 1024 else 80.0  # the smaller matmul happened to run faster

    monkeypatch.setattr("exporter.backends.BACKENDS", {"t": Sized})
    peaks = machine.measure_peaks(size=2048, threads=1)
    assert peaks["fp32"] == 100.0 and peaks["sizes"] == [2048, 1024]
    assert sorted(asked) == sorted((p, n) for p in machine.PEAK_PRECISIONS for n in (2048, 1024))
    assert machine.measure_peaks(size=100, threads=1)["sizes"] == [100]  # no probe below n = 64


def test_measure_peaks_keeps_the_best_of_two_measurements(probes: None) -> None:
    earlier = {"sources": {"fp32": {"torch": 400.0}, "bf16": {}}}  # torch reached more in a quieter moment
    peaks = machine.measure_peaks(size=64, threads=1, previous=earlier)
    assert peaks["fp32"] == 400.0 and peaks["best"]["fp32"] == "torch"
    assert peaks["sources"]["fp32"]["openvino"] == 300.0 and peaks["bf16"] == 500.0


def test_no_probe_gives_nan_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exporter.backends.BACKENDS", {"x": _probe("none", {})})
    peaks = machine.measure_peaks(size=64, threads=1)
    assert math.isnan(peaks["fp32"]) and peaks["best"] == {"fp32": None, "bf16": None, "int8": None}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_probe_is_none_or_positive(backend: str) -> None:
    cls = BACKENDS[backend]
    for precision in machine.PEAK_PRECISIONS:
        value = cls.gemm_peak_gflops(precision, size=128, device="cpu", threads=1)
        assert value is None or (math.isfinite(value) and value > 0), (backend, precision, value)
    if backend == "eager":
        assert cls.gemm_peak_gflops("fp32", size=128, device="cpu", threads=1) > 0  # torch always probes fp32
        assert cls.gemm_peak_gflops("int8", size=128, device="cpu", threads=1) is None
        from exporter.backends.eager import cpu_has_native_bf16

        bf16 = cls.gemm_peak_gflops("bf16", size=128, device="cpu", threads=1)
        assert (bf16 is not None) == cpu_has_native_bf16()  # an emulated bf16 matmul is not a peak
    if backend in ("openvino", "onnxruntime") and not cls.unavailable_reason("cpu"):
        # both run a uint8 × int8 matmul on any x86 CPU (VNNI or not): an int8 peak, faster than their fp32 one
        int8 = cls.gemm_peak_gflops("int8", size=512, device="cpu", threads=1)
        assert int8 is not None and int8 > cls.gemm_peak_gflops("fp32", size=512, device="cpu", threads=1)


def test_real_measure_peaks_names_an_installed_library() -> None:
    peaks = machine.measure_peaks(size=128, threads=1)
    assert peaks["fp32"] > 0 and peaks["best"]["fp32"] in peaks["sources"]["fp32"]
    assert peaks["fp32"] == max(peaks["sources"]["fp32"].values())
    assert "torch" in peaks["sources"]["fp32"]


def test_best_gemm_gflops_uses_the_fastest_call() -> None:
    from exporter.backends.base import best_gemm_gflops

    calls = []
    rate = best_gemm_gflops(lambda: calls.append(1), 1000, min_repeats=3, max_repeats=7)
    assert len(calls) == 8 and math.isfinite(rate) and rate > 0  # one untimed call, then calls until the budget


def test_best_gemm_gflops_calls_at_least_min_repeats_past_its_budget() -> None:
    import time

    from exporter.backends.base import best_gemm_gflops

    calls = []
    best_gemm_gflops(lambda: (calls.append(1), time.sleep(0.01)), 1000, min_repeats=3, budget_s=0.0)
    assert len(calls) == 4  # the untimed call and min_repeats timed ones, not max_repeats


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo is Linux's")
def test_isa_estimate_is_a_formula_on_linux() -> None:
    estimate = machine.isa_peak_estimate()
    assert estimate is not None and estimate["fp32"] > 0 and estimate["clock_mhz"] > 0
    formula = estimate["formula"]
    assert f"{machine.usable_cores()} cores" in formula and "FMA" in formula and "MHz" in formula
    lanes = 16 if "avx512f" in machine.cpu_flags() else 8 if "avx2" in machine.cpu_flags() else 4
    assert estimate["fp32"] == pytest.approx(machine.usable_cores() * 2 * lanes * 2 * estimate["clock_mhz"] / 1000,
                                             abs=0.1)
    flags = machine.cpu_flags()
    assert (estimate["bf16"] is not None) == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize(("flags", "bf16_per_core_cycle"), [("avx512f avx512_bf16", 2 * 16 * 2 * 2),
                                                             ("avx512f avx512_bf16 amx_bf16 amx_tile", 1024),
                                                             ("avx512f", None), ("avx2", None)])
def test_isa_estimate_counts_amx_for_bf16(monkeypatch: pytest.MonkeyPatch, flags: str,
                                          bf16_per_core_cycle: int | None) -> None:
    fields = {"cpu mhz": "2000.0", "flags": flags}
    monkeypatch.setattr(machine, "_cpuinfo_field", lambda prefix: fields.get(prefix))
    estimate = machine.isa_peak_estimate()
    cores = machine.usable_cores()
    if bf16_per_core_cycle is None:
        assert estimate["bf16"] is None
    else:
        assert estimate["bf16"] == pytest.approx(cores * bf16_per_core_cycle * 2.0, abs=0.1)
        assert ("AMX" in estimate["formula"]) == ("amx_bf16" in flags)


@pytest.mark.parametrize(("flags", "int8_per_core_cycle"), [("avx512f avx512_vnni", 4 * 2 * 16 * 2),
                                                             ("avx2 avx_vnni", 4 * 2 * 8 * 2),
                                                             ("avx512f amx_int8 amx_tile", 2048), ("avx2", None)])
def test_isa_estimate_counts_vnni_and_amx_for_int8(monkeypatch: pytest.MonkeyPatch, flags: str,
                                                   int8_per_core_cycle: int | None) -> None:
    fields = {"cpu mhz": "2000.0", "flags": flags}
    monkeypatch.setattr(machine, "_cpuinfo_field", lambda prefix: fields.get(prefix))
    estimate = machine.isa_peak_estimate()
    if int8_per_core_cycle is None:
        assert estimate["int8"] is None and "int8" not in estimate["formula"]
    else:
        assert estimate["int8"] == pytest.approx(machine.usable_cores() * int8_per_core_cycle * 2.0, abs=0.1)
        assert ("AMX" in estimate["formula"]) == ("amx_int8" in flags) and "int8" in estimate["formula"]


def test_isa_estimate_without_a_clock_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "_cpuinfo_field", lambda prefix: None)
    assert machine.isa_peak_estimate() is None


# --- memory -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_memory_probe_sees_an_allocation() -> None:
    probe = machine.MemoryProbe("cpu")
    probe.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    result = probe.stop()
    del block
    assert result["kind"] == "process RSS high-water" and result["peak_mb"] > 0
    assert result["delta_mb"] is not None and result["delta_mb"] > 32


def test_cuda_memory_is_the_device_wide_drop_in_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every runtime's allocations count (TensorRT's and ONNX Runtime's too), not only torch's allocator's."""
    import torch

    free = iter([10_000 * 2**20, 9_000 * 2**20, 7_500 * 2**20, 8_000 * 2**20])  # start, sample, stop's sample…
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (next(free), 80_000 * 2**20))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)  # torch's own allocator saw nothing
    probe = machine.MemoryProbe("cuda")
    probe.start()
    probe.sample()
    probe.sample()
    report = probe.stop()
    assert report["delta_mb"] == pytest.approx(2_500) and "device-wide" in report["kind"]


def test_vector_isa_names_the_widest_extension() -> None:
    from exporter.machine import vector_isa

    assert vector_isa(["avx", "avx2", "fma"]) == "avx2"
    assert vector_isa(["avx2", "avx512f", "avx512_vnni"]) == "avx512"
    assert vector_isa(["avx2", "avx512f", "avx512_bf16"]) == "avx512-bf16"
    assert vector_isa(["avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]) == "amx"
    import platform

    assert vector_isa(["fma"]) == (platform.machine().lower() or "cpu")  # no AVX at all: the architecture
