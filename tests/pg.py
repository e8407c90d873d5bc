"""A throwaway PostgreSQL server for the tests, from the system's packages.

Debian packages PostgreSQL as `postgresql` (binaries under /usr/lib/postgresql/NN/bin);
`.ci/run` installs it as root. Here one server runs for the whole pytest session, from a
cluster made by `initdb` in a temporary folder: its Unix socket in that folder (trust, no
password) and 127.0.0.1 on a free port (scram-sha-256 with the password below, so that a
test can see a password travel from PGPASSWORD or a DSN). Nothing in /etc, /var/lib or
systemd is used or changed, and the cluster that Debian's package may have made is never
touched.

For speed the server runs with `fsync = off`, `synchronous_commit = off` and
`full_page_writes = off`: a crash of the machine would lose its data, which a test server
never keeps. A crash of the server (kill -9) is still recovered from the WAL as usual.

The postmaster gets PR_SET_PDEATHSIG (SIGKILL, through util-linux's `setpriv`), and its
backends exit when it does: a pytest killed with -9 leaves no server behind. Its leftovers
(the folder and the small System V segment PostgreSQL keeps as an interlock) are removed by
the next run. PostgreSQL refuses to run as root: as root the server runs as the `postgres`
user (made by Debian's package), else as `nobody`, in a folder it owns.

Registered as a pytest plugin by tests/conftest.py; nothing starts until a test asks for
`pg_database` (a fresh empty database per test). Where PostgreSQL is not installed, such
tests are skipped, saying how to get it. By hand: `python -m tests.pg` starts one, prints
its settings (as `export PG...=` lines and DSNs) and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

INSTALL_HINT = (
    "install PostgreSQL (as root: apt-get install -y --no-install-recommends postgresql)"
    " to run the PostgreSQL tests; `.ci/run` does it when run as root"
)
DRIVER_HINT = (
    "install batchd's postgres extra (pip install -e '.[postgres]') to run the PostgreSQL tests"
)
# Where Debian (and Ubuntu) put each major version's server binaries; elsewhere they are
# found on PATH, or named by BATCHD_PG_BINDIR.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
BINDIR_VARIABLE = "BATCHD_PG_BINDIR"
# Who runs the server when the tests run as root, the first that exists.
SERVER_USERS = ("postgres", "nobody")
SUPERUSER = "batchd"
PASSWORD = "batchd-test-password"  # for 127.0.0.1 only; the socket needs none
TEMP_PREFIX = "batchd-pg-"
START_TIMEOUT_S = 45.0  # below pytest's 60 s per test, so that this message is seen
STOP_TIMEOUT_S = 10.0

# Every setting on the command line: the cluster's postgresql.conf is initdb's as it is.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",  # a test server: see the module's docstring
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Dynamic shared memory in files under the data folder, not /dev/shm: a server killed
    # with -9 leaves nothing outside its folder but the interlock segment (swept).
    "dynamic_shared_memory_type": "mmap",
    "shared_buffers": "32MB",
    "max_connections": "100",
    "timezone": "UTC",
    "log_timezone": "UTC",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed on this machine."""


class PostgresStartFailed(RuntimeError):
    """The PostgreSQL server did not start; the message ends with its log."""


