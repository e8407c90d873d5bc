"""The stages' pure deciders, with plain values and no clock: what a job's final status
is, when a part is polled next, when a running batch counts as lost, when an inbox entry
settles, how long a failed publish waits, which part an input line went to."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from typing import Any

import pytest

from batchd.documents import JobOptions
from batchd.models import Job, JobState, Outcome, Part, PartState
from batchd.outbox.merge import MergeStats, part_for
from batchd.outbox.writer import decide_outcome
from batchd.pipeline.intake import Seen, settled, settles_at
from batchd.pipeline.poll import next_poll, overdue
from batchd.pipeline.publish import retry_delay_s


def record(cls: type[Any], **fields: Any) -> Any:
    """A Job or Part with None/0 defaults and the given fields."""
    values: dict[str, Any] = {name: None for name in cls.__dataclass_fields__}
    values.update(fields)
    return cls(**values)


JOB: Job = record(
    Job,
    id="j",
    name="n",
    inbox_name="n.jsonl",
    spool_path="s",
    kind="jsonl",
    state=JobState.PUBLISHING,
    options=JobOptions(),
    cancel_requested=False,
    crash_count=0,
    created_at=0.0,
    updated_at=0.0,
    completed=0,
    failed=0,
    prepares=0,
)


def part(seq: int, first_line: int, model: str = "m", status: str = "completed") -> Part:
    result: Part = record(
        Part,
        id=seq,
        job_id="j",
        seq=seq,
        path="p",
        first_line=first_line,
        requests=1,
        bytes=1,
        model=model,
        endpoint="/v1/chat/completions",
        state=PartState.COLLECTED,
        upload_name="u",
        remote_status=status,
        attempts=0,
        round=0,
        adopt=False,
    )
    return result


def stats(total: int, completed: int) -> MergeStats:
    return MergeStats(total=total, completed=completed, failed=total - completed)


@pytest.mark.parametrize(
    ("statuses", "cancelled", "total", "completed", "outcome"),
    [
        (["completed"], False, 3, 3, Outcome.COMPLETED),
        (["completed"], False, 3, 2, Outcome.PARTIAL),
        (["completed"], False, 3, 0, Outcome.FAILED),
        (["completed", "expired"], False, 3, 2, Outcome.EXPIRED),
        (["completed", "cancelled"], False, 3, 1, Outcome.CANCELLED),
        (["completed"], True, 3, 1, Outcome.CANCELLED),
        (["cancelled"], True, 3, 3, Outcome.COMPLETED),  # everything ran before the cancel
        (["failed"], False, 2, 0, Outcome.FAILED),
    ],
)
def test_the_final_status_of_a_job(
    statuses: list[str], cancelled: bool, total: int, completed: int, outcome: Outcome
) -> None:
    parts = [part(i + 1, i + 1, status=s) for i, s in enumerate(statuses)]
    job = replace(JOB, cancel_requested=cancelled)
    assert decide_outcome(job, parts, stats(total, completed)) is outcome


def test_a_poll_falls_about_an_interval_away_spread_by_its_jitter() -> None:
    rng = random.Random(1)
    times = [next_poll(1000.0, 60.0, 0.1, rng) for _ in range(500)]
    assert all(1054.0 <= t <= 1066.0 for t in times)
    assert max(times) - min(times) > 6.0  # spread, not bunched
    assert next_poll(1000.0, 60.0, 0.0, rng) == 1060.0


def test_a_batch_past_its_window_is_only_called_overdue_counted_from_our_own_intent() -> None:
    running = replace(part(1, 1), state=PartState.RUNNING, intent_at=1000.0)
    assert overdue(running, now=1100.0, lost_after_s=100.0) is None
    assert overdue(running, now=1100.0 + 1800.0, lost_after_s=100.0) == 0.5
    # The server's created_at counts only when no intent was recorded (an old row)...
    old = replace(running, intent_at=None, created_remote_at=2000.0)
    assert overdue(old, now=2050.0, lost_after_s=100.0) is None
    assert overdue(old, now=2100.0 + 3600.0, lost_after_s=100.0) == 1.0
    # ...and with neither, nothing is known: never overdue.
    unknown = replace(running, intent_at=None, created_remote_at=None)
    assert overdue(unknown, now=1e12, lost_after_s=0.0) is None


def stat_of(ino: int = 1, size: int = 10, mtime: float = 100.0) -> os.stat_result:
    return os.stat_result((0o100644, ino, 0, 1, 0, 0, size, 0, int(mtime), 0))


def test_an_entry_settles_once_unchanged_and_unmodified_for_the_settle_time() -> None:
    st = stat_of(mtime=100.0)
    seen = Seen(ino=1, size=10, mtime_ns=st.st_mtime_ns, since=50.0)
    # Loop time 50 is wall time 100 here: both clocks must agree it has been still.
    assert not settled(seen, st, now=51.0, wall_now=101.0, settle_s=2.0)
    assert settled(seen, st, now=52.0, wall_now=102.0, settle_s=2.0)
    assert settles_at(seen, st, now=51.0, wall_now=101.0, settle_s=2.0) == 52.0
    # Modified later than first seen (mtime 105): the mtime decides.
    late = stat_of(mtime=105.0)
    seen_late = Seen(ino=1, size=10, mtime_ns=late.st_mtime_ns, since=50.0)
    assert not settled(seen_late, late, now=53.0, wall_now=103.0, settle_s=2.0)
    assert settles_at(seen_late, late, now=53.0, wall_now=103.0, settle_s=2.0) == 57.0
    # Any change of size or inode starts the wait again.
    assert not settled(seen, stat_of(size=11, mtime=100.0), 60.0, 110.0, 2.0)
    assert not settled(seen, stat_of(ino=2, mtime=100.0), 60.0, 110.0, 2.0)
    # The wall clock stepped back an hour after the file was written (its mtime is far
    # ahead of the clock): the scans' own count decides, nobody waits for the clock.
    assert not settled(seen, st, now=51.0, wall_now=100.0 - 3600 + 1.0, settle_s=2.0)
    assert settled(seen, st, now=52.0, wall_now=100.0 - 3600 + 2.0, settle_s=2.0)
    assert settles_at(seen, st, now=51.0, wall_now=100.0 - 3600 + 1.0, settle_s=2.0) == 52.0


def test_a_failed_publish_waits_longer_each_time_up_to_the_cap() -> None:
    assert [retry_delay_s(n, 1.0, 300.0) for n in (0, 1, 2, 3, 9, 10, 1000)] == [
        1.0, 1.0, 2.0, 4.0, 256.0, 300.0, 300.0,
    ]  # fmt: skip


def test_an_input_line_is_found_in_the_part_that_holds_it() -> None:
    parts = [part(1, 1), part(2, 11), part(3, 21)]
    assert [part_for(parts, n, "m").seq for n in (1, 10, 11, 20, 21, 99)] == [1, 1, 2, 2, 3, 3]
    # Grouped by model: each model's parts hold that model's lines, in order.
    grouped = [part(1, 1, "a"), part(2, 2, "b"), part(3, 7, "a")]
    assert [part_for(grouped, n, "a").seq for n in (1, 3, 7, 9)] == [1, 1, 3, 3]
    assert part_for(grouped, 5, "b").seq == 2
    assert part_for(grouped, 5, "unknown").seq == 2  # any part, rather than none


def test_error_code_reads_the_services_error_or_the_failed_response() -> None:
    from batchd.outbox.failures import error_code

    assert error_code({"error": {"code": "batch_expired", "message": "x"}}) == "batch_expired"
    refused = {
        "error": None,
        "response": {"status_code": 400, "body": {"error": {"code": "DataInspectionFailed"}}},
    }
    assert error_code(refused) == "DataInspectionFailed"
    as_text = {"response": {"body": '{"error": {"code": "InternalError"}}'}}
    assert error_code(as_text) == "InternalError"
    assert error_code({"response": None}) is None
