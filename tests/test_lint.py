"""Pre-export lint: each pitfall is found on a model that has it, and registered models are clean."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exporter.lint import LintError, LintWarning, check_strict, lint_exported, lint_model
from exporter.models import create_model
from tests.conftest import TEST_NUM_CLASSES


def _codes(warnings: list[LintWarning]) -> list[str]:
    return [w.code for w in warnings]


class GradModeNorm(nn.Module):
    """Seed 001's bug: picks batch statistics with `torch.is_grad_enabled()`, so eval() does not switch them off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return (x - x.mean(0, keepdim=True)) / (x.var(0, keepdim=True, unbiased=False) + 1e-5).sqrt()
        return x


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(4, -1))  # assumes batch 4


class WithIndex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor([0, 2], dtype=torch.int64))
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)[:, self.index])


@pytest.mark.parametrize("model", ["lenet", "lenet_bn", "lenet_bn_scratch", "resnet18"])
def test_registered_models_are_clean(model: str) -> None:
    net = create_model(model, num_classes=TEST_NUM_CLASSES).eval()
    shape = (1, 32, 32) if model == "resnet18" else (1, 28, 28)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert lint_model(net, shape) == []
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_training_mode_is_found_and_weights_are_restored() -> None:
    net = create_model("lenet_bn", num_classes=TEST_NUM_CLASSES)  # still in train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    codes = _codes(lint_model(net, (1, 28, 28)))
    assert codes.count("training-mode") >= 2  # flag and behaviour (running statistics updated)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_dropout_active_in_eval_is_found() -> None:
    class AlwaysDropout(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(x.flatten(1), 0.5, training=True)

    warnings = lint_model(AlwaysDropout().eval(), (1, 4, 4))
    assert _codes(warnings) == ["training-mode"] and "Dropout" in warnings[0].message


def test_batch_statistics_in_eval_are_found() -> None:
    warnings = lint_model(nn.Sequential(GradModeNorm(), nn.Flatten()).eval(), (1, 4, 4))
    assert "training-mode" in _codes(warnings)


def test_uneven_adaptive_pool_is_found() -> None:
    net = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten()).eval()
    warnings = lint_model(net, (1, 8, 8))
    assert _codes(warnings) == ["adaptive-pool"] and "8×8 to 3×3" in warnings[0].message
    assert lint_model(net, (1, 9, 9)) == []


def test_fixed_batch_is_found() -> None:
    warnings = lint_model(FixedBatch().eval(), (1, 4, 4))
    assert "batch-specialised" in _codes(warnings)


def test_int64_weights_are_found_before_and_after_tracing() -> None:
    net = WithIndex().eval()
    assert "int64-constant" in _codes(lint_model(net, (1, 2, 2)))
    program = torch.export.export(net, (torch.rand(2, 1, 2, 2),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    assert _codes(lint_exported(program, dynamic_batch=True)) == ["int64-constant"]


def test_batchnorm_counter_is_not_an_int64_finding() -> None:
    net = create_model("lenet_bn", num_classes=TEST_NUM_CLASSES).eval()
    program = torch.export.export(net, (torch.rand(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    assert lint_exported(program, dynamic_batch=True) == []


def test_specialised_batch_in_traced_program() -> None:
    net = create_model("lenet", num_classes=TEST_NUM_CLASSES).eval()
    program = torch.export.export(net, (torch.rand(2, 1, 28, 28),))  # no dynamic_shapes: batch fixed to 2
    warnings = lint_exported(program, dynamic_batch=True)
    assert _codes(warnings) == ["batch-specialised"] and "fixed the batch to 2" in warnings[0].message
    assert lint_exported(program, dynamic_batch=False) == []


def test_strict() -> None:
    check_strict([], strict=True)
    check_strict([LintWarning("adaptive-pool", "x")], strict=False)
    with pytest.raises(LintError, match=r"--strict: 1 lint warning\(s\): \[adaptive-pool\] x"):
        check_strict([LintWarning("adaptive-pool", "x")], strict=True)
