"""An exact rewrite of OpenVINO models: strided 1×1 convolutions' stride moved up to where the positions are computed.

A 1×1 convolution with stride s reads every s-th position of its input; when every reader of a tensor is such a
convolution, the layers that produce it only need those positions. OpenVINO's CPU plugin does this itself at
compile time for an fp32 / bf16 model (its `StridesOptimization`), but not once NNCF has put FakeQuantize nodes
between the layers: an int8 resnet50 (v1, strides in its 1×1 convolutions) computes the last block of three stages
at 4× the positions it uses (bench/results/README.md, twenty-third session). `propagate_strides` carries the stride
back through pointwise operations (FakeQuantize, bias Add, ReLU, residual Add, …) into the convolution that
computes them — a stride-1 k×k convolution with "same" padding computes exactly the kept positions with stride s —
and subsamples a branch it cannot carry the stride into (a tensor other layers read in full) with a 1×1 MaxPool of
stride s, as OpenVINO does.
"""

from __future__ import annotations

from typing import Any

# Operations whose output at a position depends only on their inputs at that position (besides per-channel constants)
POINTWISE_OPS = frozenset({"Abs", "Add", "Clamp", "Convert", "Divide", "Elu", "Exp", "FakeQuantize", "Gelu", "HSigmoid",
                           "HSwish", "Maximum", "Minimum", "Multiply", "PRelu", "Relu", "Sigmoid", "Subtract", "Swish",
                           "Tanh"})


def _spatial(shape: Any) -> list[Any]:
    return list(shape)[2:]


def _static_spatial(value: Any) -> list[int] | None:
    """The spatial size of a tensor, if static."""
    dims = _spatial(value.get_partial_shape())
    return [d.get_length() for d in dims] if dims and all(d.is_static for d in dims) else None


def _kernel(conv: Any) -> list[int]:
    return [d.get_length() for d in _spatial(conv.input_value(1).get_partial_shape())]


def _plain(conv: Any) -> bool:
    """A Convolution with explicit padding, no dilation and a static kernel."""
    attributes = conv.get_attributes()
    return (conv.get_type_name() == "Convolution" and attributes["auto_pad"] == "explicit"
            and all(d == 1 for d in attributes["dilations"])
            and all(d.is_static for d in _spatial(conv.input_value(1).get_partial_shape())))


def _strided_pointwise_conv(node: Any, strides: list[int] | None = None) -> bool:
    """A 1×1 Convolution without padding and with a stride above 1 (equal to `strides` if given)."""
    if not _plain(node):
        return False
    attributes = node.get_attributes()
    own = list(attributes["strides"])
    return (all(k == 1 for k in _kernel(node)) and not any(attributes["pads_begin"]) and not any(attributes["pads_end"])
            and any(s > 1 for s in own) and (strides is None or own == strides))


def _same_padded_stride_one(node: Any) -> bool:
    """A stride-1 Convolution whose odd kernel is centred by its padding: with stride s it computes every s-th
    position of its stride-1 output, and the same count of them (⌈n / s⌉)."""
    if not _plain(node):
        return False
    attributes = node.get_attributes()
    return all(s == 1 for s in attributes["strides"]) and all(
        k % 2 == 1 and begin == end == k // 2
        for k, begin, end in zip(_kernel(node), attributes["pads_begin"], attributes["pads_end"]))


def _per_channel_constant(value: Any, spatial_rank: int) -> bool:
    """A Constant that broadcasts along every spatial axis of an output with `spatial_rank` of them (its trailing
    dimensions 1, as a bias or a FakeQuantize range): the same for every position. A rank-1 [C] constant is not one:
    it broadcasts along the last axis."""
    dims = list(value.get_partial_shape())
    return value.get_node().get_type_name() == "Constant" and all(
        d.is_static and d.get_length() == 1 for d in dims[len(dims) - min(len(dims), spatial_rank):])


def _convolution(like: Any, data: Any, strides: list[int]) -> Any:
    """`like` (a Convolution) reading `data` with `strides`, under its friendly name."""
    import openvino.opset13 as ops

    attributes = like.get_attributes()
    new = ops.convolution(data, like.input_value(1), strides, attributes["pads_begin"], attributes["pads_end"],
                          attributes["dilations"], attributes["auto_pad"])
    new.set_friendly_name(like.get_friendly_name())
    return new.output(0)


class _Rewrite:
    def __init__(self, model: Any) -> None:
        self.live = {op.get_instance_id() for op in model.get_ordered_ops()}
        self.strided: list[str] = []  # the convolutions that now compute fewer positions

    def readers(self, value: Any) -> list[Any]:
        """The nodes still in the model that read `value` (a replaced node keeps reading its inputs)."""
        return [target.get_node() for target in value.get_target_inputs()
                if target.get_node().get_instance_id() in self.live]

    def carried_into(self, value: Any, readers: int = 1) -> tuple[str, list[int]]:
        """How `value`'s producer can compute only every s-th position when only the `readers` being rewritten read
        it: ("pointwise", the indices of its non-constant inputs), ("convolution", []) or ("", []) for neither."""
        node = value.get_node()
        if len(self.readers(value)) != readers:
            return "", []
        if _same_padded_stride_one(node):
            return "convolution", []
        inputs, size = list(node.input_values()), _static_spatial(value)
        # a non-constant input of another size would be broadcast, and its positions are not the output's
        if node.get_type_name() in POINTWISE_OPS and size and all(
                _per_channel_constant(v, len(size)) or _static_spatial(v) == size for v in inputs):
            return "pointwise", [i for i, v in enumerate(inputs) if not _per_channel_constant(v, len(size))]
        return "", []

    def reaches_convolution(self, value: Any, readers: int = 1) -> bool:
        how, inputs = self.carried_into(value, readers)
        return how == "convolution" or any(self.reaches_convolution(value.get_node().input_value(i)) for i in inputs)

    def subsample(self, value: Any, strides: list[int], readers: int = 1) -> Any:
        """`value` at every `strides`-th position: its producer rewritten where `carried_into` allows, else a 1×1
        MaxPool of `value`."""
        import openvino.opset1 as ops

        node = value.get_node()
        how, inputs = self.carried_into(value, readers)
        if how == "convolution":
            self.strided.append(node.get_friendly_name())
            return _convolution(node, node.input_value(0), strides)
        if how == "pointwise":
            for index in inputs:
                node.input(index).replace_source_output(self.subsample(node.input_value(index), strides))
            return value
        zeros = [0] * len(strides)
        return ops.max_pool(value, strides, zeros, zeros, [1] * len(strides)).output(0)


def propagate_strides(model: Any) -> list[str]:
    """Rewrites `model` in place (see the module docstring); returns the convolutions that now compute only the
    positions their strided readers use (empty: nothing rewritten). The function computed is unchanged."""
    strided: list[str] = []
    while True:
        rewrite = _Rewrite(model)
        for op in model.get_ordered_ops():
            if not _strided_pointwise_conv(op):
                continue
            source, strides = op.input_value(0), list(op.get_attributes()["strides"])
            readers = rewrite.readers(source)
            # only where a convolution takes the stride: a MaxPool in its place would gain nothing
            if not all(_strided_pointwise_conv(reader, strides) for reader in readers) or \
                    not rewrite.reaches_convolution(source, len(readers)):
                continue
            small = rewrite.subsample(source, strides, len(readers))
            for reader in readers:
                reader.output(0).replace(_convolution(reader, small, [1] * len(strides)))
            strided += rewrite.strided
            break
        else:
            break
    model.validate_nodes_and_infer_types()
    return strided
