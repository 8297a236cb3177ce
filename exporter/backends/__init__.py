"""Backends: one module per runtime, each registering a Runner (see `base.py` for the protocol)."""

from exporter.backends import eager  # noqa: F401  (registration)
from exporter.backends import inductor  # noqa: F401  (registration)
from exporter.backends import aoti  # noqa: F401  (registration)
from exporter.backends import onnx  # noqa: F401  (registration)
from exporter.backends import onnxruntime  # noqa: F401  (registration)
from exporter.backends import openvino  # noqa: F401  (registration)
from exporter.backends import tensorrt  # noqa: F401  (registration)
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
