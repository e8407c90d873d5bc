"""Named fail points, for tests that crash the daemon exactly between two steps.

`BATCHD_FAILPOINTS="create.after_request=kill,publish.before_rename=raise"` arms them:
`kill` sends SIGKILL to this process (no clean-up runs, as in a power cut), `raise`
raises `FailpointError`. Unset, every fail point is a dictionary lookup and nothing else.
Each name marks a window between a remote call (or a file step) and its commit.
"""

from __future__ import annotations

import os
import signal

from batchd.errors import BatchdError

NAMES = frozenset(
    {
        "intake.before_rename",
        "intake.after_rename",
        "upload.before_request",
        "upload.after_request",
        "create.before_request",
        "create.after_request",
        "poll.after_request",
        "download.after_request",
        "publish.before_rename",
        "publish.after_rename",
        "cleanup.after_request",
    }
)


class FailpointError(BatchdError):
    """A fail point armed with `raise` was reached."""


def _parse(spec: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        if name not in NAMES or action not in ("kill", "raise"):
            raise ValueError(f"BATCHD_FAILPOINTS: unknown fail point or action in {item!r}")
        armed[name] = action
    return armed


_armed = _parse(os.environ.get("BATCHD_FAILPOINTS", ""))


def arm(spec: str) -> None:
    """Replace the armed fail points (for in-process tests)."""
    global _armed
    _armed = _parse(spec)


def failpoint(name: str) -> None:
    action = _armed.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FailpointError(f"fail point {name} reached")
