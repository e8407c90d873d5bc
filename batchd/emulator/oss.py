"""Batch inputs read from an object store, as Model Studio reads OSS inputs.

A batch's `input_file_id` may name, besides an uploaded file, an OSS object: by resource
name, `oss:{region}:{bucket}/{key}`, or by a (presigned) URL of the object. With
`object_store_url` set, the emulator reads such inputs from that S3-compatible store (OSS
itself, or any store speaking S3, such as Swift or MinIO on loopback); without it, it
refuses them as before.

When it reads: the service reads the object while the batch is `validating` and fails the
batch there when it cannot (the seed: the input is checked in validation; an unreadable
input is a validation failure, not a refused call). The emulator fixes every fact of a
batch at create (lifecycle.py), so it reads the object during the create call, keeps its
own copy, and shows the outcome when validation ends: the batch is `validating` for
`validating_s` either way, then `failed` with the problem in `errors` (or it runs). An
object written after the create is therefore not seen, where the service might see it.
Only what the id alone decides is refused at create with 400 `InvalidParameter`: a
malformed id, a region other than the endpoint's (the service wants a bucket in its own
region), a URL that is not an object store's.

The resource-name form needs the bucket tagged `bailian-datahub-access: read`
(`oss_require_tag`, on by default; Swift never keeps bucket tags, so tests switch it off to
read from it); a URL carries its own authorization (its signature) and skips the tag check,
read by a plain GET. A URL's query is a bearer credential: it is never logged, never put in
an error message, and stats show the URL without it (`logs.shown_url`).

The seed names no error codes for OSS inputs; those below are the emulator's, in the style
of the service's file errors (`file_too_large`), each message naming the object and the rule.
Reads are capped at the provider's largest input file (`limits.max_file_bytes`), and a read
that brings no byte for `oss_read_timeout_s` is cut: both fail the batch, neither holds the
emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from batchd.errors import ConfigError
from batchd.logs import get_logger, register_secret, shown_url

log = get_logger("batchd.emulator")

OSS_SCHEME = "oss:"
URL_SCHEMES = ("http://", "https://")
# The bucket tag that lets Model Studio's service-linked role read a bucket.
TAG_KEY = "bailian-datahub-access"
TAG_VALUE = "read"
# Alibaba Cloud's OSS hosts: `BUCKET.oss-REGION.aliyuncs.com` (and the internal ones).
ALIYUN_SUFFIX = ".aliyuncs.com"
CHUNK_BYTES = 256 * 1024
# An OSS bucket name: 3-63 of lowercase letters, digits and hyphens (S3 adds dots).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")

# Codes a batch whose input cannot be read fails validation with.
NOT_FOUND = "file_not_found"
ACCESS_DENIED = "file_access_denied"
NOT_TAGGED = "bucket_not_authorized"
TOO_LARGE = "file_too_large"
READ_TIMEOUT = "file_read_timeout"
READ_FAILED = "file_read_failed"


class InputKind(StrEnum):
    """Where a batch's input comes from; `/_emulator/stats` counts each apart."""

    UPLOADED = "uploaded"
    OSS = "oss"
    PRESIGNED = "presigned"


def is_remote(input_file_id: str) -> bool:
    """PURE: whether an input_file_id names an object in a store, not an uploaded file."""
    return input_file_id.startswith((OSS_SCHEME, *URL_SCHEMES))


@dataclass(frozen=True)
class OssName:
    """An OSS resource name, `oss:{region}:{bucket}/{key}`."""

    region: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"oss:{self.region}:{self.bucket}/{self.key}"


def parse_oss_name(value: str) -> OssName:
    """PURE: the parts of `oss:{region}:{bucket}/{key}`; ValueError says what is wrong."""
    rest = value.removeprefix(OSS_SCHEME)
    region, sep, path = rest.partition(":")
    bucket, slash, key = path.partition("/")
    if not sep or not slash:
        raise ValueError(f"{value!r} is not of the form oss:{{region}}:{{bucket}}/{{file_path}}")
    if not _REGION.match(region):
        raise ValueError(f"{value!r}: {region!r} is not a region name (such as cn-beijing)")
    if not _BUCKET.match(bucket):
        raise ValueError(f"{value!r}: {bucket!r} is not a bucket name")
    if not key or key.endswith("/"):
        raise ValueError(f"{value!r}: the file path names no file")
    return OssName(region, bucket, key)


