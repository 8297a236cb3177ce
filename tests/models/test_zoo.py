"""Every registered model: shapes, gradients, determinism and state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch

from exporter.models import create_model, get_spec
from tests.conftest import ALL_MODELS, TEST_NUM_CLASSES


def _input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *get_spec(name).input_shape)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_gives_logits_of_num_classes(name: str) -> None:
    model = create_model(name, num_classes=TEST_NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(_input(name, 3))
    assert out.shape == (3, TEST_NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    # Seed 002's in-place ReLU broke autograd: every model must back-propagate to every parameter.
    model = create_model(name, num_classes=TEST_NUM_CLASSES).train()
    loss = torch.nn.functional.cross_entropy(model(_input(name)), torch.tensor([1, 5]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_eval_is_deterministic_and_state_dict_round_trips(name: str) -> None:
    model = create_model(name, num_classes=TEST_NUM_CLASSES)
    model.train()
    with torch.no_grad():
        model(_input(name))  # move BatchNorm statistics away from their initial values
    model.eval()
    x = _input(name)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    clone = create_model(name, num_classes=TEST_NUM_CLASSES)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    clone.eval()
    with torch.no_grad():
        assert torch.equal(clone(x), first)
