"""A canary API key never shows anywhere (TESTING.md E.25).

The daemon is given a fresh key `sk-canary-<32 hex>` and run through a whole job, through
every control-socket call, and through the error paths that quote what went wrong: the
service refusing the key (401), a base URL where nothing listens, a gateway that quotes
the key it was sent in its error text, and a stage that crashes with a traceback. Then
the key is looked for in its raw form, as `Bearer <key>`, base64 (any alignment),
percent- and hex-encoded, and as any 12-character piece of its random part (which also
catches a key wrapped over two lines or cut short) in:

- the log lines, JSON and console renderers, tracebacks included;
- the stderr of `batchd run` subprocesses, in both renderers;
- every file under the daemon's root: the SQLite database with its -wal and -shm, the
  outbox, the spool;
- every control-socket answer (status, jobs, job details, actions, errors, metrics, the
  event stream);
- exception texts and the reprs of the daemon's objects.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import web

from batchd import failpoints
from batchd.daemon import Daemon
from batchd.logs import configure, get_logger
from batchd.provider.api import ApiError, BatchApi, RetryPolicy
from batchd.provider.limits import CallClass, RateLimiter
from batchd.testing import (
    DaemonProcess,
    RawControl,
    StartEmulator,
    daemon_env,
    daemon_settings,
    drop,
    requests,
    running_daemon,
    wait_for,
    wait_published,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)

FORMATS = ["json", "console"]


@pytest.fixture
def canary() -> str:
    return "sk-canary-" + secrets.token_hex(16)


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoints.arm("")


def _b64_cores(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The part of `data`'s base64 that is the same wherever it sits in a longer text,
    for each of the three alignments, standard and URL-safe alphabets."""
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + data)
        core = encoded[4 : len(encoded) - 4]
        yield f"base64/{pad}", core
        yield f"base64url/{pad}", core.replace(b"+", b"-").replace(b"/", b"_")


def forms(key: str) -> list[tuple[str, bytes]]:
    raw = key.encode()
    found = [
        ("raw", raw),
        ("bearer", f"Bearer {key}".encode()),
        ("percent", quote(key, safe="").encode()),
        ("hex", raw.hex().encode()),
        *_b64_cores(raw),
    ]
    random_part = key.removeprefix("sk-canary-")
    found += [
        (f"piece@{i}", random_part[i : i + 12].encode()) for i in range(len(random_part) - 11)
    ]
    return found


def leaks(key: str, where: str, data: bytes | str) -> list[str]:
    blob = data.encode() if isinstance(data, str) else data
    return [f"{where}: {name}" for name, form in forms(key) if form in blob]


def leaks_under(key: str, root: Path) -> list[str]:
    """Every regular file under `root` (database, -wal, -shm, outbox, spool, state)."""
    found: list[str] = []
    seen = 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            seen += 1
            found += leaks(key, str(path.relative_to(root)), path.read_bytes())
    assert seen > 0
    return found


class Answers:
    """Every answer the control socket gave, kept to be searched."""

    def __init__(self, socket_path: Path) -> None:
        self.client = RawControl(socket_path)
        self.raw: list[bytes] = []

    async def call(self, method: str, url: str, **params: str) -> tuple[int, Any]:
        code, body = await self.client.call(method, url, **params)
        self.raw.append(body.encode() if isinstance(body, str) else orjson.dumps(body))
        return code, body

    async def everything(self) -> None:
        """Every call the socket answers, for every job, plus the error answers."""
        code, _ = await self.call("GET", "/v1/status")
        assert code == 200
        code, listing = await self.call("GET", "/v1/jobs", limit="1000")
        assert code == 200
        for job in listing["jobs"]:
            assert (await self.call("GET", f"/v1/jobs/{job['id']}"))[0] == 200
            await self.call("POST", f"/v1/jobs/{job['id']}/retry")
            await self.call("POST", f"/v1/jobs/{job['id']}/cancel")
        await self.call("GET", "/v1/jobs/no-such-job")
        await self.call("GET", "/v1/jobs", state="bogus")
        await self.call("GET", "/v1/nothing-here")
        await self.call("GET", "/metrics")