def _port(scheme: str, port: int | None) -> int:
    return port if port is not None else (443 if scheme == "https" else 80)


def store_url_allowed(url: str, store_url: str) -> bool:
    """PURE: whether `url` is an object's URL the emulator reads: at the object store's
    origin (path-style `/{bucket}/{key}`), at a bucket's host under it (virtual-hosted
    `{bucket}.{host}/{key}`), or at Alibaba Cloud's OSS (`*.aliyuncs.com`); the path must
    name an object."""
    try:
        got = urlsplit(url)
        store = urlsplit(store_url)
        got_port, store_port = got.port, store.port
    except ValueError:
        return False
    host = (got.hostname or "").lower()
    if got.scheme not in ("http", "https") or not host or not got.path.strip("/"):
        return False
    if host.endswith(ALIYUN_SUFFIX):
        return True
    store_host = (store.hostname or "").lower()
    if got.scheme != store.scheme or _port(got.scheme, got_port) != _port(store.scheme, store_port):
        return False
    if host == store_host:
        return "/" in got.path.strip("/")  # path style: bucket, then key
    return host.endswith("." + store_host)


def addressing_style(store_url: str, chosen: str) -> str:
    """PURE: path-style for an http:// loopback store (no DNS names for buckets there),
    virtual-hosted otherwise (OSS takes only those), unless `chosen` says which."""
    if chosen != "auto":
        return chosen
    parts = urlsplit(store_url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return "path" if parts.scheme == "http" and loopback else "virtual"


@dataclass(frozen=True)
class StoreCredentials:
    """Keys to sign object-store requests with; all None leaves it to botocore's chain."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"StoreCredentials(access_key_id={self.access_key_id!r}, secret=***)"


def credentials_from(env: Mapping[str, str]) -> StoreCredentials:
    """PURE: OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET (/ OSS_SESSION_TOKEN) first, else
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), else nothing (botocore
    then looks in its own places: profiles, instance roles)."""
    for key_id, secret, token in (
        ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"),
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    ):
        if env.get(key_id) and env.get(secret):
            return StoreCredentials(env[key_id], env[secret], env.get(token) or None)
    return StoreCredentials()


class ObjectUnreadable(Exception):
    """The input could not be read; `code` and the message go into the batch's errors."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ReaderSettings:
    """What the reader needs from the emulator's settings."""

    store_url: str
    region: str | None
    addressing: str
    require_tag: bool
    stall_s: float


