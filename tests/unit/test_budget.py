"""The budget's pure decisions (batchd.budget): periods, what fits, what a job may start."""

from __future__ import annotations

from datetime import UTC, datetime

from batchd.budget import Caps, Ledger, job_refusal, periods, refusal


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_days_and_months_begin_at_midnight_in_the_zone() -> None:
    now = _at("2026-11-30T17:30:00+00:00")
    utc = periods(now, "UTC")
    assert utc.day_start == _at("2026-11-30T00:00:00+00:00")
    assert utc.month_start == _at("2026-11-01T00:00:00+00:00")
    assert utc.next_rollover == _at("2026-12-01T00:00:00+00:00")
    # In Beijing it is already 1 December at 01:30: a new day and a new month.
    shanghai = periods(now, "Asia/Shanghai")
    assert shanghai.day_start == _at("2026-12-01T00:00:00+08:00")
    assert shanghai.month_start == _at("2026-12-01T00:00:00+08:00")
    assert shanghai.next_rollover == _at("2026-12-02T00:00:00+08:00")


def test_a_day_of_23_hours_still_rolls_over_at_midnight() -> None:
    # Europe/Berlin springs forward on 2026-03-29: that day has 23 hours.
    now = datetime(2026, 3, 29, 12, 0, tzinfo=UTC).timestamp()
    when = periods(now, "Europe/Berlin")
    assert when.next_rollover == _at("2026-03-30T00:00:00+02:00")
    assert when.next_rollover - when.day_start == 23 * 3600


def test_no_cap_refuses_nothing_not_even_an_unknown_price() -> None:
    assert refusal(None, Ledger(spent_day=1e9), Caps()) is None
    assert refusal(1e9, Ledger(), Caps()) is None


def test_a_part_fits_only_beside_what_was_spent_and_what_runs() -> None:
    caps = Caps(daily=10.0, currency="CNY")
    assert refusal(4.0, Ledger(spent_day=3.0, committed=3.0), caps) is None
    why = refusal(4.01, Ledger(spent_day=3.0, committed=3.0), caps)
    assert why is not None
    assert "daily budget of 10.0000 CNY has 4.0000 CNY left" in why
    assert "spent 3.0000 CNY" in why and "running worst case 3.0000 CNY" in why


def test_the_monthly_cap_binds_when_the_day_has_room() -> None:
    caps = Caps(daily=10.0, monthly=100.0, currency="USD")
    why = refusal(2.0, Ledger(spent_day=0.0, spent_month=99.0), caps)
    assert why is not None and "monthly" in why


def test_creating_parts_uses_up_the_room() -> None:
    caps = Caps(daily=10.0)
    ledger = Ledger()
    fitted = 0
    for _ in range(5):
        if refusal(3.0, ledger, caps) is None:
            ledger.add(3.0)
            fitted += 1
    assert fitted == 3 and ledger.committed == 9.0


def test_an_unknown_price_waits_under_a_cap_unless_allowed() -> None:
    held = refusal(None, Ledger(), Caps(daily=10.0))
    assert held is not None and "no price" in held and "[prices]" in held
    assert refusal(None, Ledger(), Caps(daily=10.0, unknown_price="allow")) is None


def test_a_job_over_its_own_cap_never_starts() -> None:
    caps = Caps(currency="CNY")
    why = job_refusal(5.0, Ledger(), caps, own_cap=4.0)
    assert why is not None and "max_cost" in why and "max_tokens" in why
    assert job_refusal(3.0, Ledger(), caps, own_cap=4.0) is None
    assert job_refusal(None, Ledger(), caps, own_cap=4.0) is not None


def test_over_the_budget_a_job_waits_or_is_rejected_as_configured() -> None:
    ledger = Ledger(spent_day=9.0)
    assert job_refusal(2.0, ledger, Caps(daily=10.0), own_cap=None) is None  # its parts wait
    rejected = job_refusal(2.0, ledger, Caps(daily=10.0, on_over="reject"), own_cap=None)
    assert rejected is not None and "daily" in rejected
