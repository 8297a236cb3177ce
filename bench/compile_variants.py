"""torch.compile and AOTInductor variants of one model against OpenVINO, batch 1, in one process.

    .venv/bin/python bench/compile_variants.py                      # resnet50, every variant
    .venv/bin/python bench/compile_variants.py --model resnet18 ov aoti aoti_freeze

The measurement behind the CPU defaults of the `inductor` and `aoti` artifacts (freezing) and `aoti-bf16`: median
of 30 calls after 5 warm-up calls, and each variant's largest |Δ| against eager fp32 on the same random image.
Variants: `ov` (OpenVINO f32 and bf16, from `ov.convert_model`), `ind` (torch.compile), `ind_freeze`,
`ind_freeze_bf16` (bf16 weights and input), `ind_autocast` (bf16 autocast inside the compiled graph), `aoti`,
`aoti_freeze`, `aoti_freeze_bf16`, and `aoti_dynamic` / `aoti_dynamic_bf16`: the package `exporter build` makes
(batch 1..64, frozen; bf16 behind fp32 input/output), timed at batch 1 through its dynamic-batch model and through
its batch-1 model. Untrained weights: latency does not depend on them.

`--profile` adds where each variant's time goes: OpenVINO's per-layer counters (layer type, oneDNN implementation),
torch.profiler's self time per op for the inductor variants (AOTInductor runs the same kernels from C++), and the
oneDNN primitives torch executed (kind, implementation, time, from oneDNN's verbose log) — the evidence for
`bench/results/compile-profile.md`.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("ov", "ind", "ind_freeze", "ind_freeze_bf16", "ind_autocast", "aoti", "aoti_freeze", "aoti_freeze_bf16",
            "aoti_dynamic", "aoti_dynamic_bf16")


def bf16_autocast(model: Any) -> Any:
    """`model` behind a module whose forward runs it under bf16 autocast and returns fp32 logits."""
    import torch

    class Autocast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(x).float()

    return Autocast()


def median_ms(call: Callable[[], Any], runs: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def _table(title: str, rows: list[tuple[str, float, float]], total: float, top: int = 10) -> None:
    """Print `rows` (name, ms per call, calls per inference) as a markdown table under `title`, heaviest first."""
    print(f"\n#### {title}: {total:.2f} ms per inference\n\n"
          "| what | ms per inference | share | calls |\n| --- | ---: | ---: | ---: |")
    for name, ms, calls in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"| {name} | {ms:.2f} | {100 * ms / total:.0f} % | {calls:g} |")


def openvino_profile(request: Any, image: Any, runs: int = 20) -> None:
    """OpenVINO's per-layer counters (PERF_COUNT), summed per layer type and oneDNN implementation."""
    times: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for _ in range(runs):
        request.infer({0: image})
        for info in request.profiling_info:
            key = f"{info.node_type} `{info.exec_type}`"
            times[key] += info.real_time.total_seconds() * 1000 / runs
            counts[key] += 1 / runs
    _table("OpenVINO layers (type `implementation`)", [(k, v, counts[k]) for k, v in times.items()],
           sum(times.values()))


