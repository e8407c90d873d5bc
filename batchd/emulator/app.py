"""The HTTP face of the emulator: the service's routes, guarded as the service guards them.

Every API call passes, in order: the API key (401), injected faults, the call class's
rate window (429 `Throttling.RateQuota` with `Retry-After`), then its handler. The
`/_emulator/*` routes (stats, clock, faults) need no key and are never limited. Handlers
apply the faults that shape answers (lost answers after the effect, ignored list filters,
endless pages, garbled Batch objects, missing or dripping result files).

`/_emulator/stats` includes `tokens_by_model`: per model, the `requests` (success lines),
`prompt_tokens`, `completion_tokens`, `reasoning_tokens` and `total_tokens` of every
success line the emulator wrote, and the `failed` lines of its error files. Each batch
counts once, when its result files are written, however often it is retrieved or its
files downloaded; so a test compares batchd's usage and cost figures with the emulator's
own count. `enqueued_tokens` gives, per model, the input tokens of the batches not yet
ended that the enqueued-token limit counts (store.py); `faults.token_limit_exceeded`
the batches that limit failed. Like the rest of the account, the figures live in memory
only; `/_emulator/stats/reset` starts the tally again with the other counts.

`inputs` counts the batches created per kind of input (`uploaded`, `oss` for
`oss:{region}:{bucket}/{key}` names, `presigned` for object URLs), with the bytes read from
the object store and the reads that failed per remote kind (emulator/oss.py).
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from batchd.documents import JsonObject
from batchd.emulator import errors
from batchd.emulator.checks import Scan, ServiceRules, scan_input
from batchd.emulator.clock import ServiceClock
from batchd.emulator.config import CALL_CLASSES, EmulatorSettings
from batchd.emulator.errors import EmulatorError
from batchd.emulator.faults import FaultInjector, FaultMode
from batchd.emulator.lifecycle import Status
from batchd.emulator.limits import CallWindow
from batchd.emulator.oss import (
    InputKind,
    ObjectReader,
    ObjectUnreadable,
    OssName,
    is_remote,
    parse_oss_name,
    read_input,
    store_url_allowed,
)
from batchd.emulator.store import OUTPUT_PREFIX, Batch, BatchInput, EmulatorStore, StoredFile
from batchd.logs import get_logger, shown_url

log = get_logger("batchd.emulator")

PREFIXES = ("/compatible-mode/v1", "/v1")
CHUNK_BYTES = 256 * 1024
MAX_FILTER_FILE_IDS = 20
# Filters of the batch list that a provider without them (OpenAI) ignores.
BATCH_FILTERS = ("input_file_ids", "status", "ds_name", "create_after", "create_before")
# A dripping download writes about this many seconds' worth of bytes at a time.
DRIP_TICK_S = 0.05
# The service reads create_after/create_before as Beijing time.
SERVICE_TZ = timezone(timedelta(hours=8))
_WINDOW = re.compile(r"^([1-9][0-9]*)([hd])$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class EmulatorState:
    """Everything the routes share; tests reach it through `Emulator.state`."""

    settings: EmulatorSettings
    clock: ServiceClock
    store: EmulatorStore
    windows: dict[str, CallWindow]
    faults: FaultInjector
    api_key: str
    # Reads `oss:` and URL inputs; None when no object store is configured.
    objects: ObjectReader | None = None

    @property
    def rules(self) -> ServiceRules:
        s = self.settings
        return ServiceRules(
            limits=s.limits,
            models=frozenset(s.models) | frozenset(s.limits.models),
            request_failure_rate=s.request_failure_rate,
            seed=s.seed,
        )

    async def stats(self) -> JsonObject:
        """The exact figures tests and benchmarks prove the daemon's behaviour from."""
        await self.store.settle_all()
        now = self.clock.now()
        store = self.store
        by_status = Counter(b.phase(now).status.value for b in store.batches.values())
        return {
            "calls": {name: window.snapshot() for name, window in self.windows.items()},
            "max_unfinished_batches": store.max_unfinished,
            "unfinished_batches": len(store.unfinished(now)),
            "batches_created": len(store.batches),
            "batches_created_per_input_file": dict(store.created_per_input_file),
            "batches_by_status": dict(by_status),
            "files_stored": {"count": len(store.files), "bytes": store.stored_bytes()},
            "inputs": store.inputs(),
            "tokens_by_model": store.tokens_by_model.to_json(),
            "enqueued_tokens": store.enqueued_tokens(now),
            "faults": dict(self.faults.counts),
            "service_time": now,
        }

    def reset_stats(self) -> None:
        for window in self.windows.values():
            window.reset()
        self.faults.reset_counts()
        self.store.created_per_input_file.clear()
        self.store.reset_inputs()
        self.store.tokens_by_model.clear()
        self.store.max_unfinished = len(self.store.unfinished(self.clock.now()))


