"""The outbox folder writer: everything a job's folder holds, written into a folder not
yet published (`OutboxFolder`), summary.json last.

`write_job_folder` writes one job's folder: `result.jsonl` (successes in input order,
the service's lines byte for byte), `error.jsonl` (failures, each with its `input_line`;
requests that never ran get their own error code), `unattributed.jsonl` (result lines no
request of the input claims, byte for byte; only when there are any), `result.csv` (one
row per request, in input order, written with the two files), the validated input's copy
(`keep_input_files`), `report.json`, and `summary.json` (`build_summary`) last; each
member fsynced, then the folder. The publish stage (`batchd.pipeline.publish`) chooses
the folder's name, publishes it in one step, and records the job.

A rejected input is published with every one of its lines in error.jsonl, in input
order, each with one reason: the problem the report names for it, or `not_submitted`
for a line the input was rejected around; all of them count as never run
(`write_rejection`). What failed a job as a whole (a batch the service failed, the first
problem of a rejected input) is stated once: summary.json's `error` (`job_error`), and
the job's own `error` (`jobs --json`, `show`, the job.ended notification), which the
lines of error.jsonl refer to by code.

The merging of results in input order is `batchd.outbox.merge`'s; here are the pure
deciders of what the folder says (`decide_outcome`, `unread_rejection`,
`rejection_reason`, `job_error`, `cost_summary`, `build_summary`) and its writers.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import orjson

from batchd.clock import Clock, iso_utc
from batchd.documents import (
    Cost,
    EstimatedCost,
    ExtraBatchOf,
    Follows,
    InputOf,
    JobError,
    JobReport,
    LateSidecar,
    ModelUsage,
    PartOf,
    ReportProblem,
    RequestCounts,
    Summary,
    Timings,
    TokenUsage,
    given,
    to_json,
)
from batchd.failpoints import failpoint
from batchd.fsutil import fsync_dir, open_for_writing
from batchd.inputs import csvio
from batchd.inputs.lines import CHUNK_BYTES, read_line, utf8_safe
from batchd.inputs.spool import SpoolFolder
from batchd.logs import get_logger
from batchd.models import (
    ExtraBatch,
    ExtraCancel,
    Job,
    Outcome,
    Part,
    RemoteStatus,
    batch_created_at,
)
from batchd.outbox.folder import (
    ERRORS,
    INPUT_REQUESTS,
    LATE_SIDECAR,
    REPORT,
    RESULTS,
    RESULTS_CSV,
    UNATTRIBUTED,
    OutboxFolder,
    changed_input,
    sent_part,
    unsent_name,
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
from batchd.provider.remote import TIME_KEYS
from batchd.provider.tokens import RequestCounter

log = get_logger(__name__)


def write_job_folder(
    job: Job,
    parts: list[Part],
    staging: OutboxFolder,
    *,
    folder: str,
    follows: Follows | None,
    extras: list[ExtraBatch],
    keep_input: bool,
    max_line_bytes: int,
    counter: RequestCounter,
    currency: str,
    clock: Clock,
) -> Summary:
    """Write job's folder into `staging` (emptied first), summary.json last, every
    member and the folder fsynced; returns what summary.json says. `folder` is the name
    it will be published under (which `follows` an earlier one)."""
    discard_tmp(job, staging)
    staging.path.mkdir(parents=True)
    spool_input = Path(job.spool_path)
    if job.report is not None and not job.report.valid:
        stats = write_rejection(job, staging, max_line_bytes)
        outcome: Outcome = Outcome.REJECTED
    elif not parts and job.cancel_requested:
        # Cancelled before it was planned (held, or being validated): nothing was
        # sent, and its input is kept whatever `keep_input` says.
        stats = write_rejection(job, staging, max_line_bytes, unsent=CANCELLED_UNSENT)
        outcome = Outcome.CANCELLED
    else:
        stats = merge(
            SpoolFolder.of_input(spool_input).requests,
            parts,
            staging.member(RESULTS),
            staging.member(ERRORS),
            staging.member(UNATTRIBUTED),
            max_line_bytes=max_line_bytes,
            input_bytes=sent_bytes(job),
            counter=counter,
            results_csv=staging.member(RESULTS_CSV),
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
    kept = keep_input_files(job, parts, staging, keep=keep_input or never_sent)
    if input_open_for_writing(spool_input):
        # Still held open past the publish stage's wait: the input stays in the spool,
        # where what its writer adds is kept, and summary.json says where.
        kept.setdefault("input_kept_at", str(spool_input))
    if kept.get("input_changed"):
        log.warning("input_changed", job_id=job.id, name=job.name, **kept["input_changed"])
    summary = build_summary(
        job,
        parts,
        stats,
        outcome,
        kept,
        published_at=clock.now(),
        currency=currency,
        folder=folder,
        follows=follows,
        extras=extras,
    )
    if job.report is not None:
        staging.write(REPORT, orjson.dumps(to_json(job.report), option=orjson.OPT_INDENT_2))
    # Last: a folder with its summary.json is whole (what a store without renames needs).
    staging.write_summary(summary)
    failpoint("publish.fsync", job.inbox_name)
    staging.seal()
    return summary


# Rejections decided on the input's size or blocks alone: the input was never read, so
# it is moved into the outbox (a rename), never copied.
UNREAD_CODES = frozenset({"input_too_large", "sparse_file"})


UNSENT_NOTE = (
    "these bytes arrived after the file was claimed and were not sent:"
    " drop them again as a new file"
)


# How the note of a job whose publishing raised begins (the job's `error` until it is
# published; `status` lists such jobs as `publish_failing`).
PUBLISH_FAILED = "publishing failed"


LATE_SIDECAR_NOTE = (
    "the input's sidecar arrived after the input was claimed: it was not applied (the job"
    " ran with the options it was claimed with). Drop the input again with it to run with"
    " it"
)


CHANGED_NOTE = (
    "the file was changed in place after it was claimed; what was validated and sent is"
    " not the current file, which is kept as {name}"
)


def _kept_files(part: Part) -> list[str]:
    return [
        file_id
        for kind, reason in sorted((part.unavailable or {}).items())
        if kept_on_service(reason) and (file_id := file_of(part, kind))
    ]


# What summary.json says of requests charged their worst case (`cost.estimated.why`).
ESTIMATED_WHY = (
    "charged at their worst case (input tokens counted as when planned, the whole output"
    " bound, in their price tier), since the service's usage could not be used: refused"
    " as absurd (usage_refused), missing (usage_missing), or the result file was lost"
    " (result_unavailable: of each such part, as many requests as the service counted"
    " completed and were not seen, the dearest first)"
)


def cost_summary(stats: MergeStats, currency: str) -> Cost:
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
    return Cost(
        amount=None if unknown else _amount(known),
        currency=currency,
        per_model={
            model: None if own.amount is None else _amount(own.amount)
            for model, own in costs.items()
        },
        unknown_models=unknown,
        known_amount=_amount(known),
        from_usage=_amount(from_usage),
        estimated=EstimatedCost(
            amount=_amount(estimated),
            requests=requests,
            per_model={
                model: own.estimated_requests
                for model, own in costs.items()
                if own.estimated_requests
            },
            reasons=dict(stats.estimated_reasons),
            lines=stats.estimated_lines,
            unavailable_parts=stats.unavailable_parts,
            why=ESTIMATED_WHY if requests else None,
        ),
    )


def _amount(value: float) -> float:
    """An amount as summary.json writes it: to 1e-10 of the currency, where float noise
    goes and the price of a single token stays (never rounded down to 0)."""
    return round(value, 10)


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
    report = job.report or JobReport()
    problems = report.errors
    if unread_rejection(job) or any(e.code in NOT_LINES_CODES for e in problems):
        return None
    spool_input = Path(job.spool_path)
    if job.kind == "jsonl":
        return spool_input if spool_input.is_file() else None
    converted = SpoolFolder.of_input(spool_input).requests
    validated = bool(report.bytes) or all(e.line is None for e in problems)
    return converted if validated and converted.is_file() else None


def rejection_reason(report: JobReport) -> tuple[str, str]:
    """PURE: the code and message of a rejected input's lines that the report names no
    problem for: not sent, because the input was rejected for what the report lists (a
    problem of the whole file, or other lines: the first is named). Such a line is said
    to be valid only when the report lists every problem."""
    problems = report.errors
    first = problems[0] if problems else ReportProblem(code="")
    code = first.code or "rejected"
    line = first.line
    count = report.error_count if report.error_count >= len(problems) else len(problems)
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
    job: Job, folder: OutboxFolder, max_line_bytes: int, *, unsent: tuple[str, str] | None = None
) -> MergeStats:
    """The files of a rejected input in `folder`: an empty result.jsonl, and error.jsonl
    and result.csv with one line (one row) per line of the input, in input order, each
    with one reason: the first problem the report lists for it, `empty_line` for a blank
    line, else `not_submitted` (`rejection_reason`; `unsent`, the code and message of a
    valid input that was never sent). None of them ran. An input that is not lines of
    requests (never read, binary, a CSV that does not convert) gets the report's
    problems as they are; only those naming a line count as requests."""
    problems = (job.report or JobReport()).errors
    stats = MergeStats()
    folder.write(RESULTS, b"")
    with (
        folder.member(ERRORS).open("wb") as out,
        csvio.result_csv(folder.member(RESULTS_CSV)) as table,
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
            table.add_request(line, ERRORS, custom_id)
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
    problems: list[ReportProblem],
    max_line_bytes: int,
    unsent: tuple[str, str] | None = None,
) -> Iterator[tuple[int | None, str | None, str, str]]:
    """(input line, custom_id, code, message) of each line of a rejected input."""
    source = requests_file(job)
    if source is None:
        for item in problems:
            yield item.line, None, item.code, item.message
        return
    by_line: dict[int, ReportProblem] = {}
    for item in problems:
        if item.line is not None:
            by_line.setdefault(item.line, item)
    unlisted = unsent or rejection_reason(job.report or JobReport())
    limit = sent_bytes(job) if job.kind == "jsonl" else None
    for number, raw in numbered(source, max_line_bytes, limit):
        listed = by_line.get(number)
        obj = read_line(raw) if raw is not None else None
        cid = obj.get("custom_id") if obj is not None else None
        if listed is not None:
            code, message = listed.code, listed.message
        elif raw is not None and not raw.strip():
            code, message = "empty_line", "empty line; every line must be one request"
        else:
            code, message = unlisted
        yield number, cid if isinstance(cid, str) else None, code, message


def unread_rejection(job: Job) -> bool:
    """PURE: was the input rejected on its size or blocks alone, never read (so never
    hashed)? Such an input is moved into the outbox, not copied."""
    if job.sha256 is not None or job.report is None or job.report.valid:
        return False
    codes = {e.code for e in job.report.errors}
    return bool(codes & UNREAD_CODES)


def discard_tmp(job: Job, staging: OutboxFolder) -> None:
    """Remove a publish temp folder left by a failed or killed attempt. An input moved
    into it goes back to the spool first; if that fails, the folder stays (the next
    attempt fails on it and tries again) rather than the input being lost."""
    tmp = staging.path
    if tmp.is_symlink():
        tmp.unlink()
        return
    if not tmp.exists():
        return
    spool_input = Path(job.spool_path)
    moved = staging.member(spool_input.name)
    if unread_rejection(job) and moved.exists() and not os.path.lexists(spool_input):
        os.rename(moved, spool_input)
        fsync_dir(spool_input.parent)
    shutil.rmtree(tmp, ignore_errors=True)


def keep_input_files(
    job: Job, parts: list[Part], tmp: OutboxFolder, *, keep: bool
) -> dict[str, Any]:
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
            kept.update(_move_input(spool_input, tmp.member(spool_input.name)))
        return kept
    if spool_input.exists():
        changed = _keep_validated(job, parts, spool_input, tmp, keep)
        if changed is not None:
            kept["input_changed"] = changed
    spool = SpoolFolder.of_input(spool_input)
    jsonl_input = spool.requests
    if keep and jsonl_input != spool_input and jsonl_input.exists():
        tmp.copy_in(INPUT_REQUESTS, jsonl_input)
    late = spool.late_sidecar
    if late.exists():
        # A sidecar that came after the claim (the intake moved it here): never applied,
        # published beside the results so that its owner hears of it.
        tmp.copy_in(LATE_SIDECAR, late)
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


def late_input_bytes(job: Job, summary: Summary) -> str | None:
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
    changed = summary.input_changed
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
    job: Job, parts: list[Part], source: Path, tmp: OutboxFolder, keep: bool
) -> dict[str, Any] | None:
    """Copy the validated bytes of `source`; what changed since validation, or None."""
    dest = tmp.member(source.name)
    st = os.stat(source)
    if job.sha256 is None or job.bytes is None:
        if keep:  # an old row without the figures: the file as it is
            tmp.copy_in(source.name, source)
        return None
    mtime_changed = job.input_mtime_ns is not None and st.st_mtime_ns != job.input_mtime_ns
    if not keep and st.st_size == job.bytes and not mtime_changed:
        return None
    with source.open("rb") as src:
        digest, copied = _copy_hashed(src, dest if keep else None, job.bytes)
        intact = copied == job.bytes and digest == job.sha256
        appended = 0
        if intact and st.st_size > job.bytes:
            appended = _copy_rest(src, tmp.member(unsent_name(source.suffix)))
    if intact and appended == 0 and not mtime_changed:
        return None
    changed: dict[str, Any] = {
        "validated": {"bytes": job.bytes, "sha256": job.sha256, "mtime_ns": job.input_mtime_ns},
        "now": {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
        "appended_bytes": appended,
        "modified_in_place": not intact,
    }
    if appended:
        changed["unsent"] = unsent_name(source.suffix)
        changed["note"] = UNSENT_NOTE
    if not intact:
        # What was validated cannot be copied from the file any more: the current file
        # is kept under its own name, beside the part files that were sent.
        dest.unlink(missing_ok=True)
        name = changed_input(source.suffix)
        tmp.copy_in(name, source)
        sent = []
        for part in parts:
            path = Path(part.path)
            if part.round == 0 and path != source and path.exists():
                target = sent_part(path.name)
                tmp.copy_in(target, path)
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
    follows: Follows | None = None,
    extras: list[ExtraBatch] | None = None,
) -> Summary:
    """PURE: what summary.json says of the job: its input, outcome, counts, parts and
    timings; `kept` is what `keep_input_files` said of the input, `folder` the outbox
    folder's name (`name`, or `name-N` after a collision, which `follows` an earlier one);
    `extras` the batches made for its parts beside the ones they follow (a gateway's
    retried create), each with what it may have cost (`extra_batches`).

    Every timing is batchd's own wall clock (`published_at` too), as `clock.iso_utc`
    text; the service's own timestamps of each batch are apart, in its part's
    `provider_times`, under the Batch object's names."""
    kept = kept or {}
    late = kept.get("late_sidecar")
    return Summary(
        job_id=job.id,
        name=job.name,
        folder=folder if folder is not None else job.name,
        follows=follows,
        input=InputOf(
            name=job.inbox_name,
            name_hex=job.inbox_name_hex,
            sha256=job.sha256,
            bytes=job.bytes,
            kind=job.kind,
        ),
        status=str(outcome),
        # The sidecar's options as the job ran with them (the rest: the daemon's defaults).
        options=to_json(
            msgspec.structs.replace(
                job.options, submit_id=msgspec.UNSET, sidecar_error=msgspec.UNSET
            )
        ),
        # A `batchd retry` of another job: which one.
        retry_of=given(job.options.retry_of),
        request_counts=RequestCounts(
            total=stats.total, completed=stats.completed, failed=stats.failed
        ),
        never_run=stats.never_run,
        result_unavailable=stats.unavailable,
        unattributed=stats.unattributed,
        unattributed_reasons=stats.unattributed_reasons,
        unattributed_lines=stats.unattributed_lines,
        input_changed=kept.get("input_changed"),
        input_kept_at=kept.get("input_kept_at"),
        late_sidecar=LateSidecar(**late) if late is not None else None,
        usage=TokenUsage(
            **stats.usage,
            per_model={model: ModelUsage(**own) for model, own in stats.per_model.items()},
        ),
        cost=cost_summary(stats, currency),
        error=job_error(job, parts),
        parts=[
            PartOf(
                seq=p.seq,
                round=p.round,
                requests=p.requests,
                model=p.model,
                endpoint=p.endpoint,
                state=str(p.state),
                batch_id=p.batch_id,
                status=p.remote_status,
                input_file_id=p.remote_file_id,
                output_file_id=p.output_file_id,
                error_file_id=p.error_file_id,
                request_counts=p.request_counts,
                errors=p.remote_errors,
                unavailable=p.unavailable,
                kept_on_service=_kept_files(p),
                note=p.error,
                provider_times=provider_times(p),
            )
            for p in parts
        ],
        extra_batches=[
            ExtraBatchOf(
                part=e.part_seq,
                batch_id=e.batch_id,
                kept_batch_id=e.kept_batch_id,
                status=e.status,
                request_counts=e.request_counts,
                cancel=str(e.cancel),
                note=extra_note(e),
            )
            for e in extras or []
        ],
        timings=Timings(
            claimed_at=iso_utc(job.created_at),
            batches_created_at=[iso_utc(batch_created_at(p)) for p in parts],
            batches_ended_at=[iso_utc(p.ended_at) for p in parts],
            published_at=iso_utc(published_at),
        ),
    )


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


