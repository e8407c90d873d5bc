"""The outbox on a bucket (`paths.outbox = "oss://B/P/"` or `"s3://B/P/"`): the same
folders, `P/NAME/MEMBER`, with the same promise as on this machine.

An object store has no rename, so a folder cannot appear in one step. A job's folder is
built as on a local outbox, hidden in the local working outbox (`paths.folder("outbox")`,
`Outbox.staging`); then each member is written to `P/NAME/MEMBER` with one PUT (a
multipart upload for a large one: either way the object appears whole or not at all),
`summary.json` last, and only then is the local copy removed. A folder on a bucket is
complete when its `summary.json` exists; a reader that finds a folder without one takes
it as not there. A crash between two members leaves a folder without `summary.json`: the
publish stage does it again (the same members, overwritten, summary last), never under a
second name, since the name was committed before the first PUT.

A name is taken on a bucket when `NAME/summary.json` exists (objects under `NAME/`
without it are a publication cut short: batchd's own, which it finishes).

`BucketOutbox` is the bucket's side of `batchd.outbox.folder.Outbox` for the publish
stage (`holder`, `taken`, `job_id`, `summary`, `publish`, `published`) and, for every
reader of the outbox (`batchd retry`, `merged/`, the client), `fetch`: named members of a
published folder copied to a local folder, read there as any `OutboxFolder`. Reads are
capped (`MAX_DOC_BYTES` for summary.json, the caller's cap for the rest); every fault of
the store is a `StorageFault`, which pauses the work (batchd.faults).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from batchd.documents import Summary, SummaryHead, decode_summary
from batchd.failpoints import failpoint
from batchd.logs import get_logger
from batchd.objstore.location import BucketUrl, parse_bucket_url
from batchd.outbox.folder import MERGED, MERGED_SUMMARY, SUMMARY, OutboxFolder

if TYPE_CHECKING:
    # The `storage` extra (aiobotocore): imported only where a bucket is in use.
    from batchd.objstore.bucket import Bucket

log = get_logger(__name__)

# The largest summary.json (or merged.json) read from a bucket: far above any batchd
# writes (its lists are capped), small enough to hold in memory.
MAX_DOC_BYTES = 64 * 1024 * 1024


# The most bytes of one member of a folder read back (an input's copy, its results):
# several times the largest input taken, since answers may be longer than questions.
READ_CAP_FACTOR = 8


def read_cap(max_input_bytes: int) -> int:
    """PURE: the most bytes of one member of a bucket outbox's folder read back, for
    inputs of at most `max_input_bytes` (`jobs.max_input_bytes`)."""
    return max(READ_CAP_FACTOR * max_input_bytes, 1024**3)


def folder_name(url: BucketUrl) -> str:
    """PURE: the job folder's name of a folder URL (`.../outbox/NAME/` -> NAME)."""
    return url.prefix.rstrip("/").rpartition("/")[2]


def folder_url(location: str) -> BucketUrl | None:
    """PURE: the bucket folder a job's `outbox_path` names, or None for a local path."""
    try:
        return parse_bucket_url(location) if "://" in location else None
    except ValueError:
        return None


def upload_order(names: Iterable[str]) -> list[str]:
    """PURE: the members of a written folder in the order they are put into the bucket:
    every one but summary.json, by name, then summary.json (its presence says the folder
    is whole). Hidden names (a writer's temp files) are not members."""
    members = sorted(n for n in names if not n.startswith(".") and n != SUMMARY)
    return [*members, SUMMARY] if SUMMARY in names else members


