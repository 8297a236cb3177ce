"""A build's `manifest.json`: what `exporter build` wrote, and how later stages (verify, bench) find and trust it.

A build lives in `artifacts/<model>/<build-id>/` with `manifest.json` beside its files; `artifacts/<model>/latest`
is a relative symlink to the newest good build (replaced atomically). The manifest's top-level keys:

- `format`, `build_id`, `created`, `model`, `num_classes`, `in_channels`, `input_shape` (C, H, W), `dataset`
  (the `--data` the weights were trained on; null = the embedded digits5k), `untrained`;
- `input` / `output`: name, shape (`"batch"` for a dynamic dimension), dtype, layout and scaling;
- `batch`: {dynamic, static, max};
- `weights`: where they came from (checkpoint path, its sha256, training accuracy);
- `files`: {relative path: {size, sha256}} of every file in the build except the manifest itself;
- `artifacts`: one entry per runnable artifact (`exporter.backends.base.Artifact` fields, plus `files`,
  `opset`, … where known); `skipped`: [{backend, reason}];
- `lint`, `diagnostics`, `timings` (seconds per stage), `versions`, `parity` (where the parity records are —
  `parity.json`, written by the build's quick check, `exporter verify` and tuning — and each label's status);
  later stages update `parity` and add their own sections (`bench`, `tuning`, `recommended`) with
  `update_manifest`. The result files (`parity.json`, `bench.json`) are read through `exporter.results`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from exporter.backends.base import Artifact, Runner, runner_for
from exporter.errors import ExporterError
from exporter.fileio import atomic_write_json, read_json_object, sha256_file  # noqa: F401  (sha256_file: API)
from exporter.paths import default_artifacts_dir

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
FORMAT_VERSION = 2  # 2: one parity record format (`parity.json`) for the build's check, verify and tuning
PARITY_FILE = "parity.json"
BENCH_FILE = "bench.json"
REFERENCE_CACHE_FILE = "parity_reference.npz"
# Written into a build by later stages (verify, bench): results, not artifacts, so not in the hash list.
RESULT_FILES = (MANIFEST_NAME, PARITY_FILE, BENCH_FILE, REFERENCE_CACHE_FILE)
_ARTIFACT_FIELDS = {f.name for f in fields(Artifact)}


class ManifestError(ExporterError):
    """A build that cannot be trusted: missing or unreadable manifest, or a file that does not match its hash."""


def file_entries(build_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every regular file under `build_dir` except the result files."""
    entries = {}
    for path in sorted(Path(build_dir).rglob("*")):
        if path.is_file() and not path.is_symlink() and path.relative_to(build_dir).as_posix() not in RESULT_FILES:
            rel = path.relative_to(build_dir).as_posix()
            entries[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def json_default(value: Any) -> Any:
    """`json.dumps` default for the values results hold: paths, numpy scalars/arrays, records with `to_dict`."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename over `path`)."""
    atomic_write_json(path, data, default=json_default)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on a directory (serialises read-modify-write of its manifest)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): last writer wins
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def artifact_from_entry(entry: dict[str, Any]) -> Artifact:
    """An Artifact from a manifest entry (extra keys such as `files` or `opset` are ignored)."""
    try:
        return Artifact(**{k: v for k, v in entry.items() if k in _ARTIFACT_FIELDS})
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"bad artifact entry {entry.get('name', '?')!r} in manifest: {exc}") from None


@dataclass
class Build:
    """A finished build directory and its parsed manifest."""

    dir: Path
    manifest: dict[str, Any]

    @property
    def artifacts(self) -> list[Artifact]:
        """Every runnable artifact of the build (eager reference included)."""
        return [artifact_from_entry(entry) for entry in self.manifest.get("artifacts", [])]

    def artifact(self, name: str) -> Artifact:
        """The artifact called `name`; ManifestError naming the available ones otherwise."""
        for artifact in self.artifacts:
            if artifact.name == name:
                return artifact
        names = ", ".join(a.name for a in self.artifacts) or "none"
        raise ManifestError(f"build {self.dir} has no artifact {name!r} (it has: {names})")

    @property
    def reference(self) -> Artifact | None:
        """The artifact every other one is judged against: the manifest's `reference` (an ONNX source's build names
        its ONNX reference evaluator or ONNX Runtime fp32), else the eager fp32 weights; None when neither exists."""
        named = self.manifest.get("reference")
        for artifact in self.artifacts:
            if (artifact.name == named) if named else (artifact.backend == "eager" and artifact.precision == "fp32"):
                return artifact
        return None

    def runner(self, artifact: Artifact | str) -> Runner:
        """An inactive Runner for one of the build's artifacts."""
        if isinstance(artifact, str):
            artifact = self.artifact(artifact)
        return runner_for(artifact, self.dir)

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["input_shape"]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def dataset(self) -> str | None:
        """The `--data` the weights were trained on; None means the embedded digits5k."""
        return self.manifest.get("dataset")

    @property
    def untrained(self) -> bool:
        return bool(self.manifest.get("untrained", False))

    @property
    def build_id(self) -> str:
        return self.manifest.get("build_id", self.dir.name)


