"""Time, passed in: the one place the daemon reads a clock.

The daemon (the composition root) makes one `Clock` and hands it to each stage, the
operations layer, the API client and the store. They read the time only through it and
hand `now` on to their pure deciders, which never read a clock themselves. Tests give
them a `FakeClock` and move it by hand: a decision that depends on time is then tested
without sleeping.

Two readings, kept apart: `now()` is wall time (Unix seconds), for what is recorded and
for comparisons with recorded times (a part's `retry_at`, a file's mtime); `monotonic()`
is for durations and deadlines within this process (the event loop's own clock, which
a wall-clock step does not move). Waiting itself (`asyncio.sleep`, `call_later`) stays
on the event loop.

What batchd writes for a reader (summary.json's timings) is `iso_utc`: one format,
ISO 8601 in UTC with milliseconds and a `Z`, e.g. `2026-11-30T04:31:02.123Z`.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock", "iso_utc"]


def iso_utc(at: float | None) -> str | None:
    """PURE: Unix seconds as ISO 8601 in UTC to the millisecond (truncated), with `Z`:
    `2026-11-30T04:31:02.123Z`. None for None and for what is not a moment (NaN, a
    negative or out-of-range number). Sorts as text in time order (years 1970-9999)."""
    if at is None or isinstance(at, bool) or not math.isfinite(at) or at < 0:
        return None
    try:
        when = datetime.fromtimestamp(at, UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Clock(Protocol):
    """What the daemon knows of time."""

    def now(self) -> float:
        """Wall time, in seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""
        ...


class SystemClock:
    """The machine's clocks: `time.time()` and `time.monotonic()` (the event loop's)."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK: Clock = SystemClock()


class FakeClock:
    """A clock for tests: it stands still until `advance` moves both readings on."""

    __slots__ = ("_monotonic", "_wall")

    def __init__(self, now: float = 1_700_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = now
        self._monotonic = monotonic

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds` (never back: a monotonic clock cannot go back)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._wall += seconds
        self._monotonic += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self._wall!r}, monotonic={self._monotonic!r})"
