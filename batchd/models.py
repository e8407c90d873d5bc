"""Job and part states, remote batch statuses, and the records the store returns.

Local states (what batchd has done) are kept apart from remote statuses (what the
service says). An unknown remote status is never treated as finished.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import msgspec
import orjson

from batchd.documents import (
    Cost,
    JobOptions,
    JobReport,
    TokenUsage,
    decode_cost,
    decode_options,
    decode_report,
    decode_usage,
)
from batchd.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class JobState(StrEnum):
    CLAIMING = "claiming"  # row written, rename into the spool not yet confirmed
    CLAIMED = "claimed"  # input in the spool, not yet validated
    RUNNING = "running"  # validated and planned into parts; parts in flight
    PUBLISHING = "publishing"  # every part settled; outbox folder being written
    PUBLISHED = "published"  # outbox folder in place (terminal)
    PARKED = "parked"  # crashed the daemon too often; left for an operator (terminal)


JOB_TERMINAL = frozenset({JobState.PUBLISHED, JobState.PARKED})
# Jobs batchd still works on (the queue, for status, metrics and drain).
JOB_ACTIVE = frozenset(set(JobState) - JOB_TERMINAL)


def completion_hours(window: object) -> int | None:
    """PURE: '24h' -> 24, '14d' -> 336; None for anything else."""
    if not isinstance(window, str) or len(window) < 2 or window[-1] not in "hd":
        return None
    number = window[:-1]
    if not number.isdigit() or not number.isascii():
        return None
    return int(number) * (24 if window[-1] == "d" else 1)


def window_hours(window: str) -> float:
    """PURE: '24h' -> 24, '14d' -> 336; unknown forms count as the longest window."""
    try:
        number, unit = int(window[:-1]), window[-1]
    except (ValueError, IndexError):
        return 336.0
    return float(number * (24 if unit == "d" else 1))


def input_kind(name: str, suffixes: tuple[str, ...]) -> str | None:
    """PURE: the kind of input a name is (`jsonl`, `csv`: its suffix), or None."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix.lstrip(".")
    return None


@dataclass(slots=True)
class PartPlan:
    """A part as planned, before the store records it: where its file is, which input
    lines it holds (consecutive ones, or one model's consecutive ones), and its name on
    the service."""

    seq: int
    path: str
    first_line: int
    requests: int
    bytes: int
    model: str
    endpoint: str
    upload_name: str
    # Counted when planned (batchd.provider.tokens): input tokens, output bounded by each
    # request's max_tokens (or the model's limit), and the worst-case batch price (None:
    # a model of the part has no price).
    input_tokens: int | None = None
    output_tokens_max: int | None = None
    cost_max: float | None = None


def upload_name(job_id: str, seq: int) -> str:
    """The remote name of a part's file. It names job and part, so that a file whose
    upload answer was lost (or whose database row was) is found again by its name."""
    return f"batchd-{job_id}-p{seq:03d}.jsonl"


class PartState(StrEnum):
    PENDING = "pending"  # part file ready, nothing sent
    UPLOADING = "uploading"  # intent: upload may have happened
    UPLOADED = "uploaded"  # remote file id recorded
    CREATING = "creating"  # intent: create may have happened
    RUNNING = "running"  # remote batch id recorded, batch not ended
    ENDED = "ended"  # remote batch reached a terminal status
    COLLECTED = "collected"  # output and error files on local disk
    CANCELLED = "cancelled"  # cancelled before it was ever created
    FAILED = "failed"  # could not be submitted (permanent error)
    PARKED = "parked"  # failed too often; waits for an operator (`batchd retry`)


PART_SETTLED = frozenset({PartState.COLLECTED, PartState.CANCELLED, PartState.FAILED})
# Parts waiting for the caps: not yet created on the service.
PART_QUEUED = frozenset(
    {PartState.PENDING, PartState.UPLOADING, PartState.UPLOADED, PartState.CREATING}
)
# Parts that hold (or may hold) one of the account's running-batch slots.
PART_HOLDS_SLOT = frozenset({PartState.CREATING, PartState.RUNNING})


class RemoteStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


REMOTE_TERMINAL = frozenset(
    {RemoteStatus.COMPLETED, RemoteStatus.FAILED, RemoteStatus.EXPIRED, RemoteStatus.CANCELLED}
)


def remote_is_terminal(status: str | None) -> bool:
    """True only for the four statuses that end a batch; unknown ones are not final."""
    return status in REMOTE_TERMINAL


class Held(StrEnum):
    """Why a job waits with nothing more created (batchd.pipeline.holds declares what ends each)."""

    BUDGET = "budget"  # its worst case does not fit what the budget leaves now
    NO_PRICE = "no_price"  # its model has no price, so its cost cannot be held to a cap
    OVER_CAP = "over_cap"  # its worst case is larger than the whole daily or monthly cap
    DUPLICATE = "duplicate"  # the same input ran (or runs) already


