"""A service that misbehaves the way real gateways and other providers do (issue 12).

Each test switches on one of the emulator's own fault modes (so users can dry-run the
same) and checks what a user would notice: nothing paid twice, nothing lost, no stage
or daemon brought down by one part's trouble, and every part that cannot proceed said
so in `status`.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from batchd.cli import main
from batchd.models import PartState
from batchd.testing import (
    ENDPOINT_CHAT,
    Api,
    DaemonProcess,
    RawControl,
    StartEmulator,
    cli,
    daemon_env,
    daemon_process,
    daemon_settings,
    drop,
    events,
    idle,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)


async def test_a_lost_create_is_found_by_paging_when_the_list_ignores_its_filters(
    start_emulator: StartEmulator, make_api: Any, tmp_path: Path
) -> None:
    """The daemon dies right after a create took effect; meanwhile another client of the
    key creates 30 batches; the list ignores `input_file_ids` (as OpenAI's does). The
    restarted daemon must find its batch past the first page, never create a second."""
    emulator = await start_emulator(time_scale=3000, faults={"ignore_list_filters": True})
    api: Api = make_api(emulator)
    root = tmp_path / "root"
    drop(root / "inbox", "mine.jsonl", requests(3))
    env = daemon_env(emulator, root)
    log = tmp_path / "daemon.log"
    crashing = await DaemonProcess.start(
        {**env, "BATCHD_FAILPOINTS": "create.after_request=kill"}, log
    )
    assert await asyncio.wait_for(crashing.wait(), 30) == -signal.SIGKILL
    # Another client of the same key fills the newest pages.
    foreign = await api.upload_ok(requests(2), "other.jsonl")
    for _ in range(30):
        await api.create_ok(foreign, ENDPOINT_CHAT)
    async with daemon_process(env, log) as daemon:
        await wait_ready(root, daemon)
        (folder,) = await wait_published(root / "outbox", 1, emulator)
    assert summary(folder)["status"] == "completed"
    stats = await emulator.stats()
    mine = {f: n for f, n in stats["batches_created_per_input_file"].items() if f != foreign}
    assert list(mine.values()) == [1], stats["batches_created_per_input_file"]
    assert stats["faults"]["list_filters_ignored"] >= 0  # the daemon sends no filter at all


async def test_a_list_that_never_ends_leaves_the_part_waiting_never_paying_twice(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A create whose connection drops may or may not have taken effect; a list whose
    `has_more` never ends cannot prove the batch absent: the part stays in CREATING with
    a note, is parked after max_part_failures, shows in status, and nothing is created
    again until `retry` (once the list behaves) proves it. One batch, whatever happened."""
    emulator = await start_emulator(
        time_scale=3000,
        faults={"drop_connection_rate": 1.0, "classes": ["create"], "endless_pages": True},
    )
    settings = daemon_settings(tmp_path / "root", emulator, max_part_failures=3)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "stuck.jsonl", requests(3))

        async def parked() -> Any:
            parts = await daemon.store.parts_in([PartState.PARKED])
            return parts[0] if parts else None

        part = await wait_for(parked)
        assert part.parked_from == PartState.CREATING
        assert "cannot tell whether its batch exists" in (part.error or "")
        status = await daemon.ops.status()
        assert not status.healthy
        (problem,) = [p for p in status.problems if p.kind == "part_parked"]
        assert problem.job_id == part.job_id and "parked after 3 failures" in problem.note
        sock = str(settings.socket_path)
        code = await asyncio.to_thread(main, ["status", "--socket", sock])
        out = capsys.readouterr().out
        assert code == 0 and "needs attention (1)" in out and "part parked" in out
        code = await asyncio.to_thread(main, ["check", "--socket", sock])
        assert code == 1 and "parked after 3 failures" in capsys.readouterr().err
        assert (await emulator.stats())["batches_created"] == 0  # never tried blindly
        emulator.set_faults(drop_connection_rate=0.0, endless_pages=False)
        answer = await daemon.ops.retry(part.job_id)
        assert answer is not None and answer.ok, answer
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    assert summary(folder)["status"] == "completed"
    stats = await emulator.stats()
    assert stats["batches_created"] == 1
    assert list(stats["batches_created_per_input_file"].values()) == [1]


