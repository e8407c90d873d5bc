"""A light client of the daemon's control socket, for the CLI and for scripts.

    from batchd.client import Client

    client = Client(root="/var/lib/batchd")      # or Client(socket=...), Client(config=...)
    print(client.status().healthy)
    for job in client.jobs(states=["running"]).jobs:
        print(job.id, job.name, job.completed, "/", job.requests)

Answers are the typed models of `batchd.operator.protocol`. `Client` speaks HTTP/1.1 over the
Unix socket with the standard library alone (no event loop, no aiohttp), so that a
command that asks the daemon something starts about as fast as Python does;
`AsyncClient` makes the same calls for asyncio code.

Failures are two exceptions: `Unreachable` when no daemon answers (nobody listening,
a connection closed before the answer, no answer in time: the CLI's exit code 3) and
`RequestFailed` when the daemon answered with an error (its status, code and message).

`results` reads a published job's folder: in the outbox on this machine, or, when the
outbox is a bucket (`paths.outbox = "s3://..."` or `"oss://..."`), through the object
store, with the daemon's `[storage]` settings (from `config` and BATCHD_STORAGE__*, or
`storage=` given) and the same credentials (systemd credentials, OSS_*, AWS_*). The
object store's library (aiobotocore) is imported only then.
"""

from __future__ import annotations

import http.client
import itertools
import os
import socket as socketlib
import tempfile
import time
import tomllib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

import msgspec

from batchd.errors import ConfigError
from batchd.inputs.inbox import SIDECAR_SUFFIX, is_ignored_name
from batchd.objstore.location import BucketUrl, is_bucket_url, parse_bucket_url, parse_location
from batchd.operator.protocol import (
    API_PREFIX,
    ActionResponse,
    ErrorResponse,
    Event,
    JobInfo,
    JobList,
    StatusResponse,
    decode,
)

if TYPE_CHECKING:
    from batchd.config import StorageSettings

T = TypeVar("T")

# As in batchd.config.PathSettings: the daemon's root when nothing says otherwise.
DEFAULT_ROOT = Path("/var/lib/batchd")
SOCKET_NAME = "control.sock"
# Where the packaged unit (systemd/batchd.service) puts the socket: its runtime folder.
# With nothing configured, a client looks there before DEFAULT_ROOT, so that an
# operator's `batchd status` finds the service with no flags.
PACKAGED_SOCKET = Path("/run/batchd/control.sock")
# Jobs asked for at a time when listing them all (the daemon's most).
PAGE = 1000
# A job in one of these states has ended: published (any status), or parked for an
# operator.
ENDED_STATES = frozenset({"published", "parked"})


class ClientError(Exception):
    """A call to the daemon did not get the answer asked for."""


class WaitTimeout(TimeoutError):
    """A wait gave up: `job` is the job as last seen; the message names its hold, if it
    is held (what it waits for and what ends it)."""

    def __init__(self, job: JobInfo, timeout_s: float) -> None:
        if job.held:
            said = f"still held ({job.held}) after {timeout_s:g} s: {job.held_note}"
        else:
            said = f"still {job.state} after {timeout_s:g} s"
        super().__init__(f"job {job.id} is {said}")
        self.job = job


def wait_ends(job: JobInfo) -> bool:
    """PURE: does a wait for `job` end here? Published, parked, or held by a hold that
    only an operator ends (a hold that ends by itself is waited out)."""
    return job.state in ENDED_STATES or (job.held is not None and job.hold_ends_by_itself is False)


class _Holds:
    """Calls `on_held` with a waited-for job each time a hold of it starts."""

    def __init__(self, on_held: Callable[[JobInfo], None] | None) -> None:
        self.on_held = on_held
        self.last: tuple[str | None, float | None] = (None, None)

    def look(self, job: JobInfo) -> None:
        now = (job.held, job.held_at)
        if job.held is not None and now != self.last and self.on_held is not None:
            self.on_held(job)
        self.last = now


class Unreachable(ClientError):
    """No daemon answered on the socket (the CLI exits 3)."""


