"""Time, passed in: the one place the daemon reads a clock.

The daemon (the composition root) makes one `Clock` and hands it to each stage, the
operations layer, the API client and the store. They read the time only through it and
hand `now` on to their pure deciders, which never read a clock themselves. Tests give
them a `FakeClock` and move it by hand: a decision that depends on time is then tested
without sleeping.

Three readings, kept apart:

- `now()` is wall time (Unix seconds), for what is recorded (a job's `created_at`, the
  moment a create was asked for, summary.json's timings, the budget's days) and for
  comparisons with times the outside world stamped (a file's mtime, an HTTP date).
- `monotonic()` is for durations and deadlines within this process (the event loop's
  own clock, which a wall-clock step does not move).
- `steady()` is for what is scheduled in the database (a part's `retry_at`, its
  `next_poll_at`): it reads like wall time (it is anchored to it when the process
  starts) but moves only with the monotonic clock, so that a step of the wall clock (NTP
  fixing a clock that was hours off, an operator's `date -s`) makes nothing due early
  and holds nothing back. A restart anchors it afresh, so a step during the previous run
  shifts what that run scheduled by the step: recovery pulls anything scheduled further
  ahead than a pause can last back to now (`Daemon.recover`), and a batch is never
  declared lost on a difference of times at all (only on the service's word).

Waiting itself (`asyncio.sleep`, `call_later`) stays on the event loop. `ClockWatch`
notices steps of the wall clock (the gap between wall and monotonic time moving), for
`status` to show.

`BATCHD_TEST_CLOCK_STEP_FILE` is for tests only: it names a file holding a number of
seconds that the daemon adds to its wall clock, read again whenever the file changes, so
that a test can step the daemon's wall clock (as NTP would) without touching the
machine's.

What batchd writes for a reader (summary.json's timings) is `iso_utc`: one format,
ISO 8601 in UTC with milliseconds and a `Z`, e.g. `2026-11-30T04:31:02.123Z`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "ClockWatch", "FakeClock", "SystemClock", "iso_utc"]

# The test-only variable naming a file of seconds added to the daemon's wall clock.
STEP_FILE_VARIABLE = "BATCHD_TEST_CLOCK_STEP_FILE"


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

    def steady(self) -> float:
        """Wall-like seconds for schedules: anchored to wall time at start, then moved
        by the monotonic clock only (a wall-clock step does not move it)."""
        ...


class SystemClock:
    """The machine's clocks: `time.time()` and `time.monotonic()` (the event loop's).

    With `step_file` (tests only, see the module's docstring) the wall clock is offset by
    the seconds that file holds, read again when it changes."""

    __slots__ = ("_anchor", "_step_checked", "_step_file", "_step_mtime", "_step_s")

    def __init__(self, step_file: Path | None = None) -> None:
        self._step_file = step_file
        self._step_s = 0.0
        self._step_mtime: tuple[int, int] | None = None
        self._step_checked = -math.inf
        self._anchor = self.now() - time.monotonic()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SystemClock:
        """The system clock, stepped by `BATCHD_TEST_CLOCK_STEP_FILE` when that is set."""
        env = os.environ if environ is None else environ
        named = env.get(STEP_FILE_VARIABLE)
        return cls(Path(named)) if named else cls()

    def _test_step(self) -> float:
        if self._step_file is None:
            return 0.0
        tick = time.monotonic()
        if tick - self._step_checked >= 0.02:
            self._step_checked = tick
            # No file yet, or one half written by the test: the last step stays in force.
            with contextlib.suppress(OSError, ValueError):
                st = self._step_file.stat()
                mtime = (st.st_ino, st.st_mtime_ns)
                if mtime != self._step_mtime:
                    self._step_s = float(self._step_file.read_text().strip() or 0)
                    self._step_mtime = mtime
        return self._step_s

    def now(self) -> float:
        return time.time() + self._test_step()

    def monotonic(self) -> float:
        return time.monotonic()

    def steady(self) -> float:
        return time.monotonic() + self._anchor

    def __repr__(self) -> str:
        return "SystemClock()" if self._step_file is None else "SystemClock(stepped)"


SYSTEM_CLOCK: Clock = SystemClock()


class FakeClock:
    """A clock for tests: it stands still until `advance` moves every reading on;
    `step` moves the wall clock alone, as NTP or an operator would."""

    __slots__ = ("_anchor", "_monotonic", "_wall")

    def __init__(self, now: float = 1_700_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = now
        self._monotonic = monotonic
        self._anchor = now - monotonic

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def steady(self) -> float:
        return self._monotonic + self._anchor

    def step(self, seconds: float) -> None:
        """Step the wall clock by `seconds` (either way); the other readings stay."""
        self._wall += seconds

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds` (never back: a monotonic clock cannot go back)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._wall += seconds
        self._monotonic += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self._wall!r}, monotonic={self._monotonic!r})"


class ClockWatch:
    """Notices steps of the wall clock: the gap between wall and monotonic time stays
    put while the clock only runs (NTP slews it by at most 0.5 ms a second) and jumps
    when the clock is set."""

    __slots__ = ("_clock", "_gap", "tolerance_s")

    def __init__(self, clock: Clock, tolerance_s: float = 1.0) -> None:
        self._clock = clock
        self.tolerance_s = tolerance_s
        self._gap = clock.now() - clock.monotonic()

    def check(self) -> float | None:
        """The step (seconds, + forward) since the last check, or None."""
        gap = self._clock.now() - self._clock.monotonic()
        step = gap - self._gap
        self._gap = gap
        return step if abs(step) > self.tolerance_s else None
