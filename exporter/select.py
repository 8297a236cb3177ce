"""`exporter select`: the fastest artifact of a build that meets an accuracy budget, from parity + latency.

Inputs are the build's saved results, read through `exporter.results`: the parity records (`parity.json`: top-1
flips vs eager fp32 and each variant's test accuracy, judged in its tolerance class) and the latency cells
(`bench.json`: p50 latency per artifact, variant and batch). Every artifact × variant benchmarked at the
requested batch is a candidate; candidates are taken in order of p50 latency and the first that meets the budget
wins. A candidate is refused when its parity record is missing, failing, or was judged with other runner options
(a tuned variant is judged as itself, never by its artifact's record), and when its timing stayed unstable and a
steadily timed candidate lies within its spread (on a 2-vCPU VM most cells are unstable even when idle: refusing
them all would recommend the slowest steady artifact).
Rejections carry their reason, so the user sees why each faster one lost. The choice is written into the
manifest as `recommended`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from exporter.errors import ExporterError, UsageError
from exporter.manifest import Build, update_manifest
from exporter.results import PASSING, parity_of, parity_records, read_bench


class SelectError(ExporterError):
    """No benchmark results to choose from, or no artifact meets the budget."""


@dataclass(frozen=True)
class Budget:
    """How far an artifact may stray from eager fp32: top-1 flips (fraction of images) and accuracy drop (points)."""

    max_flip_rate: float | None = None  # 0.005 = 0.5 % of test images may change their top-1 class
    max_acc_drop: float | None = None  # percentage points of test accuracy below eager fp32

    def describe(self) -> str:
        parts = []
        if self.max_flip_rate is not None:
            parts.append(f"flips ≤ {self.max_flip_rate * 100:g}%")
        if self.max_acc_drop is not None:
            parts.append(f"accuracy drop ≤ {self.max_acc_drop:g} points")
        return " and ".join(parts) or "parity pass only"

    def to_dict(self) -> dict[str, Any]:
        return {"max_flip_rate": self.max_flip_rate, "max_acc_drop": self.max_acc_drop, "text": self.describe()}


def parse_budget(max_flips: str | float | None = None, max_acc_drop: str | float | None = None) -> Budget:
    """A Budget from CLI text: `--max-flips 0.5%` (or a fraction, 0.005) and `--max-acc-drop 0.2` (points)."""
    flip_rate = None
    if max_flips is not None:
        text = str(max_flips).strip()
        try:
            flip_rate = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise UsageError(f"--max-flips must be a percentage like 0.5% or a fraction like 0.005, "
                             f"got {text!r}") from None
        if not 0 <= flip_rate <= 1 or not math.isfinite(flip_rate):
            raise UsageError(f"--max-flips must be between 0% and 100%, got {text!r}")
    drop = None
    if max_acc_drop is not None:
        text = str(max_acc_drop).strip().rstrip("%")
        try:
            drop = float(text)
        except ValueError:
            raise UsageError(f"--max-acc-drop must be accuracy points like 0.2, got {max_acc_drop!r}") from None
        if not 0 <= drop <= 100 or not math.isfinite(drop):
            raise UsageError(f"--max-acc-drop must be between 0 and 100 points, got {max_acc_drop!r}")
    if flip_rate is None and drop is None:
        raise UsageError("give a budget: --max-flips PCT% and/or --max-acc-drop POINTS")
    return Budget(flip_rate, drop)


def rejection_reasons(cell: dict[str, Any], budget: Budget) -> list[str]:
    """Why a benchmarked cell cannot be recommended under `budget` (empty: it qualifies)."""
    if cell.get("status") != "ok" or cell.get("p50_ms") is None:
        return [f"benchmark {cell.get('status', 'missing')}: {cell.get('error') or 'no timing'}"]
    parity = cell.get("parity") or {}
    status = parity.get("status", "unverified")
    if status == "unverified":
        return [parity.get("reason") or "no parity results (run `exporter verify` on the build)"]
    if status not in PASSING:
        reason = parity.get("reason")
        return [f"parity {status}" + (f": {reason}" if reason else " (outside its precision's tolerance class)")]
    reasons = []
    if budget.max_flip_rate is not None:
        rate = parity.get("flip_rate")
        if rate is None:
            reasons.append("parity has no top-1 flip count")
        elif rate > budget.max_flip_rate + 1e-12:
            reasons.append(f"top-1 flips {parity.get('flips')}/{parity.get('samples')} = {rate * 100:.2f}% > "
                           f"{budget.max_flip_rate * 100:g}%")
    if budget.max_acc_drop is not None:
        drop = parity.get("acc_drop")
        if drop is None:
            reasons.append("parity has no test accuracy (verify on labelled images)")
        elif drop > budget.max_acc_drop + 1e-9:
            reasons.append(f"accuracy drop {drop:.2f} points > {budget.max_acc_drop:g}")
    return reasons


def _summary(cell: dict[str, Any]) -> dict[str, Any]:
    parity = cell.get("parity") or {}
    return {"label": cell["label"], "artifact": cell["artifact"], "backend": cell["backend"],
            "variant": cell.get("variant", "default"), "options": cell.get("options") or {},
            "precision": cell.get("executed_precision") or cell.get("precision"), "batch": cell["batch"],
            "p50_ms": cell.get("p50_ms"), "p90_ms": cell.get("p90_ms"), "p99_ms": cell.get("p99_ms"),
            "throughput_ips": cell.get("throughput_ips"),
            "unstable": cell.get("unstable"), "cv": cell.get("cv"), "parity": parity.get("status"),
            "flip_rate": parity.get("flip_rate"), "acc_drop": parity.get("acc_drop")}


def _unproven_lead(cell: dict[str, Any], within_budget: Sequence[dict[str, Any]]) -> list[str]:
    """An unstable cell (cv > 10 % twice) stays a candidate unless a slower, steadily timed candidate within the
    budget lies inside its spread (p50 · (1 + 2·cv), at most its p90): then its lead is not measured, and the steady
    one wins. The cap is for rare spikes: a 16 µs ONNX Runtime call with a few millisecond stalls had cv 589 %, a
    "spread" of 12 × p50, and lost to a steady artifact 4.9 × slower than 90 % of its own calls."""
    if not cell.get("unstable"):
        return []
    spread = cell["p50_ms"] * (1 + 2 * (cell.get("cv") or 0.0))
    if cell.get("p90_ms"):
        spread = min(spread, cell["p90_ms"])
    for other in within_budget:
        if other is not cell and not other.get("unstable") and cell["p50_ms"] <= other["p50_ms"] <= spread:
            return [f"timing unstable (cv {cell.get('cv', 0):.0%}, also when measured again) and the steadily timed "
                    f"{other['label']} ({other['p50_ms']:.3f} ms) is within its spread: re-run `exporter bench` "
                    "on a quiet machine"]
    return []


def select_artifact(cells: Sequence[dict[str, Any]], budget: Budget, batch: int) -> dict[str, Any]:
    """Choose from bench cells: the fastest (p50) at `batch` meeting `budget`, the runner-up, and the rejections.

    Returns {"recommended", "runner_up", "rejected_faster" (faster than the winner, with reasons),
    "rejected" (all rejections), "candidates"}; raises SelectError when nothing qualifies.
    """
    at_batch = [c for c in cells if c.get("batch") == batch]
    if not at_batch:
        have = sorted({c.get("batch") for c in cells if c.get("batch") is not None})
        raise SelectError(f"no benchmark results at batch {batch} (benchmarked: "
                          f"{', '.join(map(str, have)) or 'none'}; run `exporter bench MODEL --batch-sizes {batch}`)")
    ordered = sorted(at_batch, key=lambda c: (c.get("p50_ms") is None, c.get("p50_ms") or math.inf))
    reasons_of = [rejection_reasons(cell, budget) for cell in ordered]
    within_budget = [cell for cell, reasons in zip(ordered, reasons_of) if not reasons]
    qualified, rejected = [], []
    for cell, reasons in zip(ordered, reasons_of):
        reasons = reasons or _unproven_lead(cell, within_budget)
        if reasons:
            rejected.append({**_summary(cell), "reasons": reasons})
        else:
            qualified.append(_summary(cell))
    if not qualified:
        lines = "; ".join(f"{r['label']}: {r['reasons'][0]}" for r in rejected)
        raise SelectError(f"no artifact meets the budget ({budget.describe()}) at batch {batch}: {lines}")
    winner = qualified[0]
    return {"recommended": winner, "runner_up": qualified[1] if len(qualified) > 1 else None,
            "rejected_faster": [r for r in rejected if r["p50_ms"] is not None and r["p50_ms"] < winner["p50_ms"]],
            "rejected": rejected, "candidates": len(ordered), "budget": budget.to_dict(), "batch": batch}


def select_build(build: Build, budget: Budget, batch: int = 1, *, save: bool = True) -> dict[str, Any]:
    """Select on a loaded build's saved bench results (parity re-read now); writes `recommended` to the manifest."""
    results = read_bench(build.dir)
    if results is None:
        raise SelectError(f"build {build.dir} has no benchmark results; run `exporter bench {build.model}` first")
    records = parity_records(build)
    cells = [{**cell, "parity": parity_of(build, cell["label"], cell.get("options") or {}, records=records).to_dict()}
             for cell in results["cells"]]
    choice = select_artifact(cells, budget, batch)
    choice.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  bench_created=results.get("created"), machine=(build.manifest.get("bench") or {}).get("machine"),
                  threads=results.get("settings", {}).get("threads"), device=results.get("settings", {}).get("device"))
    if save:
        update_manifest(build, "recommended", choice)
    return choice


