"""Start-up of the command line (issue 13): client commands against Python's own start.

    python -m tests.bench.bench_startup [--quick] [--out FILE]

Each command is run as a user runs it (the installed `batchd` script, a fresh process),
side by side with a bare `python -c "import orjson"`, round after round (7 rounds; 3 with
--quick), so that a noisy machine slows both alike. Figures: the median wall seconds of
each and their ratio to the bare start. `status` and `jobs` are timed against a running
daemon (`batchd run`, a subprocess, on an in-process emulator) and against a socket
nobody listens on (exit 3).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from batchd.testing import (
    DaemonProcess,
    daemon_env,
    drop,
    requests,
    running_emulator,
    wait_ready,
)
from tests.bench.common import Row, bench_main, verdict

TARGET = 4.0


def _batchd() -> list[str]:
    script = Path(sys.executable).parent / "batchd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchd"]


def _time(argv: list[str], env: dict[str, str], expect: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=60)
    took = time.perf_counter() - started
    if done.returncode != expect:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}, not {expect}: {done.stderr[-500:]!r}"
        )
    return took


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    rounds = 3 if quick else 7
    one = tmp / "one.jsonl"
    one.write_bytes(requests(1))
    async with running_emulator(tmp / "emulator") as emulator:
        root = tmp / "root"
        env = daemon_env(emulator, root)
        daemon = await DaemonProcess.start(env, tmp / "daemon.log")
        try:
            await wait_ready(root, daemon)
            drop(root / "inbox", "some.jsonl", requests(2))
            # The user's shell: no daemon settings in the environment.
            shell = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
            bd = _batchd()
            down = str(tmp / "nobody.sock")
            commands: dict[str, tuple[list[str], int]] = {
                "python -c 'import orjson'": ([sys.executable, "-c", "import orjson"], 0),
                "batchd --version": ([*bd, "--version"], 0),
                "batchd validate (one line)": ([*bd, "validate", str(one)], 0),
                "batchd status (daemon up)": ([*bd, "status", "--root", str(root)], 0),
                "batchd jobs (daemon up)": ([*bd, "jobs", "--root", str(root)], 0),
                "batchd status (daemon down)": ([*bd, "status", "--socket", down], 3),
                "batchd jobs (daemon down)": ([*bd, "jobs", "--socket", down], 3),
            }
            for argv, expect in commands.values():  # a warm-up: files in the page cache
                _time(argv, shell, expect)
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(rounds):
                for name, (argv, expect) in commands.items():
                    times[name].append(_time(argv, shell, expect))
        finally:
            code = await daemon.stop()
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians.pop("python -c 'import orjson'")
    return {
        "rounds": rounds,
        "baseline_s": round(base, 4),
        "commands": {
            name: {"median_s": round(m, 4), "ratio": round(m / base, 2)}
            for name, m in medians.items()
        },
        "exit_code": code,
    }


def rows(f: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for name, c in f["commands"].items():
        out.append(
            (
                "7 startup",
                f"{name}: median s vs import orjson ({f['rounds']} rounds)",
                f"{c['median_s']:.3f} vs {f['baseline_s']:.3f} = {c['ratio']:.1f}x",
                f"<= {TARGET:g}x",
                verdict(c["ratio"] <= TARGET),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__.split("\n")[0], run, rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