def make_windows(settings: EmulatorSettings) -> dict[str, CallWindow]:
    limits = settings.limits
    minute = settings.rate_window_s
    second = settings.file_rate_window_s
    caps: dict[str, tuple[float, int | None]] = {
        "create": (minute, limits.create_per_minute),
        "retrieve": (minute, limits.retrieve_per_minute),
        "cancel": (minute, limits.cancel_per_minute),
        "list": (minute, limits.list_per_minute),
        "upload": (second, max(1, math.floor(limits.upload_per_second * second))),
        "files": (second, max(1, math.floor(limits.file_calls_per_second * second))),
        "download": (minute, None),
    }
    assert set(caps) == set(CALL_CLASSES)
    return {name: CallWindow(window_s, cap) for name, (window_s, cap) in caps.items()}


STATE = web.AppKey("state", EmulatorState)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def _error(exc: EmulatorError) -> web.Response:
    return _json(exc.body(), exc.status, exc.headers())


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer; the client sees a reset."""
    if request.transport is not None:
        request.transport.abort()
    # aiohttp treats a handler that raises CancelledError as abandoned and writes nothing,
    # not even a 500; the aborted transport then reaches the client as a reset.
    raise asyncio.CancelledError


def _authorised(request: web.Request, key: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def guarded(call_class: str, handler: Handler) -> Handler:
    """Wrap an API handler in the key check, faults and its class's rate window."""

    async def guard(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        if not _authorised(request, state.api_key):
            return _error(
                EmulatorError(401, "InvalidApiKey", "Invalid API-key provided.", param=None)
            )
        decision = state.faults.decide(call_class)
        if decision.latency_s > 0:
            await asyncio.sleep(decision.latency_s)
        if decision.fault is FaultMode.DROP:
            return _drop(request)
        if decision.fault is FaultMode.ERROR_5XX:
            return _error(
                EmulatorError(500, "InternalError", "An internal error occurred (injected).")
            )
        if decision.fault is FaultMode.THROTTLE:
            return _error(
                EmulatorError(
                    429, "Throttling", "Requests throttled (injected).", retry_after_s=1.0
                )
            )
        wait = state.windows[call_class].admit(state.clock.monotonic())
        if wait is not None:
            return _error(errors.rate_limited(call_class, wait))
        try:
            return await handler(request)
        except EmulatorError as exc:
            return _error(exc)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("emulator_handler_failed", path=request.path)
            return _error(EmulatorError(500, "InternalError", "The emulator failed on this call."))

    return guard


# ---- request parsing


async def _json_body(request: web.Request) -> JsonObject:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise errors.invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise errors.invalid("the request body must be a JSON object")
    return body


def _required_str(body: JsonObject, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise errors.invalid(f"{name} is required and must be a string", name)
    return value


def _window_s(label: str, settings: EmulatorSettings) -> float:
    match = _WINDOW.match(label)
    low = settings.limits.min_completion_window_h
    high = settings.limits.max_completion_window_h
    rule = (
        'completion_window must be a whole number of hours ("24h") or days ("14d"), '
        f"from {low}h to {high}h"
    )
    if match is None:
        raise errors.invalid(rule, "completion_window")
    hours = int(match.group(1)) * (24 if match.group(2) == "d" else 1)
    if not low <= hours <= high:
        raise errors.invalid(rule, "completion_window")
    return hours * 3600.0


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise errors.invalid("metadata must map strings to strings", "metadata")
    for key, most in (("ds_name", 100), ("ds_description", 200)):
        if len(value.get(key, "")) > most:
            raise errors.invalid(f"metadata.{key} is longer than {most} characters", key)
    return dict(value)


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise errors.invalid("limit must be an integer", "limit") from None
    if not 1 <= limit <= most:
        raise errors.invalid(f"limit must be between 1 and {most}", "limit")
    return limit


def _moment(query: Mapping[str, str], name: str) -> float | None:
    raw = query.get(name)
    if not raw:
        return None
    try:
        when = datetime.strptime(raw, "%Y%m%d%H%M%S").replace(tzinfo=SERVICE_TZ)
    except ValueError:
        raise errors.invalid(f"{name} must be yyyyMMddHHmmss", name) from None
    return when.astimezone(UTC).timestamp()


def _page(
    items: list[Any], after: str | None, limit: int, faults: FaultInjector
) -> tuple[list[Any], bool]:
    """One page after the cursor. With `endless_pages`, has_more is always true and a
    cursor at (or past) the end gets the last page again, so the cursor stops moving."""
    rest = items
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise errors.invalid(f"after: no object with id {after!r}", "after")
        rest = items[ids.index(after) + 1 :]
    page, has_more = rest[:limit], len(rest) > limit
    if faults.settings.endless_pages and not has_more:
        if not page and items:
            # The last page a client paging from the start with this limit was served.
            page = items[(len(items) - 1) // limit * limit :]
        faults.count("endless_pages")
        has_more = True
    return page, has_more


def _listing(data: list[JsonObject], has_more: bool, empty_id: str | None = None) -> JsonObject:
    """A list page; `empty_id` stands for first_id/last_id when the page is empty (the
    contract's file list requires strings there, its batch list allows null)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else empty_id,
        "last_id": data[-1]["id"] if data else empty_id,
        "has_more": has_more,
    }


# ---- files


async def upload_file(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    store = state.store
    limit = state.settings.limits.max_file_bytes
    purpose: str | None = None
    filename: str | None = None
    size = 0
    if not request.content_type.startswith("multipart/"):
        raise errors.invalid("the upload must be multipart/form-data", "file")
    temp = store.temp_path()
    try:
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file" and filename is None:
                filename = part.filename or "upload.jsonl"
                # Streamed chunk by chunk; past the limit the rest is read and dropped so
                # that the client, still sending, can read the refusal.
                with temp.open("wb") as out:
                    while chunk := await part.read_chunk(CHUNK_BYTES):
                        size += len(chunk)
                        if size <= limit:
                            out.write(chunk)
            else:
                await part.release()
        if filename is None:
            raise errors.invalid("a file part named 'file' is required", "file")
        if size > limit:
            raise errors.invalid(f"the file is larger than {limit} bytes", "file")
        if purpose != "batch":
            raise errors.invalid("purpose must be 'batch'", "purpose")
        store.check_storage(extra_bytes=size, extra_files=1)
        stored = store.add_file(temp, filename, size, "batch")
    finally:
        temp.unlink(missing_ok=True)
    log.debug("file_uploaded", file_id=stored.id, bytes=size)
    if state.faults.lose_response("upload"):
        return _drop(request)
    return _json(stored.to_json())


async def list_files(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    store = state.store
    await store.settle_all()
    files = list(store.files.values())
    if request.query.get("order", "desc") != "asc":
        files.reverse()
    purpose = request.query.get("purpose")
    if purpose and state.faults.settings.ignore_list_filters:
        state.faults.count("list_filters_ignored")
    elif purpose:
        files = [f for f in files if f.purpose == purpose]
    limit = _limit(request, 10_000, 10_000)
    page, has_more = _page(files, request.query.get("after"), limit, state.faults)
    return _json(_listing([f.to_json() for f in page], has_more, empty_id=""))


async def retrieve_file(request: web.Request) -> web.StreamResponse:
    store = request.app[STATE].store
    return _json(store.get_file(request.match_info["file_id"]).to_json())


async def delete_file(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    file_id = request.match_info["file_id"]
    state.store.delete_file(file_id)
    if state.faults.lose_response("files"):
        return _drop(request)
    return _json({"id": file_id, "object": "file", "deleted": True})


async def file_content(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    file_id = request.match_info["file_id"]
    stored = state.store.get_file(file_id)
    if not file_id.startswith(OUTPUT_PREFIX):
        raise errors.invalid(
            f"only files whose id starts with {OUTPUT_PREFIX!r} can be downloaded", "file_id"
        )
    faults = state.faults
    if state.store.content_fault(stored, "content_missing", faults.settings.content_missing_rate):
        faults.count("content_missing")
        raise errors.not_found("file", file_id)
    if state.store.content_fault(stored, "drip", faults.settings.drip_rate):
        faults.count("dripped")
        return await _drip(request, stored, faults.settings.drip_bytes_per_s)
    return web.FileResponse(stored.path, headers={"Content-Type": "application/octet-stream"})


async def _drip(request: web.Request, stored: StoredFile, rate: float) -> web.StreamResponse:
    """Send a file at about `rate` bytes per wall second, in small chunks; a client that
    goes away ends it quietly."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = stored.bytes
    chunk = max(1, min(CHUNK_BYTES, int(rate * DRIP_TICK_S)))
    fh = await asyncio.to_thread(stored.path.open, "rb")
    try:
        await response.prepare(request)
        while data := await asyncio.to_thread(fh.read, chunk):
            # Paused before each chunk: the last byte arrives no sooner than the rate says.
            await asyncio.sleep(len(data) / rate)
            await response.write(data)
        await response.write_eof()
    except ConnectionError:
        log.debug("drip_client_gone", file_id=stored.id)
    finally:
        fh.close()
    return response


# ---- batches


async def create_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    store = state.store
    body = await _json_body(request)
    input_file_id = _required_str(body, "input_file_id")
    endpoint = _required_str(body, "endpoint")
    completion_window = _required_str(body, "completion_window")
    if endpoint not in state.settings.limits.endpoints:
        raise errors.invalid(f"endpoint {endpoint!r} is not supported", "endpoint")
    window_s = _window_s(completion_window, state.settings)
    metadata = _metadata(body.get("metadata"))
    source, scan, temp = await _batch_input(state, input_file_id, endpoint)
    try:
        store.check_running_cap(scan.model, state.clock.now())
        batch = store.create_batch(source, endpoint, completion_window, window_s, metadata, scan)
        log.debug("batch_created", batch_id=batch.id, input_file_id=source.shown)
        for _ in range(state.faults.gateway_retries()):
            # The gateway's client sends the same create again: the service counts it and
            # makes another batch, unless a cap refuses it (then the gateway stops retrying).
            if state.windows["create"].admit(state.clock.monotonic()) is not None:
                break
            try:
                store.check_running_cap(scan.model, state.clock.now())
            except EmulatorError:
                break
            batch = store.create_batch(
                source, endpoint, completion_window, window_s, metadata, scan
            )
            state.faults.count("gateway_retried_creates")
            log.debug("batch_created_again", batch_id=batch.id, input_file_id=source.shown)
    finally:
        # A read object's copy: each batch made from it holds its own link.
        if temp is not None:
            temp.unlink(missing_ok=True)
    if state.faults.lose_create_response() or state.faults.lose_response("create"):
        return _drop(request)
    return _json(await _batch_json(state, batch))


async def _batch_input(
    state: EmulatorState, input_file_id: str, endpoint: str
) -> tuple[BatchInput, Scan, Path | None]:
    """The input a create names, checked: an uploaded file, or an object read from the
    object store (then the local copy to remove once the batches hold their links)."""
    store = state.store
    if is_remote(input_file_id):
        if state.objects is None:
            raise errors.invalid(
                "OSS input files are not supported by the emulator (start it with"
                " --object-store-url to read them)",
                "input_file_id",
            )
        return await _read_remote(state, state.objects, input_file_id, endpoint)
    input_file = store.files.get(input_file_id)
    if input_file is None or input_file.purpose != "batch":
        raise errors.invalid(f"input file {input_file_id!r} does not exist", "input_file_id")
    scan = await asyncio.to_thread(
        scan_input, input_file.path, endpoint, state.rules, input_file_id
    )
    # The file may have been deleted while it was read; from here on nothing awaits until
    # the batch is recorded, so the caps checked are the caps applied.
    if store.files.get(input_file_id) is not input_file:
        raise errors.invalid(f"input file {input_file_id!r} does not exist", "input_file_id")
    source = BatchInput(input_file_id, input_file.path, InputKind.UPLOADED, input_file_id)
    return source, scan, None


def _remote_source(state: EmulatorState, input_file_id: str) -> tuple[OssName | str, InputKind]:
    """PURE but for settings: what an `oss:` or URL input_file_id names, or a 400 saying
    why the service would refuse it at create."""
    settings = state.settings
    if input_file_id.startswith("oss:"):
        try:
            name = parse_oss_name(input_file_id)
        except ValueError as exc:
            raise errors.invalid(str(exc), "input_file_id") from None
        if name.region != settings.service_region:
            raise errors.invalid(
                f"{input_file_id!r} names a bucket in {name.region}; this endpoint reads only"
                f" buckets in its own region, {settings.service_region}",
                "input_file_id",
            )
        return name, InputKind.OSS
    assert settings.object_store_url is not None
    if not store_url_allowed(input_file_id, settings.object_store_url):
        raise errors.invalid(
            f"{shown_url(input_file_id)} is not the URL of an OSS object", "input_file_id"
        )
    return input_file_id, InputKind.PRESIGNED


async def _read_remote(
    state: EmulatorState, reader: ObjectReader, input_file_id: str, endpoint: str
) -> tuple[BatchInput, Scan, Path]:
    """Read an OSS input now and check it; an input that cannot be read gives a scan with
    the reason, so that the batch fails validation as the service's does (emulator/oss.py)."""
    what, kind = _remote_source(state, input_file_id)
    shown = input_file_id if kind is InputKind.OSS else shown_url(input_file_id)
    store = state.store
    # A create the running cap refuses reads nothing (the model's own cap is checked after).
    store.check_running_cap(None, state.clock.now())
    temp = store.temp_path()
    try:
        size = await read_input(reader, what, temp, state.settings.limits.max_file_bytes)
    except ObjectUnreadable as problem:
        store.input_reads_failed[kind] += 1
        log.info("input_unreadable", input_file_id=shown, code=problem.code)
        temp.write_bytes(b"")
        scan = Scan()
        scan.add(problem.code, problem.message, None, "input_file_id")
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    else:
        store.input_bytes_read[kind] += size
        log.debug("input_read", input_file_id=shown, kind=kind.value, bytes=size)
        try:
            scan = await asyncio.to_thread(scan_input, temp, endpoint, state.rules, shown)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    return BatchInput(input_file_id, temp, kind, shown), scan, temp


async def _batch_json(state: EmulatorState, batch: Batch) -> JsonObject:
    """The Batch object as answered: rendered now, garbled if `garbled_fields_rate` says."""
    return state.faults.garble(await state.store.render(batch))


async def retrieve_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return _json(await _batch_json(state, state.store.get_batch(request.match_info["batch_id"])))


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    batch = state.store.get_batch(request.match_info["batch_id"])
    state.store.cancel(batch)
    if state.faults.lose_response("cancel"):
        return _drop(request)
    return _json(await _batch_json(state, batch))


async def list_batches(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    query = request.query
    limit = _limit(request, 20, 100)
    batches = list(reversed(state.store.batches.values()))
    if state.faults.settings.ignore_list_filters:
        if any(query.get(name) for name in BATCH_FILTERS):
            state.faults.count("list_filters_ignored")
    else:
        batches = _filtered(batches, query, state.clock.now())
    page, has_more = _page(batches, query.get("after"), limit, state.faults)
    return _json(_listing([await _batch_json(state, b) for b in page], has_more))


def _filtered(batches: list[Batch], query: Mapping[str, str], now: float) -> list[Batch]:
    """The batches the DashScope list filters in `query` keep."""
    name = query.get("ds_name")
    if name:
        batches = [b for b in batches if name in (b.metadata or {}).get("ds_name", "")]
    if query.get("input_file_ids"):
        wanted = {i.strip() for i in query["input_file_ids"].split(",") if i.strip()}
        if len(wanted) > MAX_FILTER_FILE_IDS:
            raise errors.invalid(
                f"input_file_ids names at most {MAX_FILTER_FILE_IDS} files", "input_file_ids"
            )
        batches = [b for b in batches if b.input_file_id in wanted]
    if query.get("status"):
        statuses = {s.strip() for s in query["status"].split(",") if s.strip()}
        unknown = statuses - {s.value for s in Status}
        if unknown:
            raise errors.invalid(f"unknown status {sorted(unknown)[0]!r}", "status")
        batches = [b for b in batches if b.phase(now).status.value in statuses]
    after = _moment(query, "create_after")
    before = _moment(query, "create_before")
    if after is not None:
        batches = [b for b in batches if math.floor(b.timeline.created_at) >= after]
    if before is not None:
        batches = [b for b in batches if math.floor(b.timeline.created_at) <= before]
    return batches


# ---- control routes (no key, no limits)


async def stats(request: web.Request) -> web.StreamResponse:
    return _json(await request.app[STATE].stats())


async def reset_stats(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.reset_stats()
    return _json(await state.stats())


async def clock_get(request: web.Request) -> web.StreamResponse:
    clock = request.app[STATE].clock
    return _json(
        {"now": clock.now(), "monotonic": clock.monotonic(), "time_scale": clock.time_scale}
    )


async def clock_advance(request: web.Request) -> web.StreamResponse:
    clock = request.app[STATE].clock
    try:
        body = await _json_body(request)
        service_s = float(body.get("seconds", 0))
        wall_s = float(body.get("wall_seconds", 0))
        if service_s < 0 or wall_s < 0:
            raise errors.invalid("the clock only moves forward", "seconds")
    except (TypeError, ValueError):
        return _error(errors.invalid("seconds must be a number", "seconds"))
    except EmulatorError as exc:
        return _error(exc)
    clock.advance_wall(wall_s)
    clock.advance(service_s)
    return await clock_get(request)


async def faults_get(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE].faults.settings.model_dump())


async def faults_patch(request: web.Request) -> web.StreamResponse:
    injector = request.app[STATE].faults
    try:
        patch = await _json_body(request)
        injector.update(patch)
    except EmulatorError as exc:
        return _error(exc)
    except ValueError as exc:
        return _error(errors.invalid(f"invalid fault settings: {exc}"))
    return _json(injector.settings.model_dump())


def build_app(state: EmulatorState) -> web.Application:
    """The aiohttp application serving one emulated account."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = state
    api: list[tuple[str, str, str, Handler]] = [
        ("POST", "/files", "upload", upload_file),
        ("GET", "/files", "files", list_files),
        ("GET", "/files/{file_id}", "files", retrieve_file),
        ("DELETE", "/files/{file_id}", "files", delete_file),
        ("GET", "/files/{file_id}/content", "download", file_content),
        ("POST", "/batches", "create", create_batch),
        ("GET", "/batches", "list", list_batches),
        ("GET", "/batches/{batch_id}", "retrieve", retrieve_batch),
        ("POST", "/batches/{batch_id}/cancel", "cancel", cancel_batch),
    ]
    for prefix in PREFIXES:
        for method, path, call_class, handler in api:
            app.router.add_route(method, prefix + path, guarded(call_class, handler))
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_post("/_emulator/stats/reset", reset_stats)
    app.router.add_get("/_emulator/clock", clock_get)
    app.router.add_post("/_emulator/clock/advance", clock_advance)
    app.router.add_get("/_emulator/faults", faults_get)
    app.router.add_post("/_emulator/faults", faults_patch)
    return app
