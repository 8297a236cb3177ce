"""Architecture facts from the seeds, and one test per seed bug that fails on the seed's code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exporter.models import count_macs, count_parameters, create_model
from exporter.models.lenet import ScratchBatchNorm
from tests.conftest import TEST_NUM_CLASSES


def test_lenet_parameter_count_by_hand() -> None:
    # conv1 6*(1*25)+6, conv2 16*(6*25)+16, fc 400*120+120, 120*84+84, 84*10+10
    expected = (150 + 6) + (2400 + 16) + (48000 + 120) + (10080 + 84) + (840 + 10)
    assert expected == 61_706
    assert count_parameters(create_model("lenet")) == expected


def test_lenet_macs_by_hand() -> None:
    conv = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150
    fc = 400 * 120 + 120 * 84 + 84 * 10
    assert count_macs(create_model("lenet"), (1, 1, 28, 28)) == conv + fc


def test_resnet18_reproduces_seed_004_shape_table() -> None:
    model = create_model("resnet18").eval()
    names = ["conv1", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    with torch.no_grad():
        model(torch.rand(1, 1, 224, 224))
    assert [shapes[n] for n in names] == [
        (1, 64, 112, 112), (1, 64, 56, 56), (1, 64, 56, 56), (1, 128, 28, 28),
        (1, 256, 14, 14), (1, 512, 7, 7), (1, 512, 1, 1), (1, 10),
    ]  # fmt: skip


def test_resnet50_v15_matches_torchvision_exactly() -> None:
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet50().eval()  # random init, no download
    ours = create_model("resnet50", in_channels=3, num_classes=1000, stride_on_3x3=True).eval()
    ours.load_state_dict(reference.state_dict())  # strict: every name and shape must line up
    assert count_parameters(ours) == count_parameters(reference) == 25_557_032
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff < 1e-5


def test_resnet50_keeps_seed_stride_placement_by_default() -> None:
    # Seed bug 5: the seed strides the first 1x1 conv (v1); torchvision (v1.5) strides the 3x3.
    seed_style = create_model("resnet50").layer2[0]
    v15 = create_model("resnet50", stride_on_3x3=True).layer2[0]
    assert (seed_style.conv1.stride, seed_style.conv2.stride) == ((2, 2), (1, 1))
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))


def test_resnet50_returns_pooled_logits_not_softmax() -> None:
    # Seed bug 2: the seed skipped the average pool (fc got 2048*7*7 features and failed) and returned softmax.
    model = create_model("resnet50", num_classes=TEST_NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224) * 10)
    assert out.shape == (2, TEST_NUM_CLASSES)
    assert not torch.allclose(out.sum(dim=1), torch.ones(2))
    assert (out < 0).any()  # probabilities are never negative; logits are


def test_resnet50v2_builds_and_has_2048x7x7_features() -> None:
    # Seed bug 1: seed 003's Block/Stack call super(Block2/Stack2): constructing it raised NameError.
    model = create_model("resnet50v2").eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, 2048, 7, 7)
    assert isinstance(model.layer1[0].short, nn.Conv2d)  # first block projects the pre-activated input
    assert isinstance(model.layer1[-1].short, nn.MaxPool2d)  # the last block carries the stride (Keras)


@pytest.mark.parametrize(("pooling", "shape"), [(None, (2, 2048, 7, 7)), ("avg", (2, 2048)), ("max", (2, 2048))])
def test_resnet50v2_without_top(pooling: str | None, shape: tuple[int, ...]) -> None:
    model = create_model("resnet50v2", include_top=False, pooling=pooling).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == shape


def test_scratch_batchnorm_statistics_are_buffers_and_used_in_eval() -> None:
    # Seed bug 4: plain attributes were missing from state_dict, and eval() under autograd used batch stats.
    model = create_model("lenet_bn_scratch", num_classes=TEST_NUM_CLASSES)
    keys = model.state_dict().keys()
    bn_keys = [k for k in keys if k.endswith(("moving_mean", "moving_var"))]
    assert len(bn_keys) == 8

    bn = ScratchBatchNorm(3, num_dims=4)
    bn.train()
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    bn(x)
    batch_mean = x.mean(dim=(0, 2, 3), keepdim=True)
    # The seed's momentum convention: moving = 0.9 * moving + 0.1 * batch.
    torch.testing.assert_close(bn.moving_mean, 0.1 * batch_mean)
    bn.eval()
    with torch.enable_grad():
        single = bn(x[:1])
    expected = (x[:1] - bn.moving_mean) / torch.sqrt(bn.moving_var + bn.eps)
    torch.testing.assert_close(single, expected)


def test_scratch_batchnorm_matches_torch_batchnorm() -> None:
    ours, reference = ScratchBatchNorm(4, num_dims=2), nn.BatchNorm1d(4, momentum=0.1)
    x = torch.randn(16, 4)
    torch.testing.assert_close(ours.train()(x), reference.train()(x))
    torch.testing.assert_close(ours.moving_mean.flatten(), reference.running_mean)
    y = torch.randn(3, 4)
    # torch's running_var uses the unbiased batch variance; the seed (and we) keep the biased one.
    reference.running_var.copy_(ours.moving_var.flatten())
    torch.testing.assert_close(ours.eval()(y), reference.eval()(y))