class Outcome(StrEnum):
    """The final status of a job, written to `summary.json`."""

    COMPLETED = "completed"  # every request answered successfully
    PARTIAL = "partial"  # some requests succeeded, some failed or never ran
    FAILED = "failed"  # no request succeeded
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"  # the input failed local validation; nothing was sent


def _loads(value: Any) -> Any:
    if value is None or value == "":
        return None
    return orjson.loads(value)


def _document(row: sqlite3.Row, column: str, decode: Callable[[Any], T], fallback: T) -> T:
    """A document column of a job's row, decoded; one that does not decode (a database
    edited by hand, or written by a batchd that shaped it otherwise) is logged and read
    as `fallback`, so that one odd row never stops every query that reads jobs."""
    try:
        return decode(_loads(row[column]))
    except (msgspec.ValidationError, orjson.JSONDecodeError) as exc:
        log.error("job_column_unreadable", job_id=row["id"], column=column, error=str(exc))
        return fallback


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    name: str
    inbox_name: str
    spool_path: str
    kind: str
    state: JobState
    outcome: str | None
    sha256: str | None
    bytes: int | None
    options: JobOptions
    report: JobReport | None
    error: str | None
    outbox_path: str | None
    cancel_requested: bool
    crash_count: int
    created_at: float
    updated_at: float
    completed: int
    failed: int
    usage: TokenUsage | None
    input_mtime_ns: int | None
    prepares: int
    retried_as: str | None
    recovered_at: float | None
    cost: Cost | None = None
    held: str | None = None
    held_note: str | None = None
    held_at: float | None = None
    # The inbox name's bytes in hex when they are not UTF-8 (then `inbox_name` shows
    # each undecodable byte as \xNN); None when `inbox_name` is the name exactly.
    inbox_name_hex: str | None = None
    # The digest of its requests in canonical form (the duplicate guard's); None for a
    # job validated before batchd kept it, or not validated.
    requests_sha256: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"],
            name=row["name"],
            inbox_name=row["inbox_name"],
            spool_path=row["spool_path"],
            kind=row["kind"],
            state=JobState(row["state"]),
            outcome=row["outcome"],
            sha256=row["sha256"],
            bytes=row["bytes"],
            options=_document(row, "options", decode_options, JobOptions()),
            report=_document(row, "report", decode_report, None),
            error=row["error"],
            outbox_path=row["outbox_path"],
            cancel_requested=bool(row["cancel_requested"]),
            crash_count=row["crash_count"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            completed=row["completed"],
            failed=row["failed"],
            usage=_document(row, "usage", decode_usage, None),
            input_mtime_ns=row["input_mtime_ns"],
            prepares=row["prepares"],
            retried_as=row["retried_as"],
            recovered_at=row["recovered_at"],
            cost=_document(row, "cost", decode_cost, None),
            held=row["held"],
            held_note=row["held_note"],
            held_at=row["held_at"],
            inbox_name_hex=row["inbox_name_hex"],
            requests_sha256=row["requests_sha256"],
        )


@dataclass(frozen=True, slots=True)
class Part:
    id: int
    job_id: str
    seq: int
    path: str
    first_line: int
    requests: int
    bytes: int
    model: str
    endpoint: str
    state: PartState
    upload_name: str
    remote_file_id: str | None
    batch_id: str | None
    remote_status: str | None
    request_counts: dict[str, int] | None
    output_file_id: str | None
    error_file_id: str | None
    remote_errors: Any
    next_poll_at: float | None
    created_remote_at: float | None
    ended_at: float | None
    attempts: int
    error: str | None
    completion_window: str | None
    round: int
    polled_at: float | None
    intent_at: float | None
    retry_at: float | None
    parked_from: str | None
    unavailable: dict[str, str] | None
    adopt: bool
    # Counted when planned (None for parts planned before batchd counted tokens).
    input_tokens: int | None = None
    output_tokens_max: int | None = None
    cost_max: float | None = None
    # When batchd asked for this part's batch, on its own clock (`created_remote_at` is
    # the provider's); None before creation and for parts created before it was kept.
    batch_created_at: float | None = None
    # The Batch object's timestamps as the provider gave them (`remote.TIME_KEYS`, each
    # checked: None when absent or garbled); shown, never decided on.
    provider_times: dict[str, float | None] | None = None
    # When the service stored the part's input file, on the service's clock (None when
    # it was not told): how far back a listing must go to prove the batch absent.
    file_created_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Part:
        return cls(
            id=row["id"],
            job_id=row["job_id"],
            seq=row["seq"],
            path=row["path"],
            first_line=row["first_line"],
            requests=row["requests"],
            bytes=row["bytes"],
            model=row["model"],
            endpoint=row["endpoint"],
            state=PartState(row["state"]),
            upload_name=row["upload_name"],
            remote_file_id=row["remote_file_id"],
            batch_id=row["batch_id"],
            remote_status=row["remote_status"],
            request_counts=_loads(row["request_counts"]),
            output_file_id=row["output_file_id"],
            error_file_id=row["error_file_id"],
            remote_errors=_loads(row["remote_errors"]),
            next_poll_at=row["next_poll_at"],
            created_remote_at=row["created_remote_at"],
            ended_at=row["ended_at"],
            attempts=row["attempts"],
            error=row["error"],
            completion_window=row["completion_window"],
            round=row["round"],
            polled_at=row["polled_at"],
            intent_at=row["intent_at"],
            retry_at=row["retry_at"],
            parked_from=row["parked_from"],
            unavailable=_loads(row["unavailable"]),
            adopt=bool(row["adopt"]),
            input_tokens=row["input_tokens"],
            output_tokens_max=row["output_tokens_max"],
            cost_max=row["cost_max"],
            batch_created_at=row["batch_created_at"],
            provider_times=_loads(row["provider_times"]),
            file_created_at=row["file_created_at"],
        )


