"""The control socket's request and response models, shared by the server, the client
and the CLI.

Every answer is JSON. Errors are `{"error": {"code": ..., "message": ...}}` with HTTP
400 (bad input), 403 (peer not allowed), 404 (unknown job), 409 (not possible now),
500 (the daemon failed to answer) or 503 (too many connections).

The models are msgspec structs: typed, checked when decoded, and quick to import, so that
a client command starts in a few tens of milliseconds. Fields the other side does not know
are ignored, so an older client can talk to a newer daemon and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec

API_PREFIX = "/v1"

T = TypeVar("T")


class _Model(msgspec.Struct, kw_only=True):
    """The base of every message: keyword-only fields."""


def encode(model: Any) -> bytes:
    """A model (or plain data) as JSON bytes."""
    return msgspec.json.encode(model)


def decode(data: bytes, kind: type[T]) -> T:
    """JSON bytes as a model; `msgspec.ValidationError` (a `ValueError`) names the field
    that does not fit."""
    return msgspec.json.decode(data, type=kind)


def to_builtins(model: Any) -> Any:
    """A model as plain dicts and lists (for `--json` output and tests)."""
    return msgspec.to_builtins(model)


class ErrorBody(_Model, kw_only=True):
    code: str
    message: str


class ErrorResponse(_Model, kw_only=True):
    error: ErrorBody


class RunningCaps(_Model, kw_only=True):
    running_batches: int
    running_cap: int
    running_by_model: dict[str, int] = msgspec.field(default_factory=dict)


class Problem(_Model, kw_only=True):
    """Something that cannot proceed without help, or keeps failing: a parked part or
    job, a part whose steps fail, an inbox that cannot be read, lost state, log lines
    that cannot be written."""

    # part_parked | part_failing | job_parked | publish_failing | intake | logging |
    # state_lost | input_grew | local_fault | provider_down | clock_stepped
    kind: str
    job_id: str | None = None
    part: int | None = None
    note: str
    since: float | None = None


class LocalFaultInfo(_Model, kw_only=True):
    """A fault of this machine in force (batchd.faults): a full or read-only disk, a
    locked or full database. The work it pauses waits, uncounted, until it heals."""

    key: str  # what it touches: a folder's name (spool, outbox, ...) or "database"
    what: str  # "disk full", "the database is locked ...", ...
    detail: str  # the error as met, naming the file
    pauses: str  # the work that waits for it
    since: float  # wall time it was first met
    met: int = 1  # times met since


class OssInputsInfo(_Model, kw_only=True):
    """How parts reach the service with the spool on a bucket (batchd.pipeline.ossinputs):
    `via` "oss" (read from the bucket, no upload) or "upload", with why not the bucket;
    what the pre-flight of the bucket found missing (each with its fix) and what it could
    not check. `checked_at` is None before the first pre-flight."""

    setting: str  # jobs.input_via
    via: str
    why_upload: str | None = None
    bucket_region: str | None = None
    checked_at: float | None = None
    missing: list[str] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)


class ClockStepInfo(_Model, kw_only=True):
    """A step of the wall clock seen in the last hour (+ forward, - back)."""

    seconds: float
    at: float


class Reload(_Model, kw_only=True):
    """The last SIGHUP reload: when, whether the file could be read, what applied and
    which changed keys wait for a restart."""

    at: float
    ok: bool
    error: str | None = None
    applied: list[str] = msgspec.field(default_factory=list)
    needs_restart: list[str] = msgspec.field(default_factory=list)


class StatusResponse(_Model, kw_only=True):
    version: str
    pid: int
    uptime_s: float
    provider: str
    base_url: str
    root: str
    inbox: str
    outbox: str
    input_suffixes: list[str]
    intake_paused: bool
    draining: bool
    account_paused: str | None
    # The provider did not answer the last probe (after retries): why.
    provider_down: str | None = None
    jobs_by_state: dict[str, int]
    jobs_by_outcome: dict[str, int]
    parts_by_state: dict[str, int]
    caps: RunningCaps
    bucket_levels: dict[str, int]
    api_calls: dict[str, int]
    throttled: dict[str, int]
    last_errors: dict[str, str]
    # When each last error happened (epoch seconds); an error is gone once the call works.
    last_error_at: dict[str, float] = msgspec.field(default_factory=dict)
    healthy: bool
    # What needs an operator's eye, most pressing first (at most 20), and how many in all.
    problems: list[Problem] = msgspec.field(default_factory=list)
    problem_count: int = 0
    # Log lines no output stream took since start (a pipe whose reader went away, a full
    # disk): while lines are being dropped, a `logging` problem says why.
    log_lines_dropped: int = 0
    # Why work waits just now ("running cap full", "account paused", ...).
    waiting: list[str] = msgspec.field(default_factory=list)
    # Inputs in the inbox not claimed yet, and entries refused, each with why.
    inbox_waiting: dict[str, str] = msgspec.field(default_factory=dict)
    inbox_refused: dict[str, str] = msgspec.field(default_factory=dict)
    reload: Reload | None = None
    # What was spent (published jobs, batch prices) today and this month, per provider,
    # and the budget beside it; days begin at midnight in `budget.timezone`.
    spend: Spend | None = None
    # How the daemon counts tokens, per family of models ("exact, Qwen vocabulary", or
    # "approximate: ... (why)"), and when its price table was read (its oldest default
    # in use) with a warning past 90 days.
    tokenizers: dict[str, str] = msgspec.field(default_factory=dict)
    prices_as_of: str | None = None
    prices_stale: str | None = None
    # This machine's faults in force (the daemon is not healthy while there is one), and
    # the wall clock's steps of the last hour (shown; nothing waits on them).
    local_faults: list[LocalFaultInfo] = msgspec.field(default_factory=list)
    clock_steps: list[ClockStepInfo] = msgspec.field(default_factory=list)
    # With the spool on a bucket: how parts reach the service (None: a local spool).
    oss_inputs: OssInputsInfo | None = None


class SpendPeriod(_Model, kw_only=True):
    spent: dict[str, float]  # provider -> amount
    cap: float | None = None
    left: float | None = None  # cap - spent - running worst case


class Spend(_Model, kw_only=True):
    currency: str
    timezone: str
    today: SpendPeriod
    month: SpendPeriod
    # The worst case of what is created and not yet published (parts with no price: count).
    running_worst_case: float = 0.0
    running_unpriced: int = 0
    held_jobs: int = 0


class PartInfo(_Model, kw_only=True):
    seq: int
    state: str
    requests: int
    bytes: int
    model: str
    endpoint: str
    first_line: int
    remote_file_id: str | None
    batch_id: str | None
    remote_status: str | None
    request_counts: dict[str, int] | None
    output_file_id: str | None
    error_file_id: str | None
    # Unix seconds. `batch_created_at` (when batchd asked for the batch) and `ended_at`
    # (when batchd saw it end) are batchd's clock; `created_remote_at` and
    # `provider_times` (the Batch object's own timestamps, each checked) the provider's.
    created_remote_at: float | None
    ended_at: float | None
    error: str | None
    attempts: int = 0
    retry_at: float | None = None
    parked_from: str | None = None
    unavailable: dict[str, str] | None = None
    batch_created_at: float | None = None
    provider_times: dict[str, float | None] | None = None


class Notification(_Model, kw_only=True):
    """One notification of a job's end to one target (a webhook URL, or "command")."""

    target: str
    event: str
    state: str  # pending | delivered | failed
    attempts: int
    last_error: str | None = None
    delivered_at: float | None = None
    next_at: float | None = None  # when pending: the next try


