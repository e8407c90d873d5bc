"""Collect results and publish each job into the outbox in one atomic step.

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

Publish: a hidden temp folder `outbox/.NAME.tmp-JOB` receives `result.jsonl` (successes
in input order, the service's lines byte for byte), `error.jsonl` (failures, each with
its `input_line`; requests that never ran get their own error code), `unattributed.jsonl`
(result lines no request of the input claims, byte for byte; only when there are any),
`result.csv`, `summary.json` and a copy of the validated input; each file is fsynced,
then the folder is renamed to `outbox/NAME` and the outbox fsynced. The name is
committed before the rename, so a crash on either side of it is settled by looking at
the folder's `summary.json`. A write or fsync that fails (EIO, ENOSPC) removes the temp
folder, logs `publish_failed` and tries the job again after a pause that doubles with
each failure; the daemon carries on.

Result lines are paid for and never dropped: they are read with `batchd.lines` (NaN,
1e400, lone surrogates, lines cut short, lines of any length in bounded memory). A line
that a parser cannot read counts as a success when it came from the output file and as
a failure when it came from the error file; a line over `max_line_bytes` is copied in
chunks, never held whole.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batchd import csvio
from batchd.api import AccountError, ApiError, BatchApi
from batchd.config import ProviderLimits
from batchd.failpoints import failpoint
from batchd.fsutil import fsync_dir, fsync_file
from batchd.lines import (
    CHUNK_BYTES,
    DEFAULT_MAX_LINE_BYTES,
    Line,
    copy_line,
    copy_range,
    custom_id_of,
    identity,
    iter_lines,
    line_at,
    printable,
    read_line,
)
from batchd.lines import (
    count_lines as count_file_lines,
)
from batchd.logs import get_logger
from batchd.models import Job, JobState, Outcome, Part, PartState, RemoteStatus, upload_name
from batchd.problems import StepPolicy, step_failed
from batchd.store import Store

log = get_logger(__name__)

NEVER_RUN = {
    RemoteStatus.EXPIRED: ("batch_expired", "the batch expired before this request ran"),
    RemoteStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    RemoteStatus.FAILED: ("batch_failed", "the service rejected the batch"),
    "lost": ("batch_lost", "the batch did not end within its completion window"),
}
# The code of requests whose result file could not be fetched: they most likely ran
# (and were billed), so they are not resubmitted on their own.
RESULT_UNAVAILABLE = "result_unavailable"
# A reason in `Part.unavailable` that starts so names a file given up after transient
# failures: it may still be fetchable, and is never deleted on the service.
GAVE_UP = "gave up after"
# Rejections decided on the input's size or blocks alone: the input was never read, so
# it is moved into the outbox (a rename), never copied.
UNREAD_CODES = frozenset({"input_too_large", "sparse_file"})
# What summary.json lists of the lines kept in unattributed.jsonl (all are counted).
MAX_LISTED_STRAYS = 100
UNSENT_NOTE = (
    "these bytes arrived after the file was claimed and were not sent:"
    " drop them again as a new file"
)
CHANGED_NOTE = (
    "the file was changed in place after it was claimed; what was validated and sent is"
    " not the current file, which is kept as {name}"
)


def output_path(part: Part, kind: str) -> Path:
    return Path(part.path).with_name(f"part-{part.seq:03d}.{kind}.jsonl")


def count_lines(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> int:
    """Non-blank lines of a file, read in bounded memory."""
    with path.open("rb") as fh:
        return count_file_lines(fh, max_line_bytes)


# -- collect ----------------------------------------------------------------------------


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
    broken: BaseException | None = None  # a disk error or a bug


@dataclass(frozen=True, slots=True)
class CollectDecision:
    """What to do with a part after an attempt at its files."""

    done: bool  # move it to COLLECTED
    unavailable: dict[str, str]
    note: str | None
    failures: int  # transient failures in a row, this attempt included
    retry_in_s: float | None = None  # not done: try again after this pause


def decide_collect(
    part: Part, fetched: list[Fetched], policy: StepPolicy, expected: dict[str, Any] | None
) -> CollectDecision:
    """PURE: collected, collected with files given up, or a pause before another try."""
    notes: list[str] = []
    for item in fetched:
        want = (expected or {}).get("completed" if item.kind == "output" else "failed")
        if item.lines is not None and isinstance(want, int) and want != item.lines:
            notes.append(f"{item.kind} file has {item.lines} lines, request_counts says {want}")
    transient = [f for f in fetched if f.transient is not None]
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


def kept_on_service(reason: str) -> bool:
    """PURE: was this file given up after transient failures (so it may still exist)?"""
    return reason.startswith(GAVE_UP)


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
        *,
        limits: ProviderLimits,
        resubmit_failed: int,
        on_ready: Callable[[], None],
        on_follow_up: Callable[[], None],
        policy: StepPolicy | None = None,
        download_concurrency: int = 4,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        stopping: asyncio.Event | None = None,
        rescan_s: float = 1.0,
    ) -> None:
        self.store = store
        self.api = api
        self.limits = limits
        self.resubmit_failed = resubmit_failed
        self.on_ready = on_ready
        self.on_follow_up = on_follow_up
        self.policy = policy or StepPolicy()
        self.download_concurrency = download_concurrency
        self.max_line_bytes = max_line_bytes
        self.stopping = stopping
        self.rescan_s = rescan_s
        self._account_trouble = False

    def _stop_requested(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    async def idle_s(self, longest_s: float) -> float:
        """How long the collect stage may sleep: until a part pausing after a failed
        download is due again, at most `longest_s`."""
        due = await self.store.next_retry_at([PartState.ENDED])
        now = time.time()
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
        scanned_at = looked_at = time.time()
        collected_since = False
        stop = asyncio.ensure_future(self.stopping.wait()) if self.stopping else None
        try:
            while not self._stop_requested():
                now = time.time()
                if not self._account_trouble and (not tasks or now - scanned_at >= self.rescan_s):
                    scanned_at = now
                    for part in await self.store.parts_in([PartState.ENDED], 100, ready_at=now):
                        if part.id not in tasks:
                            tasks[part.id] = asyncio.create_task(
                                self._collect_guarded(part, slots),
                                name=f"batchd.collect.{part.job_id}.{part.seq}",
                            )
                if not tasks:
                    pause = await self._short_pause(now)
                    if pause is None or self._account_trouble:
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
                if collected_since and (not tasks or time.time() - looked_at >= self.rescan_s):
                    moved |= await self.finish_jobs()
                    looked_at, collected_since = time.time(), False
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
        """`collect`; an unexpected error (a disk error, a bug) fails this part's step
        only: a note, a pause and, in the end, parking."""
        try:
            return await self.collect(part, slots)
        except Exception as exc:
            log.exception("part_step_crashed", job_id=part.job_id, part=part.seq)
            await step_failed(
                self.store, part, f"{type(exc).__name__}: {exc}", self.policy, time.time()
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
        fetched = list(await asyncio.gather(*(self._fetch(part, k, f, slots) for k, f in wanted)))
        for item in fetched:
            if item.broken is not None:
                raise item.broken
        if any(item.account is not None for item in fetched):
            self._account_trouble = True
            return False
        decision = decide_collect(part, fetched, self.policy, part.request_counts)
        now = time.time()
        if not decision.done:
            await self.store.update_part(
                part.id,
                PartState.ENDED,
                attempts=decision.failures,
                error=decision.note,
                retry_at=now + (decision.retry_in_s or 0.0),
            )
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
        return await self.store.update_part(
            part.id,
            PartState.ENDED,
            state=PartState.COLLECTED,
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
        except ApiError as err:
            if err.retryable:
                return Fetched(kind, file_id, transient=str(err))
            return Fetched(kind, file_id, permanent=str(err))
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
            plan_follow_up,
            source,
            parts,
            self.limits,
            round_,
            job.id,
            max_line_bytes=self.max_line_bytes,
            input_bytes=sent_bytes(job),
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


def sent_bytes(job: Job) -> int | None:
    """PURE: how much of the job's JSONL input was validated (and so sent): the first
    `job.bytes` of a JSONL input (a producer may have appended to it since); a CSV job's
    JSONL is batchd's own conversion, read whole."""
    return job.bytes if job.kind == "jsonl" else None


