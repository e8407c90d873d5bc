"""CSV <-> JSONL, the two conversions the service's guide offers, done streaming.

PURE: no network, no store. `csv_to_jsonl` turns rows of (custom_id, content) into batch
requests; `jsonl_to_csv` turns result (or error) lines into the guide's CSV columns,
UTF-8 with a BOM so that Excel shows non-ASCII text correctly. Both read and write one
row at a time; the `*_file` wrappers write their output atomically (temp + rename) and
only when the whole input converted cleanly.

Decisions:
- A CSV header is recognised when its first row names the columns `custom_id` and
  `content`, or the names configured for them (`jobs.csv_columns`, or the sidecar's
  `columns`: `{"custom_id": "id", "content": "text"}`), in any case and any order, other
  columns ignored; a header row is never sent. Without a header the file must have
  exactly two columns, so that an unquoted comma in the content is caught rather than
  silently cutting the text. A first row that looks like a header (made only of
  column-like words such as `id,text`, or naming one of the known columns) but is not a
  known one is refused (`csv_header`), naming the fix: it would be a paid request.
  Blank rows are skipped.
- Bad rows (wrong column count, empty custom_id or content, duplicate custom_id) are
  reported by row number (1-based, the header counted) and no output is written.
- A CSV is read in one text encoding: the sidecar's `encoding`, else `jobs.csv_encoding`,
  else "utf-8-sig" (UTF-8 with or without a BOM). A file that is not in it is refused as
  `not_text`, naming the first line that is not and the fix; when the file's start reads
  as another encoding (UTF-16 by its BOM, UTF-8, or GB18030 holding Chinese text, as
  Chinese Excel's "CSV" export does in GBK, which GB18030 contains), that one is named.
- The default endpoint follows the model: `batch-test-model` -> /v1/chat/ds-test, a
  model whose name contains "embedding" -> /v1/embeddings (body `input`), any other
  -> /v1/chat/completions (body `messages`).
- Result lines: the error code and message are read from `error.code`/`error.message`
  (the service's fields), falling back to `error.error_code`/`error.error_message` and
  then `response.body.error`; `response.body` may arrive as a JSON string; missing
  fields and nulls become empty cells; `usage` is compact JSON.
- The outbox's `result.csv` has one row per request, in input order, successes and
  failures alike (`ResultCsv.add_request`, fed by `batchd.outbox.merge` and the rejection
  writer as they write result.jsonl and error.jsonl); `jsonl2csv` converts one file,
  one row per line.

The columns (`RESULT_COLUMNS`), defined for every endpoint; `body` is `response.body`
(read also when it came as a JSON string), and a missing or null field is an empty cell:

  custom_id      the line's `custom_id` (the request's own when the line has none that
                 can be read)
  model          body.model: the model that answered, as the service names it
  request_id     response.request_id
  status_code    response.status_code; empty on batchd's own lines (a request never sent
                 or never run has no response)
  error_code     failures: error.code, else error.error_code, body.error.code,
                 error.type, body.error.type; empty on a success
  error_message  failures: error.message, else error.error_message, body.error.message
  created        chat (/v1/chat/completions), the test model (/v1/chat/ds-test) and
                 completions (/v1/completions): body.created, Unix seconds as sent;
                 responses (/v1/responses): body.created_at; embeddings (/v1/embeddings):
                 empty, the service's embedding body has no timestamp; failures: empty
  content        chat and the test model: choices[0].message.content; completions:
                 choices[0].text; responses: the text of every `output_text` part of
                 body.output, joined; embeddings: `N dims: [v0, v1, v2, v3, ...]`
                 (below); failures: empty, unless the line cannot be shown (below)
  usage          body.usage as compact JSON, for every endpoint

An embeddings row says what the vector is, not the vector itself: its length and its
first four values (`1024 dims: [0.0123, -0.0456, 0.0789, 0.0111, ...]`; `3 vectors of
1024 dims: [...]` for a request of several inputs, the first vector's values; `base64,
1024 dims` for vectors sent as base64). A whole vector is about 20 KB of text per row
(a million rows would make a CSV of 20 GB) and a 3072-dim one passes the 32,767
characters a spreadsheet cell holds; the CSV is for looking at, `result.jsonl` keeps
every vector byte for byte. So every embeddings row stays under about 120 characters
of content whatever the dimension.

A row that cannot show its line says so in `content`: `[line of N bytes: see FILE]`
for a line over `jobs.max_result_line_bytes`, `[line N is not valid JSON: see FILE]`
for one no parser reads.
- Result lines are read with `batchd.inputs.lines`: NaN, 1e400 and lone surrogates are read
  (a lone surrogate is shown as U+FFFD), a line that is not JSON but names its
  custom_id gets a row saying so, and a line over the line cap is never held: its row
  carries its custom_id and `[line of N bytes: see FILE]`.
- Cells are neutralised by default: a cell a spreadsheet would run as a formula (it
  starts with `=`, `+`, `-`, `@`, a tab or a carriage return: model output and
  custom_ids are anyone's text) gets a leading `'`. `safe_cells=False` writes them raw.

Problem codes (`line` is the CSV row or JSONL line, None for the whole file):
  bad_row              CSV: wrong number of columns, or a named column missing
  empty_custom_id      CSV: the custom_id cell is empty
  empty_content        CSV: the content cell is empty
  duplicate_custom_id  CSV: custom_id already used on an earlier row
  not_text             CSV: the file is not in its encoding (the first such line named)
  bad_csv              CSV: the csv module cannot parse the file
  invalid_json         results: a line is not JSON
  not_an_object        results: a line is JSON but not an object
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import orjson

from batchd.documents import JobOptions, JsonObject, given
from batchd.fsutil import atomic_output
from batchd.inputs.lines import (
    DEFAULT_MAX_LINE_BYTES,
    HEAD_BYTES,
    Line,
    Unreadable,
    custom_id_of,
    iter_lines,
    loads,
    utf8_safe,
)
from batchd.inputs.validate import InputProblem
from batchd.provider.profiles import ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, ENDPOINT_TEST, TEST_MODEL

RESULT_COLUMNS = (
    "custom_id",
    "model",
    "request_id",
    "status_code",
    "error_code",
    "error_message",
    "created",
    "content",
    "usage",
)

# A cell starting with one of these is a formula to a spreadsheet (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

# The names of the two columns (custom_id, content) when none are configured.
DEFAULT_COLUMNS = ("custom_id", "content")

# The text encoding of CSV inputs when none is configured: UTF-8, a BOM skipped if any.
DEFAULT_CSV_ENCODING = "utf-8-sig"


@dataclass(slots=True)
class Conversion:
    """What a conversion did: rows written, and the problems that stopped it."""

    rows: int = 0
    errors: list[InputProblem] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def problem(self, row: int | None, code: str, message: str, max_errors: int) -> None:
        self.error_count += 1
        if len(self.errors) < max_errors:
            self.errors.append(InputProblem(row, code, message))


def default_endpoint(model: str) -> str:
    """The endpoint a model's requests go to when none is given."""
    if model == TEST_MODEL:
        return ENDPOINT_TEST
    if "embedding" in model.lower():
        return ENDPOINT_EMBEDDINGS
    return ENDPOINT_CHAT


