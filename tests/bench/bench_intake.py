"""Intake: 10,000 small files dropped at once (issue 8, item 5).

    python -m tests.bench.bench_intake [--quick] [--out FILE]

All files are written under hidden temp names, then renamed into the inbox in one go.
`batchd run` (a subprocess, inotify on, its default settle time) claims them against an
emulator in its own process. Read from the daemon's SQLite while it runs: the time until
every file is claimed (a job row) and queued (its parts planned), claims per second, and
duplicates (a file claimed twice, or two jobs for one inbox name): must be 0.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from batchd.testing import (
    DaemonProcess,
    EmulatorProcess,
    drop_all,
    requests,
    wait_for,
)
from tests.bench.common import (
    Row,
    bench_main,
    env_for,
    verdict,
)


def _counts(db: Path) -> tuple[int, int]:
    """(jobs claimed, jobs whose parts are planned) from the daemon's database."""
    if not db.exists():
        return 0, 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        claimed = conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'claiming'").fetchone()
        planned = conn.execute("SELECT COUNT(DISTINCT job_id) FROM parts").fetchone()
    return int(claimed[0]), int(planned[0])


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    n = 1000 if quick else 10_000
    emulator = await EmulatorProcess.start(tmp, time_scale=60.0, rate_window_s=1.0)
    root = tmp / "root"
    env = env_for(
        emulator,
        root,
        {
            "api": {"rate_window_s": 1.0},
            # inotify and the default settle time, as users run it.
            "intake": {"watch": True, "settle_s": 2.0, "rescan_interval_s": 10.0},
        },
    )
    daemon = await DaemonProcess.start(env, tmp / "daemon.log")
    db = root / "state" / "batchd.sqlite3"
    marks: dict[str, float] = {}
    try:
        await wait_for(lambda: (root / "inbox").exists(), 30, "daemon start")
        files = {f"in{i:05d}.jsonl": requests(1, prefix=f"i{i}-") for i in range(n)}
        t0 = time.monotonic()
        drop_all(root / "inbox", files)
        dropped_s = time.monotonic() - t0
        cpu0 = daemon.cpu_s()

        def progress() -> bool:
            claimed, planned = _counts(db)
            now = time.monotonic() - t0
            if claimed and "first_claim" not in marks:
                marks["first_claim"] = now
            if claimed >= n and "all_claimed" not in marks:
                marks["all_claimed"] = now
            if planned >= n:
                marks["all_queued"] = now
                return True
            return False

        await wait_for(progress, 60 + n / 20, "all claimed and queued", step_s=0.1)
        cpu = daemon.cpu_s() - cpu0
        rss = daemon.rss_mb()
        left = [p for p in (root / "inbox").iterdir() if not p.name.startswith(".")]
    finally:
        code = await daemon.stop()
        await emulator.stop()
    with sqlite3.connect(db) as conn:
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        names = conn.execute("SELECT COUNT(DISTINCT inbox_name) FROM jobs").fetchone()[0]
        inodes = conn.execute(
            "SELECT COUNT(DISTINCT inbox_dev || ':' || inbox_inode) FROM jobs"
        ).fetchone()[0]
    claim_span = marks["all_claimed"] - marks["first_claim"]
    return {
        "files": n,
        "seconds_to_drop": round(dropped_s, 2),
        "seconds_to_first_claim": round(marks["first_claim"], 2),
        "seconds_to_all_claimed": round(marks["all_claimed"], 2),
        "seconds_to_all_queued": round(marks["all_queued"], 2),
        "claims_per_s": round(n / max(claim_span, 0.001), 1),
        "claims_per_s_from_drop": round(n / marks["all_claimed"], 1),
        "jobs": jobs,
        "duplicates": (jobs - names) + (jobs - inodes),
        "left_in_inbox": len(left),
        "daemon_cpu_s": round(cpu, 2),
        "peak_rss_mb": round(rss, 1),
        "exit_code": code,
    }


def rows(f: dict[str, Any]) -> list[Row]:
    name = "5 intake"
    return [
        (
            name,
            f"{f['files']} files: all claimed / all queued (s after drop)",
            f"{f['seconds_to_all_claimed']:.1f} / {f['seconds_to_all_queued']:.1f}",
            "",
            "",
        ),
        (
            name,
            "claims per second (first to last claim)",
            f"{f['claims_per_s']:.0f}",
            "",
            "",
        ),
        (
            name,
            "duplicates / jobs / left in inbox",
            f"{f['duplicates']} / {f['jobs']} / {f['left_in_inbox']}",
            "0 duplicates",
            verdict(f["duplicates"] == 0 and f["jobs"] == f["files"]),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__.split("\n")[0], run, rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
