"""The real daemon against the emulator: inbox to outbox."""

from __future__ import annotations

from pathlib import Path

import orjson

from batchd.emulator import Emulator
from batchd.testing import (
    StartEmulator,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_published,
)


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
    usage = {"prompt_tokens": 40, "completion_tokens": 12, "reasoning_tokens": 0}
    usage["total_tokens"] = 52
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


async def test_a_name_used_before_gets_a_numbered_outbox_folder(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "root", emulator)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings):
        for round_, count in ((0, 1), (1, 2), (2, 3)):
            drop(inbox, "same.jsonl", requests(1 + round_, prefix=f"r{round_}-"))
            await wait_published(outbox, count, emulator)
    names = sorted(p.name for p in outbox.iterdir())
    assert names == ["same", "same-2", "same-3"]
    # Each folder holds its own input's results, never another's.
    for round_, name in enumerate(names):
        assert summary(outbox / name)["request_counts"]["total"] == 1 + round_
