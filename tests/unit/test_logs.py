"""Log lines never raise into the caller (issue 16): a stream that breaks for good is
given up for stderr or nothing, a passing failure costs one line, and every line no
stream took is counted in `log_health()`."""

from __future__ import annotations

import errno
import io
import logging
import os
import sys
from collections.abc import Iterator

import pytest

from batchd.logs import configure, get_logger, log_health


@pytest.fixture(autouse=True)
def _healthy_after() -> Iterator[None]:
    """Each test ends with lines getting out again, as later tests expect."""
    yield
    configure("info", "json", stream=io.StringIO())
    get_logger("test").info("log_output_back")
    assert log_health().broken is None


@pytest.fixture
def readerless_pipe() -> Iterator[io.TextIOWrapper]:
    """A text stream on a pipe whose read end is closed (its descriptor is above 2, so
    it is never pointed at /dev/null)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w", closefd=False)
    yield stream
    os.close(write_end)


class FlakyStream(io.StringIO):
    """A stream without a descriptor whose first `failures` writes fail with ENOSPC."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def write(self, text: str) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(text)


def test_a_pipe_without_reader_drops_and_counts_lines_from_structlog_and_stdlib(
    readerless_pipe: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", readerless_pipe)  # the daemon's stream, broken
    before = log_health().lines_dropped
    configure("info", "json")
    get_logger("test").info("job_claimed", job_id="j1")
    logging.getLogger("aiohttp.server").error("a library's line")
    get_logger("test").warning("part_step_failed", exc_info=ValueError("boom"))
    health = log_health()
    assert health.lines_dropped == before + 3
    assert health.broken is not None and "EPIPE" in health.broken
    assert health.problem is not None and "log lines dropped" in health.problem
    assert health.since is not None


def test_a_given_up_stream_sends_the_lines_to_stderr(
    readerless_pipe: io.TextIOWrapper, capsys: pytest.CaptureFixture[str]
) -> None:
    before = log_health().lines_dropped
    configure("info", "json", stream=readerless_pipe)
    get_logger("test").info("first_line")
    get_logger("test").info("second_line")
    err = capsys.readouterr().err
    assert "first_line" in err and "second_line" in err
    assert log_health().lines_dropped == before
    assert log_health().broken is None


def test_a_closed_stream_is_given_up_without_raising(capsys: pytest.CaptureFixture[str]) -> None:
    closed = io.StringIO()
    closed.close()
    configure("info", "console", stream=closed)
    get_logger("test").info("after_close")
    assert "after_close" in capsys.readouterr().err


def test_a_full_disk_costs_the_line_and_the_next_one_tries_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = FlakyStream(failures=2)
    monkeypatch.setattr(sys, "stderr", stream)
    before = log_health().lines_dropped
    configure("info", "json")
    get_logger("test").info("lost_one")
    get_logger("test").info("lost_two")
    health = log_health()
    assert health.lines_dropped == before + 2
    assert health.broken is not None and "ENOSPC" in health.broken
    get_logger("test").info("space_again")
    assert "space_again" in stream.getvalue() and "lost_" not in stream.getvalue()
    assert log_health().broken is None and log_health().lines_dropped == before + 2
    assert log_health().problem is None


def test_a_full_device_drops_each_line_through_its_descriptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stderr", full)
        before = log_health().lines_dropped
        configure("info", "json")
        for n in range(3):
            get_logger("test").info("line", n=n)
        assert log_health().lines_dropped == before + 3
        assert "ENOSPC" in (log_health().broken or "")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.com/batchd", "https://hooks.example.com/batchd"),
        ("https://h.example/x?token=t0k", "https://h.example/x?***"),
        ("http://user:pa55@h.example:8080/x?a=1#frag", "http://***@h.example:8080/x?***#***"),
        ("http://user@h.example/", "http://***@h.example/"),
        ("/relative?sig=abc", "/relative?***"),
        ("http://[::1/x?token=t0k", "http://***"),
        ("", ""),
    ],
)
def test_a_url_is_shown_without_user_password_query_or_fragment(url: str, shown: str) -> None:
    from batchd.logs import shown_url

    assert shown_url(url) == shown


def test_every_url_in_a_log_line_is_shown_without_its_secrets() -> None:
    """Library errors quote URLs (aiohttp's `url='...'`): no field of any line keeps a
    URL's password or query, whatever its name."""
    buffer = io.StringIO()
    configure("info", "json", stream=buffer)
    get_logger("test").warning(
        "hook_failed",
        error="ClientResponseError: 301, url='https://u:pa55word@h.example/hook?token=t0ken'",
        nested={"where": ["see http://h.example/a?sig=s1gnature for more"]},
    )
    line = buffer.getvalue()
    assert "https://***@h.example/hook?***" in line and "http://h.example/a?***" in line
    for secret in ("pa55word", "t0ken", "s1gnature"):
        assert secret not in line
