"""ONNX Runtime int8: the calibrated QDQ copy of an ONNX model, accuracy-aware.

`quantize_int8` writes `model.int8.onnx` in the layout ONNX Runtime's x86 int8 kernels are fast at (asymmetric uint8
activations, per-channel symmetric int8 weights; every BatchNormalization no convolution absorbed rewritten as a
depthwise 1×1 convolution so that it stays in int8: `batchnorms_as_convolutions`), MinMax-calibrated on real
training images. A quarter of those images is held back and the result judged there (the parity judge's int8 class,
with INT8_MIN_AGREEMENT and INT8_MIN_COSINE as its bars). If it fails, Percentile calibration is tried in its place
— measured on the trained zoo (`bench/int8_calibration.py`, `bench/results/int8-calibration.md`), the better one on
densenet and resnet18 and no better elsewhere — and kept if it passes. Otherwise, from the closer of the two, the
fewest graph nodes whose exclusion makes the model pass are found by bisection (latest layers first) and left in
fp32 (`nodes_to_exclude`), then the costliest of them are tried back in int8: an fp32 layer at full resolution costs
most of int8's gain (trained resnet50, batch 1, `bench/run_matrix.py`: 12 convolutions left in fp32 ran at 0.54× ORT
fp32's time, the 4 left now at 0.47×).

`write_qdq` is the one quantizer call; the tensorrt stage uses it for its symmetric int8 copy.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.backends.base import (
    INT8_MIN_AGREEMENT,
    INT8_MIN_COSINE,
    Artifact,
    held_back_images_phrase,
    import_optional,
    int8_held_back_verdict,
    stdout_to_stderr,
)
from exporter.backends.onnx import INPUT_NAME, external_data_file, read_metadata, set_metadata, uses_external_data
from exporter.errors import ExporterError, UsageError
from exporter.fileio import atomic_path
from exporter.machine import int8_dot_product_saturates

INT8_FILE = "model.int8.onnx"
CALIBRATION_BATCH = 16
# Calibration reads one batch at a time (ONNX Runtime's strided calibration): the histogram calibrators otherwise
# keep every intermediate tensor of every image until the end (trained resnet50 at 224 px, 384 images: > 24 GiB).
CALIBRATION_STRIDE_BATCHES = 1
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")  # ONNX Runtime's CalibrationMethod names
CPU_LAYOUT = "per-channel symmetric int8 weights, asymmetric uint8 activations"
CPU_OPTIONS = {"ActivationSymmetric": False, "WeightSymmetric": True}
FALLBACK_TRIALS = 32  # quantize-and-judge rounds the fp32 fallback's bisection may spend (densenet: ~4 s each)
PRUNE_TRIALS = 16  # and the rounds that then try its costliest nodes back in int8 (resnet50: ~6 s each)


class CalibrationDataError(UsageError):
    """int8 quantization was asked for without usable calibration images."""


def check_calibration(images: np.ndarray | None, input_shape: tuple[int, ...]) -> np.ndarray:
    """The calibration images as float32 N×C×H×W; a one-line error when they are missing or malformed."""
    if images is None or len(images) == 0:
        raise CalibrationDataError("--int8 needs calibration images (real training images) and none were given")
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
        raise CalibrationDataError(f"calibration images have shape {images.shape}, expected N×"
                                   f"{'×'.join(map(str, input_shape))}")
    if not np.isfinite(images).all():
        raise CalibrationDataError("calibration images contain NaN or Inf")
    return images.astype(np.float32, copy=False)


class ImageCalibrationReader:
    """`onnxruntime.quantization.CalibrationDataReader` over an N×C×H×W float32 array, in fixed batches.

    `len()` and `set_range()` count batches: ONNX Runtime's strided calibration (`CalibStridedMinMax`) reads one
    range at a time. One progress bar covers every range; `close()` ends it."""

    def __init__(self, images: np.ndarray, input_name: str = INPUT_NAME, batch_size: int = CALIBRATION_BATCH,
                 progress: bool = True) -> None:
        from tqdm import tqdm

        self.images = images
        self.input_name = input_name
        self.batch_size = batch_size
        self._bar = tqdm(total=len(images), desc="int8 calibration", unit="img", disable=not progress)
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Read batches `start_index` to `end_index` (exclusive) from now on."""
        self._range = (start_index, min(end_index, len(self)))
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(*self._range):
            start = index * self.batch_size
            batch = np.ascontiguousarray(self.images[start:start + self.batch_size], dtype=np.float32)
            self._bar.update(len(batch))
            yield {self.input_name: batch}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._batches()

    def close(self) -> None:
        self._bar.close()


