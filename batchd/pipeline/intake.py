"""Inbox watching and claiming, by the Maildir rules.

A user drops a file into `inbox/`. batchd ignores temp and hidden names, refuses anything
that is not a plain regular file with one link (never following a symlink, never opening
a FIFO or device in a way that blocks), waits until the file is closed and settled, then
claims it: a committed job row (CLAIMING, with the file's inode), a rename into the spool
on the same filesystem, and a second commit (CLAIMED). A crash between the two commits is
settled by `recover_claims`: the row's inode says where the file is.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.documents import JobOptions, decode_options, to_json
from batchd.failpoints import failpoint
from batchd.faults import StorageFault
from batchd.fsutil import fsync_dir, open_for_writing
from batchd.inputs.inbox import SIDECAR_SUFFIX, SIDECAR_SUFFIXES, is_ignored_name
from batchd.inputs.spool import CLAIM_RECORD, INPUT_KINDS, LATE_SIDECAR, RESULT_KINDS, SpoolFolder
from batchd.inputs.verdict import read_sidecar, sidecar_options
from batchd.logs import get_logger
from batchd.models import Job, JobState, input_kind
from batchd.outbox.bucket import BucketOutbox
from batchd.outbox.folder import Outbox
from batchd.store import Store

if TYPE_CHECKING:
    from batchd.objstore.bucket import Bucket

log = get_logger(__name__)

# Why an input in the inbox is not claimed yet (`batchd status`).
SETTLING = "being written: claimed once its size and time stay still for intake.settle_s"
UNTERMINATED = (
    "no newline after its last line: waits intake.unterminated_settle_s for the rest,"
    " then is judged as it is"
)
NO_SIDECAR_YET = (
    "no NAME.meta.json beside it: waits intake.settle_s more for a sidecar that may follow"
)
OPEN_FOR_WRITING = "open for writing by a process: claimed once it is closed and settled"
LONE_SIDECAR = (
    "a sidecar without its data file: it is the options of the next NAME.jsonl or NAME.csv dropped"
)
# A sidecar that arrives this long after a job of its name was claimed, or sooner, came
# late for that job: it is never applied, to it or to a later file, and is reported.
LATE_SIDECAR_S = 60.0
# The latest notes about late sidecars `batchd status` shows.
MAX_LATE_NOTES = 50


def shown_name(name: str) -> str:
    """A name safe for a log line: control characters and undecodable bytes escaped."""
    return (
        name.encode("utf-8", "surrogateescape")
        .decode("ascii", "backslashreplace")
        .encode("unicode_escape")
        .decode("ascii")
    )


def new_job_id(now: float) -> str:
    return f"{int(now * 1000):012x}{secrets.token_hex(4)}"


JOB_ID = re.compile(r"[0-9a-f]{20}", re.ASCII)


@dataclass(slots=True)
class Seen:
    """What a scan saw of one entry, to tell when it has settled."""

    ino: int
    size: int
    mtime_ns: int
    since: float  # loop time at which this (ino, size, mtime) was first seen


# An mtime this far ahead of the wall clock is taken for a clock stepped back, not news.
FUTURE_MTIME_S = 60.0


def settled(seen: Seen, st: os.stat_result, now: float, wall_now: float, settle_s: float) -> bool:
    """PURE: unchanged since the last scan for `settle_s`, and not modified for as long.
    An mtime far ahead of the wall clock (the clock was stepped back since) says nothing:
    the scans' own (monotonic) count decides alone, instead of waiting for the clock to
    catch up, hours maybe."""
    same = (seen.ino, seen.size, seen.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    age = wall_now - st.st_mtime
    return same and now - seen.since >= settle_s and (age >= settle_s or -age > FUTURE_MTIME_S)


def settles_at(
    seen: Seen, st: os.stat_result, now: float, wall_now: float, settle_s: float
) -> float:
    """PURE: the loop time from which `settled` holds if the entry stays as it is."""
    if st.st_mtime - wall_now > FUTURE_MTIME_S:
        return seen.since + settle_s
    return max(seen.since + settle_s, now + st.st_mtime + settle_s - wall_now)


class Intake:
    """Finds settled files in the inbox and claims them into the spool."""

    def __init__(
        self,
        store: Store,
        inbox: Path,
        spool: Path,
        settings: Callable[[], Settings],
        *,
        on_claimed: Callable[[], None],
        on_pending: Callable[[], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.spool = spool
        # The settings in force, read where they are used (a reload replaces them).
        self._settings = settings
        self.on_claimed = on_claimed
        # Called when an entry seen but not yet settled may have settled: inotify says
        # nothing more about a file at rest, so without it that file waits for a rescan.
        self.on_pending = on_pending
        self.clock = clock
        self.next_due: float | None = None  # loop time the next pending entry may settle
        self._timer: asyncio.TimerHandle | None = None
        self.paused = False
        self._seen: dict[str, Seen] = {}
        # Entries refused (logged once), with why; pruned to those still in the inbox.
        self._refused: dict[tuple[str, int], str] = {}
        # Inputs seen but not claimed yet, with why (the last scan's view).
        self.waiting: dict[str, str] = {}
        # Why the inbox cannot be scanned or claimed from just now (EMFILE, EXDEV, ...);
        # None while it works. Shown by `batchd status`, which is then not healthy.
        self.problem: str | None = None
        # Sidecars without their data file, settled, as (name, stat): looked up once each
        # (`_judged`) for a job they came too late for.
        self._lone: list[tuple[str, os.stat_result]] = []
        self._judged: set[tuple[str, int]] = set()
        # The latest late sidecars, with what became of them (`batchd status`).
        self.late: dict[str, str] = {}

    @property
    def settle_s(self) -> float:
        return self._settings().intake.settle_s

    @property
    def unterminated_settle_s(self) -> float:
        return self._settings().intake.unterminated_settle_s

    @property
    def suffixes(self) -> tuple[str, ...]:
        return self._settings().intake.suffixes

    def _refuse_once(self, name: str, ino: int, reason: str) -> None:
        if (name, ino) not in self._refused:
            self._refused[(name, ino)] = reason
            log.warning("inbox_entry_refused", name=shown_name(name), reason=reason)

    def entries(self) -> tuple[dict[str, str], dict[str, str]]:
        """What `batchd status` shows of the inbox: the inputs waiting to be claimed and
        the entries refused, each with why (names made printable)."""
        waiting = {shown_name(name): why for name, why in self.waiting.items()}
        refused = {shown_name(name): why for (name, _ino), why in self._refused.items()}
        refused.update((shown_name(name), why) for name, why in self.late.items())
        return waiting, refused

    def scan(self) -> list[tuple[str, os.stat_result]]:
        """One pass over the inbox (the shell: it reads the folder and the clock, and
        `settled` decides); returns the entries ready to claim."""
        ready: list[tuple[str, os.stat_result]] = []
        due: list[float] = []
        now, wall_now = self.clock.monotonic(), self.clock.now()
        present: set[str] = set()
        listed: set[tuple[str, int]] = set()
        waiting: dict[str, str] = {}
        dir_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(dir_fd) as entries:
                names = [entry.name for entry in entries]
            # Sidecars by their input's stem: an input waits for one that may follow it.
            sidecars = {
                name[: -len(SIDECAR_SUFFIX)]: name
                for name in names
                if name.endswith(SIDECAR_SUFFIX) and not name.startswith(".")
            }
            stems: set[str] = set()
            for name in names:
                if is_ignored_name(name):
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                listed.add((name, st.st_ino))
                if not stat.S_ISREG(st.st_mode):
                    self._refuse_once(name, st.st_ino, _kind_of(st.st_mode))
                    continue
                kind = input_kind(name, self.suffixes)
                if kind is None:
                    self._refuse_once(name, st.st_ino, "unknown suffix (not an input)")
                    continue
                stem = name[: -(len(kind) + 1)]
                stems.add(stem)
                if st.st_nlink != 1:
                    self._refuse_once(name, st.st_ino, f"hard link ({st.st_nlink} links)")
                    continue
                present.add(name)
                seen = self._seen.get(name)
                if seen is None or (seen.ino, seen.size, seen.mtime_ns) != (
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                ):
                    self._seen[name] = Seen(st.st_ino, st.st_size, st.st_mtime_ns, now)
                    due.append(settles_at(self._seen[name], st, now, wall_now, self.settle_s))
                    waiting[name] = SETTLING
                    continue
                if not settled(seen, st, now, wall_now, self.settle_s):
                    due.append(settles_at(seen, st, now, wall_now, self.settle_s))
                    waiting[name] = SETTLING
                    continue
                # A copy still being written under its final name ends mid-line; give the
                # writer longer before judging the file as it is.
                unterminated = st.st_size > 0 and not _ends_with_newline(dir_fd, name, st)
                if unterminated and not settled(
                    seen, st, now, wall_now, self.unterminated_settle_s
                ):
                    due.append(settles_at(seen, st, now, wall_now, self.unterminated_settle_s))
                    waiting[name] = UNTERMINATED
                    continue
                # A sidecar dropped just after its data file is still its own.
                if stem not in sidecars and not settled(seen, st, now, wall_now, 2 * self.settle_s):
                    due.append(settles_at(seen, st, now, wall_now, 2 * self.settle_s))
                    waiting[name] = NO_SIDECAR_YET
                    continue
                # Settled is a guess; a writer that still holds the file open is a fact.
                if _open_for_writing(dir_fd, name, st):
                    due.append(now + max(self.settle_s, 0.05))
                    waiting[name] = OPEN_FOR_WRITING
                    continue
                ready.append((name, st))
            lone: list[tuple[str, os.stat_result]] = []
            for stem, name in sidecars.items():
                if stem in stems:
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                listed.add((name, st.st_ino))
                if stat.S_ISREG(st.st_mode):
                    waiting[name] = LONE_SIDECAR
                    if wall_now - st.st_mtime >= self.settle_s:
                        lone.append((name, st))
        finally:
            os.close(dir_fd)
        self._lone = lone
        self._judged &= listed
        for gone in set(self._seen) - present:
            del self._seen[gone]
        # What left the inbox is forgotten: the set stays as large as the inbox.
        self._refused = {k: v for k, v in self._refused.items() if k in listed}
        self.waiting = waiting
        self.next_due = min(due, default=None)
        return ready

    async def run_once(self) -> int:
        if self.paused:
            return 0
        try:
            ready = await asyncio.to_thread(self.scan)
        except OSError as exc:
            # Out of file descriptors (EMFILE, ENFILE), an inbox gone or unreadable: the
            # daemon stays up, says so in `status`, and scans again at the next rescan.
            self._trouble(f"cannot scan the inbox: {exc}")
            return 0
        if self.problem is not None and self.problem.startswith("cannot scan"):
            self._resolved()
        self._look_again_when_due()
        claimed = 0
        for name, st in ready:
            try:
                if await self.claim(name, st):
                    claimed += 1
            except OSError as exc:
                self._trouble(f"cannot claim from the inbox: {exc}")
                break
        for name, st in self._lone:
            if (name, st.st_ino) not in self._judged:
                self._judged.add((name, st.st_ino))
                try:
                    await self._late_sidecar(name, st)
                except OSError as exc:
                    log.warning("sidecar_not_moved", name=shown_name(name), error=str(exc))
        if claimed:
            self.on_claimed()
        return claimed

    async def _late_sidecar(self, name: str, st: os.stat_result) -> None:
        """A sidecar whose data file is not in the inbox: if it arrived (its ctime, which
        a copy cannot set) within LATE_SIDECAR_S after a job of its name was claimed, it
        came late for that job. It is never applied to it (the job may be validated or
        sent already) nor left to apply to a later file of that name: it moves into the
        job's spool folder, is published beside its results (`late.meta.json`, with
        summary.json's `late_sidecar`) and named in `batchd status`. When that job is
        published already, it stays, and status says so."""
        stem = name[: -len(SIDECAR_SUFFIX)]
        inputs = {storable_name(stem + suffix) for suffix in self.suffixes}
        jobs = await self.store.find_jobs(outbox_name(stem))
        job = next(
            (
                j
                for j in jobs
                if j.inbox_name in inputs
                and j.created_at <= st.st_ctime <= j.created_at + LATE_SIDECAR_S
            ),
            None,
        )
        if job is None:
            return  # the options of a file still to come, as the inbox's rules say
        after_s = round(st.st_ctime - job.created_at, 1)
        job_dir = SpoolFolder.of_input(job.spool_path).path
        moved = job.state != JobState.PUBLISHED and await asyncio.to_thread(
            self._keep_late, name, st, job_dir
        )
        if moved:
            why = (
                f"arrived {after_s} s after {job.inbox_name} was claimed as job {job.id}:"
                f" not applied (the job runs with the options it was claimed with); moved"
                f" to its outbox folder as {LATE_SIDECAR}. Drop both again to run with it"
            )
        else:
            why = (
                f"arrived {after_s} s after {job.inbox_name} was claimed as job {job.id},"
                f" which is published: not applied to it. It stays, and applies to the next"
                f" {stem}.jsonl or .csv dropped: remove it if it was meant for job {job.id}"
            )
            self._refuse_once(name, st.st_ino, why)
        log.warning("sidecar_late", name=shown_name(name), job_id=job.id, after_s=after_s)
        if moved:
            self.late[name] = why
            while len(self.late) > MAX_LATE_NOTES:
                del self.late[next(iter(self.late))]

    def _keep_late(self, name: str, st: os.stat_result, job_dir: Path) -> bool:
        """Move the late sidecar `name` into `job_dir`; False when that folder is gone
        (the job was published meanwhile) or the entry changed."""
        inbox_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            now = os.stat(name, dir_fd=inbox_fd, follow_symlinks=False)
            if now.st_ino != st.st_ino or not job_dir.is_dir():
                return False
            os.rename(name, SpoolFolder(job_dir).late_sidecar, src_dir_fd=inbox_fd)
            os.fsync(inbox_fd)
        except FileNotFoundError:
            return False
        finally:
            os.close(inbox_fd)
        fsync_dir(job_dir)
        return True

    def _look_again_when_due(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.on_pending is not None and self.next_due is not None:
            delay = max(0.0, self.next_due - self.clock.monotonic()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self.on_pending)

    async def claim(self, name: str, st: os.stat_result) -> bool:
        """Move one settled file into the spool and record it, crash-safely."""
        kind = input_kind(name, self.suffixes)
        assert kind is not None
        now = self.clock.now()
        job_id = new_job_id(now)
        job_dir = self.spool / job_id
        target = SpoolFolder(job_dir).input(kind)
        stem = name[: -(len(kind) + 1)]
        if not await asyncio.to_thread(self._same_file, name, st):
            return False
        options = await asyncio.to_thread(self._read_sidecar, stem, st.st_uid)
        raw_name = name_hex(name)
        await self.store.insert_job(
            job_id=job_id,
            name=outbox_name(stem),
            inbox_name=storable_name(name),
            inbox_name_hex=raw_name,
            inode=st.st_ino,
            dev=st.st_dev,
            spool_path=str(target),
            kind=kind,
            options=options,
            now=now,
        )
        failpoint("intake.before_rename")
        try:
            record = {
                "id": job_id,
                "name": outbox_name(stem),
                "inbox_name": storable_name(name),
                "inbox_name_hex": raw_name,
                "kind": kind,
                "options": to_json(options),
                "created_at": now,
            }
            await asyncio.to_thread(self._move, name, stem, job_dir, target, st, record)
        except OSError as exc:
            log.warning("claim_failed", name=shown_name(name), error=str(exc))
            await self.store.delete_job(job_id)
            # Only if empty: whatever a failed rename-back left in it is not ours to delete.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(SpoolFolder(job_dir).claim_record.unlink, True)
                await asyncio.to_thread(os.rmdir, job_dir)
            if exc.errno in (errno.EXDEV, errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EROFS):
                # Not this file's fault: every claim would fail the same way.
                self._trouble(f"cannot claim from the inbox: {exc}")
            return False
        if self.problem is not None and self.problem.startswith("cannot claim"):
            self._resolved()
        failpoint("intake.after_rename")
        self._seen.pop(name, None)
        if not await self.store.move_job(job_id, JobState.CLAIMING, JobState.CLAIMED):
            return False  # the intake is the claim's one writer: never seen
        log.info("job_claimed", job_id=job_id, name=shown_name(name), bytes=st.st_size)
        return True

    def _trouble(self, problem: str) -> None:
        if problem != self.problem:
            log.error("intake_failing", problem=problem)
        self.problem = problem

    def _resolved(self) -> None:
        log.info("intake_recovered", was=self.problem)
        self.problem = None

    def _same_file(self, name: str, st: os.stat_result) -> bool:
        """Open through the inbox fd without following links or blocking; same inode?"""
        dir_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO, errno.EACCES):
                self._refuse_once(name, st.st_ino, f"cannot open safely: {exc.strerror}")
                return False
            raise
        finally:
            os.close(dir_fd)
        try:
            now = os.fstat(fd)
        finally:
            os.close(fd)
        same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and stat.S_ISREG(now.st_mode)
        if not same:
            self._refuse_once(name, now.st_ino, "replaced between scan and open")
        return same and now.st_nlink == 1

    def _read_sidecar(self, stem: str, owner: int) -> JobOptions:
        """The job's options from NAME.meta.json. A sidecar that cannot be used as written
        (not JSON, not an object, too large, an unknown key such as a misspelt `modle`,
        a bad value), or that another user than the input's `owner` wrote (root and
        batchd excepted), is never half-applied: its problem is kept as the option
        `sidecar_error`, and the prepare stage rejects the job with it, so the owner
        hears of it instead of paying for a run with the defaults (batchd.inputs.verdict)."""
        for suffix in SIDECAR_SUFFIXES:
            path = self.inbox / f"{stem}{suffix}"
            options = read_sidecar(path, shown_name(path.name), owner=owner)
            if options is not None:
                return options
        return JobOptions()

    def _move(
        self,
        name: str,
        stem: str,
        job_dir: Path,
        target: Path,
        st: os.stat_result,
        record: dict[str, Any],
    ) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        folder = SpoolFolder(job_dir)
        # What the database knows of the claim, kept beside the input: should the
        # database be lost, start-up re-creates the job from its spool folder. Not
        # fsynced on its own (a claim would cost one flush more); the folder's fsync
        # below makes the entry durable, and a torn record only costs the job its name.
        folder.claim_record.write_bytes(orjson.dumps(record))
        inbox_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.rename(name, target, src_dir_fd=inbox_fd)
            moved = os.stat(target, follow_symlinks=False)
            if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
                # Swapped between our open and the rename: put it back and refuse.
                os.rename(target, name, dst_dir_fd=inbox_fd)
                raise OSError(errno.ESTALE, "entry replaced during claim")
            try:
                for suffix in SIDECAR_SUFFIXES:
                    try:
                        os.rename(f"{stem}{suffix}", folder.sidecar(suffix), src_dir_fd=inbox_fd)
                    except OSError as exc:
                        # No such sidecar (a name too long for one cannot exist either).
                        if exc.errno not in (errno.ENOENT, errno.ENAMETOOLONG):
                            raise
                os.fsync(inbox_fd)
            except OSError:
                # The caller forgets this claim: the input must go back where the user
                # left it, or it would sit in the spool with no job to own it.
                for suffix in SIDECAR_SUFFIXES:
                    with contextlib.suppress(OSError):
                        os.rename(folder.sidecar(suffix), f"{stem}{suffix}", dst_dir_fd=inbox_fd)
                os.rename(target, name, dst_dir_fd=inbox_fd)
                raise
        finally:
            os.close(inbox_fd)
        fsync_dir(job_dir)

    async def recover_orphans(self, outbox: Path, bucket: Bucket | None = None) -> list[str]:
        """Spool folders the database does not know (it was lost, or rolled back): each
        one with an input becomes a job again, whose parts look for their remote files
        and batches before sending anything (`Submitter.settle_adopted`); one already
        published (in `outbox`, or in the outbox's `bucket`: a folder with its
        summary.json) is cleared away. Returns what an operator must be told."""
        orphans = await asyncio.to_thread(orphan_folders, self.spool, await self.store.job_ids())
        if not orphans:
            return []
        if bucket is not None:
            try:
                published = await bucket_published_ids(bucket)
            except StorageFault as exc:
                # Which of them were published cannot be told: adopting one that was
                # would publish it twice, so all wait for the next start.
                log.error("state_lost_unchecked", error=str(exc), orphans=len(orphans))
                return [
                    f"{len(orphans)} spool folder(s) unknown to the database were left alone:"
                    f" the outbox's bucket could not be listed ({exc}); restart once it"
                    " answers"
                ]
        else:
            published = await asyncio.to_thread(published_job_ids, outbox)
        now = self.clock.now()
        adopted: list[str] = []
        empty: list[str] = []
        for folder in orphans:
            job_id = folder.name
            if job_id in published:
                # Published before the loss: only its spool folder was left to remove.
                await asyncio.to_thread(shutil.rmtree, folder, True)
                log.warning("spool_leftover_removed", job_id=job_id)
                continue
            record = await asyncio.to_thread(read_claim_record, folder)
            spool = SpoolFolder(folder)
            kind = str(record.get("kind") or "")
            if kind not in INPUT_KINDS or not spool.input(kind).is_file():
                kind = next((k for k in INPUT_KINDS if spool.input(k).is_file()), "")
            if not kind:
                if await asyncio.to_thread(remove_cut_claim, folder):
                    # A claim cut before its rename (the input is still in the inbox, or
                    # was never moved): nothing was lost, nothing is left to do.
                    log.info("cut_claim_removed", job_id=job_id)
                else:
                    empty.append(job_id)
                continue
            # Result files fetched before the loss may belong to batches the re-planned
            # parts do not find again: fetched afresh, never taken for theirs.
            for kind_of_result in RESULT_KINDS:
                for stale in spool.results(kind_of_result):
                    stale.unlink(missing_ok=True)
            options = _recorded_options(record.get("options"))
            if options is None:
                options = await asyncio.to_thread(self._read_options, folder)
            name = record.get("name")
            await self.store.insert_job(
                job_id=job_id,
                # The record is a file anyone could have edited: its name is made safe again.
                name=outbox_name(name) if isinstance(name, str) and name else f"recovered-{job_id}",
                inbox_name=str(record.get("inbox_name") or spool.input(kind).name),
                inbox_name_hex=_hex_or_none(record.get("inbox_name_hex")),
                inode=0,
                dev=0,
                spool_path=str(spool.input(kind)),
                kind=kind,
                options=options,
                now=float(record.get("created_at") or now),
                state=JobState.CLAIMED,
                recovered_at=now,
                error="re-created from its spool folder: the database had lost it",
            )
            adopted.append(job_id)
        notes: list[str] = []
        if adopted:
            notes.append(
                f"the database did not know {len(adopted)} claimed job(s) in the spool (state"
                f" lost?): re-created, their remote files and batches looked for before"
                f" anything is sent: {', '.join(adopted[:10])}"
            )
        if empty:
            notes.append(
                f"{len(empty)} spool folder(s) unknown to the database hold no input; left"
                f" alone: {', '.join(empty[:10])}"
            )
        log.error("state_lost", adopted=adopted, empty=empty)
        return notes

    def _read_options(self, folder: Path) -> JobOptions:
        try:
            raw = SpoolFolder(folder).sidecar(".meta.json").read_bytes()
        except OSError:
            return JobOptions()
        return sidecar_options(SpoolFolder(folder).sidecar(".meta.json").name, raw)

    async def recover_claims(self) -> None:
        """Settle claims a crash cut short: finish the rename's record, or forget the row."""
        for job, _ino, _dev in await self.store.claiming_jobs():
            await self.recover_local_claim(job)

    async def recover_local_claim(self, job: Job) -> None:
        """Settle one claim from the inbox folder that a crash cut short."""
        target = Path(job.spool_path)
        if target.exists():
            if await self.store.move_job(job.id, JobState.CLAIMING, JobState.CLAIMED):
                log.info("claim_recovered", job_id=job.id, outcome="claimed")
        else:
            # The rename never happened: the file is still in the inbox and will be
            # claimed afresh by the next scan.
            await self.store.delete_job(job.id)
            await asyncio.to_thread(remove_cut_claim, SpoolFolder.of_input(target).path)
            log.info("claim_recovered", job_id=job.id, outcome="left_in_inbox")


