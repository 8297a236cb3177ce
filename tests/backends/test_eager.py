"""The torch runners (eager, inductor, aoti): fp32 on CUDA means IEEE fp32, so TF32 is off while one is active.

torch lets cuDNN convolutions use TF32 by default; the flags are process-wide and settable without a GPU, so these
tests pretend torch sees CUDA and give the runners a small CPU module to "load".
"""

from __future__ import annotations

import pytest
import torch

from exporter.backends import eager, inductor
from exporter.backends.aoti import AOTIRunner
from exporter.backends.eager import EagerRunner, strict_fp32
from exporter.backends.inductor import InductorRunner


def _tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def weights(monkeypatch, tmp_path):
    """A weights path, torch "seeing" CUDA, every torch runner loading a CPU Linear, torch's default TF32 flags."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for module in (eager, inductor):
        monkeypatch.setattr(module, "load_torch_model", lambda path, device, **options: torch.nn.Linear(2, 2).eval())
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: torch.nn.Linear(2, 2).eval(),
                        raising=False)
    saved = _tf32()
    # torch's defaults (monkeypatch cannot restore these attributes): convolutions may use TF32, matmuls not.
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"not read: load_torch_model is replaced")
    yield path
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("runner_class", [EagerRunner, InductorRunner, AOTIRunner])
def test_fp32_on_cuda_turns_tf32_off_until_deactivate(weights, runner_class) -> None:
    with runner_class(weights, device="cuda", precision="fp32"):
        assert _tf32() == (False, False)
    assert _tf32() == (False, True)


@pytest.mark.parametrize("device, precision", [("cpu", "fp32"), ("cuda", "fp16"), ("cuda", "bf16")])
def test_other_devices_and_precisions_leave_tf32_alone(weights, device: str, precision: str) -> None:
    with EagerRunner(weights, device=device, precision=precision):
        assert _tf32() == (False, True)
    assert _tf32() == (False, True)


def test_overlapping_runners_restore_only_when_the_last_one_goes(weights) -> None:
    first = EagerRunner(weights, device="cuda").activate()
    second = InductorRunner(weights, device="cuda").activate()
    first.deactivate()
    assert _tf32() == (False, False)  # the second runner is still active: still IEEE fp32
    second.deactivate()
    assert _tf32() == (False, True)


def test_strict_fp32_block_restores_after_an_error(weights) -> None:
    with pytest.raises(RuntimeError, match="compile failed"), strict_fp32():
        assert _tf32() == (False, False)
        raise RuntimeError("compile failed")
    assert _tf32() == (False, True)


def test_bf16_inside_folds_batchnorm_in_fp32_before_rounding() -> None:
    """Each folded weight is rounded to bf16 once: closer to fp32 than folding bf16 weights and statistics."""
    from exporter.backends.eager import bf16_inside
    from exporter.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet_bn", num_classes=7).eval()
    with torch.no_grad():  # statistics far from the identity, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-2, 2)
                module.running_var.uniform_(0.01, 4)
                module.weight.uniform_(0.5, 3)
    wrapped = bf16_inside(model)
    assert not [m for m in wrapped.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # folded into the convs
    assert all(p.dtype == torch.bfloat16 for p in wrapped.parameters())
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        got = wrapped(x)
        unfolded = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    cosine = torch.nn.functional.cosine_similarity(got, want).min()
    assert cosine > 0.998 and (got - want).abs().max() <= 2 * (unfolded - want).abs().max()
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]  # the original is untouched


def test_batchnorm_folding_never_swallows_our_errors() -> None:
    """An untraceable model is copied as it is, but an ExporterError raised meanwhile (training's SIGTERM handler
    raises one) propagates: swallowing it once left `exporter train` running after SIGTERM."""
    import torch

    from exporter.backends.eager import batchnorm_folded_copy
    from exporter.errors import ExporterError

    class Untraceable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # data-dependent: torch.fx cannot trace it

    class Interrupted(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ExporterError("interrupted by SIGTERM")

    copied = batchnorm_folded_copy(Untraceable())
    assert isinstance(copied, Untraceable) and not copied.training
    with pytest.raises(ExporterError, match="SIGTERM"):
        batchnorm_folded_copy(Interrupted())
