"""Collect results and publish each job into the outbox in one atomic step.

Collect: every ended part's output and error files are streamed to the spool (temp name,
fsync, rename) and their line counts checked against `request_counts`.

Publish: a hidden temp folder `outbox/.NAME.tmp-JOB` receives `result.jsonl` (successes
in input order, the service's lines byte for byte), `error.jsonl` (failures, each with
its `input_line`; requests that never ran get their own error code), `result.csv`,
`summary.json` and the input; each file is fsynced, then the folder is renamed to
`outbox/NAME` and the outbox fsynced. The name is committed before the rename, so a
crash on either side of it is settled by looking at the folder's `summary.json`. A write
or fsync that fails (EIO, ENOSPC) removes the temp folder, logs `publish_failed` and tries
the job again after a pause that doubles with each failure; the daemon carries on.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import orjson

from batchd import csvio
from batchd.api import AccountError, ApiError, BatchApi
from batchd.config import ProviderLimits
from batchd.failpoints import failpoint
from batchd.intake import fsync_dir
from batchd.logs import get_logger
from batchd.models import Job, JobState, Outcome, Part, PartState, RemoteStatus
from batchd.store import Store

log = get_logger(__name__)

NEVER_RUN = {
    RemoteStatus.EXPIRED: ("batch_expired", "the batch expired before this request ran"),
    RemoteStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    RemoteStatus.FAILED: ("batch_failed", "the service rejected the batch"),
    "lost": ("batch_lost", "the batch did not end within its completion window"),
}


def output_path(part: Part, kind: str) -> Path:
    return Path(part.path).with_name(f"part-{part.seq:03d}.{kind}.jsonl")


def count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                count += 1
    return count


class Collector:
    """Downloads the files of ended parts; moves finished jobs on to publishing, or
    (with `resubmit_failed`) plans a follow-up part for their retryable failures."""

    def __init__(
        self,
        store: Store,
        api: BatchApi,
        *,
        limits: ProviderLimits,
        resubmit_failed: int,
        on_ready: Callable[[], None],
        on_follow_up: Callable[[], None],
    ) -> None:
        self.store = store
        self.api = api
        self.limits = limits
        self.resubmit_failed = resubmit_failed
        self.on_ready = on_ready
        self.on_follow_up = on_follow_up

    async def run_once(self) -> bool:
        moved = False
        for part in await self.store.parts_in([PartState.ENDED], limit=100):
            try:
                moved |= await self.collect(part)
            except AccountError:
                return moved
            except ApiError as err:
                log.warning("download_failed", job_id=part.job_id, part=part.seq, error=str(err))
        moved |= await self.finish_jobs()
        return moved

    async def collect(self, part: Part) -> bool:
        warnings: list[str] = []
        for kind, file_id in (("output", part.output_file_id), ("error", part.error_file_id)):
            if not file_id:
                continue
            dest = output_path(part, kind)
            size = await self.api.download_file(file_id, dest)
            failpoint("download.after_request")
            lines = await asyncio.to_thread(count_lines, dest)
            expected = (part.request_counts or {}).get(
                "completed" if kind == "output" else "failed"
            )
            if isinstance(expected, int) and expected != lines:
                warnings.append(f"{kind} file has {lines} lines, request_counts says {expected}")
            log.info(
                "file_downloaded",
                job_id=part.job_id,
                part=part.seq,
                file_id=file_id,
                kind=kind,
                bytes=size,
                lines=lines,
            )
        await self.store.update_part(
            part.id,
            PartState.ENDED,
            state=PartState.COLLECTED,
            error="; ".join(warnings) or part.error,
        )
        return True

    async def finish_jobs(self) -> bool:
        moved = False
        for job in await self.store.settled_jobs():
            parts = await self.store.parts_of(job.id)
            if await self._follow_up(job, parts):
                continue
            if await self.store.update_job(job.id, JobState.RUNNING, state=JobState.PUBLISHING):
                log.info("job_collected", job_id=job.id, parts=len(parts))
                moved = True
        if moved:
            self.on_ready()
        return moved

    async def _follow_up(self, job: Job, parts: list[Part]) -> bool:
        """Resubmit retryable failures as new parts, at most `resubmit_failed` rounds."""
        round_ = max(p.round for p in parts) + 1
        if job.cancel_requested or round_ > self.resubmit_failed:
            return False
        source = Path(job.spool_path).with_name("input.jsonl")
        planned = await asyncio.to_thread(
            plan_follow_up, source, parts, self.limits, round_, job.id
        )
        if not planned:
            return False
        await self.store.add_parts(job.id, planned, round_)
        log.info(
            "follow_up_planned",
            job_id=job.id,
            round=round_,
            parts=len(planned),
            requests=sum(p["requests"] for p in planned),
        )
        self.on_follow_up()
        return True


def plan_follow_up(
    source: Path, parts: list[Part], limits: ProviderLimits, round_: int, job_id: str
) -> list[dict[str, Any]]:
    """Write the input lines of retryable failures into follow-up part files, one model
    per part and each within the model's limits; returns the part records."""
    wanted = {m.number for m in merged(source, parts) if retryable_failure(m)}
    if not wanted:
        return []
    seq = max(p.seq for p in parts)
    planned: list[dict[str, Any]] = []
    open_parts: dict[str, tuple[dict[str, Any], Any]] = {}

    def close(model: str) -> None:
        record, fh = open_parts.pop(model)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        planned.append(record)

    with source.open("rb") as src:
        for number, line in enumerate(src, start=1):
            if number not in wanted:
                continue
            line = _terminated(line)
            request = orjson.loads(line)
            model = str(request["body"]["model"])
            current = open_parts.get(model)
            if current is not None and (
                current[0]["requests"] + 1 > limits.requests_limit(model)
                or current[0]["bytes"] + len(line) > limits.bytes_limit(model)
            ):
                close(model)
                current = None
            if current is None:
                seq += 1
                path = source.with_name(f"followup-{round_}-{seq:03d}.jsonl")
                record: dict[str, Any] = {
                    "seq": seq,
                    "path": str(path),
                    "first_line": number,
                    "requests": 0,
                    "bytes": 0,
                    "model": model,
                    "endpoint": str(request["url"]),
                    "upload_name": f"batchd-{job_id}-p{seq:03d}.jsonl",
                }
                current = (record, path.open("wb"))
                open_parts[model] = current
            current[1].write(line)
            current[0]["requests"] += 1
            current[0]["bytes"] += len(line)
    for model in list(open_parts):
        close(model)
    return sorted(planned, key=lambda r: int(r["seq"]))


