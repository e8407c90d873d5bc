"""The control socket under abuse (issue 12): refused peers, connection floods, idle and
half-sent requests, running out of file descriptors, absurd queries, unusable paths.

Every connection here is to a Unix socket; the emulator listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import pytest

from batchd.cli import main
from batchd.errors import ConfigError
from batchd.operator.control import (
    MAX_LINGERING,
    UNIX_PATH_MAX,
    ControlServer,
    check_socket_path,
)
from batchd.testing import (
    RawControl,
    StartEmulator,
    daemon_env,
    daemon_settings,
    drop,
    events,
    requests,
    running_daemon,
    wait_for,
    wait_published,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 0.3  # control.request_timeout_s in these tests
STREAM_TIMEOUT_S = 0.6  # control.stream_timeout_s in the tests of streams


class Peer:
    """A raw connection to the control socket, to misbehave with."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.opened = time.monotonic()

    @classmethod
    async def open(cls, path: Path) -> Peer:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self, timeout_s: float = 5.0) -> tuple[bytes, float]:
        """What the daemon sent before closing, and how long after the open it closed.
        Raises TimeoutError when the daemon keeps the connection open."""
        data = b""
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await self.reader.read(4096):
                    data += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: as good as an EOF
        return data, time.monotonic() - self.opened

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the daemon closed it first


async def close_all(peers: list[Peer]) -> None:
    await asyncio.gather(*(p.close() for p in peers))


# -- 1. a peer that may not use the socket ------------------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"

# Opens N connections and holds them all, sending nothing, then waits (3 s at most) for
# the daemon to close each one; prints what it saw as JSON.
HOLDER = r"""
import json, selectors, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    held.append(s)
opened = time.monotonic()
sel = selectors.DefaultSelector()
for s in held:
    sel.register(s, selectors.EVENT_READ, [b""])
closed, answered = 0, 0
while sel.get_map() and time.monotonic() < opened + 3.0:
    for key, _ in sel.select(timeout=0.1):
        try:
            chunk = key.fileobj.recv(4096)
        except ConnectionResetError:
            chunk = b""
        except BlockingIOError:
            continue
        if chunk:
            key.data[0] += chunk
            continue
        closed += 1
        answered += key.data[0].startswith(b"HTTP/1.1 403")
        sel.unregister(key.fileobj)
print(json.dumps({"closed": closed, "answered": answered, "held": len(sel.get_map()),
                  "seconds": time.monotonic() - opened}))
"""


