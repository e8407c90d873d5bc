"""A model that thinks unless told not to (issue 21): batchd's worst case holds the
reasoning bound, and the actual cost bills the answers' output at the thinking price.

The emulator thinks by default for the Qwen3 open models from a list of its own (it
shares no code with batchd.provider.profiles), as Model Studio does: reasoning_content and
`completion_tokens_details.reasoning_tokens` in every answer of a request that does not
set `enable_thinking`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.testing import (
    StartEmulator,
    daemon_settings,
    drop,
    published_jobs,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_published,
)

MODEL = "qwen3-235b-a22b"
# The test's own prices (per million tokens, real time; a batch pays half): thinking
# output at 20 against 8 without.
INPUT, OUTPUT, REASONING = 2.0, 8.0, 20.0
PRICES = {
    "custom": {MODEL: {"input": INPUT, "output": OUTPUT, "reasoning": REASONING, "currency": "CNY"}}
}


async def test_a_model_that_thinks_by_default_is_bounded_and_billed_as_thinking(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "think.jsonl", requests(3, MODEL, max_tokens=100))
        (folder,) = await wait_published(outbox, 1, emulator)
        (job,) = await published_jobs(daemon, 1)
        shown = await daemon.ops.job(job.id)
    assert shown is not None and shown.estimate is not None
    # The worst case: each request's answer (max_tokens) and its reasoning, unbounded by
    # a thinking_budget, up to the model's output maximum; all at the thinking price.
    planned = shown.estimate["models"][MODEL]
    most = settings.profile.limits.default_max_output_tokens
    assert planned["thinking_unset"] == 3
    assert planned["output_tokens_max"] == 3 * (100 + most)
    worst = (planned["input_tokens"] * INPUT + planned["output_tokens_max"] * REASONING) / 2e6
    assert shown.estimate["cost_max"] == pytest.approx(worst, rel=1e-9)
    # The answers thought, and their whole output is billed at the thinking price.
    expected = 0.0
    for line in read_jsonl(folder / "result.jsonl"):
        usage = line["response"]["body"]["usage"]
        assert usage["completion_tokens_details"]["reasoning_tokens"] > 0, line
        expected += (usage["prompt_tokens"] * INPUT + usage["completion_tokens"] * REASONING) / 2e6
    cost = summary(folder)["cost"]
    assert cost["per_model"][MODEL] == pytest.approx(expected, rel=1e-9)
    assert summary(folder)["usage"]["reasoning_tokens"] > 0
    assert 0 < cost["amount"] <= shown.estimate["cost_max"]
