"""What quantizing a Concat before a BatchNorm costs int8: densenet's fp32 fallback, measured without it.

    .venv/bin/python bench/int8_concat_probe.py densenet          # its latest build
    .venv/bin/python bench/int8_concat_probe.py densenet --method Percentile --images 1000

A pre-activation network (DenseNet) normalises a Concat of feature maps with very different ranges; in a QDQ file
that Concat's output is quantized as one tensor before the BatchNorm (now an int8 depthwise convolution:
`exporter.backends.onnxruntime_int8.batchnorms_as_convolutions`) and the small-range maps lose their resolution.
This probe quantizes the build's `model.onnx` twice in the CPU layout, with no fp32 fallback: as the build does, and
with each BatchNorm-as-convolution pushed through the Concats to their inputs (`BN(concat(a, b)) = concat(BN_a(a),
BN_b(b))`), so that only normalised maps are joined. It prints top-1 agreement and worst cosine against the fp32 file
on `--images` test images, calibrating on `--calibration` training images of the build's seed. An experiment, not
what a build ships (bench/results/README.md, the nineteenth session).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def push_batchnorms_through_concats(path: Path) -> int:
    """Rewrite `path` in place: each depthwise convolution made from a BatchNorm whose input is a channel Concat
    becomes a Concat of depthwise convolutions on the Concat's inputs (recursively); returns how many moved."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in [*graph.input, *graph.value_info]
                if len(v.type.tensor_type.shape.dim) > 1}
    parts_made: Counter[str] = Counter()
    added_nodes: list = []

    def is_channel_concat(tensor: str) -> bool:
        node = producer.get(tensor)
        return node is not None and node.op_type == "Concat" and any(a.name == "axis" and a.i == 1
                                                                    for a in node.attribute)

    def parts_of(concat: str, weight: np.ndarray, bias: np.ndarray, owner: str) -> list[str]:
        """The Concat's inputs, each through its slice of the depthwise convolution."""
        inputs, start = [], 0
        for part in producer[concat].input:
            end = start + channels[part]
            inputs.append(normalised(part, weight[start:end], bias[start:end], owner))
            start = end
        return inputs

    def normalised(tensor: str, weight: np.ndarray, bias: np.ndarray, owner: str) -> str:
        parts_made[owner] += 1
        name = f"{owner}.part{parts_made[owner]}"
        if is_channel_concat(tensor):
            added_nodes.append(helper.make_node("Concat", parts_of(tensor, weight, bias, owner), [name], name=name,
                                                axis=1))
            return name
        w = numpy_helper.from_array(weight.reshape(-1, 1, 1, 1), f"{name}.weight")
        b = numpy_helper.from_array(bias, f"{name}.bias")
        graph.initializer.extend([w, b])
        added_nodes.append(helper.make_node("Conv", [tensor, w.name, b.name], [name], name=name,
                                            group=len(weight), kernel_shape=[1, 1]))
        return name

    nodes, moved = [], 0
    for node in graph.node:
        if (node.op_type == "Conv" and len(node.input) == 3 and node.input[1].endswith(".depthwise_weight")
                and is_channel_concat(node.input[0])):
            weight = numpy_helper.to_array(constants[node.input[1]]).reshape(-1)
            bias = numpy_helper.to_array(constants[node.input[2]])
            added_nodes.clear()
            inputs = parts_of(node.input[0], weight, bias, node.name)
            nodes += [*added_nodes, helper.make_node("Concat", inputs, list(node.output), name=node.name, axis=1)]
            moved += 1
        else:
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            nodes.append(kept)
    outputs = {o.name for o in graph.output}
    while True:  # the Concats every BatchNorm moved away from are dead now
        used = {name for node in nodes for name in node.input} | outputs
        alive = [node for node in nodes if any(out in used for out in node.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del graph.node[:]
    graph.node.extend(nodes)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built model (its latest build) or a build directory")
    parser.add_argument("--artifacts", type=Path, default=None, help="the artifacts directory (default: artifacts/)")
    parser.add_argument("--method", default="MinMax", help="calibration method (MinMax, Entropy, Percentile)")
    parser.add_argument("--calibration", type=int, default=384, help="training images to calibrate on (384)")
    parser.add_argument("--images", type=int, default=1000, help="test images to judge on (1000)")
    args = parser.parse_args(argv)

    from exporter.backends.onnx import INPUT_NAME
    from exporter.backends.onnxruntime_int8 import (
        CPU_OPTIONS,
        _logits,
        batchnorms_as_convolutions,
        prepare_for_quantization,
        write_qdq,
    )
    from exporter.data import sample_images
    from exporter.judge import row_cosines
    from exporter.manifest import load_build

    build = load_build(args.model, args.artifacts)
    seed = build.manifest["options"].get("seed", 0)
    source = build.dir / build.artifact("onnx-fp32").path
    calibration, _, _ = sample_images(build.dataset, "train", build.input_shape, args.calibration, seed=seed)
    test, _, _ = sample_images(build.dataset, "test", build.input_shape, args.images, seed=seed)
    reference = _logits(source, test, INPUT_NAME)
    with tempfile.TemporaryDirectory(prefix="exporter-concat-probe-") as work:
        as_built = prepare_for_quantization(source, Path(work))
        rewritten = batchnorms_as_convolutions(as_built)
        pushed = Path(work) / "pushed.onnx"
        shutil.copyfile(as_built, pushed)
        moved = push_batchnorms_through_concats(pushed)
        np.testing.assert_allclose(_logits(pushed, test[:16], INPUT_NAME), reference[:16], rtol=1e-4, atol=1e-4)
        print(f"{build.model}: {rewritten} BatchNorms as depthwise convolutions, {moved} pushed through Concats; "
              f"{args.method} on {len(calibration)} training images, judged on {len(test)} test images, no fallback")
        for label, prepared in (("as built", as_built), ("pushed through Concats", pushed)):
            target = Path(work) / "int8.onnx"
            write_qdq(prepared, target, calibration, activation_type="uint8", extra_options=CPU_OPTIONS,
                      layout="probe", progress=False, method=args.method, prepared=True)
            output = _logits(target, test, INPUT_NAME)
            agreement = float((output.argmax(1) == reference.argmax(1)).mean())
            cosine = float(row_cosines(reference.astype(np.float64), output.astype(np.float64)).min())
            print(f"  {label:<24} top-1 agreement {agreement:.4f}, worst cosine {cosine:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
