"""The command line: help, list, and one-line errors."""

from __future__ import annotations

import json

import pytest

from exporter.cli import main
from exporter.models import list_models


def test_list_json_has_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models()
    lenet = next(r for r in rows if r["name"] == "lenet")
    assert lenet["params"] == 61_706 and lenet["macs"] == 416_520


def test_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "lenet", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "61,706" in out and "25,557,032" in out


def test_unknown_model_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "resnet5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resnet50" in err


def test_help_explains_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "list" in capsys.readouterr().out