class ExtraBatchInfo(_Model, kw_only=True):
    """A batch made for one of the job's parts beside the one the part follows (a
    gateway's own client sent the create again): cancelled as soon as found."""

    part: int
    batch_id: str
    kept_batch_id: str
    found_by: str  # settle | adopt | sweep
    found_at: float
    status: str | None
    request_counts: dict[str, int] | None
    cancel: str  # pending | requested | ended | gone | failed
    note: str  # what it means, billing first
    error: str | None = None


class JobInfo(_Model, kw_only=True):
    id: str
    name: str
    inbox_name: str
    kind: str
    state: str
    # Once published: completed, partial, failed, cancelled, expired or rejected.
    status: str | None
    requests: int | None
    completed: int
    failed: int
    bytes: int | None
    sha256: str | None
    cancel_requested: bool
    error: str | None
    outbox: str | None  # the job's folder in the outbox, once published
    created_at: float
    updated_at: float
    parts: list[PartInfo] | None = None
    notifications: list[Notification] | None = None  # with `show`
    report: dict[str, Any] | None = None
    # Why the job waits (budget, no_price, over_cap, duplicate: batchd.pipeline.holds), what it
    # needs and what ends it, since when, and whether it ends without an operator; None
    # when it does not wait.
    held: str | None = None
    held_note: str | None = None
    held_at: float | None = None
    hold_ends_by_itself: bool | None = None
    # Tokens counted when planned and the worst case (`batchd estimate`'s figures).
    estimate: dict[str, Any] | None = None
    # Once published: the actual usage and cost, per model.
    usage: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    # `batchd retry` links: the job this one retries, the jobs that retry this one, the
    # failures this retry left out of its parent (per code), and where the chain's merged
    # results are (the root's outbox folder, `merged/`), once there are any.
    retry_of: str | None = None
    retried_by: list[str] = msgspec.field(default_factory=list)
    retry_left_out: dict[str, int] | None = None
    # With `show`, of a retried job: its failures its retries left out (not sent yet).
    left_out: dict[str, int] | None = None
    merged: str | None = None
    # With `show`: the job's extra batches (see ExtraBatchInfo); empty when none.
    extra_batches: list[ExtraBatchInfo] | None = None


