"""A local fault is never a remote one (issue 22, TESTING.md G), each made real.

- The spool's disk fills up (a small tmpfs) while result files download: nothing is
  given up, `status` and `check` name the disk, and once space is freed the job is
  published once, with the real results (before: given up after `max_part_failures`,
  4 of 4 paid jobs published `failed` as `result_unavailable`).
- The wall clock steps +31 h while a batch runs (the test-only step file of
  batchd.clock): no second batch, nothing declared lost (before: declared lost, and with
  `jobs.resubmit_failed` created again while the first still ran); a step back holds
  nothing up.
- The provider answers nothing (every call dropped or 5xx) for longer than parking used
  to take: no part is parked, `status` says so within seconds, and the work resumes by
  itself when the provider is back (before: parked until `batchd retry`).
- Another process holds the state database (`BEGIN EXCLUSIVE`) past the busy timeout,
  and the state disk fills up: the daemon stays up, says why, and resumes (before: exit
  1 each time, a restart loop); a read-only state folder at start is exit 2, naming it.

`make test` runs each in seconds, with the pauses shortened; the soak variants (`make
soak`) keep the real ones, with faults longer than what used to give up: a spool full for
150 s (the file was given up after 112 s), an outage of 240 s (parked after about 3.5
min), a lock of 40 s (exit 1 after about 25 s). `BATCHD_FAULT_SECONDS` sets their length.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from batchd.clock import SystemClock
from batchd.emulator import Emulator
from batchd.models import PartState
from batchd.testing import (
    ENDPOINT_CHAT,
    DaemonProcess,
    RawControl,
    StartEmulator,
    cli,
    daemon_env,
    daemon_process,
    daemon_settings,
    database_locked,
    drop,
    events,
    fill_disk,
    fill_inodes,
    job_folders,
    read_jsonl,
    requests,
    running_daemon,
    small_disk,
    step_clock,
    step_clock_env,
    summary,
    wait_for,
    wait_published,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)

HOUR = 3600.0
NO_MOUNT = (
    "mounting a tmpfs needs root (or CAP_SYS_ADMIN) and mount(8): run as root (CI does)"
    " to fill a real disk"
)


def seconds(default: float) -> float:
    return float(os.environ.get("BATCHD_FAULT_SECONDS") or default)


async def served(emulator: Emulator, call: str) -> int:
    stats = await emulator.stats()
    return int(stats["calls"][call]["served"])


async def polls(emulator: Emulator) -> int:
    """Status calls the emulator served (list sweeps and retrieves)."""
    return await served(emulator, "list") + await served(emulator, "retrieve")


async def more_polls(emulator: Emulator, at_least: int) -> bool:
    return await polls(emulator) >= at_least


# -- 3. a full spool disk -------------------------------------------------------------


async def full_spool(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
    *,
    full_s: float,
    **overrides: Any,
) -> dict[str, float]:
    root = tmp_path / "root"
    with small_disk(root, "2m") as mounted:
        if not mounted:
            pytest.skip(NO_MOUNT)
        # The batch runs until the test moves the service's clock on.
        emulator = await start_emulator(time_scale=1)
        # Inbox and spool on the small disk (claiming is a rename between them); the
        # database and the outbox elsewhere, so that only downloads meet the full disk.
        settings = daemon_settings(
            root,
            emulator,
            paths={"root": root, "state": tmp_path / "state", "outbox": tmp_path / "outbox"},
            **overrides,
        )
        outbox = settings.paths.folder("outbox")
        async with running_daemon(settings) as daemon:
            drop(settings.paths.folder("inbox"), "paid.jsonl", requests(40))

            async def running() -> bool:
                return (await daemon.store.part_counts()).get(PartState.RUNNING, 0) == 1

            await wait_for(running, 20, "the batch running", step_s=0.02)
            ballast = fill_disk(root)
            loop = asyncio.get_running_loop()
            began = loop.time()
            emulator.advance(HOUR)  # the batch ends; its results do not fit

            # Many more tries than max_part_failures (or the job published meanwhile: the
            # file given up, as it was before).
            async def tried() -> bool:
                waits = len(events(log_lines, "part_step_waits"))
                return bool(job_folders(outbox)) or (waits >= 5 and loop.time() - began >= full_s)

            await wait_for(tried, full_s + 60, "downloads tried again and again", step_s=0.05)
            # None counted, nothing given up, nothing published.
            assert job_folders(outbox) == [], summary(job_folders(outbox)[0])
            (part,) = await daemon.store.parts_of((await daemon.store.jobs(None))[0].id)
            assert part.state == PartState.ENDED and part.attempts == 0
            assert part.unavailable is None
            assert "disk full" in (part.error or "")
            status = await daemon.ops.status()
            assert not status.healthy
            (fault,) = status.local_faults
            assert (fault.key, fault.what) == ("spool", "disk full")
            assert str(root / "spool") in fault.detail and "download" in fault.pauses
            assert any("spool: disk full" in why for why in status.waiting)
            code, exposed = await RawControl(settings.socket_path).call("GET", "/metrics")
            assert code == 200
            assert 'batchd_local_fault{key="spool",what="disk full"} 1.0' in exposed
            (since,) = [
                float(line.split()[-1])
                for line in exposed.splitlines()
                if line.startswith('batchd_local_fault_since_seconds{key="spool"}')
            ]
            assert since == pytest.approx(fault.since)
            assert 'batchd_local_faults_met_total{key="spool"}' in exposed
            code, _out, err = await cli(capsys, "check", "--socket", str(settings.socket_path))
            assert code == 1 and "spool: disk full" in err, err

            ballast.unlink()  # space is freed: the work goes on by itself
            freed = loop.time()
            (folder,) = await wait_published(outbox, 1, emulator, timeout_s=90)
            resumed_s = loop.time() - freed
            assert (await daemon.ops.status()).healthy
            assert (await daemon.ops.status()).local_faults == []
    s = summary(folder)
    assert s["status"] == "completed", s
    assert s["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert s["result_unavailable"] == 0
    results = read_jsonl(folder / "result.jsonl")
    assert sorted(r["custom_id"] for r in results) == sorted(f"r{i}" for i in range(40))
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert (await emulator.stats())["batches_created"] == 1
    assert events(log_lines, "local_fault_cleared")
    assert not events(log_lines, "result_unavailable")
    return {"full_s": round(freed - began, 1), "published_after_freed_s": round(resumed_s, 1)}


async def test_a_full_spool_disk_pauses_downloads_and_gives_no_paid_result_up(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await full_spool(start_emulator, tmp_path, log_lines, capsys, full_s=0.0, max_part_failures=2)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_a_spool_full_for_minutes_with_the_real_pauses_gives_nothing_up(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real pauses (`step_retry_base_s` 5 s) and `max_part_failures` (5): before,
    the file was given up after 112 s."""
    figures = await full_spool(
        start_emulator,
        tmp_path,
        log_lines,
        capsys,
        full_s=seconds(150.0),
        api={"step_retry_base_s": 5.0, "step_retry_cap_s": 600.0},
    )
    with capsys.disabled():
        print(f"\n[spool-full soak] {figures}")


