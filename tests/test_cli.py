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


# --- shared options: one helper each, the same rules in every subcommand -------------------------------------------


def _subparsers() -> dict:
    import argparse

    from exporter.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_artifacts_is_one_path_option_everywhere() -> None:
    from pathlib import Path

    for name, sub in _subparsers().items():
        options = {o: a for a in sub._actions for o in a.option_strings}
        if name == "list":
            assert "--artifacts" not in options
            continue
        action = options["--artifacts"]
        assert action.dest == "artifacts" and action.type is Path and action.option_strings == ["--artifacts"], name
        assert "--artifacts-dir" not in options, name


def test_every_count_option_is_a_positive_integer_up_to_ten_million(capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.cli_options import COUNT_LIMIT, positive_int

    assert COUNT_LIMIT == 10**7 and positive_int(str(COUNT_LIMIT)) == COUNT_LIMIT
    checked = 0
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.type is not positive_int:
                continue
            flag = action.option_strings[0]
            for bad in ("0", "-1", str(COUNT_LIMIT + 1), "1.5", "ten"):
                with pytest.raises(SystemExit) as exc:
                    sub.parse_args([*(["x"] if name != "report" else []), flag, bad])
                assert exc.value.code == 2, (name, flag, bad)
                err = capsys.readouterr().err.strip().splitlines()
                assert len(err) == 1 and flag in err[0], (name, flag, bad, err)
            checked += 1
    assert checked >= 10  # build, verify, bench, select and train all have some


def test_keyboard_interrupt_is_exit_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_list", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "exporter list: interrupted"


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("build", "verify", "bench", "select", "report"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "3 partly done" in out and "130 interrupted" in out and "2 bad input" in out, name
