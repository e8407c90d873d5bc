"""A harness for tests and dry runs: the shipped emulator and the daemon, started in-process
or as subprocesses, with the few helpers every such test needs.

batchd's own tests use it, and so can yours: run your scripts against an emulator and a
real daemon on loopback before spending money::

    from batchd.testing import daemon_settings, drop, requests, running_daemon
    from batchd.testing import running_emulator, summary, wait_published

    async with running_emulator(tmp / "emulator", time_scale=600) as emulator:
        settings = daemon_settings(tmp / "root", emulator)
        async with running_daemon(settings) as daemon:
            drop(daemon.inbox, "questions.jsonl", requests(3))
            (folder,) = await wait_published(daemon.outbox, 1, emulator)
            print(summary(folder)["status"])

What it offers, one of each:

- `API_KEY`, the key test emulators accept and test daemons send; `ENDPOINT_*`.
- `requests(count, ...)`: well-formed JSONL request lines.
- `wait_for(check, ...)`: poll until something holds, or fail saying what did not.
- `idle(daemon)`: wait until an in-process daemon has run out of work, the place to
  assert that something did not happen (never a sleep: it proves nothing when slow).
- The emulator: `running_emulator` (in-process) and `emulator_process` (`batchd emulator`
  in a subprocess), both context managers; `Api`, a thin HTTP client for its routes.
- The daemon: `running_daemon` (in-process) and `daemon_process` (`batchd run` in a
  subprocess), both context managers; `daemon_settings` and `daemon_env` tune either for
  tests (fast intake and polling, the emulator as provider).
- Around them: `drop` files into an inbox the careful way, `wait_published`, `summary`
  and `read_jsonl` for the outbox, `events` for JSON log lines, `FakeSystemd` for
  sd_notify, `folder_elsewhere` for a folder on another filesystem.
- Faults of the machine, made real: `small_disk` (a small tmpfs mounted for the block,
  root only), `fill_disk` (a ballast file up to ENOSPC), `database_locked` (another
  process holding `BEGIN EXCLUSIVE` on a database), `step_clock` (the test-only wall
  clock offset of batchd.clock).

It needs nothing beyond batchd's own dependencies (no pytest).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import io
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiohttp
import orjson

from batchd.clock import STEP_FILE_VARIABLE, Clock
from batchd.config import IntakeSettings, Settings
from batchd.daemon import Daemon
from batchd.documents import JsonObject, decode_summary
from batchd.emulator import Emulator, EmulatorSettings
from batchd.models import Job
from batchd.outbox.folder import SUMMARY, OutboxFolder
from batchd.pipeline.intake import Intake
from batchd.pipeline.stages import Stage
from batchd.store import Store

__all__ = [
    "API_KEY",
    "ENDPOINT_CHAT",
    "ENDPOINT_EMBEDDINGS",
    "ENDPOINT_TEST",
    "Api",
    "DaemonProcess",
    "EmulatorProcess",
    "FakeSystemd",
    "StartEmulator",
    "bare_intake",
    "daemon_env",
    "daemon_process",
    "daemon_settings",
    "database_locked",
    "drop",
    "drop_all",
    "emulator_process",
    "emulator_settings",
    "events",
    "fill_disk",
    "fill_inodes",
    "idle",
    "job_folders",
    "published_jobs",
    "read_jsonl",
    "requests",
    "running_daemon",
    "running_emulator",
    "settings_env",
    "small_disk",
    "step_clock",
    "step_clock_env",
    "summary",
    "wait_for",
    "wait_published",
    "wait_ready",
]

API_KEY = "sk-emulator-test-key"
"""The key every test emulator accepts and every test daemon sends."""

ENDPOINT_CHAT = "/v1/chat/completions"
ENDPOINT_EMBEDDINGS = "/v1/embeddings"
ENDPOINT_TEST = "/v1/chat/ds-test"

StartEmulator = Callable[..., Awaitable[Emulator]]
"""What the `start_emulator` fixture gives: `emu = await start_emulator(**overrides)`."""


class Running(Protocol):
    """A daemon in another process: a `DaemonProcess`, or an `asyncio` process."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...


