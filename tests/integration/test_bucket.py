"""batchd's bucket calls (batchd.objstore) against a real S3-compatible store on loopback:
what each returns for a missing or changed object, the caps on listings and reads, and
the faults that pause work rather than fail it."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchd.config import Settings, StorageSettings
from batchd.errors import ConfigError
from batchd.faults import Faults, StorageFault, describe, local_cause
from batchd.objstore import open_store
from batchd.objstore.bucket import Bucket, ObjectChanged, ObjectStore, ObjectTooLarge
from batchd.objstore.credentials import storage_credentials
from batchd.objstore.location import BucketUrl, parse_bucket_url, parse_location


@pytest.fixture
async def store(s3_server: Any) -> AsyncIterator[ObjectStore]:
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    async with open_store(settings, s3_server.env()) as opened:
        yield opened


@pytest.fixture
def bucket(store: ObjectStore, s3_server: Any) -> Bucket:
    return store.bucket(BucketUrl("s3", s3_server.bucket, "inbox/"), area="inbox")


def test_folder_settings_take_paths_or_bucket_urls(tmp_path: Path) -> None:
    settings = Settings(
        paths={"root": tmp_path, "inbox": "oss://drop-bucket/team/in", "outbox": "s3://out-b/"}
    )
    assert settings.paths.location("inbox") == BucketUrl("oss", "drop-bucket", "team/in/")
    assert settings.paths.bucket("outbox") == BucketUrl("s3", "out-b", "")
    assert settings.paths.bucket("spool") is None
    # The local working folder of a bucket folder is beside the others.
    assert settings.paths.folder("inbox") == tmp_path / "inbox"
    assert settings.model_dump(mode="json")["paths"]["inbox"] == "oss://drop-bucket/team/in/"
    assert set(settings.paths.buckets()) == {"inbox", "outbox"}


@pytest.mark.parametrize(
    "value",
    ["oss://A_B/x", "s3://ab", "s3://bucket/../x", "ftp://bucket/x", "s3://bucket/x?y=1"],
)
def test_bad_bucket_urls_say_what_is_wrong(value: str) -> None:
    with pytest.raises(ValueError, match=r"bucket|folder"):
        parse_location(value)
    with pytest.raises(ConfigError, match=r"paths\.inbox"):
        Settings.load(None, paths={"inbox": value})


def test_bucket_url_prefix_is_normalised() -> None:
    url = parse_bucket_url("oss://my-bucket//a/b")
    assert (str(url), url.key("x.jsonl"), str(url.child("merged"))) == (
        "oss://my-bucket/a/b/",
        "a/b/x.jsonl",
        "oss://my-bucket/a/b/merged/",
    )


def test_credentials_come_from_systemd_then_oss_then_aws(tmp_path: Path) -> None:
    assert storage_credentials({}) is None
    aws = {"AWS_ACCESS_KEY_ID": "AKAWS", "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    oss = {"OSS_ACCESS_KEY_ID": "LTAIoss", "OSS_ACCESS_KEY_SECRET": "oss-secret"}
    assert storage_credentials(aws).access_key_id == "AKAWS"  # type: ignore[union-attr]
    found = storage_credentials(aws | oss | {"OSS_SESSION_TOKEN": "sts"})
    assert found is not None and (found.access_key_id, found.session_token) == ("LTAIoss", "sts")
    (tmp_path / "oss_access_key_id").write_text("LTAIsystemd\n")
    (tmp_path / "oss_access_key_secret").write_text("systemd-secret\n")
    found = storage_credentials(aws | oss | {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert found is not None and found.source == "systemd credentials"
    # The secret never shows in a repr or a str.
    assert "secret" not in repr(found) and "secret" not in str(found)
    with pytest.raises(ConfigError, match="OSS_ACCESS_KEY_SECRET"):
        storage_credentials({"OSS_ACCESS_KEY_ID": "LTAIhalf"})


async def test_objects_are_listed_read_written_copied_and_removed(
    bucket: Bucket, tmp_path: Path
) -> None:
    etag = await bucket.put_bytes("inbox/a.jsonl", b'{"x": 1}\n', metadata={"batchd-job": "j1"})
    await bucket.put_bytes("inbox/sub/b.jsonl", b"nested\n")
    listed = [info async for info in bucket.list()]
    assert [(i.key, i.size, i.etag) for i in listed] == [("inbox/a.jsonl", 9, etag)]
    assert [i.key async for i in bucket.list(recursive=True)] == [
        "inbox/a.jsonl",
        "inbox/sub/b.jsonl",
    ]

    head = await bucket.head("inbox/a.jsonl")
    assert head is not None and head.metadata == {"batchd-job": "j1"}
    assert await bucket.head("inbox/none") is None
    assert await bucket.get_bytes("inbox/a.jsonl", max_bytes=100) == b'{"x": 1}\n'
    assert await bucket.get_bytes("inbox/none", max_bytes=100) is None
    with pytest.raises(ObjectTooLarge):
        await bucket.get_bytes("inbox/a.jsonl", max_bytes=8)

    got = await bucket.get_file("inbox/a.jsonl", tmp_path / "a.jsonl", max_bytes=100, if_match=etag)
    assert got is not None and (tmp_path / "a.jsonl").read_bytes() == b'{"x": 1}\n'
    with pytest.raises(ObjectChanged):
        await bucket.get_file("inbox/a.jsonl", tmp_path / "b", max_bytes=100, if_match="0" * 32)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == [tmp_path / "a.jsonl"]

    # A copy only of the version seen; of a missing object, nothing.
    with pytest.raises(ObjectChanged):
        await bucket.copy("inbox/a.jsonl", "spool/j1/input.jsonl", if_match="0" * 32)
    assert await bucket.head("spool/j1/input.jsonl") is None
    copied = await bucket.copy(
        "inbox/a.jsonl",
        "spool/j1/input.jsonl",
        if_match=etag,
        metadata={"batchd-source-etag": etag},
    )
    assert copied == etag
    assert (await bucket.head("spool/j1/input.jsonl")).metadata == {  # type: ignore[union-attr]
        "batchd-source-etag": etag
    }
    assert await bucket.copy("inbox/none", "spool/j1/x", if_match=etag) is None

    # A conditional delete leaves a newer version in place; deleting what is gone is fine.
    await bucket.put_bytes("inbox/a.jsonl", b"a newer version\n")
    assert await bucket.delete("inbox/a.jsonl", if_match=etag) is False
    assert await bucket.head("inbox/a.jsonl") is not None
    assert await bucket.delete("inbox/a.jsonl") is True
    assert await bucket.delete("inbox/a.jsonl") is True
    assert await bucket.delete_folder(BucketUrl("s3", bucket.name, "spool/")) == 1


async def test_large_files_go_up_in_parts(s3_server: Any, tmp_path: Path) -> None:
    settings = StorageSettings(
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        multipart_threshold_mb=5,
        part_size_mb=5,
    )
    source = tmp_path / "big.jsonl"
    line = b'{"custom_id": "x", "body": "' + b"y" * 1000 + b'"}\n'
    source.write_bytes(line * (12 * 1024 * 1024 // len(line)))
    async with open_store(settings, s3_server.env()) as store:
        bucket = store.bucket(BucketUrl("s3", s3_server.bucket, "spool/"))
        etag = await bucket.put_file("spool/big.jsonl", source)
        assert etag.endswith("-3")
        await bucket.get_file("spool/big.jsonl", tmp_path / "back", max_bytes=1 << 30)
    assert (tmp_path / "back").read_bytes() == source.read_bytes()


async def test_a_listing_that_does_not_end_is_a_named_fault(s3_server: Any) -> None:
    settings = StorageSettings(
        endpoint_url=s3_server.endpoint_url, region=s3_server.region, max_list_pages=2
    )
    async with open_store(settings, s3_server.env()) as store:
        bucket = store.bucket(BucketUrl("s3", s3_server.bucket, "inbox/"), area="inbox")
        # Three pages of keys need three requests: over the cap of two.
        bucket.page_keys = 2
        await asyncio.gather(*(bucket.put_bytes(f"inbox/{n:05d}.jsonl", b"x\n") for n in range(5)))
        assert len([i async for i in store.bucket(bucket.url).list()]) == 5  # pages of 1000
        with pytest.raises(StorageFault, match="max_list_pages") as caught:
            _ = [info async for info in bucket.list()]
    assert caught.value.area == "inbox" and local_cause(caught.value) is caught.value


async def test_store_faults_pause_and_show_never_count(s3_server: Any) -> None:
    """Denied credentials, a missing bucket and an unreachable store are StorageFaults:
    what batchd.faults shows under the folder's name, and what pauses the work."""
    wrong = s3_server.env() | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    async with open_store(settings, wrong) as store:
        with pytest.raises(StorageFault, match="denied access") as denied:
            await store.bucket(BucketUrl("s3", s3_server.bucket, ""), "outbox").head("x")
    async with open_store(settings, s3_server.env()) as store:
        with pytest.raises(StorageFault, match="does not exist"):
            _ = [i async for i in store.bucket(BucketUrl("s3", "no-such-bucket-here", "")).list()]
    unreachable = StorageSettings(
        endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=1, connect_timeout_s=2
    )
    async with open_store(unreachable, s3_server.env()) as store:
        with pytest.raises(StorageFault, match="cannot be reached") as cut:
            await store.bucket(BucketUrl("s3", "b-b-b", ""), "spool").head("x")
    assert cut.value.errno == errno.EREMOTEIO
    faults = Faults()
    faults.met(denied.value, pauses="publishing")
    faults.met(cut.value, pauses="submitting")
    shown = {f.key: f for f in faults.pausing()}
    assert set(shown) == {"outbox", "spool"}
    assert describe(cut.value) == "the object store cannot be reached"
    assert "s3://" in shown["outbox"].detail and "not-the-secret" not in shown["outbox"].detail


async def test_presigned_urls_read_without_credentials(bucket: Bucket) -> None:
    await bucket.put_bytes("inbox/p.jsonl", b"presigned\n")
    url = await bucket.presign_get("inbox/p.jsonl", 60)
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200 and await response.read() == b"presigned\n"


async def test_region_and_tags_are_read_or_not_known(bucket: Bucket) -> None:
    assert await bucket.location() == "cn-beijing"
    # Swift answers an empty tag set: the tag the service needs is seen as missing.
    assert await bucket.tags() == {}


def test_without_aiobotocore_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "batchd.objstore.bucket", None)
    with pytest.raises(ConfigError, match=r"batchd\[storage\]"):
        open_store(StorageSettings(), {})
