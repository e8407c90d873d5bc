"""A reload reaches every key the daemon calls live, and only those.

Table-driven: every leaf key of `Settings` must be either in `LIVE` (with a new value and
the place a stage reads it) or under a key that needs a restart. A key added to the
configuration without either fails `test_every_key_is_live_or_needs_a_restart`; a live
key whose stage keeps the value it started with fails `test_a_reload_reaches_the_stage`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import BaseModel

from batchd import daemon as daemon_module
from batchd.config import Settings
from batchd.daemon import LIVE_KEYS, RESTART_INTAKE_KEYS, RESTART_KEYS, Daemon
from batchd.inputs.verdict import Rules
from batchd.models import Part, window_hours

MODEL = "qwen-plus"
UNPRICED = "reload-test-model"  # no shipped price
PRICES = {"custom": {UNPRICED: {"input": 3.0, "output": 9.0, "currency": "USD"}}}
NO_PART = cast(Part, type("NoPart", (), {"completion_window": None})())


def rules(d: Daemon) -> Rules:
    """What the prepare stage judges inputs by (`prepare` reads its settings)."""
    return Rules.of(d.preparer.settings)


def margin_s(d: Daemon) -> float:
    """The margin the poll stage adds to a batch's window before calling it overdue."""
    return d._lost_after_s(NO_PART) - window_hours(d.settings.jobs.completion_window) * 3600


def priced(d: Daemon) -> tuple[bool, ...]:
    """Whether the stages that count money know UNPRICED's price."""
    tables = (d.submitter.prices, d.collector.prices, d.publisher.prices)
    return tuple(t.price("custom", UNPRICED) is not None for t in tables)


@dataclass(frozen=True)
class Live:
    key: str  # dotted, as in the TOML file
    new: Any  # a value other than the default
    reads: Callable[[Daemon], Any]  # what a stage reads for it (may be awaitable)
    expected: Any = None  # what `reads` gives after the reload (None: `new`)


LIVE = [
    Live("log.level", "debug", lambda d: d.logged[-1][0]),  # type: ignore[attr-defined]
    Live("log.format", "json", lambda d: d.logged[-1][1]),  # type: ignore[attr-defined]
    Live("intake.settle_s", 7.0, lambda d: d.intake.settle_s),
    Live("intake.unterminated_settle_s", 90.0, lambda d: d.intake.unterminated_settle_s),
    Live("intake.rescan_interval_s", 3.0, lambda d: d._rescan_s(10.0)),
    Live("intake.reject_sparse", False, lambda d: rules(d).reject_sparse),
    Live(
        "jobs.completion_window",
        "48h",
        lambda d: (d.submitter.completion_window, rules(d).completion_window),
        ("48h", "48h"),
    ),
    Live("jobs.split", False, lambda d: rules(d).split),
    Live("jobs.group_by_model", True, lambda d: rules(d).group_by_model),
    Live("jobs.csv_model", MODEL, lambda d: rules(d).csv_model),
    Live("jobs.csv_system_prompt", "Be brief.", lambda d: rules(d).csv_system_prompt),
    Live("jobs.csv_columns.custom_id", "id", lambda d: rules(d).csv_columns[0]),
    Live("jobs.csv_columns.content", "text", lambda d: rules(d).csv_columns[1]),
    Live("jobs.csv_encoding", "latin-1", lambda d: rules(d).csv_encoding),
    Live("jobs.keep_input", False, lambda d: d.publisher.keep_input),
    Live("jobs.delete_remote_files", False, lambda d: d.publisher.delete_remote_files),
    Live("jobs.resubmit_failed", 2, lambda d: d.collector.resubmit_failed),
    Live("jobs.max_input_bytes", 12345, lambda d: rules(d).max_input_bytes),
    Live(
        "jobs.max_result_line_bytes",
        4096,
        lambda d: (d.collector.max_line_bytes, d.publisher.max_line_bytes),
        (4096, 4096),
    ),
    Live("jobs.duplicate_window", "2d", lambda d: d.preparer.settings.jobs.duplicate_window),
    Live("jobs.thinking", "refuse", lambda d: d.preparer.settings.jobs.thinking),
    Live("jobs.input_via", "upload", lambda d: d.oss_inputs.setting),
    Live("poll.first_poll_s", 12.0, lambda d: d.submitter.first_poll_s),
    Live("poll.interval_s", 45.0, lambda d: d.poller.interval_s),
    Live("poll.jitter", 0.3, lambda d: d.poller.jitter),
    Live("poll.list_threshold", 5, lambda d: d.poller.list_threshold),
    Live("poll.lost_margin_s", 3600.0, margin_s),
    Live("budget.daily", 10.0, lambda d: d.submitter.caps.daily),
    Live("budget.monthly", 100.0, lambda d: d.submitter.caps.monthly),
    Live("budget.on_over", "reject", lambda d: d.submitter.caps.on_over),
    Live("budget.unknown_price", "allow", lambda d: d.submitter.caps.unknown_price),
    Live("budget.timezone", "Asia/Shanghai", lambda d: d.submitter.budget_zone),
    Live("prices", PRICES, priced, (True, True, True)),
    Live("max_reported_errors", 3, lambda d: rules(d).max_errors),
    Live("max_job_crashes", 7, lambda d: d.preparer.settings.max_job_crashes),
    Live(
        "max_part_failures",
        9,
        lambda d: tuple(s.policy.max_failures for s in (d.submitter, d.poller, d.collector)),
        (9, 9, 9),
    ),
]

