"""Latency under the caps (issue 8, item 6).

    python -m tests.bench.bench_latency [--quick] [--out FILE]

Files dropped one at a time (well under every cap) into `batchd run` (a subprocess, with
its default intake and poll settings, the poll cadence on the service's clock) against an
in-process emulator whose clock runs 60 times fast. Per job: file dropped -> batch
created (the emulator's own create time), remote completion (the emulator's completed_at)
-> observed by the daemon (`timings.batches_ended_at` in summary.json) -> published
(`timings.published_at`). Wall seconds; p50 and p95.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from batchd.testing import (
    DaemonProcess,
    drop_all,
    job_folders,
    requests,
    running_emulator,
    seconds_of,
    wait_for,
)
from tests.bench.common import (
    Row,
    bench_main,
    env_for,
    pct,
    wall_of,
)

SCALE = 60.0


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    n = 10 if quick else 40
    gap_s = 0.3
    async with running_emulator(
        tmp / "emulator", time_scale=SCALE, rate_window_s=60.0 / SCALE
    ) as emulator:
        root = tmp / "root"
        env = env_for(
            emulator,
            root,
            {
                "api": {"rate_window_s": 60.0 / SCALE},
                "intake": {"watch": True, "settle_s": 2.0, "rescan_interval_s": 10.0},
                "poll": {"first_poll_s": 30.0 / SCALE, "interval_s": 60.0 / SCALE, "jitter": 0.1},
            },
        )
        daemon = await DaemonProcess.start(env, tmp / "daemon.log")
        dropped: dict[str, float] = {}
        try:
            await wait_for(lambda: (root / "inbox").exists(), 30, "daemon start")
            for i in range(n):
                name = f"lat{i:03d}"
                dropped[name] = time.time()
                drop_all(root / "inbox", {f"{name}.jsonl": requests(2, prefix=f"{name}-")})
                await asyncio.sleep(gap_s)
            await wait_for(
                lambda: len(job_folders(root / "outbox")) >= n, 120, "all published", step_s=0.05
            )
        finally:
            code = await daemon.stop()
        # Unix time of a service instant, through the emulator's (never advanced) clock.
        offset = time.time() - time.monotonic()
        by_input = {b.input_file_id: b for b in emulator.state.store.batches.values()}
        now = emulator.clock.now()
        to_created, to_observed, to_published, completed_to_published = [], [], [], []
        for folder in job_folders(root / "outbox"):
            summary = orjson.loads((folder / "summary.json").read_bytes())
            timings = summary["timings"]
            name = folder.name
            ended = seconds_of(timings["batches_ended_at"][0])
            batch = next(b for b in by_input.values() if (b.metadata or {}).get("ds_name") == name)
            created = wall_of(emulator, batch.timeline.created_at) + offset
            done = wall_of(emulator, batch.phase(now).events["completed_at"]) + offset
            to_created.append(created - dropped[name])
            to_observed.append(ended - done)
            published = seconds_of(timings["published_at"])
            to_published.append(published - ended)
            completed_to_published.append(published - done)

    def dist(values: list[float]) -> dict[str, float]:
        return {"p50": round(pct(values, 50), 3), "p95": round(pct(values, 95), 3)}

    return {
        "jobs": n,
        "time_scale": SCALE,
        "drop_to_created_s": dist(to_created),
        "completed_to_observed_s": dist(to_observed),
        "observed_to_published_s": dist(to_published),
        "completed_to_published_s": dist(completed_to_published),
        "exit_code": code,
    }


def rows(f: dict[str, Any]) -> list[Row]:
    def pp(d: dict[str, float]) -> str:
        return f"{d['p50']:.2f} / {d['p95']:.2f}"

    scale = f["time_scale"]
    obs = f["completed_to_observed_s"]
    return [
        (
            "6 latency",
            "file dropped -> batch created, p50 / p95 s",
            pp(f["drop_to_created_s"]),
            "",
            "",
        ),
        (
            "6 latency",
            f"remote completion -> observed, p50 / p95 s (x{scale:g} = service s"
            f" {obs['p50'] * scale:.0f} / {obs['p95'] * scale:.0f})",
            pp(obs),
            "",
            "",
        ),
        (
            "6 latency",
            "observed -> outbox published, p50 / p95 s",
            pp(f["observed_to_published_s"]),
            "",
            "",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__.split("\n")[0], run, rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
