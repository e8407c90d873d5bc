"""The official openai SDK, pointed at the emulator, runs the seed's quick-start unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai import OpenAI

from batchd.emulator import Emulator

FIXTURES = Path(__file__).parent.parent / "fixtures"
KEY = "sk-emulator-test-key"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def advance(emulator: Emulator, seconds: float) -> None:
    """Move the service clock over HTTP, as a script in another process would."""
    response = httpx2.post(
        f"{emulator.root_url}/_emulator/clock/advance", json={"seconds": seconds}
    )
    assert response.status_code == 200


def quick_start(emulator: Emulator, tmp_path: Path) -> dict[str, Any]:
    """The seed's script: upload, create, poll until done, download output and errors."""
    with OpenAI(api_key=KEY, base_url=emulator.base_url, max_retries=0) as client:
        file_object = client.files.create(file=FIXTURES / "test_model.jsonl", purpose="batch")
        batch = client.batches.create(
            input_file_id=file_object.id,
            endpoint="/v1/chat/ds-test",  # type: ignore[arg-type]
            completion_window="24h",
            metadata={"ds_name": "quick start", "ds_description": "seed flow"},
        )
        statuses = []
        status = ""
        while status not in TERMINAL:
            status = client.batches.retrieve(batch_id=batch.id).status
            statuses.append(status)
            advance(emulator, 30)  # the seed sleeps 10 s between polls
        done = client.batches.retrieve(batch.id)
        assert done.output_file_id is not None
        content = client.files.content(done.output_file_id)
        content.write_to_file(tmp_path / "result.jsonl")
        listed = client.batches.list(
            limit=2,
            extra_query={
                "ds_name": "quick",
                "input_file_ids": file_object.id,
                "status": "completed,expired",
            },
        )
        return {
            "file": file_object,
            "batch": batch,
            "done": done,
            "statuses": statuses,
            "text": content.text,
            "listed": listed,
        }


async def test_seed_quick_start_completes_with_the_seed_result_lines(
    start_emulator: Any, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    run = await asyncio.to_thread(quick_start, emulator, tmp_path)

    assert run["file"].id.startswith("file-batch-")
    assert run["file"].bytes == (FIXTURES / "test_model.jsonl").stat().st_size
    assert run["file"].status == "processed"
    assert run["batch"].status == "validating"
    assert run["batch"].metadata == {"ds_name": "quick start", "ds_description": "seed flow"}
    assert run["statuses"][0] == "validating"
    assert "in_progress" in run["statuses"]
    assert run["statuses"][-1] == "completed"
    done = run["done"]
    assert done.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
    assert done.error_file_id is None
    assert done.output_file_id.startswith("file-batch_output")
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at

    lines = sorted(
        (orjson.loads(x) for x in run["text"].splitlines()), key=lambda x: x["custom_id"]
    )
    assert (tmp_path / "result.jsonl").read_text() == run["text"]
    assert [line["custom_id"] for line in lines] == ["1", "2"]
    for line in lines:
        assert list(line) == ["id", "custom_id", "response", "error"]
        assert line["error"] is None
        response = line["response"]
        assert list(response) == ["status_code", "request_id", "body"]
        assert response["status_code"] == 200
        assert response["request_id"] == line["id"]
        body = response["body"]
        assert list(body) == ["created", "usage", "model", "id", "choices", "object"]
        assert body["usage"] == {"completion_tokens": 6, "prompt_tokens": 20, "total_tokens": 26}
        assert body["model"] == "batch-test-model"
        assert body["id"].startswith("chatcmpl-")
        assert body["object"] == "chat.completion"
        assert body["choices"] == [
            {"finish_reason": "stop", "index": 0, "message": {"content": "This is a test result."}}
        ]

    listed = run["listed"]
    assert [b.id for b in listed.data] == [done.id]
    assert listed.has_more is False


def cancel_and_clean_up(emulator: Emulator) -> dict[str, Any]:
    with OpenAI(api_key=KEY, base_url=emulator.base_url, max_retries=0) as client:
        uploaded = client.files.create(file=FIXTURES / "test_model.jsonl", purpose="batch")
        failing = client.files.create(
            file=("bad.jsonl", b'{"custom_id":"1"}\nnot json\n'), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/ds-test",  # type: ignore[arg-type]
            completion_window="1d",
        )
        advance(emulator, 60)
        cancelling = client.batches.cancel(batch.id)
        advance(emulator, 60)
        cancelled = client.batches.retrieve(batch.id)
        assert cancelled.error_file_id is not None
        errors = client.files.content(cancelled.error_file_id).text
        bad = client.batches.create(
            input_file_id=failing.id,
            endpoint="/v1/chat/ds-test",  # type: ignore[arg-type]
            completion_window="24h",
        )
        advance(emulator, 60)
        failed = client.batches.retrieve(bad.id)
        pages = list(client.batches.list(limit=1))
        with pytest.raises(openai.BadRequestError):
            client.files.content(uploaded.id)
        files_before = [f.id for f in client.files.list()]
        deleted = [client.files.delete(f).deleted for f in files_before]
        files_after = [f.id for f in client.files.list()]
        return {
            "cancelling": cancelling,
            "cancelled": cancelled,
            "errors": errors,
            "failed": failed,
            "pages": pages,
            "files_before": files_before,
            "deleted": deleted,
            "files_after": files_after,
        }


async def test_sdk_cancels_lists_reads_errors_and_deletes(start_emulator: Any) -> None:
    emulator = await start_emulator()
    run = await asyncio.to_thread(cancel_and_clean_up, emulator)

    assert run["cancelling"].status == "cancelling"
    cancelled = run["cancelled"]
    assert cancelled.status == "cancelled"
    assert cancelled.output_file_id is None
    assert cancelled.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 2}
    not_run = [orjson.loads(line) for line in run["errors"].splitlines()]
    assert sorted(line["custom_id"] for line in not_run) == ["1", "2"]
    assert {line["error"]["code"] for line in not_run} == {"batch_cancelled"}

    failed = run["failed"]
    assert failed.status == "failed"
    assert failed.errors is not None
    assert {(e.code, e.line) for e in failed.errors.data or []} >= {("invalid_json_line", 2)}

    assert len(run["pages"]) == 2  # auto-pagination followed has_more/after
    assert len(run["files_before"]) == 3  # two inputs and the cancelled batch's error file
    assert all(run["deleted"])
    assert run["files_after"] == []


def errors_raised(emulator: Emulator) -> tuple[type[Exception], type[Exception]]:
    with OpenAI(api_key="sk-wrong", base_url=emulator.base_url, max_retries=0) as client:
        try:
            client.batches.list()
        except openai.APIError as exc:
            unauthorised: type[Exception] = type(exc)
    with OpenAI(api_key=KEY, base_url=emulator.base_url, max_retries=0) as client:
        client.batches.list()
        try:
            client.batches.list()
        except openai.APIError as exc:
            throttled: type[Exception] = type(exc)
    return unauthorised, throttled


async def test_sdk_raises_authentication_and_rate_limit_errors(start_emulator: Any) -> None:
    emulator = await start_emulator(limits={"list_per_minute": 1})
    unauthorised, throttled = await asyncio.to_thread(errors_raised, emulator)
    assert unauthorised is openai.AuthenticationError
    assert throttled is openai.RateLimitError
