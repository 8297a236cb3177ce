"""torch.compile and AOTInductor variants of one model against OpenVINO, batch 1, in one process.

    .venv/bin/python bench/compile_variants.py                      # resnet50, every variant
    .venv/bin/python bench/compile_variants.py --model resnet18 ov aoti aoti_freeze

The measurement behind the CPU defaults of the `inductor` and `aoti` artifacts (freezing) and `aoti-bf16`: median
of 30 calls after 5 warm-up calls, and each variant's largest |Δ| against eager fp32 on the same random image.
Variants: `ov` (OpenVINO f32 and bf16, from `ov.convert_model`), `ind` (torch.compile), `ind_freeze`,
`ind_freeze_bf16` (bf16 weights and input), `ind_autocast` (bf16 autocast inside the compiled graph), `aoti`,
`aoti_freeze`, `aoti_freeze_bf16`. Untrained weights: latency does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("ov", "ind", "ind_freeze", "ind_freeze_bf16", "ind_autocast", "aoti", "aoti_freeze", "aoti_freeze_bf16")


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


def main(argv: list[str] | None = None) -> int:
    import torch

    from exporter.models import create_model, get_spec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--model", default="resnet50", help="a registered model (default resnet50)")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    variants = args.variants or list(VARIANTS)
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
            function = torch.compile(net, options=options)
            function(image)
            seconds = time.perf_counter() - start
            report(f"inductor {name}", lambda f=function, i=image: f(i), f" (compile {seconds:.0f} s)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
