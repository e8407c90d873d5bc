"""Merge a job's result files with its input: every request in input order with its
final answer across all parts. Both stages need it: collect plans follow-ups from the
failures it finds, publish writes the outbox's files from it.

A success in any part wins over failures; among failures the latest round's wins (a
follow-up part retries earlier failures). A request without any answer gets an error line
of batchd's own saying why: it never ran (`NEVER_RUN`, `not_submitted`), the service
ended its batch without a line for it (`result_missing`), or its result file could not
be fetched (`RESULT_UNAVAILABLE`; a file given up after transient failures is
`kept_on_service`). Result lines no request claims (no custom_id, an unknown one, a
second answer) are `Strays`, copied byte for byte and counted by reason. Here too: where
a part's result files are (`output_path`), how much of a job's input was sent
(`sent_bytes`), which part an input line went to (`part_for`) and the result-line
helpers (`with_input_line`, `numbered`, `terminated`).

What the counts say, decided here once for every path: `never_run` counts the failures
whose code is in `NEVER_RAN_CODES` (`never_ran`), batchd's lines and the service's own
alike (a batch cancelled while it runs lists its requests not run as `batch_cancelled`);
a batch the service failed as a whole (`batch_error`) is stated once, in summary.json's
`error`, and each of its requests' lines refers to it by its code. `merge` writes
result.csv in the same pass as result.jsonl and error.jsonl, one row per request in
input order, from the line just written.

What each request cost (`Charges`, given the provider's prices): from the service's
usage where `prices.read_usage` accepts it, else its worst case as planning counts it
(`tokens.RequestCounter`): a usage refused or missing, and of a part whose result file
was lost, as many requests as the service counted completed and were not seen.

Result lines are paid for and never dropped: they are read with `batchd.inputs.lines` (NaN,
1e400, lone surrogates, lines cut short, lines of any length in bounded memory). A line
that a parser cannot read counts as a success when it came from the output file and as
a failure when it came from the error file; a line over `max_line_bytes` is copied in
chunks, never held whole.

PURE but for the files it is given: it reads the input and result files it is handed and
writes only the files it is asked to write; no store, no network, no clock.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batchd.documents import JsonObject
from batchd.inputs.csvio import ResultCsv, result_csv
from batchd.inputs.lines import (
    CHUNK_BYTES,
    DEFAULT_MAX_LINE_BYTES,
    Line,
    copy_line,
    copy_range,
    custom_id_of,
    identity,
    iter_lines,
    line_at,
    read_line,
    utf8_safe,
)
from batchd.inputs.spool import SpoolFolder
from batchd.models import Job, Part, PartState, RemoteStatus
from batchd.outbox.failures import error_code
from batchd.provider.prices import Usage, read_usage
from batchd.provider.profiles import ENDPOINT_EMBEDDINGS
from batchd.provider.tokens import RequestCounter

NEVER_RUN = {
    RemoteStatus.EXPIRED: ("batch_expired", "the batch expired before this request ran"),
    RemoteStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    RemoteStatus.FAILED: ("batch_failed", "the batch was rejected: see summary.json error"),
    "lost": ("batch_lost", "the batch did not end within its completion window"),
}
# The codes of failed requests the service never ran, whoever wrote the line: batchd's
# own lines for requests without an answer (above, and `not_submitted`), and the
# service's own lines for the requests of a batch that expired or was cancelled before
# they ran (`batch_expired`, `batch_cancelled`). `never_run` in summary.json counts the
# failures with one of them (`never_ran`). Not here: `result_missing` (the service
# ended the batch without a line for the request: whether it ran is not known) and
# `result_unavailable` (the result file could not be fetched: it most likely ran).
NEVER_RAN_CODES = frozenset(
    {"batch_expired", "batch_cancelled", "batch_failed", "batch_lost", "not_submitted"}
)
# The code of requests whose result file could not be fetched: they most likely ran
# (and were billed), so they are not resubmitted on their own.
RESULT_UNAVAILABLE = "result_unavailable"
# A reason in `Part.unavailable` that starts so names a file given up after transient
# failures: it may still be fetchable, and is never deleted on the service.
GAVE_UP = "gave up after"
# What summary.json lists of the lines kept in unattributed.jsonl (all are counted).
MAX_LISTED_STRAYS = 100


def output_path(part: Part, kind: str) -> Path:
    """PURE: where the collect stage puts a part's `kind` ("output" or "error") result
    file, beside the part's input in the spool."""
    return SpoolFolder.of_input(part.path).result(part.seq, kind)


