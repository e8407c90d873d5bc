"""What work costs, and never spending by mistake (issue 15), against the emulator: the
actual cost of a job from its answers' usage, budgets that hold parts and release them,
inputs identical to one already run held until an operator lets them go."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.models import Held
from batchd.provider.tokens import RequestCounter
from batchd.testing import (
    ENDPOINT_EMBEDDINGS,
    StartEmulator,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

# Prices of the test's own (per million tokens, real time; batch is half), so that the
# figures do not move with the shipped defaults.
PRICES = {
    "custom": {
        "qwen-plus": {"input": 2.0, "output": 8.0, "currency": "CNY"},
        "qwen-max": {"input": 6.0, "output": 24.0, "currency": "CNY"},
        "text-embedding-v3": {"input": 0.5, "output": 0.0, "currency": "CNY"},
    }
}


def _expected_cost(folder: Path) -> dict[str, float]:
    """Each model's cost recomputed from the published answers' own usage lines."""
    rates = {m: (p["input"], p["output"]) for m, p in PRICES["custom"].items()}
    per_model: dict[str, float] = {}
    for line in read_jsonl(folder / "result.jsonl"):
        body = line["response"]["body"]
        usage = body["usage"]
        rate_in, rate_out = rates[body["model"]]
        amount = (usage["prompt_tokens"] * rate_in + usage["completion_tokens"] * rate_out) / 1e6
        per_model[body["model"]] = per_model.get(body["model"], 0.0) + amount * 0.5
    return per_model


async def test_a_job_says_what_it_cost_per_model_everywhere(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(
        tmp_path / "r", emulator, prices=PRICES, jobs={"group_by_model": True}
    )
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    mixed = requests(3, "qwen-plus", prefix="p") + requests(2, "qwen-max", prefix="m")
    async with running_daemon(settings) as daemon:
        drop(inbox, "mixed.jsonl", mixed)
        (folder,) = await wait_published(outbox, 1, emulator)
        await wait_for(lambda: daemon.store.spent_since(0.0), what="the spend recorded")
        (listed,) = (await daemon.ops.jobs(None, None, 10, 0)).jobs
        shown = await daemon.ops.job(listed.id)
        status = await daemon.ops.status()
        metrics = await daemon.ops.metrics()
    report = summary(folder)
    expected = _expected_cost(folder)
    cost = report["cost"]
    assert cost["currency"] == "CNY"
    assert set(cost["per_model"]) == {"qwen-plus", "qwen-max"}
    for model, amount in expected.items():
        assert cost["per_model"][model] == pytest.approx(amount, rel=1e-6)
    assert cost["amount"] == pytest.approx(sum(expected.values()), rel=1e-6)
    usage = report["usage"]["per_model"]
    assert usage["qwen-plus"]["requests"] == 3 and usage["qwen-max"]["requests"] == 2
    assert report["usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage.values())
    # The same figures in show, jobs --json, status and /metrics' source.
    assert shown is not None and shown.cost == cost and listed.cost == cost
    assert shown.estimate is not None and set(shown.estimate["models"]) == set(expected)
    # batchd's counts against the emulator's own (the provider's tokenizer, not batchd's):
    # the input tokens counted when planned are those billed, model by model.
    billed = (await emulator.stats())["tokens_by_model"]
    for model in expected:
        counted = shown.estimate["models"][model]["input_tokens"]
        assert counted == usage[model]["prompt_tokens"] == billed[model]["prompt_tokens"]
        assert billed[model]["completion_tokens"] == usage[model]["completion_tokens"]
    assert status.spend is not None
    assert status.spend.today.spent["custom"] == pytest.approx(cost["amount"], rel=1e-6)
    assert status.spend.month.spent["custom"] == pytest.approx(cost["amount"], rel=1e-6)
    assert metrics["cost_by_model"]["CNY"]["qwen-max"] == pytest.approx(expected["qwen-max"])


async def test_a_model_without_a_price_costs_unknown_never_zero(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings):
        drop(inbox, "odd.jsonl", requests(2, "qwen-long"))
        (folder,) = await wait_published(outbox, 1, emulator)
    cost = summary(folder)["cost"]
    assert cost["amount"] is None and cost["per_model"] == {"qwen-long": None}
    assert cost["unknown_models"] == ["qwen-long"]
    assert summary(folder)["usage"]["per_model"]["qwen-long"]["prompt_tokens"] > 0


def _worst(job: Any) -> float:
    return float(job.estimate["cost_max"])


async def test_a_budget_holds_parts_and_releases_them_when_room_comes(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Each job's worst case (no max_tokens: the whole output limit of each request)
    fits the daily cap alone, not two at once: the second waits, held `budget` with what
    it needs, until the first is published at its (far lower) actual cost. A third,
    larger than the cap, waits until a reload raises it."""
    emulator = await start_emulator()  # its clock moves only when the test moves it
    budget = {"daily": 0.5}
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES, budget=budget)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "first.jsonl", requests(3, prefix="a"))
        drop(inbox, "second.jsonl", requests(3, prefix="b"))

        async def held() -> list[Any]:
            return await daemon.store.held_jobs(Held.BUDGET)

        (waiting,) = await wait_for(held, what="a job held for the budget")
        assert "daily budget of 0.5000 CNY" in (waiting.held_note or "")
        shown = await daemon.ops.job(waiting.id)
        assert shown is not None and shown.held == "budget"
        status = await daemon.ops.status()
        assert any("held, budget" in why for why in status.waiting)
        assert status.spend is not None and status.spend.running_worst_case > 0.3

        # The first part counts as running from its committed intent; its create may
        # still be on its way to the service.
        async def created() -> int:
            return int((await emulator.stats())["batches_created"])

        await wait_for(created, what="the first job's batch created")
        assert await created() == 1
        await wait_published(outbox, 2, emulator)
        assert await held() == []
        # Larger than the whole cap: it waits for a reload that raises the cap.
        drop(inbox, "large.jsonl", requests(9, prefix="c"))
        (large,) = await wait_for(
            lambda: daemon.store.held_jobs(Held.OVER_CAP), what="the large job held"
        )
        assert _worst(await daemon.ops.job(large.id)) > 0.5
        daemon.apply_settings(
            daemon_settings(tmp_path / "r", emulator, prices=PRICES, budget={"daily": 10.0})
        )
        await wait_published(outbox, 3, emulator)
    assert (await emulator.stats())["batches_created"] == 3
    for folder in (outbox / "first", outbox / "second", outbox / "large"):
        assert summary(folder)["status"] == "completed"


