"""Time passed in: the stages decide on the clock they are given, so a decision that
waits for time is tested by moving a FakeClock, never by sleeping."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd.clock import (
    STEP_FILE_VARIABLE,
    SYSTEM_CLOCK,
    Clock,
    ClockWatch,
    FakeClock,
    SystemClock,
    iso_utc,
)
from batchd.config import ApiSettings, IntakeSettings, PollSettings, ProviderLimits, Settings
from batchd.documents import JobOptions, to_json
from batchd.models import JobState, Outcome, Part, PartPlan, PartState
from batchd.outbox.merge import MergeStats
from batchd.outbox.writer import build_summary
from batchd.pipeline.account import AccountState
from batchd.pipeline.intake import Intake
from batchd.pipeline.poll import Poller
from batchd.pipeline.problems import StepPolicy, step_failed
from batchd.pipeline.submit import Submitter
from batchd.provider.api import BatchApi
from batchd.provider.limits import RateLimiter
from batchd.provider.remote import TIME_KEYS, RemoteBatch
from batchd.store import Store

HOUR = 3600.0
# A poll stage that polls every minute, without jitter, retrieving batches one by one.
POLL_SETTINGS = Settings(poll=PollSettings(interval_s=60.0, jitter=0.0, list_threshold=20))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "db.sqlite3", clock)
    try:
        yield opened
    finally:
        await opened.close()


async def running_job(store: Store, clock: Clock) -> Part:
    """A job planned into one part, as the prepare stage leaves it (the part PENDING)."""
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
    plan = PartPlan(
        seq=1,
        path="p",
        first_line=1,
        requests=1,
        bytes=10,
        model="qwen-plus",
        endpoint="/v1/chat/completions",
        upload_name="u",
    )
    assert await store.plan_parts("j", [plan], clock.now())
    (part,) = await store.parts_of("j")
    return part


def unused_api() -> BatchApi:
    """A client that is never called (its session opens only on a first call)."""
    return BatchApi("http://127.0.0.1:9", "sk-unused", RateLimiter({}))


def test_a_fake_clock_stands_still_until_moved_and_never_goes_back() -> None:
    clock = FakeClock(now=100.0, monotonic=5.0)
    assert (clock.now(), clock.monotonic()) == (100.0, 5.0)
    clock.advance(2.5)
    assert (clock.now(), clock.monotonic()) == (102.5, 7.5)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1.0)
    assert isinstance(SYSTEM_CLOCK.now(), float) and SYSTEM_CLOCK.monotonic() > 0


async def test_the_store_stamps_its_records_with_the_clock_it_was_given(
    store: Store, clock: FakeClock
) -> None:
    events: list[dict[str, object]] = []
    store.listeners.append(events.append)
    await running_job(store, clock)
    clock.advance(42.0)
    assert await store.update_job("j", JobState.RUNNING, error="noted")
    job = await store.get_job("j")
    assert job is not None and job.updated_at == clock.now()
    assert events[-1]["at"] == clock.now()


async def test_a_failed_step_waits_out_its_pause_on_the_injected_clock(
    store: Store, clock: FakeClock
) -> None:
    part = await running_job(store, clock)
    policy = StepPolicy(max_failures=5, base_s=10.0, cap_s=600.0)
    settings = Settings(
        max_part_failures=5,
        api=ApiSettings(concurrency=1, step_retry_base_s=10.0, step_retry_cap_s=600.0),
    )
    submitter = Submitter(
        store,
        unused_api(),
        lambda: settings,
        ProviderLimits(),
        AccountState(clock=clock),
        on_created=lambda: None,
        clock=clock,
    )
    assert submitter.policy == policy
    assert not await step_failed(store, part, "a listing failed", policy, clock.now())
    paused = await store.get_part(part.id)
    assert paused is not None and paused.retry_at == clock.now() + 10.0
    # Not taken again before its pause is over; the stage sleeps exactly that long.
    assert await store.parts_in([PartState.PENDING], ready_at=clock.now()) == []
    assert await submitter.idle_s(60.0) == pytest.approx(10.0)
    clock.advance(9.0)
    assert await store.parts_in([PartState.PENDING], ready_at=clock.now()) == []
    assert await submitter.idle_s(60.0) == pytest.approx(1.0)
    clock.advance(1.0)
    assert [p.id for p in await store.parts_in([PartState.PENDING], ready_at=clock.now())] == [
        part.id
    ]


async def test_a_running_batch_is_never_lost_on_a_clock_difference_only_called_overdue(
    store: Store, clock: FakeClock
) -> None:
    """Issue 22: a wall clock stepped +31 h (NTP fixing a clock that was behind) once
    declared a running batch lost, and with `resubmit_failed` paid for its requests a
    second time. Only the service's word ends a batch now; the step moves no schedule."""
    part = await running_job(store, clock)
    assert await store.move_part(
        part.id,
        PartState.PENDING,
        PartState.RUNNING,
        batch_id="batch_1",
        intent_at=clock.now(),
        next_poll_at=clock.steady(),
    )
    poller = Poller(
        store,
        unused_api(),
        lambda: POLL_SETTINGS,
        AccountState(clock=clock),
        lost_after_s=lambda _part: 24 * HOUR + 6 * HOUR,
        on_ended=lambda: None,
        clock=clock,
    )
    # The server's own created_at is far in the past: it must not decide anything.
    batch = RemoteBatch.parse({"id": "batch_1", "status": "in_progress", "created_at": 1})

    clock.advance(60.0)
    clock.step(31 * HOUR)  # the wall clock alone jumps
    current = await store.get_part(part.id)
    assert current is not None
    assert await poller._apply(current, batch) == 0
    followed = await store.get_part(part.id)
    assert followed is not None and followed.state == PartState.RUNNING
    assert followed.remote_status == "in_progress" and followed.ended_at is None
    # Said, not acted on: overdue by an hour on the stepped wall clock.
    assert followed.error is not None and "overdue" in followed.error
    # The next look is an interval away on the steady clock, which the step did not move.
    assert followed.polled_at == clock.steady()
    assert followed.next_poll_at == clock.steady() + 60.0
    assert await poller.idle_s(600.0) == pytest.approx(60.0 + 60.0 / 6)

    clock.step(-1000 * HOUR)  # and back, far: nothing waits for the wall clock either
    assert await poller.idle_s(600.0) == pytest.approx(60.0 + 60.0 / 6)
    clock.advance(61.0)
    assert [p.id for p in await store.due_parts(clock.steady())] == [part.id]


