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
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchd.failpoints import failpoint
from batchd.logs import get_logger
from batchd.models import JobState
from batchd.store import Store

log = get_logger(__name__)

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~", ".swp")
SIDECAR_SUFFIXES = (".meta.json",)
MAX_SIDECAR_BYTES = 64 * 1024
SIDECAR_KEYS = frozenset(
    {"completion_window", "ds_name", "ds_description", "model", "system_prompt", "priority"}
)


def is_ignored_name(name: str) -> bool:
    """Names the Maildir convention (and common copy tools) use while a file is written."""
    lower = name.lower()
    return (
        name.startswith((".", "~"))
        or lower.endswith(TEMP_SUFFIXES)
        or "~syncthing~" in lower
        or lower.endswith(SIDECAR_SUFFIXES)
    )


def input_kind(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix.lstrip(".")
    return None


def printable(name: str) -> str:
    """A name safe for a log line: control characters and undecodable bytes escaped."""
    return (
        name.encode("utf-8", "surrogateescape")
        .decode("ascii", "backslashreplace")
        .encode("unicode_escape")
        .decode("ascii")
    )


def new_job_id(now: float) -> str:
    return f"{int(now * 1000):012x}{secrets.token_hex(4)}"


@dataclass(slots=True)
class Seen:
    """What a scan saw of one entry, to tell when it has settled."""

    ino: int
    size: int
    mtime_ns: int
    since: float  # loop time at which this (ino, size, mtime) was first seen


def settled(seen: Seen, st: os.stat_result, now: float, wall_now: float, settle_s: float) -> bool:
    """PURE: unchanged since the last scan for `settle_s`, and not modified for as long."""
    same = (seen.ino, seen.size, seen.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    return same and now - seen.since >= settle_s and wall_now - st.st_mtime >= settle_s


def settles_at(
    seen: Seen, st: os.stat_result, now: float, wall_now: float, settle_s: float
) -> float:
    """PURE: the loop time from which `settled` holds if the entry stays as it is."""
    return max(seen.since + settle_s, now + st.st_mtime + settle_s - wall_now)


class Intake:
    """Finds settled files in the inbox and claims them into the spool."""

    def __init__(
        self,
        store: Store,
        inbox: Path,
        spool: Path,
        *,
        settle_s: float,
        unterminated_settle_s: float,
        suffixes: tuple[str, ...],
        on_claimed: Callable[[], None],
        on_pending: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.spool = spool
        self.settle_s = settle_s
        self.unterminated_settle_s = unterminated_settle_s
        self.suffixes = suffixes
        self.on_claimed = on_claimed
        # Called when an entry seen but not yet settled may have settled: inotify says
        # nothing more about a file at rest, so without it that file waits for a rescan.
        self.on_pending = on_pending
        self.clock = clock
        self.next_due: float | None = None  # loop time the next pending entry may settle
        self._timer: asyncio.TimerHandle | None = None
        self.paused = False
        self._seen: dict[str, Seen] = {}
        self._refused: set[tuple[str, int]] = set()
        self.claimed = 0

    def _refuse_once(self, name: str, ino: int, reason: str) -> None:
        if (name, ino) not in self._refused:
            self._refused.add((name, ino))
            log.warning("inbox_entry_refused", name=printable(name), reason=reason)

    def scan(self) -> list[tuple[str, os.stat_result]]:
        """PURE-ish: one pass over the inbox; returns the entries ready to claim."""
        ready: list[tuple[str, os.stat_result]] = []
        due: list[float] = []
        now, wall_now = self.clock(), time.time()
        present: set[str] = set()
        dir_fd = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        entries = os.scandir(dir_fd)
        try:
            for entry in entries:
                name = entry.name
                if is_ignored_name(name):
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self._refuse_once(name, st.st_ino, _kind_of(st.st_mode))
                    continue
                if input_kind(name, self.suffixes) is None:
                    self._refuse_once(name, st.st_ino, "unknown suffix (not an input)")
                    continue
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
                    continue
                if not settled(seen, st, now, wall_now, self.settle_s):
                    due.append(settles_at(seen, st, now, wall_now, self.settle_s))
                    continue
                # A copy still being written under its final name ends mid-line; give the
                # writer longer before judging the file as it is.
                unterminated = st.st_size > 0 and not _ends_with_newline(dir_fd, name, st)
                if unterminated and not settled(
                    seen, st, now, wall_now, self.unterminated_settle_s
                ):
                    due.append(settles_at(seen, st, now, wall_now, self.unterminated_settle_s))
                    continue
                ready.append((name, st))
        finally:
            entries.close()
            os.close(dir_fd)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        self.next_due = min(due, default=None)
        return ready

    async def run_once(self) -> int:
        if self.paused:
            return 0
        ready = await asyncio.to_thread(self.scan)
        self._look_again_when_due()
        claimed = 0
        for name, st in ready:
            if await self.claim(name, st):
                claimed += 1
        if claimed:
            self.on_claimed()
        return claimed

    def _look_again_when_due(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.on_pending is not None and self.next_due is not None:
            delay = max(0.0, self.next_due - self.clock()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self.on_pending)

    async def claim(self, name: str, st: os.stat_result) -> bool:
        """Move one settled file into the spool and record it, crash-safely."""
        kind = input_kind(name, self.suffixes)
        assert kind is not None
        now = time.time()
        job_id = new_job_id(now)
        job_dir = self.spool / job_id
        target = job_dir / f"input.{kind}"
        stem = name[: -(len(kind) + 1)]
        if not await asyncio.to_thread(self._same_file, name, st):
            return False
        options = await asyncio.to_thread(self._read_sidecar, stem)
        await self.store.insert_job(
            job_id=job_id,
            name=_safe_stem(stem),
            inbox_name=_storable(name),
            inode=st.st_ino,
            dev=st.st_dev,
            spool_path=str(target),
            kind=kind,
            options=options,
            now=now,
        )
        failpoint("intake.before_rename")
        try:
            await asyncio.to_thread(self._move, name, stem, job_dir, target, st)
        except OSError as exc:
            log.warning("claim_failed", name=printable(name), error=str(exc))
            await self.store.delete_job(job_id)
            # Only if empty: whatever a failed rename-back left in it is not ours to delete.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.rmdir, job_dir)
            return False
        failpoint("intake.after_rename")
        await self.store.update_job(job_id, JobState.CLAIMING, state=JobState.CLAIMED)
        self._seen.pop(name, None)
        self.claimed += 1
        log.info("job_claimed", job_id=job_id, name=printable(name), bytes=st.st_size)
        return True

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

    def _read_sidecar(self, stem: str) -> dict[str, Any]:
        for suffix in SIDECAR_SUFFIXES:
            path = self.inbox / f"{stem}{suffix}"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIDECAR_BYTES:
                    log.warning("sidecar_ignored", name=printable(path.name), reason="not small")
                    continue
                raw = os.read(fd, MAX_SIDECAR_BYTES + 1)
            finally:
                os.close(fd)
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                log.warning("sidecar_ignored", name=printable(path.name), reason=str(exc))
                continue
            if not isinstance(data, dict):
                log.warning("sidecar_ignored", name=printable(path.name), reason="not an object")
                continue
            unknown = set(data) - SIDECAR_KEYS
            if unknown:
                log.warning("sidecar_keys_ignored", name=printable(path.name), keys=sorted(unknown))
            return {k: v for k, v in data.items() if k in SIDECAR_KEYS}
        return {}

    def _move(self, name: str, stem: str, job_dir: Path, target: Path, st: os.stat_result) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
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
                        os.rename(f"{stem}{suffix}", job_dir / f"meta{suffix}", src_dir_fd=inbox_fd)
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
                        os.rename(job_dir / f"meta{suffix}", f"{stem}{suffix}", dst_dir_fd=inbox_fd)
                os.rename(target, name, dst_dir_fd=inbox_fd)
                raise
        finally:
            os.close(inbox_fd)
        fsync_dir(job_dir)

    async def recover_claims(self) -> None:
        """Settle claims a crash cut short: finish the rename's record, or forget the row."""
        for job, _ino, _dev in await self.store.claiming_jobs():
            target = Path(job.spool_path)
            if target.exists():
                await self.store.update_job(job.id, JobState.CLAIMING, state=JobState.CLAIMED)
                log.info("claim_recovered", job_id=job.id, outcome="claimed")
            else:
                # The rename never happened: the file is still in the inbox and will be
                # claimed afresh by the next scan.
                await self.store.delete_job(job.id)
                log.info("claim_recovered", job_id=job.id, outcome="left_in_inbox")


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


def _storable(name: str) -> str:
    """The inbox name as valid UTF-8 text (undecodable bytes as `\\xNN`), for records."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _safe_stem(stem: str) -> str:
    """The outbox folder name: the input's stem, made safe for any filesystem and shell:
    no leading `-` or `.`, at most 100 bytes (room for the temp name, `.NAME.tmp-JOB`)."""
    cleaned = "".join(
        c if (c.isalnum() or c in "-_.") and c.isprintable() else "_"
        for c in stem.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    )
    cleaned = cleaned.encode()[:100].decode("utf-8", "ignore").lstrip("-.").rstrip(".")
    return cleaned or "job"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
