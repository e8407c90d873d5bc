"""sd_notify against a fake NOTIFY_SOCKET: what systemd would receive, and when."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd.systemd import (
    Notifier,
    notify_address,
    status_loop,
    status_text,
    watchdog_interval_s,
    watchdog_loop,
)
from batchd.testing import FakeSystemd, wait_for


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "notify.sock")
    if len(path) < 100:  # sun_path holds 108 bytes
        yield path
        return
    # A deep temporary folder: a short one of its own instead.
    short = tempfile.mkdtemp(prefix="bd-", dir="/tmp")
    try:
        yield os.path.join(short, "notify.sock")
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def systemd(socket_path: str) -> Iterator[FakeSystemd]:
    with FakeSystemd(socket_path) as fake:
        yield fake


@pytest.fixture
def notifier(socket_path: str, systemd: FakeSystemd) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": socket_path})


def test_ready_status_stopping_and_watchdog_reach_a_path_socket(
    notifier: Notifier, systemd: FakeSystemd
) -> None:
    assert notifier.enabled
    assert notifier.ready(status="recovered; 0 jobs queued")
    assert notifier.status("3 jobs queued,\n2 running")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert systemd.wait_for(4) == [
        "READY=1\nSTATUS=recovered; 0 jobs queued",
        # A newline would start a new assignment: the text stays on one line.
        "STATUS=3 jobs queued, 2 running",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_reloading_carries_the_monotonic_clock(notifier: Notifier, systemd: FakeSystemd) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    assert notifier.extend_timeout(90)
    reloading, extend = systemd.wait_for(2)
    first, second = reloading.split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=")
    assert int(second.removeprefix("MONOTONIC_USEC=")) >= before
    assert extend == "EXTEND_TIMEOUT_USEC=90000000"


def test_abstract_socket_address_with_at_sign() -> None:
    name = f"batchd-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert fake.wait_for(1) == ["READY=1"]
    finally:
        fake.close()


def test_without_notify_socket_every_call_is_a_quiet_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_a_vanished_socket_loses_the_message_without_raising(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_notify_address_accepts_paths_and_abstract_names_only() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@sd-notify") == "\0sd-notify"
    assert notify_address("@") is None
    assert notify_address("") is None
    assert notify_address(None) is None
    assert notify_address("relative/notify") is None
    assert notify_address("vsock:2:1234") is None


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    pid = os.getpid()
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(pid)}) == 0.1


async def _all_read(notifier: Notifier, systemd: FakeSystemd) -> list[str]:
    """What systemd has heard once everything sent so far is read: a last message sent
    now arrives after the others (datagrams on one socket keep their order)."""
    notifier.status("end")
    await wait_for(lambda: "STATUS=end" in systemd.texts(), 5, "the last message read")
    return systemd.texts()


def test_no_watchdog_for_a_foreign_pid_or_without_a_timeout() -> None:
    pid = os.getpid()
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, pid) is None
    assert watchdog_interval_s({}, pid) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, pid) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, pid) is None


async def test_watchdog_pings_at_half_of_watchdog_usec_until_stopped(
    notifier: Notifier, systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop))
    await wait_for(lambda: len(systemd.times("WATCHDOG=1")) >= 5, 5, "five pings")
    notifier.status("stop")
    stop.set()
    await asyncio.wait_for(task, 1)
    pings = systemd.times("WATCHDOG=1")
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert 0.07 <= gaps[len(gaps) // 2] <= 0.2, gaps
    # Datagrams arrive in order: once the last one is read, every ping sent before it is.
    texts = await _all_read(notifier, systemd)
    assert "WATCHDOG=1" not in texts[texts.index("STATUS=stop") :], "pinged after stop"


async def test_no_pings_when_watchdog_pid_is_another_process(
    notifier: Notifier, systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    stop = asyncio.Event()
    # Returns at once: there is nothing to ping for.
    await asyncio.wait_for(watchdog_loop(notifier, stop), 0.5)
    assert await _all_read(notifier, systemd) == ["STATUS=end"]


async def test_a_blocked_event_loop_stops_the_pings(
    notifier: Notifier, systemd: FakeSystemd
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop, interval_s=0.05))
    await wait_for(lambda: len(systemd.times("WATCHDOG=1")) >= 2, 5, "pings before the block")
    blocked_at = time.monotonic()
    time.sleep(0.5)  # noqa: ASYNC251 - the point: a loop blocked as a stuck daemon's
    unblocked_at = time.monotonic()

    def resumed() -> bool:
        return sum(at > unblocked_at for at in systemd.times("WATCHDOG=1")) >= 2

    await wait_for(resumed, 5, "pings after the block")
    stop.set()
    await asyncio.wait_for(task, 1)
    pings = systemd.times("WATCHDOG=1")
    # A working loop would ping about eight times in this window; the margin only
    # allows for a ping sent just before the block and stamped late by the reader.
    during = [at for at in pings if blocked_at + 0.1 < at < unblocked_at]
    assert during == [], "pinged while the loop was blocked"
    assert any(at < blocked_at for at in pings)
    assert any(at > unblocked_at for at in pings), "pings did not resume"


async def test_work_off_the_loop_does_not_stall_the_pings(
    notifier: Notifier, systemd: FakeSystemd
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop, interval_s=0.05))
    await asyncio.to_thread(time.sleep, 0.5)  # e.g. validating a large file
    stop.set()
    await asyncio.wait_for(task, 1)
    pings = systemd.times("WATCHDOG=1")
    assert len(pings) >= 6
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.25, gaps


async def test_status_loop_sends_only_changed_lines(
    notifier: Notifier, systemd: FakeSystemd
) -> None:
    stop = asyncio.Event()
    texts = iter(["1 jobs queued", "1 jobs queued", "2 jobs queued"])

    async def describe() -> str:
        try:
            return next(texts)
        except StopIteration:
            stop.set()
            return "2 jobs queued"

    await asyncio.wait_for(status_loop(notifier, stop, describe, interval_s=0.01), 2)
    assert systemd.wait_for(2) == ["STATUS=1 jobs queued", "STATUS=2 jobs queued"]


def test_status_text_names_queue_running_and_flags() -> None:
    assert status_text(jobs_active=3, parts_queued=12, running=40, running_cap=1000) == (
        "3 jobs active, 12 parts queued, 40/1000 batches running"
    )
    assert status_text(
        jobs_active=0,
        parts_queued=0,
        running=0,
        running_cap=2,
        intake_paused=True,
        draining=True,
        account_paused="401 invalid key",
    ) == (
        "0 jobs active, 0 parts queued, 0/2 batches running; draining; intake paused;"
        " account paused: 401 invalid key"
    )