class RequestFailed(ClientError):
    """The daemon answered with an error: `status` (HTTP), `code` and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def socket_path(
    *,
    socket: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Where the daemon listens, found as `batchd run` would place it: `socket` when
    given; else `[control] socket`; else `<runtime>/control.sock`, where runtime is
    `[paths] runtime` or the root (`root` when given, else `[paths] root`, else
    /var/lib/batchd). Each key is read from the environment (BATCHD_CONTROL__SOCKET,
    BATCHD_PATHS__RUNTIME, BATCHD_PATHS__ROOT) before the configuration file, as the
    daemon reads them. When none of them is set, the packaged unit's socket
    (/run/batchd/control.sock) is used if it is there and no daemon of the default root
    listens.

    Only these three keys are read: a mistake elsewhere in the configuration or the
    environment is the daemon's business, not a reason for an operator's command to fail.
    """
    if socket is not None:
        return Path(socket)
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    table = _toml(Path(config)) if config is not None else {}

    def key(section: str, name: str) -> str | None:
        found = env.get(f"BATCHD_{section.upper()}__{name.upper()}")
        if found is not None:
            return found or None
        value = (table.get(section) or {}).get(name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"configuration file {config}: {section}.{name} must be a path")
        return value or None

    explicit = key("control", "socket")
    if explicit:
        return Path(explicit)
    runtime = key("paths", "runtime")
    if runtime:
        return Path(runtime) / SOCKET_NAME
    if root is not None:
        return Path(root) / SOCKET_NAME
    configured_root = key("paths", "root")
    if configured_root:
        return Path(configured_root) / SOCKET_NAME
    if PACKAGED_SOCKET.exists() and not (DEFAULT_ROOT / SOCKET_NAME).exists():
        return PACKAGED_SOCKET
    return DEFAULT_ROOT / SOCKET_NAME