def build_request(
    custom_id: str, content: str, *, model: str, endpoint: str, system_prompt: str | None
) -> JsonObject:
    """One batch request line for `content`, shaped for its endpoint."""
    body: JsonObject = {"model": model}
    if endpoint == ENDPOINT_EMBEDDINGS:
        body["input"] = content
    else:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        body["messages"] = messages
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}


# Words that name columns: a first row made only of these, but not naming custom_id and
# content, is a header with other names (`id,text`), never a request to pay for.
_HEADER_WORDS = frozenset(
    {
        "id", "custom_id", "customid", "key", "name", "no", "row",
        "content", "text", "prompt", "question", "input", "message", "query", "body",
        "review", "comment", "sentence", "document", "instruction",
    }
)  # fmt: skip


def _name(cell: str) -> str:
    return cell.strip().lower()


def _looks_like_header(row: list[str], known: set[str]) -> bool:
    """PURE: a first row made only of column-like words, or naming a known column."""
    names = [_name(cell).replace(" ", "_") for cell in row]
    words = len(names) >= 2 and all(name in _HEADER_WORDS for name in names)
    return words or any(_name(cell) in known for cell in row)


def _header_columns(row: list[str], columns: tuple[str, str]) -> tuple[int, int] | None:
    """PURE: the positions of the custom_id and content columns when the first row is a
    header naming them (the configured names, or the default ones), else None."""
    names = [_name(cell) for cell in row]
    for id_name, content_name in (columns, DEFAULT_COLUMNS):
        id_name, content_name = _name(id_name), _name(content_name)
        if id_name in names and content_name in names:
            return names.index(id_name), names.index(content_name)
    return None


