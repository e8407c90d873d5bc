"""Rate limits per call class: never more calls in any window than the cap.

DESIGN.md proposes token buckets sized so that capacity + refill x 60 s <= cap. That
holds the cap but cannot run faster than (cap - capacity) / 60 s over time. A sliding
log of the last `cap` calls holds the same guarantee exactly and still lets the
long-run rate reach cap / window, so batchd uses the log.

The service counts a call when it arrives, which is some time after batchd sent it; and
calls overtake each other on the way (one waits in a proxy's queue or a slow connection
while a later one goes straight through). A log stamped at send time then lets a later
call land inside the service's window of an earlier one: 1 create in 3,500 was answered
429 in `make bench`. So each call holds its slot from when it is sent until a window
(plus `margin_s`, slack for a service that counts in coarse steps) after its answer: an
answer comes after the arrival that the service counted, so a slot freed then is freed
no sooner than the service frees it, whatever the latency. A call still waiting for its
answer holds its slot; when all `cap` slots are held that way, the next call waits for
an answer. A 429's `Retry-After` (the service's own count) blocks the class for that long
besides.

The arithmetic is pure (`SlidingWindow.delay(now)`); `RateLimiter` is the async shell that
waits on the loop's monotonic clock.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum


class CallClass(StrEnum):
    CREATE = "create"
    RETRIEVE = "retrieve"
    CANCEL = "cancel"
    LIST = "list"
    UPLOAD = "upload"
    FILES = "files"  # retrieve, list, delete and download of files


# `SlidingWindow.delay`'s answer when only an answer to a call in flight can free a slot.
UNTIL_ANSWER = math.inf


@dataclass(slots=True)
class SlidingWindow:
    """At most `cap` calls in any `window_s`-long interval of their arrivals at the
    service: a call holds its slot from its send until `window_s + margin_s` after its
    answer."""

    cap: int
    window_s: float
    margin_s: float = 0.0
    # Calls sent and not yet answered: their token -> when they were sent.
    in_flight: dict[int, float] = field(default_factory=dict)
    # When calls were answered, oldest first, while they still hold their slot.
    answered: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    _tokens: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def span_s(self) -> float:
        return self.window_s + self.margin_s

    def _expire(self, now: float) -> None:
        horizon = now - self.span_s
        while self.answered and self.answered[0] <= horizon:
            self.answered.popleft()

    def held(self, now: float) -> int:
        """Slots held at `now`: calls in flight, and calls answered within the span."""
        self._expire(now)
        return len(self.in_flight) + len(self.answered)

    def delay(self, now: float) -> float:
        """Seconds to wait before one more call may be sent at `now` (0 = go now;
        UNTIL_ANSWER = when a call in flight is answered, and not before)."""
        held = self.held(now)
        wait = max(0.0, self.blocked_until - now)
        if held >= self.cap:
            # The slot that frees first: the (held - cap + 1)-th oldest answer's.
            freed = held - self.cap
            if freed >= len(self.answered):
                return UNTIL_ANSWER
            wait = max(wait, self.answered[freed] + self.span_s - now)
        return wait if wait > 1e-9 else 0.0

    def send(self, now: float) -> int:
        """Record a call sent at `now`; its token, for `answer`."""
        token = next(self._tokens)
        self.in_flight[token] = now
        return token

    def answer(self, token: int, now: float) -> None:
        """The call of `token` was answered (or failed) at `now`: its slot is held a span
        more. A token answered already is a no-op."""
        if self.in_flight.pop(token, None) is None:
            return
        # `now` never goes back (a monotonic clock), so the log stays sorted.
        if self.answered and now < self.answered[-1]:
            now = self.answered[-1]
        self.answered.append(now)

    def block(self, now: float, seconds: float) -> None:
        """The server said 429: send nothing more for `seconds`."""
        self.blocked_until = max(self.blocked_until, now + seconds)

    def available(self, now: float) -> int:
        if now < self.blocked_until:
            return 0
        return max(0, self.cap - self.held(now))


@dataclass(slots=True)
class Slot:
    """One call's place in its class's window, from `RateLimiter.acquire`: call
    `answered()` when the service's answer arrives (its head is enough) or the call
    fails; again is a no-op."""

    limiter: RateLimiter
    cls: CallClass
    token: int

    def answered(self) -> None:
        self.limiter.answered(self)


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
        # Set at each answer: what a call waiting for one waits on.
        self._answers = {cls: asyncio.Event() for cls in caps}
        self.throttled: dict[CallClass, int] = dict.fromkeys(caps, 0)
        self.sent: dict[CallClass, int] = dict.fromkeys(caps, 0)

    async def acquire(self, cls: CallClass) -> Slot:
        """Wait until a call of `cls` may be sent, and take its slot (sent now)."""
        window = self.windows[cls]
        # One waiter at a time per class keeps the order fair and the log exact.
        async with self._locks[cls]:
            while (wait := window.delay(self._clock())) > 0:
                answer = self._answers[cls]
                answer.clear()
                if wait == UNTIL_ANSWER:
                    await answer.wait()
                else:
                    await asyncio.sleep(wait)
            token = window.send(self._clock())
            self.sent[cls] += 1
        return Slot(self, cls, token)

    @asynccontextmanager
    async def call(self, cls: CallClass) -> AsyncIterator[Slot]:
        """`acquire`, and the slot answered when the block ends if it was not before."""
        slot = await self.acquire(cls)
        try:
            yield slot
        finally:
            slot.answered()

    def answered(self, slot: Slot) -> None:
        self.windows[slot.cls].answer(slot.token, self._clock())
        self._answers[slot.cls].set()

    def throttle(self, cls: CallClass, retry_after_s: float) -> None:
        self.throttled[cls] += 1
        self.windows[cls].block(self._clock(), retry_after_s)

    def levels(self) -> dict[str, int]:
        now = self._clock()
        return {str(cls): w.available(now) for cls, w in self.windows.items()}
