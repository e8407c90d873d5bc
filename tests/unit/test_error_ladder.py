"""The error ladder (`classify`): which rung each error of the service is on, the one
table the submit stage's upload and create and the poll stage's polls all follow."""

from __future__ import annotations

import pytest

from batchd.pipeline.problems import CallFailure, classify
from batchd.provider.api import (
    AccountError,
    ApiError,
    DownloadTooSlow,
    ListingIncomplete,
    MaybeAppliedError,
    NotFoundError,
    _error_from,
)
from batchd.provider.remote import BadAnswer


def answered(status: int, code: str | None = None) -> ApiError:
    """The error the API client makes of an HTTP answer (`code` in an OpenAI-style body)."""
    body = b'{"error": {"code": "%s", "message": "no"}}' % code.encode() if code else b""
    return _error_from(status, body, {})


LADDER: list[tuple[str, ApiError | BadAnswer, CallFailure]] = [
    # The account cannot be used: everything pauses, no part is blamed.
    ("401", answered(401), CallFailure.ACCOUNT),
    ("arrears", answered(400, "Arrearage"), CallFailure.ACCOUNT),
    ("bad key", answered(403, "invalid_api_key"), CallFailure.ACCOUNT),
    # A create or upload that may have taken effect is looked for, never sent again.
    ("create 500", MaybeAppliedError("HTTP 500", status=500), CallFailure.UNCERTAIN),
    ("answer lost", MaybeAppliedError("timed out"), CallFailure.UNCERTAIN),
    ("create 400", MaybeAppliedError("HTTP 400", status=400), CallFailure.UNCERTAIN),
    # Throttled, a quota, a conflict, the server's trouble, the network: later, uncounted.
    ("429", answered(429), CallFailure.LATER),
    ("408", answered(408), CallFailure.LATER),
    ("409", answered(409), CallFailure.LATER),
    ("500", answered(500), CallFailure.LATER),
    ("503", answered(503), CallFailure.LATER),
    ("transport", ApiError("connection reset"), CallFailure.LATER),
    ("dripping", DownloadTooSlow("too slow"), CallFailure.LATER),
    # Not known to the service.
    ("404", answered(404), CallFailure.GONE),
    ("404 made", NotFoundError("HTTP 404", status=404), CallFailure.GONE),
    # Refused for good: sent again, it fails again.
    ("400", answered(400), CallFailure.REFUSED),
    ("403", answered(403), CallFailure.REFUSED),
    ("413", answered(413), CallFailure.REFUSED),
    ("422", answered(422), CallFailure.REFUSED),
    ("endless list", ListingIncomplete("pages never end"), CallFailure.REFUSED),
    # An answer batchd cannot use: counted, parked after max_part_failures.
    ("unusable", BadAnswer("no id"), CallFailure.UNUSABLE),
]


@pytest.mark.parametrize(("err", "rung"), [r[1:] for r in LADDER], ids=[r[0] for r in LADDER])
def test_each_error_of_the_service_is_on_its_rung(
    err: ApiError | BadAnswer, rung: CallFailure
) -> None:
    assert classify(err) is rung


def test_the_table_shows_every_rung() -> None:
    assert {rung for _name, _err, rung in LADDER} == set(CallFailure)


def test_the_account_and_an_uncertain_call_come_before_a_retryable_status() -> None:
    """A 429 that says the account is in arrears pauses the account (it is not
    throttling); a create cut short by a 503 may have taken effect (it is not tried
    again blindly)."""
    assert classify(AccountError("HTTP 429 Arrearage", status=429)) is CallFailure.ACCOUNT
    assert classify(MaybeAppliedError("HTTP 503", status=503)) is CallFailure.UNCERTAIN