def pg_bindir() -> Path:
    """The folder of `initdb` and `postgres`: BATCHD_PG_BINDIR, else the newest
    /usr/lib/postgresql/NN/bin, else the one on PATH; raise where there is none."""
    named = os.environ.get(BINDIR_VARIABLE)
    candidates: list[Path] = []
    if named:
        candidates.append(Path(named))
    else:
        versions = []
        with contextlib.suppress(OSError):
            for entry in DEBIAN_ROOT.iterdir():
                if entry.name.isdigit():
                    versions.append((int(entry.name), entry / "bin"))
        candidates.extend(path for _, path in sorted(versions, reverse=True))
        found = shutil.which("postgres")
        if found:
            candidates.append(Path(found).parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres")):
            return folder
    raise PostgresUnavailable(INSTALL_HINT)


def server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (whoever runs the tests) unless that is root, which
    PostgreSQL refuses; then `postgres` or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresStartFailed(
        "PostgreSQL does not run as root, and neither of the users "
        f"{', '.join(SERVER_USERS)} exists to run it: run the tests as another user"
    )


def free_port() -> int:
    """A port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def sweep_leftovers(temp: Path) -> list[Path]:
    """Remove the folders (and interlock segments) of servers whose pytest was killed:
    each folder names the pid that made it; a folder whose maker and postmaster are both
    gone is a leftover. The folders removed."""
    removed = []
    for folder in temp.glob(f"{TEMP_PREFIX}*"):
        try:
            owner = int((folder / "owner.pid").read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue  # not one of ours, or being made right now
        if alive(owner) or (os.geteuid() != 0 and folder.stat().st_uid != os.getuid()):
            continue
        lines: list[str] = []
        with contextlib.suppress(OSError):
            pid_file = folder / "data" / "postmaster.pid"
            lines = pid_file.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip().isdigit() and alive(int(lines[0])):
            continue
        # Line 7 of postmaster.pid: the interlock segment's key and id. Its processes are
        # gone, so removing it frees it at once.
        if len(lines) >= 7 and len(fields := lines[6].split()) == 2 and fields[1].isdigit():
            subprocess.run(
                ["ipcrm", "-m", fields[1]],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@dataclass(frozen=True)
class PgDatabase:
    """Where a running PostgreSQL answers, with one database for the test.

    `dsn` reaches it through the Unix socket (trust: no password), `tcp_dsn` through
    127.0.0.1 with the password; `env()` is the libpq environment for the latter."""

    socket_dir: str
    port: int
    user: str
    password: str
    dbname: str

    @property
    def dsn(self) -> str:
        return (
            f"postgresql://{self.user}@/{self.dbname}"
            f"?host={quote(self.socket_dir, safe='/')}&port={self.port}"
        )

    @property
    def tcp_dsn(self) -> str:
        return (
            f"postgresql://{self.user}:{quote(self.password, safe='')}@127.0.0.1:{self.port}"
            f"/{self.dbname}"
        )

    def env(self) -> dict[str, str]:
        """The standard libpq variables that name this database over 127.0.0.1."""
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": self.dbname,
        }


class PgServer:
    """One PostgreSQL cluster in a temporary folder, started by `start()` and stopped
    (and its folder removed) by `stop()`."""

    def __init__(self, *, temp: Path | None = None) -> None:
        self.bindir = pg_bindir()
        self.user = server_user()
        self.temp = Path(temp or tempfile.gettempdir())
        self.root: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.initdb_s = 0.0
        self.start_s = 0.0
        self.admin: Any = None  # a psycopg connection, made by the first `create_database`

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    @property
    def version(self) -> str:
        return (self.data / "PG_VERSION").read_text(encoding="ascii").strip()

    def database(self, dbname: str) -> PgDatabase:
        return PgDatabase(str(self.socket_dir), self.port, SUPERUSER, PASSWORD, dbname)

    def _command(self, *argv: str | Path) -> list[str]:
        """`argv` run as the server's user, dying with this process (PR_SET_PDEATHSIG,
        set by setpriv after it has changed user: a change of user clears it)."""
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            if self.user is not None:
                raise PostgresStartFailed(
                    "running the tests as root needs util-linux's setpriv to start"
                    " PostgreSQL as another user: install util-linux, or run as another user"
                )
            return [sys.executable, "-c", LAUNCHER, *map(str, argv)]
        prefix = [setpriv, "--pdeathsig", "KILL"]
        if self.user is not None:
            prefix += [
                f"--reuid={self.user.pw_uid}",
                f"--regid={self.user.pw_gid}",
                "--clear-groups",
                "--reset-env",
            ]
        return [*prefix, "--", *map(str, argv)]

    def _make_folder(self) -> None:
        sweep_leftovers(self.temp)
        self.root = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.temp))
        (self.root / "owner.pid").write_text(str(os.getpid()), encoding="ascii")
        self.socket_dir.mkdir(mode=0o700)
        pwfile = self.root / "password"
        pwfile.write_text(PASSWORD + "\n", encoding="utf-8")
        if self.user is not None:
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def initdb(self) -> None:
        started = time.monotonic()
        assert self.root is not None
        with open(self.log_path, "ab") as log:
            done = subprocess.run(
                self._command(
                    self.bindir / "initdb",
                    "--pgdata",
                    self.data,
                    "--username",
                    SUPERUSER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--pwfile",
                    self.root / "password",
                    "--no-locale",
                    "--encoding=UTF8",
                    "--no-sync",
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                check=False,
                timeout=START_TIMEOUT_S,
            )
        if done.returncode != 0:
            raise PostgresStartFailed(f"initdb exited with {done.returncode}:\n{self.logs()}")
        self.initdb_s = time.monotonic() - started

    def start(self) -> None:
        """Make the cluster and start its server; raise (with its log) if it does not
        become ready. A port taken between its choice and the bind: tried once more."""
        self._make_folder()
        try:
            self.initdb()
            for attempt in (1, 2):
                try:
                    self._start_once()
                    return
                except PostgresStartFailed as error:
                    if attempt == 2 or "could not bind" not in str(error):
                        raise
        except BaseException:
            self.stop()
            raise

    def _start_once(self) -> None:
        started = time.monotonic()
        self.port = free_port()
        settings = [f"--{name}={value}" for name, value in SERVER_SETTINGS.items()]
        argv = self._command(
            self.bindir / "postgres",
            "-D",
            self.data,
            "-p",
            str(self.port),
            "-k",
            self.socket_dir,
            *settings,
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = started + START_TIMEOUT_S
        while not self._ready():
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise PostgresStartFailed(f"postgres exited with {code}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self._stop_server()
                raise PostgresStartFailed(
                    f"postgres not ready after {START_TIMEOUT_S:.0f} s:\n{self.logs()}"
                )
            time.sleep(0.02)
        self.start_s = time.monotonic() - started

    def _ready(self) -> bool:
        """Whether our postmaster says it accepts connections (postmaster.pid's status
        line, as `pg_ctl -w` reads it): not merely that something listens on the port."""
        assert self.proc is not None
        try:
            lines = (self.data / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self.proc.pid)
            and lines[7].strip() == "ready"
        )

    def logs(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, AssertionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def connect(self, dbname: str = "postgres") -> Any:
        """A psycopg (sync, autocommit) connection as the superuser, over the socket."""
        import psycopg  # the postgres extra; the fixtures skip without it

        return psycopg.connect(self.database(dbname).dsn, autocommit=True)

    def create_database(self, dbname: str) -> PgDatabase:
        from psycopg import sql

        if self.admin is None or self.admin.closed:
            self.admin = self.connect()
        self.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.database(dbname)

    def drop_database(self, dbname: str) -> None:
        """Drop it, ending whatever connections a test left (WITH FORCE)."""
        from psycopg import sql

        if self.admin is None or self.admin.closed:
            self.admin = self.connect()
        self.admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )

    def _stop_server(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, checkpoints
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        if self.admin is not None:
            with contextlib.suppress(Exception):
                self.admin.close()
            self.admin = None
        self._stop_server()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Where setpriv is missing (and the tests do not run as root): the same death signal
# from a Python launcher that then becomes the server (exec keeps it).
LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
os.execv(sys.argv[1], sys.argv[1:])
"""


