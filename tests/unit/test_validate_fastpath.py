"""The validator's fast path gives the same verdicts as its rule-by-rule path.

Most lines of a big file are settled inline: a line in orjson's compact form skips the
walk of its parsed object, a request like the last clean one skips the per-rule checks,
and custom_ids are kept as 64-bit hashes whose collisions a second pass settles. These
tests put a broken line among clean ones (where the fast path is running) and force the
rare branches: hash collisions, tiny read blocks, a kernel that cannot copy files.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.config import PROFILES, ProviderLimits, merge_limits
from batchd.inputs import validate
from batchd.inputs.validate import Report, validate_file, validate_stream, write_parts

DASHSCOPE = PROFILES["dashscope"].limits
CORPUS = Path(__file__).parent.parent / "corpus"
# The JSONL files (the CSV ones are converted before this validator sees them).
VERDICTS: dict[str, dict[str, Any]] = {
    name: case
    for name, case in json.loads((CORPUS / "verdicts.json").read_text()).items()
    if name.endswith(".jsonl")
}


def request(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "qwen-plus", "messages": [{"role": "user", "content": "你好"}], **body},
    }


def compact(obj: Any) -> bytes:
    """orjson's compact form, or the same form by hand where orjson will not nest so deep."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def spaced(obj: Any) -> bytes:
    """How Python's json module writes by default: not orjson's compact form."""
    return json.dumps(obj).encode()


def among_clean(bad: bytes, encode: Any = compact, count: int = 6) -> bytes:
    """`bad` as line 4 of a file of clean requests in the same form."""
    lines = [encode(request(f"id-{i}")) for i in range(count)]
    lines[3] = bad
    return b"".join(line + b"\n" for line in lines)


def check(data: bytes, limits: ProviderLimits = DASHSCOPE, **options: Any) -> Report:
    return validate_stream(io.BytesIO(data), path="in.jsonl", limits=limits, **options)


def codes(report: Report) -> list[tuple[int | None, str]]:
    return [(e.line, e.code) for e in report.errors]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def with_raw(line: bytes, field: bytes) -> bytes:
    """Put raw JSON text `field` (a `"key":value` pair) first in the line's body."""
    return line.replace(b'"body":{', b'"body":{' + field + b",", 1)


COMPACT_BREAKAGES = [
    ("duplicate top-level key", compact(request("x")).replace(b"{", b'{"method":"GET",', 1)),
    ("duplicate nested key", with_raw(compact(request("x")), b'"model":"qwen-max"')),
    ("int just past 64 bits", with_raw(compact(request("x")), b'"seed":9223372036854775808')),
    ("int past unsigned 64 bits", with_raw(compact(request("x")), b'"seed":18446744073709551616')),
    ("257 levels", compact(request("x", extra=nested(255)))),
]


@pytest.mark.parametrize("encode", [compact, spaced], ids=["compact", "spaced"])
@pytest.mark.parametrize(
    ("case", "line"), COMPACT_BREAKAGES, ids=[case for case, _ in COMPACT_BREAKAGES]
)
def test_json_text_rules_hold_on_compact_and_spaced_lines_amid_clean_ones(
    encode: Any, case: str, line: bytes
) -> None:
    if encode is spaced:
        line = line.replace(b'":', b'": ').replace(b',"', b', "')
    report = check(among_clean(line, encode))
    expected = {
        "duplicate top-level key": "duplicate_key",
        "duplicate nested key": "duplicate_key",
        "int just past 64 bits": "number_too_large",
        "int past unsigned 64 bits": "number_too_large",
        "257 levels": "too_deep",
    }[case]
    assert codes(report) == [(4, expected)]
    assert report.requests == 6


