"""Backends: one module per runtime, each registering a Runner (see `base.py` for the protocol)."""

from exporter.backends import (
    aoti,  # noqa: F401  (registration)
    eager,  # noqa: F401  (registration)
    inductor,  # noqa: F401  (registration)
    onnx,  # noqa: F401  (registration)
    onnxruntime,  # noqa: F401  (registration)
    openvino,  # noqa: F401  (registration)
    tensorrt,  # noqa: F401  (registration)
)
from exporter.backends.base import (
    BACKENDS,
    STAGES,
    Artifact,
    BackendUnavailable,
    BisectionUnsupported,
    BuildContext,
    Runner,
    RunnerError,
    Stage,
    Variant,
    get_backend,
    register_backend,
    register_stage,
    runner_for,
)

__all__ = ["BACKENDS", "STAGES", "Artifact", "BackendUnavailable", "BisectionUnsupported", "BuildContext", "Runner",
           "RunnerError", "Stage", "Variant", "get_backend", "register_backend", "register_stage", "runner_for"]
