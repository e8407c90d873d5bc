"""A kill -9 loop over the whole pipeline (TESTING.md B.8).

Inputs are dropped into the inbox while the daemon (`python -m batchd run`, a real
process) is killed with SIGKILL at random moments and restarted each time; a last clean
run finishes the work. Then every invariant is checked:

- every input ends in exactly one terminal state: one outbox folder per input, none
  twice, every request once in result.jsonl or error.jsonl, no hidden temp folder left;
- at most one remote batch per part (the emulator counts creates per input file);
- no orphan remote file once clean-up ran (the emulator stores no file);
- no partial folder ever visible in the outbox (a watcher samples it during the run);
- the outbox's result lines are byte for byte the emulator's output lines, and its error
  lines the emulator's error lines plus their `input_line`;
- `PRAGMA integrity_check` is ok after every kill.

The figures (kills, duplicates, lost, orphans, mean recovery time) are printed; the soak
variant also writes them to tests/bench/soak-figures.json.

The hostile variant (issue 12) runs the same loop against a service that misbehaves: at
each restart the emulator's fault modes are switched on at random (list filters ignored,
answers lost after their effect, 5xx and dropped connections, garbled numbers and times,
list pages that never end, result files that answer 404 or drip, huge and odd result
lines). The end state is checked the same way; what the faults make impossible to
deliver (a result file that answers 404 for good) must be published as such, with every
request still accounted for once, and nothing orphaned but the files batchd says it left
on the service.

Both loops also meet faults of the machine at random (issue 22): in a round, the disk
under the whole root (a small tmpfs, where this process may mount one) fills up for a
while, another process holds the state database with `BEGIN EXCLUSIVE` for a while, or
the daemon's wall clock steps hours forward or back (the test-only step file of
batchd.clock). A disk or a lock may last past the kill into the next start. The daemon
must never exit on its own for any of them, and the end state is checked the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.emulator import Emulator
from batchd.emulator.results import provider_tokenizer as emulator_tokenizer
from batchd.inputs.lines import identity, read_line
from batchd.testing import (
    ENDPOINT_EMBEDDINGS,
    DaemonProcess,
    StartEmulator,
    daemon_env,
    database_locked,
    drop,
    fill_disk,
    requests,
    small_disk,
    step_clock,
    step_clock_env,
    wait_for,
)

MAX_REQUESTS_PER_FILE = 10
FIGURES_FILE = Path(__file__).parent.parent / "bench" / "soak-figures.json"
_INPUT_LINE = re.compile(rb',"input_line":(\d+)}\n\Z')


@dataclass
class Plan:
    """How hard to push: kills, inputs, the wall-time bound and the seed."""

    kills: int
    inputs: int
    time_limit_s: float
    seed: int
    min_delay_s: float = 0.02
    max_delay_s: float = 1.0
    # Switch the emulator's fault modes on at random at each restart (issue 12).
    hostile: bool = False
    # Meet faults of the machine at random (issue 22): a full disk, a locked database,
    # a stepped clock; each lasts up to `local_fault_max_s`.
    local_faults: bool = True
    local_fault_max_s: float = 2.0


@dataclass
class Figures:
    seed: int
    kills: int = 0
    restarts: int = 0
    inputs: int = 0
    parts: int = 0
    requests: int = 0
    failed_requests: int = 0
    duplicates: int = 0
    lost: int = 0
    orphans: int = 0
    partial_seen: int = 0
    integrity_failures: int = 0
    unexpected_exits: int = 0
    recovery_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    fault_rounds: int = 0
    faults_seen: dict[str, int] = field(default_factory=dict)
    unavailable_requests: int = 0
    parked_retried: int = 0
    # Rounds that met each fault of the machine (disk_full, database_locked, clock_step).
    local_faults: dict[str, int] = field(default_factory=dict)
    local_fault_s: float = 0.0
    disk_faults_skipped: str | None = None

    @property
    def mean_recovery_s(self) -> float | None:
        if not self.recovery_s:
            return None
        return round(sum(self.recovery_s) / len(self.recovery_s), 3)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("recovery_s")
        data["recovery_samples"] = len(self.recovery_s)
        data["mean_recovery_s"] = self.mean_recovery_s
        data["max_recovery_s"] = round(max(self.recovery_s), 3) if self.recovery_s else None
        data["wall_s"] = round(self.wall_s, 1)
        data["local_fault_s"] = round(self.local_fault_s, 1)
        return data


@dataclass
class BucketInbox:
    """The inbox on a bucket (issue 24): the producer's view of it, and the daemon's
    environment for it (paths.inbox, [storage], the store's credentials); optionally
    the outbox on the bucket too (the reader's view of it) and the spool (`spool`: its
    bucket folder, whose objects must all be gone at the end)."""

    inbox: Any  # batchd.objstore.bucket.Bucket
    env: dict[str, str]
    outbox: Any = None  # batchd.objstore.bucket.Bucket
    spool: Any = None  # batchd.objstore.bucket.Bucket


class BucketOutboxWatcher:
    """Samples a bucket outbox all through the run: a folder whose summary.json is there
    (it is written last) must be whole; and counts the folders so published."""

    WHOLE = ("summary.json", "result.jsonl", "error.jsonl", "result.csv")

    def __init__(self, outbox: Any) -> None:
        self.outbox = outbox
        self.samples = 0
        self.published = 0
        self.partial: list[str] = []

    async def sample(self) -> None:
        members: dict[str, set[str]] = {}
        async for info in self.outbox.list(recursive=True):
            name, _, member = self.outbox.url.name(info.key).partition("/")
            members.setdefault(name, set()).add(member)
        done = [name for name, have in members.items() if "summary.json" in have]
        for name in done:
            if not set(self.WHOLE) <= members[name]:
                self.partial.append(f"{name}: {sorted(members[name])}")
        self.published = len(done)
        self.samples += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    async def mirror(self, into: Path) -> None:
        """Copy the published folders into `into`, as a reader would take them."""
        async for info in self.outbox.list(recursive=True):
            path = into / self.outbox.url.name(info.key)
            path.parent.mkdir(parents=True, exist_ok=True)
            await self.outbox.get_file(info.key, path, max_bytes=1 << 30)


# -- inputs ---------------------------------------------------------------------------


def make_inputs(count: int) -> dict[str, bytes]:
    """Inputs of four kinds: split into parts, one part, embeddings, and invalid."""
    inputs: dict[str, bytes] = {}
    for i in range(count):
        kind = i % 4
        if kind == 0:
            # Over max_requests_per_file: split into three parts.
            inputs[f"split{i:03d}.jsonl"] = requests(25, prefix=f"s{i}-")
        elif kind == 1:
            inputs[f"small{i:03d}.jsonl"] = requests(4, prefix=f"m{i}-")
        elif kind == 2:
            inputs[f"embed{i:03d}.jsonl"] = requests(
                12, "text-embedding-v3", ENDPOINT_EMBEDDINGS, prefix=f"e{i}-", dimensions=4
            )
        else:
            # Rejected by the daemon's own validator: never sent, still published.
            inputs[f"bad{i:03d}.jsonl"] = requests(2, prefix=f"b{i}-") + b"not json\n"
    return inputs


def custom_ids(content: bytes) -> list[str]:
    ids = []
    for line in content.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            obj = orjson.loads(line)
            if isinstance(obj, dict):
                ids.append(obj["custom_id"])
    return ids


# -- a hostile service ----------------------------------------------------------------

NO_FAULTS: dict[str, Any] = {
    "ignore_list_filters": False,
    "endless_pages": False,
    "lost_response_rate": 0.0,
    "lost_create_response_rate": 0.0,
    "drop_connection_rate": 0.0,
    "error_5xx_rate": 0.0,
    "garbled_fields_rate": 0.0,
    "odd_lines_rate": 0.0,
    "content_missing_rate": 0.0,
    "drip_rate": 0.0,
    "huge_line_bytes": 0,
}


def random_faults(rng: random.Random) -> dict[str, Any]:
    """One round of the service's misbehaviour: each fault on or off at random."""
    return {
        "ignore_list_filters": rng.random() < 0.5,
        "endless_pages": rng.random() < 0.3,
        "lost_response_rate": rng.choice([0.0, 0.0, 0.1, 0.3]),
        "lost_create_response_rate": rng.choice([0.0, 0.2]),
        "drop_connection_rate": rng.choice([0.0, 0.0, 0.05]),
        "error_5xx_rate": rng.choice([0.0, 0.0, 0.05]),
        "garbled_fields_rate": rng.choice([0.0, 0.5, 1.0]),
        "odd_lines_rate": rng.choice([0.0, 0.3]),
        "content_missing_rate": rng.choice([0.0, 0.0, 0.0, 0.2]),
        "drip_rate": rng.choice([0.0, 0.0, 0.3]),
        "huge_line_bytes": rng.choice([0, 0, 300_000]),
        "seed": rng.randrange(1 << 30),
    }


async def retry_parked(sock: Path) -> int:
    """Ask the daemon to resume every parked part (as an operator would); how many jobs."""
    from batchd.testing import RawControl

    client = RawControl(sock, timeout_s=2.0)
    try:
        code, status = await client.call("GET", "/v1/status")
    except OSError:
        return 0
    if code != 200:
        return 0
    jobs = {p["job_id"] for p in status.get("problems", []) if p["kind"] == "part_parked"}
    for job_id in jobs:
        with contextlib.suppress(OSError):
            await client.call("POST", f"/v1/jobs/{job_id}/retry")
    return len(jobs)


def garbage_left(db_path: Path) -> int | None:
    """Remote files the daemon still means to delete (None while unreadable)."""
    try:
        with contextlib.closing(sqlite3.connect(db_path, timeout=1)) as db:
            return int(db.execute("SELECT COUNT(*) FROM remote_garbage").fetchone()[0])
    except sqlite3.Error:
        return None


def kept_on_service(outbox: Path) -> set[str]:
    """Result files the published summaries say were left on the service on purpose."""
    kept: set[str] = set()
    for folder in outbox.iterdir():
        if folder.name.startswith("."):
            continue
        summary = orjson.loads((folder / "summary.json").read_bytes())
        for part in summary.get("parts") or []:
            kept.update(part.get("kept_on_service") or [])
    return kept


# -- observers ------------------------------------------------------------------------


def record_output_files(emulator: Emulator) -> dict[str, bytes]:
    """The bytes of every result file the emulator writes, kept before any deletion.

    A seam on the fake service (not on batchd): the daemon deletes remote files after
    publishing, and the byte comparison needs what the service served.
    """
    store = emulator.state.store
    served: dict[str, bytes] = {}
    add_file = store.add_file

    def recording_add_file(
        temp: Path, filename: str, size: int, purpose: str, *rest: Any, **kw: Any
    ) -> Any:
        stored = add_file(temp, filename, size, purpose, *rest, **kw)
        if purpose == "batch_output":
            served[stored.id] = stored.path.read_bytes()
        return stored

    store.add_file = recording_add_file  # type: ignore[method-assign]
    return served


class OutboxWatcher:
    """Samples the outbox all through the run: a visible folder must always be whole."""

    WHOLE = ("summary.json", "result.jsonl", "error.jsonl", "result.csv")

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self.samples = 0
        self.partial: list[str] = []

    def sample(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.outbox):
                if name.startswith("."):
                    continue
                have = set(os.listdir(self.outbox / name))
                if not set(self.WHOLE) <= have:
                    self.partial.append(f"{name}: {sorted(have)}")
        self.samples += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)


