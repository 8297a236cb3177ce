"""The machine a number was measured on: CPU, cores, memory, GPU, library versions, the GEMM peak, and peak memory.

Every stage that records where it ran (train, build, bench) uses these, so one list of libraries and one
description of the machine appear in every checkpoint, manifest and report.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import re
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

# Always reported; each backend adds the optional library it needs (`Runner.library`).
CORE_LIBRARIES = ("exporter", "torch", "torchvision", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                  "openvino", "nncf", "tensorrt", "safetensors", "matplotlib")
PEAK_PRECISIONS = ("fp32", "bf16", "int8")  # int8: integer ops per second (GOP/s)


def usable_cores() -> int:
    """Cores this process may run on (affinity mask where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (None: every core this process may use); returns the count."""
    import torch

    if threads is None:
        threads = usable_cores()
    torch.set_num_threads(threads)
    return threads


def _cpuinfo_field(prefix: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> list[str]:
    """The CPU's vector-extension flags (avx*, amx*, fma*)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def vector_isa(flags: list[str] | None = None) -> str:
    """The widest vector / matrix extension of this CPU, as a short label (`amx`, `avx512-bf16`, `avx512`, `avx2`):
    the CPU model name alone does not tell an AVX2-only EPYC (Zen 3) from an AVX-512 BF16 one (Zen 4)."""
    found = set(cpu_flags() if flags is None else flags)
    for flag, label in (("amx_bf16", "amx"), ("avx512_bf16", "avx512-bf16"), ("avx512f", "avx512"),
                        ("avx2", "avx2"), ("avx", "avx")):
        if flag in found:
            return label
    return platform.machine().lower() or "cpu"


def int8_dot_product_saturates() -> bool:
    """Whether this x86 CPU multiplies uint8 × int8 through AVX2/AVX-512 `pmaddubsw`, whose int16 pair sums saturate
    (no VNNI or AMX-INT8, which accumulate in int32): ONNX Runtime's u8s8 kernels then need 7-bit weights."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not set(cpu_flags()) & {"avx512_vnni", "avx_vnni", "amx_int8"}


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where the OS does not say)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and driver: the facts a latency number depends on."""
    info: dict[str, Any] = {
        "hostname": platform.node(), "os": platform.platform(), "python": platform.python_version(),
        "cpu": _cpuinfo_field("model name") or platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(), "usable_cores": usable_cores(), "gpu": None, "gpu_driver": None,
        "cuda": None,
    }
    with contextlib.suppress(OSError, ValueError):
        info["memory_gb"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            major, minor = torch.cuda.get_device_capability(0)
            info["gpu_compute_capability"] = f"{major}.{minor}"
    if info["gpu"] and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            info["gpu_driver"] = out.splitlines()[0] if out else None
    return info


def machine_slug(info: dict[str, Any] | None = None) -> str:
    """A short file-name-safe machine name: CPU model, its widest vector extension, usable cores and GPU (e.g.
    `amd-epyc-avx2-2c`: the model name alone is the same for an AVX2-only and an AVX-512 BF16 EPYC, and tuning
    results are only reused on the machine they were measured on)."""
    info = info or machine_info()
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", "", info["cpu"].lower())
    isa = [vector_isa(info["cpu_flags"])] if info.get("cpu_flags") else []  # records from before cpu_flags: none
    parts = [re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "cpu", *isa, f"{info['usable_cores']}c"]
    if info.get("gpu"):
        parts.append(re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower().replace("nvidia", "")).strip("-"))
    return "-".join(parts)


def library_versions() -> dict[str, str | None]:
    """Python, platform and the installed version of every library a result depends on (None: not installed),
    read without importing them."""
    from exporter.backends import BACKENDS

    names = dict.fromkeys([*CORE_LIBRARIES, *(cls.library for cls in BACKENDS.values() if cls.library)])
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --- the GEMM peak ---------------------------------------------------------------------------------------------


def measure_peaks(*, size: int, device: str = "cpu", threads: int | None = None,
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine's matrix-multiply peak in GFLOP/s (int8: GOP/s) per precision, the best over every runtime's
    probe.

    Each backend may measure an n×n×n matmul with its own library (`Runner.gemm_peak_gflops`: torch, OpenVINO,
    ONNX Runtime), at n = `size` and n = `size` / 2; the best is the machine's peak, and which library reached it is
    recorded, because one library's kernels (torch's MKL on an AMD CPU) can be far from what the hardware does, and
    one size can miss it (on a 2-core VM torch bf16 gave 922 GFLOP/s at n = 1024 and 780 at 2048 within a minute).
    With `previous`, the best of both measurements (callers probe at the start and the end of a run: one probe can
    land in a busy moment). Returns {"fp32": …, "bf16": …, "int8": …, "sizes": […],
    "sources": {precision: {library: GFLOP/s}}, "best": {precision: library}}.
    """
    from exporter.backends import BACKENDS

    set_threads(threads)
    sizes = list(dict.fromkeys([size, size // 2])) if size // 2 >= 64 else [size]
    sources: dict[str, dict[str, float]] = {p: {} for p in PEAK_PRECISIONS}
    for precision in PEAK_PRECISIONS:
        for cls, n in ((cls, n) for cls in dict.fromkeys(BACKENDS.values()) for n in sizes):
            try:
                value = cls.gemm_peak_gflops(precision, size=n, device=device, threads=threads)
            except Exception:  # noqa: BLE001  (a probe that cannot run here gives no number, not a failed bench)
                value = None
            if value is not None and math.isfinite(value):
                library = cls.library or cls.backend
                sources[precision][library] = max(value, sources[precision].get(library, 0.0))
        for library, value in ((previous or {}).get("sources") or {}).get(precision, {}).items():
            sources[precision][library] = max(value, sources[precision].get(library, 0.0))
    peaks: dict[str, Any] = {"sizes": sizes, "sources": sources, "best": {}}
    for precision in PEAK_PRECISIONS:
        found = sources[precision]
        best = max(found, key=found.get) if found else None
        peaks[precision] = found[best] if best else float("nan")
        peaks["best"][precision] = best
    peaks["isa_estimate"] = isa_peak_estimate()
    return peaks


AMX_BF16_FLOPS_PER_CYCLE = 1024  # per core: Intel's figure for the 4th-generation Xeon's tile unit
AMX_INT8_OPS_PER_CYCLE = 2048  # per core: the tile unit's int8 rate, twice its bf16


def isa_peak_estimate() -> dict[str, Any] | None:
    """An estimate (not a measurement) of the fp32/bf16/int8 peak: cores × FMA units × vector width × 2 × clock.

    Assumes two 512-bit FMA pipes per core with AVX-512 (one for AVX2) and that bf16 dot products (AVX512_BF16)
    double the fp32 rate; with AMX-BF16 the tile unit's 1,024 bf16 FLOPs per cycle per core (a 16×32 by 32×16
    tile product, 16,384 FLOPs, every 16 cycles) set the bf16 figure. int8: VNNI's `vpdpbusd` does 4 byte
    multiply-adds per 32-bit lane (4× fp32), AMX-INT8 2,048 ops per cycle per core; none without either. The clock
    is the current frequency /proc/cpuinfo reports (a VM's may be its base clock, below what it boosts to).
    """
    mhz = _cpuinfo_field("cpu mhz")
    flags = set((_cpuinfo_field("flags") or "").split())
    if mhz is None:
        return None
    width = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fmas = 2
    per_core = fmas * width * 2 * float(mhz) / 1000  # GFLOP/s per core (2 FLOPs per FMA lane)
    cores = usable_cores()
    fp32 = cores * per_core
    formula = f"{cores} cores × {fmas} FMA units × {width} fp32 lanes × 2 × {float(mhz):.0f} MHz"
    bf16: float | None = None
    if "amx_bf16" in flags:
        bf16 = cores * AMX_BF16_FLOPS_PER_CYCLE * float(mhz) / 1000
        formula += f" (bf16: {cores} cores × {AMX_BF16_FLOPS_PER_CYCLE} AMX FLOPs per cycle × clock)"
    elif "avx512_bf16" in flags:
        bf16 = fp32 * 2
        formula += " (bf16: ×2, AVX512_BF16)"
    int8: float | None = None
    if "amx_int8" in flags:
        int8 = cores * AMX_INT8_OPS_PER_CYCLE * float(mhz) / 1000
        formula += f" (int8: {cores} cores × {AMX_INT8_OPS_PER_CYCLE} AMX ops per cycle × clock)"
    elif flags & {"avx512_vnni", "avx_vnni"}:
        int8 = fp32 * 4
        formula += " (int8: ×4, VNNI)"
    return {"fp32": round(fp32, 1), "bf16": round(bf16, 1) if bf16 else None,
            "int8": round(int8, 1) if int8 else None, "clock_mhz": float(mhz), "formula": formula}


# --- memory -----------------------------------------------------------------------------------------------------


class MemoryProbe:
    """Peak memory over a region. CPU: the process's RSS high-water mark (Linux `VmHWM`, reset through
    `clear_refs`). CUDA: the device-wide drop in free memory (`torch.cuda.mem_get_info`), which sees every
    runtime's allocations — TensorRT's and ONNX Runtime's as well as torch's."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._base: int | None = None

    @staticmethod
    def _status_kb(key: str) -> int | None:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return None

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self._base = torch.cuda.mem_get_info()[0]
            self._lowest = self._base
            return
        with contextlib.suppress(OSError):  # "5" resets the high-water mark to the current RSS (Linux ≥ 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        self._base = self._status_kb("VmRSS")

    def sample(self) -> None:
        """CUDA: note the free memory now (call at the busiest points of the region)."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self._lowest = min(self._lowest, torch.cuda.mem_get_info()[0])

    def stop(self) -> dict[str, Any]:
        """{"peak_mb", "delta_mb", "kind"}: the high-water mark during the region and its rise over the start."""
        if self.device == "cuda":
            self.sample()
            used = (self._base - self._lowest) / 2**20 if self._base is not None else None
            return {"peak_mb": None, "delta_mb": used, "kind": "device-wide free-memory drop (cudaMemGetInfo)"}
        peak_kb = self._status_kb("VmHWM")
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not resettable: process-wide
        delta = (peak_kb - self._base) / 1024 if self._base is not None else None
        return {"peak_mb": peak_kb / 1024, "delta_mb": delta, "kind": "process RSS high-water"}