def plan_follow_up(
    source: Path,
    parts: list[Part],
    limits: ProviderLimits,
    round_: int,
    job_id: str,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    input_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """Write the input lines of retryable failures into follow-up part files, one model
    per part and each within the model's limits; returns the part records."""
    wanted = {
        m.number
        for m in merged(source, parts, max_line_bytes=max_line_bytes, input_bytes=input_bytes)
        if retryable_failure(m)
    }
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

    for number, raw in _numbered(source, max_line_bytes, input_bytes):
        if number not in wanted or raw is None:
            continue
        line = _terminated(raw)
        request = read_line(line)
        body = request.get("body") if request is not None else None
        if request is None or not isinstance(body, dict) or "model" not in body:
            continue  # not a request any more (the input changed): nothing to resubmit
        model = str(body["model"])
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
                "upload_name": upload_name(job_id, seq),
            }
            current = (record, path.open("wb"))
            open_parts[model] = current
        current[1].write(line)
        current[0]["requests"] += 1
        current[0]["bytes"] += len(line)
    for model in list(open_parts):
        close(model)
    return sorted(planned, key=lambda r: int(r["seq"]))


# -- merge ------------------------------------------------------------------------------


@dataclass(slots=True)
class MergeStats:
    total: int = 0
    completed: int = 0
    failed: int = 0
    never_run: int = 0
    unavailable: int = 0  # requests published as result_unavailable
    unattributed: int = 0  # lines kept in unattributed.jsonl
    unattributed_reasons: dict[str, int] = field(default_factory=dict)
    unattributed_lines: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )


def _add_usage(stats: MergeStats, answer: dict[str, Any]) -> None:
    response = answer.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    if isinstance(body, str):
        body = read_line(body.encode("utf-8", "surrogatepass"))
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return
    for key in stats.usage:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            stats.usage[key] += value


@dataclass(frozen=True, slots=True)
class Source:
    """One downloaded result file of a part."""

    path: Path
    kind: str  # "output" or "error"
    part: Part


def _sources(parts: list[Part]) -> list[Source]:
    """Error files first, then output files, each in part order: a later entry for the
    same custom_id replaces an earlier one (a success wins; a follow-up's answer wins
    over the failure it retried)."""
    found: list[Source] = []
    collected = [p for p in parts if p.state == PartState.COLLECTED]
    for kind in ("error", "output"):
        for part in collected:
            path = output_path(part, kind)
            if path.exists():
                found.append(Source(path, kind, part))
    return found


def _line_id(line: Line) -> str | None:
    if line.data is None:
        return custom_id_of(line.head)
    return identity(line.data, read_line(line.data))


def _superseded(earlier: Source, later: Source) -> bool:
    """PURE: does `later` replace `earlier` as expected (a failure retried by a later
    round)? Any other second answer for a request is a duplicate, kept apart."""
    return earlier.kind == "error" and earlier.part.round < later.part.round


@dataclass(slots=True)
class Strays:
    """Result lines no request claims: copied byte for byte into `path` (created on the
    first one), counted by reason, the first few listed for summary.json."""

    path: Path | None
    stats: MergeStats
    _out: IO[bytes] | None = None

    def keep(self, fh: IO[bytes], line: Line, source: Source, reason: str, cid: str | None) -> None:
        stats = self.stats
        stats.unattributed += 1
        stats.unattributed_reasons[reason] = stats.unattributed_reasons.get(reason, 0) + 1
        if len(stats.unattributed_lines) < MAX_LISTED_STRAYS:
            stats.unattributed_lines.append(
                {
                    "line": stats.unattributed,
                    "reason": reason,
                    "custom_id": printable(cid) if cid is not None else None,
                    "part": source.part.seq,
                    "file": source.kind,
                    "file_id": (
                        source.part.output_file_id
                        if source.kind == "output"
                        else source.part.error_file_id
                    ),
                    "bytes": line.size,
                }
            )
        if self.path is None:
            return
        if self._out is None:
            self._out = self.path.open("wb")
        copy_line(fh, line, self._out)

    def close(self) -> None:
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None