@pytest.mark.parametrize(
    "extra",
    [nested(253), nested(254), 2**53 + 1, 2**63 - 1, -(2**63), 1.5e300],
    ids=["255 levels", "256 levels", "2**53+1", "int64 max", "int64 min", "big float"],
)
def test_lines_orjson_will_not_write_back_compactly_are_still_accepted(extra: Any) -> None:
    # Deeper than orjson serializes, or integers beyond 53 bits: the shortcut declines
    # and the walk accepts them, as before.
    report = check(among_clean(compact(request("id-3", extra=extra))))
    assert report.valid, report.render()
    assert [(p.first_line, p.last_line, p.requests) for p in report.parts] == [(1, 6, 6)]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "a"}] * 3, []),
        ([{"role": "user", "content": "a"}, "b", {"role": "user", "content": "c"}], "invalid"),
        ([{"role": "user", "content": "a"}, "b"], "invalid"),
        ([], "invalid"),
        ({"role": "user"}, "invalid"),
    ],
    ids=["three objects", "a string among three", "a string second", "none", "not a list"],
)
def test_every_chat_message_must_be_an_object_amid_clean_lines(
    messages: Any, expected: Any
) -> None:
    line = compact(request("x")).replace(
        compact(request("x")["body"]["messages"]), compact(messages), 1
    )
    report = check(among_clean(line))
    assert codes(report) == ([(4, "invalid_messages")] if expected else [])


def test_crlf_compact_lines_are_planned_whole_with_their_line_endings() -> None:
    lines = [compact(request(f"id-{i}")) for i in range(5)]
    data = b"".join(line + b"\r\n" for line in lines)
    report = check(data, merge_limits(DASHSCOPE, {"max_requests_per_file": 2}))
    assert report.valid
    assert [p.ranges for p in report.parts] == [
        [(0, 2 * len(lines[0]) + 4)],
        [(2 * len(lines[0]) + 4, 4 * len(lines[0]) + 8)],
        [(4 * len(lines[0]) + 8, len(data))],
    ]


def test_a_long_crlf_line_reports_its_length_without_the_line_ending() -> None:
    lines = [compact(request("1")), compact(request("2", pad="x" * 400)), compact(request("3"))]
    data = b"".join(line + b"\r\n" for line in lines)
    report = check(data, merge_limits(DASHSCOPE, {"max_line_bytes": 200}))
    assert codes(report) == [(2, "line_too_long")]
    assert report.errors[0].message.startswith(f"line is {len(lines[1])} bytes;")


def test_a_repeated_custom_id_names_the_line_that_used_it_first() -> None:
    lines = [compact(request(i)) for i in ["a", "b", "a", "c", "b", "a"]]
    report = check(b"".join(line + b"\n" for line in lines))
    assert codes(report) == [
        (3, "duplicate_custom_id"),
        (5, "duplicate_custom_id"),
        (6, "duplicate_custom_id"),
    ]
    assert report.errors[0].message == "custom_id 'a' is already used on line 1"
    assert report.errors[2].message == "custom_id 'a' is already used on line 1"
    assert report.parts == []


@pytest.mark.parametrize("collide", [False, True], ids=["real hashes", "every hash equal"])
def test_custom_id_uniqueness_is_exact_whatever_the_hashes(
    monkeypatch: pytest.MonkeyPatch, collide: bool
) -> None:
    if collide:
        monkeypatch.setattr(validate, "_id_hash", lambda custom_id: 42)
    distinct = b"".join(compact(request(f"id-{i}")) + b"\n" for i in range(300))
    assert check(distinct).valid
    repeated = among_clean(compact(request("id-1")), count=300)
    report = check(repeated)
    assert codes(report) == [(4, "duplicate_custom_id")]
    assert report.error_count == 1


def test_duplicates_found_at_the_end_merge_into_line_order_and_the_error_cap() -> None:
    lines = [
        compact(request("a")),
        b"[]",  # not_an_object
        b"\xef\xbb\xbf" + compact(request("a")),  # bom, then a repeated id, then more
        compact(request("b")).replace(b'"POST"', b'"GET"'),
        compact(request("a")).replace(b'"POST"', b'"GET"'),
    ]
    data = b"".join(line + b"\n" for line in lines)
    report = check(data)
    assert codes(report) == [
        (2, "not_an_object"),
        (3, "bom"),
        (3, "duplicate_custom_id"),
        (4, "invalid_method"),
        (5, "duplicate_custom_id"),
        (5, "invalid_method"),
    ]
    capped = check(data, max_errors=3)
    assert codes(capped) == codes(report)[:3] and capped.error_count == 6


