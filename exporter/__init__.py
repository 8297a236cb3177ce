"""exporter: train the classic CNNs, compile and export them, and prove every artifact computes the same function."""

__version__ = "0.1.0"
