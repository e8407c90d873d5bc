"""Which failed requests `batchd retry` sends again: one table, one pure function.

A retry costs money. A request that failed for a reason that passes (the service was
busy, the batch expired or was cancelled before the request ran) is worth sending
again; one that never ran was never billed, so sending it again cannot pay twice. A
request the service refused for what it says or how it is written (400
`DataInspectionFailed`, `InvalidParameter`, a context too long) fails again the same
way, and may be billed again: `batchd retry JOB` leaves it out and says so, per code;
`batchd retry JOB --all` sends it anyway (after the user changed the model's settings,
say). A request whose result file could not be fetched (`result_unavailable`) most
likely ran and was billed (the service counted it completed): a plain retry leaves it
out too, and says what the earlier attempt probably cost; `--force` (or `--all`) sends
it again, paying for it a second time.

`classify` reads one line of a published job's error.jsonl and decides, in this order:

1. The error code (`error.code`, or the failed response's `body.error.code`) when the
   table `CODES` knows it.
2. The HTTP status of the failed response: 408, 429 and 5xx are transient; 401 and 403
   are the account's (a key or a permission, fixed by the operator, not by changing the
   request: such a request was not served, so not billed); any other 4xx is a refusal of
   the request itself.
3. Words in an unknown code that only transient errors use (`throttl`, `timeout`,
   `unavailable`, ...): transient.
4. Anything else is **unknown, and left out**. A code the table does not know, without a
   status that says otherwise, is most likely a provider's own refusal: sending it again
   would pay twice for a deterministic answer. It is counted under its code, so the user
   sees it and can send it with `--all`. A line that cannot be read at all is counted as
   `unreadable`, and left out for the same reason.

`collect.retryable_failure` is a stricter, automatic cousin (`jobs.resubmit_failed`): with
no operator asking, it resends neither cancelled requests (somebody cancelled them) nor
results that could not be fetched (they most likely ran, and were billed).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchd.documents import JsonObject
from batchd.inputs.lines import read_line

# Categories: why a failure is (or is not) worth sending again.
TRANSIENT = "transient"  # the service was busy or broken: 429, 5xx, timeouts
NEVER_RUN = "never_run"  # the request never ran: expired, cancelled, lost, not submitted
UNFETCHED = "result_unavailable"  # it most likely ran (billed), its result file is lost
ACCOUNT = "account"  # the account, not the request: a key, a permission, arrears
REFUSED = "refused"  # the service refused the request for its content or form
UNKNOWN = "unknown"  # nothing says a second try would go otherwise

RETRIED = frozenset({TRANSIENT, NEVER_RUN, ACCOUNT})
# Left out of a plain retry because the earlier attempt most likely paid for them
# already: `batchd retry --force` (or `--all`) sends them.
BILLED = frozenset({UNFETCHED})

# Error codes, as the service (DashScope, OpenAI-style providers) and batchd's own
# never-run lines (batchd.outbox.merge) write them.
CODES: dict[str, str] = {
    # batchd's own lines for requests without an answer (merge.NEVER_RUN and friends).
    "batch_expired": NEVER_RUN,
    "batch_cancelled": NEVER_RUN,
    "batch_failed": NEVER_RUN,
    "batch_lost": NEVER_RUN,
    "not_submitted": NEVER_RUN,
    "result_missing": NEVER_RUN,
    "result_unavailable": UNFETCHED,
    # Transient, on the service's side.
    "Throttling": TRANSIENT,
    "Throttling.RateQuota": TRANSIENT,
    "Throttling.AllocationQuota": TRANSIENT,
    "rate_limit_exceeded": TRANSIENT,
    "InternalError": TRANSIENT,
    "InternalError.Algo": TRANSIENT,
    "InternalError.Timeout": TRANSIENT,
    "ServiceUnavailable": TRANSIENT,
    "server_error": TRANSIENT,
    "RequestTimeOut": TRANSIENT,
    "timeout": TRANSIENT,
    # OpenAI: the queued tokens of the model passed the account's limit; it fits later.
    "token_limit_exceeded": TRANSIENT,
    # The account: not served, so not billed; it works once the operator fixes it.
    "InvalidApiKey": ACCOUNT,
    "invalid_api_key": ACCOUNT,
    "AccessDenied": ACCOUNT,
    "Arrearage": ACCOUNT,
    "insufficient_quota": ACCOUNT,
    # The request itself, refused for what it says or how it is written.
    "DataInspectionFailed": REFUSED,
    "data_inspection_failed": REFUSED,
    "InvalidParameter": REFUSED,
    "invalid_parameter": REFUSED,
    "invalid_request_error": REFUSED,
    "invalid_value": REFUSED,
    "invalid_prompt": REFUSED,
    "content_filter": REFUSED,
    "context_length_exceeded": REFUSED,
    "model_not_found": REFUSED,
    "mismatched_model": REFUSED,
    "duplicate_custom_id": REFUSED,
}
_TRANSIENT_WORDS = ("throttl", "timeout", "timed_out", "unavailable", "overload", "rate_limit")
# How a failure without a code is counted.
UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `classify` decided of one failed request."""

    retry: bool
    category: str  # one of TRANSIENT, NEVER_RUN, UNFETCHED, ACCOUNT, REFUSED, UNKNOWN
    code: str  # the error code, else "status NNN", else "unreadable": what it is counted as


def _status(line: JsonObject) -> int | None:
    response = line.get("response")
    status = response.get("status_code") if isinstance(response, dict) else None
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def error_code(line: JsonObject) -> str | None:
    """PURE: the code of an error.jsonl line: the service's `error.code`, or the failed
    response's `body.error.code` (a body sent as a JSON string is read too)."""
    error = line.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str) and error["code"]:
        return str(error["code"])
    response = line.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    if isinstance(body, str):
        body = read_line(body.encode("utf-8", "surrogatepass"))
    inner = body.get("error") if isinstance(body, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("code"), str) and inner["code"]:
        return str(inner["code"])
    return None


def classify(line: JsonObject | None) -> Verdict:
    """PURE: is this failed request (one parsed line of error.jsonl; None for a line that
    cannot be read) worth sending again? See the module's docstring for the order of the
    rules; unknown codes are left out."""
    if line is None:
        return Verdict(False, UNKNOWN, UNREADABLE)
    code = error_code(line)
    status = _status(line)
    shown = code or (f"status {status}" if status is not None else UNREADABLE)
    category = CODES.get(code) if code is not None else None
    if category is None and status is not None:
        if status in (408, 429) or status >= 500:
            category = TRANSIENT
        elif status in (401, 403):
            category = ACCOUNT
        elif 400 <= status < 500:
            category = REFUSED
    if category is None and code is not None:
        lowered = code.lower()
        if any(word in lowered for word in _TRANSIENT_WORDS):
            category = TRANSIENT
    category = category or UNKNOWN
    return Verdict(category in RETRIED, category, shown)
