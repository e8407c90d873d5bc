"""What requests cost: a price table per provider and model, with dated defaults.

PURE: no network, no store. Prices are per million tokens, in the provider's currency
(CNY in DashScope's Beijing region, USD in Singapore and at OpenAI), at the real-time
list price; a batch pays `batch_discount` times that (0.5 on DashScope and OpenAI).

Decisions:
- A model without a price costs "unknown" (`price` returns None), never 0: a budget
  must not let an unpriced model through as free. The test model `batch-test-model`
  costs 0 on every provider (the service runs no inference for it).
- Tiers: the price of a request is chosen by that request's own input tokens (the
  first tier whose `up_to_tokens` is at least them; beyond the last, the last).
- Reasoning: `reasoning` is the output price of a request that thought (hybrid Qwen
  models bill all the output of a thinking request at their thinking price, e.g.
  qwen-plus 8 CNY instead of 2); unset, it is the output price (OpenAI bills reasoning
  tokens as output). A request thought when its usage reports reasoning tokens.
- Cached input: DashScope's batch calls get no context-cache discount (Model Studio's
  billing page), so its defaults set none and cached tokens are billed as input; a
  configured `cached_input` prices `prompt_tokens_details.cached_tokens` at that rate.
- `custom` (a DashScope-compatible service, the emulator in tests) reads DashScope's
  (Beijing) defaults unless the configuration gives its own table.
- Usage: a result line's `usage` is checked once, where it enters (`read_usage`): every
  number an integer from 0 to `MAX_USAGE_TOKENS`, `completion_tokens` left out only by
  embeddings (whose usage has none). A usage refused says why; the request is then
  charged its worst case (batchd.outbox.merge), never priced from an absurd number.

Every default carries the page it was read from (`source`) and the day (`as_of`); the
configuration overrides or extends them (`table_from`), since prices change.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from batchd.provider.profiles import TEST_MODEL, _convert

Currency = Literal["CNY", "USD"]
Money = Annotated[float, msgspec.Meta(ge=0)]
Tokens = Annotated[int, msgspec.Meta(ge=1)]
Share = Annotated[float, msgspec.Meta(gt=0, le=1)]

MILLION = 1_000_000


class Tier(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Prices for requests of at most `up_to_tokens` input tokens, written as an array
    `[up_to_tokens, input, output]` or `[up_to_tokens, input, output, reasoning]`."""

    up_to_tokens: Tokens
    input: Money
    output: Money
    reasoning: Money | None = None


