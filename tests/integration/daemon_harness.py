"""Run the real daemon in-process against an in-process emulator, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from batchd.config import Settings
from batchd.daemon import Daemon
from batchd.emulator import Emulator
from batchd.intake import Intake
from batchd.store import Store

KEY = "sk-emulator-test-key"


def daemon_settings(root: Path, emulator: Emulator, **overrides: Any) -> Settings:
    """Settings tuned for tests: fast intake and polling, the emulator as provider."""
    values: dict[str, Any] = {
        "provider": "custom",
        "base_url": emulator.base_url,
        "paths": {"root": root},
        "intake": {"settle_s": 0.05, "rescan_interval_s": 0.1, "watch": False},
        "poll": {"first_poll_s": 0.05, "interval_s": 0.1, "jitter": 0.0},
        "api": {
            "backoff_base_s": 0.02,
            "backoff_cap_s": 0.2,
            "timeout_s": 10.0,
            "settle_after_s": 0.05,
            "step_retry_base_s": 0.05,
            "step_retry_cap_s": 0.5,
        },
        "log": {"level": "warning"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return Settings.load(None, **values)


@asynccontextmanager
async def running(settings: Settings, key: str = KEY) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, key)
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(on_ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise AssertionError("daemon stopped before it was ready")
    try:
        yield daemon
    finally:
        daemon.request_stop()
        code = await asyncio.wait_for(task, 30)
        assert code == 0, f"daemon exited {code}"


def drop(inbox: Path, name: str, content: bytes) -> Path:
    """Drop a file the way a careful user does: temp name, then rename."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(content)
    past = time.time() - 10
    os.utime(tmp, (past, past))
    final = inbox / name
    tmp.rename(final)
    return final


async def wait_published(
    outbox: Path,
    count: int,
    emulator: Emulator | None = None,
    timeout_s: float = 30.0,
    advance_s: float = 60.0,
) -> list[Path]:
    """Wait until `count` job folders are in the outbox, and the database (in the usual
    layout, ROOT/state beside ROOT/outbox) says as many jobs are published: the folder
    appears a moment before the row says so. Moves the service clock on meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = (
            sorted(p for p in outbox.iterdir() if not p.name.startswith(".") and not p.is_symlink())
            if outbox.exists()
            else []
        )
        if len(found) >= count and _published_rows(outbox) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} jobs published in {timeout_s} s")
        if emulator is not None:
            emulator.advance(advance_s)
        await asyncio.sleep(0.05)


def _published_rows(outbox: Path) -> int:
    """Published jobs in the database beside the outbox; a large number where there is no
    such database (another layout), so that only the folders count."""
    path = outbox.parent / "state" / "batchd.sqlite3"
    if not path.exists():
        return 1 << 30
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'published'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


async def published_jobs(daemon: Daemon, count: int, timeout_s: float = 10.0) -> list[Any]:
    """The daemon's jobs once `count` of them are published in its database: an outbox
    folder appears (the rename) a moment before the job's row says so."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = await daemon.store.jobs()
        if sum(j.state == "published" for j in jobs) >= count:
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} jobs not marked published in {timeout_s} s: {jobs}")
        await asyncio.sleep(0.02)


async def wait_for(check: Any, timeout_s: float = 20.0, emulator: Emulator | None = None) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy, moving the
    emulator's clock on when one is given."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert loop.time() < deadline, "condition not met in time"
        if emulator is not None:
            emulator.advance(30)
        await asyncio.sleep(0.05)


def bare_intake(
    store: Store, inbox: Path, spool: Path, unterminated_settle_s: float = 0.0
) -> Intake:
    """The real `Intake` without a daemon around it: files settle at once."""
    return Intake(
        store,
        inbox,
        spool,
        settle_s=0.0,
        unterminated_settle_s=unterminated_settle_s,
        suffixes=(".jsonl",),
        on_claimed=lambda: None,
    )


def summary(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((folder / "summary.json").read_bytes())
    return data


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def requests(
    n: int, model: str = "qwen-plus", url: str = "/v1/chat/completions", prefix: str = "r"
) -> bytes:
    lines = [
        orjson.dumps(
            {
                "custom_id": f"{prefix}{i}",
                "method": "POST",
                "url": url,
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"question {i}"}],
                },
            }
        )
        for i in range(n)
    ]
    return b"\n".join(lines) + b"\n"


def daemon_env(emulator: Emulator, root: Path, **extra: str) -> dict[str, str]:
    """Environment for a `batchd run` subprocess with the test settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "DASHSCOPE_"))}
    env.update(
        {
            "BATCHD_API_KEY": KEY,
            "BATCHD_PROVIDER": "custom",
            "BATCHD_BASE_URL": emulator.base_url,
            "BATCHD_PATHS__ROOT": str(root),
            "BATCHD_INTAKE__SETTLE_S": "0.05",
            "BATCHD_INTAKE__RESCAN_INTERVAL_S": "0.1",
            "BATCHD_INTAKE__WATCH": "false",
            "BATCHD_POLL__FIRST_POLL_S": "0.05",
            "BATCHD_POLL__INTERVAL_S": "0.1",
            "BATCHD_POLL__JITTER": "0",
            "BATCHD_API__BACKOFF_BASE_S": "0.02",
            "BATCHD_API__BACKOFF_CAP_S": "0.2",
            "BATCHD_API__SETTLE_AFTER_S": "0.05",
            "BATCHD_API__STEP_RETRY_BASE_S": "0.05",
            "BATCHD_API__STEP_RETRY_CAP_S": "0.5",
            "BATCHD_LOG__LEVEL": "warning",
            "BATCHD_LOG__FORMAT": "json",
        }
    )
    env.update(extra)
    return env


async def start_subprocess(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    import sys

    log_file = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchd", "run", env=env, stdout=log_file, stderr=log_file
        )
    finally:
        log_file.close()


async def wait_outbox_quiet(
    outbox: Path, count: int, emulator: Emulator, timeout_s: float = 30.0
) -> list[Path]:
    """`wait_published`, for a daemon in another process."""
    return await wait_published(outbox, count, emulator, timeout_s)


async def wait_ready(
    root: Path, process: asyncio.subprocess.Process | None = None, timeout_s: float = 30.0
) -> dict[str, Any]:
    """Wait until the daemon under `root` answers on its control socket (it is ready:
    store open, recovery done); with `process`, the answer must come from that one.
    Returns its status. A stale socket left by a killed daemon does not count."""
    from batchd.control import ControlClient

    client = ControlClient(root / "control.sock", timeout_s=2.0)
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.returncode is not None:
            raise AssertionError(f"the daemon exited {process.returncode} before it was ready")
        try:
            status_code, body = await client.call("GET", "/v1/status")
        except OSError:
            status_code, body = 0, None
        if status_code == 200 and (process is None or body["pid"] == process.pid):
            answer: dict[str, Any] = body
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon under {root} was not ready in {timeout_s} s")
        await asyncio.sleep(0.05)
