"""A real S3-compatible object store on loopback for the tests: OpenStack Swift with s3api.

Swift is a distributed object store in production at scale; its `s3api` middleware serves the
S3 protocol (V2 and V4 signatures, path-style and virtual-hosted addressing, multipart
uploads, copies, presigned URLs). Debian packages it (`swift-proxy`, `swift-account`,
`swift-container`, `swift-object`); `.ci/run` installs them as root. Here it runs as one
node of four unprivileged processes (proxy, account, container and object servers, one
worker each, no forking) with its data, rings and config in a temporary folder, on free
127.0.0.1 ports: nothing in /etc, /srv or systemd is used or changed.

Registered as a pytest plugin by tests/conftest.py; nothing runs until a test asks for
`s3_server`. Where Swift is not installed, such tests are skipped, saying how to get it.
By hand: `python -m tests.objstore` starts one and prints its settings (as `export AWS_...`
lines) until SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

APT_PACKAGES = ("swift-proxy", "swift-account", "swift-container", "swift-object")
INSTALL_HINT = (
    "install OpenStack Swift (as root: apt-get install -y --no-install-recommends "
    + " ".join(APT_PACKAGES)
    + ") to run the object-store tests; `.ci/run` does it when run as root"
)
# The scripts Debian installs; their shebang names the interpreter that can import swift.
SERVER_SCRIPT = Path("/usr/bin/swift-proxy-server")
SERVERS = ("account", "container", "object", "proxy")
START_TIMEOUT_S = 45.0  # below pytest's 60 s per test, so that this message is seen
STOP_TIMEOUT_S = 10.0

# Model Studio reads OSS inputs from buckets in its own region (SPEC.md): the test store
# plays one there, so that `oss:cn-beijing:BUCKET/KEY` ids name it.
REGION = "cn-beijing"
ACCOUNT = "batchd"
USER = "tester"
ACCESS_KEY_ID = f"{ACCOUNT}:{USER}"  # tempauth's S3 access key is "account:user"
SECRET_ACCESS_KEY = "swift-s3-secret"

# Runs one Swift server in the foreground, reading swift.conf (hash path salts, storage
# policies) from the temporary folder instead of /etc/swift, and dying with its parent
# (PR_SET_PDEATHSIG), so that a test run killed with -9 leaves no server behind. The proxy's
# launcher first builds the rings it reads (one replica, one device, the servers' ports):
# the other servers do not read them, so they start meanwhile.
LAUNCHER = """\
import ctypes, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
swift_dir, name, conf, *rings = sys.argv[1:]
from swift.common.utils import set_swift_dir
set_swift_dir(swift_dir)
if rings:
    from swift.common.ring import RingBuilder
    for ring in rings:
        kind, port = ring.split("=")
        builder = RingBuilder(6, 1, 1)
        builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1",
                         "port": int(port), "device": "d1", "weight": 1.0, "meta": ""})
        builder.rebalance()
        builder.get_ring().save(f"{swift_dir}/{kind}.ring.gz")
from swift.common.wsgi import run_wsgi
extra = {}
if name == "object-server":
    from swift.obj import server
    extra["global_conf_callback"] = server.global_conf_callback
sys.exit(run_wsgi(conf, name, verbose=True, **extra))
"""

SWIFT_CONF = """\
[swift-hash]
swift_hash_path_prefix = batchd-tests
swift_hash_path_suffix = batchd-tests

[storage-policy:0]
name = Policy-0
default = yes
"""

COMMON_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
bind_timeout = 2
workers = 0
user = {user}
swift_dir = {root}/etc
devices = {root}/srv
mount_check = false
disable_fallocate = true
fallocate_reserve = 0
# Logs go to stderr, into {root}/log (see LAUNCHER). Swift always adds a syslog handler
# too: with no socket at log_address it sends to UDP 127.0.0.1:514, where syslog daemons do
# not listen by default; at WARNING that is a few lines a run at most.
log_level = {log_level}
log_address = {root}/no-syslog
recon_cache_path = {root}/cache
# Patient on a loaded machine: an object server that gives up on its container update
# leaves the object out of listings until an updater runs, and none does here.
conn_timeout = 5
node_timeout = 30
container_update_timeout = 30
"""

