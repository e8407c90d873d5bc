"""Streaming validation of a JSONL batch input file, and planning it into parts.

PURE: no network, no store, no event loop. The daemon runs `validate_file` in a thread;
`batchd validate` and `batchd split` call it directly. One pass over the bytes, reading
blocks of whole lines with a bounded buffer, so memory stays nearly flat whatever the file
size: the largest buffer is one block plus one line (at most `max_line_bytes`), plus an
8-byte hash per custom_id (1,000,000 ids take 8 MB).

Uniqueness of custom_id is exact: the first pass keeps the 64-bit hash of each id; only
when two hashes are equal does a second pass read the file again and compare those ids
themselves, so a hash collision costs time, never a wrong verdict. A repeated id is
reported on its line, naming the line that used it first; the line is otherwise checked
like any other (so it may also break, say, the per-file byte limit).

Speed (a million short lines) comes from settling most lines on a fast path:
- a line that is exactly orjson's compact serialization of what it parsed to (integers
  within 53 bits) needs no walk of the parsed object: a duplicate key, an integer outside
  64 bits or nesting deeper than `MAX_DEPTH` (orjson will not serialize deeper than 254
  levels) would each make that serialization differ or fail. Other lines (written with
  spaces, or long non-ASCII ones, cheaper to walk than to serialize) get the walk;
- a request with the url, model and enable_thinking of the last line that broke no rule,
  extending that line's part within its limits, is checked inline; anything else goes
  through every rule one at a time (`_Checker`).

With `requests_digest` (the daemon's duplicate guard), the same pass writes each parsed
line again in canonical form (`canonical_request`: sorted keys, no spacing) and hashes
those lines in order: `Report.requests_sha256`, equal for the same
requests whatever their line endings, spacing or key order.

Every limit comes from the provider profile (`ProviderLimits`), never from a constant.
Two bounds are our own safety limits rather than the service's: nesting deeper than
`MAX_DEPTH` and integers outside the signed 64-bit range are rejected.

Decisions on points the service leaves open:
- A last line without a trailing newline is accepted when it is valid JSON; when it is
  not, it is reported as `truncated_last_line` (a partial copy).
- CRLF line endings are accepted (CR is JSON whitespace); a file of CR-only line endings
  is a file-level error. Empty or whitespace-only lines, trailing ones included, are
  errors: the service counts lines.
- A line's length is counted without its line ending; a file's and a part's bytes are
  counted with them, as uploaded.
- `enable_thinking` must be set the same way on every line of one model; absent counts
  as its own setting, since the default differs between models.
- Uniqueness of custom_id is checked across the whole file, not only within each part:
  results of all parts are merged back by custom_id.

Rule codes (stable; `line` is null for file-level rules):

file level:
  empty_file              the file has no bytes
  utf16                   the file is UTF-16 (or UTF-32) text, not UTF-8
  binary_file             the file is binary (NUL bytes, or a compressed/archive format)
  cr_line_endings         lines end with CR only (old Mac style); use LF or CRLF
  too_many_requests       more requests than the model's per-file limit (splitting off)
  file_too_large          more bytes than the model's per-file limit (splitting off)
line level, the JSON text:
  bom                     the line starts with a UTF-8 byte order mark
  invalid_utf8            the bytes are not valid UTF-8 (encoded surrogates included)
  lone_surrogate          a \\uD800-\\uDFFF escape without its pair
  invalid_json            not one JSON value (syntax error, trailing content, ...)
  nan_or_infinity         NaN, Infinity or -Infinity, which JSON does not allow
  number_too_large        an integer outside the signed 64-bit range, or a number
                          that overflows a double
  too_deep                objects/arrays nested deeper than MAX_DEPTH
  duplicate_key           the same key twice in one object, at any depth
  not_an_object           the line is JSON but not an object
  empty_line              an empty or whitespace-only line
  line_too_long           longer than max_line_bytes, or larger than the model's whole
                          per-file byte limit (it fits in no part)
  truncated_last_line     the last line has no newline and is not valid JSON
line level, the request:
  missing_custom_id       no custom_id
  invalid_custom_id       custom_id is not a non-empty string
  duplicate_custom_id     custom_id already used on an earlier line
  invalid_method          method missing or not "POST"
  invalid_url             url missing, not a string, or not an endpoint of the provider
  mixed_url               url differs from the first line's (of the same model when
                          grouping by model)
  model_endpoint_mismatch a model on an endpoint it may not use (batch-test-model only
                          on /v1/chat/ds-test, and that endpoint only for it)
  missing_body            no body
  invalid_body            body is not an object
  missing_model           no body.model
  invalid_model           body.model is not a non-empty string
  mixed_model             body.model differs from the first line's (not grouping)
  missing_messages        chat endpoint without body.messages
  invalid_messages        body.messages is not a non-empty list of objects
  missing_input           embeddings (or responses) endpoint without body.input
  invalid_input           body.input is not a non-empty string or list
  missing_prompt          completions endpoint without body.prompt
  invalid_prompt          body.prompt is not a non-empty string or list
  invalid_thinking        body.enable_thinking is not true or false
  mixed_thinking          body.enable_thinking differs from the first line of the model
Warnings (the file stays valid; `warnings` in the report):
  thinking_default        requests to a model that thinks by default (ModelLimits.
                          thinks_by_default) without enable_thinking: reasoning tokens
                          are billed as output (counted over the lines that broke no rule)
`batchd validate` adds `unreadable` (file level) for a file it cannot open or read;
`validate_file` itself raises OSError then, since a read error says nothing of content.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple

import orjson

from batchd.documents import JobReport, JsonObject, ReportPart, ReportProblem
from batchd.fsutil import atomic_output
from batchd.provider.profiles import ProviderLimits

# A report lists this many problems (it counts them all), unless told otherwise.
DEFAULT_MAX_REPORTED_ERRORS = 100
# Our own bounds (not the service's): deeper nesting or larger integers are rejected.
MAX_DEPTH = 256
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_SNIFF_BYTES = 64 * 1024
_COPY_CHUNK = 1024 * 1024
_BLOCK_BYTES = 256 * 1024  # lines are read this many bytes at a time (then to their end)
_BOM = b"\xef\xbb\xbf"

# custom_id hashes are kept in this many arrays, by their low bits, so that looking for
# equal hashes at the end builds one small set at a time (power of two).
_ID_BUCKETS = 256
# An array type code for 64-bit ints: "l" where a C long is that wide, as its appends
# convert an int faster than "q" does.
_INT64 = "l" if array("l").itemsize == 8 else "q"
# After a line that is not in compact form, this many lines skip the attempt (a file
# written with spaces after colons would otherwise pay a wasted serialization per line).
_COMPACT_RETRY_LINES = 256
# Writing a line back costs about what reading it did for non-ASCII text (its UTF-8 is
# encoded again), while the walk's cost grows slowly with length: past about this many
# bytes, a non-ASCII line is cheaper to walk (measured on Chinese chat requests).
_COMPACT_MAX_BYTES = 2048

# `"` then optional JSON whitespace then `:`. Every key of an object produces exactly one
# match; string contents can only add matches (an escaped quote before a colon), never
# hide one. So if the matches equal the keys orjson kept, no key was dropped as a duplicate.
_KEY_TOKEN = re.compile(rb'"[ \t\r\n]*:')

# Which body field each endpoint needs, and whether a list value must hold objects.
_BODY_FIELD: dict[str, str] = {
    "/v1/chat/completions": "messages",
    "/v1/chat/ds-test": "messages",
    "/v1/embeddings": "input",
    "/v1/responses": "input",
    "/v1/completions": "prompt",
}

_BINARY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip (xlsx, docx, ...)"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"%PDF-", "PDF"),
    (b"SQLite format 3\x00", "SQLite"),
)

# The custom_id hash; a seam for tests, which force collisions to check they are settled.
_id_hash: Callable[[str], int] = hash

_ABSENT = object()
_UNPARSED = object()  # a line the fast path could not parse: the slow path parses it


def _messages_ok(body: JsonObject) -> bool:
    value = body.get("messages")
    if type(value) is not list or not value:
        return False
    # A loop, not all() over a generator: half the time, once per line of a chat file.
    for item in value:  # noqa: SIM110
        if type(item) is not dict:
            return False
    return True


def _input_ok(body: JsonObject) -> bool:
    value = body.get("input")
    return (type(value) is str or type(value) is list) and bool(value)


def _prompt_ok(body: JsonObject) -> bool:
    value = body.get("prompt")
    return (type(value) is str or type(value) is list) and bool(value)


def _no_field(body: JsonObject) -> bool:
    return True


# Whether the body holds what its endpoint needs (see _BODY_FIELD); unlisted endpoints
# need nothing in particular.
_BODY_OK: dict[str, Callable[[JsonObject], bool]] = {
    url: {"messages": _messages_ok, "input": _input_ok, "prompt": _prompt_ok}[needed]
    for url, needed in _BODY_FIELD.items()
}


def _serializer_bounds_depth() -> bool:
    """Whether orjson refuses to serialize nesting deeper than MAX_DEPTH.

    The compact-form shortcut relies on it (orjson stops at 254 levels); were a future
    orjson to go deeper, every line would take the walk that counts depth instead.
    """
    nested: list[Any] = []
    for _ in range(MAX_DEPTH):
        nested = [nested]
    try:
        orjson.dumps(nested)
    except orjson.JSONEncodeError:
        return True
    return False


_COMPACT_BOUNDS_DEPTH = _serializer_bounds_depth()


@dataclass(frozen=True, slots=True)
class InputProblem:
    """One broken rule: where (`line` is None for the whole file), which rule, and why."""

    line: int | None
    code: str
    message: str

    def render(self, path: str) -> str:
        """`path:line: code: message`, the shape compilers use (grep- and editor-friendly)."""
        where = f"{path}:{self.line}" if self.line is not None else path
        return f"{where}: {self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}

    def stored(self) -> ReportProblem:
        return ReportProblem(line=self.line, code=self.code, message=self.message)


@dataclass(slots=True)
class PlannedPart:
    """One planned batch: which lines of the source, where their bytes are, and its model.

    `ranges` are the byte ranges [start, end) of the source to copy, in order: a single
    range when the part is a contiguous run of lines, several when grouping by model
    picked lines out of a mixed file. `first_line`/`last_line` are 1-based and inclusive.
    """

    index: int
    model: str
    endpoint: str
    first_line: int
    last_line: int
    requests: int = 0
    bytes: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.ranges[0][0]

    @property
    def end(self) -> int:
        return self.ranges[-1][1]

    @property
    def contiguous(self) -> bool:
        return len(self.ranges) == 1

    def add(self, line: int, start: int, size: int) -> None:
        self.last_line = line
        self.requests += 1
        self.bytes += size
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1] = (self.ranges[-1][0], start + size)
        else:
            self.ranges.append((start, start + size))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index,
            "model": self.model,
            "endpoint": self.endpoint,
            "first_line": self.first_line,
            "last_line": self.last_line,
            "requests": self.requests,
            "bytes": self.bytes,
            "start": self.start,
            "end": self.end,
        }
        if not self.contiguous:
            data["ranges"] = [list(r) for r in self.ranges]
        return data


@dataclass(slots=True)
class Report:
    """The verdict on one file.

    `errors` holds at most `max_errors` problems, in line order, while `error_count`
    counts every one. `parts` is the plan for a valid file (one part when no split is
    needed) and empty for an invalid one. `warnings` are file-level notes that do not
    make the file invalid (one per model and rule).
    """

    path: str
    valid: bool = False
    requests: int = 0
    bytes: int = 0
    models: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    parts: list[PlannedPart] = field(default_factory=list)
    errors: list[InputProblem] = field(default_factory=list)
    error_count: int = 0
    warnings: list[InputProblem] = field(default_factory=list)
    # With `requests_digest`: the sha256 of the file's requests in canonical form
    # (`canonical_request`), in order; None for an invalid file (not in `to_dict`).
    requests_sha256: str | None = None

    @property
    def model(self) -> str | None:
        """The file's model when it has exactly one."""
        return self.models[0] if len(self.models) == 1 else None

    @property
    def endpoint(self) -> str | None:
        """The file's endpoint when it has exactly one."""
        return self.endpoints[0] if len(self.endpoints) == 1 else None

    @property
    def needs_split(self) -> bool:
        return len(self.parts) > 1

    def to_dict(self) -> dict[str, Any]:
        """The `batchd validate --json` shape."""
        return {
            "path": self.path,
            "valid": self.valid,
            "requests": self.requests,
            "bytes": self.bytes,
            "model": self.model,
            "models": list(self.models),
            "endpoint": self.endpoint,
            "parts": [p.to_dict() for p in self.parts],
            "errors": [e.to_dict() for e in self.errors],
            "error_count": self.error_count,
            "warnings": [w.to_dict() for w in self.warnings],
        }

    def stored(self) -> JobReport:
        """The report a job keeps (`documents.JobReport`): `to_dict`'s, without the
        parts' byte ranges (they are for writing the parts, not for keeping)."""
        return JobReport(
            path=self.path,
            valid=self.valid,
            requests=self.requests,
            bytes=self.bytes,
            model=self.model,
            models=list(self.models),
            endpoint=self.endpoint,
            parts=[
                ReportPart(
                    index=p.index,
                    model=p.model,
                    endpoint=p.endpoint,
                    first_line=p.first_line,
                    last_line=p.last_line,
                    requests=p.requests,
                    bytes=p.bytes,
                    start=p.start,
                    end=p.end,
                )
                for p in self.parts
            ],
            errors=[e.stored() for e in self.errors],
            error_count=self.error_count,
            warnings=[w.stored() for w in self.warnings],
        )

    def render(self) -> list[str]:
        """Readable lines: one per reported problem, `path:line: code: message`, then
        one per warning (`path: warning: code: message`)."""
        lines = [e.render(self.path) for e in self.errors]
        lines.extend(f"{self.path}: warning: {w.code}: {w.message}" for w in self.warnings)
        hidden = self.error_count - len(self.errors)
        if hidden > 0:
            lines.append(f"{self.path}: ... and {hidden} more problems not listed")
        return lines


