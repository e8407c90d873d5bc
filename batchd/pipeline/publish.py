"""The publish stage: write each job in PUBLISHING into the outbox in one atomic step,
then queue the clean-up of its remote files.

Publish: a hidden folder `outbox/.NAME.tmp-JOB` (`Outbox.staging`) receives the job's
folder, written by `batchd.outbox.writer` (results, errors, result.csv, the input's copy,
report.json, summary.json last), each file fsynced; then the folder is renamed to
`outbox/NAME` and the outbox fsynced. NAME is the job's name (the input's stem as
`intake.outbox_name` keeps it); when a job or anything else holds it, `NAME-2`,
`NAME-3`, ..., whose summary.json says which earlier folder (and job) it `follows`: a
published folder is never changed to point forward. The name is committed before the
rename, so a crash on either side of it is settled by looking at the folder's
`summary.json`. A write or fsync that fails (EIO, ENOSPC) removes the temp folder, logs
`publish_failed` and tries the job again after a pause that doubles with each failure;
the daemon carries on.

On a bucket outbox (`paths.outbox = "s3://B/P/"`) the folder is written the same way in
the local working outbox, then put into the bucket member by member, summary.json last
(`batchd.outbox.bucket`); the local copy is removed once summary.json is there. A name
is taken on a bucket when its summary.json exists; the job records the folder's URL. A
store that fails (`StorageFault`) pauses the job's publishing as a failing disk does,
with the fault shown under `outbox`, and nothing is removed from the spool before the
folder is whole in the bucket.

Here are the stage and its pure deciders (`retry_delay_s`, `remote_files_to_delete`,
`spend_of`, `numbered_name`, `error_note`); what the folder holds and says is the
outbox's (`batchd.outbox.writer`, `batchd.outbox.folder`).
"""

from __future__ import annotations

import asyncio
import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.documents import Cost, Follows, JobError, Summary, to_json
from batchd.failpoints import failpoint
from batchd.faults import Faults, StorageFault
from batchd.inputs.lines import utf8_safe
from batchd.inputs.spool import SpoolFolder
from batchd.logs import get_logger
from batchd.models import ExtraBatch, Job, JobState, Part
from batchd.outbox.bucket import BucketOutbox, folder_name, folder_url, read_cap
from batchd.outbox.folder import Outbox, OutboxFolder
from batchd.outbox.merge import file_of, kept_on_service
from batchd.outbox.remerge import merge_chain, merge_chain_bucket
from batchd.outbox.writer import (
    PUBLISH_FAILED,
    discard_tmp,
    input_open_for_writing,
    late_input_bytes,
    publish_failed,
    write_job_folder,
)
from batchd.provider.prices import PriceTable
from batchd.provider.profiles import ProviderLimits
from batchd.provider.tokens import RequestCounter
from batchd.store import Store

if TYPE_CHECKING:
    from batchd.objstore.bucket import Bucket

log = get_logger(__name__)

# The most jobs of one name the outbox holds (`NAME` to `NAME-999999`): `-N` fits the
# room `intake.MAX_NAME_BYTES` leaves, and the search for a free name is bounded.
MAX_COPIES = 999_999
MAX_NOTE_CHARS = 500
# How long publishing waits for a process that holds the job's input open for writing
# (it may still append requests) before it publishes anyway.
WRITER_WAIT_S = 60.0


def remote_files_to_delete(parts: list[Part]) -> list[str | None]:
    """PURE: the remote files to delete once the job is published: every input file,
    and every result file except those given up after transient failures."""
    ids: list[str | None] = []
    for part in parts:
        ids.append(part.remote_file_id)
        for kind in ("output", "error"):
            reason = (part.unavailable or {}).get(kind)
            if reason is None or not kept_on_service(reason):
                ids.append(file_of(part, kind))
    return ids


