"""A fault proxy in front of an S3-compatible object store: the store's misbehaviour on
demand, for tests and for dry runs (`batchd store-proxy --upstream URL`).

Every request is passed to the upstream store as it came (method, path, query, headers
with the `Host` the client signed, body), and the answer back, unless a fault decides
otherwise. The faults, set at start or at any time by `POST /_proxy/faults` (JSON, the
fields of `StoreFaults`; what is not named keeps its value):

- `error_rate`, `error_status`: that share of requests answered `error_status` (503
  `SlowDown` or 500 `InternalError`) without reaching the store;
- `latency_s`: every answer that much later;
- `slow_read_s`: a pause before each 64 KiB of every answer's body (a slow read);
- `cut_rate`: that share of bodies cut after half their bytes (a connection lost);
- `methods`: the faults above touch only these methods (e.g. `["GET"]`); empty: all;
- `key_contains`: ... and only requests whose path contains this text;
- `tags`, `location`: `GET /BUCKET?tagging` and `?location` answered with these (a store
  without bucket tagging, such as Swift, can then play an OSS bucket tagged for Model
  Studio).

`GET /_proxy/stats` counts requests by method and the faults injected. No bucket name
starts with `_`, so these routes never shadow a bucket. The proxy binds to loopback by
default and forwards to one upstream only.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from xml.sax.saxutils import escape

import aiohttp
import orjson
from aiohttp import web

from batchd.logs import get_logger

log = get_logger("batchd.storeproxy")

CHUNK_BYTES = 64 * 1024
# Headers of one hop, never passed on.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)
ERROR_CODES = {500: "InternalError", 503: "SlowDown"}


@dataclass(slots=True)
class StoreFaults:
    error_rate: float = 0.0
    error_status: int = 503
    latency_s: float = 0.0
    slow_read_s: float = 0.0
    cut_rate: float = 0.0
    methods: list[str] = field(default_factory=list)
    key_contains: str = ""
    tags: dict[str, str] | None = None
    location: str | None = None
    seed: int | None = None

    def update(self, changes: dict[str, Any]) -> None:
        """Apply `changes` (a JSON object); unknown names or wrong types are refused."""
        known = {f.name: f for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"no fault named {name!r}")
            if name in ("error_rate", "cut_rate") and not (
                isinstance(value, int | float) and 0 <= value <= 1
            ):
                raise ValueError(f"{name} is a share between 0 and 1")
            if name in ("latency_s", "slow_read_s") and not (
                isinstance(value, int | float) and 0 <= value <= 600
            ):
                raise ValueError(f"{name} is seconds between 0 and 600")
            if name == "error_status" and value not in ERROR_CODES:
                raise ValueError(f"error_status is one of {sorted(ERROR_CODES)}")
            setattr(self, name, value)


class StoreProxy:
    """The proxy's state: its faults, its counts, its client to the upstream store."""

    def __init__(self, upstream: str, faults: StoreFaults | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults or StoreFaults()
        self.rng = random.Random(self.faults.seed)
        self.requests: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._http: aiohttp.ClientSession | None = None

    def set_faults(self, **changes: Any) -> None:
        self.faults.update(changes)
        if "seed" in changes:
            self.rng = random.Random(self.faults.seed)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "injected": dict(self.injected),
            "faults": asdict(self.faults),
        }

    def _touches(self, request: web.Request) -> bool:
        f = self.faults
        if f.methods and request.method not in f.methods:
            return False
        return f.key_contains in request.path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.method] += 1
        f = self.faults
        touched = self._touches(request)
        if touched and f.latency_s:
            await asyncio.sleep(f.latency_s)
        served = self._served(request)
        if served is not None:
            return served
        if touched and f.error_rate and self.rng.random() < f.error_rate:
            self.injected[f"error_{f.error_status}"] += 1
            await request.read()
            return _error(f.error_status, ERROR_CODES[f.error_status], "injected by the proxy")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if self._http is None:
            self._http = aiohttp.ClientSession(auto_decompress=False)
        try:
            upstream = await self._http.request(
                request.method,
                self.upstream + request.raw_path,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"),
            )
        except aiohttp.ClientError as exc:
            return _error(502, "BadGateway", f"upstream: {type(exc).__name__}")
        async with upstream:
            answer = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_HEADERS and name.lower() != "content-length":
                    answer.headers.add(name, value)
            length = upstream.content_length
            if length is not None:
                answer.content_length = length
            cut = bool(touched and f.cut_rate and self.rng.random() < f.cut_rate)
            half = (length or 0) // 2
            await answer.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_chunked(CHUNK_BYTES):
                if touched and f.slow_read_s:
                    self.injected["slow_read"] += 1
                    await asyncio.sleep(f.slow_read_s)
                if cut and sent + len(chunk) > half:
                    self.injected["cut"] += 1
                    await answer.write(chunk[: max(0, half - sent)])
                    if request.transport is not None:
                        request.transport.close()
                    return answer
                await answer.write(chunk)
                sent += len(chunk)
            await answer.write_eof()
            return answer

    def _served(self, request: web.Request) -> web.Response | None:
        """Bucket tagging and location answered by the proxy, when it was told them."""
        if request.method != "GET" or request.path.strip("/").count("/"):
            return None
        f = self.faults
        if "tagging" in request.query and f.tags is not None:
            tags = "".join(
                f"<Tag><Key>{escape(k)}</Key><Value>{escape(v)}</Value></Tag>"
                for k, v in f.tags.items()
            )
            return _xml(f"<Tagging><TagSet>{tags}</TagSet></Tagging>")
        if "location" in request.query and f.location is not None:
            return _xml(
                '<LocationConstraint xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"{escape(f.location)}</LocationConstraint>"
            )
        return None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _xml(body: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=('<?xml version="1.0" encoding="UTF-8"?>' + body).encode(),
        content_type="application/xml",
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _xml(f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>", status)


def proxy_app(proxy: StoreProxy) -> web.Application:
    async def set_faults(request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("a JSON object of faults")
            proxy.set_faults(**changes)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        log.info("store_faults_set", **{k: v for k, v in changes.items() if k != "tags"})
        return web.json_response(proxy.stats())

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(proxy.stats())

    async def on_cleanup(_app: web.Application) -> None:
        await proxy.close()

    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/_proxy/faults", set_faults)
    app.router.add_get("/_proxy/stats", stats)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.on_cleanup.append(on_cleanup)
    return app


@dataclass(slots=True)
class RunningProxy:
    proxy: StoreProxy
    runner: web.AppRunner
    url: str

    def set_faults(self, **changes: Any) -> None:
        self.proxy.set_faults(**changes)

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_proxy(
    upstream: str, host: str = "127.0.0.1", port: int = 0, faults: StoreFaults | None = None
) -> RunningProxy:
    """Serve a proxy to `upstream` on `host:port` (0: a free port) until closed."""
    proxy = StoreProxy(upstream, faults)
    runner = web.AppRunner(proxy_app(proxy), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return RunningProxy(proxy, runner, f"http://{host}:{bound}")