def test_a_clock_watch_sees_steps_of_the_wall_clock_not_its_running() -> None:
    clock = FakeClock()
    watch = ClockWatch(clock)
    clock.advance(30.0)
    assert watch.check() is None
    clock.step(31 * HOUR)
    assert watch.check() == pytest.approx(31 * HOUR)
    assert watch.check() is None
    clock.step(-0.5)  # within the tolerance: a slew, not a step
    assert watch.check() is None
    clock.step(-2 * HOUR)
    assert watch.check() == pytest.approx(-2 * HOUR)


def test_the_steady_clock_reads_like_wall_time_and_ignores_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_file = tmp_path / "step"
    clock = SystemClock(step_file)
    before_wall, before_steady = clock.now(), clock.steady()
    assert abs(before_wall - before_steady) < 1.0
    step_file.write_text(str(31 * HOUR))
    os.utime(step_file, ns=(1, 1))  # the clock re-reads the file when it changes
    # It looks at the file at most every 20 ms (of the monotonic clock): move that on.
    monotonic = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: monotonic() + 0.05)
    assert clock.now() - before_wall == pytest.approx(31 * HOUR, abs=5.0)
    assert clock.steady() - before_steady < 5.0
    assert SystemClock.from_env({STEP_FILE_VARIABLE: str(step_file)}).now() > before_wall + HOUR
    assert abs(SystemClock.from_env({}).now() - time.time()) < 1.0


