"""Crash the daemon (SIGKILL) at every named fail point; after a restart the end state
equals the run without a crash: one remote batch per part, nothing lost, nothing
published twice, no remote file left behind (TESTING.md B.9).

`make test` kills once at each fail point. The soak variant (`make soak`) kills at each
fail point 10 times, at a different hit of it (the second upload, the third remote
delete...) and with a different input and emulator seed each time, and compares every
end state with a clean run of the same input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.config import StorageSettings
from batchd.emulator import Emulator
from batchd.failpoints import NAMES
from batchd.objstore import open_store
from batchd.objstore.bucket import Bucket
from batchd.objstore.location import BucketUrl
from batchd.testing import (
    DaemonProcess,
    StartEmulator,
    daemon_env,
    daemon_process,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)

MAX_REQUESTS_PER_FILE = 30
# How many times each fail point is surely reached in one run of a 2-part input whose
# requests all succeed: the soak kills at each of these hits in turn.
HITS = {
    "intake.before_rename": 1,
    "intake.after_rename": 1,
    "prepare.before_validate": 1,
    "upload.before_request": 2,
    "upload.after_request": 2,
    "create.before_request": 2,
    "create.after_request": 2,
    "poll.after_request": 1,
    "download.after_request": 2,  # one output file per part
    "publish.write": 1,
    "publish.fsync": 1,
    "publish.before_rename": 1,
    "publish.after_rename": 1,
    "cleanup.after_request": 4,  # the input and output file of each part
}
SOAK_RUNS = 10
# Fail points a plain run never reaches, each with the test that kills there.
ELSEWHERE = {
    "publish.merged": "test_a_kill_while_merging_a_retry_leaves_the_old_set_whole",
    # Reached only with the spool on a bucket and parts read from it (oss: inputs).
    "spool.after_write": "test_a_kill_between_a_part_write_and_its_record_creates_once",
    # Reached only with a bucket inbox.
    "intake.bucket.after_record": "test_a_kill_at_each_bucket_claim_step_claims_every_input_once",
    "intake.bucket.after_copy": "test_a_kill_at_each_bucket_claim_step_claims_every_input_once",
    "intake.bucket.after_delete": "test_a_kill_at_each_bucket_claim_step_claims_every_input_once",
    # The outbox on a bucket (a plain run here has a local outbox).
    "publish.after_member": "test_a_kill_between_bucket_members_publishes_once_and_whole",
    "publish.before_summary": "test_a_kill_between_bucket_members_publishes_once_and_whole",
}


def test_every_fail_point_is_counted_for_the_soak() -> None:
    assert set(HITS) | set(ELSEWHERE) == NAMES
    assert not set(HITS) & set(ELSEWHERE)
    assert all(name in globals() for name in ELSEWHERE.values())


async def _run(
    start_emulator: StartEmulator,
    root: Path,
    log: Path,
    *,
    count: int,
    seed: int,
    failpoint: str | None,
) -> tuple[Path, dict[str, Any]]:
    """Run `big.jsonl` (`count` requests) through a daemon that is first killed at
    `failpoint` (`NAME@N`), then restarted clean; returns its outbox folder and the
    emulator's stats once the remote clean-up is done."""
    emulator = await start_emulator(
        time_scale=3000, seed=seed, limits={"max_requests_per_file": MAX_REQUESTS_PER_FILE}
    )
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    (inbox / ".big.jsonl.tmp").write_bytes(requests(count))
    (inbox / ".big.jsonl.tmp").rename(inbox / "big.jsonl")
    env = daemon_env(
        emulator, root, BATCHD_LIMITS__MAX_REQUESTS_PER_FILE=str(MAX_REQUESTS_PER_FILE)
    )

    try:
        return await _crash_then_finish(emulator, root, log, failpoint, env)
    finally:
        await emulator.stop()