# -- 4. a stepped wall clock ------------------------------------------------------------


async def test_a_wall_clock_stepped_31_hours_declares_nothing_lost_and_pays_nothing_twice(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    emulator = await start_emulator(time_scale=1)
    # resubmit_failed: a batch declared lost would be sent again (and paid twice).
    settings = daemon_settings(tmp_path / "root", emulator, jobs={"resubmit_failed": 1})
    step_file = tmp_path / "clock-step"
    step_clock(step_file, 0.0)
    async with running_daemon(settings, clock=SystemClock(step_file)) as daemon:
        drop(settings.paths.folder("inbox"), "long.jsonl", requests(3))

        async def running() -> bool:
            return (await daemon.store.part_counts()).get(PartState.RUNNING, 0) == 1

        await wait_for(running, 20, "the batch running", step_s=0.02)
        (job,) = await daemon.store.jobs(None)
        (first,) = await daemon.store.parts_of(job.id)
        # NTP fixing a clock hours off, either way: +31 h, then back 81 h.
        for offset, step in ((31 * HOUR, 31 * HOUR), (-50 * HOUR, -81 * HOUR)):
            step_clock(step_file, offset)
            before = await polls(emulator)
            # Polls go on at their pace (a step back holds none up) and see it running.
            await wait_for(
                lambda before=before: more_polls(emulator, before + 5),
                20,
                "five more polls after the step",
                step_s=0.02,
            )
            # The same batch, still followed: not taken for lost, not sent again.
            assert not events(log_lines, "batch_lost")
            assert [(p.id, p.state, p.batch_id) for p in await daemon.store.parts_of(job.id)] == [
                (first.id, PartState.RUNNING, first.batch_id)
            ]
            assert (await emulator.stats())["batches_created"] == 1

            async def seen(step: float = step) -> bool:
                steps = (await daemon.ops.status()).clock_steps
                return bool(steps) and round(steps[-1].seconds / HOUR) == round(step / HOUR)

            await wait_for(seen, 10, "the step shown by status", step_s=0.05)
            status = await daemon.ops.status()
            assert status.healthy and status.local_faults == []
        assert not events(log_lines, "batch_lost")
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    assert summary(folder)["status"] == "completed"
    stats = await emulator.stats()
    assert stats["batches_created"] == 1
    assert set(stats["batches_created_per_input_file"].values()) == {1}


async def test_a_lost_create_is_found_even_with_the_wall_clock_hours_ahead_of_the_service(
    start_emulator: StartEmulator, make_api: Any, tmp_path: Path
) -> None:
    """The daemon's wall clock is 31 h ahead of the service's (stepped forward, or set
    wrong); it dies right after a create took effect, and another client of the key
    fills the newest page of the list. Paging back past batchd's intent stopped at that
    first page (every batch on it looks 31 h older than the intent), "proved" the batch
    absent and created it again; paging back past the input file's own time on the
    service's clock finds it on the second page."""
    emulator = await start_emulator(time_scale=1, faults={"ignore_list_filters": True})
    api = make_api(emulator)
    root = tmp_path / "root"
    step_file = tmp_path / "clock-step"
    step_clock(step_file, 31 * HOUR)
    drop(root / "inbox", "mine.jsonl", requests(3))
    env = daemon_env(emulator, root, **step_clock_env(step_file))
    log = tmp_path / "daemon.log"
    crashing = await DaemonProcess.start(
        {**env, "BATCHD_FAILPOINTS": "create.after_request=kill"}, log
    )
    assert await asyncio.wait_for(crashing.wait(), 30) == -signal.SIGKILL
    # More than a page (100) of batches newer than the lost one: it is on the second.
    foreign = await api.upload_ok(requests(2), "other.jsonl")
    for n in range(110):
        await api.create_ok(foreign, ENDPOINT_CHAT)
        if n % 20 == 19:
            emulator.advance(HOUR)  # ended, so the running cap leaves room
    async with daemon_process(env, log) as daemon:
        await wait_ready(root, daemon)
        (folder,) = await wait_published(root / "outbox", 1, emulator)
    assert summary(folder)["status"] == "completed"
    stats = await emulator.stats()
    mine = {f: n for f, n in stats["batches_created_per_input_file"].items() if f != foreign}
    assert list(mine.values()) == [1], stats["batches_created_per_input_file"]


# -- 5. a provider outage ---------------------------------------------------------------


async def outage(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
    *,
    outage_s: float,
    **overrides: Any,
) -> dict[str, float]:
    emulator = await start_emulator(time_scale=1)
    settings = daemon_settings(tmp_path / "root", emulator, **overrides)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "ending.jsonl", requests(3, prefix="e"))

        async def running() -> bool:
            return (await daemon.store.part_counts()).get(PartState.RUNNING, 0) == 1

        await wait_for(running, 20, "the first batch running", step_s=0.02)
        # Its result file fails alone first (one counted failure: the provider answers
        # the rest), then every call of every kind fails: the outage.
        emulator.set_faults(error_5xx_rate=1.0, classes=["download"])
        emulator.advance(HOUR)
        await wait_for(
            lambda: events(log_lines, "download_failed"), 20, "a download failed", step_s=0.02
        )
        emulator.set_faults(drop_connection_rate=0.5, error_5xx_rate=1.0, classes=[])
        loop = asyncio.get_running_loop()
        began = loop.time()
        # A new input during the outage: its upload's answer is lost, and the listings
        # that would settle it fail too.
        drop(inbox, "during.jsonl", requests(2, prefix="d"))

        async def told() -> bool:
            return (await daemon.ops.status()).provider_down is not None

        await wait_for(told, 10, "status saying the provider does not answer", step_s=0.05)
        said_after_s = loop.time() - began
        assert said_after_s < 5.0, said_after_s
        status = await daemon.ops.status()
        assert not status.healthy
        assert any(p.kind == "provider_down" for p in status.problems)
        code, _out, err = await cli(capsys, "check", "--socket", str(settings.socket_path))
        assert code == 1 and "the provider does not answer" in err, err
        metrics = await daemon.ops.metrics()
        assert metrics["provider_down"] is True

        while loop.time() - began < outage_s:
            await asyncio.sleep(0.1)
            emulator.advance(60)
        # Through it all nothing was parked, no file given up, nothing published; the
        # result file's one failure of its own counted, the outage's did not (while the
        # provider is silent nothing is called; a call that fails before that is told
        # apart by `BatchApi.answering`).
        (ending,) = (await daemon.ops.jobs(None, "ending", 10, 0)).jobs
        (part,) = await daemon.store.parts_of(ending.id)
        assert (part.state, part.attempts, part.unavailable) == (PartState.ENDED, 1, None)
        assert not events(log_lines, "part_parked")
        assert not events(log_lines, "result_unavailable")
        assert job_folders(outbox) == []
        counts = await daemon.store.part_counts()
        assert PartState.PARKED not in counts, counts

        emulator.set_faults(drop_connection_rate=0.0, error_5xx_rate=0.0)
        back = loop.time()
        # Back by itself: no `batchd retry`.
        folders = await wait_published(outbox, 2, emulator, timeout_s=120)
        published_s = loop.time() - back
        assert (await daemon.ops.status()).healthy
    assert sorted(f.name for f in folders) == ["during", "ending"]
    for folder in folders:
        s = summary(folder)
        assert s["status"] == "completed" and s["result_unavailable"] == 0, s
    stats = await emulator.stats()
    assert set(stats["batches_created_per_input_file"].values()) == {1}
    assert events(log_lines, "provider_reachable")
    return {
        "outage_s": round(back - began, 1),
        "said_after_s": round(said_after_s, 2),
        "published_after_back_s": round(published_s, 1),
    }