class _TooDeep(Exception):
    """Raised out of the structure walk at the nesting limit."""


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NumberTooLarge(Exception):
    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.literal = literal


class _NotAConstant(Exception):
    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.literal = literal


def _count_keys(container: Any, depth: int, suspects: list[int]) -> int:
    """Keys in every object of a parsed document; flags numbers that may be too large.

    Recursion is bounded by MAX_DEPTH, far below Python's own limit.
    """
    if depth > MAX_DEPTH:
        raise _TooDeep
    if type(container) is dict:
        keys = len(container)
        values: Any = container.values()
    else:
        keys = 0
        values = container
    for value in values:
        kind = type(value)
        if kind is str:
            continue
        if kind is dict or kind is list:
            keys += _count_keys(value, depth + 1, suspects)
        elif kind is int:
            if value > INT64_MAX or value < INT64_MIN:
                suspects.append(1)
        elif kind is float and (value >= 2.0**63 or value <= -(2.0**63)) and value.is_integer():
            # orjson turns an integer literal beyond 64 bits into a float silently.
            suspects.append(1)
    return keys


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _checked_int(literal: str) -> int:
    value = int(literal)
    if value > INT64_MAX or value < INT64_MIN:
        raise _NumberTooLarge(literal)
    return value


def _no_constant(literal: str) -> Any:
    raise _NotAConstant(literal)


