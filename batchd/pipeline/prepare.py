"""Validate claimed inputs and plan them into parts (CPU work, run off the event loop).

A CSV input is first converted to JSONL beside it. A file that fails validation goes
straight to publishing with its report (status `rejected`; nothing is sent). A valid
file is planned into parts; part files are written only when a split is needed.

What is validated is what is sent: the input's size and mtime are taken before it is
read and compared after; a file that changed meanwhile (a producer still writing it) is
validated again once it has been still for `intake.settle_s`, at most `MAX_PREPARES`
times. A file over `jobs.max_input_bytes`, or sparse, is rejected on its size alone,
before a byte of it is read. A job whose validation fails (a disk error, a bug) is tried
again after a pause and parked after `max_job_crashes` failures; the daemon goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.documents import Estimate, JobReport, ModelEstimate, ReportProblem, given
from batchd.faults import Faults, local_cause
from batchd.inputs.spool import SpoolFolder
from batchd.inputs.validate import InputProblem, write_parts
from batchd.inputs.verdict import Rules, judge_content, judge_unread
from batchd.logs import get_logger
from batchd.models import Held, Job, JobState, PartPlan, completion_hours, upload_name
from batchd.pipeline import holds
from batchd.pipeline.budget import BudgetCaps, Ledger, job_refusal, periods
from batchd.pipeline.holds import Hold
from batchd.provider.tokens import FileCount, count_file
from batchd.store import Store

log = get_logger(__name__)


# A job whose input was seen changing this many times (under validation, or before its
# upload) is rejected.
MAX_PREPARES = 5


@dataclass(frozen=True, slots=True)
class Prepared:
    sha256: str | None
    bytes: int
    report: JobReport
    parts: list[PartPlan]
    mtime_ns: int | None = None
    # The input changed while it was read: nothing here may be used.
    changed: bool = False
    # Its requests' digest (`validate.canonical_request`): what the duplicate guard
    # compares, so that line endings, spacing and key order make no new input.
    requests_sha256: str | None = None


def sha256_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _rejection(job: Job, code: str, message: str, line: int | None = None) -> JobReport:
    return JobReport(
        path=job.inbox_name,
        valid=False,
        requests=0,
        bytes=0,
        parts=[],
        errors=[ReportProblem(line=line, code=code, message=message)],
        error_count=1,
    )


def twin_note(job_id: str, twin: Job) -> str:
    """PURE: the note of a job held because its input is identical to `twin`'s: what
    that job is now, and what ends the hold."""
    published = twin.state == JobState.PUBLISHED
    where = f", results in {twin.outbox_path}" if published and twin.outbox_path else ""
    ends = (
        ""
        if published
        else "; if that job ends with nothing to show (failed, cancelled), this one runs by itself"
    )
    return Hold(
        Held.DUPLICATE,
        f"identical to the input of job {twin.id} ({twin.name}, {twin.outcome or twin.state}"
        f"{where}): running it again would pay for the same requests again",
        f"To run it anyway: `batchd retry {job_id}`, or submit with --force, or a sidecar"
        f' {{"allow_duplicate": true}}{ends}',
    ).note(job_id)


def prepare(job: Job, settings: Settings) -> Prepared:
    """PURE but for files: convert, check and plan one claimed input, with the verdict
    `batchd validate` gives the same file (batchd.inputs.verdict)."""
    source = Path(job.spool_path)
    before = os.stat(source)
    rules = Rules.of(settings)
    problem = judge_unread(job.options, before, rules)
    if problem is not None:
        return Prepared(None, before.st_size, _refusal(job, problem), [], before.st_mtime_ns)
    prepared = _prepare(job, rules, source, settings)
    after = os.stat(source)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or (
        prepared.bytes != before.st_size
    ):
        return Prepared(
            prepared.sha256, after.st_size, JobReport(), [], after.st_mtime_ns, changed=True
        )
    return replace(prepared, mtime_ns=before.st_mtime_ns)


def _refusal(job: Job, problem: InputProblem) -> JobReport:
    return _rejection(job, problem.code, problem.message, problem.line)


def _prepare(job: Job, rules: Rules, source: Path, settings: Settings) -> Prepared:
    digest, size = sha256_of(source)
    folder = SpoolFolder.of_input(source)
    jsonl = folder.requests
    report = judge_content(
        source, job.kind, job.options, rules, folder.path, job.inbox_name, requests_digest=True
    )
    report.path = job.inbox_name
    if not report.valid:
        return Prepared(digest, size, report.stored(), [])
    written = write_parts(report, jsonl, folder.path, fsync=True)
    paths = written or [jsonl]
    counts = [count_part(path, settings) for path in paths]
    summary = msgspec.structs.replace(report.stored(), estimate=estimate_of(counts, settings))
    thinking = sum(m.thinking_unset for c in counts for m in c.models.values())
    if thinking and settings.jobs.thinking == "refuse":
        models = sorted({name for c in counts for name, m in c.models.items() if m.thinking_unset})
        return Prepared(
            digest,
            size,
            _rejection(
                job,
                "thinking_default",
                f"{thinking} requests to {', '.join(models)}, which think unless told not to,"
                " do not set enable_thinking: reasoning tokens are billed as output. Set"
                ' "enable_thinking": false (or true) on each request, or jobs.thinking ='
                ' "warn" / "allow"',
            ),
            [],
        )
    parts = [
        PartPlan(
            seq=i + 1,
            path=str(path),
            first_line=part.first_line,
            requests=part.requests,
            bytes=part.bytes,
            model=part.model,
            endpoint=part.endpoint,
            upload_name=upload_name(job.id, i + 1),
            input_tokens=sum(m.input_tokens for m in count.models.values()),
            output_tokens_max=sum(m.output_tokens_max for m in count.models.values()),
            cost_max=worst_cost(count),
        )
        for i, (part, path, count) in enumerate(zip(report.parts, paths, counts, strict=True))
    ]
    return Prepared(digest, size, summary, parts, requests_sha256=report.requests_sha256)


def count_part(path: Path, settings: Settings) -> FileCount:
    """Tokens and worst-case cost of one part file, as `batchd estimate` counts them."""
    return count_file(path, settings.provider, settings.profile.limits, settings.price_table)


def worst_cost(count: FileCount) -> float | None:
    """PURE: the worst-case batch price of a counted file (None: a model has no price)."""
    total = 0.0
    for model in count.models.values():
        if model.cost_max is None:
            return None
        total += model.cost_max
    return total


def estimate_of(counts: list[FileCount], settings: Settings) -> Estimate:
    """PURE: the job's counted tokens and worst case, per model, for its report."""
    models: dict[str, ModelEstimate] = {}
    for count in counts:
        for name, m in count.models.items():
            own = models.setdefault(name, ModelEstimate())
            own.requests += m.requests
            own.input_tokens += m.input_tokens
            own.output_tokens_max += m.output_tokens_max
            own.thinking_unset += m.thinking_unset
            own.cost_max = (
                None if m.cost_max is None or own.cost_max is None else own.cost_max + m.cost_max
            )
    worst = [c for c in (worst_cost(count) for count in counts)]
    return Estimate(
        tokenizer=sorted({name for count in counts for name in count.tokenizers}),
        exact=all(count.exact for count in counts),
        currency=settings.price_table.currency(settings.provider),
        cost_max=None if any(w is None for w in worst) else sum(w for w in worst if w),
        models=models,
    )