@pytest.mark.skipif(
    os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="acting as another user (uid 65534) needs root and a system-wide python3",
)
async def test_a_refused_peer_is_closed_at_accept_and_cannot_hold_connections(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    emulator = await start_emulator()
    # A folder other users can traverse (pytest's own temp root is private to root).
    shared = Path(tempfile.mkdtemp(prefix="batchd-dos-"))
    sock = shared / "control.sock"
    settings = daemon_settings(tmp_path / "r", emulator, control={"socket": sock})
    n = 200
    try:
        async with running_daemon(settings) as daemon:
            # Even with the socket open to everyone, the peer check stands.
            os.chmod(shared, 0o755)
            os.chmod(sock, 0o666)
            proc = await asyncio.create_subprocess_exec(
                SYSTEM_PYTHON,
                "-c",
                HOLDER,
                str(sock),
                str(n),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                user=65534,
                group=65534,
            )
            most = {"connections": 0, "lingering": 0}

            async def sample() -> None:
                while True:
                    most["connections"] = max(most["connections"], daemon.control.connections)
                    most["lingering"] = max(most["lingering"], daemon.control.lingering)
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            sampler.cancel()
            assert proc.returncode == 0, err.decode()
            # None was served; the few kept a moment for their answer stayed few.
            assert most["connections"] == 0 and most["lingering"] <= MAX_LINGERING, most
            seen = json.loads(out)
            # Every connection closed by the daemon at once, none left held.
            assert seen["held"] == 0 and seen["closed"] == n, seen
            assert seen["seconds"] < 2.0, seen
            assert seen["answered"] >= 1, seen  # a 403 answer, when it could be written
            assert daemon.control.refused == n
            assert daemon.control.connections == 0
            # The daemon still serves the allowed.
            status, body = await RawControl(sock).call("GET", "/v1/status")
            assert status == 200 and body["healthy"]
    finally:
        shutil.rmtree(shared)
    # Logged with who it was, but not once per connection.
    refused = events(log_lines, "control_peer_refused")
    assert 1 <= len(refused) <= 2, refused
    assert refused[0]["uid"] == 65534 and refused[0]["gid"] == 65534 and refused[0]["pid"] > 0


# -- 2. too many connections, idle connections --------------------------------------------


async def test_connections_over_the_cap_are_closed_at_accept_and_idle_ones_time_out(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator()
    cap = 4
    settings = daemon_settings(
        tmp_path / "r",
        emulator,
        control={"max_connections": cap, "request_timeout_s": TIMEOUT_S},
    )
    path = settings.socket_path
    client = RawControl(path)
    async with running_daemon(settings) as daemon:
        control = daemon.control
        # While idle connections are held (below the cap), status calls are answered.
        idle = [await Peer.open(path) for _ in range(cap - 1)]
        await wait_for(
            lambda: control.connections == cap - 1, 10, "idle connections admitted", step_s=0.01
        )
        status, _ = await client.call("GET", "/v1/status")
        assert status == 200
        # Each idle one is closed after the request timeout, without an answer.
        for peer in idle:
            data, after_s = await peer.until_closed()
            assert data == b""
            assert TIMEOUT_S * 0.9 <= after_s < TIMEOUT_S + 2.0
        await close_all(idle)
        assert control.timed_out == cap - 1

        # Fill the cap; every connection past it is answered 503 and closed at once.
        idle = [await Peer.open(path) for _ in range(cap)]
        await wait_for(lambda: control.connections == cap, 10, "the cap filled", step_s=0.01)
        extra = [await Peer.open(path) for _ in range(2 * cap)]
        for peer in extra:
            data, after_s = await peer.until_closed()
            assert data.startswith(b"HTTP/1.1 503"), data
            assert b"too_many_connections" in data
            assert after_s < TIMEOUT_S  # at accept, not after the timeout
        await close_all(extra)
        assert control.dropped == 2 * cap
        # The CLI says so, instead of hanging.
        code = await asyncio.to_thread(main, ["status", "--socket", str(path)])
        assert code == 1 and "control.max_connections" in capsys.readouterr().err
        # The idle ones go after the timeout; then calls are answered again.
        for peer in idle:
            data, _ = await peer.until_closed()
            assert data == b""
        await close_all(idle)
        await wait_for(
            lambda: control.connections == 0, 10, "all connections released", step_s=0.01
        )
        status, body = await client.call("GET", "/v1/status")
        assert status == 200 and body["healthy"]


async def test_a_kept_alive_connection_gets_the_timeout_again_after_each_answer(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    settings = daemon_settings(tmp_path / "r", emulator, control={"request_timeout_s": TIMEOUT_S})
    async with running_daemon(settings) as daemon:
        peer = await Peer.open(settings.socket_path)
        request = b"GET /v1/status HTTP/1.1\r\nHost: batchd\r\n\r\n"
        # Calls spaced by less than the timeout, for three times the timeout: all answered
        # on the one connection.
        started = time.monotonic()
        for _ in range(10):
            await asyncio.sleep(TIMEOUT_S / 3)
            await peer.send(request)
            head = await asyncio.wait_for(peer.reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await peer.reader.readexactly(length)
            answered = time.monotonic()
        assert answered - started > 3 * TIMEOUT_S
        assert daemon.control.timed_out == 0
        # Then silence: closed one timeout after the last answer.
        data, _ = await peer.until_closed()
        assert data == b""
        assert TIMEOUT_S * 0.9 <= time.monotonic() - answered < TIMEOUT_S + 2.0
        await peer.close()
        assert daemon.control.timed_out == 1


# -- 3. half-sent requests; the event stream is not cut -----------------------------------


async def test_a_half_sent_request_is_closed_after_the_timeout(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    settings = daemon_settings(tmp_path / "r", emulator, control={"request_timeout_s": TIMEOUT_S})
    async with running_daemon(settings) as daemon:
        # Headers that never end.
        peer = await Peer.open(settings.socket_path)
        await peer.send(b"GET /v1/status HTTP/1.1\r\nHost: batchd\r\n")
        data, after_s = await peer.until_closed()
        assert data == b""
        assert TIMEOUT_S * 0.9 <= after_s < TIMEOUT_S + 2.0
        await peer.close()

        # A byte at a time, each well within the timeout: the deadline is for the whole
        # request, so trickling does not keep the connection.
        slow = await Peer.open(settings.socket_path)
        line = b"GET /v1/status HTTP/1.1\r\nHost: batchd\r\nX-Pad: " + b"a" * 400

        async def trickle() -> None:
            for byte in line:
                try:
                    await slow.send(bytes([byte]))
                except (ConnectionResetError, BrokenPipeError):
                    return
                await asyncio.sleep(TIMEOUT_S / 10)

        sender = asyncio.create_task(trickle())
        data, after_s = await slow.until_closed()
        sender.cancel()
        assert data == b""
        assert after_s < TIMEOUT_S + 2.0
        await slow.close()
        assert daemon.control.timed_out == 2
        assert daemon.control.connections == 0
        status, _ = await RawControl(settings.socket_path).call("GET", "/v1/status")
        assert status == 200


async def test_the_event_stream_outlives_the_request_timeout(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(
        tmp_path / "r",
        emulator,
        control={"request_timeout_s": TIMEOUT_S, "stream_timeout_s": STREAM_TIMEOUT_S},
    )
    seen: list[dict[str, Any]] = []
    async with running_daemon(settings) as daemon:

        async def listen() -> None:
            async for event in RawControl(settings.socket_path).stream("/v1/events"):
                seen.append(event)
                if event.get("type") == "job" and event.get("state") == "published":
                    return

        listener = asyncio.create_task(listen())
        await asyncio.sleep(4 * TIMEOUT_S)  # a quiet stream, longer than the timeout
        assert not listener.done()
        drop(settings.paths.folder("inbox"), "e.jsonl", requests(2))
        await wait_published(settings.paths.folder("outbox"), 1, emulator)
        await asyncio.wait_for(listener, 10)
        assert daemon.control.timed_out == 0
        # Quiet for twice the stream timeout: heartbeats, which a reader reads (and the
        # clients skip), never a cut.
        assert daemon.control.streams_cut == 0
    assert seen[0]["type"] == "hello" and seen[-1]["state"] == "published"


EVENTS = b"GET /v1/events HTTP/1.1\r\nHost: batchd\r\n\r\n"


async def test_event_streams_have_their_own_cap_and_a_reader_that_does_not_read_is_cut(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Watchers that never read (a `batchd watch` stopped with Ctrl-Z) once held every
    connection: operators got 503. Streams are counted apart, and each one left unread
    for the stream timeout is cut, which frees its place."""
    emulator = await start_emulator()
    cap, streams = 4, 3
    settings = daemon_settings(
        tmp_path / "r",
        emulator,
        control={
            "max_connections": cap,
            "request_timeout_s": 5.0,
            "max_streams": streams,
            "stream_timeout_s": STREAM_TIMEOUT_S,
        },
    )
    path = settings.socket_path
    async with running_daemon(settings) as daemon:
        control = daemon.control
        # As many silent watchers as there are connections, and more, one after another:
        # plain sockets that never read (an asyncio reader would drain the kernel's
        # buffer into its own).
        silent: list[socket.socket] = []
        for n in range(cap + 2):
            if n < streams:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
                sock.sendall(EVENTS)
                silent.append(sock)
                await wait_for(lambda n=n: control.streams == n + 1, 10, "a stream admitted")
                continue
            # Past the streams' own cap, a stream is refused with its own answer.
            peer = await Peer.open(path)
            await peer.send(EVENTS)
            data, after_s = await peer.until_closed(5.0)
            await peer.close()
            assert data.startswith(b"HTTP/1.1 503"), data
            assert b"too_many_streams" in data and b"control.max_streams" in data
            assert after_s < STREAM_TIMEOUT_S
        admitted = time.monotonic()
        assert control.streams_refused == cap + 2 - streams
        # The operator is served all the same.
        status, body = await RawControl(path).call("GET", "/v1/status")
        assert status == 200 and body["healthy"]
        assert control.streams == streams
        # Each silent stream is cut once what was written to it has been left unread for
        # the timeout (and a third of it, the pace it is looked at).
        await wait_for(lambda: control.streams_cut == streams, 10, "the silent streams cut")
        after_s = time.monotonic() - admitted
        assert STREAM_TIMEOUT_S * 0.9 <= after_s < STREAM_TIMEOUT_S * 2 + 2.0, after_s
        for sock in silent:
            sock.settimeout(5.0)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
            sock.close()
            assert data.startswith(b"HTTP/1.1 200")  # the head and the hello, never read
        await wait_for(lambda: control.streams == 0, 10, "the cut streams released")

        # The case as it happens: a `batchd watch` stopped with Ctrl-Z is cut; one that
        # reads is not, though its stream is quiet for several timeouts.
        reading = asyncio.create_task(_first_events(RawControl(path), 2))
        await wait_for(lambda: control.streams == 1, 10, "the reading watcher")
        watch = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batchd",
            "watch",
            "--socket",
            str(path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_for(lambda: control.streams == 2, 30, "the watch's stream")
            watch.send_signal(signal.SIGSTOP)
            await wait_for(lambda: control.streams_cut == streams + 1, 10, "the stopped watch cut")
            assert control.streams == 1 and not reading.done()
            await asyncio.sleep(2 * STREAM_TIMEOUT_S)  # still quiet: heartbeats only
            assert control.streams == 1 and control.streams_cut == streams + 1
            drop(settings.paths.folder("inbox"), "w.jsonl", requests(1))
            seen = await asyncio.wait_for(reading, 30)
            assert seen[0]["type"] == "hello" and seen[1]["type"] == "job"
        finally:
            with contextlib.suppress(ProcessLookupError):
                watch.send_signal(signal.SIGCONT)
                watch.kill()
            await watch.wait()


async def _first_events(raw: RawControl, n: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async for event in raw.stream("/v1/events"):
        seen.append(event)
        if len(seen) == n:
            break
    return seen


# -- 4. a flood past the daemon's file descriptor limit ------------------------------------

FD_LIMIT = 256


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def flood(path: Path, n: int) -> list[socket.socket]:
    """Open up to n connections without waiting (a full backlog refuses at once)."""
    held = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        if s.connect_ex(str(path)) == 0:
            held.append(s)
        else:
            s.close()
    return held


async def test_a_flood_past_the_fd_limit_leaves_the_daemon_working(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "r"
    env = daemon_env(emulator, root, BATCHD_CONTROL__REQUEST_TIMEOUT_S="1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * FD_LIMIT:
        pytest.skip(f"the flood needs {4 * FD_LIMIT} file descriptors here (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * FD_LIMIT), hard))
    log_path = tmp_path / "daemon.log"
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batchd",
            "run",
            env=env,
            stdout=log_file,
            stderr=log_file,
            preexec_fn=_low_fd_limit,
        )
    held: list[socket.socket] = []
    try:
        await wait_ready(root, proc)
        sock = root / "control.sock"
        # Waves of connections, held open, well past the daemon's limit.
        for _ in range(6):
            held += flood(sock, FD_LIMIT // 2)
            await asyncio.sleep(0.2)
        assert len(held) >= FD_LIMIT  # past what the daemon may open
        # The daemon keeps working under the flood: a job goes through, status answers.
        drop(root / "inbox", "f.jsonl", requests(3))
        await wait_published(root / "outbox", 1, emulator)
        assert proc.returncode is None
        status = await wait_ready(root, proc, timeout_s=15)
        assert status["healthy"], status
        # The flood goes away; the daemon answers and stops cleanly.
        for s in held:
            s.close()
        held = []
        status = await wait_ready(root, proc, timeout_s=15)
        assert status["healthy"] and status["jobs_by_state"] == {"published": 1}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        for s in held:
            s.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log_path.read_text()
    assert "stage_crashed" not in text and "Traceback" not in text, text[-3000:]
    assert "control_connection_dropped" in text


# -- 5. absurd queries ----------------------------------------------------------------------


async def test_an_offset_or_limit_sqlite_cannot_bind_answers_400(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator()
    settings = daemon_settings(tmp_path / "r", emulator)
    client = RawControl(settings.socket_path)
    async with running_daemon(settings):
        for params in (
            {"offset": str(2**63)},
            {"offset": str(2**64)},
            {"offset": "1" + "0" * 40},
            {"offset": "-1"},
            {"limit": str(2**63)},
            {"limit": "0"},
            {"offset": "9" * 5000},  # longer than int() takes
        ):
            status, body = await client.call("GET", "/v1/jobs", **params)
            assert status == 400, (params, body)
            assert body["error"]["code"] == "bad_request"
            assert next(iter(params)) in body["error"]["message"]
        status, body = await client.call("GET", "/v1/jobs", offset="1000000")
        assert status == 200 and body["jobs"] == []
        code = await asyncio.to_thread(
            main, ["jobs", "--socket", str(settings.socket_path), "--limit", str(2**64)]
        )
        assert code == 0  # the CLI asks a page at a time: any --limit is a valid one


# -- 6. a socket path the kernel cannot bind ------------------------------------------------


def test_a_socket_path_over_the_unix_limit_is_a_config_error(tmp_path: Path) -> None:
    folder = tmp_path / ("d" * 60) / ("e" * 60)
    path = folder / "control.sock"
    size = len(os.fsencode(path))
    assert size >= UNIX_PATH_MAX
    with pytest.raises(ConfigError) as caught:
        check_socket_path(path)
    message = str(caught.value)
    assert str(path) in message and f"{size} bytes" in message
    assert str(UNIX_PATH_MAX - 1) in message
    assert "control.socket" in message and "paths.runtime" in message
    # The server checks it first thing, before it looks at anything else.
    with pytest.raises(ConfigError, match=r"control\.socket"):
        ControlServer(cast(Any, None), path, None)
    # Right at the limit is fine (and binds).
    short = tmp_path / "s"
    short.mkdir()
    at_limit = short / ("x" * (UNIX_PATH_MAX - 2 - len(os.fsencode(short))))
    assert len(os.fsencode(at_limit)) == UNIX_PATH_MAX - 1
    check_socket_path(at_limit)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(at_limit))


def test_batchd_run_with_a_too_long_socket_path_exits_2(tmp_path: Path) -> None:
    long_socket = tmp_path / ("d" * 120) / "control.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "DASHSCOPE_"))}
    env.update(
        {
            "BATCHD_API_KEY": "sk-test",
            "BATCHD_PROVIDER": "custom",
            "BATCHD_BASE_URL": "http://127.0.0.1:9/v1",
            "BATCHD_PATHS__ROOT": str(tmp_path / "r"),
            "BATCHD_CONTROL__SOCKET": str(long_socket),
            "BATCHD_LOG__FORMAT": "json",
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "batchd", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert str(long_socket) in result.stderr and "control.socket" in result.stderr
    assert "Traceback" not in result.stderr


# -- the units' file descriptor limit --------------------------------------------------------

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


@pytest.mark.parametrize("unit", ["batchd.service", "batchd@.service"])
def test_the_units_raise_the_file_descriptor_limit(unit: str) -> None:
    """systemd's default soft limit is 1024; the units give the daemon room."""
    lines = [line.strip() for line in (SYSTEMD / unit).read_text().splitlines()]
    limits = [line.split("=", 1)[1] for line in lines if line.startswith("LimitNOFILE=")]
    assert len(limits) == 1 and int(limits[0]) >= 65536, limits


# -- the CLI, when the daemon closes without answering --------------------------------------


async def test_the_cli_says_the_daemon_refused_or_dropped_a_connection_closed_unanswered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "closer.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the request has begun: close without a word
        writer.close()

    server = await asyncio.start_unix_server(hang_up, str(path))
    try:
        code = await asyncio.to_thread(main, ["status", "--socket", str(path)])
    finally:
        server.close()
        await server.wait_closed()
    err = capsys.readouterr().err
    assert code == 3, err
    assert str(path) in err and "refused or dropped" in err
