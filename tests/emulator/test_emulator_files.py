"""Files: upload, list, retrieve, download, delete, storage caps, and the API key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from batchd.testing import Api

ROOMY = {"upload_per_second": 1000, "file_calls_per_second": 1000}


async def test_upload_returns_the_seed_file_object(api: Api, seed_lines: bytes) -> None:
    status, body, _ = await api.upload(seed_lines, "test_model.jsonl")
    assert status == 200
    assert list(body) == [
        "id",
        "bytes",
        "created_at",
        "filename",
        "object",
        "purpose",
        "status",
        "status_details",
    ]
    assert body["id"].startswith("file-batch-")
    assert body["bytes"] == len(seed_lines)
    assert body["filename"] == "test_model.jsonl"
    assert (body["object"], body["purpose"], body["status"]) == ("file", "batch", "processed")
    assert body["status_details"] is None
    assert isinstance(body["created_at"], int)


@pytest.mark.parametrize("prefix", ["/compatible-mode/v1", "/v1"])
async def test_both_base_paths_serve_the_same_account(
    api: Api, seed_lines: bytes, prefix: str
) -> None:
    file_id = await api.upload_ok(seed_lines)
    status, body, _ = await api.call("GET", f"{prefix}/files/{file_id}")
    assert status == 200
    assert body["id"] == file_id


async def test_list_retrieve_and_delete_files(api: Api, seed_lines: bytes) -> None:
    first = await api.upload_ok(seed_lines, "a.jsonl")
    second = await api.upload_ok(seed_lines, "b.jsonl")
    status, listing, _ = await api.call("GET", "/files")
    assert status == 200
    assert listing["object"] == "list"
    assert [f["id"] for f in listing["data"]] == [second, first]  # newest first
    assert listing["has_more"] is False
    status, page, _ = await api.call("GET", "/files", params={"limit": 1, "order": "asc"})
    assert [f["id"] for f in page["data"]] == [first]
    assert page["has_more"] is True

    status, body, _ = await api.call("DELETE", f"/files/{first}")
    assert (status, body) == (200, {"id": first, "object": "file", "deleted": True})
    status, body, _ = await api.call("GET", f"/files/{first}")
    assert status == 404
    assert body["error"]["code"] == "NotFound"
    status, _, _ = await api.call("DELETE", f"/files/{first}")
    assert status == 404
    assert (await api.stats())["files_stored"] == {"count": 1, "bytes": len(seed_lines)}


async def test_input_files_cannot_be_downloaded(api: Api, seed_lines: bytes) -> None:
    file_id = await api.upload_ok(seed_lines)
    status, body, _ = await api.call("GET", f"/files/{file_id}/content")
    assert status == 400
    assert body["error"]["code"] == "InvalidParameter"
    assert "file-batch_output" in body["error"]["message"]


async def test_upload_over_the_byte_limit_is_refused_and_not_stored(
    start_emulator: Any, make_api: Any
) -> None:
    api = make_api(await start_emulator(limits={"max_file_bytes": 1000}))
    status, body, _ = await api.upload(b"x" * 1001)
    assert status == 400
    assert body["error"]["code"] == "InvalidParameter"
    assert body["error"]["param"] == "file"
    status, _, _ = await api.upload(b"x" * 1000)
    assert status == 200
    assert (await api.stats())["files_stored"] == {"count": 1, "bytes": 1000}


async def test_an_upload_larger_than_any_request_buffer_is_streamed(
    api: Api, emulator: Any
) -> None:
    # 40 MiB is well past the app's 16 MiB request-body limit: only a streamed upload fits.
    content = (b"y" * 1023 + b"\n") * 40 * 1024
    status, body, _ = await api.upload(content)
    assert status == 200, body
    stored = emulator.state.store.files[body["id"]]
    assert stored.path.stat().st_size == len(content) == body["bytes"]


async def test_upload_needs_purpose_batch_and_a_file(api: Api, seed_lines: bytes) -> None:
    status, body, _ = await api.upload(seed_lines, purpose="fine-tune")
    assert (status, body["error"]["param"]) == (400, "purpose")
    status, body, _ = await api.call("POST", "/files", data={"purpose": "batch"})
    assert status == 400


async def test_storage_caps_refuse_uploads_until_files_are_deleted(
    start_emulator: Any, make_api: Any, seed_lines: bytes
) -> None:
    limits = ROOMY | {"max_stored_files": 2, "max_stored_bytes": 3 * len(seed_lines)}
    api = make_api(await start_emulator(limits=limits))
    first = await api.upload_ok(seed_lines)
    await api.upload_ok(seed_lines)
    status, body, _ = await api.upload(seed_lines)
    assert status == 429
    assert body["error"]["code"] == "Throttling.AllocationQuota"
    await api.call("DELETE", f"/files/{first}")
    await api.upload_ok(seed_lines[:10])
    status, body, _ = await api.call("DELETE", f"/files/{first}")
    assert status == 404
    stats = await api.stats()
    assert stats["files_stored"] == {"count": 2, "bytes": len(seed_lines) + 10}

    api2 = make_api(await start_emulator(limits=ROOMY | {"max_stored_bytes": 100}))
    await api2.upload_ok(b"z" * 60)
    status, body, _ = await api2.upload(b"z" * 41)
    assert (status, body["error"]["code"]) == (429, "Throttling.AllocationQuota")


@pytest.mark.parametrize("header", [None, "Bearer sk-wrong", "Basic sk-emulator-test-key", ""])
async def test_a_missing_or_wrong_key_gets_401_invalid_api_key(api: Api, header: Any) -> None:
    headers = {} if header is None else {"Authorization": header}
    async with api.session.get(f"{api.emulator.base_url}/files", headers=headers) as response:
        assert response.status == 401
        body = await response.json()
    assert body["error"]["code"] == "InvalidApiKey"
    assert set(body["error"]) == {"code", "message", "type", "param"}
    stats = await api.stats()  # control routes need no key
    assert stats["calls"]["files"]["served"] == 0  # refused calls are not served
