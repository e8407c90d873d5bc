"""`batchd estimate FILE... [--json] [--approx] [--config F]`: what a file will cost.

Each file is checked exactly as `batchd validate` checks it (the same configuration, a
CSV converted as the daemon converts it); a file that fails is reported with the
validator's problems and the command exits 1. For a valid file: its requests, input
tokens per model (with the tokenizer that counted them), the output bound, and the cost
as a range, from the input alone (min) to every request's output bound (max), with the
batch discount. Where the configuration names the daemon's state folder and recent
published jobs of the same model exist, their mean output per request gives a likely
cost too (`output_tokens_observed_mean`, `cost.likely`).

`--approx` counts with the fast approximation (`count_file(approx=True)`) even where
Qwen's vocabulary is installed: chat lines read through a typed schema, most long texts
scaled by a tokens-per-byte ratio measured on a sample of them with the approximation's
upper bound. The scaled figures are an estimate, not a bound (a text unlike the sample,
a protein sequence among prose, can count more than its share): the output says so
(`"bound": false`); the daemon never counts this way. It runs at just under half the
speed of `batchd validate` (0.47 on 101 MB of chat lines, 2026-12-07, on two cores
shared with other work: tests/bench/bench_estimate.py, docs/benchmarks.md); Qwen's own
BPE at a twentieth of it (0.06) with unique texts, however it is fed (threads, batches:
measured, no gain on two cores), and only the memo of repeated strings helps it (0.23
with a long system prompt repeated).

Light: nothing of the daemon, aiohttp or pydantic is loaded (unless `--config` or a
BATCHD_* variable asks for the configuration, as for `batchd validate`).
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchd.cli.inputs import add_check_options, checked, configured, rules_for, summary
from batchd.errors import ConfigError
from batchd.inputs.validate import Report
from batchd.provider.prices import DEFAULT_PRICES, PriceTable, table_from
from batchd.provider.profiles import ProviderLimits
from batchd.provider.tokens import FileCount, ModelCount, count_file, tokenizer_for

EXIT_OK = 0
EXIT_FAILED = 1

# The observed output mean reads at most this many recent published jobs of a model.
OBSERVED_JOBS = 20
DATABASE_NAME = "batchd.sqlite3"

# Recent published jobs that ran the model: their usage of it (summary.json's
# `usage.per_model`, which the daemon also keeps in `jobs.usage`), newest first.
_OBSERVED_SQL = (
    "SELECT json_extract(usage, ?) FROM jobs"
    " WHERE state = 'published' AND json_extract(usage, ?) IS NOT NULL"
    " ORDER BY updated_at DESC LIMIT ?"
)


def register(subparsers: Any) -> None:
    """Add estimate to the `batchd` parser."""
    estimate = subparsers.add_parser(
        "estimate",
        description="Check JSONL or CSV batch input files as `batchd validate` does, then "
        "count their tokens per model and price them: the cost is a range from the input "
        "alone to every request's output bound, batch discount applied.",
    )
    estimate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    estimate.add_argument("--json", action="store_true", help="one JSON object per file")
    estimate.add_argument(
        "--approx",
        action="store_true",
        help="a quick estimate (many times faster): long texts scaled by a ratio measured "
        "on a sample, so not a bound, even where Qwen's vocabulary is installed",
    )
    add_check_options(estimate)
    estimate.set_defaults(handler=run_estimate)


def observed_output_mean(database: Path, model: str, jobs: int = OBSERVED_JOBS) -> float | None:
    """Mean output tokens per completed request over the last `jobs` published jobs of
    `model` in the daemon's database, read-only; None when there is no such job or no
    readable database. Values from the database are checked, not trusted."""
    if not database.is_file():
        return None
    path = '$.per_model."' + model.replace('"', "") + '"'
    try:
        uri = f"{database.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=1.0)) as db:
            rows = db.execute(_OBSERVED_SQL, (path, path, jobs)).fetchall()
    except sqlite3.Error:
        return None
    tokens = requests = 0
    for (raw,) in rows:
        try:
            used = orjson.loads(raw)
        except (orjson.JSONDecodeError, TypeError):
            continue
        if not isinstance(used, dict):
            continue
        out, answered = used.get("completion_tokens"), used.get("requests")
        if type(out) is int and out >= 0 and type(answered) is int and answered > 0:
            tokens += out
            requests += answered
    return tokens / requests if requests else None


@dataclass(frozen=True)
class Checking:
    """What a file is counted and priced for: the provider, its limits, and the daemon's
    state folder (its database) when a configuration names it."""

    provider: str
    limits: ProviderLimits
    state_dir: Path | None = None


def _price_table(args: argparse.Namespace) -> PriceTable:
    """The shipped prices, overridden by the configuration's `[prices]` table."""
    if args.config is None:
        return DEFAULT_PRICES
    from batchd.config import read_toml

    try:
        return table_from(read_toml(args.config).get("prices"))
    except ValueError as exc:
        raise ConfigError(f"configuration file {args.config}: [prices]: {exc}") from None


