"""Faults of this machine, kept apart from the provider's and from any job's.

A local fault is never a remote one. A full disk, a read-only or failing folder, a locked
or full state database, a stepped wall clock: each is this machine's trouble, not the
part's, the batch's or the request's. Work that meets one is paused (a growing pause,
never counted toward parking a part, giving up a file, declaring a batch lost or failing
a request), the fault is shown by `batchd status`, `batchd check` and `/metrics` with
what it is, since when and what it pauses, and it is cleared as soon as that work goes
through again. The daemon never exits for one: it exits (2) only for what a person must
fix before it can start at all (`unusable_folder`).

`local_cause` decides, from an exception, whether it is such a fault; `Faults` is the one
register of those in force, kept by the daemon and read by the operations layer.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.errors import BatchdError, ConfigError
from batchd.logs import get_logger

log = get_logger(__name__)

# Errors of a disk or a folder of this machine: they pass when space is freed, the disk
# is remounted or repaired, a permission put back. ENOENT is not one: a file of batchd's
# that vanished is lost state, which a pause does not bring back.
LOCAL_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EFBIG,
    }
)
# SQLite's primary result codes for a database this machine cannot write just now.
# SQLITE_CORRUPT is not one: a pause does not mend a corrupt file.
SQLITE_LOCAL = {
    5: "the database is locked (another process holds it: a backup, a VACUUM?)",  # BUSY
    6: "the database is locked",  # LOCKED
    7: "out of memory",  # NOMEM
    8: "the database is read-only",  # READONLY
    10: "disk I/O error on the database",  # IOERR
    13: "the database's disk is full",  # FULL
    14: "the database file cannot be opened",  # CANTOPEN
    15: "the database's locking protocol failed",  # PROTOCOL
}
_ERRNO_WORDS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.EIO: "disk I/O error",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EMFILE: "out of file descriptors",
    errno.ENFILE: "out of file descriptors (system-wide)",
    errno.ENOMEM: "out of memory",
    errno.EFBIG: "file too large for the filesystem",
}
# Keys of the register: the folders batchd writes, its database and its clock.
DATABASE = "database"
CLOCK = "clock"
# How long a clock step is shown after it happened (it pauses nothing).
CLOCK_NOTICE_S = 3600.0


class LocalFault(BatchdError):
    """An error of this machine (a disk, a folder) met while doing remote work, such as
    writing a download to the spool: the work waits, the remote side is not at fault."""

    def __init__(self, cause: OSError, path: Path | None = None) -> None:
        if cause.filename is None and path is not None:
            # A failed write names no file: the fault is shown with the one written.
            cause.filename = str(path)
        super().__init__(f"{describe(cause)}: {cause}")
        self.cause = cause


class StorageFault(OSError):
    """The object store holding a folder (batchd.objstore) cannot be used just now: it
    cannot be reached, answers 5xx or throttles, refuses the credentials, or the bucket is
    missing. Like a full disk it is this side's trouble, never the provider's, a part's or
    a request's: the work waits and the fault is shown under its folder's name."""

    def __init__(self, what: str, where: str, detail: str, area: str = "storage") -> None:
        super().__init__(errno.EREMOTEIO, f"{what}: {detail}", where)
        self.what = what
        self.area = area

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 8 and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def local_cause(exc: BaseException) -> OSError | sqlite3.Error | None:
    """PURE: the error of this machine behind `exc` (itself, or what it was raised from
    or while handling: a savepoint that cannot be rolled back because a full disk rolled
    back the whole transaction), or None when it is nobody's but the work's own (a bad
    answer, a bug, a vanished file)."""
    for item in _chain(exc):
        if isinstance(item, LocalFault):
            return item.cause
        if isinstance(item, StorageFault):
            return item
        if isinstance(item, sqlite3.Error):
            code = getattr(item, "sqlite_errorcode", None)
            if isinstance(code, int) and code & 0xFF in SQLITE_LOCAL:
                return item
        elif isinstance(item, OSError) and item.errno in LOCAL_ERRNOS:
            return item
    return None


def describe(cause: OSError | sqlite3.Error) -> str:
    """PURE: what went wrong, in a few words ("disk full", "the database is locked")."""
    if isinstance(cause, sqlite3.Error):
        code = getattr(cause, "sqlite_errorcode", 0)
        return SQLITE_LOCAL.get(int(code or 0) & 0xFF, "database error")
    if isinstance(cause, StorageFault):
        return cause.what
    return _ERRNO_WORDS.get(cause.errno or 0, "disk error")


def unusable_folder(name: str, folder: Path) -> None:
    """Refuse to start (`ConfigError`: exit 2, which systemd does not restart) when
    `folder` cannot be written for a reason a person must fix: read-only, or not ours.
    A full disk is not refused: the daemon starts, shows it, and waits for space."""
    probe = folder / f".batchd-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        probe.unlink(missing_ok=True)
        return
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ConfigError(
                f"the {name} folder {folder} cannot be written ({describe(exc)}: {exc.strerror});"
                f" batchd needs to write there: remount it read-write or give the daemon's user"
                f" write access (paths.{name})"
            ) from None
        return
    os.close(fd)
    probe.unlink(missing_ok=True)


@dataclass(slots=True)
class Fault:
    """One local fault in force."""

    key: str  # what it touches: a folder's name ("spool"), "database" or "clock"
    what: str  # in a few words: "disk full", "the database is locked"
    detail: str  # the error as met, naming the file
    pauses: str  # the work waiting for it
    since: float  # wall time it was first met (a record)
    since_mono: float
    count: int = 1  # times met while in force
    last_mono: float = 0.0


@dataclass(slots=True)
class ClockStep:
    """A step of the wall clock, as the monotonic clock saw it."""

    seconds: float  # + forward, - back
    at: float  # wall time just after it
    at_mono: float


@dataclass(slots=True)
class Faults:
    """The local faults in force, and the steps of the wall clock lately seen."""

    folders: Mapping[str, Path] = field(default_factory=dict)
    clock: Clock = field(default=SYSTEM_CLOCK, repr=False)
    base_s: float = 1.0
    cap_s: float = 60.0
    active: dict[str, Fault] = field(default_factory=dict)
    steps: list[ClockStep] = field(default_factory=list)
    steps_total: int = 0
    met_total: dict[str, int] = field(default_factory=dict)

    def area(self, cause: OSError | sqlite3.Error) -> str:
        """PURE but for the folders: the folder (or the database) an error is about."""
        if isinstance(cause, sqlite3.Error):
            return DATABASE
        if isinstance(cause, StorageFault):
            return cause.area
        named = cause.filename
        if isinstance(named, str | bytes | os.PathLike):
            path = Path(os.fsdecode(named))
            for name, folder in sorted(self.folders.items(), key=lambda kv: -len(str(kv[1]))):
                if path == folder or folder in path.parents:
                    return DATABASE if path.name.startswith("batchd.sqlite3") else name
        return "disk"

    def met(self, cause: OSError | sqlite3.Error, pauses: str, key: str | None = None) -> float:
        """A local fault was met by work that now waits: record it (logged when new)
        and return the pause before that work tries again (growing while it lasts)."""
        key = key or self.area(cause)
        now_mono = self.clock.monotonic()
        detail = str(cause)
        folder = self.folders.get(key)
        if folder is not None and str(folder) not in detail and not isinstance(cause, StorageFault):
            detail = f"{folder}: {detail}"
        fault = self.active.get(key)
        if fault is None:
            fault = Fault(
                key=key,
                what=describe(cause),
                detail=detail,
                pauses=pauses,
                since=self.clock.now(),
                since_mono=now_mono,
                last_mono=now_mono,
            )
            self.active[key] = fault
            log.error("local_fault", key=key, what=fault.what, error=detail, pauses=pauses)
        else:
            fault.count += 1
            fault.what, fault.detail, fault.last_mono = describe(cause), detail, now_mono
            if pauses not in fault.pauses.split(", "):
                fault.pauses = f"{fault.pauses}, {pauses}"
        self.met_total[key] = self.met_total.get(key, 0) + 1
        return float(min(self.cap_s, self.base_s * 2 ** min(fault.count - 1, 30)))

    def healed(self, key: str) -> None:
        """Work that a fault of `key` paused went through: the fault is over."""
        fault = self.active.pop(key, None)
        if fault is not None:
            log.warning(
                "local_fault_cleared",
                key=key,
                what=fault.what,
                after_s=round(self.clock.monotonic() - fault.since_mono, 1),
                met=fault.count,
            )

    def healed_path(self, path: Path) -> None:
        """A write under `path` went through: the fault of its folder is over."""
        if self.active:
            self.healed(self.area(OSError(errno.EIO, "", str(path))))

    def stepped(self, seconds: float) -> None:
        """The wall clock jumped by `seconds` (NTP, an operator): recorded and shown for
        a while. Nothing batchd decides hangs on the wall clock, so nothing waits."""
        step = ClockStep(seconds, self.clock.now(), self.clock.monotonic())
        self.steps = [*self.steps[-9:], step]
        self.steps_total += 1
        log.warning("clock_stepped", step_s=round(seconds, 3))

    def recent_steps(self) -> list[ClockStep]:
        """The clock steps of the last `CLOCK_NOTICE_S` seconds."""
        now = self.clock.monotonic()
        return [s for s in self.steps if now - s.at_mono <= CLOCK_NOTICE_S]

    def pausing(self) -> list[Fault]:
        """The faults in force, oldest first. One not met again for three of its longest
        pauses is over: the work it paused has gone through, or nothing tries any more
        (a job cancelled meanwhile), and nothing waits for it."""
        now = self.clock.monotonic()
        for key, fault in list(self.active.items()):
            if now - fault.last_mono > 3 * self.cap_s:
                self.healed(key)
        return sorted(self.active.values(), key=lambda f: f.since_mono)
