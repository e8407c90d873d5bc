"""The control socket and the operator's CLI, against a real daemon (issue 5, TESTING E.23-24)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from batchd.cli import main
from batchd.daemon import Daemon
from batchd.errors import BatchdError
from batchd.operator.control import SocketInUseError
from batchd.testing import (
    API_KEY,
    RawControl,
    StartEmulator,
    cli,
    daemon_settings,
    drop,
    idle,
    published_jobs,
    requests,
    running_daemon,
    wait_for,
    wait_published,
)


async def test_socket_is_private_from_birth_and_removed_on_exit(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    settings = daemon_settings(tmp_path / "r", emulator)
    path = settings.socket_path
    assert path == tmp_path / "r" / "control.sock"  # ROOT/control.sock unless configured
    async with running_daemon(settings):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert mode & 0o007 == 0 and mode <= 0o660
    assert not path.exists()
    # A runtime folder batchd makes for itself is closed to others as well.
    runtime = tmp_path / "run" / "batchd"
    settings = daemon_settings(tmp_path / "r", emulator, paths={"runtime": runtime})
    async with running_daemon(settings):
        assert settings.socket_path == runtime / "control.sock"
        assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o750
    assert not (runtime / "control.sock").exists()


async def test_status_jobs_show_and_metrics_answer_over_the_socket(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "a.jsonl", requests(3))
        await wait_published(settings.paths.folder("outbox"), 1, emulator)
        await published_jobs(daemon, 1)  # the folder appears a moment before the row says so
        code, out, _ = await cli(capsys, "status", "--socket", sock, "--json")
        assert code == 0
        status = json.loads(out)
        assert status["healthy"] and status["provider"] == "custom"
        assert status["jobs_by_state"] == {"published": 1}
        assert status["caps"]["running_cap"] == 1000
        # Which tokenizer counts each family (issue 21), and the prices' date.
        assert status["tokenizers"]["qwen, qwq, qvq, text-embedding-v*"] == (
            "exact, Qwen vocabulary"
        )
        assert status["tokenizers"]["other models (deepseek, kimi, glm, ...)"].startswith(
            "approximate: an upper bound"
        )
        assert status["prices_as_of"] == "2026-11-30" and status["prices_stale"] is None
        code, out, _ = await cli(capsys, "status", "--socket", sock)
        assert code == 0 and "healthy" in out
        assert "tokens of qwen, qwq, qvq, text-embedding-v*: exact, Qwen vocabulary" in out
        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--json", "--state", "published")
        listing = json.loads(out)
        assert isinstance(listing, list) and len(listing) == 1
        job = listing[0]
        assert job["name"] == "a" and job["completed"] == 3
        # `--root DIR` finds the socket as `batchd run --root DIR` places it.
        root = str(tmp_path / "r")
        code, out, _ = await cli(capsys, "jobs", "--root", root, "--json")
        assert code == 0 and [j["id"] for j in json.loads(out)] == [job["id"]]
        code, out, _ = await cli(capsys, "show", "--socket", sock, "--json", job["id"])
        detail = json.loads(out)
        part = detail["parts"][0]
        assert part["batch_id"].startswith("batch_")
        assert part["request_counts"]["completed"] == 3
        # Times are Unix seconds; batchd's own in order, the service's kept apart.
        assert detail["created_at"] <= part["batch_created_at"] <= part["ended_at"]
        assert part["ended_at"] <= detail["updated_at"]
        assert part["created_remote_at"] == part["provider_times"]["created_at"] is not None
        code, out, _ = await cli(capsys, "show", "--socket", sock, job["id"])
        assert code == 0 and job["id"] in out
        for at in (part["batch_created_at"], part["ended_at"]):
            assert datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S") in out
        code, _, err = await cli(capsys, "show", "--socket", sock, "nope")
        assert code == 1 and "no job nope" in err
        code, _, err = await cli(capsys, "jobs", "--socket", sock, "--state", "bogus")
        assert code == 1 and "unknown state" in err
        status_code, text = await RawControl(settings.socket_path).call("GET", "/metrics")
        assert status_code == 200
        assert 'batchd_jobs{state="published"} 1.0' in text
        assert 'batchd_requests_total{outcome="completed"} 3.0' in text
        assert "batchd_running_cap 1000.0" in text


async def test_pause_resume_cancel_retry_and_drain(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.4)
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        code, out, _ = await cli(capsys, "pause", "--socket", sock)
        assert code == 0 and "paused" in out
        drop(inbox, "held.jsonl", requests(10))
        await idle(daemon)
        assert (inbox / "held.jsonl").exists()  # not claimed while paused
        assert await daemon.store.count_jobs() == 0
        await cli(capsys, "resume", "--socket", sock)
        await wait_published(outbox, 1, emulator)
        (job,) = await published_jobs(daemon, 1)
        assert job.outcome == "partial"
        code, out, _ = await cli(capsys, "retry", "--socket", sock, job.id)
        assert code == 0 and "held-retry.jsonl" in out
        # Requests refused for their content are left out: they would fail, and cost, again.
        errors = (outbox / "held" / "error.jsonl").read_text()
        refused = sum("DataInspectionFailed" in line for line in errors.splitlines())
        assert refused == 0 or f"{refused} left out (DataInspectionFailed {refused})" in out
        folders = await wait_published(outbox, 2, emulator)
        retried = json.loads((folders[1] / "summary.json").read_bytes())
        assert retried["request_counts"]["total"] == job.failed - refused
        assert retried["retry_of"] == job.id  # linked to what it retries
        code, _, err = await cli(capsys, "cancel", "--socket", sock, job.id)
        assert code == 1 and "already published" in err
        code, out, _ = await cli(capsys, "drain", "--socket", sock)
        assert code == 0
        await asyncio.wait_for(daemon.stopping.wait(), 10)


async def test_event_stream_reports_state_changes_and_progress(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    events: list[dict[str, Any]] = []
    async with running_daemon(settings):
        client = RawControl(settings.socket_path)

        async def listen() -> None:
            async for event in client.stream("/v1/events"):
                events.append(event)
                if event.get("type") == "job" and event.get("state") == "published":
                    return

        listener = asyncio.create_task(listen())
        await wait_for(lambda: events, 10.0, "the stream's hello")  # subscribed
        drop(settings.paths.folder("inbox"), "e.jsonl", requests(4))
        await wait_for(listener.done, 30.0, "the job published", emulator=emulator, advance_s=60)
        await listener
    states = [e.get("state") for e in events if e.get("type") == "job"]
    assert states[-1] == "published"
    progress = [e for e in events if e.get("type") == "part" and e.get("request_counts")]
    assert progress and progress[-1]["request_counts"]["completed"] == 4
    assert all(e.get("job_id") for e in events if e["type"] != "hello")


async def test_a_second_daemon_on_the_same_socket_or_state_refuses_to_start(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    settings = daemon_settings(tmp_path / "r", emulator)
    async with running_daemon(settings):
        with pytest.raises(BatchdError, match="already running"):
            await Daemon(settings, API_KEY).run()
        other = daemon_settings(
            tmp_path / "other", emulator, control={"socket": settings.socket_path}
        )
        with pytest.raises(SocketInUseError, match="already listening"):
            await Daemon(other, API_KEY).run()
        assert settings.socket_path.exists()


async def test_a_stale_socket_left_by_a_kill_is_replaced(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    settings = daemon_settings(tmp_path / "r", emulator)
    settings.socket_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(settings.socket_path))
    stale.close()  # bound, never listening: what a SIGKILL leaves behind
    async with running_daemon(settings):
        status, body = await RawControl(settings.socket_path).call("GET", "/v1/status")
        assert status == 200 and body["healthy"]


# Another user needs an interpreter it may run; the venv's may live under /root.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="acting as another user needs root and a system-wide python3",
)
async def test_a_peer_outside_the_allowed_users_is_refused_and_logged(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    # A folder other users can traverse (pytest's own temp root is private to root).
    shared = Path(tempfile.mkdtemp(prefix="batchd-peer-"))
    sock = shared / "control.sock"
    settings = daemon_settings(tmp_path / "r", emulator, control={"socket": sock})
    async with running_daemon(settings) as daemon:
        # Even if the socket's mode were too loose, the peer check stands.
        os.chmod(shared, 0o755)
        os.chmod(sock.parent, 0o755)
        os.chmod(sock, 0o666)
        code = (
            "import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "s.sendall(b'GET /v1/status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n');"
            "print(s.recv(200).split(b'\\r\\n')[0].decode())"
        )
        proc = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON,
            "-c",
            code,
            str(settings.socket_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            user=65534,
            group=65534,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert b"403" in out
        assert daemon.control.refused == 1
    shutil.rmtree(shared)


def test_cli_says_the_daemon_is_unreachable_with_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["status", "--socket", str(tmp_path / "none.sock")])
    err = capsys.readouterr().err
    assert code == 3 and str(tmp_path / "none.sock") in err
    assert main(["check", "--socket", str(tmp_path / "none.sock")]) == 3
    assert "none.sock" in capsys.readouterr().err
    assert main(["check", "--quiet", "--socket", str(tmp_path / "none.sock")]) == 3
    assert capsys.readouterr() == ("", "")  # --quiet: nothing at all, only the exit code


def test_submit_copies_atomically_without_a_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = tmp_path / "work.jsonl"
    src.write_bytes(requests(2))
    none = str(tmp_path / "none.sock")
    assert main(["submit", "--socket", none, "--inbox", str(inbox), str(src)]) == 0
    assert "queued" in capsys.readouterr().out  # and says no daemon took it yet
    assert (inbox / "work.jsonl").read_bytes() == src.read_bytes()
    # The data file, and its sidecar with the token `submit` finds its job by.
    assert sorted(p.name for p in inbox.iterdir()) == ["work.jsonl", "work.meta.json"]
    assert set(json.loads((inbox / "work.meta.json").read_bytes())) == {"submit_id"}
    assert main(["submit", "--socket", none, "--inbox", str(inbox), str(src)]) == 1  # kept
    assert main(["submit", "--socket", none, "--inbox", str(inbox), str(tmp_path / "a.txt")]) == 1
    # With --wait, no daemon is exit 3, and nothing is queued.
    other = tmp_path / "other.jsonl"
    other.write_bytes(requests(1))
    assert main(["submit", "--socket", none, "--inbox", str(inbox), "--wait", str(other)]) == 3
    assert not (inbox / "other.jsonl").exists()
