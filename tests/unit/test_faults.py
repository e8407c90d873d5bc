"""A local fault is never a remote one: which errors are this machine's, the register
that shows them, and the store's writes that wait them out (issue 22)."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchd.clock import FakeClock
from batchd.documents import JobOptions
from batchd.faults import DATABASE, Faults, LocalFault, describe, local_cause
from batchd.models import JobState, Part, PartPlan, PartState
from batchd.pipeline.account import AccountState
from batchd.pipeline.collect import Fetched, decide_collect
from batchd.pipeline.problems import StepPolicy
from batchd.provider.api import ApiError
from batchd.store import Store
from batchd.testing import wait_for


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "db.sqlite3", clock, busy_timeout_s=0.05)
    try:
        yield opened
    finally:
        await opened.close()


def sqlite_error(code: int, text: str) -> sqlite3.Error:
    error = sqlite3.OperationalError(text)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only filesystem"),
        (OSError(errno.EIO, "Input/output error"), "disk I/O error"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
        (
            sqlite_error(5, "database is locked"),
            "the database is locked (another process holds it: a backup, a VACUUM?)",
        ),
        (sqlite_error(13, "database or disk is full"), "the database's disk is full"),
        (sqlite_error(10 | (3 << 8), "disk I/O error"), "disk I/O error on the database"),
        (LocalFault(OSError(errno.ENOSPC, "No space left on device")), "disk full"),
    ],
)
def test_errors_of_this_machine_are_told_apart(error: Exception, words: str) -> None:
    cause = local_cause(error)
    assert cause is not None and describe(cause) == words


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        FileNotFoundError(errno.ENOENT, "gone"),  # lost state: a pause brings it not back
        sqlite3.IntegrityError("UNIQUE constraint failed"),
        sqlite_error(11, "database disk image is malformed"),  # corrupt: no pause mends it
        ApiError("HTTP 500 InternalError", status=500),
        ValueError("a bug"),
    ],
)
def test_errors_of_the_work_or_the_provider_are_not_local(error: Exception) -> None:
    assert local_cause(error) is None


def test_a_local_fault_is_found_behind_what_it_caused() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as full:
            raise aiohttp.ClientOSError(errno.ENOSPC, "write failed") from full
    except aiohttp.ClientOSError as exc:
        caught: BaseException = exc
    cause = local_cause(ApiError("GET /files/f/content: ClientOSError"))
    assert cause is None
    assert local_cause(caught) is not None
    # A savepoint that cannot be rolled back because the disk rolled back the whole
    # transaction: the full disk is what happened.
    try:
        try:
            raise sqlite_error(13, "database or disk is full")
        except sqlite3.Error:
            raise sqlite_error(1, "no such savepoint: published") from None
    except sqlite3.Error as exc:
        chained: BaseException = exc
    chained.__context__ = sqlite_error(13, "database or disk is full")
    assert local_cause(chained) is not None


def test_the_register_names_the_folder_grows_the_pause_and_clears_when_healed(
    clock: FakeClock, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    faults = Faults(folders={"spool": spool, "state": tmp_path / "state"}, clock=clock)
    full = OSError(errno.ENOSPC, "No space left on device", str(spool / "j" / "output.jsonl"))
    assert [faults.met(full, "downloads") for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    (fault,) = faults.pausing()
    assert (fault.key, fault.what, fault.pauses, fault.count) == (
        "spool",
        "disk full",
        "downloads",
        4,
    )
    assert fault.since == clock.now()
    faults.met(full, "validation")
    assert fault.pauses == "downloads, validation"
    assert faults.area(sqlite_error(5, "locked")) == DATABASE
    assert (
        faults.area(OSError(errno.EIO, "x", str(tmp_path / "state" / "batchd.sqlite3-wal")))
        == DATABASE
    )
    assert faults.area(OSError(errno.EIO, "x")) == "disk"
    faults.healed_path(spool / "k" / "error.jsonl")
    assert faults.pausing() == [] and faults.met_total == {"spool": 5}
    assert faults.met(full, "downloads") == 1.0  # a new fault starts from the first pause
    # Not met again for three of its longest pauses: nothing waits for it any more.
    clock.advance(3 * faults.cap_s + 1)
    assert faults.pausing() == []


async def test_a_write_waits_out_another_process_holding_the_database(
    store: Store, tmp_path: Path
) -> None:
    """Before: SQLITE_BUSY once the busy timeout passed, raised into the stage, which
    died, and the daemon with it (exit 1)."""
    other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    write = asyncio.create_task(store.set_flag("backup", "held"))
    await wait_for(lambda: DATABASE in store.faults.active, 10, "the write waiting")
    (fault,) = store.faults.pausing()
    assert "locked" in fault.what and not write.done()
    # Reads go on meanwhile (WAL).
    assert await store.flag("backup") is None
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(write, 10)
    assert await store.flag("backup") == "held"
    assert store.faults.pausing() == []


async def test_a_write_waiting_for_the_database_gives_up_only_when_the_store_closes(
    tmp_path: Path, clock: FakeClock
) -> None:
    opened = await Store.open(tmp_path / "db.sqlite3", clock, busy_timeout_s=0.05)
    other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    write = asyncio.create_task(opened.set_flag("x", "1"))
    await wait_for(lambda: DATABASE in opened.faults.active, 10, "the write waiting")
    await asyncio.wait_for(opened.close(), 10)  # a stop: the write is given up, not hung
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await write
    other.execute("ROLLBACK")
    other.close()


def test_a_download_failing_in_an_outage_is_not_counted_toward_giving_its_file_up() -> None:
    values: dict[str, Any] = {name: None for name in Part.__dataclass_fields__}
    part = replace(Part(**values), id=1, seq=1, job_id="j", state=PartState.ENDED, attempts=1)
    policy = StepPolicy(max_failures=2, base_s=5.0, cap_s=60.0)
    failing = [Fetched("output", "file-1", transient="GET /files/file-1/content: reset")]
    waits = decide_collect(part, failing, policy, None, answering=False)
    assert not waits.done and waits.failures == 1 and waits.unavailable == {}
    assert waits.note is not None and "does not answer" in waits.note
    # The provider answers other calls: this file's failure is its own, and counts.
    counted = decide_collect(part, failing, policy, None, answering=True)
    assert counted.done and counted.failures == 2 and "output" in counted.unavailable


async def test_a_restart_pulls_in_what_a_step_back_pushed_far_ahead(
    store: Store, clock: FakeClock
) -> None:
    await store.insert_job(
        job_id="j",
        name="j",
        inbox_name="j.jsonl",
        inode=1,
        dev=1,
        spool_path="/spool/j/input.jsonl",
        kind="jsonl",
        options=JobOptions(),
        now=clock.now(),
        state=JobState.CLAIMED,
    )
    plans = [
        PartPlan(
            seq=n,
            path=f"p{n}",
            first_line=n,
            requests=1,
            bytes=10,
            model="qwen-plus",
            endpoint="/v1/chat/completions",
            upload_name=f"u{n}",
        )
        for n in (1, 2, 3)
    ]
    assert await store.plan_parts("j", plans, clock.now())
    one, two, three = await store.parts_of("j")
    now = clock.steady()
    # Scheduled by a run whose steady clock was 50 h ahead of this one's.
    await store.move_part(
        one.id, PartState.PENDING, PartState.RUNNING, next_poll_at=now + 50 * 3600
    )
    await store.update_part(two.id, PartState.PENDING, retry_at=now + 50 * 3600)
    # Caught mid-create by a run whose clock was behind: looked for after a settle wait.
    for source, target in (
        (PartState.PENDING, PartState.UPLOADING),
        (PartState.UPLOADING, PartState.UPLOADED),
        (PartState.UPLOADED, PartState.CREATING),
    ):
        assert await store.move_part(three.id, source, target)
    await store.update_part(three.id, PartState.CREATING, retry_at=now - 50 * 3600)
    moved = await store.reschedule(now, retry_within_s=600, poll_within_s=66, settle_s=10)
    assert moved == 2
    one, two, three = await store.parts_of("j")
    assert (one.next_poll_at, two.retry_at, three.retry_at) == (now + 66, now + 600, now + 10)


def test_an_answer_ends_an_outage_but_not_a_probes_verdict(clock: FakeClock) -> None:
    woken: list[str] = []
    account = AccountState(
        clock=clock, on_down=lambda: woken.append("down"), on_back=lambda: woken.append("back")
    )
    account.unreachable("HTTP 404 on the probe", silent=False)
    account.answered()
    assert account.provider_down is not None and not account.silent and woken == []
    account.unreachable("GET /batches: ClientConnectorError")
    assert account.silent and woken == ["down"]
    account.answered()
    assert account.provider_down is None and not account.silent and woken == ["down", "back"]
