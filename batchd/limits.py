"""Rate limits per call class: never more calls in any window than the cap.

DESIGN.md proposes token buckets sized so that capacity + refill x 60 s <= cap. That
holds the cap but cannot run faster than (cap - capacity) / 60 s over time. A sliding
log of the last `cap` send times holds the same guarantee exactly and still lets the
long-run rate reach cap / window, so batchd uses the log: a call may go when fewer than
`cap` calls were sent in the last `window + margin` seconds. The margin absorbs network
jitter between our send time and the server's arrival time.

The arithmetic is pure (`SlidingWindow.delay(now)`); `RateLimiter` is the async shell that
waits on the loop's monotonic clock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class CallClass(StrEnum):
    CREATE = "create"
    RETRIEVE = "retrieve"
    CANCEL = "cancel"
    LIST = "list"
    UPLOAD = "upload"
    FILES = "files"  # retrieve, list, delete and download of files


@dataclass(slots=True)
class SlidingWindow:
    """At most `cap` events in any `window_s`-long interval (plus `margin_s` of slack)."""

    cap: int
    window_s: float
    margin_s: float = 0.0
    sent: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0

    @property
    def span_s(self) -> float:
        return self.window_s + self.margin_s

    def _expire(self, now: float) -> None:
        horizon = now - self.span_s
        while self.sent and self.sent[0] <= horizon:
            self.sent.popleft()

    def delay(self, now: float) -> float:
        """Seconds to wait before one more call may be sent at `now` (0 = go now)."""
        self._expire(now)
        wait = max(0.0, self.blocked_until - now)
        if len(self.sent) >= self.cap:
            wait = max(wait, self.sent[len(self.sent) - self.cap] + self.span_s - now)
        return wait if wait > 1e-9 else 0.0

    def record(self, now: float) -> None:
        self.sent.append(now)

    def block(self, now: float, seconds: float) -> None:
        """The server said 429: send nothing more for `seconds`."""
        self.blocked_until = max(self.blocked_until, now + seconds)

    def available(self, now: float) -> int:
        self._expire(now)
        if now < self.blocked_until:
            return 0
        return max(0, self.cap - len(self.sent))


class RateLimiter:
    """One sliding window per call class; `acquire` waits until a call may be sent."""

    def __init__(
        self,
        caps: dict[CallClass, tuple[int, float]],
        *,
        margin_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock or asyncio.get_running_loop().time
        self.windows = {
            cls: SlidingWindow(cap=cap, window_s=window, margin_s=min(margin_s, window * 0.05))
            for cls, (cap, window) in caps.items()
        }
        self._locks = {cls: asyncio.Lock() for cls in caps}
        self.throttled: dict[CallClass, int] = dict.fromkeys(caps, 0)
        self.sent: dict[CallClass, int] = dict.fromkeys(caps, 0)

    async def acquire(self, cls: CallClass) -> None:
        window = self.windows[cls]
        # One waiter at a time per class keeps the order fair and the log exact.
        async with self._locks[cls]:
            while (wait := window.delay(self._clock())) > 0:
                await asyncio.sleep(wait)
            window.record(self._clock())
            self.sent[cls] += 1

    def throttle(self, cls: CallClass, retry_after_s: float) -> None:
        self.throttled[cls] += 1
        self.windows[cls].block(self._clock(), retry_after_s)

    def levels(self) -> dict[str, int]:
        now = self._clock()
        return {str(cls): w.available(now) for cls, w in self.windows.items()}
