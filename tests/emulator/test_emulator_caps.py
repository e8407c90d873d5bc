"""Caps: per-class sliding windows (429 Throttling.RateQuota) and the running-batch cap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from batchd.testing import ENDPOINT_CHAT, ENDPOINT_TEST, requests

if TYPE_CHECKING:
    from batchd.testing import Api

ROOMY = {"upload_per_second": 1000, "file_calls_per_second": 1000}


@pytest.mark.parametrize(
    ("call_class", "limit_name", "method", "path"),
    [
        ("list", "list_per_minute", "GET", "/batches"),
        ("retrieve", "retrieve_per_minute", "GET", "/batches/batch_missing"),
        ("cancel", "cancel_per_minute", "POST", "/batches/batch_missing/cancel"),
        ("create", "create_per_minute", "POST", "/batches"),
    ],
)
async def test_exactly_the_cap_passes_in_a_window_then_429_with_retry_after(
    start_emulator: Any,
    make_api: Any,
    call_class: str,
    limit_name: str,
    method: str,
    path: str,
) -> None:
    emulator = await start_emulator(rate_window_s=30, limits={limit_name: 5})
    api = make_api(emulator)
    statuses = [(await api.call(method, path, json={}))[0] for _ in range(5)]
    assert 429 not in statuses
    status, body, headers = await api.call(method, path, json={})
    assert status == 429
    assert body["error"]["code"] == "Throttling.RateQuota"
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert 0 < int(headers["retry-after-ms"]) <= 30_000
    await api.call(method, path, json={})

    stats = (await api.stats())["calls"][call_class]
    assert stats == {
        "served": 5,
        "refused_429": 2,
        "max_in_window": 5,
        "cap": 5,
        "window_s": 30,
    }
    emulator.advance_wall(30)  # the window rolls over: room again
    assert (await api.call(method, path, json={}))[0] != 429
    stats = (await api.stats())["calls"][call_class]
    assert (stats["served"], stats["max_in_window"]) == (6, 5)


async def test_the_window_slides_rather_than_resetting(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(rate_window_s=10, limits={"list_per_minute": 3})
    api = make_api(emulator)
    await api.call("GET", "/batches")
    emulator.advance_wall(6)
    await api.call("GET", "/batches")
    await api.call("GET", "/batches")
    status, _, headers = await api.call("GET", "/batches")
    assert status == 429
    assert headers["Retry-After"] == "4"  # when the first call leaves the window
    emulator.advance_wall(4)
    assert (await api.call("GET", "/batches"))[0] == 200
    assert (await api.call("GET", "/batches"))[0] == 429


async def test_file_calls_have_per_second_caps(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(limits={"upload_per_second": 2, "file_calls_per_second": 3})
    api = make_api(emulator)
    uploads = [(await api.upload(b"{}\n"))[0] for _ in range(3)]
    listings = [(await api.call("GET", "/files"))[0] for _ in range(4)]
    assert uploads == [200, 200, 429]
    assert listings == [200, 200, 200, 429]
    calls = (await api.stats())["calls"]
    assert (calls["upload"]["cap"], calls["upload"]["window_s"]) == (2, 1.0)
    assert (calls["files"]["served"], calls["files"]["refused_429"]) == (3, 1)
    emulator.advance_wall(1)
    assert (await api.upload(b"{}\n"))[0] == 200


async def test_running_cap_refuses_creates_until_a_batch_ends(
    start_emulator: Any, make_api: Any
) -> None:
    emulator = await start_emulator(limits=ROOMY | {"running_batches": 3})
    api = make_api(emulator)
    file_id = await api.upload_ok(requests(2))
    first = await api.create_ok(file_id, ENDPOINT_CHAT)
    for _ in range(2):
        await api.create_ok(file_id, ENDPOINT_CHAT)
    status, body = await api.create(file_id, ENDPOINT_CHAT)
    assert status == 429
    assert body["error"]["code"] == "Throttling.AllocationQuota"
    await api.call("POST", f"/batches/{first['id']}/cancel")
    status, _ = await api.create(file_id, ENDPOINT_CHAT)
    assert status == 429  # cancelling still counts
    emulator.advance(5)
    await api.create_ok(file_id, ENDPOINT_CHAT)
    stats = await api.stats()
    assert stats["max_unfinished_batches"] == 3
    assert stats["unfinished_batches"] == 3
    assert stats["batches_created_per_input_file"] == {file_id: 4}
    assert stats["calls"]["create"]["served"] == 6  # refusals for the cap were served
    emulator.advance(3600)
    stats = await api.stats()
    assert (stats["unfinished_batches"], stats["max_unfinished_batches"]) == (0, 3)
    assert stats["batches_by_status"] == {"completed": 3, "cancelled": 1}


async def test_only_two_test_model_batches_run_at_once(
    api: Api, emulator: Any, seed_lines: bytes
) -> None:
    file_id = await api.upload_ok(seed_lines)
    chat_file = await api.upload_ok(requests(1))
    await api.create_ok(file_id, ENDPOINT_TEST)
    await api.create_ok(file_id, ENDPOINT_TEST)
    status, body = await api.create(file_id, ENDPOINT_TEST)
    assert status == 429
    assert body["error"]["code"] == "Throttling.AllocationQuota"
    assert "batch-test-model" in body["error"]["message"]
    await api.create_ok(chat_file, ENDPOINT_CHAT)  # other models are not held back
    emulator.advance(3600)
    await api.create_ok(file_id, ENDPOINT_TEST)
    assert (await api.stats())["batches_created_per_input_file"][file_id] == 3


async def test_stats_reset_starts_the_counts_again(api: Api) -> None:
    await api.call("GET", "/batches")
    status, stats, _ = await api.call("POST", "/_emulator/stats/reset", key=None)
    assert status == 200
    assert stats["calls"]["list"]["served"] == 0
