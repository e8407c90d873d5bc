"""The control socket's request and response models, shared by the server and the CLI.

Every answer is JSON. Errors are `{"error": {"code": ..., "message": ...}}` with HTTP
400 (bad input), 403 (peer not allowed), 404 (unknown job) or 409 (not possible now).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

API_PREFIX = "/v1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorBody(_Model):
    code: str
    message: str


class ErrorResponse(_Model):
    error: ErrorBody


class Caps(_Model):
    running_batches: int
    running_cap: int
    running_by_model: dict[str, int] = Field(default_factory=dict)


class Problem(_Model):
    """Something that cannot proceed without help, or keeps failing: a parked part or
    job, a part whose steps fail, an inbox that cannot be read, lost state."""

    kind: str  # part_parked | part_failing | job_parked | intake | state_lost
    job_id: str | None = None
    part: int | None = None
    note: str
    since: float | None = None


class StatusResponse(_Model):
    version: str
    pid: int
    uptime_s: float
    provider: str
    base_url: str
    root: str
    intake_paused: bool
    draining: bool
    account_paused: str | None
    jobs_by_state: dict[str, int]
    jobs_by_outcome: dict[str, int]
    parts_by_state: dict[str, int]
    caps: Caps
    bucket_levels: dict[str, int]
    api_calls: dict[str, int]
    throttled: dict[str, int]
    last_errors: dict[str, str]
    healthy: bool
    # What needs an operator's eye, most pressing first (at most 20), and how many in all.
    problems: list[Problem] = Field(default_factory=list)
    problem_count: int = 0


class PartInfo(_Model):
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
    created_remote_at: float | None
    ended_at: float | None
    error: str | None
    attempts: int = 0
    retry_at: float | None = None
    parked_from: str | None = None
    unavailable: dict[str, str] | None = None


class JobInfo(_Model):
    id: str
    name: str
    inbox_name: str
    kind: str
    state: str
    outcome: str | None
    requests: int | None
    completed: int
    failed: int
    bytes: int | None
    sha256: str | None
    cancel_requested: bool
    error: str | None
    outbox_path: str | None
    created_at: float
    updated_at: float
    parts: list[PartInfo] | None = None
    report: dict[str, Any] | None = None


class JobList(_Model):
    jobs: list[JobInfo]
    total: int
    limit: int
    offset: int


class ActionResponse(_Model):
    ok: bool
    message: str
    job: JobInfo | None = None


class Event(_Model):
    """One line of `GET /v1/events` (newline-delimited JSON)."""

    type: str  # job | part | hello
    at: float
    job_id: str | None = None
    part: int | None = None
    state: str | None = None
    outcome: str | None = None
    remote_status: str | None = None
    request_counts: dict[str, int] | None = None
    batch_id: str | None = None
    requests: int | None = None
    error: str | None = None


class Operator(Protocol):
    """What the control socket asks of the daemon: the operations layer (batchd/ops.py),
    or a fake in the control server's own tests."""

    async def status(self) -> StatusResponse: ...

    async def jobs(
        self, states: list[str] | None, name: str | None, limit: int, offset: int
    ) -> JobList:
        """A page of jobs; `ValueError` for an unknown state."""
        ...

    async def job(self, job_id: str, *, detail: bool = True) -> JobInfo | None: ...

    async def cancel(self, job_id: str) -> ActionResponse | None: ...

    async def retry(self, job_id: str) -> ActionResponse | None: ...

    def pause(self) -> ActionResponse: ...

    def resume(self) -> ActionResponse: ...

    def drain(self) -> ActionResponse: ...

    async def metrics(self) -> dict[str, Any]: ...

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]: ...

    async def describe_event(self, raw: dict[str, Any]) -> Event | None: ...