def header_fix(row: list[str], columns: tuple[str, str]) -> str:
    """PURE: the message of `csv_header`: what the first row is, and the three ways to
    fix it (the sidecar's `columns`, the configuration's `jobs.csv_columns`, renaming)."""
    cells = [cell.strip() for cell in row]
    guess_id = cells[0] if cells and cells[0] else "ID_COLUMN"
    guess_content = cells[1] if len(cells) > 1 and cells[1] else "CONTENT_COLUMN"
    declared = orjson.dumps({"columns": {"custom_id": guess_id, "content": guess_content}})
    expected = ",".join(dict.fromkeys((",".join(columns), ",".join(DEFAULT_COLUMNS))))
    return (
        f"the first row {','.join(row)!r} looks like a header but names neither of the known"
        f" header(s) {expected}; it would otherwise be sent, and paid for, as a request."
        f" Declare its columns in the sidecar NAME.meta.json ({declared.decode()}) or in the"
        f' configuration ([jobs.csv_columns] custom_id = "{guess_id}", content ='
        f' "{guess_content}"), or rename them {",".join(DEFAULT_COLUMNS)}'
    )


def encoding_problem(value: Any) -> str | None:
    """PURE: why `value` cannot be a CSV input's encoding, or None: it must be the name
    of a text encoding Python's codecs know ("gbk", "gb18030", "utf-8", "latin-1")."""
    if not isinstance(value, str) or not value.strip():
        return 'must be the name of a text encoding, such as "gb18030"'
    try:
        info = codecs.lookup(value)
    except LookupError:
        return f"{value!r} is not an encoding Python knows (e.g. utf-8, gb18030, big5, cp1252)"
    if not getattr(info, "_is_text_encoding", True):
        return f"{value!r} is not a text encoding"
    return None


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


# Enough of a file's start to tell its encoding: a few hundred rows of text.
SNIFF_BYTES = 64 * 1024
_HAN = re.compile(r"[\u4e00-\u9fff]")


def _decodes(data: bytes, encoding: str) -> bool:
    """PURE: do these bytes read as text in `encoding`?"""
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def guess_encoding(head: bytes, tried: str) -> str | None:
    """PURE: another encoding that a file starting with `head` reads in, when one is
    clear, other than `tried`: UTF-16 by its BOM, UTF-8, or GB18030 when the bytes are
    not UTF-8 but read as Chinese text in it (GB18030 reads every GBK file). None when
    no guess is safe (a single-byte encoding reads any bytes, so it is never guessed)."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if len(head) >= SNIFF_BYTES and b"\n" in head:
        head = head[: head.rindex(b"\n")]  # a cut sample: whole lines only
    if _decodes(head, "utf-8"):
        return None if _is_utf8(tried) or head.isascii() else "utf-8"
    try:
        text = head.decode("gb18030")
    except UnicodeDecodeError:
        return None
    if codecs.lookup(tried).name in ("gbk", "gb18030", "gb2312"):
        return None
    # Chinese text in GBK is mostly characters of two bytes from 0xA1 up; Western text in
    # cp1252 also reads as GB18030, but each accented letter pairs with an ASCII one.
    han = _HAN.findall(text)
    common = sum(1 for ch in han if min(ch.encode("gb18030")) >= 0xA1)
    return "gb18030" if han and common >= 0.8 * len(han) else None


def first_undecodable(path: str | os.PathLike[str], encoding: str) -> tuple[int, str] | None:
    """The first line (1-based) of the file at `path` that is not `encoding` text, and
    why; None when it all is. Read in chunks: bounded memory whatever the line length."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(path, "rb") as stream:
        while chunk := stream.read(SNIFF_BYTES):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # The error's position counts from the bytes held back from the last
                # chunk (a character cut in two), then this chunk.
                return line + (pending + chunk)[: exc.start].count(b"\n"), exc.reason
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return line, exc.reason
    return None


