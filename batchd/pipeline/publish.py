"""The publish stage: write each job in PUBLISHING into the outbox in one atomic step,
then queue the clean-up of its remote files.

Publish: a hidden temp folder `outbox/.NAME.tmp-JOB` receives `result.jsonl` (successes
in input order, the service's lines byte for byte), `error.jsonl` (failures, each with
its `input_line`; requests that never ran get their own error code), `unattributed.jsonl`
(result lines no request of the input claims, byte for byte; only when there are any),
`result.csv` (one row per request, in input order, written with the two files),
`summary.json` and a copy of the validated input; each file is fsynced,
then the folder is renamed to `outbox/NAME` and the outbox fsynced. NAME is the job's
name (the input's stem as `intake.outbox_name` keeps it); when a job or anything else
holds it, `NAME-2`, `NAME-3`, ..., whose summary.json says which earlier folder (and job)
it `follows`: a published folder is never changed to point forward. The name is
committed before the rename, so a crash on either side of it is settled by looking at
the folder's `summary.json`. A write or fsync that fails (EIO, ENOSPC) removes the temp
folder, logs `publish_failed` and tries the job again after a pause that doubles with
each failure; the daemon carries on.

The merging of results in input order is `batchd.outbox.merge`'s; here are this stage's pure
deciders (`decide_outcome`, `retry_delay_s`, `remote_files_to_delete`,
`unread_rejection`, `rejection_reason`), what summary.json says (`build_summary`, its
`error`: `job_error`) and the writers of the outbox's other files (a rejected input's
`write_rejection`, the input's copy: `keep_input_files`).

A rejected input is published with every one of its lines in error.jsonl, in input
order, each with one reason: the problem the report names for it, or `not_submitted`
for a line the input was rejected around; all of them count as never run. What failed a
job as a whole (a batch the service failed, the first problem of a rejected input) is
stated once: summary.json's `error`, and the job's own `error` (`jobs --json`, `show`,
the job.ended notification), which the lines of error.jsonl refer to by code.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from batchd.clock import SYSTEM_CLOCK, Clock, iso_utc
from batchd.config import Settings
from batchd.failpoints import failpoint
from batchd.fsutil import fsync_dir, fsync_file, open_for_writing
from batchd.inputs import csvio
from batchd.inputs.lines import CHUNK_BYTES, read_line, utf8_safe
from batchd.logs import get_logger
from batchd.models import (
    ExtraBatch,
    Job,
    JobState,
    Outcome,
    Part,
    RemoteStatus,
    batch_created_at,
)
from batchd.outbox.merge import (
    MergeStats,
    batch_error,
    file_of,
    kept_on_service,
    merge,
    never_ran,
    numbered,
    sent_bytes,
)
from batchd.outbox.remerge import merge_chain
from batchd.pipeline.extras import extra_note
from batchd.pipeline.intake import LATE_SIDECAR
from batchd.provider.prices import PriceTable
from batchd.provider.profiles import ProviderLimits
from batchd.provider.remote import TIME_KEYS
from batchd.provider.tokens import RequestCounter
from batchd.store import Store

log = get_logger(__name__)

# Rejections decided on the input's size or blocks alone: the input was never read, so
# it is moved into the outbox (a rename), never copied.
UNREAD_CODES = frozenset({"input_too_large", "sparse_file"})
# The most jobs of one name the outbox holds (`NAME` to `NAME-999999`): `-N` fits the
# room `intake.MAX_NAME_BYTES` leaves, and the search for a free name is bounded.
MAX_COPIES = 999_999
UNSENT_NOTE = (
    "these bytes arrived after the file was claimed and were not sent:"
    " drop them again as a new file"
)
# How the note of a job whose publishing raised begins (the job's `error` until it is
# published; `status` lists such jobs as `publish_failing`).
PUBLISH_FAILED = "publishing failed"
MAX_NOTE_CHARS = 500
# How long publishing waits for a process that holds the job's input open for writing
# (it may still append requests) before it publishes anyway.
WRITER_WAIT_S = 60.0
LATE_SIDECAR_NOTE = (
    "the input's sidecar arrived after the input was claimed: it was not applied (the job"
    " ran with the options it was claimed with). Drop the input again with it to run with"
    " it"
)
CHANGED_NOTE = (
    "the file was changed in place after it was claimed; what was validated and sent is"
    " not the current file, which is kept as {name}"
)


def decide_outcome(job: Job, parts: list[Part], stats: MergeStats) -> Outcome:
    """PURE: the job's final status from its parts and merged counts."""
    if stats.total > 0 and stats.completed == stats.total:
        return Outcome.COMPLETED
    statuses = {p.remote_status for p in parts}
    if job.cancel_requested or RemoteStatus.CANCELLED in statuses:
        return Outcome.CANCELLED
    if RemoteStatus.EXPIRED in statuses:
        return Outcome.EXPIRED
    if stats.completed == 0:
        return Outcome.FAILED
    return Outcome.PARTIAL


def remote_files_to_delete(parts: list[Part]) -> list[str | None]:
    """PURE: the remote files to delete once the job is published: every input file,
    and every result file except those given up after transient failures."""
    ids: list[str | None] = []
    for part in parts:
        ids.append(part.remote_file_id)
        for kind in ("output", "error"):
            reason = (part.unavailable or {}).get(kind)
            if reason is None or not kept_on_service(reason):
                ids.append(file_of(part, kind))
    return ids


