"""The model zoo: importing this package registers every architecture (one module per family)."""

from exporter.models import alexnet, densenet, googlenet, lenet, nin, resnet, vgg  # noqa: F401  (registration)
from exporter.models.registry import (
    MODELS,
    InputShapeError,
    ModelSpec,
    Recipe,
    UnknownModelError,
    check_input_shape,
    count_macs,
    count_parameters,
    create_model,
    get_spec,
    list_models,
    model_summary,
    valid_sizes,
)

__all__ = [
    "MODELS", "InputShapeError", "ModelSpec", "Recipe", "UnknownModelError", "check_input_shape", "count_macs",
    "count_parameters", "create_model", "get_spec", "list_models", "model_summary", "valid_sizes",
]
