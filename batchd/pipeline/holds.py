"""Holds: a job that waits with nothing more sent, why, and what ends it.

Every reason a job may be held for is declared here once (`KINDS`): what it waits for
and whether it ends by itself. A hold's note says what the job needs, what is left and
what ends it ("add a price for qwen-max to [prices.dashscope] and reload (SIGHUP)",
"`batchd cancel JOB` drops it"):

- `budget`: its worst case does not fit what the daily or monthly cap leaves now. Ends
  by itself: running jobs are published at their (lower) actual cost, the period rolls
  over, or a reload raises the cap.
- `no_price`: its model has no price, so its cost cannot be held to the cap. Ends when
  a price for the model comes (a reload or a restart with it in `[prices]`).
- `over_cap`: its worst case is larger than the whole cap: it can never fit by itself.
  Ends when a reload raises the cap that far.
- `duplicate`: the same input runs or ran to results already. Ends by an operator
  (`batchd retry`), or by itself when the earlier job ends with nothing to show.

A hold is judged again whenever its cause may have changed: the money holds by the
submit stage at each of its passes (a publish, a reload, the period's rollover and
start-up each wake it; parts planned without a price are priced again when the table
changes), the duplicate holds by the prepare stage when a job is published, on a reload
and at start-up. `batchd cancel` ends any hold (the job is published cancelled; what
was never sent is listed as not sent, the input kept); `batchd retry` lets a duplicate
run and says what the other holds wait for.

`hold` and `release` are the only writers: `job_held` is logged once when a hold starts
(or its reason changes) and `job_released` once when it ends; a note kept current at
each judgement is written silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchd.logs import get_logger
from batchd.models import Held

if TYPE_CHECKING:  # the store is only handed in: batchd.pipeline.budget (pure) imports this module
    from batchd.store import Store

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Kind:
    """What a reason to hold means: what the job waits for, and whether that comes
    without an operator."""

    waits_for: str
    ends_by_itself: bool


KINDS: dict[Held, Kind] = {
    Held.BUDGET: Kind("room in the budget", ends_by_itself=True),
    Held.NO_PRICE: Kind("a price for its model", ends_by_itself=False),
    Held.OVER_CAP: Kind("a budget larger than its worst case", ends_by_itself=False),
    Held.DUPLICATE: Kind("an operator: the same input ran before", ends_by_itself=False),
}
# The holds the submit stage judges at each pass: a part's worst case against the caps.
MONEY = frozenset({Held.BUDGET, Held.NO_PRICE, Held.OVER_CAP})


def ends_by_itself(reason: str | None) -> bool | None:
    """PURE: does a hold for `reason` end without an operator? None when not held; a
    reason this version does not know needs one."""
    if reason is None:
        return None
    try:
        return KINDS[Held(reason)].ends_by_itself
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Hold:
    """Why a job is held now: its reason, what it needs (and what is left), and what
    ends it."""

    reason: Held
    need: str
    ends: str

    def note(self, job_id: str) -> str:
        """PURE: the note shown with the hold (`show`, `status`, the job.held event)."""
        return f"{self.need}. {self.ends}; or `batchd cancel {job_id}` drops it (nothing sent)"


def first_to_show(current: Hold | None, found: Hold) -> Hold:
    """PURE: of two holds of one job's parts, the one its note shows: a hold only an
    operator ends before one that ends by itself, else the first found."""
    if current is None:
        return found
    if KINDS[current.reason].ends_by_itself and not KINDS[found.reason].ends_by_itself:
        return found
    return current


async def hold(store: Store, job_id: str, reason: Held, note: str, **fields: object) -> bool:
    """Hold a job for `reason`, or keep it held with `note` brought up to date. True when
    the hold started (or its reason changed): logged then, and only then."""
    if not await store.hold(job_id, reason, note):
        return False
    log.warning("job_held", job_id=job_id, reason=str(reason), note=note, **fields)
    return True


async def release(store: Store, job_id: str, reason: str | None, *, by: str) -> bool:
    """End a job's hold for `reason` (any hold: None); True when it was held so. `by`
    says what ended it (`budget`, `price`, `cancel`, `retry`, ...), logged once."""
    if not await store.release(job_id, reason):
        return False
    log.info("job_released", job_id=job_id, reason=reason, by=by)
    return True
