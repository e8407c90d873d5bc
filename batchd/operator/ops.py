"""The operations layer: the one place where operator requests are decided and answered.

`batchd status`, `jobs`, `show`, `cancel`, `retry`, `pause`, `resume`, `drain`, the
metrics and the event stream all come here, over the control socket (batchd/operator/control.py,
which knows this layer only through the `Operator` interface of batchd/operator/protocol.py) or
from tests, which need no socket. The layer reads the store and the daemon's live state
(the intake's pause, the account, the API client's call counts) and acts through the
store and by waking stages; it never reaches into a stage's insides.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from batchd import __version__
from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.documents import encode_options, given, to_json
from batchd.faults import Faults, StorageFault
from batchd.fsutil import fsync_dir, write_atomic
from batchd.inputs.lines import DEFAULT_MAX_LINE_BYTES, input_line_of, iter_lines, read_line
from batchd.logs import get_logger, log_health, shown_url
from batchd.models import (
    JOB_ACTIVE,
    JOB_TERMINAL,
    PART_QUEUED,
    Held,
    Job,
    JobState,
    Outcome,
    Part,
    PartState,
    batch_created_at,
)
from batchd.operator.protocol import (
    ActionResponse,
    AmbiguousJob,
    ClockStepInfo,
    Event,
    ExtraBatchInfo,
    JobInfo,
    JobList,
    LocalFaultInfo,
    Notification,
    OssInputsInfo,
    PartInfo,
    Problem,
    Reload,
    RunningCaps,
    Spend,
    SpendPeriod,
    StatusResponse,
)
from batchd.outbox import failures, remerge
from batchd.outbox.bucket import BucketOutbox, folder_url, read_cap
from batchd.outbox.folder import ERRORS, INPUT_REQUESTS, MERGED, MERGED_SUMMARY, OutboxFolder
from batchd.outbox.merge import RESULT_UNAVAILABLE
from batchd.outbox.writer import PUBLISH_FAILED, extra_note
from batchd.pipeline import holds
from batchd.pipeline.account import AccountState
from batchd.pipeline.budget import BudgetCaps, periods
from batchd.pipeline.intake import Intake
from batchd.pipeline.notify import shown_error
from batchd.pipeline.ossinputs import OssReport
from batchd.pipeline.stages import Stage, Wake
from batchd.provider.api import BatchApi
from batchd.provider.prices import oldest_as_of, stale_note
from batchd.provider.tokens import tokenizer_summary
from batchd.store import Store
from batchd.store.lifecycle import part_allows
from batchd.systemd import status_text

if TYPE_CHECKING:
    from batchd.objstore.bucket import Bucket

log = get_logger(__name__)

# The flag (Store.flag) that keeps an intake pause across restarts.
INTAKE_PAUSED = "intake_paused"


class Operations:
    """Operator requests, answered from the store and the daemon's live state."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        *,
        intake: Intake,
        account: AccountState,
        api: BatchApi,
        wake: Wake,
        stopping: asyncio.Event,
        stages_alive: Callable[[], bool],
        started_at: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        inputs_kept: Callable[[], Mapping[str, str]] = dict,
        faults: Faults | None = None,
        outbox_bucket: Bucket | None = None,
        oss_inputs: Callable[[], OssReport | None] = lambda: None,
    ) -> None:
        # The outbox's bucket, when it is one: published folders are read through it.
        self.outbox_bucket = BucketOutbox(outbox_bucket) if outbox_bucket is not None else None
        # How parts reach the service with the spool on a bucket (None: a local spool).
        self.oss_inputs = oss_inputs
        # Published jobs whose input stayed in the spool (bytes reached it afterwards).
        self.inputs_kept = inputs_kept
        self.store = store
        self.clock = clock
        # This machine's faults in force (a full disk, a locked database, a clock step).
        self.faults = faults if faults is not None else store.faults
        self._settings = settings
        self.intake = intake
        self.account = account
        self.api = api
        self.wake = wake
        self.stopping = stopping
        self.stages_alive = stages_alive
        self.started_at = clock.now() if started_at is None else started_at
        self._started_mono = clock.monotonic()
        self.draining = False
        # Said loudly in the log and in `status` when start-up finds state lost (spool
        # folders the database does not know); kept until the daemon restarts.
        self.state_lost: list[str] = []
        # The last SIGHUP reload (set by the daemon), for `status`.
        self.last_reload: Reload | None = None
        # One retry decision at a time: two at once would both write a retry input.
        self._retry_lock = asyncio.Lock()

    @property
    def settings(self) -> Settings:
        """The settings in force (a reload may have replaced them)."""
        return self._settings()

    # -- intake and the daemon's life ------------------------------------------------------

    async def pause(self) -> ActionResponse:
        """Take no new files until resumed, across restarts too."""
        await self.store.set_flag(INTAKE_PAUSED, "1")
        self.intake.paused = True
        log.info("intake_paused")
        return ActionResponse(ok=True, message="intake paused (until `batchd resume`)")

    async def resume(self) -> ActionResponse:
        """Take files again; a drain asked for is called off (the daemon keeps running)."""
        await self.store.set_flag(INTAKE_PAUSED, None)
        self.intake.paused = False
        message = "intake resumed"
        if self.draining:
            self.draining = False
            message += "; the drain is called off, the daemon keeps running"
            log.info("drain_cancelled")
        self.wake[Stage.INTAKE].set()
        log.info("intake_resumed")
        return ActionResponse(ok=True, message=message)

    async def restore(self) -> None:
        """At start-up: an intake paused before the restart stays paused."""
        if await self.store.flag(INTAKE_PAUSED):
            self.intake.paused = True
            log.warning("intake_still_paused", hint="`batchd resume` takes files again")

    async def drain(self) -> ActionResponse:
        """Finish what runs, take nothing new, then exit."""
        if not self.draining:
            log.info("drain_requested")
        self.draining = True
        self.wake[Stage.DRAIN].set()
        return ActionResponse(ok=True, message="draining: no new files; exit when idle")

    async def drain_watch(self) -> bool:
        """The drain stage: once draining and nothing is left to do, stop the daemon."""
        if not self.draining:
            return False
        # A held job (budget, duplicate) waits for money or an operator, not for the
        # daemon: it is taken up again after the restart, as it was.
        if not await self.store.any_jobs(JOB_ACTIVE, held=False):
            log.info("drained")
            self.stopping.set()
        return False

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call `listener` with each committed change of a job or part; returns the call
        that stops it."""
        self.store.listeners.append(listener)
        return lambda: self.store.listeners.remove(listener)

    async def request_cancel(self, job_id: str) -> Job | None:
        """Ask for a job to be cancelled: parts not created are dropped, running batches
        are cancelled on the service; what finished before is still published. A job
        not yet planned (held as a duplicate, or being validated) is published cancelled
        with nothing sent. Any hold ends."""
        job = await self.store.get_job(job_id)
        if job is None or job.state in JOB_TERMINAL or job.cancel_requested:
            return job
        # Held before it was planned, nothing else would move it: published at once, every
        # request not sent.
        if (
            job.state == JobState.CLAIMED
            and job.held is not None
            and await self.store.move_job(
                job_id,
                JobState.CLAIMED,
                JobState.PUBLISHING,
                cancel_requested=True,
                error=f"cancelled while held ({job.held}): nothing was sent",
            )
        ):
            log.info("job_cancel_requested", job_id=job_id)
            await holds.release(self.store, job_id, job.held, by="cancel")
            self.wake[Stage.PUBLISH].set()
            return await self.store.get_job(job_id)
        await self.store.update_job(job_id, cancel_requested=True)
        log.info("job_cancel_requested", job_id=job_id)
        if job.held is not None:
            await holds.release(self.store, job_id, job.held, by="cancel")
        self.wake[Stage.PREPARE].set()
        self.wake[Stage.SUBMIT].set()
        return await self.store.get_job(job_id)

    @property
    def healthy(self) -> bool:
        """Every stage alive, the account usable, the provider answering, no fault of this
        machine in force, the inbox readable and the log lines getting out (a daemon
        nobody can follow is not left to run unseen)."""
        return (
            self.stages_alive()
            and self.account.paused_reason is None
            and self.account.provider_down is None
            and not self.faults.pausing()
            and self.intake.problem is None
            and log_health().broken is None
        )

    def local_faults(self) -> list[LocalFaultInfo]:
        """This machine's faults in force: what, since when, what they pause."""
        return [
            LocalFaultInfo(
                key=f.key,
                what=f.what,
                detail=f.detail,
                pauses=f.pauses,
                since=f.since,
                met=f.count,
            )
            for f in self.faults.pausing()
        ]

    async def problems(self, limit: int = 20) -> tuple[int, list[Problem]]:
        """What cannot proceed without help or keeps failing, most pressing first."""
        found: list[Problem] = []
        for fault in self.faults.pausing():
            found.append(
                Problem(
                    kind="local_fault",
                    note=f"{fault.key}: {fault.what} ({fault.detail}); pauses {fault.pauses}",
                    since=fault.since,
                )
            )
        if self.account.provider_down is not None:
            found.append(
                Problem(
                    kind="provider_down",
                    note=f"the provider does not answer: {self.account.provider_down}",
                    since=self.account.provider_down_at,
                )
            )
        for step in self.faults.recent_steps():
            found.append(
                Problem(
                    kind="clock_stepped",
                    note=f"the wall clock stepped {step.seconds:+.1f} s; nothing batchd"
                    " decides hangs on it, so nothing waits",
                    since=step.at,
                )
            )
        if self.intake.problem is not None:
            found.append(Problem(kind="intake", note=self.intake.problem))
        logs = log_health()
        if logs.problem is not None:
            found.append(Problem(kind="logging", note=logs.problem, since=logs.since))
        for note in self.state_lost:
            found.append(Problem(kind="state_lost", note=note))
        kept = self.inputs_kept()
        for job_id, note in kept.items():
            found.append(Problem(kind="input_grew", job_id=job_id, note=note))
        count, parts = await self.store.problem_parts(limit)
        for part in parts:
            found.append(
                Problem(
                    kind="part_parked" if part.state == PartState.PARKED else "part_failing",
                    job_id=part.job_id,
                    part=part.seq,
                    note=part.error or "",
                    since=part.retry_at,
                )
            )
        failing = await self.store.jobs_noted(JobState.PUBLISHING, PUBLISH_FAILED, limit)
        for job in failing:
            found.append(
                Problem(
                    kind="publish_failing",
                    job_id=job.id,
                    note=job.error or "",
                    since=job.updated_at,
                )
            )
        parked_jobs = await self.store.count_jobs([JobState.PARKED])
        for job in await self.store.jobs([JobState.PARKED], limit=limit):
            found.append(
                Problem(
                    kind="job_parked", job_id=job.id, note=job.error or "", since=job.updated_at
                )
            )
        total = (
            count
            + len(failing)
            + parked_jobs
            + len(self.faults.pausing())
            + (self.account.provider_down is not None)
            + len(self.faults.recent_steps())
            + (self.intake.problem is not None)
            + (logs.problem is not None)
            + len(self.state_lost)
            + len(kept)
        )
        return total, found[:limit]

    async def status(self) -> StatusResponse:
        table = self.settings.price_table
        oldest = oldest_as_of(table, self.settings.provider)
        today = datetime.datetime.fromtimestamp(self.clock.now(), datetime.UTC).date()
        total, by_model = await self.store.slot_holders()
        problem_count, problems = await self.problems()
        parked = any(p.kind == "part_parked" for p in problems)
        inbox_waiting, inbox_refused = self.intake.entries()
        return StatusResponse(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(self.clock.monotonic() - self._started_mono, 3),
            provider=self.settings.profile.name,
            base_url=self.settings.profile.base_url,
            root=str(self.settings.paths.root),
            inbox=str(self.settings.paths.location("inbox")),
            outbox=str(self.settings.paths.location("outbox")),
            input_suffixes=list(self.settings.intake.suffixes),
            intake_paused=self.intake.paused,
            draining=self.draining,
            account_paused=self.account.paused_reason,
            provider_down=self.account.provider_down,
            jobs_by_state=await self.store.job_counts(),
            jobs_by_outcome=await self.store.outcome_counts(),
            parts_by_state=await self.store.part_counts(),
            caps=RunningCaps(
                running_batches=total,
                running_cap=self.settings.profile.limits.running_batches,
                running_by_model=by_model,
            ),
            bucket_levels=self.api.limiter.levels(),
            api_calls={str(k): v for k, v in self.api.limiter.sent.items() if v},
            throttled={str(k): v for k, v in self.api.limiter.throttled.items()},
            last_errors={str(k): v for k, v in self.api.last_error.items()},
            last_error_at={str(k): v for k, v in self.api.last_error_at.items()},
            healthy=self.healthy and not parked and not self.state_lost,
            problems=problems,
            problem_count=problem_count,
            log_lines_dropped=log_health().lines_dropped,
            waiting=await self._waiting(total),
            inbox_waiting=inbox_waiting,
            inbox_refused=inbox_refused,
            reload=self.last_reload,
            spend=await self.spend(),
            # The first call may load Qwen's vocabulary (a third of a second): off the loop.
            tokenizers=await asyncio.to_thread(tokenizer_summary, self.settings.provider),
            prices_as_of=str(oldest) if oldest else None,
            prices_stale=stale_note(table, self.settings.provider, today),
            local_faults=self.local_faults(),
            clock_steps=[
                ClockStepInfo(seconds=round(s.seconds, 3), at=s.at)
                for s in self.faults.recent_steps()
            ],
            oss_inputs=self.oss_info(),
        )

    def oss_info(self) -> OssInputsInfo | None:
        """How parts reach the service with the spool on a bucket, and what the
        pre-flight of the bucket found (None: a local spool)."""
        report = self.oss_inputs()
        if report is None:
            return None
        checked = report.preflight
        return OssInputsInfo(
            setting=report.setting,
            via=report.via,
            why_upload=report.why_upload,
            bucket_region=checked.region if checked is not None else None,
            checked_at=checked.at if checked is not None else None,
            missing=[str(f) for f in checked.missing] if checked is not None else [],
            notes=report.notes,
        )

    async def spend(self) -> Spend:
        """Spend today and this month per provider, against the budget."""
        settings = self.settings
        caps = BudgetCaps.of(settings)
        when = periods(self.clock.now(), settings.budget.timezone)
        committed, unpriced = await self.store.committed_cost()
        held = len(await self.store.held_jobs(limit=10_000))

        today, month = (
            SpendPeriod(spent={}, cap=caps.daily),
            SpendPeriod(spent={}, cap=caps.monthly),
        )
        for bucket, since in ((today, when.day_start), (month, when.month_start)):
            for (provider, currency), amount in (await self.store.spent_since(since)).items():
                if currency == caps.currency or not currency:
                    bucket.spent[provider] = round(bucket.spent.get(provider, 0.0) + amount, 10)
            if bucket.cap is not None:
                mine = bucket.spent.get(settings.provider, 0.0)
                bucket.left = round(max(0.0, bucket.cap - mine - committed), 10)
        return Spend(
            currency=caps.currency,
            timezone=settings.budget.timezone,
            today=today,
            month=month,
            running_worst_case=round(committed, 10),
            running_unpriced=unpriced,
            held_jobs=held,
        )

    async def _waiting(self, running: int) -> list[str]:
        """Why queued work is not moving just now, in words."""
        why: list[str] = []
        for fault in self.faults.pausing():
            why.append(f"{fault.pauses} wait for this machine: {fault.key}: {fault.what}")
        if self.account.paused_reason:
            why.append(f"account paused: {self.account.paused_reason}")
        if self.account.provider_down:
            why.append(f"the provider does not answer: {self.account.provider_down}")
        cap = self.settings.profile.limits.running_batches
        if running >= cap and await self.store.count_parts_in([PartState.UPLOADED]):
            why.append(f"running cap full ({running} of {cap} batches): parts wait for one to end")
        if self.intake.paused:
            why.append("intake paused: files wait in the inbox until `batchd resume`")
        if self.draining:
            why.append("draining: no new files; the daemon exits once idle")
        for job in await self.store.held_jobs(limit=3):
            why.append(f"job {job.id} ({job.name}) held, {job.held}: {job.held_note}")
        return why

    async def resolve(self, ref: str) -> Job | None:
        """The job `ref` names (JOB_REFERENCE); None when none; `AmbiguousJob` when it
        fits several."""
        found = await self.store.find_jobs(ref)
        if len(found) > 1:
            raise AmbiguousJob(ref, [await self._job_info(j, False) for j in found])
        return found[0] if found else None

    async def job(self, ref: str, *, detail: bool = True) -> JobInfo | None:
        job = await self.resolve(ref)
        if job is None:
            return None
        return await self._job_info(job, detail)

    async def _job_info(
        self, job: Job, detail: bool, retried_by: list[str] | None = None
    ) -> JobInfo:
        """A job as the socket shows it; `retried_by` (its retries' ids) when the caller
        read them for a whole page, else read here."""
        parts = await self.store.parts_of(job.id) if detail else None
        if retried_by is None:
            retried_by = (await self.store.retried_by([job.id])).get(job.id, [])
        retry_of = given(job.options.retry_of)
        left_out = given(job.options.retry_left_out)
        requests = job.report.requests if job.report is not None else None
        completed, failed = job.completed, job.failed
        if job.state != JobState.PUBLISHED and parts is not None:
            completed = sum((p.request_counts or {}).get("completed", 0) for p in parts)
            failed = sum((p.request_counts or {}).get("failed", 0) for p in parts)
        elif job.state != JobState.PUBLISHED:
            # A listing: summed by the store, not by reading every part of every job.
            completed, failed = await self.store.request_totals(job.id)
        return JobInfo(
            id=job.id,
            name=job.name,
            inbox_name=job.inbox_name,
            kind=job.kind,
            state=job.state,
            status=job.outcome,
            requests=requests if isinstance(requests, int) else None,
            completed=completed,
            failed=failed,
            bytes=job.bytes,
            sha256=job.sha256,
            cancel_requested=job.cancel_requested,
            error=job.error,
            outbox=job.outbox_path,
            created_at=job.created_at,
            updated_at=job.updated_at,
            held=job.held,
            held_note=job.held_note,
            held_at=job.held_at,
            hold_ends_by_itself=holds.ends_by_itself(job.held),
            estimate=(
                to_json(job.report.estimate)
                if job.report is not None and job.report.estimate is not msgspec.UNSET
                else None
            ),
            usage=to_json(job.usage) if job.usage is not None else None,
            cost=to_json(job.cost) if job.cost is not None else None,
            parts=[_part_info(p) for p in parts] if parts is not None else None,
            notifications=(
                [
                    Notification(
                        target=shown_url(d.target),
                        event=d.event,
                        state=d.state,
                        attempts=d.attempts,
                        # Notes stored before URLs were masked in them are masked here.
                        last_error=shown_error(d.last_error, d.target) if d.last_error else None,
                        delivered_at=d.delivered_at,
                        next_at=d.next_at if d.state == "pending" else None,
                    )
                    for d in await self.store.deliveries_of(job.id)
                ]
                if detail
                else None
            ),
            report=to_json(job.report) if detail and job.report is not None else None,
            retry_of=retry_of if isinstance(retry_of, str) else None,
            retried_by=retried_by,
            retry_left_out=left_out if isinstance(left_out, dict) else None,
            left_out=await self._left_out_of(job, retried_by) if detail else None,
            merged=await self._merged_of(job) if detail or retried_by else None,
            extra_batches=await self._extras_of(job) if detail else None,
        )

    async def _extras_of(self, job: Job) -> list[ExtraBatchInfo]:
        return [
            ExtraBatchInfo(
                part=e.part_seq,
                batch_id=e.batch_id,
                kept_batch_id=e.kept_batch_id,
                found_by=e.found_by,
                found_at=e.found_at,
                status=e.status,
                request_counts=e.request_counts,
                cancel=str(e.cancel),
                note=extra_note(e),
                error=e.error,
            )
            for e in await self.store.extra_batches_of(job.id)
        ]

    async def _left_out_of(self, job: Job, retried_by: list[str]) -> dict[str, int] | None:
        """The failures of `job` its retries left out and no `--all` retry sent since."""
        if not retried_by or covers_all(job):
            return None
        for child_id in retried_by:
            child = await self.store.get_job(child_id)
            left_out = given(child.options.retry_left_out) if child is not None else None
            if isinstance(left_out, dict) and left_out:
                return left_out
        return None

    async def _merged_of(self, job: Job) -> str | None:
        """The merged results of the retry chain `job` belongs to, if written yet."""
        root = await remerge.chain_root(self.store, job)
        if root is None or not root.outbox_path:
            return None
        url = folder_url(root.outbox_path)
        if url is not None:
            if self.outbox_bucket is None:
                return None
            try:
                found = await self.outbox_bucket.bucket.head(url.key(f"{MERGED}/{MERGED_SUMMARY}"))
            except StorageFault:
                return None
            return f"{url}{MERGED}/" if found is not None else None
        where = Path(root.outbox_path) / MERGED
        return str(where) if await asyncio.to_thread(where.exists) else None

    async def jobs(
        self,
        states: list[str] | None,
        name: str | None,
        limit: int,
        offset: int,
        *,
        outcomes: list[str] | None = None,
        newest_first: bool = True,
        before: str | None = None,
        submit_id: str | None = None,
    ) -> JobList:
        try:
            wanted = [JobState(s) for s in states] if states else None
        except ValueError:
            known = ", ".join(s.value for s in JobState)
            raise ValueError(f"unknown state in {states}; states are: {known}") from None
        try:
            ended = [Outcome(o) for o in outcomes] if outcomes else None
        except ValueError:
            known = ", ".join(o.value for o in Outcome)
            raise ValueError(f"unknown status in {outcomes}; statuses are: {known}") from None
        after: Job | None = None
        if before is not None:
            after = await self.store.get_job(before)
            if after is None:
                raise ValueError(f"before: no job {before}")
        # One more than asked: whether another page follows, without counting again.
        jobs = await self.store.jobs(
            wanted,
            name=name,
            outcomes=ended,
            limit=limit + 1,
            offset=offset,
            newest_first=newest_first,
            before=after,
            submit_id=submit_id,
        )
        page = jobs[:limit]
        retries = await self.store.retried_by([j.id for j in page])
        return JobList(
            jobs=[await self._job_info(j, False, retries.get(j.id, [])) for j in page],
            total=await self.store.count_jobs(wanted, name, ended, submit_id),
            limit=limit,
            offset=offset,
            more=len(jobs) > limit,
        )

    async def cancel(self, ref: str) -> ActionResponse | None:
        job = await self.resolve(ref)
        if job is None:
            return None
        job_id = job.id
        if job.state in JOB_TERMINAL:
            return ActionResponse(
                ok=False,
                message=f"job {job_id} is already {job.state}",
                job=await self._job_info(job, False),
            )
        after = await self.request_cancel(job_id)
        if after is not None and after.state == JobState.PUBLISHING and job.held is not None:
            message = f"cancelled while held ({job.held}): nothing was sent; published as cancelled"
        else:
            message = "cancelling: parts not yet created are dropped, running batches cancelled"
            if job.held is not None:
                message += f"; its hold ({job.held}) ends"
        return ActionResponse(ok=True, message=message, job=await self.job(job_id, detail=False))

    async def _run_duplicate(self, job: Job) -> ActionResponse:
        """An operator lets a job held as a duplicate run (and pay) again."""
        options = msgspec.structs.replace(job.options, allow_duplicate=True)
        if not await self.store.update_job(job.id, JobState.CLAIMED, options=options, prepares=0):
            return ActionResponse(ok=False, message=f"job {job.id} is no longer held")
        await holds.release(self.store, job.id, Held.DUPLICATE, by="retry")
        self.wake[Stage.PREPARE].set()
        return ActionResponse(
            ok=True,
            message="released: it runs although the same input ran before",
            job=await self.job(job.id, detail=False),
        )

    async def retry(
        self, ref: str, *, everything: bool = False, force: bool = False
    ) -> ActionResponse | None:
        """Rerun what failed or never ran: parked jobs are requeued, parked parts resume
        where they stopped, parts that could not be submitted are submitted again, and a
        published job's failed requests become a new input `NAME-retry.jsonl` in the
        inbox (with the job's options and `retry_of`). Only failures worth paying for
        again are sent (`batchd.outbox.failures`); requests the service refused for their
        content or form are left out and counted per code, unless `everything`; requests
        whose results were lost (most likely billed already) are left out unless `force`
        or `everything`. The answer says what the earlier attempt probably cost. Asked
        twice, it answers with what the first did: a script that repeats itself after a
        timeout never pays for the requests twice; asked again with a wider scope after
        a retry that left some out, it sends those (`NAME-retry-force.jsonl`,
        `NAME-retry-all.jsonl`)."""
        async with self._retry_lock:
            job = await self.resolve(ref)
            if job is None:
                return None
            job_id = job.id
            if job.held == Held.DUPLICATE:
                return await self._run_duplicate(job)
            if job.state == JobState.PARKED:
                if not Path(job.spool_path).exists():
                    return ActionResponse(ok=False, message="the parked job's input is gone")
                if not await self.store.move_job(
                    job_id, JobState.PARKED, JobState.CLAIMED, crash_count=0, prepares=0, error=None
                ):
                    return ActionResponse(
                        ok=False,
                        message="the job is no longer parked",
                        job=await self.job(job_id, detail=False),
                    )
                self.wake[Stage.PREPARE].set()
                return ActionResponse(
                    ok=True, message="requeued", job=await self.job(job_id, detail=False)
                )
            if job.state == JobState.RUNNING:
                again = await self._resume_parts(job_id)
                # A hold is no failure: what ends it is said instead.
                held = f"held ({job.held}), not failed: {job.held_note}" if job.held else None
                if not again:
                    return ActionResponse(
                        ok=False,
                        message=f"nothing to retry: {held}"
                        if held
                        else "nothing has failed (yet) in this job",
                        job=await self._job_info(job, False),
                    )
                also = f"; the rest stay {held}" if held else ""
                return ActionResponse(ok=True, message=f"{again} part(s) will be tried again{also}")
            if job.state == JobState.PUBLISHED and job.outcome != "rejected" and job.outbox_path:
                scope = (
                    RetryScope.ALL
                    if everything
                    else RetryScope.FORCE
                    if force
                    else RetryScope.RETRYABLE
                )
                return await self._retry_published(job, scope)
            return ActionResponse(
                ok=False,
                message=f"job is {job.outcome or job.state}: nothing to retry"
                + (" (fix the input and drop it again)" if job.outcome == "rejected" else ""),
            )

    async def _resume_parts(self, job_id: str) -> int:
        """Failed parts are submitted again; parked parts go back to where they stopped."""
        again = 0
        now = self.clock.steady()
        for part in await self.store.parts_of(job_id):
            fields: dict[str, Any] = {}
            if part.state == PartState.FAILED:
                back = PartState.PENDING
            elif part.state == PartState.PARKED and part.parked_from:
                back = PartState(part.parked_from)
                fields["parked_from"] = None
                if part.parked_from == PartState.RUNNING:
                    fields["next_poll_at"] = now
            else:
                continue
            if not part_allows(part.state, back):
                log.warning("part_not_retried", job_id=job_id, part=part.seq, back_to=str(back))
                continue
            # Not taken: a stage moved the part meanwhile (a cancel): it is not retried.
            if await self.store.move_part(
                part.id, part.state, back, attempts=0, retry_at=None, error=None, **fields
            ):
                again += 1
        for stage in (Stage.SUBMIT, Stage.POLL, Stage.COLLECT):
            self.wake[stage].set()
        return again

    async def _retry_published(self, job: Job, scope: RetryScope) -> ActionResponse:
        url = folder_url(job.outbox_path or "")
        if url is None:
            return await self._retry_from(job, scope, OutboxFolder(Path(job.outbox_path or "")))
        if self.outbox_bucket is None:
            return ActionResponse(
                ok=False, message=f"the job's folder {url} is on a bucket the outbox no longer is"
            )
        # The earlier folder on the bucket: its input's copy and error.jsonl, read here.
        local = self.settings.paths.folder("outbox") / f".retry-{job.id}"
        try:
            folder = await self.outbox_bucket.fetch(
                url,
                [INPUT_REQUESTS, ERRORS],
                local,
                max_bytes=read_cap(self.settings.jobs.max_input_bytes),
            )
            return await self._retry_from(job, scope, folder)
        except StorageFault as exc:
            return ActionResponse(ok=False, message=f"the outbox's bucket cannot be read: {exc}")
        finally:
            await asyncio.to_thread(shutil.rmtree, local, True)

    async def _retry_from(
        self, job: Job, scope: RetryScope, folder: OutboxFolder
    ) -> ActionResponse:
        """`retry` of a published job whose folder (or its local copy) is `folder`."""
        inbox = self.settings.paths.folder("inbox")
        max_line = self.settings.jobs.max_result_line_bytes
        cost = earlier_cost(job)
        spent = cost_note(cost)
        already = covered_scope(job)
        if already is not None:
            await asyncio.to_thread(finish_retry_input, job.retried_as or "", inbox)
            done = f"already resubmitted as {job.retried_as}"
            if already == RetryScope.ALL:
                return ActionResponse(
                    ok=True, message=f"{done} (retry that job to go again){spent}", cost=cost
                )
            if RANK[scope] <= RANK[already]:
                left_out = await asyncio.to_thread(failures_left_out, folder, max_line, already)
                return ActionResponse(
                    ok=True,
                    message=f"{done} (retry that job to go again){spent}{left_out_note(left_out)}",
                    left_out=left_out or None,
                    cost=cost,
                )
        planned = await asyncio.to_thread(
            write_retry_input, job, folder, inbox, max_line, scope, already
        )
        note = left_out_note(planned.left_out)
        if planned.name is None:
            if already is not None:
                return ActionResponse(
                    ok=True,
                    message=f"already resubmitted as {job.retried_as}, and no failure"
                    f" `{scope}` sends was left out of it{spent}{note}",
                    left_out=planned.left_out or None,
                    cost=cost,
                )
            return ActionResponse(
                ok=False,
                message=f"no failed requests worth retrying, or input not kept{spent}{note}",
                left_out=planned.left_out or None,
                cost=cost,
            )
        # Committed before the file appears under its name: a crash in between leaves a
        # hidden temp file that the next `retry` finishes, never a second input.
        await self.store.update_job(job.id, JobState.PUBLISHED, retried_as=planned.name)
        await asyncio.to_thread(finish_retry_input, planned.name, inbox)
        self.wake[Stage.INTAKE].set()
        return ActionResponse(
            ok=True,
            message=f"failed requests resubmitted as {planned.name}"
            f" ({planned.requests} requests){spent}{note}",
            left_out=planned.left_out or None,
            cost=cost,
        )

    async def status_line(self) -> str:
        """The one line systemd shows in `systemctl status` (STATUS=)."""
        jobs = await self.store.job_counts()
        parts = await self.store.part_counts()
        running, _ = await self.store.slot_holders()
        return status_text(
            jobs_active=sum(n for s, n in jobs.items() if s in JOB_ACTIVE),
            parts_queued=sum(parts.get(s, 0) for s in PART_QUEUED),
            running=running,
            running_cap=self.settings.profile.limits.running_batches,
            intake_paused=self.intake.paused,
            draining=self.draining,
            account_paused=self.account.paused_reason,
        )

    async def metrics(self) -> dict[str, Any]:
        totals = await self.store.totals()
        total, _ = await self.store.slot_holders()
        oldest = totals["oldest_active_at"]
        return {
            "jobs_by_state": await self.store.job_counts(),
            "jobs_by_outcome": await self.store.outcome_counts(),
            "requests": {"completed": totals["completed"], "failed": totals["failed"]},
            "api_calls": {str(k): v for k, v in self.api.limiter.sent.items() if v},
            "throttled": {str(k): v for k, v in self.api.limiter.throttled.items()},
            "bucket_levels": self.api.limiter.levels(),
            "running": total,
            "running_cap": self.settings.profile.limits.running_batches,
            "queue_age_s": max(0.0, self.clock.now() - oldest) if oldest else 0.0,
            "tokens": {
                "prompt": totals["prompt_tokens"],
                "completion": totals["completion_tokens"],
            },
            "cost_by_model": await self.store.cost_by_model(),
            "spend": await self.spend(),
            "log_lines_dropped": log_health().lines_dropped,
            "extra_batches": await self.store.extra_batch_counts(),
            "local_faults": self.local_faults(),
            "local_faults_met": dict(self.faults.met_total),
            "clock_steps": self.faults.steps_total,
            "provider_down": self.account.provider_down is not None,
        }

    async def describe_event(self, raw: dict[str, Any]) -> Event | None:
        if raw.get("type") == "job":
            event = event_from(raw, str(raw.get("id")), None)
            job = await self.store.get_job(str(raw.get("id")))
            if job is not None:
                event.name = job.name
                requests = job.report.requests if job.report is not None else None
                event.requests = requests if isinstance(requests, int) else None
            return event
        if raw.get("type") == "part":
            part = await self.store.get_part(int(raw.get("id") or 0))
            if part is None:
                return None
            event = event_from(raw, part.job_id, part.seq)
            event.requests = part.requests
            if event.request_counts is None:
                event.request_counts = part.request_counts
            return event
        return None


