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

Every time here (`now`, `retry_at`) is on the steady clock (`Clock.steady`).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchd.faults import Faults, describe, local_cause
from batchd.logs import get_logger
from batchd.models import Part, PartState
from batchd.store import Store
from batchd.store.lifecycle import part_allows

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StepPolicy:
    max_failures: int = 5
    base_s: float = 5.0
    cap_s: float = 600.0

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
