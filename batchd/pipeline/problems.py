"""One policy for a part step that failed: a note, a growing pause, then parking.

A step of one part (upload, create, settling either, polling, downloading) that fails
for a reason of its own (an unusable answer, a listing that never ends, a disk error, a
bug) must never stop its stage or another job. The part gets a note saying why, waits a
growing pause before the next try (`retry_at`), and after `max_failures` failures in a
row it is parked: no stage touches it until an operator runs `batchd retry JOB`, which
puts it back in the state it was parked from. Notes and parked parts show in
`batchd show` and `batchd status`.

Only a failure that is the part's own counts. One that is not (`step_waits`) gets a note
and a pause, and leaves the count where it was: a fault of this machine (a full disk, a
locked database: `batchd.faults`, shown in `status` on its own), or a provider that
answers nothing at all (an outage: `BatchApi.answering`). `step_trouble` sorts an
unexpected error into one or the other.

The service's own errors are sorted once, by `classify` (the error ladder), for the
upload and create of the submit stage and the polls of the poll stage alike.

Every time here (`now`, `retry_at`) is on the steady clock (`Clock.steady`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from batchd.config import Settings
from batchd.faults import Faults, describe, local_cause
from batchd.logs import get_logger
from batchd.models import Part, PartState
from batchd.provider.api import AccountError, ApiError, MaybeAppliedError, NotFoundError
from batchd.provider.remote import BadAnswer
from batchd.store import Store
from batchd.store.lifecycle import part_allows

log = get_logger(__name__)


class CallFailure(StrEnum):
    """What an error of the service means for the step that met it (`classify`)."""

    # The account cannot be used (a bad key, arrears): every call pauses and the part
    # goes back to wait, uncounted (the account stage probes it).
    ACCOUNT = "account"
    # A call that is not idempotent (an upload, a create) may have taken effect: its
    # effect is looked for once a list can show it, never sent again blindly.
    UNCERTAIN = "uncertain"
    # Throttling, a full quota, a 5xx, a transport failure: no fault of the part; it is
    # tried again later, uncounted.
    LATER = "later"
    # The service does not know the object (404).
    GONE = "gone"
    # The service refused the request for good (a 4xx): sent again, it fails again.
    REFUSED = "refused"
    # An answer batchd cannot use: the step's own failure, counted (`step_failed`), and
    # the part parked after `max_failures` of them.
    UNUSABLE = "unusable"


def classify(err: ApiError | BadAnswer) -> CallFailure:
    """PURE: the error ladder, in one place: which rung an error of the service is on.
    Anything else a step raises is not an answer of the service: `step_trouble` sorts
    it (a fault of this machine waits; anything else is counted)."""
    if isinstance(err, BadAnswer):
        return CallFailure.UNUSABLE
    if isinstance(err, AccountError):
        return CallFailure.ACCOUNT
    if isinstance(err, MaybeAppliedError):
        return CallFailure.UNCERTAIN
    if err.retryable:
        return CallFailure.LATER
    if isinstance(err, NotFoundError):
        return CallFailure.GONE
    return CallFailure.REFUSED


@dataclass(frozen=True, slots=True)
class StepPolicy:
    max_failures: int = 5
    base_s: float = 5.0
    cap_s: float = 600.0

    @classmethod
    def of(cls, settings: Settings) -> StepPolicy:
        """The policy of a loaded configuration (`max_part_failures`, `api.step_retry_*`)."""
        api = settings.api
        return cls(settings.max_part_failures, api.step_retry_base_s, api.step_retry_cap_s)

    def pause_s(self, failures: int) -> float:
        """PURE: the pause before the next try after `failures` failures in a row."""
        return float(min(self.cap_s, self.base_s * 2 ** min(max(0, failures - 1), 30)))


async def step_failed(store: Store, part: Part, note: str, policy: StepPolicy, now: float) -> bool:
    """Count a failed step of `part` (in the state it is in now); True when it is parked."""
    current = await store.get_part(part.id)
    if current is None or current.state in (PartState.PARKED, PartState.FAILED):
        return False
    failures = current.attempts + 1
    # A part that settled meanwhile is never parked (the lifecycle has no way there).
    if failures >= policy.max_failures and part_allows(current.state, PartState.PARKED):
        reason = f"parked after {failures} failures in a row: {note}"
        parked = await store.move_part(
            part.id,
            current.state,
            PartState.PARKED,
            parked_from=current.state,
            attempts=failures,
            error=reason,
            retry_at=None,
        )
        if parked:
            log.error(
                "part_parked",
                job_id=part.job_id,
                part=part.seq,
                state=str(current.state),
                failures=failures,
                reason=note,
            )
        return parked
    pause = policy.pause_s(failures)
    if not await store.update_part(
        part.id, current.state, attempts=failures, error=note, retry_at=now + pause
    ):
        return False  # moved on meanwhile: the failure was of a step it no longer takes
    log.warning(
        "part_step_failed",
        job_id=part.job_id,
        part=part.seq,
        state=str(current.state),
        failures=failures,
        retry_in_s=round(pause, 3),
        error=note,
    )
    return False


async def step_waits(store: Store, part: Part, note: str, pause_s: float, now: float) -> None:
    """A step of `part` could not be done for a reason that is not the part's (this
    machine's fault, or an outage): a note and a pause, never counted toward parking it."""
    current = await store.get_part(part.id)
    if current is None or current.state in (PartState.PARKED, PartState.FAILED):
        return
    if not await store.update_part(part.id, current.state, error=note, retry_at=now + pause_s):
        return  # moved on meanwhile: nothing waits
    log.warning(
        "part_step_waits",
        job_id=part.job_id,
        part=part.seq,
        state=str(current.state),
        retry_in_s=round(pause_s, 3),
        reason=note,
    )


async def step_trouble(
    store: Store,
    part: Part,
    exc: BaseException,
    policy: StepPolicy,
    now: float,
    faults: Faults,
    pauses: str,
) -> bool:
    """An unexpected error ended a step of `part`: a fault of this machine waits (shown
    in `faults` as pausing `pauses`), anything else is the part's own failure
    (`step_failed`). True when the part is parked."""
    local = local_cause(exc)
    if local is not None:
        pause = faults.met(local, pauses)
        note = f"waits for this machine: {describe(local)}: {local}"
        await step_waits(store, part, note, pause, now)
        return False
    return await step_failed(store, part, f"{type(exc).__name__}: {exc}", policy, now)
