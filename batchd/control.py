"""The control socket: HTTP/JSON over a Unix socket, checked by peer credentials.

The socket is created mode 0660 from its first moment (the umask is set around bind)
in a folder only the daemon's user and group can enter. Every request's peer is looked
up with SO_PEERCRED: root, the daemon's own uid and members of the configured group are
served; anyone else gets 403 and a log line. A live socket is never taken over: a second
daemon probes it by connecting first (CPython's unix server would unlink it silently);
a stale one left by a kill -9 is replaced; the socket is removed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel

from batchd.errors import BatchdError
from batchd.logs import get_logger
from batchd.protocol import API_PREFIX, ActionResponse, ErrorBody, ErrorResponse, Event

if TYPE_CHECKING:
    from batchd.daemon import Daemon

log = get_logger(__name__)

SOCKET_NAME = "control.sock"
_PEERCRED = struct.Struct("3i")


class SocketInUseError(BatchdError):
    """Another daemon is already listening on the control socket."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def allowed_peer(uid: int, gid: int, own_uid: int, group_gid: int | None) -> bool:
    """PURE but for the user database: root, ourselves, or a member of the group."""
    if uid in (0, own_uid):
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
        return name in grp.getgrgid(group_gid).gr_mem
    except KeyError:
        return False


def resolve_group(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise BatchdError(f"control socket group {name!r} does not exist") from None


def claim_socket_path(path: Path) -> None:
    """Refuse a live socket; remove a stale one; never touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BatchdError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            log.info("stale_socket_removed", path=str(path))
            return
        raise
    finally:
        probe.close()
    raise SocketInUseError(f"another batchd is already listening on {path}")


def _json(model: BaseModel | dict[str, Any], status: int = 200) -> web.Response:
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error(status: int, code: str, message: str) -> web.Response:
    return _json(ErrorResponse(error=ErrorBody(code=code, message=message)), status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlServer:
    def __init__(self, daemon: Daemon, path: Path, group: str | None) -> None:
        self.daemon = daemon
        self.path = path
        self.group_gid = resolve_group(group)
        self.own_uid = os.getuid()
        self._runner: web.AppRunner | None = None
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.refused = 0
        self._inode: int | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        folder = self.path.parent
        if not folder.exists():
            # A folder of our own: owner and operators group may enter, no one else.
            folder.mkdir(parents=True)
            os.chmod(folder, 0o750)  # noqa: S103
        claim_socket_path(self.path)
        app = web.Application(middlewares=[self._peer_check, self._errors])
        app.add_routes(
            [
                web.get(f"{API_PREFIX}/status", self.status),
                web.get(f"{API_PREFIX}/jobs", self.jobs),
                web.get(f"{API_PREFIX}/jobs/{{job_id}}", self.job),
                web.post(f"{API_PREFIX}/jobs/{{job_id}}/cancel", self.cancel),
                web.post(f"{API_PREFIX}/jobs/{{job_id}}/retry", self.retry),
                web.post(f"{API_PREFIX}/intake/pause", self.pause),
                web.post(f"{API_PREFIX}/intake/resume", self.resume),
                web.post(f"{API_PREFIX}/drain", self.drain),
                web.get(f"{API_PREFIX}/events", self.events),
                web.get("/metrics", self.metrics),
            ]
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        # The socket must never exist with looser permissions, not even for an instant.
        old = os.umask(0o117)
        try:
            site = web.UnixSite(runner, str(self.path))
            await site.start()
        finally:
            os.umask(old)
        self._runner = runner
        self._inode = os.stat(self.path).st_ino
        self.daemon.store.listeners.append(self._publish)
        log.info("control_listening", path=str(self.path))

    async def stop(self) -> None:
        for queue in list(self._subscribers):
            queue.put_nowait({"type": "bye"})
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # Only our own socket: a daemon that failed to start must not remove a live one.
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    # -- middleware ---------------------------------------------------------------------

    @web.middleware
    async def _peer_check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None:
            return error(403, "forbidden", "peer credentials unavailable")
        pid, uid, gid = peer_credentials(sock)
        if not allowed_peer(uid, gid, self.own_uid, self.group_gid):
            self.refused += 1
            log.warning("control_peer_refused", pid=pid, uid=uid, gid=gid, path=request.path)
            return error(403, "forbidden", f"uid {uid} may not use this socket")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return error(404, "not_found", f"no such call: {request.method} {request.path}")
        except web.HTTPMethodNotAllowed:
            return error(405, "method_not_allowed", f"{request.method} {request.path}")

    # -- calls --------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return _json(await self.daemon.status())

    async def jobs(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            return error(400, "bad_request", "limit and offset must be whole numbers")
        if not 1 <= limit <= 1000 or offset < 0:
            return error(400, "bad_request", "limit must be 1..1000 and offset >= 0")
        states = [s for s in q.get("state", "").split(",") if s] or None
        try:
            listing = await self.daemon.list_jobs(states, q.get("name"), limit, offset)
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        return _json(listing)

    async def job(self, request: web.Request) -> web.Response:
        info = await self.daemon.job_info(request.match_info["job_id"], detail=True)
        if info is None:
            return error(404, "unknown_job", f"no job {request.match_info['job_id']}")
        return _json(info)

    async def cancel(self, request: web.Request) -> web.Response:
        return await self._action(request, self.daemon.cancel_action)

    async def retry(self, request: web.Request) -> web.Response:
        return await self._action(request, self.daemon.retry_action)

    async def _action(
        self, request: web.Request, action: Callable[[str], Awaitable[ActionResponse | None]]
    ) -> web.Response:
        job_id = request.match_info["job_id"]
        result = await action(job_id)
        if result is None:
            return error(404, "unknown_job", f"no job {job_id}")
        return _json(result, 200 if result.ok else 409)

    async def pause(self, request: web.Request) -> web.Response:
        self.daemon.intake.paused = True
        log.info("intake_paused")
        return _json(ActionResponse(ok=True, message="intake paused"))

    async def resume(self, request: web.Request) -> web.Response:
        self.daemon.intake.paused = False
        self.daemon.wake["intake"].set()
        log.info("intake_resumed")
        return _json(ActionResponse(ok=True, message="intake resumed"))

    async def drain(self, request: web.Request) -> web.Response:
        self.daemon.start_drain()
        return _json(ActionResponse(ok=True, message="draining: no new files; exit when idle"))

    async def metrics(self, request: web.Request) -> web.Response:
        snapshot = await self.daemon.metrics_snapshot()
        registry = CollectorRegistry()
        registry.register(_SnapshotCollector(snapshot))
        return web.Response(
            body=generate_latest(registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    # -- events -------------------------------------------------------------------------

    def _publish(self, event: dict[str, Any]) -> None:
        for queue in self._subscribers:
            if queue.qsize() < 10_000:  # a stuck reader must not grow memory forever
                queue.put_nowait(event)

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            await response.write(orjson.dumps({"type": "hello", "at": 0.0}) + b"\n")
            while True:
                raw = await queue.get()
                if raw.get("type") == "bye":
                    break
                event = await self.daemon.describe_event(raw)
                if event is not None:
                    await response.write(
                        orjson.dumps(event.model_dump(mode="json", exclude_none=True)) + b"\n"
                    )
        except (ConnectionResetError, asyncio.CancelledError):
            # The watcher went away, or the daemon is stopping: nobody is left to tell.
            return response
        finally:
            self._subscribers.discard(queue)
        return response


class _SnapshotCollector:
    """Turns one snapshot of the daemon's figures into Prometheus metric families."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Any:
        s = self.snapshot
        jobs = GaugeMetricFamily("batchd_jobs", "Jobs by state", labels=["state"])
        for state, n in s["jobs_by_state"].items():
            jobs.add_metric([state], n)
        yield jobs
        outcomes = GaugeMetricFamily(
            "batchd_jobs_finished", "Published jobs by final status", labels=["status"]
        )
        for outcome, n in s["jobs_by_outcome"].items():
            outcomes.add_metric([outcome], n)
        yield outcomes
        reqs = CounterMetricFamily(
            "batchd_requests", "Requests of published jobs by outcome", labels=["outcome"]
        )
        for outcome, n in s["requests"].items():
            reqs.add_metric([outcome], n)
        yield reqs
        calls = CounterMetricFamily("batchd_api_calls", "API calls sent", labels=["call"])
        for call, n in s["api_calls"].items():
            calls.add_metric([call], n)
        yield calls
        throttled = CounterMetricFamily(
            "batchd_api_throttled", "API calls answered 429", labels=["call"]
        )
        for call, n in s["throttled"].items():
            throttled.add_metric([call], n)
        yield throttled
        levels = GaugeMetricFamily(
            "batchd_rate_available", "Calls that may be sent now per class", labels=["call"]
        )
        for call, n in s["bucket_levels"].items():
            levels.add_metric([call], n)
        yield levels
        yield GaugeMetricFamily(
            "batchd_running_batches", "Remote batches not yet ended", value=s["running"]
        )
        yield GaugeMetricFamily(
            "batchd_running_cap", "The account's running-batch cap", value=s["running_cap"]
        )
        yield GaugeMetricFamily(
            "batchd_queue_age_seconds",
            "Age of the oldest job not yet published",
            value=s["queue_age_s"],
        )
        tokens = CounterMetricFamily(
            "batchd_usage_tokens", "Tokens used by published jobs", labels=["kind"]
        )
        for kind, n in s["tokens"].items():
            tokens.add_metric([kind], n)
        yield tokens


class ControlClient:
    """The CLI's side: calls over the Unix socket, answers as parsed JSON."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    async def call(self, method: str, url: str, **params: str) -> tuple[int, Any]:
        import aiohttp

        connector = aiohttp.UnixConnector(path=str(self.path))
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://batchd{url}", params=params or None) as resp,
        ):
            body = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, orjson.loads(body)
            return resp.status, body.decode()

    async def stream(self, url: str) -> Any:
        """Yield parsed events from a newline-delimited JSON stream."""
        import aiohttp

        connector = aiohttp.UnixConnector(path=str(self.path))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(f"http://batchd{url}") as resp,
        ):
            async for line in resp.content:
                if line.strip():
                    yield orjson.loads(line)


def event_from(raw: dict[str, Any], job_id: str | None, part: int | None) -> Event:
    return Event(
        type=str(raw.get("type")),
        at=float(raw.get("at") or 0.0),
        job_id=job_id,
        part=part,
        state=raw.get("state"),
        outcome=raw.get("outcome"),
        remote_status=raw.get("remote_status"),
        request_counts=raw.get("request_counts"),
        batch_id=raw.get("batch_id"),
        error=raw.get("error"),
    )
