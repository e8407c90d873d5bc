"""The outbox on a bucket (`paths.outbox = "s3://B/outbox/"`), against a real S3-compatible
store on loopback and the emulator: each job's folder is `outbox/NAME/...`, summary.json
written last; a store that stops answering pauses publishing and loses nothing; the
readers (`batchd retry`, `merged/`, the client's `results`) read the folders there. A
kill between two members (redone after a restart, never published twice or half) is
tested with the other fail points, in test_crash_failpoints."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.client import AsyncClient, Client
from batchd.config import StorageSettings
from batchd.objstore import open_store
from batchd.objstore.bucket import Bucket
from batchd.objstore.location import BucketUrl
from batchd.pipeline.intake import bucket_published_ids
from batchd.testing import (
    StartEmulator,
    daemon_settings,
    drop,
    requests,
    running_daemon,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

MEMBERS = ["error.jsonl", "input.jsonl", "report.json", "result.csv", "result.jsonl"]


def _storage(server: Any) -> StorageSettings:
    return StorageSettings(endpoint_url=server.endpoint_url, region=server.region, max_attempts=1)


@contextlib.asynccontextmanager
async def _bucket(server: Any) -> AsyncIterator[Bucket]:
    async with open_store(_storage(server), server.env()) as store:
        yield store.bucket(BucketUrl("s3", server.bucket, "outbox/"), area="outbox")


async def _keys(bucket: Bucket) -> list[str]:
    return [info.key async for info in bucket.list(recursive=True)]


async def _json(bucket: Bucket, key: str) -> dict[str, Any]:
    raw = await bucket.get_bytes(key, max_bytes=1 << 24)
    assert raw is not None, f"{key} is not in the bucket"
    data: dict[str, Any] = orjson.loads(raw)
    return data


async def _jsonl(bucket: Bucket, key: str) -> list[dict[str, Any]]:
    raw = await bucket.get_bytes(key, max_bytes=1 << 24)
    assert raw is not None, f"{key} is not in the bucket"
    return [orjson.loads(line) for line in raw.splitlines() if line.strip()]


def _published(root: Path) -> int:
    path = root / "state" / "batchd.sqlite3"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            row = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'published'").fetchone()
        except sqlite3.Error:
            return 0
    return int(row[0])


def _bucket_settings(server: Any, root: Path) -> dict[str, Any]:
    return {
        "paths": {"root": root, "outbox": f"s3://{server.bucket}/outbox/"},
        "storage": {"endpoint_url": server.endpoint_url, "region": server.region},
    }


async def test_a_job_and_a_rejected_input_are_published_to_a_bucket_outbox(
    start_emulator: StartEmulator,
    s3_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.3, seed=5)
    root = tmp_path / "root"
    settings = daemon_settings(root, emulator, **_bucket_settings(s3_server, root))
    async with running_daemon(settings) as daemon, _bucket(s3_server) as bucket:
        # A name is taken on a bucket when its summary.json exists; objects under a name
        # without one are a publication cut short, and do not take it.
        await bucket.put_bytes("outbox/taken/summary.json", b'{"job_id": "someone-else"}')
        await bucket.put_bytes("outbox/free/result.jsonl", b"stale\n")
        drop(daemon.inbox, "good.jsonl", requests(12))
        drop(daemon.inbox, "bad.jsonl", b'{"custom_id": "a"}\nnot json\n')
        drop(daemon.inbox, "taken.jsonl", requests(2))
        drop(daemon.inbox, "free.jsonl", requests(2, prefix="f"))
        await wait_for(lambda: _published(root) >= 4, 60, "four jobs published", emulator=emulator)
        second = await _json(bucket, "outbox/taken-2/summary.json")
        assert second["follows"] == {"folder": "taken", "job_id": "someone-else"}
        free = await _json(bucket, "outbox/free/summary.json")
        assert free["folder"] == "free" and free["request_counts"]["total"] == 2
        written = await bucket.get_bytes("outbox/free/result.jsonl", max_bytes=1 << 20)
        assert written is not None and b"stale" not in written
        keys = await _keys(bucket)
        assert [k for k in keys if k.startswith("outbox/good/")] == [
            f"outbox/good/{m}" for m in sorted([*MEMBERS, "summary.json"])
        ]
        good = await _json(bucket, "outbox/good/summary.json")
        assert good["folder"] == "good" and good["request_counts"]["total"] == 12
        results = await _jsonl(bucket, "outbox/good/result.jsonl")
        errors = await _jsonl(bucket, "outbox/good/error.jsonl")
        assert len(results) + len(errors) == 12 and errors  # the seed fails some
        assert len(results) == good["request_counts"]["completed"]
        csv = await bucket.get_bytes("outbox/good/result.csv", max_bytes=1 << 20)
        assert csv is not None and csv.count(b"\n") == 13

        # A rejected input: its report, its lines in error.jsonl, its copy, its summary.
        bad = await _json(bucket, "outbox/bad/summary.json")
        assert bad["status"] == "rejected"
        assert (await _json(bucket, "outbox/bad/report.json"))["valid"] is False
        assert [e["input_line"] for e in await _jsonl(bucket, "outbox/bad/error.jsonl")] == [1, 2]
        assert "outbox/bad/input.jsonl" in keys

        # What orphan recovery at start takes as published: each folder with its
        # summary.json; a folder cut short (no summary.json) is not one.
        await bucket.put_bytes("outbox/cut/result.jsonl", b"")
        assert await bucket_published_ids(daemon.buckets["outbox"]) == {
            good["job_id"],
            bad["job_id"],
            second["job_id"],
            free["job_id"],
            "someone-else",
        }

        # Nothing is left in the local working outbox, nor in the spool.
        assert list(daemon.outbox.iterdir()) == []
        assert [p for p in daemon.spool.iterdir() if not p.name.startswith(".")] == []

        # The job records the folder's URL; the client reads its results from there.
        job_id = good["job_id"]
        client = AsyncClient(settings.socket_path, storage=_storage(s3_server))
        job = await client.job(job_id)
        assert job.outbox == f"s3://{s3_server.bucket}/outbox/good/"
        rows = [row async for row in client.results(job_id)]
        assert [r["custom_id"] for r in rows] == [f"r{i}" for i in range(12)]
        assert sum("error" in r for r in rows) == len(errors)
        sync = Client(settings.socket_path, storage=_storage(s3_server))
        assert await asyncio.to_thread(lambda: list(sync.results(job_id))) == rows
        status = await client.status()
        assert status.outbox == f"s3://{s3_server.bucket}/outbox/"


async def test_a_store_that_stops_answering_pauses_publishing_and_loses_nothing(
    start_emulator: StartEmulator,
    s3_faulty: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in s3_faulty.env().items():
        monkeypatch.setenv(key, value)
    emulator = await start_emulator(time_scale=3000, seed=4)
    root = tmp_path / "root"
    values = _bucket_settings(s3_faulty, root)
    values["storage"]["max_attempts"] = 1
    settings = daemon_settings(root, emulator, **values)
    # Every write to the store fails (503 SlowDown), as in an outage.
    s3_faulty.set_faults(error_rate=1.0, methods=["PUT", "POST"])
    async with running_daemon(settings) as daemon, _bucket(s3_faulty) as bucket:
        drop(daemon.inbox, "q.jsonl", requests(5))

        def paused() -> bool:
            return any(f.key == "outbox" for f in daemon.faults.pausing())

        await wait_for(paused, 60, "the outbox's fault shown", emulator=emulator)
        (fault,) = [f for f in daemon.faults.pausing() if f.key == "outbox"]
        assert "SlowDown" in fault.detail or "503" in fault.what, fault
        (job,) = await daemon.store.jobs()
        assert job.state == "publishing" and job.crash_count == 0
        assert Path(job.spool_path).is_file()  # the results are still here
        s3_faulty.set_faults(error_rate=0.0)
        assert not any(k.endswith("summary.json") for k in await _keys(bucket))
        await wait_for(lambda: _published(root) >= 1, 60, "published after the outage")
        keys = await _keys(bucket)
        assert keys == [f"outbox/q/{m}" for m in sorted([*MEMBERS, "summary.json"])]
        assert len(await _jsonl(bucket, "outbox/q/result.jsonl")) == 5
        assert not Path(job.spool_path).exists()
        await wait_for(lambda: not paused(), 30, "the fault cleared")


async def test_retry_and_merged_read_and_write_a_bucket_outbox(
    start_emulator: StartEmulator,
    s3_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.5, seed=11)
    root = tmp_path / "root"
    settings = daemon_settings(root, emulator, **_bucket_settings(s3_server, root))
    async with running_daemon(settings) as daemon, _bucket(s3_server) as bucket:
        drop(daemon.inbox, "big.jsonl", requests(30))
        await wait_for(lambda: _published(root) >= 1, 60, "published", emulator=emulator)
        first = await _json(bucket, "outbox/big/summary.json")
        failed = first["request_counts"]["failed"]
        assert failed
        client = AsyncClient(settings.socket_path, storage=_storage(s3_server))
        answer = await client.retry(first["job_id"], everything=True)
        assert answer.ok and "big-retry-all.jsonl" in answer.message, answer.message
        await wait_for(lambda: _published(root) >= 2, 60, "the retry published", emulator=emulator)
        child = await _json(bucket, "outbox/big-retry-all/summary.json")
        assert child["retry_of"] == first["job_id"]
        assert child["request_counts"]["total"] == failed
        merged = await _json(bucket, "outbox/big/merged/merged.json")
        url = f"s3://{s3_server.bucket}/outbox/"
        assert [j["outbox"] for j in merged["jobs"]] == [f"{url}big/", f"{url}big-retry-all/"]
        assert merged["input"] == f"{url}big/input.jsonl"
        counts = merged["request_counts"]
        assert counts["total"] == 30
        assert (
            counts["completed"]
            == first["request_counts"]["completed"] + (child["request_counts"]["completed"])
        )
        ok = await _jsonl(bucket, "outbox/big/merged/result.jsonl")
        still = await _jsonl(bucket, "outbox/big/merged/error.jsonl")
        assert len(ok) == counts["completed"] and len(still) == counts["failed"]
        shown = await client.job(first["job_id"])
        assert shown.merged == f"{url}big/merged/"
        # Nothing of the work is left in the local working outbox.
        assert list(daemon.outbox.iterdir()) == []
