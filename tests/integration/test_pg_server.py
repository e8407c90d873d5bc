"""What batchd may rely on from PostgreSQL and its driver, pinned against a real server.

The server is the `pg_database` fixture's (the system's PostgreSQL, a fresh database per
test), the driver psycopg 3 in its asyncio form, connected as batchd will connect: autocommit
off, no server-side prepared statements (`prepare_threshold=None`, which passes a
transaction-mode pooler such as pgbouncer), the password from the libpq environment.

The lease here is the one issue 25 plans: one row per account, an epoch that grows at each
takeover (the fencing token), an end on the database's clock. Each test pins a property the
fail-over depends on: one winner when two standbys take over at once, a write under an old
epoch that cannot commit, the errors a serialization conflict, a cut connection and a
statement timeout raise."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

LEASE_TABLE = """
CREATE TABLE lease (
    name       TEXT PRIMARY KEY,
    holder     TEXT,
    epoch      BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
INSERT INTO lease (name) VALUES ('active');
CREATE TABLE parts (id BIGINT PRIMARY KEY, state TEXT NOT NULL);
INSERT INTO parts VALUES (1, 'uploaded');
"""
# A standby takes the lease once it has lapsed (or was never held): the epoch grows.
TAKE = (
    "UPDATE lease SET holder = %s, epoch = epoch + 1,"
    " expires_at = clock_timestamp() + make_interval(secs => %s)"
    " WHERE name = 'active' AND expires_at < clock_timestamp() RETURNING epoch"
)
# The holder renews under its epoch, while the lease still runs.
RENEW = (
    "UPDATE lease SET expires_at = clock_timestamp() + make_interval(secs => %s)"
    " WHERE name = 'active' AND epoch = %s AND expires_at > clock_timestamp()"
    " RETURNING expires_at"
)
# The first statement of every write transaction: no row = the lease is lost, roll back.
# FOR SHARE holds off a takeover (an UPDATE of the row) until this transaction ends.
FENCE = (
    "SELECT 1 FROM lease WHERE name = 'active' AND epoch = %s"
    " AND expires_at > clock_timestamp() FOR SHARE"
)
LEASE_S = 15


async def connect(dsn: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """As batchd will connect: no prepared statements (pooler-safe), transactions by hand."""
    return await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None, **kwargs)


@pytest.fixture
async def db(pg_database: Any) -> AsyncIterator[Any]:
    async with await connect(pg_database.dsn, autocommit=True) as conn:
        await conn.execute(LEASE_TABLE)
    yield pg_database


async def wait_blocked(admin: psycopg.AsyncConnection[Any], pid: int) -> None:
    """Until backend `pid` waits for a lock (pg_stat_activity says so: no sleep-and-hope)."""
    for _ in range(1000):
        cur = await admin.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        )
        row = await cur.fetchone()
        if row is not None and row[0] == "Lock":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")


async def test_two_standbys_taking_over_at_once_make_one_holder_and_one_epoch(db: Any) -> None:
    # READ COMMITTED, no retry loop: the second UPDATE waits for the first one's row lock,
    # then evaluates its WHERE again on the new row (lease no longer lapsed) and changes
    # nothing. So a lapsed lease is taken by exactly one standby, at exactly epoch + 1.
    async with (
        await connect(db.dsn) as first,
        await connect(db.dsn) as second,
        await connect(db.dsn, autocommit=True) as admin,
    ):
        taken = await (await first.execute(TAKE, ("daemon-a", LEASE_S))).fetchall()
        assert taken == [(1,)]
        racing = asyncio.create_task(second.execute(TAKE, ("daemon-b", LEASE_S)))
        await wait_blocked(admin, second.info.backend_pid)
        await first.commit()
        cur = await racing
        assert cur.rowcount == 0
        assert await cur.fetchall() == []
        await second.commit()

        row = await (await admin.execute("SELECT holder, epoch FROM lease")).fetchone()
        assert row == ("daemon-a", 1)
        renewed = await (await first.execute(RENEW, (LEASE_S, 1))).fetchall()
        assert len(renewed) == 1
        await first.commit()


async def wait_lapsed(admin: psycopg.AsyncConnection[Any]) -> None:
    """Until the lease has lapsed on the database's clock (a read: no lock waited for)."""
    for _ in range(1000):
        cur = await admin.execute("SELECT expires_at < clock_timestamp() FROM lease")
        if await cur.fetchone() == (True,):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the lease never lapsed")


async def test_a_write_under_an_old_epoch_never_commits_after_a_takeover(db: Any) -> None:
    async with (
        await connect(db.dsn) as old,
        await connect(db.dsn) as new,
        await connect(db.dsn, autocommit=True) as admin,
    ):
        assert await (await old.execute(TAKE, ("daemon-a", 0.3))).fetchall() == [(1,)]
        await old.commit()
        # A write transaction under epoch 1 has passed its fence, and the lease lapses
        # before it commits: the takeover waits for it (FOR SHARE against UPDATE)...
        assert await (await old.execute(FENCE, (1,))).fetchall() == [(1,)]
        await old.execute("UPDATE parts SET state = 'creating' WHERE id = 1")
        await wait_lapsed(admin)
        takeover = asyncio.create_task(new.execute(TAKE, ("daemon-b", LEASE_S)))
        await wait_blocked(admin, new.info.backend_pid)
        await old.commit()  # ...so what began under the lease is ordered before epoch 2
        assert await (await takeover).fetchall() == [(2,)]
        await new.commit()

        # Once epoch 2 is granted, epoch 1's fence and renewal find no row: its next
        # write transaction rolls back with nothing written, and that daemon stands down.
        assert await (await old.execute(FENCE, (1,))).fetchall() == []
        await old.rollback()
        assert await (await old.execute(RENEW, (LEASE_S, 1))).fetchall() == []
        await old.rollback()
        state = await (await admin.execute("SELECT state FROM parts WHERE id = 1")).fetchone()
        assert state == ("creating",)

        # A lapsed lease fails its holder's fence at once, even while a takeover is under
        # way and holds the row: the fence reads the lapsed row and waits for nobody.
        await admin.execute("UPDATE lease SET expires_at = clock_timestamp() - interval '1 s'")
        async with await connect(db.dsn) as third:
            assert await (await third.execute(TAKE, ("daemon-c", LEASE_S))).fetchall() == [(3,)]
            assert await (await new.execute(FENCE, (2,))).fetchall() == []
            await new.rollback()
            await third.commit()
        lease = await (await admin.execute("SELECT holder, epoch FROM lease")).fetchone()
        assert lease == ("daemon-c", 3)


async def test_serializable_conflict_raises_serialization_failure_and_rolls_back(
    db: Any,
) -> None:
    # Two SERIALIZABLE transactions that each read what the other writes: one of them
    # gets SQLSTATE 40001 (psycopg.errors.SerializationFailure), at a statement or at
    # COMMIT. batchd's store would run the whole transaction again for it (as it does
    # for SQLITE_BUSY), never half of it.
    async with await connect(db.dsn) as a, await connect(db.dsn) as b:
        for conn in (a, b):
            await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
        await a.execute("SELECT count(*) FROM parts WHERE state = 'creating'")
        await b.execute("SELECT count(*) FROM parts WHERE state = 'creating'")
        await a.execute("INSERT INTO parts VALUES (2, 'creating')")
        await b.execute("INSERT INTO parts VALUES (3, 'creating')")
        await a.commit()
        with pytest.raises(errors.SerializationFailure) as caught:
            await b.commit()
        assert caught.value.sqlstate == "40001"
        assert isinstance(caught.value, psycopg.OperationalError)
        # The connection is fine: the transaction is over, the next one runs.
        cur = await b.execute("SELECT count(*) FROM parts")
        assert await cur.fetchone() == (2,)
        await b.rollback()


async def test_a_statement_past_statement_timeout_is_cancelled_and_the_connection_lives(
    db: Any,
) -> None:
    async with await connect(db.dsn, options="-c statement_timeout=200") as conn:
        with pytest.raises(errors.QueryCanceled) as caught:
            await conn.execute("SELECT pg_sleep(5)")
        assert caught.value.sqlstate == "57014"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        await conn.rollback()
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        assert not conn.broken


class CuttingProxy:
    """A TCP pass-through to the server whose connections `cut()` aborts (a reset, no
    message from the server): what a dead network path or a failed-over host looks like."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transports: list[asyncio.Transport] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for w in (writer, up_writer):
            transport = w.transport
            assert isinstance(transport, asyncio.Transport)
            self.transports.append(transport)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self) -> None:
        for transport in self.transports:
            transport.abort()
        self.transports.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_lost_connection_raises_operational_error_and_leaves_it_broken(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over TCP with the password from the libpq environment (never in the DSN or the
    # config file), through a proxy that can cut the connection.
    for name, value in db.env().items():
        monkeypatch.setenv(name, value)
    proxy = CuttingProxy(db.port)
    port = await proxy.start()
    try:
        async with await connect(f"host=127.0.0.1 port={port}") as conn:
            assert await (await conn.execute("SELECT current_user")).fetchone() == (db.user,)
            await conn.commit()
            proxy.cut()
            with pytest.raises(psycopg.OperationalError) as caught:
                await conn.execute("SELECT 1")
            assert caught.value.sqlstate is None  # no answer from the server: no SQLSTATE
            assert conn.broken
        # The server ends a session itself (pg_terminate_backend, a restart, a fail-over):
        # 57P01 admin_shutdown, also an OperationalError, also a broken connection.
        async with (
            await connect(db.dsn) as conn,
            await connect(db.dsn, autocommit=True) as admin,
        ):
            await conn.execute("SELECT 1")
            await admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            with pytest.raises(psycopg.OperationalError) as caught:
                await conn.execute("SELECT 1")
            assert isinstance(caught.value, errors.AdminShutdown)
            assert conn.broken
    finally:
        await proxy.close()


async def test_no_server_side_prepared_statement_is_left_for_a_pooler_to_lose(db: Any) -> None:
    # A transaction-mode pooler (pgbouncer) hands each transaction any server connection:
    # a statement prepared on one is missing on the next. With prepare_threshold=None
    # psycopg never prepares by name; with its default it does from the 5th execution.
    async with await connect(db.dsn, autocommit=True) as conn:
        for _ in range(10):
            await conn.execute("SELECT state FROM parts WHERE id = %s", (1,))
        cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
        assert await cur.fetchone() == (0,)
    async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
        for _ in range(10):
            await conn.execute("SELECT state FROM parts WHERE id = %s", (1,))
        cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
        assert await cur.fetchone() == (1,)
