"""Signals as systemd sends them (TESTING D.21, issue 6): SIGTERM stops cleanly mid-work
and the next start finishes the work; SIGHUP reloads what can change live."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from batchd.testing import (
    DaemonProcess,
    StartEmulator,
    daemon_env,
    daemon_process,
    requests,
    summary,
    wait_for,
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
    proc = await DaemonProcess.start(env, log)

    async def uploading() -> bool:
        return bool((await emulator.stats())["calls"]["upload"]["served"] >= 1)

    await wait_for(uploading, 8, "the uploads under way", step_s=0.02)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, log.read_text()[-2000:]
    assert time.monotonic() - started < 25  # well inside systemd's TimeoutStopSec
    assert not list((root / "outbox").iterdir())
    async with daemon_process(env, log):
        (folder,) = await wait_published(root / "outbox", 1, emulator, timeout_s=60)
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
    async with daemon_process(env, log, "--config", str(config)) as proc:
        await wait_for(lambda: b"daemon_started" in log.read_bytes(), 10, "daemon_started logged")
        config.write_text('[jobs]\ncompletion_window = "48h"\n[limits]\nrunning_batches = 10\n')
        proc.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: b"configuration_reloaded" in log.read_bytes(), 10, "configuration_reloaded"
        )
        text = log.read_text()
        assert "configuration_reloaded" in text
        line = next(x for x in text.splitlines() if "configuration_reloaded" in x)
        assert '"applied":["jobs"]' in line and '"needs_restart":["limits"]' in line
        assert proc.returncode is None  # still running
