"""Typed errors: the CLI prints their message as one line and exits with their code."""


class ExporterError(Exception):
    """Base class of every error the CLI reports without a traceback."""

    exit_code = 1


class UsageError(ExporterError, ValueError):
    """Bad command-line input (unknown names, invalid values)."""

    exit_code = 2
