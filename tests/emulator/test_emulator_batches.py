"""Batches: create's own checks, retrieve, cancel, and list with pagination and filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest

from batchd.testing import ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, ENDPOINT_TEST, requests

if TYPE_CHECKING:
    from batchd.testing import Api

BATCH_FIELDS = [
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
]


async def test_create_returns_a_validating_batch_with_every_field(
    api: Api, seed_lines: bytes
) -> None:
    file_id = await api.upload_ok(seed_lines)
    meta = {"ds_name": "任务名称", "ds_description": "任务描述"}
    batch = await api.create_ok(file_id, ENDPOINT_TEST, metadata=meta)
    assert list(batch) == BATCH_FIELDS
    assert batch["id"].startswith("batch_")
    assert (batch["object"], batch["status"], batch["endpoint"]) == (
        "batch",
        "validating",
        ENDPOINT_TEST,
    )
    assert batch["input_file_id"] == file_id
    assert batch["completion_window"] == "24h"
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["metadata"] == meta
    nulls = [f for f in BATCH_FIELDS if f.endswith("_at") and f != "created_at"]
    assert all(batch[f] is None for f in nulls)
    assert batch["errors"] is None and batch["output_file_id"] is None
    assert await api.batch(batch["id"]) == batch


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"completion_window": "23h"}, "completion_window"),
        ({"completion_window": "337h"}, "completion_window"),
        ({"completion_window": "15d"}, "completion_window"),
        ({"completion_window": "24"}, "completion_window"),
        ({"completion_window": "1.5d"}, "completion_window"),
        ({"completion_window": "024h"}, "completion_window"),
        ({"endpoint": "/v1/responses"}, "endpoint"),
        ({"endpoint": None}, "endpoint"),
        ({"input_file_id": None}, "input_file_id"),
        ({"input_file_id": "file-batch-nope"}, "input_file_id"),
        ({"input_file_id": "oss:cn-beijing:bucket/x.jsonl"}, "input_file_id"),
        ({"metadata": {"ds_name": "n" * 101}}, "ds_name"),
        ({"metadata": {"ds_description": "d" * 201}}, "ds_description"),
        ({"metadata": {"ds_name": 5}}, "metadata"),
    ],
)
async def test_create_refuses_bad_parameters_with_400(
    api: Api, seed_lines: bytes, change: dict[str, Any], param: str
) -> None:
    file_id = await api.upload_ok(seed_lines)
    payload = {"input_file_id": file_id, "endpoint": ENDPOINT_TEST, "completion_window": "24h"}
    payload.update(change)
    status, body, _ = await api.call("POST", "/batches", json=payload)
    assert status == 400, body
    assert body["error"]["code"] == "InvalidParameter"
    assert body["error"]["param"] == param
    assert (await api.stats())["batches_created"] == 0


@pytest.mark.parametrize("window", ["24h", "336h", "1d", "14d"])
async def test_completion_window_bounds_are_accepted(
    api: Api, seed_lines: bytes, window: str
) -> None:
    file_id = await api.upload_ok(seed_lines)
    batch = await api.create_ok(
        file_id, ENDPOINT_TEST, completion_window=window, metadata={"ds_name": "n" * 100}
    )
    assert batch["completion_window"] == window


async def test_create_refuses_a_body_that_is_not_json(api: Api) -> None:
    status, body, _ = await api.call("POST", "/batches", data=b"{nope")
    assert (status, body["error"]["code"]) == (400, "InvalidParameter")


async def test_unknown_batch_is_404(api: Api) -> None:
    for method, path in (("GET", "/batches/batch_x"), ("POST", "/batches/batch_x/cancel")):
        status, body, _ = await api.call(method, path)
        assert (status, body["error"]["code"]) == (404, "NotFound")


async def test_a_finished_batch_cannot_be_cancelled_and_cancel_is_idempotent(
    api: Api, emulator: Any, seed_lines: bytes
) -> None:
    file_id = await api.upload_ok(seed_lines)
    done = await api.create_ok(file_id, ENDPOINT_TEST)
    emulator.advance(3600)
    status, body, _ = await api.call("POST", f"/batches/{done['id']}/cancel")
    assert (status, body["error"]["code"]) == (400, "InvalidParameter")

    running = await api.create_ok(file_id, ENDPOINT_TEST)
    status, first, _ = await api.call("POST", f"/batches/{running['id']}/cancel")
    assert (status, first["status"]) == (200, "cancelling")
    status, again, _ = await api.call("POST", f"/batches/{running['id']}/cancel")
    assert (status, again["cancelling_at"]) == (200, first["cancelling_at"])
    assert (await api.stats())["calls"]["cancel"]["served"] == 3


async def _many(api: Api, emulator: Any, count: int) -> list[dict[str, Any]]:
    file_id = await api.upload_ok(requests(2))
    batches = []
    for n in range(count):
        meta = {"ds_name": f"job-{n}" + ("-even" if n % 2 == 0 else "")}
        batches.append(await api.create_ok(file_id, ENDPOINT_CHAT, metadata=meta))
        emulator.advance(1)
    return batches


async def test_list_pages_newest_first_with_after_and_limit(api: Api, emulator: Any) -> None:
    made = await _many(api, emulator, 5)
    newest_first = [b["id"] for b in reversed(made)]
    status, page, _ = await api.call("GET", "/batches")
    assert status == 200
    assert [b["id"] for b in page["data"]] == newest_first
    assert (page["object"], page["has_more"]) == ("list", False)
    assert (page["first_id"], page["last_id"]) == (newest_first[0], newest_first[-1])

    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
        _, page, _ = await api.call("GET", "/batches", params=params)
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == newest_first

    for bad in ("0", "101", "x"):
        status, body, _ = await api.call("GET", "/batches", params={"limit": bad})
        assert (status, body["error"]["param"]) == (400, "limit")
    _, page, _ = await api.call("GET", "/batches", params={"limit": 100})
    assert len(page["data"]) == 5
    status, _, _ = await api.call("GET", "/batches", params={"after": "batch_unknown"})
    assert status == 400


async def test_list_filters_by_name_status_input_files_and_creation_time(
    api: Api, emulator: Any
) -> None:
    made = await _many(api, emulator, 4)
    other_file = await api.upload_ok(requests(1))
    other = await api.create_ok(other_file, ENDPOINT_CHAT)

    async def ids(**query: Any) -> list[str]:
        status, page, _ = await api.call("GET", "/batches", params=query)
        assert status == 200, page
        return [b["id"] for b in page["data"]]

    assert await ids(ds_name="even") == [made[2]["id"], made[0]["id"]]
    assert await ids(ds_name="job-3") == [made[3]["id"]]
    assert await ids(input_file_ids=other_file) == [other["id"]]
    both = f"{made[0]['input_file_id']},{other_file}"
    assert len(await ids(input_file_ids=both)) == 5
    too_many = ",".join(f"file-batch-{n}" for n in range(21))
    status, body, _ = await api.call("GET", "/batches", params={"input_file_ids": too_many})
    assert (status, body["error"]["param"]) == (400, "input_file_ids")

    await api.call("POST", f"/batches/{made[1]['id']}/cancel")
    assert await ids(status="cancelling") == [made[1]["id"]]
    assert len(await ids(status="validating,cancelling")) == 5
    status, _, _ = await api.call("GET", "/batches", params={"status": "done"})
    assert status == 400

    # create_after / create_before are read as Beijing time, to the second, inclusive.
    beijing = timezone(timedelta(hours=8))

    def stamp(unix: int) -> str:
        return datetime.fromtimestamp(unix, UTC).astimezone(beijing).strftime("%Y%m%d%H%M%S")

    second = made[1]["created_at"]
    assert await ids(create_after=stamp(second), create_before=stamp(second)) == [made[1]["id"]]
    assert made[0]["id"] not in await ids(create_after=stamp(second))
    assert await ids(create_before=stamp(made[0]["created_at"])) == [made[0]["id"]]
    status, _, _ = await api.call("GET", "/batches", params={"create_after": "2025-03-04"})
    assert status == 400


async def test_embeddings_and_chat_endpoints_are_served(api: Api, emulator: Any) -> None:
    chat = await api.create_ok(await api.upload_ok(requests(1)), ENDPOINT_CHAT)
    emb = await api.create_ok(
        await api.upload_ok(requests(1, "text-embedding-v4", ENDPOINT_EMBEDDINGS)),
        ENDPOINT_EMBEDDINGS,
    )
    emulator.advance(3600)
    assert (await api.batch(chat["id"]))["status"] == "completed"
    assert (await api.batch(emb["id"]))["status"] == "completed"