@pytest.mark.parametrize(
    ("at", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.3, "2023-11-14T22:13:20.300Z"),
        (1_700_000_000.9999, "2023-11-14T22:13:20.999Z"),  # cut, never rounded up
        (None, None),
        (-1.0, None),
        (float("nan"), None),
        (float("inf"), None),
        (1e20, None),
    ],
)
def test_a_moment_is_written_as_iso_8601_utc_to_the_millisecond(
    at: float | None, text: str | None
) -> None:
    assert iso_utc(at) == text


async def test_summary_timings_are_our_clock_and_the_services_times_are_apart(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    part = await running_job(store, clock)
    asked_at = clock.now()
    assert await store.move_part(
        part.id,
        PartState.PENDING,
        PartState.RUNNING,
        batch_id="batch_1",
        intent_at=asked_at,
        batch_created_at=asked_at,
        next_poll_at=clock.now(),
    )
    poller = Poller(
        store,
        unused_api(),
        lambda: POLL_SETTINGS,
        AccountState(clock=clock),
        lost_after_s=lambda _part: 24 * HOUR,
        on_ended=lambda: None,
        clock=clock,
    )
    # The service's clock is a day ahead, and one of its times is garbled.
    ahead = clock.now() + 24 * HOUR
    batch = RemoteBatch.parse(
        {
            "id": "batch_1",
            "status": "completed",
            "created_at": ahead,
            "completed_at": ahead + 90,
            "in_progress_at": "soon",
        }
    )
    clock.advance(120.0)
    current = await store.get_part(part.id)
    assert current is not None and await poller._apply(current, batch) == 1
    ended = await store.get_part(part.id)
    job = await store.get_job("j")
    assert ended is not None and job is not None
    assert ended.ended_at == clock.now()
    clock.advance(5.0)
    said = to_json(
        build_summary(
            job,
            [ended],
            MergeStats(total=1, completed=1),
            Outcome.COMPLETED,
            published_at=clock.now(),
        )
    )
    start = 1_700_000_000.0  # the FakeClock's start: 2023-11-14T22:13:20Z
    assert said["timings"] == {
        "claimed_at": "2023-11-14T22:13:20.000Z",
        "batches_created_at": ["2023-11-14T22:13:20.000Z"],
        "batches_ended_at": ["2023-11-14T22:15:20.000Z"],
        "published_at": "2023-11-14T22:15:25.000Z",
    }
    times = said["parts"][0]["provider_times"]
    assert set(times) == set(TIME_KEYS)
    assert times["created_at"] == iso_utc(start + 24 * HOUR) == "2023-11-15T22:13:20.000Z"
    assert times["completed_at"] == "2023-11-15T22:14:50.000Z"
    assert times["in_progress_at"] is None  # garbled: null, with a note on the part
    assert "in_progress_at ignored" in (ended.error or "")
    assert {v for k, v in times.items() if k not in ("created_at", "completed_at")} == {None}


async def test_an_inbox_file_is_claimed_once_still_for_the_settle_time_on_the_clock(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    inbox, spool = tmp_path / "inbox", tmp_path / "spool"
    inbox.mkdir()
    spool.mkdir()
    settings = Settings(
        intake=IntakeSettings(settle_s=5.0, unterminated_settle_s=30.0, suffixes=(".jsonl",))
    )
    intake = Intake(store, inbox, spool, lambda: settings, on_claimed=lambda: None, clock=clock)
    dropped = inbox / "a.jsonl"
    dropped.write_bytes(b'{"custom_id": "1"}\n')
    os.utime(dropped, (clock.now(), clock.now()))  # written "now" on the fake wall clock
    assert intake.scan() == []  # first seen: not settled yet
    assert intake.next_due == clock.monotonic() + 5.0
    clock.advance(4.0)
    assert intake.scan() == []
    clock.advance(1.0)
    # Settled; without a sidecar it waits settle_s more for one that may follow.
    assert intake.scan() == [] and "sidecar" in intake.waiting["a.jsonl"]
    assert intake.next_due == clock.monotonic() + 5.0
    clock.advance(5.0)
    assert [name for name, _st in intake.scan()] == ["a.jsonl"]
    assert await intake.run_once() == 1
    (job,) = await store.jobs()
    assert (job.state, job.created_at) == (JobState.CLAIMED, clock.now())
