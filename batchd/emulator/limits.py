"""Per-call-class sliding-window caps, and the exact counts the stats report."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchd.documents import JsonObject


@dataclass
class CallWindow:
    """A sliding window of `window_s` seconds that lets at most `cap` calls through.

    Only admitted calls enter the window; a refused call is counted apart and takes no
    room. `max_in_window` is the most admitted calls any window of `window_s` ever held:
    the fullest window always ends at an admitted call, so checking at each admission is
    exact.
    """

    window_s: float
    cap: int | None
    served: int = 0
    refused_429: int = 0
    max_in_window: int = 0
    _times: deque[float] = field(default_factory=deque)

    def _expire(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()

    def admit(self, now: float) -> float | None:
        """Count a call at `now`; None when admitted, else seconds until there is room."""
        self._expire(now)
        if self.cap is not None and len(self._times) >= self.cap:
            self.refused_429 += 1
            return self._times[len(self._times) - self.cap] + self.window_s - now
        self._times.append(now)
        self.served += 1
        self.max_in_window = max(self.max_in_window, len(self._times))
        return None

    def reset(self) -> None:
        self.served = self.refused_429 = self.max_in_window = 0
        self._times.clear()

    def snapshot(self) -> JsonObject:
        return {
            "served": self.served,
            "refused_429": self.refused_429,
            "max_in_window": self.max_in_window,
            "cap": self.cap,
            "window_s": self.window_s,
        }
