"""`batchd demo`: the whole product in one command, against the shipped emulator.

Starts the emulator and the daemon on loopback in a temporary root, drops the seed's two
sample files (the test model's and a qwen-plus one) and a bad file into the inbox, waits
for the outbox, shows what arrived, and stops both cleanly.

`--root DIR` deletes nothing it did not make. A folder it creates (or an empty one it is
given) gets a marker file, `.batchd-demo`, first; a later run in a folder holding the
marker replaces what the earlier run made there (its inbox, outbox, spool, state and
emulator folders, its control socket) and leaves anything else alone. A folder that is
not empty and holds no marker is refused (exit 2) untouched: it may be a real daemon's
root, or anything else of the user's. So `make demo` (`--root demo`) works run after run.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import stat
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from batchd.config import Settings
from batchd.errors import UsageError
from batchd.logs import configure
from batchd.outbox.folder import REPORT, RESULTS, OutboxFolder

EXAMPLES = ("test_model.jsonl", "qwen_plus.jsonl", "bad_input.jsonl")

# The proof that `batchd demo` made a folder, written before anything else goes in it.
MARKER = ".batchd-demo"
# What a run makes directly under its root: folders, and the control socket. Only these
# are ever deleted, and only in a folder holding the marker.
MADE_FOLDERS = ("emulator", "inbox", "outbox", "spool", "state")
MADE_SOCKET = "control.sock"


def _foreign(root: Path) -> list[str]:
    """Entries under a marked `root` with a name the demo uses that the demo did not make
    (not a real folder, or not a socket): a reason to delete nothing."""
    found: list[str] = []
    for name in (*MADE_FOLDERS, MADE_SOCKET):
        try:
            mode = (root / name).lstat().st_mode
        except FileNotFoundError:
            continue
        expected = stat.S_ISSOCK if name == MADE_SOCKET else stat.S_ISDIR
        if not expected(mode):
            found.append(name)
    return found


def take_root(root: Path) -> None:
    """Make `root` ready for a run: create it, take it empty, or clear what an earlier
    run made in it; refuse (UsageError) a folder the demo did not make, deleting nothing."""
    if not root.exists():
        root.mkdir(parents=True)
    elif not root.is_dir():
        raise UsageError(f"--root {root} is not a folder")
    elif (root / MARKER).is_file():
        foreign = _foreign(root)
        if foreign:
            raise UsageError(
                f"--root {root}: {', '.join(foreign)} in it was not made by `batchd demo`;"
                " nothing was deleted"
            )
        for name in MADE_FOLDERS:
            if (root / name).exists():
                shutil.rmtree(root / name)
        (root / MADE_SOCKET).unlink(missing_ok=True)
    elif names := {p.name for p in root.iterdir()}:
        # Only the demo's names, the emulator's folder among them (a daemon's root has
        # none): most likely made by a demo from before the marker.
        older = (
            " (it looks like a demo folder from before the marker: if so, remove it once)"
            if "emulator" in names and names <= {*MADE_FOLDERS, MADE_SOCKET}
            else ""
        )
        raise UsageError(
            f"--root {root} is not empty and was not made by `batchd demo` (it holds no"
            f" {MARKER}){older}; nothing in it was deleted: give a new or empty folder, or"
            " leave --root out to run in a temporary one"
        )
    (root / MARKER).write_text(
        "Made by `batchd demo`. A later `batchd demo --root` here replaces what the demo"
        f" made ({', '.join(MADE_FOLDERS)}, {MADE_SOCKET}) and leaves anything else.\n",
        encoding="utf-8",
    )


async def _demo(root: Path, console: Console, time_scale: float) -> int:
    from batchd.daemon import Daemon
    from batchd.emulator import Emulator, EmulatorSettings

    key = f"sk-demo-{secrets.token_hex(8)}"
    emulator = Emulator(
        EmulatorSettings(
            host="127.0.0.1",
            port=0,
            api_key=SecretStr(key),
            time_scale=time_scale,
            data_dir=root / "emulator",
        )
    )
    await emulator.start()
    console.print(f"[bold]emulator[/] listening on {emulator.root_url} (time x{time_scale:g})")
    settings = Settings.load(
        None,
        provider="custom",
        base_url=emulator.base_url,
        paths={"root": root},
        intake={"settle_s": 0.2, "rescan_interval_s": 0.5},
        poll={"first_poll_s": 0.5, "interval_s": 0.5},
        log={"level": "warning"},
    )
    daemon = Daemon(settings, key)
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(on_ready=ready.set))
    await ready.wait()
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    console.print(f"[bold]daemon[/] watching {inbox}")
    folder = resources.files("batchd") / "examples"
    for name in EXAMPLES:
        tmp = inbox / f".{name}.tmp"
        tmp.write_bytes((folder / name).read_bytes())
        tmp.rename(inbox / name)
        console.print(f"  dropped inbox/{name}")
    started = time.monotonic()
    with console.status("waiting for the outbox..."):
        while len([p for p in outbox.iterdir() if not p.name.startswith(".")]) < len(EXAMPLES):
            if task.done() or time.monotonic() - started > 120:
                break
            await asyncio.sleep(0.2)
    daemon.request_stop()
    code = await task
    await emulator.stop()
    _show(console, outbox)
    console.print(f"\nall of it is in {root} (took {time.monotonic() - started:.1f} s)")
    return code


def _show(console: Console, outbox: Path) -> None:
    table = Table(title="outbox")
    for column in ("job", "status", "requests", "completed", "failed", "tokens", "batch"):
        table.add_column(column)
    folders = sorted(p for p in outbox.iterdir() if not p.name.startswith("."))
    for job in folders:
        s = OutboxFolder(job).summary()
        counts = s.request_counts
        table.add_row(
            job.name,
            s.status,
            str(counts.total),
            str(counts.completed),
            str(counts.failed),
            str(s.usage.total_tokens),
            ", ".join(p.batch_id or "-" for p in s.parts) or "-",
        )
    console.print(table)
    for job in folders:
        console.print(f"\n[bold]{job.name}/[/] {' '.join(sorted(p.name for p in job.iterdir()))}")
        for line in OutboxFolder(job).read(RESULTS).splitlines()[:2]:
            obj = orjson.loads(line)
            answer = obj["response"]["body"]["choices"][0]["message"]["content"]
            console.print(f"  result {obj['custom_id']}: {answer}")
        report = OutboxFolder(job).member(REPORT)
        if report.exists() and not orjson.loads(report.read_bytes()).get("valid", True):
            for err in orjson.loads(report.read_bytes())["errors"]:
                console.print(f"  [red]line {err['line']}[/]: {err['code']}: {err['message']}")


def _run(args: argparse.Namespace) -> int:
    configure("error", "console")
    console = Console()
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="batchd-demo-"))
    take_root(root)
    return asyncio.run(_demo(root, console, args.time_scale))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
    )
    p.add_argument(
        "--root",
        type=Path,
        help="folder to run in: a new or empty one, or one an earlier demo made (what that"
        " run made is replaced, nothing else is touched); default: a temporary folder",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=600.0,
        help="how much faster than the real service the emulator's clock runs",
    )
    p.set_defaults(handler=_run)
