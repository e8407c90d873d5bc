"""The Batch API client over aiohttp: calls, retry by classification, Retry-After.

Retry table (TESTING.md C.13):
- 400, 401, 403, 404, 422 and other 4xx: permanent, one call.
- 408, 409, 429, 5xx, timeouts and connection resets: retried with exponential backoff
  and full jitter, honouring `Retry-After` (seconds or HTTP date) and `retry-after-ms`.
- 401 and `Arrearage` are account-level: they raise `AccountError`, which pauses all
  submission instead of failing a job.
- A call that is not idempotent (upload, create) is never retried blindly after an
  ambiguous failure (the request may have taken effect): it raises `MaybeAppliedError`
  and the caller looks for the effect before trying again. An answer that cannot be used
  (no id) counts as ambiguous too: the call may well have taken effect.

Whether the provider answers at all is tracked here, for every call: an answer (any
status below 500) clears the count of attempts in a row that got none (a transport
error, a 5xx); `OUTAGE_AFTER` such attempts in a row tell the daemon the provider is not
answering (`on_silence`: `status` and `check` say so within seconds, and the stages stop
calling), and the next answer tells it the provider is back (`on_answer`). A step that
failed for a transport error or a 5xx asks `answering` before counting the failure as
its own: while the provider answers nothing at all, the failure is the outage's, and is
never counted toward parking a part or giving up a file.

An error of this machine met during a call (the spool's disk full while a download is
written) is raised as `batchd.faults.LocalFault`, never as an `ApiError`: it is not the
provider's, and must not be retried or counted as if it were.

Every answer is parsed here into the checked types of `batchd.provider.remote`. Nothing that
follows the server is unbounded: list calls stop after `max_pages` pages or when the
server repeats a page (`ListingIncomplete`), and a download must keep up a minimum
throughput after a grace period (`DownloadTooSlow`) instead of having a fixed total.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.documents import JsonObject
from batchd.errors import BatchdError
from batchd.faults import LocalFault
from batchd.fsutil import commit_temp, temp_name
from batchd.logs import get_logger
from batchd.provider.limits import CallClass, RateLimiter
from batchd.provider.remote import BadAnswer, Page, RemoteBatch, RemoteFile

log = get_logger(__name__)
_T = TypeVar("_T")

RETRYABLE_STATUS = frozenset({408, 409, 429})
ACCOUNT_CODES = frozenset({"Arrearage", "InvalidApiKey", "invalid_api_key"})
MAX_RETRY_AFTER_S = 3600.0
# Attempts in a row without an answer (any call) before the provider counts as down.
OUTAGE_AFTER = 3


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


class ListingIncomplete(ApiError):
    """A list call could not be followed to its end: too many pages, or the server
    repeats a page (its `has_more` never ends)."""

    @property
    def retryable(self) -> bool:
        return False


class DownloadTooSlow(ApiError):
    """A download fell below the minimum throughput (a dripping or stalled body)."""


@dataclass(frozen=True, slots=True)
class Throughput:
    """The slowest a body may arrive: after `grace_s`, at least `min_bytes_per_s` on
    average since the start. A body of N bytes may take grace_s + N / min_bytes_per_s."""

    min_bytes_per_s: float = 64 * 1024
    grace_s: float = 30.0

    def deadline(self, started: float, received: int) -> float:
        """PURE: the loop time by which more bytes must have arrived."""
        return started + self.grace_s + received / self.min_bytes_per_s


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After`; None when absent or absurd.
    An HTTP date is counted from `now` (wall time; the system clock's when not given)."""
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
            value = when.timestamp() - (SYSTEM_CLOCK.now() if now is None else now)
    if value is None or value != value or value < 0 or value > MAX_RETRY_AFTER_S:
        return None
    return value


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff for the `attempt`-th retry (1-based)."""
    return rng.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))


def _error_from(
    status: int, body: bytes, headers: Mapping[str, str], now: float | None = None
) -> ApiError:
    code: str | None = None
    message = body[:500].decode("utf-8", "replace") or f"HTTP {status}"
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        err: JsonObject = inner if isinstance(inner, dict) else parsed
        raw_code = err.get("code") or err.get("type")
        code = str(raw_code) if raw_code is not None else None
        message = str(err.get("message") or message)
    retry_after = parse_retry_after(headers, now)
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
        throughput: Throughput | None = None,
        rng: random.Random | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._base = base_url.rstrip("/")
        self.clock = clock
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._key = api_key.encode()
        self.limiter = limiter
        self.retry = retry or RetryPolicy()
        self.throughput = throughput or Throughput()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._upload_timeout = aiohttp.ClientTimeout(
            total=upload_timeout_s, connect=min(10.0, timeout_s), sock_read=timeout_s
        )
        # Downloads have no total: the throughput deadline bounds them instead.
        self._download_timeout = aiohttp.ClientTimeout(
            total=None, connect=min(10.0, timeout_s), sock_read=timeout_s
        )
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        # The last error of each call class and when (clock.now()); cleared by a success.
        self.last_error: dict[str, str] = {}
        self.last_error_at: dict[str, float] = {}
        # When the provider last answered a call (clock.now()); None before the first.
        self.last_ok_at: float | None = None
        # When it last answered anything (a status below 500; clock.monotonic()), and the
        # attempts in a row since that got no answer; the daemon's hooks for both.
        self.answered_mono: float | None = None
        self.unanswered = 0
        self.on_answer: Callable[[], None] | None = None
        self.on_silence: Callable[[str], None] | None = None

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
        form: Callable[[ExitStack], aiohttp.FormData] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        sink: Path | None = None,
    ) -> Any:
        headers = {"Content-Type": "application/json"} if json is not None else None
        try:
            # The call holds its place in the class's window until its answer arrives
            # (its head: a download's body does not hold it), or until it fails.
            async with self.limiter.call(cls) as slot:
                with ExitStack() as stack:
                    # A form (an upload) is built afresh for each attempt: it reads a file.
                    body = orjson.dumps(json) if json is not None else form(stack) if form else None
                    async with self.session.request(
                        method,
                        f"{self._base}{path}",
                        params=params,
                        data=body,
                        headers=headers,
                        timeout=timeout or self._timeout,
                    ) as resp:
                        slot.answered()
                        if resp.status < 500:
                            self._heard()
                        if resp.status >= 400:
                            err = _error_from(
                                resp.status,
                                self._redact(await resp.read()),
                                resp.headers,
                                self.clock.now(),
                            )
                            if resp.status == 429:
                                self.limiter.throttle(
                                    cls, err.retry_after_s or self.retry.base_s * 4
                                )
                            raise err
                        if sink is not None:
                            return await _stream_to(resp, sink, self.throughput)
                        raw = await resp.read()
        except (ApiError, LocalFault):
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
        """`_once`, retried by classification: permanent errors and account errors at
        once; a call that may have taken effect as `MaybeAppliedError`; the rest with
        backoff (or the server's Retry-After), at most `retry.max_attempts` times."""
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._once(cls, method, path, **kw)
            except (AccountError, DownloadTooSlow):
                # A dripping body is the part's step to pause, not a call to repeat now.
                raise
            except ApiError as err:
                self.last_error[cls] = str(err)
                self.last_error_at[cls] = self.clock.now()
                if err.status is None or err.status >= 500:
                    self._not_heard(err)
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
            else:
                # Recovered: `status` no longer shows the error.
                self.last_error.pop(cls, None)
                self.last_error_at.pop(cls, None)
                self.last_ok_at = self.clock.now()
                return answer

    def _heard(self) -> None:
        self.answered_mono = self.clock.monotonic()
        self.unanswered = 0
        if self.on_answer is not None:
            self.on_answer()

    def _not_heard(self, err: ApiError) -> None:
        self.unanswered += 1
        if self.unanswered >= OUTAGE_AFTER and self.on_silence is not None:
            self.on_silence(str(err))

    async def answering(self, since_mono: float) -> bool:
        """Does the provider answer at all? True when it answered any call after
        `since_mono` (the start of the step asking); otherwise one cheap call (a list of
        one batch, not retried) asks it. A step whose call failed with a transport error
        or a 5xx counts the failure as its own only when this is True."""
        if self.answered_mono is not None and self.answered_mono > since_mono:
            return True
        try:
            await self._once(CallClass.LIST, "GET", "/batches", params={"limit": "1"})
        except ApiError as err:
            if err.status is None or err.status >= 500:
                self._not_heard(err)
                return False
            return True  # an answer, if not a welcome one
        return True

    async def pages(
        self, cls: CallClass, path: str, params: Mapping[str, str], *, max_pages: int
    ) -> AsyncIterator[Page]:
        """Every page of a list call, following `after`, at most `max_pages` of them.
        `ListingIncomplete` when the server would go on past that, or repeats itself."""
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(max_pages):
            query = dict(params)
            if cursor is not None:
                query["after"] = cursor
            raw = await self._call(cls, "GET", path, idempotent=True, params=query)
            try:
                page = Page.parse(raw)
            except BadAnswer as exc:
                raise ApiError(f"GET {path}: {exc}") from exc
            yield page
            if not page.has_more:
                return
            if not page.items or page.last_id is None:
                raise ListingIncomplete(f"GET {path}: has_more, but no usable cursor")
            if page.last_id in seen:
                raise ListingIncomplete(f"GET {path}: the server repeats a page (after {cursor})")
            seen.add(page.last_id)
            cursor = page.last_id
        raise ListingIncomplete(f"GET {path}: more than {max_pages} pages")

    # -- files --------------------------------------------------------------------------

    async def upload_file(self, path: Path, filename: str) -> RemoteFile:
        """Upload a JSONL file for batch use, streamed from disk. An answer without a
        usable file id raises `MaybeAppliedError`: the file may be stored all the same."""

        def form(stack: ExitStack) -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            fh = stack.enter_context(path.open("rb"))
            data.add_field("file", fh, filename=filename, content_type="application/jsonl")
            return data

        raw = await self._call(
            CallClass.UPLOAD,
            "POST",
            "/files",
            idempotent=False,
            form=form,
            timeout=self._upload_timeout,
        )
        try:
            return RemoteFile.parse(raw)
        except BadAnswer as exc:
            raise MaybeAppliedError(f"upload answer unusable: {exc}") from exc

    async def list_files(self, *, max_pages: int = 100) -> tuple[list[RemoteFile], bool]:
        """The account's files, and whether that is all of them: a listing cut short
        (more than `max_pages` pages of 100, or a server whose pages never end) still
        gives what it saw. Items without a usable id are left out."""
        files: list[RemoteFile] = []
        try:
            async for page in self.pages(
                CallClass.FILES, "/files", {"limit": "100"}, max_pages=max_pages
            ):
                files.extend(parse_items(page, RemoteFile.parse))
        except ListingIncomplete as err:
            log.warning("list_incomplete", call="files", seen=len(files), error=str(err))
            return files, False
        return files, True

    async def delete_file(self, file_id: str) -> None:
        """Delete a remote file; one that is already gone counts as deleted."""
        try:
            await self._call(CallClass.FILES, "DELETE", f"/files/{file_id}", idempotent=True)
        except NotFoundError:
            return

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to `dest` (temp name, fsync, rename); returns bytes.
        Bounded by the throughput deadline, not by a total time."""
        result: int = await self._call(
            CallClass.FILES,
            "GET",
            f"/files/{file_id}/content",
            idempotent=True,
            sink=dest,
            timeout=self._download_timeout,
        )
        return result

    # -- batches ------------------------------------------------------------------------

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
    ) -> RemoteBatch:
        """Create a batch. An answer without a usable batch id raises
        `MaybeAppliedError`: the batch may exist and be billed all the same."""
        body: JsonObject = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        if metadata:
            body["metadata"] = metadata
        raw = await self._call(CallClass.CREATE, "POST", "/batches", idempotent=False, json=body)
        try:
            return RemoteBatch.parse(raw)
        except BadAnswer as exc:
            raise MaybeAppliedError(f"create answer unusable: {exc}") from exc

    async def retrieve_batch(self, batch_id: str) -> RemoteBatch:
        """The batch as the service sees it now; `BadAnswer` when the answer is unusable
        or is about another batch."""
        raw = await self._call(CallClass.RETRIEVE, "GET", f"/batches/{batch_id}", idempotent=True)
        batch = RemoteBatch.parse(raw)
        if batch.id != batch_id:
            raise BadAnswer(f"asked for batch {batch_id}, the answer is about {batch.id}")
        return batch

    async def cancel_batch(self, batch_id: str) -> RemoteBatch | None:
        """Ask for a batch to be cancelled; the batch as answered, or None when the
        answer is unusable (the next poll tells)."""
        raw = await self._call(
            CallClass.CANCEL, "POST", f"/batches/{batch_id}/cancel", idempotent=True
        )
        try:
            batch = RemoteBatch.parse(raw)
        except BadAnswer:
            return None
        return batch if batch.id == batch_id else None

    async def list_batches(self, **params: str) -> Page:
        """One page of batches; `params` are `after`, `limit` and DashScope filters."""
        raw = await self._call(CallClass.LIST, "GET", "/batches", idempotent=True, params=params)
        try:
            return Page.parse(raw)
        except BadAnswer as exc:
            raise ApiError(f"GET /batches: {exc}") from exc


def parse_items(page: Page, parse: Callable[[Any], _T]) -> list[_T]:
    """The items of a page that parse; the others are logged (a warning each) and left
    out."""
    items: list[_T] = []
    for raw in page.items:
        try:
            items.append(parse(raw))
        except BadAnswer as exc:
            log.warning("list_item_ignored", error=str(exc))
    return items


async def _stream_to(resp: aiohttp.ClientResponse, dest: Path, throughput: Throughput) -> int:
    """Write a body to `dest` through a temp name (fsync, rename, fsync of the folder),
    chunk by chunk; each chunk must arrive before the throughput deadline
    (`DownloadTooSlow`). A disk error while writing is this machine's (`LocalFault`)."""
    tmp = temp_name(dest)
    written = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        fh = await loop.run_in_executor(None, tmp.open, "wb")
    except OSError as exc:
        raise LocalFault(exc, tmp) from exc
    try:
        chunks = resp.content.iter_chunked(1 << 16).__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(throughput.deadline(started, written)):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                elapsed = loop.time() - started
                raise DownloadTooSlow(
                    f"download too slow: {written} bytes in {elapsed:.0f} s, under"
                    f" {throughput.min_bytes_per_s:.0f} bytes/s after {throughput.grace_s:.0f} s"
                ) from None
            try:
                await loop.run_in_executor(None, fh.write, chunk)
            except OSError as exc:
                raise LocalFault(exc, tmp) from exc
            written += len(chunk)
        try:
            await loop.run_in_executor(None, commit_temp, fh, tmp, dest)
        except OSError as exc:
            raise LocalFault(exc, tmp) from exc
    except BaseException:
        # Closing may fail again (the buffer's last bytes meet the same full disk).
        with contextlib.suppress(OSError):
            fh.close()
        tmp.unlink(missing_ok=True)
        raise
    return written
