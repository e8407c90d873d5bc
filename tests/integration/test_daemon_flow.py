"""The real daemon against the emulator: inbox to outbox."""

from __future__ import annotations

import re
import time
from pathlib import Path

import aiohttp
import orjson

from batchd.clock import iso_utc
from batchd.emulator import Emulator
from batchd.provider.remote import TIME_KEYS
from batchd.testing import (
    API_KEY,
    StartEmulator,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    seconds_of,
    summary,
    wait_published,
)

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def _served(emulator: Emulator, summary_: dict, kind: str) -> list[bytes]:
    """The lines the emulator holds in the given kind of file for each part."""
    import aiohttp

    lines: list[bytes] = []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-emulator-test-key"}) as s:
        for part in summary_["parts"]:
            file_id = part[f"{kind}_file_id"]
            if not file_id:
                continue
            async with s.get(f"{emulator.base_url}/files/{file_id}/content") as r:
                assert r.status == 200
                lines.extend((await r.read()).splitlines())
    return lines


async def test_seed_test_model_file_runs_end_to_end(
    start_emulator: StartEmulator, tmp_path: Path, seed_lines: bytes
) -> None:
    emulator = await start_emulator(time_scale=600)
    settings = daemon_settings(tmp_path / "root", emulator, jobs={"delete_remote_files": False})
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "test_model.jsonl", seed_lines)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    assert folder.name == "test_model"
    s = summary(folder)
    assert s["status"] == "completed"
    assert s["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    usage = {
        "prompt_tokens": 40,
        "completion_tokens": 12,
        "reasoning_tokens": 0,
        "total_tokens": 52,
    }
    assert s["usage"] == {**usage, "per_model": {"batch-test-model": {"requests": 2, **usage}}}
    # The test model is free: its cost is known, and 0.
    assert s["cost"]["amount"] == 0.0 and s["cost"]["per_model"] == {"batch-test-model": 0.0}
    results = read_jsonl(folder / "result.jsonl")
    assert [r["custom_id"] for r in results] == ["1", "2"]
    assert {r["response"]["body"]["choices"][0]["message"]["content"] for r in results} == {
        "This is a test result."
    }
    # Byte for byte what the service served, in input order.
    served = await _served(emulator, s, "output")
    mine = (folder / "result.jsonl").read_bytes().splitlines()
    assert sorted(mine) == sorted(served)
    assert (folder / "error.jsonl").read_bytes() == b""
    assert (folder / "input.jsonl").read_bytes() == seed_lines
    assert (folder / "result.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    stats = await emulator.stats()
    assert stats["batches_created_per_input_file"] and set(
        stats["batches_created_per_input_file"].values()
    ) == {1}


async def test_bad_file_is_rejected_with_its_report_and_input_kept(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=600)
    settings = daemon_settings(tmp_path / "root", emulator)
    bad = requests(3) + b'{"custom_id": "r1", "method": "POST"}\n'
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "bad.jsonl", bad)
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1)
    s = summary(folder)
    assert s["status"] == "rejected"
    report = orjson.loads((folder / "report.json").read_bytes())
    codes = {(e["line"], e["code"]) for e in report["errors"]}
    assert (4, "duplicate_custom_id") in codes
    assert (folder / "input.jsonl").read_bytes() == bad
    errors = read_jsonl(folder / "error.jsonl")
    assert any(e["input_line"] == 4 for e in errors)
    stats = await emulator.stats()
    assert stats["files_stored"]["count"] == 0  # nothing was sent


async def test_big_file_is_split_into_parts_and_merged_in_input_order(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=600, limits={"max_requests_per_file": 40})
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        limits={"max_requests_per_file": 40},
        jobs={"delete_remote_files": False},
    )
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "big.jsonl", requests(100))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    s = summary(folder)
    assert s["status"] == "completed"
    assert [p["requests"] for p in s["parts"]] == [40, 40, 20]
    results = read_jsonl(folder / "result.jsonl")
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(100)]
    served = await _served(emulator, s, "output")
    assert sorted((folder / "result.jsonl").read_bytes().splitlines()) == sorted(served)
    stats = await emulator.stats()
    assert len(stats["batches_created_per_input_file"]) == 3


async def test_summary_timings_are_batchds_own_clock_and_the_services_are_kept_apart(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        limits={"max_requests_per_file": 3},
        jobs={"delete_remote_files": False},
    )
    before = time.time()
    async with running_daemon(settings):
        drop(settings.paths.folder("inbox"), "timed.jsonl", requests(5))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    after = time.time()
    s = summary(folder)
    timings = s["timings"]
    created, ended = timings["batches_created_at"], timings["batches_ended_at"]
    assert len(created) == len(ended) == len(s["parts"]) == 2
    for text in (timings["claimed_at"], *created, *ended, timings["published_at"]):
        assert ISO_UTC.fullmatch(text), text
    # One clock, ours: claimed, then each batch asked for and seen ended, then published,
    # all while the test ran (the emulator's clock is moved on hours meanwhile).
    claimed, published = seconds_of(timings["claimed_at"]), seconds_of(timings["published_at"])
    for asked, seen_ended in zip(created, ended, strict=True):
        moments = [claimed, seconds_of(asked), seconds_of(seen_ended), published]
        assert moments == sorted(moments)
    assert before - 0.001 <= claimed and published <= after
    # The service's own times, under its names, exactly as its Batch object says.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for part in s["parts"]:
            async with http.get(f"{emulator.base_url}/batches/{part['batch_id']}") as r:
                batch = await r.json()
            assert part["provider_times"] == {key: iso_utc(batch.get(key)) for key in TIME_KEYS}
            assert part["provider_times"]["completed_at"] is not None


async def test_a_name_is_kept_and_a_name_used_before_gets_a_folder_that_follows_the_last(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    name = "评论 数据"
    async with running_daemon(settings) as daemon:
        for round_ in range(3):
            drop(inbox, f"{name}.jsonl", requests(1 + round_, prefix=f"r{round_}-"))
            await wait_published(outbox, 1 + round_, emulator)
            if round_ == 0:
                # Not a job's: a user's own file takes the next name.
                (outbox / f"{name}-2").write_bytes(b"mine")
        jobs = {Path(j.outbox_path or "").name: j.id for j in await daemon.store.jobs()}
    names = [name, f"{name}-3", f"{name}-4"]
    assert sorted(p.name for p in outbox.iterdir()) == sorted([*names, f"{name}-2"])
    assert (outbox / f"{name}-2").read_bytes() == b"mine"
    said = [summary(outbox / folder) for folder in names]
    # Each folder holds its own input's results, never another's, and names its input.
    for round_, (folder, s) in enumerate(zip(names, said, strict=True)):
        assert s["request_counts"]["total"] == 1 + round_
        assert s["job_id"] == jobs[folder]
        assert (s["name"], s["folder"]) == (name, folder)
        assert s["input"]["name"] == f"{name}.jsonl" and s["input"]["name_hex"] is None
    # A folder of a name used before follows the last job of that name (past the user's
    # file): a reader walks back from the newest.
    assert said[0]["follows"] is None
    assert said[1]["follows"] == {"folder": name, "job_id": jobs[name]}
    assert said[2]["follows"] == {"folder": f"{name}-3", "job_id": jobs[f"{name}-3"]}
