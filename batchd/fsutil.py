"""Crash-safe file steps shared by every stage: one atomic write, one fsync of each kind.

A file that must never be seen half-written is written under a hidden temporary name in
the same folder (a name the inbox ignores), fsynced, renamed over its final name, and
the folder fsynced: after a crash the name holds either the old content or the new,
never a mix, and the rename itself is durable. `atomic_output` is that, around a block
that writes the file; `write_atomic` writes bytes; `commit_temp` ends a temp file
written piecemeal (a download) the same way.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def temp_name(path: Path) -> Path:
    """The hidden temporary name a file is written under before it takes `path`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file's content durable (a filesystem that cannot fsync it says EINVAL)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def commit_temp(fh: IO[bytes], tmp: Path, path: Path, *, fsync: bool = True) -> None:
    """Close the temp file `fh` (written at `tmp`) and give it its name `path`; with
    `fsync`, its content and the rename are durable when this returns."""
    with fh:
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[IO[bytes]]:
    """Write `path` through a hidden temporary file beside it, renamed into place only
    when the block finishes without an error; readers never see a partial file."""
    target = Path(path)
    tmp = temp_name(target)
    fh = open(tmp, "wb")  # noqa: SIM115 (closed by commit_temp, or below)
    try:
        yield fh
        commit_temp(fh, tmp, target, fsync=fsync)
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old content or the new one."""
    with atomic_output(path) as fh:
        fh.write(data)


def open_for_writing(fd: int) -> bool | None:
    """Whether any process holds the file of `fd` (opened read-only) open for writing:
    True, False, or None where the system cannot tell (a file of another user without
    CAP_LEASE, a filesystem without leases).

    Asked with a read lease (fcntl F_SETLEASE F_RDLCK), which Linux refuses with EAGAIN
    while the file is open for writing anywhere, and released at once. Hazard: a writer
    that opens the file in the microseconds the lease is held waits for its release, and
    the kernel signals the lease holder; the signal is set to SIGURG, which is ignored
    by default (SIGIO, the kernel's default, would end the process)."""
    import fcntl
    import signal

    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        return None  # EACCES (not ours, no CAP_LEASE), EINVAL (no leases here), ...
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False
