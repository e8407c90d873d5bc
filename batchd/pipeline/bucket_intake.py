"""The inbox on a bucket (`paths.inbox = "oss://B/inbox/"` or `s3://...`): its objects
found by listing and claimed exactly once, crash-safely, into the spool.

A bucket has no inotify and no rename, so the folder inbox's two steps (find a settled
file, rename it into the spool) become these:

- **Finding.** The inbox folder is listed (its own objects, no sub-folders) at start and
  every `intake.rescan_interval_s`. The folder inbox's naming rules apply unchanged
  (`batchd.inputs.inbox`: hidden, temp and partial names, sidecars; an unknown suffix is
  refused), plus a zero-byte key ending in `/` (a console's "folder"). No settle delay:
  a PUT (or a completed multipart upload) is atomic, an object is never listed half
  written, so what a listing shows is whole.
- **Claiming**, each step framed by a committed record (`inbox_claims`, with the job's
  row), so that a kill -9 anywhere redoes at most one idempotent request:
  1. record the intent: the job (CLAIMING) and its claim (key, ETag, size; COPYING),
     one unfinished claim per (key, ETag);
  2. copy the object into the job's spool folder (`get_file` with If-Match: that version
     or nothing), its sidecar beside it, and, when the spool is a bucket too, into
     `SPOOL/JOB/input.EXT` there (a copy inside the store, If-Match again);
  3. record COPIED;
  4. delete it from the inbox, If-Match its ETag (and the sidecar likewise);
  5. record CLAIMED, with the job.

  A 412 or a 404 at step 2 (the producer overwrote or removed the object since the
  listing) drops the intent: the next listing sees what is there now. A delete that
  finds another ETag at step 4 leaves that object: a newer version PUT after our copy,
  claimed as a job of its own at the next listing.
- **Recovery** (`recover_claims`, at start; and every pass for a claim a store fault
  cut short) settles each unfinished claim from what the spool and the store show: a
  COPYING claim whose copy is whole goes on to the delete, else is copied again while
  the inbox still holds that version, else is dropped; a COPIED one is deleted (again).

A store fault (`StorageFault`: unreachable, 5xx, denied) is this side's trouble: it
stops the pass and pauses the stage, shown in `status` (`batchd.faults`), and the claim
it cut is settled at the next pass; no object is lost or claimed twice for it.

An object over `jobs.max_input_bytes` is not claimed: it stays in the inbox, where its
owner has it, refused in `status` with why (it would be rejected on its size unread, and
a bucket input is downloaded to be read).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import orjson

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.documents import JobOptions, to_json
from batchd.failpoints import failpoint
from batchd.faults import StorageFault, local_cause
from batchd.inputs.inbox import SIDECAR_SUFFIX, is_ignored_name
from batchd.inputs.spool import SpoolFolder, input_name
from batchd.inputs.verdict import MAX_SIDECAR_BYTES, sidecar_options
from batchd.logs import get_logger
from batchd.models import ClaimStep, InboxClaim, JobState, input_kind
from batchd.objstore.bucket import Bucket, ObjectChanged, ObjectInfo, ObjectTooLarge
from batchd.pipeline.intake import (
    LATE_SIDECAR_S,
    LONE_SIDECAR,
    MAX_LATE_NOTES,
    Intake,
    new_job_id,
    outbox_name,
    shown_name,
)
from batchd.store import Store

log = get_logger(__name__)

# Metadata of an input's copy in a spool bucket: the job that owns it, and the ETag of the
# inbox object it was copied from (what recovery checks the copy by).
META_JOB = "batchd-job"
META_SOURCE_ETAG = "batchd-source-etag"


def is_folder_marker(info: ObjectInfo, name: str) -> bool:
    """PURE: a zero-byte key ending in `/`: what a console makes for a "folder"."""
    return name.endswith("/") and info.size == 0


class BucketIntake(Intake):
    """Finds objects in a bucket inbox and claims each one exactly once into the spool."""

    def __init__(
        self,
        store: Store,
        inbox: Path,
        spool: Path,
        settings: Callable[[], Settings],
        *,
        bucket: Bucket,
        spool_bucket: Bucket | None = None,
        on_claimed: Callable[[], None],
        on_pending: Callable[[], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(
            store,
            inbox,
            spool,
            settings,
            on_claimed=on_claimed,
            on_pending=on_pending,
            clock=clock,
        )
        self.bucket = bucket
        self.spool_bucket = spool_bucket
        # Objects refused (logged once), by (name, ETag), with why; pruned to the listing.
        self._refused_objects: dict[tuple[str, str], str] = {}
        # Lone sidecars already looked at for a job they came too late for.
        self._judged_objects: set[tuple[str, str]] = set()

    def entries(self) -> tuple[dict[str, str], dict[str, str]]:
        waiting = {shown_name(name): why for name, why in self.waiting.items()}
        refused = {shown_name(name): why for (name, _etag), why in self._refused_objects.items()}
        refused.update((shown_name(name), why) for name, why in self.late.items())
        return waiting, refused

    def _refuse_object(self, info: ObjectInfo, name: str, reason: str) -> None:
        if (name, info.etag) not in self._refused_objects:
            self._refused_objects[(name, info.etag)] = reason
            log.warning("inbox_entry_refused", name=shown_name(name), reason=reason)

    # -- finding -------------------------------------------------------------------------

    async def list_inbox(
        self,
    ) -> tuple[list[tuple[ObjectInfo, str]], dict[str, ObjectInfo], list[ObjectInfo]]:
        """One listing of the inbox: the inputs to claim (with their kind), the sidecars
        by their input's stem, and the lone sidecars (no input of their stem listed)."""
        objects = [info async for info in self.bucket.list()]
        url = self.bucket.url
        sidecars: dict[str, ObjectInfo] = {}
        for info in objects:
            name = url.name(info.key)
            if name.endswith(SIDECAR_SUFFIX) and not name.startswith("."):
                sidecars[name[: -len(SIDECAR_SUFFIX)]] = info
        ready: list[tuple[ObjectInfo, str]] = []
        listed: set[tuple[str, str]] = set()
        stems: set[str] = set()
        max_input_bytes = self._settings().jobs.max_input_bytes
        for info in objects:
            name = url.name(info.key)
            if is_folder_marker(info, name) or is_ignored_name(name):
                continue
            listed.add((name, info.etag))
            kind = input_kind(name, self.suffixes)
            if kind is None:
                self._refuse_object(info, name, "unknown suffix (not an input)")
                continue
            stems.add(name[: -(len(kind) + 1)])
            if info.size > max_input_bytes:
                self._refuse_object(
                    info,
                    name,
                    f"{info.size} bytes, over jobs.max_input_bytes ({max_input_bytes}):"
                    " not claimed, it stays in the inbox (split it, or raise the limit)",
                )
                continue
            ready.append((info, kind))
        lone = [info for stem, info in sidecars.items() if stem not in stems]
        waiting: dict[str, str] = {}
        for info in lone:
            name = url.name(info.key)
            listed.add((name, info.etag))
            waiting[name] = LONE_SIDECAR
        # What left the inbox is forgotten: the sets stay as large as the inbox.
        self._refused_objects = {k: v for k, v in self._refused_objects.items() if k in listed}
        self._judged_objects &= listed
        self.waiting = waiting
        return ready, sidecars, lone

    async def run_once(self) -> int:
        """One pass: settle the claims a fault cut short, list, claim what is ready.
        A store fault ends the pass (the stage pauses and shows it)."""
        if self.paused:
            return 0
        url = self.bucket.url
        claimed = 0
        failed = False
        try:
            for claim in await self.store.open_inbox_claims():
                try:
                    claimed += await self._settle(claim)
                except OSError as exc:
                    if local_cause(exc) is not None:
                        raise
                    failed = True
                    self._one_failed(url.name(claim.inbox_key), exc)
            ready, sidecars, lone = await self.list_inbox()
            for info, kind in ready:
                name = url.name(info.key)
                stem = name[: -(len(kind) + 1)]
                try:
                    if await self.claim_object(info, kind, sidecars.get(stem)):
                        claimed += 1
                except OSError as exc:
                    if local_cause(exc) is not None:
                        raise  # the store's or this machine's fault: the stage pauses
                    failed = True
                    self._one_failed(name, exc)
            if not failed and self.problem is not None and self.problem.startswith("cannot claim"):
                self._resolved()
            for info in lone:
                key = (url.name(info.key), info.etag)
                if key not in self._judged_objects:
                    self._judged_objects.add(key)
                    await self._late_object(info)
        finally:
            if claimed:
                self.on_claimed()
        return claimed

    def _one_failed(self, name: str, exc: OSError) -> None:
        """Trouble with one object, neither the store's nor this machine's: its claim
        stays open, settled at the next pass; the others are claimed meanwhile."""
        log.warning("claim_failed", name=shown_name(name), error=str(exc))
        self._trouble(f"cannot claim {shown_name(name)} from the inbox: {exc}")

    # -- claiming ------------------------------------------------------------------------

    async def claim_object(self, info: ObjectInfo, kind: str, sidecar: ObjectInfo | None) -> bool:
        """Claim one listed object (and its sidecar) into a new job; False when it was
        not (it changed or went since the listing, or has a claim under way)."""
        name = self.bucket.url.name(info.key)
        stem = name[: -(len(kind) + 1)]
        options = await self._sidecar_options(sidecar)
        if options is None:
            return False  # the sidecar changed since the listing: look again next pass
        now = self.clock.now()
        claim = InboxClaim(
            job_id=new_job_id(now),
            inbox_key=info.key,
            etag=info.etag,
            size=info.size,
            step=ClaimStep.COPYING,
            created_at=now,
            sidecar_key=sidecar.key if sidecar is not None else None,
            sidecar_etag=sidecar.etag if sidecar is not None else None,
        )
        target = SpoolFolder(self.spool / claim.job_id).input(kind)
        if not await self.store.begin_inbox_claim(
            claim,
            name=outbox_name(stem),
            inbox_name=name,
            spool_path=str(target),
            kind=kind,
            options=options,
        ):
            return False
        failpoint("intake.bucket.after_record", name)
        if not await self._settle(claim):
            return False
        log.info("job_claimed", job_id=claim.job_id, name=shown_name(name), bytes=info.size)
        return True

    async def _sidecar_options(self, sidecar: ObjectInfo | None) -> JobOptions | None:
        """The options of the listed sidecar (none: the defaults); None when it changed
        or went since the listing. A sidecar that cannot be used as written is never
        half-applied: its problem is the option `sidecar_error` (prepare rejects the job)."""
        if sidecar is None:
            return JobOptions()
        shown = shown_name(self.bucket.url.name(sidecar.key))
        try:
            raw = await self.bucket.get_bytes(
                sidecar.key, max_bytes=MAX_SIDECAR_BYTES, if_match=sidecar.etag
            )
        except ObjectChanged:
            return None
        except ObjectTooLarge:
            return JobOptions(sidecar_error=f"{shown}: not a small regular file")
        if raw is None:
            return None
        return sidecar_options(shown, raw)

    async def _settle(self, claim: InboxClaim) -> bool:
        """Take an open claim through its remaining steps; False when it was dropped.
        Every step may be redone: a copy to a job-unique place, a conditional delete."""
        if claim.step == ClaimStep.COPYING:
            if not await self._copy_in(claim):
                await self._drop(claim)
                return False
            failpoint("intake.bucket.after_copy", self.bucket.url.name(claim.inbox_key))
            await self.store.inbox_claim_copied(claim.job_id)
        await self._delete_from_inbox(claim)
        failpoint("intake.bucket.after_delete", self.bucket.url.name(claim.inbox_key))
        await self.store.finish_inbox_claim(claim.job_id)
        return True

    async def _copy_in(self, claim: InboxClaim) -> bool:
        """Copy the claimed version into the job's spool folder (and the spool bucket);
        False when the inbox no longer holds that version and the spool has no whole copy
        of it."""
        job = await self.store.get_job(claim.job_id)
        if job is None or job.state != JobState.CLAIMING:
            return job is not None  # finished meanwhile (never seen), or gone
        target = Path(job.spool_path)
        folder = SpoolFolder.of_input(target)
        if not await asyncio.to_thread(target.exists):
            await asyncio.to_thread(
                self._write_record, folder, claim, job.name, job.kind, job.options
            )
            try:
                # get_file writes to a temp name and renames: the target exists only whole.
                got = await self.bucket.get_file(
                    claim.inbox_key, target, max_bytes=claim.size, if_match=claim.etag
                )
            except (ObjectChanged, ObjectTooLarge):
                got = None
            if got is None:
                return False
        if claim.sidecar_key is not None and claim.sidecar_etag is not None:
            sidecar = folder.sidecar(SIDECAR_SUFFIX)
            if not await asyncio.to_thread(sidecar.exists):
                # The options are in the job's row already; the copy is for the record
                # (and for a job the database lost). Gone or changed: nothing to keep.
                try:
                    await self.bucket.get_file(
                        claim.sidecar_key,
                        sidecar,
                        max_bytes=MAX_SIDECAR_BYTES,
                        if_match=claim.sidecar_etag,
                    )
                except (ObjectChanged, ObjectTooLarge):
                    pass
        if self.spool_bucket is not None:
            await self._copy_to_spool_bucket(claim, target, job.kind)
        return True

    def _write_record(
        self, folder: SpoolFolder, claim: InboxClaim, name: str, kind: str, options: JobOptions
    ) -> None:
        folder.path.mkdir(parents=True, exist_ok=True)
        record = {
            "id": claim.job_id,
            "name": name,
            "inbox_name": self.bucket.url.name(claim.inbox_key),
            "inbox_url": self.bucket.url.url_of(claim.inbox_key),
            "etag": claim.etag,
            "kind": kind,
            "options": to_json(options),
            "created_at": claim.created_at,
        }
        folder.claim_record.write_bytes(orjson.dumps(record))

    async def _copy_to_spool_bucket(self, claim: InboxClaim, target: Path, kind: str) -> None:
        """The claimed input in the spool bucket, as `JOB/input.EXT`, marked with its job
        and the ETag it was copied from: copied inside the store when both folders are in
        one bucket (If-Match the claimed version), else (or when the inbox no longer holds
        that version) written from the spool's whole copy of it."""
        spool = self.spool_bucket
        assert spool is not None
        key = spool.url.key(f"{claim.job_id}/{input_name(kind)}")
        there = await spool.head(key)
        if there is not None and there.metadata.get(META_SOURCE_ETAG) == claim.etag:
            return
        metadata = {META_JOB: claim.job_id, META_SOURCE_ETAG: claim.etag}
        if (spool.url.scheme, spool.name) == (self.bucket.url.scheme, self.bucket.name):
            try:
                copied = await spool.copy(
                    claim.inbox_key,
                    key,
                    if_match=claim.etag,
                    metadata=metadata,
                    size=claim.size,
                )
            except ObjectChanged:
                copied = None
            if copied is not None:
                return
        await spool.put_file(key, target, metadata=metadata)

    async def _delete_from_inbox(self, claim: InboxClaim) -> None:
        name = shown_name(self.bucket.url.name(claim.inbox_key))
        if not await self.bucket.delete(claim.inbox_key, if_match=claim.etag):
            # PUT again after our copy: a new input, claimed as a job of its own.
            log.warning("inbox_object_replaced", name=name, job_id=claim.job_id)
        if claim.sidecar_key is not None and claim.sidecar_etag is not None:
            await self.bucket.delete(claim.sidecar_key, if_match=claim.sidecar_etag)

    async def _drop(self, claim: InboxClaim) -> None:
        """Forget a claim whose object changed or went before it was copied: nothing of it
        is in the spool but (maybe) its folder with the claim record."""
        job = await self.store.get_job(claim.job_id)
        if job is not None:
            folder = SpoolFolder.of_input(job.spool_path).path
            await asyncio.to_thread(shutil.rmtree, folder, True)
        await self.store.drop_inbox_claim(claim.job_id)
        log.info(
            "claim_dropped",
            job_id=claim.job_id,
            name=shown_name(self.bucket.url.name(claim.inbox_key)),
            reason="changed or removed since it was listed",
        )

    # -- recovery ------------------------------------------------------------------------

    async def recover_claims(self) -> None:
        """Settle the claims a crash cut short (redoing at most one step each); a store
        fault leaves the rest to the first pass, which settles them before it lists."""
        opened = await self.store.open_inbox_claims()
        for claim in opened:
            try:
                outcome = "claimed" if await self._settle(claim) else "left_in_inbox"
            except OSError as exc:
                # The store's fault (or one object's trouble): the first pass settles it.
                log.warning("claim_recovery_waits", job_id=claim.job_id, error=str(exc))
                if isinstance(exc, StorageFault):
                    break
                continue
            log.info("claim_recovered", job_id=claim.job_id, outcome=outcome)
        ours = {claim.job_id for claim in opened}
        for job, _ino, _dev in await self.store.claiming_jobs():
            if job.id not in ours:
                # A claim from the folder inbox this daemon had before.
                await self.recover_local_claim(job)

    async def _late_object(self, info: ObjectInfo) -> None:
        """A sidecar whose input is not in the inbox: if it was PUT within LATE_SIDECAR_S
        after a job of its name was claimed, it came late for that job, as in the folder
        inbox (`Intake._late_sidecar`): moved into the job's spool folder when the job is
        not published yet, else left where it is and named in `status`."""
        name = self.bucket.url.name(info.key)
        stem = name[: -len(SIDECAR_SUFFIX)]
        inputs = {stem + suffix for suffix in self.suffixes}
        jobs = await self.store.find_jobs(outbox_name(stem))
        job = next(
            (
                j
                for j in jobs
                if j.inbox_name in inputs
                and j.created_at <= info.modified <= j.created_at + LATE_SIDECAR_S
            ),
            None,
        )
        if job is None:
            return  # the options of an input still to come, as the inbox's rules say
        after_s = round(info.modified - job.created_at, 1)
        late = SpoolFolder.of_input(job.spool_path).late_sidecar
        moved = False
        if job.state != JobState.PUBLISHED and await asyncio.to_thread(late.parent.is_dir):
            try:
                got = await self.bucket.get_file(
                    info.key, late, max_bytes=MAX_SIDECAR_BYTES, if_match=info.etag
                )
            except (ObjectChanged, ObjectTooLarge):
                got = None
            moved = got is not None and await self.bucket.delete(info.key, if_match=info.etag)
        if moved:
            why = (
                f"arrived {after_s} s after {job.inbox_name} was claimed as job {job.id}:"
                f" not applied (the job runs with the options it was claimed with); moved"
                f" to its outbox folder as late.meta.json. Put both again to run with it"
            )
            self.late[name] = why
            while len(self.late) > MAX_LATE_NOTES:
                del self.late[next(iter(self.late))]
        else:
            why = (
                f"arrived {after_s} s after {job.inbox_name} was claimed as job {job.id},"
                f" which is published: not applied to it. It stays, and applies to the next"
                f" {stem}.jsonl or .csv put: remove it if it was meant for job {job.id}"
            )
            self._refuse_object(info, name, why)
        log.warning("sidecar_late", name=shown_name(name), job_id=job.id, after_s=after_s)
