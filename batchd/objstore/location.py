"""Where a folder lives: a local path, or a prefix of a bucket in an object store.

`paths.inbox`, `paths.spool` and `paths.outbox` each take a local path or a URL,
`oss://BUCKET/PREFIX/` (Alibaba Cloud OSS) or `s3://BUCKET/PREFIX/` (any S3-compatible
store); `parse_location` tells them apart. A folder on a bucket is the set of objects
whose keys start with its prefix; a "file" in it is a key with no further `/`, and a
key with one is in a sub-folder (`BucketUrl.child`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SCHEMES = ("oss", "s3")
Scheme = Literal["oss", "s3"]
# S3's rule for bucket names (OSS's is the same, minus dots): 3-63 characters, lower-case
# letters, digits, dots and hyphens, starting and ending with a letter or a digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# The longest key S3 and OSS take, in bytes of UTF-8.
MAX_KEY_BYTES = 1024


@dataclass(frozen=True, slots=True)
class BucketUrl:
    """A folder in a bucket: `scheme://bucket/prefix`, the prefix empty or ending in `/`."""

    scheme: Scheme
    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        """PURE: the key of member `name` (which may hold `/`: a member of a sub-folder)."""
        return f"{self.prefix}{name}"

    def name(self, key: str) -> str:
        """PURE: the member name of `key`, a key under this folder's prefix."""
        if not key.startswith(self.prefix):
            raise ValueError(f"key {key!r} is not in {self}")
        return key[len(self.prefix) :]

    def child(self, name: str) -> BucketUrl:
        """PURE: the sub-folder `name` of this folder."""
        return BucketUrl(self.scheme, self.bucket, f"{self.prefix}{name.strip('/')}/")

    def url_of(self, key: str) -> str:
        """PURE: the URL of one object of the bucket (shown to people, in errors)."""
        return f"{self.scheme}://{self.bucket}/{key}"


def is_bucket_url(value: str | Path) -> bool:
    """PURE: whether `value` names a bucket folder rather than a local path."""
    text = str(value)
    return any(text.startswith(f"{scheme}://") for scheme in SCHEMES)


def parse_bucket_url(value: str) -> BucketUrl:
    """PURE: `oss://BUCKET/PREFIX/` or `s3://BUCKET/PREFIX/` as a `BucketUrl`; a prefix
    without its final slash gets one. `ValueError` names what is wrong."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"{value!r}: a bucket folder is oss://BUCKET/PREFIX/ or s3://BUCKET/PREFIX/"
        )
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{value!r}: {bucket!r} is not a bucket name (3-63 lower-case letters, digits,"
            " dots and hyphens)"
        )
    if "?" in prefix or "#" in prefix:
        raise ValueError(f"{value!r}: a bucket folder takes no query or fragment")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{value!r}: '.' and '..' are not folders in a bucket")
    normal = "".join(f"{p}/" for p in parts)
    if len(normal.encode()) > MAX_KEY_BYTES // 2:
        raise ValueError(f"{value!r}: the prefix is too long for keys under it")
    return BucketUrl(scheme, bucket, normal)  # type: ignore[arg-type]


def parse_location(value: str | Path | BucketUrl) -> Path | BucketUrl:
    """PURE: a folder setting as a local `Path` or a `BucketUrl`."""
    if isinstance(value, BucketUrl):
        return value
    if is_bucket_url(value):
        return parse_bucket_url(str(value))
    if isinstance(value, str) and "://" in value:
        raise ValueError(
            f"{value!r}: a bucket folder is oss://BUCKET/PREFIX/ or s3://BUCKET/PREFIX/"
        )
    return Path(value)
