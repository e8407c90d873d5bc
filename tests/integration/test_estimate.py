"""`batchd estimate` through the real command line: the JSON shape, CSV inputs read as
the daemon reads them, rejected files, the thinking warning, and the observed output of
recent jobs read from a real store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.cli import main
from batchd.provider.prices import DEFAULT_PRICES
from batchd.provider.tokens import tokenizer_for
from batchd.store import Store

EXAMPLES = Path(__file__).parents[2] / "batchd" / "examples"
SEED = EXAMPLES / "qwen_plus.jsonl"


def estimate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["estimate", *argv])
    return code, capsys.readouterr().out


def objects(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def chat_line(i: int, model: str, content: str, **body: Any) -> bytes:
    request = {
        "custom_id": str(i),
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }
    return orjson.dumps(request) + b"\n"


def test_json_has_one_object_per_file_in_the_documented_shape(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = estimate(capsys, "--json", str(SEED))
    assert code == 0
    [data] = objects(out)
    assert {"path", "input_tokens", "tokenizer", "models"} <= set(data)
    assert data["path"] == str(SEED)
    [(model, facts)] = data["models"].items()
    assert model == "qwen-plus"
    assert {"requests", "input_tokens", "output_tokens_max", "cost"} <= set(facts)
    assert set(facts["cost"]) == {"min", "max", "currency"}  # no database configured
    assert facts["requests"] == 2 and data["input_tokens"] == facts["input_tokens"]
    if tokenizer_for("dashscope", "qwen-plus").exact:
        assert data["tokenizer"] == "qwen" and data["input_tokens"] == 52  # the seed's 26 + 26
    # No max_tokens: each request is bounded by the provider's default output maximum.
    assert facts["output_tokens_max"] == 2 * 32_768
    price = DEFAULT_PRICES.price("dashscope", "qwen-plus")
    assert price is not None
    tokens = facts["input_tokens"]
    assert facts["cost"]["currency"] == "CNY"
    assert facts["cost"]["min"] == pytest.approx(price.batch_cost(tokens // 2, 0) * 2)
    assert facts["cost"]["min"] < facts["cost"]["max"]


def test_approx_counts_with_the_approximation_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = estimate(capsys, "--json", "--approx", str(SEED))
    assert code == 0
    [data] = objects(out)
    assert data["tokenizer"] == "approx" and data["exact"] is False
    code, out = estimate(capsys, "--approx", str(SEED))
    assert "sampled estimate, not a bound" in out and "CNY" in out
    assert data["bound"] is False


def test_an_unknown_price_is_unknown_not_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = estimate(capsys, "--json", "--provider", "dashscope-intl", str(SEED))
    assert code == 0
    cost = objects(out)[0]["models"]["qwen-plus"]["cost"]
    assert cost == {"min": None, "max": None, "currency": "USD"}
    code, out = estimate(capsys, "--provider", "dashscope-intl", str(SEED))
    assert "cost: unknown" in out and "[prices.dashscope-intl.qwen-plus]" in out


def test_a_csv_file_is_converted_as_the_daemon_converts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "questions.csv"
    csv.write_text("custom_id,content\n1,What is 2+2?\n2,你是谁?\n3,Name a colour.\n")
    (tmp_path / "questions.meta.json").write_text('{"model": "qwen-flash"}')
    code, out = estimate(capsys, "--json", str(csv))
    assert code == 0
    [data] = objects(out)
    assert data["path"] == str(csv) and data["requests"] == 3
    assert data["models"]["qwen-flash"]["requests"] == 3
    # qwen-flash has its own output maximum (32K) in the DashScope profile.
    assert data["models"]["qwen-flash"]["output_tokens_max"] == 3 * 32_768


def test_a_rejected_file_exits_1_with_the_validators_problems(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = EXAMPLES / "bad_input.jsonl"
    code, out = estimate(capsys, str(SEED), str(bad))
    assert code == 1
    assert f"{bad}:2: duplicate_custom_id: " in out and f"{bad}: invalid, 4 problem(s)" in out
    assert f"{SEED}: 2 requests" in out  # the good file is still estimated
    code, out = estimate(capsys, "--json", str(bad))
    assert code == 1
    [data] = objects(out)
    assert data["valid"] is False and data["error_count"] == 4
    assert data["errors"][0] == {
        "line": 2,
        "code": "duplicate_custom_id",
        "message": "custom_id '1' is already used on line 1",
    }


def test_a_model_that_thinks_by_default_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "think.jsonl"
    path.write_bytes(b"".join(chat_line(i, "qwen3-32b", f"Prove {i} is finite.") for i in range(3)))
    code, out = estimate(capsys, str(path))
    assert code == 0
    assert f"{path}: warning: thinking_default: 3 request(s) to qwen3-32b" in out
    code, out = estimate(capsys, "--json", str(path))
    facts = objects(out)[0]["models"]["qwen3-32b"]
    assert facts["thinking_unset"] == 3
    # Reasoning is output: unset thinking doubles the bound (answer plus reasoning).
    assert facts["output_tokens_max"] == 3 * 2 * 32_768


async def _observed(tmp_path: Path, jobs: list[tuple[str, int, int]]) -> Path:
    """A configuration whose state folder holds published jobs of (model, completion
    tokens, completed requests)."""
    state = tmp_path / "state"
    state.mkdir()
    store = await Store.open(state / "batchd.sqlite3")
    await store.close()
    with sqlite3.connect(state / "batchd.sqlite3") as db:
        for i, (model, completion, completed) in enumerate(jobs):
            db.execute(
                "INSERT INTO jobs (id, name, inbox_name, spool_path, kind, state, report, usage,"
                " completed, created_at, updated_at)"
                " VALUES (?, 'j', 'j.jsonl', '/x', 'jsonl', 'published', ?, ?, ?, ?, ?)",
                (
                    f"job{i}",
                    json.dumps({"model": model, "models": [model]}),
                    json.dumps(
                        {
                            "prompt_tokens": 50,
                            "completion_tokens": completion,
                            "per_model": {
                                model: {
                                    "requests": completed,
                                    "prompt_tokens": 50,
                                    "completion_tokens": completion,
                                }
                            },
                        }
                    ),
                    completed,
                    float(i),
                    float(i),
                ),
            )
    config = tmp_path / "batchd.toml"
    config.write_text(f'[paths]\nroot = "{tmp_path}"\n')
    return config


async def test_recent_jobs_of_the_model_give_an_observed_mean_and_a_likely_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = await _observed(
        tmp_path, [("qwen-plus", 300, 3), ("qwen-plus", 100, 1), ("qwen-max", 9000, 1)]
    )
    code = main(["estimate", "--json", "--config", str(config), str(SEED)])
    out = capsys.readouterr().out
    assert code == 0
    facts = objects(out)[0]["models"]["qwen-plus"]
    assert facts["output_tokens_observed_mean"] == 100.0  # 400 tokens over 4 requests
    cost = facts["cost"]
    assert cost["min"] < cost["likely"] < cost["max"]


async def test_the_likely_cost_is_never_above_the_maximum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recent jobs wrote 3,000 tokens a request; this file's requests may write 20: the
    likely cost counts each request's output within its bound (issue 21)."""
    config = await _observed(tmp_path, [("qwen-plus", 9000, 3)])
    path = tmp_path / "short.jsonl"
    path.write_bytes(b"".join(chat_line(i, "qwen-plus", f"q {i}", max_tokens=20) for i in range(4)))
    code = main(["estimate", "--json", "--config", str(config), str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    facts = objects(out)[0]["models"]["qwen-plus"]
    assert facts["output_tokens_observed_mean"] == 3000.0
    cost = facts["cost"]
    assert cost["min"] < cost["likely"] <= cost["max"]
    assert cost["likely"] == pytest.approx(cost["max"])
    code = main(["estimate", "--config", str(config), str(path)])
    line = next(x for x in capsys.readouterr().out.splitlines() if "cost:" in x)
    low, high, likely = (float(x.split()[0]) for x in _amounts(line))
    assert low < likely <= high, line


def _amounts(line: str) -> list[str]:
    """The three amounts of a `cost: MIN CNY to MAX CNY, likely L CNY` line."""
    text = line.split("cost:", 1)[1]
    first, rest = text.split(" to ", 1)
    high, likely = rest.split(", likely ", 1)
    return [first.strip(), high.strip(), likely.strip()]


def test_the_configurations_prices_and_job_settings_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config` prices with the daemon's table ([prices] over the defaults) and checks
    with its job settings; a model the table does not know costs null, never 0."""
    config = tmp_path / "batchd.toml"
    config.write_text(
        f'[paths]\nroot = "{tmp_path}"\n'
        '[prices.dashscope."qwen-plus"]\ninput = 1000000.0\noutput = 0.0\ncurrency = "CNY"\n'
    )
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(chat_line(1, "qwen-plus", "hi") + chat_line(2, "qwen-long", "hi"))
    code, out = estimate(capsys, "--json", "--config", str(config), str(mixed))
    assert code == 1  # mixed models, and the configuration does not group by model
    assert "mixed_model" in out
    config.write_text(config.read_text() + "[jobs]\ngroup_by_model = true\n")
    code, out = estimate(capsys, "--json", "--config", str(config), str(mixed))
    assert code == 0, out
    models = objects(out)[0]["models"]
    plus = models["qwen-plus"]
    # One million CNY per million input tokens, half for batch: 0.5 CNY per input token.
    assert plus["cost"]["min"] == pytest.approx(0.5 * plus["input_tokens"])
    assert plus["cost"]["max"] == plus["cost"]["min"]  # output priced 0
    assert models["qwen-long"]["cost"]["min"] is None
    assert models["qwen-long"]["cost"]["max"] is None