def _part_info(p: Part) -> PartInfo:
    return PartInfo(
        seq=p.seq,
        state=p.state,
        requests=p.requests,
        bytes=p.bytes,
        model=p.model,
        endpoint=p.endpoint,
        first_line=p.first_line,
        remote_file_id=p.remote_file_id,
        batch_id=p.batch_id,
        remote_status=p.remote_status,
        request_counts=p.request_counts,
        output_file_id=p.output_file_id,
        error_file_id=p.error_file_id,
        # The provider's own time only (not ours, which stands in for a missing one).
        created_remote_at=(
            p.provider_times.get("created_at")
            if p.provider_times is not None
            else p.created_remote_at
        ),
        ended_at=p.ended_at,
        error=p.error,
        attempts=p.attempts,
        retry_at=p.retry_at,
        parked_from=p.parked_from,
        unavailable=p.unavailable,
        batch_created_at=batch_created_at(p),
        provider_times=p.provider_times,
    )


class RetryScope(StrEnum):
    """Which failures of a published job a retry input holds; each takes what the one
    before it takes, and more."""

    RETRYABLE = "retryable"  # those worth paying for again (`failures.classify`)
    FORCE = "force"  # and those most likely billed already (`batchd retry JOB --force`)
    ALL = "all"  # every failure (`batchd retry JOB --all`)