async def test_garbled_numbers_and_times_fail_no_stage(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Every Batch object comes with request_counts as strings, lists or nonsense and
    times as ISO strings: the daemon neither crashes nor misreads an end; jobs publish."""
    emulator = await start_emulator(time_scale=3000, faults={"garbled_fields_rate": 1.0})
    settings = daemon_settings(tmp_path / "root", emulator, limits={"max_requests_per_file": 4})
    async with running_daemon(settings) as daemon:
        for i in range(3):
            drop(settings.paths.folder("inbox"), f"g{i}.jsonl", requests(9, prefix=f"g{i}-"))
        folders = await wait_published(settings.paths.folder("outbox"), 3, emulator)
        assert not daemon.stopping.is_set()
        assert daemon.ops.healthy
    for folder in folders:
        s = summary(folder)
        assert s["status"] == "completed", s
        assert s["request_counts"] == {"total": 9, "completed": 9, "failed": 0}
    stats = await emulator.stats()
    assert stats["faults"]["garbled_fields"] > 0
    assert set(stats["batches_created_per_input_file"].values()) == {1}


async def test_a_lost_upload_is_adopted_from_a_file_list_that_never_ends(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """An upload's answer is lost and the file list's `has_more` never ends: the settle
    reads a bounded number of pages, adopts the file it saw, and unrelated jobs get
    their batches meanwhile (the stage is never stuck following the list)."""
    emulator = await start_emulator(
        time_scale=3000,
        faults={"endless_pages": True, "lost_response_rate": 1.0, "classes": ["upload"]},
    )
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox = settings.paths.folder("inbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "lost.jsonl", requests(3))

        async def uncertain() -> bool:
            parts = await daemon.store.parts_in([PartState.UPLOADING])
            return bool(parts)

        await wait_for(uncertain)
        emulator.set_faults(lost_response_rate=0.0)
        drop(inbox, "other.jsonl", requests(2, prefix="o"))
        folders = await wait_published(settings.paths.folder("outbox"), 2, emulator)
        await wait_for(lambda: emulator.state.store.files == {}, emulator=emulator)
    for folder in folders:
        assert summary(folder)["status"] == "completed"
    stats = await emulator.stats()
    assert stats["faults"]["endless_pages"] > 0
    assert stats["calls"]["upload"]["served"] == 2  # the lost upload was adopted, not redone
    assert set(stats["batches_created_per_input_file"].values()) == {1}
    # Bounded: a handful of pages, not a loop following the server.
    assert stats["calls"]["files"]["served"] < 50


async def test_retry_twice_resubmits_once(start_emulator: StartEmulator, tmp_path: Path) -> None:
    """`batchd retry` on a published job run twice (a script repeating itself after a
    timeout) makes one retry input, and the second answer names it."""
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.5, seed=3)
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "twice.jsonl", requests(10))
        await wait_published(outbox, 1, emulator)
        job = await wait_for(
            lambda: _published_job(daemon, "twice"),
        )
        assert job.failed > 0
        answers = await asyncio.gather(daemon.ops.retry(job.id), daemon.ops.retry(job.id))
        third = await daemon.ops.retry(job.id)
        await wait_published(outbox, 2, emulator)
        await idle(daemon)  # more scans: nothing else may be claimed
        names = sorted(j.name for j in await daemon.store.jobs())
    messages = sorted(a.message for a in answers if a is not None)
    assert all(a is not None and a.ok for a in [*answers, third])
    assert messages[0].startswith("already resubmitted as twice-retry.jsonl"), messages
    assert messages[1].startswith("failed requests resubmitted as twice-retry.jsonl ("), messages
    assert third is not None and third.message.startswith("already resubmitted")
    assert names == ["twice", "twice-retry"]
    assert sorted(p.name for p in outbox.iterdir()) == ["twice", "twice-retry"]


async def _published_job(daemon: Any, name: str) -> Any:
    for job in await daemon.store.jobs():
        if job.name == name and job.state == "published":
            return job
    return None


async def test_a_lost_database_is_noticed_and_its_running_batch_adopted(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """The database (and its WAL) is lost while a batch runs. Start-up finds the spool
    folder the database does not know, says so loudly, re-creates the job, finds its
    remote file and batch by name and metadata, and publishes: no batch twice."""
    emulator = await start_emulator(time_scale=1, validating_s=3600)
    settings = daemon_settings(tmp_path / "root", emulator, limits={"max_requests_per_file": 2})
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "kept.jsonl", requests(5))

        async def all_running() -> bool:
            jobs = await daemon.store.jobs()
            if not jobs:
                return False
            parts = await daemon.store.parts_of(jobs[0].id)
            return len(parts) == 3 and all(p.state == PartState.RUNNING for p in parts)

        await wait_for(all_running)
    state = settings.paths.folder("state")
    for path in state.glob("batchd.sqlite3*"):
        path.unlink()
    async with running_daemon(settings) as daemon:
        status = await daemon.ops.status()
        assert not status.healthy
        (lost,) = [p for p in status.problems if p.kind == "state_lost"]
        assert "re-created" in lost.note
        (job,) = await daemon.store.jobs()
        assert job.name == "kept" and job.inbox_name == "kept.jsonl" and job.recovered_at
        emulator.advance(3600 + 600)
        (folder,) = await wait_published(outbox, 1, emulator)
        await wait_for(lambda: emulator.state.store.files == {}, emulator=emulator)
    s = summary(folder)
    assert s["status"] == "completed" and s["request_counts"]["completed"] == 5
    stats = await emulator.stats()
    assert stats["batches_created"] == 3
    assert set(stats["batches_created_per_input_file"].values()) == {1}
    assert stats["calls"]["upload"]["served"] == 3


async def test_an_inbox_on_another_filesystem_is_refused_at_start(
    tmp_path: Path, elsewhere: Path
) -> None:
    """Claiming is a rename into the spool; across filesystems every claim would fail
    forever. `batchd run` refuses to start, exit 2, with a message naming both."""
    inbox = elsewhere / "inbox"
    inbox.mkdir()
    env = {
        "BATCHD_API_KEY": "sk-test",
        "BATCHD_PROVIDER": "custom",
        "BATCHD_BASE_URL": "http://127.0.0.1:9/v1",
        "BATCHD_PATHS__ROOT": str(tmp_path / "root"),
        "BATCHD_PATHS__INBOX": str(inbox),
        "PATH": "/usr/bin:/bin",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2, err.decode()
    text = err.decode()
    assert "different filesystems" in text and str(inbox) in text
    assert "Traceback" not in text
    assert not any(p.name.startswith(".batchd-probe") for p in inbox.iterdir())


async def _extras_shown(
    sock: Path, capsys: pytest.CaptureFixture[str], name: str
) -> tuple[list[dict[str, Any]], str, str]:
    """The job's extra batches as `show --json` lists them, `show`'s text, and /metrics."""
    _, out, _ = await cli(capsys, "show", "--socket", str(sock), "--json", name)
    _, text, _ = await cli(capsys, "show", "--socket", str(sock), name)
    _, metrics = await RawControl(sock).call("GET", "/metrics")
    return json.loads(out)["extra_batches"], text, metrics


@pytest.mark.parametrize("answer", ["lost", "answered"])
async def test_every_batch_a_gateway_made_of_one_create_is_found_and_all_but_one_cancelled(
    start_emulator: StartEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    log_lines: io.StringIO,
    answer: str,
) -> None:
    """A gateway's own client sends a create upstream three times (LiteLLM's did). With
    its answer lost, settling the uncertain create lists every batch of the part; with
    the last batch's answer, the poll's list sweep meets the other two. Either way one is
    followed and the others are cancelled at once, logged, shown, counted and said to
    bill what they ran; their files are cleaned up."""
    emulator = await start_emulator(time_scale=1, validating_s=3600)
    emulator.set_faults(
        gateway_retry_rate=1.0,
        gateway_retries=2,
        lost_create_response_rate=1.0 if answer == "lost" else 0.0,
        classes=("create",),
    )
    settings = daemon_settings(tmp_path / "root", emulator)
    sock = settings.socket_path
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "thrice.jsonl", requests(3))

        def statuses() -> dict[str, str]:
            now = emulator.clock.now()
            return {i: b.phase(now).status for i, b in emulator.state.store.batches.items()}

        def cancelled() -> bool:
            return sum(s in ("cancelling", "cancelled") for s in statuses().values()) == 2

        await wait_for(cancelled, 20, "two of the three batches cancelled")
        (job,) = await daemon.store.jobs()

        async def followed() -> Any:
            # The extras are cancelled before the part is moved on to the batch it keeps
            # (a crash between the two finds them again), so that move may come a moment
            # after the cancels.
            (part,) = await daemon.store.parts_of(job.id)
            return part if part.batch_id is not None else None

        part = await wait_for(followed, 20, "the part follows the batch it keeps")
        extras, text, metrics = await _extras_shown(sock, capsys, "thrice")
        batches = emulator.state.store.batches
        assert len(batches) == 3 and part.batch_id in batches
        live = [i for i, status in statuses().items() if status == "validating"]
        assert live == [part.batch_id]  # the batch the part follows runs on
        assert sorted(e["batch_id"] for e in extras) == sorted(set(batches) - {part.batch_id})
        found_by = "settle" if answer == "lost" else "sweep"
        assert {(e["found_by"], e["kept_batch_id"]) for e in extras} == {(found_by, part.batch_id)}
        assert all("bill" in e["note"] for e in extras), extras
        assert "2 extra batch(es)" in text and "may still bill" in text
        assert metrics.count("batchd_extra_batches_total{") >= 1
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("batchd_extra_batches_total{")
        )
        assert counted == 2
        emulator.advance(3600 + 600)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        # The extras' result files, and the job's, are deleted from the account.
        await wait_for(lambda: emulator.state.store.files == {}, emulator=emulator)
    s = summary(folder)
    assert s["status"] == "completed" and s["request_counts"]["completed"] == 3
    assert s["parts"][0]["batch_id"] == part.batch_id
    assert len(s["extra_batches"]) == 2 and all("bill" in e["note"] for e in s["extra_batches"])
    found = events(log_lines, "extra_batch_found")
    assert sorted(e["batch_id"] for e in found) == sorted(e["batch_id"] for e in extras)
    stats = await emulator.stats()
    assert stats["faults"]["gateway_retried_creates"] == 2
    assert stats["batches_by_status"] == {"completed": 1, "cancelled": 2}
