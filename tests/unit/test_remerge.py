"""A retry chain's answers merged into its root's folder, in the original order, replaced
atomically (the files side of batchd.outbox.remerge; the daemon's side is in
tests/integration/test_retry_merged.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd import failpoints
from batchd.inputs.lines import iter_lines
from batchd.outbox.remerge import (
    MERGED,
    Contributor,
    _write_renumbered,
    renumbered,
    replace_merged,
    write_merged,
)
from batchd.testing import read_jsonl, requests


def ok(cid: str, answer: str) -> bytes:
    body = {"choices": [{"message": {"content": answer}}]}
    return orjson.dumps({"custom_id": cid, "response": {"status_code": 200, "body": body}})


def failed(cid: str, status: int, code: str, line: int) -> bytes:
    body = {"error": {"code": code, "message": code}}
    error = {"code": code, "message": code}
    return orjson.dumps(
        {
            "custom_id": cid,
            "response": {"status_code": status, "body": body},
            "error": error,
            "input_line": line,
        }
    )


def folder(path: Path, results: list[bytes], errors: list[bytes], inputs: bytes = b"") -> Path:
    path.mkdir(parents=True)
    (path / "result.jsonl").write_bytes(b"".join(r + b"\n" for r in results))
    (path / "error.jsonl").write_bytes(b"".join(e + b"\n" for e in errors))
    if inputs:
        (path / "input.jsonl").write_bytes(inputs)
    return path


@pytest.fixture
def chain(tmp_path: Path) -> list[Contributor]:
    """A root of five requests (a blank line before the fifth), r1 refused for its
    content, r3 failed on a 500; a retry answered r3; a retry with --all still fails r1."""
    lines = requests(5).splitlines(keepends=True)
    root = folder(
        tmp_path / "root",
        [ok("r0", "a0"), ok("r2", "a2"), ok("r4", "a4")],
        [failed("r1", 400, "DataInspectionFailed", 2), failed("r3", 500, "InternalError", 4)],
        b"".join(lines[:4]) + b"\n" + lines[4],
    )
    first = folder(tmp_path / "root-retry", [ok("r3", "again")], [])
    second = folder(tmp_path / "root-retry-all", [], [failed("r1", 400, "DataInspectionFailed", 1)])
    return [
        Contributor("j0", "root", root),
        Contributor("j1", "root-retry", first, "j0"),
        Contributor("j2", "root-retry-all", second, "j0"),
    ]


def _content(line: dict[str, Any]) -> str:
    return str(line["response"]["body"]["choices"][0]["message"]["content"])


def test_the_merged_set_follows_the_original_input_with_the_latest_answers(
    chain: list[Contributor], tmp_path: Path
) -> None:
    target = tmp_path / "set"
    target.mkdir()
    stats = write_merged(chain[0].folder, chain, target, merged_at=123.0)
    results = read_jsonl(target / "result.jsonl")
    assert [(r["custom_id"], _content(r)) for r in results] == [
        ("r0", "a0"),
        ("r2", "a2"),
        ("r3", "again"),  # the retry's answer replaces the failure it retried
        ("r4", "a4"),
    ]
    (still,) = read_jsonl(target / "error.jsonl")
    # Still failing, with the latest reason, numbered as in the original input.
    assert (still["custom_id"], still["input_line"]) == ("r1", 2)
    assert stats["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert stats["still_failing"] == {"DataInspectionFailed": 1}
    assert [j["answers"] for j in stats["jobs"]] == [3, 1, 1]
    assert orjson.loads((target / "merged.json").read_bytes()) == stats
    csv_rows = (target / "result.csv").read_text(encoding="utf-8-sig").splitlines()
    assert csv_rows[0].startswith("custom_id,") and len(csv_rows) == 1 + 5
    # One row per request in the original input's order, the failure in its place.
    assert [row.split(",")[0] for row in csv_rows[1:]] == ["r0", "r1", "r2", "r3", "r4"]
    assert csv_rows[2].split(",")[4] == "DataInspectionFailed"
    assert csv_rows[4].split(",")[7] == "again"


def test_a_success_is_copied_byte_for_byte(chain: list[Contributor], tmp_path: Path) -> None:
    target = tmp_path / "set"
    target.mkdir()
    write_merged(chain[0].folder, chain, target, merged_at=1.0)
    merged = (target / "result.jsonl").read_bytes().splitlines()
    assert merged[2] == ok("r3", "again")
    assert merged[0] == (chain[0].folder / "result.jsonl").read_bytes().splitlines()[0]


def test_a_rerun_replaces_the_set_in_one_step_and_a_crash_leaves_the_old_one(
    chain: list[Contributor],
) -> None:
    root = chain[0].folder
    first = replace_merged(root, chain[:2], merged_at=1.0)
    assert first["request_counts"]["completed"] == 4
    link = root / MERGED
    assert link.is_symlink() and (link / "merged.json").is_file()
    old_target = os.readlink(link)
    failpoints.arm("publish.merged=raise")
    try:
        with pytest.raises(failpoints.FailpointError):
            replace_merged(root, chain, merged_at=2.0)
    finally:
        failpoints.arm("")
    # The old set, whole; the half-made one gone.
    assert os.readlink(link) == old_target
    assert orjson.loads((link / "merged.json").read_bytes())["merged_at"] == 1.0
    assert [p.name for p in root.iterdir() if p.name.startswith(".merged")] == [old_target]
    second = replace_merged(root, chain, merged_at=3.0)
    assert os.readlink(link) != old_target and len(second["jobs"]) == 3
    hidden = [p.name for p in root.iterdir() if p.name.startswith(".merged")]
    assert hidden == [os.readlink(link)]  # the old set removed once the new one is linked


def test_a_folder_named_merged_that_is_not_ours_is_left_alone(
    chain: list[Contributor],
) -> None:
    mine = chain[0].folder / MERGED
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own")
    with pytest.raises(FileExistsError):
        replace_merged(chain[0].folder, chain, merged_at=1.0)
    assert (mine / "notes.txt").read_text() == "a user's own"
    elsewhere = chain[1].folder / MERGED
    elsewhere.symlink_to(mine)  # a link of the user's own, too
    with pytest.raises(FileExistsError):
        replace_merged(chain[1].folder, chain, merged_at=1.0)
    assert os.readlink(elsewhere) == str(mine)


def test_input_line_is_renumbered_where_batchd_put_it() -> None:
    line = failed("r1", 400, "X", 7) + b"\n"
    assert orjson.loads(renumbered(line, 12))["input_line"] == 12
    assert renumbered(line, 12).replace(b"12", b"7") == line
    wrapped = b'{"input_line":3,"raw":"not json"}\n'
    assert renumbered(wrapped, 9) == b'{"input_line":9,"raw":"not json"}\n'
    bare = b'{"custom_id":"c","error":{"code":"X"}}\n'
    assert orjson.loads(renumbered(bare, 4))["input_line"] == 4


@pytest.mark.parametrize(
    "line",
    [
        failed("r1", 400, "X" * 300, 7) + b"\n",
        b'{"input_line":7,"raw":"' + b"y" * 300 + b'"}\n',
    ],
)
def test_a_long_line_is_renumbered_without_holding_it(line: bytes) -> None:
    source = io.BytesIO(line)
    (held,) = iter_lines(source, 64)  # over the cap: not held
    assert held.data is None
    out = io.BytesIO()
    _write_renumbered(source, held, 12, out)
    assert out.getvalue() == renumbered(line, 12)
