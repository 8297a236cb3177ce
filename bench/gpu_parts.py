"""What the lent GPU machine lacks, carried to it in parts: a device call takes 64 MiB, the working tree included.

`bench/gpu_proof.py --make-parts WHEEL` (`make gpu-parts`) fills the parts folder here; on the lent machine the proof
checks each part against SHA256SUMS, rejoins the onnxruntime-gpu wheel and the trained checkpoints, and installs the
wheel. Only the standard library and `exporter.fileio`: that machine's python3 runs it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from exporter.fileio import sha256_file

DIGITS_FILE = "mnist_5k.csv.gz"
SUMS_FILE = "SHA256SUMS"
# A lent machine takes 64 MiB a call, the working tree (about 8 MiB) included: big files travel in parts, one per call.
PART_BYTES = 50 * 2**20
CALL_BYTES = 64 * 2**20
CHECKPOINT_FILES = ("checkpoint.safetensors", "checkpoint.json")


class ProofError(Exception):
    """A step cannot go on (missing or corrupt parts, a failed install); the message says what to do."""


def read_sums(parts: Path) -> dict[str, str]:
    """{file name: sha256} from the parts folder's SHA256SUMS (`sha256sum` format)."""
    sums_file = parts / SUMS_FILE
    if not sums_file.is_file():
        raise ProofError(f"{sums_file} is missing: run `make gpu-parts` here and carry {parts} (docs/gpu.md)")
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    return sums