def _build_in(directory: Path) -> Path:
    """A build directory itself, or the `latest` build of a model directory."""
    if (directory / MANIFEST_NAME).is_file():
        return directory
    latest = directory / LATEST_NAME
    if latest.is_symlink() or latest.exists():
        if not (latest / MANIFEST_NAME).is_file():
            raise ManifestError(f"{latest} does not point at a finished build (rebuild with "
                                f"`exporter build {directory.name}`)")
        return latest.resolve()
    raise ManifestError(f"{directory} is not a build directory (no {MANIFEST_NAME}) and holds no {LATEST_NAME} build")


def resolve_build(target: str | Path, artifacts_dir: Path | None = None) -> Path:
    """The build directory a user means: a model name (→ its `latest` build), a model dir, or a build dir."""
    artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir()
    text = str(target)
    from exporter.models.sources import is_source, source_folder

    if not isinstance(target, Path) and is_source(text) and not Path(text).is_dir():
        model_dir = Path(artifacts_dir) / source_folder(text)  # the source itself need not exist any more
        if not (model_dir / LATEST_NAME).is_symlink() and not (model_dir / LATEST_NAME).exists():
            raise ManifestError(f"no build of {text} in {artifacts_dir} (run `exporter build {text}` first)")
        return _build_in(model_dir)
    is_path = isinstance(target, Path) or "/" in text or os.sep in text
    if not is_path:
        from exporter.models import MODELS, get_spec

        if text in MODELS or not Path(text).is_dir():
            spec = get_spec(text)  # an unknown model name raises UnknownModelError naming close matches
            model_dir = Path(artifacts_dir) / spec.folder
            if not (model_dir / LATEST_NAME).is_symlink() and not (model_dir / LATEST_NAME).exists():
                raise ManifestError(f"no build of {spec.name} in {artifacts_dir} "
                                    f"(run `exporter build {spec.name}` first)")
            return _build_in(model_dir)
    path = Path(target)
    if not path.is_dir():
        raise ManifestError(f"build directory {path} does not exist")
    return _build_in(path)


def read_manifest(build_dir: Path) -> dict[str, Any]:
    """The parsed manifest of a build directory; ManifestError when missing or unreadable."""
    path = Path(build_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{build_dir} has no {MANIFEST_NAME}: not a finished build")
    data = read_json_object(path, ManifestError, "build manifest")
    if "model" not in data or "files" not in data:
        raise ManifestError(f"{path} is not an exporter build manifest")
    version = data.get("format")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(f"{path} has format {version!r}, which this exporter does not read ({FORMAT_VERSION}); "
                            "upgrade exporter")
    if version < FORMAT_VERSION:
        raise ManifestError(f"{path} was written by an older exporter (format {version}, this one reads "
                            f"{FORMAT_VERSION}); rebuild with `exporter build {data.get('model', 'MODEL')}`")
    problem = _schema_problem(data)
    if problem:
        model = data.get("model", "MODEL")
        raise ManifestError(f"{path} is damaged: {problem} (rebuild with `exporter build {model}`)")
    return data


def _positive_ints(value: Any, count: int | None = None) -> bool:
    return isinstance(value, list) and (count is None or len(value) == count) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _schema_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a manifest's fields that later stages rely on (None: nothing)."""
    if not isinstance(data.get("model"), str):
        return "`model` is not a name"
    if not _positive_ints(data.get("input_shape"), 3):
        return f"`input_shape` must be three positive integers (C, H, W), got {data.get('input_shape')!r}"
    if not _positive_ints([data.get("num_classes")]):
        return f"`num_classes` must be a positive integer, got {data.get('num_classes')!r}"
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str) for k, v in files.items()):
        return "`files` must map each relative path to its size and sha256"
    artifacts = data.get("artifacts")
    if not isinstance(artifacts, list) or not all(
            isinstance(a, dict) and all(isinstance(a.get(k), str) for k in ("name", "backend", "path", "precision"))
            and isinstance(a.get("options", {}), dict) for a in artifacts):
        return "`artifacts` must be a list of entries with name, backend, path and precision"
    batch = data.get("batch")
    if not isinstance(batch, dict) or not _positive_ints([batch.get("max")]):
        return "`batch` must give the largest batch (`max`)"
    for key, kind in _SECTION_TYPES.items():
        value = data.get(key)
        if value is not None and not isinstance(value, kind):
            return f"`{key}` must be {'an object' if kind is dict else 'a list'}, got {type(value).__name__}"
    if not all(isinstance(entry, dict) for key in ("skipped", "failed") for entry in data.get(key) or []):
        return "`skipped` and `failed` must list objects"
    return None


