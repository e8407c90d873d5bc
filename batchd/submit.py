"""Upload and create, each behind a committed intent, with the settling that recovery uses.

Upload: PENDING -> UPLOADING (committed) -> call -> UPLOADED with the file id. A part
left in UPLOADING (a crash, or an answer lost) is settled by looking for its remote file
by name (`upload_name` names job and part): adopted when its size matches, else deleted
and uploaded again.

Create: UPLOADED -> CREATING (committed) -> call -> RUNNING with the batch id. A part
left in CREATING is settled by listing batches by `input_file_ids`: adopted when found,
else back to UPLOADED to be created again. So a crash or a lost answer never creates a
second batch for the same part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.api import AccountError, ApiError, BatchApi, MaybeAppliedError
from batchd.config import ProviderLimits
from batchd.failpoints import failpoint
from batchd.logs import get_logger
from batchd.models import Job, Part, PartState, RemoteStatus
from batchd.store import Store

log = get_logger(__name__)

# Rounds of `concurrency` uploads one pass makes before it lets creation catch up.
UPLOAD_ROUNDS = 8


@dataclass(slots=True)
class AccountState:
    """Account-level trouble pauses all submission; it is not any job's fault."""

    paused_reason: str | None = None
    paused_at: float | None = None
    operator_paused: bool = False
    errors: dict[str, str] = field(default_factory=dict)

    def pause(self, reason: str) -> None:
        if self.paused_reason is None:
            log.error("account_paused", reason=reason)
            self.paused_at = time.time()
        self.paused_reason = reason

    def resume(self) -> None:
        if self.paused_reason is not None:
            log.info("account_resumed", after_s=round(time.time() - (self.paused_at or 0), 1))
        self.paused_reason = None
        self.paused_at = None


def free_slots(limits: ProviderLimits, total: int, by_model: dict[str, int], model: str) -> int:
    """PURE: how many more batches of `model` may be created now."""
    free = limits.running_batches - total
    own = limits.for_model(model).max_running
    if own is not None:
        free = min(free, own - by_model.get(model, 0))
    return max(0, free)


def batch_fields(batch: dict[str, Any]) -> dict[str, Any]:
    """PURE: the columns a Batch object sets on its part, tolerant of nulls and gaps."""
    counts = batch.get("request_counts")
    if not isinstance(counts, dict):
        counts = None
    return {
        "remote_status": str(batch.get("status") or "") or None,
        "request_counts": counts,
        "output_file_id": batch.get("output_file_id") or None,
        "error_file_id": batch.get("error_file_id") or None,
        "remote_errors": batch.get("errors") or None,
    }


