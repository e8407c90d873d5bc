"""The sliding-window limiter: never more than the cap in any window, yet the full rate."""

from __future__ import annotations

import asyncio
import random

import pytest

from batchd.limits import CallClass, RateLimiter, SlidingWindow


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
        w.record(0.0)
    assert w.delay(0.0) == pytest.approx(10.0)
    assert w.delay(9.99) == pytest.approx(0.01)
    assert w.delay(10.0) == 0


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
        w.record(now)
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


async def test_rate_limiter_acquire_waits_on_the_injected_clock() -> None:
    now = [0.0]
    limiter = RateLimiter({CallClass.CREATE: (2, 0.2)}, margin_s=0.0, clock=lambda: now[0])
    await limiter.acquire(CallClass.CREATE)
    await limiter.acquire(CallClass.CREATE)
    assert limiter.levels()["create"] == 0

    async def later() -> None:
        await asyncio.sleep(0.01)
        now[0] = 0.2

    task = asyncio.create_task(later())
    await asyncio.wait_for(limiter.acquire(CallClass.CREATE), 5)
    await task
    assert limiter.sent[CallClass.CREATE] == 3