def _graph_of_a_quantizable_file(source: Path) -> Any:
    """The graph of `source` (without weights); a file with external data is refused in one line."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False)
    if uses_external_data(graph):
        raise ExporterError(f"{source.name} keeps its weights in {external_data_file(source).name} (over 2 GiB): "
                            "ONNX Runtime's int8 tools here need them inside the file; openvino-int8 quantizes "
                            "this model (--backends openvino --int8)")
    return graph


def quantize_int8(source: Path, target: Path, calibration: np.ndarray | None, *, progress: bool = True,
                  info: dict[str, Any] | None = None,
                  held_back_pool: int | None = None) -> Artifact:
    """Write the CPU int8 QDQ copy of `source` to `target`, leaving in fp32 what costs agreement; its artifact.

    The last quarter of `calibration` is held back (the hardest of `held_back_pool` training images, if given).
    `info` (for the build's diagnostics) receives the calibration split, the held-back verdict before and after
    the fallback and the nodes left in fp32.
    """
    info = {} if info is None else info
    graph_input = _graph_of_a_quantizable_file(source).graph.input[0]
    images = check_calibration(calibration, tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]))
    held_back = len(images) // 4 if len(images) >= 16 else 0
    calibration_images, validation = images[:len(images) - held_back], images[len(images) - held_back:]
    info.update(method="MinMax", calibration_images=len(calibration_images), held_back_images=held_back,
                held_back_pool=held_back_pool or held_back, min_agreement=INT8_MIN_AGREEMENT,
                min_cosine_target=INT8_MIN_COSINE)
    # Without VNNI, ORT's x86 u8s8 kernels sum uint8×int8 pairs in saturating int16 (pmaddubsw): 7-bit weights keep
    # the sums in range (ORT's quantization docs, reduce_range). A file built here saturates on no CPU; one built on
    # a VNNI CPU may lose accuracy on a CPU without it (its manifest says which it is).
    reduce_range = int8_dot_product_saturates()
    layout = CPU_LAYOUT + (", weights in 7 bits (this CPU has no VNNI)" if reduce_range else "")
    info["reduce_range"] = reduce_range
    with tempfile.TemporaryDirectory(prefix="exporter-int8-") as work:
        prepared = prepare_for_quantization(source, Path(work))
        info["batchnorms_as_convolutions"] = batchnorms_as_convolutions(prepared)
        candidate = Path(work) / "candidate.onnx"

        def quantize(excluded: Sequence[str], *, bar: bool = progress) -> list[str]:
            return write_qdq(prepared, candidate, calibration_images, activation_type="uint8",
                             extra_options=CPU_OPTIONS, layout=layout, progress=bar, method=info["method"],
                             nodes_to_exclude=excluded, prepared=True, reduce_range=reduce_range,
                             ranges_cache=Path(work) / f"ranges-{info['method']}.json")

        notes = quantize(())
        excluded: list[str] = []
        if held_back:
            reference = _logits(source, validation, graph_input.name)

            def failures() -> list[str]:
                """The int8 class's verdict on the held-back images, at the build-time bars."""
                failed, agreement, cosine = int8_held_back_verdict(
                    reference, _logits(candidate, validation, graph_input.name), held_back_pool)
                info.update(agreement=agreement, min_cosine=cosine)
                return failed

            info["default_failures"] = info["failures"] = failures()
            info.update(default_agreement=info["agreement"], default_min_cosine=info["min_cosine"])
            if info["default_failures"]:
                # Percentile clips the activation outliers MinMax keeps; measured better on densenet and resnet18
                # and no better elsewhere (bench/results/int8-calibration.md): tried only when MinMax fails.
                measured: dict[str, dict[str, Any]] = {
                    "MinMax": {"agreement": info["agreement"], "min_cosine": info["min_cosine"]}}
                info["method"], notes_of_minmax = "Percentile", notes
                try:
                    notes = quantize(())
                except ExporterError as exc:
                    # Its histogram needs activations spread over more than a few float steps: an untrained
                    # torchvision mobilenet_v3_large's vanish (logits ~1e-11) and numpy cannot make 2,048 bins of
                    # them. The candidate on disk is still MinMax's (write_qdq writes atomically).
                    info["method"], notes = "MinMax", notes_of_minmax
                    measured["Percentile"] = {"error": str(exc)}
                else:
                    info["failures"] = failures()
                    measured["Percentile"] = {"agreement": info["agreement"], "min_cosine": info["min_cosine"]}
                    if info["failures"]:  # bisect from the closer of the two (each method is calibrated once)
                        info["method"] = max(measured, key=lambda m: (measured[m]["agreement"],
                                                                      measured[m]["min_cosine"]))
                info["methods_measured"] = measured
            if info["failures"]:
                from tqdm import tqdm

                rounds = 0
                with tqdm(desc="int8 fp32 fallback", unit="trial", disable=not progress, leave=False) as trials:
                    def passes(run: Sequence[str]) -> bool:
                        nonlocal notes, rounds
                        notes = quantize(run, bar=False)
                        info["failures"] = failures()
                        rounds += 1
                        trials.update(1)
                        return not info["failures"]

                    costs = node_costs(prepared)
                    # latest first: of two halves that would both do, bisection keeps the one it tries first, and
                    # a late layer in fp32 costs less than an early one at full resolution
                    order = list(costs)
                    excluded = sorted(fewest_fp32_nodes(order[::-1], passes, cost=costs.__getitem__),
                                      key=order.index)
                    info["fallback_trials"] = rounds
                    passes(excluded)  # the file kept; `info["failures"]` says if even it fails (non-monotone)
        compute = _compute_nodes(prepared, excluded)
        if compute:  # only after the fallback, which weighed every node (`costs`)
            macs = sum(costs[name] for name in _compute_nodes(prepared, list(costs)))
            info["fp32_share_of_macs"] = sum(costs[name] for name in compute) / macs if macs else 0.0
        info.update(fp32_nodes=excluded, fp32_layers=compute,
                    fp32_layers_why=(f"on {held_back_images_phrase(held_back, held_back_pool)} the int8 model failed "
                                     "its class "
                                     f"({'; '.join(info['default_failures'])}); the fewest nodes whose fp32 makes "
                                     "it pass, found by bisection, the costliest then tried back in int8")
                    if excluded else None)
        with atomic_path(target) as tmp:
            shutil.copyfile(candidate, tmp)
    if held_back:
        notes.insert(1, f"on {held_back_images_phrase(held_back, held_back_pool)}: top-1 agreement with fp32 "
                        f"{info['agreement']:.3f}, min cosine {info['min_cosine']:.4f}; layers left in fp32: "
                        f"{len(compute)}"
                     + (f" ({', '.join(compute[:4])}{', …' if len(compute) > 4 else ''}; "
                        f"{info['fp32_share_of_macs']:.0%} of the multiply-adds)" if compute else ""))
    notes.insert(1, "for ONNX Runtime's CPU EP; TensorRT builds from its own symmetric copy (tensorrt stage)")
    if info["batchnorms_as_convolutions"]:
        notes.append(f"{info['batchnorms_as_convolutions']} BatchNormalizations no convolution could absorb run as "
                     "int8 depthwise 1×1 convolutions (ONNX Runtime has no int8 BatchNormalization)")
    return Artifact(name="onnx-int8", backend="onnxruntime", path=target.name, precision="int8", notes=notes)


def fewest_fp32_nodes(nodes: Sequence[str], passes: Callable[[Sequence[str]], bool], *,
                      cost: Callable[[str], float] | None = None, max_trials: int = FALLBACK_TRIALS,
                      prune_trials: int = PRUNE_TRIALS) -> list[str]:
    """A small, cheap set of `nodes` whose fp32 makes `passes(set)` hold; all nodes pass by definition. Order
    `nodes` by preference: of two halves that would both pass, bisection keeps the first.

    Bisection that finds several culprits: if one half of the candidates passes alone, recurse into it; else keep
    each half and shrink it with the other one in fp32. One culprit costs ~2·log2(len(nodes)) calls of `passes`
    (assumed monotone: more fp32, closer to fp32); after `max_trials` calls the candidates left are kept whole.
    Then each kept node, the most costly first (`cost`, e.g. its multiply-adds), is tried back in int8 (at most
    `prune_trials` calls) and stays there if the rest still passes: bisection keeps whole halves once its budget
    is spent, and an fp32 layer at full resolution costs most of int8's gain.
    """
    trials = 0

    def check(run: list[str]) -> bool:
        nonlocal trials
        trials += 1
        return passes(run)

    def shrink(candidates: list[str], fixed: list[str]) -> list[str]:
        # invariant: passes(fixed + candidates)
        if len(candidates) <= 1 or trials >= max_trials:
            return candidates
        half = len(candidates) // 2
        left, right = candidates[:half], candidates[half:]
        if check(fixed + left):
            return shrink(left, fixed)
        if trials < max_trials and check(fixed + right):
            return shrink(right, fixed)
        kept_left = shrink(left, fixed + right)
        return kept_left + shrink(right, fixed + kept_left)

    kept = shrink(list(nodes), [])
    if len(kept) == len(nodes):  # nothing found: the all-fp32 model is the answer, not worth pruning
        return kept
    for node in sorted(kept, key=cost or (lambda _: 0.0), reverse=True)[:prune_trials]:
        rest = [n for n in kept if n != node]
        if rest and check(rest):
            kept = rest
    return kept


def _logits(path: Path, images: np.ndarray, input_name: str) -> np.ndarray:
    ort = import_optional("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: images[i:i + CALIBRATION_BATCH]})[0]
                           for i in range(0, len(images), CALIBRATION_BATCH)])


