"""The job and part lifecycle, declared once: every state change batchd may make, each
with the stage that owns it.

A state has one writer: the stage that owns a transition is the only code that makes it,
and the compare-and-set in the store (`UPDATE ... WHERE id = ? AND state = ?`) settles the
rare race between two of them (an operator's retry and a stage, a cancel and a create):
the one whose update did not take does nothing more with the row. The store refuses any
transition that is not in these tables (`IllegalTransition`), so a new one is declared
here first, with its owner and why it happens; docs/design.md shows the tables
(`tests/unit/test_lifecycle.py` checks that they agree, that every state is reachable, and
that the terminal states leave only by the ways written here: an operator's retry, and a
cancel of a part parked before it was created).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from batchd.errors import BatchdError
from batchd.models import JOB_TERMINAL, PART_SETTLED, JobState, PartState


class Owner(StrEnum):
    """Who makes a transition: a stage of the daemon, its start-up, or an operator."""

    INTAKE = "intake"
    PREPARE = "prepare"
    SUBMIT = "submit"
    POLL = "poll"
    COLLECT = "collect"
    PUBLISH = "publish"
    RECOVERY = "recovery"  # the daemon's start-up, settling what crashes left
    OPERATOR = "operator"  # `batchd cancel`, `batchd retry` (batchd.operator.ops)


S = TypeVar("S", JobState, PartState)


@dataclass(frozen=True, slots=True)
class Transition(Generic[S]):
    source: S
    target: S
    owner: Owner
    why: str


class IllegalTransition(BatchdError):
    """The lifecycle does not allow this state change (batchd.store.lifecycle)."""


# A job is created CLAIMING by the intake (a file claimed from the inbox), or CLAIMED
# when re-created from its spool folder after the database lost it.
JOB_INITIAL: frozenset[JobState] = frozenset({JobState.CLAIMING, JobState.CLAIMED})
# Parts are planned PENDING (by prepare, and by collect for a follow-up round).
PART_INITIAL: frozenset[PartState] = frozenset({PartState.PENDING})
# No stage moves a part out of these; only an operator (`batchd retry`) or a cancel does.
PART_TERMINAL: frozenset[PartState] = PART_SETTLED | {PartState.PARKED}

_J, _P, _T = JobState, PartState, Transition

JOB_TRANSITIONS: tuple[Transition[JobState], ...] = (
    _T(_J.CLAIMING, _J.CLAIMED, Owner.INTAKE, "renamed into the spool (or found there)"),
    _T(_J.CLAIMED, _J.RUNNING, Owner.PREPARE, "validated and planned into parts"),
    _T(_J.CLAIMED, _J.PUBLISHING, Owner.PREPARE, "rejected, or cancelled: nothing sent"),
    _T(_J.CLAIMED, _J.PARKED, Owner.PREPARE, "validating it failed too often"),
    _T(_J.CLAIMED, _J.PUBLISHING, Owner.OPERATOR, "cancelled while held: nothing sent"),
    _T(_J.CLAIMED, _J.PARKED, Owner.RECOVERY, "crashed the daemon too often"),
    _T(_J.RUNNING, _J.CLAIMED, Owner.SUBMIT, "input changed before a part was sent"),
    _T(_J.RUNNING, _J.PUBLISHING, Owner.COLLECT, "every part settled, no follow-up round"),
    _T(_J.PUBLISHING, _J.PUBLISHED, Owner.PUBLISH, "outbox folder in place, cost recorded"),
    _T(_J.PUBLISHING, _J.PARKED, Owner.RECOVERY, "crashed the daemon too often"),
    _T(_J.PARKED, _J.CLAIMED, Owner.OPERATOR, "`batchd retry`: requeued"),
)

# Every state a part may be parked from (and goes back to on `batchd retry`), with the
# stage that parks it: the one that owns the step that failed.
PARKED_BY: dict[PartState, Owner] = {
    _P.PENDING: Owner.SUBMIT,
    _P.UPLOADING: Owner.SUBMIT,
    _P.UPLOADED: Owner.SUBMIT,
    _P.CREATING: Owner.SUBMIT,
    _P.RUNNING: Owner.POLL,
    _P.ENDED: Owner.COLLECT,
}

PART_TRANSITIONS: tuple[Transition[PartState], ...] = (
    _T(_P.PENDING, _P.UPLOADING, Owner.SUBMIT, "intent: the upload may happen"),
    _T(_P.UPLOADING, _P.UPLOADED, Owner.SUBMIT, "uploaded (or found whole after a crash)"),
    _T(_P.UPLOADING, _P.PENDING, Owner.SUBMIT, "not uploaded (or not whole): sent again"),
    _T(_P.UPLOADING, _P.FAILED, Owner.SUBMIT, "the upload refused for good"),
    _T(_P.UPLOADED, _P.CREATING, Owner.SUBMIT, "intent: the batch may be created"),
    _T(_P.CREATING, _P.RUNNING, Owner.SUBMIT, "batch created (or found after a crash)"),
    _T(_P.CREATING, _P.UPLOADED, Owner.SUBMIT, "not created (none found): asked again"),
    _T(_P.CREATING, _P.FAILED, Owner.SUBMIT, "the create refused for good"),
    _T(_P.PENDING, _P.UPLOADED, Owner.SUBMIT, "state lost: its file found on the service"),
    _T(_P.PENDING, _P.RUNNING, Owner.SUBMIT, "state lost: its batch found on the service"),
    _T(_P.PENDING, _P.CANCELLED, Owner.SUBMIT, "job cancelled before it was created"),
    _T(_P.UPLOADED, _P.CANCELLED, Owner.SUBMIT, "job cancelled before it was created"),
    _T(_P.PARKED, _P.CANCELLED, Owner.SUBMIT, "job cancelled, parked before it was created"),
    _T(_P.RUNNING, _P.ENDED, Owner.POLL, "the batch ended (or the service lost it)"),
    _T(_P.ENDED, _P.COLLECTED, Owner.COLLECT, "output and error files on local disk"),
    *(_T(state, _P.PARKED, by, "a step failed too often") for state, by in PARKED_BY.items()),
    _T(_P.FAILED, _P.PENDING, Owner.OPERATOR, "`batchd retry`: submitted again"),
    *(
        _T(_P.PARKED, state, Owner.OPERATOR, "`batchd retry`: back where parked")
        for state in PARKED_BY
    ),
)


def _index(table: Iterable[Transition[Any]]) -> dict[tuple[str, str], tuple[Owner, ...]]:
    owners: dict[tuple[str, str], tuple[Owner, ...]] = {}
    for move in table:
        key: tuple[str, str] = (move.source, move.target)
        owners[key] = (*owners.get(key, ()), move.owner)
    return owners


_JOB_OWNERS = _index(JOB_TRANSITIONS)
_PART_OWNERS = _index(PART_TRANSITIONS)


def job_allows(source: JobState | str, target: JobState | str) -> bool:
    """PURE: whether a job may go from `source` to `target`."""
    return (source, target) in _JOB_OWNERS


def part_allows(source: PartState | str, target: PartState | str) -> bool:
    """PURE: whether a part may go from `source` to `target`."""
    return (source, target) in _PART_OWNERS


def check_job(source: JobState | str, target: JobState | str) -> None:
    """Raise `IllegalTransition` unless a job may go from `source` to `target`."""
    if not job_allows(source, target):
        raise IllegalTransition(f"a job may not go from {source} to {target}")


def check_part(source: PartState | str, target: PartState | str) -> None:
    """Raise `IllegalTransition` unless a part may go from `source` to `target`."""
    if not part_allows(source, target):
        raise IllegalTransition(f"a part may not go from {source} to {target}")


def check_job_initial(state: JobState | str) -> None:
    if state not in JOB_INITIAL:
        raise IllegalTransition(f"a job is not created {state}")


def _markdown(kind: str, table: Iterable[Transition[S]]) -> list[str]:
    lines = [f"| {kind} from | to | owner | why |", "| --- | --- | --- | --- |"]
    lines += [f"| {t.source} | {t.target} | {t.owner} | {t.why} |" for t in table]
    return lines


def table_markdown() -> str:
    """The two tables as docs/design.md shows them (a test checks that they agree)."""
    job_start = ", ".join(s for s in JobState if s in JOB_INITIAL)
    terminal_jobs = ", ".join(s for s in JobState if s in JOB_TERMINAL)
    terminal_parts = ", ".join(s for s in PartState if s in PART_TERMINAL)
    lines = [
        f"A job starts {job_start}; a part starts {', '.join(PART_INITIAL)}. Terminal:"
        f" jobs {terminal_jobs}; parts {terminal_parts}.",
        "",
        *_markdown("job", JOB_TRANSITIONS),
        "",
        *_markdown("part", PART_TRANSITIONS),
    ]
    return "\n".join(lines) + "\n"