def sent_bytes(job: Job) -> int | None:
    """PURE: how much of the job's JSONL input was validated (and so sent): the first
    `job.bytes` of a JSONL input (a producer may have appended to it since); a CSV job's
    JSONL is batchd's own conversion, read whole."""
    return job.bytes if job.kind == "jsonl" else None


def never_ran(code: str | None, *, sent: bool = True) -> bool:
    """PURE: did the service never run this failed request? Nothing of an input that was
    never sent ran (a rejected input: `sent` False, whatever each line's code); of a sent
    one, the failures whose code is in `NEVER_RAN_CODES`."""
    return not sent or code in NEVER_RAN_CODES


def failure_code(item: Merged) -> str | None:
    """PURE: the code a failed request is published with: batchd's own for a request
    without an answer, else the service's (`error.code`, or the failed response's
    `body.error.code`); None when the line cannot be read."""
    if item.code is not None:
        return item.code
    return error_code(item.answer) if item.answer is not None else None


def kept_on_service(reason: str) -> bool:
    """PURE: was this file given up after transient failures (so it may still exist)?"""
    return reason.startswith(GAVE_UP)


USAGE_KEYS = ("prompt_tokens", "completion_tokens", "reasoning_tokens", "total_tokens")
# Why a request was charged its worst case instead of the service's usage (summary.json's
# `cost.estimated.reasons`): its line's usage was refused (`read_usage`), it had none (a
# success line without usage, or one no parser reads), or its result file was lost.
USAGE_REFUSED = "usage_refused"
USAGE_MISSING = "usage_missing"
# The most requests charged their worst case that summary.json lists one by one.
MAX_LISTED_ESTIMATES = 20


@dataclass(slots=True)
class ModelCost:
    """What one model's requests cost at batch prices: priced from the service's usage,
    and charged their worst case where the usage could not be used (`estimated`);
    `priced` False once the model has no price (its cost is unknown, never 0)."""

    from_usage: float = 0.0
    estimated: float = 0.0
    estimated_requests: int = 0
    priced: bool = True

    @property
    def amount(self) -> float | None:
        return self.from_usage + self.estimated if self.priced else None


@dataclass(slots=True)
class MergeStats:
    total: int = 0
    completed: int = 0
    failed: int = 0
    never_run: int = 0
    unavailable: int = 0  # requests published as result_unavailable
    unattributed: int = 0  # lines kept in unattributed.jsonl
    unattributed_reasons: dict[str, int] = field(default_factory=dict)
    unattributed_lines: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    # Per model: the requests whose usage was counted, and that usage.
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per model: what its requests cost (only when the merge was given prices).
    costs: dict[str, ModelCost] = field(default_factory=dict)
    # Requests charged their worst case: counted per reason, the first few listed, and
    # per part whose result file was lost, how many of its requests were charged.
    estimated_reasons: dict[str, int] = field(default_factory=dict)
    estimated_lines: list[dict[str, Any]] = field(default_factory=list)
    unavailable_parts: list[dict[str, Any]] = field(default_factory=list)


def usage_of(answer: JsonObject | None) -> JsonObject | None:
    """PURE: the `usage` object of a result line, whatever shape its body came in (an
    object, or a JSON string from some gateways); None when it has none."""
    if answer is None:
        return None
    response = answer.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    if isinstance(body, str):
        body = read_line(body.encode("utf-8", "surrogatepass"))
    usage = body.get("usage") if isinstance(body, dict) else None
    return usage if isinstance(usage, dict) else None