def node_costs(model_path: Path) -> dict[str, float]:
    """Every node of `model_path` (topological order) → its work per image: multiply-adds for a Conv / Gemm /
    MatMul, output elements for the rest (what a Q/DQ pair around it costs). Needs shapes inferred on the file
    (`prepare_for_quantization` does); an unknown dimension counts as 1."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info, *graph.output]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})

    def elements(name: str) -> float:
        return float(np.prod(shapes.get(name, [1])[1:]))  # per image: the batch dimension left out

    costs = {}
    for node in graph.node:
        out = elements(node.output[0]) if node.output else 0.0
        weight = shapes.get(node.input[1], []) if len(node.input) > 1 else []
        if node.op_type in ("Conv", "ConvTranspose") and len(weight) > 2:
            costs[node.name] = out * float(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul") and len(weight) > 1:
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            costs[node.name] = out * float(weight[-1] if trans_b else weight[-2])  # × the reduced dimension
        else:
            costs[node.name] = out
    return costs


def _compute_nodes(model_path: Path, names: Sequence[str]) -> list[str]:
    """The Conv / Gemm / MatMul nodes among `names`: the layers whose arithmetic stays fp32."""
    import onnx

    wanted = set(names)
    return [node.name for node in onnx.load(str(model_path), load_external_data=False).graph.node
            if node.name in wanted and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]


def prepare_for_quantization(source: Path, work: Path) -> Path:
    """ONNX Runtime's pre-processing (shape inference, graph optimisation) of `source`, written under `work`."""
    import_optional("onnxruntime")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
    return prepared


