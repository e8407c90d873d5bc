"""The tolerant reader of result lines (batchd.inputs.lines): odd lines are read, identity is
never taken from a nested object, and a line over the cap is never held whole."""

from __future__ import annotations

import io
import math
import tracemalloc
from pathlib import Path

import pytest

from batchd.inputs.lines import (
    HEAD_BYTES,
    copy_line,
    count_lines,
    custom_id_of,
    identity,
    input_line_of,
    iter_lines,
    line_at,
    read_line,
    utf8_safe,
)

OK = b'{"id":"r1","custom_id":"a1","response":{"status_code":200,"body":{"x":1}},"error":null}'


def test_a_strict_line_reads_as_usual() -> None:
    assert read_line(OK + b"\n") == {
        "id": "r1",
        "custom_id": "a1",
        "response": {"status_code": 200, "body": {"x": 1}},
        "error": None,
    }


@pytest.mark.parametrize(
    ("raw", "check"),
    [
        # An emoji cut at max_tokens: a lone high surrogate escape.
        (b'{"custom_id":"a","content":"hi \\ud83d"}', lambda v: v["content"] == "hi \ud83d"),
        (b'{"custom_id":"a","logprobs":NaN}', lambda v: math.isnan(v["logprobs"])),
        (b'{"custom_id":"a","score":1e400}', lambda v: v["score"] == math.inf),
        (b'{"custom_id":"a","x":-Infinity}', lambda v: v["x"] == -math.inf),
        # Invalid UTF-8 inside a string is read as U+FFFD, not refused.
        (b'{"custom_id":"a","t":"\xff"}', lambda v: v["t"] == "\ufffd"),
    ],
)
def test_lines_orjson_refuses_are_read_by_the_fallback(raw: bytes, check: object) -> None:
    value = read_line(raw)
    assert value is not None and value["custom_id"] == "a"
    assert callable(check) and check(value)


@pytest.mark.parametrize(
    "raw", [b"", b"   \n", b"[1,2]", b'"text"', b'{"custom_id":"a","resp', b"not json at all"]
)
def test_what_is_not_an_object_reads_as_none(raw: bytes) -> None:
    assert read_line(raw) is None


def test_a_deeply_nested_line_reads_as_none_not_a_crash() -> None:
    assert read_line(b"[" * 100_000 + b"]" * 100_000) is None


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'{"id":"r1","custom_id":"a1","response":{"status_code":200,"body":{"choices"', "a1"),
        # OpenAI writes spaces after colons and commas.
        (b'{"id": "batch_req_1", "custom_id": "request-1", "response": {"status', "request-1"),
        (b'{"id":null,"custom_id":"x\\"y\\\\z","resp', 'x"y\\z'),
        (b'{"custom_id":"\\u00e9t\\u00e9","response":', "\u00e9t\u00e9"),
        (b'  {"n":1,"ok":true,"nan":NaN,"custom_id":"q"', "q"),
        # A lone surrogate in the id itself is still read (and never matches an input id).
        (b'{"custom_id":"a\\ud83d","x":', "a\ud83d"),
    ],
)
def test_custom_id_is_read_from_the_start_of_a_line_cut_short(head: bytes, expected: str) -> None:
    assert custom_id_of(head) == expected


@pytest.mark.parametrize(
    "head",
    [
        # Only a member of the line's own object counts: never one nested in a body.
        b'{"response":{"body":{"custom_id":"evil"}},"custom_id":"a1"}',
        b'{"data":["custom_id"],"custom_id":"a1"}',
        b'{"custom_id":42,"x":1}',  # not a string
        b'{"custom_id":"never closed',
        b'garbage "custom_id":"a1"',
        b"",
    ],
)
def test_custom_id_is_not_guessed(head: bytes) -> None:
    assert custom_id_of(head) is None


def test_identity_comes_from_the_parsed_line_and_only_a_string_counts() -> None:
    assert identity(OK, read_line(OK)) == "a1"
    assert identity(b'{"custom_id":7}', {"custom_id": 7}) is None
    assert identity(b'{"custom_id":"c","x":', None) == "c"


