"""The `batchd` command line: one parser, one module per group of commands.

Each module under `batchd.commands` exposes `register(subparsers)`, adding its commands
with a `handler(args) -> int` default. Exit codes: 0 ok, 1 the thing asked for failed,
2 usage error, 3 daemon not reachable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from batchd import __version__
from batchd.errors import BatchdError, ConfigError, UsageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

COMMAND_MODULES = (
    "batchd.commands.inputs",
    "batchd.commands.emulator",
    "batchd.commands.daemon",
    "batchd.commands.demo",
    "batchd.commands.control",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchd",
        description="Run folders of LLM requests as OpenAI-compatible Batch API jobs.",
    )
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except (UsageError, ConfigError) as exc:
        print(f"batchd {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BatchdError as exc:
        print(f"batchd {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code