# A part's input named as an OSS object (`oss:{region}:{bucket}/{key}`) rather than one of
# the account's files: the service reads it from the spool's bucket (batchd.pipeline.ossinputs).
OSS_ID_PREFIX = "oss:"


def is_oss_id(file_id: str | None) -> bool:
    """PURE: does this input id name an OSS object (not one of the account's files)?"""
    return file_id is not None and file_id.startswith(OSS_ID_PREFIX)


def batch_created_at(part: Part) -> float | None:
    """PURE: when batchd asked for the part's batch, on its own clock; None when it has
    none. A part created before this was recorded has its create intent's time."""
    if part.batch_created_at is not None:
        return part.batch_created_at
    return part.intent_at if part.batch_id is not None else None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notification to one target (a webhook URL, or "command"): queued, tried with
    backoff, delivered or given up."""

    msg_id: str
    target: str
    event: str
    job_id: str | None
    payload: str
    next_at: float
    created_at: float
    id: int = 0
    state: str = "pending"
    attempts: int = 0
    last_error: str | None = None
    delivered_at: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Delivery:
        return cls(
            id=row["id"],
            msg_id=row["msg_id"],
            target=row["target"],
            event=row["event"],
            job_id=row["job_id"],
            payload=row["payload"],
            state=row["state"],
            attempts=row["attempts"],
            next_at=row["next_at"],
            last_error=row["last_error"],
            created_at=row["created_at"],
            delivered_at=row["delivered_at"],
        )


class ExtraCancel(StrEnum):
    """Where the cancel of an extra batch of a part stands."""

    PENDING = "pending"  # to be sent (again, after a failed try)
    REQUESTED = "requested"  # accepted; followed until the batch ends
    ENDED = "ended"  # the batch has ended (cancelled, or ended before the cancel)
    GONE = "gone"  # the service no longer knows the batch
    FAILED = "failed"  # the service refused the cancel (see the error)


@dataclass(frozen=True, slots=True)
class ExtraBatch:
    """A batch made for a part beside the one it follows (a gateway's own client retried
    the create): cancelled as soon as it is found, and followed until it ends."""

    batch_id: str
    job_id: str
    part_seq: int
    kept_batch_id: str
    found_by: str  # settle | adopt | sweep
    found_at: float
    status: str | None = None
    request_counts: dict[str, int] | None = None
    cancel: ExtraCancel = ExtraCancel.PENDING
    attempts: int = 0
    retry_at: float | None = None
    error: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ExtraBatch:
        return cls(
            batch_id=row["batch_id"],
            job_id=row["job_id"],
            part_seq=row["part_seq"],
            kept_batch_id=row["kept_batch_id"],
            found_by=row["found_by"],
            found_at=row["found_at"],
            status=row["status"],
            request_counts=_loads(row["request_counts"]),
            cancel=ExtraCancel(row["cancel"]),
            attempts=row["attempts"],
            retry_at=row["retry_at"],
            error=row["error"],
        )


class ClaimStep(StrEnum):
    """How far the claim of an object from a bucket inbox went (`InboxClaim`)."""

    COPYING = "copying"  # the intent is recorded; the spool may hold part of the copy
    COPIED = "copied"  # the spool holds the whole object; it is deleted from the inbox next
    CLAIMED = "claimed"  # done: the job owns its input


@dataclass(frozen=True, slots=True)
class InboxClaim:
    """The claim of one version (`etag`) of an object of a bucket inbox by job `job_id`,
    with its sidecar's version when one was claimed with it."""

    job_id: str
    inbox_key: str
    etag: str
    size: int
    step: ClaimStep
    created_at: float
    sidecar_key: str | None = None
    sidecar_etag: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> InboxClaim:
        return cls(
            job_id=row["job_id"],
            inbox_key=row["inbox_key"],
            etag=row["etag"],
            size=row["size"],
            step=ClaimStep(row["step"]),
            created_at=row["created_at"],
            sidecar_key=row["sidecar_key"],
            sidecar_etag=row["sidecar_etag"],
        )