def torch_profile(call: Callable[[], Any], runs: int = 20) -> None:
    """torch.profiler's self CPU time per op, and the oneDNN primitives behind them (from oneDNN's verbose log)."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            call()
    events = [(e.key, e.self_cpu_time_total / 1000 / runs, e.count / runs) for e in prof.key_averages()]
    _table("torch ops (self time)", events, sum(e[1] for e in events))
    fd, log = tempfile.mkstemp(suffix=".log")
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(fd, 1)  # oneDNN writes its verbose lines to the process's stdout
    try:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            for _ in range(runs):
                call()
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)
    times: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for line in Path(log).read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 6 and fields[2:4] == ["primitive", "exec"]:
            key = f"{fields[5]} `{fields[6]}`"
            times[key] += float(fields[-1]) / runs
            counts[key] += 1 / runs
    os.unlink(log)
    if times:
        _table("oneDNN primitives torch ran (kind `implementation`, oneDNN's own timing)",
               [(k, v, counts[k]) for k, v in times.items()], sum(times.values()))


def main(argv: list[str] | None = None) -> int:
    import torch

    from exporter.models import create_model, get_spec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--model", default="resnet50", help="a registered model (default resnet50)")
    parser.add_argument("--profile", action="store_true", help="also print where each variant's time goes")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    variants = args.variants or list(VARIANTS)
    if args.profile:  # the generated C++ kernels then show in torch.profiler under their own names
        torch._inductor.config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).eval()
    x = torch.rand(1, *get_spec(args.model).input_shape)

    def bf16_copy() -> torch.nn.Module:
        copy = create_model(args.model, num_classes=10).eval()
        copy.load_state_dict(model.state_dict())
        return copy.to(torch.bfloat16)

    with torch.no_grad(), tempfile.TemporaryDirectory() as work:
        reference = model(x)

        def report(name: str, call: Callable[[], Any], extra: str = "") -> None:
            error = float((call().float() - reference).abs().max())
            print(f"{name}: {median_ms(call):.2f} ms, max |Δ| {error:.1e}{extra}", flush=True)

        if "ov" in variants:
            import openvino as ov

            core, converted, image = ov.Core(), ov.convert_model(model, example_input=x), x.numpy()
            for hint in ("f32", "bf16"):
                config = {"INFERENCE_PRECISION_HINT": hint}
                request = core.compile_model(converted, "CPU", config).create_infer_request()
                print(f"openvino {hint}: {median_ms(lambda r=request: r.infer({0: image})):.2f} ms", flush=True)
                if args.profile:
                    profiled = core.compile_model(converted, "CPU", {**config, "PERF_COUNT": True})
                    openvino_profile(profiled.create_infer_request(), image)
        compiled = {"ind": (model, x, {}), "ind_freeze": (model, x, {"freezing": True}),
                    "ind_freeze_bf16": (None, x.to(torch.bfloat16), {"freezing": True}),
                    "ind_autocast": ("autocast", x, {"freezing": True})}
        for name, (net, image, options) in compiled.items():
            if name not in variants:
                continue
            if net is None:
                net = bf16_copy()
            elif net == "autocast":
                net = bf16_autocast(model)
            start = time.perf_counter()
            # Dynamo reads inductor's global flag when it traces: options={"freezing": True} alone freezes nothing;
            # patched for this variant only, so the AOTI variants below keep their own inductor_configs
            with torch._inductor.config.patch(freezing=options.get("freezing", False)):
                function = torch.compile(net, options=options)
                function(image)
                seconds = time.perf_counter() - start
                report(f"inductor {name}", lambda f=function, i=image: f(i), f" (compile {seconds:.0f} s)")
                if args.profile:
                    torch_profile(lambda f=function, i=image: f(i))
            torch._dynamo.reset()
        packages = (("aoti", False, False), ("aoti_freeze", True, False), ("aoti_freeze_bf16", True, True))
        for name, freeze, bf16 in packages:
            if name not in variants:
                continue
            net, image = (bf16_copy(), x.to(torch.bfloat16)) if bf16 else (model, x)
            path = os.path.join(work, f"{name}.pt2")
            start = time.perf_counter()
            torch._inductor.aoti_compile_and_package(torch.export.export(net, (image,)), package_path=path,
                                                     inductor_configs={"freezing": True} if freeze else {})
            seconds = time.perf_counter() - start
            package = torch._inductor.aoti_load_package(path)
            size = os.path.getsize(path) / 1e6
            report(name, lambda p=package, i=image: p(i), f" (compile {seconds:.0f} s, {size:.0f} MB)")
        for name in ("aoti_dynamic", "aoti_dynamic_bf16"):
            if name in variants:
                dynamic_package(name, model, x, work, report)
    return 0


def dynamic_package(name: str, model: Any, image: Any, work: str, report: Callable[..., None]) -> None:
    """The build's own dynamic-batch CPU package of `model`, timed at batch 1 through each model it holds."""
    from torch._inductor.package import load_package

    from exporter.backends.aoti import BATCH1_MODEL, CPU_INDUCTOR_CONFIGS, compile_package
    from exporter.backends.eager import bf16_inside

    path = Path(work) / f"{name}.pt2"
    net = bf16_inside(model) if name.endswith("bf16") else model
    seconds = compile_package(net, tuple(image.shape[1:]), path, device="cpu", static_batch=None, max_batch=64,
                              inductor_configs=CPU_INDUCTOR_CONFIGS)
    extra = f" (package compile {seconds:.0f} s, {path.stat().st_size / 1e6:.0f} MB)"
    for model_name in ("model", BATCH1_MODEL):
        package = load_package(str(path), model_name=model_name)
        report(f"{name} [{model_name}]", lambda p=package: p(image), extra)


if __name__ == "__main__":
    sys.exit(main())
