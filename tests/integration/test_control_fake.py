"""The control server against a fake operations layer: the socket's own behaviour (routes,
status codes, the JSON error envelope, the event stream) with no daemon behind it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from batchd.client import AsyncClient, Client, RequestFailed
from batchd.operator.control import ControlServer
from batchd.operator.protocol import (
    ActionResponse,
    Event,
    JobInfo,
    JobList,
    LocalFaultInfo,
    Operator,
    RunningCaps,
    Spend,
    SpendPeriod,
    StatusResponse,
)
from batchd.testing import RawControl

JOB = JobInfo(
    id="01a2209e9727a90fd9e5",
    name="reviews",
    inbox_name="reviews.jsonl",
    kind="jsonl",
    state="running",
    status=None,
    requests=3,
    completed=1,
    failed=0,
    bytes=10,
    sha256=None,
    cancel_requested=False,
    error=None,
    outbox=None,
    created_at=1.0,
    updated_at=2.0,
)


class FakeOperator:
    """Canned answers, and a record of what was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    async def status(self) -> StatusResponse:
        self.asked.append("status")
        return StatusResponse(
            version="0",
            pid=os.getpid(),
            uptime_s=1.0,
            provider="custom",
            base_url="http://127.0.0.1:9/v1",
            root="/nowhere",
            inbox="/nowhere/inbox",
            outbox="/nowhere/outbox",
            input_suffixes=[".jsonl", ".csv"],
            intake_paused=False,
            draining=False,
            account_paused=None,
            jobs_by_state={"running": 1},
            jobs_by_outcome={},
            parts_by_state={},
            caps=RunningCaps(running_batches=0, running_cap=1000),
            bucket_levels={},
            api_calls={},
            throttled={},
            last_errors={},
            healthy=True,
        )

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
        if states and "bogus" in states:
            raise ValueError("unknown state in ['bogus']")
        return JobList(jobs=[JOB], total=1, limit=limit, offset=offset)

    async def job(self, job_id: str, *, detail: bool = True) -> JobInfo | None:
        if job_id == "broken":
            raise RuntimeError("a bug behind one call")
        return JOB if job_id == JOB.id else None

    async def cancel(self, job_id: str) -> ActionResponse | None:
        self.asked.append(f"cancel {job_id}")
        return ActionResponse(ok=False, message="already published") if job_id == JOB.id else None

    async def retry(
        self, job_id: str, *, everything: bool = False, force: bool = False
    ) -> ActionResponse | None:
        self.asked.append(
            f"retry {job_id}" + (" --all" if everything else "") + (" --force" if force else "")
        )
        return ActionResponse(ok=True, message="requeued") if job_id == JOB.id else None

    async def pause(self) -> ActionResponse:
        self.asked.append("pause")
        return ActionResponse(ok=True, message="intake paused")

    async def resume(self) -> ActionResponse:
        return ActionResponse(ok=True, message="intake resumed")

    async def drain(self) -> ActionResponse:
        self.asked.append("drain")
        return ActionResponse(ok=True, message="draining")

    async def metrics(self) -> dict[str, Any]:
        return {
            "jobs_by_state": {"running": 1},
            "jobs_by_outcome": {},
            "requests": {"completed": 0, "failed": 0},
            "api_calls": {},
            "throttled": {},
            "bucket_levels": {},
            "running": 0,
            "running_cap": 1000,
            "queue_age_s": 0.0,
            "tokens": {"prompt": 0, "completion": 0},
            "cost_by_model": {"CNY": {"qwen-plus": 1.25}},
            "spend": Spend(
                currency="CNY",
                timezone="UTC",
                today=SpendPeriod(spent={"dashscope": 1.25}, cap=10.0, left=8.75),
                month=SpendPeriod(spent={"dashscope": 1.25}),
            ),
            "log_lines_dropped": 3,
            "extra_batches": {"requested": 2, "ended": 1},
            "local_faults": [
                LocalFaultInfo(
                    key="spool",
                    what="disk full",
                    detail="[Errno 28] No space left on device: 'spool/x'",
                    pauses="downloads",
                    since=1700000000.0,
                )
            ],
            "local_faults_met": {"spool": 4},
            "clock_steps": 1,
            "provider_down": True,
        }

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    async def describe_event(self, raw: dict[str, Any]) -> Event | None:
        return Event(type=str(raw["type"]), at=1.0, job_id=str(raw["id"]), state=raw.get("state"))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[FakeOperator, RawControl]]:
    fake = FakeOperator()
    operator: Operator = fake  # the fake speaks the whole interface
    server = ControlServer(operator, tmp_path / "control.sock", None)
    await server.start()
    try:
        yield fake, RawControl(tmp_path / "control.sock")
    finally:
        await server.stop()


