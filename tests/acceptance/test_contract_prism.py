"""Both sides of the wire against the public API description (issue 7, Contract).

Prism (`@stoplight/prism-cli` 5.14.2) runs as a validating proxy in front of the emulator
with ../shared/contracts/openai-batch-files.json: every request batchd (or the openai
SDK) sends is checked against the contract, and so is every answer the emulator gives.
A violation comes back as a 500 listing the fields at fault, or as an `sl-violations`
header and a `Violation` line in Prism's log; any of these fails the test.

Prism is installed once into `<repo>/.cache/prism` (npm, pinned version). The test is
skipped when ../shared/contracts is absent (a user's own clone) or node/npm are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from openai import OpenAI

from batchd.emulator import Emulator
from batchd.testing import (
    StartEmulator,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO.parent / "shared" / "contracts" / "openai-batch-files.json"
PRISM_VERSION = "5.14.2"
PRISM_DIR = REPO / ".cache" / "prism"
PRISM_BIN = PRISM_DIR / "node_modules" / ".bin" / "prism"
KEY = "sk-emulator-test-key"

pytestmark = pytest.mark.timeout(300)


def _installed_version() -> str | None:
    if not PRISM_BIN.exists():
        return None
    try:
        out = subprocess.run(
            [str(PRISM_BIN), "--version"], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@pytest.fixture(scope="session")
def prism_bin() -> Path:
    """Prism, installed once into .cache/prism (pinned); skip where it cannot run."""
    if not CONTRACT.exists():
        pytest.skip(f"no contract at {CONTRACT} (../shared is absent: a user's own clone)")
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node and npm are needed to run Prism; they are not on PATH")
    if _installed_version() != PRISM_VERSION:
        PRISM_DIR.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(PRISM_DIR),
                "--no-audit",
                "--no-fund",
                f"@stoplight/prism-cli@{PRISM_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, f"npm install of Prism failed:\n{done.stderr[-3000:]}"
        assert _installed_version() == PRISM_VERSION
    return PRISM_BIN


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Prism:
    url: str  # point clients at `{url}/v1`
    log: Path

    def violations(self) -> list[str]:
        """Every line of Prism's log that reports a contract violation or an error."""
        text = self.log.read_text(errors="replace")
        return [
            line
            for line in text.splitlines()
            if "Violation" in line or "✖" in line or "error  " in line.lower()
        ]

    def requests_seen(self) -> list[str]:
        """`METHOD path` of every request Prism proxied, from its log."""
        seen = []
        for line in self.log.read_text(errors="replace").splitlines():
            if "[HTTP SERVER]" in line and "request received" in line.lower():
                seen.append(line)
        return seen


@contextlib.asynccontextmanager
async def prism_proxy(prism_bin: Path, upstream: str, log: Path) -> AsyncIterator[Prism]:
    port = _free_port()
    out = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(prism_bin),
        "proxy",
        "--errors",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        str(CONTRACT),
        upstream,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    try:
        deadline = time.monotonic() + 120
        while b"Prism is listening" not in log.read_bytes():
            assert proc.returncode is None, f"Prism exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"Prism did not start:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.2)
        yield Prism(f"http://127.0.0.1:{port}", log)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class ViolationCheck(httpx2.Client):
    """An httpx2 client for the SDK that fails on any answer Prism marks as a violation."""

    def __init__(self) -> None:
        super().__init__(event_hooks={"response": [self._check]})
        self.seen: list[str] = []

    def _check(self, response: httpx2.Response) -> None:
        request = response.request
        self.seen.append(f"{request.method} {request.url.path} {response.status_code}")
        flagged = response.headers.get("sl-violations")
        if flagged or response.status_code >= 500:
            response.read()
            raise AssertionError(
                f"contract violation on {request.method} {request.url}: "
                f"{response.status_code} {flagged or ''} {response.text[:2000]}"
            )


def _advance(emulator: Emulator, seconds: float) -> None:
    httpx2.post(f"{emulator.root_url}/_emulator/clock/advance", json={"seconds": seconds})


