"""What batchd may rely on from an S3-compatible object store, pinned against a real one.

The server is OpenStack Swift with s3api on loopback (the `s3_server` fixture), the client
aiobotocore configured as batchd will configure it: an endpoint URL, a region, path-style
addressing, V4 signatures, credentials from the standard environment. Where Swift differs
from AWS S3 and Alibaba Cloud OSS, the test says so: batchd's bucket folders must work
with what is pinned here, and no more."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError

# As batchd will configure it. Checksums only when an operation requires them: newer
# botocore adds CRC trailers by default, which S3-compatible servers (OSS among them)
# may not accept.
CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    retries={"mode": "standard", "max_attempts": 3},
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)
PART_BYTES = 5 * 1024 * 1024  # the S3 minimum size of every part but the last


@pytest.fixture
async def s3(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """A client that finds endpoint, region and credentials in the environment only."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    async with get_session().create_client("s3", config=CONFIG) as client:
        yield client


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str]:
    response: Any = exc.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


async def test_objects_are_written_read_described_and_deleted(s3: Any, s3_server: Any) -> None:
    bucket, body = s3_server.bucket, b'{"x": 1}\n'
    put = await s3.put_object(Bucket=bucket, Key="inbox/a.jsonl", Body=body)
    head = await s3.head_object(Bucket=bucket, Key="inbox/a.jsonl")
    got = await s3.get_object(Bucket=bucket, Key="inbox/a.jsonl")
    assert await got["Body"].read() == body
    assert head["ContentLength"] == len(body)
    assert head["ETag"] == put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'

    await s3.delete_object(Bucket=bucket, Key="inbox/a.jsonl")
    with pytest.raises(ClientError) as missing:
        await s3.head_object(Bucket=bucket, Key="inbox/a.jsonl")
    assert error_of(missing)[0] == 404
    with pytest.raises(ClientError) as missing:
        await s3.get_object(Bucket=bucket, Key="inbox/a.jsonl")
    assert error_of(missing) == (404, "NoSuchKey")
    # Deleting what is gone succeeds: a claim redone after a crash may delete twice.
    await s3.delete_object(Bucket=bucket, Key="inbox/a.jsonl")


async def test_odd_keys_round_trip(s3: Any, s3_server: Any) -> None:
    keys = ["inbox/中文 name.jsonl", "inbox/-dash.jsonl", "inbox/new\nline.jsonl", "inbox/a+b%20"]
    for key in keys:
        await s3.put_object(Bucket=s3_server.bucket, Key=key, Body=key.encode())
    listed = await s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="inbox/")
    assert sorted(item["Key"] for item in listed["Contents"]) == sorted(keys)
    for key in keys:
        got = await s3.get_object(Bucket=s3_server.bucket, Key=key)
        assert await got["Body"].read() == key.encode()


async def test_listing_pages_through_every_key_once_in_order(s3: Any, s3_server: Any) -> None:
    bucket = s3_server.bucket
    keys = [f"inbox/{n:02}.jsonl" for n in range(7)]
    for key in [*keys, "spool/elsewhere.jsonl", "inbox/sub/deeper.jsonl"]:
        await s3.put_object(Bucket=bucket, Key=key, Body=b"{}\n")

    pages: list[list[str]] = []
    token: dict[str, str] = {}
    while True:
        page = await s3.list_objects_v2(
            Bucket=bucket, Prefix="inbox/", Delimiter="/", MaxKeys=3, **token
        )
        pages.append([item["Key"] for item in page.get("Contents", [])])
        if not page["IsTruncated"]:
            break
        token = {"ContinuationToken": page["NextContinuationToken"]}
    assert [key for page in pages for key in page] == keys
    assert all(len(page) <= 3 for page in pages) and len(pages) >= 3

    paginator = s3.get_paginator("list_objects_v2")
    seen = [
        item["Key"]
        async for page in paginator.paginate(
            Bucket=bucket, Prefix="inbox/", PaginationConfig={"PageSize": 2}
        )
        for item in page.get("Contents", [])
    ]
    assert seen == [*keys, "inbox/sub/deeper.jsonl"]

    after = await s3.list_objects_v2(
        Bucket=bucket, Prefix="inbox/", StartAfter=keys[4], Delimiter="/"
    )
    assert [item["Key"] for item in after["Contents"]] == keys[5:]
    assert [p["Prefix"] for p in after["CommonPrefixes"]] == ["inbox/sub/"]


