"""An input that crashes the daemon every time it is worked on (TESTING.md B.12).

`prepare.before_validate=kill:poison` kills the daemon (`batchd run`, a real process)
whenever it validates `poison.jsonl`, and only then; the test restarts it after each
crash, as systemd would. After `max_job_crashes` (3) crashes the poison job is parked:
its input stays in the spool, `batchd status` and `batchd jobs` show it, the log says
so, and the other inputs are published. A restart leaves it parked; `retry` over the
control socket requeues it, and a daemon that no longer crashes on it publishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from batchd.documents import JobOptions
from batchd.emulator import Emulator
from batchd.failpoints import arm
from batchd.models import Job
from batchd.testing import (
    DaemonProcess,
    RawControl,
    StartEmulator,
    daemon_env,
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

MAX_JOB_CRASHES = 3  # the default of `max_job_crashes`
GOOD = ["good-1", "good-2", "good-3"]


def job_rows(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "state" / "batchd.sqlite3"
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute("SELECT * FROM jobs").fetchall()
        except sqlite3.OperationalError:
            return {}  # a daemon just started has not created its tables yet
    return {row["name"]: dict(row) for row in rows}


def published(root: Path) -> list[str]:
    outbox = root / "outbox"
    if not outbox.exists():
        return []
    return sorted(p.name for p in outbox.iterdir() if not p.name.startswith("."))


async def stop(process: DaemonProcess | None) -> int | None:
    """SIGTERM a daemon still running; its exit code."""
    if process is None:
        return None
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 30)


async def run_until_exit_or(
    process: DaemonProcess, emulator: Emulator, done: Any, timeout_s: float = 30.0
) -> int | None:
    """Move the service's clock on until the daemon exits (its exit code) or `done()`."""
    deadline = time.monotonic() + timeout_s
    while process.returncode is None:
        if done():
            return None
        assert time.monotonic() < deadline, "neither crashed nor done"
        emulator.advance(60)
        try:
            await asyncio.wait_for(process.wait(), 0.05)
        except TimeoutError:
            pass
    return process.returncode


