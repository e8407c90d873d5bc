"""The collect stage: download the result files of ended parts, then move each finished
job on to publishing, or plan a follow-up round for its retryable failures.

Collect: every ended part's output and error files are streamed to the spool (temp name,
fsync, rename) and their line counts checked against `request_counts`. Downloads run
side by side, at most `download_concurrency` at once, so one slow (dripping) file never
holds the others; the stage keeps taking newly ended parts while downloads run. A file
that cannot be fetched does not stop its job forever: a 404 or another permanent 4xx
gives it up at once; a retryable failure (5xx, a reset, `DownloadTooSlow`) pauses the
part (`StepPolicy`, `retry_at`) and gives the file up after `max_failures` failures in
a row. A given-up file is recorded in the part's `unavailable` column and its requests
are published with the error code `result_unavailable`; one given up after transient
failures is left on the service (it may still be fetchable), and said so.

Only the file's own failures count toward giving it up. A download that fails because
of this machine (the spool's disk full, read-only or failing: `LocalFault`) waits for
it, shown in `status` as a local fault, however long that takes; so does one that fails
while the provider answers nothing at all (an outage, `BatchApi.answering`). Results
that were paid for are never given up for either.

A job whose parts are all settled moves on to publishing, unless `resubmit_failed` allows
another round and some of its failures are worth paying for again (`retryable_failure`):
their input lines are then written into follow-up parts (`plan_follow_up`), one model
per part and each within the model's limits. Which request got which answer is
`batchd.outbox.merge`'s to say.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import ProviderLimits, Settings
from batchd.failpoints import failpoint
from batchd.faults import Faults, LocalFault, describe, local_cause
from batchd.inputs.lines import DEFAULT_MAX_LINE_BYTES, count_lines, read_line
from batchd.inputs.spool import SpoolFolder
from batchd.logs import get_logger
from batchd.models import Job, JobState, Part, PartPlan, PartState, upload_name
from batchd.outbox.merge import (
    GAVE_UP,
    RESULT_UNAVAILABLE,
    Merged,
    kept_on_service,
    merged,
    numbered,
    output_path,
    sent_bytes,
    terminated,
)
from batchd.pipeline.account import AccountState
from batchd.pipeline.problems import StepPolicy, step_trouble, step_waits
from batchd.provider.api import AccountError, ApiError, BatchApi
from batchd.provider.prices import PriceTable
from batchd.provider.tokens import RequestCounter
from batchd.store import Store

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Fetched:
    """What became of one result file of a part in one attempt."""

    kind: str  # "output" or "error"
    file_id: str
    lines: int | None = None  # downloaded: its non-blank lines
    size: int = 0
    permanent: str | None = None  # can never be fetched (404, another 4xx)
    transient: str | None = None  # failed this time (5xx, a reset, too slow)
    account: str | None = None  # the account is unusable: nobody's part is at fault
    local: OSError | None = None  # this machine's disk failed (full, read-only, I/O)
    broken: BaseException | None = None  # a bug, or another error of the step


@dataclass(frozen=True, slots=True)
class CollectDecision:
    """What to do with a part after an attempt at its files."""

    done: bool  # move it to COLLECTED
    unavailable: dict[str, str]
    note: str | None
    failures: int  # transient failures in a row, this attempt included
    retry_in_s: float | None = None  # not done: try again after this pause


def decide_collect(
    part: Part,
    fetched: list[Fetched],
    policy: StepPolicy,
    expected: dict[str, Any] | None,
    answering: bool = True,
) -> CollectDecision:
    """PURE: collected, collected with files given up, or a pause before another try.
    A transient failure counts toward giving a file up only while the provider is
    `answering` other calls; in an outage it waits, uncounted."""
    notes: list[str] = []
    for item in fetched:
        want = (expected or {}).get("completed" if item.kind == "output" else "failed")
        if item.lines is not None and isinstance(want, int) and want != item.lines:
            notes.append(f"{item.kind} file has {item.lines} lines, request_counts says {want}")
    transient = [f for f in fetched if f.transient is not None]
    if transient and not answering:
        why = "; ".join(f"{f.kind} file {f.file_id}: {f.transient}" for f in transient)
        return CollectDecision(
            False,
            {},
            f"download waits: the provider does not answer ({why})",
            part.attempts,
            policy.pause_s(1),
        )
    failures = part.attempts + 1 if transient else 0
    if transient and failures < policy.max_failures:
        why = "; ".join(f"{f.kind} file {f.file_id}: {f.transient}" for f in transient)
        return CollectDecision(
            False,
            {},
            f"download failed ({failures} of {policy.max_failures}): {why}",
            failures,
            policy.pause_s(failures),
        )
    unavailable: dict[str, str] = {}
    for item in fetched:
        if item.permanent is not None:
            unavailable[item.kind] = item.permanent
            notes.append(
                f"{item.kind} file {item.file_id} cannot be fetched ({item.permanent}):"
                f" its requests are published as {RESULT_UNAVAILABLE}"
            )
        elif item.transient is not None:
            reason = f"{GAVE_UP} {failures} failures: {item.transient}"
            unavailable[item.kind] = reason
            notes.append(
                f"{item.kind} file {item.file_id} not fetched ({reason}); it is left on the"
                " service, where it may still be fetched by hand"
            )
    return CollectDecision(True, unavailable, "; ".join(notes) or None, failures)


class Collector:
    """Downloads the files of ended parts; moves finished jobs on to publishing, or
    (with `resubmit_failed`) plans a follow-up part for their retryable failures.

    One pass (`run_once`) starts a download task per ready part and keeps taking newly
    ended (or newly due) parts every `rescan_s` while any runs; at most
    `download_concurrency` files are fetched at once. Each part's failure is that part's
    note; a finished part's job moves on at once, whatever still downloads."""

    def __init__(
        self,
        store: Store,
        api: BatchApi,
        settings: Callable[[], Settings],
        limits: ProviderLimits,
        *,
        on_ready: Callable[[], None],
        on_follow_up: Callable[[], None],
        stopping: asyncio.Event | None = None,
        rescan_s: float = 1.0,
        account: AccountState | None = None,
        clock: Clock = SYSTEM_CLOCK,
        faults: Faults | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.faults = faults if faults is not None else Faults(clock=clock)
        self.account = account or AccountState(clock=clock)
        self.api = api
        # The settings in force, read where they are used (a reload replaces them):
        # follow-up parts are counted and priced as first parts are, with the table in
        # force. The provider's caps are fixed for the daemon's life.
        self._settings = settings
        self.limits = limits
        self.on_ready = on_ready
        self.on_follow_up = on_follow_up
        self.stopping = stopping
        self.rescan_s = rescan_s
        self._account_trouble = False

    @property
    def provider(self) -> str:
        return self._settings().provider

    @property
    def prices(self) -> PriceTable:
        return self._settings().price_table

    @property
    def resubmit_failed(self) -> int:
        return self._settings().jobs.resubmit_failed

    @property
    def policy(self) -> StepPolicy:
        return StepPolicy.of(self._settings())

    @property
    def download_concurrency(self) -> int:
        return self._settings().api.download_concurrency

    @property
    def max_line_bytes(self) -> int:
        return self._settings().jobs.max_result_line_bytes

    def _stop_requested(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    async def idle_s(self, longest_s: float) -> float:
        """How long the collect stage may sleep: until a part pausing after a failed
        download is due again, at most `longest_s`."""
        due = await self.store.next_retry_at([PartState.ENDED])
        now = self.clock.steady()
        if due is None or due <= now:
            return longest_s
        return min(longest_s, max(0.05, due - now))

    async def run_once(self) -> bool:
        moved = await self.finish_jobs()
        self._account_trouble = False
        slots = asyncio.Semaphore(self.download_concurrency)
        tasks: dict[int, asyncio.Task[bool]] = {}
        # Newly ended parts are looked for at once when nothing downloads, else at most
        # once a rescan; so are jobs whose every part is collected (both queries read
        # many rows, and a job of thousands of parts finishes them one by one).
        scanned_at = looked_at = self.clock.monotonic()
        collected_since = False
        stop = asyncio.ensure_future(self.stopping.wait()) if self.stopping else None
        try:
            while not self._stop_requested():
                now, tick = self.clock.steady(), self.clock.monotonic()
                # While the provider does not answer, no new download is started.
                calling = not self._account_trouble and not self.account.silent
                if calling and (not tasks or tick - scanned_at >= self.rescan_s):
                    scanned_at = tick
                    for part in await self.store.parts_in([PartState.ENDED], 100, ready_at=now):
                        if part.id not in tasks:
                            tasks[part.id] = asyncio.create_task(
                                self._collect_guarded(part, slots),
                                name=f"batchd.collect.{part.job_id}.{part.seq}",
                            )
                if not tasks:
                    pause = await self._short_pause(now)
                    if pause is None or not calling:
                        break
                    if stop is not None:
                        await asyncio.wait({stop}, timeout=pause)
                    else:
                        await asyncio.sleep(pause)
                    continue
                waiting: set[asyncio.Future[Any]] = set(tasks.values())
                if stop is not None:
                    waiting.add(stop)
                await asyncio.wait(
                    waiting, timeout=self.rescan_s, return_when=asyncio.FIRST_COMPLETED
                )
                finished = [part_id for part_id, task in tasks.items() if task.done()]
                for part_id in finished:
                    moved |= tasks.pop(part_id).result()
                    collected_since = True
                if collected_since and (
                    not tasks or self.clock.monotonic() - looked_at >= self.rescan_s
                ):
                    moved |= await self.finish_jobs()
                    looked_at, collected_since = self.clock.monotonic(), False
        finally:
            # A stop (or the stage's cancellation) drops the downloads in flight: each
            # part is still ENDED, and is fetched again from the start next time.
            for task in tasks.values():
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            if stop is not None:
                stop.cancel()
        if collected_since:
            moved |= await self.finish_jobs()
        return moved

    async def _short_pause(self, now: float) -> float | None:
        """The wait until the next part pausing after a failure is due, when that is
        within `rescan_s` (the pass waits for it); None otherwise (the pass ends)."""
        due = await self.store.next_retry_at([PartState.ENDED])
        if due is None or not now < due <= now + self.rescan_s:
            return None
        return due - now

    async def _collect_guarded(self, part: Part, slots: asyncio.Semaphore) -> bool:
        """`collect`; an unexpected error fails this part's step only: a note, a pause
        and, in the end, parking (a fault of this machine only waits)."""
        try:
            return await self.collect(part, slots)
        except Exception as exc:
            if local_cause(exc) is None:
                log.exception("part_step_crashed", job_id=part.job_id, part=part.seq)
            await step_trouble(
                self.store,
                part,
                exc,
                self.policy,
                self.clock.steady(),
                self.faults,
                "downloads of result files",
            )
            return False

    async def collect(self, part: Part, slots: asyncio.Semaphore | None = None) -> bool:
        """Fetch the part's files; True when the part is collected (with or without
        files given up)."""
        slots = slots or asyncio.Semaphore(self.download_concurrency)
        wanted = [
            (kind, file_id)
            for kind, file_id in (("output", part.output_file_id), ("error", part.error_file_id))
            if file_id
        ]
        started = self.clock.monotonic()
        fetched = list(await asyncio.gather(*(self._fetch(part, k, f, slots) for k, f in wanted)))
        for item in fetched:
            if item.broken is not None:
                raise item.broken
        local = next((item.local for item in fetched if item.local is not None), None)
        if local is not None:
            # This machine's trouble (the spool's disk): the part waits, uncounted, for
            # as long as it lasts; what was written whole is kept.
            pause = self.faults.met(local, "downloads of result files")
            note = f"download waits for this machine: {describe(local)}: {local}"
            await step_waits(self.store, part, note, pause, self.clock.steady())
            return False
        for item in fetched:
            if item.lines is not None:
                self.faults.healed_path(output_path(part, item.kind))
        trouble = next((item.account for item in fetched if item.account is not None), None)
        if trouble is not None:
            # The account's trouble, not the part's: submission pauses until it works.
            self.account.failed(trouble)
            self._account_trouble = True
            return False
        answering = not any(f.transient is not None for f in fetched) or (
            await self.api.answering(started)
        )
        decision = decide_collect(part, fetched, self.policy, part.request_counts, answering)
        now = self.clock.steady()
        if not decision.done:
            if not await self.store.update_part(
                part.id,
                PartState.ENDED,
                attempts=decision.failures,
                error=decision.note,
                retry_at=now + (decision.retry_in_s or 0.0),
            ):
                return False  # no longer ENDED (parked meanwhile): nothing to note
            log.warning(
                "download_failed",
                job_id=part.job_id,
                part=part.seq,
                failures=decision.failures,
                retry_in_s=round(decision.retry_in_s or 0.0, 3),
                error=decision.note,
            )
            return False
        for kind, reason in decision.unavailable.items():
            log.error(
                "result_unavailable",
                job_id=part.job_id,
                part=part.seq,
                kind=kind,
                file_id=part.output_file_id if kind == "output" else part.error_file_id,
                reason=reason,
                kept_on_service=kept_on_service(reason),
            )
        # A note of our own from a failed attempt goes; the poller's note stays.
        earlier = part.error if part.attempts == 0 else None
        return await self.store.move_part(
            part.id,
            PartState.ENDED,
            PartState.COLLECTED,
            unavailable=decision.unavailable or None,
            attempts=0,
            retry_at=None,
            error=decision.note or earlier,
        )

    async def _fetch(
        self, part: Part, kind: str, file_id: str, slots: asyncio.Semaphore
    ) -> Fetched:
        dest = output_path(part, kind)
        try:
            # A file fetched whole before (renamed into place after its fsync: an earlier
            # attempt, or a run the daemon was killed in before the part was marked
            # collected) is not fetched again: the service may no longer have it.
            if dest.exists():
                size = dest.stat().st_size
            else:
                async with slots:
                    size = await self.api.download_file(file_id, dest)
                failpoint("download.after_request")
            lines = await asyncio.to_thread(count_lines, dest, self.max_line_bytes)
        except AccountError as err:
            return Fetched(kind, file_id, account=str(err))
        except LocalFault as fault:
            return Fetched(kind, file_id, local=fault.cause)
        except ApiError as err:
            if err.retryable:
                return Fetched(kind, file_id, transient=str(err))
            return Fetched(kind, file_id, permanent=str(err))
        except OSError as exc:
            # Reading back what was written (the line count): the disk's, if local.
            if local_cause(exc) is not None:
                return Fetched(kind, file_id, local=exc)
            return Fetched(kind, file_id, broken=exc)
        except Exception as exc:
            return Fetched(kind, file_id, broken=exc)
        log.info(
            "file_downloaded",
            job_id=part.job_id,
            part=part.seq,
            file_id=file_id,
            kind=kind,
            bytes=size,
            lines=lines,
        )
        return Fetched(kind, file_id, lines=lines, size=size)

    async def finish_jobs(self) -> bool:
        moved = False
        for job in await self.store.settled_jobs():
            # Counted, not read: a job of thousands of parts is read whole only when a
            # follow-up round may be planned for it.
            count, last_round = await self.store.part_rounds(job.id)
            if await self._follow_up(job, (last_round or 0) + 1):
                continue
            if await self.store.move_job(job.id, JobState.RUNNING, JobState.PUBLISHING):
                log.info("job_collected", job_id=job.id, parts=count)
                moved = True
        if moved:
            self.on_ready()
        return moved

    async def _follow_up(self, job: Job, round_: int) -> bool:
        """Resubmit retryable failures as new parts (round `round_`), at most
        `resubmit_failed` rounds."""
        if job.cancel_requested or round_ > self.resubmit_failed:
            return False
        parts = await self.store.parts_of(job.id)
        source = SpoolFolder.of_input(job.spool_path).requests
        planned = await asyncio.to_thread(
            plan_follow_up,
            source,
            parts,
            self.limits,
            round_,
            job.id,
            max_line_bytes=self.max_line_bytes,
            input_bytes=sent_bytes(job),
            counter=RequestCounter(self.provider, self.limits, self.prices),
        )
        if not planned:
            return False
        await self.store.add_parts(job.id, planned, round_)
        log.info(
            "follow_up_planned",
            job_id=job.id,
            round=round_,
            parts=len(planned),
            requests=sum(p.requests for p in planned),
            input_tokens=sum(p.input_tokens or 0 for p in planned),
            cost_max=worst_of(planned),
        )
        self.on_follow_up()
        return True


def plan_follow_up(
    source: Path,
    parts: list[Part],
    limits: ProviderLimits,
    round_: int,
    job_id: str,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    input_bytes: int | None = None,
    counter: RequestCounter | None = None,
) -> list[PartPlan]:
    """Write the input lines of retryable failures into follow-up part files, one model
    per part and each within the model's limits; returns the parts as planned, each
    with its input tokens, output bound and worst-case cost counted as a first part's
    are (`counter`; the shipped prices without one), so that budgets and queue limits
    hold them as they hold first parts."""
    counter = counter or RequestCounter("dashscope", limits)
    wanted = {
        m.number
        for m in merged(source, parts, max_line_bytes=max_line_bytes, input_bytes=input_bytes)
        if retryable_failure(m)
    }
    if not wanted:
        return []
    seq = max(p.seq for p in parts)
    planned: list[PartPlan] = []
    open_parts: dict[str, tuple[PartPlan, Any]] = {}

    def close(model: str) -> None:
        record, fh = open_parts.pop(model)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        planned.append(record)

    for number, raw in numbered(source, max_line_bytes, input_bytes):
        if number not in wanted or raw is None:
            continue
        line = terminated(raw)
        request = read_line(line)
        body = request.get("body") if request is not None else None
        if request is None or not isinstance(body, dict) or "model" not in body:
            continue  # not a request any more (the input changed): nothing to resubmit
        model = str(body["model"])
        current = open_parts.get(model)
        if current is not None and (
            current[0].requests + 1 > limits.requests_limit(model)
            or current[0].bytes + len(line) > limits.bytes_limit(model)
        ):
            close(model)
            current = None
        if current is None:
            seq += 1
            path = SpoolFolder.of_input(source).followup(round_, seq)
            record = PartPlan(
                seq=seq,
                path=str(path),
                first_line=number,
                requests=0,
                bytes=0,
                model=model,
                endpoint=str(request["url"]),
                upload_name=upload_name(job_id, seq),
                input_tokens=0,
                output_tokens_max=0,
                cost_max=0.0,
            )
            current = (record, path.open("wb"))
            open_parts[model] = current
        record = current[0]
        worst = counter.worst(body, record.endpoint)
        current[1].write(line)
        record.requests += 1
        record.bytes += len(line)
        record.input_tokens = (record.input_tokens or 0) + worst.input_tokens
        record.output_tokens_max = (record.output_tokens_max or 0) + worst.output_tokens
        record.cost_max = (
            None if worst.cost is None or record.cost_max is None else record.cost_max + worst.cost
        )
    for model in list(open_parts):
        close(model)
    return sorted(planned, key=lambda r: r.seq)


def worst_of(planned: list[PartPlan]) -> float | None:
    """PURE: the worst case of planned parts in all (None: one of them has no price)."""
    costs = [p.cost_max for p in planned]
    return None if any(c is None for c in costs) else sum(c for c in costs if c is not None)


RETRYABLE_NEVER_RUN = frozenset({"batch_expired", "batch_lost", "result_missing"})
_RETRYABLE_WORDS = ("throttl", "internal", "timeout", "unavailable", "overload", "rate_limit")


def retryable_failure(item: Merged) -> bool:
    """PURE: is this failure worth paying for again? Expired, lost or missing requests,
    and service-side errors (429, 5xx, throttling, timeouts) are; bad requests,
    cancellations, rejected batches and results that could not be fetched (the request
    most likely ran, and was billed) are not."""
    if item.ok:
        return False
    if item.code is not None:
        return item.code in RETRYABLE_NEVER_RUN
    answer = item.answer or (read_line(item.line) if item.line is not None else None) or {}
    error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
    code = str((error or {}).get("code") or "")
    if code in RETRYABLE_NEVER_RUN:
        return True
    response = answer.get("response")
    status = response.get("status_code") if isinstance(response, dict) else None
    if isinstance(status, int) and (status in (408, 429) or status >= 500):
        return True
    return any(word in code.lower() for word in _RETRYABLE_WORDS)
