"""Shared fixtures. Models are parametrized from the registry so a new model is tested with no new code."""

from __future__ import annotations

import pytest
import torch

from exporter.models import list_models

ALL_MODELS = list_models()
# Test heads use a non-default class count so no test can pass by accident with the default head.
TEST_NUM_CLASSES = 7


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
