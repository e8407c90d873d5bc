"""The Batch API client over aiohttp: calls, retry by classification, Retry-After.

Retry table (TESTING.md C.13):
- 400, 401, 403, 404, 422 and other 4xx: permanent, one call.
- 408, 409, 429, 5xx, timeouts and connection resets: retried with exponential backoff
  and full jitter, honouring `Retry-After` (seconds or HTTP date) and `retry-after-ms`.
- 401 and `Arrearage` are account-level: they raise `AccountError`, which pauses all
  submission instead of failing a job.
- A call that is not idempotent (upload, create) is never retried blindly after an
  ambiguous failure (the request may have taken effect): it raises `MaybeAppliedError`
  and the caller looks for the effect before trying again.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batchd.errors import BatchdError
from batchd.limits import CallClass, RateLimiter
from batchd.logs import get_logger

log = get_logger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})
ACCOUNT_CODES = frozenset({"Arrearage", "InvalidApiKey", "invalid_api_key"})
MAX_RETRY_AFTER_S = 3600.0


class ApiError(BatchdError):
    """The Batch API answered with an error."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        if self.status is None:
            return True  # transport failure: timeout, reset, refused
        return self.status in RETRYABLE_STATUS or self.status >= 500


class AccountError(ApiError):
    """The account cannot be used (bad key, in arrears): pause, do not fail jobs."""


class MaybeAppliedError(ApiError):
    """A non-idempotent call failed in a way that may still have taken effect."""


