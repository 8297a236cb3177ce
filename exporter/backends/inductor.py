"""torch.compile (inductor): the model's Python code compiled by Dynamo + Inductor, from the build's weights.

The artifact is `weights.safetensors` (shared with the eager reference) plus the options to rebuild the model;
the runner compiles at `activate()`, so a benchmark's timed region never includes compilation. With a dynamic
batch the batch dimension is marked dynamic and the runner counts the graphs it compiled: batch 1 is specialised by
Dynamo, and torch's convolution splits the range at 16 (a guard `2 <= batch <= 15` from its fake-tensor kernel),
so batches 1, 2–15 and ≥ 16 are three graphs.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import numpy as np

from exporter.backends.base import (
    Artifact,
    BuildContext,
    register_backend,
    register_stage,
)
from exporter.backends.eager import TorchRunner, bf16_inside, cpu_has_native_bf16, load_torch_model, strict_fp32

WEIGHTS_FILE = "weights.safetensors"


def _cpp_compiler_reason() -> str | None:
    """Inductor's CPU code needs a C++ compiler; None when one is found."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001  (any failure means inductor cannot build CPU kernels)
        return f"inductor needs a C++ compiler for CPU code: {str(exc).splitlines()[0][:150] if str(exc) else exc!r}"
    return None


RECOMPILE_LIMIT = 64


