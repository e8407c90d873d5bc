"""Status sweeps: follow running batches for the fewest calls.

Each running part has a next-poll time. When few are due, each is retrieved; when many
are, `list` pages (100 batches each, newest first) answer for all of them, so following
1000 running batches costs about 10 list calls per sweep instead of 1000 retrieves.
Paging stops once every due batch was seen or the pages have gone older than the oldest
due batch; any due batch a page did not show is retrieved on its own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

from batchd.api import AccountError, ApiError, BatchApi, NotFoundError
from batchd.failpoints import failpoint
from batchd.logs import get_logger
from batchd.models import Part, PartState, remote_is_terminal
from batchd.store import Store
from batchd.submit import AccountState, batch_fields

log = get_logger(__name__)

LIST_PAGE = 100


def window_hours(window: str) -> float:
    """PURE: '24h' -> 24, '14d' -> 336; unknown forms count as the longest window."""
    try:
        number, unit = int(window[:-1]), window[-1]
    except (ValueError, IndexError):
        return 336.0
    return float(number * (24 if unit == "d" else 1))


def next_poll(now: float, interval_s: float, jitter: float, rng: random.Random) -> float:
    """PURE: about `interval_s` from now, spread by +-jitter so polls do not bunch."""
    return now + interval_s * (1 + rng.uniform(-jitter, jitter))


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
    ) -> None:
        self.store = store
        self.api = api
        self.account = account
        self.interval_s = interval_s
        self.jitter = jitter
        self.list_threshold = list_threshold
        self.lost_after_s = lost_after_s
        self.on_ended = on_ended
        self.rng = rng or random.Random()
        self.sweeps = 0

    async def run_once(self) -> bool:
        now = time.time()
        due = await self.store.due_parts(now)
        if not due:
            return False
        self.sweeps += 1
        try:
            seen = await self._by_list(due) if len(due) >= self.list_threshold else {}
            for part in due:
                if part.batch_id in seen:
                    continue
                try:
                    seen[part.batch_id or ""] = await self.api.retrieve_batch(part.batch_id or "")
                except NotFoundError:
                    seen[part.batch_id or ""] = {"status": "lost", "errors": "batch not found"}
        except AccountError as err:
            self.account.pause(str(err))
            return False
        except ApiError as err:
            log.warning("poll_failed", error=str(err), due=len(due))
        failpoint("poll.after_request")
        ended = 0
        for part in due:
            batch = seen.get(part.batch_id or "")
            if batch is not None:
                ended += await self._apply(part, batch)
            else:
                # Not answered this sweep (an outage): look again later, not at once.
                await self.store.update_part(
                    part.id,
                    PartState.RUNNING,
                    next_poll_at=next_poll(now, self.interval_s / 4, self.jitter, self.rng),
                )
        if ended:
            self.on_ended()
        return True

    async def _by_list(self, due: list[Part]) -> dict[str, dict[str, Any]]:
        wanted = {p.batch_id for p in due if p.batch_id}
        oldest = min((p.created_remote_at or 0.0) for p in due)
        seen: dict[str, dict[str, Any]] = {}
        after: str | None = None
        for _ in range(math.ceil(len(wanted) / LIST_PAGE) + 2):
            params = {"limit": str(LIST_PAGE)}
            if after:
                params["after"] = after
            page = await self.api.list_batches(**params)
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for batch in data:
                if batch.get("id") in wanted:
                    seen[str(batch["id"])] = batch
            if len(seen) == len(wanted) or not page.get("has_more") or not data:
                break
            created = [int(b["created_at"]) for b in data if isinstance(b.get("created_at"), int)]
            if created and min(created) < oldest - 1:
                break
            after = str(data[-1].get("id"))
        return seen

    async def _apply(self, part: Part, batch: dict[str, Any]) -> int:
        now = time.time()
        fields = batch_fields(batch)
        status = fields["remote_status"]
        if remote_is_terminal(status):
            await self.store.update_part(
                part.id, PartState.RUNNING, state=PartState.ENDED, ended_at=now, **fields
            )
            log.info(
                "batch_ended",
                job_id=part.job_id,
                part=part.seq,
                batch_id=part.batch_id,
                status=status,
                request_counts=fields["request_counts"],
            )
            return 1
        created = part.created_remote_at or now
        if status == "lost" or now - created > self.lost_after_s(part):
            await self.store.update_part(
                part.id,
                PartState.RUNNING,
                state=PartState.ENDED,
                ended_at=now,
                remote_status="lost",
                error=f"batch {part.batch_id} did not end within its window and margin",
            )
            log.error(
                "batch_lost",
                job_id=part.job_id,
                part=part.seq,
                batch_id=part.batch_id,
                last_status=part.remote_status,
            )
            return 1
        if status != part.remote_status:
            log.info(
                "batch_status",
                job_id=part.job_id,
                part=part.seq,
                batch_id=part.batch_id,
                status=status,
                request_counts=fields["request_counts"],
            )
        await self.store.update_part(
            part.id,
            PartState.RUNNING,
            next_poll_at=next_poll(now, self.interval_s, self.jitter, self.rng),
            **{k: v for k, v in fields.items() if v is not None},
        )
        return 0
