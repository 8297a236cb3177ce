"""The one reader and writer of a build's stored results: `parity.json` and `bench.json`.

`select`, `report` and `bench` read parity and latency through here, with one set of keys and no guessing:

- `parity.json` holds every parity record of the build, whoever judged it — the build's quick check (source
  "build"), `exporter verify` ("verify"), or the verification of a tuned benchmark variant ("tune") — one record
  per label (`onnx-fp32`, `openvino-fp32+tuned`). A later run replaces the records it covers and keeps the others
  while they were judged against the same reference weights.
- `bench.json` holds every latency cell, keyed by (label, batch, device, threads): a later run with a
  `--backends` subset or other batch sizes replaces only the cells it measured.

Both files are written after the build, so they are not in the manifest's hash list; each is validated on
reading, and a file from another format is refused in one line that says what to re-run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exporter.comparison import PARITY_FORMAT
from exporter.errors import ExporterError
from exporter.fileio import read_json_object
from exporter.manifest import BENCH_FILE, PARITY_FILE, Build, write_json_atomic

BENCH_FORMAT = 2
PASSING = ("pass", "reference")


class ResultsError(ExporterError):
    """A stored result file that cannot be read or does not have the expected shape."""


@dataclass(frozen=True)
class ParityRecord:
    """One label's parity, as `select` and reports read it."""

    status: str  # pass / fail / error / not run / unverified / reference
    source: str | None = None  # build / verify / tune
    judged_as: str | None = None  # the tolerance class it was judged in
    judged_by: str = ""
    executed_precision: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the variant's runner options when judged
    flips: int | None = None
    samples: int | None = None
    flip_rate: float | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None
    acc_drop: float | None = None  # percentage points below eager fp32
    max_abs: float | str | None = None
    reason: str | None = None
    created: str | None = None

    @property
    def passed(self) -> bool:
        return self.status in PASSING

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


UNVERIFIED = ParityRecord("unverified", reason="no parity results (run `exporter verify` on the build)")


# --- parity.json ------------------------------------------------------------------------------------------------


def _load_json(path: Path, redo: str) -> Any:
    return read_json_object(path, ResultsError, "result file", redo)


def read_parity(build_dir: Path) -> dict[str, Any] | None:
    """The validated `parity.json` of a build directory, or None when there is none."""
    path = Path(build_dir) / PARITY_FILE
    if not path.is_file():
        return None
    redo = "re-run `exporter verify` on the build"
    data = _load_json(path, redo)
    if not isinstance(data, dict) or data.get("format") != PARITY_FORMAT:
        raise ResultsError(f"{path} is not a parity file of format {PARITY_FORMAT} (older exporter or damaged); {redo}")
    results, reference = data.get("results"), data.get("reference")
    if not isinstance(results, list) or not isinstance(reference, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("label"), str) and isinstance(r.get("status"), str)
            and isinstance(r.get("summary"), dict) for r in results):
        raise ResultsError(f"{path} does not have the parity file's fields (results, reference); {redo}")
    for r in results:
        summary = r["summary"]
        bad = [k for k in ("flips", "samples") if not _int_or_none(summary.get(k))]
        bad += [k for k in ("flip_rate", "accuracy", "reference_accuracy", "acc_drop")
                if not _number_or_none(summary.get(k))]
        if bad or not isinstance(r.get("options") or {}, dict):
            what = ", ".join(bad) or "options"
            raise ResultsError(f"{path}: the record of {r['label']!r} has a malformed {what}; {redo}")
    return data


def _int_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value))


def _record(entry: dict[str, Any], document: dict[str, Any]) -> ParityRecord:
    summary = entry["summary"]
    return ParityRecord(
        status=entry["status"], source=entry.get("source") or document.get("source"), judged_as=entry.get("judged_as"),
        judged_by=entry.get("judged_by", ""), executed_precision=entry.get("executed_precision"),
        options=dict(entry.get("options") or {}), flips=summary.get("flips"), samples=summary.get("samples"),
        flip_rate=summary.get("flip_rate"), accuracy=summary.get("accuracy"),
        reference_accuracy=summary.get("reference_accuracy"), acc_drop=summary.get("acc_drop"),
        max_abs=summary.get("max_abs"), reason=entry.get("reason") or None,
        created=entry.get("judged_at") or document.get("created"))


def report_records(report: dict[str, Any]) -> dict[str, ParityRecord]:
    """Each label's record in one parity report (`ParityReport.to_dict()`), e.g. one not saved in parity.json."""
    return {entry["label"]: _record(entry, report) for entry in report["results"]}


def parity_records(build: Build) -> dict[str, ParityRecord]:
    """Every label's parity record in the build, the eager fp32 reference included."""
    document = read_parity(build.dir)
    if document is None:
        return {}
    records = {entry["label"]: _record(entry, document) for entry in document["results"]}
    reference = document["reference"]
    if reference.get("artifact"):
        accuracy = reference.get("accuracy")
        records[reference["artifact"]] = ParityRecord(
            "reference", source=document.get("source"), judged_as="fp32", executed_precision="fp32", flips=0,
            samples=document.get("samples"), flip_rate=0.0, accuracy=accuracy, reference_accuracy=accuracy,
            acc_drop=0.0, max_abs=0.0, created=document.get("created"))
    return records