def allow_compiled_graphs(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise Dynamo's per-function graph limit (default 8) for this process.

    Every inductor runner in one process compiles the same `forward` (one graph per batch-size range, per runner
    and per mode, e.g. a benchmark's tuning candidates); past the limit Dynamo silently runs eager code, which would
    be timed and judged under inductor's name.
    """
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) < limit:
            setattr(config, name, limit)


def _dynamo_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


@register_backend
class InductorRunner(TorchRunner):
    """torch.compile(backend="inductor") of the registered model loaded with the build's weights."""

    backend = "inductor"
    description = "torch.compile (inductor)"

    def __init__(self, path, *, precision: str = "fp32", device: str = "cpu", dynamic_batch: bool = True,
                 input_shape: tuple[int, int, int] | list[int] | None = None, mode: str | None = None,
                 freezing: bool = False, **model_options: Any) -> None:
        super().__init__(path, precision=precision, device=device, **model_options)
        self.dynamic_batch = dynamic_batch
        self.input_shape = tuple(input_shape) if input_shape else None
        self.mode = mode  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
        self.freezing = freezing  # inductor freezing: weights become constants folded into the graph
        self.model_options = model_options  # model, in_channels, num_classes (+ builder options)
        self.compile_seconds: float | None = None
        self.graphs_compiled = 0

    @classmethod
    def available_impl(cls, device: str) -> str | None:
        import torch

        if device == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device visible to torch"
        return _cpp_compiler_reason()

    def activate_impl(self) -> None:
        import torch

        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"the inductor artifact runs fp32 or bf16, not {self.precision}")
        self.use_strict_fp32()
        self._torch = torch
        allow_compiled_graphs()
        model = load_torch_model(self.path, device=self.device, **self.model_options)
        if self.precision == "bf16":
            model = bf16_inside(model)
        import torch._inductor

        # Dynamo decides whether to lift the weights as constants from inductor's *global* `freezing` flag when it
        # traces; torch.compile(options={"freezing": True}) reaches inductor alone, and then nothing is frozen
        # (no conv-BN folding, no prepacked oneDNN weights: resnet50 bf16 batch 1 ran a oneDNN reorder per conv
        # per call and BatchNorm+ReLU as separate kernels, bench/results/compile-profile.md). Every call that may
        # trace runs under the flag.
        self._compile_flags = torch._inductor.config.patch(freezing=self.freezing)
        if self.freezing:  # torch.compile takes a mode or options, not both: spell the mode out as options
            options = dict(torch._inductor.list_mode_options(self.mode)) if self.mode else {}
            self.model = torch.compile(model, backend="inductor", options={**options, "freezing": True})
        else:
            self.model = torch.compile(model, backend="inductor", mode=self.mode)
        if self.input_shape:  # compile now, outside any timed region
            before = _dynamo_counters()["graphs"]
            start = time.perf_counter()
            self.run(self.prepare_impl(np.zeros((2, *self.input_shape), np.float32)))
            self.compile_seconds = time.perf_counter() - start
            self.graphs_compiled += _dynamo_counters()["graphs"] - before

    @classmethod
    def tuning_candidates(cls, artifact: Artifact, *, device: str, threads: int, allow_bf16: bool
                          ) -> list[tuple[str, dict[str, Any]]]:
        """max-autotune and freezing (weights folded in as constants) — or, for an artifact that freezes already,
        max-autotune and no freezing; CUDA graphs on CUDA."""
        if device == "cuda":
            return [("cudagraphs", {"mode": "reduce-overhead"}), ("max-autotune", {"mode": "max-autotune"})]
        if artifact.options.get("freezing"):  # the CPU artifact freezes already: the other axis is left
            return [("max-autotune", {"mode": "max-autotune-no-cudagraphs"}), ("no-freezing", {"freezing": False})]
        return [("max-autotune", {"mode": "max-autotune-no-cudagraphs"}), ("freezing", {"freezing": True}),
                ("freezing+max-autotune", {"freezing": True, "mode": "max-autotune-no-cudagraphs"})]

    def run_impl(self, prepared: Any) -> Any:
        with self._compile_flags:  # a new batch size traces again: under the same flags as the first
            return super().run_impl(prepared)

    def prepare_impl(self, batch: np.ndarray) -> Any:
        x = self._torch.from_numpy(batch).to(self.device)
        if self.dynamic_batch and x.shape[0] >= 2:  # Dynamo always specialises a size-1 dimension
            self._torch._dynamo.mark_dynamic(x, 0)
        return x



def compile_diagnostics(model: Any, sample: Any, *, dynamic_batch: bool, batch_sizes: tuple[int, ...],
                        device: str = "cpu", backend: str = "eager") -> dict:
    """Trace `model` with Dynamo for `device` from a clean state and report what torch.compile would do.

    Returns the graph count, graph breaks with their reasons (`torch._dynamo.explain`), the first call's seconds per
    batch size and the recompilations while running each of `batch_sizes` once. Graphs, breaks and recompilations
    are Dynamo's decisions, so the default `backend="eager"` finds them without inductor's code generation (seconds,
    not a compile per graph that nothing reuses: a frozen graph bypasses inductor's cache, and the runner compiles
    its own at activate); `backend="inductor"` compiles for real, for a device nothing else will compile for. For
    "cuda" a copy of the model is moved there and compiled with TF32 off (fp32 means fp32); `model` stays put.
    """
    if device != "cpu":
        model, sample = copy.deepcopy(model).to(device), sample.to(device)
    with strict_fp32() if device == "cuda" else contextlib.nullcontext():
        result = _compile_diagnostics(model, sample, dynamic_batch=dynamic_batch, batch_sizes=batch_sizes,
                                      backend=backend)
    return {**result, "device": device, "backend": backend}


def _compile_diagnostics(model: Any, sample: Any, *, dynamic_batch: bool, batch_sizes: tuple[int, ...],
                         backend: str) -> dict:
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(sample)
    breaks = [{"reason": str(getattr(b, "reason", b)).splitlines()[0][:300],
               "where": str(getattr(b, "user_stack", [""])[-1:]).strip("[]")[:200]}
              for b in explanation.break_reasons]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    timings = {}
    for batch in batch_sizes:
        x = sample[:1].expand(batch, *sample.shape[1:]).contiguous()
        if dynamic_batch and batch >= 2:
            torch._dynamo.mark_dynamic(x, 0)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        timings[batch] = time.perf_counter() - start
    graphs = int(counters["stats"].get("unique_graphs", 0))
    first_graphs = explanation.graph_count
    result = {
        "first_call_s_by_batch": {str(b): round(t, 3) for b, t in timings.items()},
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "graph_break_reasons": breaks,
        "recompilations": max(0, graphs - first_graphs),
        "batch_sizes_run": list(batch_sizes),
    }
    if backend != "eager":
        result["compile_s"] = round(timings[batch_sizes[0]], 3)
    torch._dynamo.reset()
    return result


@register_stage("inductor")
def export_inductor(ctx: BuildContext) -> list[Artifact]:
    """Compile the eval model with inductor (time, graph breaks, recompilations) and describe its artifact.

    The artifact reuses the build's `weights.safetensors`: torch.compile output is not a portable file; the
    runner recompiles (Inductor's on-disk cache makes that fast on the same machine).
    """
    import torch

    reason = InductorRunner.unavailable_reason(ctx.device)
    if reason:
        from exporter.backends.base import BackendUnavailable

        raise BackendUnavailable(reason)
    eager = ctx.artifact("eager")
    if eager is None:
        raise RuntimeError("export_inductor needs the eager artifact (weights.safetensors) first")
    sample = torch.rand((2, *ctx.input_shape), generator=torch.Generator().manual_seed(0))
    if ctx.static_batch:
        batch_sizes: tuple[int, ...] = (ctx.static_batch,)
    else:
        batch_sizes = tuple(dict.fromkeys((2, 7, 1, min(ctx.max_batch, 32))))
    # Dynamo only: the quick parity's runner compiles the artifact for real and its parity record keeps the time
    diagnostics = compile_diagnostics(ctx.model, sample, dynamic_batch=ctx.static_batch is None,
                                      batch_sizes=batch_sizes, device=ctx.device)
    if ctx.device != "cuda":  # CUDA kernels, graphs and breaks differ from the CPU's: report them where a GPU is
        cuda_reason = InductorRunner.unavailable_reason("cuda")
        diagnostics["cuda"] = ({"skipped": cuda_reason} if cuda_reason else
                               compile_diagnostics(ctx.model, sample, dynamic_batch=ctx.static_batch is None,
                                                   batch_sizes=batch_sizes, device="cuda", backend="inductor"))
    ctx.diagnostics["inductor"] = diagnostics
    if diagnostics["graph_breaks"]:
        ctx.warnings.append(f"torch.compile: {diagnostics['graph_breaks']} graph break(s): "
                            f"{diagnostics['graph_break_reasons'][0]['reason']}")
    # freezing: resnet50 batch 1 on 2 cores 71 → 57 ms (bench/compile_variants.py)
    options = dict(eager.options, dynamic_batch=ctx.static_batch is None, input_shape=list(ctx.input_shape),
                   freezing=True)
    notes = ["compiled by the runner at activate(), with freezing (weights folded in as constants, prepacked for "
             "oneDNN); the parity record's activate_s is that compile"]
    artifacts = [Artifact(name="inductor", backend="inductor", path=eager.path, precision="fp32", device=ctx.device,
                          options=options, notes=notes)]
    if ctx.device == "cpu" and cpu_has_native_bf16():  # like aoti-bf16: only where oneDNN has native bf16
        artifacts.append(Artifact(name="inductor-bf16", backend="inductor", path=eager.path, precision="bf16",
                                  device="cpu", options=options,
                                  notes=[*notes, "bf16 weights and arithmetic behind fp32 input/output"]))
    return artifacts