def _likely_cost(
    count: ModelCount, mean: float, table: PriceTable, checking: Checking, model: str
) -> float | None:
    """The input's cost plus the observed mean output of every request (at the thinking
    price for the share of requests that think), each request's output at most its
    bound: never above the maximum (a mean observed on jobs with a larger `max_tokens`
    says nothing of requests that cannot write that much)."""
    price = table.price(checking.provider, model)
    if price is None or count.cost_min is None or count.cost_max is None or not count.requests:
        return None
    per_request = min(mean, count.output_tokens_max / count.requests)
    thinking = per_request * count.thinking
    plain = per_request * (count.requests - count.thinking)
    likely = (
        count.cost_min
        + price.batch_cost(0, round(plain))
        + price.batch_cost(0, round(thinking), thinking=True)
    )
    return min(likely, count.cost_max)


def _model_object(
    model: str, count: ModelCount, table: PriceTable, checking: Checking
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "requests": count.requests,
        "input_tokens": count.input_tokens,
        "output_tokens_max": count.output_tokens_max,
        "thinking": count.thinking,
        "thinking_unset": count.thinking_unset,
        "tokenizer": count.tokenizer,
        "bound": count.bound,
        "cost": {"min": count.cost_min, "max": count.cost_max, "currency": count.currency},
    }
    if checking.state_dir is not None:
        mean = observed_output_mean(checking.state_dir / DATABASE_NAME, model)
        if mean is not None:
            data["output_tokens_observed_mean"] = round(mean, 1)
            data["cost"]["likely"] = _likely_cost(count, mean, table, checking, model)
    return data


def file_object(
    report: Report, counted: FileCount, table: PriceTable, checking: Checking
) -> dict[str, Any]:
    """The `--json` object of a valid file."""
    tokenizers = counted.tokenizers
    return {
        "path": report.path,
        "valid": True,
        "requests": counted.requests,
        "input_tokens": counted.input_tokens,
        "tokenizer": ",".join(tokenizers),
        "exact": counted.exact,
        "bound": counted.bound,
        "models": {
            model: _model_object(model, count, table, checking)
            for model, count in counted.models.items()
        },
        "warnings": [w.to_dict() for w in report.warnings],
    }


def _money(amount: float | None, currency: str | None) -> str:
    if amount is None:
        return "unknown"
    if amount >= 100:
        return f"{amount:,.2f} {currency}"
    return f"{amount:.6f} {currency}" if amount < 1 else f"{amount:.4f} {currency}"


def _render(data: dict[str, Any], provider: str, approx: bool) -> list[str]:
    lines = [f"{data['path']}: {data['requests']} requests, {data['input_tokens']:,} input tokens"]
    for model, facts in data["models"].items():
        tokenizer = tokenizer_for(provider, model, approx=approx)
        cost = facts["cost"]
        observed = facts.get("output_tokens_observed_mean")
        output = f"output at most {facts['output_tokens_max']:,} tokens"
        if observed is not None:
            output += f" (recent jobs: {observed:,.0f} per request)"
        how = tokenizer.description
        if not facts["bound"]:
            how = "sampled estimate, not a bound: a text unlike the sample may count more"
        lines.append(
            f"  {model}: {facts['requests']} requests, {facts['input_tokens']:,} input tokens "
            f"({how}), {output}"
        )
        if cost["min"] is None:
            lines.append(
                f"    cost: unknown (no price for {model} on {provider}; "
                f"set [prices.{provider}.{model}] in the configuration)"
            )
        else:
            currency = cost["currency"]
            text = f"    cost: {_money(cost['min'], currency)} to {_money(cost['max'], currency)}"
            if cost.get("likely") is not None:
                text += f", likely {_money(cost['likely'], currency)}"
            lines.append(text + " (batch price)")
    return lines


def run_estimate(args: argparse.Namespace) -> int:
    """`batchd estimate`: exit 0 when every file is valid, 1 when any is not."""
    settings = configured(args)
    rules = rules_for(args, settings)
    state_dir = settings.paths.folder("state") if settings is not None else None
    checking = Checking(rules.provider, rules.limits, state_dir)
    table = settings.price_table if settings is not None else _price_table(args)
    all_valid = True
    for path in args.files:
        with checked(path, rules) as (report, jsonl):
            if not report.valid or jsonl is None:
                all_valid = False
                _print_invalid(report, args.json)
                continue
            counted = count_file(
                jsonl, checking.provider, checking.limits, table, approx=args.approx
            )
        data = file_object(report, counted, table, checking)
        if args.json:
            sys.stdout.write(orjson.dumps(data).decode() + "\n")
            continue
        for line in _render(data, checking.provider, args.approx):
            print(line)
        for line in report.render():
            print(line)
    return EXIT_OK if all_valid else EXIT_FAILED


def _print_invalid(report: Report, as_json: bool) -> None:
    if as_json:
        data = {
            "path": report.path,
            "valid": False,
            "errors": [e.to_dict() for e in report.errors],
            "error_count": report.error_count,
        }
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
        return
    for line in report.render():
        print(line)
    print(summary(report))