class BucketOutbox:
    """The outbox as folders of a bucket (`bucket.url` is the outbox's own folder)."""

    __slots__ = ("bucket",)

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def __repr__(self) -> str:
        return f"BucketOutbox({self.bucket.url})"

    def url(self, name: str) -> BucketUrl:
        """The bucket folder of job folder `name`."""
        return self.bucket.url.child(name)

    def location(self, name: str) -> str:
        """What a job records as its outbox folder (`outbox_path`): the folder's URL."""
        return str(self.url(name))

    def key(self, name: str, member: str) -> str:
        return self.url(name).key(member)

    async def _summary_bytes(self, name: str) -> bytes | None:
        """Folder `name`'s summary.json; None when missing, b"" when too large to be one."""
        from batchd.objstore.bucket import ObjectTooLarge

        try:
            return await self.bucket.get_bytes(self.key(name, SUMMARY), max_bytes=MAX_DOC_BYTES)
        except ObjectTooLarge:
            return b""

    async def taken(self, name: str) -> bool:
        """Is `name` a published folder (its summary.json exists)?"""
        return await self.bucket.head(self.key(name, SUMMARY)) is not None

    async def holder(self, name: str, job_id: str) -> str | None:
        """Who holds `name`: None (no summary.json: free, or a publication cut short),
        "self" (job `job_id`'s folder) or "other". A store fault raises: taking another
        name then could publish the job twice."""
        raw = await self._summary_bytes(name)
        if raw is None:
            return None
        head = _head(raw)
        return "self" if head is not None and head.job_id == job_id else "other"

    async def job_id(self, name: str) -> str | None:
        """The id of the job that published folder `name`; None when there is none."""
        raw = await self._summary_bytes(name)
        head = _head(raw) if raw is not None else None
        return head.job_id if head is not None else None

    async def summary(self, name: str) -> Summary:
        """Folder `name`'s summary.json, decoded (`FileNotFoundError` when missing)."""
        raw = await self._summary_bytes(name)
        if raw is None:
            raise FileNotFoundError(f"{self.bucket.url.url_of(self.key(name, SUMMARY))}")
        return decode_summary(raw)

    async def publish(self, staging: OutboxFolder, name: str, subject: str | None) -> None:
        """Put every member of the written folder `staging` into `NAME/`, one PUT each,
        summary.json last. Redone whole after a crash: the members are overwritten."""
        names = await asyncio.to_thread(staging.list)
        for member in upload_order(names):
            if member == SUMMARY:
                # Every other member is in the bucket: the folder is whole once this is.
                failpoint("publish.before_summary", subject)
            path = staging.member(member)
            if not path.is_file() or path.is_symlink():
                continue
            await self.bucket.put_file(self.key(name, member), path)
            failpoint("publish.after_member", subject)

    async def published(self) -> AsyncIterator[tuple[str, str]]:
        """(folder name, job id) of every published folder: each `NAME/summary.json` of
        one capped listing, read for its job id."""
        base = self.bucket.url
        names: list[str] = []
        async for info in self.bucket.list(recursive=True):
            rest = base.name(info.key)
            name, slash, member = rest.partition("/")
            if slash and member == SUMMARY and name and not name.startswith("."):
                names.append(name)
        for name in names:
            job_id = await self.job_id(name)
            if job_id is not None:
                yield name, job_id

    async def fetch(
        self, url: BucketUrl, members: Iterable[str], dest: Path, *, max_bytes: int
    ) -> OutboxFolder:
        """Copy the named members of the bucket folder `url` (a job's folder, of this
        outbox or of an earlier one) that exist into the local folder `dest` (made
        afresh), each at most `max_bytes`; the local copy, read as any folder. Through
        the same store and credentials as the outbox."""
        from batchd.objstore.bucket import Bucket

        source = Bucket(self.bucket.store, url, self.bucket.area)
        await asyncio.to_thread(_fresh, dest)
        for member in members:
            await source.get_file(url.key(member), dest / member, max_bytes=max_bytes)
        return OutboxFolder(dest)

    async def put_merged(self, name: str, written: Path) -> None:
        """Put a merged set written in the local folder `written` as `NAME/merged/`,
        merged.json last (each object is replaced whole: a reader who reads merged.json
        first, then the files, sees a set at least as new as it)."""
        for member in upload_order(
            [n for n in await asyncio.to_thread(_names, written) if n != MERGED_SUMMARY]
        ):
            await self.bucket.put_file(self.key(name, f"{MERGED}/{member}"), written / member)
        failpoint("publish.merged", name)
        await self.bucket.put_file(
            self.key(name, f"{MERGED}/{MERGED_SUMMARY}"), written / MERGED_SUMMARY
        )

    async def has(self, name: str, member: str) -> bool:
        return await self.bucket.head(self.key(name, member)) is not None


def _head(raw: bytes) -> SummaryHead | None:
    try:
        return msgspec.json.decode(raw, type=SummaryHead)
    except msgspec.DecodeError:
        return None


def _fresh(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())