RANK = {RetryScope.RETRYABLE: 0, RetryScope.FORCE: 1, RetryScope.ALL: 2}
# A retry input is named after its scope: what tells, for a retry asked again, what the
# first one sent (`covered_scope`).
SUFFIXES = {
    RetryScope.RETRYABLE: "-retry",
    RetryScope.FORCE: "-retry-force",
    RetryScope.ALL: "-retry-all",
}


def takes(scope: RetryScope, verdict: failures.Verdict) -> bool:
    """PURE: does a retry of `scope` send this failure?"""
    if scope == RetryScope.ALL:
        return True
    if scope == RetryScope.FORCE:
        return verdict.retry or verdict.category in failures.BILLED
    return verdict.retry


def covered_scope(job: Job) -> RetryScope | None:
    """PURE: the scope of the job's retry (`retried_as`), from its name; None when the
    job was never retried."""
    if job.retried_as is None:
        return None
    for scope in (RetryScope.ALL, RetryScope.FORCE):
        if job.retried_as.startswith(f"{job.name}{SUFFIXES[scope]}"):
            return scope
    return RetryScope.RETRYABLE


def covers_all(job: Job) -> bool:
    """PURE: did the job's retry (`retried_as`) send every failure, refused ones too?"""
    return covered_scope(job) == RetryScope.ALL