def parity_of(build: Build, label: str, options: dict[str, Any] | None = None,
              records: dict[str, ParityRecord] | None = None) -> ParityRecord:
    """The parity of one label; a record judged with other runner options than `options` does not count."""
    records = parity_records(build) if records is None else records
    record = records.get(label)
    if record is None:
        return UNVERIFIED
    if options is not None and record.status != "reference" and dict(options) != record.options:
        return ParityRecord("unverified", reason=f"judged with options {record.options}, benchmarked with {options}: "
                                                 "re-run `exporter bench --tune` or `exporter verify`")
    return record


def write_parity(build_dir: Path, report: dict[str, Any], artifact_order: list[str]) -> dict[str, Any]:
    """Write a parity run's records into `parity.json`, keeping the records it did not cover (same reference
    weights only: a rebuilt model's old results say nothing); returns the merged document."""
    path = Path(build_dir) / PARITY_FILE
    try:
        previous = read_parity(build_dir)
    except ResultsError:
        previous = None  # a damaged or older file is replaced, never merged
    merged = dict(report)
    for entry in merged["results"]:
        entry.setdefault("judged_at", report["created"])
        entry.setdefault("source", report.get("source"))
    same_weights = previous is not None and (previous.get("reference") or {}).get("weights_sha256") == \
        (report.get("reference") or {}).get("weights_sha256")
    if same_weights:
        done = {r["label"] for r in merged["results"]}
        kept = [dict(r, judged_at=r.get("judged_at") or previous.get("created"))
                for r in previous["results"] if r["label"] not in done]
        order = {name: i for i, name in enumerate(artifact_order)}
        merged["results"] = sorted(merged["results"] + kept,
                                   key=lambda r: (order.get(r.get("artifact"), len(order)), r["label"]))
        merged["problems"] = [f"{r['label']}: {f}" for r in merged["results"] if r["status"] in ("fail", "error")
                              for f in r.get("failures") or [r.get("reason", "")]]
        merged["passed"] = not merged["problems"] and bool(report.get("passed", True))
    write_json_atomic(path, merged)
    return merged


def parity_summary(document: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `parity` section: where the records are and each label's status."""
    return {"file": PARITY_FILE, "passed": document["passed"], "created": document["created"],
            "source": document.get("source"), "samples": document.get("samples"), "dataset": document.get("dataset"),
            "results": {r["label"]: r["status"] for r in document["results"]}}


# --- bench.json -------------------------------------------------------------------------------------------------


def _cell_key(cell: dict[str, Any]) -> tuple[Any, ...]:
    return cell["label"], cell["batch"], cell.get("device", "cpu"), cell.get("threads")


def read_bench(build_dir: Path) -> dict[str, Any] | None:
    """The validated `bench.json` of a build directory, or None when there is none."""
    path = Path(build_dir) / BENCH_FILE
    if not path.is_file():
        return None
    redo = "re-run `exporter bench` on the build"
    data = _load_json(path, redo)
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        raise ResultsError(f"{path} is not a benchmark file of format {BENCH_FORMAT} (older exporter or damaged); "
                           f"{redo}")
    cells = data.get("cells")
    if not isinstance(cells, list) or not all(
            isinstance(c, dict) and isinstance(c.get("label"), str) and isinstance(c.get("batch"), int)
            and isinstance(c.get("status"), str) and _finite_or_none(c.get("p50_ms")) for c in cells):
        raise ResultsError(f"{path} does not have the benchmark file's cells (label, batch, status, p50_ms); {redo}")
    for c in cells:
        names = all(isinstance(c.get(k, ""), str) for k in ("artifact", "backend", "precision"))
        stats = all(_finite_or_none(c.get(k)) for k in ("p90_ms", "p99_ms", "mean_ms", "stdev_ms", "cv",
                                                        "throughput_ips"))
        if not names or not stats or not isinstance(c.get("parity") or {}, dict):
            raise ResultsError(f"{path}: cell {c['label']!r} at batch {c['batch']} is malformed (names, timing "
                               f"statistics or parity); {redo}")
    for section, kind in (("settings", dict), ("machine", dict), ("versions", dict), ("peaks_gflops", dict),
                          ("warnings", list)):
        if not isinstance(data.get(section, kind()), kind):
            raise ResultsError(f"{path}: `{section}` must be {'an object' if kind is dict else 'a list'}; {redo}")
    return data


def _finite_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                             and value >= 0)


def write_bench(build_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Merge a benchmark run into `bench.json` cell by cell (a cell this run did not measure is kept, marked with
    the time of the run that measured it); returns the merged document."""
    try:
        previous = read_bench(build_dir)
    except ResultsError:
        previous = None
    merged = dict(results)
    for cell in merged["cells"]:
        cell.setdefault("measured_at", results["created"])
    if previous is not None:
        # a cell that fails now keeps the measurement it replaces (as `previous`): nothing measured is lost
        earlier = {_cell_key(c): dict(c, measured_at=c.get("measured_at") or previous.get("created"))
                   if c["status"] == "ok" else c.get("previous") for c in previous["cells"]}
        for cell in merged["cells"]:
            if cell["status"] != "ok" and isinstance(earlier.get(_cell_key(cell)), dict):
                cell["previous"] = earlier[_cell_key(cell)]
        fresh = {_cell_key(c) for c in merged["cells"]}
        kept = [dict(c, measured_at=c.get("measured_at") or previous.get("created"))
                for c in previous["cells"] if _cell_key(c) not in fresh]
        merged["cells"] = kept + merged["cells"]
        merged["cells"].sort(key=lambda c: (c["batch"], c["label"]))
    write_json_atomic(Path(build_dir) / BENCH_FILE, merged)
    return merged