# One change for each key that needs a restart, with what a stage reads for it: the
# change is named as waiting for a restart, and the stage keeps the value it started with.
RESTART = [
    ("provider", "dashscope", lambda d: d.submitter.provider),
    ("base_url", "http://127.0.0.1:10/v1", lambda d: d.profile.base_url),
    ("limits", {"running_batches": 3}, lambda d: d.submitter.limits.running_batches),
    ("paths.outbox", "elsewhere", lambda d: d.publisher.outbox),
    ("control.max_connections", 3, lambda d: d.settings.control.max_connections),
    ("api.concurrency", 3, lambda d: d.submitter.concurrency),
    ("api.max_list_pages", 3, lambda d: d.poller.max_pages),
    ("api.step_retry_base_s", 1.0, lambda d: d.submitter.policy.base_s),
    ("api.provider_probe_s", 1.0, lambda d: d.probe.idle_probe_s),
    ("notify.timeout_s", 1.0, lambda d: d.notifications.settings.timeout_s),
    ("db_busy_timeout_s", 1.0, lambda d: d.settings.db_busy_timeout_s),
    ("intake.watch", False, lambda d: d.settings.intake.watch),
    ("intake.suffixes", (".jsonl",), lambda d: d.intake.suffixes),
]


def leaves(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every leaf key of a settings model, dotted (a nested section is walked)."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from leaves(kind, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def needs_restart(key: str) -> bool:
    top, _, rest = key.partition(".")
    return top in RESTART_KEYS or (top == "intake" and rest in RESTART_INTAKE_KEYS)


def base_settings(root: Path) -> Settings:
    return Settings.load(
        None, provider="custom", base_url="http://127.0.0.1:9/v1", paths={"root": root}
    )


def changed(settings: Settings, key: str, value: Any) -> Settings:
    """`settings` with one key changed, loaded (validated) as a reload loads it."""
    values = settings.model_dump()
    *tables, last = key.split(".")
    table = values
    for name in tables:
        table = table[name]
    table[last] = value
    return Settings.load(None, **values)


@pytest.fixture
async def opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Daemon]:
    """A daemon with its store, API client and stages built, none of them running; the
    logging set-up a reload does is recorded in `logged` instead."""
    daemon = Daemon(base_settings(tmp_path), "sk-reload-test")
    logged: list[tuple[str, str]] = []
    monkeypatch.setattr(daemon_module, "configure", lambda *a: logged.append(a))
    daemon.logged = logged  # type: ignore[attr-defined]
    daemon._check_folders()
    async with contextlib.AsyncExitStack() as stack:
        assert await daemon._open(stack)
        yield daemon


async def read(d: Daemon, reads: Callable[[Daemon], Any]) -> Any:
    value = reads(d)
    return await value if inspect.isawaitable(value) else value


def test_every_key_is_live_or_needs_a_restart() -> None:
    assert set(LIVE_KEYS).isdisjoint(RESTART_KEYS)
    assert set(LIVE_KEYS) | set(RESTART_KEYS) == set(Settings.model_fields)
    live = {row.key for row in LIVE}
    assert len(live) == len(LIVE)
    untested = {key for key in leaves(Settings) if not needs_restart(key)} - live
    assert not untested, f"live keys no stage is shown to read after a reload: {untested}"
    assert not {key for key in live if needs_restart(key)}
    assert {key.split(".")[0] for key in live} == set(LIVE_KEYS)


@pytest.mark.parametrize("row", LIVE, ids=lambda row: row.key)
async def test_a_reload_reaches_the_stage(opened: Daemon, row: Live) -> None:
    expected = row.new if row.expected is None else row.expected
    if not row.key.startswith("log."):
        assert await read(opened, row.reads) != expected, "the table's value is the default"
    answer = opened.apply_settings(changed(opened.settings, row.key, row.new))
    assert answer == {"applied": [row.key.split(".")[0]], "needs_restart": []}
    assert await read(opened, row.reads) == expected


@pytest.mark.parametrize(("key", "new", "reads"), RESTART, ids=[r[0] for r in RESTART])
async def test_a_key_that_needs_a_restart_is_named_and_not_applied(
    opened: Daemon, key: str, new: Any, reads: Callable[[Daemon], Any]
) -> None:
    before = await read(opened, reads)
    answer = opened.apply_settings(changed(opened.settings, key, new))
    top = key.split(".")[0]
    named = "intake.watch/suffixes" if top == "intake" else top
    assert named in answer["needs_restart"]
    assert await read(opened, reads) == before