async def test_a_multipart_upload_reads_back_streamed(s3: Any, s3_server: Any) -> None:
    bucket, key = s3_server.bucket, "spool/big.jsonl"
    parts = [b"a" * (PART_BYTES - 1) + b"\n", b"b" * 1000 + b"\n"]
    upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
    etags = []
    for number, body in enumerate(parts, start=1):
        part = await s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=body
        )
        etags.append({"PartNumber": number, "ETag": part["ETag"]})
    # Until completed, nothing is visible under the key.
    with pytest.raises(ClientError) as missing:
        await s3.head_object(Bucket=bucket, Key=key)
    assert error_of(missing)[0] == 404
    done = await s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": etags}
    )
    assert done["ETag"].endswith('-2"')

    got = await s3.get_object(Bucket=bucket, Key=key)
    digest, size = hashlib.sha256(), 0
    async for chunk in got["Body"].iter_chunks(64 * 1024):
        digest.update(chunk)
        size += len(chunk)
    assert size == sum(map(len, parts))
    assert digest.hexdigest() == hashlib.sha256(b"".join(parts)).hexdigest()
    listed = await s3.list_objects_v2(Bucket=bucket, Prefix="spool/")
    assert [item["Key"] for item in listed["Contents"]] == [key]  # no segments show


async def test_a_copy_happens_only_if_the_source_is_unchanged(s3: Any, s3_server: Any) -> None:
    """The claim's copy into the spool names the ETag it listed: a producer's PUT over the
    object in between makes the copy fail instead of claiming other bytes."""
    bucket = s3_server.bucket
    first = await s3.put_object(Bucket=bucket, Key="inbox/a.jsonl", Body=b"first\n")
    await s3.copy_object(
        Bucket=bucket,
        Key="spool/a.jsonl",
        CopySource={"Bucket": bucket, "Key": "inbox/a.jsonl"},
        CopySourceIfMatch=first["ETag"],
    )
    copied = await s3.get_object(Bucket=bucket, Key="spool/a.jsonl")
    assert await copied["Body"].read() == b"first\n"

    await s3.put_object(Bucket=bucket, Key="inbox/a.jsonl", Body=b"second\n")
    with pytest.raises(ClientError) as changed:
        await s3.copy_object(
            Bucket=bucket,
            Key="spool/b.jsonl",
            CopySource={"Bucket": bucket, "Key": "inbox/a.jsonl"},
            CopySourceIfMatch=first["ETag"],
        )
    assert error_of(changed) == (412, "PreconditionFailed")
    with pytest.raises(ClientError) as missing:
        await s3.head_object(Bucket=bucket, Key="spool/b.jsonl")
    assert error_of(missing)[0] == 404


async def test_a_delete_happens_only_if_the_object_is_unchanged(s3: Any, s3_server: Any) -> None:
    bucket = s3_server.bucket
    first = await s3.put_object(Bucket=bucket, Key="inbox/a.jsonl", Body=b"first\n")
    await s3.put_object(Bucket=bucket, Key="inbox/a.jsonl", Body=b"second\n")
    with pytest.raises(ClientError) as changed:
        await s3.delete_object(Bucket=bucket, Key="inbox/a.jsonl", IfMatch=first["ETag"])
    assert error_of(changed) == (412, "PreconditionFailed")
    still = await s3.get_object(Bucket=bucket, Key="inbox/a.jsonl")
    assert await still["Body"].read() == b"second\n"