def database_name(test_name: str) -> str:
    """A fresh database name (at most 63 bytes, [a-z0-9_]) that says which test made it."""
    stem = re.sub(r"[^a-z0-9]+", "_", test_name.lower()).strip("_")[:40].strip("_")
    return f"t_{stem}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole run, started when a test first needs it."""
    try:
        server = PgServer()
    except PostgresUnavailable as error:
        pytest.skip(str(error))
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip(DRIVER_HINT)
    with server:
        yield server


@pytest.fixture
def pg_database(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[PgDatabase]:
    """A real PostgreSQL server and a new empty database for this test (dropped after it,
    with any connection left open to it).

    Skips, saying what to install, where PostgreSQL is not installed."""
    dbname = database_name(request.node.name)
    database = pg_server.create_database(dbname)
    try:
        yield database
    finally:
        pg_server.drop_database(dbname)


def main() -> None:
    """Start a server, create database `batchd`, print its settings, run until
    SIGINT/SIGTERM."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with PgServer() as server:
        database = server.create_database("batchd")
        print(
            f"# PostgreSQL {server.version} up in {server.start_s:.2f} s"
            f" (initdb {server.initdb_s:.2f} s), data in {server.root}"
            + (f", run as {server.user.pw_name}" if server.user else "")
        )
        for key, value in database.env().items():
            print(f"export {key}={value}")
        print(f"# over the socket (trust): {database.dsn}")
        print(f"# over TCP (password):    {database.tcp_dsn}")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
