"""The `batchd` command line: one parser, one module per group of commands.

Only the module of the command being run is imported: `batchd status` loads the light
control client, not the daemon, the emulator or pydantic, and `batchd --help` loads
none. Each command module of `batchd.cli` exposes `register(subparsers)`, adding its
commands with a `handler(args) -> int` default; their one-line help lives in COMMANDS
below. Exit codes: 0 ok, 1 the thing asked for failed, 2 usage error, 3 daemon not
reachable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from batchd import __version__
from batchd.errors import BatchdError, ConfigError, UsageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# name: (module, one-line help), in the order `batchd --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("batchd.cli.inputs", "check JSONL batch input files"),
    "estimate": ("batchd.cli.estimate", "what a file will cost"),
    "split": ("batchd.cli.inputs", "split a JSONL file into batch-sized parts"),
    "csv2jsonl": (
        "batchd.cli.inputs",
        "turn a CSV of custom_id,content into a JSONL batch file",
    ),
    "jsonl2csv": ("batchd.cli.inputs", "turn a result JSONL file into CSV"),
    "emulator": ("batchd.cli.emulator", "serve the Batch API emulator"),
    "store-proxy": (
        "batchd.cli.storeproxy",
        "a fault proxy in front of an object store, for dry runs of bucket folders",
    ),
    "run": ("batchd.cli.daemon", "run the daemon: inbox -> batch jobs -> outbox"),
    "demo": (
        "batchd.cli.demo",
        "run the daemon end to end against the shipped emulator and show the results",
    ),
    "status": ("batchd.cli.control", "the daemon's state, caps and errors"),
    "jobs": ("batchd.cli.control", "list jobs"),
    "show": ("batchd.cli.control", "one job with its parts"),
    "cancel": ("batchd.cli.control", "cancel a job (finished requests are kept)"),
    "retry": ("batchd.cli.control", "rerun what failed or never ran"),
    "pause": ("batchd.cli.control", "stop taking new files from the inbox"),
    "resume": ("batchd.cli.control", "take new files again"),
    "drain": ("batchd.cli.control", "finish what runs, take nothing new, then exit"),
    "watch": ("batchd.cli.control", "live progress bars of running jobs"),
    "check": ("batchd.cli.control", "exit 0 when the daemon answers and is healthy"),
    "submit": ("batchd.cli.control", "copy files into the inbox atomically"),
}


class _Commands:
    """The subparsers action as a command module sees it: `add_parser(name, ...)` with
    the help taken from COMMANDS, and a record of what was added."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub
        self.added: set[str] = set()

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("help", COMMANDS[name][1])
        self.added.add(name)
        parser: argparse.ArgumentParser = self.sub.add_parser(name, **kwargs)
        return parser


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with full arguments for the command named in `argv` (all commands
    when `argv` is None) and a one-line entry for each of the others."""
    parser = argparse.ArgumentParser(
        prog="batchd",
        description="Run folders of LLM requests as OpenAI-compatible Batch API jobs.",
    )
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if argv is None:
        wanted = {module for module, _ in COMMANDS.values()}
    else:
        chosen = next((a for a in argv if not a.startswith("-")), None)
        wanted = {COMMANDS[chosen][0]} if chosen in COMMANDS else set()
    commands = _Commands(sub)
    loaded: set[str] = set()
    for name, (module, text) in COMMANDS.items():
        if module in wanted and module not in loaded:
            importlib.import_module(module).register(commands)
            loaded.add(module)
        if name not in commands.added:
            commands.add_parser(name, help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
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