async def test_calls_are_answered_from_the_operations_layer(
    served: tuple[FakeOperator, RawControl],
) -> None:
    """Through the typed client, as the CLI and scripts call: client and server agree on
    every model."""
    fake, raw = served
    client = AsyncClient(raw.path)
    status = await client.status()
    assert isinstance(status, StatusResponse) and status.jobs_by_state == {"running": 1}
    listing = await client.jobs(limit=5)
    assert listing.jobs[0] == JOB and listing.limit == 5
    assert (await client.pause()).ok
    assert (await client.drain()).ok
    answer = await client.cancel(JOB.id)
    assert not answer.ok and answer.message == "already published"  # a 409 is an answer
    assert (await client.retry(JOB.id, everything=True)).ok  # `batchd retry --all`
    exposed = await client.metrics()
    assert "batchd_running_cap 1000.0" in exposed
    assert 'batchd_cost_total{currency="CNY",model="qwen-plus"} 1.25' in exposed
    assert 'batchd_budget_left{currency="CNY",period="day"} 8.75' in exposed
    assert "batchd_log_lines_dropped_total 3.0" in exposed
    assert 'batchd_extra_batches_total{cancel="requested"} 2.0' in exposed
    assert 'batchd_local_fault{key="spool",what="disk full"} 1.0' in exposed
    assert 'batchd_local_faults_met_total{key="spool"} 4.0' in exposed
    assert "batchd_provider_down 1.0" in exposed
    with pytest.raises(RequestFailed) as unknown:
        await client.job("nope")
    assert (unknown.value.status, unknown.value.code) == (404, "unknown_job")
    sync = Client(raw.path)
    assert (await asyncio.to_thread(sync.jobs, limit=5)).jobs == [JOB]
    assert (await asyncio.to_thread(sync.retry, JOB.id)).ok
    assert (await client.retry(JOB.id, force=True)).ok  # `batchd retry --force`
    assert fake.asked == [
        "status",
        "pause",
        "drain",
        f"cancel {JOB.id}",
        f"retry {JOB.id} --all",
        f"retry {JOB.id}",
        f"retry {JOB.id} --force",
    ]


async def test_every_failure_is_a_json_error_envelope(
    served: tuple[FakeOperator, RawControl],
) -> None:
    _, client = served
    for method, url, params, want in (
        ("GET", "/v1/jobs/nope", {}, (404, "unknown_job")),
        ("POST", "/v1/jobs/nope/retry", {}, (404, "unknown_job")),
        ("POST", f"/v1/jobs/{JOB.id}/retry", {"all": "yes"}, (400, "bad_request")),
        ("POST", f"/v1/jobs/{JOB.id}/retry", {"force": "2"}, (400, "bad_request")),
        ("GET", "/v1/jobs", {"state": "bogus"}, (400, "bad_request")),
        ("GET", "/v1/jobs", {"offset": "9" * 40}, (400, "bad_request")),
        ("GET", "/v1/nothing", {}, (404, "not_found")),
        ("DELETE", "/v1/status", {}, (405, "method_not_allowed")),
        ("GET", "/v1/jobs/broken", {}, (500, "internal_error")),
    ):
        code, body = await client.call(method, url, **params)
        assert (code, body["error"]["code"]) == want, (url, body)
        assert body["error"]["message"]


async def test_events_stream_what_the_layer_publishes(
    served: tuple[FakeOperator, RawControl],
) -> None:
    fake, raw = served
    stream = AsyncClient(raw.path).events(seconds=10)
    assert (await anext(stream)).type == "hello"
    for listener in fake.listeners:
        listener({"type": "job", "id": "j1", "state": "running"})
    event = await asyncio.wait_for(anext(stream), 5)
    assert (event.type, event.job_id, event.state) == ("job", "j1", "running")
    await stream.aclose()


async def test_an_idle_event_stream_ends_when_asked(
    served: tuple[FakeOperator, RawControl],
) -> None:
    """`watch --seconds N` returns after N seconds even when nothing happens."""
    _, raw = served
    started = time.monotonic()
    seen = [
        e.type for e in await asyncio.to_thread(lambda: list(Client(raw.path).events(seconds=0.5)))
    ]
    assert seen == ["hello"] and time.monotonic() - started < 5
