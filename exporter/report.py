"""`exporter report`: per model and across models — recommendation, accuracy, parity, latency, plot.

Reads what the other stages saved in each build (`manifest.json`, `parity.json` from `exporter verify`,
`bench.json` from `exporter bench`, `recommended` from `exporter select`) and writes Markdown + JSON + CSV + a
PNG plot (latency vs batch size per artifact; throughput bars) with the machine and library versions.
Nothing is measured here, so a report can be regenerated at any time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from exporter.errors import ExporterError, one_line
from exporter.fileio import atomic_write_bytes
from exporter.machine import PEAK_PRECISIONS
from exporter.manifest import LATEST_NAME, Build, json_default, load_build
from exporter.paths import default_artifacts_dir
from exporter.results import UNVERIFIED, parity_of, parity_records, read_bench
from exporter.select import describe_choice

CSV_COLUMNS = ["model", "label", "artifact", "backend", "variant", "precision", "executed_precision", "device",
               "batch", "threads", "status", "error", "n", "min_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
               "stdev_ms", "cv", "unstable", "throughput_ips", "gflops", "pct_of_peak", "peak_class",
               "first_call_ms", "load_s", "peak_mem_mb", "overhead_us", "overhead_ok", "parity", "flip_rate",
               "acc_drop"]


class ReportError(ExporterError):
    """Nothing to report (no builds, no results) or an output that cannot be written."""


# --- collecting -------------------------------------------------------------------------------------------------


def _training_accuracy(manifest: dict[str, Any]) -> dict[str, Any]:
    """Accuracy facts of the trained weights, wherever the build recorded them."""
    found: dict[str, Any] = {}
    weights = manifest.get("weights") or {}
    for key, value in weights.items():
        if "acc" in key and isinstance(value, (int, float)):
            found[key] = value
    if manifest.get("untrained"):
        found["untrained"] = True
    return found


def parity_rows(build: Build) -> list[dict[str, Any]]:
    """One row per artifact and per judged tuned variant: its parity record (the eager reference included)."""
    records = parity_records(build)
    labels = [a.name for a in build.artifacts]
    labels += [label for label in records if label not in labels]
    by_name = {a.name: a for a in build.artifacts}
    rows = []
    for label in labels:
        artifact = by_name.get(label.split("+")[0])
        record = records.get(label, UNVERIFIED)
        rows.append({"artifact": label, "backend": artifact.backend if artifact else "-",
                     "precision": artifact.precision if artifact else "-", **record.to_dict()})
    return rows


def collect(build: Build) -> dict[str, Any]:
    """Everything a report shows for one build, from its saved files."""
    bench = read_bench(build.dir)
    parity = build.manifest.get("parity") or {}
    records = parity_records(build)
    # each cell with the parity record of now (as `select` reads it: a record for exactly its options), not the one
    # stored when it was timed — a cell benchmarked before `exporter verify` would stay "unverified" forever
    cells = [{**c, "parity": parity_of(build, c["label"], c.get("options") or {}, records=records).to_dict()}
             for c in (bench["cells"] if bench else [])]
    return {
        "model": build.model, "build_id": build.build_id, "build_dir": str(build.dir),
        "input_shape": list(build.input_shape), "dataset": build.manifest.get("dataset") or "digits5k",
        "accuracy": _training_accuracy(build.manifest),
        "verify": {k: parity.get(k) for k in ("passed", "created", "samples", "dataset", "source")} if parity else None,
        "recommended": build.manifest.get("recommended"),
        "tuning": build.manifest.get("tuning"),
        "parity": parity_rows(build),
        "bench": {k: bench.get(k) for k in ("created", "settings", "peaks_gflops", "macs_per_image", "machine",
                                              "versions", "warnings")} if bench else None,
        "cells": cells,
        "peers": (bench or {}).get("peers"),
        "skipped": build.manifest.get("skipped") or [],
    }


def models_with_builds(artifacts_dir: Path) -> list[Path]:
    """The model directories that have a `latest` build in `artifacts_dir` (ReportError when none has); a
    directory, not a name, since a model source's folder (`torchvision-resnet18`) is not its name."""
    models = sorted(p for p in Path(artifacts_dir).glob("*") if (p / LATEST_NAME).exists())
    if not models:
        raise ReportError(f"no builds in {artifacts_dir} (run `exporter build MODEL` first)")
    return models


