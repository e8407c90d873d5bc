"""No hold without a way out, and every hold says it (issue 21), against the emulator: a
hold names its reason and what ends it, is judged again when its cause may have changed
(a reload, a restart, a publish), ends with `cancel`, and waits name it."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from batchd.client import AsyncClient, Client
from batchd.models import Held, JobState
from batchd.testing import (
    StartEmulator,
    cli,
    daemon_settings,
    drop,
    events,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

# Prices of the test's own (per million tokens, real time; batch is half): qwen-long and
# qwen-turbo have none until the test gives them one.
PRICES: dict[str, Any] = {
    "custom": {
        "qwen-plus": {"input": 2.0, "output": 8.0, "currency": "CNY"},
        "qwen-max": {"input": 6.0, "output": 24.0, "currency": "CNY"},
    }
}


def _priced(*models: str) -> dict[str, Any]:
    extra = {m: {"input": 0.5, "output": 2.0, "currency": "CNY"} for m in models}
    return {"custom": {**PRICES["custom"], **extra}}


async def _held(daemon: Any, reason: Held, name: str) -> Any:
    async def found() -> Any:
        return next((j for j in await daemon.store.held_jobs(reason) if j.name == name), None)

    return await wait_for(found, 15, f"{name} held {reason}")


async def test_an_unpriced_hold_ends_when_a_reload_or_a_restart_brings_the_price(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "r"
    budget = {"daily": 5.0}
    settings = daemon_settings(root, emulator, prices=PRICES, budget=budget)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings) as daemon:
        drop(inbox, "long.jsonl", requests(2, "qwen-long", prefix="l"))
        held = await _held(daemon, Held.NO_PRICE, "long")
        note = held.held_note or ""
        assert "qwen-long" in note and "[prices" in note and "reload" in note, note
        assert f"batchd cancel {held.id}" in note, note
        # Not a failure: `retry` says what the hold waits for.
        answer = await daemon.ops.retry(held.id)
        assert answer is not None and not answer.ok
        assert "nothing has failed" not in answer.message and "qwen-long" in answer.message
        # A reload that prices the model (SIGHUP applies [prices]) ends the hold.
        new = daemon_settings(root, emulator, prices=_priced("qwen-long"), budget=budget)
        assert "prices" in daemon.apply_settings(new)["applied"]
        await wait_published(outbox, 1, emulator)
        drop(inbox, "turbo.jsonl", requests(2, "qwen-turbo", prefix="t"))
        await _held(daemon, Held.NO_PRICE, "turbo")
    assert (await emulator.stats())["batches_created"] == 1
    # So does a restart with the price in the configuration.
    again = daemon_settings(root, emulator, prices=_priced("qwen-turbo"), budget=budget)
    async with running_daemon(again):
        await wait_published(outbox, 2, emulator)
    for name in ("long", "turbo"):
        report = summary(outbox / name)
        assert report["status"] == "completed" and report["cost"]["amount"] > 0


async def test_over_the_whole_budget_says_so_at_once_and_waits_name_every_hold(
    start_emulator: StartEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    log_lines: io.StringIO,
) -> None:
    """Three jobs of 3 requests each fit a 0.5 CNY day alone, not two at once: the second
    waits for room (a hold that ends by itself). One of 9 requests is larger than the
    whole day: it says so as soon as it is judged, and waits return with it."""
    emulator = await start_emulator()  # its clock moves only when the test moves it
    root = tmp_path / "r"
    # Inputs are not kept: but one cancelled with nothing sent is all there is of it.
    jobs = {"keep_input": False}
    settings = daemon_settings(root, emulator, prices=PRICES, budget={"daily": 0.5}, jobs=jobs)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    sock = str(settings.socket_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "huge.jsonl").write_bytes(requests(9, prefix="h"))
    async with running_daemon(settings) as daemon:
        drop(inbox, "first.jsonl", requests(3, prefix="a"))
        drop(inbox, "second.jsonl", requests(3, prefix="b"))
        second = await _held(daemon, Held.BUDGET, "second")
        note = second.held_note or ""
        assert "daily budget of 0.5000 CNY" in note and "00:00 UTC" in note, note
        assert "budget.daily" in note and f"batchd cancel {second.id}" in note, note
        # Judged at every pass, logged once: passes of the submit stage change nothing.
        for _ in range(5):
            await daemon.submitter.run_once()
        held_lines = [e for e in events(log_lines, "job_held") if e["job_id"] == second.id]
        assert len(held_lines) == 1 and held_lines[0]["reason"] == "budget", held_lines

        client, aclient = Client(sock), AsyncClient(sock)
        # A hold that ends by itself: the wait goes on, and its timeout names the hold.
        with pytest.raises(TimeoutError, match=r"held \(budget\).*daily budget"):
            await asyncio.to_thread(client.wait, second.id, 0.5)
        with pytest.raises(TimeoutError, match=r"held \(budget\)"):
            await aclient.wait(second.id, timeout=0.5)

        drop(inbox, "large.jsonl", requests(9, prefix="c"))
        large = await _held(daemon, Held.OVER_CAP, "large")
        note = large.held_note or ""
        assert "more than the whole daily budget of 0.5000 CNY" in note, note
        assert "Raise budget.daily to at least" in note and "reload" in note, note
        # A hold only an operator can end: waits return with it.
        waited = await asyncio.to_thread(client.wait, large.id, 10)
        assert waited.state == "running" and waited.held == "over_cap"
        assert waited.held_note == note and waited.hold_ends_by_itself is False
        waited = await aclient.wait(large.id, timeout=10)
        assert waited.held == "over_cap"
        code, out, err = await cli(
            capsys,
            "submit",
            "--socket",
            sock,
            "--wait",
            "--timeout",
            "20",
            str(work / "huge.jsonl"),
        )
        assert code == 5, (code, out, err)
        assert "held (over_cap)" in out + err and "Raise budget.daily" in out + err
        # `cancel` ends it: published cancelled, nothing sent.
        answer = await daemon.ops.cancel(large.id)
        assert answer is not None and answer.ok
        await wait_for(lambda: (outbox / "large" / "summary.json").exists(), 15, "large published")
        # The first ends: the second gets its room, and its hold ends, said once.
        await wait_published(outbox, 3, emulator)
        # A reload that takes the cap away ends every money hold.
        daemon.apply_settings(daemon_settings(root, emulator, prices=PRICES, jobs=jobs))
        await wait_published(outbox, 4, emulator)
    released = [e for e in events(log_lines, "job_released") if e["job_id"] == second.id]
    assert len(released) == 1 and released[0]["by"] == "fits", released
    over = [e for e in events(log_lines, "job_released") if e["reason"] == "over_cap"]
    assert sorted((e["job_id"] == large.id, e["by"]) for e in over) == [
        (False, "no_cap"),  # huge
        (True, "cancel"),
    ]
    assert summary(outbox / "large")["status"] == "cancelled"
    assert summary(outbox / "large")["never_run"] == 9
    assert (outbox / "large" / "input.jsonl").read_bytes() == requests(9, prefix="c")
    assert not (outbox / "first" / "input.jsonl").exists()
    for name in ("second", "huge"):
        assert summary(outbox / name)["status"] == "completed"
    # first, second and huge; large was never created.
    assert (await emulator.stats())["batches_created"] == 3


async def _running(daemon: Any, name: str) -> Any:
    async def created() -> Any:
        for job in await daemon.store.jobs([JobState.RUNNING]):
            parts = await daemon.store.parts_of(job.id)
            if job.name == name and parts and all(p.batch_id for p in parts):
                return job
        return None

    return await wait_for(created, 15, f"{name}'s batch created")


async def test_a_duplicate_hold_is_judged_again_when_the_earlier_job_ends_and_cancel_ends_it(
    start_emulator: StartEmulator, tmp_path: Path, log_lines: io.StringIO
) -> None:
    emulator = await start_emulator()  # its clock moves only when the test moves it
    settings = daemon_settings(tmp_path / "r", emulator, prices=PRICES)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    content = requests(3, prefix="same-")
    async with running_daemon(settings) as daemon:
        drop(inbox, "first.jsonl", content)
        first = await _running(daemon, "first")
        drop(inbox, "again.jsonl", content)
        again = await _held(daemon, Held.DUPLICATE, "again")
        assert f"{first.id} (first, running)" in (again.held_note or ""), again.held_note
        assert f"batchd cancel {again.id}" in (again.held_note or "")
        # Cancel ends a duplicate hold: published cancelled, nothing sent, input kept.
        answer = await daemon.ops.cancel(again.id)
        assert answer is not None and answer.ok, answer
        await wait_for(lambda: (outbox / "again" / "summary.json").exists(), 15, "again published")
        drop(inbox, "third.jsonl", content)
        third = await _held(daemon, Held.DUPLICATE, "third")
        # The earlier job ends: the note says so, never "running" again.
        emulator.advance(3600)
        await wait_for(lambda: (outbox / "first").exists(), 15, "first published")

        async def noted() -> str | None:
            job = await daemon.store.get_job(third.id)
            note = job.held_note if job is not None else None
            return note if note and "completed" in note else None

        note = await wait_for(noted, 15, "third's note naming the first job completed")
        assert f"{first.id} (first, completed, results in {outbox / 'first'})" in note, note

        # An earlier job that ends with nothing to show (cancelled) holds nothing back.
        other = requests(2, prefix="other-")
        drop(inbox, "one.jsonl", other)
        one = await _running(daemon, "one")
        drop(inbox, "two.jsonl", other)
        await _held(daemon, Held.DUPLICATE, "two")
        await daemon.ops.cancel(one.id)
        await wait_published(outbox, 4, emulator)
    report = summary(outbox / "again")
    assert report["status"] == "cancelled" and report["never_run"] == 3
    assert report["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert (outbox / "again" / "input.jsonl").read_bytes() == content
    for line in read_jsonl(outbox / "again" / "error.jsonl"):
        assert line["error"]["code"] == "not_submitted" and "cancelled" in line["error"]["message"]
    assert summary(outbox / "one")["status"] == "cancelled"
    assert summary(outbox / "two")["status"] == "completed"
    # first, one and two: neither again nor third sent anything.
    stats = await emulator.stats()
    assert stats["batches_created"] == 3 and stats["calls"]["upload"]["served"] == 3
    for job_id, held in ((again.id, 1), (third.id, 1)):
        assert len([e for e in events(log_lines, "job_held") if e["job_id"] == job_id]) == held
    released = [e for e in events(log_lines, "job_released") if e["job_id"] == again.id]
    assert len(released) == 1 and released[0]["by"] == "cancel", released
