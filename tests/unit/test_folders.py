"""The spool's and the outbox's layouts are each in one place (`batchd.inputs.spool`,
`batchd.outbox.folder`): every member name spelled there once, and an outbox folder read
and written through a small interface that an object store can implement again."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import msgspec
import orjson

import batchd
from batchd.documents import SUMMARY_VERSION, InputOf, RequestCounts, Summary, decode_summary
from batchd.inputs.spool import SpoolFolder
from batchd.outbox.folder import SUMMARY, Outbox, OutboxFolder

PACKAGE = Path(batchd.__file__).parent

MEMBER_NAMES = {
    "input.jsonl",
    "claim.json",
    "late.meta.json",
    "meta.meta.json",
    "result.jsonl",
    "error.jsonl",
    "unattributed.jsonl",
    "result.csv",
    "summary.json",
    "report.json",
    "merged.json",
}
HOMES = {PACKAGE / "inputs" / "spool.py", PACKAGE / "outbox" / "folder.py"}
# Spelled elsewhere on purpose, each with why.
ELSEWHERE = {
    # The light client reads an outbox folder without importing the daemon's packages.
    (PACKAGE / "client.py", "result.jsonl"),
    (PACKAGE / "client.py", "error.jsonl"),
    # The name of a file uploaded to the emulator, not a spool member.
    (PACKAGE / "testing.py", "input.jsonl"),
}


def summary_of(job_id: str) -> Summary:
    return Summary(
        job_id=job_id,
        name="data",
        folder="data",
        input=InputOf(name="data.jsonl"),
        status="completed",
        request_counts=RequestCounts(),
    )


def test_every_spool_and_outbox_name_is_spelled_in_its_layout_module_only() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and node.value in MEMBER_NAMES
                and (path, node.value) not in ELSEWHERE
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_an_outbox_folder_reads_writes_replaces_lists_and_removes_members(
    tmp_path: Path,
) -> None:
    folder = OutboxFolder(tmp_path / "job")
    folder.path.mkdir()
    assert folder.list() == [] and not folder.complete() and folder.head() is None
    folder.write("result.jsonl", b"a\n")
    folder.replace("result.jsonl", b"b\n")
    assert folder.read("result.jsonl") == b"b\n" and folder.exists("result.jsonl")
    folder.write_summary(summary_of("J1"))
    assert folder.complete() and folder.job_id() == "J1"
    assert folder.summary() == summary_of("J1")
    assert folder.list() == ["result.jsonl", SUMMARY]
    folder.remove("result.jsonl")
    folder.remove("result.jsonl")  # a member not there: nothing to do
    assert folder.list() == [SUMMARY]


def test_the_outbox_tells_who_holds_a_name_and_lists_published_folders(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    staging = outbox.staging("data", "J1")
    staging.path.mkdir()
    staging.write_summary(summary_of("J1"))
    assert outbox.holder("data", "J1") is None and list(outbox.published()) == []
    outbox.publish(staging, outbox.folder("data"))
    outbox.sync()
    (tmp_path / "mine.txt").write_text("a user's file")
    assert outbox.holder("data", "J1") == "self"
    assert outbox.holder("data", "J2") == "other"
    assert outbox.holder("mine.txt", "J1") == "other"
    assert outbox.taken("mine.txt") and not outbox.taken("free")
    assert list(outbox.published()) == [("data", "J1")]


def test_a_spool_folder_names_each_file_of_a_job(tmp_path: Path) -> None:
    spool = SpoolFolder.of_input(tmp_path / "J1" / "input.csv")
    assert spool.path == tmp_path / "J1" and spool.job_id == "J1"
    assert spool.input("csv") == tmp_path / "J1" / "input.csv"
    assert spool.requests == tmp_path / "J1" / "input.jsonl"
    assert spool.result(3, "error") == tmp_path / "J1" / "part-003.error.jsonl"
    assert spool.followup(1, 2) == tmp_path / "J1" / "followup-1-002.jsonl"


def struct_fields(struct: type[msgspec.Struct], prefix: str = "") -> list[str]:
    """Every field of `struct` and of the structs in it, as dotted paths."""
    paths = []
    for field in msgspec.structs.fields(struct):
        path = f"{prefix}{field.encode_name}"
        paths.append(path)
        for inner in nested_structs(field.type):
            paths.extend(struct_fields(inner, f"{path}."))
    return paths


def nested_structs(kind: object) -> list[type[msgspec.Struct]]:
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return [kind]
    return [s for arg in typing.get_args(kind) for s in nested_structs(arg)]


def test_docs_list_every_field_of_summary_json_and_nothing_else() -> None:
    doc = (PACKAGE.parent / "docs" / "folders.md").read_text(encoding="utf-8")
    section = doc.split("### summary.json, field by field", 1)[1].split("\n\n`status`", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9_.]+)` \|", section, flags=re.MULTILINE)
    assert listed == struct_fields(Summary)
    assert f"`version` is {SUMMARY_VERSION}" in section


def test_a_summary_written_decodes_with_its_schema_and_keeps_its_keys(tmp_path: Path) -> None:
    folder = OutboxFolder(tmp_path)
    summary = summary_of("J1")
    folder.write_summary(summary)
    raw = folder.read(SUMMARY)
    assert decode_summary(raw) == summary
    written = orjson.loads(raw)
    assert list(written) == [f.encode_name for f in msgspec.structs.fields(Summary)]
    assert written["version"] == SUMMARY_VERSION
    assert "report" not in written["cost"] and written["error"] is None