def _strict_parse(text: str) -> tuple[str, str] | None:
    """Parse with the stdlib, hooked to catch what orjson lets through or cannot name."""
    try:
        json.loads(
            text,
            object_pairs_hook=_pairs_without_duplicates,
            parse_int=_checked_int,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        return "duplicate_key", f"key {exc.key!r} appears twice in one object"
    except _NumberTooLarge as exc:
        shown = exc.literal if len(exc.literal) <= 40 else exc.literal[:37] + "..."
        return "number_too_large", f"integer {shown} does not fit in 64 bits"
    except _NotAConstant as exc:
        return "nan_or_infinity", f"{exc.literal} is not allowed in JSON"
    except RecursionError:
        return "too_deep", f"nesting deeper than {MAX_DEPTH} levels"
    except json.JSONDecodeError as exc:
        return "invalid_json", f"{exc.msg} at column {exc.colno}"
    return None


def _classify_parse_error(content: bytes, error: orjson.JSONDecodeError) -> tuple[str, str]:
    """Name the rule behind an orjson failure (the slow path: only for bad lines)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = content[exc.start : exc.start + 1].hex()
        return "invalid_utf8", f"byte 0x{bad} at column {exc.start + 1} is not valid UTF-8"
    reason = str(error)
    if "depth limit exceeded" in reason:
        return "too_deep", f"nesting deeper than {MAX_DEPTH} levels"
    if "infinity when parsed" in reason:
        return "number_too_large", "a number overflows a double"
    if "surrogate" in reason:
        return "lone_surrogate", f"unpaired UTF-16 surrogate escape at column {error.colno}"
    verdict = _strict_parse(text)
    if verdict is not None and verdict[0] != "invalid_json":
        return verdict
    return "invalid_json", f"{error.msg} at column {error.colno}"


def _structure_sound(content: bytes, obj: JsonObject) -> bool:
    """Whether a parsed line surely has no duplicate key, no integer outside 64 bits and
    no nesting deeper than MAX_DEPTH, judged by walking what orjson made of it (orjson
    keeps the last of duplicate keys and turns integers beyond 64 bits into floats).

    False means "look closer" (`_structure_problem`), not that a rule is broken.
    """
    suspects: list[int] = []
    try:
        keys = _count_keys(obj, 1, suspects)
    except _TooDeep:
        return False
    # A key is followed by one colon outside strings, so if the colons equal the
    # keys kept there was no duplicate; else count the key tokens themselves.
    return not suspects and (
        content.count(b":") == keys or len(_KEY_TOKEN.findall(content)) == keys
    )


def _structure_problem(content: bytes, obj: JsonObject) -> tuple[str, str] | None:
    """The rule a parsed line breaks in its JSON text that orjson let through, if any."""
    if _structure_sound(content, obj):
        return None
    try:
        _count_keys(obj, 1, [])
    except _TooDeep:
        return "too_deep", f"nesting deeper than {MAX_DEPTH} levels"
    return _strict_parse(content.decode("utf-8"))


def _sniff(head: bytes) -> InputProblem | None:
    """File-level problems visible in the first bytes: not UTF-8 JSONL text at all."""
    if not head:
        return InputProblem(None, "empty_file", "the file is empty")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return InputProblem(None, "utf16", "the file is UTF-16 text (BOM found); save it as UTF-8")
    for magic, kind in _BINARY_MAGIC:
        if head.startswith(magic):
            return InputProblem(None, "binary_file", f"the file is {kind} data, not JSONL text")
    if b"\x00" in head:
        even, odd = head[0::2], head[1::2]
        if even.count(0) > len(even) * 0.4 or odd.count(0) > len(odd) * 0.4:
            return InputProblem(None, "utf16", "the file looks like UTF-16 text; save it as UTF-8")
        return InputProblem(None, "binary_file", "the file is binary (NUL bytes), not JSONL text")
    if b"\n" not in head and b"\r" in head.rstrip(b"\r\t "):
        return InputProblem(
            None, "cr_line_endings", "lines end with CR only; use LF (or CRLF) line endings"
        )
    return None


class _Odd(NamedTuple):
    """A line that did not end with LF within reach (see `_blocks`)."""

    raw: bytes | None  # the line, or None when it is too long to have been kept
    size: int  # its bytes in the file, LF included
    length: int  # its length without its line ending
    newline: bool  # whether it ends with LF (else it is the file's last line)


def _blocks(stream: BinaryIO, cap: int) -> Iterator[tuple[list[bytes], _Odd | None]]:
    """The stream's lines, a block at a time: (whole lines, each ending with LF; odd line).

    A block is about `_BLOCK_BYTES` of whole lines. The odd line that may follow them is
    the file's last line when it has no LF, or a line with no LF within `cap` bytes, of
    which only the size is kept: memory stays bounded by a block plus `cap`.
    """
    read = stream.read
    readline = stream.readline
    while True:
        block = read(_BLOCK_BYTES)
        if not block:
            return
        # BytesIO finds each LF with memchr (bytes.split looks at every byte itself).
        lines = BytesIO(block).readlines()
        del block
        last = lines[-1]
        if last[-1] != 10:
            last += readline(cap)  # the block ends inside a line: read the rest of it
            lines[-1] = last
        if last[-1] == 10:
            yield lines, None
            lines.clear()  # the caller is done with them: free them before the next read
            continue
        lines.pop()
        size = len(last)
        ending = last[-2:]
        while True:
            more = readline(_COPY_CHUNK)
            if not more:
                break
            size += len(more)
            ending = (ending + more[-2:])[-2:]
            if more[-1] == 10:
                break
        if size == len(last):
            odd = _Odd(last, size, size, False)
        elif ending.endswith(b"\n"):
            odd = _Odd(None, size, size - (2 if ending == b"\r\n" else 1), True)
        else:
            odd = _Odd(None, size, size, False)
        yield lines, odd
        lines.clear()


# The fast path's state (see `_Checker.fast`): the next line that may extend the current
# run, the last line and end offset the run may reach within its part's limits, what a
# line must share with the run's lines (url, model, enable_thinking), how to check its
# body, and whether that body is a chat one (whose usual one or two messages are checked
# inline).
_FastState = tuple[
    int, int, int, str | None, str | None, object, Callable[[JsonObject], bool], bool
]
_NO_RUN: _FastState = (0, -1, -1, None, None, _ABSENT, _no_field, False)


class _Checker:
    """The state of one validation pass: what earlier lines fixed, errors, the plan.

    `validate_stream` settles most lines itself (its fast path) and hands the others to
    `line`, `request` or `too_long`, which apply every rule one at a time.

    Lines the fast path plans form a run: lines right after a line `_plan` put in a part,
    extending that part's last byte range. The run's figures live in the caller's locals
    and reach the part when the run ends (`end_run`), before anything else happens.
    """

    def __init__(
        self, path: str, limits: ProviderLimits, split: bool, group_by_model: bool, max_errors: int
    ) -> None:
        self.limits = limits
        self.split = split
        self.group = group_by_model and split
        self.max_errors = max_errors
        self.report = Report(path=path)
        # 64-bit hashes of the custom_ids seen, by their low bits; lines that recorded none.
        self.id_buckets = [array(_INT64) for _ in range(_ID_BUCKETS)]
        self.no_id_lines = array(_INT64)
        # model -> (url, first line); model -> (enable_thinking or _ABSENT, first line)
        self.url_of: dict[str | None, tuple[str, int]] = {}
        self.thinking_of: dict[str, tuple[object, int]] = {}
        self.first_model: tuple[str, int] | None = None
        self.models_seen: set[str] = set()
        self.exclusive: dict[str, set[str]] = {}
        for name, model_limits in limits.models.items():
            for endpoint in model_limits.exclusive_endpoints:
                self.exclusive.setdefault(endpoint, set()).add(name)
        self.open_parts: dict[str | None, PlannedPart] = {}
        self.parts: list[PlannedPart] = []
        # (url, model, enable_thinking) of the last line that broke no rule.
        self.clean: tuple[str, str, object] | None = None
        # model -> (max requests, max bytes) per file, resolved once.
        self.caps: dict[str, tuple[int, int]] = {}
        # The run: its part, and the line, part figures and end offset it started from.
        self.run_part: PlannedPart | None = None
        self.run_line = 0
        self.run_requests = 0
        self.run_bytes = 0
        self.run_end = 0
        self.fast: _FastState = _NO_RUN
        # Lines handed to `line`, `request` or `too_long`: they count their own requests.
        self.slow_lines = 0

    def problem(self, line: int | None, code: str, message: str) -> None:
        report = self.report
        report.error_count += 1
        if line is None:
            # File-level problems are few and the most telling: always listed, first.
            report.errors.insert(0, InputProblem(line, code, message))
            del report.errors[self.max_errors :]
        elif len(report.errors) < self.max_errors:
            report.errors.append(InputProblem(line, code, message))

    def too_long(self, n: int, length: int) -> None:
        """A line longer than max_line_bytes: one request, not read any further."""
        max_line = self.limits.max_line_bytes
        self.slow_lines += 1
        self.problem(n, "line_too_long", f"line is {length} bytes; the limit is {max_line} bytes")
        self.report.requests += 1
        self.no_id_lines.append(n)

    def line(
        self,
        n: int,
        raw: bytes,
        start: int,
        size: int,
        *,
        newline: bool = True,
        parsed: Any = _UNPARSED,
    ) -> None:
        """Every rule for line `n` (`raw`, with its LF unless it is the last line and has
        none), which the fast path did not settle; `parsed` is what orjson made of `raw`,
        when it could."""
        ending = (2 if raw.endswith(b"\r\n") else 1) if newline else 0
        length = len(raw) - ending
        if length > self.limits.max_line_bytes:
            self.too_long(n, length)
            return
        self.slow_lines += 1
        if not self._check_line(n, raw, start, size, newline, parsed):
            self.no_id_lines.append(n)

    def _check_line(
        self, n: int, raw: bytes, start: int, size: int, newline: bool, parsed: Any
    ) -> bool:
        content = raw.rstrip(b"\r\n")
        if not content or content.isspace():
            self.problem(n, "empty_line", "empty line; every line must be one request")
            return False
        self.report.requests += 1
        obj = parsed
        if content.startswith(_BOM):
            self.problem(n, "bom", "the line starts with a UTF-8 byte order mark; remove it")
            content = content[3:]
            obj = _UNPARSED
        if obj is _UNPARSED:
            try:
                obj = orjson.loads(content)
            except orjson.JSONDecodeError as exc:
                if not newline:
                    self.problem(
                        n,
                        "truncated_last_line",
                        "the last line has no newline and is not complete JSON (a partial copy?)",
                    )
                else:
                    self.problem(n, *_classify_parse_error(content, exc))
                return False
        if type(obj) is not dict:
            kind = type(obj).__name__ if obj is not None else "null"
            self.problem(n, "not_an_object", f"the line is a JSON {kind}, not an object")
            return False
        verdict = _structure_problem(content, obj)
        if verdict is not None:
            self.problem(n, *verdict)
            return False
        return self._check_request(n, obj, start, size)

    def request(self, n: int, obj: JsonObject, start: int, size: int) -> None:
        """The request rules of line `n`, whose JSON text broke no rule."""
        self.slow_lines += 1
        self.report.requests += 1
        if not self._check_request(n, obj, start, size):
            self.no_id_lines.append(n)

    def _check_request(self, n: int, obj: JsonObject, start: int, size: int) -> bool:
        """The request rules of one parsed line; plans the line into a part when clean.

        True when the line's custom_id was recorded (to be checked for uniqueness later).
        """
        errors_before = self.report.error_count
        custom_id = obj.get("custom_id", _ABSENT)
        recorded = False
        if custom_id is _ABSENT:
            self.problem(n, "missing_custom_id", "custom_id is missing")
        elif type(custom_id) is not str or not custom_id:
            self.problem(n, "invalid_custom_id", "custom_id must be a non-empty string")
        else:
            digest = _id_hash(custom_id)
            self.id_buckets[digest & (_ID_BUCKETS - 1)].append(digest)
            recorded = True
        method = obj.get("method")
        if method != "POST":
            shown = "missing" if method is None else repr(method)
            self.problem(n, "invalid_method", f'method is {shown}; it must be "POST"')
        url = obj.get("url")
        body = obj.get("body", _ABSENT)
        if type(body) is dict:
            model = body.get("model")
            thinking = body.get("enable_thinking", _ABSENT)
            clean = self.clean
            # Fast path: the url, model and thinking setting of the last clean line passed
            # every rule that depends on them alone, or on what earlier lines fixed.
            if clean is not None and url == clean[0] and model == clean[1] and thinking is clean[2]:
                self._check_body_field(n, body, clean[0])
                if self.report.error_count == errors_before:
                    self._plan(n, clean[1], clean[0], start, size)
                return recorded
        if type(url) is not str:
            self.problem(n, "invalid_url", "url is missing or not a string")
            url = None
        elif url not in self.limits.endpoints:
            allowed = ", ".join(self.limits.endpoints)
            self.problem(n, "invalid_url", f"url {url!r} is not one of this provider's: {allowed}")
            url = None
        model = self._check_body(n, body, url)
        if url is not None:
            self._check_url(n, url, model)
        if model is not None and url is not None and self.report.error_count == errors_before:
            self.clean = (url, model, body.get("enable_thinking", _ABSENT))
            self._plan(n, model, url, start, size)
        return recorded

    def _check_body(self, n: int, body: Any, url: str | None) -> str | None:
        if body is _ABSENT:
            self.problem(n, "missing_body", "body is missing")
            return None
        if type(body) is not dict:
            self.problem(n, "invalid_body", "body must be an object")
            return None
        given = body.get("model", _ABSENT)
        model: str | None = None
        if given is _ABSENT:
            self.problem(n, "missing_model", "body.model is missing")
        elif type(given) is not str or not given:
            self.problem(n, "invalid_model", "body.model must be a non-empty string")
        else:
            model = given
            self._check_model(n, model)
        if url is not None:
            self._check_body_field(n, body, url)
        thinking = body.get("enable_thinking", _ABSENT)
        if thinking is not _ABSENT and type(thinking) is not bool:
            self.problem(n, "invalid_thinking", "body.enable_thinking must be true or false")
        elif model is not None:
            first = self.thinking_of.setdefault(model, (thinking, n))
            if first[0] is not thinking:
                self.problem(
                    n,
                    "mixed_thinking",
                    f"enable_thinking is {_show_thinking(thinking)} here but "
                    f"{_show_thinking(first[0])} on line {first[1]}; one setting per model",
                )
        return model

    def _check_body_field(self, n: int, body: JsonObject, url: str) -> None:
        needed = _BODY_FIELD.get(url)
        if needed is None or _BODY_OK[url](body):
            return
        if needed not in body:
            self.problem(n, f"missing_{needed}", f"body.{needed} is missing (needed on {url})")
        elif needed == "messages":
            self.problem(n, "invalid_messages", "body.messages must be a non-empty list of objects")
        else:
            self.problem(
                n, f"invalid_{needed}", f"body.{needed} must be a non-empty string or list"
            )

    def _check_model(self, n: int, model: str) -> None:
        if model not in self.models_seen:
            self.models_seen.add(model)
            self.report.models.append(model)
        if self.first_model is None:
            self.first_model = (model, n)
        elif model != self.first_model[0] and not self.group:
            first, line = self.first_model
            self.problem(
                n,
                "mixed_model",
                f"model {model!r} differs from {first!r} on line {line}; "
                "a batch has one model (or group the file by model)",
            )

    def _check_url(self, n: int, url: str, model: str | None) -> None:
        key = model if self.group else None
        if key is None and self.group:
            return
        first = self.url_of.get(key)
        if first is None:
            self.url_of[key] = (url, n)
            if url not in self.report.endpoints:
                self.report.endpoints.append(url)
        elif first[0] != url:
            self.problem(
                n,
                "mixed_url",
                f"url {url!r} differs from {first[0]!r} on line {first[1]}; "
                "every line of a batch uses one url",
            )
        if model is None:
            return
        allowed = self.limits.for_model(model).endpoints
        if allowed is not None and url not in allowed:
            self.problem(
                n,
                "model_endpoint_mismatch",
                f"model {model!r} may only use {', '.join(allowed)}, not {url!r}",
            )
        owners = self.exclusive.get(url)
        if owners and model not in owners:
            self.problem(
                n,
                "model_endpoint_mismatch",
                f"url {url!r} is reserved for {', '.join(sorted(owners))}, not {model!r}",
            )

    def _plan(self, n: int, model: str, url: str, start: int, size: int) -> None:
        caps = self.caps.get(model)
        if caps is None:
            caps = self.caps[model] = (
                self.limits.requests_limit(model),
                self.limits.bytes_limit(model),
            )
        max_requests, max_bytes = caps
        if size > max_bytes:
            self.problem(
                n,
                "line_too_long",
                f"line is {size} bytes, more than a whole {model} file may be ({max_bytes})",
            )
            return
        key = model if self.group else None
        part = self.open_parts.get(key)
        if part is not None and (part.requests >= max_requests or part.bytes + size > max_bytes):
            self.parts.append(part)
            part = None
        if part is None:
            part = PlannedPart(index=0, model=model, endpoint=url, first_line=n, last_line=n)
            self.open_parts[key] = part
        part.add(n, start, size)
        # Start a run: the lines that follow may join this part on the fast path, while
        # they fit within its limits and share this line's url, model and thinking.
        assert self.clean is not None
        end = start + size
        self.run_part = part
        self.run_line = n
        self.run_requests = part.requests
        self.run_bytes = part.bytes
        self.run_end = end
        self.fast = (
            n + 1,
            n + max_requests - part.requests,
            end + max_bytes - part.bytes,
            url,
            model,
            self.clean[2],
            _BODY_OK.get(url, _no_field),
            _BODY_FIELD.get(url) == "messages",
        )

    def end_run(self, run_next: int, n: int, start: int) -> None:
        """End the run before line `n`, which starts at `start`: the fast path planned
        the lines before `run_next` (= n), and they join the run's part now."""
        part = self.run_part
        if part is None:
            return
        assert run_next == n, (run_next, n)
        last = n - 1
        part.requests = self.run_requests + (last - self.run_line)
        part.bytes = self.run_bytes + (start - self.run_end)
        part.last_line = last
        part.ranges[-1] = (part.ranges[-1][0], start)
        self.run_part = None
        self.fast = _NO_RUN

    def find_duplicates(self, stream: BinaryIO, cap: int) -> None:
        """Report each line whose custom_id an earlier line used.

        Exact: lines with equal hashes are only suspects, settled by reading the file
        again and comparing their ids themselves. With no equal hashes (the usual case,
        and certain when no id repeats) nothing is read again.
        """
        suspects: set[int] = set()
        for bucket in self.id_buckets:
            if len(set(bucket)) != len(bucket):
                seen: set[int] = set()
                for digest in bucket:
                    if digest in seen:
                        suspects.add(digest)
                    seen.add(digest)
        if not suspects:
            return
        # Lines that recorded no id, in line order (as they were appended).
        no_ids = iter(self.no_id_lines)
        skip = next(no_ids, 0)
        first_line: dict[str, int] = {}
        found: list[InputProblem] = []
        count = 0
        n = 0
        stream.seek(0)
        for lines, odd in _blocks(stream, cap):
            for raw in lines if odd is None else [*lines, odd.raw or b""]:
                n += 1
                if n == skip:
                    skip = next(no_ids, 0)
                    continue
                custom_id = _recorded_id(raw)
                if custom_id is None or _id_hash(custom_id) not in suspects:
                    continue
                first = first_line.setdefault(custom_id, n)
                if first != n:
                    count += 1
                    if len(found) < self.max_errors:
                        message = f"custom_id {custom_id!r} is already used on line {first}"
                        found.append(InputProblem(n, "duplicate_custom_id", message))
        if not count:
            return
        # Into line order; on its line, after a bom problem and before the others, as
        # the rules run in that order.
        rank = {"bom": 0, "duplicate_custom_id": 1}
        report = self.report
        report.error_count += count
        merged = report.errors + found
        merged.sort(key=lambda e: (-1, 0) if e.line is None else (e.line, rank.get(e.code, 2)))
        report.errors = merged[: self.max_errors]

    def thinking_warnings(self, parts: list[PlannedPart]) -> None:
        """Warn, per model that thinks by default, of the planned requests that do not
        set enable_thinking (every planned line of a model shares its first line's
        setting: a differing one is `mixed_thinking`, never planned)."""
        unset: dict[str, int] = {}
        for part in parts:
            first = self.thinking_of.get(part.model)
            if (
                first is not None
                and first[0] is _ABSENT
                and self.limits.for_model(part.model).thinks_by_default
            ):
                unset[part.model] = unset.get(part.model, 0) + part.requests
        for model, count in unset.items():
            self.report.warnings.append(
                InputProblem(
                    None,
                    "thinking_default",
                    f"{count} request(s) to {model}, which thinks by default, do not set "
                    "enable_thinking: its reasoning tokens are billed as output; set "
                    "enable_thinking (false to turn thinking off)",
                )
            )

    def finish(self) -> Report:
        report = self.report
        parts = self.parts + list(self.open_parts.values())
        self.thinking_warnings(parts)
        if not self.split and self.first_model is not None and report.requests:
            model = self.first_model[0]
            max_requests = self.limits.requests_limit(model)
            max_bytes = self.limits.bytes_limit(model)
            if report.requests > max_requests:
                self.problem(
                    None,
                    "too_many_requests",
                    f"{report.requests} requests; a {model} batch may have at most "
                    f"{max_requests} (splitting is off)",
                )
            if report.bytes > max_bytes:
                self.problem(
                    None,
                    "file_too_large",
                    f"{report.bytes} bytes; a {model} batch file may be at most "
                    f"{max_bytes} bytes (splitting is off)",
                )
        report.valid = report.error_count == 0
        if report.valid:
            parts.sort(key=lambda p: p.first_line)
            for index, part in enumerate(parts, start=1):
                part.index = index
            report.parts = parts
        return report


def _recorded_id(raw: bytes) -> str | None:
    """The custom_id of a line that recorded one, read again; None if it changed since."""
    content = raw.rstrip(b"\r\n").removeprefix(_BOM)
    try:
        obj = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    custom_id = obj.get("custom_id") if type(obj) is dict else None
    return custom_id if type(custom_id) is str else None


_CANONICAL = orjson.OPT_SORT_KEYS


def canonical_request(obj: Any) -> bytes:
    """PURE: one request as the duplicate guard compares it: its parsed JSON written
    again with sorted keys, no spacing, non-ASCII as UTF-8 and no newline (so line
    endings, spacing, key order and escapes such as `\\u00e9` make no difference, while
    every value does: `1` and `1.0` differ, as they may to the service)."""
    try:
        return orjson.dumps(obj, None, _CANONICAL)
    except orjson.JSONEncodeError:
        # Deeper than orjson writes (it stops at 254 levels; MAX_DEPTH is 256).
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )


