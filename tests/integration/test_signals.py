"""Signals as systemd sends them (TESTING D.21, issue 6): SIGTERM stops cleanly mid-work
and the next start finishes the work; SIGHUP reloads what can change live."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.conftest import StartEmulator
from tests.integration.daemon_harness import (
    daemon_env,
    requests,
    start_subprocess,
    summary,
    wait_published,
)


async def test_sigterm_during_uploads_exits_cleanly_and_a_restart_finishes(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000, limits={"max_requests_per_file": 5})
    emulator.set_faults(latency_min_s=0.3, latency_max_s=0.3, classes=("upload", "download"))
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    (root / "inbox" / ".w.tmp").write_bytes(requests(40))
    (root / "inbox" / ".w.tmp").rename(root / "inbox" / "work.jsonl")
    env = daemon_env(
        emulator, root, BATCHD_LIMITS__MAX_REQUESTS_PER_FILE="5", BATCHD_API__CONCURRENCY="2"
    )
    log = tmp_path / "daemon.log"
    proc = await start_subprocess(env, log)
    for _ in range(400):  # until the uploads are under way
        if (await emulator.stats())["calls"]["upload"]["served"] >= 1:
            break
        await asyncio.sleep(0.02)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, log.read_text()[-2000:]
    assert time.monotonic() - started < 25  # well inside systemd's TimeoutStopSec
    assert not list((root / "outbox").iterdir())
    again = await start_subprocess(env, log)
    try:
        (folder,) = await wait_published(root / "outbox", 1, emulator, timeout_s=60)
    finally:
        again.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(again.wait(), 30) == 0
    s = summary(folder)
    assert s["status"] == "completed" and s["request_counts"]["completed"] == 40
    assert set((await emulator.stats())["batches_created_per_input_file"].values()) == {1}


async def test_sighup_reloads_what_can_change_and_names_what_needs_a_restart(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    root = tmp_path / "root"
    config = tmp_path / "batchd.toml"
    config.write_text("[poll]\ninterval_s = 60.0\n")
    env = daemon_env(emulator, root, BATCHD_LOG__LEVEL="info")
    log = tmp_path / "daemon.log"
    import sys

    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batchd",
            "run",
            "--config",
            str(config),
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        for _ in range(200):
            if b"daemon_started" in log.read_bytes():
                break
            await asyncio.sleep(0.05)
        config.write_text('[jobs]\ncompletion_window = "48h"\n[limits]\nrunning_batches = 10\n')
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if b"configuration_reloaded" in log.read_bytes():
                break
            await asyncio.sleep(0.05)
        text = log.read_text()
        assert "configuration_reloaded" in text
        line = next(x for x in text.splitlines() if "configuration_reloaded" in x)
        assert '"applied":["jobs"]' in line and '"needs_restart":["limits"]' in line
        assert proc.returncode is None  # still running
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