def not_text_message(
    line: int | None, reason: str, encoding: str, guess: str | None, flag: str | None = None
) -> str:
    """PURE: the message of `not_text`: which line is not `encoding` text, and the fix: a
    sidecar's or the configuration's encoding, or the command line's `flag` when given."""
    shown = "UTF-8" if _is_utf8(encoding) else encoding

    def fix(name: str) -> str:
        if flag is not None:
            return f"{flag} {name}"
        return f'"encoding": "{name}" in NAME.meta.json, or jobs.csv_encoding for every CSV input'

    where = f"line {line} is" if line is not None else "the file is"
    told = f"{where} not {shown} text ({reason})"
    if guess == "gb18030":
        return (
            f"{told}; if the file is GBK (Chinese Excel's CSV export; its bytes read as"
            f" Chinese in GB18030, which contains GBK), set {fix(guess)}"
        )
    if guess is not None:
        return f"{told}; its start reads as {guess}: set {fix(guess)}"
    return (
        f"{told}; set {fix('ENCODING')} to the file's encoding, e.g. gb18030, big5,"
        " shift_jis, cp1252"
    )


def _not_text(
    path: str | os.PathLike[str], encoding: str, exc: UnicodeDecodeError, flag: str | None
) -> str:
    found = first_undecodable(path, encoding)
    line, reason = found if found is not None else (None, exc.reason)
    with open(path, "rb") as stream:
        head = stream.read(SNIFF_BYTES)
    return not_text_message(line, reason, encoding, guess_encoding(head, encoding), flag)


@dataclass(frozen=True, slots=True)
class CsvSource:
    """How a CSV input becomes requests: the model, system prompt, column names and the
    file's text encoding."""

    model: str
    system_prompt: str | None = None
    columns: tuple[str, str] = DEFAULT_COLUMNS
    encoding: str = DEFAULT_CSV_ENCODING


NEEDS_MODEL = 'a CSV input needs a model: set jobs.csv_model or "model" in NAME.meta.json'


def csv_source(
    options: JobOptions,
    *,
    model: str | None,
    system_prompt: str | None,
    columns: tuple[str, str] = DEFAULT_COLUMNS,
    encoding: str = DEFAULT_CSV_ENCODING,
) -> CsvSource | InputProblem:
    """PURE: how a CSV input is converted, the same for the daemon and `batchd validate`:
    its sidecar's `model`, `system_prompt`, `columns` and `encoding` over the
    configuration's (`jobs.csv_model`, `jobs.csv_system_prompt`, `jobs.csv_columns`,
    `jobs.csv_encoding`); the problem `csv_needs_model` when neither names a model."""
    chosen = given(options.model) or model
    if not isinstance(chosen, str) or not chosen:
        return InputProblem(None, "csv_needs_model", NEEDS_MODEL)
    prompt = given(options.system_prompt) or system_prompt
    named = given(options.columns)
    if named is not None:
        columns = (named["custom_id"], named["content"])
    own = given(options.encoding)
    if own is not None and encoding_problem(own) is None:
        encoding = own
    return CsvSource(chosen, prompt if isinstance(prompt, str) else None, columns, encoding)


