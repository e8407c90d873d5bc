"""Folders in an S3-compatible object store (Alibaba Cloud OSS, AWS S3, Ceph, Swift...),
through aiobotocore: botocore's signing, retries and credential chain on aiohttp, which
batchd already runs on.

`ObjectStore` holds one client per endpoint for the daemon's life (creating one costs
about half a second: botocore loads its model); `Bucket` is one bucket folder seen
through it, with the few calls batchd needs, each with its caps and its named failures:

- a missing object is `None` (HEAD, GET, COPY) or a success (DELETE: deleting what is
  gone is what a claim redone after a crash does);
- a precondition that does not hold (an ETag that changed) is `ObjectChanged`;
- everything else the store says or fails to say (unreachable, 5xx, throttling, denied
  credentials, a missing bucket, a listing that never ends) is a `StorageFault`: this
  side's trouble, which pauses the work and shows (batchd.faults), never a part's.

Nothing the store answers is trusted without a check: a listing's entries are checked
for a key under the folder, a size and an ETag, and an odd one is logged and skipped; a
read stops at its byte cap and at the size the store announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from batchd.faults import StorageFault
from batchd.fsutil import fsync_dir, temp_name
from batchd.logs import get_logger
from batchd.objstore.credentials import Credentials, storage_credentials
from batchd.objstore.location import BucketUrl, Scheme

if TYPE_CHECKING:
    from batchd.config import StorageSettings

log = get_logger(__name__)

OSS_ENDPOINT = "https://oss-{region}.aliyuncs.com"
OSS_REGION = "cn-beijing"
S3_REGION = "us-east-1"
CHUNK_BYTES = 1024 * 1024
# The largest object one CopyObject copies (S3's and OSS's limit); larger ones are copied
# in parts.
MAX_COPY_BYTES = 5 * 1024**3
COPY_PART_BYTES = 512 * 1024**2
PAGE_KEYS = 1000
MiB = 1024 * 1024


class ObjectChanged(Exception):
    """A conditional call found the object changed (HTTP 412): another version is there."""


class ObjectTooLarge(Exception):
    """An object is larger than the read may take."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object, as a listing or a HEAD describes it."""

    key: str
    etag: str  # without its quotes
    size: int
    modified: float  # epoch seconds
    metadata: Mapping[str, str] = field(default_factory=dict)


def _etag(raw: object) -> str | None:
    if not isinstance(raw, str) or not raw.strip('"') or len(raw) > 256:
        return None
    return raw.strip('"')


def _epoch(raw: object) -> float:
    return raw.timestamp() if isinstance(raw, datetime) else 0.0


def _status(exc: ClientError) -> tuple[int, str]:
    response: Any = exc.response
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = response.get("Error", {}).get("Code", "")
    return int(status or 0), str(code)