async def test_an_outage_parks_nothing_is_said_within_seconds_and_heals_by_itself(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Parking (and giving a file up) takes two counted failures here, a second apart:
    # the outage lasts several times that.
    await outage(
        start_emulator,
        tmp_path,
        log_lines,
        capsys,
        outage_s=3.0,
        max_part_failures=2,
        api={
            "max_attempts": 2,
            "account_probe_s": 0.5,
            "step_retry_base_s": 1.0,
            "step_retry_cap_s": 1.0,
        },
    )


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_an_outage_longer_than_parking_took_with_the_real_pauses(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Default retries, pauses and `max_part_failures`: before, the part was parked after
    about 3.5 minutes and stayed so."""
    figures = await outage(
        start_emulator,
        tmp_path,
        log_lines,
        capsys,
        outage_s=seconds(240.0),
        api={
            "max_attempts": 6,
            "backoff_base_s": 0.5,
            "backoff_cap_s": 60.0,
            "step_retry_base_s": 5.0,
            "step_retry_cap_s": 600.0,
        },
    )
    with capsys.disabled():
        print(f"\n[outage soak] {figures}")


# -- 6. the state database's trouble ------------------------------------------------------


async def database_held(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
    *,
    lock_s: float,
    **overrides: Any,
) -> dict[str, float]:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator, **overrides)
    db_path = settings.paths.folder("state") / "batchd.sqlite3"
    outbox = settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "before.jsonl", requests(2, prefix="b"))
        await wait_published(outbox, 1, emulator)
        loop = asyncio.get_running_loop()
        async with database_locked(db_path):
            began = loop.time()
            # Claiming a new input writes the database: it waits, and so does the rest.
            drop(settings.paths.folder("inbox"), "during.jsonl", requests(2, prefix="d"))
            while loop.time() - began < lock_s:
                assert not daemon.stopping.is_set(), "the daemon stopped"
                assert daemon.ops.stages_alive(), "a stage died"
                await asyncio.sleep(0.1)
            status = await daemon.ops.status()
            assert not status.healthy
            (fault,) = status.local_faults
            assert fault.key == "database" and "locked" in fault.what, fault
            code, _out, err = await cli(capsys, "check", "--socket", str(settings.socket_path))
            assert code == 1 and "database: the database is locked" in err, err
            assert len(job_folders(outbox)) == 1
        released = loop.time()
        # Released: the waiting writes go through, the work goes on.
        await wait_published(outbox, 2, emulator, timeout_s=60)
        resumed_s = loop.time() - released
        assert (await daemon.ops.status()).healthy
        assert (await daemon.ops.metrics())["local_faults_met"]["database"] >= 2
    assert not events(log_lines, "stage_crashed")
    assert events(log_lines, "local_fault_cleared")
    assert summary(outbox / "during")["status"] == "completed"
    return {"lock_s": round(released - began, 1), "published_after_release_s": round(resumed_s, 1)}


async def test_a_database_held_by_another_process_keeps_the_daemon_up_and_waiting(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`BEGIN EXCLUSIVE` from a backup or a VACUUM, held past the busy timeout (before:
    exit 1 after it, every restart dying again while the lock lasted)."""
    await database_held(
        start_emulator, tmp_path, log_lines, capsys, lock_s=2.0, db_busy_timeout_s=0.3
    )


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_a_database_held_longer_than_it_took_to_kill_the_daemon(
    start_emulator: StartEmulator,
    tmp_path: Path,
    log_lines: io.StringIO,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real busy timeout (10 s); before, the daemon exited 1 about 25 s into a lock."""
    figures = await database_held(start_emulator, tmp_path, log_lines, capsys, lock_s=seconds(40.0))
    with capsys.disabled():
        print(f"\n[database-lock soak] {figures}")


async def test_a_full_state_disk_keeps_the_daemon_up_and_waiting(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    state = tmp_path / "state"
    with small_disk(state, "4m") as mounted:
        if not mounted:
            pytest.skip(NO_MOUNT)
        emulator = await start_emulator(time_scale=3000)
        settings = daemon_settings(
            tmp_path / "root", emulator, paths={"root": tmp_path / "root", "state": state}
        )
        outbox = settings.paths.folder("outbox")
        async with running_daemon(settings) as daemon:
            ballast = fill_disk(state)
            drop(settings.paths.folder("inbox"), "a.jsonl", requests(3))

            async def full() -> bool:
                met = (await daemon.ops.metrics()).get("local_faults_met", {})
                return daemon.stopping.is_set() or met.get("database", 0) >= 5

            await wait_for(full, 20, "writes waiting for the full disk", step_s=0.05)
            assert not daemon.stopping.is_set(), "the daemon stopped"
            status = await daemon.ops.status()
            (fault,) = status.local_faults
            assert fault.key == "database" and not status.healthy, fault
            assert not daemon.stopping.is_set() and daemon.ops.stages_alive()
            assert job_folders(outbox) == []
            ballast.unlink()
            (folder,) = await wait_published(outbox, 1, emulator)
            assert (await daemon.ops.status()).healthy
    assert summary(folder)["status"] == "completed"
    assert not events(log_lines, "stage_crashed")


async def test_a_read_only_state_folder_is_exit_2_naming_it(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """A person must fix it before the daemon can start: exit 2, which systemd does not
    restart (before: a raw EROFS traceback, exit 1, a restart loop)."""
    state = tmp_path / "state"
    with small_disk(state, "1m", read_only=True) as mounted:
        if not mounted:
            pytest.skip(NO_MOUNT)
        emulator = await start_emulator()
        root = tmp_path / "root"
        env = daemon_env(emulator, root, BATCHD_PATHS__STATE=str(state))
        proc = await DaemonProcess.start(env, tmp_path / "daemon.log")
        code = await asyncio.wait_for(proc.wait(), 60)
        said = proc.log_tail()
    assert code == 2, said
    assert f"the state folder {state} cannot be written (read-only filesystem" in said, said
    assert "Traceback" not in said


async def test_a_spool_disk_without_a_free_inode_at_start_is_waited_out_not_an_exit(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    """The start-up check that inbox and spool share a filesystem renames a probe file
    across: on a disk with no inode left it cannot be made (before: OSError, exit 1 at
    every start). The daemon starts, the claim waits for the disk, and goes on."""
    root = tmp_path / "root"
    with small_disk(root, "2m", inodes=64) as mounted:
        if not mounted:
            pytest.skip(NO_MOUNT)
        for name in ("inbox", "spool"):
            (root / name).mkdir()
        emulator = await start_emulator(time_scale=3000)
        settings = daemon_settings(
            root,
            emulator,
            paths={
                "root": root,
                "state": tmp_path / "state",
                "outbox": tmp_path / "outbox",
                "runtime": tmp_path,
            },
        )
        inbox = settings.paths.folder("inbox")
        drop(inbox, "waiting.jsonl", requests(2))
        ballast = fill_inodes(root)
        async with running_daemon(settings) as daemon:
            assert events(log_lines, "filesystem_check_skipped")

            async def said() -> bool:
                return not (await daemon.ops.status()).healthy

            await wait_for(said, 20, "status unhealthy while nothing can be claimed")
            shutil.rmtree(ballast)
            (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
            assert (await daemon.ops.status()).healthy
    assert summary(folder)["status"] == "completed"
