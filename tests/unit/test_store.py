"""The store: migrations, compare-and-set transitions, fair and prioritised order."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from batchd.models import JobState, PartPlan, PartState
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
        options=options,
        now=now,
    )
    assert await store.update_job(job_id, JobState.CLAIMING, state=JobState.CLAIMED)
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
        assert await store.update_part(part.id, PartState.PENDING, state=PartState.UPLOADING)
        # A second stage holding the old state cannot move the row again.
        assert not await store.update_part(part.id, PartState.PENDING, state=PartState.UPLOADING)
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
        await store.update_part(parts[0].id, state=PartState.CREATING)
        await store.update_part(parts[1].id, state=PartState.RUNNING)
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
            assert await store.update_part(part_id, PartState.PENDING, state=PartState.UPLOADING)
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
            store.update_part(part.id, PartState.PENDING, state=PartState.UPLOADING),
            return_exceptions=True,
        )
        assert isinstance(results[0], sqlite3.IntegrityError)
        assert results[1] is True
        # A plan that is refused (the job is not CLAIMED) rolls back only itself.
        refused, moved = await asyncio.gather(
            store.plan_parts("a", [], 3.0),
            store.update_part(part.id, PartState.UPLOADING, state=PartState.UPLOADED),
        )
        assert (refused, moved) == (False, True)
        assert (await store.parts_of("a"))[0].state == PartState.UPLOADED
    finally:
        await store.close()