def progress_mark(reader: sqlite3.Connection | None) -> tuple[Any, ...] | None:
    """What the daemon has done so far, as the database says; None while unreadable."""
    if reader is None:
        return None
    try:
        jobs = reader.execute("SELECT COUNT(*), MAX(updated_at) FROM jobs").fetchone()
        parts = reader.execute("SELECT state, COUNT(*) FROM parts GROUP BY state").fetchall()
    except sqlite3.Error:
        return None
    return (*jobs, *sorted(parts))


def socket_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of the control socket: a new one means a new daemon listens."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def integrity(db_path: Path) -> str:
    with contextlib.closing(sqlite3.connect(db_path, timeout=5)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


class LocalFaults:
    """The machine's faults of the loop (issue 22): one drawn per round, at random."""

    KINDS = ("disk_full", "database_locked", "clock_step")

    def __init__(
        self, rng: random.Random, root: Path, db_path: Path, step_file: Path, plan: Plan
    ) -> None:
        self.rng = rng
        self.root = root
        self.db_path = db_path
        self.step_file = step_file
        self.plan = plan
        self.disk = False  # the root is a small disk of its own (else no disk faults)
        self.ballast: Path | None = None
        self.clock_offset_s = 0.0
        self.tasks: set[asyncio.Task[None]] = set()

    def draw(self, figures: Figures) -> None:
        """Maybe start one fault for this round (it may outlast the round)."""
        if not self.plan.local_faults or self.rng.random() < 0.4:
            return
        kinds = [k for k in self.KINDS if self.disk or k != "disk_full"]
        kind = self.rng.choice(kinds)
        figures.local_faults[kind] = figures.local_faults.get(kind, 0) + 1
        if kind == "clock_step":
            # NTP fixing a clock hours off, either way (the offset is kept, as a real
            # clock's would be, across restarts).
            self.clock_offset_s += self.rng.choice([-1, 1]) * self.rng.uniform(1, 40) * 3600
            step_clock(self.step_file, self.clock_offset_s)
            return
        start_s = self.rng.uniform(0.0, 0.5)
        last_s = self.rng.uniform(0.3, self.plan.local_fault_max_s)
        figures.local_fault_s += last_s
        work = self._full(start_s, last_s) if kind == "disk_full" else self._lock(start_s, last_s)
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _full(self, start_s: float, last_s: float) -> None:
        await asyncio.sleep(start_s)
        if self.ballast is None:
            self.ballast = await asyncio.to_thread(fill_disk, self.root)
            await asyncio.sleep(last_s)
            self.free()

    async def _lock(self, start_s: float, last_s: float) -> None:
        await asyncio.sleep(start_s)
        if not self.db_path.exists():
            return
        async with database_locked(self.db_path):
            await asyncio.sleep(last_s)

    def free(self) -> None:
        if self.ballast is not None:
            self.ballast.unlink(missing_ok=True)
            self.ballast = None

    @contextlib.contextmanager
    def room(self) -> Any:
        """Space for the test's own writes (an input dropped into the inbox)."""
        full = self.ballast is not None
        self.free()
        try:
            yield
        finally:
            if full:
                self.ballast = fill_disk(self.root)

    async def end(self) -> None:
        """Every fault over: the clean run meets none."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.free()


# -- the loop -------------------------------------------------------------------------


async def run_kill_loop(
    start_emulator: StartEmulator, tmp_path: Path, plan: Plan, bucket: BucketInbox | None = None
) -> Figures:
    root = tmp_path / "root"
    with small_disk(root, "64m") as mounted:
        figures = await _kill_loop(start_emulator, tmp_path, plan, disk=mounted, bucket=bucket)
    if not mounted and plan.local_faults:
        figures.disk_faults_skipped = (
            "no full-disk faults: mounting a tmpfs needs root (or CAP_SYS_ADMIN)"
        )
    return figures


async def _kill_loop(
    start_emulator: StartEmulator,
    tmp_path: Path,
    plan: Plan,
    *,
    disk: bool,
    bucket: BucketInbox | None = None,
) -> Figures:
    rng = random.Random(plan.seed)
    figures = Figures(seed=plan.seed)
    started = time.monotonic()
    emulator = await start_emulator(time_scale=1000, request_failure_rate=0.15, seed=plan.seed)
    # The emulator counts a chat input's tokens with the provider's tokenizer, loaded at
    # its first create (about 2 s, far longer on a loaded machine): a create sent just
    # before a kill would land at the service seconds after the next daemon had listed
    # and found nothing. Loaded first, as the real service has it loaded.
    await asyncio.to_thread(emulator_tokenizer)
    served = record_output_files(emulator)
    root = tmp_path / "root"
    inbox, outbox, spool = root / "inbox", root / "outbox", root / "spool"
    db_path = root / "state" / "batchd.sqlite3"
    sock = root / "control.sock"
    inbox.mkdir(parents=True)
    step_file = tmp_path / "clock-step"
    local = LocalFaults(random.Random(plan.seed + 1), root, db_path, step_file, plan)
    local.disk = disk
    env = daemon_env(
        emulator,
        root,
        BATCHD_LIMITS__MAX_REQUESTS_PER_FILE=str(MAX_REQUESTS_PER_FILE),
        BATCHD_LIMITS__LIST_PER_MINUTE="100000",
        BATCHD_LIMITS__RETRIEVE_PER_MINUTE="100000",
        BATCHD_LIMITS__CREATE_PER_MINUTE="100000",
        BATCHD_LIMITS__UPLOAD_PER_SECOND="1000",
        BATCHD_LIMITS__FILE_CALLS_PER_SECOND="1000",
        # A kill here is never the job's fault: do not park jobs for crashes we cause.
        # (B.12, the poison input, is tested on its own.)
        BATCHD_MAX_JOB_CRASHES="1000000",
        BATCHD_LOG__LEVEL="warning",
        # A create cut by a kill is looked for this long after its intent, as in
        # production (10 s there): the harness's 0.05 s is shorter than the emulator
        # may take to record a batch on a loaded machine.
        BATCHD_API__SETTLE_AFTER_S="3",
        **step_clock_env(step_file),
        **(bucket.env if bucket is not None else {}),
    )

    async def place(name: str, content: bytes) -> None:
        if bucket is None:
            drop(inbox, name, content)
        else:
            await bucket.inbox.put_bytes(bucket.inbox.url.key(name), content)

    if plan.hostile:
        env.update(
            {
                # A dripping download is cut fast; long lines take the streaming path.
                "BATCHD_API__DOWNLOAD_MIN_BYTES_PER_S": "65536",
                "BATCHD_API__DOWNLOAD_GRACE_S": "0.3",
                "BATCHD_JOBS__MAX_RESULT_LINE_BYTES": "65536",
                "BATCHD_API__MAX_LIST_PAGES": "5",
            }
        )
    log = tmp_path / "daemon.log"
    inputs = make_inputs(plan.inputs)
    to_drop = list(inputs.items())
    # Most inputs arrive while the kills go on, a few before the first start.
    for name, content in to_drop[:2]:
        await place(name, content)
    to_drop = to_drop[2:]

    on_bucket = bucket is not None and bucket.outbox is not None
    watcher: OutboxWatcher | BucketOutboxWatcher = (
        BucketOutboxWatcher(bucket.outbox)
        if bucket is not None and on_bucket
        else OutboxWatcher(outbox)
    )
    stop_watch = asyncio.Event()
    watch_task = asyncio.create_task(watcher.run(stop_watch))
    reader: sqlite3.Connection | None = None

    def all_published() -> bool:
        if to_drop:
            return False
        if isinstance(watcher, BucketOutboxWatcher):
            return watcher.published >= len(inputs)
        if not outbox.exists():
            return False
        return len([n for n in os.listdir(outbox) if not n.startswith(".")]) >= len(inputs)

    def tail() -> str:
        return log.read_text(errors="replace")[-4000:]

    try:
        while figures.kills < plan.kills and time.monotonic() - started < plan.time_limit_s:
            if all_published():
                break
            if to_drop:
                name, content = to_drop.pop(0)
                with local.room():
                    await place(name, content)
            local.draw(figures)
            if plan.hostile:
                faults = random_faults(rng)
                emulator.set_faults(**faults)
                figures.fault_rounds += 1
                for key, value in faults.items():
                    if key != "seed" and value:
                        figures.faults_seen[key] = figures.faults_seen.get(key, 0) + 1
            if reader is None and db_path.exists():
                reader = sqlite3.connect(db_path, timeout=1, isolation_level=None)
            before = progress_mark(reader)
            old_sock = socket_identity(sock)
            spawned = time.monotonic()
            proc = await DaemonProcess.start(env, log)
            figures.restarts += 1
            # Kill at a random moment counted from when the daemon listens (its socket
            # is new), so kills land in recovery and in every stage, not in imports.
            delay = rng.uniform(plan.min_delay_s, plan.max_delay_s)
            kill_at: float | None = None
            progressed = False
            deadline = spawned + 10.0
            while proc.returncode is None:
                now = time.monotonic()
                if kill_at is None and (
                    socket_identity(sock) not in (None, old_sock) or now > deadline
                ):
                    kill_at = now + delay
                if kill_at is not None and now >= kill_at:
                    break
                if reader is None and db_path.exists():
                    reader = sqlite3.connect(db_path, timeout=1, isolation_level=None)
                    before = None
                if not progressed and before is not None:
                    mark = progress_mark(reader)
                    if mark is not None and mark != before:
                        figures.recovery_s.append(now - spawned)
                        progressed = True
                emulator.advance(20)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.01)
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                code = await proc.wait()
                assert code == -signal.SIGKILL
                figures.kills += 1
            else:
                figures.unexpected_exits += 1
                raise AssertionError(f"daemon exited {proc.returncode} on its own:\n{tail()}")
            if db_path.exists() and integrity(db_path) != "ok":
                figures.integrity_failures += 1
            stats = await emulator.stats()
            twice = {f: n for f, n in stats["batches_created_per_input_file"].items() if n != 1}
            assert not twice, f"a part was created twice after kill {figures.kills}: {twice}"

        # Whatever is left arrives now; a clean run finishes everything.
        await local.end()
        emulator.set_faults(**NO_FAULTS)
        for name, content in to_drop:
            await place(name, content)
        to_drop = []
        old_sock = socket_identity(sock)
        proc = await DaemonProcess.start(env, log)
        figures.restarts += 1
        try:
            done_by = time.monotonic() + 90
            # The clean run must get going (listening, recovered) before it may end.

            def listening() -> bool:
                assert proc.returncode is None, f"daemon exited {proc.returncode}:\n{tail()}"
                return socket_identity(sock) not in (None, old_sock)

            await wait_for(listening, 90, "the clean run listening", step_s=0.01)
            remote_left = -1

            async def finished() -> bool:
                nonlocal remote_left
                stats = await emulator.stats()
                remote_left = stats["files_stored"]["count"]
                if plan.hostile:
                    figures.parked_retried += await retry_parked(sock)
                    if (
                        all_published()
                        and garbage_left(db_path) == 0
                        and remote_left == len(kept_on_service(outbox))
                    ):
                        return True
                elif all_published() and remote_left == 0:
                    return True
                assert proc.returncode is None, f"daemon exited {proc.returncode}:\n{tail()}"
                return False

            await wait_for(
                finished,
                max(0.0, done_by - time.monotonic()),
                lambda: (
                    f"not finished: {len(os.listdir(outbox)) if outbox.exists() else 0}"
                    f" (bucket: {getattr(watcher, 'published', '-')})"
                    f" of {len(inputs)} published, {remote_left} remote files left\n{tail()}"
                ),
                emulator=emulator,
                advance_s=60,
            )
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(proc.wait(), 30)
                assert code == 0, f"clean run exited {code}:\n{tail()}"
    finally:
        await local.end()
        stop_watch.set()
        await watch_task
        if reader is not None:
            reader.close()
    figures.wall_s = time.monotonic() - started
    figures.inputs = len(inputs)
    if integrity(db_path) != "ok":
        figures.integrity_failures += 1
    figures.partial_seen = len(watcher.partial)

    stats = await emulator.stats()
    published = outbox
    if isinstance(watcher, BucketOutboxWatcher):
        await watcher.sample()
        published = tmp_path / "outbox-read-from-the-bucket"
        await watcher.mirror(published)
    check_end_state(figures, inputs, root, stats, served, hostile=plan.hostile, outbox=published)
    assert watcher.samples > (10 if on_bucket else 100), "the outbox watcher hardly ran"
    assert not watcher.partial, watcher.partial
    # Nothing left behind on disk either: inbox, spool and hidden outbox temp folders.
    assert sorted(os.listdir(inbox)) == []
    if bucket is not None:
        assert [info.key async for info in bucket.inbox.list(recursive=True)] == []
    if bucket is not None and bucket.spool is not None:
        assert [info.key async for info in bucket.spool.list(recursive=True)] == []
        # Every part was read by the service from the spool bucket: nothing uploaded.
        assert stats["calls"]["upload"]["served"] == 0, stats["calls"]["upload"]
        assert stats["inputs"]["oss"] >= figures.parts > 0, (stats["inputs"], figures.parts)
    if on_bucket:
        assert [n for n in os.listdir(outbox) if not n.startswith(".")] == []
    assert sorted(os.listdir(spool)) == []
    assert [n for n in os.listdir(outbox) if n.startswith(".")] == []
    return figures


def check_end_state(
    figures: Figures,
    inputs: dict[str, bytes],
    root: Path,
    stats: dict[str, Any],
    served: dict[str, bytes],
    *,
    hostile: bool = False,
    outbox: Path | None = None,
) -> None:
    outbox = outbox or root / "outbox"
    folders = sorted(n for n in os.listdir(outbox) if not n.startswith("."))
    expected = sorted(name.removesuffix(".jsonl") for name in inputs)
    extra = sorted(set(folders) - set(expected))
    missing = sorted(set(expected) - set(folders))
    figures.duplicates += len(extra)
    figures.lost += len(missing)

    with contextlib.closing(sqlite3.connect(root / "state" / "batchd.sqlite3")) as db:
        rows = db.execute("SELECT inbox_name, state FROM jobs").fetchall()
        garbage = db.execute("SELECT COUNT(*) FROM remote_garbage").fetchone()[0]
    per_input = Counter(name for name, _ in rows)
    figures.duplicates += sum(n - 1 for n in per_input.values() if n > 1)
    states = Counter(state for _, state in rows)

    part_files: list[str] = []
    for name in folders:
        if name not in expected:
            continue
        folder = outbox / name
        summary = orjson.loads((folder / "summary.json").read_bytes())
        content = inputs[f"{name}.jsonl"]
        wanted = custom_ids(content)
        results = (folder / "result.jsonl").read_bytes().splitlines(keepends=True)
        errors = (folder / "error.jsonl").read_bytes().splitlines(keepends=True)
        if name.startswith("bad"):
            assert summary["status"] == "rejected", summary
            assert summary["parts"] == [] and results == []
            continue
        # Lines a strict parser refuses (odd lines of a hostile service) are read as
        # batchd reads them.
        got = Counter(identity(line, read_line(line)) for line in results + errors)
        figures.duplicates += sum(n - 1 for n in got.values() if n > 1)
        figures.lost += len(set(wanted) - set(got))
        figures.requests += len(wanted)
        figures.failed_requests += len(errors)
        counts = summary["request_counts"]
        assert counts["total"] == len(wanted), (name, counts)
        assert counts["completed"] + counts["failed"] == counts["total"], (name, counts)
        assert summary.get("unattributed", 0) == 0, (name, summary)
        assert summary["never_run"] == 0, (name, summary)
        if hostile:
            # A result file that answered 404 for good is published as such: its
            # requests ran, and say that their answer could not be fetched.
            figures.unavailable_requests += summary["result_unavailable"]
            assert summary["status"] in ("completed", "partial", "failed"), summary["status"]
        else:
            assert summary["status"] in ("completed", "partial"), (name, summary["status"])

        # Byte for byte what the service served, as multisets (the service shuffles).
        served_out: list[bytes] = []
        served_err: list[bytes] = []
        for part in summary["parts"]:
            part_files.append(part["input_file_id"])
            assert part["status"] == "completed", (name, part)
            unfetched = part.get("unavailable") or {}
            for key, into in (("output_file_id", served_out), ("error_file_id", served_err)):
                if part[key] and key.split("_")[0] not in unfetched:
                    into.extend(served[part[key]].splitlines(keepends=True))
        if hostile:
            # The lines standing in for a file that could not be fetched are batchd's own.
            errors = [e for e in errors if b'"result_unavailable"' not in e]
        assert Counter(results) == Counter(served_out), f"{name}: result lines differ"
        stripped = []
        for line in errors:
            match = _INPUT_LINE.search(line)
            assert match is not None, (name, line)
            stripped.append(line[: match.start()] + b"}\n")
        assert Counter(stripped) == Counter(served_err), f"{name}: error lines differ"

    figures.parts = len(part_files)
    kept = kept_on_service(outbox) if hostile else set()
    figures.orphans = int(stats["files_stored"]["count"]) - len(kept) + int(garbage)
    assert states == {"published": len(inputs)}, states
    assert not extra and not missing, (extra, missing)
    per_file = stats["batches_created_per_input_file"]
    assert sorted(per_file) == sorted(part_files), "a batch was made from an unknown file"
    assert set(per_file.values()) <= {1}, per_file
    assert stats["batches_created"] == len(part_files)
    assert figures.duplicates == 0 and figures.lost == 0 and figures.orphans == 0, figures
    assert figures.integrity_failures == 0
    assert figures.failed_requests > 0, "request_failure_rate produced no failure to carry"


def report(figures: Figures, label: str) -> str:
    s = figures.summary()
    return (
        f"\n[{label}] kills={s['kills']} restarts={s['restarts']} inputs={s['inputs']}"
        f" parts={s['parts']} requests={s['requests']} failed={s['failed_requests']}"
        f" duplicates={s['duplicates']} lost={s['lost']} orphans={s['orphans']}"
        f" partial_seen={s['partial_seen']} integrity_failures={s['integrity_failures']}"
        f" mean_recovery_s={s['mean_recovery_s']} (n={s['recovery_samples']},"
        f" max={s['max_recovery_s']}) wall_s={s['wall_s']} seed={s['seed']}"
        f" local_faults={s['local_faults']} ({s['local_fault_s']:.1f} s of disk and lock)"
        + (f" [{s['disk_faults_skipped']}]" if s["disk_faults_skipped"] else "")
    )


def record_soak_figures(key: str, figures: Figures) -> None:
    """Keep a soak run's figures (for the README) beside the other soaks' in one file."""
    existing: dict[str, Any] = {}
    if FIGURES_FILE.exists():
        with contextlib.suppress(ValueError):
            existing = json.loads(FIGURES_FILE.read_text())
    existing[key] = {**figures.summary(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    FIGURES_FILE.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")


def _seed(default: int) -> int:
    return int(os.environ.get("BATCHD_KILL_SEED", default))


@pytest.mark.timeout(240)
async def test_kill_9_loop_loses_nothing_and_does_nothing_twice(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = Plan(kills=25, inputs=22, time_limit_s=70, seed=_seed(20240807))
    figures = await run_kill_loop(start_emulator, tmp_path, plan)
    with capsys.disabled():
        print(report(figures, "kill-loop"))
    assert figures.kills >= 15, figures.summary()


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_kill_9_soak_hundreds_of_kills(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kills = int(os.environ.get("BATCHD_SOAK_KILLS", "400"))
    limit = float(os.environ.get("BATCHD_SOAK_LIMIT_S", "1800"))
    plan = Plan(kills=kills, inputs=max(8, kills * 2 // 3), time_limit_s=limit, seed=_seed(7))
    figures = await run_kill_loop(start_emulator, tmp_path, plan)
    with capsys.disabled():
        print(report(figures, "kill-loop soak"))
    record_soak_figures("kill_loop", figures)
    assert figures.kills >= min(kills, 100), figures.summary()


@pytest.mark.timeout(240)
async def test_kill_9_loop_against_a_hostile_service(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kill loop with the service misbehaving at random (issue 12), bounded."""
    plan = Plan(kills=12, inputs=12, time_limit_s=45, seed=_seed(20261129), hostile=True)
    figures = await run_kill_loop(start_emulator, tmp_path, plan)
    with capsys.disabled():
        print(report(figures, "kill-loop hostile"), figures.faults_seen)
    assert figures.kills >= 8, figures.summary()
    assert figures.fault_rounds >= 8


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_kill_9_soak_against_a_hostile_service(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kills = int(os.environ.get("BATCHD_SOAK_KILLS", "400"))
    limit = float(os.environ.get("BATCHD_SOAK_LIMIT_S", "1800"))
    plan = Plan(
        kills=kills, inputs=max(8, kills * 2 // 3), time_limit_s=limit, seed=_seed(11), hostile=True
    )
    figures = await run_kill_loop(start_emulator, tmp_path, plan)
    with capsys.disabled():
        print(report(figures, "kill-loop hostile soak"), figures.faults_seen)
    record_soak_figures("kill_loop_hostile", figures)
    assert figures.kills >= min(kills, 100), figures.summary()


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_kill_9_loop_on_a_bucket_inbox_claims_each_object_once(
    start_emulator: StartEmulator,
    tmp_path: Path,
    s3_server: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The kill loop with the inbox alone in a bucket (issue 24): objects PUT while the
    daemon is killed at random, also in the middle of claims; each one in exactly one job.
    (`make test` runs the loop with every folder on a bucket, below.)"""
    from batchd.config import StorageSettings
    from batchd.objstore import open_store
    from batchd.objstore.location import BucketUrl

    url = BucketUrl("s3", s3_server.bucket, "inbox/")
    env = {
        "BATCHD_PATHS__INBOX": str(url),
        "BATCHD_STORAGE__ENDPOINT_URL": s3_server.endpoint_url,
        "BATCHD_STORAGE__REGION": s3_server.region,
        "BATCHD_INTAKE__RESCAN_INTERVAL_S": "0.2",
        **s3_server.env(),
    }
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    plan = Plan(kills=60, inputs=40, time_limit_s=600, seed=_seed(20261207))
    async with open_store(settings, s3_server.env()) as store:
        bucket = BucketInbox(store.bucket(url), env)
        figures = await run_kill_loop(start_emulator, tmp_path, plan, bucket)
    with capsys.disabled():
        print(report(figures, "kill-loop bucket inbox"))
    assert figures.kills >= 10, figures.summary()


@pytest.mark.timeout(300)
async def test_kill_9_loop_with_every_folder_on_a_bucket_and_oss_inputs(
    start_emulator: StartEmulator,
    tmp_path: Path,
    s3_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The kill loop with the inbox, the spool and the outbox all in a bucket and every
    part read by the service from the spool bucket (`oss:` ids, no upload) (issue 24):
    each object in exactly one folder of the bucket outbox, a folder never seen with its
    summary.json but without the rest, every request once, one batch per part, nothing
    left in the inbox or the spool."""
    await _every_folder_on_a_bucket(
        start_emulator,
        tmp_path,
        s3_server,
        monkeypatch,
        capsys,
        Plan(kills=15, inputs=16, time_limit_s=60, seed=_seed(20261208)),
    )


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_kill_9_soak_with_every_folder_on_a_bucket(
    start_emulator: StartEmulator,
    tmp_path: Path,
    s3_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The loop above, long: hundreds of kills with every folder on a bucket."""
    kills = int(os.environ.get("BATCHD_SOAK_KILLS", "200"))
    figures = await _every_folder_on_a_bucket(
        start_emulator,
        tmp_path,
        s3_server,
        monkeypatch,
        capsys,
        Plan(kills=kills, inputs=max(40, kills // 3), time_limit_s=3000, seed=_seed(20261209)),
    )
    record_soak_figures("kill_loop_buckets", figures)


async def _every_folder_on_a_bucket(
    start_emulator: StartEmulator,
    tmp_path: Path,
    s3_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    plan: Plan,
) -> Figures:
    from batchd.config import StorageSettings
    from batchd.objstore import open_store
    from batchd.objstore.location import BucketUrl

    # The emulator (in this process) reads the parts from the store as the service would.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    folders = {n: BucketUrl("s3", s3_server.bucket, f"{n}/") for n in ("inbox", "spool", "outbox")}
    env = {
        **{f"BATCHD_PATHS__{n.upper()}": str(url) for n, url in folders.items()},
        "BATCHD_STORAGE__ENDPOINT_URL": s3_server.endpoint_url,
        "BATCHD_STORAGE__REGION": s3_server.region,
        "BATCHD_INTAKE__RESCAN_INTERVAL_S": "0.2",
        "BATCHD_JOBS__INPUT_VIA": "oss",
        **s3_server.env(),
    }
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, region=s3_server.region)

    async def reading_oss(**settings: Any) -> Any:
        return await start_emulator(
            **settings, object_store_url=s3_server.endpoint_url, oss_require_tag=False
        )

    async with open_store(settings, s3_server.env()) as store:
        bucket = BucketInbox(
            store.bucket(folders["inbox"]),
            env,
            outbox=store.bucket(folders["outbox"]),
            spool=store.bucket(folders["spool"]),
        )
        figures = await run_kill_loop(reading_oss, tmp_path, plan, bucket)
    with capsys.disabled():
        print(report(figures, "kill-loop every folder on a bucket"))
    assert figures.kills >= min(plan.kills, 10), figures.summary()
    return figures
