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

from batchd.testing import (
    FakeSystemd,
    StartEmulator,
    daemon_env,
    daemon_process,
    requests,
    wait_for,
    wait_published,
)


async def test_ready_status_watchdog_and_stopping(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    env = daemon_env(
        emulator,
        root,
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        WATCHDOG_USEC="1000000",
        BATCHD_INTAKE__SETTLE_S="0",
    )
    log = tmp_path / "daemon.log"
    with FakeSystemd(str(tmp_path / "notify.sock")) as fake:
        async with daemon_process(env, log) as proc:
            await wait_for(
                lambda: "READY=1" in fake.texts(),
                4,
                lambda: f"READY=1 sent:\n{log.read_text()[-2000:]}",
                step_s=0.02,
            )
            # READY came after the control socket existed and after recovery.
            assert (root / "control.sock").exists()
            texts = fake.texts()
            assert texts.index("STATUS=recovering") < texts.index("READY=1")
            # A 40 MB file is validated off the loop: the pings must not pause for it.
            messages = [{"role": "user", "content": "x" * 20_000}]
            content = requests(2000, messages=messages)
            tmp = root / "inbox" / ".big.tmp"
            tmp.write_bytes(content)
            started = time.monotonic()
            tmp.rename(root / "inbox" / "big.jsonl")
            await wait_published(root / "outbox", 1, emulator, timeout_s=60)
            ended = time.monotonic()
            # From the drop to the publication (however short it is), never a full
            # WATCHDOG_USEC without a ping (they come every half of it).
            pings = [at for at in fake.times("WATCHDOG=1") if started <= at <= ended]
            assert pings, "no ping while the file was validated and published"
            gaps = [b - a for a, b in itertools.pairwise([started, *pings, ended])]
            assert max(gaps) < 1.0, gaps
            assert any(t.startswith("STATUS=") and "batches running" in t for t in fake.texts())
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        await wait_for(lambda: "STOPPING=1" in fake.texts(), 2, "STOPPING=1 sent", step_s=0.02)
