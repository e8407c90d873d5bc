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
from typing import Any

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import Settings
from batchd.logs import get_logger
from batchd.models import Job, JobState, PartPlan, upload_name
from batchd.store import Store
from batchd.validate import Problem, write_parts
from batchd.verdict import Rules, judge_content, judge_unread

log = get_logger(__name__)


# A job whose input keeps changing under validation is rejected after this many tries.
MAX_PREPARES = 5


@dataclass(frozen=True, slots=True)
class Prepared:
    sha256: str | None
    bytes: int
    report: dict[str, Any]
    parts: list[PartPlan]
    mtime_ns: int | None = None
    # The input changed while it was read: nothing here may be used.
    changed: bool = False


def sha256_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _rejection(job: Job, code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {
        "path": job.inbox_name,
        "valid": False,
        "requests": 0,
        "bytes": 0,
        "parts": [],
        "errors": [{"line": line, "code": code, "message": message}],
        "error_count": 1,
    }


def _twin_rejection(job: Job, twin: Job) -> dict[str, Any]:
    """PURE: the report of an input identical to one already run."""
    where = f", results in {twin.outbox_path}" if twin.outbox_path else ""
    return _rejection(
        job,
        "duplicate_input",
        f"identical to the input of job {twin.id} ({twin.name}, "
        f"{twin.outcome or twin.state}{where}): running it again would pay for the same "
        'requests again. To run it anyway, drop it with a sidecar {"allow_duplicate": true}',
    )


def prepare(job: Job, settings: Settings) -> Prepared:
    """PURE but for files: convert, check and plan one claimed input, with the verdict
    `batchd validate` gives the same file (batchd.verdict)."""
    source = Path(job.spool_path)
    before = os.stat(source)
    rules = Rules.of(settings)
    problem = judge_unread(job.options, before, rules)
    if problem is not None:
        return Prepared(None, before.st_size, _refusal(job, problem), [], before.st_mtime_ns)
    prepared = _prepare(job, rules, source)
    after = os.stat(source)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or (
        prepared.bytes != before.st_size
    ):
        return Prepared(prepared.sha256, after.st_size, {}, [], after.st_mtime_ns, changed=True)
    return Prepared(
        prepared.sha256, prepared.bytes, prepared.report, prepared.parts, before.st_mtime_ns
    )


def _refusal(job: Job, problem: Problem) -> dict[str, Any]:
    return _rejection(job, problem.code, problem.message, problem.line)


def _prepare(job: Job, rules: Rules, source: Path) -> Prepared:
    digest, size = sha256_of(source)
    jsonl = source.with_name("input.jsonl")
    report = judge_content(source, job.kind, job.options, rules, source.parent, job.inbox_name)
    report.path = job.inbox_name
    if not report.valid:
        return Prepared(digest, size, report.to_dict(), [])
    written = write_parts(report, jsonl, source.parent, fsync=True)
    paths = written or [jsonl]
    summary = report.to_dict()
    # Byte ranges of every part are for writing the parts, not for keeping.
    summary["parts"] = [{k: v for k, v in p.items() if k != "ranges"} for p in summary["parts"]]
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
        )
        for i, (part, path) in enumerate(zip(report.parts, paths, strict=True))
    ]
    return Prepared(digest, size, summary, parts)


class Preparer:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        on_ready: Callable[[], None],
        on_rejected: Callable[[], None],
        retry_base_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.on_ready = on_ready
        self.on_rejected = on_rejected
        self.retry_base_s = retry_base_s
        # job id -> wall time before which it is not looked at again (an input still
        # changing, or a pause after a failed validation).
        self.not_before: dict[str, float] = {}

    async def run_once(self) -> bool:
        now = self.clock.now()
        jobs = [
            j
            for j in await self.store.jobs([JobState.CLAIMED], limit=100)
            if self.not_before.get(j.id, 0.0) <= now
        ][:10]
        moved = False
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
        return min(longest_s, max(0.05, min(self.not_before.values()) - self.clock.now()))

    def _still_changing(self, job: Job) -> bool:
        """Is the input modified more recently than `intake.settle_s` ago? Then a
        producer may still write it: wait (the intake's rule, applied again)."""
        try:
            mtime = os.stat(job.spool_path).st_mtime
        except OSError:
            return False
        settle = self.settings.intake.settle_s
        if self.clock.now() - mtime < settle:
            self.not_before[job.id] = mtime + settle
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
        await self.store.update_job(
            job.id, JobState.CLAIMED, crash_count=job.crash_count + 1, prepares=job.prepares + 1
        )
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
                error="the input changed while it was validated; validated again once still",
            )
            self.not_before[job.id] = self.clock.now() + self.settings.intake.settle_s
            return False
        if prepared.parts and prepared.sha256 and job.options.get("allow_duplicate") is not True:
            twin = await self.store.paid_twin(prepared.sha256, job.id)
            if twin is not None:
                prepared = replace(prepared, parts=[], report=_twin_rejection(job, twin))
        recorded = {
            "sha256": prepared.sha256,
            "bytes": prepared.bytes,
            "input_mtime_ns": prepared.mtime_ns,
            "report": prepared.report,
            "crash_count": 0,
            "error": None,
        }
        if not prepared.parts:
            await self.store.update_job(
                job.id, JobState.CLAIMED, state=JobState.PUBLISHING, **recorded
            )
            log.warning(
                "job_rejected",
                job_id=job.id,
                name=job.name,
                errors=prepared.report.get("error_count"),
                elapsed_s=elapsed,
            )
            self.on_rejected()
            return True
        await self.store.update_job(job.id, JobState.CLAIMED, **recorded)
        await self.store.plan_parts(job.id, prepared.parts, self.clock.now())
        log.info(
            "job_planned",
            job_id=job.id,
            name=job.name,
            parts=len(prepared.parts),
            requests=prepared.report.get("requests"),
            elapsed_s=elapsed,
        )
        self.on_ready()
        return True

    async def _failed(self, job: Job, exc: Exception) -> None:
        failures = job.crash_count + 1
        error = f"{type(exc).__name__}: {exc}"
        log.error("prepare_failed", job_id=job.id, name=job.name, failures=failures, error=error)
        if failures >= self.settings.max_job_crashes:
            reason = f"parked after {failures} failures validating it: {error}"
            await self.store.update_job(
                job.id, JobState.CLAIMED, state=JobState.PARKED, error=reason
            )
            log.error("job_parked", job_id=job.id, name=job.name, reason=reason)
            self.not_before.pop(job.id, None)
            return
        await self.store.update_job(job.id, JobState.CLAIMED, error=error)
        self.not_before[job.id] = self.clock.now() + self.retry_base_s * 2 ** (failures - 1)

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
            f"the file changed each of the {job.prepares} times it was validated (a producer"
            " still writing it?); drop it again once it is complete",
        )
        await self.store.update_job(
            job.id,
            JobState.CLAIMED,
            state=JobState.PUBLISHING,
            bytes=size,
            input_mtime_ns=mtime,
            report=report,
            crash_count=0,
        )
        log.warning("job_rejected", job_id=job.id, name=job.name, errors=1, reason="changing")
        self.on_rejected()
