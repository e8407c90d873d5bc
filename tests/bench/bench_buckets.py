"""Buckets: batches created per minute with uploads vs with OSS inputs, and claims per
second from a bucket inbox (issue 24).

    python -m tests.bench.bench_buckets [--quick] [--out FILE]

A real S3-compatible store on loopback (OpenStack Swift with s3api, as the tests use;
skipped with the reason where it is not installed) plays OSS, and the emulator, in its own
process with 0.25-0.35 s of latency on every call and the service's real caps (3 uploads
a second, 1000 creates a minute), reads `oss:` inputs from it. 300 one-line files are
dropped at once, three times:

- **uploads**: local folders; every part is uploaded (`input_via = "upload"`), so the
  upload cap binds;
- **oss**: the spool on a bucket, every part written there and created as
  `oss:REGION:BUCKET/KEY` (`input_via = "oss"`): no upload, the create cap binds;
- **bucket inbox**: the inbox on a bucket (objects PUT at once), claims per second.

Batches created per minute are counted from the daemon's own record of each create
(`parts.batch_created_at`), first to last. Expected: about 5x, from 180 a minute (the
upload cap) towards the create cap.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from batchd.testing import DaemonProcess, EmulatorProcess, drop_all, requests, wait_for
from tests.bench.common import Row, bench_main, env_for, verdict

LATENCY = {"latency_min_s": 0.25, "latency_max_s": 0.35}


def _created(db: Path) -> list[float]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute(
                "SELECT batch_created_at FROM parts WHERE batch_created_at IS NOT NULL"
                " ORDER BY batch_created_at"
            ).fetchall()
    except sqlite3.OperationalError:  # the daemon is still making its schema
        return []
    return [float(r[0]) for r in rows]


def _claimed(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'claiming'").fetchone()
    except sqlite3.OperationalError:  # the daemon is still making its schema
        return 0
    return int(row[0])


def _per_minute(times: list[float]) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0]) * 60.0


async def _creates(
    tmp: Path, name: str, n: int, store: Any, bucket: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """Drop `n` one-line files into a local inbox; batches created per minute."""
    s3_env = store.env(bucket)
    (tmp / name).mkdir(parents=True, exist_ok=True)
    emulator = await EmulatorProcess.start(
        tmp / name,
        **LATENCY,
        object_store_url=store.endpoint_url,
        oss_require_tag=False,
        env=s3_env,
    )
    root = tmp / name / "root"
    env = env_for(emulator, root, {"api": {"rate_window_s": 60.0}, **settings}) | s3_env
    daemon = await DaemonProcess.start(env, tmp / name / "daemon.log")
    db = root / "state" / "batchd.sqlite3"
    try:
        await wait_for(lambda: (root / "inbox").exists(), 30, "daemon start")
        t0 = time.monotonic()
        drop_all(
            root / "inbox", {f"f{i:04d}.jsonl": requests(1, prefix=f"{name}{i}-") for i in range(n)}
        )
        await wait_for(lambda: len(_created(db)) >= n, 120 + n, f"{name}: {n} batches", step_s=0.2)
        seconds = time.monotonic() - t0
        stats = await emulator.stats()
    finally:
        await daemon.stop()
        await emulator.stop()
    times = _created(db)
    return {
        "files": n,
        "batches": len(times),
        "seconds_to_all_created": round(seconds, 1),
        "created_per_minute": round(_per_minute(times), 1),
        "uploads": int(stats["calls"]["upload"]["served"]),
        "inputs": stats.get("inputs", {}),
        "refused_429": sum(int(c["refused_429"]) for c in stats["calls"].values()),
    }


async def _claims(tmp: Path, n: int, store: Any, bucket: str) -> dict[str, Any]:
    """PUT `n` objects into a bucket inbox; claims per second."""
    from aiobotocore.session import get_session

    s3_env = store.env(bucket)
    (tmp / "claims").mkdir(parents=True, exist_ok=True)
    emulator = await EmulatorProcess.start(tmp / "claims", **LATENCY)
    root = tmp / "claims" / "root"
    settings = {
        "paths": {"inbox": f"s3://{bucket}/inbox/"},
        "storage": {"endpoint_url": store.endpoint_url, "region": store.region},
        "intake": {"rescan_interval_s": 1.0},
    }
    env = env_for(emulator, root, settings) | s3_env
    daemon = await DaemonProcess.start(env, tmp / "claims" / "daemon.log")
    db = root / "state" / "batchd.sqlite3"
    try:
        await wait_for(lambda: db.exists(), 30, "daemon start")
        async with get_session().create_client(
            "s3",
            endpoint_url=store.endpoint_url,
            region_name=store.region,
            aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        ) as s3:
            t0 = time.monotonic()
            await asyncio.gather(
                *(
                    s3.put_object(
                        Bucket=bucket,
                        Key=f"inbox/o{i:04d}.jsonl",
                        Body=requests(1, prefix=f"o{i}-"),
                    )
                    for i in range(n)
                )
            )
            put_s = time.monotonic() - t0
        await wait_for(lambda: _claimed(db) >= n, 60 + n, "all claimed", step_s=0.1)
        seconds = time.monotonic() - t0
    finally:
        await daemon.stop()
        await emulator.stop()
    with sqlite3.connect(db) as conn:
        jobs = int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    return {
        "objects": n,
        "seconds_to_put": round(put_s, 2),
        "seconds_to_all_claimed": round(seconds, 2),
        "claims_per_s": round(n / max(seconds - put_s, 0.001), 1),
        "jobs": jobs,
    }


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    from tests.objstore import SwiftS3, create_bucket, swift_python

    swift_python()  # raises, with what to install, where Swift is missing
    n = 60 if quick else 300
    with SwiftS3(tmp / "swift") as swift:
        store = _Store(swift)
        for bucket in ("bench-uploads", "bench-oss", "bench-claims"):
            create_bucket(swift, bucket)
        uploads = await _creates(
            tmp, "uploads", n, store, "bench-uploads", {"jobs": {"input_via": "upload"}}
        )
        oss = await _creates(
            tmp,
            "oss",
            n,
            store,
            "bench-oss",
            {
                "jobs": {"input_via": "oss"},
                "paths": {"spool": "s3://bench-oss/spool/"},
                "storage": {"endpoint_url": swift.endpoint_url, "region": store.region},
            },
        )
        claims = await _claims(tmp, n, store, "bench-claims")
    ratio = oss["created_per_minute"] / max(uploads["created_per_minute"], 0.001)
    return {"uploads": uploads, "oss": oss, "ratio": round(ratio, 2), "claims": claims}


class _Store:
    def __init__(self, swift: Any) -> None:
        from tests.objstore import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

        self.endpoint_url = swift.endpoint_url
        self.region = REGION
        self._keys = (ACCESS_KEY_ID, SECRET_ACCESS_KEY)

    def env(self, _bucket: str) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self._keys[0],
            "AWS_SECRET_ACCESS_KEY": self._keys[1],
            "AWS_DEFAULT_REGION": self.region,
        }


def rows(f: dict[str, Any]) -> list[Row]:
    name = "9 buckets"
    u, o, c = f["uploads"], f["oss"], f["claims"]
    return [
        (
            name,
            f"{u['files']} one-line files, 0.25-0.35 s latency: seconds from the drop to the"
            " last batch created, uploads vs OSS inputs",
            f"{u['seconds_to_all_created']:.1f} vs {o['seconds_to_all_created']:.1f}",
            "",
            "",
        ),
        (
            name,
            "batches created per minute (first to last create), OSS inputs vs uploads;"
            " the create cap (1000 a minute) holds in every window",
            f"{o['created_per_minute']:.0f} vs {u['created_per_minute']:.0f} = {f['ratio']:.1f}x",
            "about 5x",
            verdict(f["ratio"] >= 3.0),
        ),
        (
            name,
            "uploads made: with uploads / with OSS inputs",
            f"{u['uploads']} / {o['uploads']}",
            "0 with OSS inputs",
            verdict(o["uploads"] == 0),
        ),
        (
            name,
            f"{c['objects']} objects PUT into a bucket inbox: claims per second",
            f"{c['claims_per_s']:.0f} ({c['jobs']} jobs)",
            "",
            verdict(c["jobs"] == c["objects"]),
        ),
        (
            name,
            "429s (uploads run / OSS run)",
            f"{u['refused_429']} / {o['refused_429']}",
            "0",
            verdict(u["refused_429"] == 0 and o["refused_429"] == 0),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__.split("\n")[0], run, rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
