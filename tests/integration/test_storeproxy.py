"""The store fault proxy (batchd.emulator.storeproxy) in front of the loopback store: it
passes signed requests through untouched, and each fault it injects reaches batchd's
bucket calls as the named fault that pauses work (batchd.faults.StorageFault)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from batchd.config import StorageSettings
from batchd.faults import StorageFault
from batchd.objstore import open_store
from batchd.objstore.bucket import Bucket
from batchd.objstore.location import BucketUrl


def _settings(server: Any, **overrides: Any) -> StorageSettings:
    return StorageSettings(endpoint_url=server.endpoint_url, region=server.region, **overrides)


@pytest.fixture
async def bucket(s3_faulty: Any) -> AsyncIterator[Bucket]:
    settings = _settings(s3_faulty, max_attempts=1, read_timeout_s=1.0)
    async with open_store(settings, s3_faulty.env()) as store:
        yield store.bucket(BucketUrl("s3", s3_faulty.bucket, "inbox/"), area="inbox")


async def test_signed_requests_pass_through_untouched(bucket: Bucket, s3_faulty: Any) -> None:
    body = b'{"custom_id": "a"}\n' * 10_000
    etag = await bucket.put_bytes("inbox/a.jsonl", body)
    assert await bucket.get_bytes("inbox/a.jsonl", max_bytes=len(body), if_match=etag) == body
    assert [i.key async for i in bucket.list()] == ["inbox/a.jsonl"]
    assert s3_faulty.stats()["requests"] == {"PUT": 1, "GET": 2}


async def test_errors_are_store_faults_and_retries_get_through(
    bucket: Bucket, s3_faulty: Any
) -> None:
    s3_faulty.set_faults(error_rate=1.0, error_status=503)
    with pytest.raises(StorageFault, match="answered 503") as caught:
        await bucket.head("inbox/a.jsonl")  # a HEAD's answer has no body: no error code
    assert caught.value.area == "inbox"
    with pytest.raises(StorageFault, match="answered 503 SlowDown"):
        await bucket.get_bytes("inbox/a.jsonl", max_bytes=10)
    s3_faulty.set_faults(error_rate=1.0, error_status=500, methods=["PUT"])
    assert await bucket.head("inbox/a.jsonl") is None  # a HEAD is not touched
    with pytest.raises(StorageFault, match="500 InternalError"):
        await bucket.put_bytes("inbox/a.jsonl", b"x\n")
    # With botocore's retries, a store failing half the time still takes the write.
    s3_faulty.set_faults(error_rate=0.5, seed=7)
    async with open_store(_settings(s3_faulty, max_attempts=8), s3_faulty.env()) as store:
        patient = store.bucket(bucket.url)
        for n in range(6):
            await patient.put_bytes(f"inbox/{n}.jsonl", b"x\n")
    assert s3_faulty.stats()["injected"]["error_500"] >= 3


async def test_slow_and_cut_reads_are_named_and_leave_no_file(
    bucket: Bucket, s3_faulty: Any, tmp_path: Any
) -> None:
    await bucket.put_bytes("inbox/big.jsonl", b"y" * 300_000)
    s3_faulty.set_faults(slow_read_s=1.5, methods=["GET"])
    with pytest.raises(StorageFault):
        await bucket.get_file("inbox/big.jsonl", tmp_path / "big", max_bytes=1 << 20)
    s3_faulty.set_faults(slow_read_s=0, cut_rate=1.0)
    with pytest.raises(StorageFault, match="cut a read"):
        await bucket.get_file("inbox/big.jsonl", tmp_path / "big", max_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []
    s3_faulty.set_faults(cut_rate=0.0)
    assert await bucket.get_file("inbox/big.jsonl", tmp_path / "big", max_bytes=1 << 20)


async def test_the_proxy_can_serve_bucket_tags_and_location(bucket: Bucket, s3_faulty: Any) -> None:
    assert await bucket.tags() == {}
    s3_faulty.set_faults(tags={"bailian-datahub-access": "read"}, location="cn-beijing")
    assert await bucket.tags() == {"bailian-datahub-access": "read"}
    assert await bucket.location() == "cn-beijing"


async def test_faults_are_set_over_http_and_bad_ones_refused(s3_faulty: Any) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{s3_faulty.endpoint_url}/_proxy/faults"
        async with http.post(url, json={"latency_s": 0.01}) as ok:
            assert ok.status == 200 and (await ok.json())["faults"]["latency_s"] == 0.01
        for bad in ({"error_rate": 2}, {"nope": 1}, {"error_status": 404}):
            async with http.post(url, json=bad) as refused:
                assert refused.status == 400
