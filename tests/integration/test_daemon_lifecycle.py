"""Every way a batch can end, and the faults around it, through the real daemon
(TESTING.md C.13-C.17). Each test checks the outbox against what the emulator served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batchd.emulator import Emulator
from batchd.testing import (
    API_KEY,
    StartEmulator,
    daemon_settings,
    drop,
    idle,
    published_jobs,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)


async def served(emulator: Emulator, s: dict[str, Any], kind: str) -> list[bytes]:
    lines: list[bytes] = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for part in s["parts"]:
            file_id = part[f"{kind}_file_id"]
            if file_id:
                async with session.get(f"{emulator.base_url}/files/{file_id}/content") as r:
                    assert r.status == 200
                    lines.extend(x for x in (await r.read()).splitlines() if x.strip())
    return lines


def strip_input_line(line: bytes) -> bytes:
    head, _, _ = line.rpartition(b',"input_line":')
    return head + b"}"


def input_lines(content: bytes) -> dict[str, int]:
    return {orjson.loads(x)["custom_id"]: n for n, x in enumerate(content.splitlines(), 1)}


async def test_per_request_failures_are_reported_with_their_input_lines(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.3)
    settings = daemon_settings(tmp_path / "root", emulator, jobs={"delete_remote_files": False})
    content = requests(60)
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "mixed.jsonl", content)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    s = summary(folder)
    assert s["status"] == "partial"
    counts = s["request_counts"]
    assert counts["total"] == 60 and 0 < counts["failed"] < 60
    assert counts["completed"] + counts["failed"] == 60
    assert counts == {
        "total": 60,
        **{k: s["parts"][0]["request_counts"][k] for k in ("completed", "failed")},
    }
    ok = (folder / "result.jsonl").read_bytes().splitlines()
    bad = (folder / "error.jsonl").read_bytes().splitlines()
    assert sorted(ok) == sorted(await served(emulator, s, "output"))
    assert sorted(strip_input_line(x) for x in bad) == sorted(await served(emulator, s, "error"))
    where = input_lines(content)
    for line in bad:
        obj = orjson.loads(line)
        assert obj["input_line"] == where[obj["custom_id"]]
        assert obj["error"]["code"]
    # Input order in both files.
    assert [where[orjson.loads(x)["custom_id"]] for x in ok] == sorted(
        where[orjson.loads(x)["custom_id"]] for x in ok
    )


async def test_a_batch_the_service_rejects_ends_failed_with_every_request_reported(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "unknown.jsonl", requests(5, model="no-such-model"))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        (job,) = await published_jobs(daemon, 1)
        # `jobs --json` and `show` say it too (the socket's JobInfo).
        shown = await daemon.ops.job(job.id)
    s = summary(folder)
    assert s["status"] == "failed"
    assert s["parts"][0]["status"] == "failed"
    assert s["parts"][0]["errors"]
    # Stated once: what the service said, with how many it listed.
    assert s["error"]["code"] == "model_not_found"
    assert s["error"]["message"].startswith("model 'no-such-model' does not exist (line 1")
    assert "4 more listed in the part's errors" in s["error"]["message"]
    assert shown is not None and shown.error == f"model_not_found: {s['error']['message']}"
    assert s["never_run"] == 5
    errors = read_jsonl(folder / "error.jsonl")
    assert [e["input_line"] for e in errors] == [1, 2, 3, 4, 5]
    # Each line refers to it by its code, never repeating the service's list.
    assert {e["error"]["code"] for e in errors} == {"batch_failed"}
    assert {e["error"]["message"] for e in errors} == {
        "the batch was rejected: see summary.json error (model_not_found)"
    }


async def test_an_expired_batch_keeps_its_partial_output_and_lists_what_never_ran(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    # 10 requests at 4 h each: about 5 are done when the 24 h window closes.
    emulator = await start_emulator(time_scale=1, per_request_s=4 * 3600.0)
    settings = daemon_settings(tmp_path / "root", emulator, jobs={"delete_remote_files": False})
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "slow.jsonl", requests(10))
        (folder,) = await wait_published(
            settings.paths.folder("outbox"), 1, emulator, advance_s=1800
        )
    s = summary(folder)
    assert s["status"] == "expired"
    counts = s["request_counts"]
    assert 0 < counts["completed"] < 10
    assert sorted((folder / "result.jsonl").read_bytes().splitlines()) == sorted(
        await served(emulator, s, "output")
    )
    # Whether the service listed them or batchd found them missing, every request that
    # did not run is in error.jsonl with the expiry's code and its input line.
    errors = read_jsonl(folder / "error.jsonl")
    assert len(errors) + counts["completed"] == 10
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(e["input_line"] for e in errors) == sorted(
        set(range(1, 11))
        - {int(r["custom_id"][1:]) + 1 for r in read_jsonl(folder / "result.jsonl")}
    )


async def test_a_cancelled_job_publishes_what_finished_and_marks_the_rest(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=1, per_request_s=600.0)
    settings = daemon_settings(tmp_path / "root", emulator)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "stop.jsonl", requests(10))

        async def created() -> str | None:
            jobs = await daemon.store.jobs()
            parts = await daemon.store.parts_of(jobs[0].id) if jobs else []
            return jobs[0].id if parts and parts[0].batch_id else None

        job_id = await wait_for(created, 10, "the job's batch created")
        emulator.advance(20 + 120 + 3 * 600)  # validated, three requests done
        await daemon.ops.request_cancel(job_id)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator, advance_s=5)
    s = summary(folder)
    assert s["status"] == "cancelled"
    assert s["parts"][0]["status"] == "cancelled"
    counts = s["request_counts"]
    assert counts["total"] == 10 and counts["completed"] < 10
    codes = [e["error"]["code"] for e in read_jsonl(folder / "error.jsonl")]
    assert "batch_cancelled" in codes
    # The service's own batch_cancelled lines are requests that never ran (it was 0).
    assert s["never_run"] == codes.count("batch_cancelled") > 0


async def test_faults_do_not_lose_or_duplicate_work(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000, limits={"max_requests_per_file": 10})
    emulator.set_faults(
        error_5xx_rate=0.15,
        drop_connection_rate=0.1,
        lost_create_response_rate=0.3,
        throttle_rate=0.1,
        latency_max_s=0.01,
        seed=7,
    )
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        limits={"max_requests_per_file": 10},
        api={"max_attempts": 20},
    )
    async with running_daemon(settings):
        for i in range(3):
            drop(settings.paths.folder("inbox"), f"f{i}.jsonl", requests(25, prefix=f"f{i}-"))
        folders = await wait_published(settings.paths.folder("outbox"), 3, emulator, timeout_s=60)
        emulator.set_faults(
            error_5xx_rate=0, drop_connection_rate=0, lost_create_response_rate=0, throttle_rate=0
        )

        async def cleaned() -> bool:
            return (await emulator.stats())["files_stored"]["count"] == 0

        await wait_for(cleaned, 10, "the remote files deleted")
    for folder in folders:
        s = summary(folder)
        assert s["status"] == "completed", s
        assert s["request_counts"]["completed"] == 25
    stats = await emulator.stats()
    assert set(stats["batches_created_per_input_file"].values()) == {1}
    assert len(stats["batches_created_per_input_file"]) == 9
    assert stats["files_stored"]["count"] == 0
    assert stats["calls"]["create"]["refused_429"] + stats["calls"]["list"]["served"] >= 0


async def test_a_bad_key_pauses_submission_without_failing_jobs(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator, api={"account_probe_s": 0.1})
    async with running_daemon(settings, key="sk-wrong") as daemon:
        drop(settings.paths.folder("inbox"), "wait.jsonl", requests(3))
        await wait_for(lambda: daemon.account.paused_reason, 10, "the account paused")
        # Paused by the start-up probe, maybe before the file was even planned.
        assert "InvalidApiKey" in (daemon.account.paused_reason or "")

        await idle(daemon)  # a paused account: nothing moves on
        parts = await daemon.store.parts_in(["pending", "uploading"])  # type: ignore[list-item]
        assert parts and all(p.state == "pending" for p in parts)
        # The operator fixes the account (here: the emulator accepts the daemon's key).
        emulator.state.api_key = "sk-wrong"
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        assert daemon.account.paused_reason is None
    assert summary(folder)["status"] == "completed"


async def test_csv_input_with_a_sidecar_runs_and_converts(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox = settings.paths.folder("inbox")
    inbox.mkdir(parents=True)
    (inbox / "reviews.meta.json").write_bytes(
        orjson.dumps({"model": "qwen-plus", "ds_name": "reviews", "completion_window": "48h"})
    )
    async with running_daemon(settings):
        drop(inbox, "reviews.csv", 'custom_id,content\n1,好吃\n2,"too salty, sadly"\n'.encode())
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    s = summary(folder)
    assert s["status"] == "completed"
    assert [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] == ["1", "2"]
    csv_text = (folder / "result.csv").read_bytes().decode("utf-8-sig")
    assert csv_text.splitlines()[0].startswith("custom_id,model,request_id,status_code")
    assert (folder / "input.csv").exists()


async def test_mixed_models_are_rejected_unless_grouping_is_on(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    content = requests(3, model="qwen-plus", prefix="a") + requests(3, model="qwen-max", prefix="b")
    settings = daemon_settings(tmp_path / "one", emulator)
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "mixed.jsonl", content)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    assert summary(folder)["status"] == "rejected"
    grouped = daemon_settings(tmp_path / "two", emulator, jobs={"group_by_model": True})
    async with running_daemon(grouped):
        drop(grouped.paths.folder("inbox"), "mixed.jsonl", content)
        (folder,) = await wait_published(grouped.paths.folder("outbox"), 1, emulator)
    s = summary(folder)
    assert s["status"] == "completed"
    assert sorted(p["model"] for p in s["parts"]) == ["qwen-max", "qwen-plus"]
    assert [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] == [
        "a0",
        "a1",
        "a2",
        "b0",
        "b1",
        "b2",
    ]


async def test_retryable_failures_are_resubmitted_as_follow_up_parts_when_asked(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.5)
    settings = daemon_settings(
        tmp_path / "root", emulator, jobs={"resubmit_failed": 2, "delete_remote_files": False}
    )
    content = requests(60)
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "again.jsonl", content)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    s = summary(folder)
    rounds = [p["round"] for p in s["parts"]]
    assert rounds[0] == 0 and max(rounds) >= 1
    first = s["parts"][0]["request_counts"]
    counts = s["request_counts"]
    assert counts["total"] == 60 and counts["completed"] + counts["failed"] == 60
    assert counts["completed"] > first["completed"]  # the follow-ups won some back
    # Only retryable failures were paid for again: content rejections never.
    retried = sum(p["requests"] for p in s["parts"] if p["round"] == 1)
    first_errors = [
        orjson.loads(x) for x in await served(emulator, {"parts": s["parts"][:1]}, "error")
    ]
    retryable = [e for e in first_errors if e["response"]["status_code"] in (429, 500)]
    assert retried == len(retryable)
    final = read_jsonl(folder / "error.jsonl")
    assert all(e["error"]["code"] != "DataInspectionFailed" or e["input_line"] for e in final)
    # Every request is answered exactly once in the outbox, in input order.
    lines = [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] + [
        e["custom_id"] for e in final
    ]
    assert sorted(lines) == sorted(f"r{i}" for i in range(60))