def test_a_line_that_recorded_no_id_is_not_compared_in_the_second_pass() -> None:
    # Line 2 repeats "a" but breaks a JSON text rule first: its id never counted.
    dup_key = compact(request("a")).replace(b'"method":"POST"', b'"method":"POST","method":"POST"')
    lines = [compact(request("a")), dup_key, compact(request("a"))]
    report = check(b"".join(line + b"\n" for line in lines))
    assert codes(report) == [(2, "duplicate_key"), (3, "duplicate_custom_id")]


@pytest.mark.parametrize("block_bytes", [1, 7, 333])
@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_read_block_boundaries_do_not_change_any_verdict(
    monkeypatch: pytest.MonkeyPatch, name: str, block_bytes: int
) -> None:
    case = VERDICTS[name]
    limits = merge_limits(DASHSCOPE, case.get("limits", {}))
    options = case.get("options", {})
    expected = validate_file(CORPUS / name, limits, **options).to_dict()
    monkeypatch.setattr(validate, "_BLOCK_BYTES", block_bytes)
    assert validate_file(CORPUS / name, limits, **options).to_dict() == expected


@pytest.mark.parametrize("block_bytes", [1, 50, 4096])
def test_long_lines_and_a_last_line_without_newline_across_blocks(
    monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    monkeypatch.setattr(validate, "_BLOCK_BYTES", block_bytes)
    long = compact(request("2", pad="x" * 3000))
    data = (
        compact(request("1"))
        + b"\n"
        + long
        + b"\r\n"
        + compact(request("3"))
        + b"\n"
        + compact(request("4", pad="y" * 3000))
    )
    report = check(data, merge_limits(DASHSCOPE, {"max_line_bytes": 1000}))
    assert codes(report) == [(2, "line_too_long"), (4, "line_too_long")]
    assert f"line is {len(long)} bytes" in report.errors[0].message
    assert report.requests == 4 and report.bytes == len(data)
    truncated = check(data[: len(data) - 10])
    assert codes(truncated) == [(4, "truncated_last_line")]


def peak_bytes(lines: int) -> int:
    """Peak bytes Python allocates validating `lines` distinct short requests."""
    data = b"".join(compact(request(f"request-{i:08d}")) + b"\n" for i in range(lines))
    tracemalloc.start()
    try:
        report = check(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.valid and report.requests == lines
    return peak


def test_each_custom_id_costs_a_few_bytes_of_memory() -> None:
    per_id = (peak_bytes(50_000) - peak_bytes(10_000)) / 40_000
    # A set of the ids themselves took about 100 bytes each; an 8-byte hash is kept now.
    assert per_id < 16, per_id


@pytest.mark.parametrize(
    "kernel",
    ["declines", "cannot", "absent"],
)
def test_parts_are_copied_by_hand_when_the_kernel_will_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(compact(request(str(i))) + b"\n" for i in range(7)))
    report = validate_file(source, merge_limits(DASHSCOPE, {"max_requests_per_file": 3}))
    expected = [p.read_bytes() for p in write_parts(report, source, tmp_path / "kernel")]

    def cannot(*args: Any) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    if kernel == "declines":
        monkeypatch.setattr(os, "copy_file_range", lambda *args: 0, raising=False)
    elif kernel == "cannot":
        monkeypatch.setattr(os, "copy_file_range", cannot, raising=False)
    else:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    written = write_parts(report, source, tmp_path / "by-hand")
    assert [p.read_bytes() for p in written] == expected
    assert b"".join(expected) == source.read_bytes()


def test_a_kernel_copy_error_that_is_not_about_support_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(compact(request(str(i))) + b"\n" for i in range(4)))
    report = validate_file(source, merge_limits(DASHSCOPE, {"max_requests_per_file": 2}))

    def failing(*args: Any) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", failing, raising=False)
    with pytest.raises(OSError, match="I/O error"):
        write_parts(report, source, tmp_path / "parts")
    assert not list((tmp_path / "parts").iterdir())
