"""The service's own checks of input files: a bad file ends `failed` with line-level errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import pytest

from batchd.testing import ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, ENDPOINT_TEST, requests

if TYPE_CHECKING:
    from batchd.testing import Api

ROOMY = {"upload_per_second": 1000, "file_calls_per_second": 1000}


def line(custom_id: str = "x", **changes: Any) -> bytes:
    record: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT_CHAT,
        "body": {"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]},
    }
    body_changes = changes.pop("body", {})
    record.update(changes)
    record["body"] = {**record["body"], **body_changes} if body_changes is not None else None
    return orjson.dumps({k: v for k, v in record.items() if v is not None}) + b"\n"


async def _errors(api: Api, emulator: Any, content: bytes, endpoint: str = ENDPOINT_CHAT) -> Any:
    batch = await api.create_ok(await api.upload_ok(content), endpoint)
    assert batch["status"] == "validating"
    emulator.advance(60)
    failed = await api.batch(batch["id"])
    assert failed["status"] == "failed", failed
    assert failed["failed_at"] is not None and failed["in_progress_at"] is None
    assert failed["output_file_id"] is None and failed["error_file_id"] is None
    assert failed["errors"]["object"] == "list"
    return {(e["code"], e["line"]) for e in failed["errors"]["data"]}


CASES = [
    (
        "malformed",
        requests(1) + b"{not json\n" + b"[1, 2]\n",
        {("invalid_json_line", 2), ("invalid_json_line", 3)},
    ),
    ("blank line", requests(1) + b"\n" + requests(1, start=1), {("invalid_json_line", 2)}),
    ("mismatched model", requests(2) + requests(1, "qwen-max", start=2), {("mismatched_model", 3)}),
    (
        "mismatched thinking mode",
        requests(1, enable_thinking=True) + requests(1, enable_thinking=False, start=1),
        {("mismatched_model", 2)},
    ),
    ("duplicate custom_id", requests(2) + requests(1, start=1), {("duplicate_custom_id", 3)}),
    ("unknown model", requests(1, "qwen-imaginary"), {("model_not_found", 1)}),
    ("url differs", line("a") + line("b", url=ENDPOINT_EMBEDDINGS), {("invalid_url", 2)}),
    ("method", line("a", method="GET"), {("invalid_request", 1)}),
    ("no custom_id", line("", body={}), {("invalid_request", 1)}),
    ("no body", line("a", body=None), {("invalid_request", 1)}),
    ("no messages", line("a", body={"messages": []}), {("invalid_request", 1)}),
    ("empty file", b"", {("empty_file", None)}),
]


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_a_bad_file_fails_with_its_code_and_line(
    api: Api, emulator: Any, content: bytes, expected: set[tuple[str, int | None]]
) -> None:
    assert await _errors(api, emulator, content) == expected


async def test_over_the_request_limit_fails(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(limits={"max_requests_per_file": 3})
    api = make_api(emulator)
    assert await _errors(api, emulator, requests(4)) == {("request_limit_exceeded", 4)}
    batch = await api.create_ok(await api.upload_ok(requests(3)), ENDPOINT_CHAT)
    emulator.advance(3600)
    assert (await api.batch(batch["id"]))["status"] == "completed"


async def test_over_the_line_limit_fails(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(limits={"max_line_bytes": 200})
    api = make_api(emulator)
    long_line = line("b", body={"messages": [{"role": "user", "content": "x" * 200}]})
    assert await _errors(api, emulator, line("a") + long_line) == {("line_too_large", 2)}


async def test_the_test_model_allows_100_lines_and_1_mib(api: Api, emulator: Any) -> None:
    assert await _errors(
        api, emulator, requests(101, "batch-test-model", ENDPOINT_TEST), ENDPOINT_TEST
    ) == {("request_limit_exceeded", 101)}
    big = "x" * 11_000
    heavy = requests(
        100, "batch-test-model", ENDPOINT_TEST, messages=[{"role": "user", "content": big}]
    )
    assert len(heavy) > 1024 * 1024
    assert await _errors(api, emulator, heavy, ENDPOINT_TEST) == {("file_too_large", None)}


async def test_the_test_model_runs_only_on_its_endpoint(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(limits=ROOMY)
    api = make_api(emulator)
    on_chat = requests(1, "batch-test-model", ENDPOINT_CHAT)
    assert await _errors(api, emulator, on_chat) == {("model_not_found", 1)}
    other_on_test = requests(1, "qwen-plus", ENDPOINT_TEST)
    assert await _errors(api, emulator, other_on_test, ENDPOINT_TEST) == {("model_not_found", 1)}


async def test_errors_carry_message_and_param(api: Api, emulator: Any) -> None:
    batch = await api.create_ok(await api.upload_ok(requests(1, "nope")), ENDPOINT_CHAT)
    emulator.advance(60)
    (error,) = (await api.batch(batch["id"]))["errors"]["data"]
    assert error == {
        "code": "model_not_found",
        "message": "model 'nope' does not exist",
        "param": "body.model",
        "line": 1,
    }