@asynccontextmanager
async def events_of(socket_path: Path) -> AsyncIterator[list[bytes]]:
    """The event stream while the block runs, as raw lines."""
    lines: list[bytes] = []

    async def read() -> None:
        async for event in RawControl(socket_path).stream("/v1/events"):
            lines.append(orjson.dumps(event))

    task = asyncio.create_task(read())
    await wait_for(lambda: lines, 10, "the stream's hello")  # subscribed
    try:
        yield lines
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def quoting_gateway() -> AsyncIterator[str]:
    """A gateway that answers every call 400 and quotes the Authorization header it got,
    as some API gateways and older services do (`Incorrect API key provided: sk-...`)."""

    async def refuse(request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization", "")
        body = {"error": {"code": "invalid_request", "message": f"rejected credentials {sent}"}}
        return web.json_response(body, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def capture_logs(fmt: str) -> io.StringIO:
    buffer = io.StringIO()
    configure("debug", "json" if fmt == "json" else "console", stream=buffer)
    return buffer


def object_reprs(daemon: Daemon) -> str:
    return "\n".join(
        repr(o) for o in (daemon, daemon.api, daemon.settings, daemon.profile, daemon.submitter)
    )


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_whole_run_and_every_control_answer_never_show_the_key(
    start_emulator: StartEmulator, tmp_path: Path, canary: str, fmt: str
) -> None:
    logs = capture_logs(fmt)
    emulator = await start_emulator(time_scale=3000, api_key=canary)
    root = tmp_path / "root"
    settings = daemon_settings(root, emulator)
    answers = Answers(settings.socket_path)
    async with running_daemon(settings, key=canary) as daemon:
        async with events_of(settings.socket_path) as stream:
            inbox = settings.paths.folder("inbox")
            drop(inbox, "good.jsonl", requests(3))
            drop(inbox, "bad.jsonl", b'{"custom_id": "1", "method": "POST"\n')
            drop(inbox, "table.csv", b"prompt\nhello\n")
            await wait_published(settings.paths.folder("outbox"), 3, emulator)
            await answers.everything()
        reprs = object_reprs(daemon)
    assert len(stream) > 5, "the event stream said nothing"
    found = leaks(canary, "log", logs.getvalue()) + leaks(canary, "reprs", reprs)
    found += leaks_under(canary, root)
    found += leaks(canary, "control answers", b"\n".join(answers.raw))
    found += leaks(canary, "events", b"\n".join(stream))
    assert not found, found
    # The key was in use: the service accepted it for the batches.
    assert (await emulator.stats())["batches_created"] >= 1


@pytest.mark.parametrize("fmt", FORMATS)
async def test_refused_unreachable_and_quoted_keys_never_show(
    start_emulator: StartEmulator, tmp_path: Path, canary: str, fmt: str
) -> None:
    """Three daemons at once, each on a path that reports an error: the service refuses
    the key (401), nothing listens at the base URL, and a gateway quotes the key back in
    its 400 error, which the daemon keeps as the part's error and publishes."""
    logs = capture_logs(fmt)
    other_key = await start_emulator(time_scale=3000)  # knows another key: answers 401
    async with quoting_gateway() as gateway:
        cases = {
            "refused": daemon_settings(tmp_path / "refused", other_key),
            "unreachable": daemon_settings(
                tmp_path / "unreachable", other_key, base_url=closed_port_url()
            ),
            "quoted": daemon_settings(tmp_path / "quoted", other_key, base_url=gateway),
        }
        answers = {name: Answers(s.socket_path) for name, s in cases.items()}
        async with (
            running_daemon(cases["refused"], key=canary) as refused,
            running_daemon(cases["unreachable"], key=canary) as unreachable,
            running_daemon(cases["quoted"], key=canary),
        ):
            for s in cases.values():
                drop(s.paths.folder("inbox"), "work.jsonl", requests(2))

            async def refused_paused() -> bool:
                return refused.account.paused_reason is not None

            async def unreachable_reported() -> bool:
                # The provider is found not answering (and no call is made while so).
                return "provider_unreachable" in logs.getvalue()

            async def quoted_published() -> bool:
                return any(cases["quoted"].paths.folder("outbox").iterdir())

            await wait_for(refused_paused, 30, "401 pauses the account", step_s=0.02)
            await wait_for(unreachable_reported, 30, "connection errors logged", step_s=0.02)
            await wait_for(quoted_published, 30, "the failed job published", step_s=0.02)
            assert unreachable.api.last_error, "no connection error recorded"
            for a in answers.values():
                await a.everything()
    text = logs.getvalue()
    # The error paths ran and were logged, with what went wrong.
    assert "account_paused" in text and "InvalidApiKey" in text
    assert "ClientConnectorError" in text or "Connect call failed" in text
    assert "rejected credentials Bearer ***" in text
    found = leaks(canary, "log", text)
    for name, s in cases.items():
        found += leaks_under(canary, s.paths.root)
        found += leaks(canary, f"{name} control answers", b"\n".join(answers[name].raw))
    assert not found, found
    summary = (cases["quoted"].paths.folder("outbox") / "work" / "summary.json").read_text()
    assert "rejected credentials Bearer ***" in summary


@pytest.mark.parametrize("fmt", FORMATS)
async def test_exception_texts_and_logged_tracebacks_never_show_the_key(
    canary: str, fmt: str
) -> None:
    """A traceback through the HTTP client holds the request headers in its frames: it
    is logged (as a crashing stage logs it) without them, in both renderers."""
    logs = capture_logs(fmt)
    log = get_logger("test")
    limiter = RateLimiter({c: (1000, 1.0) for c in CallClass})
    texts: list[str] = []
    async with quoting_gateway() as gateway:
        for url in (closed_port_url(), gateway):
            api = BatchApi(url, canary, limiter, retry=RetryPolicy(1, 0.01, 0.01))
            try:
                for call in (api.list_batches(), api.retrieve_batch("b1")):
                    with pytest.raises(ApiError) as caught:
                        await call
                    err = caught.value
                    texts += [str(err), repr(err), str(err.__cause__), repr(err.__cause__)]
                    log.error("stage_crashed", error=repr(err), exc_info=err)
                    try:
                        raise RuntimeError("stage died") from err
                    except RuntimeError:
                        log.exception("stage_crashed")
            finally:
                await api.close()
    text = logs.getvalue()
    assert text.count("Traceback") >= 8, text[:2000]
    assert "rejected credentials Bearer ***" in text
    found = leaks(canary, "log", text) + leaks(canary, "exception texts", "\n".join(texts))
    assert not found, found


async def _run_until(
    env: dict[str, str], log: Path, root: Path, *, done: Any, timeout_s: float = 30.0
) -> int:
    """Run `batchd run` until `done()` holds (then SIGTERM) or it exits by itself."""
    process = await DaemonProcess.start(env, log)
    deadline = time.monotonic() + timeout_s
    try:
        while process.returncode is None and not await done():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                await asyncio.wait_for(process.wait(), 0.05)
            except TimeoutError:
                pass
    finally:
        if process.returncode is None:
            await wait_ready(root, process)
            process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 30)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_batchd_run_stderr_never_shows_the_key(
    start_emulator: StartEmulator, tmp_path: Path, canary: str, fmt: str
) -> None:
    """`batchd run` subprocesses given the canary in BATCHD_API_KEY, at debug level: a
    stage crash with its traceback, a clean run to the end, a refused key, an
    unreachable service and a gateway quoting the key. All their stderr is searched."""
    emulator = await start_emulator(time_scale=3000, api_key=canary)
    refusing = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    log = tmp_path / "stderr.log"
    inbox = root / "inbox"
    outbox = root / "outbox"
    env = daemon_env(
        emulator, root, BATCHD_API_KEY=canary, BATCHD_LOG__FORMAT=fmt, BATCHD_LOG__LEVEL="debug"
    )

    async def moving() -> bool:
        emulator.advance(60)
        return False

    drop(inbox, "a.jsonl", requests(3))
    # 1. The poll stage crashes: the daemon logs the traceback and exits 1.
    crash = {**env, "BATCHD_FAILPOINTS": "poll.after_request=raise"}
    assert await _run_until(crash, log, root, done=moving) == 1
    assert "stage_crashed" in log.read_text() and "Traceback" in log.read_text()

    # 2. A clean run finishes the job.
    async def published() -> bool:
        emulator.advance(60)
        return any(p for p in outbox.iterdir() if not p.name.startswith("."))

    assert await _run_until(env, log, root, done=published) == 0

    # 3-5. The key refused, nobody listening, a gateway quoting the key.
    def logged(marker: str, since: int) -> Any:
        async def check() -> bool:
            return marker in log.read_text()[since:]

        return check

    async with quoting_gateway() as gateway:
        for n, (url, marker) in enumerate(
            [
                (refusing.base_url, "account_paused"),
                (closed_port_url(), "provider_unreachable"),
                (gateway, "part_failed"),
            ]
        ):
            drop(inbox, f"b{n}.jsonl", requests(2, prefix=f"b{n}-"))
            since = len(log.read_text())
            code = await _run_until(
                {**env, "BATCHD_BASE_URL": url}, log, root, done=logged(marker, since)
            )
            assert code == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "rejected credentials Bearer ***" in text
    found = leaks(canary, "stderr", text) + leaks_under(canary, root)
    assert not found, found
