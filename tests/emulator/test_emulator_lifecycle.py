"""Every path of a batch's life, driven by the service clock, and what each leaves behind."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchd.testing import ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, requests

if TYPE_CHECKING:
    from batchd.testing import Api

# 4 requests, validating 20 s, running 120 + 4 x 30,000 s: longer than a 24 h window.
SLOW = {"per_request_s": 30_000}


async def test_a_batch_walks_validating_in_progress_finalizing_completed(
    api: Api, emulator: Any
) -> None:
    batch = await api.create_ok(await api.upload_ok(requests(4)), ENDPOINT_CHAT)
    seen = []
    for _ in range(40):
        current = await api.batch(batch["id"])
        seen.append(current["status"])
        if current["status"] == "completed":
            break
        emulator.advance(5)
    assert list(dict.fromkeys(seen)) == ["validating", "in_progress", "finalizing", "completed"]
    done = current
    assert (
        done["created_at"] < done["in_progress_at"] < done["finalizing_at"] < done["completed_at"]
    )
    assert done["expires_at"] == done["created_at"] + 24 * 3600
    assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert done["error_file_id"] is None
    lines = await api.lines(done["output_file_id"])
    assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2", "r3"]


async def test_progress_shows_in_request_counts_while_in_progress(
    start_emulator: Any, make_api: Any
) -> None:
    emulator = await start_emulator(in_progress_base_s=0, per_request_s=10, validating_s=0)
    api = make_api(emulator)
    batch = await api.create_ok(await api.upload_ok(requests(10)), ENDPOINT_CHAT)
    emulator.advance(35)
    current = await api.batch(batch["id"])
    assert current["status"] == "in_progress"
    assert current["request_counts"] == {"total": 10, "completed": 3, "failed": 0}


async def test_failed_requests_go_to_the_error_file(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(request_failure_rate=0.3, seed=7)
    api = make_api(emulator)
    batch = await api.create_ok(await api.upload_ok(requests(40)), ENDPOINT_CHAT)
    emulator.advance(3600)
    done = await api.batch(batch["id"])
    counts = done["request_counts"]
    assert done["status"] == "completed"
    assert counts["total"] == 40 and 0 < counts["failed"] < 40
    good = await api.lines(done["output_file_id"])
    bad = await api.lines(done["error_file_id"])
    assert (len(good), len(bad)) == (counts["completed"], counts["failed"])
    assert {x["custom_id"] for x in good} | {x["custom_id"] for x in bad} == {
        f"r{n}" for n in range(40)
    }
    for failure in bad:
        assert failure["response"]["status_code"] >= 400
        assert set(failure["error"]) == {"code", "message"}
        assert failure["response"]["body"]["error"]["code"] == failure["error"]["code"]


async def test_expiry_keeps_partial_output_and_reports_the_rest(
    start_emulator: Any, make_api: Any
) -> None:
    emulator = await start_emulator(**SLOW)
    api = make_api(emulator)
    batch = await api.create_ok(await api.upload_ok(requests(4)), ENDPOINT_CHAT)
    emulator.advance(24 * 3600 - 1)
    assert (await api.batch(batch["id"]))["status"] == "in_progress"
    emulator.advance(1)
    expired = await api.batch(batch["id"])
    assert expired["status"] == "expired"
    assert expired["expired_at"] == expired["created_at"] + 24 * 3600
    assert expired["finalizing_at"] is None and expired["completed_at"] is None
    # (86,400 - 20) / 120,120 of 4 requests ran: 2.
    assert expired["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    done = await api.lines(expired["output_file_id"])
    missing = await api.lines(expired["error_file_id"])
    assert sorted(x["custom_id"] for x in done) == ["r0", "r1"]
    assert sorted(x["custom_id"] for x in missing) == ["r2", "r3"]
    assert all(x["response"] is None for x in missing)
    assert {x["error"]["code"] for x in missing} == {"batch_expired"}


async def test_cancel_in_progress_keeps_partial_output(start_emulator: Any, make_api: Any) -> None:
    emulator = await start_emulator(**SLOW)
    api = make_api(emulator)
    batch = await api.create_ok(await api.upload_ok(requests(4)), ENDPOINT_CHAT)
    emulator.advance(20 + 120 + 30_000)  # a quarter of the run: 1 request done
    cancelling = (await api.call("POST", f"/batches/{batch['id']}/cancel"))[1]
    assert cancelling["status"] == "cancelling"
    assert cancelling["request_counts"] == {"total": 4, "completed": 1, "failed": 0}
    assert (await api.stats())["unfinished_batches"] == 1  # cancelling still counts
    emulator.advance(5)
    cancelled = await api.batch(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] == cancelled["cancelling_at"] + 5
    assert cancelled["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
    assert [x["custom_id"] for x in await api.lines(cancelled["output_file_id"])] == ["r0"]
    not_run = await api.lines(cancelled["error_file_id"])
    assert sorted(x["custom_id"] for x in not_run) == ["r1", "r2", "r3"]
    assert {x["error"]["code"] for x in not_run} == {"batch_cancelled"}
    assert (await api.stats())["unfinished_batches"] == 0


async def test_cancel_while_validating_runs_nothing(api: Api, emulator: Any) -> None:
    batch = await api.create_ok(await api.upload_ok(requests(2)), ENDPOINT_CHAT)
    await api.call("POST", f"/batches/{batch['id']}/cancel")
    emulator.advance(60)
    cancelled = await api.batch(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["in_progress_at"] is None and cancelled["output_file_id"] is None
    assert len(await api.lines(cancelled["error_file_id"])) == 2


async def test_time_scale_runs_the_service_clock_faster_than_wall_time(
    start_emulator: Any, make_api: Any
) -> None:
    emulator = await start_emulator(time_scale=3600)
    api = make_api(emulator)
    batch = await api.create_ok(await api.upload_ok(requests(2)), ENDPOINT_CHAT)
    emulator.advance_wall(0.1)  # 0.1 wall seconds = 6 service minutes
    assert (await api.batch(batch["id"]))["status"] == "completed"


async def test_answers_are_deterministic_and_shaped_like_the_service(
    start_emulator: Any, make_api: Any
) -> None:
    async def run() -> list[dict[str, Any]]:
        emulator = await start_emulator(limits={"upload_per_second": 100})
        api = make_api(emulator)
        batch = await api.create_ok(await api.upload_ok(requests(3)), ENDPOINT_CHAT)
        emulator.advance(3600)
        done = await api.batch(batch["id"])
        raw = await api.content(done["output_file_id"])
        assert raw == await api.content(done["output_file_id"])
        return sorted(await api.lines(done["output_file_id"]), key=lambda x: x["custom_id"])

    first, second = await run(), await run()
    assert [x["response"]["body"]["choices"] for x in first] == [
        x["response"]["body"]["choices"] for x in second
    ]
    body = first[0]["response"]["body"]
    assert body["model"] == "qwen-plus"
    assert body["object"] == "chat.completion"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert first[0]["response"]["body"]["choices"] != first[1]["response"]["body"]["choices"]


async def test_thinking_adds_reasoning_content_and_tokens(api: Api, emulator: Any) -> None:
    plain = await api.create_ok(await api.upload_ok(requests(1)), ENDPOINT_CHAT)
    thinking = await api.create_ok(
        await api.upload_ok(requests(1, enable_thinking=True, thinking_budget=3)), ENDPOINT_CHAT
    )
    emulator.advance(3600)
    (plain_line,) = await api.lines((await api.batch(plain["id"]))["output_file_id"])
    (line,) = await api.lines((await api.batch(thinking["id"]))["output_file_id"])
    assert "reasoning_content" not in plain_line["response"]["body"]["choices"][0]["message"]
    message = line["response"]["body"]["choices"][0]["message"]
    assert message["role"] == "assistant" and message["reasoning_content"]
    usage = line["response"]["body"]["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}


async def test_qwen3_open_models_think_unless_told_not_to(
    start_emulator: Any, make_api: Any
) -> None:
    """Model Studio's Qwen3 open models (and Qwen3.5) think by default (issue 21): an
    answer with reasoning_content and reasoning tokens billed as output, unless the
    request sets enable_thinking false; the commercial qwen-plus thinks only when asked."""
    asked = {
        "default": requests(2, "qwen3-235b-a22b"),
        "off": requests(2, "qwen3-32b", enable_thinking=False),
        "on": requests(2, "qwen3-8b", enable_thinking=True),
        "qwen3.5": requests(2, "qwen3.5-plus"),
        "commercial": requests(2, "qwen-plus"),
    }
    emulator = await start_emulator(limits={"upload_per_second": 100})
    api = make_api(emulator)
    batches = {
        name: await api.create_ok(await api.upload_ok(content), ENDPOINT_CHAT)
        for name, content in asked.items()
    }
    emulator.advance(3600)
    thought = {}
    for name, batch in batches.items():
        lines = await api.lines((await api.batch(batch["id"]))["output_file_id"])
        kinds = set()
        for line in lines:
            body = line["response"]["body"]
            message, usage = body["choices"][0]["message"], body["usage"]
            reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
            assert bool(message.get("reasoning_content")) == (reasoning > 0), line
            assert usage["completion_tokens"] > reasoning
            kinds.add(reasoning > 0)
        (thought[name],) = kinds
    assert thought == {
        "default": True,
        "off": False,
        "on": True,
        "qwen3.5": True,
        "commercial": False,
    }
    tally = (await api.stats())["tokens_by_model"]
    assert tally["qwen3-235b-a22b"]["reasoning_tokens"] > 0
    assert tally["qwen3-32b"]["reasoning_tokens"] == tally["qwen-plus"]["reasoning_tokens"] == 0


async def test_embeddings_are_deterministic_unit_vectors(api: Api, emulator: Any) -> None:
    content = requests(2, "text-embedding-v4", ENDPOINT_EMBEDDINGS) + requests(
        1, "text-embedding-v4", ENDPOINT_EMBEDDINGS, start=2, input="text 0", dimensions=64
    )
    batch = await api.create_ok(await api.upload_ok(content), ENDPOINT_EMBEDDINGS)
    emulator.advance(3600)
    lines = await api.lines((await api.batch(batch["id"]))["output_file_id"])
    by_id = {x["custom_id"]: x["response"]["body"] for x in lines}
    assert by_id["r0"]["object"] == "list"
    (item,) = by_id["r0"]["data"]
    assert (item["object"], item["index"], len(item["embedding"])) == ("embedding", 0, 1024)
    assert abs(sum(v * v for v in item["embedding"]) - 1) < 1e-3
    assert by_id["r2"]["data"][0]["embedding"][:5] != item["embedding"][:5]
    assert len(by_id["r2"]["data"][0]["embedding"]) == 64
    assert by_id["r1"]["data"][0]["embedding"] != item["embedding"]
    assert by_id["r0"]["usage"]["prompt_tokens"] > 0
    # As the service writes it: no completion_tokens in an embedding's usage.
    usage = by_id["r0"]["usage"]
    assert set(usage) == {"prompt_tokens", "total_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"]
