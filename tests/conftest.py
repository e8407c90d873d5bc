"""Fixtures only: thin wrappers over `batchd.testing`, where every helper lives.

Test modules import helpers from `batchd.testing`, never from here or from one another
(tests/unit/test_test_layout.py keeps it so)."""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchd.emulator import Emulator
from batchd.logs import configure
from batchd.testing import Api, StartEmulator, folder_elsewhere, running_emulator

FIXTURES = Path(__file__).parent / "fixtures"

# The `s3_server` fixture: a real S3-compatible server (OpenStack Swift) on loopback, and
# `pg_database`: a real PostgreSQL server with a fresh database, each started only when a
# test asks for it. Plugin modules until they can move into `batchd.testing`.
pytest_plugins = ("tests.objstore", "tests.pg")


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder on another filesystem than `tmp_path` (removed after the test)."""
    with folder_elsewhere(tmp_path) as folder:
        if folder is None:
            pytest.skip(
                "this machine has no folder the test user can write on another filesystem"
                f" than {tmp_path} (tried /dev/shm, /run/user, /var/tmp, /tmp and every"
                " mount): crossing filesystems cannot be tried here"
            )
        yield folder


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The in-process daemon's log lines, as JSON, for `batchd.testing.events` to read."""
    buffer = io.StringIO()
    configure("info", "json", stream=buffer)
    yield buffer


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> None:
    """Log lines go to (captured) stderr, as in the daemon, never into a command's stdout."""
    configure("info", "console", stream=sys.stderr)


@pytest.fixture
async def start_emulator(tmp_path: Path) -> AsyncIterator[StartEmulator]:
    """Start emulators with settings overrides: `emu = await start_emulator(time_scale=10)`.

    Each one serves `emu.base_url` (…/compatible-mode/v1); tests move its clock with
    `emu.advance(seconds)`, switch faults with `emu.set_faults(...)` and read
    `await emu.stats()`. All are stopped when the test ends.
    """
    numbers = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Emulator:
            folder = tmp_path / f"emulator-{next(numbers)}" / "emulator"
            return await stack.enter_async_context(running_emulator(folder, **overrides))

        yield start


@pytest.fixture
async def emulator(start_emulator: StartEmulator) -> Emulator:
    """An emulator with the service's default settings."""
    return await start_emulator()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, emulator: Emulator) -> Api:
    """Calls to the default `emulator` fixture."""
    return Api(http, emulator)


@pytest.fixture
def make_api(http: aiohttp.ClientSession) -> Callable[[Emulator], Api]:
    """An `Api` for an emulator started with `start_emulator`."""
    return lambda emulator: Api(http, emulator)


@pytest.fixture
def seed_lines() -> bytes:
    """The seed's test_model.jsonl: two requests to batch-test-model."""
    return (FIXTURES / "test_model.jsonl").read_bytes()
