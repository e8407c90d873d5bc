"""What the service answers, parsed once at the boundary into checked, typed objects.

No field from the server is trusted for identity or control flow without a check:

- Identity fields (a batch's or a file's `id`) must be non-empty strings of a sane length
  made of the characters ids are made of; an object without one is refused with
  `BadAnswer`, and the caller fails that one step of that one part with a note.
- Every other field is coerced where its meaning is clear (a count sent as `"12"`, a time
  sent as an ISO 8601 string or in milliseconds) and dropped to None with a note where it
  is not (`"n/a"`, a negative count, a list where a map belongs). Notes travel with the
  object, so that what was dropped is visible on the part, not only in a log.

Stages never see the server's dicts, only these objects (STYLE.md, "Lessons").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from batchd.documents import JsonObject
from batchd.errors import BatchdError

# Ids are path segments of later calls (`/batches/{id}`, `/files/{id}/content`): nothing
# that could leave the segment (`/`, `?`, `#`, `%`, spaces, `..`) is accepted.
_ID = re.compile(r"[A-Za-z0-9_.:~+=@-]{1,256}", re.ASCII)
# A batch input named as an OSS object (SPEC.md "Inputs from OSS"), as batchd sends it
# with the spool on a bucket: `oss:REGION:BUCKET/KEY`, a key of printable characters.
_OSS_NAME = re.compile(r"oss:[a-z0-9-]{1,64}:[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\x00-\x1f\x7f]+")
_MAX_OSS_NAME_BYTES = 1200
_DIGITS = re.compile(r"[0-9]{1,15}", re.ASCII)
# Seconds since 1970 before the year 5138; larger values are taken for milliseconds.
_MAX_SECONDS = 1e11
_MAX_MILLISECONDS = 1e14
# A batch's `errors` is kept for the report, within reason.
MAX_ERRORS_BYTES = 64 * 1024
MAX_STATUS_CHARS = 64
COUNT_KEYS = ("total", "completed", "failed")
# The Batch object's own timestamps (SPEC.md "Batch object"), kept under these names as
# the provider's record (summary.json's `provider_times`); batchd's timings are its own.
TIME_KEYS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class BadAnswer(BatchdError):
    """The service's answer cannot be used: an identity field is missing or malformed."""


def valid_id(value: Any) -> bool:
    """PURE: is this a usable remote id (a batch's or a file's)?"""
    return isinstance(value, str) and _ID.fullmatch(value) is not None and ".." not in value


def valid_input_id(value: Any) -> bool:
    """PURE: is this a usable batch input: a file's id, or an OSS object's name?"""
    if valid_id(value):
        return True
    return (
        isinstance(value, str)
        and len(value.encode("utf-8", "surrogatepass")) <= _MAX_OSS_NAME_BYTES
        and _OSS_NAME.fullmatch(value) is not None
    )


def _id(value: Any, what: str) -> str:
    if not valid_id(value):
        shown = repr(value)[:80]
        raise BadAnswer(f"{what} has no usable id (got {shown})")
    return str(value)


def _optional_id(
    value: Any, name: str, notes: list[str], valid: Callable[[Any], bool] = valid_id
) -> str | None:
    if value is None or value == "":
        return None
    if valid(value):
        return str(value)
    notes.append(f"{name} ignored: not a usable id ({repr(value)[:60]})")
    return None


def count(value: Any, name: str, notes: list[str]) -> int | None:
    """PURE: a request count as a whole number >= 0, or None (with a note) when the
    server sent something else. `"12"` and `12.0` are 12; `true`, `-1`, `"n/a"` are not."""
    if value is None:
        return None
    if isinstance(value, bool):
        notes.append(f"{name} ignored: {value!r} is not a count")
        return None
    if isinstance(value, int):
        if value >= 0:
            return value
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and 0 <= value < 2**53:
            return int(value)
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    notes.append(f"{name} ignored: {repr(value)[:40]} is not a count")
    return None


