"""Prices: tiers by a request's input, the batch discount, the thinking price, unknown
models (never free), and the configuration's table over the dated defaults."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from batchd.provider import prices
from batchd.provider.prices import (
    DEFAULT_PRICES,
    MAX_USAGE_TOKENS,
    Price,
    PriceTable,
    Tier,
    Usage,
    read_usage,
    table_from,
)
from batchd.provider.profiles import TEST_MODEL

FLASH = Price(
    input=0.15,
    output=1.5,
    currency="CNY",
    tiers=(Tier(128_000, 0.15, 1.5), Tier(256_000, 0.6, 6.0), Tier(1_000_000, 1.2, 12.0)),
)


@pytest.mark.parametrize(
    ("prompt", "rates"),
    [
        (1_000, (0.15, 1.5)),
        (128_000, (0.15, 1.5)),
        (128_001, (0.6, 6.0)),
        (300_000, (1.2, 12.0)),
        (2_000_000, (1.2, 12.0)),  # beyond the last tier: the last
    ],
)
def test_the_tier_is_chosen_by_the_requests_own_input(
    prompt: int, rates: tuple[float, float]
) -> None:
    assert FLASH.rates(prompt)[:2] == rates


def test_a_batch_pays_the_discount_on_input_and_output() -> None:
    # 200,000 input tokens at 0.6 and 1,000 output at 6.0 per million, halved.
    assert FLASH.batch_cost(200_000, 1_000) == pytest.approx((0.12 + 0.006) / 2)
    full = Price(input=1.0, output=2.0, currency="USD", batch_discount=1.0)
    assert full.batch_cost(1_000_000, 1_000_000) == pytest.approx(3.0)


def test_a_request_that_thought_pays_the_thinking_price() -> None:
    table = table_from(None)
    usage = {"prompt_tokens": 100_000, "completion_tokens": 1_000_000}
    thought = {**usage, "completion_tokens_details": {"reasoning_tokens": 900_000}}
    # qwen-plus, Beijing, up to 128K input: 0.8 in, 2 out, 8 out when thinking (CNY per
    # million), halved; all the output of a request that thought at the thinking price.
    assert table.request_cost("dashscope", "qwen-plus", usage) == pytest.approx(1.04)
    assert table.request_cost("dashscope", "qwen-plus", thought) == pytest.approx(4.04)
    # OpenAI bills reasoning as output: no separate price, the same cost.
    openai = {**thought, "prompt_tokens": 1_000_000}
    assert table.request_cost("openai", "gpt-4o-mini", openai) == pytest.approx((0.15 + 0.6) / 2)


def test_cached_input_is_priced_only_where_a_cached_price_is_set() -> None:
    usage = {
        "prompt_tokens": 1_000_000,
        "completion_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 400_000},
    }
    assert DEFAULT_PRICES.request_cost("openai", "gpt-4o", usage) == pytest.approx(
        (0.6 * 2.5 + 0.4 * 1.25) / 2
    )
    # DashScope gives batch calls no cache discount: cached tokens are input.
    plain = {"prompt_tokens": 1_000_000, "completion_tokens": 0}
    assert DEFAULT_PRICES.request_cost("dashscope", "qwen-plus", usage) == pytest.approx(
        DEFAULT_PRICES.request_cost("dashscope", "qwen-plus", plain)
    )


def test_an_unknown_model_costs_unknown_never_zero() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 10}
    assert DEFAULT_PRICES.price("dashscope", "no-such-model") is None
    assert DEFAULT_PRICES.request_cost("dashscope", "no-such-model", usage) is None
    assert DEFAULT_PRICES.price("nowhere", "qwen-plus") is None
    # The test model runs no inference: it alone costs 0, on every provider.
    assert DEFAULT_PRICES.request_cost("openai", TEST_MODEL, usage) == 0.0


@pytest.mark.parametrize(
    "usage",
    [
        None,
        "20 tokens",
        {"prompt_tokens": "10", "completion_tokens": 5},
        {"prompt_tokens": -1, "completion_tokens": 5},
        {"prompt_tokens": 10},
        {"prompt_tokens": True, "completion_tokens": 5},
        # Absurd numbers (issue 22): each is refused, none raises.
        {"prompt_tokens": 10**400, "completion_tokens": 5},  # 401 digits
        {"prompt_tokens": 2**64 + 1, "completion_tokens": 5},
        {"prompt_tokens": 10, "completion_tokens": float("nan")},
        {"prompt_tokens": 10, "completion_tokens": 5.0},
        {"prompt_tokens": 10, "completion_tokens": float("inf")},
        {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 2**64 + 1},
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 6},  # more than the output
        },
        {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": "cached"},
    ],
)
def test_a_servers_usage_that_is_not_counts_gives_no_cost(usage: object) -> None:
    assert DEFAULT_PRICES.request_cost("dashscope", "qwen-plus", usage) is None
    # Refused with a note that says which number and why.
    note = read_usage(usage)
    assert isinstance(note, str) and note


def test_embedding_usage_without_completion_tokens_is_priced() -> None:
    """Embeddings' usage has no completion_tokens (issue 21): its input is billed."""
    usage = {"prompt_tokens": 13, "total_tokens": 13}
    cost = DEFAULT_PRICES.request_cost("openai", "text-embedding-3-small", usage)
    assert cost == pytest.approx(13 * 0.02 / 1e6 / 2)
    assert read_usage(usage) == Usage(prompt_tokens=13, completion_tokens=0, total_tokens=13)
    # Told it is an embeddings request, even a usage without total_tokens is read; a
    # chat usage without completion_tokens whose total says more is not.
    assert read_usage({"prompt_tokens": 13}, embeddings=True) == Usage(13, 0, 13)
    assert isinstance(read_usage({"prompt_tokens": 13, "total_tokens": 20}), str)


