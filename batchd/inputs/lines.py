"""Result lines as the service sent them: read tolerantly, and in bounded memory.

A result line is paid for; it must never be lost because a strict parser refuses it. A
chat answer cut at `max_tokens` in the middle of an emoji ends in a lone surrogate
escape (`"\\ud83d"`), some servers write `NaN` or `1e400`, a gateway may cut a line in
half. `read_line` tries orjson first (fast, strict) and then Python's `json` module,
which reads NaN, Infinity, numbers too large for a double and lone surrogates. For a line
that is not JSON at all, `custom_id_of` finds `"custom_id":"..."` among the first keys
of the line's start, so the line can still be attributed to its request.

A line can also be any length: the service pads nothing, but a server that misbehaves
(or a model that rambles) can send one line of hundreds of megabytes. `iter_lines` reads
a file in chunks and holds a line whole only when it is at most `max_line_bytes` long;
a longer one comes with its offset, size and first `HEAD_BYTES` bytes only, and
`copy_range` copies it on, chunk by chunk.

PURE but for the file handles it is given.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from batchd.documents import JsonObject

# The start of a line that is kept for a line too long to hold: its custom_id is
# looked for there (the service writes it among the first keys).
HEAD_BYTES = 64 * 1024
# Chunks for copying and for reading past the cap.
CHUNK_BYTES = 1 << 20
# `jobs.max_result_line_bytes`' default: lines up to this are held and parsed whole.
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024

# A JSON string, escapes included (a custom_id may hold escaped quotes or backslashes).
_STRING = rb'"(?:[^"\\]|\\.)*"'
# A scalar value: what the keys before custom_id hold in every server's lines seen
# (`"id":"..."`, `"id":null`); an object or an array before it stops the search.
_SCALAR = rb"(?:" + _STRING + rb"|null|true|false|NaN|-?Infinity|-?[0-9][0-9.eE+-]*)"
# `"custom_id": "..."` as a key of the line's own object: only scalar members may come
# before it, so a "custom_id" inside a nested body (a model quoting one) never matches.
_CUSTOM_ID = re.compile(
    rb"\A\s*\{\s*(?:" + _STRING + rb"\s*:\s*" + _SCALAR + rb"\s*,\s*)*?"
    rb'"custom_id"\s*:\s*(' + _STRING + rb")",
    re.DOTALL,
)
_SURROGATES = re.compile("[\ud800-\udfff]")


class Unreadable(ValueError):
    """Neither orjson nor the json module can read this text as JSON."""


def loads(raw: bytes | str) -> Any:
    """The JSON value of `raw`, read by orjson, or else by the json module (NaN,
    Infinity, 1e400, lone surrogates); `Unreadable` when neither can. Invalid UTF-8 is
    read as U+FFFD."""
    with contextlib.suppress(orjson.JSONDecodeError):
        return orjson.loads(raw)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Unreadable(str(exc)) from None


def read_line(raw: bytes) -> JsonObject | None:
    """One result line as an object, however oddly written; None when it is not a JSON
    object at all (not JSON, cut short, an array...)."""
    if not raw.strip():
        return None
    try:
        value = loads(raw)
    except Unreadable:
        return None
    return value if isinstance(value, dict) else None


def custom_id_of(raw_head: bytes) -> str | None:
    """The custom_id written near the start of a line that cannot be parsed whole (cut
    short, not JSON, or too long to hold); None when it is not among the line's first
    members, or not a string."""
    found = _CUSTOM_ID.match(raw_head)
    if found is None:
        return None
    try:
        value = loads(found.group(1))
    except Unreadable:
        return None
    return value if isinstance(value, str) else None


def identity(raw: bytes, parsed: JsonObject | None) -> str | None:
    """PURE: the custom_id of a line: from its parsed object when it has one (a string
    only), else from its start."""
    if parsed is not None:
        value = parsed.get("custom_id")
        return value if isinstance(value, str) else None
    return custom_id_of(raw[:HEAD_BYTES])


def utf8_safe(text: str) -> str:
    """`text` with lone surrogates as U+FFFD, so that it can be written as UTF-8."""
    return _SURROGATES.sub("\ufffd", text)


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a file: where it is, and its bytes when it is short enough to hold."""

    offset: int  # of its first byte in the file
    size: int  # bytes, its newline included
    data: bytes | None  # the whole line (newline included); None when over the cap
    head: bytes  # its first HEAD_BYTES bytes

    @property
    def long(self) -> bool:
        return self.data is None

    @property
    def blank(self) -> bool:
        return self.data is not None and not self.data.strip()

    @property
    def terminated(self) -> bool:
        """Does it end with a newline? (For a long line: unknown here, see `copy_range`.)"""
        return self.data is not None and self.data.endswith(b"\n")