class Served(Protocol):
    """An emulator, in this process or another: where it answers."""

    @property
    def root_url(self) -> str: ...

    @property
    def base_url(self) -> str: ...


# -- faults of the machine ----------------------------------------------------------------


@contextlib.contextmanager
def small_disk(
    folder: Path, size: str = "4m", *, read_only: bool = False, inodes: int | None = None
) -> Iterator[bool]:
    """A tmpfs of `size` (and at most `inodes` files and folders) mounted at `folder`
    (made if missing) for the block, so that a test can fill it up (`fill_disk`,
    `fill_inodes`) or have it read-only; unmounted afterwards. Yields False, mounting
    nothing, where this process may not mount (not root, no CAP_SYS_ADMIN, no `mount`):
    the caller skips, saying so."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if inodes is not None:
        options += f",nr_inodes={inodes}"
    mount = shutil.which("mount")
    umount = shutil.which("umount")
    if mount is None or umount is None:
        yield False
        return
    done = subprocess.run(  # noqa: S603
        [mount, "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        # Lazily: a file the daemon still holds open must not keep the mount.
        subprocess.run([umount, "-l", str(folder)], capture_output=True, check=False)  # noqa: S603


def fill_disk(folder: Path, name: str = ".ballast") -> Path:
    """Write a file into `folder` until its filesystem is full (ENOSPC); returns it:
    unlink it to free the space again."""
    ballast = folder / name
    block = b"\0" * (1 << 16)
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return ballast


def fill_inodes(folder: Path, name: str = ".ballast-files") -> Path:
    """Make empty files in a new folder under `folder` until its filesystem has no inode
    left (ENOSPC); returns that folder: remove it (`shutil.rmtree`) to free them."""
    ballast = folder / name
    ballast.mkdir()
    for n in itertools.count():
        try:
            os.close(os.open(ballast / str(n), os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return ballast
    raise AssertionError("unreachable")


_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


@asynccontextmanager
async def database_locked(db_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process holds `BEGIN EXCLUSIVE` on the SQLite database at `db_path` (as a
    backup or a VACUUM would) from when the block is entered until it ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLD_LOCK,
        str(db_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"locked":
            raise AssertionError(f"could not lock {db_path}: {line!r}")
        yield proc
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def step_clock(step_file: Path, seconds: float) -> None:
    """Step the wall clock of daemons reading `step_file` (`BATCHD_TEST_CLOCK_STEP_FILE`,
    or a `SystemClock(step_file)`) to `seconds` off the machine's: as NTP stepping it
    would, without touching the machine's clock. Test-only."""
    tmp = step_file.with_name(f".{step_file.name}.tmp")
    tmp.write_text(repr(float(seconds)))
    os.replace(tmp, step_file)


def step_clock_env(step_file: Path) -> dict[str, str]:
    """The variable that makes a `batchd run` subprocess read `step_file` (starts at 0)."""
    if not step_file.exists():
        step_clock(step_file, 0.0)
    return {STEP_FILE_VARIABLE: str(step_file)}


# -- requests -----------------------------------------------------------------------------


# Where a folder on another filesystem may be found, most likely first; then the
# machine's other mounts (`/proc/self/mounts`). Only a fresh `mkdtemp` folder is made in
# any of them.
_SHM = "/dev/shm"  # noqa: S108
_ELSEWHERE = (_SHM, f"/run/user/{os.getuid()}", "/run/shm", "/var/tmp", "/tmp", "/run")  # noqa: S108
_NOT_FOLDERS = ("/proc", "/sys", "/dev")