def earlier_cost(job: Job) -> dict[str, Any] | None:
    """PURE: what a published job cost, as its summary.json's `cost` says: `amount`,
    `currency`, and what of it was `estimated` (amount and requests)."""
    cost = job.cost
    if cost is None:
        return None
    return {
        "amount": cost.amount,
        "known_amount": cost.known_amount,
        "currency": cost.currency,
        "estimated_amount": cost.estimated.amount,
        "estimated_requests": cost.estimated.requests,
        "result_unavailable": cost.estimated.reasons.get(RESULT_UNAVAILABLE),
    }


def cost_note(cost: dict[str, Any] | None) -> str:
    """PURE: the words for what the earlier attempt probably cost."""
    if cost is None:
        return ""
    currency = cost.get("currency") or ""
    amount = cost.get("amount")
    if not isinstance(amount, int | float):
        known = cost.get("known_amount")
        shown = (
            f"at least {_money(known, currency)}" if isinstance(known, int | float) else "unknown"
        )
        text = f"; the earlier attempt cost {shown} (a model has no price)"
    else:
        text = f"; the earlier attempt probably cost {_money(amount, currency)}"
    estimated = cost.get("estimated_requests")
    part = cost.get("estimated_amount")
    if isinstance(estimated, int) and estimated and isinstance(part, int | float):
        text += (
            f", {_money(part, currency)} of it charged at worst case for {estimated}"
            " request(s) whose usage could not be read or whose results were lost"
        )
    return text


