"""What the bench scripts share: one `exporter` subprocess with a timeout, its error line, and the per-model loop
that saves the results after every model (so an interrupted run keeps what finished)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from exporter.fileio import atomic_write_text  # noqa: E402


def script_parser(doc: str, *, models: str, artifacts: str | None = None) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring as help, `--models A,B` (`models` says the default), `--results DIR`
    and, with `artifacts` (its help), `--artifacts DIR` (default: the repository's artifacts/)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--models", metavar="A,B", help=f"comma-separated model names (default: {models})")
    if artifacts is not None:
        parser.add_argument("--artifacts", default=str(REPO / "artifacts"), metavar="DIR", help=artifacts)
    parser.add_argument("--results", default=str(RESULTS), metavar="DIR",
                        help="where the JSON rows are merged and the .md rendered (default: bench/results)")
    return parser


def machine_label() -> str:
    """The machine a result row was measured on: CPU model, vector extension, cores (the model name alone does not
    tell an AVX2-only EPYC from an AVX-512 BF16 one)."""
    from exporter.machine import machine_info, vector_isa

    return f"{machine_info()['cpu']} ({vector_isa()}), {os.cpu_count()} cores"


def header_machine(meta: dict) -> str:
    """The machine named in a table's header: its `machine_label` (headers from before machines were labelled: the
    CPU and cores they stored)."""
    return meta.get("machine") or f"{meta.get('cpu', 'CPU')}, {meta.get('cpus', '?')} cores"


def registry_order(rows: dict[str, dict]) -> list[str]:
    """The names of `rows` in the model registry's order, then any others (model sources) sorted."""
    from exporter.models import list_models

    registered = list_models()
    return [n for n in registered if n in rows] + sorted(set(rows) - set(registered))


def rows_from_elsewhere(rows: dict[str, dict], here: str) -> dict[str, str]:
    """The rows measured on another machine than `here` (a `machine_label`), each with that machine, in the rows'
    order; rows from before machines were recorded say so rather than pass for this one."""
    return {name: row.get("machine") or "a machine not recorded (an earlier session)" for name, row in rows.items()
            if row.get("machine") != here}


def elsewhere_notes(elsewhere: dict[str, str], verb: str) -> list[str]:
    """One Markdown paragraph per other machine: `‡ VERB on MACHINE: a, b.`"""
    lines = []
    for other in sorted(set(elsewhere.values())):
        lines += [f"‡ {verb} on {other}: " + ", ".join(n for n, m in elsewhere.items() if m == other) + ".", ""]
    return lines


@dataclass(frozen=True)
class Finished:
    """One finished (or timed-out: `code` None) subprocess."""

    code: int | None
    stdout: str
    stderr: str
    seconds: float


def run_exporter(args: list[str], timeout: float) -> Finished:
    """`python -m exporter ARGS` from the repository root, captured, killed after `timeout` seconds."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "exporter", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired as exc:
        return Finished(None, _text(exc.stdout), _text(exc.stderr), time.perf_counter() - started)
    return Finished(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started)


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def error_line(stderr: str) -> str:
    """The last `error:` line of a command's stderr (else its last line), at most 300 characters."""
    lines = [line for line in stderr.splitlines() if "error:" in line]
    return (lines[-1] if lines else (stderr.strip().splitlines() or ["no output"])[-1])[:300]


def run_rows(names: list[str], rows: dict[str, dict], work: Callable[[str], dict], *, store: Path,
             header: dict, render: Callable[[dict[str, dict], dict], str], outcome: Callable[[dict], str],
             header_key: str = "meta") -> None:
    """`rows[name] = work(name)` for each name, writing `store` (JSON) and its rendered `.md` after each one.

    Each write first takes the rows another run of the same script wrote to `store` meanwhile (under a lock), so
    two runs over different models can share one table."""
    import fcntl

    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} …", file=sys.stderr, flush=True)
        row = work(name)
        with open(store.with_name(f".{store.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if store.exists():
                rows.update(json.loads(store.read_text()).get("rows", {}))
            rows[name] = row
            atomic_write_text(store, json.dumps({header_key: header, "rows": rows}, indent=2) + "\n")
            atomic_write_text(store.with_suffix(".md"), render(rows, header))
        print(f"[{i}/{len(names)}] {name}: {outcome(rows[name])}", file=sys.stderr, flush=True)


@dataclass
class Int8Split:
    """A trained model's latest build, the int8 images its build used — calibration, and held back (the hardest of
    `pool` training images), what `openvino-int8` was judged on — and test images, with the checkpoint's fp32
    logits of both judged sets."""

    build: Any
    model: Any
    options: Any
    calibration: Any
    held_back: Any
    pool: int
    test: Any
    labels: Any
    reference_held: Any
    reference_test: Any


def torch_logits(model: Any, images: Any, batch: int = 32) -> Any:
    """`model`'s logits for `images` (numpy, NCHW), `batch` at a time, without gradients."""
    import numpy as np
    import torch

    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
                          for i in range(0, len(images), batch)]).numpy()


