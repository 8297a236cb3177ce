"""File helpers every stage shares: sha256 of a file and atomic writes (temporary sibling + rename), so an
interrupted run never leaves a half-written file under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from exporter.errors import ExporterError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def user_cache_dir(*parts: str) -> Path:
    """`$EXPORTER_CACHE_DIR`, else `$XDG_CACHE_HOME/exporter`, else `~/.cache/exporter`, joined with `parts`.

    For caches that outlive one build (TensorRT tactic timings, ONNX Runtime's TensorRT engines); not created here.
    """
    root = os.environ.get("EXPORTER_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exporter")
    return Path(root).joinpath(*parts)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any, *, default: Callable[[Any], Any] | None = None,
                      allow_nan: bool = True) -> None:
    """Write `data` as indented JSON (with a final newline) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=default, allow_nan=allow_nan) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` for a writer that wants a file name; it is renamed onto `path` only
    if the block succeeds (and removed otherwise)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keep the suffix: some writers dispatch on it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(directory: str | Path, what: str) -> None:
    """Prove `directory` can take new files before long work whose output would otherwise be lost."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExporterError(f"cannot write to {directory} ({exc.strerror or exc}), so {what} would be lost; fix "
                            "its permissions or choose another --artifacts directory") from None


def read_json_object(path: str | Path, error: type[ExporterError], what: str, fix: str = "") -> dict[str, Any]:
    """The JSON object stored at `path`; `error` in one line (ending with `fix`, what to do about it) when it is
    missing, unreadable or not an object."""
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found{fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: unreadable {what} ({type(exc).__name__}: {exc}){fix}") from None
    if not isinstance(data, dict):
        raise error(f"cannot read {path}: the {what} is not a JSON object{fix}")
    return data
