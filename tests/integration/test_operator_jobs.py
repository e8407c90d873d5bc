"""Finding jobs as an operator or a script does (issue 14): newest first, every job
reachable, filters, and a job named by a prefix of its id or by its name."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from batchd.client import AsyncClient, Client, RequestFailed
from batchd.config import Settings
from batchd.testing import (
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


async def test_jobs_newest_first_every_one_reachable_and_named_by_prefix_or_name(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        # One at a time, so that the order of claiming is known; "same" twice.
        for n, name in enumerate(["alpha", "same", "beta", "same", "gamma"], start=1):
            drop(inbox, f"{name}.jsonl", requests(2, prefix=f"{name}{n}-"))
            await wait_published(outbox, n, emulator)
        await published_jobs(daemon, 5)
        drop(inbox, "bad.jsonl", b'{"custom_id": "x"}\n')  # rejected: no method, no url
        await wait_published(outbox, 6, emulator)
        await published_jobs(daemon, 6)

        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--json")
        listed = json.loads(out)
        assert code == 0 and [j["name"] for j in listed] == [
            "bad", "gamma", "same", "beta", "same", "alpha"
        ]  # fmt: skip
        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--json", "--oldest")
        assert [j["name"] for j in json.loads(out)][:2] == ["alpha", "same"]
        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--json", "--limit", "2")
        assert [j["name"] for j in json.loads(out)] == ["bad", "gamma"]
        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--json", "--status", "rejected")
        assert [j["name"] for j in json.loads(out)] == ["bad"]
        code, out, _ = await cli(
            capsys, "jobs", "--socket", sock, "--json", "--status", "completed", "--name", "sam"
        )
        assert [j["name"] for j in json.loads(out)] == ["same", "same"]
        code, _, err = await cli(capsys, "jobs", "--socket", sock, "--status", "done")
        assert code == 1 and "unknown status" in err and "\n" not in err.strip()
        # A table says how many more there are, and cuts no id even when piped.
        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--limit", "3")
        assert code == 0 and "3 of 6" in out and "--all" in out
        assert all(j["id"] in out for j in listed[:3])
        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--all")
        assert "6 of 6" in out and all(j["id"] in out for j in listed)

        # Pages follow on from the last job seen, whatever is claimed meanwhile.
        client = Client(sock)
        first = await asyncio.to_thread(client.jobs, limit=4)
        assert first.more and first.total == 6 and len(first.jobs) == 4
        drop(inbox, "late.jsonl", requests(1, prefix="late-"))
        await wait_published(outbox, 7, emulator)
        rest = await asyncio.to_thread(client.jobs, limit=4, before=first.jobs[-1].id)
        assert not rest.more and [j.id for j in rest.jobs] == [j["id"] for j in listed[4:]]
        every = [j.name async for j in AsyncClient(sock).all_jobs()]
        assert every[0] == "late" and len(every) == 7

        # A job by a unique prefix of its id, or by its exact name.
        alpha = listed[-1]
        others = [j.id for j in await asyncio.to_thread(lambda: list(client.all_jobs()))]
        others.remove(alpha["id"])
        unique = next(
            n for n in range(6, 21) if not any(o.startswith(alpha["id"][:n]) for o in others)
        )
        for ref in (alpha["id"][:unique], alpha["id"], "alpha"):
            code, out, _ = await cli(capsys, "show", "--socket", sock, "--json", ref)
            assert code == 0 and json.loads(out)["id"] == alpha["id"], ref
        if unique > 6:  # ids start with their time: a short prefix may fit several
            code, _, err = await cli(capsys, "show", "--socket", sock, alpha["id"][:6])
            assert code == 1 and "fits" in err
        code, _, err = await cli(capsys, "show", "--socket", sock, "same")
        same = [j["id"] for j in listed if j["name"] == "same"]
        assert code == 1 and "fits 2 jobs" in err and all(i in err for i in same)
        with pytest.raises(RequestFailed) as ambiguous:
            await asyncio.to_thread(client.job, "same")
        assert (ambiguous.value.status, ambiguous.value.code) == (409, "ambiguous_job")
        code, _, err = await cli(capsys, "show", "--socket", sock, alpha["id"][:5])
        assert code == 1 and "no job" in err and "6 characters" in err  # too short a prefix
        code, _, err = await cli(capsys, "cancel", "--socket", sock, "gamma")
        assert code == 1 and "already published" in err


async def test_a_pause_outlives_a_restart_and_resume_calls_off_a_drain(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Slow enough that a batch is still running when the drain is asked for.
    emulator = await start_emulator(time_scale=100)
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings):
        code, out, _ = await cli(capsys, "pause", "--socket", sock)
        assert code == 0 and "paused" in out
    async with running_daemon(settings) as daemon:
        client = Client(sock)
        status = await asyncio.to_thread(client.status)
        assert status.intake_paused
        drop(inbox, "held.jsonl", requests(2))
        await idle(daemon)
        assert (inbox / "held.jsonl").exists()  # still paused after the restart
        await cli(capsys, "resume", "--socket", sock)

        async def running() -> bool:
            return bool((await AsyncClient(sock).jobs(states=["running"])).jobs)

        await wait_for(running, 20, "the job running")
        code, out, _ = await cli(capsys, "drain", "--socket", sock)
        assert code == 0
        code, out, _ = await cli(capsys, "resume", "--socket", sock)
        assert code == 0 and "called off" in out
        await wait_published(outbox, 1, emulator)
        await idle(daemon)  # the drain stage has looked again since
        assert not daemon.stopping.is_set()  # the drain was called off: it keeps running
        status = await asyncio.to_thread(client.status)
        assert not status.intake_paused and not status.draining


async def test_submit_prints_the_job_waits_for_it_and_the_client_reads_its_results(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.3)
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "reviews.jsonl").write_bytes(requests(20, prefix="rv-"))
    (work / "ok.jsonl").write_bytes(requests(2, prefix="ok-"))
    (work / "rows.csv").write_text("custom_id,content\nc1,hello\nc2,world\n")
    (work / "rows.meta.json").write_text('{"model": "qwen-plus"}')
    async with running_daemon(settings):
        # --wait: the outbox folder of each, exit 1 as one ended partial.
        code, out, err = await cli(
            capsys, "submit", "--socket", sock, "--wait", "--json", str(work / "reviews.jsonl")
        )
        (done,) = json.loads(out)
        assert code == 1 and done["status"] == "partial", err  # 30% of requests fail
        assert Path(done["outbox"]).is_dir() and done["name"] == "reviews"
        # A sidecar given beside its CSV is its options, not a refused file.
        code, out, err = await cli(
            capsys,
            "submit",
            "--socket",
            sock,
            "--wait",
            "--name",
            "renamed",
            str(work / "rows.meta.json"),
            str(work / "rows.csv"),
        )
        assert code in (0, 1) and "job " in out and "renamed" in out, err
        # Without --wait it prints the job id at once, mapped to the file.
        code, out, _ = await cli(capsys, "submit", "--socket", sock, str(work / "ok.jsonl"))
        assert code == 0 and "ok.jsonl: job " in out
        job_id = out.split("job ")[1].split()[0]
        client = Client(sock)
        final = await asyncio.to_thread(client.wait, job_id, 60)
        assert final.state == "published" and final.name == "ok" and final.outbox

        # The Python client: submit, wait, and every request in input order.
        job = await asyncio.to_thread(
            client.submit,
            work / "reviews.jsonl",
            name="again",
            options={"priority": 1, "allow_duplicate": True},  # the same file, on purpose
        )
        assert job.name == "again" and job.id  # claimed, and (fast emulator) maybe further
        ended = await asyncio.to_thread(client.wait, job.id, 60)
        assert ended.status == "partial" and ended.outbox
        rows = await asyncio.to_thread(lambda: list(client.results(job.id)))
        assert [r["custom_id"] for r in rows] == [f"rv-{i}" for i in range(20)]
        assert all(("response" in r) != ("error" in r) for r in rows)
        assert any("error" in r for r in rows) and any("response" in r for r in rows)

        # Paused intake: the claim does not come; --wait gives up with exit 4.
        await cli(capsys, "pause", "--socket", sock)
        (work / "late.jsonl").write_bytes(requests(1, prefix="late-"))
        code, _, err = await cli(
            capsys, "submit", "--socket", sock, "--wait", "--timeout", "1", str(work / "late.jsonl")
        )
        assert code == 4 and "paused" in err


async def test_status_says_what_waits_in_the_inbox_and_how_the_last_reload_went(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchd.errors import ConfigError

    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator, intake={"unterminated_settle_s": 3600})
    sock = str(settings.socket_path)
    inbox = settings.paths.folder("inbox")
    client = AsyncClient(sock)
    async with running_daemon(settings) as daemon:
        (inbox / "half.jsonl").write_bytes(requests(1).rstrip(b"\n"))  # no final newline
        (inbox / "notes.txt").write_text("hello")
        (inbox / "folder.jsonl").mkdir()

        async def listed() -> bool:
            status = await client.status()
            waiting = status.inbox_waiting.get("half.jsonl", "")
            return "newline" in waiting and len(status.inbox_refused) == 2

        await wait_for(listed, 20, "the inbox entries in status")
        status = await client.status()
        assert "newline" in status.inbox_waiting["half.jsonl"]
        assert "suffix" in status.inbox_refused["notes.txt"]
        assert status.reload is None

        def broken() -> Settings:
            raise ConfigError("configuration file x.toml: poll.interval_s: not a number")

        daemon.request_reload(broken)
        status = await client.status()
        assert status.reload is not None and not status.reload.ok
        assert "interval_s" in (status.reload.error or "")
        moved = settings.model_copy(update={"provider": "openai"})
        daemon.request_reload(lambda: moved)
        status = await client.status()
        assert status.reload is not None and status.reload.ok
        assert "provider" in status.reload.needs_restart
        await client.pause()
        status = await client.status()
        assert any("intake paused" in why for why in status.waiting)
        code, out, _ = await cli(capsys, "status", "--socket", sock)
        assert code == 0 and "half.jsonl" in out and "refused" in out
        assert "waiting for a restart: provider" in out and "intake paused" in out


async def test_a_wrong_key_or_a_dead_url_shows_within_seconds_and_check_says_why(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No file needed: the daemon probes the provider at start-up."""
    import socket

    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    client = AsyncClient(sock)
    async with running_daemon(settings):

        async def probed() -> bool:
            return bool((await emulator.stats())["calls"]["list"]["served"] >= 1)

        await wait_for(probed, 10, "a probe at start-up")
        code, out, _ = await cli(capsys, "check", "--socket", sock)
        assert code == 0 and out.strip() == "ok"
    async with running_daemon(settings, key="sk-not-the-key"):

        async def paused() -> bool:
            return bool((await client.status()).account_paused)

        await wait_for(paused, 10, "the account paused by the wrong key")
        code, _, err = await cli(capsys, "check", "--socket", sock)
        assert code == 1 and "account paused" in err
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    nowhere = daemon_settings(tmp_path / "r", emulator, base_url=dead)
    async with running_daemon(nowhere):

        async def down() -> bool:
            return bool((await client.status()).provider_down)

        await wait_for(down, 20, "the provider seen down")
        status = await client.status()
        assert not status.healthy
        assert any("does not answer" in why for why in status.waiting)
        code, _, err = await cli(capsys, "check", "--socket", sock)
        assert code == 1 and "does not answer" in err


