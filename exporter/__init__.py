"""exporter: train the classic CNNs, compile and export them, and prove every artifact computes the same function.

`exporter.build`, `exporter.verify` and `exporter.bench` are the Python API (see `exporter.api`); they are imported
on first use, so `import exporter` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["bench", "build", "verify"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from exporter import api

        return getattr(api, name)
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")