async def _crash_then_finish(
    emulator: Emulator, root: Path, log: Path, failpoint: str | None, env: dict[str, str]
) -> tuple[Path, dict[str, Any]]:
    if failpoint is not None:
        name, _, nth = failpoint.partition("@")
        crashing = await DaemonProcess.start(
            {**env, "BATCHD_FAILPOINTS": f"{name}=kill@{nth or 1}"}, log
        )

        async def advance_until_exit() -> int:
            while crashing.returncode is None:
                emulator.advance(60)
                try:
                    await asyncio.wait_for(crashing.wait(), 0.05)
                except TimeoutError:
                    pass
            return crashing.returncode

        code = await asyncio.wait_for(advance_until_exit(), 60)
        assert code == -signal.SIGKILL, f"{failpoint} was not reached: {log.read_text()[-2000:]}"
        with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    async with daemon_process(env, log) as clean:
        await wait_ready(root, clean)
        (folder,) = await wait_published(root / "outbox", 1, emulator, timeout_s=60)

        # Let the remote clean-up finish: nothing stored, nothing left to delete.
        async def cleaned() -> bool:
            stats = await emulator.stats()
            return stats["files_stored"]["count"] == 0 and _garbage(root) == 0

        await wait_for(cleaned, 10, "the remote clean-up done")
    stats = await emulator.stats()
    with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return folder, stats


def _garbage(root: Path) -> int:
    with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
        count: int = db.execute("SELECT count(*) FROM remote_garbage").fetchone()[0]
    return count


def _answer(line: dict[str, Any]) -> tuple[Any, ...]:
    """What a user reads in a result line; the ids the service makes up per batch aside."""
    body = (line.get("response") or {}).get("body") or {}
    choices = body.get("choices") or [{}]
    return (
        line["custom_id"],
        (line.get("response") or {}).get("status_code"),
        choices[0].get("message"),
        body.get("usage"),
    )