def _money(amount: float, currency: str) -> str:
    """An amount in words: six decimals, or three digits where six decimals show 0."""
    shown = f"{amount:.6f}" if amount >= 1e-6 or amount == 0 else f"{amount:.3g}"
    return f"{shown} {currency}".strip()


def left_out_note(left_out: dict[str, int]) -> str:
    """PURE: the words for the failures a retry left out, per code: refused ones (they
    would fail, and cost, again: `--all` sends them) apart from those most likely billed
    already (their results were lost: `--force` sends them)."""
    if not left_out:
        return ""
    billed = {code: n for code, n in left_out.items() if code in BILLED_CODES}
    refused = {code: n for code, n in left_out.items() if code not in BILLED_CODES}
    text = ""
    if refused:
        count = sum(refused.values())
        codes = ", ".join(f"{code} {n}" for code, n in sorted(refused.items()))
        text += (
            f"; {count} left out ({codes}): refused for their content or form (or a code"
            " batchd does not know), they would fail, and cost, again (`--all` sends them too)"
        )
    if billed:
        count = sum(billed.values())
        text += (
            f"; {count} left out ({RESULT_UNAVAILABLE} {count}): their results were lost but"
            " the service most likely ran and billed them; sending them again pays again"
            " (`--force` sends them too)"
        )
    return text