class NotFoundError(ApiError):
    """The remote object does not exist."""


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After`; None when absent or absurd."""
    value: float | None = None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = None
    raw = headers.get("Retry-After")
    if value is None and raw:
        try:
            value = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError, IndexError):
                return None
            value = when.timestamp() - (time.time() if now is None else now)
    if value is None or value != value or value < 0 or value > MAX_RETRY_AFTER_S:
        return None
    return value


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff for the `attempt`-th retry (1-based)."""
    return rng.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))


def _error_from(status: int, body: bytes, headers: Mapping[str, str]) -> ApiError:
    code: str | None = None
    message = body[:500].decode("utf-8", "replace") or f"HTTP {status}"
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        err: dict[str, Any] = inner if isinstance(inner, dict) else parsed
        raw_code = err.get("code") or err.get("type")
        code = str(raw_code) if raw_code is not None else None
        message = str(err.get("message") or message)
    retry_after = parse_retry_after(headers)
    text = f"HTTP {status} {code or ''}: {message}".replace("  ", " ")
    if status == 401 or code in ACCOUNT_CODES:
        return AccountError(text, status=status, code=code, retry_after_s=retry_after)
    if status == 404:
        return NotFoundError(text, status=status, code=code)
    return ApiError(text, status=status, code=code, retry_after_s=retry_after)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0


class BatchApi:
    """Calls of SPEC.md, each counted against its class's window before it is sent."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        limiter: RateLimiter,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float = 60.0,
        upload_timeout_s: float = 3600.0,
        rng: random.Random | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._key = api_key.encode()
        self.limiter = limiter
        self.retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._upload_timeout = aiohttp.ClientTimeout(
            total=upload_timeout_s, connect=min(10.0, timeout_s), sock_read=timeout_s
        )
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self.calls: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    def __repr__(self) -> str:  # never show the key
        return f"BatchApi(base_url={self._base!r})"

    def _redact(self, data: bytes) -> bytes:
        """The key masked out of a text the service (or a proxy) sent back: some quote the
        key they were given in their error message, and error texts are logged, stored
        with the part, published in summary.json and shown over the control socket."""
        return data.replace(self._key, b"***") if self._key else data

    async def __aenter__(self) -> BatchApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, raise_for_status=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _once(
        self,
        cls: CallClass,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        data: Any = None,
        timeout: aiohttp.ClientTimeout | None = None,
        sink: Path | None = None,
    ) -> Any:
        await self.limiter.acquire(cls)
        self.calls[cls] = self.calls.get(cls, 0) + 1
        body = orjson.dumps(json) if json is not None else data
        headers = {"Content-Type": "application/json"} if json is not None else None
        try:
            async with self.session.request(
                method,
                f"{self._base}{path}",
                params=params,
                data=body,
                headers=headers,
                timeout=timeout or self._timeout,
            ) as resp:
                if resp.status >= 400:
                    err = _error_from(resp.status, self._redact(await resp.read()), resp.headers)
                    if resp.status == 429:
                        self.limiter.throttle(cls, err.retry_after_s or self.retry.base_s * 4)
                    raise err
                if sink is not None:
                    return await _stream_to(resp, sink)
                raw = await resp.read()
        except ApiError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            text = f"{method} {path}: {type(exc).__name__}: {exc}"
            raise ApiError(self._redact(text.encode()).decode()) from exc
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                f"{method} {path}: answer is not JSON: {self._redact(raw)[:200]!r}"
            ) from exc

    async def _call(
        self, cls: CallClass, method: str, path: str, *, idempotent: bool, **kw: Any
    ) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(cls, method, path, **kw)
            except AccountError:
                raise
            except ApiError as err:
                self.last_error[cls] = str(err)
                if not err.retryable or attempt >= self.retry.max_attempts:
                    raise
                if not idempotent and err.status != 429 and err.status != 408:
                    # The server may have acted on the request before it failed.
                    raise MaybeAppliedError(str(err), status=err.status, code=err.code) from err
                delay = err.retry_after_s
                if delay is None:
                    delay = backoff_s(attempt, self.retry.base_s, self.retry.cap_s, self._rng)
                log.info(
                    "api_retry",
                    call=str(cls),
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    error=str(err),
                )
                await asyncio.sleep(delay)

    # -- files --------------------------------------------------------------------------

    async def upload_file(self, path: Path, filename: str) -> dict[str, Any]:
        """Upload a JSONL file for batch use, streamed from disk."""

        async def once() -> Any:
            with path.open("rb") as fh:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", fh, filename=filename, content_type="application/jsonl")
                return await self._once(
                    CallClass.UPLOAD, "POST", "/files", data=form, timeout=self._upload_timeout
                )

        attempt = 0
        while True:
            attempt += 1
            try:
                result: dict[str, Any] = await once()
                return result
            except AccountError:
                raise
            except ApiError as err:
                if not err.retryable or attempt >= self.retry.max_attempts:
                    raise
                if err.status not in (429, 408):
                    raise MaybeAppliedError(str(err), status=err.status, code=err.code) from err
                await asyncio.sleep(
                    err.retry_after_s
                    or backoff_s(attempt, self.retry.base_s, self.retry.cap_s, self._rng)
                )

    async def list_files(self) -> list[dict[str, Any]]:
        """Every file of the account (follows `after` pagination when the server pages)."""
        files: list[dict[str, Any]] = []
        params: dict[str, str] = {"limit": "100"}
        while True:
            page = await self._call(
                CallClass.FILES, "GET", "/files", idempotent=True, params=params
            )
            data = (page or {}).get("data") or []
            files.extend(d for d in data if isinstance(d, dict))
            if not page.get("has_more") or not data:
                return files
            params = {"limit": "100", "after": str(data[-1].get("id"))}

    async def delete_file(self, file_id: str) -> None:
        """Delete a remote file; one that is already gone counts as deleted."""
        try:
            await self._call(CallClass.FILES, "DELETE", f"/files/{file_id}", idempotent=True)
        except NotFoundError:
            return

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to `dest` (temp name, fsync, rename); returns bytes."""
        result: int = await self._call(
            CallClass.FILES,
            "GET",
            f"/files/{file_id}/content",
            idempotent=True,
            sink=dest,
            timeout=self._upload_timeout,
        )
        return result

    # -- batches ------------------------------------------------------------------------

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        if metadata:
            body["metadata"] = metadata
        result: dict[str, Any] = await self._call(
            CallClass.CREATE, "POST", "/batches", idempotent=False, json=body
        )
        return result

    async def retrieve_batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            CallClass.RETRIEVE, "GET", f"/batches/{batch_id}", idempotent=True
        )
        return result

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            CallClass.CANCEL, "POST", f"/batches/{batch_id}/cancel", idempotent=True
        )
        return result

    async def list_batches(self, **params: str) -> dict[str, Any]:
        """One page of batches; `params` are `after`, `limit` and DashScope filters."""
        result: dict[str, Any] = await self._call(
            CallClass.LIST, "GET", "/batches", idempotent=True, params=params
        )
        return result or {}


async def _stream_to(resp: aiohttp.ClientResponse, dest: Path) -> int:
    tmp = dest.with_name(f".{dest.name}.tmp")
    written = 0
    loop = asyncio.get_running_loop()
    fh = await loop.run_in_executor(None, tmp.open, "wb")
    try:
        async for chunk in resp.content.iter_chunked(1 << 16):
            await loop.run_in_executor(None, fh.write, chunk)
            written += len(chunk)
        await loop.run_in_executor(None, fh.flush)
        await loop.run_in_executor(None, os.fsync, fh.fileno())
    finally:
        fh.close()
    os.replace(tmp, dest)
    return written
