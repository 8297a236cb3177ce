"""Typed errors: the CLI prints their message as one line and exits with their code."""


class ExporterError(Exception):
    """Base class of every error the CLI reports without a traceback."""

    exit_code = 1


class UsageError(ExporterError, ValueError):
    """Bad command-line input (unknown names, invalid values)."""

    exit_code = 2


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters: how every stage reports a caught error."""
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}"
    if "out of memory" in message.lower() and not message.lower().startswith("out of memory"):
        message = "out of memory: " + message
    return message[:limit]

