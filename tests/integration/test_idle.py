"""`batchd.testing.idle`: it returns only once the daemon has run out of work, so that a
test can assert that something did not happen without sleeping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchd.pipeline.stages import Activity, Stage, Wake, run_stage
from batchd.testing import (
    StartEmulator,
    daemon_settings,
    drop,
    idle,
    requests,
    running_daemon,
    wait_for,
    wait_published,
)

pytestmark = pytest.mark.timeout(60)


async def test_a_dropped_file_is_published_before_idle_returns(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    # Rescans far apart: idle() must have the intake look itself, then wait for the whole
    # pipeline (the emulator, sped up, ends the batch within seconds).
    emulator = await start_emulator(time_scale=3600)
    settings = daemon_settings(tmp_path, emulator, intake={"rescan_interval_s": 30.0})
    async with running_daemon(settings) as daemon:
        await idle(daemon)
        drop(daemon.inbox, "a.jsonl", requests(2))
        await idle(daemon, timeout_s=40)
        assert [job.state for job in await daemon.store.jobs()] == ["published"]


async def test_a_running_batch_keeps_the_daemon_busy(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    emulator = await start_emulator(time_scale=1)
    settings = daemon_settings(tmp_path, emulator, intake={"rescan_interval_s": 30.0})
    async with running_daemon(settings) as daemon:
        drop(daemon.inbox, "a.jsonl", requests(2))
        # The batch runs on the emulator (for a day): a poll is always due.
        with pytest.raises(AssertionError, match=r"not idle within .*poll"):
            await idle(daemon, timeout_s=8.0)
        await wait_published(daemon.outbox, 1, emulator)
        await idle(daemon)


async def test_a_file_still_settling_keeps_the_daemon_busy(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    emulator = await start_emulator(time_scale=3600)
    settings = daemon_settings(tmp_path, emulator, intake={"settle_s": 0.4})
    async with running_daemon(settings) as daemon:
        (daemon.inbox / "fresh.jsonl").write_bytes(requests(1))  # modified just now
        await idle(daemon, timeout_s=40, horizon_s=0.5)
        assert [job.state for job in await daemon.store.jobs()] == ["published"]


async def test_idle_waits_for_a_pass_that_is_under_way() -> None:
    wake, stopping, activity = Wake(), asyncio.Event(), Activity()
    release = asyncio.Event()
    done: list[str] = []

    async def step() -> bool:
        if not done:
            await release.wait()
            done.append("work")
            return True
        return False

    task = asyncio.create_task(
        run_stage(Stage.PUBLISH, step, 30.0, wake, stopping, None, None, activity)
    )
    await wait_for(lambda: activity[Stage.PUBLISH].busy, 5, "the pass under way")
    release.set()
    await activity.changed()
    assert activity[Stage.PUBLISH].did and activity.progress == 1
    await activity.changed()
    passes = activity[Stage.PUBLISH]
    assert (passes.busy, passes.did, passes.finished) == (False, False, 2)
    assert passes.due_at == float("inf")  # a periodic look only: nothing is due
    stopping.set()
    wake.all()
    await task