def batchnorms_as_convolutions(path: Path) -> int:
    """Rewrite `path` in place: every BatchNormalization left after graph optimisation (one a convolution could not
    absorb: a pre-activation BN after a Concat or Add) becomes the 1×1 depthwise Conv computing the same per-channel
    affine map. Returns how many were rewritten.

    ONNX Runtime has no int8 BatchNormalization: in a QDQ file each one dequantizes, runs in fp32 in NCHW between
    two Transposes out of and back into the int8 kernels' NHWC, and its scale is quantized per-tensor. As a
    depthwise convolution it gets per-channel weights and runs as one more QLinearConv (trained densenet's build:
    19 fp32 BatchNormalizations, 51 DequantizeLinear and 38 Transpose in ORT's optimised graph before, 0, 7 and 10
    after — counted in the `optimized_model_filepath` ORT writes; bench/results/README.md, nineteenth session)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info, *graph.output]
             if v.type.tensor_type.HasField("shape")}
    nodes, count = [], 0
    for node in graph.node:
        rank = ranks.get(node.input[0], 0) if node.input else 0
        if (node.op_type != "BatchNormalization" or len(node.output) != 1 or rank < 3
                or not all(name in constants for name in node.input[1:5])):
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            nodes.append(kept)
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(constants[name]).astype(np.float64)
                                  for name in node.input[1:5])
        scale = gamma / np.sqrt(var + epsilon)
        name = node.name or f"{node.output[0]}.batchnorm"  # an unnamed node: its output's name is unique
        weight = numpy_helper.from_array(scale.reshape(len(scale), *[1] * (rank - 1)).astype(np.float32),
                                         f"{name}.depthwise_weight")
        bias = numpy_helper.from_array((beta - mean * scale).astype(np.float32), f"{name}.depthwise_bias")
        graph.initializer.extend([weight, bias])
        nodes.append(helper.make_node("Conv", [node.input[0], weight.name, bias.name], list(node.output),
                                      name=name, group=len(scale), kernel_shape=[1] * (rank - 2)))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(path))
    return count


def write_qdq(source: Path, target: Path, calibration: np.ndarray | None, *, activation_type: str,
              extra_options: dict[str, Any], layout: str, progress: bool = True, method: str = "MinMax",
              nodes_to_exclude: Sequence[str] = (), prepared: bool = False,
              ranges_cache: Path | None = None, reduce_range: bool = False) -> list[str]:
    """Write a QDQ int8 copy of `source` to `target`: per-channel int8 weights, `activation_type` ("uint8" or
    "int8") activations, `method`-calibrated on `calibration`, `nodes_to_exclude` left in fp32; `extra_options`
    go to `quantize_static` as they are; `prepared`: `source` already went through `prepare_for_quantization`;
    `reduce_range`: 7-bit weights (ONNX Runtime's remedy for u8s8 saturation on CPUs without VNNI).
    `ranges_cache`: a JSON file of calibrated tensor ranges, written by the first call and read by the next ones
    with the same source, images and method (the ranges do not depend on `nodes_to_exclude`); with an ONNX Runtime
    whose `quantize_static` has no `calibration_cache_path`, every call calibrates.

    `layout` describes the result (metadata and notes). Returns the notes for the file's artifact.
    """
    import_optional("onnxruntime")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise UsageError(f"int8 calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    activations = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]
    meta = read_metadata(source)
    graph_input = _graph_of_a_quantizable_file(source).graph.input[0]
    images = check_calibration(calibration, tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]))
    with tempfile.TemporaryDirectory(prefix="exporter-int8-") as work, atomic_path(target) as tmp, \
            _captured_root_log() as quantizer_log, stdout_to_stderr(), \
            contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print a line per batch
        ready = source if prepared else prepare_for_quantization(source, Path(work))
        cache = ({"calibration_cache_path": str(ranges_cache)} if ranges_cache is not None
                 and "calibration_cache_path" in inspect.signature(quantize_static).parameters else {})
        reader = ImageCalibrationReader(images, graph_input.name,
                                        progress=progress and not (ranges_cache and ranges_cache.is_file()))
        try:
            quantize_static(
                str(ready), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=activations, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                calibrate_method=getattr(CalibrationMethod, method), nodes_to_exclude=list(nodes_to_exclude),
                extra_options={**extra_options, "CalibStridedMinMax": CALIBRATION_STRIDE_BATCHES}, **cache,
            )
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise ExporterError(f"int8 quantization failed: {type(exc).__name__}: {text[0] if text else ''}") from exc
        finally:
            reader.close()
        model = onnx.load(str(tmp))
        meta.update(precision="int8", int8_calibration=f"{method} on {len(images)} images; {layout}")
        if nodes_to_exclude:
            meta["int8_fp32_nodes"] = ",".join(nodes_to_exclude)
        set_metadata(model, meta)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    notes = [f"QDQ int8 ({layout}), {method} calibration on {len(images)} training images"]
    per_tensor = [m for m in quantizer_log if "out-of-range for weight" in m]
    if per_tensor:  # rank-1 weights (a BatchNorm not folded into a conv) cannot be per-channel
        notes.append(f"{len(per_tensor)} rank-1 weights (unfolded BatchNorm scales) quantized per-tensor")
    return notes + [m for m in quantizer_log if m not in per_tensor][:5]


@contextlib.contextmanager
def _captured_root_log() -> Iterator[list[str]]:
    """Collect the warnings ONNX Runtime's quantizer sends to the root logger (one per weight) instead of
    printing them; with a handler in place `logging.warning` does not install its own stderr handler either."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    root = logging.getLogger()
    handler = Collect(level=logging.WARNING)
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        yield messages
    finally:
        root.handlers = saved
