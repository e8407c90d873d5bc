"""A disk that fails while a job is published (TESTING.md B.11).

The write or the fsync of the job's temp folder fails with EIO or ENOSPC (fail points
`publish.write` and `publish.fsync`): nothing partial becomes visible in the outbox, the
temp folder is removed, the error is logged with the job, the daemon stays up and tries
again after a growing pause, and the job is published once, whole, when the disk works
again. A disk error is not the job's fault: it never counts towards parking the job.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd import failpoints
from batchd.daemon import Daemon
from batchd.models import JobState
from batchd.testing import (
    StartEmulator,
    daemon_settings,
    drop,
    events,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoints.arm("")


def visible(outbox: Path) -> list[str]:
    return sorted(p.name for p in outbox.iterdir() if not p.name.startswith("."))


def hidden(outbox: Path) -> list[str]:
    return sorted(p.name for p in outbox.iterdir() if p.name.startswith("."))


def fast_retries(daemon: Daemon) -> None:
    # The pause before a new attempt starts at 1 s in service; 50 ms doubling to 400 ms
    # keeps the test short while still showing the pauses grow.
    daemon.publisher.retry_base_s = 0.05
    daemon.publisher.retry_cap_s = 0.4


@pytest.mark.parametrize(
    ("point", "action"),
    [
        ("publish.write", "eio"),
        ("publish.write", "enospc"),
        ("publish.fsync", "eio"),
        ("publish.fsync", "enospc"),
    ],
)
async def test_a_failing_disk_publishes_nothing_partial_and_the_job_once_it_clears(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    point: str,
    action: str,
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    outbox = settings.paths.folder("outbox")
    inbox = settings.paths.folder("inbox")
    # Only the job named `stuck` meets the failing disk; `fine` shows the daemon goes on.
    failpoints.arm(f"{point}={action}:stuck")
    async with running_daemon(settings) as daemon:
        fast_retries(daemon)
        drop(inbox, "stuck.jsonl", requests(3))
        drop(inbox, "fine.jsonl", requests(2))
        await wait_published(outbox, 1, emulator)

        # Several attempts fail; between them nothing of `stuck` is in the outbox.
        samples = 0

        def failed_five_times() -> bool:
            nonlocal samples
            assert visible(outbox) == ["fine"]
            samples += 1
            return len(events(log_lines, "publish_failed")) >= 5

        await wait_for(
            failed_five_times,
            60,
            "five failed publishes",
            step_s=0.01,
            emulator=emulator,
            advance_s=60,
        )
        assert samples > 10
        assert daemon.ops.healthy, "a stage died"
        failed = events(log_lines, "publish_failed")
        (stuck,) = (await daemon.ops.jobs(None, "stuck", 10, 0)).jobs
        assert {f["job_id"] for f in failed} == {stuck.id}
        assert {f["errno"] for f in failed} == {action.upper()}
        assert all(f["name"] == "stuck" and f["level"] == "error" for f in failed)
        # The pause between attempts doubles, up to its cap.
        assert [f["retry_in_s"] for f in failed[:5]] == [0.05, 0.1, 0.2, 0.4, 0.4]
        assert stuck.state == JobState.PUBLISHING
        job = await daemon.store.get_job(stuck.id)
        assert job is not None and job.crash_count == 0

        failpoints.arm("")  # the disk works again
        await wait_published(outbox, 2, emulator)
        await wait_for(lambda: not hidden(outbox), 30, "temp folder removed", step_s=0.01)
        assert visible(outbox) == ["fine", "stuck"]
        s = summary(outbox / "stuck")
        assert s["status"] == "completed"
        assert s["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        assert [r["custom_id"] for r in read_jsonl(outbox / "stuck" / "result.jsonl")] == [
            "r0",
            "r1",
            "r2",
        ]
        assert sorted(p.name for p in (outbox / "stuck").iterdir()) == sorted(
            p.name for p in (outbox / "fine").iterdir()
        )
        await wait_for(lambda: events(log_lines, "publish_recovered"), 30, "recovered", step_s=0.01)
        job = await daemon.store.get_job(stuck.id)
        assert job is not None and job.state == JobState.PUBLISHED and job.crash_count == 0
    assert len(events(log_lines, "job_published")) == 2
    assert not events(log_lines, "stage_crashed")


async def test_disk_errors_are_not_crashes_so_a_restart_does_not_park_the_job(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    """More failed attempts than `max_job_crashes`, then a restart: the job is published,
    not parked as if it had crashed the daemon each time."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator, max_job_crashes=2)
    outbox = settings.paths.folder("outbox")
    failpoints.arm("publish.write=enospc")
    async with running_daemon(settings) as daemon:
        fast_retries(daemon)
        drop(settings.paths.folder("inbox"), "a.jsonl", requests(2))
        await wait_for(
            lambda: len(events(log_lines, "publish_failed")) >= 4,
            60,
            "four failed publishes",
            step_s=0.01,
            emulator=emulator,
            advance_s=60,
        )
        assert visible(outbox) == []
    assert hidden(outbox) == []
    failpoints.arm("")
    async with running_daemon(settings) as daemon:
        (folder,) = await wait_published(outbox, 1, emulator)
        assert summary(folder)["status"] == "completed"
        counts = await daemon.store.job_counts()
        assert counts == {"published": 1}
    assert not events(log_lines, "job_parked")