def csv_to_jsonl(
    rows: Iterable[list[str]],
    out: IO[bytes],
    *,
    model: str,
    endpoint: str | None = None,
    system_prompt: str | None = None,
    max_errors: int = 100,
    columns: tuple[str, str] = DEFAULT_COLUMNS,
) -> Conversion:
    """Write one request line to `out` per CSV row of (custom_id, content).

    `rows` is a `csv.reader` (or any iterable of rows). Output is compact JSON with
    non-ASCII kept. Rows are numbered from 1, a header row included. `columns` are the
    header's names for custom_id and content (the default names are known too).
    """
    url = endpoint or default_endpoint(model)
    if system_prompt and url == ENDPOINT_EMBEDDINGS:
        raise ValueError("a system prompt does not apply to the embeddings endpoint")
    result = Conversion()
    seen: set[str] = set()
    at: tuple[int, int] | None = None
    known = {_name(name) for name in (*columns, *DEFAULT_COLUMNS)}
    for number, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if number == 1:
            at = _header_columns(row, columns)
            if at is not None:
                continue
            if _looks_like_header(row, known):
                result.problem(number, "csv_header", header_fix(row, columns), max_errors)
                continue
        if at is None and len(row) != 2:
            result.problem(
                number,
                "bad_row",
                f"{len(row)} columns; expected custom_id,content "
                "(quote content that contains commas)",
                max_errors,
            )
            continue
        id_at, content_at = at or (0, 1)
        if max(id_at, content_at) >= len(row):
            result.problem(number, "bad_row", "missing custom_id or content column", max_errors)
            continue
        custom_id, content = row[id_at].strip(), row[content_at]
        if not custom_id:
            result.problem(number, "empty_custom_id", "custom_id is empty", max_errors)
            continue
        if not content.strip():
            result.problem(number, "empty_content", "content is empty", max_errors)
            continue
        if custom_id in seen:
            result.problem(
                number,
                "duplicate_custom_id",
                f"custom_id {custom_id!r} is already used on an earlier row",
                max_errors,
            )
            continue
        seen.add(custom_id)
        request = build_request(
            custom_id, content, model=model, endpoint=url, system_prompt=system_prompt
        )
        out.write(orjson.dumps(request) + b"\n")
        result.rows += 1
    return result


def _dig(obj: Any, *path: str | int) -> Any:
    for step in path:
        if isinstance(step, int):
            if not isinstance(obj, list) or len(obj) <= step:
                return None
            obj = obj[step]
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(step)
    return obj


