"""The exact stride rewrite of OpenVINO models (`exporter.backends.openvino_strides`)."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
import torch
from torch import nn

from exporter.backends.openvino_strides import propagate_strides
from tests.conftest import TEST_NUM_CLASSES


class _V1Stage(nn.Module):
    """The end of a ResNet v1 stage: a bottleneck (1×1, 3×3, 1×1, identity shortcut) whose output only strided 1×1
    convolutions read (the next stage's first conv and projection); `full_reader` adds a reader of every position."""

    def __init__(self, full_reader: bool = False, row_offsets: int = 0) -> None:
        super().__init__()
        # a constant of one value per column (not per channel): it differs between the positions a stride keeps
        self.register_buffer("row_offsets", torch.arange(float(row_offsets)) if row_offsets else None)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.next_conv, self.next_projection = nn.Conv2d(8, 16, 1, stride=2), nn.Conv2d(8, 16, 1, stride=2)
        self.full_reader = full_reader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = torch.relu(self.stem(x))
        out = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(shortcut))))) + shortcut)
        if self.row_offsets is not None:
            out = out + self.row_offsets
        strided = torch.relu(self.next_conv(out)) + self.next_projection(out)
        return strided.mean((2, 3)) + (out.mean((2, 3)).sum(1, keepdim=True) if self.full_reader else 0)


def _ir(net: nn.Module, size: int) -> ov.Model:
    model = ov.convert_model(net.eval(), example_input=torch.zeros(1, net.stem.in_channels, size, size))
    model.reshape([-1, net.stem.in_channels, size, size])  # as a build's IR: the batch dynamic
    return model


def _outputs(model: ov.Model, x: np.ndarray) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(x)[0])


def _strides(model: ov.Model) -> dict[str, list[int]]:
    return {op.get_friendly_name(): list(op.get_strides()) for op in model.get_ordered_ops()
            if op.get_type_name() == "Convolution"}


@pytest.mark.parametrize("size", [15, 16])  # an odd size: ⌈n / 2⌉ positions either way
def test_the_stride_reaches_the_convolutions_that_compute_the_read_positions(size: int) -> None:
    torch.manual_seed(0)
    net = _V1Stage()
    model, original = _ir(net, size), _ir(net, size)
    strided = propagate_strides(model)
    # conv3 (1×1) takes the stride, then passes it on to conv2 (3×3, "same" padding), which computes the positions;
    # the next stage's pair (stride 2 before) now reads them with stride 1
    assert [name.split("/")[0] for name in strided] == ["__module.conv3", "__module.conv2"]
    assert [name.split("/")[0] for name, s in _strides(model).items() if s != [1, 1]] == ["__module.conv2"]
    assert [s for s in _strides(original).values()].count([2, 2]) == 2
    assert sum(op.get_type_name() == "MaxPool" for op in model.get_ordered_ops()) == 1  # the shortcut, read in full
    x = np.random.default_rng(0).standard_normal((2, 1, size, size), dtype=np.float32)
    np.testing.assert_allclose(_outputs(model, x), _outputs(original, x), rtol=1e-5, atol=1e-5)


def test_a_tensor_also_read_in_full_is_left_as_it_is() -> None:
    torch.manual_seed(0)
    model = _ir(_V1Stage(full_reader=True), 16)
    before = _strides(model)
    assert propagate_strides(model) == [] and _strides(model) == before
    assert not any(op.get_type_name() == "MaxPool" for op in model.get_ordered_ops())


def test_a_constant_that_varies_along_a_row_stops_the_stride() -> None:
    torch.manual_seed(0)
    net = _V1Stage(row_offsets=16)
    model, original = _ir(net, 16), _ir(net, 16)
    assert propagate_strides(model) == []
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(_outputs(model, x), _outputs(original, x))


def test_a_quantized_model_computes_exactly_the_same() -> None:
    """NNCF's FakeQuantize nodes sit between the layers (what stops OpenVINO's own pass); the rewrite carries the
    stride through them, and the int8 model's outputs are unchanged to the bit."""
    import nncf

    torch.manual_seed(0)
    model = _ir(_V1Stage(), 16)
    images = np.random.default_rng(1).random((16, 1, 1, 16, 16), dtype=np.float32)
    quantized = nncf.quantize(model, nncf.Dataset(list(images)), subset_size=16)
    assert any(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    rewritten = quantized.clone()
    assert len(propagate_strides(rewritten)) == 2 and sum(s == [2, 2] for s in _strides(rewritten).values()) == 1
    x = np.random.default_rng(2).random((3, 1, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(_outputs(rewritten, x), _outputs(quantized, x))


def test_resnet50_computes_the_last_block_of_three_stages_at_the_next_stages_resolution() -> None:
    """The registry's resnet50 (v1: its stages' strides on 1×1 convolutions): the 3×3 and the last 1×1 of each
    stage's last block, 6 convolutions, and the same logits."""
    from exporter.models.registry import create_model

    torch.manual_seed(0)
    net = create_model("resnet50", num_classes=TEST_NUM_CLASSES).eval()
    model = ov.convert_model(net, example_input=torch.zeros(1, 3, 64, 64))
    assert propagate_strides(model.clone()) == []  # spatial sizes unknown: nothing proves the positions line up
    model.reshape([-1, 3, 64, 64])  # as a build's IR
    original = model.clone()
    assert len(propagate_strides(model)) == 6
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    reference = _outputs(original, x)
    np.testing.assert_allclose(_outputs(model, x), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
