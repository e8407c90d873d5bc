"""`batchd retry` sends again what can succeed without paying twice for a refusal."""

from __future__ import annotations

from typing import Any

import pytest

from batchd.outbox.failures import BILLED, CODES, RETRIED, classify


def service_error(status: int | None, code: str | None) -> dict[str, Any]:
    """An error.jsonl line as the service writes a failed request."""
    body = {"error": {"code": code, "message": "m"}} if code else {}
    response = {"status_code": status, "request_id": "r", "body": body} if status else None
    return {"custom_id": "c", "response": response, "error": {"code": code, "message": "m"}}


@pytest.mark.parametrize(
    ("line", "retry", "category", "counted_as"),
    [
        # Transient, on the service's side: 429, 5xx, throttling, timeouts.
        (service_error(429, "Throttling"), True, "transient", "Throttling"),
        (service_error(500, "InternalError"), True, "transient", "InternalError"),
        (service_error(503, "SomethingNew"), True, "transient", "SomethingNew"),
        (service_error(408, None), True, "transient", "status 408"),
        (service_error(None, "RequestTimeOut"), True, "transient", "RequestTimeOut"),
        (service_error(None, "Model.Overloaded"), True, "transient", "Model.Overloaded"),
        # Never ran (batchd's own lines, or the service's): expired, cancelled, lost.
        (service_error(None, "batch_expired"), True, "never_run", "batch_expired"),
        (service_error(None, "batch_cancelled"), True, "never_run", "batch_cancelled"),
        (service_error(None, "not_submitted"), True, "never_run", "not_submitted"),
        # Its result file was lost, but the service most likely ran and billed it: left
        # out of a plain retry (`--force` sends it).
        (
            service_error(None, "result_unavailable"),
            False,
            "result_unavailable",
            "result_unavailable",
        ),
        # The account, not the request: not served, so not billed.
        (service_error(400, "Arrearage"), True, "account", "Arrearage"),
        (service_error(401, None), True, "account", "status 401"),
        # Refused for the request's content or form: it would fail, and cost, again.
        (service_error(400, "DataInspectionFailed"), False, "refused", "DataInspectionFailed"),
        (service_error(400, "InvalidParameter"), False, "refused", "InvalidParameter"),
        (service_error(400, "SomethingNew"), False, "refused", "SomethingNew"),
        (service_error(422, None), False, "refused", "status 422"),
        # Unknown: left out, counted under its code.
        (service_error(None, "SomethingNew"), False, "unknown", "SomethingNew"),
        ({"input_line": 3, "raw": "not json"}, False, "unknown", "unreadable"),
        (None, False, "unknown", "unreadable"),
    ],
)
def test_failures_are_classified_by_code_then_status(
    line: dict[str, Any] | None, retry: bool, category: str, counted_as: str
) -> None:
    verdict = classify(line)
    assert (verdict.retry, verdict.category, verdict.code) == (retry, category, counted_as)


def test_a_known_code_wins_over_its_status() -> None:
    """DashScope answers arrears with a 400; the code says it is the account's."""
    assert classify(service_error(400, "Arrearage")).retry
    assert not classify(service_error(500, "DataInspectionFailed")).retry


def test_a_body_sent_as_a_string_is_read() -> None:
    line = {"response": {"status_code": 400, "body": '{"error":{"code":"DataInspectionFailed"}}'}}
    assert classify(line).code == "DataInspectionFailed" and not classify(line).retry


def test_every_category_of_the_table_is_known() -> None:
    known = RETRIED | BILLED | {"refused"}
    assert set(CODES.values()) <= known