def sdk_quick_start(base_url: str, emulator: Emulator, fixture: Path) -> list[str]:
    """The seed's quick-start plus cancel, list, retrieve and delete, via the openai SDK."""
    checker = ViolationCheck()
    with OpenAI(api_key=KEY, base_url=base_url, max_retries=0, http_client=checker) as client:
        uploaded = client.files.create(file=fixture, purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/ds-test",  # type: ignore[arg-type]
            completion_window="24h",
            metadata={"ds_name": "quick start", "ds_description": "seed flow"},
        )
        status = batch.status
        for _ in range(50):
            if status in ("completed", "failed", "expired", "cancelled"):
                break
            _advance(emulator, 30)
            status = client.batches.retrieve(batch_id=batch.id).status
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.output_file_id
        content = client.files.content(done.output_file_id)
        assert len(content.text.splitlines()) == 2
        assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
        listed = client.batches.list(
            limit=2,
            extra_query={"ds_name": "quick", "input_file_ids": uploaded.id, "status": "completed"},
        )
        assert [b.id for b in listed.data] == [batch.id]
        second = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/ds-test",  # type: ignore[arg-type]
            completion_window="1d",
        )
        _advance(emulator, 30)
        assert client.batches.cancel(second.id).status in ("cancelling", "cancelled")
        _advance(emulator, 60)
        assert client.batches.retrieve(second.id).status == "cancelled"
        # Pages of one follow has_more/after past the daemon's batches to the first.
        every = [b.id for b in client.batches.list(limit=1)]
        assert every[:2] == [second.id, batch.id] and len(every) >= 3
        files = [f.id for f in client.files.list()]
        for file_id in files:
            # The emulator's files cap is lifted for this test (see below): this checks
            # shapes, and a 429 is not in the published contract.
            assert client.files.delete(file_id).deleted
        assert list(client.files.list()) == []
    return checker.seen


async def test_daemon_and_emulator_traffic_meets_the_contract(
    prism_bin: Path, start_emulator: StartEmulator, tmp_path: Path
) -> None:
    # The service's files cap (10 calls a second) is lifted on the emulator's side only:
    # the daemon keeps to its own, and the SDK's deletes below need not be paced.
    emulator = await start_emulator(
        time_scale=1000,
        request_failure_rate=0.3,
        limits={"max_requests_per_file": 4, "file_calls_per_second": 1000},
    )
    async with prism_proxy(prism_bin, emulator.root_url, tmp_path / "prism.log") as prism:
        root = tmp_path / "root"
        settings = daemon_settings(
            root,
            emulator,
            base_url=f"{prism.url}/v1",
            limits={"max_requests_per_file": 4},
            poll={"list_threshold": 1},
        )
        async with running_daemon(settings):
            drop(root / "inbox", "contract.jsonl", requests(10))
            (folder,) = await wait_published(root / "outbox", 1, emulator, timeout_s=120)

            async def cleaned() -> bool:
                return bool((await emulator.stats())["files_stored"]["count"] == 0)

            await wait_for(cleaned, 20, "the remote files deleted", emulator=emulator, advance_s=60)
        s = summary(folder)
        assert s["request_counts"]["total"] == 10
        assert len(s["parts"]) == 3
        assert s["request_counts"]["failed"] > 0  # error files were downloaded too
        assert (
            len(read_jsonl(folder / "result.jsonl")) + len(read_jsonl(folder / "error.jsonl")) == 10
        )
        stats = await emulator.stats()
        assert stats["files_stored"]["count"] == 0  # deletes went through the proxy too
        calls = stats["calls"]
        for name in ("upload", "create", "list", "download", "files"):
            assert _count(calls[name]) > 0, (name, calls)

        seen = await asyncio.to_thread(
            sdk_quick_start,
            f"{prism.url}/v1",
            emulator,
            REPO / "tests" / "fixtures" / "test_model.jsonl",
        )
        assert len(seen) >= 12
        assert prism.violations() == [], "\n".join(prism.violations())


def _count(snapshot: dict[str, Any]) -> int:
    return int(snapshot["served"])
