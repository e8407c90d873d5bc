"""The caps hold under pressure: more queued parts than the running cap, counted by the
emulator (TESTING.md C.14, C.15). Caps are scaled to short windows for test time."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartEmulator
from tests.integration.daemon_harness import (
    daemon_settings,
    drop,
    requests,
    running,
    summary,
    wait_published,
)

CAPS = {
    "running_batches": 4,
    "create_per_minute": 5,
    "retrieve_per_minute": 8,
    "list_per_minute": 3,
    "max_requests_per_file": 5,
}


async def test_queued_parts_never_push_past_the_running_or_rate_caps(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=200, rate_window_s=1.0, limits=CAPS)
    settings = daemon_settings(
        tmp_path / "root",
        emulator,
        limits=CAPS,
        api={"rate_window_s": 1.0},
        poll={"interval_s": 0.2, "first_poll_s": 0.1},
    )
    async with running(settings):
        for i in range(4):
            drop(settings.paths.folder("inbox"), f"q{i}.jsonl", requests(20, prefix=f"q{i}-"))
        folders = await wait_published(settings.paths.folder("outbox"), 4, None, timeout_s=60)
    assert all(summary(f)["status"] == "completed" for f in folders)
    stats = await emulator.stats()
    assert stats["batches_created"] == 16
    assert stats["max_unfinished_batches"] == CAPS["running_batches"]
    for name, cap_key in (
        ("create", "create_per_minute"),
        ("retrieve", "retrieve_per_minute"),
        ("list", "list_per_minute"),
    ):
        calls = stats["calls"][name]
        assert calls["max_in_window"] <= CAPS[cap_key], (name, calls)
        assert calls["refused_429"] == 0, (name, calls)
    assert stats["calls"]["create"]["max_in_window"] == CAPS["create_per_minute"] or (
        stats["max_unfinished_batches"] == CAPS["running_batches"]
    )
