"""Shared, cached `exporter build` runs for the tests (one full build per cheap model per test session).

`full_build(name)` runs the real pipeline (`exporter.export.build`) with untrained weights, the test class count
and a small input, into a session temporary directory, and returns its `BuildResult`. Test files import the
`full_build` fixture from here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ALL_MODELS, TEST_NUM_CLASSES

# Cheap models at small inputs; only the first runs in the default (fast) test run, the others are `slow`.
CHEAP_INPUT_SIZES = {"lenet_bn": 28, "lenet": 28, "resnet18": 32}
CHEAP_MODELS = [name for name in CHEAP_INPUT_SIZES if name in ALL_MODELS]
FAST_MODELS = CHEAP_MODELS[:1]
MAX_BATCH = 16


def model_params() -> list:
    """pytest params over the cheap models: the first in the default run, the rest marked slow."""
    return [pytest.param(name, marks=() if name in FAST_MODELS else pytest.mark.slow) for name in CHEAP_MODELS]


def build_options(model: str, artifacts_dir: Path, **overrides):
    from exporter.export import BuildOptions

    kwargs = dict(model=model, untrained=True, num_classes=TEST_NUM_CLASSES, input_size=CHEAP_INPUT_SIZES.get(model),
                  artifacts_dir=artifacts_dir, progress=False, parity_samples=16, max_batch=MAX_BATCH)
    kwargs.update(overrides)
    return BuildOptions(**kwargs)


_BUILDS: dict[str, object] = {}


@pytest.fixture(scope="session")
def full_build(tmp_path_factory: pytest.TempPathFactory):
    """`full_build(model_name)` → the session's cached `BuildResult` of that model (every available backend)."""
    from exporter.export import build

    def get(model_name: str):
        if model_name not in _BUILDS:
            _BUILDS[model_name] = build(build_options(model_name, tmp_path_factory.mktemp(f"build-{model_name}")))
        return _BUILDS[model_name]

    return get