async def test_conditional_put_is_refused_loudly_not_ignored(s3: Any, s3_server: Any) -> None:
    """AWS S3 and OSS take `If-None-Match: *` on PUT (create only); Swift 2.30's s3api
    answers 501 NotImplemented for every conditional PUT. What matters is that it is never
    silently ignored; batchd must not need it. A multipart upload completed with
    `If-None-Match: *` is the create-only write that Swift does honour."""
    bucket = s3_server.bucket
    await s3.put_object(Bucket=bucket, Key="outbox/summary.json", Body=b"{}")
    with pytest.raises(ClientError) as refused:
        await s3.put_object(Bucket=bucket, Key="outbox/summary.json", Body=b"x", IfNoneMatch="*")
    status, code = error_of(refused)
    assert (status, code) in {(412, "PreconditionFailed"), (501, "NotImplemented")}
    got = await s3.get_object(Bucket=bucket, Key="outbox/summary.json")
    assert await got["Body"].read() == b"{}"

    async def create_only(key: str, body: bytes) -> None:
        upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        part = await s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=body
        )
        try:
            await s3.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload["UploadId"],
                IfNoneMatch="*",
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
            )
        except ClientError:
            await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            raise

    await create_only("state/claim-a", b"daemon-1")
    with pytest.raises(ClientError) as taken:
        await create_only("state/claim-a", b"daemon-2")
    assert error_of(taken)[0] == 412
    got = await s3.get_object(Bucket=bucket, Key="state/claim-a")
    assert await got["Body"].read() == b"daemon-1"


async def test_a_presigned_url_reads_the_object_without_credentials(
    s3: Any, s3_server: Any
) -> None:
    bucket = s3_server.bucket
    await s3.put_object(Bucket=bucket, Key="spool/part-1.jsonl", Body=b"{}\n")
    url = await s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "spool/part-1.jsonl"}, ExpiresIn=300
    )
    assert "X-Amz-Signature=" in url and s3_server.secret_access_key not in url
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == b"{}\n"
        async with http.get(url.replace("part-1", "part-2")) as response:
            assert response.status == 403


async def test_wrong_credentials_are_refused(s3_server: Any) -> None:
    async with get_session().create_client(
        "s3",
        config=CONFIG,
        endpoint_url=s3_server.endpoint_url,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key="not-the-secret",
    ) as client:
        with pytest.raises(ClientError) as refused:
            await client.list_objects_v2(Bucket=s3_server.bucket)
    assert error_of(refused) == (403, "SignatureDoesNotMatch")


async def test_the_bucket_tells_its_region(s3: Any, s3_server: Any) -> None:
    """GetBucketLocation answers (us-east-1 would be spelled as no constraint, as on AWS)."""
    location = await s3.get_bucket_location(Bucket=s3_server.bucket)
    assert (location["LocationConstraint"] or "us-east-1") == s3_server.region


async def test_virtual_hosted_addressing_reaches_the_bucket(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OSS takes only virtual-hosted requests (`BUCKET.endpoint/KEY`). Swift serves them under
    its `storage_domain` (localhost); names under .localhost are pointed at 127.0.0.1 here,
    as not every resolver does it."""
    resolve = socket.getaddrinfo

    def loopback(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback)
    config = CONFIG.merge(Config(s3={"addressing_style": "virtual"}))
    async with get_session().create_client(
        "s3",
        config=config,
        endpoint_url=s3_server.endpoint_url.replace("127.0.0.1", "localhost"),
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key=s3_server.secret_access_key,
    ) as client:
        await client.put_object(Bucket=s3_server.bucket, Key="inbox/v.jsonl", Body=b"{}\n")
        got = await client.get_object(Bucket=s3_server.bucket, Key="inbox/v.jsonl")
        assert await got["Body"].read() == b"{}\n"
        listed = await client.list_objects_v2(Bucket=s3_server.bucket)
        url = await client.generate_presigned_url(
            "get_object", Params={"Bucket": s3_server.bucket, "Key": "inbox/v.jsonl"}
        )
    assert [item["Key"] for item in listed["Contents"]] == ["inbox/v.jsonl"]
    assert url.startswith(f"http://{s3_server.bucket}.localhost:")
