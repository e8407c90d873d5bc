"""The store: migrations, compare-and-set transitions, fair and prioritised order."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd import store as store_module
from batchd.documents import JobOptions, decode_options
from batchd.models import JOB_ACTIVE, JobState, PartPlan, PartState
from batchd.store import Store


async def _job(store: Store, job_id: str, now: float, options: dict[str, object]) -> None:
    await store.insert_job(
        job_id=job_id,
        name=job_id,
        inbox_name=f"{job_id}.jsonl",
        inode=1,
        dev=1,
        spool_path=f"/spool/{job_id}/input.jsonl",
        kind="jsonl",
        options=decode_options(options),
        now=now,
    )
    assert await store.move_job(job_id, JobState.CLAIMING, JobState.CLAIMED)
    part = PartPlan(
        seq=1,
        path="p",
        first_line=1,
        requests=1,
        bytes=10,
        model="qwen-plus",
        endpoint="/v1/chat/completions",
        upload_name="u",
    )
    assert await store.plan_parts(job_id, [part], now)


async def test_migrations_bring_a_new_database_to_the_latest_version(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        async with store._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        assert row is not None and row[0] >= 8
        async with store._db.execute("PRAGMA integrity_check") as cur:
            check = await cur.fetchone()
        assert check is not None and check[0] == "ok"
    finally:
        await store.close()
    again = await Store.open(tmp_path / "db.sqlite3")  # reopening migrates nothing twice
    await again.close()


async def test_transitions_are_compare_and_set(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        await _job(store, "a", 1.0, {})
        (part,) = await store.parts_of("a")
        assert await store.move_part(part.id, PartState.PENDING, PartState.UPLOADING)
        # A second stage holding the old state cannot move the row again.
        assert not await store.move_part(part.id, PartState.PENDING, PartState.UPLOADING)
        assert not await store.plan_parts("a", [], 2.0)  # the job is no longer CLAIMED
    finally:
        await store.close()


async def test_parts_go_out_by_priority_then_age(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        await _job(store, "old", 1.0, {})
        await _job(store, "new-urgent", 3.0, {"priority": 5})
        await _job(store, "newer", 4.0, {})
        order = [p.job_id for p in await store.parts_in([PartState.PENDING])]
        assert order == ["new-urgent", "old", "newer"]
    finally:
        await store.close()


async def test_slot_holders_count_creating_and_running_per_model(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        for name in ("a", "b", "c"):
            await _job(store, name, 1.0, {})
        parts = await store.parts_in([PartState.PENDING])
        for source, target in (
            (PartState.PENDING, PartState.UPLOADING),
            (PartState.UPLOADING, PartState.UPLOADED),
            (PartState.UPLOADED, PartState.CREATING),
        ):
            assert await store.move_part(parts[0].id, source, target)
        assert await store.move_part(parts[1].id, PartState.PENDING, PartState.RUNNING)
        assert await store.slot_holders() == (2, {"qwen-plus": 2})
    finally:
        await store.close()


async def test_concurrent_writes_share_commits_and_each_is_durable_when_it_returns(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    commits: list[str] = []
    await store._db.set_trace_callback(
        lambda sql: commits.append(sql) if sql.startswith("COMMIT") else None
    )
    try:
        await asyncio.gather(*(_job(store, f"j{i}", float(i), {}) for i in range(40)))
        # 40 jobs of three writes each: the plans are transactions of their own (40), the
        # 80 inserts and claims share a few group commits.
        assert 41 <= len(commits) <= 50, len(commits)
        parts = [p for i in range(40) for p in await store.parts_of(f"j{i}")]
        commits.clear()

        async def move(part_id: int) -> None:
            assert await store.move_part(part_id, PartState.PENDING, PartState.UPLOADING)
            # Durable before the call returns: another connection sees it at once.
            with sqlite3.connect(tmp_path / "db.sqlite3") as other:
                row = other.execute("SELECT state FROM parts WHERE id = ?", (part_id,)).fetchone()
            assert row == ("uploading",)

        await asyncio.gather(*(move(p.id) for p in parts))
        assert len(commits) < len(parts)
    finally:
        await store.close()


async def test_a_failing_write_fails_alone_and_a_transaction_is_never_entered_by_others(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        await _job(store, "a", 1.0, {})
        (part,) = await store.parts_of("a")
        with pytest.raises(ValueError, match="not updatable"):
            await store.update_part(part.id, nonsense=1)
        # A duplicate key fails its own statement; the write beside it still commits.
        results = await asyncio.gather(
            _job(store, "a", 2.0, {}),
            store.move_part(part.id, PartState.PENDING, PartState.UPLOADING),
            return_exceptions=True,
        )
        assert isinstance(results[0], sqlite3.IntegrityError)
        assert results[1] is True
        # A plan that is refused (the job is not CLAIMED) rolls back only itself.
        refused, moved = await asyncio.gather(
            store.plan_parts("a", [], 3.0),
            store.move_part(part.id, PartState.UPLOADING, PartState.UPLOADED),
        )
        assert (refused, moved) == (False, True)
        assert (await store.parts_of("a"))[0].state == PartState.UPLOADED
    finally:
        await store.close()


# -- counts and lookups that answer without reading rows -----------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "db.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


def _plan(seq: int) -> PartPlan:
    return PartPlan(
        seq=seq,
        path=f"p{seq}",
        first_line=seq,
        requests=1,
        bytes=10,
        model="qwen-plus",
        endpoint="/v1/chat/completions",
        upload_name=f"u{seq}",
    )


async def test_any_jobs_says_whether_some_job_is_in_the_given_states(store: Store) -> None:
    assert not await store.any_jobs(JOB_ACTIVE)  # an empty database: drain may end
    await _job(store, "a", 1.0, {})
    assert await store.any_jobs(JOB_ACTIVE)
    assert not await store.any_jobs([JobState.PUBLISHED, JobState.PARKED])
    assert await store.move_job("a", JobState.RUNNING, JobState.PUBLISHING)
    assert await store.mark_published("a", None)
    assert not await store.any_jobs(JOB_ACTIVE)
    assert await store.any_jobs([JobState.PUBLISHED])


async def test_job_ids_in_lists_the_ids_oldest_first_as_jobs_does(store: Store) -> None:
    assert await store.job_ids_in([JobState.RUNNING]) == []
    await _job(store, "late", 2.0, {})
    await _job(store, "early", 1.0, {})
    await _job(store, "later", 3.0, {})
    assert await store.job_ids_in([JobState.RUNNING]) == ["early", "late", "later"]
    assert await store.job_ids_in([JobState.RUNNING], limit=2) == ["early", "late"]
    assert await store.job_ids_in([JobState.CLAIMED]) == []
    assert await store.job_ids_in([JobState.RUNNING]) == [
        j.id for j in await store.jobs([JobState.RUNNING])
    ]


async def test_part_rounds_counts_a_jobs_parts_and_finds_its_latest_round(store: Store) -> None:
    assert await store.part_rounds("nobody") == (0, None)
    await _job(store, "a", 1.0, {})
    await _job(store, "b", 2.0, {})
    assert await store.part_rounds("a") == (1, 0)
    await store.add_parts("a", [_plan(2), _plan(3)], 1)
    assert await store.part_rounds("a") == (3, 1)
    assert await store.part_rounds("b") == (1, 0)  # another job's parts are not counted


async def test_request_totals_sum_the_request_counts_of_a_jobs_parts(store: Store) -> None:
    assert await store.request_totals("nobody") == (0, 0)
    await _job(store, "a", 1.0, {})
    await _job(store, "b", 2.0, {})
    assert await store.request_totals("a") == (0, 0)  # nothing counted by the service yet
    await store.add_parts("a", [_plan(2), _plan(3)], 1)
    first, second, third = await store.parts_of("a")
    await store.update_part(first.id, request_counts={"total": 5, "completed": 4, "failed": 1})
    await store.update_part(second.id, request_counts={"total": 3, "completed": 3})
    await store.update_part(third.id, request_counts={"total": 2})
    (other,) = await store.parts_of("b")
    await store.update_part(other.id, request_counts={"total": 9, "completed": 9, "failed": 9})
    assert await store.request_totals("a") == (7, 1)


async def test_count_due_parts_counts_what_due_parts_would_read(store: Store) -> None:
    assert await store.count_due_parts(1e12) == 0
    for name in ("a", "b", "c"):
        await _job(store, name, 1.0, {})
    a, b, c = [p for name in ("a", "b", "c") for p in await store.parts_of(name)]
    await store.move_part(a.id, PartState.PENDING, PartState.RUNNING, next_poll_at=10.0)
    await store.move_part(b.id, PartState.PENDING, PartState.RUNNING, next_poll_at=20.0)
    await store.update_part(c.id, next_poll_at=0.0)  # pending: never polled
    assert [await store.count_due_parts(t) for t in (5.0, 10.0, 25.0)] == [0, 1, 2]
    assert len(await store.due_parts(25.0)) == await store.count_due_parts(25.0)


async def test_a_job_end_is_announced_once_with_its_deliveries(tmp_path: Path) -> None:
    """Queued in the transaction that marks the job announced; queued again under the same
    message id and target, nothing is added (a retry after a crash repeats nothing)."""
    from batchd.models import Delivery

    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        await _job(store, "a", 1.0, {})
        assert await store.jobs_to_announce() == []  # not published yet
        assert await store.move_job("a", JobState.RUNNING, JobState.PUBLISHING)
        assert await store.mark_published("a", None)
        (job,) = await store.jobs_to_announce()
        rows = [
            Delivery("msg_a_ended", target, "job.ended", "a", "{}", 5.0, 5.0)
            for target in ("http://x/hook", "command")
        ]
        await store.announce(job.id, rows)
        await store.announce(job.id, rows)
        assert await store.jobs_to_announce() == []
        queued = await store.deliveries_of("a")
        assert [(d.target, d.state, d.attempts) for d in queued] == [
            ("http://x/hook", "pending", 0),
            ("command", "pending", 0),
        ]
        assert await store.next_delivery_at() == 5.0
        assert [d.target for d in await store.due_deliveries(4.0)] == []
        await store.delivery_tried(
            queued[0].id,
            state="delivered",
            attempts=1,
            next_at=6.0,
            last_error=None,
            delivered_at=6.0,
        )
        assert [d.target for d in await store.due_deliveries(10.0)] == ["command"]
    finally:
        await store.close()


async def test_the_duplicate_guard_still_knows_jobs_recorded_before_requests_were_digested(
    tmp_path: Path,
) -> None:
    """A job published before the upgrade has only its bytes' sha256 (the new column is
    NULL): an input of the same bytes still finds it; a job digested since is found by
    its requests, whatever its bytes."""
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        for job_id, requests_sha256 in (("old", None), ("new", "r" * 64)):
            await _job(store, job_id, 1.0, {})
            job = await store.get_job(job_id)
            assert job is not None
            assert await store.move_job(
                job_id,
                job.state,
                JobState.PUBLISHING,
                sha256=f"{job_id}-bytes",
                requests_sha256=requests_sha256,
            )
            assert await store.mark_published(job_id, None, outcome="completed")
        old = await store.paid_twin("x" * 64, "old-bytes", "this")
        assert old is not None and old.id == "old"
        new = await store.paid_twin("r" * 64, "crlf-bytes", "this")
        assert new is not None and new.id == "new" and new.requests_sha256 == "r" * 64
        # The same bytes are the same requests, whichever side lacks a digest.
        again = await store.paid_twin(None, "new-bytes", "this")
        assert again is not None and again.id == "new"
        assert await store.paid_twin("y" * 64, "other-bytes", "this") is None
    finally:
        await store.close()


async def test_an_old_database_gets_retry_of_and_priority_columns_from_its_options(
    tmp_path: Path,
) -> None:
    """Migration 017 copies each job's `retry_of` and `priority` out of its options; the
    queries that read them then answer as they did from the JSON."""
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        for number, script in store_module._migrations():
            if number <= 16:
                db.executescript(script)
        db.execute("PRAGMA user_version = 16")
        rows = [
            ("root", {"priority": 1}),
            ("retry", {"retry_of": "root", "priority": 9}),
            ("plain", {}),
        ]
        for i, (job_id, options) in enumerate(rows):
            db.execute(
                "INSERT INTO jobs (id, name, inbox_name, spool_path, kind, state, options,"
                " created_at, updated_at) VALUES (?, ?, ?, '/x', 'jsonl', 'running', ?, ?, ?)",
                (job_id, job_id, f"{job_id}.jsonl", json.dumps(options), float(i), float(i)),
            )
    store = await Store.open(path)
    try:
        async with store._db.execute("SELECT id, retry_of, priority FROM jobs ORDER BY id") as cur:
            columns = [tuple(r) for r in await cur.fetchall()]
        assert columns == [("plain", None, None), ("retry", "root", 9), ("root", None, 1)]
        assert [j.id for j in await store.retries_of("root")] == ["retry"]
        assert await store.retried_by(["root", "plain"]) == {"root": ["retry"]}
        # Written with the options from then on, on insert and on update alike.
        await store.insert_job(
            job_id="new",
            name="new",
            inbox_name="new.jsonl",
            inode=1,
            dev=1,
            spool_path="/spool/new/input.jsonl",
            kind="jsonl",
            options=JobOptions(retry_of="plain", priority=2),
            now=5.0,
        )
        assert await store.retried_by(["plain"]) == {"plain": ["new"]}
        assert await store.update_job("new", JobState.CLAIMING, options=JobOptions(priority=7))
        async with store._db.execute("SELECT retry_of, priority FROM jobs WHERE id='new'") as cur:
            assert tuple(await cur.fetchone() or ()) == (None, 7)
    finally:
        await store.close()
