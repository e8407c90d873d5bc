"""Shared fixtures: the shipped emulator, in-process on a free loopback port."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batchd.emulator import Emulator, EmulatorSettings
from batchd.logs import configure

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The in-process daemon's log lines, as JSON, for `events` to read."""
    buffer = io.StringIO()
    configure("info", "json", stream=buffer)
    yield buffer


def events(buffer: io.StringIO, name: str) -> list[dict[str, Any]]:
    """The log records of one event (`job_published`, ...) in a `log_lines` buffer."""
    return [
        record
        for line in buffer.getvalue().splitlines()
        if line.startswith("{") and (record := orjson.loads(line)).get("event") == name
    ]


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> None:
    """Log lines go to (captured) stderr, as in the daemon, never into a command's stdout."""
    import sys

    configure("info", "console", stream=sys.stderr)


EMULATOR_KEY = "sk-emulator-test-key"

StartEmulator = Callable[..., Awaitable[Emulator]]


def emulator_settings(tmp_path: Path, **overrides: Any) -> EmulatorSettings:
    """Settings for a test emulator: loopback, a free port, its own data folder."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "api_key": EMULATOR_KEY,
        "data_dir": tmp_path / "emulator",
    }
    values.update(overrides)
    return EmulatorSettings(**values)


@pytest.fixture
async def start_emulator(tmp_path: Path) -> AsyncIterator[StartEmulator]:
    """Start emulators with settings overrides: `emu = await start_emulator(time_scale=10)`.

    Each one serves `emu.base_url` (…/compatible-mode/v1); tests move its clock with
    `emu.advance(seconds)`, switch faults with `emu.set_faults(...)` and read
    `await emu.stats()`. All are stopped when the test ends.
    """
    running: list[Emulator] = []

    async def start(**overrides: Any) -> Emulator:
        folder = tmp_path / f"emulator-{len(running)}"
        emulator = Emulator(emulator_settings(folder, **overrides))
        await emulator.start()
        running.append(emulator)
        return emulator

    yield start
    for emulator in running:
        await emulator.stop()


@pytest.fixture
async def emulator(start_emulator: StartEmulator) -> Emulator:
    """An emulator with the service's default settings."""
    return await start_emulator()


class Api:
    """A thin HTTP client for the emulator's routes, returning (status, json, headers)."""

    def __init__(self, session: aiohttp.ClientSession, emulator: Emulator) -> None:
        self.session = session
        self.emulator = emulator

    def _url(self, path: str) -> str:
        if path.startswith("/_emulator") or path.startswith("/v1") or path.startswith("/comp"):
            return self.emulator.root_url + path
        return self.emulator.base_url + path

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        key: str | None = EMULATOR_KEY,
        data: Any = None,
        raw: bool = False,
    ) -> tuple[int, Any, dict[str, str]]:
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
        assert status == 200, body
        file_id: str = body["id"]
        return file_id

    async def create(self, file_id: str, endpoint: str, **extra: Any) -> tuple[int, Any]:
        payload = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        payload.update(extra)
        status, body, _ = await self.call("POST", "/batches", json=payload)
        return status, body

    async def create_ok(self, file_id: str, endpoint: str, **extra: Any) -> dict[str, Any]:
        status, body = await self.create(file_id, endpoint, **extra)
        assert status == 200, body
        batch: dict[str, Any] = body
        return batch

    async def batch(self, batch_id: str) -> dict[str, Any]:
        status, body, _ = await self.call("GET", f"/batches/{batch_id}")
        assert status == 200, body
        batch: dict[str, Any] = body
        return batch

    async def content(self, file_id: str) -> bytes:
        status, body, _ = await self.call("GET", f"/files/{file_id}/content", raw=True)
        assert status == 200, body
        content: bytes = body
        return content

    async def lines(self, file_id: str) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in (await self.content(file_id)).splitlines()]

    async def stats(self) -> dict[str, Any]:
        status, body, _ = await self.call("GET", "/_emulator/stats", key=None)
        assert status == 200
        stats: dict[str, Any] = body
        return stats


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, emulator: Emulator) -> Api:
    """Calls to the default `emulator` fixture."""
    return Api(http, emulator)


@pytest.fixture
def seed_lines() -> bytes:
    """The seed's test_model.jsonl: two requests to batch-test-model."""
    return (FIXTURES / "test_model.jsonl").read_bytes()


@pytest.fixture
def make_api(http: aiohttp.ClientSession) -> Callable[[Emulator], Api]:
    """An `Api` for an emulator started with `start_emulator`."""
    return lambda emulator: Api(http, emulator)


ENDPOINT_CHAT = "/v1/chat/completions"
ENDPOINT_EMBEDDINGS = "/v1/embeddings"
ENDPOINT_TEST = "/v1/chat/ds-test"


def jsonl(
    count: int,
    model: str = "qwen-plus",
    url: str = ENDPOINT_CHAT,
    *,
    start: int = 1,
    **body: Any,
) -> bytes:
    """`count` well-formed request lines for `model` at `url`, custom_ids from `start`."""
    lines = []
    for n in range(start, start + count):
        if url == ENDPOINT_EMBEDDINGS:
            payload: dict[str, Any] = {"model": model, "input": f"text number {n}"}
        else:
            messages = [{"role": "user", "content": f"question number {n}"}]
            payload = {"model": model, "messages": messages}
        payload.update(body)
        line = {"custom_id": str(n), "method": "POST", "url": url, "body": payload}
        lines.append(orjson.dumps(line))
    return b"\n".join(lines) + b"\n"


@pytest.fixture
def requests_file() -> Callable[..., bytes]:
    """Build a JSONL input: `requests_file(3, model="qwen-plus", url=..., **body_fields)`."""
    return jsonl
