"""The control socket: HTTP/JSON over a Unix socket, checked by peer credentials.

The socket is created mode 0660 from its first moment (the umask is set around bind)
in a folder only the daemon's user and group can enter. Every connection's peer is looked
up with SO_PEERCRED the moment it is accepted, before a byte is read: root, the daemon's
own uid and members of the configured group are served; anyone else gets a short 403 and
the connection is closed at once (counted, and logged at most once per interval so a flood
does not flood the log). At most `control.max_connections` connections are served at
once; more are answered 503 and closed as they are accepted. A request must arrive whole
within `control.request_timeout_s` of the accept (or of the previous answer on a kept-
alive connection), or the connection is closed: an idle or slow peer cannot hold a file
descriptor. An answer being streamed (`GET /v1/events`) is not cut by that deadline.

Event streams are counted apart: a connection that asks for `/v1/events` leaves the
request connections' count for the streams' own (`control.max_streams`; past it, 503
`too_many_streams`), so watchers, however many, never lock an operator's `status` out. A
stream is written a blank line (a heartbeat, skipped by every client) whenever it has been
quiet for a third of `control.stream_timeout_s`; a reader that leaves what was written
unread that long (a `batchd watch` stopped with Ctrl-Z, a script that never reads) is cut.
A live socket is never taken over: a second daemon probes it by connecting first
(CPython's unix server would unlink it silently); a stale one left by a kill -9 is
replaced; the socket is removed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from batchd.errors import BatchdError, ConfigError
from batchd.logs import get_logger
from batchd.operator.protocol import (
    API_PREFIX,
    JOB_REFERENCE,
    ActionResponse,
    AmbiguousJob,
    ErrorBody,
    ErrorResponse,
    Event,
    Operator,
    encode,
)

log = get_logger(__name__)

_PEERCRED = struct.Struct("3i")
# sockaddr_un.sun_path on Linux: 108 bytes, the terminating NUL included.
UNIX_PATH_MAX = 108
# `GET /v1/jobs?offset=`: SQLite binds 64-bit integers; nobody has a billion jobs.
MAX_OFFSET = 1_000_000_000
# Refused, dropped and timed-out connections are logged at most once per this long.
LOG_EVERY_S = 10.0
# A refused connection's peer has this long to read its answer and hang up; so many may.
LINGER_S = 0.5
MAX_LINGERING = 16
# Running out of these must not turn into a traceback or a dead daemon.
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
# An event stream is looked at (and written a heartbeat when quiet) this many times per
# `stream_timeout_s`.
STREAM_TICKS = 3
HEARTBEAT = b"\n"


class SocketInUseError(BatchdError):
    """Another daemon is already listening on the control socket."""


def check_socket_path(path: Path) -> None:
    """Refuse a socket path the kernel cannot bind (ConfigError: exit 2, no restart loop)."""
    size = len(os.fsencode(path))
    if size >= UNIX_PATH_MAX:
        raise ConfigError(
            f"control socket path {path} is {size} bytes long; a Unix socket path may be "
            f"at most {UNIX_PATH_MAX - 1} bytes ({UNIX_PATH_MAX} with the terminating NUL): "
            "set control.socket to a shorter path, or paths.runtime to a shorter folder"
        )


class _SockOpts(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_credentials(sock: _SockOpts) -> tuple[int, int, int]:
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


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes written to a connection that its peer has not read yet (0 = all read):
    asyncio's own buffer, plus the kernel's send queue (SIOCOUTQ, which on a Unix socket
    counts what sits unread in the peer's receive queue, in the kernel's units)."""
    pending = 0
    if isinstance(transport, asyncio.WriteTransport):
        pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
            pending += struct.unpack("i", raw)[0]
    return pending


def reader_stalled(unread: int, now: float, all_read_at: float, timeout_s: float) -> bool:
    """PURE: has a stream's reader left what was written unread for `timeout_s`? It
    last had read everything at `all_read_at`."""
    return unread > 0 and now - all_read_at >= timeout_s


def _json(model: Any, status: int = 200) -> web.Response:
    """A protocol model (or plain data) as a JSON answer."""
    return web.Response(body=encode(model), status=status, content_type="application/json")