class ObjectReader:
    """Reads batch inputs from the object store into local files.

    The S3 client (aiobotocore, from the `storage` extra) and the HTTP session for URLs
    are made at the first read and closed by `close()`."""

    def __init__(self, settings: ReaderSettings, env: Mapping[str, str] | None = None) -> None:
        try:
            import aiobotocore  # noqa: F401
        except ImportError:
            raise ConfigError(
                "object_store_url needs batchd's storage extra: pip install 'batchd[storage]'"
            ) from None
        self.settings = settings
        self.credentials = credentials_from(os.environ if env is None else env)
        register_secret(self.credentials.secret_access_key)
        register_secret(self.credentials.session_token)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def _s3(self) -> Any:
        async with self._lock:
            if self._client is None:
                from aiobotocore.session import get_session
                from botocore.config import Config

                s = self.settings
                stall = s.stall_s
                config = Config(
                    signature_version="s3v4",
                    s3={"addressing_style": addressing_style(s.store_url, s.addressing)},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=stall,
                    read_timeout=stall,
                )
                session = get_session()
                region = s.region or session.get_config_variable("region") or "us-east-1"
                creds = self.credentials
                self._client = await self._stack.enter_async_context(
                    session.create_client(
                        "s3",
                        endpoint_url=s.store_url,
                        region_name=region,
                        aws_access_key_id=creds.access_key_id,
                        aws_secret_access_key=creds.secret_access_key,
                        aws_session_token=creds.session_token,
                        config=config,
                    )
                )
            return self._client

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def read_oss(self, name: OssName, out: BinaryIO, max_bytes: int) -> int:
        """Copy the object `name` into `out` (at most `max_bytes`); the bytes copied.
        Raises ObjectUnreadable with the service's reason."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            ReadTimeoutError,
        )

        client = await self._s3()
        stall = self.settings.stall_s
        try:
            if self.settings.require_tag:
                async with asyncio.timeout(stall):
                    tagging = await client.get_bucket_tagging(Bucket=name.bucket)
                tags = {t.get("Key"): t.get("Value") for t in tagging.get("TagSet", [])}
                if tags.get(TAG_KEY) != TAG_VALUE:
                    raise _not_tagged(name)
            async with asyncio.timeout(stall):
                got = await client.get_object(Bucket=name.bucket, Key=name.key)
            body = got["Body"]
            try:
                return await _copy(body.iter_chunks(CHUNK_BYTES), out, max_bytes, stall, name)
            finally:
                body.close()
        except ClientError as exc:
            raise _client_error(exc, name) from None
        except (TimeoutError, ReadTimeoutError, ConnectTimeoutError):
            raise _stalled(str(name), stall) from None
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise ObjectUnreadable(
                READ_FAILED, f"{name} could not be read: {type(exc).__name__}"
            ) from None

    async def read_url(self, url: str, out: BinaryIO, max_bytes: int) -> int:
        """Copy the object at `url` (a presigned or public URL) into `out`, by a plain
        GET sent as given (its signature untouched); the bytes copied."""
        shown = shown_url(url)
        stall = self.settings.stall_s
        timeout = aiohttp.ClientTimeout(sock_connect=stall, sock_read=stall)
        try:
            async with asyncio.timeout(stall):
                response = await self._session().get(
                    URL(url, encoded=True), timeout=timeout, allow_redirects=False
                )
            async with response:
                if response.status == 404:
                    raise ObjectUnreadable(NOT_FOUND, f"{shown}: no such object (HTTP 404)")
                if response.status in (401, 403):
                    raise ObjectUnreadable(
                        ACCESS_DENIED,
                        f"{shown}: access denied (HTTP {response.status}); the URL may have"
                        " expired or its signature may not match",
                    )
                if response.status != 200:
                    raise ObjectUnreadable(READ_FAILED, f"{shown}: HTTP {response.status}")
                size = response.content_length
                if size is not None and size > max_bytes:
                    raise _too_large(shown, max_bytes)
                return await _copy(
                    response.content.iter_chunked(CHUNK_BYTES), out, max_bytes, stall, shown
                )
        except TimeoutError:
            raise _stalled(shown, stall) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ObjectUnreadable(
                READ_FAILED, f"{shown} could not be read: {type(exc).__name__}"
            ) from None


async def _copy(
    chunks: AsyncIterator[bytes], out: BinaryIO, max_bytes: int, stall_s: float, what: object
) -> int:
    """Write `chunks` to `out` until they end; past `max_bytes` or when no chunk comes for
    `stall_s`, raise ObjectUnreadable."""
    size = 0
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(stall_s):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return size
        except TimeoutError:
            raise _stalled(str(what), stall_s) from None
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(str(what), max_bytes)
        out.write(chunk)


def _too_large(what: str, max_bytes: int) -> ObjectUnreadable:
    return ObjectUnreadable(
        TOO_LARGE, f"{what} has more than {max_bytes} bytes; at most {max_bytes}"
    )


def _stalled(what: str, stall_s: float) -> ObjectUnreadable:
    return ObjectUnreadable(READ_TIMEOUT, f"reading {what} stalled: no data for {stall_s:g} s")


def _not_tagged(name: OssName) -> ObjectUnreadable:
    return ObjectUnreadable(
        NOT_TAGGED,
        f"bucket {name.bucket!r} is not tagged {TAG_KEY}: {TAG_VALUE}, so Model Studio may"
        f" not read {name}; tag the bucket, or pass a presigned URL of the object",
    )


def _client_error(exc: Any, name: OssName) -> ObjectUnreadable:
    response = exc.response
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code", "")
    if code == "NoSuchTagSet":
        return _not_tagged(name)
    if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
        what = "bucket" if code == "NoSuchBucket" else "object"
        return ObjectUnreadable(NOT_FOUND, f"{name}: no such {what} ({code or status})")
    if status in (401, 403):
        return ObjectUnreadable(ACCESS_DENIED, f"{name}: access denied ({code or status})")
    return ObjectUnreadable(READ_FAILED, f"{name} could not be read: {code or status}")


async def read_input(
    reader: ObjectReader, source: OssName | str, path: Path, max_bytes: int
) -> int:
    """Read one remote input into the file `path`; the bytes read."""
    with path.open("wb") as out:
        if isinstance(source, OssName):
            return await reader.read_oss(source, out, max_bytes)
        return await reader.read_url(source, out, max_bytes)