def _index(
    sources: list[Source], handles: list[IO[bytes]], max_line_bytes: int, strays: Strays
) -> dict[str, tuple[int, int]]:
    """custom_id -> (source slot, byte offset) of every result line; lines without a
    custom_id and second answers for a request go to `strays` as they are met."""
    index: dict[str, tuple[int, int]] = {}
    for slot, source in enumerate(sources):
        fh = handles[slot]
        fh.seek(0)
        for line in iter_lines(fh, max_line_bytes):
            if line.blank:
                continue
            cid = _line_id(line)
            if cid is None:
                strays.keep(fh, line, source, "no_custom_id", None)
            else:
                earlier = index.get(cid)
                if earlier is not None and not _superseded(sources[earlier[0]], source):
                    old_fh = handles[earlier[0]]
                    old = line_at(old_fh, earlier[1], max_line_bytes)
                    strays.keep(old_fh, old, sources[earlier[0]], "duplicate", cid)
                index[cid] = (slot, line.offset)
            # A copy may have moved the handle the pass reads: back to where it was.
            fh.seek(line.offset + line.size)
    return index


def _numbered(
    path: Path, max_line_bytes: int, limit: int | None
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of every line of an input, blank ones included, within its
    first `limit` bytes; None for a line over the cap (never a valid request)."""
    with path.open("rb") as fh:
        for number, line in enumerate(iter_lines(fh, max_line_bytes), start=1):
            if limit is not None and line.offset >= limit:
                return
            data = line.data
            if data is not None and limit is not None and line.offset + line.size > limit:
                data = data[: limit - line.offset]
            yield number, data


def _input_lines(
    path: Path, max_line_bytes: int, limit: int | None
) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, custom_id, model) of every request of a validated input."""
    for number, raw in _numbered(path, max_line_bytes, limit):
        if raw is not None and not raw.strip():
            continue
        obj = read_line(raw) if raw is not None else None
        cid = obj.get("custom_id") if obj is not None else None
        body = obj.get("body") if obj is not None else None
        model = body.get("model") if isinstance(body, dict) else None
        yield (
            number,
            cid if isinstance(cid, str) else None,
            model if isinstance(model, str) else None,
        )


def with_input_line(line: bytes, number: int) -> bytes:
    """PURE: the service's error line with `"input_line": N` added, its bytes otherwise kept."""
    body = line.rstrip(b"\r\n").rstrip()
    if body.endswith(b"}"):
        inner = body[:-1].rstrip()
        comma = b"" if inner.endswith(b"{") else b","
        return body[:-1] + comma + b'"input_line":' + str(number).encode() + b"}\n"
    return orjson.dumps({"input_line": number, "raw": body.decode("utf-8", "replace")}) + b"\n"


_WHITESPACE = b" \t\r\n"


def write_with_input_line(fh: IO[bytes], line: Line, number: int, out: IO[bytes]) -> None:
    """`with_input_line` for a line too long to hold: copied in chunks up to its closing
    brace, then `,"input_line":N}`; a line that does not end with a brace is written as
    `{"input_line":N,"raw":"..."}`, its text escaped chunk by chunk."""
    # The end of the line's last byte that is not whitespace, found from the end back.
    last = line.offset + line.size
    while last > line.offset:
        start = max(line.offset, last - 4096)
        fh.seek(start)
        chunk = fh.read(last - start).rstrip(_WHITESPACE)
        if chunk:
            last = start + len(chunk)
            break
        last = start
    closing = b""
    if last > line.offset:
        fh.seek(last - 1)
        closing = fh.read(1)
    if closing == b"}":
        before = max(line.offset, last - 1 - 4096)
        fh.seek(before)
        comma = b"" if fh.read(last - 1 - before).rstrip(_WHITESPACE).endswith(b"{") else b","
        copy_range(fh, line.offset, last - 1 - line.offset, out)
        out.write(comma + b'"input_line":' + str(number).encode() + b"}\n")
        return
    out.write(b'{"input_line":' + str(number).encode() + b',"raw":"')
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    fh.seek(line.offset)
    left = last - line.offset
    while left > 0:
        chunk = fh.read(min(CHUNK_BYTES, left))
        if not chunk:
            break
        left -= len(chunk)
        out.write(orjson.dumps(decoder.decode(chunk, left <= 0))[1:-1])
    out.write(b'"}\n')


@dataclass(frozen=True, slots=True)
class LongLine:
    """Where a result line too long to hold is: it is copied from there."""

    path: Path
    line: Line


@dataclass(frozen=True, slots=True)
class Merged:
    """One request of the job after every part: its input line and final answer."""

    number: int
    custom_id: str | None
    model: str | None
    ok: bool
    # The line to publish (successes as sent; failures with input_line); None for a
    # line too long to hold, copied from `long` instead.
    line: bytes | None
    answer: dict[str, Any] | None  # the parsed line; None when unread or never run
    long: LongLine | None = None
    never_ran: bool = False  # no answer at all: the line is batchd's own
    code: str | None = None  # batchd's error code for a request without an answer


def merged(
    job_input: Path,
    parts: list[Part],
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    input_bytes: int | None = None,
    strays: Strays | None = None,
) -> Iterator[Merged]:
    """Every request in input order with its final answer across all parts.

    A success in any part wins over failures; among failures the latest part's wins (a
    follow-up part retries earlier failures). A request with no answer at all gets an
    error line of its own saying why: it never ran, or its result file could not be
    fetched. Result lines no request claims (no custom_id, an unknown one, a second
    answer) go to `strays`. Only the first `input_bytes` of the input are read.
    """
    sources = _sources(parts)
    handles: list[IO[bytes]] = [s.path.open("rb") for s in sources]
    kept = strays if strays is not None else Strays(None, MergeStats())
    reasons = {p.seq: _missing_reason(p) for p in parts}
    originals = [p for p in parts if p.round == 0] or parts
    try:
        # One entry per request of the job (about 100 bytes each).
        index = _index(sources, handles, max_line_bytes, kept)
        for number, cid, model in _input_lines(job_input, max_line_bytes, input_bytes):
            hit = index.pop(cid, None) if cid is not None else None
            if hit is not None and cid is not None:
                source = sources[hit[0]]
                line = line_at(handles[hit[0]], hit[1], max_line_bytes)
                yield _answered(number, cid, model, source, line)
                continue
            code, message = reasons[part_for(originals, number, model).seq]
            error_line = orjson.dumps(
                {
                    "id": None,
                    "custom_id": printable(cid) if cid is not None else None,
                    "response": None,
                    "error": {
                        "code": code or "result_missing",
                        "message": message or "the service returned no result for this request",
                    },
                    "input_line": number,
                }
            )
            yield Merged(
                number,
                cid,
                model,
                False,
                error_line + b"\n",
                None,
                never_ran=True,
                code=code or "result_missing",
            )
        # Answers for custom_ids the input does not have.
        for cid, (slot, offset) in sorted(index.items(), key=lambda item: item[1]):
            line = line_at(handles[slot], offset, max_line_bytes)
            kept.keep(handles[slot], line, sources[slot], "unknown_custom_id", cid)
    finally:
        for fh in handles:
            fh.close()


def _answered(number: int, cid: str, model: str | None, source: Source, line: Line) -> Merged:
    """PURE: a request's answer from its line: parsed when it can be; a line no parser
    reads (or too long to hold) is a success from the output file, a failure from the
    error file."""
    if line.data is None:
        ok = source.kind == "output"
        return Merged(number, cid, model, ok, None, None, LongLine(source.path, line))
    answer = read_line(line.data)
    ok = _is_success(answer) if answer is not None else source.kind == "output"
    raw = _terminated(line.data) if ok else with_input_line(line.data, number)
    return Merged(number, cid, model, ok, raw, answer)


def merge(
    job_input: Path,
    parts: list[Part],
    result: Path,
    errors: Path,
    unattributed: Path | None = None,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    input_bytes: int | None = None,
) -> MergeStats:
    """Write successes and failures in input order into `result` and `errors`, and the
    result lines no request claims into `unattributed` (created only when there are
    any); in bounded memory whatever the lines' lengths."""
    stats = MergeStats()
    strays = Strays(unattributed, stats)
    try:
        with result.open("wb") as res, errors.open("wb") as err:
            for item in merged(
                job_input,
                parts,
                max_line_bytes=max_line_bytes,
                input_bytes=input_bytes,
                strays=strays,
            ):
                stats.total += 1
                if item.ok:
                    _write(item, res)
                    stats.completed += 1
                    if item.answer is not None:
                        _add_usage(stats, item.answer)
                else:
                    _write(item, err)
                    stats.failed += 1
                    if item.code == RESULT_UNAVAILABLE:
                        stats.unavailable += 1
                    elif item.never_ran:
                        stats.never_run += 1
            for out in (res, err):
                out.flush()
                os.fsync(out.fileno())
    finally:
        strays.close()
    return stats


def _write(item: Merged, out: IO[bytes]) -> None:
    if item.line is not None:
        out.write(item.line)
        return
    assert item.long is not None
    with item.long.path.open("rb") as fh:
        if item.ok:
            copy_line(fh, item.long.line, out)
        else:
            write_with_input_line(fh, item.long.line, item.number, out)


def _terminated(line: bytes) -> bytes:
    return line if line.endswith(b"\n") else line + b"\n"


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


def part_for(parts: list[Part], line: int, model: str | None) -> Part:
    """PURE: the part an input line went to. Parts hold consecutive lines of the input
    (or, grouped by model, consecutive lines of one model), in `seq` order."""
    same_model = [p for p in parts if p.model == model] or parts
    best = same_model[0]
    for part in same_model:
        if part.first_line <= line:
            best = part
    return best


def _missing_reason(part: Part) -> tuple[str, str]:
    """PURE: the code and message of a request of `part` without any answer."""
    if part.unavailable:
        files = "; ".join(
            f"the {kind} file {_file_of(part, kind)} ({reason})"
            for kind, reason in sorted(part.unavailable.items())
        )
        return RESULT_UNAVAILABLE, f"the result could not be fetched: {files}"
    return _never_run_reason(part)


def _file_of(part: Part, kind: str) -> str | None:
    return part.output_file_id if kind == "output" else part.error_file_id


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


def remote_files_to_delete(parts: list[Part]) -> list[str | None]:
    """PURE: the remote files to delete once the job is published: every input file,
    and every result file except those given up after transient failures."""
    ids: list[str | None] = []
    for part in parts:
        ids.append(part.remote_file_id)
        for kind in ("output", "error"):
            reason = (part.unavailable or {}).get(kind)
            if reason is None or not kept_on_service(reason):
                ids.append(_file_of(part, kind))
    return ids


def _kept_files(part: Part) -> list[str]:
    return [
        file_id
        for kind, reason in sorted((part.unavailable or {}).items())
        if kept_on_service(reason) and (file_id := _file_of(part, kind))
    ]


# -- publish ----------------------------------------------------------------------------


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
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.on_retry_due = on_retry_due
        self.keep_input = keep_input
        self.delete_remote_files = delete_remote_files
        self.on_published = on_published
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.max_line_bytes = max_line_bytes
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
        """The job's outbox folder: its stem, or `STEM-N` when another job has it or
        anything at all (a folder, a file, a symlink, even a dangling one) is there."""
        if job.outbox_path:
            chosen = Path(job.outbox_path)
            if _outbox_owner(chosen, job.id) in (None, "self"):
                return chosen
            # Taken since the name was chosen (by hand, say): this job takes another.
            log.warning("outbox_name_taken", job_id=job.id, outbox=str(chosen))
        name, n = job.name, 1
        while await self.store.outbox_path_taken(str(self.outbox / name)) or os.path.lexists(
            self.outbox / name
        ):
            n += 1
            name = f"{job.name}-{n}"
        return self.outbox / name

    async def publish(self, job: Job) -> bool:
        parts = await self.store.parts_of(job.id)
        final = await self._final_dir(job)
        if job.outbox_path != str(final):
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
                remote_files_to_delete(parts), f"job {job.id} published", time.time()
            )
        kept_at = summary.get("input_kept_at")
        if kept_at:
            # The input could not be moved into the outbox (another filesystem): its
            # spool folder stays, and summary.json says where it is.
            log.warning("input_kept_in_spool", job_id=job.id, path=kept_at)
        else:
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
        discard_tmp(job, tmp)
        tmp.mkdir(parents=True)
        spool_input = Path(job.spool_path)
        jsonl_input = spool_input.with_name("input.jsonl")
        if job.report is not None and not job.report.get("valid", True):
            stats = _write_rejection(job.report, tmp / "result.jsonl", tmp / "error.jsonl")
            outcome: Outcome = Outcome.REJECTED
        else:
            stats = merge(
                jsonl_input,
                parts,
                tmp / "result.jsonl",
                tmp / "error.jsonl",
                tmp / "unattributed.jsonl",
                max_line_bytes=self.max_line_bytes,
                input_bytes=sent_bytes(job),
            )
            outcome = decide_outcome(job, parts, stats)
        failpoint("publish.write", job.inbox_name)
        write_results_csv(
            [tmp / "result.jsonl", tmp / "error.jsonl"], tmp / "result.csv", self.max_line_bytes
        )
        kept = keep_input_files(job, parts, tmp, keep=self.keep_input)
        if kept.get("input_changed"):
            log.warning("input_changed", job_id=job.id, name=job.name, **kept["input_changed"])
        summary = build_summary(job, parts, stats, outcome, kept)
        (tmp / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        fsync_file(tmp / "summary.json")
        if job.report is not None:
            (tmp / "report.json").write_bytes(orjson.dumps(job.report, option=orjson.OPT_INDENT_2))
            fsync_file(tmp / "report.json")
        failpoint("publish.fsync", job.inbox_name)
        fsync_dir(tmp)
        return summary


def retry_delay_s(failures: int, base_s: float, cap_s: float) -> float:
    """PURE: the pause before the next publish attempt after `failures` in a row."""
    return float(min(cap_s, base_s * 2 ** min(max(0, failures - 1), 30)))


def write_results_csv(
    sources: list[Path], target: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> None:
    """The seed's CSV columns over every result and error line, UTF-8 with a BOM (Excel),
    every cell neutralised against formulas; read in bounded memory (a line over the
    cap gets a row saying where to find it)."""
    with target.open("w", encoding="utf-8-sig", newline="") as out:
        table = csvio.ResultCsv(out, safe_cells=True)
        for source in sources:
            with source.open("rb") as fh:
                for number, line in enumerate(iter_lines(fh, max_line_bytes), start=1):
                    table.add(number, line, source.name)
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
    fsync_file(result)
    fsync_file(errors)
    total = int(report.get("requests") or 0)
    return MergeStats(total=total, failed=total)


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
    return kept


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
) -> dict[str, Any]:
    kept = kept or {}
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
        "result_unavailable": stats.unavailable,
        "unattributed": stats.unattributed,
        "unattributed_reasons": stats.unattributed_reasons,
        "unattributed_lines": stats.unattributed_lines,
        "input_changed": kept.get("input_changed"),
        "input_kept_at": kept.get("input_kept_at"),
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
                "unavailable": p.unavailable,
                "kept_on_service": _kept_files(p),
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


def _published_by(final: Path, job_id: str) -> bool:
    try:
        summary = orjson.loads((final / "summary.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(summary, dict) and summary.get("job_id") == job_id
