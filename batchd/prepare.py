"""Validate claimed inputs and plan them into parts (CPU work, run off the event loop).

A CSV input is first converted to JSONL beside it. A file that fails validation goes
straight to publishing with its report (status `rejected`; nothing is sent). A valid
file is planned into parts; part files are written only when a split is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchd import csvio
from batchd.config import Settings
from batchd.failpoints import failpoint
from batchd.logs import get_logger
from batchd.models import Job, JobState
from batchd.store import Store
from batchd.validate import Report, validate_file, write_parts

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    sha256: str
    bytes: int
    report: dict[str, Any]
    parts: list[dict[str, Any]]


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


def prepare(job: Job, settings: Settings) -> Prepared:
    """PURE but for files: convert, check and plan one claimed input."""
    source = Path(job.spool_path)
    digest, size = sha256_of(source)
    jsonl = source.with_name("input.jsonl")
    if job.kind == "csv":
        model = job.options.get("model") or settings.jobs.csv_model
        if not isinstance(model, str) or not model:
            rejection = _rejection(
                job,
                "csv_needs_model",
                'a CSV input needs a model: set jobs.csv_model or "model" in NAME.meta.json',
            )
            return Prepared(digest, size, rejection, [])
        system_prompt = job.options.get("system_prompt") or settings.jobs.csv_system_prompt
        conversion = csvio.csv_file_to_jsonl(
            source,
            jsonl,
            model=model,
            system_prompt=system_prompt if isinstance(system_prompt, str) else None,
            max_errors=settings.max_reported_errors,
        )
        if not conversion.ok:
            rejection = _rejection(job, "", "")
            rejection["errors"] = [e.to_dict() for e in conversion.errors]
            rejection["error_count"] = conversion.error_count
            return Prepared(digest, size, rejection, [])
    failpoint("prepare.before_validate", job.inbox_name)
    report: Report = validate_file(
        jsonl,
        settings.profile.limits,
        split=settings.jobs.split,
        group_by_model=settings.jobs.group_by_model,
        max_errors=settings.max_reported_errors,
    )
    report.path = job.inbox_name
    if not report.valid:
        return Prepared(digest, size, report.to_dict(), [])
    written = write_parts(report, jsonl, source.parent, fsync=True)
    paths = written or [jsonl]
    summary = report.to_dict()
    # Byte ranges of every part are for writing the parts, not for keeping.
    summary["parts"] = [{k: v for k, v in p.items() if k != "ranges"} for p in summary["parts"]]
    parts = [
        {
            "seq": i + 1,
            "path": str(path),
            "first_line": part.first_line,
            "requests": part.requests,
            "bytes": part.bytes,
            "model": part.model,
            "endpoint": part.endpoint,
            "upload_name": f"batchd-{job.id}-p{i + 1:03d}.jsonl",
        }
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
    ) -> None:
        self.store = store
        self.settings = settings
        self.on_ready = on_ready
        self.on_rejected = on_rejected

    async def run_once(self) -> bool:
        jobs = await self.store.jobs([JobState.CLAIMED], limit=10)
        for job in jobs:
            await self.prepare_one(job)
        return bool(jobs)

    async def prepare_one(self, job: Job) -> None:
        # Counted before the work and cleared after: a job that kills the daemon every
        # time it is validated is parked by recovery instead of crashing it forever.
        await self.store.update_job(job.id, JobState.CLAIMED, crash_count=job.crash_count + 1)
        started = time.monotonic()
        try:
            prepared = await asyncio.to_thread(prepare, job, self.settings)
        except OSError as exc:
            log.error("prepare_failed", job_id=job.id, error=str(exc))
            await self.store.update_job(job.id, JobState.CLAIMED, crash_count=job.crash_count)
            return
        elapsed = round(time.monotonic() - started, 3)
        if not prepared.parts:
            await self.store.update_job(
                job.id,
                JobState.CLAIMED,
                state=JobState.PUBLISHING,
                sha256=prepared.sha256,
                bytes=prepared.bytes,
                report=prepared.report,
                crash_count=0,
            )
            log.warning(
                "job_rejected",
                job_id=job.id,
                name=job.name,
                errors=prepared.report.get("error_count"),
                elapsed_s=elapsed,
            )
            self.on_rejected()
            return
        await self.store.update_job(
            job.id,
            JobState.CLAIMED,
            sha256=prepared.sha256,
            bytes=prepared.bytes,
            report=prepared.report,
            crash_count=0,
        )
        await self.store.plan_parts(job.id, prepared.parts, time.time())
        log.info(
            "job_planned",
            job_id=job.id,
            name=job.name,
            parts=len(prepared.parts),
            requests=prepared.report.get("requests"),
            elapsed_s=elapsed,
        )
        self.on_ready()
