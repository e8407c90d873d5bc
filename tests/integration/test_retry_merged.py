"""`batchd retry` pays only for what can succeed, links the retry to its parent, and the
parent's folder gets every answer in one place (issue 15, "Retry that saves")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from batchd.testing import (
    StartEmulator,
    cli,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_published,
)

COUNT = 30


def _code(line: dict[str, Any]) -> str | None:
    error = line.get("error") or {}
    return error.get("code")


def _expected(original: list[str], folders: list[Path]) -> tuple[list[str], dict[str, str]]:
    """From the jobs' own folders: the custom_ids answered by any job, in the original
    order, and the latest failure code of each still failing."""
    answered: set[str] = set()
    latest: dict[str, str] = {}
    for folder in folders:
        answered |= {r["custom_id"] for r in read_jsonl(folder / "result.jsonl")}
        for line in read_jsonl(folder / "error.jsonl"):
            latest[line["custom_id"]] = str(_code(line))
    ok = [cid for cid in original if cid in answered]
    return ok, {cid: code for cid, code in latest.items() if cid not in answered}


def _check_merged(root: Path, folders: list[Path]) -> dict[str, Any]:
    original = [r["custom_id"] for r in read_jsonl(root / "input.jsonl")]
    ok, failing = _expected(original, folders)
    merged = root / "merged"
    results = read_jsonl(merged / "result.jsonl")
    errors = read_jsonl(merged / "error.jsonl")
    assert [r["custom_id"] for r in results] == ok
    assert [e["custom_id"] for e in errors] == [c for c in original if c in failing]
    for error in errors:  # numbered as in the original input, with the latest reason
        assert original[error["input_line"] - 1] == error["custom_id"]
        assert _code(error) == failing[error["custom_id"]]
    stats: dict[str, Any] = json.loads((merged / "merged.json").read_bytes())
    assert stats["request_counts"] == {
        "total": len(original),
        "completed": len(ok),
        "failed": len(failing),
    }
    assert [Path(j["outbox"]) for j in stats["jobs"]] == folders
    return stats


async def test_retry_leaves_out_refusals_links_jobs_and_merges_into_the_original(
    start_emulator: StartEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator = await start_emulator(time_scale=3000, request_failure_rate=0.5, seed=11)
    settings = daemon_settings(tmp_path / "r", emulator)
    sock = str(settings.socket_path)
    inbox, outbox = settings.paths.folder("inbox"), settings.paths.folder("outbox")
    async with running_daemon(settings):
        drop(inbox, "big.jsonl", requests(COUNT))
        (root,) = await wait_published(outbox, 1, emulator)
        root_id = summary(root)["job_id"]
        codes = [_code(e) for e in read_jsonl(root / "error.jsonl")]
        refused = codes.count("DataInspectionFailed")
        assert refused and len(codes) > refused, codes  # the seed gives both kinds

        code, out, _ = await cli(capsys, "retry", "--socket", sock, root_id)
        assert code == 0, out
        assert "big-retry.jsonl" in out and f"({len(codes) - refused} requests)" in out
        assert f"{refused} left out (DataInspectionFailed {refused})" in out
        assert "--all" in out
        folders = await wait_published(outbox, 2, emulator)
        child = outbox / "big-retry"
        assert folders == [root, child]
        child_summary = summary(child)
        assert child_summary["retry_of"] == root_id
        assert child_summary["request_counts"]["total"] == len(codes) - refused
        assert child_summary["options"]["retry_left_out"] == {"DataInspectionFailed": refused}
        stats = _check_merged(root, [root, child])
        assert stats["still_failing"]["DataInspectionFailed"] >= refused

        # Linked both ways, in `show` and in `jobs --json`.
        child_id = child_summary["job_id"]
        code, out, _ = await cli(capsys, "show", "--socket", sock, "--json", root_id)
        shown = json.loads(out)
        assert shown["retried_by"] == [child_id] and shown["merged"] == str(root / "merged")
        assert shown["left_out"] == {"DataInspectionFailed": refused}
        code, out, _ = await cli(capsys, "show", "--socket", sock, root_id)
        assert f"{refused} failure(s) left out of the retry (DataInspectionFailed" in out
        code, out, _ = await cli(capsys, "jobs", "--socket", sock, "--json")
        listed = {j["id"]: j for j in json.loads(out)}
        assert listed[root_id]["retried_by"] == [child_id]
        assert listed[child_id]["retry_of"] == root_id
        code, out, _ = await cli(capsys, "show", "--socket", sock, child_id)
        assert f"retry of {root_id}" in out
        assert f"{refused} failure(s) of {root_id} left out" in out
        assert "DataInspectionFailed" in out and str(root / "merged") in out

        # Asked again: nothing is sent twice, and it says what was left out.
        code, out, _ = await cli(capsys, "retry", "--socket", sock, root_id)
        assert code == 0 and out.startswith("already resubmitted as big-retry.jsonl")
        assert f"DataInspectionFailed {refused}" in out

        # --all now sends just the refusals left out, and they merge into the same set.
        code, out, _ = await cli(capsys, "retry", "--socket", sock, "--all", root_id)
        assert code == 0 and f"big-retry-all.jsonl ({refused} requests)" in out
        await wait_published(outbox, 3, emulator)
        last = outbox / "big-retry-all"
        assert summary(last)["request_counts"]["total"] == refused
        stats = _check_merged(root, [root, child, last])
        assert len(stats["jobs"]) == 3
        code, out, _ = await cli(capsys, "retry", "--socket", sock, "--all", root_id)
        assert code == 0 and "already resubmitted as big-retry-all.jsonl" in out
        code, out, _ = await cli(capsys, "show", "--socket", sock, "--json", root_id)
        assert json.loads(out)["left_out"] is None  # sent since

        # A retry of a retry merges into the chain's root, not into its parent.
        assert summary(child)["request_counts"]["failed"]  # the seed fails some again
        code, out, _ = await cli(capsys, "retry", "--socket", sock, "--all", child_id)
        assert code == 0, out
        await wait_published(outbox, 4, emulator)
        grandchild = outbox / "big-retry-retry-all"
        _check_merged(root, [root, child, last, grandchild])
        assert not (child / "merged").exists()
    # Only one set is kept: the link and the folder it names.
    hidden = [p.name for p in root.iterdir() if p.name.startswith(".merged")]
    assert hidden == [os.readlink(root / "merged")]
