"""Servers and inputs that misbehave at the collect and publish end (issue 12).

Nothing lost, nothing paid twice: result lines a strict parser refuses are published
byte for byte; a result file that answers 404 (or keeps failing) is given up with its
requests reported as `result_unavailable` instead of being downloaded forever; one
dripping download never holds the others; a result line of 100 MB never enters memory
whole; result.csv never carries a formula; a dangling symlink never blocks the outbox;
the outbox keeps a copy of exactly the validated input (bytes appended after the claim
are kept apart); an input rejected unread is moved, never copied. Every test runs the
real daemon against the shipped emulator over loopback.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.emulator import Emulator
from batchd.inputs.lines import custom_id_of, read_line
from batchd.models import PartState
from batchd.testing import (
    DaemonProcess,
    StartEmulator,
    daemon_env,
    daemon_settings,
    drop,
    events,
    published_jobs,
    read_jsonl,
    requests,
    running_daemon,
    seconds_of,
    summary,
    wait_for,
    wait_published,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)


def csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")))


def served_lines(emulator: Emulator, file_id: str) -> list[bytes]:
    """The lines of a result file as the emulator stores it (read from its disk)."""
    path = emulator.state.store.files[file_id].path
    return path.read_bytes().splitlines(keepends=True)


def request_line(custom_id: str) -> bytes:
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": "hello"}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return orjson.dumps(line) + b"\n"


# -- 1. paid results are never thrown away ----------------------------------------------


async def test_result_lines_a_strict_parser_refuses_are_published_byte_for_byte(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Every success line of `odd` is written so that orjson refuses it (a lone
    surrogate, NaN, 1e400, a line cut in half): all are published, none is missing."""
    emulator = await start_emulator(
        time_scale=3000, faults={"odd_lines_rate": 1.0, "batch_match": "odd"}
    )
    settings = daemon_settings(tmp_path / "root", emulator, jobs={"delete_remote_files": False})
    outbox = settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "odd.jsonl", requests(8))
        drop(settings.paths.folder("inbox"), "plain.jsonl", requests(2, prefix="p"))
        await wait_published(outbox, 2, emulator)
        await published_jobs(daemon, 2)
    assert (await emulator.stats())["faults"].get("odd_lines") == 8
    s = summary(outbox / "odd")
    assert s["status"] == "completed", s
    assert s["request_counts"] == {"total": 8, "completed": 8, "failed": 0}
    assert s["unattributed"] == 0 and s["never_run"] == 0
    results = (outbox / "odd" / "result.jsonl").read_bytes().splitlines(keepends=True)
    served = served_lines(emulator, s["parts"][0]["output_file_id"])
    assert sorted(results) == sorted(served)  # every paid line, byte for byte
    assert [custom_id_of(x) for x in results] == [f"r{i}" for i in range(8)]  # input order

    def strict(line: bytes) -> bool:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        return True

    assert not any(strict(x) for x in results)
    # Usage is summed from the lines that parse at all (the cut ones do not).
    parsed = [read_line(x) for x in served]
    expected = sum(p["response"]["body"]["usage"]["total_tokens"] for p in parsed if p)
    assert expected > 0 and s["usage"]["total_tokens"] == expected
    rows = csv_rows(outbox / "odd" / "result.csv")
    assert [r[0] for r in rows[1:]] == [f"r{i}" for i in range(8)]
    assert summary(outbox / "plain")["status"] == "completed"


# -- 2. a result file that cannot be fetched is not downloaded forever ------------------


