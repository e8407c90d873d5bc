"""The caps hold under pressure: more queued parts than the running cap, counted by the
emulator (TESTING.md C.14, C.15). Caps are scaled to short windows for test time."""

from __future__ import annotations

import asyncio
from pathlib import Path

from batchd.models import PartState
from batchd.provider.api import BatchApi
from batchd.provider.limits import CallClass, RateLimiter
from batchd.testing import (
    ENDPOINT_CHAT,
    StartEmulator,
    daemon_settings,
    drop,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

CAPS = {
    "running_batches": 4,
    "create_per_minute": 5,
    "retrieve_per_minute": 8,
    "list_per_minute": 3,
    "max_requests_per_file": 5,
}


async def test_queued_parts_never_push_past_the_running_or_rate_caps(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=200, rate_window_s=1.0, limits=CAPS)
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        limits=CAPS,
        api={"rate_window_s": 1.0},
        poll={"interval_s": 0.2, "first_poll_s": 0.1},
    )
    async with running_daemon(settings):
        for i in range(4):
            drop(settings.paths.folder("inbox"), f"q{i}.jsonl", requests(20, prefix=f"q{i}-"))
        folders = await wait_published(settings.paths.folder("outbox"), 4, None, timeout_s=60)
    assert all(summary(f)["status"] == "completed" for f in folders)
    stats = await emulator.stats()
    assert stats["batches_created"] == 16
    assert stats["max_unfinished_batches"] == CAPS["running_batches"]
    for name, cap_key in (
        ("create", "create_per_minute"),
        ("retrieve", "retrieve_per_minute"),
        ("list", "list_per_minute"),
    ):
        calls = stats["calls"][name]
        assert calls["max_in_window"] <= CAPS[cap_key], (name, calls)
        assert calls["refused_429"] == 0, (name, calls)
    assert stats["calls"]["create"]["max_in_window"] == CAPS["create_per_minute"] or (
        stats["max_unfinished_batches"] == CAPS["running_batches"]
    )


async def test_the_account_file_quota_makes_parts_wait_never_fail(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    # Room for three parts' input and result files at a time, more parts than that queued
    # and a running cap that would let them all go: the file quota is what must hold.
    caps = {
        "running_batches": 50,
        "max_requests_per_file": 2,
        "max_stored_files": 9,
        "upload_per_second": 100.0,
    }
    emulator = await start_emulator(time_scale=100, limits=caps, request_failure_rate=0.3)
    settings = daemon_settings(tmp_path / "root", emulator, limits=caps)
    async with running_daemon(settings):
        for i in range(4):
            drop(settings.paths.folder("inbox"), f"f{i}.jsonl", requests(6, prefix=f"f{i}-"))
        folders = await wait_published(settings.paths.folder("outbox"), 4, None, timeout_s=60)
    for folder in folders:
        assert summary(folder)["request_counts"]["total"] == 6
        assert all(p["status"] == "completed" for p in summary(folder)["parts"])
    stats = await emulator.stats()
    assert stats["batches_created"] == 12
    assert stats["calls"]["upload"]["refused_429"] == 0


async def test_following_many_running_batches_costs_a_list_page_per_hundred_per_interval(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    # 250 batches that run for days of service time, polled every 0.5 s of wall time.
    caps = {
        "upload_per_second": 1000.0,
        "file_calls_per_second": 1000.0,
        "create_per_minute": 100_000,
        "retrieve_per_minute": 100_000,
        "list_per_minute": 100_000,
    }
    emulator = await start_emulator(in_progress_base_s=1e6, limits=caps)
    interval = 0.5
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        limits=caps,
        poll={"interval_s": interval, "first_poll_s": 0.1, "jitter": 0.1},
    )
    n = 250
    async with running_daemon(settings) as daemon:
        for i in range(n):
            drop(settings.paths.folder("inbox"), f"r{i:03d}.jsonl", requests(1, prefix=f"{i}-"))

        async def created() -> bool:
            return bool((await emulator.stats())["batches_created"] >= n)

        await wait_for(created, 30, f"{n} batches created")

        async def polled() -> bool:
            parts = await daemon.store.parts_in([PartState.RUNNING])
            return len(parts) == n and all(p.polled_at is not None for p in parts)

        await wait_for(polled, 30, "every part polled once")  # then they fall into step
        before = (await emulator.stats())["calls"]
        intervals = 8
        await asyncio.sleep(intervals * interval)
        after = (await emulator.stats())["calls"]
    lists = after["list"]["served"] - before["list"]["served"]
    retrieves = after["retrieve"]["served"] - before["retrieve"]["served"]
    pages = -(-n // 100)
    # About one sweep of `pages` list calls per interval (jitter makes it up to ~10%
    # more often), and no batch retrieved on its own.
    assert intervals * pages * 0.5 <= lists <= (intervals + 2) * pages * 1.3, lists
    assert retrieves <= n // 50, retrieves


async def test_creates_that_overtake_each_other_on_the_way_are_never_answered_429(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """The service counts a create when it arrives. Two in five creates wait 0.24 s on
    the way (a proxy's queue, as `latency_rate` models it), far longer than the margin:
    a cap log stamped at send let a later create land inside an earlier one's window,
    answered 429 (1 in 3,500 in `make bench`). Held until a window after its answer, a
    slot never lets one through early."""
    cap, window_s = 4, 0.4
    emulator = await start_emulator(
        rate_window_s=window_s, limits={"create_per_minute": cap, "running_batches": 1000}
    )
    emulator.set_faults(
        latency_min_s=0.6 * window_s,
        latency_max_s=0.6 * window_s,
        latency_rate=0.4,
        classes=("create",),
        seed=2,
    )
    source = tmp_path / "in.jsonl"
    source.write_bytes(requests(1))
    limiter = RateLimiter({c: (cap if c == CallClass.CREATE else 100, window_s) for c in CallClass})
    async with BatchApi(emulator.base_url, emulator.api_key, limiter) as api:
        uploaded = await api.upload_file(source, "in.jsonl")
        # As the submit stage sends them: many at once, each waiting for its slot.
        batches = await asyncio.gather(
            *(api.create_batch(uploaded.id, ENDPOINT_CHAT, "24h") for _ in range(6 * cap))
        )
    assert len({b.id for b in batches}) == 6 * cap
    stats = await emulator.stats()
    creates = stats["calls"]["create"]
    assert stats["faults"]["delayed"] >= cap, stats["faults"]
    assert creates["refused_429"] == 0 and creates["max_in_window"] <= cap, creates
    assert limiter.throttled[CallClass.CREATE] == 0
