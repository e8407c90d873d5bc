"""The account: one policy for account-level errors, and the stage that probes it.

An account-level error (401 `InvalidApiKey`, `Arrearage`) is nobody's part's fault: every
stage that meets one hands it to `AccountState.failed`, which pauses all submission with
the reason (shown by `batchd status`), and leaves the part it was working on as it was.
While paused, the account stage probes the account with the cheapest call there is (a
list of one batch) every `api.account_probe_s`; once that answers, submission resumes.

The same stage checks the provider at start-up and whenever no call has been answered
for `api.provider_probe_s`: a wrong key or a dead URL makes the daemon unhealthy within
seconds (`status`, `check`), not at the first file: a probe that fails is
`provider_down` (unhealthy, and said as why work waits) until a probe works again.

A provider that answers nothing at all (the probe, or `api.OUTAGE_AFTER` attempts of any
calls in a row, get no answer: a transport error or a 5xx) is also `silent`: the stages
stop calling it (no part is parked, no file given up for an outage), the probe tries it
after a pause doubling from one second up to `api.account_probe_s`, and the first answer
to any call ends the outage and wakes the stages. A provider that answers, if only with
an error, is not silent: the stages go on, and each error is their step's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.logs import get_logger
from batchd.provider.api import AccountError, ApiError, BatchApi

log = get_logger(__name__)

# The first pause before the provider is probed again once it stopped answering.
OUTAGE_PROBE_FIRST_S = 1.0


@dataclass(slots=True)
class AccountState:
    """Account-level trouble pauses all submission; it is not any job's fault."""

    paused_reason: str | None = None
    paused_at: float | None = None  # wall time
    # The provider did not answer the last probe (after its retries), or answers nothing
    # at all: why, and since when; `silent` in the second case (no call is made).
    provider_down: str | None = None
    provider_down_at: float | None = None
    silent: bool = False
    clock: Clock = field(default=SYSTEM_CLOCK, repr=False, compare=False)
    # Called when the provider stops answering, and when it answers again.
    on_down: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    on_back: Callable[[], None] | None = field(default=None, repr=False, compare=False)

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

    def unreachable(self, error: Exception | str, *, silent: bool = True) -> None:
        """The provider cannot be used (`silent`: it answers nothing at all)."""
        reason = str(error)
        if self.provider_down is None:
            log.error("provider_unreachable", reason=reason, silent=silent)
            self.provider_down_at = self.clock.now()
        self.provider_down = reason
        if silent and not self.silent:
            self.silent = True
            if self.on_down is not None:
                self.on_down()

    def answered(self) -> None:
        """A call got an answer: a silent provider is back (a probe's verdict stays)."""
        if self.silent:
            self.reachable()

    def reachable(self) -> None:
        if self.provider_down is None:
            return
        after_s = self.clock.now() - (self.provider_down_at or 0)
        log.warning("provider_reachable", after_s=round(after_s, 1))
        was_silent = self.silent
        self.provider_down = None
        self.provider_down_at = None
        self.silent = False
        if was_silent and self.on_back is not None:
            self.on_back()


class AccountProbe:
    """The account stage: while the account is paused or the provider down, try it;
    when idle for `idle_probe_s` (and at start-up), check that the provider answers."""

    def __init__(
        self,
        api: BatchApi,
        account: AccountState,
        settings: Callable[[], Settings],
        on_resumed: Callable[[], None],
    ):
        self.api = api
        self.account = account
        # The settings in force, read where they are used (a reload replaces them).
        self._settings = settings
        self.on_resumed = on_resumed
        # Probes in a row that found the provider down (the pause doubles with them).
        self.silent_probes = 0

    @property
    def idle_probe_s(self) -> float:
        return self._settings().api.provider_probe_s

    def due(self) -> bool:
        """PURE but for the clock: is a probe called for now?"""
        if self.account.paused_reason is not None or self.account.provider_down is not None:
            return True
        last = self.api.answered_mono
        return last is None or self.api.clock.monotonic() - last >= self.idle_probe_s

    async def idle_s(self, longest_s: float) -> float:
        """The pause before the next probe: while the provider does not answer, one
        second doubling up to `longest_s` (`api.account_probe_s`); else `longest_s`."""
        if not self.account.silent:
            return longest_s
        pause = OUTAGE_PROBE_FIRST_S * 2.0 ** min(max(0, self.silent_probes - 1), 30)
        return min(longest_s, pause)

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
                silent = err.status is None or err.status >= 500
                self.account.unreachable(err, silent=silent)
                self.silent_probes += silent
            return False
        self.silent_probes = 0
        self.account.reachable()
        if self.account.paused_reason is not None:
            self.account.resume()
            self.on_resumed()
        return False
