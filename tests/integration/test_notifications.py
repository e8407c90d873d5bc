"""Being told when a job ends (issue 14): webhooks signed per Standard Webhooks (checked
with the `standardwebhooks` package, not our own code), retried, kept across a restart,
and a command run with the job's facts."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from batchd.errors import ConfigError
from batchd.pipeline.notify import COMMAND_PASSED, load_webhook_secret
from batchd.testing import (
    StartEmulator,
    cli,
    daemon_settings,
    drop,
    idle,
    requests,
    running_daemon,
    wait_for,
    wait_published,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class Receiver:
    """A webhook endpoint on loopback that fails its first `failures` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=500, text="not now")
        return web.Response(status=204)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{bound}/hook?token=abc"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(failures=1)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_WEBHOOK_SECRET", SECRET)


def _verified(headers: dict[str, str], body: bytes) -> Any:
    return Webhook(SECRET).verify(body, headers)


async def test_a_job_end_is_posted_signed_retried_and_shown(
    start_emulator: StartEmulator,
    tmp_path: Path,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(
        tmp_path / "r",
        emulator,
        notify={"webhook_urls": [receiver.url], "retry_base_s": 0.1},
    )
    sock = str(settings.socket_path)
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "hello.jsonl", requests(3))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        await wait_for(lambda: len(receiver.received) >= 2, 20, "a failed try, then a delivery")
        _, out, _ = await cli(capsys, "show", "--socket", sock, "--json", "hello")
        notes = json.loads(out)["notifications"]
    first, second = receiver.received[:2]
    assert first[0]["webhook-id"] == second[0]["webhook-id"]  # one id across retries
    event = _verified(*second)
    assert event["type"] == "job.ended"
    data = event["data"]
    assert data["name"] == "hello" and data["status"] == "completed"
    assert data["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert data["outbox"] == str(folder)
    assert [(n["state"], n["attempts"]) for n in notes] == [("delivered", 2)]
    assert "token" not in notes[0]["target"]  # a URL's query may be a token: not shown
    assert len(receiver.received) == 2  # delivered: never again


async def test_a_delivery_pending_at_a_restart_is_made_after_it_once(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    down = Receiver()
    await down.start()
    url = down.url
    port = int(url.split(":")[2].split("/")[0])
    await down.stop()  # nobody listens there now
    settings = daemon_settings(
        tmp_path / "r", emulator, notify={"webhook_urls": [url], "retry_base_s": 0.2}
    )
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "late.jsonl", requests(1))
        await wait_published(settings.paths.folder("outbox"), 1, emulator)

        async def tried() -> bool:
            (job,) = await daemon.store.jobs()
            return any(d.attempts >= 1 for d in await daemon.store.deliveries_of(job.id))

        await wait_for(tried, 20, "a failed delivery")
    up = Receiver()
    await up.start(port)
    try:
        async with running_daemon(settings) as daemon:
            await wait_for(lambda: len(up.received) >= 1, 20, "the delivery after the restart")
            await idle(daemon)  # a second delivery would have been made by now
        assert len(up.received) == 1
        event = _verified(*up.received[0])
        assert event["data"]["name"] == "late"
    finally:
        await up.stop()


class Redirector:
    """A webhook endpoint that answers every call with a redirect to `to` (method and all
    recorded), and a target that records whatever reaches it, by any method."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls.append(
            (request.method, request.path_qs, await request.read(), dict(request.headers))
        )
        status = int(request.match_info.get("status", "204"))
        if status >= 300:
            to = request.query.get("to", "")
            return web.Response(status=status, headers={"Location": to})
        return web.Response(status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/r/{status}", self._handle)
        app.router.add_route("*", "/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_a_redirect_is_a_failed_attempt_never_followed_and_urls_hide_their_secrets(
    start_emulator: StartEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    log_lines: io.StringIO,
) -> None:
    """A 301 (which a client follows as a GET) and a 307 to another port (which hands
    over the body and its signature) are failed attempts naming where they point; the
    user, password and query of any URL appear in no log line and no answer."""
    emulator = await start_emulator(time_scale=3000)
    sender, elsewhere = Redirector(), Redirector()
    await sender.start()
    await elsewhere.start()
    secrets = ("pw-s3cret", "tok-s3cret", "loc-s3cret", "basic-us3r")
    away = f"http://127.0.0.1:{elsewhere.port}/hook?sig=loc-s3cret"
    urls = [
        f"http://basic-us3r:pw-s3cret@127.0.0.1:{sender.port}/r/{status}?token=tok-s3cret&to="
        + away.replace("?", "%3F").replace("=", "%3D")
        for status in (301, 307)
    ]
    settings = daemon_settings(
        tmp_path / "r", emulator, notify={"webhook_urls": urls, "max_attempts": 1}
    )
    sock = str(settings.socket_path)
    try:
        async with running_daemon(settings) as daemon:
            drop(settings.paths.folder("inbox"), "moved.jsonl", requests(1))
            await wait_published(settings.paths.folder("outbox"), 1, emulator)

            async def given_up() -> bool:
                (job,) = await daemon.store.jobs()
                notes = await daemon.store.deliveries_of(job.id)
                return len(notes) == 2 and all(d.state != "pending" for d in notes)

            await wait_for(given_up, 20, "both deliveries tried")
            _, out, _ = await cli(capsys, "show", "--socket", sock, "--json", "moved")
            _, text, _ = await cli(capsys, "show", "--socket", sock, "moved")
    finally:
        await sender.stop()
        await elsewhere.stop()
    # POSTed once each to the URL configured (its credentials sent as it says), and
    # nothing ever reached the other port: not a GET, not the signed body.
    assert sorted(m for m, *_ in sender.calls) == ["POST", "POST"]
    assert all(h.get("Authorization", "").startswith("Basic ") for *_, h in sender.calls)
    assert elsewhere.calls == []
    notes = sorted(json.loads(out)["notifications"], key=lambda n: n["last_error"])
    assert [(n["state"], n["attempts"]) for n in notes] == [("failed", 1), ("failed", 1)]
    shown_away = f"http://127.0.0.1:{elsewhere.port}/hook?***"
    for note, status in zip(notes, (301, 307), strict=True):
        assert note["last_error"].startswith(f"HTTP {status}: a redirect to {shown_away}")
        assert "not followed" in note["last_error"]
        assert note["target"] == f"http://***@127.0.0.1:{sender.port}/r/{status}?***"
    logged = log_lines.getvalue()
    assert "notification_given_up" in logged and shown_away in logged
    for secret in secrets:
        assert secret not in out and secret not in text and secret not in logged, secret


async def test_the_command_gets_the_jobs_facts_and_no_secret(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHD_WEBHOOK_SECRET")
    # What systemd gives the daemon: its credentials folder (the API key in it), and
    # whatever else its environment holds.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key").write_text("sk-in-credentials")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-command")
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    monkeypatch.setenv("TZ", "UTC")
    emulator = await start_emulator(time_scale=3000)
    seen = tmp_path / "seen.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    settings = daemon_settings(
        tmp_path / "r", emulator, notify={"command": [sys.executable, "-c", script, str(seen)]}
    )
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "facts.jsonl", requests(2))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        await idle(daemon)  # the command has run and exited: what it wrote is whole
    env = json.loads(seen.read_text())
    assert env["BATCHD_EVENT"] == "job.ended" and env["BATCHD_JOB_NAME"] == "facts"
    assert env["BATCHD_JOB_STATUS"] == "completed" and env["BATCHD_JOB_OUTBOX"] == str(folder)
    assert env["BATCHD_REQUESTS_TOTAL"] == "2" and env["BATCHD_REQUESTS_COMPLETED"] == "2"
    assert not {"BATCHD_API_KEY", "DASHSCOPE_API_KEY", "BATCHD_WEBHOOK_SECRET"} & set(env)
    assert json.loads(env["BATCHD_EVENT_JSON"])["data"]["name"] == "facts"
    # A clean environment: an allow-list, the event's facts, nothing else.
    assert "CREDENTIALS_DIRECTORY" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["LC_TIME"] == "C.UTF-8" and env["TZ"] == "UTC" and env["PATH"]
    passed = {k for k in env if k in COMMAND_PASSED or k.startswith("LC_")}
    facts = {k for k in env if k.startswith("BATCHD_")}
    assert set(env) == passed | facts, set(env) - passed - facts
    assert facts <= {
        "BATCHD_EVENT",
        "BATCHD_EVENT_JSON",
        "BATCHD_JOB_ID",
        "BATCHD_JOB_NAME",
        "BATCHD_JOB_STATUS",
        "BATCHD_JOB_OUTBOX",
        "BATCHD_REQUESTS_TOTAL",
        "BATCHD_REQUESTS_COMPLETED",
        "BATCHD_REQUESTS_FAILED",
    }


def test_the_secret_comes_from_the_environment_or_a_credential_and_is_checked(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    key = load_webhook_secret({"BATCHD_WEBHOOK_SECRET": SECRET})
    assert key == b"0123456789abcdef0123456789abcdef"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook_secret").write_text(SECRET + "\n")
    assert load_webhook_secret({"CREDENTIALS_DIRECTORY": str(creds)}) == key
    assert load_webhook_secret({}) is None
    for bad in ("whsec_!!!", "whsec_" + base64.b64encode(b"short").decode(), "plain words"):
        with pytest.raises(ConfigError, match="whsec_"):
            load_webhook_secret({"BATCHD_WEBHOOK_SECRET": bad})


async def test_webhooks_without_a_secret_refuse_to_start(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHD_WEBHOOK_SECRET")
    assert "BATCHD_WEBHOOK_SECRET" not in os.environ
    emulator = await start_emulator()
    settings = daemon_settings(
        tmp_path / "r", emulator, notify={"webhook_urls": ["http://127.0.0.1:9/hook"]}
    )
    with pytest.raises(ConfigError, match="BATCHD_WEBHOOK_SECRET"):
        async with running_daemon(settings):
            pass


async def test_a_command_that_prints_without_end_costs_no_memory(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the end of its output is kept (for the log): 300 MB of it is read through."""
    import resource

    monkeypatch.delenv("BATCHD_WEBHOOK_SECRET")
    emulator = await start_emulator(time_scale=3000)
    done = tmp_path / "done"
    script = (
        "import sys\n"
        "for _ in range(300): sys.stdout.buffer.write(b'x' * (1 << 20))\n"
        f"open({str(done)!r}, 'w').close()\n"
    )
    settings = daemon_settings(
        tmp_path / "r", emulator, notify={"command": [sys.executable, "-c", script]}
    )
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "loud.jsonl", requests(1))
        await wait_published(settings.paths.folder("outbox"), 1, emulator)

        async def delivered() -> bool:
            (job,) = await daemon.store.jobs()
            return [d.state for d in await daemon.store.deliveries_of(job.id)] == ["delivered"]

        await wait_for(delivered, 60, "the command's delivery")
    assert done.exists()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024
    assert grown_mb < 100, f"peak memory grew {grown_mb:.0f} MB"
