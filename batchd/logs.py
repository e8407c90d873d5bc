"""structlog set-up, done once per process: JSON lines off a terminal, readable lines on one.

Secrets never reach a log line: any value whose key looks like a credential is replaced,
and known secret values registered with `register_secret` are masked wherever they appear,
tracebacks included (rendered as plain text, without frame locals, before masking). A URL
in a line is shown without its user, password, query and fragment (`shown_url`): a
webhook's `?token=`, a receiver's `user:password@` or a presigned link's signature.

Writing a line never raises into the caller. The output stream can break under a running
daemon: the reader of its pipe goes away (`batchd run | head`, a journald restart: EPIPE),
the descriptor is closed (EBADF), the disk under a redirect fills up (ENOSPC). A log call
sits inside signal handlers, control answers and every stage, so one raising there would
leave the daemon deaf to SIGTERM, answer 500 and crash its stages. Every line, from
structlog and from the stdlib loggers (aiohttp, asyncio) alike, goes through one `_Sink`:
a stream that fails for good (EPIPE, EBADF, closed) is given up, and the lines go to
stderr when that is another stream that still works, or nowhere; a line no stream took
is dropped and counted. `log_health()` gives the count and what broke, for `status`,
`check` and /metrics.

A stream with a file descriptor is written with `os.write`, one call per line, with no
buffer of Python's in between: a buffer holding a line the pipe refused would fail again
at every later write and once more at exit (where Python turns it into exit code 120).
A standard descriptor (0-2) that broke for good is pointed at /dev/null, so that nothing
else writing to it (a traceback, a warning) fails, and its number cannot be reused by a
file opened later, which would then receive the log lines.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson
import structlog

_SECRET_KEYS = re.compile(r"(api_?key|authorization|token|secret|password|credential)", re.I)
_secrets: set[str] = set()
_MASK = "***"


def register_secret(value: str | None) -> None:
    """Mask this exact value wherever it appears in a log line from now on."""
    if value and len(value) >= 4:
        _secrets.add(value)


# A URL as it appears in a text: a scheme, `://`, then up to a space, a quote or a bracket.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def shown_url(url: str | None) -> str:
    """PURE: a URL as logs and answers show it: scheme, host, port and path, with its
    user and password, query and fragment each replaced by `***` (they may hold a token,
    a password or a presigned signature). A relative URL (a `Location: /x?t=1`) keeps its
    path alone; one that cannot be parsed shows its scheme only."""
    if not url:
        return ""
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # an unclosed IPv6 bracket
        scheme = url.split(":", 1)[0] if "://" in url else ""
        return f"{scheme}://{_MASK}" if scheme.isalnum() else _MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{_MASK}@" + netloc.rpartition("@")[2]
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.query or url.rstrip().endswith("?"):
        shown += "?" + _MASK
    if parts.fragment:
        shown += "#" + _MASK
    return shown


def scrub_urls(text: str) -> str:
    """PURE: `text` with every absolute URL in it as `shown_url` shows it."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: shown_url(m.group(0)), text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, _MASK)
        return scrub_urls(value)
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


# -- the output: lines that can always be written --------------------------------------

# Errors after which a stream is given up: nobody will ever read what is written to it.
_GONE = frozenset({errno.EPIPE, errno.EBADF, errno.ECONNRESET})


@dataclass(frozen=True, slots=True)
class LogHealth:
    """How the log output fares: lines no stream took (since start), and while lines are
    being dropped, the failure and since when (epoch seconds)."""

    lines_dropped: int = 0
    broken: str | None = None
    since: float | None = None

    @property
    def problem(self) -> str | None:
        """PURE: what to tell an operator, or None while lines get out."""
        if self.broken is None:
            return None
        return (
            f"log output broken ({self.broken}): {self.lines_dropped} log lines dropped so"
            " far; restart the daemon once its output is back"
        )


