"""Retry classification and Retry-After parsing (TESTING.md C.13)."""

from __future__ import annotations

import email.utils
import random

import pytest

from batchd.provider.api import (
    AccountError,
    ApiError,
    NotFoundError,
    _error_from,
    backoff_s,
    parse_retry_after,
)


def test_retry_after_seconds_milliseconds_and_http_date() -> None:
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=1_000_000) == pytest.approx(30.0)


@pytest.mark.parametrize("raw", ["-5", "nan", "999999", "soon", ""])
def test_absurd_retry_after_values_fall_back_to_backoff(raw: str) -> None:
    assert parse_retry_after({"Retry-After": raw}) is None


def test_backoff_grows_exponentially_within_its_cap() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        for _ in range(50):
            delay = backoff_s(attempt, 0.5, 30.0, rng)
            assert 0 <= delay <= min(30.0, 0.5 * 2 ** (attempt - 1))


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (422, False),
        (408, True),
        (409, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
    ],
)
def test_status_classification(status: int, retryable: bool) -> None:
    err = _error_from(status, b'{"error":{"code":"X","message":"m"}}', {})
    assert err.retryable is retryable


def test_account_level_errors_are_their_own_kind() -> None:
    assert isinstance(_error_from(401, b'{"error":{"code":"InvalidApiKey"}}', {}), AccountError)
    arrears = _error_from(400, b'{"error":{"code":"Arrearage","message":"in arrears"}}', {})
    assert isinstance(arrears, AccountError)
    assert isinstance(_error_from(404, b"", {}), NotFoundError)


def test_error_body_variants_are_read() -> None:
    typed = _error_from(400, b'{"error":{"type":"invalid_request_error","message":"bad"}}', {})
    assert typed.code == "invalid_request_error" and "bad" in str(typed)
    flat = _error_from(400, b'{"code":"InvalidParameter","message":"flat"}', {})
    assert flat.code == "InvalidParameter"
    text = _error_from(502, b"<html>bad gateway</html>", {})
    assert text.retryable and "bad gateway" in str(text)
    assert ApiError("transport").retryable