class Submitter:
    def __init__(
        self,
        store: Store,
        api: BatchApi,
        limits: ProviderLimits,
        account: AccountState,
        *,
        completion_window: str,
        first_poll_s: float,
        concurrency: int,
        on_created: Callable[[], None],
    ) -> None:
        self.store = store
        self.api = api
        self.limits = limits
        self.account = account
        self.completion_window = completion_window
        self.first_poll_s = first_poll_s
        self.concurrency = concurrency
        self.on_created = on_created

    # -- one pass -----------------------------------------------------------------------

    async def run_once(self) -> bool:
        """Upload and create what the caps allow now; True when anything moved."""
        if self.account.paused_reason is not None or self.account.operator_paused:
            return False
        moved = await self._settle_stuck()
        # Uploads and creates overlap: the parts uploaded in one pass are created in the
        # next while the following ones upload, so neither waits for the other's batch.
        uploaded, created = await asyncio.gather(self._uploads(), self._creates())
        return moved or uploaded or created

    async def _settle_stuck(self) -> bool:
        moved = False
        for part in await self.store.parts_in([PartState.UPLOADING]):
            moved |= await self.settle_upload(part)
        for part in await self.store.parts_in([PartState.CREATING]):
            moved |= await self.settle_create(part)
        return moved

    async def _uploads(self) -> bool:
        total, _ = await self.store.slot_holders()
        waiting = len(await self.store.parts_in([PartState.UPLOADED]))
        # Upload ahead of creation only as far as free slots need: files on the account
        # count against its 10,000-file quota.
        room = max(0, self.limits.running_batches - total + self.concurrency - waiting)
        # And only as far as the account's file quota leaves room for each new part's
        # input and its two result files: a full account refuses uploads.
        held = await self.store.remote_files_held()
        room = min(room, max(0, self.limits.max_stored_files - held) // 3)
        # A few rounds of concurrent uploads per pass, so that creation follows closely.
        pending = await self.store.parts_in(
            [PartState.PENDING], limit=min(room, self.concurrency * UPLOAD_ROUNDS)
        )
        if not pending:
            return False
        sem = asyncio.Semaphore(self.concurrency)

        async def one(part: Part) -> bool:
            async with sem:
                return await self.upload(part)

        results = await asyncio.gather(*(one(p) for p in pending))
        return any(results)

    async def _creates(self) -> bool:
        total, by_model = await self.store.slot_holders()
        chosen: list[Part] = []
        for part in await self.store.parts_in([PartState.UPLOADED], limit=10_000):
            if free_slots(self.limits, total, by_model, part.model) <= 0:
                continue
            chosen.append(part)
            total += 1
            by_model[part.model] = by_model.get(part.model, 0) + 1
            if total >= self.limits.running_batches:
                break
        if not chosen:
            return False
        # Each job read once per pass: a job of thousands of parts carries a large report,
        # and reading it again for every part would cost more than the creates.
        jobs = {job_id: await self.store.get_job(job_id) for job_id in {p.job_id for p in chosen}}
        sem = asyncio.Semaphore(self.concurrency)

        async def one(part: Part) -> bool:
            async with sem:
                if self.account.paused_reason is not None:
                    return False
                return await self.create(part, jobs[part.job_id])

        results = await asyncio.gather(*(one(p) for p in chosen))
        if any(results):
            self.on_created()
        return any(results)

    # -- upload -------------------------------------------------------------------------

    async def upload(self, part: Part) -> bool:
        if not await self.store.update_part(part.id, PartState.PENDING, state=PartState.UPLOADING):
            return False
        failpoint("upload.before_request")
        try:
            info = await self.api.upload_file(Path(part.path), part.upload_name)
        except AccountError as err:
            self.account.pause(str(err))
            await self.store.update_part(part.id, PartState.UPLOADING, state=PartState.PENDING)
            return False
        except MaybeAppliedError as err:
            log.warning("upload_uncertain", job_id=part.job_id, part=part.seq, error=str(err))
            return False  # stays UPLOADING; settle_upload looks for it on the next pass
        except ApiError as err:
            if err.retryable:
                # A full file quota (freed as jobs publish), throttling or an outage is
                # no fault of the part: it waits for a later pass.
                log.warning("upload_deferred", job_id=part.job_id, part=part.seq, error=str(err))
                await self.store.update_part(
                    part.id, PartState.UPLOADING, state=PartState.PENDING, error=str(err)
                )
                return False
            return await self._part_error(part, PartState.UPLOADING, err)
        failpoint("upload.after_request")
        file_id = str(info.get("id") or "")
        if not file_id:
            return await self._part_error(
                part, PartState.UPLOADING, ApiError("upload answer has no file id")
            )
        await self.store.update_part(
            part.id, PartState.UPLOADING, state=PartState.UPLOADED, remote_file_id=file_id
        )
        log.info(
            "part_uploaded", job_id=part.job_id, part=part.seq, file_id=file_id, bytes=part.bytes
        )
        return True

    async def settle_upload(self, part: Part) -> bool:
        """A part caught in UPLOADING: adopt its remote file if it arrived whole."""
        try:
            files = await self.api.list_files()
        except AccountError as err:
            self.account.pause(str(err))
            return False
        except ApiError as err:
            log.warning("upload_settle_failed", job_id=part.job_id, part=part.seq, error=str(err))
            return False
        mine = [f for f in files if f.get("filename") == part.upload_name]
        adopted: str | None = None
        for f in mine:
            if adopted is None and f.get("bytes") == part.bytes:
                adopted = str(f.get("id"))
            else:
                await self.store.add_garbage([str(f.get("id"))], "stray upload", time.time())
        if adopted:
            await self.store.update_part(
                part.id, PartState.UPLOADING, state=PartState.UPLOADED, remote_file_id=adopted
            )
            log.info("upload_adopted", job_id=part.job_id, part=part.seq, file_id=adopted)
        else:
            await self.store.update_part(part.id, PartState.UPLOADING, state=PartState.PENDING)
            log.info("upload_retry", job_id=part.job_id, part=part.seq)
        return True

    # -- create -------------------------------------------------------------------------

    async def create(self, part: Part, job: Job | None) -> bool:
        """Create the batch of one uploaded part of `job` (read in this pass)."""
        if job is None or job.cancel_requested:
            return False
        window = str(job.options.get("completion_window") or self.completion_window)
        if not await self.store.update_part(
            part.id, PartState.UPLOADED, state=PartState.CREATING, completion_window=window
        ):
            return False
        assert part.remote_file_id is not None
        metadata = {
            "ds_name": str(job.options.get("ds_name") or job.name)[:100],
            "batchd_part": f"{part.job_id}-{part.seq}",
        }
        if job.options.get("ds_description"):
            metadata["ds_description"] = str(job.options["ds_description"])[:200]
        failpoint("create.before_request")
        try:
            batch = await self.api.create_batch(
                part.remote_file_id, part.endpoint, window, metadata
            )
        except AccountError as err:
            self.account.pause(str(err))
            await self.store.update_part(part.id, PartState.CREATING, state=PartState.UPLOADED)
            return False
        except MaybeAppliedError as err:
            log.warning("create_uncertain", job_id=part.job_id, part=part.seq, error=str(err))
            return await self.settle_create(part)
        except ApiError as err:
            if err.retryable:
                # 429 quota (someone else filled the running cap) or an outage: try later.
                await self.store.update_part(
                    part.id, PartState.CREATING, state=PartState.UPLOADED, error=str(err)
                )
                return False
            return await self._part_error(part, PartState.CREATING, err)
        failpoint("create.after_request")
        await self._record_created(part, batch)
        return True

    async def _record_created(self, part: Part, batch: dict[str, Any]) -> None:
        now = time.time()
        batch_id = str(batch.get("id"))
        await self.store.update_part(
            part.id,
            PartState.CREATING,
            state=PartState.RUNNING,
            batch_id=batch_id,
            created_remote_at=float(batch.get("created_at") or now),
            next_poll_at=now + self.first_poll_s,
            error=None,
            **batch_fields(batch),
        )
        log.info(
            "batch_created",
            job_id=part.job_id,
            part=part.seq,
            batch_id=batch_id,
            file_id=part.remote_file_id,
            status=batch.get("status"),
        )

    async def settle_create(self, part: Part) -> bool:
        """A part caught in CREATING: adopt the batch made from its file, if any."""
        assert part.remote_file_id is not None
        try:
            page = await self.api.list_batches(input_file_ids=part.remote_file_id, limit="20")
        except AccountError as err:
            self.account.pause(str(err))
            return False
        except ApiError as err:
            log.warning("create_settle_failed", job_id=part.job_id, part=part.seq, error=str(err))
            return False
        found = [
            b
            for b in page.get("data") or []
            if isinstance(b, dict) and b.get("input_file_id") == part.remote_file_id
        ]
        if found:
            # Oldest first: if there were ever two, the first is the one to follow.
            batch = min(found, key=lambda b: (b.get("created_at") or 0, str(b.get("id"))))
            await self._record_created(part, batch)
            log.info("batch_adopted", job_id=part.job_id, part=part.seq, batch_id=batch.get("id"))
            return True
        await self.store.update_part(part.id, PartState.CREATING, state=PartState.UPLOADED)
        log.info("create_retry", job_id=part.job_id, part=part.seq)
        return True

    # -- cancel -------------------------------------------------------------------------

    async def cancel_job(self, job: Job) -> None:
        """Stop what has not been created; ask the service to cancel what runs."""
        for part in await self.store.parts_of(job.id):
            if part.state in (PartState.PENDING, PartState.UPLOADED):
                await self.store.update_part(
                    part.id,
                    part.state,
                    state=PartState.CANCELLED,
                    remote_status=RemoteStatus.CANCELLED,
                )
                await self.store.add_garbage([part.remote_file_id], "cancelled", time.time())
            elif (
                part.state == PartState.RUNNING
                and part.batch_id
                and (part.remote_status not in (RemoteStatus.CANCELLING, RemoteStatus.CANCELLED))
            ):
                try:
                    batch = await self.api.cancel_batch(part.batch_id)
                except ApiError as err:
                    log.warning("cancel_failed", job_id=job.id, part=part.seq, error=str(err))
                    continue
                await self.store.update_part(
                    part.id, PartState.RUNNING, next_poll_at=time.time(), **batch_fields(batch)
                )
                log.info(
                    "batch_cancel_requested", job_id=job.id, part=part.seq, batch_id=part.batch_id
                )

    async def _part_error(self, part: Part, state: PartState, err: ApiError) -> bool:
        log.error("part_failed", job_id=part.job_id, part=part.seq, error=str(err))
        await self.store.update_part(
            part.id, state, state=PartState.FAILED, error=str(err), attempts=part.attempts + 1
        )
        return True