class Price(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model's real-time list price per million tokens, and its batch discount."""

    input: Money
    output: Money
    currency: Currency
    reasoning: Money | None = None
    cached_input: Money | None = None
    tiers: tuple[Tier, ...] = ()
    batch_discount: Share = 0.5
    source: str | None = None
    as_of: datetime.date | None = None

    def tier_of(self, input_tokens: int) -> int:
        """PURE: the index of the tier a request of `input_tokens` is priced by (0 when
        the price has no tiers; beyond the last tier, the last)."""
        tiers = self.tiers
        if not tiers or input_tokens <= tiers[0].up_to_tokens:
            return 0
        for index, tier in enumerate(tiers):
            if input_tokens <= tier.up_to_tokens:
                return index
        return len(tiers) - 1

    def rates_at(self, tier: int) -> tuple[float, float, float]:
        """PURE: (input, output, reasoning) per million tokens, real time, in tier
        `tier` (see `tier_of`)."""
        chosen: Price | Tier = self.tiers[tier] if self.tiers else self
        reasoning = chosen.reasoning if chosen.reasoning is not None else chosen.output
        return chosen.input, chosen.output, reasoning

    def rates(self, input_tokens: int) -> tuple[float, float, float]:
        """PURE: (input, output, reasoning) per million tokens, real time, for a request
        of `input_tokens`."""
        return self.rates_at(self.tier_of(input_tokens))

    def batch_total(
        self, tier: int, input_tokens: int, output_tokens: int, thinking_output_tokens: int
    ) -> float:
        """PURE: the batch price of requests of one tier, from their summed input
        tokens, output tokens of requests that do not think and of those that do."""
        input_rate, output_rate, reasoning_rate = self.rates_at(tier)
        amount = (
            input_tokens * input_rate
            + output_tokens * output_rate
            + thinking_output_tokens * reasoning_rate
        )
        return amount * self.batch_discount / MILLION

    def batch_cost(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        thinking: bool = False,
        cached_tokens: int = 0,
    ) -> float:
        """PURE: the batch price of one request (tier by its input tokens; a request
        that thought pays the reasoning price for its output)."""
        input_rate, output_rate, reasoning_rate = self.rates(input_tokens)
        cached = min(max(cached_tokens, 0), input_tokens)
        cached_rate = self.cached_input if self.cached_input is not None else input_rate
        amount = (
            (input_tokens - cached) * input_rate
            + cached * cached_rate
            + output_tokens * (reasoning_rate if thinking else output_rate)
        )
        return amount * self.batch_discount / MILLION

    def usage_cost(self, usage: Usage) -> float:
        """PURE: the batch price of one request from its checked usage (a request that
        reports reasoning tokens thought, and pays the reasoning price for its output)."""
        return self.batch_cost(
            usage.prompt_tokens,
            usage.completion_tokens,
            thinking=usage.reasoning_tokens > 0,
            cached_tokens=usage.cached_tokens,
        )


# The most tokens one request's usage may report. No model reads or writes within three
# orders of magnitude of it; a larger number (2^64 + 1, 401 digits) is not a count.
MAX_USAGE_TOKENS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """One request's usage as the service reported it, every number checked
    (`read_usage`): billed input, output (reasoning included) and, within them,
    reasoning and cached tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0


def _refused(name: str, value: Any) -> str:
    shown = repr(value)
    if len(shown) > 40:
        shown = f"{shown[:20]}...({len(shown)} characters)"
    return f"{name} is not a token count ({shown})"


def _sound(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_USAGE_TOKENS


def read_usage(usage: Any, *, embeddings: bool = False) -> Usage | str:
    """PURE: a result line's `usage` as checked counts, or why it is refused (a note).

    Every number present must be an integer from 0 to `MAX_USAGE_TOKENS` (a string, a
    float, a negative, NaN or an absurdly large number is refused); `prompt_tokens` is
    required; `completion_tokens` too, except for an embeddings request or where
    `total_tokens` equals `prompt_tokens` (the service says there was no output:
    embeddings' usage has no `completion_tokens`). Reasoning tokens above the output, or
    cached tokens above the input, are refused as well. A refused usage is never priced:
    the request's cost is then taken from its estimate."""
    if not isinstance(usage, dict):
        return "usage is not an object"
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        return "prompt_tokens missing"
    if not _sound(prompt):
        return _refused("prompt_tokens", prompt)
    total = usage.get("total_tokens")
    if total is not None and not _sound(total):
        return _refused("total_tokens", total)
    completion = usage.get("completion_tokens")
    if completion is None:
        if not (embeddings or total == prompt):
            return "completion_tokens missing"
        completion = 0
    elif not _sound(completion):
        return _refused("completion_tokens", completion)
    details: dict[str, int] = {}
    for field, key, within, bound in (
        ("completion_tokens_details", "reasoning_tokens", "completion_tokens", completion),
        ("prompt_tokens_details", "cached_tokens", "prompt_tokens", prompt),
    ):
        found = usage.get(field)
        if found is None:
            continue
        if not isinstance(found, dict):
            return f"{field} is not an object"
        value = found.get(key)
        if value is None:
            continue
        if not _sound(value):
            return _refused(f"{field}.{key}", value)
        if value > bound:
            return f"{field}.{key} ({value}) is more than {within} ({bound})"
        details[key] = value
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else prompt + completion,
        reasoning_tokens=details.get("reasoning_tokens", 0),
        cached_tokens=details.get("cached_tokens", 0),
    )


class PriceTable:
    """Prices per provider and model; `price` is None for a model it does not know."""

    def __init__(self, prices: dict[str, dict[str, Price]]) -> None:
        self.prices = prices

    def _provider(self, provider: str) -> str:
        if provider == "custom" and "custom" not in self.prices:
            return "dashscope"
        return provider

    def price(self, provider: str, model: str) -> Price | None:
        """The model's price on `provider`; None when unknown (never a price of 0,
        except for the test model, which costs nothing)."""
        found = self.prices.get(self._provider(provider), {}).get(model)
        if found is None and model == TEST_MODEL:
            return Price(input=0.0, output=0.0, currency=self.currency(provider))
        return found

    def currency(self, provider: str) -> Currency:
        """The currency amounts on `provider` are in: that of its prices, else by region."""
        table = self.prices.get(self._provider(provider))
        if table:
            return next(iter(table.values())).currency
        return "CNY" if self._provider(provider) == "dashscope" else "USD"

    def request_cost(
        self, provider: str, model: str, usage: Any, *, embeddings: bool = False
    ) -> float | None:
        """The batch price of ONE request from the service's `usage` (`prompt_tokens`,
        `completion_tokens`, optional `completion_tokens_details.reasoning_tokens` and
        `prompt_tokens_details.cached_tokens`); None when the model has no price or the
        usage is refused (`read_usage`: a server's field is checked, never trusted)."""
        price = self.price(provider, model)
        counted = read_usage(usage, embeddings=embeddings)
        if price is None or isinstance(counted, str):
            return None
        return price.usage_cost(counted)


# --- defaults ---------------------------------------------------------------------------


def _p(
    currency: Currency,
    input: float,
    output: float,
    source: str,
    as_of: str,
    *,
    reasoning: float | None = None,
    cached_input: float | None = None,
    tiers: tuple[tuple[float, ...], ...] = (),
) -> Price:
    return Price(
        input=input,
        output=output,
        reasoning=reasoning,
        cached_input=cached_input,
        currency=currency,
        tiers=tuple(Tier(int(t[0]), *t[1:]) for t in tiers),
        source=source,
        as_of=datetime.date.fromisoformat(as_of),
    )


# Where each default was read, on READ_ON. Prices change: the configuration's [prices]
# table overrides any of them. A model whose price was not found is left out (unknown).
READ_ON = "2026-11-30"
_SPEC = "SPEC.md, What a batch costs (Model Studio's qwen-flash price, Beijing)"
_ALIYUN = "https://help.aliyun.com/en/document_detail/3023262.html"
_MODEL_STUDIO_INTL = "https://www.alibabacloud.com/help/en/model-studio/billing-for-model-studio"
_OPENAI = "https://openai.com/api/pricing/"
# Text embedding prices, Beijing in CNY (per thousand on the page: x 1000) and Singapore
# in USD; the pages give text-embedding-v3 the same price cell as v4. Read 2026-12-07.
EMBEDDINGS_READ_ON = "2026-12-07"
_EMBEDDING_CN = (
    "https://help.aliyun.com/zh/model-studio/text-embedding-api (and its English page,"
    " help.aliyun.com/en/model-studio/text-embedding-synchronous-api)"
)
_EMBEDDING_INTL = "https://www.alibabacloud.com/help/en/model-studio/text-embedding-synchronous-api"

# Beijing, CNY per million tokens (the pages give CNY per thousand: x 1000). Hybrid
# thinking models: `reasoning` is the output price in thinking mode.
_DASHSCOPE: dict[str, Price] = {
    "qwen-flash": _p(
        "CNY",
        0.15,
        1.5,
        _SPEC,
        READ_ON,
        tiers=((128_000, 0.15, 1.5), (256_000, 0.6, 6.0), (1_000_000, 1.2, 12.0)),
    ),
    "qwen-plus": _p(
        "CNY",
        0.8,
        2.0,
        _ALIYUN,
        READ_ON,
        reasoning=8.0,
        tiers=(
            (128_000, 0.8, 2.0, 8.0),
            (256_000, 2.4, 20.0, 24.0),
            (1_000_000, 4.8, 48.0, 64.0),
        ),
    ),
    "qwen3-32b": _p("CNY", 2.0, 8.0, _ALIYUN, READ_ON, reasoning=20.0),
    "qwen3-30b-a3b-instruct-2507": _p("CNY", 0.8, 3.0, _ALIYUN, READ_ON),
    "qwen3-30b-a3b-thinking-2507": _p("CNY", 0.8, 7.5, _ALIYUN, READ_ON),
    "text-embedding-v4": _p("CNY", 0.5, 0.0, _EMBEDDING_CN, EMBEDDINGS_READ_ON),
    "text-embedding-v3": _p("CNY", 0.5, 0.0, _EMBEDDING_CN, EMBEDDINGS_READ_ON),
}

# Singapore, USD per million tokens. The page gives qwen-max's only price (no tiers, no
# thinking mode); qwen-plus and qwen-turbo are listed there only by their lowest
# (non-thinking) price, so they are left out rather than priced too low.
_DASHSCOPE_INTL: dict[str, Price] = {
    "qwen-max": _p("USD", 1.6, 6.4, _MODEL_STUDIO_INTL, READ_ON),
    "text-embedding-v4": _p("USD", 0.07, 0.0, _EMBEDDING_INTL, EMBEDDINGS_READ_ON),
    "text-embedding-v3": _p("USD", 0.07, 0.0, _EMBEDDING_INTL, EMBEDDINGS_READ_ON),
}

# USD per million tokens, standard tier; the Batch API halves them. OpenAI bills
# reasoning tokens as output.
_OPENAI_PRICES: dict[str, Price] = {
    "gpt-4o": _p("USD", 2.5, 10.0, _OPENAI, READ_ON, cached_input=1.25),
    "gpt-4o-mini": _p("USD", 0.15, 0.6, _OPENAI, READ_ON, cached_input=0.075),
    "o4-mini": _p("USD", 1.1, 4.4, _OPENAI, READ_ON, cached_input=0.275),
    "text-embedding-3-small": _p("USD", 0.02, 0.0, _OPENAI, READ_ON),
    "text-embedding-3-large": _p("USD", 0.13, 0.0, _OPENAI, READ_ON),
}

DEFAULT_PRICES = PriceTable(
    {"dashscope": _DASHSCOPE, "dashscope-intl": _DASHSCOPE_INTL, "openai": _OPENAI_PRICES}
)

# The models Model Studio's Batch page lists for batch, per region (read 2026-12-07:
# https://www.alibabacloud.com/help/en/model-studio/batch-interfaces-compatible-with-openai,
# and help.aliyun.com/en/model-studio/batch-interfaces-compatible-with-openai/, which
# takes every text embedding model in Beijing), by their stable names; vision models left
# out (batchd counts no image). Each has a default price above, or is in UNPRICED.
BATCH_MODELS: dict[str, tuple[str, ...]] = {
    "dashscope": (
        "qwen-max",
        "qwen3-max",
        "qwen-plus",
        "qwen-flash",
        "qwen-long",
        "qwq-plus",
        "deepseek-r1",
        "deepseek-v3",
        "text-embedding-v3",
        "text-embedding-v4",
    ),
    "dashscope-intl": ("qwen-max", "qwen-plus", "qwen-flash", "qwen-turbo"),
}

_NOT_READ = (
    "no official page with its current price could be read when this table was made"
    " (2026-12-07): set it in the configuration's [prices] table"
)
_THINKING_UNREAD = (
    "its thinking-mode price and tiers could not be read from an official page (2026-12-07);"
    " a price without them would undercount a thinking request: set it, with reasoning,"
    " in the configuration's [prices] table"
)
# Batch models left without a default price, and why: a budget holds their jobs until
# the configuration gives one (docs/costs.md lists them).
UNPRICED: dict[str, dict[str, str]] = {
    "dashscope": {
        model: _NOT_READ
        for model in (
            "qwen-max",
            "qwen3-max",
            "qwen-long",
            "qwq-plus",
            "deepseek-r1",
            "deepseek-v3",
        )
    },
    "dashscope-intl": {
        "qwen-plus": _THINKING_UNREAD,
        "qwen-flash": _THINKING_UNREAD,
        "qwen-turbo": _THINKING_UNREAD,
    },
}


# Past this age, `status` warns that the default prices may be out of date.
STALE_AFTER_DAYS = 90


def oldest_as_of(table: PriceTable, provider: str) -> datetime.date | None:
    """PURE: the oldest `as_of` among `provider`'s prices (None: no dated price)."""
    dates = [p.as_of for p in table.prices.get(table._provider(provider), {}).values() if p.as_of]
    return min(dates) if dates else None


def stale_note(table: PriceTable, provider: str, today: datetime.date) -> str | None:
    """PURE: a warning when `provider`'s price table was read more than STALE_AFTER_DAYS
    before `today`, else None."""
    oldest = oldest_as_of(table, provider)
    if oldest is None or (today - oldest).days <= STALE_AFTER_DAYS:
        return None
    return (
        f"the {provider} price table was read on {oldest.isoformat()},"
        f" {(today - oldest).days} days ago: prices change; check them and set"
        f" [prices.{provider}.MODEL] (with as_of) in the configuration"
    )


def table_from(raw: dict[str, Any] | None) -> PriceTable:
    """The defaults, overridden and extended by a configuration's `[prices]` table,
    shaped `[prices.<provider>.<model>]` with keys input, output, reasoning,
    cached_input, currency, batch_discount, tiers (and source, as_of). A model's table
    replaces its default whole. A `ValueError` names the key that does not fit."""
    prices = {provider: dict(models) for provider, models in DEFAULT_PRICES.prices.items()}
    if not raw:
        return PriceTable(prices)
    if not isinstance(raw, dict):
        raise ValueError("[prices] must be a table of providers")
    for provider, models in raw.items():
        if not isinstance(models, dict):
            raise ValueError(f"prices.{provider} must be a table of models")
        table = prices.setdefault(str(provider), {})
        for model, given in models.items():
            try:
                table[str(model)] = _convert(given, Price)
            except ValueError as exc:
                raise ValueError(f"prices.{provider}.{model}: {exc}") from None
    return PriceTable(prices)
