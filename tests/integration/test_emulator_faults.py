"""Injected faults: 5xx, latency, dropped connections, 429 storms, lost create answers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from tests.conftest import ENDPOINT_CHAT, jsonl

if TYPE_CHECKING:
    from tests.conftest import Api


async def test_5xx_faults_answer_internal_error_and_are_not_served(api: Api, emulator: Any) -> None:
    emulator.set_faults(error_5xx_rate=1.0)
    status, body, _ = await api.call("GET", "/batches")
    assert (status, body["error"]["code"]) == (500, "InternalError")
    stats = await api.stats()
    assert stats["faults"]["error_5xx"] == 1
    assert stats["calls"]["list"]["served"] == 0


async def test_faults_switch_on_and_off_over_http_and_stay_in_their_classes(api: Api) -> None:
    patch = {"error_5xx_rate": 1.0, "classes": ["create"]}
    status, faults, _ = await api.call("POST", "/_emulator/faults", json=patch, key=None)
    assert (status, faults["error_5xx_rate"], faults["classes"]) == (200, 1.0, ["create"])
    assert (await api.call("GET", "/batches"))[0] == 200
    assert (await api.call("POST", "/batches", json={}))[0] == 500
    await api.call("POST", "/_emulator/faults", json={"error_5xx_rate": 0.0}, key=None)
    assert (await api.call("POST", "/batches", json={}))[0] == 400
    status, body, _ = await api.call(
        "POST", "/_emulator/faults", json={"error_5xx_rate": 2}, key=None
    )
    assert (status, body["error"]["code"]) == (400, "InvalidParameter")


async def test_fault_draws_repeat_for_the_same_seed(start_emulator: Any, make_api: Any) -> None:
    async def pattern() -> list[int]:
        api = make_api(await start_emulator(faults={"error_5xx_rate": 0.5, "seed": 3}))
        return [(await api.call("GET", "/batches"))[0] for _ in range(20)]

    first = await pattern()
    assert first == await pattern()
    assert {200, 500} == set(first)


async def test_latency_delays_every_call(api: Api, emulator: Any) -> None:
    emulator.set_faults(latency_min_s=0.2, latency_max_s=0.2)
    started = time.monotonic()
    assert (await api.call("GET", "/batches"))[0] == 200
    assert time.monotonic() - started >= 0.2


async def test_a_dropped_connection_gets_no_answer(api: Api, emulator: Any) -> None:
    emulator.set_faults(drop_connection_rate=1.0)
    with pytest.raises(aiohttp.ClientError):
        await api.call("POST", "/batches", json={})
    stats = await api.stats()
    assert stats["faults"]["dropped_connection"] == 1
    assert stats["calls"]["create"]["served"] == 0


async def test_a_429_storm_answers_throttling_with_retry_after(api: Api, emulator: Any) -> None:
    emulator.set_faults(throttle_rate=1.0)
    status, body, headers = await api.call("GET", "/batches")
    assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "Throttling", "1")
    stats = await api.stats()
    assert stats["faults"]["throttled"] == 1
    assert stats["calls"]["list"]["refused_429"] == 0  # the cap did not refuse it


async def test_a_lost_create_answer_still_creates_the_batch(api: Api, emulator: Any) -> None:
    file_id = await api.upload_ok(jsonl(2))
    emulator.set_faults(lost_create_response_rate=1.0)
    with pytest.raises(aiohttp.ClientError):
        await api.create(file_id, ENDPOINT_CHAT)
    emulator.set_faults(lost_create_response_rate=0.0)
    status, page, _ = await api.call("GET", "/batches", params={"input_file_ids": file_id})
    assert status == 200
    assert len(page["data"]) == 1  # the client can find and adopt it
    stats = await api.stats()
    assert stats["batches_created_per_input_file"] == {file_id: 1}
    assert stats["faults"]["lost_create_response"] == 1
    assert stats["calls"]["create"]["served"] == 1