def _parsed_last_line(raw: bytes) -> Any:
    """The last line (no LF) as parsed, for the digest; None when it does not parse."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _show_thinking(value: object) -> str:
    return "absent" if value is _ABSENT else str(value).lower()


def validate_stream(
    stream: BinaryIO,
    *,
    path: str,
    limits: ProviderLimits,
    split: bool = True,
    group_by_model: bool = False,
    max_errors: int = DEFAULT_MAX_REPORTED_ERRORS,
    requests_digest: bool = False,
) -> Report:
    """Validate a seekable binary stream positioned at its start; see `validate_file`."""
    checker = _Checker(path, limits, split, group_by_model, max_errors)
    report = checker.report
    head = stream.read(_SNIFF_BYTES)
    stream.seek(0)
    file_problem = _sniff(head)
    if file_problem is not None:
        checker.problem(file_problem.line, file_problem.code, file_problem.message)
        report.bytes = stream.seek(0, os.SEEK_END)
        return checker.finish()

    max_line = limits.max_line_bytes
    cap = max_line + 2  # room for a CRLF after a line of exactly max_line bytes
    fast_size = max_line + 1  # a line of at most this many bytes, LF included, fits
    loads = orjson.loads
    dumps = orjson.dumps
    compact_form = orjson.OPT_STRICT_INTEGER | orjson.OPT_APPEND_NEWLINE
    decode_error = orjson.JSONDecodeError
    encode_error = orjson.JSONEncodeError
    structure_sound = _structure_sound
    unparsed = _UNPARSED
    absent = _ABSENT
    id_hash = _id_hash
    id_mask = _ID_BUCKETS - 1
    record_id = [bucket.append for bucket in checker.id_buckets]
    compact_from = 1 if _COMPACT_BOUNDS_DEPTH else sys.maxsize
    compact_max = _COMPACT_MAX_BYTES
    run_next, limit_line, limit_offset, run_url, run_model, run_thinking, body_ok, chat = (
        checker.fast
    )
    # The requests' digest: each parsed line's canonical form, in order (a line that does
    # not parse makes the file invalid, and its digest unused).
    requests_hash = hashlib.sha256() if requests_digest else None
    digest_line = requests_hash.update if requests_hash is not None else None
    canonical_line = _CANONICAL | orjson.OPT_APPEND_NEWLINE
    offset = 0
    n = 0
    # The hot loop: what runs here runs once per line (a million times for a million
    # short lines), so it keeps to locals and does inline what the checker would do.
    for lines, odd in _blocks(stream, cap):
        for raw in lines:
            n += 1
            size = len(raw)
            offset += size
            if size > fast_size:
                obj: Any = unparsed
            else:
                try:
                    obj = loads(raw)
                except decode_error:
                    obj = unparsed
                if type(obj) is dict:
                    if digest_line is not None:
                        try:
                            digest_line(dumps(obj, None, canonical_line))
                        except encode_error:
                            digest_line(canonical_request(obj) + b"\n")
                    sound = False
                    if n >= compact_from and (size <= compact_max or raw.isascii()):
                        # The line is exactly what orjson writes for what it read: no
                        # duplicate key, no integer beyond 53 bits, not too deep.
                        try:
                            compact = dumps(obj, None, compact_form)
                            sound = compact == raw or (
                                raw.endswith(b"\r\n") and compact[:-1] + b"\r\n" == raw
                            )
                        except encode_error:
                            sound = False  # not re-encodable: the walk decides
                        if not sound:
                            compact_from = n + _COMPACT_RETRY_LINES
                    if sound or structure_sound(raw, obj):
                        # Subscripts, not .get(): cheaper, and a missing key or a body
                        # that is no object just sends the line the slow way.
                        try:
                            custom_id = obj["custom_id"]
                            body = obj["body"]
                            same = (
                                obj["method"] == "POST"
                                and obj["url"] == run_url
                                and body["model"] == run_model
                            )
                        except (KeyError, TypeError):
                            same = False
                        if (
                            same
                            and run_next == n <= limit_line
                            and offset <= limit_offset
                            and type(custom_id) is str
                            and custom_id
                            and type(body) is dict
                            and body.get("enable_thinking", absent) is run_thinking
                            and (
                                (  # one or two chat messages, both objects
                                    chat
                                    and type(messages := body.get("messages")) is list
                                    and 0 < len(messages) <= 2
                                    and type(messages[0]) is dict
                                    and type(messages[-1]) is dict
                                )
                                or body_ok(body)
                            )
                        ):
                            digest = id_hash(custom_id)
                            record_id[digest & id_mask](digest)
                            run_next = n + 1
                            continue
                        checker.end_run(run_next, n, offset - size)
                        checker.request(n, obj, offset - size, size)
                        (
                            run_next,
                            limit_line,
                            limit_offset,
                            run_url,
                            run_model,
                            run_thinking,
                            body_ok,
                            chat,
                        ) = checker.fast
                        continue
            checker.end_run(run_next, n, offset - size)
            checker.line(n, raw, offset - size, size, parsed=obj)
            run_next, limit_line, limit_offset, run_url, run_model, run_thinking, body_ok, chat = (
                checker.fast
            )
        if odd is not None:
            n += 1
            if digest_line is not None and odd.raw is not None:
                last = _parsed_last_line(odd.raw)
                if type(last) is dict:
                    digest_line(canonical_request(last) + b"\n")
            start = offset
            offset += odd.size
            checker.end_run(run_next, n, start)
            if odd.raw is None:
                checker.too_long(n, odd.length)
            else:
                checker.line(n, odd.raw, start, odd.size, newline=odd.newline)
            run_next, limit_line, limit_offset, run_url, run_model, run_thinking, body_ok, chat = (
                checker.fast
            )
    checker.end_run(run_next, n + 1, offset)
    # Each line the checker saw counted itself (or not: an empty line is no request).
    report.requests += n - checker.slow_lines
    report.bytes = offset
    checker.find_duplicates(stream, cap)
    checker.finish()
    if requests_hash is not None and report.valid:
        report.requests_sha256 = requests_hash.hexdigest()
    return report


def validate_file(
    path: str | os.PathLike[str],
    limits: ProviderLimits,
    *,
    split: bool = True,
    group_by_model: bool = False,
    max_errors: int = DEFAULT_MAX_REPORTED_ERRORS,
    requests_digest: bool = False,
) -> Report:
    """Check every line of a JSONL batch input file against the provider's rules.

    One streaming pass (a second one only when two custom_ids hash alike, to compare
    them); memory is bounded by a block of lines plus one line, and 8 bytes per
    custom_id. With `split` (the default) a file over the request or byte limit of its
    model is planned into parts that each are within both; without it, being over a
    limit is an error.
    `group_by_model` (only with `split`) accepts a file that mixes models and plans one
    or more parts per model. Reading errors (missing file, EIO) raise OSError: they say
    nothing about the file's content.
    `requests_digest` adds, for a valid file, `Report.requests_sha256`: the digest of its
    requests in canonical form, in order (the daemon's duplicate guard), in the same pass.
    """
    with open(path, "rb", buffering=_COPY_CHUNK) as stream:
        return validate_stream(
            stream,
            path=str(path),
            limits=limits,
            split=split,
            group_by_model=group_by_model,
            max_errors=max_errors,
            requests_digest=requests_digest,
        )


def part_file_names(source: str | os.PathLike[str], count: int) -> list[str]:
    """Predictable names for the parts of `source`: `NAME.part-001.jsonl`, ..."""
    name = Path(source).name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else Path(name).stem
    width = max(3, len(str(count)))
    return [f"{stem}.part-{i:0{width}d}.jsonl" for i in range(1, count + 1)]


def write_parts(
    report: Report,
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fsync: bool = False,
) -> list[Path]:
    """Write the planned parts of a valid report as files in `out_dir`, copying byte
    ranges of `source` (streaming, never the whole file in memory).

    Writes nothing and returns [] when no split is needed (one part: use the source as
    is). Each file appears atomically. Raises ValueError for an invalid report or when
    the source's size no longer matches the report.
    """
    if not report.valid:
        raise ValueError(f"{report.path} is not valid; it has no parts to write")
    if not report.needs_split:
        return []
    if os.path.getsize(source) != report.bytes:
        raise ValueError(f"{source} changed since it was validated")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names = part_file_names(source, len(report.parts))
    with open(source, "rb") as src:
        for part, name in zip(report.parts, names, strict=True):
            target = directory / name
            with atomic_output(target, fsync=fsync) as out:
                for start, end in part.ranges:
                    if not _copy_range(src, out, start, end):
                        raise ValueError(f"{source} changed since it was validated")
            written.append(target)
    return written


# copy_file_range fails with these where the kernel cannot copy between the two files
# (another file system on old kernels, a file system without support): copy by hand.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def _copy_range(src: BinaryIO, out: IO[bytes], start: int, end: int) -> bool:
    """Append bytes [start, end) of `src` to `out`; False if `src` ends before `end`.

    In the kernel where it can (copy_file_range: the bytes never pass through Python,
    several times faster for the hundreds of MB of a big split), else through a buffer.
    """
    position = start
    if hasattr(os, "copy_file_range"):
        out.flush()
        try:
            while position < end:
                copied = os.copy_file_range(src.fileno(), out.fileno(), end - position, position)
                if not copied:
                    break  # the source ended early, or the kernel declines: see below
                position += copied
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
        if position == end:
            return True
        # The kernel wrote at the file's offset, past what `out` has buffered (nothing).
        out.seek(0, os.SEEK_END)
    src.seek(position)
    while position < end:
        chunk = src.read(min(end - position, _COPY_CHUNK))
        if not chunk:
            return False
        out.write(chunk)
        position += len(chunk)
    return True
