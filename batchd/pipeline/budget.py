"""Budgets: what may still be spent today and this month, decided before a batch exists.

PURE: no store, no network. The submit stage asks `refusal` before it creates each part;
the prepare stage asks `job_refusal` before anything of a job is sent.

A part is created only when its worst case fits under every cap:

    spent in the period + worst case of what runs + this part's worst case <= cap

- *spent*: the actual cost of jobs published in the period (their results' usage at the
  price table's batch prices), by the daemon's clock in `budget.timezone`;
- *what runs*: the worst case of every part created and not yet published (its input
  tokens plus each request's output bound: `max_tokens`, else the model's output limit),
  kept until its job is published and its actual cost replaces it;
- *this part*: the same worst case, counted when the job was planned.

So a budget is never passed by what batchd starts, whatever the batches then do; the
price of that certainty is that requests without `max_tokens` reserve a model's whole
output limit until they end. A part that does not fit waits (`held: budget`, with a note
of what it needs and what is left) and is created by itself once it fits: the day or
month rolls over, a job ends cheaper than its worst case, or a reload raises the cap.
A part larger than the whole cap can never fit by itself: it is held `over_cap` at
once, saying how far the cap must rise. With `budget.on_over = "reject"`, a job whose
whole worst case does not fit when it is planned is rejected instead, before anything
is sent.

A part whose model has no price has an unknown cost: with a cap set it waits, held
`no_price` (`budget.unknown_price = "hold"`, the default), until a price comes (a reload
or a restart with the model in `[prices]`), unless told to run (`"allow"`, counted as 0
against the cap and said so). batchd.pipeline.holds says what ends each hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from batchd.models import Held
from batchd.pipeline.holds import Hold

if TYPE_CHECKING:
    from batchd.config import Settings


@dataclass(frozen=True, slots=True)
class BudgetCaps:
    """The configured caps (`[budget]`), in the price table's currency."""

    daily: float | None = None
    monthly: float | None = None
    currency: str = ""
    unknown_price: str = "hold"  # hold | allow
    on_over: str = "wait"  # wait | reject
    timezone: str = "UTC"  # where its days and months begin

    @classmethod
    def of(cls, settings: Settings) -> BudgetCaps:
        """The caps of a loaded configuration, in its price table's currency."""
        return cls(
            daily=settings.budget.daily,
            monthly=settings.budget.monthly,
            currency=settings.price_table.currency(settings.provider),
            unknown_price=settings.budget.unknown_price,
            on_over=settings.budget.on_over,
            timezone=settings.budget.timezone,
        )

    @property
    def active(self) -> bool:
        return self.daily is not None or self.monthly is not None


@dataclass(frozen=True, slots=True)
class Periods:
    """Where today and this month began, and when the next of them begins (epoch s)."""

    day_start: float
    month_start: float
    next_rollover: float


def periods(now: float, zone: str = "UTC") -> Periods:
    """PURE: the current day and month in `zone`, as epoch seconds."""
    tz = ZoneInfo(zone)
    local = datetime.fromtimestamp(now, tz)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    # Adding a day in local time and normalising copes with days of 23 or 25 hours.
    tomorrow = (day + timedelta(days=1, hours=3)).replace(hour=0)
    return Periods(day.timestamp(), month.timestamp(), tomorrow.timestamp())


@dataclass(slots=True)
class Ledger:
    """What the caps are measured against, at one moment."""

    spent_day: float = 0.0
    spent_month: float = 0.0
    committed: float = 0.0  # worst case of parts created and not yet published
    committed_unknown: int = 0  # of those, parts with no price

    def add(self, worst: float) -> None:
        """A part was created: its worst case now counts as running."""
        self.committed += worst


def _money(amount: float, currency: str) -> str:
    return f"{amount:.4f} {currency}".strip()


def refusal(worst: float | None, ledger: Ledger, caps: BudgetCaps, model: str = "") -> Hold | None:
    """PURE: why a part of `model` whose worst-case cost is `worst` (None: unknown) may
    not be created now, as the hold its job is held with; None when it fits every cap.
    A part larger than a whole cap is `over_cap` (it never fits by itself), one that
    does not fit what is left `budget`, one without a price `no_price`."""
    if not caps.active:
        return None
    money = caps.currency
    if worst is None:
        if caps.unknown_price == "allow":
            return None
        named = model or "its model"
        return Hold(
            Held.NO_PRICE,
            f"{named} has no price, so its cost cannot be held to the budget",
            f"It starts once {named} has one: add a price for {named} to [prices] and reload"
            ' (SIGHUP), or set budget.unknown_price = "allow" (counted as 0)',
        )
    caps_set = [
        (name, cap, spent)
        for name, cap, spent in (
            ("daily", caps.daily, ledger.spent_day),
            ("monthly", caps.monthly, ledger.spent_month),
        )
        if cap is not None
    ]
    for name, cap, _ in caps_set:
        if worst > cap:
            return Hold(
                Held.OVER_CAP,
                f"needs up to {_money(worst, money)}, more than the whole {name} budget of"
                f" {_money(cap, money)}: it cannot start by itself",
                f"Raise budget.{name} to at least {_money(worst, money)} and reload (SIGHUP),"
                " or set max_tokens on its requests to lower the worst case and drop it again",
            )
    for name, cap, spent in caps_set:
        left = cap - spent - ledger.committed
        if worst > left:
            return Hold(
                Held.BUDGET,
                f"needs up to {_money(worst, money)}; the {name} budget of {_money(cap, money)}"
                f" has {_money(max(left, 0.0), money)} left (spent {_money(spent, money)},"
                f" running worst case {_money(ledger.committed, money)})",
                "It starts by itself when running jobs are published (their actual cost"
                f" replaces their worst case) or when the {name} budget resets"
                f" ({_reset(name, caps.timezone)}); or raise budget.{name} and reload (SIGHUP)",
            )
    return None


def _reset(period: str, zone: str) -> str:
    """PURE: when a period's budget starts again, in words."""
    return f"00:00 {zone}" if period == "daily" else f"the 1st, 00:00 {zone}"


def job_refusal(
    worst: float | None, ledger: Ledger, caps: BudgetCaps, own_cap: float | None
) -> str | None:
    """PURE: why a whole job may not start (checked when it is planned), or None: over
    its own cap (the sidecar's `max_cost`) always; over what the budget leaves only
    when `budget.on_over = "reject"` (otherwise its parts wait their turn)."""
    if own_cap is not None:
        if worst is None:
            return "its cost is unknown (a model has no price), so it cannot be held to max_cost"
        if worst > own_cap:
            return (
                f"its worst case is {_money(worst, caps.currency)}, over the sidecar's max_cost"
                f" {_money(own_cap, caps.currency)}; set max_tokens on its requests to lower"
                " the worst case, or raise max_cost"
            )
    if caps.on_over == "reject":
        refused = refusal(worst, ledger, caps)
        return refused.need if refused is not None else None
    return None