def completed_count(part: Part) -> int | None:
    """PURE: how many of the part's requests the service counted completed
    (`request_counts.completed`), when that is a count within the part; else None."""
    value = (part.request_counts or {}).get("completed")
    if type(value) is int and 0 <= value <= part.requests:
        return value
    return None


class Charges:
    """What a job's requests cost, request by request as the merge meets them.

    - A line whose usage `read_usage` accepts (successes and failures alike: a failure
      that reports usage was billed) is priced from it.
    - A line whose usage is refused (a string, a negative, a float, NaN, an absurd
      number, a count missing), and a success line without usage or that no parser
      reads, is charged the request's worst case: its input tokens counted as planning
      counts them and its whole output bound, priced in its tier (`RequestCounter`).
    - Requests whose result file was lost are charged by part: the service counted
      `completed` of the part's requests; those it completed that were not seen in the
      part's fetched files are among the lost ones, so that many of them are charged
      their worst case, the dearest first (all of them when the part's count is missing
      or makes no sense). A request the service did not complete was not billed. The
      lost ones of a first part are published as `result_unavailable`; those of a
      follow-up part keep the earlier round's answer (its file lists them).
    - A failure without usage was not billed.
    """

    def __init__(
        self,
        stats: MergeStats,
        counter: RequestCounter | None,
        parts: list[Part] | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self.stats = stats
        self.counter = counter
        # part seq -> successes seen from its files; requests without a result, each as
        # (worst-case cost, model).
        self.seen: dict[int, int] = {}
        self.lost: dict[int, list[tuple[float | None, str]]] = {}
        # custom_id -> seq of the follow-up part it was sent in, for follow-up parts
        # whose output file was lost (read from their own files, in the spool).
        self.lost_follow_ups: dict[str, int] = {}
        for part in parts or []:
            if part.round > 0 and "output" in (part.unavailable or {}):
                path = Path(part.path)
                if path.is_file():
                    for _, cid, _, _ in _input_lines(path, max_line_bytes, None):
                        if cid is not None:
                            self.lost_follow_ups[cid] = part.seq

    def add(self, item: Merged) -> None:
        """Count what one request cost (see the class's docstring)."""
        model = item.model or "unknown"
        if item.ok and item.part is not None:
            self.seen[item.part] = self.seen.get(item.part, 0) + 1
        usage = usage_of(item.answer)
        if usage is not None:
            counted = read_usage(usage, embeddings=_endpoint(item) == ENDPOINT_EMBEDDINGS)
            if isinstance(counted, Usage):
                self._used(model, counted)
            else:
                self._estimate(item, model, USAGE_REFUSED, counted)
        elif item.ok:
            if item.long is not None:
                why = "the line is too long to read whole (jobs.max_result_line_bytes)"
            elif item.answer is None:
                why = "the line does not parse"
            else:
                why = "no usage on the line"
            self._estimate(item, model, USAGE_MISSING, why)
        elif item.code == RESULT_UNAVAILABLE and item.part is not None:
            self.lost.setdefault(item.part, []).append((self._worst(item, model), model))
        resent = self.lost_follow_ups.get(item.custom_id or "") if not item.ok else None
        if resent is not None and resent != item.part:
            self.lost.setdefault(resent, []).append((self._worst(item, model), model))

    def _cost(self, model: str) -> ModelCost | None:
        if self.counter is None:
            return None
        own = self.stats.costs.get(model)
        if own is None:
            own = self.stats.costs[model] = ModelCost(priced=self.counter.price(model) is not None)
        return own

    def _used(self, model: str, usage: Usage) -> None:
        stats = self.stats
        seen = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "total_tokens": usage.total_tokens,
        }
        own = stats.per_model.setdefault(model, {"requests": 0, **dict.fromkeys(USAGE_KEYS, 0)})
        own["requests"] += 1
        for key, value in seen.items():
            stats.usage[key] += value
            own[key] += value
        cost = self._cost(model)
        if cost is not None and self.counter is not None:
            price = self.counter.price(model)
            if price is not None:
                cost.from_usage += price.usage_cost(usage)

    def _worst(self, item: Merged, model: str) -> float | None:
        """The request's worst-case cost; None when it cannot be priced."""
        counter = self.counter
        request = item.request
        body = request.get("body") if request is not None else None
        if counter is None or counter.price(model) is None or not isinstance(body, dict):
            return None
        return counter.worst(body, _endpoint(item) or "").cost

    def _charge(self, model: str, amount: float | None, reason: str) -> None:
        reasons = self.stats.estimated_reasons
        reasons[reason] = reasons.get(reason, 0) + 1
        cost = self._cost(model)
        if cost is None:
            return
        cost.estimated_requests += 1
        if amount is None:
            cost.priced = False
        else:
            cost.estimated += amount

    def _estimate(self, item: Merged, model: str, reason: str, note: str) -> None:
        self._charge(model, self._worst(item, model), reason)
        listed = self.stats.estimated_lines
        if len(listed) < MAX_LISTED_ESTIMATES:
            listed.append(
                {
                    "input_line": item.number,
                    "custom_id": utf8_safe(item.custom_id) if item.custom_id else None,
                    "reason": reason,
                    "note": note,
                }
            )

    def finish(self, parts: list[Part]) -> None:
        """Charge the requests of parts whose result file was lost (see the class)."""
        by_seq = {p.seq: p for p in parts}
        for seq, lost in sorted(self.lost.items()):
            completed = completed_count(by_seq[seq]) if seq in by_seq else None
            charged = len(lost)
            if completed is not None:
                charged = min(charged, max(0, completed - self.seen.get(seq, 0)))
            lost.sort(key=lambda entry: -1.0 if entry[0] is None else entry[0], reverse=True)
            for amount, model in lost[:charged]:
                self._charge(model, amount, RESULT_UNAVAILABLE)
            self.stats.unavailable_parts.append(
                {
                    "part": seq,
                    "requests": len(lost),
                    "completed": completed,
                    "charged": charged,
                }
            )