def describe_choice(choice: dict[str, Any]) -> list[str]:
    """Human-readable lines: the winner, the runner-up and why each faster artifact was rejected."""
    win = choice["recommended"]
    lines = [f"recommended at batch {choice['batch']} ({choice['budget']['text']}): {win['label']} "
             f"[{win['backend']}, {win['precision']}] p50 {win['p50_ms']:.3f} ms, "
             f"{win['throughput_ips']:.0f} img/s, parity {win['parity']}"
             + (f" (timing unstable, cv {win.get('cv') or 0:.0%}, but ahead of every steadily timed candidate "
                "by more than its spread)" if win.get("unstable") else "")]
    lines.append(f"chosen among {choice['candidates']} benchmarked artifact variants at batch {choice['batch']}"
                 + (f" (bench run {choice['bench_created']})" if choice.get("bench_created") else ""))
    runner_up = choice.get("runner_up")
    if runner_up:
        gap = runner_up["p50_ms"] / win["p50_ms"] - 1 if win["p50_ms"] else 0.0
        tie = max(0.05, 2 * (win.get("cv") or 0.0)) if win.get("unstable") else 0.05
        if win.get("unstable") and win.get("p90_ms") and win["p50_ms"]:
            tie = max(0.05, min(tie, win["p90_ms"] / win["p50_ms"] - 1))  # rare spikes: as the spread above
        lines.append(f"runner-up: {runner_up['label']} [{runner_up['backend']}, {runner_up['precision']}] "
                     f"p50 {runner_up['p50_ms']:.3f} ms (+{gap:.1%})"
                     + (f" — within {tie:.0%}, effectively a tie on this machine" if gap < tie else ""))
    else:
        lines.append("runner-up: none (no other artifact meets the budget)")
    for r in choice["rejected_faster"]:
        lines.append(f"rejected (faster, p50 {r['p50_ms']:.3f} ms): {r['label']}: {'; '.join(r['reasons'])}")
    for r in choice["rejected"]:
        if r["p50_ms"] is None:
            lines.append(f"not timed: {r['label']}: {'; '.join(r['reasons'])}")
        elif r not in choice["rejected_faster"]:
            lines.append(f"refused (slower, p50 {r['p50_ms']:.3f} ms): {r['label']}: {'; '.join(r['reasons'])}")
    return lines