def remove_cut_claim(folder: Path) -> bool:
    """Remove the spool folder of a claim cut before its rename, if it holds nothing but
    (at most) its claim record; True when it is gone. Anything else in it is kept."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return True
    if set(names) - {CLAIM_RECORD}:
        return False
    with contextlib.suppress(FileNotFoundError):
        SpoolFolder(folder).claim_record.unlink()
    try:
        os.rmdir(folder)
    except OSError:
        return False
    return True


def published_job_ids(outbox: Path) -> set[str]:
    """The job ids of every folder published in the outbox (from their summary.json)."""
    return {job_id for _, job_id in Outbox(outbox).published()}


async def bucket_published_ids(bucket: Bucket) -> set[str]:
    """The job ids of every folder published in an outbox on a bucket (each
    `NAME/summary.json`)."""
    return {job_id async for _, job_id in BucketOutbox(bucket).published()}


def orphan_folders(spool: Path, known: set[str]) -> list[Path]:
    """Spool folders named like a job that the database does not know."""
    found: list[Path] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(spool) as entries:
        for entry in entries:
            if (
                JOB_ID.fullmatch(entry.name)
                and entry.name not in known
                and entry.is_dir(follow_symlinks=False)
            ):
                found.append(Path(entry.path))
    return sorted(found)


def read_claim_record(folder: Path) -> dict[str, Any]:
    """The claim's record kept in a spool folder, or {} when it is missing or torn."""
    try:
        record = orjson.loads(SpoolFolder(folder).claim_record.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _hex_or_none(value: Any) -> str | None:
    """A claim record's hex field when it is hex; None when missing or torn."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return bytes.fromhex(value).hex()
    except ValueError:
        return None


def _ends_with_newline(dir_fd: int, name: str, st: os.stat_result) -> bool:
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return False
    try:
        # The name may have been swapped since the scan's stat (a FIFO, a hard link to
        # another file): read nothing but the inode that was scanned.
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            return False
        return os.pread(fd, 1, st.st_size - 1) == b"\n"
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_for_writing(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """Is the scanned inode `name` open for writing by any process (where Linux can
    tell: `fsutil.open_for_writing`; where it cannot, settling alone decides)?"""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return False  # gone or swapped: the claim's own checks see to it
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        return open_for_writing(fd) is True
    finally:
        os.close(fd)


def _kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink (never followed)"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


# -- names ---------------------------------------------------------------------------
#
# A job's name is its outbox folder's: the input's stem as given wherever that is safe
# for a folder. Spaces, punctuation and every script are kept (`评论 数据.jsonl` is
# published as `outbox/评论 数据`); only what cannot or must not be in a folder name is
# replaced, each character by one `_` (see `outbox_name`). Shell metacharacters are kept:
# a name with spaces needs quoting in a shell anyway. Windows' own rules (`CON`, a
# trailing dot, `:`) are not applied: the outbox is a Linux folder.

# The longest file name of Linux filesystems (NAME_MAX: ext4, xfs, btrfs, tmpfs), less
# what the publish temp folder adds (`.NAME.tmp-JOBID`) and room for a collision's `-N`.
NAME_MAX_BYTES = 255
TEMP_NAME_EXTRA_BYTES = len(".") + len(".tmp-") + 20  # a job id: 20 hex digits
COPY_SUFFIX_BYTES = len("-999999")
MAX_NAME_BYTES = NAME_MAX_BYTES - TEMP_NAME_EXTRA_BYTES - COPY_SUFFIX_BYTES  # 222
# Characters that reorder how the text around them is displayed (bidi embeddings,
# overrides and isolates): a name holding them can show as another name ("Trojan Source").
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Unicode categories replaced: control characters (C0 with NUL, DEL, C1), surrogates (an
# undecodable byte of a non-UTF-8 name arrives as one), line and paragraph separators.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def outbox_name(stem: str) -> str:
    """PURE: the outbox folder name (and the job's name) for an input's stem.

    The stem is kept as given, except:
    - `/`, control characters (NUL, tab, newline, ESC, DEL, C1), line and paragraph
      separators, bidi controls (U+202A-U+202E, U+2066-U+2069) and each byte that is
      not UTF-8 become `_`, one for one;
    - a leading `.` (a hidden folder, `.`, `..`) or `-` (read as an option) becomes `_`;
    - a name over MAX_NAME_BYTES (222) UTF-8 bytes is cut there, on a character's
      boundary, so that `NAME-N` and the temp folder `.NAME-N.tmp-JOBID` fit in 255.
    Spaces (leading and trailing too), non-ASCII letters, punctuation and emoji are kept;
    the name is not normalised (NFC/NFD). Applied twice it changes nothing more.
    """
    name = "".join(
        "_" if c == "/" or c in BIDI_CONTROLS or unicodedata.category(c) in UNSAFE_CATEGORIES else c
        for c in stem
    )
    if name.startswith((".", "-")):
        name = "_" + name[1:]
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        name = raw[:MAX_NAME_BYTES].decode("utf-8", "ignore")
    return name or "job"


def storable_name(name: str) -> str:
    """PURE: a file name as it came from the filesystem (undecodable bytes as lone
    surrogates), as valid UTF-8 text for records: exact when the name is UTF-8, else
    each undecodable byte written `\\xNN` (`name_hex` keeps the bytes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_hex(name: str) -> str | None:
    """PURE: a file name's bytes in hex when they are not UTF-8 (then `storable_name`
    cannot tell `\\xNN` written in the name from an undecodable byte); None when they
    are (the name as text is then exact)."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.hex()
    return None


def _recorded_options(recorded: object) -> JobOptions | None:
    """PURE: the options a spool record holds (a file anyone could have edited), or None
    when it holds none that decode."""
    if not isinstance(recorded, dict):
        return None
    try:
        return decode_options(recorded)
    except msgspec.ValidationError:
        return None
