"""Named fail points, for tests that crash the daemon exactly between two steps.

`BATCHD_FAILPOINTS="create.after_request=kill,publish.before_rename=raise"` arms them.
Each item is `NAME=ACTION[:SUBJECT][@N]`:

- ACTION `kill` sends SIGKILL to this process (no clean-up runs, as in a power cut),
  `raise` raises `FailpointError`, `eio` and `enospc` raise `OSError` with that errno
  (a failing disk, a full disk) where the fail point stands for a file step.
- `:SUBJECT` fires only when the subject the code passes (a job's inbox name, say)
  contains SUBJECT: `prepare.before_validate=kill:poison` kills the daemon on
  `poison.jsonl` and on no other input. A fail point reached without a subject never
  fires when a SUBJECT is given.
- `@N` lets the first N-1 matching hits go by and fires from the N-th on:
  `poll.after_request=kill@3` kills at the third poll, to vary the moment of a crash.

Unset, every fail point is a dictionary lookup and nothing else. Each name marks a
window between a remote call (or a file step) and its commit.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

from batchd.errors import BatchdError

NAMES = frozenset(
    {
        "intake.before_rename",
        "intake.after_rename",
        # A claim from a bucket inbox (batchd.pipeline.bucket_intake), after each step.
        "intake.bucket.after_record",
        "intake.bucket.after_copy",
        "intake.bucket.after_delete",
        "prepare.before_validate",
        "upload.before_request",
        "upload.after_request",
        "create.before_request",
        "create.after_request",
        "poll.after_request",
        "download.after_request",
        "publish.write",
        "publish.fsync",
        "publish.before_rename",
        "publish.after_rename",
        # The outbox on a bucket: after each member's PUT, and before summary.json's.
        "publish.after_member",
        "publish.before_summary",
        # A retry's answers merged into its root's folder: written, not yet linked.
        "publish.merged",
        "cleanup.after_request",
        # A part written to the spool bucket (an oss: input), its id not yet recorded.
        "spool.after_write",
    }
)
ACTIONS = frozenset({"kill", "raise", "eio", "enospc"})
_ERRNO = {"eio": errno.EIO, "enospc": errno.ENOSPC}


class FailpointError(BatchdError):
    """A fail point armed with `raise` was reached."""


@dataclass(slots=True)
class _Armed:
    action: str
    subject: str | None
    nth: int
    hits: int = 0


def _parse(spec: str) -> dict[str, _Armed]:
    armed: dict[str, _Armed] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition("=")
        rest, at, count = rest.rpartition("@") if "@" in rest else (rest, "", "")
        action, colon, subject = rest.partition(":")
        if (
            name not in NAMES
            or action not in ACTIONS
            or (colon and not subject)
            or (at and not (count.isdigit() and int(count) >= 1))
        ):
            raise ValueError(f"BATCHD_FAILPOINTS: unknown fail point or action in {item!r}")
        armed[name] = _Armed(action, subject or None, int(count) if at else 1)
    return armed


_armed = _parse(os.environ.get("BATCHD_FAILPOINTS", ""))


def arm(spec: str) -> None:
    """Replace the armed fail points (for in-process tests); `arm("")` disarms all."""
    global _armed
    _armed = _parse(spec)


def failpoint(name: str, subject: str | None = None) -> None:
    """Act as armed for `name`, if armed and `subject` matches; otherwise do nothing."""
    armed = _armed.get(name)
    if armed is None:
        return
    if armed.subject is not None and (subject is None or armed.subject not in subject):
        return
    armed.hits += 1
    if armed.hits < armed.nth:
        return
    if armed.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if armed.action in _ERRNO:
        code = _ERRNO[armed.action]
        raise OSError(code, f"{os.strerror(code)} (fail point {name})")
    raise FailpointError(f"fail point {name} reached")
