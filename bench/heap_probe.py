"""A model's CPU training step with glibc's default heap and with the reused heap `exporter train` runs under.

    .venv/bin/python bench/heap_probe.py                                  # resnet50, 3×224×224, batch 32, 2 rounds
    .venv/bin/python bench/heap_probe.py --model resnet18 --shape 1,96,96 --batch 64

Each variant runs in its own process (glibc's allocator settings are per process), alternating, `--rounds` times:
the recipe's step (SGD + Nesterov, fused; bf16 autocast where the CPU has it; channels-last) on random images,
median img/s of `--steps` steps after one warm-up step, and the process's minor page faults over those steps. The
measurement behind `exporter.training_runtime.reused_heap`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_run(model: str, shape: tuple[int, int, int], batch: int, steps: int, reused: bool) -> dict:
    """Time `steps` training steps in this process, under the reused heap or glibc's default."""
    import contextlib

    import torch
    from torch import nn

    from exporter.models import create_model
    from exporter.recipe import bf16_autocast_supported
    from exporter.training_runtime import reused_heap

    torch.manual_seed(0)
    net = create_model(model, in_channels=shape[0], num_classes=10).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=True)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    bf16 = bf16_autocast_supported(torch.device("cpu"))
    seconds, faults = [], 0
    with reused_heap(torch.device("cpu")) if reused else contextlib.nullcontext():
        for step in range(steps + 1):
            if step == 1:
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tick = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(x)
            nn.functional.cross_entropy(logits.float(), y).backward()
            optimizer.step()
            seconds.append(time.perf_counter() - tick)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"heap": "reused" if reused else "default", "img_s": batch / statistics.median(seconds[1:]),
            "minor_faults_per_step": faults / steps, "bf16": bf16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--shape", default="3,224,224", help="C,H,W (default: 3,224,224)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=("default", "reused"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.child:
        print(json.dumps(one_run(args.model, shape, args.batch, args.steps, args.child == "reused")))
        return 0
    print(f"{args.model} {args.shape} batch {args.batch}: median of {args.steps} training steps per run")
    for _ in range(args.rounds):
        for heap in ("default", "reused"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--shape", args.shape,
                                  "--batch", str(args.batch), "--steps", str(args.steps), "--child", heap],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"  heap {row['heap']:8s} {row['img_s']:7.1f} img/s  {row['minor_faults_per_step']:9.0f} minor "
                  f"page faults per step  ({'bf16 autocast' if row['bf16'] else 'fp32'})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