def builds_for(models: Sequence[str | Path], artifacts_dir: Path) -> list[Build]:
    """The latest build of each model (every model with a build when `models` is empty)."""
    models = list(models) or models_with_builds(artifacts_dir)
    # reports only read the saved JSON files, so the artifacts' hashes are not re-checked here
    return [load_build(model, Path(artifacts_dir), verify_hashes=False) for model in models]


# --- formatting -------------------------------------------------------------------------------------------------


def _f(value: Any, spec: str = ".3f", empty: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _parity_mark(parity: dict[str, Any] | None) -> str:
    """Parity status as shown in tables; the build's quick parity (few images) is marked as such."""
    status = (parity or {}).get("status", "unverified")
    mark = {"pass": "✓ pass", "reference": "reference", "fail": "✗ FAIL", "error": "✗ ERROR",
            "not run": "– not run", "unverified": "? unverified"}.get(status, status)
    if (parity or {}).get("source") == "build" and status != "reference":
        mark += " (quick)"
    return mark


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def latency_table(cells: list[dict[str, Any]]) -> list[str]:
    """Markdown latency table: one row per artifact × variant × batch, parity and flags on every row."""
    rows = []
    for c in sorted(cells, key=lambda c: (c["batch"], c.get("p50_ms") or math.inf)):
        if c["status"] != "ok":
            rows.append([c["label"], str(c["batch"]), c.get("executed_precision") or c["precision"],
                         _parity_mark(c.get("parity")), f"**{c['status']}**: {c.get('error') or ''}"] + [""] * 9)
            continue
        flags = []
        if c.get("unstable"):
            flags.append(f"⚠ unstable (cv {c['cv']:.0%})")
        if c.get("overhead_ok") is False:
            flags.append(f"overhead {c['overhead_us']:.0f} µs")
        memory = (c.get("memory") or {}).get("peak_mb")
        rows.append([
            c["label"], str(c["batch"]), c.get("executed_precision") or c["precision"], _parity_mark(c.get("parity")),
            _f(c["p50_ms"]), _f(c["p90_ms"]), _f(c["p99_ms"]), f"{_f(c['mean_ms'])} ± {_f(c['stdev_ms'])}",
            _f(c.get("throughput_ips"), ".0f"), _f(c.get("gflops"), ".1f"), _f(c.get("pct_of_peak"), ".0f"),
            _f(c.get("first_call_ms"), ".1f"), _f(memory, ".0f"),
            (_f(c.get("overhead_us"), ".1f") if c.get("overhead_us") is not None else "–") + (" ".join([""] + flags)),
        ])
    return _table(["artifact", "batch", "runs in", "parity", "p50 ms", "p90 ms", "p99 ms", "mean ± sd ms", "img/s",
                   "GFLOP/s", "% peak", "1st call ms", "peak RSS MB", "overhead µs / flags"], rows)


def peer_lines(peers: dict[str, Any]) -> list[str]:
    """The peer baseline (`bench --peers`): ours against the runtimes' own defaults, same rounds."""
    lines = ["### Against the runtimes' own defaults (`bench --peers`, same rounds)", ""]
    lines += _table(["batch", "ours (fastest passing)", "p50 ms", "fastest peer", "p50 ms", "peer parity",
                     "ours ÷ peer"],
                    [[str(v["batch"]), v["ours"], _f(v["ours_p50_ms"]), v["peer"], _f(v["peer_p50_ms"]),
                      str(v["peer_parity"]), _f(v["ratio"], ".2f")] for v in peers.get("versus") or []]) + [""]
    lines += latency_table(peers.get("cells") or []) + [""]
    lines += [f"- {n['peer']}: not run: {n['reason']}" for n in peers.get("not_run") or []]
    return lines + [""]


def parity_table(rows: list[dict[str, Any]]) -> list[str]:
    body = [[r["artifact"], r["backend"], r["precision"], _parity_mark(r),
             f"{r['flips']}/{r['samples']}" if r.get("flips") is not None and r.get("samples") else "–",
             _f(r.get("accuracy"), ".4f"), _f(r.get("acc_drop"), "+.2f"), _f(r.get("max_abs"), ".2e"),
             r.get("judged_as") or "–", r.get("source") or "–"] for r in rows]
    return _table(["artifact", "backend", "precision", "parity", "top-1 flips", "accuracy", "drop (points)",
                   "max abs err", "judged as", "source"], body)


def _recommendation_lines(rec: dict[str, Any] | None) -> list[str]:
    if not rec:
        return ["No recommendation yet: run `exporter select MODEL --max-flips 0.5%` after `verify` and `bench`."]
    return [f"- {line}" for line in describe_choice(rec)]


def _unit(precision: str) -> str:
    return "GOP/s" if precision == "int8" else "GFLOP/s"


def machine_lines(bench: dict[str, Any] | None) -> list[str]:
    if not bench:
        return []
    m, s, peaks = bench["machine"], bench["settings"], bench.get("peaks_gflops") or {}
    isa = peaks.get("isa_estimate") or {}
    precisions = [p for p in PEAK_PRECISIONS if p in peaks]  # a bench.json from before the int8 probe has none
    gpu = f"{m['gpu']} (driver {m.get('gpu_driver') or '?'}, CUDA {m.get('cuda') or '?'})" if m.get("gpu") else "none"
    return [f"- machine: {m['cpu']}, {m['usable_cores']} usable cores of {m['logical_cpus']}, "
            f"{m.get('memory_gb', '?')} GB; GPU: {gpu}",
            f"- GEMM peak measured in the same run (best library's matmul, n = "
            f"{' or '.join(map(str, peaks.get('sizes') or [s.get('gemm_size')]))}, n³): "
            + "; ".join(f"{p} {_f(peaks.get(p), '.0f')} {_unit(p)} ({(peaks.get('best') or {}).get(p) or '?'})"
                        for p in precisions)
            + " — probes: " + "; ".join(f"{p}: " + ", ".join(f"{lib} {_f(v, '.0f')}" for lib, v in
                                                       ((peaks.get('sources') or {}).get(p) or {}).items())
                                        for p in precisions)
            + ("; ISA estimate " + ", ".join(f"{p} {_f(isa.get(p), '.0f')} {_unit(p)}" for p in precisions)
               + f" ({isa.get('formula')})" if isa else ""),
            f"- method: {s['clock']}, device {s['device']}, {s['threads']} threads, first call timed alone, "
            f"{s['warmup']} warm-up calls, then ≥ {s['min_runs']} timed calls and ≥ {s['budget_s']} s per cell, "
            f"interleaved round by round"
            + (f" ({s['settle_s']} s untimed after a switch of runtime)" if s.get("settle_s") else "")
            + f"; cv > {s.get('unstable_cv', 0.1):.0%} flagged unstable",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in bench["versions"].items() if v)]


