"""The committed bench scripts still run against today's manifest and CLI (they are not imported by the package)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_all_reports_a_build_and_its_parity(tmp_path: Path) -> None:
    out = tmp_path / "build.md"
    code = _script("build_all").main(["--models", "lenet_bn", "--modes", "untrained", "--out", str(out),
                                      "--extra=--backends onnx,onnxruntime --parity-samples 4"])
    assert code == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["status"] == "ok", row.get("error")
    assert row["parity_ok"] is True
    assert {a["name"]: a["parity"] for a in row["artifacts"]}["onnx-fp32"] == "pass"
    assert "| lenet_bn | untrained --backends onnx,onnxruntime" in out.read_text()


def test_a_timed_out_command_says_so() -> None:
    from bench import common

    finished = common.run_exporter(["list"], timeout=0.001)
    assert finished.code is None
    assert common.error_line("warning: x\nexporter build: error: bad input\ntrailing") == "exporter build: error: bad input"
