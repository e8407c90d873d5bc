"""Options that cannot be run as written are refused before anything is paid (issue 15):
a sidecar with broken JSON or a misspelt key, a completion window the provider refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.documents import JobOptions
from batchd.errors import ConfigError
from batchd.inputs.verdict import sidecar_options
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


def test_a_sidecar_is_used_whole_or_not_at_all() -> None:
    assert sidecar_options("a.meta.json", b'{"model": "qwen-plus", "priority": 2}') == JobOptions(
        model="qwen-plus", priority=2
    )
    misspelt = sidecar_options("a.meta.json", b'{"modle": "qwen-max", "priorty": 1}').sidecar_error
    assert "a.meta.json" in misspelt
    assert "'modle' (did you mean 'model'?)" in misspelt
    assert "'priorty' (did you mean 'priority'?)" in misspelt
    assert "not JSON" in sidecar_options("a.meta.json", b'{"model": ').sidecar_error
    assert "object" in sidecar_options("a.meta.json", b"[1, 2]").sidecar_error


async def test_a_bad_sidecar_or_window_rejects_the_job_and_sends_nothing(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    inbox.mkdir(parents=True)
    cases = {
        "typo": (b'{"modle": "qwen-max"}', "did you mean 'model'"),
        "broken": (b'{"model": "qwen-max",', "not JSON"),
        "quick": (b'{"completion_window": "2h"}', "24h to 336h"),
        "wordy": (b'{"completion_window": "two days"}', "completion_window"),
    }
    async with running_daemon(settings):
        for name, (sidecar, _) in cases.items():
            (inbox / f"{name}.meta.json").write_bytes(sidecar)
            drop(inbox, f"{name}.jsonl", requests(2, prefix=f"{name}-"))
        folders = await wait_published(outbox, len(cases), emulator)
    stats = await emulator.stats()
    assert stats["calls"]["upload"]["served"] == 0  # nothing sent, nothing paid
    by_name = {folder.name: folder for folder in folders}
    for name, (_, says) in cases.items():
        report = summary(by_name[name])
        assert report["status"] == "rejected", name
        errors = read_jsonl(by_name[name] / "error.jsonl")
        text = str(report) + str(errors)
        assert says in text, (name, text[:500])


def test_a_default_window_the_provider_refuses_is_a_config_error(tmp_path: Path) -> None:
    from batchd.config import Settings

    config = tmp_path / "c.toml"
    config.write_text('[jobs]\ncompletion_window = "2h"\n')
    with pytest.raises(ConfigError, match="24h to 336h"):
        Settings.load(config)
    config.write_text('provider = "openai"\n[jobs]\ncompletion_window = "48h"\n')
    with pytest.raises(ConfigError, match="24h to 24h"):
        Settings.load(config)


async def test_summary_says_which_options_the_job_ran_with(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(tmp_path / "r", emulator)
    inbox = settings.paths.folder("inbox")
    inbox.mkdir(parents=True)
    (inbox / "opts.meta.json").write_bytes(b'{"completion_window": "48h", "priority": 3}')
    async with running_daemon(settings):
        drop(inbox, "opts.jsonl", requests(1))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
    assert summary(folder)["options"] == {"completion_window": "48h", "priority": 3}


async def test_csv_columns_from_the_sidecar_or_the_configuration_keep_the_header_unsent(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """A CSV whose header is `key,prompt`: declared in its sidecar or in the
    configuration, the header is never sent; declared nowhere, the file is rejected with
    the fix, and nothing is uploaded for it."""
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(
        tmp_path / "r",
        emulator,
        jobs={"csv_model": "qwen-plus", "csv_columns": {"custom_id": "id", "content": "text"}},
    )
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    inbox.mkdir(parents=True)
    (inbox / "declared.meta.json").write_bytes(
        b'{"columns": {"custom_id": "key", "content": "prompt"}}'
    )
    async with running_daemon(settings):
        drop(inbox, "declared.csv", b"key,prompt\nk1,hello\nk2,world\n")
        drop(inbox, "configured.csv", b"text,id\nhello,c1\n")
        drop(inbox, "undeclared.csv", b"key,prompt\nk1,hello\n")
        folders = await wait_published(outbox, 3, emulator)
    by_name = {folder.name: summary(folder) for folder in folders}
    assert by_name["declared"]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert by_name["declared"]["options"]["columns"] == {"custom_id": "key", "content": "prompt"}
    assert [r["custom_id"] for r in read_jsonl(outbox / "declared" / "result.jsonl")] == [
        "k1",
        "k2",
    ]
    assert by_name["configured"]["request_counts"]["total"] == 1
    assert by_name["undeclared"]["status"] == "rejected"
    (error,) = read_jsonl(outbox / "undeclared" / "error.jsonl")
    assert error["error"]["code"] == "csv_header"
    assert '"columns"' in error["error"]["message"]
    stats = await emulator.stats()
    assert stats["calls"]["upload"]["served"] == 2  # the two good files only