# The other sections later stages read (each may be absent or null).
_SECTION_TYPES: dict[str, type] = {
    "weights": dict, "input": dict, "output": dict, "options": dict, "diagnostics": dict, "timings": dict,
    "versions": dict, "parity": dict, "bench": dict, "tuning": dict, "recommended": dict, "skipped": list,
    "failed": list, "lint": list, "warnings": list, "class_names": list,
}


def inside_build(build_dir: Path, rel: str) -> Path:
    """The file `rel` names inside `build_dir`; ManifestError when it is absolute, climbs out (`..`) or is reached
    through a symbolic link — a manifest must never make a stage read or run a file outside its build."""
    build_dir = Path(build_dir).resolve()
    candidate = Path(rel)
    if not rel or candidate.is_absolute() or ".." in candidate.parts:
        raise ManifestError(f"{build_dir / MANIFEST_NAME} names {rel!r}, a path outside the build directory; "
                            "refusing to use it (rebuild the model)")
    path = build_dir / candidate
    if path.resolve() != path:  # a link anywhere below the build directory
        raise ManifestError(f"{path} is reached through a symbolic link; refusing to use it (rebuild the model)")
    return path


def check_artifact_paths(build_dir: Path, manifest: dict[str, Any]) -> None:
    """Every path the manifest names stays inside the build, and every artifact's file is in the hash list."""
    for rel in manifest["files"]:
        inside_build(build_dir, rel)
    for entry in manifest["artifacts"]:
        inside_build(build_dir, entry["path"])
        if entry["path"] not in manifest["files"]:
            raise ManifestError(f"artifact {entry['name']!r} names {entry['path']!r}, which is not in the manifest's "
                                "sha256 list; refusing to load it (rebuild the model)")


def verify_files(build_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists: present, same size, same sha256 (ManifestError on the first miss)."""
    build_dir = Path(build_dir)
    check_artifact_paths(build_dir, manifest)
    for rel, entry in manifest["files"].items():
        path = inside_build(build_dir, rel)
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing (rebuild the model)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ManifestError(f"{path} has {size} bytes, the manifest says {entry['size']} "
                                f"(truncated or modified; rebuild the model)")
        if sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path} does not match its sha256 in the manifest (modified; rebuild the model)")
        if path.suffix == ".onnx":
            from exporter.backends.onnx import check_external_data

            check_external_data(path, build_dir, set(manifest["files"]))


def load_build(target: str | Path, artifacts_dir: Path | None = None, *, verify_hashes: bool = True) -> Build:
    """Resolve and load a build; with `verify_hashes` every listed file is checked against its sha256."""
    build_dir = resolve_build(target, artifacts_dir)
    manifest = read_manifest(build_dir)
    if verify_hashes:
        verify_files(build_dir, manifest)
    return Build(dir=Path(build_dir), manifest=manifest)


def update_manifest(build: Build, key: str, value: Any) -> None:
    """Atomically set one top-level section of a build's manifest (e.g. "parity", "bench", "recommended").

    The on-disk manifest is re-read under a lock so concurrent updates of different keys do not lose each other.
    """
    if key in ("files", "artifacts", "model", "format", "input_shape"):
        raise ManifestError(f"manifest key {key!r} is written by `exporter build` only")
    with _locked(build.dir):
        manifest = read_manifest(build.dir)
        manifest[key] = value
        write_json_atomic(build.dir / MANIFEST_NAME, manifest)
    build.manifest = manifest


def point_latest(model_dir: Path, build_dir: Path) -> None:
    """Atomically make `model_dir/latest` a relative symlink to `build_dir`."""
    link = Path(model_dir) / LATEST_NAME
    tmp = Path(model_dir) / f".{LATEST_NAME}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(Path(build_dir).name, tmp, target_is_directory=True)
    os.replace(tmp, link)
