"""Registry behaviour and bad input."""

from __future__ import annotations

import pytest

from exporter.models import (
    MODELS,
    InputShapeError,
    UnknownModelError,
    check_input_shape,
    create_model,
    get_spec,
    model_summary,
)
from exporter.models.registry import register_model

REQUIRED = ["lenet", "lenet_bn", "lenet_bn_scratch", "alexnet", "vgg11", "vgg11_small", "nin", "googlenet",
            "resnet18", "densenet", "resnet50", "resnet50v2"]


def test_every_seed_architecture_is_registered() -> None:
    assert set(REQUIRED) <= set(MODELS)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_model(family="x", seed="x", input_shape=(1, 28, 28), recipe=MODELS["lenet"].recipe,
                       name="lenet")(lambda **kw: None)


def test_unknown_model_names_close_matches() -> None:
    with pytest.raises(UnknownModelError, match="did you mean resnet50"):
        get_spec("resnet5O")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": -1}, {"num_classes": 2.5}])
def test_non_positive_sizes_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        create_model("lenet", **kwargs)


def test_too_small_input_names_the_smallest_valid_size() -> None:
    with pytest.raises(InputShapeError, match=r"alexnet: input 1×8×8 .* smallest valid size is 1×195×195 .*195–226"):
        check_input_shape("alexnet", (1, 8, 8))
    with pytest.raises(InputShapeError, match=r"lenet: input 1×32×32 .* sizes it accepts: 28–31"):
        check_input_shape("lenet", (1, 32, 32))
    with pytest.raises(InputShapeError, match="positive sizes"):
        check_input_shape("resnet18", (1, 0, 0))
    check_input_shape("resnet18", (1, 32, 32))  # fully convolutional: small inputs are fine


@pytest.mark.parametrize("name", REQUIRED)
def test_summary_is_computed(name: str) -> None:
    summary = model_summary(name)
    assert summary["params"] > 0 and summary["macs"] > 0
    assert tuple(summary["input_shape"]) == get_spec(name).input_shape
