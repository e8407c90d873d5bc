"""Producers and disks that misbehave (issue 12): a file still written after its claim,
a sparse or oversized file, a process out of file descriptors, an inbox that fills with
refused names. Nothing is lost, nothing sent that was not validated, and the daemon
stays up saying what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd.models import JobState
from batchd.store import Store
from batchd.testing import (
    StartEmulator,
    bare_intake,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

pytestmark = pytest.mark.timeout(60)


async def test_lines_appended_after_the_claim_and_before_upload_are_validated_and_sent(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """A producer pauses longer than the settle time after a complete line, the file is
    claimed, then the producer appends more lines through its open handle. The change is
    seen before anything is uploaded; the job is validated again and every line sent."""
    emulator = await start_emulator(
        time_scale=3000, faults={"throttle_rate": 1.0, "classes": ["upload"]}
    )
    settings = daemon_settings(tmp_path / "root", emulator, api={"max_attempts": 1})
    first, more = requests(3, prefix="a"), requests(3, prefix="b")
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "growing.jsonl", first)

        async def planned() -> object:
            jobs = await daemon.store.jobs([JobState.RUNNING])
            return jobs[0] if jobs else None

        job = await wait_for(planned)
        # The producer's handle now points into the spool: it goes on writing there.
        append(Path(job.spool_path), more)
        emulator.set_faults(throttle_rate=0.0)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        (final,) = await daemon.store.jobs()
    s = summary(folder)
    assert s["status"] == "completed"
    assert s["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] == [
        "a0", "a1", "a2", "b0", "b1", "b2",
    ]  # fmt: skip
    # Validated twice, the change seen once (before the upload).
    assert final.prepares == 1 and final.bytes == len(first + more)
    assert s["input"]["bytes"] == len(first + more)
    assert (await emulator.stats())["calls"]["upload"]["served"] == 1


async def test_a_bad_line_appended_after_the_claim_is_never_sent(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """What is sent is what was validated: a line appended after the claim that breaks
    the file is caught by validating again, and nothing of the job is uploaded."""
    emulator = await start_emulator(
        time_scale=3000, faults={"throttle_rate": 1.0, "classes": ["upload"]}
    )
    settings = daemon_settings(tmp_path / "root", emulator, api={"max_attempts": 1})
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "broken.jsonl", requests(3))

        async def planned() -> object:
            jobs = await daemon.store.jobs([JobState.RUNNING])
            return jobs[0] if jobs else None

        job = await wait_for(planned)
        append(Path(job.spool_path), b"this is not json\n")
        emulator.set_faults(throttle_rate=0.0)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    s = summary(folder)
    assert s["status"] == "rejected"
    # Every line is listed, the valid ones as not sent for the bad one's sake.
    errors = read_jsonl(folder / "error.jsonl")
    assert [(e["input_line"], e["custom_id"], e["error"]["code"]) for e in errors] == [
        (1, "r0", "not_submitted"),
        (2, "r1", "not_submitted"),
        (3, "r2", "not_submitted"),
        (4, None, "invalid_json"),
    ]
    assert "line 4: invalid_json" in errors[0]["error"]["message"]
    assert s["request_counts"] == {"total": 4, "completed": 0, "failed": 4}
    assert s["never_run"] == 4
    assert (await emulator.stats())["calls"]["upload"]["served"] == 0


def append(path: Path, data: bytes) -> None:
    """Write at the end of a file, as a producer holding it open does."""
    with path.open("ab") as handle:
        handle.write(data)


async def test_a_sparse_file_is_rejected_on_its_size_before_it_is_read(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """An 8 GiB sparse `.jsonl` (holes, no text) is rejected from its size and blocks
    alone: never hashed or parsed, and the owner gets the report."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox = settings.paths.folder("inbox")
    inbox.mkdir(parents=True)
    tmp = inbox / ".holes.jsonl.tmp"
    with tmp.open("wb") as fh:
        fh.truncate(8 << 30)
        fh.seek((8 << 30) - 1)
        fh.write(b"\n")  # ends like a finished file, so it is claimed at once
    tmp.rename(inbox / "holes.jsonl")
    async with running_daemon(settings):
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    s = summary(folder)
    assert s["status"] == "rejected"
    assert s["input"]["sha256"] is None  # never read, not even hashed
    (error,) = read_jsonl(folder / "error.jsonl")
    assert error["error"]["code"] == "sparse_file"
    assert "not read" in error["error"]["message"]


async def test_an_input_over_max_input_bytes_is_rejected_unread(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator, jobs={"max_input_bytes": 1000})
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "big.jsonl", requests(20))
        drop(settings.paths.folder("inbox"), "small.jsonl", requests(2))
        folders = await wait_published(settings.paths.folder("outbox"), 2, emulator)
    big, small = (summary(f) for f in folders)
    assert big["status"] == "rejected" and big["input"]["sha256"] is None
    (error,) = read_jsonl(folders[0] / "error.jsonl")
    assert error["error"]["code"] == "input_too_large"
    assert "max_input_bytes (1000)" in error["error"]["message"]
    assert small["status"] == "completed"
    assert (await emulator.stats())["calls"]["upload"]["served"] == 1


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """Use up this process's file descriptors (EMFILE) for the block's duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 32, hard))
    held: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_intake_out_of_file_descriptors_says_so_and_recovers(tmp_path: Path) -> None:
    """EMFILE while scanning the inbox is not a crash: intake reports the problem (status
    shows it, unhealthy) and claims the file once descriptors are free again."""
    store = await Store.open(tmp_path / "state" / "batchd.sqlite3")
    inbox, spool = tmp_path / "inbox", tmp_path / "spool"
    spool.mkdir()
    try:
        intake = bare_intake(store, inbox, spool)
        drop(inbox, "waiting.jsonl", requests(2))
        with descriptors_exhausted():
            assert await intake.run_once() == 0
        assert intake.problem is not None and "Too many open files" in intake.problem
        assert await intake.run_once() == 0  # seen now; settles by the next scan
        assert await intake.run_once() == 1
        assert intake.problem is None
        (job,) = await store.jobs()
        assert job.state == JobState.CLAIMED and job.name == "waiting"
    finally:
        await store.close()


async def test_refused_names_are_forgotten_once_gone(tmp_path: Path) -> None:
    """Each refused entry is logged once, and forgotten when it leaves the inbox: the
    memory it takes is bounded by what the inbox holds, not by what it ever held."""
    store = await Store.open(tmp_path / "state" / "batchd.sqlite3")
    inbox, spool = tmp_path / "inbox", tmp_path / "spool"
    inbox.mkdir()
    spool.mkdir()
    try:
        intake = bare_intake(store, inbox, spool)
        for round_ in range(5):
            for i in range(200):
                (inbox / f"dir-{round_}-{i}.jsonl").mkdir()
                (inbox / f"notes-{round_}-{i}.txt").write_bytes(b"x")
            await asyncio.to_thread(intake.scan)
            assert len(intake._refused) == 400
            for entry in list(inbox.iterdir()):
                entry.rmdir() if entry.is_dir() else entry.unlink()
            await asyncio.to_thread(intake.scan)
            assert len(intake._refused) == 0
    finally:
        await store.close()