def job_error(job: Job, parts: list[Part]) -> JobError | None:
    """PURE: what failed the job as a whole, stated once in summary.json (`error`): the
    whole-batch errors of the batches the service failed (the first one's code and
    message, then every failed batch under `batches`; their lines in error.jsonl refer to
    it as `batch_failed`), or the problem a rejected input was rejected for (the first
    the report lists: `report.json` has them all); else a note of the job's, or None."""
    failed = [error for error in (batch_error(p) for p in parts) if error is not None]
    if failed:
        head = failed[0]
        return JobError(code=head["code"], message=head["message"], batches=failed)
    report = job.report or JobReport()
    if not report.valid:
        problems = report.errors
        first = problems[0] if problems else ReportProblem()
        where = f"line {first.line}: " if first.line is not None else ""
        count = report.error_count or len(problems)
        return JobError(
            code=first.code or "rejected",
            message=f"the input was rejected: {where}{first.message}"
            f" ({count} problem{'s' if count != 1 else ''}: see report.json)",
            report=REPORT,
        )
    if job.error and not publish_failed(job):
        return JobError(code="job_note", message=job.error)
    return None


def publish_failed(job: Job) -> bool:
    """PURE: is the job's note that of a publish that raised (not a note of its own)?"""
    return bool(job.error) and str(job.error).startswith(PUBLISH_FAILED)


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


def extra_note(extra: ExtraBatch) -> str:
    """PURE: what `show` and summary.json say of an extra batch, billing first."""
    counts = extra.request_counts or {}
    ran = counts.get("completed", 0) + counts.get("failed", 0)
    seen = f"{ran} of its {counts['total']} requests had run" if "total" in counts else ""
    if extra.cancel == ExtraCancel.PENDING:
        head = "to be cancelled (the cancel is tried again)"
    elif extra.cancel == ExtraCancel.REQUESTED:
        head = "cancel requested; followed until it ends"
    elif extra.cancel == ExtraCancel.GONE:
        head = "the service no longer knows it"
    elif extra.cancel == ExtraCancel.FAILED:
        head = f"could not be cancelled: {extra.error}"
    elif extra.status == RemoteStatus.CANCELLED:
        head = "cancelled"
    else:
        head = f"had {extra.status or 'ended'} before it could be cancelled"
    bill = (
        f"; {seen} (billed, results not used)"
        if seen
        else "; it may still bill the requests it ran before the cancel"
    )
    return head + bill
