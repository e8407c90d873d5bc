"""sd_notify and the watchdog, with no library: one datagram to `$NOTIFY_SOCKET`.

systemd (`Type=notify`) learns from these datagrams when the daemon is ready
(`READY=1`), what it is doing (`STATUS=`), that it is stopping (`STOPPING=1`) or
reloading (`RELOADING=1`), and that its event loop still turns (`WATCHDOG=1`).
Outside systemd `NOTIFY_SOCKET` is unset and every call is a no-op.

The watchdog pings come from a coroutine on the daemon's own event loop, never from a
thread: a loop blocked by CPU work or a stuck call stops the pings, and systemd restarts
the service once `WatchdogSec=` passes without one. That is the point of the watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

from batchd.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "Notifier",
    "notify_address",
    "status_loop",
    "status_text",
    "watchdog_interval_s",
    "watchdog_loop",
]


def notify_address(value: str | None) -> str | None:
    """The socket address for `NOTIFY_SOCKET`, or None when it is unset or unusable.

    PURE. A leading `@` names a Linux abstract socket (its first byte becomes NUL); an
    absolute path names a socket in the filesystem. Anything else (e.g. systemd 254's
    `vsock:` addresses, which a service on this host never receives) is unusable.
    """
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between watchdog pings: half of `WATCHDOG_USEC`, or None for no pings.

    PURE given its arguments (they default to the process's environment and pid).
    systemd sets `WATCHDOG_PID` to the main process; a child that inherited the
    variables must not ping on its parent's behalf, so a foreign pid means no pings.
    """
    env = os.environ if environ is None else environ
    own_pid = os.getpid() if pid is None else pid
    watchdog_pid = env.get("WATCHDOG_PID", "").strip()
    if watchdog_pid:
        try:
            if int(watchdog_pid) != own_pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def status_text(
    *,
    jobs_active: int,
    parts_queued: int,
    running: int,
    running_cap: int,
    intake_paused: bool = False,
    draining: bool = False,
    account_paused: str | None = None,
) -> str:
    """One `STATUS=` line for `systemctl status`: the queue and running counts, then flags.

    PURE. E.g. "3 jobs active, 12 parts queued, 40/1000 batches running; intake paused".
    """
    text = (
        f"{jobs_active} jobs active, {parts_queued} parts queued,"
        f" {running}/{running_cap} batches running"
    )
    flags: list[str] = []
    if draining:
        flags.append("draining")
    if intake_paused:
        flags.append("intake paused")
    if account_paused:
        flags.append(f"account paused: {account_paused}")
    return "; ".join([text, *flags])


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify datagrams to one address; a no-op when the address is None.

    Each message is one non-blocking `sendto` from a fresh socket, like libsystemd's
    `sd_notify()`: nothing is held open, and a full or vanished receiver drops the
    message (and logs it once per kind) instead of stalling the daemon.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._failed: set[str] = set()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for `$NOTIFY_SOCKET` (a no-op one when it is unset)."""
        env = os.environ if environ is None else environ
        return cls(notify_address(env.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def __repr__(self) -> str:
        shown = None if self.address is None else self.address.replace("\0", "@", 1)
        return f"Notifier(address={shown!r})"

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; True when systemd got it."""
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        kind = assignments[0].split("=", 1)[0]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self.address)
        except OSError as exc:
            # The message is lost, not retried: a later one (the next ping or status)
            # says the same again. Logged once per kind so a gone socket cannot flood.
            if kind not in self._failed:
                self._failed.add(kind)
                log.warning("notify_failed", message=kind, error=str(exc))
            return False
        self._failed.discard(kind)
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is done (after a reload too); optionally with a status."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.send(*lines)

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by `systemctl status`."""
        return self.send(_status_line(text))

    def stopping(self) -> bool:
        """STOPPING=1: a stop began; systemd waits (up to TimeoutStopSec) for the exit."""
        return self.send("STOPPING=1")

    def reloading(self, monotonic_usec: int | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (as `Type=notify-reload` requires); send
        `ready()` once the new configuration is applied."""
        usec = _monotonic_usec() if monotonic_usec is None else monotonic_usec
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the event loop still turns."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: ask for this much more time to start or stop."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def _status_line(text: str) -> str:
    # One datagram line per assignment: a newline inside the text would start a new one.
    return "STATUS=" + " ".join(text.splitlines())


async def watchdog_loop(
    notifier: Notifier, stop_event: asyncio.Event, interval_s: float | None = None
) -> None:
    """Ping `WATCHDOG=1` every `interval_s` (default: half of `WATCHDOG_USEC`) until
    `stop_event` is set; returns at once when the watchdog is off.

    Run it as a task on the daemon's loop. It must stay there: if the loop is blocked,
    this coroutine cannot run, the pings stop, and systemd restarts the service.
    """
    interval = watchdog_interval_s() if interval_s is None else interval_s
    if interval is None or interval <= 0 or not notifier.enabled:
        return
    while not stop_event.is_set():
        notifier.watchdog()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), timeout=interval)


async def status_loop(
    notifier: Notifier,
    stop_event: asyncio.Event,
    describe: Callable[[], Awaitable[str]],
    interval_s: float = 5.0,
) -> None:
    """Send `STATUS=<await describe()>` every `interval_s` until `stop_event` is set,
    only when the text changed. A failing `describe` is logged and tried again later."""
    if not notifier.enabled:
        return
    last: str | None = None
    while not stop_event.is_set():
        try:
            text = await describe()
        except Exception as exc:  # the status line must never take the daemon down
            log.warning("status_describe_failed", error=repr(exc))
        else:
            if text != last and notifier.status(text):
                last = text
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), timeout=interval_s)