def int8_split(model_name: str, test_images: int) -> Int8Split:
    """The build's own int8 split of `model_name`'s latest build, from its checkpoint (`calibration_images`), and
    `test_images` test images (seed 0)."""
    import torch

    from exporter.build_inputs import (
        BuildOptions,
        Weights,
        calibration_images,
        held_back_count,
    )
    from exporter.checkpoint import load_trained_model
    from exporter.data import sample_images
    from exporter.manifest import load_build
    from exporter.paths import checkpoint_paths

    torch.manual_seed(0)
    build = load_build(model_name)
    model, sidecar = load_trained_model(checkpoint_paths(model_name)[0], expect_model=model_name)
    shape = tuple(build.input_shape)
    options = BuildOptions(model=model_name, data=build.dataset)
    weights = Weights(model=model, input_shape=shape, num_classes=int(sidecar["num_classes"]), class_names=[],
                      info={}, dataset=build.dataset)
    images, pool = calibration_images(options, weights)
    held = held_back_count(len(images))
    test, labels, _ = sample_images(build.dataset, "test", shape, test_images, seed=0)
    return Int8Split(build, model, options, images[:-held], images[-held:], pool, test, labels,
                     torch_logits(model, images[-held:]), torch_logits(model, test))


def int8_verdicts(split: Int8Split, ov_model: Any, rest: str) -> tuple[Any, str]:
    """(the compiled model, one line): `ov_model` compiled with `rest` precision for what is not quantized, judged
    on the held-back images as the build keeps `openvino-int8` (`int8_held_back_verdict`) and on the test images in
    the judge's int8 class."""
    import numpy as np

    from exporter.backends.base import int8_held_back_verdict
    from exporter.backends.openvino import run_compiled, shared_core
    from exporter.judge import compute_metrics, judge, row_cosines, tolerance_for

    compiled = shared_core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": rest})

    def outputs(images: Any) -> Any:
        return np.concatenate([np.asarray(run_compiled(compiled, images[i:i + 1])[0]) for i in range(len(images))])

    held, out, reference = outputs(split.held_back), outputs(split.test), split.reference_test
    failures, agreement, cosine = int8_held_back_verdict(split.reference_held, held, split.pool)
    test_failures = judge(reference, out, compute_metrics(reference, out), tolerance_for("int8"))
    test_cosine = row_cosines(reference.astype(np.float64), out.astype(np.float64)).min()
    return compiled, (f"held-back: agreement {agreement:.4f} worst cosine {cosine:.5f} "
                      f"{'PASS' if not failures else 'FAIL'} | test: flips "
                      f"{int((out.argmax(1) != reference.argmax(1)).sum())} accuracy "
                      f"{(out.argmax(1) == split.labels).mean():.3f} worst cosine {test_cosine:.5f} "
                      f"{'PASS' if not test_failures else 'FAIL'}")


def calls_for(call: Callable[[], Any], seconds: float) -> None:
    """Call `call` back to back for `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        call()


def timed_calls(call: Callable[[], Any], seconds: float) -> list[tuple[float, float]]:
    """(start offset, latency) in seconds of back-to-back calls of `call` for `seconds`."""
    start, calls = time.perf_counter(), []
    while (began := time.perf_counter()) - start < seconds:
        call()
        calls.append((began - start, time.perf_counter() - began))
    return calls


NNCF_PEER = "peer:nncf-default-int8"


def openvino_artifacts(parser: argparse.ArgumentParser, build: Any, names: str, model: str) -> dict[str, Any]:
    """The OpenVINO artifacts `names` (comma-separated) of `build`, by name: the build's own, or NNCF_PEER (the IR
    `exporter bench --peers` made under BUILD/peers/, with the options it runs with); a parser error otherwise."""
    from exporter.backends.base import PEERS

    artifacts = {}
    for name in names.split(","):
        if name == NNCF_PEER:
            def missing() -> None:
                parser.error(f"{build.dir} has no NNCF default IR yet: run `exporter bench {model} --peers` first")

            artifacts[name] = PEERS[name.removeprefix("peer:")](Path(build.dir), {a.name: a for a in build.artifacts},
                                                                missing)
        else:
            artifact = build.artifact(name)
            if artifact is None or artifact.backend != "openvino":
                parser.error(f"{name} is not an OpenVINO artifact of {build.dir}")
            artifacts[name] = artifact
    return artifacts


def openvino_probe_parser(doc: str, artifacts_default: str) -> argparse.ArgumentParser:
    """The arguments the OpenVINO probes share: a model or build, its artifacts, batch sizes and the rounds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model", help="a built model (its latest build) or a build directory")
    parser.add_argument("--artifacts", default=artifacts_default,
                        help=f"comma-separated OpenVINO artifacts of the build, or {NNCF_PEER} "
                             f"(default: {artifacts_default})")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated (default 1)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--window-ms", type=float, default=200.0, help="timed calls per runner and round")
    return parser


def windowed_p50s(calls: dict[Any, Callable[[], Any]], rounds: int, window_ms: float) -> dict[Any, list[float]]:
    """Per call, the p50 in ms of each of `rounds` windows: every round runs each call for 50 ms untimed (settling
    after the previous one), then `window_ms` of timed calls."""
    import numpy as np

    windows: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            calls_for(call, 0.05)
            latencies = [latency for _, latency in timed_calls(call, window_ms / 1000)]
            windows[key].append(float(np.median(latencies)) * 1e3)
    return windows