def _endpoint(item: Merged) -> str | None:
    url = item.request.get("url") if item.request is not None else None
    return url if isinstance(url, str) else None


@dataclass(frozen=True, slots=True)
class Source:
    """One downloaded result file of a part."""

    path: Path
    kind: str  # "output" or "error"
    part: Part


def _sources(parts: list[Part]) -> list[Source]:
    """Error files first, then output files, each in part order: a later entry for the
    same custom_id replaces an earlier one (a success wins; a follow-up's answer wins
    over the failure it retried)."""
    found: list[Source] = []
    collected = [p for p in parts if p.state == PartState.COLLECTED]
    for kind in ("error", "output"):
        for part in collected:
            path = output_path(part, kind)
            if path.exists():
                found.append(Source(path, kind, part))
    return found


def _line_id(line: Line) -> str | None:
    if line.data is None:
        return custom_id_of(line.head)
    return identity(line.data, read_line(line.data))


def _superseded(earlier: Source, later: Source) -> bool:
    """PURE: does `later` replace `earlier` as expected (a failure retried by a later
    round)? Any other second answer for a request is a duplicate, kept apart."""
    return earlier.kind == "error" and earlier.part.round < later.part.round


@dataclass(slots=True)
class Strays:
    """Result lines no request claims: copied byte for byte into `path` (created on the
    first one), counted by reason, the first few listed for summary.json."""

    path: Path | None
    stats: MergeStats
    _out: IO[bytes] | None = None

    def keep(self, fh: IO[bytes], line: Line, source: Source, reason: str, cid: str | None) -> None:
        stats = self.stats
        stats.unattributed += 1
        stats.unattributed_reasons[reason] = stats.unattributed_reasons.get(reason, 0) + 1
        if len(stats.unattributed_lines) < MAX_LISTED_STRAYS:
            stats.unattributed_lines.append(
                {
                    "line": stats.unattributed,
                    "reason": reason,
                    "custom_id": utf8_safe(cid) if cid is not None else None,
                    "part": source.part.seq,
                    "file": source.kind,
                    "file_id": (
                        source.part.output_file_id
                        if source.kind == "output"
                        else source.part.error_file_id
                    ),
                    "bytes": line.size,
                }
            )
        if self.path is None:
            return
        if self._out is None:
            self._out = self.path.open("wb")
        copy_line(fh, line, self._out)

    def close(self) -> None:
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None