async def test_over_budget_a_job_can_be_rejected_before_anything_is_sent(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    budget = {"daily": 0.01, "on_over": "reject"}
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES, budget=budget)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings):
        drop(inbox, "costly.jsonl", requests(3))
        # A sidecar's own cap: lower than the job's worst case, it is rejected too.
        (inbox / "capped.meta.json").write_bytes(b'{"max_cost": 0.0001}')
        drop(inbox, "capped.jsonl", requests(2, max_tokens=10, prefix="x"))
        await wait_published(outbox, 2, emulator)
    assert (await emulator.stats())["calls"]["upload"]["served"] == 0
    for name, says in (("costly", "daily budget"), ("capped", "max_cost")):
        report = summary(outbox / name)
        assert report["status"] == "rejected"
        # Why, once in summary.json; each line of the input refers to it by its code.
        assert report["error"]["code"] == "over_budget", report["error"]
        assert says in report["error"]["message"], report["error"]
        errors = read_jsonl(outbox / name / "error.jsonl")
        assert len(errors) == report["request_counts"]["total"] == report["never_run"]
        for error in errors:
            assert error["error"]["code"] == "not_submitted"
            assert "(over_budget)" in error["error"]["message"], error


async def test_an_unpriced_model_waits_under_a_cap_and_the_hold_is_announced(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHD_WEBHOOK_SECRET", raising=False)
    emulator = await start_emulator(time_scale=3000)
    told = tmp_path / "told.jsonl"
    # The command's whole environment, one JSON object a line.
    script = (
        "import json, os, sys; open(sys.argv[1], 'a').write(json.dumps(dict(os.environ)) + '\\n')"
    )
    settings = daemon_settings(
        tmp_path / "r",
        emulator,
        prices=PRICES,
        budget={"daily": 5.0},
        notify={"command": [sys.executable, "-c", script, str(told)]},
    )
    inbox = settings.paths.folder("inbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "odd.jsonl", requests(2, "qwen-long"))
        (held,) = await wait_for(
            lambda: daemon.store.held_jobs(Held.NO_PRICE), what="the unpriced job held"
        )
        assert "qwen-long has no price" in (held.held_note or "")
        await wait_for(told.exists, what="the job.held notification")
        assert (await emulator.stats())["batches_created"] == 0
    (env,) = read_jsonl(told)
    event = json.loads(env["BATCHD_EVENT_JSON"])
    assert event["type"] == "job.held" and event["data"]["id"] == held.id
    assert event["data"]["reason"] == "no_price" and "no price" in event["data"]["note"]
    assert event["data"]["status"] == "held" and event["data"]["ends_by_itself"] is False
    assert event["data"]["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    # The command's variables are the job's real figures: held, 2 requests planned.
    assert env["BATCHD_EVENT"] == "job.held" and env["BATCHD_JOB_ID"] == held.id
    assert env["BATCHD_JOB_STATUS"] == "held" and env["BATCHD_REQUESTS_TOTAL"] == "2"
    assert env["BATCHD_HOLD_REASON"] == "no_price"
    assert env["BATCHD_HOLD_NOTE"] == held.held_note and env["BATCHD_JOB_OUTBOX"] == ""


async def test_an_input_already_run_is_held_until_an_operator_lets_it_go(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """The same bytes again would pay for the same requests again: held `duplicate`,
    naming the earlier job; `batchd retry` of the held job, or a sidecar's
    `allow_duplicate`, lets it run."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    content = requests(3, prefix="same-")
    async with running_daemon(settings) as daemon:
        drop(inbox, "first.jsonl", content)
        (first,) = await wait_published(outbox, 1, emulator)
        drop(inbox, "again.jsonl", content)
        (held,) = await wait_for(
            lambda: daemon.store.held_jobs(Held.DUPLICATE), what="the copy held"
        )
        assert summary(first)["job_id"] in (held.held_note or "")
        assert "batchd retry" in (held.held_note or "")
        (inbox / "third.meta.json").write_bytes(b'{"allow_duplicate": true}')
        drop(inbox, "third.jsonl", content)
        await wait_published(outbox, 2, emulator)
        assert (await emulator.stats())["batches_created"] == 2  # first and third
        answer = await daemon.ops.retry(held.id)
        assert answer is not None and answer.ok, answer
        await wait_published(outbox, 3, emulator)
    assert summary(outbox / "again")["status"] == "completed"
    assert summary(outbox / "again")["options"]["allow_duplicate"] is True
    assert (await emulator.stats())["batches_created"] == 3


async def test_the_same_requests_written_otherwise_are_held_as_the_same_input(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """The duplicate guard compares requests, not bytes: the input already run, again
    with CRLF line endings, or re-spaced with its keys in another order (as another tool
    writes the same requests), is held `duplicate` instead of being paid for again."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    content = requests(3, prefix="same-")
    lines = [orjson.loads(line) for line in content.splitlines()]
    respaced = b"".join(
        json.dumps(dict(reversed(list(obj.items()))), indent=None).encode() + b"\n" for obj in lines
    )
    assert respaced != content
    async with running_daemon(settings) as daemon:
        drop(inbox, "first.jsonl", content)
        (first,) = await wait_published(outbox, 1, emulator)
        drop(inbox, "crlf.jsonl", content.replace(b"\n", b"\r\n"))
        drop(inbox, "respaced.jsonl", respaced)
        held = await wait_for(
            lambda: _when_two(daemon.store.held_jobs(Held.DUPLICATE)), what="both copies held"
        )
        assert sorted(job.name for job in held) == ["crlf", "respaced"]
        assert all(summary(first)["job_id"] in (job.held_note or "") for job in held)
    assert (await emulator.stats())["batches_created"] == 1


async def _when_two(found: Any) -> list[Any] | None:
    jobs = await found
    return jobs if len(jobs) == 2 else None


async def _queue_run(
    start_emulator: StartEmulator, root: Path, daemon_knows: bool
) -> tuple[dict[str, Any], list[Path]]:
    """Three jobs of one model whose input tokens fit the model's enqueued-token limit
    one at a time, against an emulator that fails a batch past it (as OpenAI does)."""
    from batchd.provider.tokens import count_file

    one = requests(3, prefix="q")
    sample = root / "sample.jsonl"
    root.mkdir(parents=True)
    sample.write_bytes(one)
    settings0 = daemon_settings(root / "r", await start_emulator())
    tokens = count_file(sample, "custom", settings0.profile.limits).input_tokens
    limit = {"models": {"qwen-plus": {"enqueued_tokens": tokens * 3 // 2}}}
    emulator = await start_emulator(limits=limit)
    settings = daemon_settings(root / "r", emulator, limits=limit if daemon_knows else {})
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings):
        for n in range(3):
            drop(inbox, f"q{n}.jsonl", requests(3, prefix=f"q{n}-"))
        folders = await wait_published(outbox, 3, emulator, advance_s=30.0)
    return await emulator.stats(), folders


async def test_a_part_waits_until_it_fits_the_models_enqueued_token_limit(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    stats, folders = await _queue_run(start_emulator, tmp_path / "knows", daemon_knows=True)
    assert stats["faults"]["token_limit_exceeded"] == 0
    assert all(summary(f)["status"] == "completed" for f in folders)
    # The same work without the limit in batchd's profile: the service fails batches.
    blind, folders = await _queue_run(start_emulator, tmp_path / "blind", daemon_knows=False)
    assert blind["faults"]["token_limit_exceeded"] >= 1
    assert any(summary(f)["status"] != "completed" for f in folders)


# -- every paid token counted (issues 21 and 22) --------------------------------------------


def _worst_case(settings: Any, content: bytes) -> float:
    """The worst case of each request of `content`, as planning counts it, summed."""
    counter = RequestCounter("custom", settings.profile.limits, settings.price_table)
    total = 0.0
    for line in content.splitlines():
        request = orjson.loads(line)
        cost = counter.worst(request["body"], request["url"]).cost
        assert cost is not None
        total += cost
    return total


async def test_absurd_usage_numbers_are_charged_their_worst_case_and_held_to_the_budget(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Every success line of the first job has one absurd usage number (a string, a
    negative, a float, a count missing, 2^64 + 1, 401 digits, 2^64 + 1 beside a NaN):
    the job is published all the same, each request charged its worst case, at least
    what the service billed, and that spend holds the next job to the daily budget."""
    emulator = await start_emulator(
        time_scale=3000, faults={"absurd_usage_rate": 1.0, "batch_match": "absurd"}
    )
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES, budget={"daily": 0.05})
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    content = requests(7, max_tokens=1000)
    async with running_daemon(settings) as daemon:
        drop(inbox, "absurd.jsonl", content)
        (folder,) = await wait_published(outbox, 1, emulator)
        (job,) = await daemon.store.jobs()
        drop(inbox, "next.jsonl", requests(7, max_tokens=1000, prefix="n"))
        (held,) = await wait_for(
            lambda: daemon.store.held_jobs(Held.BUDGET), what="the next job held"
        )
        status = await daemon.ops.status()
        shown = await daemon.ops.job(job.id)
    assert (await emulator.stats())["faults"]["absurd_usage"] == 7
    report = summary(folder)
    assert report["status"] == "completed"
    cost = report["cost"]
    worst = _worst_case(settings, content)
    assert cost["amount"] == pytest.approx(worst, rel=1e-6)
    assert cost["estimated"]["requests"] == 7
    assert cost["estimated"]["reasons"] == {"usage_refused": 7}
    assert {line["input_line"] for line in cost["estimated"]["lines"]} == set(range(1, 8))
    assert cost["from_usage"] == 0.0 and report["usage"]["per_model"] == {}
    # Never less than what the service billed (its own tally of the answers).
    billed = (await emulator.stats())["tokens_by_model"]["qwen-plus"]
    rate_in, rate_out = (
        PRICES["custom"]["qwen-plus"]["input"],
        PRICES["custom"]["qwen-plus"]["output"],
    )
    paid = (billed["prompt_tokens"] * rate_in + billed["completion_tokens"] * rate_out) / 2e6
    assert cost["amount"] >= paid > 0
    # The same figure in show and status, and it holds the next job.
    assert shown is not None and shown.cost == cost
    assert status.spend is not None
    assert status.spend.today.spent["custom"] == pytest.approx(cost["amount"], rel=1e-6)
    assert f"spent {cost['amount']:.4f} CNY" in (held.held_note or ""), held.held_note


async def test_embeddings_are_priced_from_their_usage(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """An embedding's usage has no completion_tokens (as the service writes it): its
    input is priced, never left unknown, and spent."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "vectors.jsonl", requests(3, "text-embedding-v3", ENDPOINT_EMBEDDINGS))
        (folder,) = await wait_published(outbox, 1, emulator)
        status = await daemon.ops.status()
    usages = [line["response"]["body"]["usage"] for line in read_jsonl(folder / "result.jsonl")]
    assert all("completion_tokens" not in usage for usage in usages)
    prompt = sum(usage["prompt_tokens"] for usage in usages)
    cost = summary(folder)["cost"]
    assert cost["amount"] == pytest.approx(prompt * 0.5 / 2e6, rel=1e-6) and prompt > 0
    assert cost["unknown_models"] == [] and cost["estimated"]["requests"] == 0
    assert status.spend is not None
    assert status.spend.today.spent["custom"] == pytest.approx(cost["amount"], rel=1e-6)


async def test_lost_results_are_charged_and_retry_asks_before_paying_again(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """The result file cannot be fetched (404), but the service counted the 3 requests
    completed: they are charged their worst case (spent, said so in summary.json), and a
    plain `retry` leaves them out, saying what they probably cost; `--force` sends them."""
    emulator = await start_emulator(
        time_scale=3000, faults={"content_missing_rate": 1.0, "batch_match": "gone"}
    )
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    content = requests(3, max_tokens=50)
    async with running_daemon(settings) as daemon:
        drop(inbox, "gone.jsonl", content)
        (folder,) = await wait_published(outbox, 1, emulator)
        (job,) = await daemon.store.jobs()
        status = await daemon.ops.status()
        plain = await daemon.ops.retry(job.id)
        assert not (inbox / "gone-retry.jsonl").exists()
        forced = await daemon.ops.retry(job.id, force=True)
        again = await daemon.ops.retry(job.id, force=True)
    report = summary(folder)
    assert report["result_unavailable"] == 3
    cost = report["cost"]
    assert cost["amount"] > 0
    assert cost["amount"] == pytest.approx(_worst_case(settings, content), rel=1e-6)
    estimated = cost["estimated"]
    assert estimated["requests"] == 3 and estimated["reasons"] == {"result_unavailable": 3}
    assert estimated["unavailable_parts"] == [
        {"part": 1, "requests": 3, "completed": 3, "charged": 3}
    ]
    assert status.spend is not None
    assert status.spend.today.spent["custom"] == pytest.approx(cost["amount"], rel=1e-6)
    assert plain is not None and not plain.ok, plain
    assert plain.left_out == {"result_unavailable": 3}
    assert f"probably cost {cost['amount']:.6f} CNY" in plain.message, plain.message
    assert "--force" in plain.message
    assert plain.cost is not None and plain.cost["estimated_requests"] == 3
    assert forced is not None and forced.ok, forced
    assert "gone-retry-force.jsonl (3 requests)" in forced.message, forced.message
    assert again is not None and again.message.startswith(
        "already resubmitted as gone-retry-force.jsonl"
    )


async def test_follow_up_parts_are_planned_and_held_to_the_budget_like_first_parts(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Retryable failures resubmitted as follow-up parts under a budget (with unpriced
    models held, the default): each part counted and priced as a first part is, so it
    runs once it fits, and the job is published with every round."""
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.5)
    settings = daemon_settings(
        tmp_path / "r",
        emulator,
        prices=PRICES,
        budget={"daily": 10.0},
        jobs={"resubmit_failed": 1},
    )
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    content = requests(20, max_tokens=50)
    async with running_daemon(settings) as daemon:
        drop(inbox, "again.jsonl", content)
        (folder,) = await wait_published(outbox, 1, emulator)
        (job,) = await daemon.store.jobs()
        parts = await daemon.store.parts_of(job.id)
    follow_ups = [p for p in parts if p.round == 1]
    assert follow_ups, "the emulator failed no request worth retrying"
    per_request = [_worst_case(settings, line + b"\n") for line in content.splitlines()]
    for part in follow_ups:
        assert part.input_tokens is not None and part.input_tokens >= 10 * part.requests
        assert part.output_tokens_max == 50 * part.requests
        assert part.cost_max is not None
        assert min(per_request) * part.requests <= part.cost_max
        assert part.cost_max <= max(per_request) * part.requests
    report = summary(folder)
    assert max(p["round"] for p in report["parts"]) == 1
    assert report["cost"]["amount"] is not None and report["cost"]["amount"] > 0