class ObjectStore:
    """The clients of the object store, one per endpoint, opened on first use and closed
    with the store. The settings are read once: a change of `[storage]` needs a restart."""

    def __init__(self, settings: StorageSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._env = dict(os.environ if environ is None else environ)
        self.credentials: Credentials | None = storage_credentials(self._env)
        self._stack = AsyncExitStack()
        self._clients: dict[Scheme, Any] = {}
        self._lock = asyncio.Lock()
        # botocore's debug lines carry request headers; batchd's own lines say enough.
        for name in ("botocore", "aiobotocore", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._clients.clear()
        await self._stack.aclose()

    def region(self, scheme: Scheme) -> str:
        if self.settings.region:
            return self.settings.region
        if scheme == "oss":
            return OSS_REGION
        return self._env.get("AWS_DEFAULT_REGION") or self._env.get("AWS_REGION") or S3_REGION

    def endpoint_url(self, scheme: Scheme) -> str | None:
        """The endpoint for folders of `scheme` (None: AWS's, as botocore finds it)."""
        if self.settings.endpoint_url:
            return self.settings.endpoint_url
        if scheme == "oss":
            return OSS_ENDPOINT.format(region=self.region(scheme))
        return self._env.get("AWS_ENDPOINT_URL_S3") or self._env.get("AWS_ENDPOINT_URL") or None

    def addressing_style(self, scheme: Scheme) -> str:
        style = self.settings.addressing_style
        if style != "auto":
            return style
        if scheme == "oss" or self.endpoint_url(scheme) is None:
            return "virtual"
        return "path"

    def config(self, scheme: Scheme) -> Config:
        s = self.settings
        return Config(
            signature_version=s.signature_version,
            s3={"addressing_style": self.addressing_style(scheme)},
            retries={"mode": "standard", "max_attempts": s.max_attempts},
            connect_timeout=s.connect_timeout_s,
            read_timeout=s.read_timeout_s,
            # Checksums only where an operation requires one: newer botocore adds CRC
            # trailers and chunked bodies by default, which OSS does not take.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )

    async def client(self, scheme: Scheme) -> Any:
        """The client for folders of `scheme`, created on first use."""
        async with self._lock:
            client = self._clients.get(scheme)
            if client is None:
                kwargs: dict[str, Any] = {
                    "region_name": self.region(scheme),
                    "endpoint_url": self.endpoint_url(scheme),
                    "config": self.config(scheme),
                }
                if self.credentials is not None:
                    kwargs |= {
                        "aws_access_key_id": self.credentials.access_key_id,
                        "aws_secret_access_key": self.credentials.secret,
                        "aws_session_token": self.credentials.session_token,
                    }
                client = await self._stack.enter_async_context(
                    get_session().create_client("s3", **kwargs)
                )
                self._clients[scheme] = client
            return client

    def bucket(self, url: BucketUrl, area: str = "storage") -> Bucket:
        """Bucket folder `url`; its faults are shown under `area` (a folder's name)."""
        return Bucket(self, url, area)


class Bucket:
    """One bucket folder: its objects listed, read, written, copied and removed."""

    # Keys asked for per page of a listing (S3's and OSS's most).
    page_keys = PAGE_KEYS

    def __init__(self, store: ObjectStore, url: BucketUrl, area: str = "storage") -> None:
        self.store = store
        self.url = url
        self.area = area

    def __repr__(self) -> str:
        return f"Bucket({self.url})"

    @property
    def name(self) -> str:
        return self.url.bucket

    def fault(self, what: str, key: str, detail: str) -> StorageFault:
        return StorageFault(what, self.url.url_of(key), detail, self.area)

    def _client_fault(self, exc: ClientError, op: str, key: str) -> StorageFault:
        status, code = _status(exc)
        if code == "NoSuchBucket":
            what = f"the bucket {self.name} does not exist"
        elif status == 403 or code in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ):
            what = "the object store denied access (check the credentials and the bucket's policy)"
        elif status == 501:
            what = f"the object store does not support {op}"
        elif status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            what = f"the object store answered {status} {code}".rstrip()
        else:
            what = f"the object store refused {op} ({status} {code})"
        return self.fault(what, key, f"{op}: {status} {code}")

    async def _call(self, op: str, key: str, **kwargs: Any) -> dict[str, Any] | None:
        """Call `op` on the bucket: its answer, None for a missing object, `ObjectChanged`
        for a failed precondition, `StorageFault` for the rest."""
        client = await self.store.client(self.url.scheme)
        try:
            answer: dict[str, Any] = await getattr(client, op)(Bucket=self.name, **kwargs)
        except ClientError as exc:
            status, code = _status(exc)
            if status == 404 and code != "NoSuchBucket":
                return None
            if status == 412 or code == "PreconditionFailed":
                raise ObjectChanged(f"{self.url.url_of(key)} changed") from None
            raise self._client_fault(exc, op, key) from None
        except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self.fault("the object store cannot be reached", key, f"{op}: {exc}") from None
        if not isinstance(answer, dict):
            raise self.fault("the object store answered nonsense", key, op)
        return answer

    def _info(self, key: str, answer: Mapping[str, Any], size_name: str) -> ObjectInfo:
        etag, size = _etag(answer.get("ETag")), answer.get(size_name)
        if etag is None or not isinstance(size, int) or size < 0:
            raise self.fault("the object store described an object oddly", key, repr(answer)[:200])
        metadata = answer.get("Metadata")
        return ObjectInfo(
            key=key,
            etag=etag,
            size=size,
            modified=_epoch(answer.get("LastModified")),
            metadata=dict(metadata) if isinstance(metadata, dict) else {},
        )

    async def list(
        self, folder: BucketUrl | None = None, *, recursive: bool = False
    ) -> AsyncIterator[ObjectInfo]:
        """The objects of `folder` (this bucket folder by default), in key order: only its
        own files, or (`recursive`) those of its sub-folders too. At most
        `max_list_pages` pages; a store whose listing does not end is a `StorageFault`."""
        prefix = (folder or self.url).prefix
        max_pages = self.store.settings.max_list_pages
        token: str | None = None
        for _page in range(max_pages):
            kwargs: dict[str, Any] = {"Prefix": prefix, "MaxKeys": self.page_keys}
            if not recursive:
                kwargs["Delimiter"] = "/"
            if token is not None:
                kwargs["ContinuationToken"] = token
            answer = await self._call("list_objects_v2", prefix, **kwargs)
            if answer is None:
                raise self.fault(f"the bucket {self.name} does not exist", prefix, "list")
            contents = answer.get("Contents") or []
            if not isinstance(contents, list):
                raise self.fault("the object store listed nonsense", prefix, repr(contents)[:200])
            for item in contents:
                key = item.get("Key") if isinstance(item, dict) else None
                if not isinstance(key, str) or not key.startswith(prefix) or key == prefix:
                    if key != prefix:
                        log.warning(
                            "object_listing_odd", folder=str(self.url), entry=repr(item)[:200]
                        )
                    continue
                if not recursive and "/" in key[len(prefix) :]:
                    continue
                try:
                    yield self._info(key, item, "Size")
                except StorageFault:
                    log.warning("object_listing_odd", folder=str(self.url), entry=repr(item)[:200])
            if not answer.get("IsTruncated"):
                return
            new = answer.get("NextContinuationToken")
            if not isinstance(new, str) or not new or new == token:
                raise self.fault("the object store's listing does not end", prefix, "list")
            token = new
        raise self.fault(
            f"the listing is longer than {max_pages} pages (storage.max_list_pages)", prefix, "list"
        )

    async def head(self, key: str) -> ObjectInfo | None:
        """What the object `key` is, or None when there is none."""
        answer = await self._call("head_object", key, Key=key)
        return None if answer is None else self._info(key, answer, "ContentLength")

    async def get_bytes(
        self, key: str, *, max_bytes: int, if_match: str | None = None
    ) -> bytes | None:
        """The content of `key` (None when missing); `ObjectTooLarge` past `max_bytes`."""
        answer = await self._get(key, if_match)
        if answer is None:
            return None
        info = self._info(key, answer, "ContentLength")
        self._fits(info, answer, max_bytes)
        return b"".join([chunk async for chunk in self._body(key, answer, info.size)])

    def _fits(self, info: ObjectInfo, answer: dict[str, Any], max_bytes: int) -> None:
        if info.size > max_bytes:
            answer["Body"].close()
            raise ObjectTooLarge(
                f"{self.url.url_of(info.key)} has {info.size} bytes, over {max_bytes}"
            )

    async def get_file(
        self, key: str, path: Path, *, max_bytes: int, if_match: str | None = None
    ) -> ObjectInfo | None:
        """Write `key` to `path` (atomically, fsynced): what was read, or None when the
        object is missing. An error of this machine's disk is an OSError, as for any file."""
        answer = await self._get(key, if_match)
        if answer is None:
            return None
        info = self._info(key, answer, "ContentLength")
        self._fits(info, answer, max_bytes)
        tmp = temp_name(path)
        try:
            with tmp.open("wb") as fh:
                async for chunk in self._body(key, answer, info.size):
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        return info

    async def _get(self, key: str, if_match: str | None) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {"Key": key}
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'
        return await self._call("get_object", key, **kwargs)

    async def _body(self, key: str, answer: dict[str, Any], size: int) -> AsyncIterator[bytes]:
        """The body of a GET, chunk by chunk, never past the size announced."""
        got = 0
        try:
            async with answer["Body"] as stream:
                async for chunk in stream.iter_chunks(CHUNK_BYTES):
                    got += len(chunk)
                    if got > size:
                        raise self.fault("the object store sent more than it announced", key, "get")
                    yield chunk
        except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            raise self.fault("the object store cut a read", key, f"get: {exc}") from None
        if got != size:
            raise self.fault("the object store cut a read", key, f"get: {got} of {size} bytes")

    async def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> str:
        """Write `data` as `key` in one atomic PUT; its ETag."""
        answer = await self._call(
            "put_object", key, Key=key, Body=data, Metadata=dict(metadata or {})
        )
        return self._written_etag(answer, key)

    async def put_file(
        self, key: str, path: Path, *, metadata: Mapping[str, str] | None = None
    ) -> str:
        """Write the file at `path` as `key`: one PUT, or a multipart upload above
        `storage.multipart_threshold_mb`; either way the object appears whole or not at
        all. Its ETag."""
        size = path.stat().st_size
        if size <= self.store.settings.multipart_threshold_mb * MiB:
            with path.open("rb") as fh:
                answer = await self._call(
                    "put_object",
                    key,
                    Key=key,
                    Body=fh,
                    ContentLength=size,
                    Metadata=dict(metadata or {}),
                )
            return self._written_etag(answer, key)
        return await self._put_parts(key, path, metadata or {})

    async def _put_parts(self, key: str, path: Path, metadata: Mapping[str, str]) -> str:
        started = await self._call("create_multipart_upload", key, Key=key, Metadata=dict(metadata))
        upload_id = started.get("UploadId") if started else None
        if not isinstance(upload_id, str) or not upload_id:
            raise self.fault("the object store began no upload", key, "create_multipart_upload")
        part_bytes = self.store.settings.part_size_mb * MiB
        parts: list[dict[str, Any]] = []
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(part_bytes):
                    number = len(parts) + 1
                    answer = await self._call(
                        "upload_part",
                        key,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                    )
                    parts.append(
                        {"PartNumber": number, "ETag": f'"{self._written_etag(answer, key)}"'}
                    )
            answer = await self._call(
                "complete_multipart_upload",
                key,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call("abort_multipart_upload", key, Key=key, UploadId=upload_id)
            raise
        return self._written_etag(answer, key)

    def _written_etag(self, answer: Mapping[str, Any] | None, key: str) -> str:
        etag = _etag((answer or {}).get("ETag"))
        if etag is None:
            raise self.fault("the object store did not say what it wrote", key, "put")
        return etag

    async def copy(
        self,
        source: str,
        key: str,
        *,
        if_match: str | None = None,
        metadata: Mapping[str, str] | None = None,
        size: int | None = None,
    ) -> str | None:
        """Copy object `source` of this bucket to `key`, inside the store (no bytes through
        batchd): only while `source` still has ETag `if_match` (else `ObjectChanged`),
        with `metadata` in place of the source's. The copy's ETag, or None when `source`
        is missing. Objects over 5 GiB (`size`, when known) are copied in parts."""
        if size is not None and size > MAX_COPY_BYTES:
            return await self._copy_parts(source, key, size, if_match, metadata or {})
        kwargs: dict[str, Any] = {
            "Key": key,
            "CopySource": {"Bucket": self.name, "Key": source},
            "MetadataDirective": "REPLACE",
            "Metadata": dict(metadata or {}),
        }
        if if_match is not None:
            kwargs["CopySourceIfMatch"] = f'"{if_match}"'
        answer = await self._call("copy_object", source, **kwargs)
        if answer is None:
            return None
        result = answer.get("CopyObjectResult")
        return self._written_etag(result if isinstance(result, dict) else None, key)

    async def _copy_parts(
        self, source: str, key: str, size: int, if_match: str | None, metadata: Mapping[str, str]
    ) -> str | None:
        started = await self._call("create_multipart_upload", key, Key=key, Metadata=dict(metadata))
        upload_id = started.get("UploadId") if started else None
        if not isinstance(upload_id, str) or not upload_id:
            raise self.fault("the object store began no upload", key, "create_multipart_upload")
        parts: list[dict[str, Any]] = []
        try:
            for number, first in enumerate(range(0, size, COPY_PART_BYTES), start=1):
                last = min(size, first + COPY_PART_BYTES) - 1
                kwargs: dict[str, Any] = {
                    "Key": key,
                    "UploadId": upload_id,
                    "PartNumber": number,
                    "CopySource": {"Bucket": self.name, "Key": source},
                    "CopySourceRange": f"bytes={first}-{last}",
                }
                if if_match is not None:
                    kwargs["CopySourceIfMatch"] = f'"{if_match}"'
                answer = await self._call("upload_part_copy", source, **kwargs)
                if answer is None:
                    await self._call("abort_multipart_upload", key, Key=key, UploadId=upload_id)
                    return None
                result = answer.get("CopyPartResult")
                etag = self._written_etag(result if isinstance(result, dict) else None, key)
                parts.append({"PartNumber": number, "ETag": f'"{etag}"'})
            answer = await self._call(
                "complete_multipart_upload",
                key,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call("abort_multipart_upload", key, Key=key, UploadId=upload_id)
            raise
        return self._written_etag(answer, key)

    async def delete(self, key: str, *, if_match: str | None = None) -> bool:
        """Remove `key`: True when it is gone (or was), False when `if_match` is given and
        the object there now has another ETag (a new version: left in place). A store
        that does not take a conditional DELETE is a `StorageFault` (the caller decides
        whether a plain one will do)."""
        kwargs: dict[str, Any] = {"Key": key}
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'
        try:
            await self._call("delete_object", key, **kwargs)
        except ObjectChanged:
            return False
        return True

    async def delete_folder(self, folder: BucketUrl) -> int:
        """Remove every object under `folder` (sub-folders too), one DELETE each (a
        multi-delete needs Content-MD5, which some stores want and botocore no longer
        sends); how many there were."""
        keys = [info.key async for info in self.list(folder, recursive=True)]
        for key in keys:
            await self.delete(key)
        return len(keys)

    async def presign_get(self, key: str, expires_s: int) -> str:
        """A URL that reads `key` without credentials for `expires_s` seconds. It is a
        bearer credential: never logged, never stored."""
        client = await self.store.client(self.url.scheme)
        try:
            url: str = await client.generate_presigned_url(
                "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=expires_s
            )
        except (BotoCoreError, ClientError) as exc:
            raise self.fault("cannot sign a URL", key, f"presign: {type(exc).__name__}") from None
        return url

    async def location(self) -> str | None:
        """The bucket's region as the store names it (None: the store's default region,
        as AWS answers for us-east-1)."""
        answer = await self._call("get_bucket_location", "")
        if answer is None:
            raise self.fault(f"the bucket {self.name} does not exist", "", "get_bucket_location")
        value = answer.get("LocationConstraint")
        return value if isinstance(value, str) and value else None

    async def tags(self) -> dict[str, str] | None:
        """The bucket's tags, or None when the store will not say (it does not support
        the call, or these credentials may not read it)."""
        try:
            answer = await self._call("get_bucket_tagging", "")
        except StorageFault:
            return None
        if answer is None:  # NoSuchTagSet
            return {}
        tags: dict[str, str] = {}
        for tag in answer.get("TagSet") or []:
            if isinstance(tag, dict) and isinstance(tag.get("Key"), str):
                tags[tag["Key"]] = str(tag.get("Value", ""))
        return tags