class JobList(_Model, kw_only=True):
    jobs: list[JobInfo]
    total: int  # every job the filters match
    limit: int
    offset: int
    # More jobs follow this page (ask again with `before` = the last job's id).
    more: bool = False


class ActionResponse(_Model, kw_only=True):
    ok: bool
    message: str
    job: JobInfo | None = None
    # `retry`: the failures left out (refused for their content or form, or most likely
    # billed already), per code; and what the earlier attempt probably cost (`amount`,
    # `currency`, and what of it was charged at worst case: `estimated_amount`,
    # `estimated_requests`, `result_unavailable`).
    left_out: dict[str, int] | None = None
    cost: dict[str, Any] | None = None


class Event(_Model, kw_only=True, omit_defaults=True):
    """One line of `GET /v1/events` (newline-delimited JSON)."""

    type: str  # job | part | hello
    at: float
    job_id: str | None = None
    name: str | None = None  # the job's (job events)
    part: int | None = None
    state: str | None = None
    outcome: str | None = None
    remote_status: str | None = None
    request_counts: dict[str, int] | None = None
    batch_id: str | None = None
    requests: int | None = None
    error: str | None = None


class AmbiguousJob(Exception):
    """A job reference (an id prefix or a name) that fits more than one job."""

    def __init__(self, ref: str, candidates: list[JobInfo]) -> None:
        listed = "; ".join(f"{j.id} ({j.name}, {j.status or j.state})" for j in candidates)
        super().__init__(
            f"{ref!r} fits {len(candidates)} jobs or more: {listed}; give more of the id"
        )
        self.ref = ref
        self.candidates = candidates


JOB_REFERENCE = (
    "a job is named by its id, a unique prefix of it (6 characters or more), or its exact name"
)


class Operator(Protocol):
    """What the control socket asks of the daemon: the operations layer (batchd/operator/ops.py),
    or a fake in the control server's own tests."""

    async def status(self) -> StatusResponse: ...

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
        """A page of jobs; `ValueError` for an unknown state or outcome, or a `before`
        that names no job."""
        ...

    # A job is named by a reference (JOB_REFERENCE); None when it fits no job,
    # `AmbiguousJob` when it fits several.

    async def job(self, ref: str, *, detail: bool = True) -> JobInfo | None: ...

    async def cancel(self, ref: str) -> ActionResponse | None: ...

    async def retry(
        self, ref: str, *, everything: bool = False, force: bool = False
    ) -> ActionResponse | None:
        """Run again what failed; `everything`: refused requests too (`retry --all`);
        `force`: requests whose results were lost, most likely billed (`retry --force`)."""
        ...

    async def pause(self) -> ActionResponse: ...

    async def resume(self) -> ActionResponse:
        """Take files again, and call off a drain."""
        ...

    async def drain(self) -> ActionResponse: ...

    async def metrics(self) -> dict[str, Any]: ...

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]: ...

    async def describe_event(self, raw: dict[str, Any]) -> Event | None: ...