@dataclass(slots=True)
class MergeStats:
    total: int = 0
    completed: int = 0
    failed: int = 0
    never_run: int = 0
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )


def _add_usage(stats: MergeStats, answer: dict[str, Any]) -> None:
    body = (answer.get("response") or {}).get("body")
    if isinstance(body, str):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return
    for key in stats.usage:
        value = usage.get(key)
        if isinstance(value, int):
            stats.usage[key] += value


def _index(path: Path, slot: int, index: dict[str, tuple[int, int]]) -> None:
    """custom_id -> (file slot, byte offset) of every line of a result file."""
    offset = 0
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                try:
                    cid = orjson.loads(line).get("custom_id")
                except (orjson.JSONDecodeError, AttributeError):
                    cid = None
                if isinstance(cid, str):
                    index[cid] = (slot, offset)
            offset += len(line)


def _input_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, custom_id, model) of every request of a validated input."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
                cid, model = obj.get("custom_id"), (obj.get("body") or {}).get("model")
            except (orjson.JSONDecodeError, AttributeError):
                cid, model = None, None
            yield (
                number,
                cid if isinstance(cid, str) else None,
                model if isinstance(model, str) else None,
            )


def with_input_line(line: bytes, number: int) -> bytes:
    """PURE: the service's error line with `"input_line": N` added, its bytes otherwise kept."""
    body = line.rstrip(b"\r\n").rstrip()
    if body.endswith(b"}"):
        return body[:-1] + b',"input_line":' + str(number).encode() + b"}\n"
    return orjson.dumps({"input_line": number, "raw": body.decode("utf-8", "replace")}) + b"\n"


