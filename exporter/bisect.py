"""Bisection: where an artifact starts to diverge from eager, layer by layer.

The eager reference's leaf modules are hooked; the artifact's runner supplies the same modules' outputs as its
runtime computes them (`Runner.layer_outputs`: an ONNX file with every node output exposed, an OpenVINO IR with
extra outputs, a cast copy of the eager model). The first layer whose error, normalised by that layer's
activation scale, exceeds the tolerance class's `layer_tol` is named, with the layers just before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import Artifact, BisectionUnsupported, Variant
from exporter.backends.eager import leaf_module_outputs
from exporter.judge import Tolerance, json_float
from exporter.manifest import Build


@dataclass
class LayerError:
    """One layer's error against eager, in eager execution order."""

    layer: str  # PyTorch module name (`#2` for its second call)
    max_abs: float
    normalized: float  # max|out − ref| / max|ref|
    shape: list[int]
    kind: str = ""  # module class, e.g. Conv2d
    # Eager layers just before this one that the artifact has no output for: fused into it (a Conv whose
    # BatchNorm was folded in shows up as the BatchNorm), so a divergence here may come from any of them.
    fused_with: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "fused_with": self.fused_with,
                "max_abs": json_float(self.max_abs), "normalized": json_float(self.normalized),
                "shape": self.shape}

    def label(self) -> str:
        text = f"{self.layer} ({self.kind})" if self.kind else self.layer
        return text + (f" with {', '.join(self.fused_with)} fused in" if self.fused_with else "")

    @property
    def layers(self) -> list[str]:
        """This layer and the layers fused into it."""
        return [*self.fused_with, self.layer]


@dataclass
class Bisection:
    """Where an artifact starts to diverge from eager, layer by layer."""

    method: str  # how the artifact's intermediates were obtained
    input_set: str
    images: int
    layer_tol: float
    first_diverging: LayerError | None
    preceding: list[LayerError]  # the layers just before it (closest last)
    layers: list[LayerError]  # every compared layer
    unmatched: list[str] = field(default_factory=list)  # eager layers the artifact exposes no output for
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "input_set": self.input_set, "images": self.images,
                "layer_tol": self.layer_tol,
                "first_diverging": self.first_diverging.to_dict() if self.first_diverging else None,
                "preceding": [e.to_dict() for e in self.preceding], "layers": [e.to_dict() for e in self.layers],
                "unmatched": self.unmatched, "note": self.note}

    def describe(self) -> str:
        if not self.layers:
            return f"no layer could be compared: {self.note}"
        if self.first_diverging is None:
            return f"no layer exceeds {self.layer_tol:g} (normalised) on {self.input_set}. {self.note}".strip()
        first = self.first_diverging
        before = ", ".join(f"{e.label()} {e.normalized:.2g}" for e in self.preceding) or "none"
        return (f"first diverging layer: {first.label()} (normalised error {first.normalized:.3g} > "
                f"{self.layer_tol:g}, max abs {first.max_abs:.3g}); layers before it: {before}")


def _layer_error(name: str, ref: np.ndarray, out: np.ndarray) -> LayerError:
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    if not np.isfinite(out64).all():
        return LayerError(name, math.inf, math.inf, list(ref.shape))
    err = float(np.abs(out64 - ref64).max(initial=0.0))
    scale = float(np.abs(ref64).max(initial=0.0))
    return LayerError(name, err, err / scale if scale > 0 else (0.0 if err == 0 else math.inf), list(ref.shape))


def compare_layers(reference: list[tuple[str, np.ndarray]], candidate: dict[str, list[np.ndarray]], *,
                   layer_tol: float, method: str, input_set: str, context: int = 3,
                   kinds: dict[str, str] | None = None) -> Bisection:
    """Walk the eager layers in execution order and find the first whose error exceeds `layer_tol`."""
    seen: dict[str, int] = {}
    layers, unmatched, pending = [], [], []
    kinds = kinds or {}
    for label, ref in reference:
        base = label.split("#")[0]
        index = seen.get(base, 0)
        seen[base] = index + 1
        outs = candidate.get(base, [])
        if index >= len(outs) or outs[index].size != ref.size:
            unmatched.append(label)
            pending.append(label)
            continue
        error = _layer_error(label, ref, outs[index].reshape(ref.shape))
        error.kind, error.fused_with, pending = kinds.get(base, ""), pending, []
        layers.append(error)
    first = next((i for i, e in enumerate(layers) if not e.normalized <= layer_tol), None)
    note = "" if layers else ("the artifact exposes no output that maps to a PyTorch module (a graph rewritten by "
                              "an optimizer loses the exporter's module scopes; bisect its source artifact)")
    if first is None and layers:
        worst = max(layers, key=lambda e: e.normalized)
        note = f"largest normalised error {worst.normalized:.3g} at {worst.label()}"
    return Bisection(method=method, input_set=input_set, images=int(reference[0][1].shape[0]) if reference else 0,
                     layer_tol=layer_tol, first_diverging=layers[first] if first is not None else None,
                     preceding=layers[max(0, first - context):first] if first is not None else [],
                     layers=layers, unmatched=unmatched, note=note)



def _artifact_onnx_source(artifact: Artifact, build: Build) -> Path | None:
    """The ONNX file an artifact was made from (itself for ONNX artifacts), if the build has one."""
    if str(artifact.path).endswith(".onnx"):
        return Path(build.dir) / artifact.path
    source = (artifact.options or {}).get("source_onnx")
    if source:
        return Path(build.dir) / source
    return _build_fp32_onnx(build)


def _build_fp32_onnx(build: Build) -> Path | None:
    """The build's fp32 ONNX file as the exporter wrote it (its nodes carry the PyTorch module scopes)."""
    candidates = [a for a in build.artifacts if str(a.path).endswith(".onnx") and a.precision == "fp32"]
    candidates.sort(key=lambda a: a.name != "onnx-fp32")
    return Path(build.dir) / candidates[0].path if candidates else None


def bisect_variant(variant: Variant, build: Build, reference_model: Any, batch: np.ndarray, tol: Tolerance, *,
                   input_set: str) -> Bisection:
    """Layer-by-layer comparison of one variant against eager on `batch` (BisectionUnsupported where its
    runtime exposes no intermediate outputs)."""
    if reference_model is None:
        raise BisectionUnsupported("the build has no PyTorch model (an ONNX source), so there are no layers to "
                                   "bisect against")
    reference = leaf_module_outputs(reference_model, batch)
    kinds = {name: type(m).__name__ for name, m in reference_model.named_modules()}
    with variant.runner(build.dir, device="cpu") as runner:
        candidate, method = runner.layer_outputs(batch, onnx_source=_artifact_onnx_source(variant.artifact, build),
                                                 scope_source=_build_fp32_onnx(build),
                                                 reference_model=reference_model)
    return compare_layers(reference, candidate, layer_tol=tol.layer_tol, method=method, input_set=input_set,
                          kinds=kinds)
