"""Status sweeps: follow running batches for the fewest calls.

Each running part has a next-poll time. When few are due, each is retrieved; when many
are, `list` pages (100 batches each, newest first) answer for all of them, so following
1000 running batches costs about 10 list calls per sweep instead of 1000 retrieves.
Paging stops once every due batch was seen or the pages have gone older than the oldest
due batch; any due batch a page did not show is retrieved on its own. A list sweep also
takes the batches coming due within the interval, so that polls stay coalesced.
Every other batch a sweep reads that carries a part's tag but is not the batch that part
follows is an extra (a create a gateway sent again): it is recorded and cancelled at once
(`batchd.pipeline.extras`), at no extra list call.
A batch that looks close to its end (finalizing, all requests done, or ending within the
interval at the rate its request counts moved since the last look) is looked at sooner.

A batch is declared lost only on the service's word: a retrieve that answers 404 (the
batch is not known). Never on a difference of times: a wall clock stepped forward (NTP
fixing a clock that was hours behind) once made a running batch look past its window,
and with `jobs.resubmit_failed` its requests were sent and paid for a second time while
the first batch still ran. A batch the service still calls running past its window and
`poll.lost_margin_s` is followed all the same, with a note saying it is overdue
(`overdue`; it decides nothing). Polls are scheduled on the steady clock.

While the provider answers nothing (`AccountState.silent`), no sweep is made; the
account stage probes it, and the first answer wakes this stage again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.failpoints import failpoint
from batchd.faults import Faults, local_cause
from batchd.logs import get_logger
from batchd.models import Part, PartState, remote_is_terminal
from batchd.pipeline.account import AccountState
from batchd.pipeline.extras import ExtraBatches
from batchd.pipeline.problems import StepPolicy, step_failed, step_trouble
from batchd.provider.api import (
    AccountError,
    ApiError,
    BatchApi,
    ListingIncomplete,
    NotFoundError,
    parse_items,
)
from batchd.provider.limits import CallClass
from batchd.provider.remote import BadAnswer, RemoteBatch
from batchd.store import Store

log = get_logger(__name__)

LIST_PAGE = 100
# The poll stage looks for due parts this many times per poll interval: often enough
# for the sooner looks at batches close to their end, seldom enough that the regular
# polls of many batches fall due together and one list sweep answers for them.
TICKS_PER_INTERVAL = 6
# The most list pages one sweep reads (a minute of the provider's list cap).
MAX_PAGES = 100


def next_poll(now: float, interval_s: float, jitter: float, rng: random.Random) -> float:
    """PURE: about `interval_s` from now, spread by +-jitter so polls do not bunch."""
    return now + interval_s * (1 + rng.uniform(-jitter, jitter))


def expected_end_in(
    counts: dict[str, int] | None,
    now: float,
    before: dict[str, int] | None,
    before_at: float | None,
) -> float | None:
    """PURE: seconds until every request of a batch is done, at the rate seen between
    two observations of its request_counts; None when there is no rate to go by."""
    if not counts or not before or before_at is None or now <= before_at:
        return None
    total = int(counts.get("total") or 0)
    done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
    was = int(before.get("completed") or 0) + int(before.get("failed") or 0)
    if total <= 0 or done <= was:
        return None
    return (total - done) / ((done - was) / (now - before_at))


def overdue(part: Part, now: float, lost_after_s: float) -> float | None:
    """PURE: hours this running batch is past its window and margin, counted on our wall
    clock from the create intent (never the server's timestamps); None when it is not.
    Only a note: a stepped clock can make it wrong, so nothing is decided on it."""
    started = part.intent_at or part.created_remote_at
    if started is None or now - started <= lost_after_s:
        return None
    return (now - started - lost_after_s) / 3600.0


def poll_after(
    status: str | None,
    counts: dict[str, int] | None,
    end_in: float | None,
    interval_s: float,
) -> float:
    """PURE: how long to wait before looking at a running batch again.

    The interval, unless the batch looks close to its end: finalizing, or every request
    done, or the rate of progress says it ends within the interval. Then sooner (at least
    a sixth of the interval apart), so that results are fetched minutes earlier for a
    poll or two more per batch.
    """
    soon = interval_s / 6
    if status == "finalizing":
        return soon
    if counts:
        total = int(counts.get("total") or 0)
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        if total > 0 and done >= total:
            return soon
    if status == "in_progress" and end_in is not None and end_in < interval_s:
        return max(soon, end_in)
    return interval_s


class Poller:
    def __init__(
        self,
        store: Store,
        api: BatchApi,
        account: AccountState,
        *,
        interval_s: float,
        jitter: float,
        list_threshold: int,
        lost_after_s: Callable[[Part], float],
        on_ended: Callable[[], None],
        rng: random.Random | None = None,
        policy: StepPolicy | None = None,
        max_pages: int = MAX_PAGES,
        clock: Clock = SYSTEM_CLOCK,
        extras: ExtraBatches | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.store = store
        self.extras = extras or ExtraBatches(store, api, account, clock)
        self.clock = clock
        self.faults = faults if faults is not None else Faults(clock=clock)
        self.api = api
        self.account = account
        self.interval_s = interval_s
        self.jitter = jitter
        self.list_threshold = list_threshold
        self.lost_after_s = lost_after_s
        self.on_ended = on_ended
        self.rng = rng or random.Random()
        self.policy = policy or StepPolicy()
        self.max_pages = max_pages
        self.can_list = True  # until the provider answers a list call with a permanent error

    async def idle_s(self, longest_s: float) -> float:
        """How long the poll stage may sleep: a tick past the moment the next part is
        due (so that those due about then are polled together), at most `longest_s`
        (new parts wake it sooner)."""
        due_at = await self.store.next_poll_at()
        if due_at is None:
            return longest_s
        tick = self.interval_s / TICKS_PER_INTERVAL
        return min(longest_s, max(0.0, due_at - self.clock.steady()) + tick)

    async def run_once(self) -> bool:
        if self.account.silent:
            return False
        now = self.clock.steady()
        # Counted first (on the index), read once: a sweep reads a wider set than those
        # due now, and their number alone decides whether to sweep.
        due_now = await self.store.count_due_parts(now)
        if not due_now:
            return False
        # A list sweep reads every page of running batches, so it is worth it only when
        # enough are due, and then it answers for all those due within the interval too:
        # polling those a little early keeps the running parts in step, so each interval
        # costs one sweep of about N/100 pages. A few due alone (a batch close to its
        # end) are retrieved one by one.
        running = await self.store.running_count()
        sweep = self.can_list and due_now >= max(
            self.list_threshold, math.ceil(running / LIST_PAGE)
        )
        due = await self.store.due_parts(now + self.interval_s if sweep else now)
        if not due:
            return False
        seen: dict[str, RemoteBatch] = {}
        others: list[RemoteBatch] = []
        unusable: dict[str, str] = {}
        gone: set[str] = set()
        try:
            if sweep:
                seen, others = await self._list_or_not(due)
            for part in due:
                batch_id = part.batch_id or ""
                if batch_id in seen:
                    continue
                try:
                    seen[batch_id] = await self.api.retrieve_batch(batch_id)
                except NotFoundError:
                    gone.add(batch_id)
                except BadAnswer as exc:
                    unusable[batch_id] = str(exc)
        except AccountError as err:
            self.account.failed(err)
            return False
        except ApiError as err:
            log.warning("poll_failed", error=str(err), due=len(due))
        failpoint("poll.after_request")
        ended = 0
        for part in due:
            batch_id = part.batch_id or ""
            try:
                if batch_id in seen:
                    ended += await self._apply(part, seen[batch_id])
                elif batch_id in gone:
                    ended += await self._lost(part, "the service does not know the batch")
                elif batch_id in unusable:
                    await self._unusable(part, now, unusable[batch_id])
                else:
                    # Not answered this sweep (an outage): look again later, not at once.
                    await self.store.update_part(
                        part.id,
                        PartState.RUNNING,
                        next_poll_at=next_poll(now, self.interval_s / 4, self.jitter, self.rng),
                    )
            except Exception as exc:
                # One part's trouble never stops the others' polls.
                if local_cause(exc) is None:
                    log.exception("part_step_crashed", job_id=part.job_id, part=part.seq)
                await step_trouble(
                    self.store, part, exc, self.policy, now, self.faults, "polls of batches"
                )
        if ended:
            self.on_ended()
        try:
            await self.extras.seen(others)
        except Exception:
            # Looking for extras never stops the polls.
            log.exception("extra_batches_check_failed", batches=len(others))
        return True

    async def _unusable(self, part: Part, now: float, why: str) -> None:
        """The service's answer about this batch cannot be used: a note, a later look,
        and the part parked if it keeps happening."""
        if await step_failed(self.store, part, f"unusable answer: {why}", self.policy, now):
            return
        await self.store.update_part(
            part.id,
            PartState.RUNNING,
            next_poll_at=next_poll(now, self.interval_s, self.jitter, self.rng),
        )

    async def _list_or_not(
        self, due: list[Part]
    ) -> tuple[dict[str, RemoteBatch], list[RemoteBatch]]:
        """`_by_list`, unless the provider has no list call: then never again, and the
        due batches are retrieved one by one."""
        try:
            return await self._by_list(due)
        except AccountError:
            raise
        except ApiError as err:
            if err.retryable:
                raise
            log.warning("list_unsupported", error=str(err))
            self.can_list = False
            return {}, []

    async def _by_list(self, due: list[Part]) -> tuple[dict[str, RemoteBatch], list[RemoteBatch]]:
        """The due batches the pages showed, by id, and the other batches they showed."""
        wanted = {p.batch_id for p in due if p.batch_id}
        oldest = min((p.created_remote_at or 0.0) for p in due)
        seen: dict[str, RemoteBatch] = {}
        others: list[RemoteBatch] = []
        # Due batches may be spread over more pages than their number fills (between
        # them sit ended batches and batches not yet due): past that many pages, a page
        # is still read while the last one answered for at least a tenth of a page (a
        # list call is worth ten retrieves under the caps); the rest are retrieved.
        enough = math.ceil(len(wanted) / LIST_PAGE) + 2
        number = 0
        try:
            async for page in self.api.pages(
                CallClass.LIST, "/batches", {"limit": str(LIST_PAGE)}, max_pages=self.max_pages
            ):
                number += 1
                batches = parse_items(page, RemoteBatch.parse)
                found = 0
                for batch in batches:
                    if batch.id in wanted:
                        seen[batch.id] = batch
                        found += 1
                    else:
                        others.append(batch)
                if len(seen) == len(wanted):
                    break
                if number >= enough and found < LIST_PAGE // 10:
                    break
                created = [b.created_at for b in batches if b.created_at is not None]
                if created and min(created) < oldest - 1:
                    break
        except ListingIncomplete as err:
            # A server whose pages never end: what was seen counts, the rest is retrieved.
            log.warning("list_incomplete", error=str(err), seen=len(seen), due=len(wanted))
        return seen, others

    async def _lost(self, part: Part, why: str) -> int:
        """The service says it does not know the batch: it has ended, as lost."""
        if not await self.store.move_part(
            part.id,
            PartState.RUNNING,
            PartState.ENDED,
            ended_at=self.clock.now(),
            remote_status="lost",
            error=f"batch {part.batch_id}: {why}",
        ):
            return 0
        log.error(
            "batch_lost",
            job_id=part.job_id,
            part=part.seq,
            batch_id=part.batch_id,
            last_status=part.remote_status,
            reason=why,
        )
        return 1

    async def _apply(self, part: Part, batch: RemoteBatch) -> int:
        now, wall = self.clock.steady(), self.clock.now()
        fields = batch.part_fields()
        status = batch.status
        notes = "; ".join(batch.notes) or None
        if remote_is_terminal(status):
            if not await self.store.move_part(
                part.id,
                PartState.RUNNING,
                PartState.ENDED,
                ended_at=wall,
                attempts=0,
                retry_at=None,
                **({"error": notes} if notes else {}),
                **fields,
            ):
                return 0
            log.info(
                "batch_ended",
                job_id=part.job_id,
                part=part.seq,
                batch_id=part.batch_id,
                status=status,
                request_counts=batch.request_counts,
            )
            return 1
        late_h = overdue(part, wall, self.lost_after_s(part))
        if late_h is not None:
            late = (
                f"overdue: the service still calls it {status} {late_h:.1f} h past its"
                " completion window and margin; followed until the service ends it"
            )
            notes = f"{notes}; {late}" if notes else late
            if "overdue:" not in (part.error or ""):
                log.warning(
                    "batch_overdue",
                    job_id=part.job_id,
                    part=part.seq,
                    batch_id=part.batch_id,
                    status=status,
                    hours_late=round(late_h, 1),
                )
        if status != part.remote_status:
            log.info(
                "batch_status",
                job_id=part.job_id,
                part=part.seq,
                batch_id=part.batch_id,
                status=status,
                request_counts=batch.request_counts,
            )
        counts = batch.request_counts
        end_in = expected_end_in(counts, now, part.request_counts, part.polled_at)
        wait = poll_after(status, counts, end_in, self.interval_s)
        await self.store.update_part(
            part.id,
            PartState.RUNNING,
            polled_at=now,
            next_poll_at=next_poll(now, wait, self.jitter, self.rng),
            attempts=0,
            retry_at=None,
            **({"error": notes} if notes else {}),
            **{k: v for k, v in fields.items() if v is not None},
        )
        return 0
