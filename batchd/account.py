"""The account: one policy for account-level errors, and the stage that probes it.

An account-level error (401 `InvalidApiKey`, `Arrearage`) is nobody's part's fault: every
stage that meets one hands it to `AccountState.failed`, which pauses all submission with
the reason (shown by `batchd status`), and leaves the part it was working on as it was.
While paused, the account stage probes the account with the cheapest call there is (a
list of one batch) every `api.account_probe_s`; once that answers, submission resumes.

The same stage checks the provider at start-up and whenever no call has been answered
for `api.provider_probe_s`: a wrong key or a dead URL makes the daemon unhealthy within
seconds (`status`, `check`), not at the first file. A provider that does not answer is
`provider_down` (unhealthy, and said as why work waits) until a call is answered again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batchd.api import AccountError, ApiError, BatchApi
from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.logs import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class AccountState:
    """Account-level trouble pauses all submission; it is not any job's fault."""

    paused_reason: str | None = None
    paused_at: float | None = None  # wall time
    # The provider did not answer the last probe (after its retries): why, and since when.
    provider_down: str | None = None
    provider_down_at: float | None = None
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

    def unreachable(self, error: Exception | str) -> None:
        reason = str(error)
        if self.provider_down is None:
            log.error("provider_unreachable", reason=reason)
            self.provider_down_at = self.clock.now()
        self.provider_down = reason

    def reachable(self) -> None:
        if self.provider_down is not None:
            after_s = self.clock.now() - (self.provider_down_at or 0)
            log.info("provider_reachable", after_s=round(after_s, 1))
        self.provider_down = None
        self.provider_down_at = None


class AccountProbe:
    """The account stage: while the account is paused or the provider down, try it;
    when idle for `idle_probe_s` (and at start-up), check that the provider answers."""

    def __init__(
        self,
        api: BatchApi,
        account: AccountState,
        on_resumed: Callable[[], None],
        idle_probe_s: float = 300.0,
    ):
        self.api = api
        self.account = account
        self.on_resumed = on_resumed
        self.idle_probe_s = idle_probe_s

    def due(self) -> bool:
        """PURE but for the clock: is a probe called for now?"""
        if self.account.paused_reason is not None or self.account.provider_down is not None:
            return True
        last = self.api.last_ok_at
        return last is None or self.api.clock.now() - last >= self.idle_probe_s

    async def run_once(self) -> bool:
        if not self.due():
            return False
        try:
            await self.api.list_batches(limit="1")
        except AccountError as err:
            self.account.failed(err)
            return False
        except ApiError as err:
            if self.account.paused_reason is not None:
                self.account.paused_reason = str(err)
            else:
                self.account.unreachable(err)
            return False
        self.account.reachable()
        if self.account.paused_reason is not None:
            self.account.resume()
            self.on_resumed()
        return False
