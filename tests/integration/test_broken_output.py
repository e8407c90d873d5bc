"""The daemon's output stream breaks under it (issue 16): the reader of its stdout and
stderr pipe goes away, as with `batchd run | head` or a journald restart. Log lines are
dropped and counted; work, signals and the control socket go on as before, and
`status`, `check` and /metrics say that logging is broken."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from batchd.testing import (
    RawControl,
    StartEmulator,
    cli,
    daemon_env,
    daemon_process,
    drop,
    requests,
    summary,
    wait_published,
    wait_ready,
)


@pytest.mark.parametrize("ending", ["sigterm", "drain"])
async def test_a_daemon_whose_output_reader_went_away_works_and_stops_cleanly(
    start_emulator: StartEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ending: str,
) -> None:
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    env = daemon_env(emulator, root, BATCHD_LOG__LEVEL="debug")
    read_end, write_end = os.pipe()
    try:
        async with daemon_process(env, tmp_path / "daemon.log", output=write_end) as proc:
            os.close(write_end)
            write_end = -1
            await wait_ready(root, proc)
            assert os.read(read_end, 65536)  # it logged to the pipe while it could
            os.close(read_end)  # the reader goes away mid-run
            read_end = -1
            drop(root / "inbox", "work.jsonl", requests(5))
            (folder,) = await wait_published(root / "outbox", 1, emulator, timeout_s=30)
            assert summary(folder)["request_counts"]["completed"] == 5
            proc.send_signal(signal.SIGPIPE)  # ignored, as Python sets it up

            control = RawControl(root / "control.sock")
            code, status = await control.call("GET", "/v1/status")
            assert code == 200 and proc.returncode is None
            assert status["log_lines_dropped"] > 0
            assert not status["healthy"]
            (problem,) = [p for p in status["problems"] if p["kind"] == "logging"]
            assert "EPIPE" in problem["note"]
            code, exposed = await control.call("GET", "/metrics")
            dropped = next(
                line for line in exposed.splitlines() if line.startswith("batchd_log_lines_")
            )
            assert float(dropped.split()[-1]) > 0
            sock = str(root / "control.sock")
            check, _out, err = await cli(capsys, "check", "--socket", sock)
            assert check == 1 and "log output broken" in err

            if ending == "drain":
                code, answer = await control.call("POST", "/v1/drain")
                assert code == 200 and answer["ok"]
                assert await asyncio.wait_for(proc.wait(), 30) == 0
            # Else the block's end sends SIGTERM, and fails unless it exits 0.
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