class Preparer:
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        *,
        on_ready: Callable[[], None],
        on_rejected: Callable[[], None],  # a job goes to publishing without parts
        clock: Clock = SYSTEM_CLOCK,
        on_held: Callable[[], None] = lambda: None,
        faults: Faults | None = None,
    ) -> None:
        self.on_held = on_held
        self.faults = faults if faults is not None else Faults(clock=clock)
        self.store = store
        # The settings in force, read where they are used (a reload replaces them).
        self._settings = settings
        self.clock = clock
        self.on_ready = on_ready
        self.on_rejected = on_rejected
        # job id -> steady time before which it is not looked at again (an input still
        # changing, or a pause after a failed validation).
        self.not_before: dict[str, float] = {}
        # The duplicate holds are judged at the first pass (start-up), then after each
        # publish and reload (`cause_changed`).
        self._holds_stale = True

    @property
    def settings(self) -> Settings:
        return self._settings()

    @property
    def retry_base_s(self) -> float:
        return self.settings.api.step_retry_base_s

    async def run_once(self) -> bool:
        moved = False
        if self._holds_stale:
            self._holds_stale = False
            moved = await self.judge_duplicates()
        now = self.clock.steady()
        jobs = [
            j
            for j in await self.store.jobs([JobState.CLAIMED], limit=100, held=False)
            if self.not_before.get(j.id, 0.0) <= now
        ][:10]
        for job in jobs:
            moved |= await self.prepare_one(job)
        return moved

    async def idle_s(self, longest_s: float) -> float:
        """Until the next job waiting out a pause is due, at most `longest_s`."""
        if not self.not_before:
            return longest_s
        # Only their ids: the pauses of jobs no longer waiting are forgotten.
        waiting = await self.store.job_ids_in([JobState.CLAIMED], limit=100)
        self.not_before = {j: self.not_before[j] for j in waiting if j in self.not_before}
        if not self.not_before:
            return longest_s
        return min(longest_s, max(0.05, min(self.not_before.values()) - self.clock.steady()))

    def _still_changing(self, job: Job) -> bool:
        """Is the input modified more recently than `intake.settle_s` ago? Then a
        producer may still write it: wait (the intake's rule, applied again)."""
        try:
            mtime = os.stat(job.spool_path).st_mtime
        except OSError:
            return False
        settle = self.settings.intake.settle_s
        age = self.clock.now() - mtime
        # An mtime ahead of the wall clock (a clock stepped back since) tells nothing.
        if 0 <= age < settle:
            self.not_before[job.id] = self.clock.steady() + settle - age
            return True
        return False

    async def prepare_one(self, job: Job) -> bool:
        if job.prepares > 0 and self._still_changing(job):
            return False
        if job.prepares >= MAX_PREPARES:
            await self._reject_changing(job)
            return True
        # Counted before the work and cleared after: a job that kills the daemon every
        # time it is validated is parked by recovery instead of crashing it forever.
        # (`prepares` counts the changes seen, not the attempts: a validation cut short by
        # a kill says nothing of the producer.)
        if not await self.store.update_job(
            job.id, JobState.CLAIMED, crash_count=job.crash_count + 1
        ):
            return False  # moved on meanwhile (cancelled while held): not validated
        started = self.clock.monotonic()
        try:
            prepared = await asyncio.to_thread(prepare, job, self.settings)
        except Exception as exc:
            # A disk error or a bug: this job's trouble, not the daemon's.
            await self._failed(job, exc)
            return False
        self.not_before.pop(job.id, None)
        elapsed = round(self.clock.monotonic() - started, 3)
        if prepared.changed:
            log.warning("input_changed", job_id=job.id, name=job.name, before="validation")
            await self.store.update_job(
                job.id,
                JobState.CLAIMED,
                crash_count=job.crash_count,
                prepares=job.prepares + 1,
                error="the input changed while it was validated; validated again once still",
            )
            self.not_before[job.id] = self.clock.steady() + self.settings.intake.settle_s
            return False
        if prepared.parts:
            refused = await self._spending_problem(job, prepared)
            if refused is not None:
                prepared = replace(prepared, parts=[], report=_rejection(job, *refused))
        twin = await self._twin(job, prepared)
        recorded = {
            "sha256": prepared.sha256,
            "requests_sha256": prepared.requests_sha256,
            "bytes": prepared.bytes,
            "input_mtime_ns": prepared.mtime_ns,
            "report": prepared.report,
            "crash_count": 0,
            "error": None,
        }
        fresh = await self.store.get_job(job.id)
        if fresh is not None and fresh.cancel_requested:
            # Cancelled before it was planned: published cancelled, nothing sent.
            recorded["error"] = "cancelled before it was planned: nothing was sent"
            if not await self.store.move_job(
                job.id, JobState.CLAIMED, JobState.PUBLISHING, **recorded
            ):
                return False
            log.info("job_cancelled_unplanned", job_id=job.id, name=job.name)
            self.on_rejected()
            return True
        if twin is not None:
            # Held, not rejected: an operator may well mean to run it again.
            if not await self.store.update_job(job.id, JobState.CLAIMED, **recorded):
                return False
            note = twin_note(job.id, twin)
            if await holds.hold(self.store, job.id, Held.DUPLICATE, note, twin=twin.id):
                self.on_held()
            return True
        if not prepared.parts:
            if not await self.store.move_job(
                job.id, JobState.CLAIMED, JobState.PUBLISHING, **recorded
            ):
                return False
            log.warning(
                "job_rejected",
                job_id=job.id,
                name=job.name,
                errors=prepared.report.error_count,
                elapsed_s=elapsed,
            )
            self.on_rejected()
            return True
        if not await self.store.update_job(job.id, JobState.CLAIMED, **recorded):
            return False
        if not await self.store.plan_parts(job.id, prepared.parts, self.clock.now()):
            return False
        log.info(
            "job_planned",
            job_id=job.id,
            name=job.name,
            parts=len(prepared.parts),
            requests=prepared.report.requests,
            elapsed_s=elapsed,
        )
        self.on_ready()
        return True

    async def _twin(self, job: Job, prepared: Prepared) -> Job | None:
        """The job that already ran (or runs) this very input within
        `jobs.duplicate_window`, unless the job may run it again."""
        if not prepared.parts:
            return None
        return await self._twin_of(job, prepared.requests_sha256, prepared.sha256)

    async def _twin_of(
        self, job: Job, requests_sha256: str | None, sha256: str | None
    ) -> Job | None:
        hours = completion_hours(self.settings.jobs.duplicate_window) or 0
        if not (sha256 and hours) or job.options.allow_duplicate is True:
            return None
        since = self.clock.now() - hours * 3600.0
        # The requests' digest (None for a job recorded before it was kept: its bytes).
        return await self.store.paid_twin(requests_sha256, sha256, job.id, since=since)

    def cause_changed(self) -> None:
        """A job was published or the settings reloaded: the duplicate holds are judged
        again at the next pass."""
        self._holds_stale = True

    async def judge_duplicates(self) -> bool:
        """Judge each job held as a duplicate again: its note says what the earlier job
        is now (never `running` once it was published); a job whose earlier one ended
        with nothing to show (or left `jobs.duplicate_window`) is released and planned."""
        released = False
        for job in await self.store.held_jobs(Held.DUPLICATE):
            twin = await self._twin_of(job, job.requests_sha256, job.sha256)
            if twin is None:
                released |= await holds.release(
                    self.store, job.id, Held.DUPLICATE, by="earlier_job_ended"
                )
            else:
                await holds.hold(self.store, job.id, Held.DUPLICATE, twin_note(job.id, twin))
        return released

    async def _spending_problem(self, job: Job, prepared: Prepared) -> tuple[str, str] | None:
        """Why a planned job may not start for money or queue limits, as (code, message):
        over its own `max_cost`, over the budget (`budget.on_over = "reject"`), or a part
        larger than its model's enqueued-token limit (it could never be accepted)."""
        limits = self.settings.profile.limits
        for part in prepared.parts:
            limit = limits.for_model(part.model).enqueued_tokens
            if limit is not None and (part.input_tokens or 0) > limit:
                return (
                    "over_enqueued_tokens",
                    f"part {part.seq} has {part.input_tokens} input tokens of {part.model}, over"
                    f" the model's enqueued-token limit ({limit}): the service would fail it."
                    f" Set [limits.models.{part.model!r}] max_requests_per_file lower so it"
                    " is split smaller",
                )
        worst: float | None = 0.0
        for part in prepared.parts:
            worst = None if worst is None or part.cost_max is None else worst + part.cost_max
        caps = BudgetCaps.of(self.settings)
        own_cap = given(job.options.max_cost)
        if own_cap is None and not (caps.active and caps.on_over == "reject"):
            return None
        ledger = Ledger()
        if caps.active:
            when = periods(self.clock.now(), self.settings.budget.timezone)
            mine = (self.settings.provider, caps.currency)
            ledger.spent_day = (await self.store.spent_since(when.day_start)).get(mine, 0.0)
            ledger.spent_month = (await self.store.spent_since(when.month_start)).get(mine, 0.0)
            ledger.committed, ledger.committed_unknown = await self.store.committed_cost()
        refused = job_refusal(worst, ledger, caps, float(own_cap) if own_cap is not None else None)
        return ("over_budget", f"not started: {refused}") if refused else None

    async def _failed(self, job: Job, exc: Exception) -> None:
        local = local_cause(exc)
        if local is not None:
            # This machine's fault (the spool's disk full while the parts are written):
            # the job waits, and the try is not counted as a failure of its own.
            pause = self.faults.met(local, "validation of new inputs")
            await self.store.update_job(job.id, JobState.CLAIMED, crash_count=job.crash_count)
            log.warning("prepare_waits", job_id=job.id, name=job.name, error=str(local))
            self.not_before[job.id] = self.clock.steady() + pause
            return
        failures = job.crash_count + 1
        error = f"{type(exc).__name__}: {exc}"
        log.error("prepare_failed", job_id=job.id, name=job.name, failures=failures, error=error)
        if failures >= self.settings.max_job_crashes:
            reason = f"parked after {failures} failures validating it: {error}"
            self.not_before.pop(job.id, None)
            if await self.store.move_job(job.id, JobState.CLAIMED, JobState.PARKED, error=reason):
                log.error("job_parked", job_id=job.id, name=job.name, reason=reason)
            return
        await self.store.update_job(job.id, JobState.CLAIMED, error=error)
        self.not_before[job.id] = self.clock.steady() + self.retry_base_s * 2 ** (failures - 1)

    async def _reject_changing(self, job: Job) -> None:
        """The input kept changing under validation: rejected with what was last seen."""
        mtime: int | None
        try:
            st = os.stat(job.spool_path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = job.bytes or 0, job.input_mtime_ns
        report = _rejection(
            job,
            "input_keeps_changing",
            f"the file changed {job.prepares} times while batchd validated or sent it (a"
            " producer still writing it?); drop it again once it is complete",
        )
        if not await self.store.move_job(
            job.id,
            JobState.CLAIMED,
            JobState.PUBLISHING,
            bytes=size,
            input_mtime_ns=mtime,
            report=report,
            crash_count=0,
        ):
            return
        log.warning("job_rejected", job_id=job.id, name=job.name, errors=1, reason="changing")
        self.on_rejected()
