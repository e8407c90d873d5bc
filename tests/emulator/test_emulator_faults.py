"""Injected faults: 5xx, latency, dropped connections, 429 storms, lost answers, and
answers shaped like other providers and gateways (ignored filters, endless pages,
garbled fields, missing, dripping, huge and odd result files)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import pytest

from batchd.emulator import EmulatorSettings
from batchd.testing import API_KEY, ENDPOINT_CHAT, requests

if TYPE_CHECKING:
    from batchd.testing import Api


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
    file_id = await api.upload_ok(requests(2))
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


# ---- faults shaped like other providers and gateways


async def _finished(api: Api, emulator: Any, content: bytes, **metadata: str) -> dict[str, Any]:
    """Upload `content`, run it as a batch to its end, and return the ended Batch object."""
    file_id = await api.upload_ok(content)
    extra = {"metadata": metadata} if metadata else {}
    batch = await api.create_ok(file_id, ENDPOINT_CHAT, **extra)
    emulator.advance(3600)
    return await api.batch(batch["id"])


async def test_ignored_list_filters_list_every_batch_and_file(api: Api, emulator: Any) -> None:
    first, second = await api.upload_ok(requests(1)), await api.upload_ok(requests(2))
    await api.create_ok(first, ENDPOINT_CHAT, metadata={"ds_name": "one"})
    newest = await api.create_ok(second, ENDPOINT_CHAT)
    emulator.set_faults(ignore_list_filters=True)
    for params in (
        {"input_file_ids": first},
        {"status": "failed", "ds_name": "nothing"},
        {"create_after": "29990101000000"},
    ):
        status, page, _ = await api.call("GET", "/batches", params=params)
        assert status == 200
        assert len(page["data"]) == 2, params
    status, page, _ = await api.call("GET", "/batches", params={"limit": 1, "status": "failed"})
    assert ([b["id"] for b in page["data"]], page["has_more"]) == ([newest["id"]], True)
    _, files, _ = await api.call("GET", "/files", params={"purpose": "batch_output"})
    assert {f["id"] for f in files["data"]} == {first, second}
    _, unfiltered, _ = await api.call("GET", "/batches")
    assert len(unfiltered["data"]) == 2
    assert (await api.stats())["faults"]["list_filters_ignored"] == 5


async def _raw_answer(emulator: Any, method: str, path: str) -> bytes:
    """Everything the server sends back to one bare HTTP/1.1 call (aiohttp would resend an
    idempotent call whose connection dropped, hiding the lost answer)."""
    reader, writer = await asyncio.open_connection(emulator.host, emulator.port)
    writer.write(
        f"{method} /compatible-mode/v1{path} HTTP/1.1\r\nHost: {emulator.host}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 0\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_lost_answers_still_take_effect_for_each_call_class(api: Api, emulator: Any) -> None:
    emulator.set_faults(lost_response_rate=1.0, classes=["upload"])
    with pytest.raises(aiohttp.ClientError):
        await api.upload(requests(2))
    _, files, _ = await api.call("GET", "/files")
    assert len(files["data"]) == 1  # stored although its answer was lost
    file_id = files["data"][0]["id"]
    emulator.set_faults(classes=["create"])
    with pytest.raises(aiohttp.ClientError):
        await api.create(file_id, ENDPOINT_CHAT)
    _, batches, _ = await api.call("GET", "/batches", params={"input_file_ids": file_id})
    batch_id = batches["data"][0]["id"]
    emulator.set_faults(classes=["cancel"])
    with pytest.raises(aiohttp.ClientError):
        await api.call("POST", f"/batches/{batch_id}/cancel")
    emulator.set_faults(classes=["files"])
    assert (await api.call("GET", "/files"))[0] == 200  # only the delete loses its answer
    assert await _raw_answer(emulator, "DELETE", f"/files/{file_id}") == b""
    emulator.set_faults(lost_response_rate=0.0, classes=[])
    assert (await api.batch(batch_id))["status"] == "cancelling"
    assert (await api.call("GET", f"/files/{file_id}"))[0] == 404
    faults = (await api.stats())["faults"]
    assert (faults["lost_response"], faults["lost_create_response"]) == (4, 0)


async def test_missing_content_stays_404_while_retrieve_and_delete_work(
    api: Api, emulator: Any
) -> None:
    done = await _finished(api, emulator, requests(2))
    output = done["output_file_id"]
    emulator.set_faults(content_missing_rate=1.0)
    for _ in range(2):
        status, body, _ = await api.call("GET", f"/files/{output}/content")
        assert (status, body["error"]["code"]) == (404, "NotFound")
    assert (await api.call("GET", f"/files/{output}"))[0] == 200
    assert (await api.call("DELETE", f"/files/{output}"))[0] == 200
    assert (await api.stats())["faults"]["content_missing"] == 2


async def test_content_missing_is_decided_once_per_file(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(faults={"content_missing_rate": 0.5, "seed": 1})
    api = make_api(emulator)
    file_id = await api.upload_ok(requests(1))
    batches = [await api.create_ok(file_id, ENDPOINT_CHAT) for _ in range(8)]
    emulator.advance(3600)
    outputs = [(await api.batch(b["id"]))["output_file_id"] for b in batches]
    first = [(await api.call("GET", f"/files/{f}/content"))[0] for f in outputs]
    assert set(first) == {200, 404}
    assert [(await api.call("GET", f"/files/{f}/content"))[0] for f in outputs] == first


async def test_endless_pages_keep_has_more_and_repeat_the_last_page(
    api: Api, emulator: Any
) -> None:
    file_id = await api.upload_ok(requests(1))
    for _ in range(3):
        await api.create_ok(file_id, ENDPOINT_CHAT)
    emulator.set_faults(endless_pages=True)
    _, first, _ = await api.call("GET", "/batches", params={"limit": 2})
    assert (len(first["data"]), first["has_more"]) == (2, True)
    _, last, _ = await api.call("GET", "/batches", params={"limit": 2, "after": first["last_id"]})
    assert (len(last["data"]), last["has_more"]) == (1, True)
    _, again, _ = await api.call("GET", "/batches", params={"limit": 2, "after": last["last_id"]})
    assert again == last  # the cursor stops moving
    _, files, _ = await api.call("GET", "/files")
    assert (len(files["data"]), files["has_more"]) == (1, True)
    assert (await api.stats())["faults"]["endless_pages"] == 3


async def test_garbled_fields_vary_while_identity_fields_stay_right(
    api: Api, emulator: Any
) -> None:
    done = await _finished(api, emulator, requests(3), ds_name="job")
    emulator.set_faults(garbled_fields_rate=1.0)
    seen = [await api.batch(done["id"]) for _ in range(8)]
    identity = ("id", "status", "input_file_id", "output_file_id", "error_file_id", "metadata")
    for batch in seen:
        assert {k: batch[k] for k in identity} == {k: done[k] for k in identity}
    counts = [b["request_counts"] for b in seen]
    assert any(isinstance(c, dict) and c["total"] == "3" for c in counts)
    assert any(isinstance(c, list) for c in counts) and any(isinstance(c, str) for c in counts)
    assert any(isinstance(c, dict) and c["completed"] == 4 and c["failed"] == -1 for c in counts)
    assert any(isinstance(b["created_at"], str) and b["created_at"].endswith("Z") for b in seen)
    assert any(isinstance(b["completed_at"], float) for b in seen)
    _, page, _ = await api.call("GET", "/batches")
    assert page["data"][0]["id"] == done["id"]
    assert (await api.stats())["faults"]["garbled_fields"] == 9
    emulator.set_faults(garbled_fields_rate=0.0)
    assert await api.batch(done["id"]) == done  # only the rendering was garbled


async def test_a_dripping_download_is_slow_and_whole(api: Api, emulator: Any) -> None:
    done = await _finished(api, emulator, requests(2))
    output = done["output_file_id"]
    whole = await api.content(output)
    emulator.set_faults(drip_rate=1.0, drip_bytes_per_s=len(whole) / 0.3)
    started = time.monotonic()
    assert await api.content(output) == whole
    assert time.monotonic() - started >= 0.3
    assert (await api.stats())["faults"]["dripped"] == 1


async def test_a_client_leaving_a_dripping_download_does_not_break_the_emulator(
    api: Api, emulator: Any, http: aiohttp.ClientSession
) -> None:
    done = await _finished(api, emulator, requests(2))
    emulator.set_faults(drip_rate=1.0, drip_bytes_per_s=100)
    url = f"{emulator.base_url}/files/{done['output_file_id']}/content"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with http.get(url, headers=headers) as response:
        assert len(await response.content.read(5)) == 5
    emulator.set_faults(drip_rate=0.0)
    assert (await api.lines(done["output_file_id"]))[0]["custom_id"] in {"r0", "r1"}


async def test_a_huge_line_is_long_valid_json_with_its_custom_id(api: Api, emulator: Any) -> None:
    emulator.set_faults(huge_line_bytes=5_000_000)
    done = await _finished(api, emulator, requests(3))
    raw = await api.content(done["output_file_id"])
    lines = raw.splitlines()
    huge = orjson.loads(lines[0])  # the first success written
    assert len(lines[0]) >= 5_000_000
    assert huge["custom_id"] in {"r0", "r1", "r2"} and huge["error"] is None
    body = huge["response"]["body"]
    assert body["choices"][0]["message"]["content"].startswith("Emulated answer")
    assert body["usage"]["total_tokens"] < 1000  # a normal usage
    assert all(len(line) < 1000 for line in lines[1:])
    _, stored, _ = await api.call("GET", f"/files/{done['output_file_id']}")
    assert stored["bytes"] == len(raw)
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert (await api.stats())["faults"]["huge_lines"] == 1


async def test_odd_lines_are_refused_by_orjson_but_otherwise_readable(
    api: Api, emulator: Any
) -> None:
    emulator.set_faults(odd_lines_rate=1.0)
    done = await _finished(api, emulator, requests(4))
    assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    lines = (await api.content(done["output_file_id"])).splitlines()
    assert len(lines) == 4
    readable: list[dict[str, Any]] = []
    cut: list[bytes] = []
    for line in lines:
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(line)
        assert line.index(b'"id":') < line.index(b'"custom_id":') < 80
        try:
            readable.append(json.loads(line))
        except ValueError:
            cut.append(line)
    assert len(readable) == 3 and len(cut) == 1
    contents = [r["response"]["body"]["choices"][0] for r in readable]
    assert any(c["message"]["content"].endswith("\ud83d") for c in contents)
    assert any(math.isnan(c.get("logprobs") or 0.0) for c in contents)
    assert any(r["response"]["body"].get("score") == math.inf for r in readable)
    ids = {r["custom_id"] for r in readable}
    ids |= {c.decode() for c in re.findall(rb'"custom_id":"([^"]*)"', cut[0])}
    assert ids == {"r0", "r1", "r2", "r3"}
    assert (await api.stats())["faults"]["odd_lines"] == 4


async def test_absurd_usage_numbers_are_written_in_turn_and_billed_as_usual(
    api: Api, emulator: Any
) -> None:
    emulator.set_faults(absurd_usage_rate=1.0)
    done = await _finished(api, emulator, requests(7))
    assert done["request_counts"] == {"total": 7, "completed": 7, "failed": 0}
    lines = (await api.content(done["output_file_id"])).splitlines()
    usages = {}
    for line in lines:
        record = json.loads(line)  # NaN and integers of any length: a lenient parser
        usages[record["custom_id"]] = record["response"]["body"]["usage"]
    seen = set()
    for usage in usages.values():
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, str):
            seen.add("string")
        elif isinstance(completion, int) and completion < 0:
            seen.add("negative")
        elif isinstance(prompt, float):
            seen.add("float")
        elif completion is None:
            seen.add("missing")
        elif isinstance(usage.get("total_tokens"), float) and math.isnan(usage["total_tokens"]):
            assert prompt == 2**64 + 1
            seen.add("nan")
        elif prompt == 2**64 + 1:
            seen.add("2^64+1")
        elif len(str(prompt)) == 401:
            seen.add("401 digits")
    assert seen == {"string", "negative", "float", "missing", "2^64+1", "401 digits", "nan"}
    stats = await api.stats()
    assert stats["faults"]["absurd_usage"] == 7
    # The service bills the answers as usual: its tally holds their true usage.
    tally = stats["tokens_by_model"]["qwen-plus"]
    assert tally["requests"] == 7 and 0 < tally["prompt_tokens"] < 1000


async def test_batch_match_limits_content_faults_to_matching_batches(
    api: Api, emulator: Any
) -> None:
    emulator.set_faults(batch_match="slow", odd_lines_rate=1.0, content_missing_rate=1.0)
    slow = await _finished(api, emulator, requests(2), ds_name="slow")
    fast = await _finished(api, emulator, requests(2), ds_name="fast")
    assert len(await api.lines(fast["output_file_id"])) == 2  # strict parsing works
    assert (await api.call("GET", f"/files/{slow['output_file_id']}/content"))[0] == 404
    emulator.set_faults(content_missing_rate=0.0)
    for line in (await api.content(slow["output_file_id"])).splitlines():
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(line)
    faults = (await api.stats())["faults"]
    assert (faults["odd_lines"], faults["content_missing"]) == (2, 1)


@pytest.mark.parametrize(
    "patch",
    [
        {"content_missing_rate": 1.5},
        {"lost_response_rate": -0.1},
        {"garbled_fields_rate": 2},
        {"drip_rate": 1.1},
        {"drip_bytes_per_s": 0},
        {"huge_line_bytes": -1},
        {"odd_lines_rate": "often"},
        {"endless_pages": "sometimes"},
    ],
)
async def test_bad_fault_values_are_refused(api: Api, patch: dict[str, Any]) -> None:
    status, body, _ = await api.call("POST", "/_emulator/faults", json=patch, key=None)
    assert (status, body["error"]["code"]) == (400, "InvalidParameter")


def test_faults_are_set_per_run_from_toml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text('[emulator.faults]\nbatch_match = "slow"\nendless_pages = true\n')
    monkeypatch.setenv("BATCHD_EMULATOR_FAULTS__HUGE_LINE_BYTES", "1000")
    faults = EmulatorSettings.load(config).faults
    assert (faults.batch_match, faults.endless_pages, faults.huge_line_bytes) == (
        "slow",
        True,
        1000,
    )
