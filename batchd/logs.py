"""structlog set-up, done once per process: JSON lines off a terminal, readable lines on one.

Secrets never reach a log line: any value whose key looks like a credential is replaced,
and known secret values registered with `register_secret` are masked wherever they appear,
tracebacks included (rendered as plain text, without frame locals, before masking).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import orjson
import structlog

_SECRET_KEYS = re.compile(r"(api_?key|authorization|token|secret|password|credential)", re.I)
_secrets: set[str] = set()
_MASK = "***"


def register_secret(value: str | None) -> None:
    """Mask this exact value wherever it appears in a log line from now on."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, _MASK)
        return value
    if isinstance(value, dict):
        return {k: _scrub_pair(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


def _scrub_pair(key: Any, value: Any) -> Any:
    if isinstance(key, str) and _SECRET_KEYS.search(key) and value not in (None, ""):
        return _MASK
    return _scrub_value(value)


def scrub_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask credential-like keys and registered secret values."""
    for key in list(event_dict):
        event_dict[key] = _scrub_pair(key, event_dict[key])
    return event_dict


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: Any = None,
) -> None:
    """Configure structlog and the stdlib root logger for this process."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become plain text before the scrubber, in both renderers: the
        # console renderer's own (rich) tracebacks would print every frame's locals after
        # it, such as the HTTP client's headers with `Authorization: Bearer <key>`.
        structlog.processors.format_exc_info,
        scrub_secrets,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Library loggers (aiohttp, asyncio) go through the same renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