def inbox_path(
    *,
    root: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The inbox, found as `batchd run` would (see `socket_path`): `[paths] inbox`, else
    ROOT/inbox."""
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    table = _toml(Path(config)) if config is not None else {}
    own = env.get("BATCHD_PATHS__INBOX") or (table.get("paths") or {}).get("inbox")
    if own:
        return Path(str(own))
    if root is not None:
        return Path(root) / "inbox"
    found = env.get("BATCHD_PATHS__ROOT") or (table.get("paths") or {}).get("root")
    return Path(str(found or DEFAULT_ROOT)) / "inbox"


def inbox_location(
    *,
    root: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | BucketUrl:
    """The inbox as `inbox_path` finds it, or the bucket folder it is (`oss://`, `s3://`)."""
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    table = _toml(Path(config)) if config is not None else {}
    own = env.get("BATCHD_PATHS__INBOX") or (table.get("paths") or {}).get("inbox")
    if own and is_bucket_url(str(own)):
        return parse_bucket_url(str(own))
    return inbox_path(root=root, config=config, environ=environ)


def _toml(path: Path) -> dict[str, dict[str, object]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"configuration file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path}: {exc}") from None
    return {k: v for k, v in data.items() if isinstance(v, dict)}


class Queued(msgspec.Struct, frozen=True, kw_only=True):
    """A file placed in the inbox by `queue_file` (or `queue_object`, in a bucket inbox:
    then `target` and `sidecar` are the objects' URLs)."""

    source: Path
    target: Path | str  # the data file in the inbox
    sidecar: Path | str  # its NAME.meta.json (options, and the token)
    submit_id: str  # the token the job will carry (`Client.jobs(submit_id=...)`)


def _queue_plan(
    src: Path,
    name: str | None,
    options: Mapping[str, object] | None,
    suffixes: Sequence[str],
) -> tuple[str, str, bytes, str]:
    """What `queue_file` and `queue_object` place: the input's name and its sidecar's in
    the inbox, the sidecar's bytes and the token in it (see `queue_file`)."""
    import secrets

    from batchd.documents import to_json
    from batchd.inputs.verdict import read_sidecar

    lower = src.name.lower()
    suffix = next((x for x in suffixes if lower.endswith(x) and len(lower) > len(x)), None)
    if suffix is None:
        raise ValueError(f"{src}: not an input (expected {', '.join(suffixes)})")
    stem = src.name[: -len(suffix)] if name is None else name
    problem = inbox_name_problem(stem, suffix)
    if problem is not None:
        raise ValueError(problem)
    own = read_sidecar(src.with_name(src.name[: -len(suffix)] + SIDECAR_SUFFIX))
    if own is not None and own.sidecar_error:
        raise ValueError(f"its sidecar cannot be used: {own.sidecar_error}")
    # A token is the submit's own, never one copied along.
    mine = {} if own is None else to_json(msgspec.structs.replace(own, submit_id=msgspec.UNSET))
    token = secrets.token_hex(16)
    meta = {**mine, **(options or {}), "submit_id": token}
    return f"{stem}{suffix}", f"{stem}{SIDECAR_SUFFIX}", msgspec.json.encode(meta), token


def queue_file(
    source: str | os.PathLike[str],
    inbox: str | os.PathLike[str],
    *,
    name: str | None = None,
    options: Mapping[str, object] | None = None,
    suffixes: Sequence[str] = (".jsonl", ".csv"),
) -> Queued:
    """Place a file in the inbox as the daemon expects it: first its sidecar (the job's
    options and a fresh `submit_id` token), then the data, each written under a hidden
    name, fsynced and renamed, so the daemon never claims a half-written file and always
    finds the sidecar with it. The options are the source's own sidecar (`NAME.meta.json`
    beside it, read as the daemon reads one) with `options` over them. `name` renames the
    job (and its files in the inbox). An existing file of that name is never overwritten
    (`FileExistsError`); a source that is not an input, a name the inbox would ignore
    (`inbox_name_problem`) and a sidecar beside it that the daemon would refuse are a
    `ValueError`."""
    import shutil

    from batchd.fsutil import atomic_output, write_atomic

    src, folder = Path(source), Path(inbox)
    input_name, sidecar_name, meta, token = _queue_plan(src, name, options, suffixes)
    target = folder / input_name
    sidecar = folder / sidecar_name
    for path in (target, sidecar):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} is already in the inbox; give another --name")
    write_atomic(sidecar, meta)
    try:
        with src.open("rb") as fh, atomic_output(target) as out:
            shutil.copyfileobj(fh, out, 1 << 20)
    except BaseException:
        sidecar.unlink(missing_ok=True)
        raise
    return Queued(source=src, target=target, sidecar=sidecar, submit_id=token)


def queue_input(
    source: str | os.PathLike[str],
    inbox: str | os.PathLike[str] | BucketUrl,
    *,
    storage: StorageSettings | None = None,
    name: str | None = None,
    options: Mapping[str, object] | None = None,
    suffixes: Sequence[str] = (".jsonl", ".csv"),
) -> Queued:
    """`queue_file` into a local inbox, `queue_object` into a bucket inbox (`oss://`,
    `s3://`; with `storage`, else the default [storage] settings)."""
    where = parse_location(inbox if isinstance(inbox, BucketUrl) else str(inbox))
    if isinstance(where, BucketUrl):
        if storage is None:
            from batchd.config import StorageSettings

            storage = StorageSettings()
        return queue_object(source, where, storage, name=name, options=options, suffixes=suffixes)
    return queue_file(source, where, name=name, options=options, suffixes=suffixes)


def queue_object(
    source: str | os.PathLike[str],
    inbox: BucketUrl,
    storage: StorageSettings,
    *,
    name: str | None = None,
    options: Mapping[str, object] | None = None,
    suffixes: Sequence[str] = (".jsonl", ".csv"),
) -> Queued:
    """`queue_file` for an inbox on a bucket: the sidecar PUT first, then the data (one
    PUT, or a multipart upload, each atomic: the daemon never lists half an object), with
    the credentials `batchd run` would read (batchd.objstore.credentials). An object of
    either name already there is never overwritten (`FileExistsError`); the store's
    faults are an OSError (`StorageFault`)."""
    import asyncio

    from batchd.objstore import open_store

    src = Path(source)
    input_name, sidecar_name, meta, token = _queue_plan(src, name, options, suffixes)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")

    async def put() -> None:
        async with open_store(storage) as store:
            bucket = store.bucket(inbox, area="inbox")
            for key in (inbox.key(input_name), inbox.key(sidecar_name)):
                if await bucket.head(key) is not None:
                    raise FileExistsError(
                        f"{inbox.url_of(key)} is already in the inbox; give another --name"
                    )
            await bucket.put_bytes(inbox.key(sidecar_name), meta)
            try:
                await bucket.put_file(inbox.key(input_name), src)
            except BaseException:
                await bucket.delete(inbox.key(sidecar_name))
                raise

    asyncio.run(put())
    return Queued(
        source=src,
        target=inbox.url_of(inbox.key(input_name)),
        sidecar=inbox.url_of(inbox.key(sidecar_name)),
        submit_id=token,
    )


def inbox_name_problem(stem: str, suffix: str) -> str | None:
    """PURE: why `stem` + `suffix` cannot be an input's name in the inbox (the intake
    would ignore it, or it is no file name), or None."""
    if not stem or "/" in stem or "\0" in stem or stem in (".", ".."):
        return f"{stem!r} cannot name a job (no '/', not empty)"
    if is_ignored_name(f"{stem}{suffix}"):
        return (
            f"{stem!r} cannot name a job: the inbox ignores {stem}{suffix} (names starting"
            " with '.' or '~', or holding '~syncthing~', are a writer's temporary files);"
            " give another --name"
        )
    return None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("batchd", timeout=timeout_s)
        self.path = path

    def connect(self) -> None:
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _Answers:
    """What both clients share: where the socket is, and how an answer is read."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        config: str | os.PathLike[str] | None = None,
        timeout_s: float = 10.0,
        storage: StorageSettings | None = None,
    ) -> None:
        self.path = socket_path(socket=socket, root=root, config=config)
        self.timeout_s = timeout_s
        self.config = config
        self._storage = storage

    @property
    def storage(self) -> StorageSettings:
        """The object store's settings for a bucket outbox: as given, else the daemon's
        (`[storage]` of `config`, BATCHD_STORAGE__* in the environment)."""
        if self._storage is None:
            from batchd.config import Settings

            self._storage = Settings.load(
                Path(self.config) if self.config is not None else None
            ).storage
        return self._storage

    @staticmethod
    def _jobs_url(
        states: list[str] | None,
        statuses: list[str] | None,
        name: str | None,
        limit: int,
        offset: int,
        newest_first: bool,
        before: str | None,
        submit_id: str | None = None,
    ) -> str:
        params = {
            "limit": str(limit),
            "offset": str(offset),
            "order": "newest" if newest_first else "oldest",
        }
        if states:
            params["state"] = ",".join(states)
        if statuses:
            params["status"] = ",".join(statuses)
        if name:
            params["name"] = name
        if before:
            params["before"] = before
        if submit_id:
            params["submit_id"] = submit_id
        return "/jobs?" + urlencode(params)

    @staticmethod
    def _job_url(job_id: str, action: str = "") -> str:
        return f"/jobs/{quote(job_id, safe='')}{action}"

    @classmethod
    def _retry_url(cls, job_id: str, everything: bool, force: bool = False) -> str:
        query = "?all=1" if everything else "?force=1" if force else ""
        return cls._job_url(job_id, "/retry") + query

    def _not_claimed(self, timeout_s: float) -> TimeoutError:
        return TimeoutError(
            f"the daemon on {self.path} did not claim the file within {timeout_s:g} s"
            " (is its intake paused?); it stays queued in the inbox"
        )

    def _answer(self, status: int, body: bytes, kind: type[T]) -> T:
        if status >= 400 and not (status == 409 and kind is ActionResponse):
            # 409 on an action is an answer: understood, not possible now, and why.
            raise self._failure(status, body)
        try:
            return decode(body, kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RequestFailed(status, "bad_answer", f"the daemon's answer: {exc}") from None

    def _failure(self, status: int, body: bytes) -> RequestFailed:
        try:
            error = decode(body, ErrorResponse).error
        except (msgspec.DecodeError, msgspec.ValidationError):
            text = body.decode(errors="replace").strip()[:200]
            return RequestFailed(status, "http_error", f"HTTP {status}: {text}")
        return RequestFailed(status, error.code, error.message)

    def _unreachable(self, exc: BaseException) -> Unreachable:
        """Why the call got no answer: nobody listening, no answer in time, or a daemon
        that closed the connection on us."""
        path = self.path
        if isinstance(exc, TimeoutError):
            return Unreachable(f"batchd on {path} did not answer within {self.timeout_s:g} s")
        closed = (ConnectionResetError, BrokenPipeError, http.client.HTTPException)
        if isinstance(exc, closed) or type(exc).__name__ == "ServerDisconnectedError":
            return Unreachable(
                f"batchd on {path} closed the connection without an answer: the daemon "
                "refused or dropped it (this user may not use the socket, or it serves "
                "control.max_connections already, or the request took longer than "
                "control.request_timeout_s); its log says which"
            )
        if isinstance(exc, PermissionError):
            return Unreachable(
                f"batchd is not reachable on {path}: permission denied (the socket is for "
                "the daemon's user and the members of control.group)"
            )
        cause = getattr(exc, "os_error", None) or exc  # aiohttp wraps the OSError
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
        return Unreachable(f"batchd is not reachable on {path}: {reason}")


class Client(_Answers):
    """Calls to one daemon over its control socket, for scripts and the CLI. Each call
    opens a connection of its own (the daemon serves `control.max_connections` at once:
    none is held idle)."""

    # -- views --------------------------------------------------------------------------

    def status(self) -> StatusResponse:
        return self._call("GET", "/status", StatusResponse)

    def jobs(
        self,
        *,
        states: list[str] | None = None,
        statuses: list[str] | None = None,
        name: str | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
        before: str | None = None,
        submit_id: str | None = None,
    ) -> JobList:
        """A page of jobs (`limit` at most 1000), newest first unless told otherwise,
        filtered by state (`claimed`, `running`, `published`, ...), by status once
        published (`completed`, `partial`, `failed`, `cancelled`, `expired`,
        `rejected`) and by a part of the name. `more` says whether another page follows:
        ask for it with `before` = the last job's id. `submit_id`: the job a file queued
        with that token became (`queue_file`)."""
        url = self._jobs_url(states, statuses, name, limit, offset, newest_first, before, submit_id)
        return self._call("GET", url, JobList)

    def all_jobs(
        self,
        *,
        states: list[str] | None = None,
        statuses: list[str] | None = None,
        name: str | None = None,
        newest_first: bool = True,
    ) -> Iterator[JobInfo]:
        """Every job that matches, a page at a time (a job claimed meanwhile is not
        listed twice, nor does it push another out)."""
        before = None
        while True:
            page = self.jobs(
                states=states,
                statuses=statuses,
                name=name,
                limit=PAGE,
                newest_first=newest_first,
                before=before,
            )
            yield from page.jobs
            if not page.more or not page.jobs or page.jobs[-1].id == before:
                return  # the end, or a page that does not move on: never loop on it
            before = page.jobs[-1].id

    def job(self, job_id: str) -> JobInfo:
        """One job with its parts. `job_id` may be a unique prefix of the id (6 characters
        or more) or the job's exact name; `RequestFailed` with code `unknown_job` (404)
        when it names none, `ambiguous_job` (409, listing them) when several."""
        return self._call("GET", self._job_url(job_id), JobInfo)

    def metrics(self) -> str:
        """The Prometheus text exposition of `/metrics`."""
        status, body = self._request("GET", "/metrics")
        if status >= 400:
            raise self._failure(status, body)
        return body.decode()

    def events(self, *, seconds: float | None = None) -> Iterator[Event]:
        """The daemon's events as they happen, starting with a `hello`; for `seconds` at
        most when given (the stream ends then even if nothing happened), else until the
        daemon stops."""
        deadline = None if seconds is None else time.monotonic() + seconds
        conn = _UnixConnection(self.path, self.timeout_s)
        try:
            try:
                conn.request("GET", API_PREFIX + "/events")
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from None
            if resp.status >= 400:
                raise self._failure(resp.status, resp.read())
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                assert conn.sock is not None
                conn.sock.settimeout(left)
                try:
                    line = resp.readline()
                except TimeoutError:
                    return
                except (OSError, http.client.HTTPException) as exc:
                    raise self._unreachable(exc) from None
                if not line:
                    return  # the daemon stopped
                if line.strip():
                    yield decode(line, Event)
        finally:
            conn.close()

    # -- submitting and waiting ------------------------------------------------------------

    def submit(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        options: Mapping[str, object] | None = None,
        timeout_s: float = 60.0,
        storage: StorageSettings | None = None,
    ) -> JobInfo:
        """Queue a file in the daemon's inbox (see `queue_file`) and return its job once
        the daemon has claimed it. `options` are the sidecar's (`model`,
        `completion_window`, `priority`, ...). `TimeoutError` when no claim came within
        `timeout_s` (is the intake paused?); the file stays queued. A bucket inbox is
        written with `storage` (the object store's settings; credentials as `batchd run`
        reads them)."""
        status = self.status()
        queued = queue_input(
            path,
            status.inbox,
            storage=storage,
            name=name,
            options=options,
            suffixes=status.input_suffixes,
        )
        return self.claimed(queued.submit_id, timeout_s)

    def claimed(self, submit_id: str, timeout_s: float = 60.0) -> JobInfo:
        """The job that the file queued with `submit_id` became, once claimed."""
        deadline = time.monotonic() + timeout_s
        pause = 0.1
        while True:
            page = self.jobs(submit_id=submit_id, limit=1)
            if page.jobs:
                return page.jobs[0]
            if time.monotonic() + pause > deadline:
                raise self._not_claimed(timeout_s)
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_held: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """The job once it is published (any status), parked, or held by a hold only an
        operator ends (`held` and `held_note` say which and how: a duplicate, a model
        without a price, a job larger than the whole budget); a hold that ends by itself
        (`budget`) is waited out, `on_held` called with the job each time one starts.
        `WaitTimeout` (a TimeoutError naming the hold, if any) after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.2
        seen = _Holds(on_held)
        while True:
            job = self.job(job_id)
            seen.look(job)
            if wait_ends(job):
                return job
            if deadline is not None and time.monotonic() + pause > deadline:
                raise WaitTimeout(job, timeout or 0.0)
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)

    def results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every request of a published job, in input order: a dict with `custom_id` and
        either `response` (the service's answer) or `error` (why there is none), as the
        outbox's result.jsonl and error.jsonl hold them."""
        job = self.job(job_id)
        if job.state != "published" or not job.outbox:
            raise RequestFailed(409, "not_published", f"job {job.id} is {job.state}")
        if is_bucket_url(job.outbox):
            return _bucket_results(job.outbox, self.storage)
        return read_results(Path(job.outbox))

    # -- actions ------------------------------------------------------------------------

    def cancel(self, job_id: str) -> ActionResponse:
        """Cancel a job; finished requests are kept. `ok` is False when it cannot be."""
        return self._call("POST", self._job_url(job_id, "/cancel"), ActionResponse)

    def retry(
        self, job_id: str, *, everything: bool = False, force: bool = False
    ) -> ActionResponse:
        """Run again what failed or never ran (asked twice, it runs once). Requests the
        service refused for their content or form are left out (`left_out` counts them
        per code) unless `everything`; requests whose results were lost (most likely
        billed already) unless `force` or `everything`. `cost` is what the earlier
        attempt probably cost."""
        return self._call("POST", self._retry_url(job_id, everything, force), ActionResponse)

    def pause(self) -> ActionResponse:
        return self._call("POST", "/intake/pause", ActionResponse)

    def resume(self) -> ActionResponse:
        return self._call("POST", "/intake/resume", ActionResponse)

    def drain(self) -> ActionResponse:
        return self._call("POST", "/drain", ActionResponse)

    # -- the wire -----------------------------------------------------------------------

    def _call(self, method: str, url: str, kind: type[T]) -> T:
        return self._answer(*self._request(method, API_PREFIX + url), kind)

    def _request(self, method: str, url: str) -> tuple[int, bytes]:
        conn = _UnixConnection(self.path, self.timeout_s)
        try:
            conn.request(method, url, headers={"Content-Length": "0"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            conn.close()


class AsyncClient(_Answers):
    """The same calls for asyncio code (a notebook, a service of your own), over aiohttp
    (imported when this client is first used, not by `batchd.client` itself)."""

    async def status(self) -> StatusResponse:
        return await self._call("GET", "/status", StatusResponse)

    async def jobs(
        self,
        *,
        states: list[str] | None = None,
        statuses: list[str] | None = None,
        name: str | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
        before: str | None = None,
        submit_id: str | None = None,
    ) -> JobList:
        url = self._jobs_url(states, statuses, name, limit, offset, newest_first, before, submit_id)
        return await self._call("GET", url, JobList)

    async def all_jobs(
        self,
        *,
        states: list[str] | None = None,
        statuses: list[str] | None = None,
        name: str | None = None,
        newest_first: bool = True,
    ) -> AsyncIterator[JobInfo]:
        before = None
        while True:
            page = await self.jobs(
                states=states,
                statuses=statuses,
                name=name,
                limit=PAGE,
                newest_first=newest_first,
                before=before,
            )
            for job in page.jobs:
                yield job
            if not page.more or not page.jobs or page.jobs[-1].id == before:
                return
            before = page.jobs[-1].id

    async def job(self, job_id: str) -> JobInfo:
        return await self._call("GET", self._job_url(job_id), JobInfo)

    async def metrics(self) -> str:
        status, body = await self._request("GET", "/metrics")
        if status >= 400:
            raise self._failure(status, body)
        return body.decode()

    async def cancel(self, job_id: str) -> ActionResponse:
        return await self._call("POST", self._job_url(job_id, "/cancel"), ActionResponse)

    async def retry(
        self, job_id: str, *, everything: bool = False, force: bool = False
    ) -> ActionResponse:
        return await self._call("POST", self._retry_url(job_id, everything, force), ActionResponse)

    async def pause(self) -> ActionResponse:
        return await self._call("POST", "/intake/pause", ActionResponse)

    async def resume(self) -> ActionResponse:
        return await self._call("POST", "/intake/resume", ActionResponse)

    async def drain(self) -> ActionResponse:
        return await self._call("POST", "/drain", ActionResponse)

    async def submit(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        options: Mapping[str, object] | None = None,
        timeout_s: float = 60.0,
        storage: StorageSettings | None = None,
    ) -> JobInfo:
        """Queue a file and return its job once claimed (see `Client.submit`)."""
        import asyncio

        status = await self.status()
        queued = await asyncio.to_thread(
            queue_input,
            path,
            status.inbox,
            storage=storage,
            name=name,
            options=options,
            suffixes=status.input_suffixes,
        )
        return await self.claimed(queued.submit_id, timeout_s)

    async def claimed(self, submit_id: str, timeout_s: float = 60.0) -> JobInfo:
        """The job a file queued with `submit_id` became, once claimed."""
        import asyncio

        deadline = time.monotonic() + timeout_s
        pause = 0.1
        while True:
            page = await self.jobs(submit_id=submit_id, limit=1)
            if page.jobs:
                return page.jobs[0]
            if time.monotonic() + pause > deadline:
                raise self._not_claimed(timeout_s)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_held: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """The job once published, parked or held by a hold only an operator ends (see
        `Client.wait`)."""
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.2
        seen = _Holds(on_held)
        while True:
            job = await self.job(job_id)
            seen.look(job)
            if wait_ends(job):
                return job
            if deadline is not None and time.monotonic() + pause > deadline:
                raise WaitTimeout(job, timeout or 0.0)
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 2.0)

    async def results(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every request of a published job in input order (see `Client.results`)."""
        job = await self.job(job_id)
        if job.state != "published" or not job.outbox:
            raise RequestFailed(409, "not_published", f"job {job.id} is {job.state}")
        import asyncio

        with tempfile.TemporaryDirectory(prefix="batchd-results-") as copy:
            if is_bucket_url(job.outbox):
                await fetch_results(job.outbox, Path(copy), self.storage)
                rows = read_results(copy)
            else:
                rows = read_results(Path(job.outbox))
            while True:
                # Read off the event loop, a thousand rows at a time.
                batch = await asyncio.to_thread(lambda: list(itertools.islice(rows, 1000)))
                if not batch:
                    return
                for row in batch:
                    yield row

    async def events(self, *, seconds: float | None = None) -> AsyncGenerator[Event, None]:
        """The daemon's events as they happen (see `Client.events`)."""
        import asyncio

        import aiohttp

        deadline = None if seconds is None else time.monotonic() + seconds
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(self.path)), timeout=timeout
                ) as session,
                session.get(f"http://batchd{API_PREFIX}/events") as resp,
            ):
                if resp.status >= 400:
                    raise self._failure(resp.status, await resp.read())
                while True:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    try:
                        line = await asyncio.wait_for(resp.content.readline(), left)
                    except TimeoutError:
                        return
                    if not line:
                        return  # the daemon stopped
                    if line.strip():
                        yield decode(line, Event)
        except (OSError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None

    async def _call(self, method: str, url: str, kind: type[T]) -> T:
        return self._answer(*await self._request(method, API_PREFIX + url), kind)

    async def _request(self, method: str, url: str) -> tuple[int, bytes]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(self.path)), timeout=timeout
                ) as session,
                session.request(method, f"http://batchd{url}") as resp,
            ):
                return resp.status, await resp.read()
        except (OSError, aiohttp.ClientError) as exc:
            raise self._unreachable(exc) from None