async def test_the_async_client_submits_waits_and_reads_results_too(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    source = tmp_path / "notebook.jsonl"
    source.write_bytes(requests(5, prefix="nb-"))
    async with running_daemon(settings):
        client = AsyncClient(settings.socket_path)
        job = await client.submit(source, options={"completion_window": "24h"})
        assert job.name == "notebook"
        ended = await client.wait(job.id[:12] if len(job.id) > 12 else job.id, timeout=60)
        assert ended.status == "completed" and ended.outbox
        rows = [row async for row in client.results(job.id)]
        assert [r["custom_id"] for r in rows] == [f"nb-{i}" for i in range(5)]
        assert all("response" in r for r in rows)


async def test_watch_returns_when_asked_and_says_what_is_in_flight(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator(time_scale=100)  # a batch runs for a second or two
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    async with running_daemon(settings):
        started = asyncio.get_running_loop().time()
        code, out, _ = await cli(capsys, "watch", "--socket", sock, "--seconds", "1")
        assert code == 0 and "no job is in flight" in out
        assert asyncio.get_running_loop().time() - started < 10  # idle, yet it returned
        drop(settings.paths.folder("inbox"), "busy.jsonl", requests(4))

        async def running() -> bool:
            return bool((await AsyncClient(sock).jobs(states=["running"])).jobs)

        await wait_for(running, 20, "the job running")
        code, out, _ = await cli(capsys, "watch", "--socket", sock, "--seconds", "1")
        assert code == 0 and "busy" in out and "/4" in out