# The codes of failures the service most likely billed (`failures.BILLED`).
BILLED_CODES = frozenset({RESULT_UNAVAILABLE})


@dataclass(frozen=True, slots=True)
class RetryInput:
    """What `write_retry_input` wrote: the name the input takes (None: nothing to
    retry), its requests, and the failures left out, counted per code."""

    name: str | None
    requests: int = 0
    left_out: dict[str, int] = field(default_factory=dict)


def _failed_lines(
    errors: Path, max_line_bytes: int
) -> Iterator[tuple[int | None, failures.Verdict]]:
    """(input line, verdict) of every failure listed in a published job's error.jsonl."""
    with errors.open("rb") as fh:
        for line in iter_lines(fh, max_line_bytes):
            if line.blank:
                continue
            at = fh.tell()
            number = input_line_of(fh, line)
            fh.seek(at)
            parsed = read_line(line.data) if line.data is not None else None
            yield number, failures.classify(parsed)


def failures_left_out(
    folder: OutboxFolder,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    scope: RetryScope = RetryScope.RETRYABLE,
) -> dict[str, int]:
    """The failures of a published job (its outbox `folder`) that a retry of `scope`
    leaves out, counted per code."""
    left_out: dict[str, int] = {}
    if folder.exists(ERRORS):
        for _, verdict in _failed_lines(folder.member(ERRORS), max_line_bytes):
            if not takes(scope, verdict):
                left_out[verdict.code] = left_out.get(verdict.code, 0) + 1
    return left_out


