"""Crash the daemon (SIGKILL) at every named fail point; after a restart the end state
equals the run without a crash: one remote batch per part, nothing lost, nothing
published twice, no remote file left behind (TESTING.md B.9)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import pytest

from batchd.failpoints import NAMES
from tests.conftest import StartEmulator
from tests.integration.daemon_harness import (
    daemon_env,
    jsonl,
    requests,
    start_subprocess,
    summary,
    wait_published,
)

pytestmark = pytest.mark.timeout(120)


async def _run_to_crash_then_finish(
    start_emulator: StartEmulator, tmp_path: Path, failpoint: str
) -> tuple[Path, dict]:
    emulator = await start_emulator(time_scale=3000, limits={"max_requests_per_file": 30})
    root = tmp_path / "root"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    content = requests(50)
    (inbox / ".big.jsonl.tmp").write_bytes(content)
    (inbox / ".big.jsonl.tmp").rename(inbox / "big.jsonl")
    env = daemon_env(emulator, root, BATCHD_LIMITS__MAX_REQUESTS_PER_FILE="30")
    log = tmp_path / "daemon.log"

    crashing = await start_subprocess({**env, "BATCHD_FAILPOINTS": f"{failpoint}=kill"}, log)

    async def advance_until_exit() -> int:
        while crashing.returncode is None:
            emulator.advance(60)
            try:
                await asyncio.wait_for(crashing.wait(), 0.05)
            except TimeoutError:
                pass
        return crashing.returncode

    code = await asyncio.wait_for(advance_until_exit(), 60)
    assert code == -signal.SIGKILL, f"{failpoint} was not reached: {log.read_text()[-2000:]}"

    clean = await start_subprocess(env, log)
    try:
        (folder,) = await wait_published(root / "outbox", 1, emulator, timeout_s=60)
        # Let the remote clean-up finish.
        for _ in range(200):
            stats = await emulator.stats()
            if stats["files_stored"]["count"] == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        clean.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(clean.wait(), 30) == 0, log.read_text()[-3000:]
    stats = await emulator.stats()
    with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return folder, stats


@pytest.mark.parametrize("failpoint", sorted(NAMES))
async def test_kill_at_fail_point_then_restart_equals_a_clean_run(
    start_emulator: StartEmulator, tmp_path: Path, failpoint: str
) -> None:
    folder, stats = await _run_to_crash_then_finish(start_emulator, tmp_path, failpoint)
    assert folder.name == "big"
    s = summary(folder)
    assert s["status"] == "completed"
    assert s["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
    assert [r["custom_id"] for r in jsonl(folder / "result.jsonl")] == [f"r{i}" for i in range(50)]
    # One remote batch per part, and no other.
    assert len(s["parts"]) == 2
    per_file = stats["batches_created_per_input_file"]
    assert sorted(per_file) == sorted(p["input_file_id"] for p in s["parts"])
    assert set(per_file.values()) == {1}
    # Nothing left on the account, nothing half-published in the outbox.
    assert stats["files_stored"]["count"] == 0
    assert [p.name for p in folder.parent.iterdir()] == ["big"]