def test_printable_replaces_lone_surrogates_only() -> None:
    assert utf8_safe("ok \ud83d \U0001f600") == "ok \ufffd \U0001f600"


def test_iter_lines_gives_offsets_and_holds_only_lines_within_the_cap() -> None:
    long = b'{"custom_id":"big","pad":"' + b"x" * 5000 + b'"}\n'
    data = b"short\n" + long + b"\n" + b"last-without-newline"
    lines = list(iter_lines(io.BytesIO(data), 1024))
    assert [(li.offset, li.size) for li in lines] == [
        (0, 6),
        (6, len(long)),
        (6 + len(long), 1),
        (7 + len(long), 20),
    ]
    assert lines[0].data == b"short\n" and not lines[0].long
    assert lines[1].data is None and lines[1].long and lines[1].head == long[:HEAD_BYTES]
    assert custom_id_of(lines[1].head) == "big"
    assert lines[2].blank and not lines[1].blank
    assert lines[3].data == b"last-without-newline" and not lines[3].terminated


def test_a_line_of_exactly_the_cap_is_held_one_byte_more_is_not() -> None:
    at_cap = b"a" * 1023 + b"\n"
    over = b"b" * 1024 + b"\n"
    first, second = iter_lines(io.BytesIO(at_cap + over), 1024)
    assert first.data == at_cap
    assert second.data is None and second.size == 1025


def test_a_long_line_is_copied_byte_for_byte_and_terminated() -> None:
    body = b'{"custom_id":"z","pad":"' + bytes(b for b in range(256) if b != 10) * 100 + b'"}'
    fh = io.BytesIO(b"a\n" + body)  # the long line is the last, without a newline
    (_, line) = list(iter_lines(fh, 512))
    out = io.BytesIO()
    copy_line(fh, line, out)
    assert out.getvalue() == body + b"\n"
    again = line_at(fh, line.offset, 512)
    assert again == line


def test_count_lines_skips_blank_lines_and_counts_long_ones(tmp_path: Path) -> None:
    path = tmp_path / "output.jsonl"
    path.write_bytes(b"a\n\n  \n" + b"x" * 3000 + b"\nb")
    assert count_lines(path, 1024) == 3


def test_reading_a_huge_line_holds_about_the_cap_not_the_line(tmp_path: Path) -> None:
    """A 32 MB line with a 64 KiB cap: the reader's peak is a small multiple of its
    chunk, never the line."""
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as out:
        out.write(b'{"custom_id":"h","content":"')
        for _ in range(32):
            out.write(b"y" * (1 << 20))
        out.write(b'"}\n{"custom_id":"next"}\n')
    tracemalloc.start()
    try:
        with path.open("rb") as fh:
            lines = list(iter_lines(fh, 64 * 1024))
            sink = io.BytesIO()
            copy_line(fh, lines[0], _Discard(sink))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [custom_id_of(li.head) for li in lines] == ["h", "next"]
    assert lines[0].size > 32 * (1 << 20)
    assert peak < 4 * (1 << 20), f"peak {peak} bytes"


class _Discard(io.RawIOBase):
    """A sink that counts what it is given and keeps nothing."""

    def __init__(self, _unused: io.BytesIO) -> None:
        super().__init__()
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        size = len(data)  # type: ignore[arg-type]
        self.written += size
        return size


def test_input_line_is_read_back_from_error_lines_of_any_length() -> None:
    long_error = b'{"custom_id":"a","error":{"message":"' + b"m" * 5000 + b'"},"input_line":7}\n'
    wrapped = b'{"input_line":9,"raw":"' + b"r" * 5000 + b'"}\n'
    data = b'{"custom_id":"b","input_line":3}\n' + long_error + wrapped + b'{"x":NaN}\n'
    fh = io.BytesIO(data)
    lines = list(iter_lines(fh, 1024))
    assert [input_line_of(fh, li) for li in lines] == [3, 7, 9, None]
