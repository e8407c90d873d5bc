"""Shared pieces of the benchmarks beyond the harness (`batchd.testing`, which starts the
emulator and the daemon, builds the requests and waits): the machine, verdicts,
percentiles, the clock conversions and the command line of one benchmark.

Every benchmark module has `main(argv)` with `--quick` and `--out FILE` (its figures as
JSON) and a `rows(figures)` that turns its figures into table rows for `tests.bench.run`.
The emulator runs in the benchmark's own process (`running_emulator`) or in its own
(`EmulatorProcess`); the daemon runs as `batchd run` in a subprocess (`DaemonProcess`) so
that its CPU seconds and peak RSS are its own. Network: 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd.emulator import Emulator
from batchd.logs import configure
from batchd.testing import daemon_env

# A table row: benchmark, figure, value (already formatted), target, verdict.
Row = tuple[str, str, str, str, str]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(ram_gb, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def wall_of(emulator: Emulator, service_t: float) -> float:
    """The monotonic wall time (this process's clock) at which the service read `service_t`.

    Valid while the emulator's clock was never advanced by hand."""
    clock = emulator.clock
    return clock._start_wall + (service_t - clock._start_service) / clock.time_scale


def mono_of_unix(unix_t: float) -> float:
    """A Unix timestamp (the daemon's time.time()) on this process's monotonic clock."""
    return time.monotonic() - (time.time() - unix_t)


def env_for(emulator: Any, root: Path, settings: dict[str, Any]) -> dict[str, str]:
    """The harness's `batchd run` environment with `settings` (nested tables) on top."""
    env = daemon_env(emulator, root, settings)
    # BATCHD_BENCH_LOG=info keeps the daemon's log lines (in the temp folder) for a look.
    env["BATCHD_LOG__LEVEL"] = os.environ.get("BATCHD_BENCH_LOG", "warning")
    return env


def calls(stats: dict[str, Any]) -> dict[str, int]:
    """Served calls per class from emulator stats."""
    return {name: int(c["served"]) for name, c in stats["calls"].items()}


def refused(stats: dict[str, Any]) -> dict[str, int]:
    return {name: int(c["refused_429"]) for name, c in stats["calls"].items()}


def bench_main(
    description: str,
    run: Callable[[Path, bool], Awaitable[dict[str, Any]]],
    rows: Callable[[dict[str, Any]], list[Row]],
    argv: Sequence[str] | None = None,
) -> int:
    """The command line of one benchmark module."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--dir", type=Path, help="where to put temporary files")
    args = parser.parse_args(argv)
    configure("warning", "console", stream=sys.stderr)
    keep = os.environ.get("BATCHD_BENCH_KEEP")
    with tempfile.TemporaryDirectory(prefix="batchd-bench-", dir=args.dir) as tmp:
        if keep:
            print(f"temporary folder: {tmp} (copied to {keep})", file=sys.stderr)
        started = time.monotonic()
        figures = asyncio.run(run(Path(tmp), args.quick))
        figures["bench_seconds"] = round(time.monotonic() - started, 1)
        if keep:
            shutil.copytree(tmp, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.jsonl"))
    for row in rows(figures):
        print(" | ".join(row))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    sys.stdout.flush()
    return 0
