"""One tolerant reader of the service's result lines.

orjson is strict JSON: it refuses a lone surrogate (an emoji cut at max_tokens),
`NaN`, `Infinity` and numbers beyond a double (`1e400`), all of which real services
send in lines that are otherwise perfectly readable and already paid for. Those lines
are read again with Python's json module, which takes all of them. A line that is not
JSON at all (cut short, say) still names its request: its `custom_id` is read from the
line's start.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# `"custom_id": "<a JSON string>"` as the service writes it, near the start of a line.
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\]|\\.){0,4096}")')


def read_line(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on this line, strictly if possible, tolerantly if not; None when
    the line is not a JSON object at all."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(raw.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def custom_id_of(head: bytes) -> str | None:
    """The request a line answers, from the line's first bytes, whatever follows."""
    match = _CUSTOM_ID.search(head)
    if match is None:
        return None
    try:
        value = json.loads(match.group(1).decode("utf-8", "surrogateescape"))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None
