"""Extra batches: a part's batches beside the one it follows, cancelled as soon as found.

A create is sent once, but a gateway in front of the service may send it upstream more
than once: LiteLLM's own client retried a create whose connection was lost after the
batch was made, twice, whatever `num_retries` said, and three batches ran for one part.
Every batch batchd makes carries the part's tag in its metadata (`batchd_part`), so every
batch of a part can be found in the service's list: settling an uncertain create and
re-adopting a job after its state was lost list them all (`submit._find_batches`), and a
list sweep of the poll stage looks at every tagged batch on the pages it reads anyway.

Of a part's batches one is followed (`keep`): the one the part already follows, if any;
else the one furthest along (its work is done or under way), the oldest among equals.
Every other is an extra: recorded first (so that a crash before its cancel retries the
cancel), then cancelled at once, then retrieved now and then until it ends, when its
result files go to the remote clean-up. An extra that had ended when found needs no
cancel. Extras are logged (`extra_batch_found`, `extra_batch_cancelled`), listed by
`show` and summary.json and counted in /metrics (`batchd_extra_batches`): a batch
cancelled after it started may still bill the requests it ran before the cancel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.logs import get_logger
from batchd.models import ExtraBatch, ExtraCancel, Part, RemoteStatus, remote_is_terminal
from batchd.pipeline.account import AccountState
from batchd.provider.api import AccountError, ApiError, BatchApi, NotFoundError
from batchd.provider.remote import RemoteBatch
from batchd.store import Store

log = get_logger(__name__)

# How far along a batch is, by its status: the furthest is kept. A batch that failed or
# was cancelled is kept only when every batch of the part did.
_PROGRESS = {
    RemoteStatus.COMPLETED: 6,
    RemoteStatus.FINALIZING: 5,
    RemoteStatus.IN_PROGRESS: 4,
    RemoteStatus.VALIDATING: 3,
    RemoteStatus.EXPIRED: 1,  # partial results may be there
}
_STATUSES = frozenset(s.value for s in RemoteStatus)
# A cancel that could not be sent is tried again at most this many times.
MAX_CANCEL_ATTEMPTS = 12
BATCH = 50


def tag(part: Part) -> str:
    """The metadata value that names a part on its batch (`batchd_part`)."""
    return f"{part.job_id}-{part.seq}"


def tagged_part(value: str | None) -> tuple[str, int] | None:
    """PURE: the (job id, part seq) a `batchd_part` value names; None for anything that
    is not one of batchd's tags."""
    if not value or len(value) > 80:
        return None
    job_id, _, seq = value.rpartition("-")
    if not job_id or not seq.isascii() or not seq.isdigit() or len(seq) > 9:
        return None
    if not job_id.isascii() or not job_id.isalnum():
        return None
    return job_id, int(seq)


def progress(batch: RemoteBatch) -> tuple[int, int]:
    """PURE: how far along a batch is: its status's rank (an unknown status may be one
    that runs: between validating and the ended ones), then its requests done."""
    counts = batch.request_counts or {}
    done = counts.get("completed", 0) + counts.get("failed", 0)
    if batch.status in _PROGRESS:
        rank = _PROGRESS[RemoteStatus(batch.status)]
    elif batch.status in _STATUSES:
        rank = 0  # failed, cancelling, cancelled
    else:
        rank = 2
    return rank, done


def keep(batches: Sequence[RemoteBatch], followed: str | None = None) -> RemoteBatch:
    """PURE: which of a part's batches (as listed, newest first) the part follows: the
    one it follows already (`followed`); else the one furthest along; among equals the
    oldest (earliest `created_at`, then the one listed last)."""
    assert batches
    for batch in batches:
        if batch.id == followed:
            return batch
    listed = list(enumerate(batches))

    def order(item: tuple[int, RemoteBatch]) -> tuple[int, int, float, int]:
        position, batch = item
        rank, done = progress(batch)
        created = batch.created_at if batch.created_at is not None else float("inf")
        return (-rank, -done, created, -position)

    return min(listed, key=order)[1]


def extras_of(
    part: Part, batches: Sequence[RemoteBatch], kept_id: str, found_by: str, now: float
) -> list[ExtraBatch]:
    """PURE: the records of a part's batches other than the one it follows."""
    return [
        ExtraBatch(
            batch_id=b.id,
            job_id=part.job_id,
            part_seq=part.seq,
            kept_batch_id=kept_id,
            found_by=found_by,
            found_at=now,
            status=b.status,
            request_counts=b.request_counts,
            cancel=ExtraCancel.ENDED if remote_is_terminal(b.status) else ExtraCancel.PENDING,
        )
        for b in batches
        if b.id != kept_id
    ]


