"""The `exporter` command line: one subcommand per pipeline stage.

Every subcommand parses its arguments here and calls the stage's Python function; errors derived from
`ExporterError` (and bad values) are printed as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from exporter.errors import ExporterError

Handler = Callable[[argparse.Namespace], int]


def _human(n: float) -> str:
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


# --- exporter list -------------------------------------------------------------------------------------------


def _add_list_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="show every registered model with its parameters and MACs",
        description="Show every registered model: family, seed, default input (C,H,W), parameter count and "
        "multiply-accumulates of one forward pass at the default input (batch 1), computed from the model.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="only these models (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> int:
    from exporter.models import get_spec, list_models, model_summary

    names = [get_spec(name).name for name in args.models] or list_models()
    rows = [model_summary(name) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        row["input"] = "×".join(map(str, row["input_shape"]))
        row["params_h"] = f"{row['params']:,}"
        row["macs_h"] = _human(row["macs"])
    print_table(rows, [("name", "model"), ("family", "family"), ("seed", "seed"), ("input", "input"),
                       ("num_classes", "classes"), ("params_h", "params"), ("macs_h", "MACs")])
    return 0


# --- entry point ---------------------------------------------------------------------------------------------

PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_list_parser]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="exporter",
        description="Train the classic CNNs, compile and export them (torch.compile, ONNX, OpenVINO, TensorRT, "
        "AOTInductor) and prove that every exported artifact computes the same function, and how fast.",
        epilog="Typical run: `exporter build resnet50v2 --fp16` (trains on the embedded digits if no checkpoint "
        "exists, exports, checks parity). `exporter SUBCOMMAND --help` explains each step.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ExporterError as exc:
        print(f"exporter {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"exporter {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
