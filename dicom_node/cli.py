"""``dicom-node``: the command line for running, watching and feeding the node, and for its model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    p.add_argument("-c", "--config", type=Path, default=None, help="node.toml (default: ./node.toml if present)")
    sub = p.add_subparsers(dest="command", required=True)
    cli_model.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
