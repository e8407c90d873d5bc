"""Tokens: the per-model usage tally of `/_emulator/stats`, and OpenAI's enqueued-token limit."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from openai import OpenAI

from batchd.emulator.results import prompt_tokens
from batchd.testing import API_KEY, ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, ENDPOINT_TEST, requests

if TYPE_CHECKING:
    from batchd.emulator import Emulator
    from batchd.testing import Api

USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
MODEL = "gpt-4o-mini"
ROOMY = {"upload_per_second": 1000, "file_calls_per_second": 1000}


def file_tokens(content: bytes, endpoint: str) -> int:
    """The input tokens of a request file, as the emulator counts each line."""
    return sum(prompt_tokens(orjson.loads(line)["body"], endpoint) for line in content.splitlines())


def tally_of(outputs: list[list[dict[str, Any]]], errors: list[str]) -> dict[str, dict[str, int]]:
    """Per model, the usage summed over downloaded output lines, and the failed lines
    (`errors`: the model of each error-file line)."""
    tally: dict[str, Counter[str]] = {}
    for lines in outputs:
        for line in lines:
            body = line["response"]["body"]
            row = tally.setdefault(body["model"], Counter())
            row["requests"] += 1
            for name in USAGE:
                row[name] += body["usage"].get(name, 0)
            details = body["usage"].get("completion_tokens_details") or {}
            row["reasoning_tokens"] += details.get("reasoning_tokens", 0)
    for model in errors:
        tally.setdefault(model, Counter())["failed"] += 1
    fields = ("requests", *USAGE, "reasoning_tokens", "failed")
    return {model: {name: row[name] for name in fields} for model, row in tally.items()}


async def test_stats_count_each_models_tokens_once_as_the_result_files_show_them(
    start_emulator: Any, make_api: Any, seed_lines: bytes
) -> None:
    emulator = await start_emulator(
        request_failure_rate=0.3,
        seed=7,
        validating_s=0,
        in_progress_base_s=0,
        per_request_s=10,
        limits=ROOMY,
    )
    api: Api = make_api(emulator)
    inputs = [
        (requests(12, "qwen-plus", prefix="plus"), ENDPOINT_CHAT),
        (requests(6, "qwq-plus", prefix="qwq"), ENDPOINT_CHAT),  # thinks: reasoning tokens
        (requests(5, "text-embedding-v3", ENDPOINT_EMBEDDINGS, prefix="emb"), ENDPOINT_EMBEDDINGS),
        (seed_lines, ENDPOINT_TEST),
        (requests(10, "qwen-turbo", prefix="turbo"), ENDPOINT_CHAT),  # cancelled part way
    ]
    model_of: dict[str, str] = {}
    batches = []
    for content, endpoint in inputs:
        for line in content.splitlines():
            request = orjson.loads(line)
            model_of[request["custom_id"]] = request["body"]["model"]
        batches.append(await api.create_ok(await api.upload_ok(content), endpoint))
    emulator.advance(35)  # three turbo requests done
    await api.call("POST", f"/batches/{batches[-1]['id']}/cancel")
    emulator.advance(3600)

    outputs: list[list[dict[str, Any]]] = []
    failed: list[str] = []
    for batch in batches:
        done = await api.batch(batch["id"])
        assert done["status"] in ("completed", "cancelled")
        if done["output_file_id"] is not None:
            outputs.append(await api.lines(done["output_file_id"]))
        if done["error_file_id"] is not None:
            failed += [model_of[x["custom_id"]] for x in await api.lines(done["error_file_id"])]
    expected = tally_of(outputs, failed)
    assert set(expected) == set(model_of.values())  # every model of the five batches
    assert expected["qwen-turbo"]["failed"] >= 7  # never run after the cancel
    assert expected["qwq-plus"]["reasoning_tokens"] > 0
    test_model = expected["batch-test-model"]
    answered = test_model["requests"]
    assert answered + test_model["failed"] == 2
    assert (test_model["prompt_tokens"], test_model["completion_tokens"]) == (
        20 * answered,
        6 * answered,
    )
    assert sum(row["failed"] for row in expected.values()) > 7  # drawn failures too
    assert (await api.stats())["tokens_by_model"] == expected

    for _ in range(3):  # downloads and retrieves again add nothing
        for batch in batches:
            done = await api.batch(batch["id"])
            for file_id in (done["output_file_id"], done["error_file_id"]):
                if file_id is not None:
                    await api.content(file_id)
    assert (await api.stats())["tokens_by_model"] == expected


def enqueue(emulator: Emulator, path: Path) -> tuple[list[Any], list[Any]]:
    """With the official SDK: create two batches of the same file at once, then read both
    once validation is over."""
    with OpenAI(api_key=API_KEY, base_url=emulator.base_url, max_retries=0) as client:
        file_object = client.files.create(file=path, purpose="batch")
        created = [
            client.batches.create(
                input_file_id=file_object.id, endpoint=ENDPOINT_CHAT, completion_window="24h"
            )
            for _ in range(2)
        ]
        emulator.advance(20)  # validation over
        return created, [client.batches.retrieve(b.id) for b in created]


async def test_a_batch_that_would_pass_the_enqueued_token_limit_fails_at_validation(
    start_emulator: Any, make_api: Any, tmp_path: Path
) -> None:
    content = requests(4, MODEL)
    tokens = file_tokens(content, ENDPOINT_CHAT)
    limit = 2 * tokens - 1  # one such file fits; two do not
    emulator = await start_emulator(limits=ROOMY | {"models": {MODEL: {"enqueued_tokens": limit}}})
    api: Api = make_api(emulator)
    path = tmp_path / "input.jsonl"
    path.write_bytes(content)

    created, (first, second) = await asyncio.to_thread(enqueue, emulator, path)
    assert [b.status for b in created] == ["validating", "validating"]
    assert first.status == "in_progress"
    assert second.status == "failed"
    assert second.errors is not None
    (error,) = second.errors.data
    assert (error.code, error.line, error.param) == ("token_limit_exceeded", None, None)
    assert error.message == (
        f"Enqueued token limit reached for {MODEL} in organization org-emulator. "
        f"Limit: {limit:,} enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )
    assert second.output_file_id is None and second.request_counts is not None
    assert second.request_counts.total == 0
    stats = await api.stats()
    assert stats["enqueued_tokens"] == {MODEL: tokens}  # the failed batch never counted
    assert stats["faults"]["token_limit_exceeded"] == 1

    # A model without a limit is not held back by this one's queue.
    other = await api.create_ok(await api.upload_ok(requests(40, "qwen-plus")), ENDPOINT_CHAT)
    emulator.advance(20)
    assert (await api.batch(other["id"]))["status"] == "in_progress"

    emulator.advance(3600)  # the first batch ends: its tokens stop counting
    assert (await api.batch(first.id))["status"] == "completed"
    assert (await api.stats())["enqueued_tokens"].get(MODEL, 0) == 0
    third = await api.create_ok(await api.upload_ok(content), ENDPOINT_CHAT)
    emulator.advance(3600)
    assert (await api.batch(third["id"]))["status"] == "completed"


async def test_a_file_alone_over_the_limit_fails_and_a_cancelled_batch_frees_its_tokens(
    start_emulator: Any, make_api: Any
) -> None:
    emulator = await start_emulator(limits=ROOMY | {"models": {MODEL: {"enqueued_tokens": 1000}}})
    api: Api = make_api(emulator)
    long = [{"role": "user", "content": "x" * 4000}]
    big = await api.upload_ok(requests(4, MODEL, messages=long))
    batch = await api.create_ok(big, ENDPOINT_CHAT)
    emulator.advance(20)
    assert (await api.batch(batch["id"]))["errors"]["data"][0]["code"] == "token_limit_exceeded"

    small = await api.upload_ok(requests(20, MODEL))
    queued = (await api.create_ok(small, ENDPOINT_CHAT))["id"]
    held = (await api.stats())["enqueued_tokens"][MODEL]
    assert 0 < held <= 1000
    await api.call("POST", f"/batches/{queued}/cancel")
    assert (await api.stats())["enqueued_tokens"][MODEL] == held  # cancelling still counts
    emulator.advance(5)
    assert (await api.batch(queued))["status"] == "cancelled"
    assert MODEL not in (await api.stats())["enqueued_tokens"]


async def test_the_enqueued_token_limit_switches_at_run_time(api: Api, emulator: Emulator) -> None:
    content = requests(3, "qwen-plus")
    file_id = await api.upload_ok(content)
    status, faults, _ = await api.call(
        "POST", "/_emulator/faults", json={"enqueued_tokens": {"qwen-plus": 1}}, key=None
    )
    assert (status, faults["enqueued_tokens"]) == (200, {"qwen-plus": 1})
    refused = await api.create_ok(file_id, ENDPOINT_CHAT)
    emulator.set_faults(enqueued_tokens={"qwen-plus": file_tokens(content, ENDPOINT_CHAT)})
    exact = await api.create_ok(file_id, ENDPOINT_CHAT)  # exactly at the limit fits
    emulator.advance(20)
    assert (await api.batch(refused["id"]))["status"] == "failed"
    assert (await api.batch(exact["id"]))["status"] == "in_progress"
    status, body, _ = await api.call(
        "POST", "/_emulator/faults", json={"enqueued_tokens": {"qwen-plus": 0}}, key=None
    )
    assert status == 400 and "enqueued_tokens" in body["error"]["message"]