def model_markdown(data: dict[str, Any], png_name: str | None) -> list[str]:
    """The Markdown section of one model."""
    lines = [f"## {data['model']} — build `{data['build_id']}`", ""]
    lines += ["**Recommended**", ""] + _recommendation_lines(data.get("recommended")) + [""]
    acc = data.get("accuracy") or {}
    acc_text = ", ".join(f"{k} {_f(v, '.4f')}" for k, v in acc.items() if k != "untrained")
    lines += [f"Input {'×'.join(map(str, data['input_shape']))}, dataset {data['dataset']}; trained-model accuracy: "
              + (acc_text or "not recorded") + (" (**untrained weights**)" if acc.get("untrained") else ""), ""]
    lines += ["### Parity vs eager fp32", ""] + parity_table(data["parity"]) + [""]
    if data["cells"]:
        lines += ["### Latency", ""] + latency_table(data["cells"]) + [""]
        lines += [f"**Warning:** {w}" for w in (data["bench"] or {}).get("warnings") or []] + [""]
        if png_name:
            lines += [f"![latency and throughput of {data['model']}]({png_name})", ""]
    else:
        lines += [f"No benchmark results: run `exporter bench {data['model']}`.", ""]
    if data.get("peers"):
        lines += peer_lines(data["peers"])
    tuning = data.get("tuning") or {}
    if tuning.get("artifacts"):
        body = [[name, t.get("variant", "default"), str(t.get("options") or {}), _f(t.get("default_p50_ms")),
                 _f(t.get("p50_ms")), _f(t.get("speedup"), ".2f")] for name, t in tuning["artifacts"].items()]
        lines += [f"### Tuning (`bench --tune`, batch {tuning.get('batch')}, {tuning.get('machine')})", ""]
        lines += _table(["artifact", "winner", "options", "default p50 ms", "tuned p50 ms", "speed-up"], body) + [""]
    if data.get("skipped"):
        lines += ["Skipped backends: " + "; ".join(f"{s.get('backend')}: {s.get('reason')}" for s in data["skipped"]),
                  ""]
    return lines