def error(status: int, code: str, message: str) -> web.Response:
    return _json(ErrorResponse(error=ErrorBody(code=code, message=message)), status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Throttle:
    """Log an event at most once per `every_s`: a flood of refused connections must not
    flood the log. The lines held back are counted, and the next line says how many (the
    ControlServer's counters keep the totals)."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next.get(event, 0.0):
            self._held[event] = self._held.get(event, 0) + 1
            return
        self._next[event] = now + self.every_s
        log.warning(event, **fields, not_logged=self._held.pop(event, 0))


def _error_answer(status: int, code: str, message: str) -> bytes:
    """A whole HTTP answer with a JSON error, for a connection refused at accept."""
    body = encode(ErrorResponse(error=ErrorBody(code=code, message=message)))
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Connection(asyncio.Protocol):
    """One accepted connection: admitted or refused before a byte is read, then handed to
    aiohttp's request handler (`inner`), with a deadline for each request to arrive whole.

    The deadline runs from the accept, stops while a request is being handled (a streamed
    answer may last for hours) and starts again when the handler returns, for the next
    request on a kept-alive connection. When it passes, the connection is aborted."""

    def __init__(self, server: ControlServer, inner: asyncio.Protocol) -> None:
        self.server = server
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.lingering = False  # refused, answered, our side shut; the peer's side open
        self.busy = False
        self._deadline: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol: checked here, then delegated --------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        if not self.server.admit(self):
            return
        self.admitted = True
        self._arm()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.lingering:
            self.lingering = False
            self.server.lingering -= 1
        self.server.release(self)
        if self.admitted:
            self.admitted = False
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)
        # else: the request of a refused connection, read only to be dropped

    def eof_received(self) -> bool | None:
        # A refused peer that has read its answer hangs up: close our side too.
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    # -- refusing -----------------------------------------------------------------------

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer with a short JSON error and end the connection at once, before a byte
        of the request is read. The answer goes in one write into the fresh connection's
        empty buffer, so it never waits on the peer (were any of it left unsent, the
        connection is aborted instead). Then our side is shut: the peer reads the answer
        and an end of file at once. Its side stays open (what it sends is read and
        dropped) until it hangs up, LINGER_S at most, because a socket closed outright
        fails the client's write of its request (EPIPE) or its read (ECONNRESET) before
        it has seen the answer. Only MAX_LINGERING connections linger at a time; past
        that, they are closed outright."""
        transport = self.transport
        assert transport is not None
        transport.write(_error_answer(status, code, message))
        if transport.get_write_buffer_size() or transport.is_closing():
            transport.abort()
        elif self.server.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
        else:
            transport.write_eof()
            self.lingering = True
            self.server.lingering += 1
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(LINGER_S, transport.abort)

    # -- the request deadline ----------------------------------------------------------

    def request_started(self) -> None:
        self.busy = True
        self._disarm()

    def request_done(self) -> None:
        self.busy = False
        if self.admitted and self.transport is not None and not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.server.request_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        self.server.timed_out_connection(self)
        self.transport.abort()


class ControlServer:
    def __init__(
        self,
        ops: Operator,
        path: Path,
        group: str | None,
        *,
        max_connections: int = 32,
        request_timeout_s: float = 10.0,
        max_streams: int = 16,
        stream_timeout_s: float = 30.0,
    ) -> None:
        # First, before anything is opened: a path the kernel cannot bind is a config error.
        check_socket_path(path)
        self.ops = ops
        self.path = path
        self.group_gid = resolve_group(group)
        self.own_uid = os.getuid()
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.max_streams = max_streams
        self.stream_timeout_s = stream_timeout_s
        self._unsubscribe: Callable[[], None] | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        # The connections being served, by aiohttp's handler for each: requests, and
        # event streams (counted apart, each against its own cap).
        self._connections: dict[object, _Connection] = {}
        self._streams: dict[object, _Connection] = {}
        self._log = _Throttle()
        self.refused = 0  # peers not allowed, closed at accept
        self.dropped = 0  # connections over max_connections, closed at accept
        self.timed_out = 0  # connections closed for want of a whole request in time
        self.lingering = 0  # refused connections waiting for their peer to hang up
        self.streams_refused = 0  # event streams asked for past max_streams
        self.streams_cut = 0  # event streams whose reader left them unread too long
        self._inode: int | None = None

    @property
    def connections(self) -> int:
        """Request connections being served now (event streams are counted apart)."""
        return len(self._connections)

    @property
    def streams(self) -> int:
        """Event streams being served now."""
        return len(self._streams)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        folder = self.path.parent
        if not folder.exists():
            # A folder of our own: owner and operators group may enter, no one else.
            folder.mkdir(parents=True)
            os.chmod(folder, 0o750)  # noqa: S103
        claim_socket_path(self.path)
        app = web.Application(middlewares=[self._track, self._errors])
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
        self._runner = runner
        handlers = runner.server
        assert handlers is not None  # set by setup()

        def accept() -> _Connection:
            return _Connection(self, handlers())

        loop = asyncio.get_running_loop()
        # The socket must never exist with looser permissions, not even for an instant.
        old = os.umask(0o117)
        try:
            self._server = await loop.create_unix_server(accept, str(self.path), backlog=128)
        finally:
            os.umask(old)
        self._inode = os.stat(self.path).st_ino
        self._unsubscribe = self.ops.subscribe(self._publish)
        log.info(
            "control_listening",
            path=str(self.path),
            max_connections=self.max_connections,
            request_timeout_s=self.request_timeout_s,
            max_streams=self.max_streams,
            stream_timeout_s=self.stream_timeout_s,
        )

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for queue in list(self._subscribers):
            queue.put_nowait({"type": "bye"})
        if self._server is not None:
            self._server.close()  # no new connections
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()  # closes the connections being served
            self._runner = None
        # Only our own socket: a daemon that failed to start must not remove a live one.
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    # -- admission ----------------------------------------------------------------------

    def admit(self, conn: _Connection) -> bool:
        """At accept, before a byte is read: the peer's credentials, then the cap.
        A refused connection gets a short JSON answer and is closed at once."""
        transport = conn.transport
        assert transport is not None
        try:
            pid, uid, gid = peer_credentials(transport.get_extra_info("socket"))
            allowed = allowed_peer(uid, gid, self.own_uid, self.group_gid)
        except (OSError, AttributeError) as exc:  # no socket, or the user database failed
            self.refused += 1
            self._log.warning("control_peer_refused", error=str(exc), refused=self.refused)
            conn.refuse(403, "forbidden", "peer credentials unavailable")
            return False
        if not allowed:
            self.refused += 1
            self._log.warning(
                "control_peer_refused", pid=pid, uid=uid, gid=gid, refused=self.refused
            )
            conn.refuse(403, "forbidden", f"uid {uid} may not use this socket")
            return False
        if len(self._connections) >= self.max_connections:
            self.dropped += 1
            self._log.warning(
                "control_connection_dropped",
                pid=pid,
                uid=uid,
                max_connections=self.max_connections,
                dropped=self.dropped,
            )
            conn.refuse(
                503,
                "too_many_connections",
                f"the control socket serves {self.max_connections} connections at once "
                "(control.max_connections); try again",
            )
            return False
        self._connections[conn.inner] = conn
        return True

    def release(self, conn: _Connection) -> None:
        for served in (self._connections, self._streams):
            if served.get(conn.inner) is conn:
                del served[conn.inner]

    def _as_stream(self, request: web.Request) -> bool:
        """Move a request's connection from the requests' count to the streams'; False
        when the streams are at their cap."""
        if len(self._streams) >= self.max_streams:
            self.streams_refused += 1
            self._log.warning(
                "control_stream_refused",
                max_streams=self.max_streams,
                streams_refused=self.streams_refused,
            )
            return False
        conn = self._connections.pop(request.protocol, None)
        if conn is not None:
            self._streams[request.protocol] = conn
        return True

    def timed_out_connection(self, conn: _Connection) -> None:
        self.timed_out += 1
        self._log.warning(
            "control_request_timeout",
            request_timeout_s=self.request_timeout_s,
            timed_out=self.timed_out,
        )

    # -- middleware ---------------------------------------------------------------------

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The request arrived whole: its connection's deadline waits for the answer."""
        conn = self._connections.get(request.protocol)
        if conn is None:
            # Not a connection `admit` let in (its peer was never checked): fail closed.
            return error(403, "forbidden", "connection not admitted")
        conn.request_started()
        try:
            return await handler(request)
        finally:
            conn.request_done()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return error(404, "not_found", f"no such call: {request.method} {request.path}")
        except web.HTTPMethodNotAllowed:
            return error(405, "method_not_allowed", f"{request.method} {request.path}")
        except AmbiguousJob as exc:
            return error(409, "ambiguous_job", str(exc))
        except web.HTTPException as exc:
            # Whatever aiohttp raises itself (a bad request line, a body too large) is
            # answered in the envelope protocol.py promises too.
            return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
        except OSError as exc:
            if exc.errno not in _OUT_OF_FDS:
                log.exception("control_call_failed", path=request.path)
                return error(500, "internal_error", f"{type(exc).__name__}: {exc}")
            log.warning("control_out_of_files", path=request.path, error=str(exc))
            return error(503, "out_of_files", f"the daemon is out of file descriptors: {exc}")
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            # A bug behind one call is that call's 500, in JSON, with the log line that
            # says where; never a plain-text page, never the daemon's end.
            log.exception("control_call_failed", path=request.path)
            return error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    # -- calls --------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return _json(await self.ops.status())

    async def jobs(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            return error(400, "bad_request", "limit and offset must be whole numbers")
        if not 1 <= limit <= 1000:
            return error(400, "bad_request", "limit must be 1..1000")
        if not 0 <= offset <= MAX_OFFSET:
            return error(400, "bad_request", f"offset must be 0..{MAX_OFFSET}")
        states = [s for s in q.get("state", "").split(",") if s] or None
        outcomes = [s for s in q.get("status", "").split(",") if s] or None
        order = q.get("order", "newest")
        if order not in ("newest", "oldest"):
            return error(400, "bad_request", "order must be newest or oldest")
        try:
            listing = await self.ops.jobs(
                states,
                q.get("name"),
                limit,
                offset,
                outcomes=outcomes,
                newest_first=order == "newest",
                before=q.get("before"),
                submit_id=q.get("submit_id"),
            )
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        return _json(listing)

    async def job(self, request: web.Request) -> web.Response:
        info = await self.ops.job(request.match_info["job_id"], detail=True)
        if info is None:
            ref = request.match_info["job_id"]
            return error(404, "unknown_job", f"no job {ref} ({JOB_REFERENCE})")
        return _json(info)

    async def cancel(self, request: web.Request) -> web.Response:
        return await self._action(request, self.ops.cancel)

    async def retry(self, request: web.Request) -> web.Response:
        everything = request.query.get("all", "0")
        force = request.query.get("force", "0")
        if everything not in ("0", "1") or force not in ("0", "1"):
            return error(400, "bad_request", "all and force must be 0 or 1")
        return await self._action(
            request,
            lambda ref: self.ops.retry(ref, everything=everything == "1", force=force == "1"),
        )

    async def _action(
        self, request: web.Request, action: Callable[[str], Awaitable[ActionResponse | None]]
    ) -> web.Response:
        job_id = request.match_info["job_id"]
        result = await action(job_id)
        if result is None:
            return error(404, "unknown_job", f"no job {job_id} ({JOB_REFERENCE})")
        return _json(result, 200 if result.ok else 409)

    async def pause(self, request: web.Request) -> web.Response:
        return _json(await self.ops.pause())

    async def resume(self, request: web.Request) -> web.Response:
        return _json(await self.ops.resume())

    async def drain(self, request: web.Request) -> web.Response:
        return _json(await self.ops.drain())

    async def metrics(self, request: web.Request) -> web.Response:
        snapshot = await self.ops.metrics()
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
        if not self._as_stream(request):
            refused = error(
                503,
                "too_many_streams",
                f"the control socket serves {self.max_streams} event streams at once "
                "(control.max_streams); try again",
            )
            refused.force_close()  # its connection holds no place after the answer
            return refused
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        tick_s = self.stream_timeout_s / STREAM_TICKS
        watch = asyncio.create_task(self._watch_reader(request, queue, tick_s))
        try:
            await response.write(encode(Event(type="hello", at=0.0)) + b"\n")
            while True:
                try:
                    raw = await asyncio.wait_for(queue.get(), tick_s)
                except TimeoutError:
                    # Quiet: a heartbeat, which a reader that stopped leaves unread.
                    await response.write(HEARTBEAT)
                    continue
                if raw.get("type") in ("bye", "cut"):
                    break
                event = await self.ops.describe_event(raw)
                if event is not None:
                    await response.write(encode(event) + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            # The watcher went away, or the daemon is stopping: nobody is left to tell.
            return response
        finally:
            watch.cancel()
            self._subscribers.discard(queue)
        return response

    async def _watch_reader(
        self, request: web.Request, queue: asyncio.Queue[dict[str, Any]], tick_s: float
    ) -> None:
        """Cut the stream when its reader leaves what was written unread for
        `stream_timeout_s`. A task of its own: the handler may be stuck in a write that
        waits for that very reader."""
        transport = request.transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        all_read_at = loop.time()
        while not transport.is_closing():
            await asyncio.sleep(tick_s)
            unread = unread_bytes(transport)
            now = loop.time()
            if unread == 0:
                all_read_at = now
            elif reader_stalled(unread, now, all_read_at, self.stream_timeout_s):
                self.streams_cut += 1
                self._log.warning(
                    "control_stream_cut",
                    unread_bytes=unread,
                    stream_timeout_s=self.stream_timeout_s,
                    streams_cut=self.streams_cut,
                )
                transport.abort()
                queue.put_nowait({"type": "cut"})
                return


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
        cost = CounterMetricFamily(
            "batchd_cost",
            "Actual cost of published jobs at batch prices (models with a price)",
            labels=["currency", "model"],
        )
        for currency, models in s["cost_by_model"].items():
            for model, amount in models.items():
                cost.add_metric([currency, model], amount)
        yield cost
        spend = s["spend"]
        spent = GaugeMetricFamily(
            "batchd_spend",
            "Spent in the current budget period (day, month in budget.timezone)",
            labels=["period", "provider", "currency"],
        )
        left = GaugeMetricFamily(
            "batchd_budget_left",
            "What the budget leaves after spend and the running worst case",
            labels=["period", "currency"],
        )
        for name, period in (("day", spend.today), ("month", spend.month)):
            for provider, amount in period.spent.items():
                spent.add_metric([name, provider, spend.currency], amount)
            if period.left is not None:
                left.add_metric([name, spend.currency], period.left)
        yield spent
        yield left
        yield GaugeMetricFamily(
            "batchd_running_worst_case",
            "Worst-case cost of batches created and not yet published",
            value=spend.running_worst_case,
        )
        yield GaugeMetricFamily(
            "batchd_jobs_held", "Jobs held for the budget or as duplicates", value=spend.held_jobs
        )
        extras = CounterMetricFamily(
            "batchd_extra_batches",
            "Batches made for a part beside the one it follows (a gateway's retried"
            " create), by where their cancel stands",
            labels=["cancel"],
        )
        for cancel, n in s["extra_batches"].items():
            extras.add_metric([cancel], n)
        yield extras
        yield CounterMetricFamily(
            "batchd_log_lines_dropped",
            "Log lines no output stream took (a broken pipe, a full disk)",
            value=s["log_lines_dropped"],
        )
        faults = GaugeMetricFamily(
            "batchd_local_fault",
            "A fault of this machine in force (1), by what it touches; the work it pauses waits",
            labels=["key", "what"],
        )
        since = GaugeMetricFamily(
            "batchd_local_fault_since_seconds",
            "When each fault of this machine in force was first met (Unix time)",
            labels=["key"],
        )
        for fault in s["local_faults"]:
            faults.add_metric([fault.key, fault.what], 1)
            since.add_metric([fault.key], fault.since)
        yield faults
        yield since
        met = CounterMetricFamily(
            "batchd_local_faults_met",
            "Times work met a fault of this machine (and waited), by what it touches",
            labels=["key"],
        )
        for key, n in s["local_faults_met"].items():
            met.add_metric([key], n)
        yield met
        yield CounterMetricFamily(
            "batchd_clock_steps", "Steps of the wall clock seen", value=s["clock_steps"]
        )
        yield GaugeMetricFamily(
            "batchd_provider_down",
            "The provider answers no call (1): the stages wait for it",
            value=1 if s["provider_down"] else 0,
        )
