"""The account: one policy for account-level errors, and the stage that probes it.

An account-level error (401 `InvalidApiKey`, `Arrearage`) is nobody's part's fault: every
stage that meets one hands it to `AccountState.failed`, which pauses all submission with
the reason (shown by `batchd status`), and leaves the part it was working on as it was.
While paused, the account stage probes the account with the cheapest call there is (a
list of one batch) every `api.account_probe_s`; once that answers, submission resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batchd.api import ApiError, BatchApi
from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.logs import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class AccountState:
    """Account-level trouble pauses all submission; it is not any job's fault."""

    paused_reason: str | None = None
    paused_at: float | None = None  # wall time
    clock: Clock = field(default=SYSTEM_CLOCK, repr=False, compare=False)

    def failed(self, error: Exception | str) -> None:
        """An account-level error was met: pause (or keep paused) with its reason."""
        reason = str(error)
        if self.paused_reason is None:
            log.error("account_paused", reason=reason)
            self.paused_at = self.clock.now()
        self.paused_reason = reason

    def resume(self) -> None:
        if self.paused_reason is not None:
            after_s = self.clock.now() - (self.paused_at or 0)
            log.info("account_resumed", after_s=round(after_s, 1))
        self.paused_reason = None
        self.paused_at = None


class AccountProbe:
    """The account stage: while the account is paused, try it; resume when it works."""

    def __init__(self, api: BatchApi, account: AccountState, on_resumed: Callable[[], None]):
        self.api = api
        self.account = account
        self.on_resumed = on_resumed

    async def run_once(self) -> bool:
        if self.account.paused_reason is None:
            return False
        try:
            await self.api.list_batches(limit="1")
        except ApiError as err:
            self.account.paused_reason = str(err)
            return False
        self.account.resume()
        self.on_resumed()
        return False
