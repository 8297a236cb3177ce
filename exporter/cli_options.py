"""What every `exporter` subcommand shares: the exit codes, the one-line argparse errors, the value checks of each
kind of option, and the options several subcommands take (`--artifacts`, `--json`), each declared by one helper."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, NoReturn

from exporter.paths import default_artifacts_dir

Handler = Callable[[argparse.Namespace], int]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_CODES = ("exit status: 0 everything asked for was done; 1 it failed (a parity failure, nothing could run, a "
              "broken build or file, an output that cannot be written, a full disk); 2 bad input (unknown names, "
              "invalid values); 3 partly done (some artifacts or cells could not run: each failure is printed); "
              "130 interrupted (Ctrl-C); 143 terminated (SIGTERM)")


class Parser(argparse.ArgumentParser):
    """argparse with bad-input errors on one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print `rows` as an aligned text table; `columns` are (key, header) pairs."""
    cells = [[str(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(c[i]) for c in cells)) for i, (_, header) in enumerate(columns)]
    print("  ".join(header.ljust(w) for (_, header), w in zip(columns, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


# --- shared options: one helper each ---------------------------------------------------------------------------

COUNT_LIMIT = 10**7  # no count option means anything beyond this; bigger values are typos


MODEL_HELP = ("a registered model (see `exporter list`), or a model source: torchvision:NAME, timm:NAME, "
              "path/to/file.py:factory (a function returning an nn.Module), or path/to/model.onnx")


def shape_option(text: str) -> tuple[int, int, int]:
    """`C,H,W` → a tuple of three positive integers."""
    parts = [p.strip() for p in text.replace("x", ",").replace("×", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0 or max(shape) > COUNT_LIMIT:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive integers, e.g. 3,224,224), got {text!r}")
    return shape  # type: ignore[return-value]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0 or value > COUNT_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to {COUNT_LIMIT:,}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


SEED_LIMIT = 2**32 - 1  # numpy's and torch's generators both take any seed in 0..2³²-1


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_LIMIT:,}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one backend or artifact name")
    return names


def batch_list(text: str) -> list[int]:
    try:
        sizes = [positive_int(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        sizes = []
    if not sizes:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated positive integers, got {text!r}")
    return sizes


def add_artifacts_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", metavar="DIR", type=Path, default=None,
                   help="where builds and checkpoints live (default: $EXPORTER_ARTIFACTS or ./artifacts)")


def add_json_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout (progress stays on stderr)")


def artifacts_dir(args: argparse.Namespace) -> Path:
    return args.artifacts or default_artifacts_dir()


def parser(sub: argparse._SubParsersAction, name: str, **kwargs: str) -> argparse.ArgumentParser:
    epilog = kwargs.pop("epilog", "")
    exit_codes = EXIT_CODES[0].upper() + EXIT_CODES[1:] + "."
    return sub.add_parser(name, epilog=(epilog + " " if epilog else "") + exit_codes, **kwargs)