def write_retry_input(
    job: Job,
    folder: OutboxFolder,
    inbox: Path,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    scope: RetryScope = RetryScope.RETRYABLE,
    already: RetryScope | None = None,
) -> RetryInput:
    """Copy the input lines listed in a published job's error.jsonl (those `scope`
    takes, less those an earlier retry of scope `already` sent) into a hidden temp file
    in the inbox (fsynced), with the job's options, `retry_of` and what was left out as
    its sidecar; `finish_retry_input` gives it its name. The failures `scope` leaves out
    are counted per code."""
    if not folder.exists(INPUT_REQUESTS) or not folder.exists(ERRORS):
        return RetryInput(None)
    source, errors = folder.member(INPUT_REQUESTS), folder.member(ERRORS)
    wanted: set[int] = set()
    left_out: dict[str, int] = {}
    for number, verdict in _failed_lines(errors, max_line_bytes):
        if not takes(scope, verdict):
            left_out[verdict.code] = left_out.get(verdict.code, 0) + 1
            continue
        if already is not None and takes(already, verdict):
            continue
        if number is not None:
            wanted.add(number)
    if not wanted:
        return RetryInput(None, 0, left_out)
    stem = f"{job.name}{SUFFIXES[scope]}"
    name, n = stem, 1
    while (inbox / f"{name}.jsonl").exists() or (inbox / f".{name}.jsonl.tmp").exists():
        n += 1
        name = f"{stem}{n}"
    # Linked to what it retries (summary.json and `show` say so); the same lines may run
    # again; what was left out is said where the retry is shown.
    options = msgspec.structs.replace(
        job.options,
        submit_id=msgspec.UNSET,
        sidecar_error=msgspec.UNSET,
        retry_of=job.id,
        allow_duplicate=True,
        retry_left_out=left_out if left_out else msgspec.UNSET,
    )
    write_atomic(inbox / f"{name}.meta.json", encode_options(options))
    tmp = inbox / f".{name}.jsonl.tmp"
    with source.open("rb") as src, tmp.open("wb") as out:
        for number, request in enumerate(src, start=1):
            if number in wanted:
                out.write(request if request.endswith(b"\n") else request + b"\n")
        out.flush()
        os.fsync(out.fileno())
    log.info(
        "retry_input_written",
        job_id=job.id,
        name=f"{name}.jsonl",
        requests=len(wanted),
        scope=str(scope),
        left_out=left_out,
    )
    return RetryInput(f"{name}.jsonl", len(wanted), left_out)


def finish_retry_input(name: str, inbox: Path) -> None:
    """Give the retry input written by `write_retry_input` its name (once; again after a
    crash between the two is harmless)."""
    tmp = inbox / f".{name}.tmp"
    if tmp.exists() and not (inbox / name).exists():
        os.rename(tmp, inbox / name)
        fsync_dir(inbox)


def event_from(raw: dict[str, Any], job_id: str | None, part: int | None) -> Event:
    return Event(
        type=str(raw.get("type")),
        at=float(raw.get("at") or 0.0),
        job_id=job_id,
        part=part,
        state=raw.get("state"),
        outcome=raw.get("outcome"),
        remote_status=raw.get("remote_status"),
        request_counts=raw.get("request_counts"),
        batch_id=raw.get("batch_id"),
        error=raw.get("error"),
    )