def csv_rows(reports: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for data in reports:
        for c in data["cells"]:
            parity = c.get("parity") or {}
            row = {k: c.get(k) for k in CSV_COLUMNS}
            row.update(model=data["model"], peak_mem_mb=(c.get("memory") or {}).get("peak_mb"),
                       parity=parity.get("status"), flip_rate=parity.get("flip_rate"), acc_drop=parity.get("acc_drop"))
            rows.append(row)
    return rows


# --- plotting ---------------------------------------------------------------------------------------------------


def plot(reports: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """PNG: per model, p50 latency vs batch per artifact (log-log) and throughput bars at the largest batch."""
    reports = [r for r in reports if any(c["status"] == "ok" for c in r["cells"])]
    if not reports:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(13, 4.2 * len(reports)), squeeze=False)
    for (ax_lat, ax_thr), data in zip(axes, reports):
        ok = [c for c in data["cells"] if c["status"] == "ok"]
        labels = list(dict.fromkeys(c["label"] for c in ok))
        ax_lat.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(labels))])
        for label in labels:
            series = sorted((c for c in ok if c["label"] == label), key=lambda c: c["batch"])
            mark = "" if (series[0].get("parity") or {}).get("status") in ("pass", "reference") else " (parity ?)"
            ax_lat.plot([c["batch"] for c in series], [c["p50_ms"] for c in series], marker="o",
                        label=f"{label} [{series[0].get('executed_precision') or series[0]['precision']}]{mark}")
        ax_lat.set_xscale("log", base=2)
        batches = sorted({c["batch"] for c in ok})
        ax_lat.set_xticks(batches, [str(b) for b in batches])
        ax_lat.minorticks_off()
        ax_lat.set_yscale("log")
        ax_lat.set_xlabel("batch size")
        ax_lat.set_ylabel("p50 latency (ms)")
        ax_lat.set_title(f"{data['model']}: latency vs batch")
        ax_lat.grid(True, which="both", alpha=0.3)
        ax_lat.legend(fontsize=7)
        largest = max(c["batch"] for c in ok)
        bars = sorted((c for c in ok if c["batch"] == largest), key=lambda c: -(c.get("throughput_ips") or 0))
        colors = ["tab:green" if (c.get("parity") or {}).get("status") in ("pass", "reference") else
                  "tab:red" if (c.get("parity") or {}).get("status") in ("fail", "error") else "tab:gray"
                  for c in bars]
        ax_thr.barh([c["label"] for c in bars], [c.get("throughput_ips") or 0 for c in bars], color=colors)
        ax_thr.invert_yaxis()
        ax_thr.set_xlabel("images / s (p50)")
        ax_thr.set_title(f"throughput at batch {largest} (green: parity pass, grey: unverified, red: fail)",
                         fontsize=9)
        ax_thr.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    _write_atomic(path, buffer.getvalue())
    return path


