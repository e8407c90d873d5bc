"""One policy for a part step that failed: a note, a growing pause, then parking.

A step of one part (upload, create, settling either, polling, downloading) that fails
for a reason of its own (an unusable answer, a listing that never ends, a disk error, a
bug) must never stop its stage or another job. The part gets a note saying why, waits a
growing pause before the next try (`retry_at`), and after `max_failures` failures in a
row it is parked: no stage touches it until an operator runs `batchd retry JOB`, which
puts it back in the state it was parked from. Notes and parked parts show in
`batchd show` and `batchd status`.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchd.logs import get_logger
from batchd.models import Part, PartState
from batchd.store import Store

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
    if failures >= policy.max_failures:
        reason = f"parked after {failures} failures in a row: {note}"
        parked = await store.update_part(
            part.id,
            current.state,
            state=PartState.PARKED,
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
    await store.update_part(
        part.id, current.state, attempts=failures, error=note, retry_at=now + pause
    )
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
