"""Errors answered the way the service does: an HTTP status and an OpenAI-style body."""

from __future__ import annotations

import math

from batchd.documents import JsonObject

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "access_denied",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
}


class EmulatorError(Exception):
    """A call the service refuses; `body()` is what the client receives."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> JsonObject:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        wait = max(0.0, self.retry_after_s)
        return {
            "Retry-After": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
        }


def invalid(message: str, param: str | None = None) -> EmulatorError:
    return EmulatorError(400, "InvalidParameter", message, param=param)


def not_found(what: str, ident: str) -> EmulatorError:
    return EmulatorError(404, "NotFound", f"no {what} with id {ident!r}", param=None)


def quota(message: str, retry_after_s: float | None = None) -> EmulatorError:
    return EmulatorError(429, "Throttling.AllocationQuota", message, retry_after_s=retry_after_s)


def rate_limited(call_class: str, retry_after_s: float) -> EmulatorError:
    return EmulatorError(
        429,
        "Throttling.RateQuota",
        f"too many {call_class} calls; retry after {retry_after_s:.3f} s",
        retry_after_s=retry_after_s,
    )