def _index(
    sources: list[Source], handles: list[IO[bytes]], max_line_bytes: int, strays: Strays
) -> dict[str, tuple[int, int]]:
    """custom_id -> (source slot, byte offset) of every result line; lines without a
    custom_id and second answers for a request go to `strays` as they are met."""
    index: dict[str, tuple[int, int]] = {}
    for slot, source in enumerate(sources):
        fh = handles[slot]
        fh.seek(0)
        for line in iter_lines(fh, max_line_bytes):
            if line.blank:
                continue
            cid = _line_id(line)
            if cid is None:
                strays.keep(fh, line, source, "no_custom_id", None)
            else:
                earlier = index.get(cid)
                if earlier is not None and not _superseded(sources[earlier[0]], source):
                    old_fh = handles[earlier[0]]
                    old = line_at(old_fh, earlier[1], max_line_bytes)
                    strays.keep(old_fh, old, sources[earlier[0]], "duplicate", cid)
                index[cid] = (slot, line.offset)
            # A copy may have moved the handle the pass reads: back to where it was.
            fh.seek(line.offset + line.size)
    return index


def numbered(
    path: Path, max_line_bytes: int, limit: int | None
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of every line of an input, blank ones included, within its
    first `limit` bytes; None for a line over the cap (never a valid request)."""
    with path.open("rb") as fh:
        for number, line in enumerate(iter_lines(fh, max_line_bytes), start=1):
            if limit is not None and line.offset >= limit:
                return
            data = line.data
            if data is not None and limit is not None and line.offset + line.size > limit:
                data = data[: limit - line.offset]
            yield number, data


def _input_lines(
    path: Path, max_line_bytes: int, limit: int | None
) -> Iterator[tuple[int, str | None, str | None, JsonObject | None]]:
    """(line number, custom_id, model, the line read) of every request of a validated
    input."""
    for number, raw in numbered(path, max_line_bytes, limit):
        if raw is not None and not raw.strip():
            continue
        obj = read_line(raw) if raw is not None else None
        cid = obj.get("custom_id") if obj is not None else None
        body = obj.get("body") if obj is not None else None
        model = body.get("model") if isinstance(body, dict) else None
        yield (
            number,
            cid if isinstance(cid, str) else None,
            model if isinstance(model, str) else None,
            obj,
        )


def with_input_line(line: bytes, number: int) -> bytes:
    """PURE: the service's error line with `"input_line": N` added, its bytes otherwise kept."""
    body = line.rstrip(b"\r\n").rstrip()
    if body.endswith(b"}"):
        inner = body[:-1].rstrip()
        comma = b"" if inner.endswith(b"{") else b","
        return body[:-1] + comma + b'"input_line":' + str(number).encode() + b"}\n"
    return orjson.dumps({"input_line": number, "raw": body.decode("utf-8", "replace")}) + b"\n"


_WHITESPACE = b" \t\r\n"


def write_with_input_line(fh: IO[bytes], line: Line, number: int, out: IO[bytes]) -> None:
    """`with_input_line` for a line too long to hold: copied in chunks up to its closing
    brace, then `,"input_line":N}`; a line that does not end with a brace is written as
    `{"input_line":N,"raw":"..."}`, its text escaped chunk by chunk."""
    # The end of the line's last byte that is not whitespace, found from the end back.
    last = line.offset + line.size
    while last > line.offset:
        start = max(line.offset, last - 4096)
        fh.seek(start)
        chunk = fh.read(last - start).rstrip(_WHITESPACE)
        if chunk:
            last = start + len(chunk)
            break
        last = start
    closing = b""
    if last > line.offset:
        fh.seek(last - 1)
        closing = fh.read(1)
    if closing == b"}":
        before = max(line.offset, last - 1 - 4096)
        fh.seek(before)
        comma = b"" if fh.read(last - 1 - before).rstrip(_WHITESPACE).endswith(b"{") else b","
        copy_range(fh, line.offset, last - 1 - line.offset, out)
        out.write(comma + b'"input_line":' + str(number).encode() + b"}\n")
        return
    out.write(b'{"input_line":' + str(number).encode() + b',"raw":"')
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    fh.seek(line.offset)
    left = last - line.offset
    while left > 0:
        chunk = fh.read(min(CHUNK_BYTES, left))
        if not chunk:
            break
        left -= len(chunk)
        out.write(orjson.dumps(decoder.decode(chunk, left <= 0))[1:-1])
    out.write(b'"}\n')


@dataclass(frozen=True, slots=True)
class LongLine:
    """Where a result line too long to hold is: it is copied from there."""

    path: Path
    line: Line


@dataclass(frozen=True, slots=True)
class Merged:
    """One request of the job after every part: its input line and final answer."""

    number: int
    custom_id: str | None
    model: str | None
    ok: bool
    # The line to publish (successes as sent; failures with input_line); None for a
    # line too long to hold, copied from `long` instead.
    line: bytes | None
    answer: JsonObject | None  # the parsed line; None when unread or never run
    long: LongLine | None = None
    never_ran: bool = False  # no answer at all: the line is batchd's own
    code: str | None = None  # batchd's error code for a request without an answer
    # The part whose file the answer came from; for a request without an answer, the
    # part it was sent in.
    part: int | None = None
    request: JsonObject | None = None  # the input line, read


def merged(
    job_input: Path,
    parts: list[Part],
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    input_bytes: int | None = None,
    strays: Strays | None = None,
) -> Iterator[Merged]:
    """Every request in input order with its final answer across all parts.

    A success in any part wins over failures; among failures the latest part's wins (a
    follow-up part retries earlier failures). A request with no answer at all gets an
    error line of its own saying why: it never ran, or its result file could not be
    fetched. Result lines no request claims (no custom_id, an unknown one, a second
    answer) go to `strays`. Only the first `input_bytes` of the input are read.
    """
    sources = _sources(parts)
    handles: list[IO[bytes]] = [s.path.open("rb") for s in sources]
    kept = strays if strays is not None else Strays(None, MergeStats())
    reasons = {p.seq: _missing_reason(p) for p in parts}
    originals = [p for p in parts if p.round == 0] or parts
    try:
        # One entry per request of the job (about 100 bytes each).
        index = _index(sources, handles, max_line_bytes, kept)
        for number, cid, model, request in _input_lines(job_input, max_line_bytes, input_bytes):
            hit = index.pop(cid, None) if cid is not None else None
            if hit is not None and cid is not None:
                source = sources[hit[0]]
                line = line_at(handles[hit[0]], hit[1], max_line_bytes)
                yield _answered(number, cid, model, source, line, request)
                continue
            sent_in = part_for(originals, number, model).seq
            code, message = reasons[sent_in]
            error_line = orjson.dumps(
                {
                    "id": None,
                    "custom_id": utf8_safe(cid) if cid is not None else None,
                    "response": None,
                    "error": {
                        "code": code or "result_missing",
                        "message": message or "the service returned no result for this request",
                    },
                    "input_line": number,
                }
            )
            yield Merged(
                number,
                cid,
                model,
                False,
                error_line + b"\n",
                None,
                never_ran=True,
                code=code or "result_missing",
                part=sent_in,
                request=request,
            )
        # Answers for custom_ids the input does not have.
        for cid, (slot, offset) in sorted(index.items(), key=lambda item: item[1]):
            line = line_at(handles[slot], offset, max_line_bytes)
            kept.keep(handles[slot], line, sources[slot], "unknown_custom_id", cid)
    finally:
        for fh in handles:
            fh.close()


def _answered(
    number: int,
    cid: str,
    model: str | None,
    source: Source,
    line: Line,
    request: JsonObject | None,
) -> Merged:
    """PURE: a request's answer from its line: parsed when it can be; a line no parser
    reads (or too long to hold) is a success from the output file, a failure from the
    error file."""
    seq = source.part.seq
    if line.data is None:
        ok = source.kind == "output"
        return Merged(
            number,
            cid,
            model,
            ok,
            None,
            None,
            LongLine(source.path, line),
            part=seq,
            request=request,
        )
    answer = read_line(line.data)
    ok = _is_success(answer) if answer is not None else source.kind == "output"
    raw = terminated(line.data) if ok else with_input_line(line.data, number)
    return Merged(number, cid, model, ok, raw, answer, part=seq, request=request)


def merge(
    job_input: Path,
    parts: list[Part],
    result: Path,
    errors: Path,
    unattributed: Path | None = None,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    input_bytes: int | None = None,
    counter: RequestCounter | None = None,
    results_csv: Path | None = None,
) -> MergeStats:
    """Write successes and failures in input order into `result` and `errors`, the
    result lines no request claims into `unattributed` (created only when there are
    any) and, given `results_csv`, one CSV row per request in input order, each from the
    line just written; in bounded memory whatever the lines' lengths. Given `counter`
    (the provider's prices and limits), what each request cost (`Charges`)."""
    stats = MergeStats()
    charges = Charges(stats, counter, parts, max_line_bytes)
    strays = Strays(unattributed, stats)
    try:
        with (
            result.open("wb") as res,
            errors.open("wb") as err,
            result_csv(results_csv) if results_csv is not None else nullcontext() as table,
        ):
            for item in merged(
                job_input,
                parts,
                max_line_bytes=max_line_bytes,
                input_bytes=input_bytes,
                strays=strays,
            ):
                stats.total += 1
                charges.add(item)
                out = res if item.ok else err
                written = _write(item, out)
                if table is not None:
                    _add_row(table, item, written, (result if item.ok else errors).name)
                if item.ok:
                    stats.completed += 1
                    continue
                stats.failed += 1
                if item.code == RESULT_UNAVAILABLE:
                    stats.unavailable += 1
                elif never_ran(failure_code(item)):
                    stats.never_run += 1
            for out in (res, err):
                out.flush()
                os.fsync(out.fileno())
        charges.finish(parts)
    finally:
        strays.close()
    return stats


def _write(item: Merged, out: IO[bytes]) -> int:
    """Write the item's line to `out`; the bytes written."""
    if item.line is not None:
        out.write(item.line)
        return len(item.line)
    assert item.long is not None
    start = out.tell()
    with item.long.path.open("rb") as fh:
        if item.ok:
            copy_line(fh, item.long.line, out)
        else:
            write_with_input_line(fh, item.long.line, item.number, out)
    return out.tell() - start


def _add_row(table: ResultCsv, item: Merged, written: int, shown_in: str) -> None:
    """The request's row, from the line as written (a long one: its start and size)."""
    if item.line is not None:
        table.add_request(item.line, shown_in, item.custom_id)
        return
    assert item.long is not None
    line = Line(0, written, None, item.long.line.head)
    table.add_request(line, shown_in, item.custom_id)


def terminated(line: bytes) -> bytes:
    """PURE: the line, ending with a newline (one is added when it has none)."""
    return line if line.endswith(b"\n") else line + b"\n"


def _is_success(obj: JsonObject) -> bool:
    if obj.get("error"):
        return False
    response = obj.get("response")
    return isinstance(response, dict) and response.get("status_code") in (200, None)


def part_for(parts: list[Part], line: int, model: str | None) -> Part:
    """PURE: the part an input line went to. Parts hold consecutive lines of the input
    (or, grouped by model, consecutive lines of one model), in `seq` order."""
    same_model = [p for p in parts if p.model == model] or parts
    best = same_model[0]
    for part in same_model:
        if part.first_line <= line:
            best = part
    return best


def _missing_reason(part: Part) -> tuple[str, str]:
    """PURE: the code and message of a request of `part` without any answer."""
    if part.unavailable:
        files = "; ".join(
            f"the {kind} file {file_of(part, kind)} ({reason})"
            for kind, reason in sorted(part.unavailable.items())
        )
        return RESULT_UNAVAILABLE, f"the result could not be fetched: {files}"
    return _never_run_reason(part)


def file_of(part: Part, kind: str) -> str | None:
    """PURE: the id of the part's `kind` ("output" or "error") result file, if any."""
    return part.output_file_id if kind == "output" else part.error_file_id


def _never_run_reason(part: Part) -> tuple[str, str]:
    if part.state == PartState.FAILED:
        return "not_submitted", f"the part could not be submitted: {part.error}"
    if part.state == PartState.CANCELLED:
        return NEVER_RUN[RemoteStatus.CANCELLED]
    code, message = NEVER_RUN.get(part.remote_status or "", ("result_missing", ""))
    rejected = batch_error(part)
    if rejected is not None:
        # Stated once, in summary.json; each line refers to it by its code.
        message = f"{message} ({rejected['code']})"
    return code, message


# A whole-batch error as summary.json states it: the service's own code and message
# (this long at most), for a batch the service failed (`errors.data` of the Batch).
MAX_ERROR_CODE_CHARS = 100
MAX_ERROR_MESSAGE_CHARS = 500
BATCH_FAILED = "batch_failed"


def batch_error(part: Part) -> dict[str, Any] | None:
    """PURE: the error of a part whose batch the service failed, stated once: the
    service's first listed error (`code`, `message`, with its input line when given),
    how many it listed (`listed`), the part and its batch; None for any other part.
    The service's `errors` are never trusted: anything but an object with a string
    code and message gives the code `batch_failed` and a message saying so."""
    if part.remote_status != RemoteStatus.FAILED:
        return None
    items = _error_items(part.remote_errors)
    first = items[0] if items else {}
    code = first.get("code")
    message = first.get("message")
    line = first.get("line")
    code = utf8_safe(code)[:MAX_ERROR_CODE_CHARS] if isinstance(code, str) and code else None
    if not isinstance(message, str) or not message:
        message = (
            "the service failed the batch without saying why"
            if part.remote_errors is None
            else "the service failed the batch; its errors are in the part's errors"
        )
    message = utf8_safe(message)[:MAX_ERROR_MESSAGE_CHARS]
    if isinstance(line, int) and not isinstance(line, bool) and line > 0:
        message = f"{message} (line {line} of part {part.seq})"
    if len(items) > 1:
        message = f"{message}; {len(items) - 1} more listed in the part's errors"
    return {
        "code": code or BATCH_FAILED,
        "message": message,
        "part": part.seq,
        "batch_id": part.batch_id,
        "listed": len(items),
    }


def _error_items(errors: Any) -> list[JsonObject]:
    """The error objects of a Batch's `errors`: `{"data": [...]}` (OpenAI, DashScope),
    a bare list, or one object with a code."""
    if isinstance(errors, dict):
        data = errors.get("data")
        if isinstance(data, list):
            errors = data
        elif "code" in errors or "message" in errors:
            errors = [errors]
    if not isinstance(errors, list):
        return []
    return [item for item in errors if isinstance(item, dict)]