async def test_a_result_file_answering_404_is_given_up_at_once(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(
        time_scale=3000, faults={"content_missing_rate": 1.0, "batch_match": "gone"}
    )
    settings = daemon_settings(tmp_path / "root", emulator)
    outbox = settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "gone.jsonl", requests(3))
        drop(settings.paths.folder("inbox"), "fine.jsonl", requests(2, prefix="f"))
        await wait_published(outbox, 2, emulator)
        await published_jobs(daemon, 2)
        # The 404 file is deleted as usual (it exists; only its content is missing).
        await wait_for(
            lambda: not emulator.state.store.files, 20, "remote files deleted", step_s=0.02
        )
        assert (await daemon.ops.status()).healthy
    s = summary(outbox / "gone")
    assert s["status"] == "failed"
    assert s["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert (s["result_unavailable"], s["never_run"]) == (3, 0)
    (part,) = s["parts"]
    assert part["unavailable"]["output"].startswith("HTTP 404")
    assert part["kept_on_service"] == [] and "result_unavailable" in part["note"]
    errors = read_jsonl(outbox / "gone" / "error.jsonl")
    assert [e["input_line"] for e in errors] == [1, 2, 3]
    for error in errors:
        assert error["error"]["code"] == "result_unavailable"
        assert part["output_file_id"] in error["error"]["message"]
        assert "404" in error["error"]["message"]
    # Fetched once, not every five seconds for ever.
    assert (await emulator.stats())["faults"]["content_missing"] == 1
    assert summary(outbox / "fine")["status"] == "completed"


async def test_a_result_file_that_keeps_failing_is_given_up_and_left_on_the_service(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    emulator = await start_emulator(
        time_scale=3000, faults={"error_5xx_rate": 1.0, "classes": ["download"]}
    )
    settings = daemon_settings(
        tmp_path / "root", emulator, max_part_failures=3, api={"max_attempts": 1}
    )
    outbox = settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "flaky.jsonl", requests(2))
        await wait_published(outbox, 1, emulator)
        await published_jobs(daemon, 1)
        s = summary(outbox / "flaky")
        (part,) = s["parts"]
        await wait_for(
            lambda: part["input_file_id"] not in emulator.state.store.files,
            20,
            "the input file deleted",
            step_s=0.02,
        )
    assert len(events(log_lines, "download_failed")) == 2  # then the third gives up
    assert s["status"] == "failed" and s["result_unavailable"] == 2
    reason = part["unavailable"]["output"]
    assert reason.startswith("gave up after 3 failures: HTTP 500"), reason
    # It may still be fetchable: never deleted, and said so.
    assert part["kept_on_service"] == [part["output_file_id"]]
    assert part["output_file_id"] in emulator.state.store.files
    assert "left on the service" in part["note"]
    (error, _) = read_jsonl(outbox / "flaky" / "error.jsonl")
    assert error["error"]["code"] == "result_unavailable"


# -- 3. one slow download never blocks the others ---------------------------------------


async def test_one_dripping_download_does_not_hold_the_other_jobs(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grace_s = 5.0
    emulator = await start_emulator(
        time_scale=3000,
        faults={"drip_rate": 1.0, "drip_bytes_per_s": 100.0, "batch_match": "slow"},
    )
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        max_part_failures=2,
        api={"max_attempts": 1, "download_min_bytes_per_s": 1000.0, "download_grace_s": grace_s},
    )
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        # The slow job first: one download at a time would queue the others behind it.
        drop(inbox, "slow.jsonl", requests(3))
        await wait_for(daemon.store.jobs, 10, "the slow job claimed", step_s=0.02)
        for i in range(5):
            drop(inbox, f"fast{i}.jsonl", requests(2, prefix=f"f{i}-"))
        fast = await wait_published(outbox, 5, emulator)
        assert "slow" not in [f.name for f in fast]
        (slow_job,) = (await daemon.ops.jobs(None, "slow", 10, 0)).jobs
        (slow_part,) = await daemon.store.parts_of(slow_job.id)
        assert slow_part.state == PartState.ENDED  # still dripping
        await wait_published(outbox, 6, emulator, timeout_s=40)
        await published_jobs(daemon, 6)
    s = summary(outbox / "slow")
    slow_ended = seconds_of(s["timings"]["batches_ended_at"][0])
    after = [
        seconds_of(summary(outbox / f"fast{i}")["timings"]["published_at"]) - slow_ended
        for i in range(5)
    ]
    slow_published = seconds_of(s["timings"]["published_at"])
    with capsys.disabled():
        print(
            f"\n[drip] 5 other jobs published {max(after):.2f} s at most after the dripping"
            f" batch ended; the drip given up after"
            f" {slow_published - slow_ended:.1f} s (grace {grace_s} s, 2 tries)"
        )
    for i, delay in enumerate(after):
        # Out before the dripping download's first cut (grace_s after it started, at
        # the earliest when its batch ended): one at a time, they would all come after.
        assert delay < grace_s, (i, delay)
        assert summary(outbox / f"fast{i}")["status"] == "completed"
    # The drip was cut by the throughput deadline, tried again, then given up.
    assert slow_published - slow_ended >= 2 * grace_s
    reason = s["parts"][0]["unavailable"]["output"]
    assert reason.startswith("gave up after 2 failures: download too slow"), reason
    assert s["status"] == "failed" and s["result_unavailable"] == 3


# -- 4. memory stays bounded whatever a line's length -----------------------------------


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(),
    reason="the daemon's peak memory is read from /proc/PID/status (Linux only)",
)
async def test_a_100_mb_result_line_never_enters_the_daemons_memory(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = 100_000_000
    emulator = await start_emulator(
        time_scale=3000, faults={"huge_line_bytes": huge, "batch_match": "huge"}
    )
    root = tmp_path / "root"
    env = daemon_env(
        emulator,
        root,
        BATCHD_JOBS__MAX_RESULT_LINE_BYTES=str(1 << 20),
        BATCHD_JOBS__DELETE_REMOTE_FILES="false",
    )
    process = await DaemonProcess.start(env, tmp_path / "daemon.log")
    try:
        await wait_ready(root, process)
        baseline = peak_rss_bytes(process.pid)
        drop(root / "inbox", "huge.jsonl", requests(2))
        (folder,) = await wait_published(root / "outbox", 1, emulator, timeout_s=90)
        peak = peak_rss_bytes(process.pid)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
    with capsys.disabled():
        print(f"\n[huge-line] line={huge} bytes daemon peak RSS={peak / 1e6:.1f} MB")
    assert peak < 150_000_000, f"peak RSS {peak} bytes (before the job: {baseline})"
    s = summary(folder)
    assert s["status"] == "completed" and s["request_counts"]["completed"] == 2
    result = folder / "result.jsonl"
    assert result.stat().st_size > huge
    # Byte for byte what was served, compared by digest, line by line.
    served = emulator.state.store.files[s["parts"][0]["output_file_id"]].path
    assert sorted(_line_digests(result)) == sorted(_line_digests(served))
    rows = csv_rows(folder / "result.csv")
    assert sum(r[7].startswith("[line of ") and "see result.jsonl" in r[7] for r in rows) == 1


def _line_digests(path: Path) -> list[str]:
    digests = []
    with path.open("rb") as fh:
        digest = hashlib.sha256()
        while chunk := fh.readline(1 << 20):
            digest.update(chunk)
            if chunk.endswith(b"\n"):
                digests.append(digest.hexdigest())
                digest = hashlib.sha256()
    return digests


# -- 5. no formula in result.csv --------------------------------------------------------


async def test_result_csv_never_carries_a_formula(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    outbox = settings.paths.folder("outbox")
    ids = ['=HYPERLINK("http://x","y")', "+1-555", "-2+3", "@SUM(A1)", "\t=1", "\r=2", "plain"]
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "cells.jsonl", b"".join(map(request_line, ids)))
        (folder,) = await wait_published(outbox, 1, emulator)
    assert [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] == ids  # kept as sent
    rows = csv_rows(folder / "result.csv")
    assert [r[0] for r in rows[1:]] == [f"'{i}" for i in ids[:-1]] + ["plain"]


# -- 6. a dangling symlink in the outbox -------------------------------------------------


async def test_a_dangling_symlink_at_the_outbox_name_is_skipped(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    outbox = settings.paths.folder("outbox")
    outbox.mkdir(parents=True)
    (outbox / "report").symlink_to(tmp_path / "nowhere")
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "report.jsonl", requests(2))
        await wait_published(outbox, 1, emulator)  # the symlink is not a published folder
    assert summary(outbox / "report-2")["status"] == "completed"
    assert (outbox / "report").is_symlink() and not (outbox / "report").exists()
    assert not events(log_lines, "publish_failed")


# -- 7. the outbox keeps a copy of exactly the validated input --------------------------


async def test_bytes_appended_after_the_claim_are_kept_apart_not_sent_or_published_as_input(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    # At time scale 1 the batch takes minutes of service time: it ends only when the
    # test moves the clock (wait_published does), so the append surely comes first.
    emulator = await start_emulator(time_scale=1)
    settings = daemon_settings(tmp_path / "root", emulator)
    outbox = settings.paths.folder("outbox")
    original, late = requests(3), requests(3, prefix="late")
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "grow.jsonl", original)

        async def running() -> Any:
            jobs = await daemon.store.jobs()
            parts = await daemon.store.parts_of(jobs[0].id) if jobs else []
            return jobs if parts and parts[0].state == PartState.RUNNING else None

        jobs = await wait_for(running, 20, "the batch created", step_s=0.02)
        append(Path(jobs[0].spool_path), late)
        (folder,) = await wait_published(outbox, 1, emulator)
    s = summary(folder)
    assert s["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert (folder / "input.jsonl").read_bytes() == original
    assert (folder / "unsent.jsonl").read_bytes() == late
    changed = s["input_changed"]
    assert changed["appended_bytes"] == len(late) and not changed["modified_in_place"]
    assert "drop them again as a new file" in changed["note"]
    assert [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] == ["r0", "r1", "r2"]


def append(path: Path, data: bytes) -> None:
    """A producer still holding the file open writes on after the claim."""
    with path.open("ab") as fh:
        fh.write(data)


# -- 8. an input rejected unread is moved, not copied ------------------------------------


def sparse_input(inbox: Path, name: str, size: int) -> Path:
    """A file of `size` bytes that takes almost no blocks (a hole after one line)."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    with tmp.open("wb") as fh:
        fh.write(request_line("r0"))
        fh.truncate(size)
    past = time.time() - 10
    os.utime(tmp, (past, past))
    tmp.rename(inbox / name)
    return inbox / name


async def test_an_input_rejected_unread_is_moved_into_the_outbox_not_copied(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        jobs={"max_input_bytes": 1 << 20},
        intake={"unterminated_settle_s": 0.05},
    )
    outbox, spool = settings.paths.folder("outbox"), settings.paths.folder("spool")
    dropped = sparse_input(settings.paths.folder("inbox"), "big.jsonl", 4 << 30)
    inode = dropped.stat().st_ino
    async with running_daemon(settings) as daemon:
        (folder,) = await wait_published(outbox, 1, None)
        await published_jobs(daemon, 1)
    s = summary(folder)
    assert s["status"] == "rejected" and s["input"]["sha256"] is None
    assert [e["error"]["code"] for e in read_jsonl(folder / "error.jsonl")] == ["input_too_large"]
    kept = os.stat(folder / "input.jsonl")
    # The very file dropped (a rename at each step), not 4 GiB written out again.
    assert kept.st_ino == inode and kept.st_size == 4 << 30 and kept.st_blocks * 512 < 1 << 20
    assert s["input_kept_at"] is None
    assert [p for p in spool.iterdir() if not p.name.startswith(".")] == []


async def test_an_input_rejected_unread_stays_in_the_spool_when_the_outbox_is_elsewhere(
    start_emulator: StartEmulator, tmp_path: Path, elsewhere: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    outbox = elsewhere / "outbox"
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        paths={"root": tmp_path / "root", "outbox": outbox},
        jobs={"max_input_bytes": 1 << 20},
        intake={"unterminated_settle_s": 0.05},
    )
    dropped = sparse_input(settings.paths.folder("inbox"), "big.jsonl", 4 << 30)
    inode = dropped.stat().st_ino
    async with running_daemon(settings) as daemon:
        (folder,) = await wait_published(outbox, 1, None)
        await published_jobs(daemon, 1)
    s = summary(folder)
    assert s["status"] == "rejected"
    kept_at = Path(s["input_kept_at"])
    # Left where it was (a rename cannot cross filesystems, a copy would be 4 GiB).
    assert kept_at.stat().st_ino == inode and kept_at.parent.parent == settings.paths.folder(
        "spool"
    )
    assert not (folder / "input.jsonl").exists()
