"""Scale: N running batches followed for a scaled hour (issue 8, item 4).

    python -m tests.bench.bench_scale [--quick] [--out FILE] [--sizes 100,1000,10000]

For each size N: N two-request files dropped at once, each a job whose batch lasts an
hour of service time; the emulator (its own process) runs `time_scale` times fast and
every cap keeps its shape over `60 / time_scale` wall seconds, on both sides. The daemon
(`batchd run`, a subprocess) uses its default poll cadence scaled the same way. Measured
per N: the daemon's CPU seconds while following (all created -> 0.9 h later) and over the
whole run, its peak RSS, the SQLite size, list and retrieve calls per poll sweep. The
running cap (and the account's file quota, three files a part) is raised when N > 1000,
so that N batches are followed at once. `make bench` runs 100 and 1000; 10,000 takes
about a quarter of an hour more (`--sizes=100,1000,10000`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from batchd.testing import (
    DaemonProcess,
    EmulatorProcess,
    drop_all,
    job_folders,
    requests,
    wait_for,
)
from tests.bench.common import (
    Row,
    bench_main,
    calls,
    env_for,
    verdict,
)

HOUR = 3600.0


def _sizes(quick: bool) -> list[int]:
    for arg in sys.argv:
        if arg.startswith("--sizes="):
            return [int(x) for x in arg.split("=", 1)[1].split(",")]
    return [50, 200] if quick else [100, 1000]


async def one_size(tmp: Path, n: int, scale: float) -> dict[str, Any]:
    window = 60.0 / scale
    limits = {
        "running_batches": max(1000, n),
        # Each running part holds its input and, later, two result files on the account.
        "max_stored_files": max(10_000, 3 * n + 100),
        "upload_per_second": 3.0 * scale,
        "file_calls_per_second": 10.0 * scale,
    }
    emulator = await EmulatorProcess.start(
        tmp,
        time_scale=scale,
        rate_window_s=window,
        limits=limits,
        # A two-request job lasts an hour: 20 s validating + base + 2 x 0.5 s + 10 s.
        in_progress_base_s=HOUR - 31.0,
        shuffle_output=False,
    )
    root = tmp / "root"
    interval = 60.0 / scale
    env = env_for(
        emulator,
        root,
        {
            "limits": limits,
            "api": {"rate_window_s": window},
            "poll": {"first_poll_s": 30.0 / scale, "interval_s": interval, "jitter": 0.1},
        },
    )
    daemon = await DaemonProcess.start(env, tmp / "daemon.log")
    try:
        await wait_for(lambda: (root / "inbox").exists(), 30, "daemon start")
        t0 = time.monotonic()
        drop_all(
            root / "inbox", {f"job{i:05d}.jsonl": requests(2, prefix=f"j{i}-") for i in range(n)}
        )

        async def all_created() -> bool:
            if daemon.proc.returncode is not None:
                raise RuntimeError("daemon exited:\n" + daemon.log_tail())
            return int((await emulator.stats())["batches_created"]) >= n

        await wait_for(all_created, 120 + n / 20, "all created", step_s=0.1)
        t_created = time.monotonic()
        cpu_created = daemon.cpu_s()
        before = calls(await emulator.stats())
        follow_s = 0.9 * HOUR / scale
        # Sweeps are counted as bursts of list or retrieve calls: a sweep's calls follow
        # each other at once, sweeps are at least the poll stage's tick apart.
        sweeps, quiet, last = 0, 99, before["list"] + before["retrieve"]
        end = time.monotonic() + follow_s
        while time.monotonic() < end:
            await asyncio.sleep(0.05)
            now_calls = calls(await emulator.stats())
            polled = now_calls["list"] + now_calls["retrieve"]
            if polled > last:
                if quiet >= 4:
                    sweeps += 1
                quiet = 0
            else:
                quiet += 1
            last = polled
        after = calls(await emulator.stats())
        cpu_followed = daemon.cpu_s()
        rss_following = daemon.rss_mb("VmRSS")
        await wait_for(
            lambda: len(job_folders(root / "outbox")) >= n,
            120 + n / 10,
            "all published",
            step_s=0.2,
        )
        t_done = time.monotonic()
        cpu_total = daemon.cpu_s()
        peak = daemon.rss_mb()
        db = sum(p.stat().st_size for p in (root / "state").glob("batchd.sqlite3*"))
    finally:
        code = await daemon.stop()
        stats = await emulator.stats()
        await emulator.stop()
    sweeps = max(sweeps, 1)
    return {
        "jobs": n,
        "time_scale": scale,
        "seconds_to_all_created": round(t_created - t0, 2),
        "seconds_total": round(t_done - t0, 2),
        "following": {
            "wall_s": round(follow_s, 2),
            "service_hours": 0.9,
            "cpu_s": round(cpu_followed - cpu_created, 2),
            "cpu_s_per_service_hour": round((cpu_followed - cpu_created) / 0.9, 2),
            "calls": {k: after[k] - before[k] for k in after},
            "sweeps": sweeps,
            "list_per_sweep": round((after["list"] - before["list"]) / sweeps, 2),
            "retrieve_per_sweep": round((after["retrieve"] - before["retrieve"]) / sweeps, 2),
            "rss_mb": round(rss_following, 1),
        },
        "cpu_s_total": round(cpu_total, 2),
        "peak_rss_mb": round(peak, 1),
        "sqlite_bytes": db,
        "calls_total": calls(stats),
        "refused_429": {k: c["refused_429"] for k, c in stats["calls"].items()},
        "exit_code": code,
    }


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    scale = 240.0 if quick else 60.0
    results = []
    for n in _sizes(quick):
        folder = tmp / f"n{n}"
        folder.mkdir()
        results.append(await one_size(folder, n, scale))
    growth: dict[str, Any] = {}
    if len(results) >= 2:
        a, b = results[0], results[-1]
        factor = b["jobs"] / a["jobs"]
        growth = {
            "jobs_factor": factor,
            "cpu_following": b["following"]["cpu_s"] / max(a["following"]["cpu_s"], 0.01),
            "cpu_total": b["cpu_s_total"] / max(a["cpu_s_total"], 0.01),
            "peak_rss": b["peak_rss_mb"] / a["peak_rss_mb"],
            "sqlite": b["sqlite_bytes"] / a["sqlite_bytes"],
        }
    return {"sizes": results, "growth": growth}


def rows(f: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for r in f["sizes"]:
        fo = r["following"]
        name = f"4 scale {r['jobs']}"
        out += [
            (
                name,
                "daemon CPU s per service hour following / whole run",
                f"{fo['cpu_s_per_service_hour']:.1f} / {r['cpu_s_total']:.1f}",
                "",
                "",
            ),
            (
                name,
                "peak RSS / SQLite size",
                f"{r['peak_rss_mb']:.0f} MB / {r['sqlite_bytes'] / 1e6:.2f} MB",
                "",
                "",
            ),
            (
                name,
                "list / retrieve calls per sweep",
                f"{fo['list_per_sweep']:.1f} / {fo['retrieve_per_sweep']:.1f}",
                f"about {max(1, r['jobs'] // 100)} list",
                verdict(
                    fo["list_per_sweep"] <= max(1, r["jobs"] / 100) * 1.5 + 1
                    and fo["retrieve_per_sweep"] <= 1
                ),
            ),
        ]
    g = f["growth"]
    if g:
        k = g["jobs_factor"]
        for key, label in (
            ("cpu_following", "CPU following"),
            ("cpu_total", "CPU whole run"),
            ("peak_rss", "peak RSS"),
            ("sqlite", "SQLite size"),
        ):
            out.append(
                (
                    "4 scale growth",
                    f"{label} x{g[key]:.1f} for x{k:.0f} jobs",
                    f"{g[key] / k:.2f} of linear",
                    "<= 1.0 (+0.1 for noise)",
                    verdict(g[key] <= k * 1.1),
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--sizes")]
    return bench_main(__doc__.split("\n")[0], run, rows, args)


if __name__ == "__main__":
    raise SystemExit(main())
