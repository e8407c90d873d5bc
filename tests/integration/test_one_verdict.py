"""One verdict: every file of tests/corpus (JSONL and CSV, with its sidecar) gets the same
verdict from `batchd validate` as from the daemon with the same configuration file:
accepted by both, or rejected by both for the same rules on the same lines (issue 15).

One daemon against the emulator, every file dropped at once, each job waited for until
it is published. Files with the same bytes are dropped once, and the duplicate guard is
off: the daemon holds an input with the requests of one it runs (the corpus has the same
requests with CRLF, with spaces, without a final newline), which only it can know.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from batchd.config import Settings
from batchd.documents import to_json
from batchd.testing import StartEmulator, cli, drop_all, running_daemon, wait_for

pytestmark = pytest.mark.timeout(120)

CORPUS = Path(__file__).parent.parent / "corpus"
SIDECAR = ".meta.json"
ROOMY = {"upload_per_second": 1000.0, "file_calls_per_second": 1000.0}


def _corpus() -> list[Path]:
    """The corpus's inputs, one of each content."""
    seen: set[str] = set()
    files = []
    for path in sorted([*CORPUS.glob("*.jsonl"), *CORPUS.glob("*.csv")]):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            files.append(path)
    return files


def _config(path: Path, root: Path, base_url: str) -> Path:
    """One configuration for both: job settings that differ from the defaults (mixed
    models grouped, a CSV model), the emulator as provider, fast intake and polling,
    roomy file-call caps (they decide no verdict)."""
    path.write_text(
        f"""provider = "custom"
base_url = "{base_url}"
[paths]
root = "{root}"
[jobs]
group_by_model = true
csv_model = "qwen-plus"
duplicate_window = "0h"
[intake]
settle_s = 0.05
unterminated_settle_s = 0.05
rescan_interval_s = 0.1
watch = false
[poll]
first_poll_s = 0.05
interval_s = 0.1
jitter = 0.0
[api]
backoff_base_s = 0.02
backoff_cap_s = 0.2
settle_after_s = 0.05
[log]
level = "warning"
[limits]
upload_per_second = 1000.0
file_calls_per_second = 1000.0
"""
    )
    return path


def _verdict(report: dict[str, Any]) -> tuple[bool, list[tuple[int | None, str]]]:
    return bool(report.get("valid")), [(e["line"], e["code"]) for e in report.get("errors") or []]


async def test_validate_and_the_daemon_give_every_corpus_file_the_same_verdict(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _corpus()
    emulator = await start_emulator(time_scale=3000, limits=dict(ROOMY))
    root = tmp_path / "r"
    config = _config(tmp_path / "batchd.toml", root, emulator.base_url)

    code, out, _ = await cli(
        capsys, "validate", "--config", str(config), "--json", *map(str, files)
    )
    assert code == 1  # the corpus holds bad files
    by_validate = {Path(r["path"]).name: _verdict(r) for r in map(json.loads, out.splitlines())}
    assert set(by_validate) == {p.name for p in files}

    settings = Settings.load(config)
    inbox = settings.paths.folder("inbox")
    dropped: dict[str, bytes] = {}
    for path in files:  # sidecars first: a file is claimed with its sidecar
        meta = path.with_name(path.name.rsplit(".", 1)[0] + SIDECAR)
        if meta.exists():
            dropped[meta.name] = meta.read_bytes()
    dropped.update({path.name: path.read_bytes() for path in files})
    async with running_daemon(settings) as daemon:
        drop_all(inbox, dropped)

        async def all_published() -> bool:
            jobs = await daemon.store.jobs()
            return len(jobs) == len(files) and all(j.state == "published" for j in jobs)

        await wait_for(all_published, 90, "every corpus file published", emulator=emulator)
        jobs = await daemon.store.jobs()
    by_daemon = {
        j.inbox_name: _verdict(to_json(j.report) if j.report is not None else {}) for j in jobs
    }
    outcomes = {j.inbox_name: j.outcome for j in jobs}
    for name, (valid, _) in by_daemon.items():
        assert (outcomes[name] == "rejected") is (not valid), (name, outcomes[name])

    differ = {
        name: {"validate": by_validate[name], "daemon": by_daemon.get(name)}
        for name in sorted(by_validate)
        if by_validate[name] != by_daemon.get(name)
    }
    assert not differ, json.dumps(differ, indent=1)
    accepted = sum(valid for valid, _ in by_validate.values())
    assert 0 < accepted < len(files)  # both kinds were judged
