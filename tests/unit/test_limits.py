"""The sliding-window limiter: never more than the cap in any window, yet the full rate."""

from __future__ import annotations

import asyncio
import heapq
import math
import random

import pytest

from batchd.clock import FakeClock
from batchd.provider.limits import UNTIL_ANSWER, CallClass, RateLimiter, SlidingWindow
from batchd.testing import wait_for


def max_in_any_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_a_burst_up_to_the_cap_goes_at_once_then_waits_a_whole_window() -> None:
    w = SlidingWindow(cap=5, window_s=10.0)
    for _ in range(5):
        assert w.delay(0.0) == 0
        w.answer(w.send(0.0), 0.0)
    assert w.delay(0.0) == pytest.approx(10.0)
    assert w.delay(9.99) == pytest.approx(0.01)
    assert w.delay(10.0) == 0


def test_a_slot_is_held_until_a_window_after_the_answer() -> None:
    w = SlidingWindow(cap=2, window_s=10.0)
    slow, fast = w.send(0.0), w.send(0.0)
    assert w.delay(1.0) == UNTIL_ANSWER  # both in flight: only an answer can free one
    w.answer(fast, 0.1)
    assert w.delay(1.0) == pytest.approx(9.1)
    w.answer(slow, 4.0)  # answered late: the service may have counted it just now
    assert w.delay(10.1) == 0
    w.send(10.1)
    assert w.delay(10.2) == pytest.approx(3.8)  # not at send + 10 s
    w.answer(slow, 20.0)  # a second answer changes nothing
    assert w.delay(14.0) == 0


def _arrivals(window: SlidingWindow, latencies: list[float], stamp_at_send: bool) -> list[float]:
    """PURE: send calls as fast as `window` allows, each reaching the service after its
    latency and answered 10 ms later; when each reached the service, sorted."""
    now, arrivals = 0.0, []
    answers: list[tuple[float, int]] = []  # (when, token)
    for latency in latencies:
        while (wait := window.delay(now)) > 0:
            if wait == UNTIL_ANSWER:
                now = max(now, answers[0][0])
            else:
                now += wait
            while answers and answers[0][0] <= now:
                at, token = heapq.heappop(answers)
                window.answer(token, at)
        token = window.send(now)
        if stamp_at_send:  # as batchd did: the slot counted from the send alone
            window.answer(token, now)
        else:
            heapq.heappush(answers, (now + latency + 0.01, token))
        arrivals.append(now + latency)
    return sorted(arrivals)


@pytest.mark.parametrize("seed", range(5))
def test_calls_that_overtake_each_other_never_reach_the_service_over_the_cap(seed: int) -> None:
    """The service counts a call when it arrives. A third of the calls wait 0.4 s on the
    way (a proxy's queue), longer than the margin: stamped at send, later calls land in
    an earlier one's window at the service; held until a window after their answer,
    never. And the long-run rate stays close to the cap."""
    rng = random.Random(seed)
    latencies = [0.4 if rng.random() < 0.3 else rng.uniform(0.0, 0.02) for _ in range(400)]
    cap, window_s = 5, 1.0
    held = _arrivals(SlidingWindow(cap, window_s, margin_s=0.05), latencies, False)
    assert max_in_any_window(held, window_s) <= cap
    rate = len(held) / held[-1]
    mean_latency = sum(latencies) / len(latencies)
    assert rate > 0.9 * cap / (window_s + 0.05 + mean_latency), rate
    stamped = _arrivals(SlidingWindow(cap, window_s, margin_s=0.05), latencies, True)
    assert max_in_any_window(stamped, window_s) > cap


@pytest.mark.parametrize("seed", range(5))
def test_no_window_ever_holds_more_than_the_cap_under_random_demand(seed: int) -> None:
    rng = random.Random(seed)
    w = SlidingWindow(cap=7, window_s=3.0, margin_s=0.1)
    now, sent = 0.0, []
    for _ in range(500):
        now += rng.expovariate(5.0)
        wait = w.delay(now)
        now += wait
        assert w.delay(now) == 0
        w.answer(w.send(now), now)
        sent.append(now)
    assert max_in_any_window(sent, 3.0) <= 7
    # Saturated demand runs close to cap / (window + margin).
    rate = len(sent) / sent[-1]
    assert rate > 0.9 * 7 / 3.1


def test_a_429_blocks_the_class_for_retry_after() -> None:
    w = SlidingWindow(cap=100, window_s=60.0)
    w.block(5.0, 12.0)
    assert w.delay(5.0) == pytest.approx(12.0)
    assert w.available(6.0) == 0
    assert w.delay(17.0) == 0


def _waiting(limiter: RateLimiter, cls: CallClass) -> bool:
    """A call of `cls` is waiting for its slot (it holds the class's turn meanwhile)."""
    return limiter._locks[cls].locked()


async def test_rate_limiter_acquire_waits_on_the_injected_clock() -> None:
    clock = FakeClock(monotonic=0.0)
    limiter = RateLimiter({CallClass.CREATE: (2, 0.2)}, margin_s=0.0, clock=clock.monotonic)
    (await limiter.acquire(CallClass.CREATE)).answered()
    (await limiter.acquire(CallClass.CREATE)).answered()
    assert limiter.levels()["create"] == 0
    third = asyncio.create_task(limiter.acquire(CallClass.CREATE))
    await wait_for(lambda: _waiting(limiter, CallClass.CREATE), 5, "the third call waiting")
    assert limiter.sent[CallClass.CREATE] == 2
    clock.advance(0.2)  # the window has passed on the limiter's clock
    await asyncio.wait_for(third, 5)
    assert limiter.sent[CallClass.CREATE] == 3


async def test_a_call_waits_for_an_answer_when_every_slot_is_in_flight() -> None:
    clock = FakeClock(monotonic=0.0)
    limiter = RateLimiter({CallClass.CREATE: (1, 0.2)}, margin_s=0.0, clock=clock.monotonic)
    first = await limiter.acquire(CallClass.CREATE)
    second = asyncio.create_task(limiter.acquire(CallClass.CREATE))
    await wait_for(lambda: _waiting(limiter, CallClass.CREATE), 5, "the second call waiting")
    # Windows pass: in flight, the first call still holds its slot (no timer would free it).
    clock.advance(0.3)
    window = limiter.windows[CallClass.CREATE]
    assert window.delay(clock.monotonic()) == UNTIL_ANSWER
    assert not second.done()
    first.answered()
    clock.advance(0.2)  # and a window after that answer
    slot = await asyncio.wait_for(second, 5)
    assert slot.cls == CallClass.CREATE and limiter.sent[CallClass.CREATE] == 2
    assert math.isinf(UNTIL_ANSWER)