BACKEND_CONF = """\
[pipeline:main]
pipeline = healthcheck {name}-server

[filter:healthcheck]
use = egg:swift#healthcheck

[app:{name}-server]
use = egg:swift#{name}
log_requests = false
"""

PROXY_CONF = """\
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api \
tempauth copy slo dlo versioned_writes proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
log_handoffs = false

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging
access_log_level = {log_level}

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcache_port}

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:s3api]
use = egg:swift#s3api
location = {region}
storage_domain = localhost

[filter:tempauth]
use = egg:swift#tempauth
user_{account}_{s3_user} = {secret} .admin

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo

[filter:versioned_writes]
use = egg:swift#versioned_writes
"""


class ObjectStoreUnavailable(RuntimeError):
    """The S3-compatible server (OpenStack Swift) is not installed on this machine."""


class ObjectStoreStartFailed(RuntimeError):
    """The S3-compatible server did not start; the message ends with its log."""


@dataclass(frozen=True)
class S3Server:
    """Where a running S3-compatible server answers, with one bucket for the test.

    Path-style addressing (`{endpoint_url}/{bucket}/{key}`): a loopback address has no
    DNS names for buckets (virtual-hosted `{bucket}.localhost` also works with Swift, but
    not every resolver maps `*.localhost` to 127.0.0.1)."""

    endpoint_url: str
    region: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    root: Path

    def env(self) -> dict[str, str]:
        """The standard environment variables that carry these credentials and endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }


def swift_python() -> str:
    """The interpreter that runs Debian's Swift (from the script's shebang), or raise."""
    try:
        first = SERVER_SCRIPT.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        raise ObjectStoreUnavailable(INSTALL_HINT) from None
    match = re.fullmatch(r"#!\s*(\S+)(?:\s.*)?", first)
    if match is None or not Path(match.group(1)).exists():
        raise ObjectStoreUnavailable(INSTALL_HINT)
    return match.group(1)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (another process may take one before it is bound)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def healthy(port: int) -> bool:
    """Whether a Swift server answers its health check on `port` (not merely some listener)."""
    url = f"http://127.0.0.1:{port}/healthcheck"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP_PROXY
    try:
        with direct.open(url, timeout=0.5) as response:
            return bool(response.status == 200 and response.read() == b"OK")
    except (OSError, ValueError):
        return False


class SwiftS3:
    """One Swift node with s3api, started by `start()` and stopped by `stop()`."""

    def __init__(self, root: Path, *, log_level: str = "WARNING") -> None:
        self.root = root
        self.log_level = log_level
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.start_s = 0.0
        self.admin: Any = None  # a botocore client, made by the first `create_bucket`

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def configure(self) -> None:
        root = self.root
        for sub in ("etc", "srv/d1", "cache", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # memcache: tempauth insists on a cache; none listens on this port, and the proxy
        # works without it (each lookup misses).
        ports = free_ports(len(SERVERS) + 1)
        self.ports = dict(zip((*SERVERS, "memcache"), ports, strict=True))
        values = {
            "root": root,
            "user": pwd.getpwuid(os.getuid()).pw_name,
            "log_level": self.log_level,
            "region": REGION,
            "account": ACCOUNT,
            "s3_user": USER,
            "secret": SECRET_ACCESS_KEY,
            "memcache_port": self.ports["memcache"],
        }
        (root / "etc" / "swift.conf").write_text(SWIFT_CONF, encoding="utf-8")
        for name in SERVERS:
            body = PROXY_CONF if name == "proxy" else BACKEND_CONF
            text = (COMMON_CONF + "\n" + body).format(**values, port=self.ports[name], name=name)
            (root / "etc" / f"{name}-server.conf").write_text(text, encoding="utf-8")

    def start(self) -> None:
        """Start the four servers and wait until each listens; raise if one does not.

        The ports are free when chosen but may be taken before a server binds: then the
        start is tried once more, on other ports."""
        for attempt in (1, 2):
            try:
                self.start_once()
                return
            except ObjectStoreStartFailed as error:
                if attempt == 2 or "Could not bind" not in str(error):
                    raise

    def start_once(self) -> None:
        started = time.monotonic()
        python = swift_python()
        self.configure()
        rings = [f"{name}={self.ports[name]}" for name in SERVERS if name != "proxy"]
        for name in SERVERS:
            log = open(self.root / "log" / f"{name}.log", "ab")  # noqa: SIM115
            with log:
                self.procs[name] = subprocess.Popen(
                    [
                        python,
                        "-c",
                        LAUNCHER,
                        str(self.root / "etc"),
                        f"{name}-server",
                        str(self.root / "etc" / f"{name}-server.conf"),
                        *(rings if name == "proxy" else ()),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        deadline = started + START_TIMEOUT_S
        waiting = set(SERVERS)
        while waiting:
            for name in sorted(waiting):
                code = self.procs[name].poll()
                if code is not None:
                    self.stop()
                    raise ObjectStoreStartFailed(
                        f"swift {name}-server exited with {code}:\n{self.logs()}"
                    )
                if healthy(self.ports[name]):
                    waiting.discard(name)
            if waiting and time.monotonic() > deadline:
                self.stop()
                raise ObjectStoreStartFailed(
                    f"swift {sorted(waiting)} not healthy after {START_TIMEOUT_S:.0f} s:\n"
                    + self.logs()
                )
            if waiting:
                time.sleep(0.05)
        self.start_s = time.monotonic() - started

    def logs(self, lines: int = 40) -> str:
        out = []
        for name in SERVERS:
            path = self.root / "log" / f"{name}.log"
            with contextlib.suppress(OSError):
                tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}-server ---\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> SwiftS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_bucket(server: SwiftS3, bucket: str) -> None:
    """Create `bucket` with botocore (a dependency of the `storage` extra)."""
    if server.admin is None:
        import botocore.session  # only when a test asks for a bucket

        server.admin = botocore.session.get_session().create_client(
            "s3",
            region_name=REGION,
            endpoint_url=server.endpoint_url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )
    server.admin.create_bucket(Bucket=bucket)


def bucket_name(test_name: str) -> str:
    """A fresh S3 bucket name (3-63 of [a-z0-9-]) that says which test made it."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def swift_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftS3]:
    """One Swift node with s3api for the whole run, started when a test first needs it."""
    try:
        swift_python()
    except ObjectStoreUnavailable as error:
        pytest.skip(str(error))
    try:
        import botocore  # noqa: F401
    except ImportError:
        pytest.skip(
            "install batchd's storage extra (pip install -e '.[storage]') to run the"
            " object-store tests"
        )
    with SwiftS3(tmp_path_factory.mktemp("swift-s3")) as server:
        yield server


