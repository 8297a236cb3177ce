"""The model zoo: importing this package registers every architecture (one module per family)."""

# Registration order is the listing order: the seeds' chronology, LeNet to ResNet.
from exporter.models import lenet, alexnet, vgg, nin, googlenet, resnet, densenet  # noqa: F401, I001
from exporter.models.registry import (
    MODELS,
    CpuRecipe,
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
    "MODELS", "CpuRecipe", "InputShapeError", "ModelSpec", "Recipe", "UnknownModelError", "check_input_shape",
    "count_macs", "count_parameters", "create_model", "get_spec", "list_models", "model_summary", "valid_sizes",
]