@dataclass(frozen=True, slots=True)
class Merged:
    """One request of the job after every part: its input line and final answer."""

    number: int
    custom_id: str | None
    model: str | None
    ok: bool
    line: bytes  # the service's line (successes as sent; failures with input_line)
    answer: dict[str, Any] | None  # the parsed line; None for a request that never ran


def merged(job_input: Path, parts: list[Part]) -> Iterator[Merged]:
    """Every request in input order with its final answer across all parts.

    A success in any part wins over failures; among failures the latest part's wins (a
    follow-up part retries earlier failures). A request with no answer at all gets an
    error line of its own saying why it never ran.
    """
    # One entry per request of the job (about 100 bytes each).
    index: dict[str, tuple[int, int]] = {}
    files: list[Path] = []
    collected = [p for p in parts if p.state == PartState.COLLECTED]
    for kind in ("error", "output"):
        for part in collected:
            path = output_path(part, kind)
            if path.exists():
                files.append(path)
                _index(path, len(files) - 1, index)
    handles = [p.open("rb") for p in files]
    reasons = {p.seq: _never_run_reason(p) for p in parts}
    originals = [p for p in parts if p.round == 0] or parts
    try:
        for number, cid, model in _input_lines(job_input):
            hit = index.get(cid) if cid is not None else None
            if hit is not None:
                fh = handles[hit[0]]
                fh.seek(hit[1])
                raw = fh.readline()
                answer = _parse(raw)
                if answer is not None and _is_success(answer):
                    yield Merged(number, cid, model, True, _terminated(raw), answer)
                else:
                    yield Merged(number, cid, model, False, with_input_line(raw, number), answer)
                continue
            code, message = reasons[part_for(originals, number, model).seq]
            line = orjson.dumps(
                {
                    "id": None,
                    "custom_id": cid,
                    "response": None,
                    "error": {
                        "code": code or "result_missing",
                        "message": message or "the service returned no result for this request",
                    },
                    "input_line": number,
                }
            )
            yield Merged(number, cid, model, False, line + b"\n", None)
    finally:
        for fh in handles:
            fh.close()


def merge(job_input: Path, parts: list[Part], result: Path, errors: Path) -> MergeStats:
    """Write successes and failures in input order into `result` and `errors`."""
    stats = MergeStats()
    with result.open("wb") as res, errors.open("wb") as err:
        for item in merged(job_input, parts):
            stats.total += 1
            if item.ok:
                res.write(item.line)
                stats.completed += 1
                if item.answer is not None:
                    _add_usage(stats, item.answer)
            else:
                err.write(item.line)
                stats.failed += 1
                if item.answer is None:
                    stats.never_run += 1
        for out in (res, err):
            out.flush()
            os.fsync(out.fileno())
    return stats


def _terminated(line: bytes) -> bytes:
    return line if line.endswith(b"\n") else line + b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _is_success(obj: dict[str, Any]) -> bool:
    if obj.get("error"):
        return False
    response = obj.get("response")
    return isinstance(response, dict) and response.get("status_code") in (200, None)


RETRYABLE_NEVER_RUN = frozenset({"batch_expired", "batch_lost", "result_missing"})
_RETRYABLE_WORDS = ("throttl", "internal", "timeout", "unavailable", "overload", "rate_limit")


def retryable_failure(item: Merged) -> bool:
    """PURE: is this failure worth paying for again? Expired, lost or missing requests,
    and service-side errors (429, 5xx, throttling, timeouts) are; bad requests,
    cancellations and rejected batches are not."""
    if item.ok:
        return False
    answer = item.answer or _parse(item.line) or {}
    error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
    code = str((error or {}).get("code") or "")
    if code in RETRYABLE_NEVER_RUN:
        return True
    response = answer.get("response")
    status = response.get("status_code") if isinstance(response, dict) else None
    if isinstance(status, int) and (status in (408, 429) or status >= 500):
        return True
    return any(word in code.lower() for word in _RETRYABLE_WORDS)