# The files `results` reads from a job's folder.
RESULT_FILES = ("result.jsonl", "error.jsonl")


async def fetch_results(
    location: str, dest: Path, storage: StorageSettings, environ: Mapping[str, str] | None = None
) -> None:
    """Copy the result files of the job folder at `location` (a bucket folder's URL) into
    the local folder `dest`, through the object store (`storage`, credentials as the
    daemon reads them from `environ`). `ConfigError` when the `storage` extra is missing;
    a `StorageFault` (an OSError) when the store cannot be read."""
    from batchd.objstore import open_store
    from batchd.objstore.location import parse_bucket_url

    url = parse_bucket_url(location)
    async with open_store(storage, environ) as store:
        bucket = store.bucket(url, area="outbox")
        for name in RESULT_FILES:
            # A folder is complete once its summary.json is there: a job the daemon
            # says is published has every file in place. No cap but the disk's: these
            # are the user's own results, asked for whole.
            await bucket.get_file(url.key(name), dest / name, max_bytes=MAX_RESULT_BYTES)


# The largest result file `results` copies from a bucket (S3's largest object).
MAX_RESULT_BYTES = 5 * 1024**4


def _bucket_results(location: str, storage: StorageSettings) -> Iterator[dict[str, Any]]:
    """`read_results` of a job folder on a bucket, read from a temporary local copy."""
    import asyncio

    with tempfile.TemporaryDirectory(prefix="batchd-results-") as copy:
        asyncio.run(fetch_results(location, Path(copy), storage))
        yield from read_results(copy)