def timestamp(value: Any, name: str, notes: list[str]) -> float | None:
    """PURE: a moment as Unix seconds, from seconds, milliseconds, a numeric string or
    an ISO 8601 string; None (with a note) for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        notes.append(f"{name} ignored: {value!r} is not a time")
        return None
    number: float | None = None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                notes.append(f"{name} ignored: {text[:40]!r} is not a time")
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return when.timestamp()
    if number is None or not math.isfinite(number) or number < 0:
        notes.append(f"{name} ignored: {repr(value)[:40]} is not a time")
        return None
    if number < _MAX_SECONDS:
        return number
    if number < _MAX_MILLISECONDS:
        return number / 1000.0
    notes.append(f"{name} ignored: {repr(value)[:40]} is not a time")
    return None


def request_counts(value: Any, notes: list[str]) -> dict[str, int] | None:
    """PURE: `request_counts` with only the counts that are whole numbers >= 0; None
    when there is no map at all. Counts that cannot all be true together (completed and
    failed above total) are kept, with a note: the result files are what is counted."""
    if value is None:
        return None
    if not isinstance(value, dict):
        notes.append(f"request_counts ignored: {repr(value)[:60]} is not a map")
        return None
    counts: dict[str, int] = {}
    for key in COUNT_KEYS:
        number = count(value.get(key), f"request_counts.{key}", notes)
        if number is not None:
            counts[key] = number
    total = counts.get("total")
    done = counts.get("completed", 0) + counts.get("failed", 0)
    if total is not None and done > total:
        notes.append(f"request_counts do not add up: {done} done of {total}")
    return counts


def _status(value: Any, notes: list[str]) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and len(value) <= MAX_STATUS_CHARS and value.isprintable():
        return value
    notes.append(f"status ignored: {repr(value)[:60]}")
    return None


def _errors(value: Any, notes: list[str]) -> Any:
    """The batch's `errors` as sent (any JSON), or a note when it is too big to keep."""
    if value is None or value == "" or value == {} or value == []:
        return None
    try:
        size = len(orjson.dumps(value))
    except TypeError:
        notes.append("errors ignored: not JSON")
        return None
    if size > MAX_ERRORS_BYTES:
        notes.append(f"errors cut: {size} bytes")
        return {"truncated": orjson.dumps(value)[:MAX_ERRORS_BYTES].decode("utf-8", "replace")}
    return value


def _metadata(value: Any, notes: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        notes.append("metadata ignored: not a map")
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


@dataclass(frozen=True, slots=True)
class RemoteBatch:
    """A Batch object, checked field by field (SPEC.md "Batch object")."""

    id: str
    status: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    request_counts: dict[str, int] | None
    created_at: float | None
    errors: Any
    metadata: dict[str, str]
    notes: tuple[str, ...] = ()
    # Every one of TIME_KEYS, in Unix seconds on the provider's clock; None when absent
    # or not a time (with a note). Shown, never used for a decision.
    times: dict[str, float | None] | None = None

    @classmethod
    def parse(cls, raw: Any) -> RemoteBatch:
        """Check one Batch object; `BadAnswer` when it has no usable id."""
        if not isinstance(raw, dict):
            raise BadAnswer(f"a batch is not an object (got {type(raw).__name__})")
        notes: list[str] = []
        times = {key: timestamp(raw.get(key), key, notes) for key in TIME_KEYS}
        return cls(
            id=_id(raw.get("id"), "a batch"),
            status=_status(raw.get("status"), notes),
            input_file_id=_optional_id(
                raw.get("input_file_id"), "input_file_id", notes, valid_input_id
            ),
            output_file_id=_optional_id(raw.get("output_file_id"), "output_file_id", notes),
            error_file_id=_optional_id(raw.get("error_file_id"), "error_file_id", notes),
            request_counts=request_counts(raw.get("request_counts"), notes),
            created_at=times["created_at"],
            errors=_errors(raw.get("errors"), notes),
            metadata=_metadata(raw.get("metadata"), notes),
            notes=tuple(notes),
            times=times,
        )

    def part_fields(self) -> dict[str, Any]:
        """The columns this batch sets on its part."""
        return {
            "remote_status": self.status,
            "request_counts": self.request_counts,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "remote_errors": self.errors,
            "provider_times": self.times,
        }


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A File object (upload answer, list item), checked field by field."""

    id: str
    filename: str | None
    bytes: int | None
    created_at: float | None
    notes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: Any) -> RemoteFile:
        if not isinstance(raw, dict):
            raise BadAnswer(f"a file is not an object (got {type(raw).__name__})")
        notes: list[str] = []
        name = raw.get("filename")
        return cls(
            id=_id(raw.get("id"), "a file"),
            filename=name if isinstance(name, str) else None,
            bytes=count(raw.get("bytes"), "bytes", notes),
            created_at=timestamp(raw.get("created_at"), "created_at", notes),
            notes=tuple(notes),
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list call: its items (still raw, each parsed by the caller's type),
    whether the server says more follow, and the cursor for the next page."""

    items: list[JsonObject]
    has_more: bool
    last_id: str | None

    @classmethod
    def parse(cls, raw: Any) -> Page:
        if not isinstance(raw, dict):
            raise BadAnswer(f"a list answer is not an object (got {type(raw).__name__})")
        data = raw.get("data")
        if not isinstance(data, list):
            raise BadAnswer("a list answer has no data list")
        items = [d for d in data if isinstance(d, dict)]
        last = items[-1].get("id") if items else None
        return cls(
            items=items,
            has_more=raw.get("has_more") is True,
            last_id=str(last) if valid_id(last) else None,
        )
