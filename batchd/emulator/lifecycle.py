"""PURE: a batch's status and timestamps at any moment, derived from its timeline.

Nothing runs in the background: a batch is a handful of facts fixed at create (and at
cancel), and every read derives where it stands at `now`. The same facts always give
the same answer, so tests move the clock and read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum


class Status(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.EXPIRED, Status.CANCELLED})
# The service counts these against the running-batch cap.
UNFINISHED = frozenset(
    {Status.VALIDATING, Status.IN_PROGRESS, Status.FINALIZING, Status.CANCELLING}
)
# A batch may be cancelled while it has not begun finishing.
CANCELLABLE = frozenset({Status.VALIDATING, Status.IN_PROGRESS})

# Event name (the Batch field) -> the status it starts.
_EVENTS = {
    "created_at": Status.VALIDATING,
    "in_progress_at": Status.IN_PROGRESS,
    "finalizing_at": Status.FINALIZING,
    "completed_at": Status.COMPLETED,
    "failed_at": Status.FAILED,
    "expired_at": Status.EXPIRED,
    "cancelling_at": Status.CANCELLING,
    "cancelled_at": Status.CANCELLED,
}


@dataclass(frozen=True)
class Timeline:
    """The facts that decide a batch's life, in service seconds."""

    created_at: float
    total: int
    valid: bool
    validating_s: float
    run_s: float
    finalizing_s: float
    cancelling_s: float
    window_s: float
    cancel_at: float | None = None

    def cancelled(self, at: float) -> Timeline:
        return replace(self, cancel_at=at)


@dataclass(frozen=True)
class Phase:
    """Where a batch stands at one moment."""

    status: Status
    # Every event that has happened by then, by its Batch field name.
    events: dict[str, float]
    expires_at: float | None
    # Requests executed by then (a prefix of the file, in file order).
    executed: int
    # Requests that will never run (expired or cancelled before their turn).
    not_run: int

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _executed_by(t: Timeline, at: float) -> int:
    started = t.created_at + t.validating_s
    if at <= started:
        return 0
    if t.run_s <= 0:
        return t.total
    return min(t.total, math.floor(t.total * (at - started) / t.run_s))


def schedule(t: Timeline) -> tuple[list[tuple[str, float]], int]:
    """Every event of the batch's whole life in order, and the requests it will execute."""
    events: list[tuple[str, float]] = [("created_at", t.created_at)]
    validated = t.created_at + t.validating_s
    deadline = t.created_at + t.window_s
    finalizing = validated + t.run_s
    cancel = t.cancel_at
    if cancel is not None and cancel < validated:
        events += [("cancelling_at", cancel), ("cancelled_at", cancel + t.cancelling_s)]
        return events, 0
    if not t.valid:
        events.append(("failed_at", validated))
        return events, 0
    events.append(("in_progress_at", validated))
    if cancel is not None:
        events += [("cancelling_at", cancel), ("cancelled_at", cancel + t.cancelling_s)]
        return events, _executed_by(t, cancel)
    if finalizing > deadline:
        events.append(("expired_at", deadline))
        return events, _executed_by(t, deadline)
    events += [("finalizing_at", finalizing), ("completed_at", finalizing + t.finalizing_s)]
    return events, t.total


def ends_at(t: Timeline) -> float:
    """When the batch stops counting against the running cap."""
    events, _ = schedule(t)
    return events[-1][1]


def derive(t: Timeline, now: float) -> Phase:
    """The batch's status, timestamps and progress at `now`."""
    timeline, executed_total = schedule(t)
    happened = {name: at for name, at in timeline if at <= now}
    status = Status.VALIDATING
    for name, at in timeline:
        if at <= now:
            status = _EVENTS[name]
    if status in (Status.VALIDATING, Status.IN_PROGRESS):
        executed = min(_executed_by(t, now), executed_total)
    else:
        executed = executed_total
    not_run = t.total - executed_total if status in (Status.EXPIRED, Status.CANCELLED) else 0
    expires_at = t.created_at + t.window_s if "in_progress_at" in happened else None
    return Phase(status, happened, expires_at, executed, not_run)