# --- writing ----------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes | str) -> None:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def summary_rows(reports: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Across models: the recommendation, the fastest artifact, the fastest runtime default configuration (`bench
    --peers`: a bare runtime as its user would start it) and the recommendation's ratio to that peer, at the
    recommendation's batch."""
    rows = []
    for data in reports:
        rec = (data.get("recommended") or {}).get("recommended")
        batch = (data.get("recommended") or {}).get("batch", 1)
        ok = [c for c in data["cells"] if c["status"] == "ok" and c["batch"] == batch]
        fastest = min(ok, key=lambda c: c["p50_ms"], default=None)
        peers = [c for c in (data.get("peers") or {}).get("cells") or []
                 if c["status"] == "ok" and c["batch"] == batch]
        best_peer = min(peers, key=lambda c: c["p50_ms"], default=None)
        eager = next((c for c in ok if c["artifact"] == "eager" and c.get("variant") == "default"), None)
        rows.append([data["model"], str(batch),
                     f"{rec['label']} ({_f(rec['p50_ms'])} ms)" if rec else "–",
                     f"{fastest['label']} ({_f(fastest['p50_ms'])} ms, {_parity_mark(fastest.get('parity'))})"
                     if fastest else "–",
                     f"{best_peer['label'].removeprefix('peer:')} ({_f(best_peer['p50_ms'])} ms, "
                     f"{_parity_mark(best_peer.get('parity'))})" if best_peer else "not run (`bench --peers`)",
                     _f(rec["p50_ms"] / best_peer["p50_ms"], ".2f") if rec and best_peer else "–",
                     _f(eager["p50_ms"]) if eager else "–",
                     _f(fastest.get("pct_of_peak"), ".0f") if fastest else "–"])
    return rows


def write_reports(reports: Sequence[dict[str, Any]], out_dir: Path, stem: str, *, title: str | None = None,
                  notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write `<stem>.md`, `.json`, `.csv` and `.png` into `out_dir` (each atomically); returns their paths."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create report directory {out_dir}: {exc}") from None
    paths = {kind: out_dir / f"{stem}.{kind}" for kind in ("md", "json", "csv", "png")}
    png = plot(reports, paths["png"])
    first_bench = next((r["bench"] for r in reports if r.get("bench")), None)
    lines = [f"# {title or 'exporter report'}", ""]
    lines += machine_lines(first_bench) + [""]
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    if len(reports) > 1:
        lines += ["## Across models", ""]
        lines += _table(["model", "batch", "recommended (select)", "fastest measured (parity)",
                         "fastest runtime default (peer, parity)", "recommended ÷ peer", "eager p50 ms",
                         "% of GEMM peak (fastest)"],
                        summary_rows(reports)) + [""]
    for data in reports:
        lines += model_markdown(data, png.name if png else None)
    _write_atomic(paths["md"], "\n".join(lines) + "\n")
    document = {"title": title, "machine": first_bench["machine"] if first_bench else None,
                "versions": first_bench["versions"] if first_bench else None, "notes": list(notes),
                "models": list(reports)}
    _write_atomic(paths["json"], json.dumps(document, indent=2, default=json_default, allow_nan=True) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(csv_rows(reports))
    _write_atomic(paths["csv"], buffer.getvalue())
    if png is None:
        del paths["png"]
    return paths


def report(models: Sequence[str], *, artifacts_dir: Path | None = None, out_dir: Path | None = None
           ) -> dict[str, dict[str, Path]]:
    """One report per model (`<out>/<model folder>.*`) and, for several models, one across them (`<out>/index.*`)."""
    artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir()
    builds = builds_for(models, artifacts_dir)
    out_dir = Path(out_dir) if out_dir else Path(artifacts_dir) / "reports"
    collected, written = [], {}
    for build in builds:
        with _saved_results_of(build):
            data = collect(build)
            # the model's folder name: a source's name (torchvision:x, /abs/net.py:make) is no file name
            written[data["model"]] = write_reports([data], out_dir, Path(build.dir).parent.name,
                                                   title=f"{data['model']} report")
        collected.append(data)
    if len(collected) > 1:
        with _saved_results_of(None):
            written["index"] = write_reports(collected, out_dir, "index", title="exporter report: all models")
    return written


@contextlib.contextmanager
def _saved_results_of(build: Build | None) -> Iterator[None]:
    """A saved file whose fields have another shape than the stages write (edited by hand, another version):
    one ReportError naming the build, never a traceback from deep inside the formatting."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        where = f"build {build.dir}" if build is not None else "one of the builds"
        raise ReportError(f"the saved results of {where} (manifest.json, parity.json, bench.json) have an "
                          f"unexpected shape ({one_line(exc, 120)}); re-run the stage that wrote them") from None
