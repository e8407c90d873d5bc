"""The emulated service's clock: wall time sped up by `time_scale`, and advanceable."""

from __future__ import annotations

import time
from collections.abc import Callable


class ServiceClock:
    """Two readings of one clock.

    `monotonic()` is wall seconds (what rate windows are counted in); `now()` is the
    service's Unix time, running `time_scale` times faster than wall time. Tests move
    either forward without sleeping: `advance()` moves service time only,
    `advance_wall()` moves wall time (and with it service time).
    """

    def __init__(
        self,
        time_scale: float = 1.0,
        *,
        start: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.time_scale = time_scale
        self._monotonic = monotonic
        self._start_service = time.time() if start is None else start
        self._start_wall = monotonic()
        self._wall_offset = 0.0
        self._service_offset = 0.0

    def monotonic(self) -> float:
        """Wall seconds on a monotonic scale, including `advance_wall()` steps."""
        return self._monotonic() + self._wall_offset

    def now(self) -> float:
        """The service's current Unix time in seconds."""
        elapsed = self.monotonic() - self._start_wall
        return self._start_service + elapsed * self.time_scale + self._service_offset

    def advance(self, service_s: float) -> float:
        """Move service time forward by `service_s` seconds; returns the new `now()`."""
        if service_s < 0:
            raise ValueError("the clock only moves forward")
        self._service_offset += service_s
        return self.now()

    def advance_wall(self, wall_s: float) -> float:
        """Move wall time (rate windows, and service time with it) forward."""
        if wall_s < 0:
            raise ValueError("the clock only moves forward")
        self._wall_offset += wall_s
        return self.now()

    def wall_seconds(self, service_s: float) -> float:
        """How many wall seconds `service_s` service seconds take."""
        return service_s / self.time_scale