def test_the_largest_sound_usage_is_priced_and_one_more_is_refused() -> None:
    most = {"prompt_tokens": MAX_USAGE_TOKENS, "completion_tokens": 0}
    assert DEFAULT_PRICES.request_cost("dashscope", "qwen-plus", most) is not None
    over = {"prompt_tokens": MAX_USAGE_TOKENS + 1, "completion_tokens": 0}
    assert read_usage(over) == f"prompt_tokens is not a token count ({MAX_USAGE_TOKENS + 1})"


def test_every_default_says_where_and_when_it_was_read() -> None:
    for provider, models in DEFAULT_PRICES.prices.items():
        for model, price in models.items():
            assert price.source and isinstance(price.as_of, datetime.date), (provider, model)
            assert price.input > 0 or price.output > 0, (provider, model)
    assert DEFAULT_PRICES.currency("dashscope") == "CNY"
    assert DEFAULT_PRICES.currency("dashscope-intl") == "USD"
    assert DEFAULT_PRICES.currency("openai") == "USD"
    # `custom` (the emulator, a DashScope-compatible service) reads DashScope's prices.
    assert DEFAULT_PRICES.price("custom", "qwen-plus") == DEFAULT_PRICES.price(
        "dashscope", "qwen-plus"
    )


def test_the_configuration_overrides_and_extends_the_defaults() -> None:
    table = table_from(
        {
            "dashscope": {"qwen-plus": {"input": 1, "output": 3, "currency": "CNY"}},
            "dashscope-intl": {
                "qwen-plus": {
                    "input": 0.4,
                    "output": 1.2,
                    "reasoning": 4,
                    "currency": "USD",
                    "batch_discount": 0.5,
                    "tiers": [[256_000, 0.4, 1.2, 4], [1_000_000, 1.2, 3.6, 12]],
                }
            },
            "custom": {"my-model": {"input": 2, "output": 2, "currency": "USD"}},
        }
    )
    plus = table.price("dashscope", "qwen-plus")
    assert plus is not None and (plus.input, plus.output, plus.tiers) == (1.0, 3.0, ())
    intl = table.price("dashscope-intl", "qwen-plus")
    assert intl is not None and intl.rates(300_000) == (1.2, 3.6, 12.0)
    assert table.price("dashscope", "qwen-flash") == DEFAULT_PRICES.price("dashscope", "qwen-flash")
    # A configured custom table replaces the DashScope fallback for `custom`.
    assert table.price("custom", "my-model") is not None
    assert table.price("custom", "qwen-plus") is None
    assert DEFAULT_PRICES.price("dashscope", "qwen-plus") != plus  # defaults untouched


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"dashscope": {"qwen-plus": {"input": 1, "outptu": 2, "currency": "CNY"}}}, "outptu"),
        ({"dashscope": {"qwen-plus": {"input": -1, "output": 2, "currency": "CNY"}}}, "input"),
        ({"dashscope": {"qwen-plus": {"input": 1, "output": 2, "currency": "EUR"}}}, "currency"),
        ({"dashscope": {"qwen-plus": {"input": 1, "output": 2}}}, "currency"),
        (
            {"dashscope": {"m": {"input": 1, "output": 2, "currency": "CNY", "tiers": [[1, 2]]}}},
            "tiers[0]",
        ),
        (
            {"dashscope": {"m": {"input": 1, "output": 2, "currency": "CNY", "batch_discount": 0}}},
            "batch_discount",
        ),
        ({"dashscope": "cheap"}, "prices.dashscope"),
    ],
)
def test_a_bad_key_is_named(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        table_from(raw)


def test_a_table_without_any_price_falls_back_on_the_regions_currency() -> None:
    assert PriceTable({}).currency("dashscope") == "CNY"
    assert PriceTable({}).currency("openai") == "USD"


def test_status_warns_when_the_price_table_is_older_than_90_days() -> None:
    table = table_from(None)
    read = prices.oldest_as_of(table, "dashscope")
    assert read is not None
    assert prices.stale_note(table, "dashscope", read + datetime.timedelta(days=90)) is None
    note = prices.stale_note(table, "dashscope", read + datetime.timedelta(days=91))
    assert note is not None and "91 days ago" in note and "[prices.dashscope." in note
    undated = PriceTable({"custom": {"m": Price(input=1.0, output=1.0, currency="CNY")}})
    assert prices.stale_note(undated, "custom", datetime.date(2099, 1, 1)) is None


def test_every_default_price_names_its_source_and_the_day_it_was_read() -> None:
    for provider, table in DEFAULT_PRICES.prices.items():
        for model, price in table.items():
            assert price.source and price.as_of, (provider, model)
            assert price.as_of <= datetime.date(2026, 12, 31), (provider, model)


def test_every_batch_model_has_a_price_or_a_stated_reason_why_not() -> None:
    """Issue 21 item 12: the models Model Studio lists for batch, in Beijing and in
    Singapore, each priced by default, or named in UNPRICED with why and in docs/costs.md
    (a budget holds them until a price is configured)."""
    costs = (Path(__file__).parents[2] / "docs" / "costs.md").read_text()
    unknown_section = costs[costs.index("Batch models without a default price") :]
    for provider, models in prices.BATCH_MODELS.items():
        for model in models:
            priced = DEFAULT_PRICES.price(provider, model)
            why = prices.UNPRICED.get(provider, {}).get(model)
            assert (priced is None) != (why is None), (provider, model)
            if why is not None:
                assert f"`{model}`" in unknown_section, (provider, model)
    # What is unpriced is a batch model (the list does not hide a priced one).
    for provider, unpriced in prices.UNPRICED.items():
        assert set(unpriced) <= set(prices.BATCH_MODELS[provider]), provider


def test_text_embeddings_are_priced_in_both_regions() -> None:
    """The pages: v4 and v3 at CNY 0.0005 per thousand input tokens in Beijing (batch
    0.00025) and USD 0.07 per million in Singapore; embeddings have no output."""
    for model in ("text-embedding-v4", "text-embedding-v3"):
        beijing = DEFAULT_PRICES.price("dashscope", model)
        singapore = DEFAULT_PRICES.price("dashscope-intl", model)
        assert beijing is not None and beijing.currency == "CNY"
        assert beijing.batch_cost(1_000, 0) == pytest.approx(0.00025)
        assert singapore is not None and singapore.currency == "USD"
        assert singapore.batch_cost(1_000_000, 0) == pytest.approx(0.035)
