"""The SQLite store: schema, migrations and every query, named in one place.

State changes are compare-and-set (`UPDATE ... WHERE id=? AND state=?`) and report
whether they took effect, so two stages can never both move the same row. Each is one
that batchd.store.lifecycle declares (`move_job`, `move_part`); any other is refused.
Every write is committed before the call returns: a committed intent precedes each
remote call that is not idempotent, and a committed result follows it.

Writes are group-committed: the single-statement writes that arrive while a commit is
in progress are applied together in the next transaction, one fsync for all of them,
and each caller resumes only once its own write is durable. With synchronous=FULL a
commit costs a disk flush; one per write would bound the daemon at a few hundred writes
a second, below what the provider's caps allow. Multi-statement transactions hold the
same lock, so no statement of another stage can slip into (or be rolled back with) them.

A write never fails for a fault of this machine (batchd.faults): a database another
process holds (a backup, a VACUUM: SQLITE_BUSY once `busy_timeout_s` has passed), a full
or failing disk, a folder turned read-only. The transaction is rolled back whole, the
fault is shown (`Faults`, key "database") and the same writes are tried again after a
growing pause, until they go through; their callers simply wait, as for a slow disk.
Reads are not held up by another process's write lock (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec
import orjson

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.documents import JobOptions, encode_options
from batchd.faults import DATABASE, Faults, local_cause
from batchd.logs import get_logger
from batchd.models import (
    JOB_TERMINAL,
    OSS_ID_PREFIX,
    PART_HOLDS_SLOT,
    PART_SETTLED,
    ClaimStep,
    Delivery,
    ExtraBatch,
    ExtraCancel,
    InboxClaim,
    Job,
    JobState,
    Part,
    PartPlan,
    PartState,
    is_oss_id,
)
from batchd.store import lifecycle

log = get_logger(__name__)

_JOB_COLUMNS = frozenset(
    {
        "state",
        "outcome",
        "sha256",
        "requests_sha256",
        "bytes",
        "options",
        "report",
        "error",
        "outbox_path",
        "cancel_requested",
        "crash_count",
        "spool_path",
        "name",
        "completed",
        "failed",
        "usage",
        "input_mtime_ns",
        "prepares",
        "retried_as",
        "recovered_at",
        "cost",
        "held",
        "held_note",
        "held_at",
    }
)
_PART_COLUMNS = frozenset(
    {
        "state",
        "remote_file_id",
        "batch_id",
        "remote_status",
        "request_counts",
        "output_file_id",
        "error_file_id",
        "remote_errors",
        "next_poll_at",
        "created_remote_at",
        "ended_at",
        "attempts",
        "error",
        "completion_window",
        "polled_at",
        "intent_at",
        "retry_at",
        "parked_from",
        "unavailable",
        "adopt",
        "batch_created_at",
        "provider_times",
        "file_created_at",
    }
)
_T = TypeVar("_T")
_EVENT_FIELDS = (
    "state",
    "outcome",
    "remote_status",
    "request_counts",
    "batch_id",
    "cancel_requested",
    "error",
)
_JSON_COLUMNS = frozenset(
    {
        "options",
        "report",
        "request_counts",
        "remote_errors",
        "usage",
        "unavailable",
        "cost",
        "provider_times",
    }
)


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("batchd.store") / "sql"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def _encode(column: str, value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        return msgspec.json.encode(value).decode()
    if column in _JSON_COLUMNS and value is not None and not isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return int(value)
    return value


def _job_filter(
    states: Iterable[JobState] | None,
    name: str | None,
    outcomes: Iterable[str] | None = None,
    submit_id: str | None = None,
    held: bool | None = None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if held is not None:
        clauses.append("held IS NOT NULL" if held else "held IS NULL")
    if submit_id is not None:
        clauses.append("json_extract(options, '$.submit_id') = ?")
        args.append(submit_id)
    if states is not None:
        wanted = list(states)
        clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
        args.extend(wanted)
    if outcomes is not None:
        told = list(outcomes)
        clauses.append(f"outcome IN ({', '.join('?' * len(told))})")
        args.extend(told)
    if name:
        clauses.append("instr(name, ?) > 0")
        args.append(name)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args


# Job ids are lowercase hex; a reference made of these may be a prefix of one.
_ID_CHARS = frozenset("0123456789abcdef")
MIN_ID_PREFIX = 6


# The job's columns copied from its options (017_retry_priority.sql), set from the
# options' JSON as SQLite reads it, so that each holds what json_extract held before.
OPTION_COLUMNS_SET = (
    "retry_of = json_extract(?, '$.retry_of'), priority = json_extract(?, '$.priority')"
)


def _assignments(allowed: frozenset[str], fields: dict[str, Any]) -> tuple[str, list[Any]]:
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"not updatable columns: {sorted(unknown)}")
    names = sorted(fields)
    sql = ", ".join(f"{name} = ?" for name in names)
    args = [_encode(name, fields[name]) for name in names]
    if "options" in fields:
        # The columns that hold what is queried of the options, from the same JSON.
        options = _encode("options", fields["options"])
        sql = f"{sql}, {OPTION_COLUMNS_SET}"
        args.extend([options, options])
    return sql, args


# Pauses between tries of a write that met a local fault: short, since every stage
# waits on the database, and a busy timeout already waits inside each try.
WRITE_RETRY_BASE_S = 0.1
WRITE_RETRY_CAP_S = 2.0


def _job_insert(
    *,
    job_id: str,
    name: str,
    inbox_name: str,
    inbox_name_hex: str | None,
    inode: int,
    dev: int,
    spool_path: str,
    kind: str,
    options: JobOptions,
    now: float,
    state: JobState,
    recovered_at: float | None,
    error: str | None,
) -> tuple[str, tuple[Any, ...]]:
    """PURE: the statement recording a new job, and its arguments."""
    encoded = encode_options(options).decode()
    return (
        "INSERT INTO jobs (id, name, inbox_name, inbox_name_hex, inbox_inode, inbox_dev,"
        " spool_path, kind, state, options, created_at, updated_at, recovered_at, error,"
        " notified, retry_of, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0,"
        " json_extract(?, '$.retry_of'), json_extract(?, '$.priority'))",
        (
            job_id,
            name,
            inbox_name,
            inbox_name_hex,
            inode,
            dev,
            spool_path,
            kind,
            state,
            encoded,
            now,
            now,
            recovered_at,
            error,
            encoded,
            encoded,
        ),
    )


class Store:
    """One connection to the daemon's database (WAL, busy timeout, foreign keys)."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        clock: Clock = SYSTEM_CLOCK,
        faults: Faults | None = None,
    ) -> None:
        self._db = db
        self.path = path
        # Wall time for the records the store stamps itself (`updated_at`, events' `at`).
        self.clock = clock
        # Where a write that waits for the database says why (status, check, /metrics).
        self.faults = faults if faults is not None else Faults(clock=clock)
        self._closing = asyncio.Event()
        # Called after each committed change of a job's or part's state or progress
        # (the control socket's event stream listens here).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Group commit: writes waiting for the next transaction, and the task running it.
        self._lock = asyncio.Lock()
        self._waiting: list[tuple[Callable[[], Awaitable[int]], asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _emit(self, kind: str, row_id: Any, fields: dict[str, Any]) -> None:
        if not self.listeners:
            return
        watched = {k: fields[k] for k in _EVENT_FIELDS if k in fields}
        if watched:
            event = {"type": kind, "id": row_id, "at": self.clock.now(), **watched}
            for listener in self.listeners:
                listener(event)

    @classmethod
    async def open(
        cls,
        path: Path,
        clock: Clock = SYSTEM_CLOCK,
        *,
        faults: Faults | None = None,
        busy_timeout_s: float = 10.0,
    ) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute(f"PRAGMA busy_timeout={max(1, int(busy_timeout_s * 1000))}")
            await db.execute("PRAGMA foreign_keys=ON")
            store = cls(db, path, clock, faults)
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        # A write still waiting out a local fault is given up (its caller gets the error).
        self._closing.set()
        if self._flusher is not None:
            await self._flusher
        await self._db.close()

    # -- writing ------------------------------------------------------------------------

    async def _wait_out(self, cause: BaseException) -> bool:
        """A write met `cause`: True (after a pause) when it is a local fault to wait
        out, False when it is to be raised (not one, or the store is closing)."""
        local = local_cause(cause)
        if local is None or self._closing.is_set():
            return False
        self.faults.met(local, "every state change (stages wait for the database)", DATABASE)
        tries = self.faults.active[DATABASE].count
        pause = min(WRITE_RETRY_CAP_S, WRITE_RETRY_BASE_S * 2 ** min(tries - 1, 30))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), pause)
        return True

    async def _atomic(self, body: Callable[[], Awaitable[_T]]) -> _T:
        """BEGIN IMMEDIATE, `body`, COMMIT, with no other writer's statement inside; the
        whole of it tried again while it meets a local fault (`_wait_out`)."""
        async with self._lock:
            while True:
                try:
                    await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        result = await body()
                        await self._db.execute("COMMIT")
                    except BaseException:
                        # After a failed COMMIT there may be nothing left to undo.
                        with contextlib.suppress(sqlite3.Error):
                            await self._db.execute("ROLLBACK")
                        raise
                except sqlite3.Error as exc:
                    if await self._wait_out(exc):
                        continue
                    raise
                self.faults.healed(DATABASE)
                return result

    async def _write(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One statement, committed (with whatever else is waiting) before this returns;
        the number of rows it changed."""

        async def statement() -> int:
            cur = await self._db.execute(sql, args)
            return cur.rowcount

        return await self._join_commit(statement)

    async def _write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        async def statements() -> int:
            cur = await self._db.executemany(sql, rows)
            return cur.rowcount

        return await self._join_commit(statements)

    async def _join_commit(self, op: Callable[[], Awaitable[int]]) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((op, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        # Shielded: a cancelled caller must not cancel the commit the others wait on.
        return await asyncio.shield(future)

    async def _commit(
        self, batch: list[tuple[Callable[[], Awaitable[int]], asyncio.Future[int]]]
    ) -> list[int | BaseException]:
        """One transaction of the waiting writes; each one's row count or error. A local
        fault (at BEGIN, in a statement or at COMMIT) rolls all of them back, and they
        are tried again once it has been waited out."""
        while True:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                results: list[int | BaseException] = []
                for op, _ in batch:
                    # A statement that fails is undone on its own (SQLite rolls back
                    # only that statement); its caller gets the error. A local fault
                    # may have rolled back the whole transaction: all are tried again.
                    try:
                        results.append(await op())
                    except sqlite3.Error as exc:
                        if local_cause(exc) is not None:
                            raise
                        results.append(exc)
                await self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                # After a failed BEGIN or COMMIT there may be nothing to undo.
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                if await self._wait_out(exc):
                    continue
                raise
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                raise
            self.faults.healed(DATABASE)
            return results

    async def _flush(self) -> None:
        try:
            while self._waiting:
                async with self._lock:
                    batch, self._waiting = self._waiting, []
                    try:
                        results = await self._commit(batch)
                    except BaseException as exc:
                        for _, future in batch:
                            if not future.done():
                                future.set_exception(exc)
                        if not isinstance(exc, Exception):
                            raise
                        continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flusher = None

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        for number, script in _migrations():
            if number <= version:
                continue
            await self._db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
            )

    # -- jobs ---------------------------------------------------------------------------

    async def insert_job(
        self,
        *,
        job_id: str,
        name: str,
        inbox_name: str,
        inode: int,
        dev: int,
        spool_path: str,
        kind: str,
        options: JobOptions,
        now: float,
        state: JobState = JobState.CLAIMING,
        recovered_at: float | None = None,
        error: str | None = None,
        inbox_name_hex: str | None = None,
    ) -> None:
        """Record a job, in one of the states a job starts in (`lifecycle.JOB_INITIAL`)."""
        lifecycle.check_job_initial(state)
        await self._write(
            *_job_insert(
                job_id=job_id,
                name=name,
                inbox_name=inbox_name,
                inbox_name_hex=inbox_name_hex,
                inode=inode,
                dev=dev,
                spool_path=spool_path,
                kind=kind,
                options=options,
                now=now,
                state=state,
                recovered_at=recovered_at,
                error=error,
            )
        )

    async def job_ids(self) -> set[str]:
        """Every job id the database knows (start-up compares them with the spool)."""
        async with self._db.execute("SELECT id FROM jobs") as cur:
            rows = await cur.fetchall()
        return {r[0] for r in rows}

    async def claiming_jobs(self) -> list[tuple[Job, int, int]]:
        """Jobs whose claim a crash may have cut short, with the inode they expect."""
        async with self._db.execute(
            "SELECT * FROM jobs WHERE state = ?", (JobState.CLAIMING,)
        ) as cur:
            rows = await cur.fetchall()
        return [(Job.from_row(r), r["inbox_inode"], r["inbox_dev"]) for r in rows]

    # -- claims from a bucket inbox (batchd.pipeline.bucket_intake) ----------------------

    async def begin_inbox_claim(
        self,
        claim: InboxClaim,
        *,
        name: str,
        inbox_name: str,
        spool_path: str,
        kind: str,
        options: JobOptions,
    ) -> bool:
        """Record the intent to claim one version of an inbox object: the job (CLAIMING)
        and its claim (COPYING), in one transaction. False when that version has a claim
        not finished already (it is never claimed twice)."""

        async def body() -> bool:
            async with self._db.execute(
                "SELECT 1 FROM inbox_claims WHERE inbox_key = ? AND etag = ? AND step != ?",
                (claim.inbox_key, claim.etag, ClaimStep.CLAIMED),
            ) as cur:
                if await cur.fetchone() is not None:
                    return False
            await self._db.execute(
                *_job_insert(
                    job_id=claim.job_id,
                    name=name,
                    inbox_name=inbox_name,
                    inbox_name_hex=None,
                    inode=0,
                    dev=0,
                    spool_path=spool_path,
                    kind=kind,
                    options=options,
                    now=claim.created_at,
                    state=JobState.CLAIMING,
                    recovered_at=None,
                    error=None,
                )
            )
            await self._db.execute(
                "INSERT INTO inbox_claims (job_id, inbox_key, etag, size, sidecar_key,"
                " sidecar_etag, step, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    claim.job_id,
                    claim.inbox_key,
                    claim.etag,
                    claim.size,
                    claim.sidecar_key,
                    claim.sidecar_etag,
                    ClaimStep.COPYING,
                    claim.created_at,
                ),
            )
            return True

        return await self._atomic(body)

    async def open_inbox_claims(self) -> list[InboxClaim]:
        """The claims a crash or a store fault cut short, oldest first."""
        async with self._db.execute(
            "SELECT * FROM inbox_claims WHERE step != ? ORDER BY created_at, job_id",
            (ClaimStep.CLAIMED,),
        ) as cur:
            rows = await cur.fetchall()
        return [InboxClaim.from_row(r) for r in rows]

    async def inbox_claim_copied(self, job_id: str) -> None:
        """The spool holds the whole object: what is left is its deletion from the inbox."""
        await self._write(
            "UPDATE inbox_claims SET step = ? WHERE job_id = ? AND step = ?",
            (ClaimStep.COPIED, job_id, ClaimStep.COPYING),
        )

    async def finish_inbox_claim(self, job_id: str) -> bool:
        """The claim is done: its job moves CLAIMING -> CLAIMED with it, in one
        transaction. False when the job was not CLAIMING (never seen: the intake is the
        claim's one writer)."""
        lifecycle.check_job(JobState.CLAIMING, JobState.CLAIMED)
        now = self.clock.now()

        async def body() -> bool:
            cur = await self._db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                (JobState.CLAIMED, now, job_id, JobState.CLAIMING),
            )
            moved = cur.rowcount == 1
            await self._db.execute(
                "UPDATE inbox_claims SET step = ? WHERE job_id = ?", (ClaimStep.CLAIMED, job_id)
            )
            return moved

        moved = await self._atomic(body)
        if moved:
            self._emit("job", job_id, {"state": JobState.CLAIMED})
        return moved

    async def drop_inbox_claim(self, job_id: str) -> None:
        """Forget a claim that did not happen (the object changed or went before it was
        copied): its claim and its job, which never left CLAIMING."""

        async def body() -> None:
            await self._db.execute(
                "DELETE FROM inbox_claims WHERE job_id = ? AND step = ?",
                (job_id, ClaimStep.COPYING),
            )
            await self._db.execute(
                "DELETE FROM jobs WHERE id = ? AND state = ?", (job_id, JobState.CLAIMING)
            )

        await self._atomic(body)

    async def update_job(self, job_id: str, expect: JobState | None = None, **fields: Any) -> bool:
        """Set fields of a job (not its state: `move_job`); with `expect`, only if it is
        still in that state."""
        if "state" in fields:
            raise lifecycle.IllegalTransition("a job's state changes through move_job")
        return await self._update_job(job_id, expect, fields)

    async def move_job(
        self, job_id: str, source: JobState, target: JobState, **fields: Any
    ) -> bool:
        """Move a job from `source` to `target` (a transition the lifecycle declares,
        else `IllegalTransition`), setting `fields` with it; False when it was no longer
        in `source` (another stage moved it first: the caller does nothing more)."""
        lifecycle.check_job(source, target)
        if await self._update_job(job_id, source, {**fields, "state": target}):
            return True
        log.info("transition_not_taken", job_id=job_id, source=str(source), target=str(target))
        return False

    async def _update_job(
        self, job_id: str, expect: JobState | None, fields: dict[str, Any]
    ) -> bool:
        fields["updated_at"] = fields.get("updated_at", self.clock.now())
        sql, args = _assignments(_JOB_COLUMNS | {"updated_at"}, fields)
        where = "id = ?"
        args.append(job_id)
        if expect is not None:
            where += " AND state = ?"
            args.append(expect)
        changed = await self._write(f"UPDATE jobs SET {sql} WHERE {where}", args)  # noqa: S608
        if changed == 1:
            self._emit("job", job_id, fields)
        return changed == 1

    async def delete_job(self, job_id: str) -> None:
        await self._write("DELETE FROM jobs WHERE id = ?", (job_id,))

    async def get_job(self, job_id: str) -> Job | None:
        async with self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as cur:
            row = await cur.fetchone()
        return Job.from_row(row) if row else None

    async def jobs(
        self,
        states: Iterable[JobState] | None = None,
        *,
        name: str | None = None,
        outcomes: Iterable[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
        before: Job | None = None,
        submit_id: str | None = None,
        held: bool | None = None,
    ) -> list[Job]:
        """Jobs in the given states, with the given outcomes, whose name contains `name`
        (all of them unless `limit` says otherwise), oldest first or newest first. With
        `before`, only the jobs that come after that one in this order: a page that
        starts where the last one ended, whatever was claimed in between."""
        where, args = _job_filter(states, name, outcomes, submit_id, held)
        if before is not None:
            beyond = "<" if newest_first else ">"
            cursor = f"(created_at, id) {beyond} (?, ?)"
            where = f"{where} AND {cursor}" if where else f"WHERE {cursor}"
            args.extend([before.created_at, before.id])
        order = "created_at DESC, id DESC" if newest_first else "created_at, id"
        args.extend([-1 if limit is None else limit, offset])
        async with self._db.execute(
            f"SELECT * FROM jobs {where} ORDER BY {order} LIMIT ? OFFSET ?",  # noqa: S608
            args,
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def paid_twin(
        self, requests_sha256: str | None, sha256: str, exclude: str, since: float = 0.0
    ) -> Job | None:
        """The newest other job with these requests that runs or has run to results
        (running, publishing, or published completed or partial, since `since`): running
        this one too would pay for the same requests again. The same bytes (`sha256`)
        are the same requests too: so a job validated before requests were digested
        (`requests_sha256` NULL, on either side) is still found by its bytes."""
        async with self._db.execute(
            "SELECT * FROM jobs WHERE (requests_sha256 = ? OR sha256 = ?)"
            " AND id != ? AND (state IN (?, ?)"
            " OR (state = ? AND outcome IN ('completed', 'partial') AND updated_at >= ?))"
            " ORDER BY created_at DESC LIMIT 1",
            (
                requests_sha256,
                sha256,
                exclude,
                JobState.RUNNING,
                JobState.PUBLISHING,
                JobState.PUBLISHED,
                since,
            ),
        ) as cur:
            row = await cur.fetchone()
        return Job.from_row(row) if row else None

    async def find_jobs(self, ref: str, limit: int = 10) -> list[Job]:
        """The jobs an operator may mean by `ref`: the job with that id; else every job
        whose id starts with it (6 characters or more) or whose name is exactly it, newest
        first, `limit` at most."""
        exact = await self.get_job(ref)
        if exact is not None:
            return [exact]
        clauses, args = ["name = ?"], [ref]
        if len(ref) >= MIN_ID_PREFIX and set(ref) <= _ID_CHARS:
            clauses.append("id GLOB ?")  # hex only: nothing to escape; uses the key's index
            args.append(ref + "*")
        async with self._db.execute(
            f"SELECT * FROM jobs WHERE {' OR '.join(clauses)}"  # noqa: S608
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            [*args, limit],
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def job_counts(self) -> dict[str, int]:
        async with self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state") as cur:
            rows = await cur.fetchall()
        return {r[0]: r[1] for r in rows}

    async def totals(self) -> dict[str, int]:
        """Requests and tokens of every published job, summed."""
        async with self._db.execute(
            "SELECT COALESCE(SUM(completed), 0), COALESCE(SUM(failed), 0),"
            " COALESCE(SUM(json_extract(usage, '$.prompt_tokens')), 0),"
            " COALESCE(SUM(json_extract(usage, '$.completion_tokens')), 0),"
            " MIN(CASE WHEN state NOT IN (?, ?) THEN created_at END) FROM jobs",
            tuple(JOB_TERMINAL),
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        return {
            "completed": int(row[0]),
            "failed": int(row[1]),
            "prompt_tokens": int(row[2]),
            "completion_tokens": int(row[3]),
            "oldest_active_at": row[4] or 0,
        }

    async def count_jobs(
        self,
        states: Iterable[JobState] | None = None,
        name: str | None = None,
        outcomes: Iterable[str] | None = None,
        submit_id: str | None = None,
    ) -> int:
        where, args = _job_filter(states, name, outcomes, submit_id)
        async with self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", args) as cur:  # noqa: S608
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def any_jobs(self, states: Iterable[JobState], held: bool | None = None) -> bool:
        """Whether any job is in the given states (EXISTS: stops at the first row)."""
        where, args = _job_filter(states, None, held=held)
        async with self._db.execute(
            f"SELECT EXISTS (SELECT 1 FROM jobs {where})",  # noqa: S608
            args,
        ) as cur:
            row = await cur.fetchone()
        return bool(row and row[0])

    async def job_ids_in(self, states: Iterable[JobState], limit: int | None = None) -> list[str]:
        """The ids of the jobs in the given states, oldest first (as `jobs` orders them),
        without reading their rows."""
        where, args = _job_filter(states, None)
        args.append(-1 if limit is None else limit)
        async with self._db.execute(
            f"SELECT id FROM jobs {where} ORDER BY created_at, id LIMIT ?",  # noqa: S608
            args,
        ) as cur:
            rows = await cur.fetchall()
        return [r[0] for r in rows]

    async def outcome_counts(self) -> dict[str, int]:
        async with self._db.execute(
            "SELECT outcome, COUNT(*) FROM jobs WHERE outcome IS NOT NULL GROUP BY outcome"
        ) as cur:
            rows = await cur.fetchall()
        return {r[0]: r[1] for r in rows}

    async def outbox_path_owner(self, path: str) -> str | None:
        """The id of the job that owns this outbox folder, the earliest if several did
        (an index lookup); None when no job does."""
        async with self._db.execute(
            "SELECT id FROM jobs WHERE outbox_path = ? ORDER BY created_at, id LIMIT 1", (path,)
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def outbox_path_taken(self, path: str) -> bool:
        """Whether a job already owns this outbox folder (an index lookup, not a scan)."""
        async with self._db.execute(
            "SELECT 1 FROM jobs WHERE outbox_path = ? LIMIT 1", (path,)
        ) as cur:
            return await cur.fetchone() is not None

    async def crashed_jobs(self, states: Iterable[JobState], crashes: int) -> list[Job]:
        """Jobs in these states caught mid-step by at least `crashes` crashes: every one
        of them, however many (recovery parks them all)."""
        wanted = list(states)
        marks = ", ".join("?" * len(wanted))
        async with self._db.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) AND crash_count >= ?",  # noqa: S608
            [*wanted, crashes],
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def jobs_noted(self, state: JobState, prefix: str, limit: int) -> list[Job]:
        """Jobs in `state` whose note (`error`) begins with `prefix`, oldest first."""
        async with self._db.execute(
            "SELECT * FROM jobs WHERE state = ? AND substr(error, 1, ?) = ?"
            " ORDER BY created_at, id LIMIT ?",
            (state, len(prefix), prefix, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def jobs_to_cancel(self) -> list[Job]:
        """Running jobs an operator asked to cancel."""
        async with self._db.execute(
            "SELECT * FROM jobs WHERE cancel_requested = 1 AND state = ?", (JobState.RUNNING,)
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    # -- parts --------------------------------------------------------------------------

    async def plan_parts(self, job_id: str, parts: Sequence[PartPlan], now: float) -> bool:
        """Record a job's parts and move it to RUNNING in one transaction."""
        lifecycle.check_job(JobState.CLAIMED, JobState.RUNNING)

        async def body() -> bool:
            cur = await self._db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                (JobState.RUNNING, now, job_id, JobState.CLAIMED),
            )
            if cur.rowcount != 1:
                log.info("transition_not_taken", job_id=job_id, source="claimed", target="running")
                return False
            async with self._db.execute(
                "SELECT recovered_at FROM jobs WHERE id = ?", (job_id,)
            ) as found:
                row = await found.fetchone()
            # A job re-created after the database was lost may have files and batches on
            # the service already: its parts look for them before sending anything.
            adopt = row is not None and row[0] is not None
            await self._insert_parts(job_id, parts, 0, adopt=adopt)
            return True

        return await self._atomic(body)

    async def _insert_parts(
        self, job_id: str, parts: Sequence[PartPlan], round_: int, *, adopt: bool = False
    ) -> None:
        await self._db.executemany(
            "INSERT INTO parts (job_id, seq, path, first_line, requests, bytes, model,"
            " endpoint, state, upload_name, round, adopt, input_tokens, output_tokens_max,"
            " cost_max) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    job_id,
                    p.seq,
                    p.path,
                    p.first_line,
                    p.requests,
                    p.bytes,
                    p.model,
                    p.endpoint,
                    PartState.PENDING,
                    p.upload_name,
                    round_,
                    int(adopt),
                    p.input_tokens,
                    p.output_tokens_max,
                    p.cost_max,
                )
                for p in parts
            ],
        )

    async def add_parts(self, job_id: str, parts: Sequence[PartPlan], round_: int) -> None:
        """Add follow-up parts to a running job (one transaction)."""
        await self._atomic(lambda: self._insert_parts(job_id, parts, round_))

    async def update_part(
        self, part_id: int, expect: PartState | None = None, **fields: Any
    ) -> bool:
        """Set fields of a part (not its state: `move_part`); with `expect`, only if it is
        still in that state."""
        if "state" in fields:
            raise lifecycle.IllegalTransition("a part's state changes through move_part")
        return await self._update_part(part_id, expect, fields)

    async def move_part(
        self, part_id: int, source: PartState, target: PartState, **fields: Any
    ) -> bool:
        """Move a part from `source` to `target` (a transition the lifecycle declares,
        else `IllegalTransition`), setting `fields` with it; False when it was no longer
        in `source` (another stage moved it first: the caller does nothing more)."""
        lifecycle.check_part(source, target)
        if await self._update_part(part_id, source, {**fields, "state": target}):
            return True
        log.info("transition_not_taken", part_id=part_id, source=str(source), target=str(target))
        return False

    async def _update_part(
        self, part_id: int, expect: PartState | None, fields: dict[str, Any]
    ) -> bool:
        sql, args = _assignments(_PART_COLUMNS, fields)
        where = "id = ?"
        args.append(part_id)
        if expect is not None:
            where += " AND state = ?"
            args.append(expect)
        changed = await self._write(f"UPDATE parts SET {sql} WHERE {where}", args)  # noqa: S608
        if changed == 1:
            self._emit("part", part_id, fields)
        return changed == 1

    async def get_part(self, part_id: int) -> Part | None:
        async with self._db.execute("SELECT * FROM parts WHERE id = ?", (part_id,)) as cur:
            row = await cur.fetchone()
        return Part.from_row(row) if row else None

    async def parts_of(self, job_id: str) -> list[Part]:
        async with self._db.execute(
            "SELECT * FROM parts WHERE job_id = ? ORDER BY seq", (job_id,)
        ) as cur:
            rows = await cur.fetchall()
        return [Part.from_row(r) for r in rows]

    async def part_rounds(self, job_id: str) -> tuple[int, int | None]:
        """How many parts a job has, and its latest round (None when it has no parts)."""
        async with self._db.execute(
            "SELECT COUNT(*), MAX(round) FROM parts WHERE job_id = ?", (job_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return 0, None
        return int(row[0]), (int(row[1]) if row[1] is not None else None)

    async def request_totals(self, job_id: str) -> tuple[int, int]:
        """The requests completed and failed so far over a job's parts, as the service's
        `request_counts` say (summed in SQL, not by reading every part)."""
        async with self._db.execute(
            "SELECT COALESCE(SUM(json_extract(request_counts, '$.completed')), 0),"
            " COALESCE(SUM(json_extract(request_counts, '$.failed')), 0)"
            " FROM parts WHERE job_id = ?",
            (job_id,),
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def parts_in(
        self, states: Iterable[PartState], limit: int = 100_000, *, ready_at: float | None = None
    ) -> list[Part]:
        """Parts in the given states, oldest job first (fair order for submission); with
        `ready_at`, only those not waiting out a pause after a failed step."""
        wanted = list(states)
        marks = ", ".join("?" * len(wanted))
        ready = "" if ready_at is None else " AND (parts.retry_at IS NULL OR parts.retry_at <= ?)"
        args: list[Any] = [*wanted, JobState.RUNNING]
        if ready_at is not None:
            args.append(ready_at)
        async with self._db.execute(
            f"SELECT parts.* FROM parts JOIN jobs ON jobs.id = parts.job_id"  # noqa: S608
            f" WHERE parts.state IN ({marks}) AND jobs.state = ?{ready}"
            " ORDER BY COALESCE(jobs.priority, 0) DESC,"
            " jobs.created_at, parts.job_id, parts.seq LIMIT ?",
            [*args, limit],
        ) as cur:
            rows = await cur.fetchall()
        return [Part.from_row(r) for r in rows]

    async def parts_to_adopt(self, ready_at: float, limit: int = 1000) -> list[Part]:
        """Pending parts of running jobs that must look for their remote file and batch
        before anything is sent (their job was re-created after the state was lost)."""
        async with self._db.execute(
            "SELECT parts.* FROM parts JOIN jobs ON jobs.id = parts.job_id"
            " WHERE parts.adopt = 1 AND parts.state = ? AND jobs.state = ?"
            " AND (parts.retry_at IS NULL OR parts.retry_at <= ?) ORDER BY parts.id LIMIT ?",
            (PartState.PENDING, JobState.RUNNING, ready_at, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Part.from_row(r) for r in rows]

    async def count_parts_in(self, states: Iterable[PartState]) -> int:
        """How many parts of running jobs are in the given states (a count, not rows)."""
        wanted = list(states)
        marks = ", ".join("?" * len(wanted))
        async with self._db.execute(
            f"SELECT COUNT(*) FROM parts JOIN jobs ON jobs.id = parts.job_id"  # noqa: S608
            f" WHERE parts.state IN ({marks}) AND jobs.state = ?",
            [*wanted, JobState.RUNNING],
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def next_retry_at(self, states: Iterable[PartState]) -> float | None:
        """The earliest moment a part in these states, pausing after a failure, is due."""
        wanted = list(states)
        marks = ", ".join("?" * len(wanted))
        async with self._db.execute(
            f"SELECT MIN(retry_at) FROM parts WHERE state IN ({marks})"  # noqa: S608
            " AND retry_at IS NOT NULL",
            wanted,
        ) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    async def problem_parts(self, limit: int = 20) -> tuple[int, list[Part]]:
        """Parts that cannot proceed: parked ones, and those whose last steps failed.
        Their number, and the first `limit` of them (parked first, then most failures)."""
        where = (
            "FROM parts JOIN jobs ON jobs.id = parts.job_id WHERE jobs.state = ? AND"
            " (parts.state = ? OR (parts.attempts > 0 AND parts.state NOT IN (?, ?, ?)))"
        )
        args = [JobState.RUNNING, PartState.PARKED, *PART_SETTLED]
        async with self._db.execute(f"SELECT COUNT(*) {where}", args) as cur:
            row = await cur.fetchone()
        async with self._db.execute(
            f"SELECT parts.* {where} ORDER BY parts.state = ? DESC, parts.attempts DESC,"
            " parts.id LIMIT ?",
            [*args, PartState.PARKED, limit],
        ) as cur:
            rows = await cur.fetchall()
        return (int(row[0]) if row else 0), [Part.from_row(r) for r in rows]

    async def replan_job(self, job_id: str, note: str, now: float) -> bool:
        """A running job whose parts were never sent goes back to CLAIMED to be validated
        again (its input changed); False when any part has gone further than PENDING."""
        lifecycle.check_job(JobState.RUNNING, JobState.CLAIMED)

        async def body() -> bool:
            async with self._db.execute(
                "SELECT COUNT(*) FROM parts WHERE job_id = ? AND state != ?",
                (job_id, PartState.PENDING),
            ) as cur:
                row = await cur.fetchone()
            if row is None or int(row[0]) > 0:
                return False
            cur2 = await self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, updated_at = ?, prepares = prepares + 1"
                " WHERE id = ? AND state = ?",
                (JobState.CLAIMED, note, now, job_id, JobState.RUNNING),
            )
            if cur2.rowcount != 1:
                return False
            await self._db.execute("DELETE FROM parts WHERE job_id = ?", (job_id,))
            return True

        if not await self._atomic(body):
            return False
        self._emit("job", job_id, {"state": JobState.CLAIMED, "error": note})
        return True

    async def settled_jobs(self) -> list[Job]:
        """Running jobs whose every part has settled (one query, whatever the job count)."""
        marks = ", ".join("?" * len(PART_SETTLED))
        query = (
            "SELECT * FROM jobs WHERE state = ? AND EXISTS (SELECT 1 FROM parts WHERE"  # noqa: S608
            " parts.job_id = jobs.id) AND NOT EXISTS (SELECT 1 FROM parts WHERE"
            f" parts.job_id = jobs.id AND parts.state NOT IN ({marks}))"
        )
        async with self._db.execute(
            query,
            [JobState.RUNNING, *PART_SETTLED],
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def due_parts(self, now: float, limit: int = 100_000) -> list[Part]:
        async with self._db.execute(
            "SELECT * FROM parts WHERE state = ? AND next_poll_at <= ?"
            " ORDER BY next_poll_at LIMIT ?",
            (PartState.RUNNING, now, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Part.from_row(r) for r in rows]

    async def reschedule(
        self, now: float, *, retry_within_s: float, poll_within_s: float, settle_s: float
    ) -> int:
        """At start-up (times on the steady clock): no part waits longer than
        `retry_within_s` for its next try, or `poll_within_s` for its next poll; a part
        caught in UPLOADING or CREATING waits `settle_s` before it is looked for; no
        notification or extra batch waits longer than `retry_within_s`. The number of
        parts moved."""
        moved = await self._write(
            "UPDATE parts SET retry_at = ? WHERE retry_at > ?",
            (now + retry_within_s, now + retry_within_s),
        )
        moved += await self._write(
            "UPDATE parts SET next_poll_at = ? WHERE state = ? AND next_poll_at > ?",
            (now + poll_within_s, PartState.RUNNING, now + poll_within_s),
        )
        await self._write(
            "UPDATE parts SET retry_at = ? WHERE state IN (?, ?)"
            " AND (retry_at IS NULL OR retry_at < ?)",
            (now + settle_s, PartState.UPLOADING, PartState.CREATING, now + settle_s),
        )
        # A notification's next try and an extra batch's next look, likewise.
        await self._write(
            "UPDATE deliveries SET next_at = ? WHERE state = 'pending' AND next_at > ?",
            (now + retry_within_s, now + retry_within_s),
        )
        await self._write(
            "UPDATE extra_batches SET retry_at = ? WHERE retry_at > ?",
            (now + retry_within_s, now + retry_within_s),
        )
        return moved

    async def count_due_parts(self, now: float) -> int:
        """How many running parts are due for a poll at `now` (what `due_parts` would
        return, counted on the index instead of read)."""
        async with self._db.execute(
            "SELECT COUNT(*) FROM parts WHERE state = ? AND next_poll_at <= ?",
            (PartState.RUNNING, now),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def running_count(self) -> int:
        async with self._db.execute(
            "SELECT COUNT(*) FROM parts WHERE state = ?", (PartState.RUNNING,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def next_poll_at(self) -> float | None:
        async with self._db.execute(
            "SELECT MIN(next_poll_at) FROM parts WHERE state = ?", (PartState.RUNNING,)
        ) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    async def slot_holders(self) -> tuple[int, dict[str, int]]:
        """Remote batches that are (or may be) unfinished: in total and per model."""
        marks = ", ".join("?" * len(PART_HOLDS_SLOT))
        async with self._db.execute(
            f"SELECT model, COUNT(*) FROM parts WHERE state IN ({marks}) GROUP BY model",  # noqa: S608
            list(PART_HOLDS_SLOT),
        ) as cur:
            rows = await cur.fetchall()
        by_model = {r[0]: r[1] for r in rows}
        return sum(by_model.values()), by_model

    # -- notifications ----------------------------------------------------------------

    async def jobs_to_announce(self, limit: int = 100) -> list[Job]:
        """Published jobs whose end has not been announced yet, oldest first."""
        async with self._db.execute(
            "SELECT * FROM jobs INDEXED BY jobs_unannounced"
            " WHERE notified = 0 AND state = ? ORDER BY updated_at LIMIT ?",
            (JobState.PUBLISHED, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def announce(self, job_id: str | None, deliveries: Sequence[Delivery]) -> None:
        """Queue deliveries and, for a job, mark its end announced: one transaction, so a
        crash neither loses the announcement nor makes it twice (a delivery already queued
        under the same message id and target is kept as it is)."""

        async def body() -> None:
            await self._db.executemany(
                "INSERT OR IGNORE INTO deliveries (msg_id, target, event, job_id, payload,"
                " next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (d.msg_id, d.target, d.event, d.job_id, d.payload, d.next_at, d.created_at)
                    for d in deliveries
                ],
            )
            if job_id is not None:
                await self._db.execute("UPDATE jobs SET notified = 1 WHERE id = ?", (job_id,))

        await self._atomic(body)

    async def due_deliveries(self, now: float, limit: int = 50) -> list[Delivery]:
        async with self._db.execute(
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= ?"
            " ORDER BY next_at, id LIMIT ?",
            (now, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [Delivery.from_row(r) for r in rows]

    async def next_delivery_at(self) -> float | None:
        async with self._db.execute(
            "SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'"
        ) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    async def delivery_tried(
        self,
        delivery_id: int,
        *,
        state: str,
        attempts: int,
        next_at: float,
        last_error: str | None,
        delivered_at: float | None,
    ) -> None:
        await self._write(
            "UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, last_error = ?,"
            " delivered_at = ? WHERE id = ?",
            (state, attempts, next_at, last_error, delivered_at, delivery_id),
        )

    async def deliveries_of(self, job_id: str) -> list[Delivery]:
        async with self._db.execute(
            "SELECT * FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,)
        ) as cur:
            rows = await cur.fetchall()
        return [Delivery.from_row(r) for r in rows]

    # -- flags: an operator's decisions that outlive a restart ---------------------------

    async def flag(self, name: str) -> str | None:
        async with self._db.execute("SELECT value FROM flags WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_flag(self, name: str, value: str | None) -> None:
        """Set a flag, durably; None clears it."""
        if value is None:
            await self._write("DELETE FROM flags WHERE name = ?", (name,))
        else:
            await self._write(
                "INSERT INTO flags (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    async def part_counts(self) -> dict[str, int]:
        async with self._db.execute("SELECT state, COUNT(*) FROM parts GROUP BY state") as cur:
            rows = await cur.fetchall()
        return {r[0]: r[1] for r in rows}

    async def remote_files_held(self) -> int:
        """Files batchd keeps (or is about to have) on the account, against its quota:
        those of unpublished jobs, two result files to come per unfinished batch, and
        those waiting to be deleted."""
        marks = ", ".join("?" * len(PART_HOLDS_SLOT))
        # An input named as an OSS object is not one of the account's files.
        held = (
            f"(p.remote_file_id IS NOT NULL AND p.remote_file_id NOT LIKE '{OSS_ID_PREFIX}%')"
            " + (p.output_file_id IS NOT NULL)"
            f" + (p.error_file_id IS NOT NULL) + 2 * (p.state IN ({marks}))"
        )
        sql = (
            f"SELECT COALESCE(SUM({held}), 0) FROM parts p"  # noqa: S608
            " JOIN jobs j ON j.id = p.job_id WHERE j.state NOT IN (?, ?)"
        )
        args = [*PART_HOLDS_SLOT, *JOB_TERMINAL]
        async with self._db.execute(sql, args) as cur:
            row = await cur.fetchone()
        async with self._db.execute("SELECT COUNT(*) FROM remote_garbage") as cur:
            garbage = await cur.fetchone()
        return int(row[0] if row else 0) + int(garbage[0] if garbage else 0)

    # -- extra batches: made for a part beside the one it follows ----------------------

    async def add_extra_batches(self, extras: Sequence[ExtraBatch]) -> None:
        """Record extra batches as found (one already recorded stays as it is)."""
        await self._write_many(
            "INSERT OR IGNORE INTO extra_batches (batch_id, job_id, part_seq, kept_batch_id,"
            " found_by, found_at, status, request_counts, cancel)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    e.batch_id,
                    e.job_id,
                    e.part_seq,
                    e.kept_batch_id,
                    e.found_by,
                    e.found_at,
                    e.status,
                    _encode("request_counts", e.request_counts),
                    str(e.cancel),
                )
                for e in extras
            ],
        )

    async def update_extra_batch(
        self,
        batch_id: str,
        *,
        cancel: ExtraCancel,
        attempts: int,
        retry_at: float | None,
        error: str | None,
        status: str | None = None,
        request_counts: dict[str, int] | None = None,
    ) -> None:
        """Where an extra batch's cancel stands; its status and counts when given."""
        await self._write(
            "UPDATE extra_batches SET cancel = ?, attempts = ?, retry_at = ?, error = ?,"
            " status = COALESCE(?, status), request_counts = COALESCE(?, request_counts)"
            " WHERE batch_id = ?",
            (
                str(cancel),
                attempts,
                retry_at,
                error,
                status,
                _encode("request_counts", request_counts),
                batch_id,
            ),
        )

    async def extra_batches_due(self, now: float, limit: int = 50) -> list[ExtraBatch]:
        """Extra batches with a cancel to send or an end to wait for, due at `now`."""
        async with self._db.execute(
            "SELECT * FROM extra_batches WHERE cancel IN (?, ?)"
            " AND (retry_at IS NULL OR retry_at <= ?) ORDER BY found_at LIMIT ?",
            (ExtraCancel.PENDING, ExtraCancel.REQUESTED, now, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [ExtraBatch.from_row(r) for r in rows]

    async def next_extra_batch_at(self) -> float | None:
        async with self._db.execute(
            "SELECT MIN(COALESCE(retry_at, 0)) FROM extra_batches WHERE cancel IN (?, ?)",
            (ExtraCancel.PENDING, ExtraCancel.REQUESTED),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def extra_batches_of(self, job_id: str) -> list[ExtraBatch]:
        async with self._db.execute(
            "SELECT * FROM extra_batches WHERE job_id = ? ORDER BY part_seq, found_at",
            (job_id,),
        ) as cur:
            rows = await cur.fetchall()
        return [ExtraBatch.from_row(r) for r in rows]

    async def extra_batch_counts(self) -> dict[str, int]:
        """Extra batches ever found, by where their cancel stands."""
        async with self._db.execute(
            "SELECT cancel, COUNT(*) FROM extra_batches GROUP BY cancel"
        ) as cur:
            rows = await cur.fetchall()
        return {r[0]: r[1] for r in rows}

    async def known_batch_ids(self, batch_ids: Sequence[str]) -> set[str]:
        """Which of these batches batchd knows: one a part follows, or a recorded extra."""
        known: set[str] = set()
        for start in range(0, len(batch_ids), 400):  # within SQLite's bound variables
            chunk = list(batch_ids[start : start + 400])
            marks = ", ".join("?" * len(chunk))
            sql = (
                f"SELECT batch_id FROM parts WHERE batch_id IN ({marks})"  # noqa: S608
                f" UNION SELECT batch_id FROM extra_batches WHERE batch_id IN ({marks})"
            )
            async with self._db.execute(sql, [*chunk, *chunk]) as cur:
                known.update(r[0] for r in await cur.fetchall())
        return known

    async def extra_batch_ids(self, batch_ids: Sequence[str]) -> set[str]:
        """Which of these batches are recorded extras (never a part's own to follow)."""
        if not batch_ids:
            return set()
        marks = ", ".join("?" * len(batch_ids))
        async with self._db.execute(
            f"SELECT batch_id FROM extra_batches WHERE batch_id IN ({marks})",  # noqa: S608
            list(batch_ids),
        ) as cur:
            rows = await cur.fetchall()
        return {r[0] for r in rows}

    async def part_of(self, job_id: str, seq: int) -> Part | None:
        async with self._db.execute(
            "SELECT * FROM parts WHERE job_id = ? AND seq = ?", (job_id, seq)
        ) as cur:
            row = await cur.fetchone()
        return Part.from_row(row) if row else None

    # -- remote garbage -----------------------------------------------------------------

    async def add_garbage(self, file_ids: Iterable[str | None], reason: str, now: float) -> None:
        await self._write_many(
            "INSERT OR IGNORE INTO remote_garbage (file_id, reason, created_at) VALUES (?, ?, ?)",
            # An OSS object named as an input is the spool bucket's, never the account's:
            # it goes with the job's spool prefix once the job is published.
            [(f, reason, now) for f in file_ids if f and not is_oss_id(f)],
        )

    async def garbage(self, limit: int = 100) -> list[str]:
        async with self._db.execute(
            "SELECT file_id FROM remote_garbage ORDER BY created_at LIMIT ?", (limit,)
        ) as cur:
            rows = await cur.fetchall()
        return [r[0] for r in rows]

    async def drop_garbage(self, file_id: str) -> None:
        await self._write("DELETE FROM remote_garbage WHERE file_id = ?", (file_id,))

    # -- money ------------------------------------------------------------------------

    async def committed_cost(self) -> tuple[float, int]:
        """The worst case of every part created and not yet published (its job's actual
        cost replaces it when published), and how many of those have no price."""
        created = [
            PartState.CREATING,
            PartState.RUNNING,
            PartState.ENDED,
            PartState.COLLECTED,
        ]
        marks = ", ".join("?" * len(created))
        either = f"p.state IN ({marks}) OR (p.state = ? AND p.parked_from IN ({marks}))"
        sql = (
            "SELECT COALESCE(SUM(p.cost_max), 0), COALESCE(SUM(p.cost_max IS NULL), 0)"  # noqa: S608
            f" FROM parts p JOIN jobs j ON j.id = p.job_id WHERE j.state IN (?, ?) AND ({either})"
        )
        async with self._db.execute(
            sql,
            [JobState.RUNNING, JobState.PUBLISHING, *created, PartState.PARKED, *created],
        ) as cur:
            row = await cur.fetchone()
        return (float(row[0]), int(row[1])) if row else (0.0, 0)

    async def spent_since(self, since: float) -> dict[tuple[str, str], float]:
        """What published jobs cost since `since`, by (provider, currency)."""
        async with self._db.execute(
            "SELECT provider, currency, SUM(amount) FROM spend WHERE at >= ?"
            " GROUP BY provider, currency",
            (since,),
        ) as cur:
            rows = await cur.fetchall()
        return {(r[0], r[1]): float(r[2]) for r in rows}

    async def queued_tokens(self) -> dict[str, int]:
        """Input tokens of the batches that may be queued on the service (created, not
        ended), by model: OpenAI's enqueued-token limit counts these."""
        async with self._db.execute(
            "SELECT model, COALESCE(SUM(input_tokens), 0) FROM parts"
            " WHERE state IN (?, ?) GROUP BY model",
            (PartState.CREATING, PartState.RUNNING),
        ) as cur:
            rows = await cur.fetchall()
        return {r[0]: int(r[1]) for r in rows}

    async def mark_published(
        self, job_id: str, spend: tuple[str, str, float] | None, **fields: Any
    ) -> bool:
        """Mark a publishing job published and record what it cost (provider, currency,
        amount), both or neither (a savepoint): the worst case it held and its spend
        never both count, nor neither. Committed with whatever else is waiting."""
        lifecycle.check_job(JobState.PUBLISHING, JobState.PUBLISHED)
        fields = {**fields, "state": JobState.PUBLISHED}
        sql, args = _assignments(
            _JOB_COLUMNS | {"updated_at"}, {**fields, "updated_at": self.clock.now()}
        )
        now = self.clock.now()

        async def both() -> int:
            await self._db.execute("SAVEPOINT published")
            try:
                cur = await self._db.execute(
                    f"UPDATE jobs SET {sql} WHERE id = ? AND state = ?",  # noqa: S608
                    [*args, job_id, JobState.PUBLISHING],
                )
                changed = cur.rowcount
                if changed == 1 and spend is not None:
                    provider, currency, amount = spend
                    await self._db.execute(
                        "INSERT OR REPLACE INTO spend (job_id, provider, currency, amount, at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (job_id, provider, currency, amount, now),
                    )
            except BaseException:
                await self._db.execute("ROLLBACK TO published")
                await self._db.execute("RELEASE published")
                raise
            await self._db.execute("RELEASE published")
            return changed

        if await self._join_commit(both) != 1:
            log.info("transition_not_taken", job_id=job_id, source="publishing", target="published")
            return False
        self._emit("job", job_id, fields)
        return True

    async def held_jobs(self, reason: str | None = None, limit: int = 1000) -> list[Job]:
        """Jobs held (for `reason`, or any), oldest first."""
        where, args = ("held = ?", [reason]) if reason else ("held IS NOT NULL", [])
        async with self._db.execute(
            f"SELECT * FROM jobs WHERE {where} ORDER BY created_at LIMIT ?",  # noqa: S608
            [*args, limit],
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def held_for(self, reasons: Iterable[str]) -> dict[str, str]:
        """The jobs held for one of `reasons`, id -> reason, without reading their rows
        (a split job's report is large, and the submit stage asks at every pass)."""
        wanted = list(reasons)
        marks = ", ".join("?" * len(wanted))
        async with self._db.execute(
            f"SELECT id, held FROM jobs WHERE held IN ({marks})",  # noqa: S608
            wanted,
        ) as cur:
            rows = await cur.fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    async def hold(self, job_id: str, reason: str, note: str) -> bool:
        """Hold a job (claimed or running, not being cancelled) for `reason` with `note`.
        True when the hold started or its reason changed (`held_at` is then now); False
        when it was held so already (only a changed note is written) or may not be held."""
        changed = await self._write(
            "UPDATE jobs SET held = ?, held_note = ?, held_at = ? WHERE id = ?"
            " AND held IS NOT ? AND cancel_requested = 0 AND state IN (?, ?)",
            (reason, note, self.clock.now(), job_id, reason, JobState.CLAIMED, JobState.RUNNING),
        )
        if changed == 1:
            self._emit("job", job_id, {"held": reason})
            return True
        await self._write(
            "UPDATE jobs SET held_note = ? WHERE id = ? AND held = ? AND held_note IS NOT ?",
            (note, job_id, reason, note),
        )
        return False

    async def release(self, job_id: str, reason: str | None = None) -> bool:
        """End a job's hold for `reason` (any hold: None); True when it was held so."""
        where = "held IS NOT NULL" if reason is None else "held = ?"
        changed = await self._write(
            "UPDATE jobs SET held = NULL, held_note = NULL, held_at = NULL"  # noqa: S608
            f" WHERE id = ? AND {where}",
            (job_id,) if reason is None else (job_id, reason),
        )
        if changed == 1:
            self._emit("job", job_id, {"held": None})
        return changed == 1

    async def unpriced_parts(self) -> list[Part]:
        """Parts not yet created whose worst case is unknown (no price when planned):
        a price that came since prices them (`price_part`)."""
        waiting = [PartState.PENDING, PartState.UPLOADING, PartState.UPLOADED]
        marks = ", ".join("?" * len(waiting))
        async with self._db.execute(
            f"SELECT * FROM parts WHERE cost_max IS NULL AND state IN ({marks})",  # noqa: S608
            waiting,
        ) as cur:
            rows = await cur.fetchall()
        return [Part.from_row(r) for r in rows]

    async def price_part(
        self, part_id: int, input_tokens: int, output_tokens_max: int, cost_max: float
    ) -> bool:
        """Record the counts and worst case of a part priced after it was planned."""
        changed = await self._write(
            "UPDATE parts SET input_tokens = ?, output_tokens_max = ?, cost_max = ?"
            " WHERE id = ? AND cost_max IS NULL",
            (input_tokens, output_tokens_max, cost_max, part_id),
        )
        return changed == 1

    async def created_parts(self, job_id: str) -> tuple[int, int]:
        """How many of a job's parts were created on the service (or settled after), and
        how many it has."""
        created = [PartState.CREATING, PartState.RUNNING, PartState.ENDED, PartState.COLLECTED]
        marks = ", ".join("?" * len(created))
        async with self._db.execute(
            f"SELECT COALESCE(SUM(state IN ({marks})), 0), COUNT(*) FROM parts"  # noqa: S608
            " WHERE job_id = ?",
            [*created, job_id],
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def cost_by_model(self) -> dict[str, dict[str, float]]:
        """Actual cost of published jobs per currency and model (for /metrics): summed
        from each job's cost in SQL, without reading the jobs."""
        async with self._db.execute(
            "SELECT json_extract(cost, '$.currency'), m.key, SUM(m.value)"
            " FROM jobs, json_each(jobs.cost, '$.per_model') AS m"
            " WHERE jobs.cost IS NOT NULL AND m.value IS NOT NULL GROUP BY 1, 2"
        ) as cur:
            rows = await cur.fetchall()
        found: dict[str, dict[str, float]] = {}
        for currency, model, amount in rows:
            found.setdefault(str(currency or ""), {})[str(model)] = float(amount)
        return found

    # -- retries (`batchd retry`: a job's options name the job it retries) ---------------

    async def retries_of(self, job_id: str) -> list[Job]:
        """The jobs made by `batchd retry` of `job_id` (their `retry_of` option), oldest
        first (the `retry_of` column's index)."""
        async with self._db.execute(
            "SELECT * FROM jobs WHERE retry_of = ? ORDER BY created_at, id",
            (job_id,),
        ) as cur:
            rows = await cur.fetchall()
        return [Job.from_row(r) for r in rows]

    async def retried_by(self, job_ids: Sequence[str]) -> dict[str, list[str]]:
        """For each of `job_ids` that was retried, the ids of its retry jobs, oldest
        first: one scan for a whole page of jobs."""
        found: dict[str, list[str]] = {}
        wanted = list(dict.fromkeys(job_ids))
        for start in range(0, len(wanted), 500):  # within SQLite's variable limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            async with self._db.execute(
                f"SELECT id, retry_of FROM jobs WHERE retry_of IN ({marks})"  # noqa: S608
                " ORDER BY created_at, id",
                chunk,
            ) as cur:
                rows = await cur.fetchall()
            for child, parent in rows:
                found.setdefault(str(parent), []).append(str(child))
        return found
