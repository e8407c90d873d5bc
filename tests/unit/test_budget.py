"""The budget's pure decisions (batchd.pipeline.budget): periods, what fits, what a job may start,
and the holds they make (batchd.pipeline.holds): each says what it needs and what ends it."""

from __future__ import annotations

from datetime import UTC, datetime

from batchd.models import Held
from batchd.pipeline.budget import BudgetCaps, Ledger, job_refusal, periods, refusal
from batchd.pipeline.holds import KINDS, Hold, ends_by_itself, first_to_show


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
    assert refusal(None, Ledger(spent_day=1e9), BudgetCaps()) is None
    assert refusal(1e9, Ledger(), BudgetCaps()) is None


def test_a_part_fits_only_beside_what_was_spent_and_what_runs() -> None:
    caps = BudgetCaps(daily=10.0, currency="CNY", timezone="Asia/Shanghai")
    assert refusal(4.0, Ledger(spent_day=3.0, committed=3.0), caps) is None
    why = refusal(4.01, Ledger(spent_day=3.0, committed=3.0), caps)
    assert why is not None and why.reason == Held.BUDGET
    assert "daily budget of 10.0000 CNY has 4.0000 CNY left" in why.need
    assert "spent 3.0000 CNY" in why.need and "running worst case 3.0000 CNY" in why.need
    # What ends it: it ends by itself, and says when the day resets.
    assert "running jobs are published" in why.ends
    assert "resets (00:00 Asia/Shanghai)" in why.ends and "raise budget.daily" in why.ends
    note = why.note("JOB1")
    assert note.startswith(why.need) and note.endswith(
        "`batchd cancel JOB1` drops it (nothing sent)"
    )


def test_the_monthly_cap_binds_when_the_day_has_room() -> None:
    caps = BudgetCaps(daily=10.0, monthly=100.0, currency="USD")
    why = refusal(2.0, Ledger(spent_day=0.0, spent_month=99.0), caps)
    assert why is not None and why.reason == Held.BUDGET and "monthly" in why.need
    assert "the 1st, 00:00 UTC" in why.ends


def test_a_part_larger_than_the_whole_cap_says_it_never_fits_by_itself() -> None:
    caps = BudgetCaps(daily=0.5, monthly=100.0, currency="CNY")
    # However empty the day, 0.6 never fits a cap of 0.5: not a wait for room.
    why = refusal(0.6, Ledger(), caps)
    assert why is not None and why.reason == Held.OVER_CAP
    assert "more than the whole daily budget of 0.5000 CNY" in why.need
    assert "Raise budget.daily to at least 0.6000 CNY and reload" in why.ends
    # Even when the day has less left than the cap: said as over the cap, not as a wait.
    why = refusal(0.6, Ledger(spent_day=0.4), caps)
    assert why is not None and why.reason == Held.OVER_CAP
    monthly = refusal(150.0, Ledger(), BudgetCaps(monthly=100.0))
    assert monthly is not None and monthly.reason == Held.OVER_CAP and "monthly" in monthly.need
    assert refusal(0.5, Ledger(), caps) is None  # exactly the cap fits


def test_holds_say_whether_they_end_by_themselves() -> None:
    assert ends_by_itself("budget") is True
    for reason in ("no_price", "over_cap", "duplicate", "some_future_reason"):
        assert ends_by_itself(reason) is False
    assert ends_by_itself(None) is None
    assert set(KINDS) == set(Held)  # every reason declared
    waits = Hold(Held.BUDGET, "b", "x")
    operator = Hold(Held.OVER_CAP, "o", "y")
    assert first_to_show(None, waits) is waits
    assert first_to_show(waits, operator) is operator
    assert first_to_show(operator, waits) is operator


def test_creating_parts_uses_up_the_room() -> None:
    caps = BudgetCaps(daily=10.0)
    ledger = Ledger()
    fitted = 0
    for _ in range(5):
        if refusal(3.0, ledger, caps) is None:
            ledger.add(3.0)
            fitted += 1
    assert fitted == 3 and ledger.committed == 9.0


def test_an_unknown_price_waits_under_a_cap_unless_allowed() -> None:
    held = refusal(None, Ledger(), BudgetCaps(daily=10.0), "qwen-max")
    assert held is not None and held.reason == Held.NO_PRICE
    assert "qwen-max has no price" in held.need
    assert "add a price for qwen-max to [prices] and reload (SIGHUP)" in held.ends
    assert refusal(None, Ledger(), BudgetCaps(daily=10.0, unknown_price="allow")) is None


def test_a_job_over_its_own_cap_never_starts() -> None:
    caps = BudgetCaps(currency="CNY")
    why = job_refusal(5.0, Ledger(), caps, own_cap=4.0)
    assert why is not None and "max_cost" in why and "max_tokens" in why
    assert job_refusal(3.0, Ledger(), caps, own_cap=4.0) is None
    assert job_refusal(None, Ledger(), caps, own_cap=4.0) is not None


def test_over_the_budget_a_job_waits_or_is_rejected_as_configured() -> None:
    ledger = Ledger(spent_day=9.0)
    assert job_refusal(2.0, ledger, BudgetCaps(daily=10.0), own_cap=None) is None  # its parts wait
    rejected = job_refusal(2.0, ledger, BudgetCaps(daily=10.0, on_over="reject"), own_cap=None)
    assert rejected is not None and "daily" in rejected