def _mount_points() -> list[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            points = [line.split()[1].replace("\\040", " ") for line in fh if line.strip()]
    except OSError:
        return []
    return [p for p in points if not p.startswith(_NOT_FOLDERS) or p == _SHM]


@contextlib.contextmanager
def folder_elsewhere(than: Path) -> Iterator[Path | None]:
    """A fresh folder on another filesystem than `than` (renames between the two fail
    with EXDEV), removed afterwards; None when this machine has none the user can
    write."""
    seen: set[int] = {os.stat(than).st_dev}
    for candidate in (*_ELSEWHERE, *_mount_points()):
        try:
            device = os.stat(candidate).st_dev
        except OSError:
            continue
        if device in seen:
            continue
        seen.add(device)
        try:
            folder = Path(tempfile.mkdtemp(prefix="batchd-test-", dir=candidate))
        except OSError:
            continue
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    yield None


def requests(
    count: int,
    model: str = "qwen-plus",
    url: str = ENDPOINT_CHAT,
    *,
    prefix: str = "r",
    start: int = 0,
    **body: Any,
) -> bytes:
    """`count` well-formed request lines for `model` at `url`, each ending in a newline.

    custom_ids are `prefix` + n for n from `start` (r0, r1, ...); each asks "question n"
    (embeddings: input "text n"). `body` fields are added to, or replace, each body's."""
    lines = []
    for n in range(start, start + count):
        if url == ENDPOINT_EMBEDDINGS:
            payload: JsonObject = {"model": model, "input": f"text {n}"}
        else:
            messages = [{"role": "user", "content": f"question {n}"}]
            payload = {"model": model, "messages": messages}
        payload.update(body)
        line = {"custom_id": f"{prefix}{n}", "method": "POST", "url": url, "body": payload}
        lines.append(orjson.dumps(line) + b"\n")
    return b"".join(lines)


# -- waiting ------------------------------------------------------------------------------


async def wait_for(
    check: Callable[[], Any],
    timeout_s: float = 20.0,
    what: str | Callable[[], str] = "the condition",
    *,
    step_s: float = 0.05,
    emulator: Emulator | None = None,
    advance_s: float = 30.0,
) -> Any:
    """Poll `check()` (plain or async) every `step_s` until it returns something truthy,
    and return that. Moves `emulator`'s clock on by `advance_s` between polls when one is
    given. After `timeout_s`, fails with an AssertionError naming `what` (a callable is
    asked then, so the message can say how far things got)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"{said}: not met within {timeout_s:g} s")
        if emulator is not None:
            emulator.advance(advance_s)
        await asyncio.sleep(step_s)


async def idle(daemon: Daemon, timeout_s: float = 20.0, horizon_s: float = 0.25) -> None:
    """Return once the in-process daemon has run out of work: every stage, woken for a
    fresh look, ran a pass that did nothing; none is mid-pass or woken again; no pass
    did anything since; nothing any stage or the intake knows of is due within
    `horizon_s` (a retry, a poll, a file still settling). A stage waiting out a fault of
    this machine for longer than `horizon_s` counts as out of work. The place to assert
    that something did not happen: it happened by then if the daemon would do it.
    Fails (AssertionError) after `timeout_s`, saying which stages were still at work."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    activity = daemon.activity
    stages: list[Stage] = [stage for stage in daemon.tasks if stage is not Stage.WATCH]
    blocking: list[str] = []

    def soon(at: float) -> bool:
        return at - loop.time() <= horizon_s

    def looked_again(looked: dict[Stage, int]) -> bool:
        # A stage waiting out a fault does not answer a wake: its pause is its look.
        blocking[:] = [
            str(stage)
            for stage in stages
            if activity[stage].finished <= looked[stage]
            and not (
                activity[stage].faulted
                and not activity[stage].busy
                and not soon(activity[stage].due_at)
            )
        ]
        return not blocking

    while True:
        progress = activity.progress
        looked = {stage: activity[stage].started for stage in stages}
        daemon.wake.all()
        while not looked_again(looked):
            if daemon.stopping.is_set():
                raise AssertionError("the daemon stopped: it will never be idle")
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(
                    f"the daemon not idle within {timeout_s:g} s: {', '.join(blocking)}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(activity.changed(), min(left, horizon_s))
        blocking[:] = [
            str(stage)
            for stage in stages
            if activity[stage].busy
            or activity[stage].did
            or daemon.wake[stage].is_set()
            or soon(activity[stage].due_at)
        ]
        due = daemon.intake.next_due
        if due is not None and due - daemon.clock.monotonic() <= horizon_s:
            blocking.append(f"intake (waiting: {sorted(daemon.intake.waiting)})")
        if activity.progress == progress and not blocking:
            return
        if activity.progress == progress:
            # Something is due soon, or woken: wait for the next pass, then look again.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(activity.changed(), horizon_s)
        else:
            blocking.append("work was done meanwhile")
        if loop.time() >= deadline:
            raise AssertionError(
                f"the daemon not idle within {timeout_s:g} s: {', '.join(blocking)}"
            )


# -- the emulator -------------------------------------------------------------------------


def emulator_settings(data_dir: Path | None = None, **overrides: Any) -> EmulatorSettings:
    """Settings for a test emulator: loopback, a free port, `API_KEY`, its own data folder
    (a temporary one without `data_dir`); `overrides` as for `EmulatorSettings`."""
    values: JsonObject = {
        "host": "127.0.0.1",
        "port": 0,
        "api_key": API_KEY,
        "data_dir": data_dir,
    }
    values.update(overrides)
    return EmulatorSettings(**values)


@asynccontextmanager
async def running_emulator(
    data_dir: Path | None = None, **overrides: Any
) -> AsyncIterator[Emulator]:
    """An emulator serving in this process, started on 127.0.0.1 with a free port.

    `emu.base_url` is its base URL; move its clock with `emu.advance(seconds)`, switch
    faults with `emu.set_faults(...)`, read `await emu.stats()`."""
    async with Emulator(emulator_settings(data_dir, **overrides)) as emulator:
        yield emulator


def settings_env(
    prefix: str, values: Mapping[str, Any], json_keys: Iterable[str] = ()
) -> dict[str, str]:
    """Settings as environment variables: `{"api": {"timeout_s": 5}}` under `BATCHD` is
    `BATCHD_API__TIMEOUT_S=5`; the tables named in `json_keys` go as one JSON value."""
    as_json = set(json_keys)
    out: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                put(f"{name}__{key.upper()}", inner)
        else:
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)

    for key, value in values.items():
        name = f"{prefix}_{key.upper()}"
        if key in as_json:
            out[name] = json.dumps(value)
        else:
            put(name, value)
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    # Racy by nature (the port is free now, not necessarily when the child binds it);
    # good enough on loopback in a test run.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _terminate(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; the exit code (negative: the signal)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


class EmulatorProcess:
    """`batchd emulator` in its own process (so that it shares no core with the client
    being measured); figures come from GET /_emulator/stats."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root_url}/compatible-mode/v1"

    @classmethod
    async def start(
        cls, folder: Path, env: Mapping[str, str] | None = None, **settings: Any
    ) -> EmulatorProcess:
        """Start one with its data in `folder`/emulator and its log in
        `folder`/emulator.log; `settings` as for `EmulatorSettings` (tables go as JSON,
        `log` as BATCHD_EMULATOR_LOG__*), `env` added to its environment (an object
        store's credentials). Returns once it answers."""
        port = _free_port()
        extra = dict(env or {})
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")} | extra
        values: JsonObject = {
            "data_dir": str(folder / "emulator"),
            "log": {"level": "warning"},
        }
        values.update(settings)
        tables = [k for k, v in values.items() if isinstance(v, Mapping) and k != "log"]
        env.update(settings_env("BATCHD_EMULATOR", values, tables))
        log_path = folder / "emulator.log"
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchd",
                "emulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-key",
                API_KEY,
                env=env,
                stdout=log,
                stderr=log,
            )
        emulator = cls(proc, port, log_path)
        try:
            await wait_for(emulator._up, 30, "the emulator answering", step_s=0.1)
        except BaseException:
            await emulator.stop()
            raise
        return emulator

    async def _up(self) -> bool:
        if self.proc.returncode is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise AssertionError(f"the emulator exited {self.proc.returncode}:\n{tail}")
        try:
            await self.stats()
        except (OSError, aiohttp.ClientError):
            return False
        return True

    async def _get(self, path: str) -> JsonObject:
        async with aiohttp.ClientSession() as session, session.get(self.root_url + path) as resp:
            data: JsonObject = await resp.json()
            return data

    async def stats(self) -> JsonObject:
        return await self._get("/_emulator/stats")

    async def clock(self) -> JsonObject:
        return await self._get("/_emulator/clock")

    def cpu_s(self) -> float:
        """User + system CPU seconds so far."""
        return _cpu_s(self.proc.pid)

    async def stop(self, timeout_s: float = 30.0) -> int:
        return await _terminate(self.proc, timeout_s)


@asynccontextmanager
async def emulator_process(folder: Path, **settings: Any) -> AsyncIterator[EmulatorProcess]:
    """`EmulatorProcess.start(folder, **settings)`, stopped when the block ends."""
    emulator = await EmulatorProcess.start(folder, **settings)
    try:
        yield emulator
    finally:
        await emulator.stop()


def _expect_ok(status: int, body: Any) -> None:
    if status != 200:
        raise AssertionError(f"the emulator answered {status}: {body!r}")


class Api:
    """A thin HTTP client for an emulator's routes, returning (status, json, headers)."""

    def __init__(self, session: aiohttp.ClientSession, emulator: Served) -> None:
        self.session = session
        self.emulator = emulator

    def _url(self, path: str) -> str:
        if path.startswith(("/_emulator", "/v1", "/comp")):
            return self.emulator.root_url + path
        return self.emulator.base_url + path

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: JsonObject | None = None,
        key: str | None = API_KEY,
        data: Any = None,
        raw: bool = False,
    ) -> tuple[int, Any, dict[str, str]]:
        """One call; `raw` keeps a 200's body as bytes, `key=None` sends no key."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        body = orjson.dumps(json) if json is not None else data
        if json is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self._url(path), data=body, params=params, headers=headers
        ) as response:
            content = await response.read()
            if raw and response.status == 200:
                return response.status, content, dict(response.headers)
            return (
                response.status,
                orjson.loads(content) if content else None,
                dict(response.headers),
            )

    async def upload(
        self, content: bytes, filename: str = "input.jsonl", purpose: str = "batch"
    ) -> tuple[int, Any, dict[str, str]]:
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field(
            "file", io.BytesIO(content), filename=filename, content_type="application/jsonl"
        )
        return await self.call("POST", "/files", data=form)

    async def upload_ok(self, content: bytes, filename: str = "input.jsonl") -> str:
        status, body, _ = await self.upload(content, filename)
        _expect_ok(status, body)
        file_id: str = body["id"]
        return file_id

    async def create(self, file_id: str, endpoint: str, **extra: Any) -> tuple[int, Any]:
        payload = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        payload.update(extra)
        status, body, _ = await self.call("POST", "/batches", json=payload)
        return status, body

    async def create_ok(self, file_id: str, endpoint: str, **extra: Any) -> JsonObject:
        status, body = await self.create(file_id, endpoint, **extra)
        _expect_ok(status, body)
        batch: JsonObject = body
        return batch

    async def batch(self, batch_id: str) -> JsonObject:
        status, body, _ = await self.call("GET", f"/batches/{batch_id}")
        _expect_ok(status, body)
        batch: JsonObject = body
        return batch

    async def content(self, file_id: str) -> bytes:
        status, body, _ = await self.call("GET", f"/files/{file_id}/content", raw=True)
        _expect_ok(status, body)
        content: bytes = body
        return content

    async def lines(self, file_id: str) -> list[JsonObject]:
        return [orjson.loads(line) for line in (await self.content(file_id)).splitlines()]

    async def stats(self) -> JsonObject:
        status, body, _ = await self.call("GET", "/_emulator/stats", key=None)
        _expect_ok(status, body)
        stats: JsonObject = body
        return stats


# -- the daemon ---------------------------------------------------------------------------

# Fast intake, polling and retries, so that a test takes a second, not a minute.
_FAST: dict[str, JsonObject] = {
    "intake": {"settle_s": 0.05, "rescan_interval_s": 0.1, "watch": False},
    "poll": {"first_poll_s": 0.05, "interval_s": 0.1, "jitter": 0.0},
    "api": {
        "backoff_base_s": 0.02,
        "backoff_cap_s": 0.2,
        "timeout_s": 10.0,
        "settle_after_s": 0.05,
        "step_retry_base_s": 0.05,
        "step_retry_cap_s": 0.5,
    },
    "log": {"level": "warning"},
}


def daemon_settings(root: Path, emulator: Served, **overrides: Any) -> Settings:
    """Settings tuned for tests: fast intake and polling, `emulator` as the provider, all
    folders under `root`. A table in `overrides` is merged into the one it names."""
    values: JsonObject = {
        "provider": "custom",
        "base_url": emulator.base_url,
        "paths": {"root": root},
        **{table: dict(fields) for table, fields in _FAST.items()},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return Settings.load(None, **values)


@asynccontextmanager
async def running_daemon(
    settings: Settings, key: str = API_KEY, clock: Clock | None = None
) -> AsyncIterator[Daemon]:
    """The daemon running in this process, entered once it is ready (store open, recovery
    done, control socket listening); stopped when the block ends, which must exit 0.
    `clock` replaces the system clock (a `SystemClock` with a step file, say)."""
    daemon = Daemon(settings, key) if clock is None else Daemon(settings, key, clock=clock)
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(on_ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise AssertionError("the daemon stopped before it was ready")
    try:
        yield daemon
    finally:
        daemon.request_stop()
        code = await asyncio.wait_for(task, 30)
        if code != 0:
            raise AssertionError(f"the daemon exited {code}")


def daemon_env(
    emulator: Served,
    root: Path,
    settings: Mapping[str, Any] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment for a `batchd run` subprocess with the settings of
    `daemon_settings` (JSON log lines), then `settings` (nested tables, `limits` as one
    JSON value) and `extra` variables on top. No BATCHD_* or DASHSCOPE_* variable of this
    process leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "DASHSCOPE_"))}
    env["BATCHD_API_KEY"] = API_KEY
    env["BATCHD_PROVIDER"] = "custom"
    env["BATCHD_BASE_URL"] = emulator.base_url
    env["BATCHD_PATHS__ROOT"] = str(root)
    fast = {table: dict(fields) for table, fields in _FAST.items()}
    del fast["api"]["timeout_s"]
    fast["log"]["format"] = "json"
    env.update(settings_env("BATCHD", fast))
    env.update(settings_env("BATCHD", settings or {}, ("limits",)))
    env.update(extra)
    return env


class DaemonProcess:
    """`batchd run` in a subprocess, its stdout and stderr appended to a log file, with its
    CPU and memory read from /proc. It answers like the `asyncio` process it wraps
    (`pid`, `returncode`, `send_signal`, `kill`, `wait`)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    async def start(
        cls, env: Mapping[str, str], log_path: Path, *args: str, output: int | None = None
    ) -> DaemonProcess:
        """Start `batchd run *args` with `env` (see `daemon_env`); returns at once, before
        it is ready (see `wait_ready`). With `output` (a file descriptor, such as a pipe's
        write end), its stdout and stderr go there instead of `log_path`."""
        with log_path.open("ab") as log:
            out = log.fileno() if output is None else output
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchd", "run", *args, env=dict(env), stdout=out, stderr=out
            )
        return cls(proc, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.kill()

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code."""
        return await _terminate(self.proc, timeout_s)

    def cpu_s(self) -> float:
        """User + system CPU seconds so far."""
        return _cpu_s(self.pid)

    def rss_mb(self, key: str = "VmHWM") -> float:
        """Peak (VmHWM) or current (VmRSS) resident memory, MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def log_tail(self, chars: int = 3000) -> str:
        """The end of its log, for a failure message."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@asynccontextmanager
async def daemon_process(
    env: Mapping[str, str],
    log_path: Path,
    *args: str,
    stop_timeout_s: float = 30.0,
    exit_code: int | None = 0,
    output: int | None = None,
) -> AsyncIterator[DaemonProcess]:
    """`DaemonProcess.start(env, log_path, *args, output=output)`, sent SIGTERM when the
    block ends; then it must exit `exit_code` (None: any) within `stop_timeout_s`, or the
    block fails."""
    daemon = await DaemonProcess.start(env, log_path, *args, output=output)
    failed = False
    try:
        yield daemon
    except BaseException:
        failed = True
        raise
    finally:
        code = await daemon.stop(stop_timeout_s)
        if not failed and exit_code is not None and code != exit_code:
            raise AssertionError(f"batchd run exited {code}, not {exit_code}:\n{daemon.log_tail()}")


class Captured(Protocol):
    """What `cli` reads a command's output from: pytest's `capsys`."""

    def readouterr(self) -> tuple[str, str]: ...


async def cli(capture: Captured, *argv: str) -> tuple[int, str, str]:
    """Run `batchd ARGV...` as a user would, in a thread (a daemon may be running in this
    event loop), and return its exit code and what it printed to stdout and stderr."""
    from batchd.cli import main

    code = await asyncio.to_thread(main, list(argv))
    out, err = capture.readouterr()
    return code, out, err


async def wait_ready(
    root: Path, process: Running | None = None, timeout_s: float = 30.0
) -> JsonObject:
    """Wait until the daemon under `root` answers on its control socket (it is ready:
    store open, recovery done); with `process`, the answer must come from that one.
    Returns its status. A stale socket left by a killed daemon does not count."""
    client = RawControl(root / "control.sock", timeout_s=2.0)

    async def answer() -> JsonObject | None:
        if process is not None and process.returncode is not None:
            raise AssertionError(f"the daemon exited {process.returncode} before it was ready")
        try:
            status_code, body = await client.call("GET", "/v1/status")
        except OSError:
            return None
        if status_code == 200 and (process is None or body["pid"] == process.pid):
            status: JsonObject = body
            return status
        return None

    status: JsonObject = await wait_for(answer, timeout_s, f"the daemon under {root} ready")
    return status


def bare_intake(
    store: Store, inbox: Path, spool: Path, unterminated_settle_s: float = 0.0
) -> Intake:
    """The real `Intake` without a daemon around it: files settle at once."""
    intake = IntakeSettings(
        settle_s=0.0, unterminated_settle_s=unterminated_settle_s, suffixes=(".jsonl",)
    )
    settings = Settings(intake=intake)
    return Intake(store, inbox, spool, lambda: settings, on_claimed=lambda: None)


# -- inbox and outbox ---------------------------------------------------------------------


def drop_all(inbox: Path, files: Mapping[str, bytes]) -> list[Path]:
    """Drop files the way a careful user does: each written under a hidden temp name (its
    mtime in the past, so it is settled), then all renamed into place."""
    inbox.mkdir(parents=True, exist_ok=True)
    past = time.time() - 10
    moves = []
    for name, content in files.items():
        tmp = inbox / f".{name}.tmp"
        tmp.write_bytes(content)
        os.utime(tmp, (past, past))
        moves.append((tmp, inbox / name))
    for tmp, final in moves:
        tmp.rename(final)
    return [final for _, final in moves]


def drop(inbox: Path, name: str, content: bytes) -> Path:
    """Drop one file into `inbox`: temp name, then rename."""
    (final,) = drop_all(inbox, {name: content})
    return final


def job_folders(outbox: Path) -> list[Path]:
    """The published job folders in `outbox` (no hidden names, no symlinks), sorted."""
    if not outbox.exists():
        return []
    return sorted(p for p in outbox.iterdir() if not p.name.startswith(".") and not p.is_symlink())


async def wait_published(
    outbox: Path,
    count: int,
    emulator: Emulator | None = None,
    timeout_s: float = 30.0,
    advance_s: float = 60.0,
) -> list[Path]:
    """Wait until `count` job folders are in the outbox and the database (in the usual
    layout, ROOT/state beside ROOT/outbox) says as many jobs are published: the folder
    appears a moment before the row says so. Moves the emulator's clock on meanwhile."""
    found: list[Path] = []

    def done() -> bool:
        nonlocal found
        found = job_folders(outbox)
        return len(found) >= count and _published_rows(outbox) >= count

    await wait_for(
        done,
        timeout_s,
        lambda: f"{len(found)} of {count} jobs published",
        emulator=emulator,
        advance_s=advance_s,
    )
    return found


def _published_rows(outbox: Path) -> int:
    """Published jobs in the database beside the outbox; a large number where there is no
    such database (another layout), so that only the folders count."""
    path = outbox.parent / "state" / "batchd.sqlite3"
    if not path.exists():
        return 1 << 30
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'published'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


async def published_jobs(daemon: Daemon, count: int, timeout_s: float = 10.0) -> list[Job]:
    """The daemon's jobs once `count` of them are published in its database: an outbox
    folder appears (the rename) a moment before the job's row says so."""
    jobs: list[Job] = []

    async def done() -> bool:
        nonlocal jobs
        jobs = await daemon.store.jobs()
        return sum(j.state == "published" for j in jobs) >= count

    await wait_for(done, timeout_s, lambda: f"{count} jobs marked published: {jobs}", step_s=0.02)
    return jobs


def summary(folder: Path) -> dict[str, Any]:
    """A job folder's summary.json."""
    raw = OutboxFolder(folder).member(SUMMARY).read_bytes()
    decode_summary(raw)  # every summary a test reads is one of the schema
    data: dict[str, Any] = orjson.loads(raw)
    return data


def seconds_of(timing: str) -> float:
    """A summary.json timing (`2026-11-30T04:31:02.123Z`) as Unix seconds."""
    return datetime.fromisoformat(timing).timestamp()


def read_jsonl(path: Path) -> list[JsonObject]:
    """The objects of a JSONL file (results, errors), blank lines skipped."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# -- logs and systemd ---------------------------------------------------------------------


def events(buffer: io.StringIO, name: str) -> list[JsonObject]:
    """The JSON log records of one event (`job_published`, ...) written to `buffer` (see
    `batchd.logs.configure(..., "json", stream=buffer)`)."""
    return [
        record
        for line in buffer.getvalue().splitlines()
        if line.startswith("{") and (record := orjson.loads(line)).get("event") == name
    ]


class FakeSystemd:
    """What systemd hears on NOTIFY_SOCKET: a bound AF_UNIX datagram socket, read by a
    thread that stamps each message with the monotonic time it arrived (the thread keeps
    reading while the event loop is blocked). Close it, or use it as a context manager."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.02)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        with self._lock:
            return [text for _, text in self.messages]

    def times(self, text: str) -> list[float]:
        with self._lock:
            return [at for at, got in self.messages if got == text]

    def wait_for(self, count: int, timeout_s: float = 2.0) -> list[str]:
        """The messages once there are `count` (or `timeout_s` later), blocking: the
        notifier under test may run without an event loop."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(self.texts()) < count:
            time.sleep(0.005)
        return self.texts()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RawControl:
    """Raw calls to a control socket: the HTTP status and the parsed JSON (or text), for
    tests of the wire itself (status codes, the error envelope). Scripts want
    `batchd.client.Client`, which returns typed answers."""

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