def end_state(folder: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """What must be the same whether the daemon crashed on the way or not."""
    s = summary(folder)
    per_file = stats["batches_created_per_input_file"]
    return {
        "outbox": sorted(p.name for p in folder.parent.iterdir()),
        "status": s["status"],
        "request_counts": s["request_counts"],
        "results": [_answer(r) for r in read_jsonl(folder / "result.jsonl")],
        "errors": (folder / "error.jsonl").read_bytes(),
        "parts": len(s["parts"]),
        # One remote batch per part, and no other.
        "batches_per_part": sorted(per_file.get(p["input_file_id"], 0) for p in s["parts"]),
        "batches_created": sum(per_file.values()),
        # Nothing left on the account.
        "files_stored": stats["files_stored"]["count"],
        "remote_deletes_pending": _garbage(folder.parent.parent),
    }


@pytest.mark.parametrize("failpoint", sorted(HITS))
async def test_kill_at_fail_point_then_restart_equals_a_clean_run(
    start_emulator: StartEmulator, tmp_path: Path, failpoint: str
) -> None:
    folder, stats = await _run(
        start_emulator,
        tmp_path / "root",
        tmp_path / "daemon.log",
        count=50,
        seed=0,
        failpoint=failpoint,
    )
    assert folder.name == "big"
    s = summary(folder)
    assert s["status"] == "completed"
    assert s["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
    assert [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] == [
        f"r{i}" for i in range(50)
    ]
    # One remote batch per part, and no other.
    assert len(s["parts"]) == 2
    per_file = stats["batches_created_per_input_file"]
    assert sorted(per_file) == sorted(p["input_file_id"] for p in s["parts"])
    assert set(per_file.values()) == {1}
    # Nothing left on the account, nothing half-published in the outbox.
    assert stats["files_stored"]["count"] == 0
    assert _garbage(tmp_path / "root") == 0
    assert [p.name for p in folder.parent.iterdir()] == ["big"]


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_kill_at_each_fail_point_ten_times_equals_a_clean_run(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    started = time.monotonic()
    clean: dict[int, dict[str, Any]] = {}
    for run in range(SOAK_RUNS):
        # Inputs of 31..60 requests: always two parts, split at a different line.
        count = 31 + (run * 7) % 30
        folder, stats = await _run(
            start_emulator,
            tmp_path / f"clean-{run}",
            tmp_path / f"clean-{run}.log",
            count=count,
            seed=run,
            failpoint=None,
        )
        clean[run] = end_state(folder, stats)
        assert clean[run]["status"] == "completed" and clean[run]["batches_per_part"] == [1, 1]
    mismatches: list[str] = []
    for name in sorted(HITS):
        for run in range(SOAK_RUNS):
            nth = 1 + run % HITS[name]
            count = 31 + (run * 7) % 30
            where = f"{name}@{nth}"
            folder, stats = await _run(
                start_emulator,
                tmp_path / f"{name}-{run}",
                tmp_path / f"{name}-{run}.log",
                count=count,
                seed=run,
                failpoint=where,
            )
            if end_state(folder, stats) != clean[run]:
                mismatches.append(f"{where} (run {run}, {count} requests)")
    kills = len(HITS) * SOAK_RUNS
    print(
        f"\nfail-point soak: {len(HITS)} fail points x {SOAK_RUNS} runs = {kills} kills;"
        f" {kills - len(mismatches)}/{kills} end states equal to the clean run"
        f" ({time.monotonic() - started:.0f} s)"
    )
    assert not mismatches, mismatches


async def test_a_claim_cut_before_its_rename_leaves_nothing_and_is_not_state_loss(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """A kill between the spool folder's creation and the input's rename leaves an empty
    folder (or one with only its claim record): removed at start-up, quietly; the input,
    still in the inbox, is claimed as usual."""
    from batchd.client import AsyncClient

    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    spool, inbox = settings.paths.folder("spool"), settings.paths.folder("inbox")
    bare, recorded = spool / "01a2200000000000beef", spool / "01a2200000000000cafe"
    bare.mkdir(parents=True)
    recorded.mkdir()
    (recorded / "claim.json").write_text('{"id": "01a2200000000000cafe", "kind": "jsonl"}')
    inbox.mkdir(parents=True)
    drop(inbox, "kept.jsonl", requests(1, prefix="kept-"))
    async with running_daemon(settings):
        await wait_published(settings.paths.folder("outbox"), 1, emulator)
        status = await AsyncClient(settings.socket_path).status()
    assert not bare.exists() and not recorded.exists()
    assert [p.kind for p in status.problems if p.kind == "state_lost"] == []
    assert status.healthy


async def test_a_kill_while_merging_a_retry_leaves_the_old_set_whole(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """A retry of a retry is killed between writing the chain's new merged set and linking
    it (`publish.merged`): the root's `merged/` is still the whole old set; after a
    restart it is the new one, and nothing half-written is left."""
    from batchd.client import Client

    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.5, seed=11)
    root = tmp_path / "root"
    inbox, outbox = root / "inbox", root / "outbox"
    drop(inbox, "big.jsonl", requests(30))
    env = daemon_env(emulator, root)
    log = tmp_path / "daemon.log"
    client = Client(root / "control.sock")

    async def retry_all(folder: Path) -> None:
        answer = await asyncio.to_thread(client.retry, summary(folder)["job_id"], everything=True)
        assert answer.ok, answer.message

    crashing = await DaemonProcess.start({**env, "BATCHD_FAILPOINTS": "publish.merged=kill@2"}, log)
    await wait_ready(root, crashing)
    (first,) = await wait_published(outbox, 1, emulator)
    await retry_all(first)
    await wait_published(outbox, 2, emulator)
    child = outbox / "big-retry-all"
    old = first / "merged"
    old_set = {p.name: p.read_bytes() for p in old.iterdir()}
    assert len(summary_of_merged(old)["jobs"]) == 2
    assert summary(child)["request_counts"]["failed"]  # the seed fails some again
    await retry_all(child)

    async def advance_until_exit() -> int:
        while crashing.returncode is None:
            emulator.advance(60)
            try:
                await asyncio.wait_for(crashing.wait(), 0.05)
            except TimeoutError:
                pass
        return crashing.returncode

    code = await asyncio.wait_for(advance_until_exit(), 60)
    assert code == -signal.SIGKILL, f"publish.merged was not reached: {log.read_text()[-2000:]}"
    # The old set, whole, under its name; the new one was written but never linked.
    assert {p.name: p.read_bytes() for p in old.iterdir()} == old_set
    async with daemon_process(env, log) as clean:
        await wait_ready(root, clean)
        await wait_published(outbox, 3, emulator)
        grandchild = outbox / "big-retry-all-retry-all"
        jobs = await wait_for(lambda: len(summary_of_merged(old)["jobs"]) == 3, 30, "merged again")
        assert jobs
    merged = summary_of_merged(old)
    assert [Path(j["outbox"]).name for j in merged["jobs"]] == [
        "big",
        "big-retry-all",
        grandchild.name,
    ]
    assert merged["request_counts"]["total"] == 30
    # One set on disk: the one linked.
    hidden = [p.name for p in first.iterdir() if p.name.startswith(".merged")]
    assert hidden == [os.readlink(old)]


def summary_of_merged(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((folder / "merged.json").read_bytes())
    return data


async def test_a_kill_between_a_part_write_and_its_record_creates_once(
    start_emulator: StartEmulator,
    tmp_path: Path,
    s3_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the spool on a bucket and parts read from it, the daemon is killed once a
    part is written to the bucket but before its oss: id is recorded
    (`spool.after_write`): after a restart the part's object is found whole (an input
    sent unsplit, whose object is the claimed input's) or written again, and its batch
    is created once; nothing is uploaded, and the job's objects go with its
    publication."""
    from batchd.config import StorageSettings
    from batchd.objstore import open_store
    from batchd.objstore.location import BucketUrl

    # The emulator (in this process) reads the store with the credentials of the
    # environment, as the daemon does.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store_settings = {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region}
    emulator = await start_emulator(
        time_scale=3000, object_store_url=s3_server.endpoint_url, oss_require_tag=False
    )
    root = tmp_path / "root"
    drop(root / "inbox", "small.jsonl", requests(2))
    spool = f"s3://{s3_server.bucket}/spool/"
    settings = {"paths": {"spool": spool}, "storage": store_settings, "jobs": {"input_via": "oss"}}
    env = {**daemon_env(emulator, root, settings), **s3_server.env()}
    log = tmp_path / "daemon.log"
    crashing = await DaemonProcess.start(
        {**env, "BATCHD_FAILPOINTS": "spool.after_write=kill"}, log
    )
    code = await asyncio.wait_for(crashing.wait(), 60)
    assert code == -signal.SIGKILL, f"spool.after_write was not reached: {log.read_text()[-2000:]}"
    async with open_store(StorageSettings(**store_settings), s3_server.env()) as objects:
        bucket = objects.bucket(BucketUrl("s3", s3_server.bucket, "spool/"), area="spool")
        written = [info.key async for info in bucket.list(recursive=True)]
        assert len(written) == 1 and written[0].endswith("/input.jsonl")
        assert (await emulator.stats())["calls"]["create"]["served"] == 0
        async with daemon_process(env, log) as clean:
            await wait_ready(root, clean)
            (folder,) = await wait_published(root / "outbox", 1, emulator)
        stats = await emulator.stats()
        assert stats["calls"]["create"]["served"] == 1
        assert stats["calls"]["upload"]["served"] == 0
        assert list(stats["batches_created_per_input_file"].values()) == [1]
        assert summary(folder)["request_counts"]["completed"] == 2
        assert [info.key async for info in bucket.list(recursive=True)] == []


BUCKET_CLAIM_STEPS = sorted(name for name in NAMES if name.startswith("intake.bucket."))


@pytest.mark.parametrize("failpoint", BUCKET_CLAIM_STEPS)
async def test_a_kill_at_each_bucket_claim_step_claims_every_input_once(
    start_emulator: StartEmulator, tmp_path: Path, s3_server: Any, failpoint: str
) -> None:
    """A bucket inbox's claim killed after each of its steps (intent recorded, object
    copied into the spool, deleted from the inbox): after a restart every input is in
    exactly one job and published once, none is left in the inbox, none lost."""
    from batchd.config import StorageSettings
    from batchd.objstore import open_store
    from batchd.objstore.location import BucketUrl

    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    url = BucketUrl("s3", s3_server.bucket, "inbox/")
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    inputs = {
        "a.jsonl": requests(3),
        "b.jsonl": requests(2),
        "b.meta.json": b'{"completion_window": "48h"}',
        "c.csv": b"custom_id,content\nc1,hello\n",
    }
    env = daemon_env(
        emulator,
        root,
        {
            "paths": {"inbox": str(url)},
            "storage": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region},
            "intake": {"rescan_interval_s": 0.2},
            "jobs": {"csv_model": "qwen-plus"},
        },
        **s3_server.env(),
    )
    log = tmp_path / "daemon.log"
    async with open_store(settings, s3_server.env()) as store:
        inbox = store.bucket(url)
        for name, content in inputs.items():
            await inbox.put_bytes(url.key(name), content)
        crashing = await DaemonProcess.start({**env, "BATCHD_FAILPOINTS": f"{failpoint}=kill"}, log)
        code = await asyncio.wait_for(crashing.wait(), 60)
        assert code == -signal.SIGKILL, f"{failpoint} was not reached: {log.read_text()[-2000:]}"
        async with daemon_process(env, log) as clean:
            await wait_ready(root, clean)
            folders = await wait_published(root / "outbox", 3, emulator, timeout_s=60)
        left = [info.key async for info in inbox.list(recursive=True)]
    assert [f.name for f in folders] == ["a", "b", "c"]
    assert summary(folders[1])["options"]["completion_window"] == "48h"
    assert [len(read_jsonl(f / "result.jsonl")) for f in folders] == [3, 2, 1]
    assert left == []
    with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
        jobs = sorted(db.execute("SELECT inbox_name, state FROM jobs").fetchall())
        claims = sorted(db.execute("SELECT inbox_key, step FROM inbox_claims").fetchall())
    assert jobs == [(n, "published") for n in ("a.jsonl", "b.jsonl", "c.csv")]
    assert claims == [(url.key(n), "claimed") for n in ("a.jsonl", "b.jsonl", "c.csv")]
    # Nothing left in the spool: no copy of a dropped claim, no folder of a second one.
    assert [p.name for p in (root / "spool").iterdir()] == []


# -- the outbox on a bucket --------------------------------------------------------------

BUCKET_MEMBERS = ["error.jsonl", "input.jsonl", "report.json", "result.csv", "result.jsonl"]


@contextlib.asynccontextmanager
async def _outbox_bucket(server: Any) -> AsyncIterator[Bucket]:
    settings = StorageSettings(endpoint_url=server.endpoint_url, region=server.region)
    async with open_store(settings, server.env()) as store:
        yield store.bucket(BucketUrl("s3", server.bucket, "outbox/"), area="outbox")


async def _keys(bucket: Bucket) -> list[str]:
    return [info.key async for info in bucket.list(recursive=True)]


async def _object(bucket: Bucket, key: str) -> bytes:
    raw = await bucket.get_bytes(key, max_bytes=1 << 24)
    assert raw is not None, f"{key} is not in the bucket"
    return raw


def _published(root: Path) -> int:
    with contextlib.closing(sqlite3.connect(root / "state" / "batchd.sqlite3")) as db:
        return int(db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'published'").fetchone()[0])


def _spool_jobs(root: Path) -> list[Path]:
    return [p for p in (root / "spool").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("point", ["publish.after_member=kill@2", "publish.before_summary=kill"])
async def test_a_kill_between_bucket_members_publishes_once_and_whole(
    start_emulator: StartEmulator, s3_server: Any, tmp_path: Path, point: str
) -> None:
    """The outbox on a bucket: killed after a member's PUT, or with every member but
    summary.json in the bucket, the folder has no summary.json (a reader takes it as not
    there) and the job's spool folder is kept; after a restart the folder is whole,
    under the same name, once."""
    emulator = await start_emulator(time_scale=3000, seed=3)
    root = tmp_path / "root"
    drop(root / "inbox", "big.jsonl", requests(20))
    env = {
        **daemon_env(emulator, root),
        **s3_server.env(),
        "BATCHD_PATHS__OUTBOX": f"s3://{s3_server.bucket}/outbox/",
        "BATCHD_STORAGE__ENDPOINT_URL": s3_server.endpoint_url,
        "BATCHD_STORAGE__REGION": s3_server.region,
    }
    log = tmp_path / "daemon.log"
    crashing = await DaemonProcess.start({**env, "BATCHD_FAILPOINTS": point}, log)

    async def advance_until_exit() -> int:
        while crashing.returncode is None:
            emulator.advance(60)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(crashing.wait(), 0.05)
        return crashing.returncode

    code = await asyncio.wait_for(advance_until_exit(), 90)
    assert code == -signal.SIGKILL, f"{point} was not reached: {crashing.log_tail()}"
    async with _outbox_bucket(s3_server) as bucket:
        cut = await _keys(bucket)
        # Cut short: some members, never summary.json; the job's input still in the spool.
        assert cut and all(k.startswith("outbox/big/") for k in cut)
        assert "outbox/big/summary.json" not in cut
        if point.startswith("publish.before_summary"):
            assert cut == [f"outbox/big/{m}" for m in BUCKET_MEMBERS]
        assert _spool_jobs(root)  # the job's spool folder (its results) is still there
        async with daemon_process(env, log) as clean:
            await wait_ready(root, clean)
            await wait_for(lambda: _published(root) >= 1, 60, "published", emulator=emulator)
            keys = await _keys(bucket)
        # One folder, whole, under the name it was given first.
        assert keys == [f"outbox/big/{m}" for m in sorted([*BUCKET_MEMBERS, "summary.json"])]
        done = orjson.loads(await _object(bucket, "outbox/big/summary.json"))
        assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
        assert (await _object(bucket, "outbox/big/result.jsonl")).count(b"\n") == 20
    assert _spool_jobs(root) == []
    assert list((root / "outbox").iterdir()) == []