class Publisher:
    """Publishes jobs in PUBLISHING into the outbox, then queues remote clean-up."""

    def __init__(
        self,
        store: Store,
        outbox: Path,
        settings: Callable[[], Settings],
        limits: ProviderLimits,
        *,
        on_published: Callable[[], None],
        on_retry_due: Callable[[], None] = lambda: None,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 300.0,
        clock: Clock = SYSTEM_CLOCK,
        bucket: Bucket | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        # The local outbox: the outbox itself, or (`bucket` given) where folders are
        # written before they are put into the bucket.
        self.outbox = outbox
        self.bucket = BucketOutbox(bucket) if bucket is not None else None
        self.faults = faults if faults is not None else Faults(clock=clock)
        # The settings in force, read where they are used (a reload replaces them): the
        # actual cost is at the prices in force. The limits (fixed for the daemon's life)
        # give the output bound of a request charged its worst case.
        self._settings = settings
        self.limits = limits
        self.on_retry_due = on_retry_due
        self.on_published = on_published
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        # job id -> (failed attempts in a row, monotonic time of the next attempt)
        self.backoff: dict[str, tuple[int, float]] = {}
        # job id -> monotonic time since when a process holds its input open for writing
        self.writer_since: dict[str, float] = {}
        # job id -> why its input stayed in the spool after it was published (bytes that
        # reached it later): `batchd status` lists them (since this start).
        self.inputs_kept: dict[str, str] = {}
        self.writer_wait_s = WRITER_WAIT_S

    @property
    def provider(self) -> str:
        return self._settings().provider

    @property
    def prices(self) -> PriceTable:
        return self._settings().price_table

    @property
    def keep_input(self) -> bool:
        return self._settings().jobs.keep_input

    @property
    def delete_remote_files(self) -> bool:
        return self._settings().jobs.delete_remote_files

    @property
    def max_line_bytes(self) -> int:
        return self._settings().jobs.max_result_line_bytes

    @property
    def max_read_bytes(self) -> int:
        """The most bytes of one member read back from a bucket outbox (`merged/`)."""
        return read_cap(self._settings().jobs.max_input_bytes)

    async def run_once(self) -> bool:
        moved = False
        loop = asyncio.get_running_loop()
        for job in await self.store.jobs([JobState.PUBLISHING], limit=50):
            failed, due_at = self.backoff.get(job.id, (0, 0.0))
            if self.clock.monotonic() < due_at:
                continue
            try:
                moved |= await self.publish(job)
            except OSError as exc:
                # EIO, ENOSPC...: the temp folder is gone and nothing partial is visible.
                # A disk error is not the job's fault: it must not count towards parking
                # it, and it is tried again after a growing pause, not in a tight loop.
                # The object store of a bucket outbox failing is shown as a local fault.
                if isinstance(exc, StorageFault):
                    self.faults.met(exc, "publishing to the outbox")
                await self.store.update_job(
                    job.id, JobState.PUBLISHING, crash_count=job.crash_count
                )
                delay = retry_delay_s(failed + 1, self.retry_base_s, self.retry_cap_s)
                self.backoff[job.id] = (failed + 1, self.clock.monotonic() + delay)
                loop.call_later(delay, self.on_retry_due)
                log.error(
                    "publish_failed",
                    job_id=job.id,
                    name=job.name,
                    errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                    error=str(exc),
                    attempt=failed + 1,
                    retry_in_s=round(delay, 3),
                )
            except Exception as exc:
                # Anything else (a bug, a value nobody foresaw) is this job's problem,
                # never the stage's: the others go on publishing, and this one is tried
                # again after a growing pause, its note in `status` and `show`.
                await self._crashed(job, failed + 1, exc)
            else:
                if self.backoff.pop(job.id, None) is not None:
                    log.info("publish_recovered", job_id=job.id, attempts=failed + 1)
                if self.bucket is not None:
                    self.faults.healed("outbox")
        return moved

    async def _crashed(self, job: Job, attempt: int, exc: Exception) -> None:
        """A publish that raised: the job stays in PUBLISHING (its worst case still held
        against the budget) with a note saying why, tried again after a pause that
        doubles with each failure, up to `retry_cap_s`."""
        delay = retry_delay_s(attempt, self.retry_base_s, self.retry_cap_s)
        self.backoff[job.id] = (attempt, self.clock.monotonic() + delay)
        error = utf8_safe(f"{type(exc).__name__}: {exc}")[:MAX_NOTE_CHARS]
        note = f"{PUBLISH_FAILED} ({attempt} in a row; tried again in {delay:g} s): {error}"
        await self.store.update_job(
            job.id, JobState.PUBLISHING, crash_count=job.crash_count, error=note
        )
        asyncio.get_running_loop().call_later(delay, self.on_retry_due)
        log.exception(
            "publish_crashed", job_id=job.id, name=job.name, attempt=attempt, retry_in_s=delay
        )

    def _location(self, name: str) -> str:
        """What a job records as its outbox folder `name` (`outbox_path`): its path, or
        on a bucket its URL."""
        if self.bucket is not None:
            return self.bucket.location(name)
        return str(self.outbox / name)

    async def _holder(self, name: str, job_id: str) -> str | None:
        if self.bucket is not None:
            return await self.bucket.holder(name, job_id)
        return self._box.holder(name, job_id)

    async def _taken(self, name: str) -> bool:
        if self.bucket is not None:
            return await self.bucket.taken(name)
        return self._box.taken(name)

    async def _folder_job(self, name: str) -> str | None:
        if self.bucket is not None:
            return await self.bucket.job_id(name)
        return await asyncio.to_thread(OutboxFolder(self.outbox / name).job_id)

    async def _final_name(self, job: Job) -> str:
        """The job's outbox folder's name: its own, or `NAME-N` (`numbered_name`) when
        another job has it or anything at all (a folder, a file, a symlink, even a
        dangling one; on a bucket, a summary.json) is there."""
        if job.outbox_path:
            chosen = _name_of(job.outbox_path)
            if await self._holder(chosen, job.id) in (None, "self"):
                return chosen
            # Taken since the name was chosen (by hand, say): this job takes another.
            log.warning("outbox_name_taken", job_id=job.id, outbox=job.outbox_path)
        for n in range(1, MAX_COPIES + 1):
            name = numbered_name(job.name, n)
            if not await self.store.outbox_path_taken(
                self._location(name)
            ) and not await self._taken(name):
                return name
        # A publish failure like a full disk: logged, and tried again after a pause.
        raise OSError(errno.EEXIST, f"outbox names {job.name} to {job.name}-{MAX_COPIES} taken")

    async def _follows(self, job: Job, final: str) -> Follows | None:
        """What a numbered folder `NAME-N` follows: the nearest earlier folder of its name
        (`NAME-(N-1)`, ..., `NAME`) that another job owns, with that job's id; when no
        job owns one (a user's own file took the name), the folder just before it, with
        `job_id` null. None for a folder under the job's own name."""
        n = copy_number(job.name, final)
        if n is None:
            return None
        for k in range(n - 1, 0, -1):
            before = numbered_name(job.name, k)
            owner = await self.store.outbox_path_owner(self._location(before))
            if owner is None:
                owner = await self._folder_job(before)
            if owner is not None and owner != job.id:
                return Follows(folder=before, job_id=owner)
        return Follows(folder=numbered_name(job.name, n - 1), job_id=None)

    async def _writer_holds(self, job: Job) -> bool:
        """Does a process still hold the job's input open for writing (a producer that
        paused, then goes on)? Then publishing waits for it, `writer_wait_s` at most, so
        that what it appends is found (as `unsent`), not written into a removed file."""
        if await asyncio.to_thread(input_open_for_writing, Path(job.spool_path)) is not True:
            self.writer_since.pop(job.id, None)
            return False
        now = self.clock.monotonic()
        since = self.writer_since.setdefault(job.id, now)
        if now - since >= self.writer_wait_s:
            return False
        if since == now:
            log.warning("publish_waits_for_writer", job_id=job.id, name=job.name)
        asyncio.get_running_loop().call_later(min(1.0, self.writer_wait_s), self.on_retry_due)
        return True

    async def publish(self, job: Job) -> bool:
        if await self._writer_holds(job):
            return False
        parts = await self.store.parts_of(job.id)
        final = await self._final_name(job)
        where = self._location(final)
        if job.outbox_path != where:
            await self.store.update_job(job.id, JobState.PUBLISHING, outbox_path=where)
        tmp = self._box.staging(final, job.id)
        if await self._published_by(final, job.id):
            if self.bucket is not None:
                # Killed after summary.json went up: the local copy is all that was left.
                await asyncio.to_thread(shutil.rmtree, tmp.path, True)
            return await self._done(job, parts, final, None)
        follows = await self._follows(job, final)
        if not await self.store.update_job(
            job.id, JobState.PUBLISHING, crash_count=job.crash_count + 1
        ):
            return False  # no longer PUBLISHING (parked at start-up): not published
        try:
            extras = await self.store.extra_batches_of(job.id)
            summary = await asyncio.to_thread(self._build, job, parts, tmp, final, follows, extras)
            failpoint("publish.before_rename", job.inbox_name)
            if self.bucket is not None:
                # Member by member, summary.json last: complete only once it is there.
                await self.bucket.publish(tmp, final, job.inbox_name)
            else:
                await asyncio.to_thread(self._box.publish, tmp, OutboxFolder(self.outbox / final))
        except BaseException:
            # Whatever failed (a full or failing disk, a store that stopped answering),
            # the half-written folder goes: it holds space the next attempt needs, and it
            # was never visible under `final` (on a bucket: never with its summary.json).
            # An input moved into it goes back to the spool first.
            await asyncio.to_thread(discard_tmp, job, tmp)
            raise
        failpoint("publish.after_rename", job.inbox_name)
        if self.bucket is not None:
            # Every member is in the bucket (an input moved into the folder too).
            await asyncio.to_thread(shutil.rmtree, tmp.path, True)
        else:
            await asyncio.to_thread(self._box.sync)
        return await self._done(job, parts, final, summary)

    async def _published_by(self, name: str, job_id: str) -> bool:
        if self.bucket is not None:
            return await self.bucket.holder(name, job_id) == "self"
        return _published_by(OutboxFolder(self.outbox / name), job_id)

    async def _done(self, job: Job, parts: list[Part], final: str, summary: Summary | None) -> bool:
        where = self._location(final)
        if summary is None:
            if self.bucket is not None:
                summary = await self.bucket.summary(final)
            else:
                summary = await asyncio.to_thread(OutboxFolder(self.outbox / final).summary)
        outcome = summary.status
        counts = summary.request_counts
        # Crash hazard: the remote clean-up is queued and the spool removed *before* the
        # job is marked published. Once published it is never looked at again, so a kill
        # between the two would leave its remote files and spool folder behind for good;
        # in this order a kill only repeats these idempotent steps on the next pass.
        if self.delete_remote_files:
            await self.store.add_garbage(
                remote_files_to_delete(parts), f"job {job.id} published", self.clock.now()
            )
        kept_at = summary.input_kept_at
        # Bytes that reached the input after its outbox folder was built (a producer that
        # still held it open, where the kernel could not tell): never removed unseen.
        late = await asyncio.to_thread(late_input_bytes, job, summary)
        if late is not None:
            log.error("input_grew_after_publish", job_id=job.id, path=job.spool_path, note=late)
            self.inputs_kept[job.id] = late
        if kept_at:
            # The input could not be moved into the outbox (another filesystem), or its
            # writer still held it: its spool folder stays, and summary.json says where.
            log.warning("input_kept_in_spool", job_id=job.id, path=kept_at)
        elif late is None:
            await asyncio.to_thread(shutil.rmtree, SpoolFolder.of_input(job.spool_path).path, True)
        # A retry's answers merged into its chain's root folder (idempotent, as the above).
        if self.bucket is not None:
            await merge_chain_bucket(
                self.store,
                job,
                where,
                self.bucket,
                self.outbox,
                clock=self.clock,
                max_line_bytes=self.max_line_bytes,
                max_bytes=self.max_read_bytes,
            )
        else:
            await merge_chain(
                self.store,
                job,
                self.outbox / final,
                clock=self.clock,
                max_line_bytes=self.max_line_bytes,
            )
        cost = summary.cost
        # What failed the job as a whole, once, where `jobs` and `show` read it.
        note = error_note(summary.error)
        if late is not None:
            note = late if note is None else f"{note}; {late}"
        if note is None and publish_failed(job):
            note_field: dict[str, Any] = {"error": None}  # the failures before: over now
        else:
            note_field = {"error": note} if note is not None else {}
        if not await self.store.mark_published(
            job.id,
            spend_of(cost, self.provider),
            outcome=outcome,
            crash_count=0,
            outbox_path=where,
            completed=counts.completed,
            failed=counts.failed,
            usage=to_json(summary.usage),
            cost=to_json(cost),
            held=None,
            held_note=None,
            held_at=None,
            **note_field,
        ):
            return False  # the publisher is PUBLISHING's one writer: never seen
        log.info(
            "job_published",
            job_id=job.id,
            outbox=where,
            status=outcome,
            request_counts=to_json(summary.request_counts),
        )
        self.on_published()
        return True

    @property
    def _box(self) -> Outbox:
        return Outbox(self.outbox)

    def _build(
        self,
        job: Job,
        parts: list[Part],
        tmp: OutboxFolder,
        folder: str,
        follows: Follows | None,
        extras: list[ExtraBatch],
    ) -> Summary:
        return write_job_folder(
            job,
            parts,
            tmp,
            folder=folder,
            follows=follows,
            extras=extras,
            keep_input=self.keep_input,
            max_line_bytes=self.max_line_bytes,
            counter=RequestCounter(self.provider, self.limits, self.prices),
            currency=self.prices.currency(self.provider),
            clock=self.clock,
        )


def spend_of(cost: Cost | None, provider: str) -> tuple[str, str, float] | None:
    """PURE: the spend a published job records (provider, currency, amount): what is
    known of its cost, priced from usage and charged at worst case alike (a model with
    no price adds nothing it could be measured by)."""
    if cost is None or cost.known_amount <= 0:
        return None
    return provider, cost.currency, float(cost.known_amount)


def retry_delay_s(failures: int, base_s: float, cap_s: float) -> float:
    """PURE: the pause before the next publish attempt after `failures` in a row."""
    return float(min(cap_s, base_s * 2 ** min(max(0, failures - 1), 30)))


# -- the input's copy -------------------------------------------------------------------


def numbered_name(name: str, n: int) -> str:
    """PURE: the outbox folder name of the `n`th job of a name: `NAME`, `NAME-2`, ..."""
    return name if n == 1 else f"{name}-{n}"


def copy_number(name: str, folder: str) -> int | None:
    """PURE: N when `folder` is `numbered_name(name, N)` for an N of 2 or more, else None
    (the job's own name, or a folder named otherwise)."""
    digits = folder.removeprefix(f"{name}-")
    if digits == folder or not (digits.isascii() and digits.isdigit()) or digits[0] == "0":
        return None
    n = int(digits)
    return n if 2 <= n <= MAX_COPIES else None


def error_note(error: JobError | None) -> str | None:
    """PURE: summary.json's `error` as one line for the job's record (`jobs --json`,
    `show`, the job.ended notification): `code: message`; None when there is none."""
    if error is not None and error.code != "job_note":
        return f"{error.code}: {error.message}"
    return None


def _name_of(location: str) -> str:
    """PURE: the folder name in a job's `outbox_path` (a local path or a bucket URL)."""
    url = folder_url(location)
    return folder_name(url) if url is not None else Path(location).name


def _published_by(final: OutboxFolder, job_id: str) -> bool:
    try:
        head = final.head()
    except OSError:
        return False
    return head is not None and head.job_id == job_id