@pytest.fixture
def s3_server(swift_s3: SwiftS3, request: pytest.FixtureRequest) -> S3Server:
    """A real S3-compatible server on 127.0.0.1 and a new empty bucket for this test.

    Skips, saying what to install, where OpenStack Swift is not installed."""
    bucket = bucket_name(request.node.name)
    create_bucket(swift_s3, bucket)
    return S3Server(
        endpoint_url=swift_s3.endpoint_url,
        region=REGION,
        bucket=bucket,
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
        root=swift_s3.root,
    )


@dataclass(frozen=True)
class FaultyS3Server(S3Server):
    """`S3Server` seen through the store fault proxy (batchd.emulator.storeproxy): its
    `endpoint_url` is the proxy's; `set_faults(...)` and `stats()` drive and read it."""

    proxy: Any = None

    def set_faults(self, **changes: Any) -> None:
        self.proxy.set_faults(**changes)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.proxy.proxy.stats()
        return result


@pytest.fixture
async def s3_faulty(s3_server: S3Server) -> AsyncIterator[FaultyS3Server]:
    """`s3_server` behind a fault proxy on 127.0.0.1: 500s, slow or cut reads, latency,
    and bucket tags or a location served by the proxy (see batchd.emulator.storeproxy)."""
    from batchd.emulator.storeproxy import start_proxy

    running = await start_proxy(s3_server.endpoint_url)
    try:
        yield FaultyS3Server(**{**vars(s3_server), "endpoint_url": running.url}, proxy=running)
    finally:
        await running.close()


def main() -> None:
    """Start a server in a temporary folder, print its settings, run until SIGINT/SIGTERM."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="batchd-s3-") as tmp, SwiftS3(Path(tmp)) as server:
        print(f"# swift s3api up in {server.start_s:.1f} s, data in {tmp}")
        for key, value in {
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }.items():
            print(f"export {key}={value}")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