def _kept_files(part: Part) -> list[str]:
    return [
        file_id
        for kind, reason in sorted((part.unavailable or {}).items())
        if kept_on_service(reason) and (file_id := file_of(part, kind))
    ]


class Publisher:
    """Publishes jobs in PUBLISHING into the outbox, then queues remote clean-up."""

    def __init__(
        self,
        store: Store,
        outbox: Path,
        settings: Callable[[], Settings],
        limits: ProviderLimits,
        *,
        on_published: Callable[[], None],
        on_retry_due: Callable[[], None] = lambda: None,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 300.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.clock = clock
        self.outbox = outbox
        # The settings in force, read where they are used (a reload replaces them): the
        # actual cost is at the prices in force. The limits (fixed for the daemon's life)
        # give the output bound of a request charged its worst case.
        self._settings = settings
        self.limits = limits
        self.on_retry_due = on_retry_due
        self.on_published = on_published
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        # job id -> (failed attempts in a row, monotonic time of the next attempt)
        self.backoff: dict[str, tuple[int, float]] = {}
        # job id -> monotonic time since when a process holds its input open for writing
        self.writer_since: dict[str, float] = {}
        # job id -> why its input stayed in the spool after it was published (bytes that
        # reached it later): `batchd status` lists them (since this start).
        self.inputs_kept: dict[str, str] = {}
        self.writer_wait_s = WRITER_WAIT_S

    @property
    def provider(self) -> str:
        return self._settings().provider

    @property
    def prices(self) -> PriceTable:
        return self._settings().price_table

    @property
    def keep_input(self) -> bool:
        return self._settings().jobs.keep_input

    @property
    def delete_remote_files(self) -> bool:
        return self._settings().jobs.delete_remote_files

    @property
    def max_line_bytes(self) -> int:
        return self._settings().jobs.max_result_line_bytes

    async def run_once(self) -> bool:
        moved = False
        loop = asyncio.get_running_loop()
        for job in await self.store.jobs([JobState.PUBLISHING], limit=50):
            failed, due_at = self.backoff.get(job.id, (0, 0.0))
            if self.clock.monotonic() < due_at:
                continue
            try:
                moved |= await self.publish(job)
            except OSError as exc:
                # EIO, ENOSPC...: the temp folder is gone and nothing partial is visible.
                # A disk error is not the job's fault: it must not count towards parking
                # it, and it is tried again after a growing pause, not in a tight loop.
                await self.store.update_job(
                    job.id, JobState.PUBLISHING, crash_count=job.crash_count
                )
                delay = retry_delay_s(failed + 1, self.retry_base_s, self.retry_cap_s)
                self.backoff[job.id] = (failed + 1, self.clock.monotonic() + delay)
                loop.call_later(delay, self.on_retry_due)
                log.error(
                    "publish_failed",
                    job_id=job.id,
                    name=job.name,
                    errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                    error=str(exc),
                    attempt=failed + 1,
                    retry_in_s=round(delay, 3),
                )
            except Exception as exc:
                # Anything else (a bug, a value nobody foresaw) is this job's problem,
                # never the stage's: the others go on publishing, and this one is tried
                # again after a growing pause, its note in `status` and `show`.
                await self._crashed(job, failed + 1, exc)
            else:
                if self.backoff.pop(job.id, None) is not None:
                    log.info("publish_recovered", job_id=job.id, attempts=failed + 1)
        return moved

    async def _crashed(self, job: Job, attempt: int, exc: Exception) -> None:
        """A publish that raised: the job stays in PUBLISHING (its worst case still held
        against the budget) with a note saying why, tried again after a pause that
        doubles with each failure, up to `retry_cap_s`."""
        delay = retry_delay_s(attempt, self.retry_base_s, self.retry_cap_s)
        self.backoff[job.id] = (attempt, self.clock.monotonic() + delay)
        error = utf8_safe(f"{type(exc).__name__}: {exc}")[:MAX_NOTE_CHARS]
        note = f"{PUBLISH_FAILED} ({attempt} in a row; tried again in {delay:g} s): {error}"
        await self.store.update_job(
            job.id, JobState.PUBLISHING, crash_count=job.crash_count, error=note
        )
        asyncio.get_running_loop().call_later(delay, self.on_retry_due)
        log.exception(
            "publish_crashed", job_id=job.id, name=job.name, attempt=attempt, retry_in_s=delay
        )

    async def _final_dir(self, job: Job) -> Path:
        """The job's outbox folder: its name, or `NAME-N` (`numbered_name`) when another
        job has it or anything at all (a folder, a file, a symlink, even a dangling one)
        is there."""
        if job.outbox_path:
            chosen = Path(job.outbox_path)
            if _outbox_owner(chosen, job.id) in (None, "self"):
                return chosen
            # Taken since the name was chosen (by hand, say): this job takes another.
            log.warning("outbox_name_taken", job_id=job.id, outbox=str(chosen))
        for n in range(1, MAX_COPIES + 1):
            path = self.outbox / numbered_name(job.name, n)
            if not await self.store.outbox_path_taken(str(path)) and not os.path.lexists(path):
                return path
        # A publish failure like a full disk: logged, and tried again after a pause.
        raise OSError(errno.EEXIST, f"outbox names {job.name} to {job.name}-{MAX_COPIES} taken")

    async def _follows(self, job: Job, final: Path) -> dict[str, Any] | None:
        """What a numbered folder `NAME-N` follows: the nearest earlier folder of its name
        (`NAME-(N-1)`, ..., `NAME`) that another job owns, with that job's id; when no
        job owns one (a user's own file took the name), the folder just before it, with
        `job_id` null. None for a folder under the job's own name."""
        n = copy_number(job.name, final.name)
        if n is None:
            return None
        for k in range(n - 1, 0, -1):
            before = self.outbox / numbered_name(job.name, k)
            owner = await self.store.outbox_path_owner(str(before))
            if owner is None:
                owner = await asyncio.to_thread(_folder_job_id, before)
            if owner is not None and owner != job.id:
                return {"folder": before.name, "job_id": owner}
        return {"folder": numbered_name(job.name, n - 1), "job_id": None}

    async def _writer_holds(self, job: Job) -> bool:
        """Does a process still hold the job's input open for writing (a producer that
        paused, then goes on)? Then publishing waits for it, `writer_wait_s` at most, so
        that what it appends is found (as `unsent`), not written into a removed file."""
        if await asyncio.to_thread(input_open_for_writing, Path(job.spool_path)) is not True:
            self.writer_since.pop(job.id, None)
            return False
        now = self.clock.monotonic()
        since = self.writer_since.setdefault(job.id, now)
        if now - since >= self.writer_wait_s:
            return False
        if since == now:
            log.warning("publish_waits_for_writer", job_id=job.id, name=job.name)
        asyncio.get_running_loop().call_later(min(1.0, self.writer_wait_s), self.on_retry_due)
        return True

    async def publish(self, job: Job) -> bool:
        if await self._writer_holds(job):
            return False
        parts = await self.store.parts_of(job.id)
        final = await self._final_dir(job)
        if job.outbox_path != str(final):
            await self.store.update_job(job.id, JobState.PUBLISHING, outbox_path=str(final))
        if _published_by(final, job.id):
            return await self._done(job, parts, final, None)
        tmp = self.outbox / f".{final.name}.tmp-{job.id}"
        follows = await self._follows(job, final)
        if not await self.store.update_job(
            job.id, JobState.PUBLISHING, crash_count=job.crash_count + 1
        ):
            return False  # no longer PUBLISHING (parked at start-up): not published
        try:
            extras = await self.store.extra_batches_of(job.id)
            summary = await asyncio.to_thread(
                self._build, job, parts, tmp, final.name, follows, extras
            )
            failpoint("publish.before_rename", job.inbox_name)
            await asyncio.to_thread(os.rename, tmp, final)
        except BaseException:
            # Whatever failed (a full or failing disk), the half-written folder goes: it
            # holds space the next attempt needs, and it was never visible under `final`.
            # An input moved into it goes back to the spool first.
            await asyncio.to_thread(discard_tmp, job, tmp)
            raise
        failpoint("publish.after_rename", job.inbox_name)
        await asyncio.to_thread(fsync_dir, self.outbox)
        return await self._done(job, parts, final, summary)

    async def _done(
        self, job: Job, parts: list[Part], final: Path, summary: dict[str, Any] | None
    ) -> bool:
        if summary is None:
            summary = orjson.loads((final / "summary.json").read_bytes())
        outcome = str(summary.get("status"))
        counts = summary.get("request_counts") or {}
        # Crash hazard: the remote clean-up is queued and the spool removed *before* the
        # job is marked published. Once published it is never looked at again, so a kill
        # between the two would leave its remote files and spool folder behind for good;
        # in this order a kill only repeats these idempotent steps on the next pass.
        if self.delete_remote_files:
            await self.store.add_garbage(
                remote_files_to_delete(parts), f"job {job.id} published", self.clock.now()
            )
        kept_at = summary.get("input_kept_at")
        # Bytes that reached the input after its outbox folder was built (a producer that
        # still held it open, where the kernel could not tell): never removed unseen.
        late = await asyncio.to_thread(late_input_bytes, job, summary)
        if late is not None:
            log.error("input_grew_after_publish", job_id=job.id, path=job.spool_path, note=late)
            self.inputs_kept[job.id] = late
        if kept_at:
            # The input could not be moved into the outbox (another filesystem), or its
            # writer still held it: its spool folder stays, and summary.json says where.
            log.warning("input_kept_in_spool", job_id=job.id, path=kept_at)
        elif late is None:
            await asyncio.to_thread(shutil.rmtree, Path(job.spool_path).parent, True)
        # A retry's answers merged into its chain's root folder (idempotent, as the above).
        await merge_chain(
            self.store, job, final, clock=self.clock, max_line_bytes=self.max_line_bytes
        )
        cost = summary.get("cost") if isinstance(summary.get("cost"), dict) else None
        # What failed the job as a whole, once, where `jobs` and `show` read it.
        note = error_note(summary.get("error"))
        if late is not None:
            note = late if note is None else f"{note}; {late}"
        if note is None and publish_failed(job):
            note_field: dict[str, Any] = {"error": None}  # the failures before: over now
        else:
            note_field = {"error": note} if note is not None else {}
        if not await self.store.mark_published(
            job.id,
            spend_of(cost, self.provider),
            outcome=outcome,
            crash_count=0,
            outbox_path=str(final),
            completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            usage=summary.get("usage"),
            cost=cost,
            held=None,
            held_note=None,
            held_at=None,
            **note_field,
        ):
            return False  # the publisher is PUBLISHING's one writer: never seen
        log.info(
            "job_published",
            job_id=job.id,
            outbox=str(final),
            status=outcome,
            request_counts=summary.get("request_counts"),
        )
        self.on_published()
        return True

    def _build(
        self,
        job: Job,
        parts: list[Part],
        tmp: Path,
        folder: str,
        follows: dict[str, Any] | None,
        extras: list[ExtraBatch],
    ) -> dict[str, Any]:
        discard_tmp(job, tmp)
        tmp.mkdir(parents=True)
        spool_input = Path(job.spool_path)
        jsonl_input = spool_input.with_name("input.jsonl")
        if job.report is not None and not job.report.get("valid", True):
            stats = write_rejection(job, tmp, self.max_line_bytes)
            outcome: Outcome = Outcome.REJECTED
        elif not parts and job.cancel_requested:
            # Cancelled before it was planned (held, or being validated): nothing was
            # sent, and its input is kept whatever `keep_input` says.
            stats = write_rejection(job, tmp, self.max_line_bytes, unsent=CANCELLED_UNSENT)
            outcome = Outcome.CANCELLED
        else:
            stats = merge(
                jsonl_input,
                parts,
                tmp / "result.jsonl",
                tmp / "error.jsonl",
                tmp / "unattributed.jsonl",
                max_line_bytes=self.max_line_bytes,
                input_bytes=sent_bytes(job),
                counter=RequestCounter(self.provider, self.limits, self.prices),
                results_csv=tmp / "result.csv",
            )
            outcome = decide_outcome(job, parts, stats)
            if stats.estimated_reasons:
                log.warning(
                    "cost_estimated",
                    job_id=job.id,
                    name=job.name,
                    reasons=stats.estimated_reasons,
                    first=stats.estimated_lines[:1],
                    unavailable_parts=stats.unavailable_parts,
                )
        failpoint("publish.write", job.inbox_name)
        # Cancelled with nothing sent (held, say): the input is all there is of it.
        never_sent = outcome == Outcome.CANCELLED and not any(p.batch_id for p in parts)
        kept = keep_input_files(job, parts, tmp, keep=self.keep_input or never_sent)
        if input_open_for_writing(spool_input):
            # Still held open past `writer_wait_s`: the input stays in the spool, where
            # what its writer adds is kept, and summary.json says where.
            kept.setdefault("input_kept_at", str(spool_input))
        if kept.get("input_changed"):
            log.warning("input_changed", job_id=job.id, name=job.name, **kept["input_changed"])
        summary = build_summary(
            job,
            parts,
            stats,
            outcome,
            kept,
            published_at=self.clock.now(),
            currency=self.prices.currency(self.provider),
            folder=folder,
            follows=follows,
            extras=extras,
        )
        (tmp / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        fsync_file(tmp / "summary.json")
        if job.report is not None:
            (tmp / "report.json").write_bytes(orjson.dumps(job.report, option=orjson.OPT_INDENT_2))
            fsync_file(tmp / "report.json")
        failpoint("publish.fsync", job.inbox_name)
        fsync_dir(tmp)
        return summary


# What summary.json says of requests charged their worst case (`cost.estimated.why`).
ESTIMATED_WHY = (
    "charged at their worst case (input tokens counted as when planned, the whole output"
    " bound, in their price tier), since the service's usage could not be used: refused"
    " as absurd (usage_refused), missing (usage_missing), or the result file was lost"
    " (result_unavailable: of each such part, as many requests as the service counted"
    " completed and were not seen, the dearest first)"
)


def cost_summary(stats: MergeStats, currency: str) -> dict[str, Any]:
    """PURE: what the job's requests cost at batch prices: in all (`amount`), priced from
    the service's usage (`from_usage`) and charged at their worst case (`estimated`,
    with how many requests, why, and the first of them), and per model (null for a model
    with no price; then the total is null too, with the known part beside it)."""
    costs = stats.costs
    unknown = sorted(model for model, own in costs.items() if not own.priced)
    priced = [own for own in costs.values() if own.priced]
    from_usage = sum(own.from_usage for own in priced)
    estimated = sum(own.estimated for own in priced)
    known = from_usage + estimated
    requests = sum(own.estimated_requests for own in costs.values())
    return {
        "amount": None if unknown else _amount(known),
        "currency": currency,
        "per_model": {
            model: None if own.amount is None else _amount(own.amount)
            for model, own in costs.items()
        },
        "unknown_models": unknown,
        "known_amount": _amount(known),
        "from_usage": _amount(from_usage),
        "estimated": {
            "amount": _amount(estimated),
            "requests": requests,
            "per_model": {
                model: own.estimated_requests
                for model, own in costs.items()
                if own.estimated_requests
            },
            "reasons": dict(stats.estimated_reasons),
            "lines": stats.estimated_lines,
            "unavailable_parts": stats.unavailable_parts,
            "why": ESTIMATED_WHY if requests else None,
        },
    }


def _amount(value: float) -> float:
    """An amount as summary.json writes it: to 1e-10 of the currency, where float noise
    goes and the price of a single token stays (never rounded down to 0)."""
    return round(value, 10)


def spend_of(cost: dict[str, Any] | None, provider: str) -> tuple[str, str, float] | None:
    """PURE: the spend a published job records (provider, currency, amount): what is
    known of its cost, priced from usage and charged at worst case alike (a model with
    no price adds nothing it could be measured by)."""
    if not cost:
        return None
    amount = cost.get("known_amount")
    if not isinstance(amount, int | float) or isinstance(amount, bool) or amount <= 0:
        return None
    return provider, str(cost.get("currency") or ""), float(amount)


def retry_delay_s(failures: int, base_s: float, cap_s: float) -> float:
    """PURE: the pause before the next publish attempt after `failures` in a row."""
    return float(min(cap_s, base_s * 2 ** min(max(0, failures - 1), 30)))


# Rejections whose input is not lines of requests (never read, not text, a CSV that
# could not be converted): error.jsonl lists the report's problems as they are.
NOT_LINES_CODES = UNREAD_CODES | {
    "empty_file",
    "utf16",
    "binary_file",
    "cr_line_endings",
    "not_text",
    "bad_csv",
    "csv_needs_model",
}


def requests_file(job: Job) -> Path | None:
    """The file whose lines are a rejected job's requests, or None when there is none to
    read: the input as validated (a JSONL input), or a CSV input's conversion when its
    lines are what was validated (the report's problems name its lines, or no line)."""
    report = job.report or {}
    problems = [e for e in report.get("errors") or [] if isinstance(e, dict)]
    if unread_rejection(job) or any(e.get("code") in NOT_LINES_CODES for e in problems):
        return None
    spool_input = Path(job.spool_path)
    if job.kind == "jsonl":
        return spool_input if spool_input.is_file() else None
    converted = spool_input.with_name("input.jsonl")
    validated = bool(report.get("bytes")) or all(e.get("line") is None for e in problems)
    return converted if validated and converted.is_file() else None


def rejection_reason(report: dict[str, Any]) -> tuple[str, str]:
    """PURE: the code and message of a rejected input's lines that the report names no
    problem for: not sent, because the input was rejected for what the report lists (a
    problem of the whole file, or other lines: the first is named). Such a line is said
    to be valid only when the report lists every problem."""
    problems = [e for e in report.get("errors") or [] if isinstance(e, dict)]
    first = problems[0] if problems else {}
    code = str(first.get("code") or "rejected")
    line = first.get("line")
    count = report.get("error_count")
    count = count if isinstance(count, int) and count >= len(problems) else len(problems)
    if line is None:
        return "not_submitted", f"not sent: the input was rejected ({code}): see summary.json error"
    if count <= len(problems):
        return (
            "not_submitted",
            f"valid, not sent: the input was rejected for other lines (line {line}: {code})",
        )
    return (
        "not_submitted",
        f"not sent: the input was rejected (line {line}: {code}; {count} problems,"
        f" report.json lists {len(problems)})",
    )


# Why the requests of a job cancelled before it was planned have no answer.
CANCELLED_UNSENT = ("not_submitted", "not sent: the job was cancelled before anything was sent")


def write_rejection(
    job: Job, folder: Path, max_line_bytes: int, *, unsent: tuple[str, str] | None = None
) -> MergeStats:
    """The files of a rejected input in `folder`: an empty result.jsonl, and error.jsonl
    and result.csv with one line (one row) per line of the input, in input order, each
    with one reason: the first problem the report lists for it, `empty_line` for a blank
    line, else `not_submitted` (`rejection_reason`; `unsent`, the code and message of a
    valid input that was never sent). None of them ran. An input that is not lines of
    requests (never read, binary, a CSV that does not convert) gets the report's
    problems as they are; only those naming a line count as requests."""
    report = job.report or {}
    problems = [e for e in report.get("errors") or [] if isinstance(e, dict)]
    stats = MergeStats()
    (folder / "result.jsonl").write_bytes(b"")
    fsync_file(folder / "result.jsonl")
    with (
        (folder / "error.jsonl").open("wb") as out,
        csvio.result_csv(folder / "result.csv") as table,
    ):
        lines = _rejected_lines(job, problems, max_line_bytes, unsent)
        for number, custom_id, code, message in lines:
            line = orjson.dumps(
                {
                    "id": None,
                    "custom_id": utf8_safe(custom_id) if custom_id is not None else None,
                    "response": None,
                    "error": {"code": code, "message": message},
                    "input_line": number,
                }
            )
            out.write(line + b"\n")
            table.add_request(line, "error.jsonl", custom_id)
            if number is None:
                continue  # a problem of the whole file, not a request
            stats.total += 1
            stats.failed += 1
            if never_ran(code, sent=False):
                stats.never_run += 1
        out.flush()
        os.fsync(out.fileno())
    return stats


def _rejected_lines(
    job: Job,
    problems: list[dict[str, Any]],
    max_line_bytes: int,
    unsent: tuple[str, str] | None = None,
) -> Iterator[tuple[int | None, str | None, str, str]]:
    """(input line, custom_id, code, message) of each line of a rejected input."""
    source = requests_file(job)
    if source is None:
        for item in problems:
            line = item.get("line")
            number = line if isinstance(line, int) and not isinstance(line, bool) else None
            yield number, None, str(item.get("code")), str(item.get("message"))
        return
    by_line: dict[int, dict[str, Any]] = {}
    for item in problems:
        line = item.get("line")
        if isinstance(line, int):
            by_line.setdefault(line, item)
    unlisted = unsent or rejection_reason(job.report or {})
    limit = sent_bytes(job) if job.kind == "jsonl" else None
    for number, raw in numbered(source, max_line_bytes, limit):
        listed = by_line.get(number)
        obj = read_line(raw) if raw is not None else None
        cid = obj.get("custom_id") if obj is not None else None
        if listed is not None:
            code, message = str(listed.get("code")), str(listed.get("message"))
        elif raw is not None and not raw.strip():
            code, message = "empty_line", "empty line; every line must be one request"
        else:
            code, message = unlisted
        yield number, cid if isinstance(cid, str) else None, code, message


# -- the input's copy -------------------------------------------------------------------


def unread_rejection(job: Job) -> bool:
    """PURE: was the input rejected on its size or blocks alone, never read (so never
    hashed)? Such an input is moved into the outbox, not copied."""
    if job.sha256 is not None or job.report is None or job.report.get("valid", True):
        return False
    codes = {e.get("code") for e in job.report.get("errors") or [] if isinstance(e, dict)}
    return bool(codes & UNREAD_CODES)


def discard_tmp(job: Job, tmp: Path) -> None:
    """Remove a publish temp folder left by a failed or killed attempt. An input moved
    into it goes back to the spool first; if that fails, the folder stays (the next
    attempt fails on it and tries again) rather than the input being lost."""
    if tmp.is_symlink():
        tmp.unlink()
        return
    if not tmp.exists():
        return
    spool_input = Path(job.spool_path)
    moved = tmp / spool_input.name
    if unread_rejection(job) and moved.exists() and not os.path.lexists(spool_input):
        os.rename(moved, spool_input)
        fsync_dir(spool_input.parent)
    shutil.rmtree(tmp, ignore_errors=True)


def keep_input_files(job: Job, parts: list[Part], tmp: Path, *, keep: bool) -> dict[str, Any]:
    """Put the input into the publish folder `tmp`; returns what summary.json says of it.

    - An input rejected unread (too large, sparse) is moved in with a rename (O(1)); on
      another filesystem (EXDEV) it stays in its spool folder (`input_kept_at`).
    - Otherwise exactly the validated bytes (`job.bytes`, checked against `job.sha256`)
      are copied, never hard-linked: a producer holding the file open must not change
      the published copy. Bytes appended after the claim go to `unsent.EXT`; a file
      changed in place is kept whole as `input.changed.EXT`, beside the part files that
      were sent. Both are kept even without `keep` (they hold bytes never sent).
    - A CSV job's JSONL conversion is batchd's own file, copied as is.
    """
    kept: dict[str, Any] = {}
    spool_input = Path(job.spool_path)
    if unread_rejection(job):
        if keep:
            kept.update(_move_input(spool_input, tmp / spool_input.name))
        return kept
    if spool_input.exists():
        changed = _keep_validated(job, parts, spool_input, tmp, keep)
        if changed is not None:
            kept["input_changed"] = changed
    jsonl_input = spool_input.with_name("input.jsonl")
    if keep and jsonl_input != spool_input and jsonl_input.exists():
        _copy_file(jsonl_input, tmp / jsonl_input.name)
    late = spool_input.with_name(LATE_SIDECAR)
    if late.exists():
        # A sidecar that came after the claim (the intake moved it here): never applied,
        # published beside the results so that its owner hears of it.
        _copy_file(late, tmp / LATE_SIDECAR)
        kept["late_sidecar"] = {"kept_as": LATE_SIDECAR, "note": LATE_SIDECAR_NOTE}
    return kept


def input_open_for_writing(path: Path) -> bool | None:
    """Whether a process holds the input at `path` open for writing (None: cannot tell,
    or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return open_for_writing(fd)
    finally:
        os.close(fd)


def late_input_bytes(job: Job, summary: dict[str, Any]) -> str | None:
    """Why the job's input must stay in the spool although the job is published: it is
    larger now than what the outbox folder accounted for (the validated bytes and any
    `unsent` ones), or a process still holds it open for writing. None when it may go."""
    source = Path(job.spool_path)
    if job.bytes is None or unread_rejection(job):
        return None
    try:
        size = os.stat(source).st_size
    except FileNotFoundError:
        return None
    changed = summary.get("input_changed")
    seen = changed.get("now", {}).get("bytes") if isinstance(changed, dict) else None
    accounted = seen if isinstance(seen, int) else job.bytes
    if size > accounted:
        return (
            f"{size - accounted} bytes reached the input after its results were published"
            f" (a producer still writing it): never sent, kept at {source}; drop them"
            " again as a new file"
        )
    if input_open_for_writing(source):
        return (
            f"a process still held the input open for writing when its results were"
            f" published: kept at {source} so that nothing it writes is lost"
        )
    return None


def _move_input(source: Path, dest: Path) -> dict[str, Any]:
    try:
        os.rename(source, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return {"input_kept_at": str(source)}
    fsync_dir(source.parent)
    return {}


def _keep_validated(
    job: Job, parts: list[Part], source: Path, tmp: Path, keep: bool
) -> dict[str, Any] | None:
    """Copy the validated bytes of `source`; what changed since validation, or None."""
    dest = tmp / source.name
    st = os.stat(source)
    if job.sha256 is None or job.bytes is None:
        if keep:  # an old row without the figures: the file as it is
            _copy_file(source, dest)
        return None
    mtime_changed = job.input_mtime_ns is not None and st.st_mtime_ns != job.input_mtime_ns
    if not keep and st.st_size == job.bytes and not mtime_changed:
        return None
    with source.open("rb") as src:
        digest, copied = _copy_hashed(src, dest if keep else None, job.bytes)
        intact = copied == job.bytes and digest == job.sha256
        appended = 0
        if intact and st.st_size > job.bytes:
            unsent = tmp / f"unsent{source.suffix}"
            appended = _copy_rest(src, unsent)
    if intact and appended == 0 and not mtime_changed:
        return None
    changed: dict[str, Any] = {
        "validated": {"bytes": job.bytes, "sha256": job.sha256, "mtime_ns": job.input_mtime_ns},
        "now": {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
        "appended_bytes": appended,
        "modified_in_place": not intact,
    }
    if appended:
        changed["unsent"] = f"unsent{source.suffix}"
        changed["note"] = UNSENT_NOTE
    if not intact:
        # What was validated cannot be copied from the file any more: the current file
        # is kept under its own name, beside the part files that were sent.
        dest.unlink(missing_ok=True)
        name = f"input.changed{source.suffix}"
        _copy_file(source, tmp / name)
        sent = []
        for part in parts:
            path = Path(part.path)
            if part.round == 0 and path != source and path.exists():
                target = f"input.{path.name}"
                _copy_file(path, tmp / target)
                sent.append(target)
        changed["kept_as"] = name
        changed["sent_parts"] = sent
        changed["note"] = CHANGED_NOTE.format(name=name)
    elif not appended:
        changed["note"] = "the file's mtime changed after it was claimed; its bytes did not"
    return changed


def _copy_hashed(src: IO[bytes], dest: Path | None, limit: int) -> tuple[str, int]:
    """Copy (when `dest` is given) and hash the first `limit` bytes of `src`; returns
    the sha256 and the bytes read (fewer when the file is shorter now)."""
    digest = hashlib.sha256()
    copied = 0
    out = dest.open("wb") if dest is not None else None
    try:
        while copied < limit:
            chunk = src.read(min(CHUNK_BYTES, limit - copied))
            if not chunk:
                break
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
            copied += len(chunk)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest(), copied


def _copy_rest(src: IO[bytes], dest: Path) -> int:
    """Copy what follows in `src` to `dest` (fsynced); its bytes (no file when none)."""
    copied = 0
    with dest.open("wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            out.write(chunk)
            copied += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if copied == 0:
        dest.unlink()
    return copied


def _copy_file(source: Path, dest: Path) -> None:
    """A copy of `source` (never a link: the copy must not change with it), fsynced."""
    with source.open("rb") as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, CHUNK_BYTES)
        out.flush()
        os.fsync(out.fileno())


def build_summary(
    job: Job,
    parts: list[Part],
    stats: MergeStats,
    outcome: Outcome,
    kept: dict[str, Any] | None = None,
    *,
    published_at: float,
    currency: str = "",
    folder: str | None = None,
    follows: dict[str, Any] | None = None,
    extras: list[ExtraBatch] | None = None,
) -> dict[str, Any]:
    """PURE: what summary.json says of the job: its input, outcome, counts, parts and
    timings; `kept` is what `keep_input_files` said of the input, `folder` the outbox
    folder's name (`name`, or `name-N` after a collision, which `follows` an earlier one);
    `extras` the batches made for its parts beside the ones they follow (a gateway's
    retried create), each with what it may have cost (`extra_batches`).

    Every timing is batchd's own wall clock (`published_at` too), as `clock.iso_utc`
    text; the service's own timestamps of each batch are apart, in its part's
    `provider_times`, under the Batch object's names."""
    kept = kept or {}
    return {
        "job_id": job.id,
        "name": job.name,
        "folder": folder if folder is not None else job.name,
        "follows": follows,
        "input": {
            "name": job.inbox_name,
            "name_hex": job.inbox_name_hex,
            "sha256": job.sha256,
            "bytes": job.bytes,
            "kind": job.kind,
        },
        "status": str(outcome),
        # The sidecar's options as the job ran with them (the rest: the daemon's defaults).
        "options": {
            k: v for k, v in job.options.items() if k not in ("submit_id", "sidecar_error")
        },
        # A `batchd retry` of another job: which one.
        "retry_of": job.options.get("retry_of"),
        "request_counts": {
            "total": stats.total,
            "completed": stats.completed,
            "failed": stats.failed,
        },
        "never_run": stats.never_run,
        "result_unavailable": stats.unavailable,
        "unattributed": stats.unattributed,
        "unattributed_reasons": stats.unattributed_reasons,
        "unattributed_lines": stats.unattributed_lines,
        "input_changed": kept.get("input_changed"),
        "input_kept_at": kept.get("input_kept_at"),
        "late_sidecar": kept.get("late_sidecar"),
        "usage": {**stats.usage, "per_model": stats.per_model},
        "cost": cost_summary(stats, currency),
        "error": job_error(job, parts),
        "parts": [
            {
                "seq": p.seq,
                "round": p.round,
                "requests": p.requests,
                "model": p.model,
                "endpoint": p.endpoint,
                "state": str(p.state),
                "batch_id": p.batch_id,
                "status": p.remote_status,
                "input_file_id": p.remote_file_id,
                "output_file_id": p.output_file_id,
                "error_file_id": p.error_file_id,
                "request_counts": p.request_counts,
                "errors": p.remote_errors,
                "unavailable": p.unavailable,
                "kept_on_service": _kept_files(p),
                "note": p.error,
                "provider_times": provider_times(p),
            }
            for p in parts
        ],
        "extra_batches": [
            {
                "part": e.part_seq,
                "batch_id": e.batch_id,
                "kept_batch_id": e.kept_batch_id,
                "status": e.status,
                "request_counts": e.request_counts,
                "cancel": str(e.cancel),
                "note": extra_note(e),
            }
            for e in extras or []
        ],
        "timings": {
            "claimed_at": iso_utc(job.created_at),
            "batches_created_at": [iso_utc(batch_created_at(p)) for p in parts],
            "batches_ended_at": [iso_utc(p.ended_at) for p in parts],
            "published_at": iso_utc(published_at),
        },
    }


def provider_times(part: Part) -> dict[str, str | None] | None:
    """PURE: the Batch object's own timestamps of the part's batch, each under its name
    (`remote.TIME_KEYS`) as `iso_utc` text, null when the service sent none or one that
    is not a time; None when the service never answered for the part's batch."""
    if part.provider_times is None:
        return None
    times: dict[str, str | None] = {}
    for key in TIME_KEYS:
        value = part.provider_times.get(key)
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        times[key] = iso_utc(number)
    return times


def numbered_name(name: str, n: int) -> str:
    """PURE: the outbox folder name of the `n`th job of a name: `NAME`, `NAME-2`, ..."""
    return name if n == 1 else f"{name}-{n}"


def copy_number(name: str, folder: str) -> int | None:
    """PURE: N when `folder` is `numbered_name(name, N)` for an N of 2 or more, else None
    (the job's own name, or a folder named otherwise)."""
    digits = folder.removeprefix(f"{name}-")
    if digits == folder or not (digits.isascii() and digits.isdigit()) or digits[0] == "0":
        return None
    n = int(digits)
    return n if 2 <= n <= MAX_COPIES else None


def job_error(job: Job, parts: list[Part]) -> dict[str, Any] | None:
    """PURE: what failed the job as a whole, stated once in summary.json (`error`): the
    whole-batch errors of the batches the service failed (the first one's code and
    message, then every failed batch under `batches`; their lines in error.jsonl refer to
    it as `batch_failed`), or the problem a rejected input was rejected for (the first
    the report lists: `report.json` has them all); else a note of the job's, or None."""
    failed = [error for error in (batch_error(p) for p in parts) if error is not None]
    if failed:
        first = failed[0]
        return {"code": first["code"], "message": first["message"], "batches": failed}
    report = job.report or {}
    if not report.get("valid", True):
        problems = [e for e in report.get("errors") or [] if isinstance(e, dict)]
        first = problems[0] if problems else {}
        line = first.get("line")
        where = f"line {line}: " if isinstance(line, int) else ""
        count = report.get("error_count") or len(problems)
        return {
            "code": str(first.get("code") or "rejected"),
            "message": f"the input was rejected: {where}{first.get('message') or ''}"
            f" ({count} problem{'s' if count != 1 else ''}: see report.json)",
            "report": "report.json",
        }
    if job.error and not publish_failed(job):
        return {"code": "job_note", "message": job.error}
    return None


def publish_failed(job: Job) -> bool:
    """PURE: is the job's note that of a publish that raised (not a note of its own)?"""
    return bool(job.error) and str(job.error).startswith(PUBLISH_FAILED)


def error_note(error: Any) -> str | None:
    """PURE: summary.json's `error` as one line for the job's record (`jobs --json`,
    `show`, the job.ended notification): `code: message`; None when there is none."""
    if isinstance(error, dict) and error.get("code") != "job_note":
        return f"{error.get('code')}: {error.get('message')}"
    return None


def _outbox_owner(path: Path, job_id: str) -> str | None:
    """Who holds an outbox name: None (nothing, not even a dangling symlink), "self"
    (this job's published folder) or "other" (anything else). A summary that cannot be
    read for a disk error raises: taking another name then could publish the job twice."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return "other"
    try:
        raw = (path / "summary.json").read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return "other"
    try:
        summary = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "other"
    return "self" if isinstance(summary, dict) and summary.get("job_id") == job_id else "other"


def _folder_job_id(path: Path) -> str | None:
    """The job id in the summary.json of the outbox folder `path` (never through a
    symlink); None when it is not a folder batchd published or cannot be read."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
        summary = orjson.loads((path / "summary.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    job_id = summary.get("job_id") if isinstance(summary, dict) else None
    return job_id if isinstance(job_id, str) else None


def _published_by(final: Path, job_id: str) -> bool:
    try:
        summary = orjson.loads((final / "summary.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(summary, dict) and summary.get("job_id") == job_id