def rejoin(parts: Path, name: str, target: Path, sums: dict[str, str]) -> Path:
    """Check each `<name>.part-NN` in `parts` against `sums`, join them into `target` and check the whole file."""
    names = sorted(n for n in sums if n.startswith(f"{name}.part-"))
    missing = [n for n in names if not (parts / n).is_file()]
    if not names or missing:
        raise ProofError(f"parts missing in {parts}: {', '.join(missing) or 'all'} (carry each, one per call: "
                         "docs/gpu.md)")
    for part in names:
        if sha256_file(parts / part) != sums[part]:
            raise ProofError(f"{parts / part} does not match its sha256 (carried partly?): carry it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".joining")
    with open(partial, "wb") as out:
        for part in names:
            with open(parts / part, "rb") as piece:
                shutil.copyfileobj(piece, out, 1 << 20)
    if sha256_file(partial) != sums[name]:
        partial.unlink()
        raise ProofError(f"the rejoined {name} does not match its sha256: rebuild the parts with `make gpu-parts`")
    partial.replace(target)
    return target


def assemble_wheel(parts: Path, work: Path) -> Path:
    """The onnxruntime-gpu wheel that SHA256SUMS names, rejoined from its parts into `work`."""
    sums = read_sums(parts)
    wheels = [name for name in sums if name.endswith(".whl")]
    if len(wheels) != 1:
        raise ProofError(f"{parts / SUMS_FILE} names {len(wheels)} wheels, expected one")
    return rejoin(parts, wheels[0], work / wheels[0], sums)


def restore_checkpoints(parts: Path, artifacts: Path, models: tuple[str, ...]) -> list[str]:
    """Put each carried checkpoint (`<model>.checkpoint.*` in SHA256SUMS) into `artifacts/<model>/`, unless the
    same file is there already; another checkpoint there is never replaced. What was done, one line per model.
    Without SHA256SUMS there is nothing to do."""
    if not (parts / SUMS_FILE).is_file():
        return []
    sums, done = read_sums(parts), []
    for model in models:
        names = {f"{model}.{file}": artifacts / model / file for file in CHECKPOINT_FILES}
        if not all(name in sums for name in names):
            continue
        other = [str(target) for name, target in names.items()
                 if target.is_file() and sha256_file(target) != sums[name]]
        if other:
            raise ProofError(f"{', '.join(other)}: another checkpoint than the carried one; move it away or leave "
                             f"the {model}.checkpoint.* parts out")
        for name, target in names.items():
            if target.is_file() and sha256_file(target) == sums[name]:
                continue
            if (parts / name).is_file():
                if sha256_file(parts / name) != sums[name]:
                    raise ProofError(f"{parts / name} does not match its sha256 (carried partly?): carry it again")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(parts / name, target)
            else:
                rejoin(parts, name, target, sums)
        done.append(f"{model}: carried checkpoint in {artifacts / model}")
    return done


def make_parts(wheel: Path, parts: Path, checkpoints: Path, models: tuple[str, ...], digits: Path, *,
               part_bytes: int = PART_BYTES, capacity: int = CALL_BYTES - 2**20) -> list[str]:
    """Fill `parts` (emptied first) with what the lent machine lacks, big files split into `part_bytes` pieces:
    the onnxruntime-gpu wheel, the digits5k CSV and each model's checkpoint under `checkpoints/<model>/`; write
    SHA256SUMS. Returns the carry plan, one line per device call."""
    if parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    sums: dict[str, str] = {}

    def split(source: Path, name: str) -> list[str]:
        sums[name] = sha256_file(source)
        pieces = []
        with open(source, "rb") as handle:
            for index, block in enumerate(iter(lambda: handle.read(part_bytes), b"")):
                piece = f"{name}.part-{index:02d}"
                (parts / piece).write_bytes(block)
                sums[piece] = hashlib.sha256(block).hexdigest()
                pieces.append(piece)
        return pieces

    def copy(source: Path, name: str) -> str:
        shutil.copyfile(source, parts / name)
        sums[name] = sha256_file(parts / name)
        return name

    pieces = [copy(digits, DIGITS_FILE)]
    last_checkpoint = 0
    for model in models:
        folder = checkpoints / model
        if all((folder / file).is_file() for file in CHECKPOINT_FILES):
            pieces.append(copy(folder / "checkpoint.json", f"{model}.checkpoint.json"))
            pieces += split(folder / "checkpoint.safetensors", f"{model}.checkpoint.safetensors")
            last_checkpoint = len(pieces)
    pieces += split(wheel, wheel.name)
    (parts / SUMS_FILE).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return carry_plan(parts, [SUMS_FILE, *pieces], last_checkpoint + 1, capacity)


def carry_plan(parts: Path, pieces: list[str], checkpoints_end: int, capacity: int) -> list[str]:
    """Device calls, back to back, each carrying at most `capacity` bytes of `pieces` (in order): the first runs
    the tests step, the one that brings the last checkpoint piece (`pieces[:checkpoints_end]`) the torch step,
    the last one (the wheel complete) the ort step; the others only list what has arrived."""
    calls: list[list[str]] = [[]]
    load = 0
    for index, piece in enumerate(pieces):
        size = (parts / piece).stat().st_size
        if size > capacity:
            raise ProofError(f"{piece} is {size / 2**20:.1f} MiB, over the {capacity / 2**20:.1f} MiB a call carries")
        if calls[-1] and (load + size > capacity or len(calls[-1]) == 8):
            calls.append([])
            load = 0
        calls[-1].append(piece)
        load += size
    steps: list[list[str]] = [[] for _ in calls]
    steps[0].append("tests")
    steps[next(i for i, call in enumerate(calls) if pieces[checkpoints_end - 1] in call)].append("torch")
    steps[-1].append("ort")
    return [f"call {i}: carry {' '.join(f'{parts.name}/{p}' for p in call)} → "
            + (" then ".join(f"--step {step}" for step in step_names) or "ls")
            for i, (call, step_names) in enumerate(zip(calls, steps, strict=True), 1)]


def install_wheel(wheel: Path, target: Path) -> str:
    """pip-install `wheel` (no index, no dependencies) into `target` unless the same wheel is there already."""
    marker = target / ".exporter-wheel-sha256"
    digest = sha256_file(wheel)
    if marker.is_file() and marker.read_text().strip() == digest:
        return f"{wheel.name} already in {target}"
    shutil.rmtree(target, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--no-compile", "--target", str(target), str(wheel)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProofError(f"pip install {wheel.name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    marker.write_text(digest + "\n")
    return f"installed {wheel.name} into {target}"


def working_tree_bytes(repo: Path) -> int:
    """What a device call sends besides the carried files: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.split(b"\0")
    files = [repo / os.fsdecode(name) for name in listed if name]
    return sum(path.stat().st_size for path in files if path.is_file())