_health = LogHealth()
_health_lock = threading.Lock()
# Standard descriptors found broken for good (and pointed at /dev/null since): a later
# `configure` must not take them for working streams.
_dead_fds: set[int] = set()


def log_health() -> LogHealth:
    """The log output's health for this process (kept across `configure` calls)."""
    return _health


def _record(failure: str | None) -> None:
    """Count one line: delivered (`failure` None) or dropped, and why."""
    global _health
    if failure is None and _health.broken is None:
        return  # the common case: no lock taken
    with _health_lock:
        if failure is None:
            if _health.broken is not None:
                _health = LogHealth(_health.lines_dropped)
            return
        since = _health.since if _health.since is not None else time.time()
        _health = LogHealth(_health.lines_dropped + 1, failure, since)


def _describe(name: str, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name}: {errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror}"
    return f"{name}: {type(exc).__name__} {exc}"


class _Target:
    """One stream lines are written to: by file descriptor when it has one, else through
    its `write` (a StringIO, pytest's capture)."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self.stream = stream
        self.name = name
        self.fd: int | None = None
        self.gone = False
        # Why this stream was given up, or why the last line to it failed.
        self.failure: str | None = None
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            fd = stream.fileno()
        except (OSError, ValueError, AttributeError):
            return
        if fd in _dead_fds:
            self.gone = True
            self.failure = f"{name}: broken earlier"
            return
        # What the stream object holds goes out first, so lines stay in order.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        self.fd = fd

    def write(self, line: str) -> None:
        if self.fd is None:
            self.stream.write(line)
            self.stream.flush()
            return
        data = memoryview(line.encode(self.encoding, "backslashreplace"))
        while data:  # a pipe may take part of a line; each round takes at least a byte
            written = os.write(self.fd, data)
            data = data[written:]

    def give_up(self) -> None:
        self.gone = True
        if self.fd is not None and self.fd <= 2:
            _dead_fds.add(self.fd)
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, self.fd)
                finally:
                    os.close(devnull)


class _Sink:
    """Writes whole lines to the first stream that takes them; never raises."""

    def __init__(self, targets: list[_Target]) -> None:
        self.targets = targets
        self._lock = threading.Lock()

    def write_line(self, text: str) -> None:
        failure: str | None = None
        with self._lock:
            for target in self.targets:
                if not target.gone:
                    try:
                        target.write(text + "\n")
                    except Exception as exc:  # a log line must never raise
                        target.failure = _describe(target.name, exc)
                        if isinstance(exc, ValueError) or getattr(exc, "errno", None) in _GONE:
                            target.give_up()
                        # Else a full disk or a passing I/O error: this line is lost, the
                        # next one tries the same stream again.
                    else:
                        _record(None)
                        return
                failure = failure or target.failure
            _record(failure or "no output stream")


def _sink_for(stream: TextIO | None) -> _Sink:
    targets: list[_Target] = []
    if stream is not None:
        targets.append(_Target(stream, "stderr" if stream is sys.stderr else "log stream"))
    if sys.stderr is not None and stream is not sys.stderr:
        targets.append(_Target(sys.stderr, "stderr"))
    return _Sink(targets)


class _SinkLogger:
    """structlog's logger: hands each rendered line to the sink (PrintLogger's methods)."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write_line(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _SinkHandler(logging.Handler):
    """The stdlib loggers' handler: formats the record, hands the line to the sink."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's own convention for a bad record
            self.handleError(record)
            return
        self.sink.write_line(line)


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: Any = None,
) -> None:
    """Configure structlog and the stdlib root logger for this process: lines go to
    `stream` (default stderr); see the module docstring for what happens when it fails."""
    out: TextIO | None = stream or sys.stderr
    sink = _sink_for(out)
    tty = _isatty(out)
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=tty)
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
        logger_factory=lambda *_args: _SinkLogger(sink),
        cache_logger_on_first_use=False,
    )
    # Library loggers (aiohttp, asyncio) go through the same renderer.
    handler = _SinkHandler(sink)
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