def iter_lines(fh: IO[bytes], max_line_bytes: int) -> Iterator[Line]:
    """Every line of `fh` from where it stands, blank ones included. A line of at most
    `max_line_bytes` (its newline included) is held whole; a longer one is read past in
    chunks, and only its first `HEAD_BYTES` are kept. Reading holds at most about
    `max_line_bytes` at a time, whatever the line's length."""
    offset = fh.tell()
    while True:
        piece = fh.readline(min(CHUNK_BYTES, max_line_bytes + 1))
        if not piece:
            return
        size = len(piece)
        ended = piece.endswith(b"\n")
        if ended and size <= max_line_bytes:  # the common case: a line within one read
            yield Line(offset, size, piece, piece[:HEAD_BYTES])
            offset += size
            continue
        pieces = [piece]
        # On while the line is unfinished and still within the cap (at most cap + 1).
        while not ended and size <= max_line_bytes:
            piece = fh.readline(min(CHUNK_BYTES, max_line_bytes + 1 - size))
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
            ended = piece.endswith(b"\n")
        if size <= max_line_bytes:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            yield Line(offset, size, data, data[:HEAD_BYTES])
            offset += size
            continue
        head = _head(pieces)
        del pieces, piece  # the cap's worth of bytes goes before the rest is read
        while not ended:
            more = fh.readline(CHUNK_BYTES)
            if not more:
                break
            if len(head) < HEAD_BYTES:  # a cap below HEAD_BYTES: the head is still whole
                head += more[: HEAD_BYTES - len(head)]
            size += len(more)
            ended = more.endswith(b"\n")
        yield Line(offset, size, None, head)
        offset += size


def _head(pieces: list[bytes]) -> bytes:
    head = bytearray()
    for piece in pieces:
        head += piece[: HEAD_BYTES - len(head)]
        if len(head) >= HEAD_BYTES:
            break
    return bytes(head)


def line_at(fh: IO[bytes], offset: int, max_line_bytes: int) -> Line:
    """The line starting at `offset` (`iter_lines`' rules)."""
    fh.seek(offset)
    for line in iter_lines(fh, max_line_bytes):
        return line
    return Line(offset, 0, b"", b"")


def copy_range(fh: IO[bytes], offset: int, size: int, out: IO[bytes]) -> bytes:
    """Copy `size` bytes from `offset` of `fh` to `out` in chunks; returns the last byte
    copied (b"" when none), so the caller knows whether a newline ended them."""
    fh.seek(offset)
    left = size
    last = b""
    while left > 0:
        chunk = fh.read(min(CHUNK_BYTES, left))
        if not chunk:
            break
        out.write(chunk)
        left -= len(chunk)
        last = chunk[-1:]
    return last


def copy_line(fh: IO[bytes], line: Line, out: IO[bytes]) -> None:
    """Write `line` to `out` byte for byte, with a newline added if it had none."""
    if line.data is not None:
        out.write(line.data if line.data.endswith(b"\n") else line.data + b"\n")
        return
    if copy_range(fh, line.offset, line.size, out) != b"\n":
        out.write(b"\n")


# Where batchd puts `input_line` in error.jsonl: last in the service's object, or first
# in the object it wraps a line in that does not end with a brace.
_INPUT_LINE_TAIL = re.compile(rb'"input_line"\s*:\s*([0-9]+)\s*\}\s*\Z')
_INPUT_LINE_HEAD = re.compile(rb'\A\s*\{\s*"input_line"\s*:\s*([0-9]+)')


def input_line_of(fh: IO[bytes], line: Line) -> int | None:
    """The `input_line` of a line of the outbox's error.jsonl (`batchd retry` reads
    them): from the parsed line when it is held, else from its last (or first) bytes."""
    if line.data is not None:
        value = read_line(line.data)
        number = value.get("input_line") if value is not None else None
        return number if isinstance(number, int) and not isinstance(number, bool) else None
    start = max(line.offset, line.offset + line.size - 256)
    fh.seek(start)
    tail = fh.read(line.offset + line.size - start)
    found = _INPUT_LINE_TAIL.search(tail) or _INPUT_LINE_HEAD.match(line.head)
    return int(found.group(1)) if found else None


def count_lines(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> int:
    """How many lines of a file are not blank, read in bounded memory."""
    with path.open("rb") as fh:
        return sum(1 for line in iter_lines(fh, max_line_bytes) if not line.blank)