def part_for(parts: list[Part], line: int, model: str | None) -> Part:
    """PURE: the part an input line went to. Parts hold consecutive lines of the input
    (or, grouped by model, consecutive lines of one model), in `seq` order."""
    same_model = [p for p in parts if p.model == model] or parts
    best = same_model[0]
    for part in same_model:
        if part.first_line <= line:
            best = part
    return best


def _never_run_reason(part: Part) -> tuple[str, str]:
    if part.state == PartState.FAILED:
        return "not_submitted", f"the part could not be submitted: {part.error}"
    if part.state == PartState.CANCELLED:
        return NEVER_RUN[RemoteStatus.CANCELLED]
    code, message = NEVER_RUN.get(part.remote_status or "", ("result_missing", ""))
    if part.remote_status == RemoteStatus.FAILED and part.remote_errors:
        message = f"{message}: {orjson.dumps(part.remote_errors).decode()[:1000]}"
    return code, message


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


class Publisher:
    """Publishes jobs in PUBLISHING into the outbox, then queues remote clean-up."""

    def __init__(
        self,
        store: Store,
        outbox: Path,
        *,
        keep_input: bool,
        delete_remote_files: bool,
        on_published: Callable[[], None],
        on_retry_due: Callable[[], None] = lambda: None,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 300.0,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.on_retry_due = on_retry_due
        self.keep_input = keep_input
        self.delete_remote_files = delete_remote_files
        self.on_published = on_published
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.failures = 0
        # job id -> (failed attempts in a row, loop time of the next attempt)
        self.backoff: dict[str, tuple[int, float]] = {}

    async def run_once(self) -> bool:
        moved = False
        loop = asyncio.get_running_loop()
        for job in await self.store.jobs([JobState.PUBLISHING], limit=50):
            failed, due_at = self.backoff.get(job.id, (0, 0.0))
            if loop.time() < due_at:
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
                self.failures += 1
                delay = retry_delay_s(failed + 1, self.retry_base_s, self.retry_cap_s)
                self.backoff[job.id] = (failed + 1, loop.time() + delay)
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
            else:
                if self.backoff.pop(job.id, None) is not None:
                    log.info("publish_recovered", job_id=job.id, attempts=failed + 1)
        return moved

    async def _final_dir(self, job: Job) -> Path:
        """The job's outbox folder: its stem, or `STEM-N` when another job has it."""
        if job.outbox_path:
            return Path(job.outbox_path)
        name, n = job.name, 1
        while (
            await self.store.outbox_path_taken(str(self.outbox / name))
            or (self.outbox / name).exists()
        ):
            n += 1
            name = f"{job.name}-{n}"
        return self.outbox / name

    async def publish(self, job: Job) -> bool:
        parts = await self.store.parts_of(job.id)
        final = await self._final_dir(job)
        if job.outbox_path is None:
            await self.store.update_job(job.id, JobState.PUBLISHING, outbox_path=str(final))
        if _published_by(final, job.id):
            return await self._done(job, parts, final, None)
        tmp = self.outbox / f".{final.name}.tmp-{job.id}"
        await self.store.update_job(job.id, JobState.PUBLISHING, crash_count=job.crash_count + 1)
        try:
            summary = await asyncio.to_thread(self._build, job, parts, tmp)
            failpoint("publish.before_rename", job.inbox_name)
            await asyncio.to_thread(os.rename, tmp, final)
        except BaseException:
            # Whatever failed (a full or failing disk), the half-written folder goes: it
            # holds space the next attempt needs, and it was never visible under `final`.
            await asyncio.to_thread(shutil.rmtree, tmp, True)
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
            ids = [f for p in parts for f in (p.remote_file_id, p.output_file_id, p.error_file_id)]
            await self.store.add_garbage(ids, f"job {job.id} published", time.time())
        await asyncio.to_thread(shutil.rmtree, Path(job.spool_path).parent, True)
        await self.store.update_job(
            job.id,
            JobState.PUBLISHING,
            state=JobState.PUBLISHED,
            outcome=outcome,
            crash_count=0,
            outbox_path=str(final),
            completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            usage=summary.get("usage"),
        )
        log.info(
            "job_published",
            job_id=job.id,
            outbox=str(final),
            status=outcome,
            request_counts=summary.get("request_counts"),
        )
        self.on_published()
        return True

    def _build(self, job: Job, parts: list[Part], tmp: Path) -> dict[str, Any]:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        spool_input = Path(job.spool_path)
        jsonl_input = spool_input.with_name("input.jsonl")
        if job.report is not None and not job.report.get("valid", True):
            stats = _write_rejection(job.report, tmp / "result.jsonl", tmp / "error.jsonl")
            outcome: Outcome = Outcome.REJECTED
        else:
            stats = merge(jsonl_input, parts, tmp / "result.jsonl", tmp / "error.jsonl")
            outcome = decide_outcome(job, parts, stats)
        failpoint("publish.write", job.inbox_name)
        write_results_csv([tmp / "result.jsonl", tmp / "error.jsonl"], tmp / "result.csv")
        if self.keep_input:
            # A CSV input is kept with the JSONL it became, which `batchd retry` reuses.
            for source in {spool_input, jsonl_input}:
                if source.exists():
                    dest = tmp / source.name
                    try:
                        os.link(source, dest)
                    except OSError:
                        shutil.copyfile(source, dest)
                    _fsync_file(dest)
        summary = build_summary(job, parts, stats, outcome)
        (tmp / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        _fsync_file(tmp / "summary.json")
        if job.report is not None:
            (tmp / "report.json").write_bytes(orjson.dumps(job.report, option=orjson.OPT_INDENT_2))
            _fsync_file(tmp / "report.json")
        failpoint("publish.fsync", job.inbox_name)
        fsync_dir(tmp)
        return summary


def retry_delay_s(failures: int, base_s: float, cap_s: float) -> float:
    """PURE: the pause before the next publish attempt after `failures` in a row."""
    return float(min(cap_s, base_s * 2 ** min(max(0, failures - 1), 30)))


def write_results_csv(sources: list[Path], target: Path) -> None:
    """The seed's CSV columns over every result and error line, UTF-8 with a BOM (Excel)."""
    with target.open("w", encoding="utf-8-sig", newline="") as out:
        with ExitStack() as stack:
            files = [stack.enter_context(p.open("rb")) for p in sources]
            csvio.jsonl_to_csv(chain.from_iterable(files), out)
        out.flush()
        os.fsync(out.fileno())


def _write_rejection(report: dict[str, Any], result: Path, errors: Path) -> MergeStats:
    result.write_bytes(b"")
    with errors.open("wb") as fh:
        for item in report.get("errors") or []:
            fh.write(
                orjson.dumps(
                    {
                        "input_line": item.get("line"),
                        "error": {"code": item.get("code"), "message": item.get("message")},
                    }
                )
                + b"\n"
            )
    _fsync_file(result)
    _fsync_file(errors)
    total = int(report.get("requests") or 0)
    return MergeStats(total=total, failed=total)


def build_summary(
    job: Job, parts: list[Part], stats: MergeStats, outcome: Outcome
) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "name": job.name,
        "input": {
            "name": job.inbox_name,
            "sha256": job.sha256,
            "bytes": job.bytes,
            "kind": job.kind,
        },
        "status": str(outcome),
        "request_counts": {
            "total": stats.total,
            "completed": stats.completed,
            "failed": stats.failed,
        },
        "never_run": stats.never_run,
        "usage": stats.usage,
        "error": job.error,
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
                "note": p.error,
            }
            for p in parts
        ],
        "timings": {
            "claimed_at": job.created_at,
            "batches_created_at": [p.created_remote_at for p in parts],
            "batches_ended_at": [p.ended_at for p in parts],
            "published_at": time.time(),
        },
    }


def _published_by(final: Path, job_id: str) -> bool:
    try:
        summary = orjson.loads((final / "summary.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(summary, dict) and summary.get("job_id") == job_id


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