class ExtraBatches:
    """Record, cancel and follow to their end the extra batches of parts."""

    def __init__(
        self,
        store: Store,
        api: BatchApi,
        account: AccountState,
        clock: Clock = SYSTEM_CLOCK,
        *,
        settings: Callable[[], Settings],
        on_garbage: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        # Wakes the remote clean-up when an extra's result files are queued for deletion.
        self.on_garbage = on_garbage
        self.api = api
        self.account = account
        self.clock = clock
        # The settings in force, read where they are used (a reload replaces them).
        self._settings = settings

    def _pause_s(self, attempts: int) -> float:
        # A cancel that failed, and a cancelled extra not yet ended, are looked at again
        # after a pause doubling from the base up to the cap (`api.step_retry_*`).
        api = self._settings().api
        return float(min(api.step_retry_cap_s, api.step_retry_base_s * 2 ** max(0, attempts - 1)))

    async def found(
        self, part: Part, batches: Sequence[RemoteBatch], kept_id: str, found_by: str
    ) -> None:
        """Record the part's batches other than the one it follows (`kept_id`), then
        cancel them at once. Call it before the part is moved on to follow that one: a
        crash between the two finds them again (and records nothing twice)."""
        now = self.clock.now()
        extras = extras_of(part, batches, kept_id, found_by, now)
        if not extras:
            return
        await self.store.add_extra_batches(extras)
        # One that had ended needs no cancel; its result files are of no use.
        await self.store.add_garbage(
            [
                file_id
                for b in batches
                if b.id != kept_id and remote_is_terminal(b.status)
                for file_id in (b.output_file_id, b.error_file_id)
            ],
            "extra batch",
            now,
        )
        self.on_garbage()
        for extra in extras:
            log.error(
                "extra_batch_found",
                job_id=part.job_id,
                part=part.seq,
                batch_id=extra.batch_id,
                kept_batch_id=kept_id,
                status=extra.status,
                found_by=found_by,
            )
        await self.run_once()

    async def seen(self, batches: Sequence[RemoteBatch]) -> None:
        """Batches a list sweep read that it did not look for: any that carries a part's
        tag and its input file, and is not the batch that part follows, is an extra (a
        create a gateway sent again, whose answer batchd never had)."""
        tagged = [b for b in batches if tagged_part(b.metadata.get("batchd_part"))]
        if not tagged:
            return
        known = await self.store.known_batch_ids([b.id for b in tagged])
        for batch in tagged:
            named = tagged_part(batch.metadata.get("batchd_part"))
            if batch.id in known or named is None:
                continue
            part = await self.store.part_of(*named)
            if part is None or part.batch_id is None or part.batch_id == batch.id:
                continue  # not one of ours, or not created yet (settling finds it)
            if batch.input_file_id not in (None, part.remote_file_id):
                continue  # the tag alone is not enough to cancel a batch
            await self.found(part, [batch], part.batch_id, "sweep")

    async def run_once(self) -> bool:
        """Send the cancels due, and look at the cancelled extras due; True when any."""
        due = await self.store.extra_batches_due(self.clock.steady(), limit=BATCH)
        for extra in due:
            try:
                if extra.cancel == ExtraCancel.PENDING:
                    await self._cancel(extra)
                else:
                    await self._follow(extra)
            except AccountError as err:
                self.account.failed(err)
                return False
        return bool(due)

    async def idle_s(self, longest_s: float) -> float:
        at = await self.store.next_extra_batch_at()
        if at is None:
            return longest_s
        return min(longest_s, max(0.05, at - self.clock.steady()))

    async def _cancel(self, extra: ExtraBatch) -> None:
        # Its next try is scheduled on the steady clock: a wall-clock step moves it not.
        now = self.clock.steady()
        attempts = extra.attempts + 1
        try:
            batch = await self.api.cancel_batch(extra.batch_id)
        except NotFoundError:
            await self._gone(extra, attempts)
            return
        except AccountError:
            raise
        except ApiError as err:
            if err.retryable and attempts < MAX_CANCEL_ATTEMPTS:
                cancel, retry_at = ExtraCancel.PENDING, now + self._pause_s(attempts)
            else:
                # Refused (most often: it had ended before the cancel reached it).
                cancel, retry_at = ExtraCancel.FAILED, None
            await self.store.update_extra_batch(
                extra.batch_id, cancel=cancel, attempts=attempts, retry_at=retry_at, error=str(err)
            )
            log.warning(
                "extra_batch_cancel_failed",
                job_id=extra.job_id,
                part=extra.part_seq,
                batch_id=extra.batch_id,
                error=str(err),
            )
            return
        await self.store.update_extra_batch(
            extra.batch_id,
            cancel=ExtraCancel.REQUESTED,
            attempts=0,
            retry_at=now + self._pause_s(1),
            error=None,
            status=batch.status if batch is not None else None,
            request_counts=batch.request_counts if batch is not None else None,
        )
        log.warning(
            "extra_batch_cancelled",
            job_id=extra.job_id,
            part=extra.part_seq,
            batch_id=extra.batch_id,
            kept_batch_id=extra.kept_batch_id,
        )

    async def _gone(self, extra: ExtraBatch, attempts: int) -> None:
        await self.store.update_extra_batch(
            extra.batch_id, cancel=ExtraCancel.GONE, attempts=attempts, retry_at=None, error=None
        )

    async def _follow(self, extra: ExtraBatch) -> None:
        """A cancelled extra, until it ends: then its result files are deleted."""
        now = self.clock.steady()  # schedules; the garbage's time is a record
        attempts = extra.attempts + 1
        try:
            batch = await self.api.retrieve_batch(extra.batch_id)
        except NotFoundError:
            await self._gone(extra, attempts)
            return
        except AccountError:
            raise
        except ApiError as err:
            batch = None
            error: str | None = str(err)
        else:
            error = None
        pause = self._pause_s(attempts + 1)
        if batch is None or not remote_is_terminal(batch.status):
            await self.store.update_extra_batch(
                extra.batch_id,
                cancel=ExtraCancel.REQUESTED,
                attempts=attempts,
                retry_at=now + pause,
                error=error,
                status=batch.status if batch is not None else None,
                request_counts=batch.request_counts if batch is not None else None,
            )
            return
        await self.store.add_garbage(
            [batch.output_file_id, batch.error_file_id], "extra batch", now
        )
        self.on_garbage()
        await self.store.update_extra_batch(
            extra.batch_id,
            cancel=ExtraCancel.ENDED,
            attempts=attempts,
            retry_at=None,
            error=None,
            status=batch.status,
            request_counts=batch.request_counts,
        )
        log.warning(
            "extra_batch_ended",
            job_id=extra.job_id,
            part=extra.part_seq,
            batch_id=extra.batch_id,
            status=batch.status,
            request_counts=batch.request_counts,
        )
