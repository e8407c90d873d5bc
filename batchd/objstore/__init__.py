"""Folders in an object store (OSS, S3): where they are (`location`), the credentials
(`credentials`), and the calls on a bucket (`bucket`, which needs the `storage` extra:
`pip install 'batchd[storage]'`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from batchd.errors import ConfigError

if TYPE_CHECKING:
    from batchd.config import StorageSettings
    from batchd.objstore.bucket import ObjectStore


def open_store(settings: StorageSettings, environ: Mapping[str, str] | None = None) -> ObjectStore:
    """The object store of the bucket folders, or a `ConfigError` saying what to install
    when the `storage` extra is missing (or the credentials are half there)."""
    try:
        from batchd.objstore.bucket import ObjectStore
    except ImportError as exc:
        raise ConfigError(
            f"a folder is in an object store, which needs aiobotocore ({exc.name} is missing):"
            " pip install 'batchd[storage]'"
        ) from None
    return ObjectStore(settings, environ)