def read_results(folder: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The requests of an outbox folder in input order (see `Client.results`): each a dict
    with `custom_id` and either `response` (the answer, from result.jsonl) or `error` (why
    there is none, from error.jsonl: the service's error, or the failed response's, or
    batchd's own) and its `input_line`. Both files are in input order and every error
    line says its `input_line`, so the two are merged as they are read, one line of each
    in memory at a time."""
    base = Path(folder)
    with ExitStack() as stack:
        results = _lines(stack, base / "result.jsonl")
        errors = _lines(stack, base / "error.jsonl")
        error = next(errors, None)
        number = 0
        while True:
            number += 1
            if error is not None and error.get("input_line") == number:
                yield _failure(error)
                error = next(errors, None)
                continue
            result = next(results, None)
            if result is None:
                break
            yield {"custom_id": result.get("custom_id"), "response": result.get("response")}
        while error is not None:  # an error line whose input_line is out of step
            yield _failure(error)
            error = next(errors, None)


def _failure(line: dict[str, Any]) -> dict[str, Any]:
    error = line.get("error")
    if not error:
        response = line.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        error = (body.get("error") if isinstance(body, dict) else None) or response
    return {
        "custom_id": line.get("custom_id"),
        "error": error,
        "input_line": line.get("input_line"),
    }


def _lines(stack: ExitStack, path: Path) -> Iterator[dict[str, Any]]:
    from batchd.inputs.lines import read_line

    if not path.exists():
        return iter(())
    fh = stack.enter_context(path.open("rb"))
    return (
        value
        if (value := read_line(raw)) is not None
        else {"custom_id": None, "raw": raw.decode("utf-8", "replace")}
        for raw in fh
        if raw.strip()
    )