async def cli(*argv: str) -> tuple[int, str]:
    """`batchd ARGV` in a subprocess; its exit code and stdout."""
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_an_input_that_fails_validation_each_time_is_parked_without_a_crash(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """An exception (not a crash) while validating one input is that job's trouble: the
    daemon stays up, tries it again after a pause, parks it after max_job_crashes
    failures with the reason, and the other inputs are published meanwhile."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    arm("prepare.before_validate=raise:poison")
    try:
        async with running_daemon(settings) as daemon:
            drop(inbox, "good-1.jsonl", requests(3, prefix="a"))
            drop(inbox, "poison.jsonl", requests(2, prefix="p"))
            drop(inbox, "good-2.jsonl", requests(4, prefix="b"))
            await wait_published(outbox, 2, emulator)
            jobs: dict[str, Job] = {}

            async def parked() -> bool:
                jobs.update((j.name, j) for j in await daemon.store.jobs())
                return jobs["poison"].state == "parked"

            await wait_for(parked, 10, lambda: f"the poison input parked: {jobs}")
            poison = jobs["poison"]
            assert poison.state == "parked", poison
            assert poison.error is not None
            assert f"parked after {MAX_JOB_CRASHES} failures validating it" in poison.error
            assert "FailpointError" in poison.error
            status = await daemon.ops.status()
            assert any(p.kind == "job_parked" and p.job_id == poison.id for p in status.problems)
            assert not daemon.stopping.is_set()  # never crashed
    finally:
        arm("")
    assert Path(poison.spool_path).read_bytes() == requests(2, prefix="p")
    assert sorted(p.name for p in outbox.iterdir()) == ["good-1", "good-2"]


async def test_a_job_whose_publishing_raises_is_that_jobs_problem_and_retried(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """An exception while publishing one job (issue 22: an absurd number in a result line
    did it) never stops the publish stage or the daemon: the other jobs are published,
    this one shows the problem in `status` and `show` and is tried again after a pause
    that grows; once publishing works it is published, its note gone."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    arm("publish.write=raise:poison")
    try:
        async with running_daemon(settings) as daemon:
            daemon.publisher.retry_base_s = 0.2  # the first pause (1 s by default)
            drop(inbox, "poison.jsonl", requests(2, prefix="p"))
            drop(inbox, "good.jsonl", requests(3, prefix="g"))
            await wait_published(outbox, 1, emulator)

            async def failing_twice() -> list[Any]:
                problems = (await daemon.ops.status()).problems
                return [
                    p for p in problems if p.kind == "publish_failing" and "2 in a row" in p.note
                ]

            (problem,) = await wait_for(failing_twice, what="the publish tried again")
            assert "publishing failed" in problem.note and "FailpointError" in problem.note
            shown = await daemon.ops.job(problem.job_id or "")
            assert shown is not None and shown.state == "publishing"
            assert shown.error is not None and "FailpointError" in shown.error
            assert not daemon.stopping.is_set()  # never crashed
            arm("")
            await wait_published(outbox, 2, emulator)
            published = await daemon.store.get_job(problem.job_id or "")
            assert not any(
                p.kind == "publish_failing" for p in (await daemon.ops.status()).problems
            )
    finally:
        arm("")
    assert published is not None and published.error is None, published
    report = summary(outbox / "poison")
    assert report["status"] == "completed" and report["error"] is None
    assert summary(outbox / "good")["status"] == "completed"


async def test_an_input_that_crashes_the_daemon_each_time_is_parked_and_the_rest_go_on(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    action, crash_code = "kill", -signal.SIGKILL
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    inbox = root / "inbox"
    drop(inbox, "good-1.jsonl", requests(3, prefix="a"))
    drop(inbox, "poison.jsonl", requests(2, prefix="p"))
    drop(inbox, "good-2.jsonl", requests(4, prefix="b"))
    env = daemon_env(emulator, root)
    armed = {**env, "BATCHD_FAILPOINTS": f"prepare.before_validate={action}:poison"}
    log = tmp_path / "daemon.log"
    socket = root / "control.sock"

    def settled() -> bool:
        rows = job_rows(root)
        return published(root) == GOOD and rows.get("poison", {}).get("state") == "parked"

    crashes: list[int] = []
    started = 0
    daemon: DaemonProcess | None = None
    try:
        # Bounded: one start per allowed crash, then the one that parks the job.
        while started <= MAX_JOB_CRASHES:
            daemon = await DaemonProcess.start(armed, log)
            started += 1
            if started == 2:
                # Inputs keep arriving while the daemon crash-loops.
                drop(inbox, "good-3.jsonl", requests(2, prefix="c"))
            code = await run_until_exit_or(daemon, emulator, settled)
            if code is None:
                break
            crashes.append(code)
        assert daemon is not None and daemon.returncode is None, log.read_text()[-3000:]
        assert crashes == [crash_code] * MAX_JOB_CRASHES, log.read_text()[-3000:]
        await wait_ready(root, daemon)
        poison = job_rows(root)["poison"]
        assert poison["crash_count"] == MAX_JOB_CRASHES
        assert "parked after 3 crashes" in poison["error"]
        # The input is kept where it was, untouched, for an operator to look at.
        spooled = Path(poison["spool_path"])
        assert spooled.read_bytes() == requests(2, prefix="p")
        assert not (inbox / "poison.jsonl").exists()
        # Visible to the operator: status, jobs, and the log.
        code, out = await cli("status", "--socket", str(socket), "--json")
        assert code == 0, out
        assert json.loads(out)["jobs_by_state"] == {"published": 3, "parked": 1}
        code, out = await cli("jobs", "--socket", str(socket), "--json", "--state", "parked")
        (listed,) = json.loads(out)
        assert listed["id"] == poison["id"] and listed["name"] == "poison"
        parked_lines = [
            json.loads(line)
            for line in log.read_text().splitlines()
            if line.startswith("{") and '"job_parked"' in line
        ]
        assert [(p["job_id"], p["name"]) for p in parked_lines] == [(poison["id"], "poison")]
        for name, prefix, n in (("good-1", "a", 3), ("good-2", "b", 4), ("good-3", "c", 2)):
            s = summary(root / "outbox" / name)
            assert s["status"] == "completed" and s["request_counts"]["completed"] == n
            assert [
                r["custom_id"] for r in read_jsonl(root / "outbox" / name / "result.jsonl")
            ] == [f"{prefix}{i}" for i in range(n)]
    finally:
        stopped = await stop(daemon)
    assert stopped == 0

    # A restart leaves it parked; `retry` requeues it. This daemon no longer crashes on
    # the input (a fixed version, say), so the job goes through.
    fixed = await DaemonProcess.start(env, log)
    try:
        await wait_ready(root, fixed)
        assert job_rows(root)["poison"]["state"] == "parked"
        code, answer = await RawControl(socket).call("POST", f"/v1/jobs/{poison['id']}/retry")
        assert code == 200 and answer["ok"] and answer["message"] == "requeued", answer
        assert answer["job"]["state"] in ("claimed", "running", "publishing", "published")
        folders = await wait_published(root / "outbox", 4, emulator)
        assert [f.name for f in folders] == sorted([*GOOD, "poison"])
        s = summary(root / "outbox" / "poison")
        assert s["status"] == "completed" and s["request_counts"]["completed"] == 2
        row = job_rows(root)["poison"]
        assert row["state"] == "published" and row["crash_count"] == 0 and row["error"] is None
    finally:
        stopped = await stop(fixed)
    assert stopped == 0
    with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_retry_of_a_parked_job_whose_input_is_gone_says_so(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    drop(root / "inbox", "poison.jsonl", requests(2))
    env = daemon_env(emulator, root, BATCHD_MAX_JOB_CRASHES="1")
    log = tmp_path / "daemon.log"
    crashing = await DaemonProcess.start(
        {**env, "BATCHD_FAILPOINTS": "prepare.before_validate=kill:poison"}, log
    )
    assert await run_until_exit_or(crashing, emulator, lambda: False) == -signal.SIGKILL
    daemon = await DaemonProcess.start(env, log)
    try:
        await wait_ready(root, daemon)
        poison = job_rows(root)["poison"]
        assert poison["state"] == "parked"
        Path(poison["spool_path"]).unlink()
        code, answer = await RawControl(root / "control.sock").call(
            "POST", f"/v1/jobs/{poison['id']}/retry"
        )
        assert code == 409 and not answer["ok"]
        assert answer["message"] == "the parked job's input is gone"
        assert job_rows(root)["poison"]["state"] == "parked"
    finally:
        stopped = await stop(daemon)
    assert stopped == 0


async def test_recovery_parks_every_crashed_job_however_many(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Recovery reads every job caught by too many crashes, not the first 1000."""
    from batchd.models import JobState
    from batchd.store import Store

    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    store = await Store.open(settings.paths.folder("state") / "batchd.sqlite3")
    count = 1_100
    try:

        async def crashed(n: int) -> None:
            job_id = f"{n:020x}"
            await store.insert_job(
                job_id=job_id,
                name=f"job-{n}",
                inbox_name=f"job-{n}.jsonl",
                inode=0,
                dev=0,
                spool_path=str(tmp_path / "gone" / job_id / "input.jsonl"),
                kind="jsonl",
                options=JobOptions(),
                now=float(n),
                state=JobState.CLAIMED,
            )
            await store.update_job(job_id, crash_count=MAX_JOB_CRASHES)

        await asyncio.gather(*(crashed(n) for n in range(count)))
    finally:
        await store.close()
    async with running_daemon(settings) as daemon:
        counts = await daemon.store.job_counts()
    assert counts == {"parked": count}