def neutralised(cell: str) -> str:
    """PURE: `cell` as a spreadsheet shows it and never runs it: a text that Excel,
    LibreOffice or Google Sheets would take for a formula (it starts with `=`, `+`, `-`,
    `@`, a tab or a carriage return) gets a leading `'`."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return utf8_safe(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson refuses lone surrogates: the json module writes them
        return utf8_safe(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _cell(value: Any, safe: bool = True) -> str:
    text = _text(value)
    return neutralised(text) if safe else text


def result_row(
    result: JsonObject, *, safe_cells: bool = True, custom_id: str | None = None
) -> list[str]:
    """The CSV cells (RESULT_COLUMNS) of one result or error line (`custom_id`: the
    request's, shown when the line has none); with `safe_cells`, no cell can run as a
    spreadsheet formula."""
    response = result.get("response")
    body = _dig(response, "body")
    if isinstance(body, str | bytes):
        try:
            body = loads(body)
        except Unreadable:
            body = None
    error = result.get("error")
    # Some servers send only `error.type`; it is the best code there is.
    code = (
        _dig(error, "code")
        or _dig(error, "error_code")
        or _dig(body, "error", "code")
        or _dig(error, "type")
        or _dig(body, "error", "type")
    )
    message = (
        _dig(error, "message") or _dig(error, "error_message") or _dig(body, "error", "message")
    )
    cid = result.get("custom_id")
    values = [
        cid if isinstance(cid, str) or custom_id is None else custom_id,
        _dig(body, "model"),
        _dig(response, "request_id"),
        _dig(response, "status_code"),
        code,
        message,
        created_of(body),
        content_of(body),
        _dig(body, "usage"),
    ]
    return [_cell(v, safe_cells) for v in values]


def created_of(body: Any) -> Any:
    """PURE: the answer's own timestamp, as sent: `created` (chat, completions), or
    `created_at` (responses); None for a body with neither (embeddings)."""
    if not isinstance(body, dict):
        return None
    created = body.get("created")
    return created if created is not None else body.get("created_at")


def content_of(body: Any) -> Any:
    """PURE: what the content cell shows of an answer's body, by its shape: a chat
    message's content, a completion's text, a response's output text, or a summary of
    embedding vectors (`embedding_summary`); None when the body has none of these."""
    if not isinstance(body, dict):
        return None
    choice = _dig(body, "choices", 0)
    if isinstance(choice, dict):
        message = choice.get("message")
        if isinstance(message, dict):
            return message.get("content")
        return choice.get("text")
    data = body.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and "embedding" in data[0]:
        return embedding_summary(data)
    output = body.get("output")
    if isinstance(output, list):
        texts = [
            part["text"]
            for item in output
            if isinstance(item, dict) and isinstance(item.get("content"), list)
            for part in item["content"]
            if isinstance(part, dict)
            and part.get("type") == "output_text"
            and isinstance(part.get("text"), str)
        ]
        return "".join(texts) if texts else None
    return None


# How many of a vector's values an embeddings row shows.
SHOWN_VALUES = 4


def embedding_summary(data: list[Any]) -> str:
    """PURE: an embeddings answer in a few words, whatever its size: the length of its
    vectors and the first values of the first one (`1024 dims: [0.0123, -0.0456, ...]`;
    `3 vectors of 1024 dims: [...]`; `base64, 1024 dims` for a vector sent as base64).
    Bounded: a cell never holds a whole vector (see the module's docstring)."""
    first = data[0].get("embedding") if isinstance(data[0], dict) else None
    if isinstance(first, str):
        # base64 of float32 values: 4 bytes each.
        dims = len(first.rstrip("=")) * 3 // 4 // 4
        shown = f"base64, {dims} dims"
    elif isinstance(first, list):
        values = ", ".join(_value(v) for v in first[:SHOWN_VALUES])
        more = ", ..." if len(first) > SHOWN_VALUES else ""
        shown = f"{len(first)} dims: [{values}{more}]"
    else:
        shown = "no vector"
    if len(data) > 1:
        return f"{len(data)} vectors of {shown}"
    return shown


def _value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _text(value)[:24]
    return f"{value:.6g}"


def placeholder_row(custom_id: str | None, note: str, *, safe_cells: bool = True) -> list[str]:
    """The row of a line that cannot be shown (too long to hold, or not JSON): its
    custom_id when one can be read, and `note` in the content cell."""
    values: list[Any] = [custom_id, None, None, None, None, None, None, note, None]
    return [_cell(v, safe_cells) for v in values]


class ResultCsv:
    """The guide's CSV over result (or error) lines: the header, then one row per line.

    Lines come as bytes or as `lines.Line` (read in bounded memory). A line over the
    line cap gets a row with its custom_id (read from its start) and a content cell
    `[line of N bytes: see FILE]`; a line that no parser reads but whose custom_id can be
    found gets a row saying so; a line with neither is a problem (`invalid_json`). A
    line given with its request's custom_id (`add_request`) always gets its row.
    """

    def __init__(self, out: TextIO, *, safe_cells: bool = True, max_errors: int = 100) -> None:
        self._writer = csv.writer(out)
        self.safe_cells = safe_cells
        self.max_errors = max_errors
        self.result = Conversion()
        # Lines added so far per file (`add_request`): the line numbers rows refer to.
        self._numbers: dict[str, int] = {}
        self._writer.writerow(RESULT_COLUMNS)

    def add_request(self, line: bytes | Line, shown_in: str, custom_id: str | None) -> None:
        """The row of one request, added in input order as its line is written to
        `shown_in` (result.jsonl or error.jsonl): always one row, with `custom_id` (the
        request's) when the line has none that can be read."""
        number = self._numbers.get(shown_in, 0) + 1
        self._numbers[shown_in] = number
        self.add(number, line, shown_in, custom_id=custom_id, always=True)

    def add(
        self,
        number: int,
        line: bytes | Line,
        shown_in: str,
        *,
        custom_id: str | None = None,
        always: bool = False,
    ) -> None:
        """One line (`number` is its 1-based line number in `shown_in`); blank lines
        are skipped. `always`: a line that is blank, not JSON or not an object still gets
        a row (with `custom_id`), never a problem."""
        if isinstance(line, Line):
            if line.data is None:
                note = f"[line of {line.size} bytes: see {shown_in}]"
                found = custom_id_of(line.head) or custom_id
                self._row(placeholder_row(found, note, safe_cells=self.safe_cells))
                return
            raw = line.data
        else:
            raw = line
        if not raw.strip() and not always:
            return
        try:
            parsed = loads(raw)
        except Unreadable as exc:
            found = custom_id_of(raw[:HEAD_BYTES]) or custom_id
            if found is None and not always:
                self.result.problem(number, "invalid_json", str(exc), self.max_errors)
                return
            note = f"[line {number} is not valid JSON: see {shown_in}]"
            self._row(placeholder_row(found, note, safe_cells=self.safe_cells))
            return
        if not isinstance(parsed, dict):
            if always:
                note = f"[line {number} is not an object: see {shown_in}]"
                self._row(placeholder_row(custom_id, note, safe_cells=self.safe_cells))
                return
            self.result.problem(
                number, "not_an_object", "a result line must be an object", self.max_errors
            )
            return
        self._row(result_row(parsed, safe_cells=self.safe_cells, custom_id=custom_id))

    def _row(self, cells: list[str]) -> None:
        self._writer.writerow(cells)
        self.result.rows += 1


@contextmanager
def result_csv(target: Path) -> Iterator[ResultCsv]:
    """Write `target` (an outbox's result.csv): UTF-8 with a BOM (Excel), every cell
    neutralised against formulas, flushed and fsynced when the block ends."""
    with target.open("w", encoding="utf-8-sig", newline="") as out:
        yield ResultCsv(out, safe_cells=True)
        out.flush()
        os.fsync(out.fileno())


def jsonl_to_csv(
    lines: Iterable[bytes | Line],
    out: TextIO,
    *,
    max_errors: int = 100,
    safe_cells: bool = True,
    shown_in: str = "the JSONL file",
) -> Conversion:
    """Write the CSV header and one row per result line; blank lines are skipped.

    `out` should be opened with encoding "utf-8-sig" (Excel's BOM) and newline="".
    `safe_cells` (the default) neutralises every cell a spreadsheet would run as a
    formula (see `neutralised`); turn it off only for files no spreadsheet opens.
    """
    table = ResultCsv(out, safe_cells=safe_cells, max_errors=max_errors)
    for number, line in enumerate(lines, start=1):
        table.add(number, line, shown_in)
    return table.result


def _text_rows(path: str | os.PathLike[str], encoding: str) -> Iterator[list[str]]:
    with open(path, encoding=encoding, newline="") as stream:
        yield from csv.reader(stream)


def csv_file_to_jsonl(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    model: str,
    endpoint: str | None = None,
    system_prompt: str | None = None,
    encoding: str = DEFAULT_CSV_ENCODING,
    max_errors: int = 100,
    columns: tuple[str, str] = DEFAULT_COLUMNS,
    encoding_flag: str | None = None,
) -> Conversion:
    """Convert a CSV file to a JSONL batch input file, written atomically, and only
    when every row converted. A file that is not in `encoding` is reported (`not_text`,
    naming its first such line and the fix: the sidecar's or configuration's encoding,
    or the command line's `encoding_flag` when given), not raised."""
    try:
        with atomic_output(target, fsync=False) as out:
            result = csv_to_jsonl(
                _text_rows(source, encoding),
                out,
                model=model,
                endpoint=endpoint,
                system_prompt=system_prompt,
                max_errors=max_errors,
                columns=columns,
            )
            if not result.ok:
                raise _Abandon(result)
    except _Abandon as abandon:
        return abandon.result
    except UnicodeDecodeError as exc:
        failed = Conversion()
        failed.problem(
            None, "not_text", _not_text(source, encoding, exc, encoding_flag), max_errors
        )
        return failed
    except csv.Error as exc:
        failed = Conversion()
        failed.problem(None, "bad_csv", str(exc), max_errors)
        return failed
    return result


def jsonl_file_to_csv(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    max_errors: int = 100,
    safe_cells: bool = True,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Conversion:
    """Convert a result (or error) JSONL file to the guide's CSV, UTF-8 with a BOM,
    written atomically, and only when every line converted. The file is read in bounded
    memory: a line over `max_line_bytes` is not held (its row says so)."""
    try:
        with atomic_output(target, fsync=False) as raw, open(source, "rb") as fh:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            result = jsonl_to_csv(
                iter_lines(fh, max_line_bytes),
                text,
                max_errors=max_errors,
                safe_cells=safe_cells,
                shown_in=os.path.basename(source),
            )
            text.flush()
            text.detach()
            if not result.ok:
                raise _Abandon(result)
    except _Abandon as abandon:
        return abandon.result
    return result


class _Abandon(Exception):
    """A conversion found bad rows; the partial output is thrown away."""

    def __init__(self, result: Conversion) -> None:
        super().__init__("conversion abandoned")
        self.result = result
