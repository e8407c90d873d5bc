"""The daemon speaks sd_notify the way systemd expects (TESTING D.20): READY=1 only after
the store is open, recovery is done and the control socket listens; STATUS lines;
watchdog pings at half of WATCHDOG_USEC from the event loop, continuing while a big
file is validated (in a thread); STOPPING=1 on SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import orjson

from tests.conftest import StartEmulator
from tests.integration.daemon_harness import daemon_env, start_subprocess, wait_published
from tests.unit.test_notify import FakeSystemd


def big_input(lines: int, pad: int) -> bytes:
    text = "x" * pad
    return b"".join(
        orjson.dumps(
            {
                "custom_id": str(i),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "qwen-plus", "messages": [{"role": "user", "content": text}]},
            }
        )
        + b"\n"
        for i in range(lines)
    )


async def test_ready_status_watchdog_and_stopping(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    env = daemon_env(
        emulator,
        root,
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="1000000",
        BATCHD_INTAKE__SETTLE_S="0",
    )
    log = tmp_path / "daemon.log"
    proc = await start_subprocess(env, log)
    try:
        for _ in range(200):
            if "READY=1" in fake.texts():
                break
            await asyncio.sleep(0.02)
        assert "READY=1" in fake.texts(), log.read_text()[-2000:]
        # READY came after the control socket existed and after recovery.
        assert (root / "control.sock").exists()
        texts = fake.texts()
        assert texts.index("STATUS=recovering") < texts.index("READY=1")
        # A 40 MB file is validated off the loop: the pings must not pause for it.
        content = big_input(2000, 20_000)
        tmp = root / "inbox" / ".big.tmp"
        tmp.write_bytes(content)
        before = len(fake.times("WATCHDOG=1"))
        tmp.rename(root / "inbox" / "big.jsonl")
        await wait_published(root / "outbox", 1, emulator, timeout_s=60)
        pings = fake.times("WATCHDOG=1")
        assert len(pings) > before + 2
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 1.0  # never a full WATCHDOG_USEC without a ping
        assert any(t.startswith("STATUS=") and "batches running" in t for t in fake.texts())
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        deadline = time.monotonic() + 2
        while "STOPPING=1" not in fake.texts() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert "STOPPING=1" in fake.texts()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        fake.close()
