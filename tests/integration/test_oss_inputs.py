"""The emulator reads batch inputs from an object store as Model Studio reads OSS inputs.

Against a real S3-compatible server on loopback (OpenStack Swift, the `s3_server` fixture):
`oss:{region}:{bucket}/{key}` names and presigned URLs are read, the batch runs on what was
read and keeps its input_file_id as given; an object that cannot be read fails the batch at
validation with the service's reason; what the id alone refuses is a 400 at create. Swift
keeps no bucket tags, so the tag the service needs is checked both ways: refused by Swift,
accepted from a small fake store that answers a tag set (which also stalls a read)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiobotocore.session import get_session
from aiohttp import web
from botocore.config import Config

from batchd.emulator import Emulator
from batchd.logs import configure
from batchd.testing import API_KEY, ENDPOINT_CHAT, Api, StartEmulator, events, requests

CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)
SERVICE_REGION = "cn-beijing"


@pytest.fixture
def store_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The store's credentials in the environment, as AWS_* (no OSS_* set)."""
    for name in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
async def s3(store_env: Any) -> AsyncIterator[Any]:
    """A client of the test's bucket, to put the inputs and presign their URLs."""
    async with get_session().create_client(
        "s3", endpoint_url=store_env.endpoint_url, region_name=store_env.region, config=CONFIG
    ) as client:
        yield client


def oss_id(s3_server: Any, key: str, region: str = SERVICE_REGION) -> str:
    return f"oss:{region}:{s3_server.bucket}/{key}"


async def reading_emulator(
    start_emulator: StartEmulator, s3_server: Any, **overrides: Any
) -> Emulator:
    """An emulator reading from the test's store; Swift keeps no tags: the check is off."""
    values: dict[str, Any] = {
        "object_store_url": s3_server.endpoint_url,
        "object_store_region": s3_server.region,
        "oss_require_tag": False,
    }
    values.update(overrides)
    return await start_emulator(**values)


async def failed_with(api: Api, emulator: Emulator, batch_id: str) -> list[Any]:
    """The errors of a batch that fails validation (after `validating` first)."""
    assert (await api.batch(batch_id))["status"] == "validating"
    emulator.advance(60)
    failed = await api.batch(batch_id)
    assert failed["status"] == "failed", failed
    assert failed["output_file_id"] is None and failed["error_file_id"] is None
    return [(e["code"], e["param"]) for e in failed["errors"]["data"]]


async def completed(api: Api, emulator: Emulator, batch_id: str) -> dict[str, Any]:
    emulator.advance(3600)
    done = await api.batch(batch_id)
    assert done["status"] == "completed", done
    return done


async def test_an_oss_name_is_read_and_the_batch_completes_with_its_results(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    emulator = await reading_emulator(start_emulator, store_env)
    api = make_api(emulator)
    content = requests(3)
    await s3.put_object(Bucket=store_env.bucket, Key="batch/2025/test.jsonl", Body=content)
    input_id = oss_id(store_env, "batch/2025/test.jsonl")

    batch = await api.create_ok(input_id, ENDPOINT_CHAT)
    assert batch["input_file_id"] == input_id and batch["status"] == "validating"
    done = await completed(api, emulator, batch["id"])

    assert done["input_file_id"] == input_id
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    lines = await api.lines(done["output_file_id"])
    assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2"]
    assert all(line["response"]["status_code"] == 200 for line in lines)
    # The input is not one of the account's files: only the output is stored.
    status, files, _ = await api.call("GET", "/files")
    assert status == 200
    assert [f["id"] for f in files["data"]] == [done["output_file_id"]]
    stats = await api.stats()
    assert stats["inputs"]["oss"] == 1
    assert stats["inputs"]["bytes_read"]["oss"] == len(content)


async def test_a_missing_object_fails_the_batch_at_validation(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    emulator = await reading_emulator(start_emulator, store_env)
    api = make_api(emulator)
    missing = await api.create_ok(oss_id(store_env, "batch/nothing-here.jsonl"), ENDPOINT_CHAT)
    assert await failed_with(api, emulator, missing["id"]) == [("file_not_found", "input_file_id")]
    no_bucket = await api.create_ok(
        f"oss:{SERVICE_REGION}:no-such-bucket-x1/a.jsonl", ENDPOINT_CHAT
    )
    assert await failed_with(api, emulator, no_bucket["id"]) == [
        ("file_not_found", "input_file_id")
    ]
    assert (await api.stats())["inputs"]["reads_failed"]["oss"] == 2


async def test_a_bucket_in_another_region_is_refused_at_create(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    emulator = await reading_emulator(start_emulator, store_env)
    api = make_api(emulator)
    await s3.put_object(Bucket=store_env.bucket, Key="in.jsonl", Body=requests(1))
    status, body = await api.create(oss_id(store_env, "in.jsonl", "cn-shanghai"), ENDPOINT_CHAT)
    assert status == 400
    assert body["error"]["code"] == "InvalidParameter"
    assert body["error"]["param"] == "input_file_id"
    assert "cn-shanghai" in body["error"]["message"] and SERVICE_REGION in body["error"]["message"]
    # The same object, named in the endpoint's region, is read.
    batch = await api.create_ok(oss_id(store_env, "in.jsonl"), ENDPOINT_CHAT)
    await completed(api, emulator, batch["id"])


@pytest.mark.parametrize(
    "bad",
    [
        "oss:cn-beijing:",
        "oss:cn-beijing:bucket-only",
        "oss:cn-beijing:bucket/",
        "oss::bucket/key.jsonl",
        "oss:cn-beijing:Bad_Bucket/key.jsonl",
        "https://example.com/bucket/key.jsonl",
    ],
)
async def test_a_malformed_id_is_refused_at_create(
    bad: str, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    api = make_api(await reading_emulator(start_emulator, store_env))
    status, body = await api.create(bad, ENDPOINT_CHAT)
    assert status == 400, body
    assert (body["error"]["code"], body["error"]["param"]) == ("InvalidParameter", "input_file_id")


async def test_without_an_object_store_oss_inputs_are_refused(api: Api) -> None:
    for input_id in ("oss:cn-beijing:b/k.jsonl", "https://b.oss-cn-beijing.aliyuncs.com/k"):
        status, body = await api.create(input_id, ENDPOINT_CHAT)
        assert status == 400
        assert "OSS input files are not supported" in body["error"]["message"]


async def test_unreadable_with_the_wrong_key_and_oss_keys_come_before_aws_keys(
    s3: Any,
    store_env: Any,
    start_emulator: StartEmulator,
    make_api: Callable[[Emulator], Api],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AWS_* in the environment hold the right key; OSS_*, read first, a wrong one."""
    await s3.put_object(Bucket=store_env.bucket, Key="in.jsonl", Body=requests(1))
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", store_env.access_key_id)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "not-the-secret")
    emulator = await reading_emulator(start_emulator, store_env)
    api = make_api(emulator)
    batch = await api.create_ok(oss_id(store_env, "in.jsonl"), ENDPOINT_CHAT)
    assert await failed_with(api, emulator, batch["id"]) == [
        ("file_access_denied", "input_file_id")
    ]


async def test_the_bucket_tag_is_required_unless_switched_off(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    """Swift answers every bucket's tag set empty: untagged, as the service would see it."""
    await s3.put_object(Bucket=store_env.bucket, Key="in.jsonl", Body=requests(2))
    input_id = oss_id(store_env, "in.jsonl")

    strict = await reading_emulator(start_emulator, store_env, oss_require_tag=True)
    api = make_api(strict)
    batch = await api.create_ok(input_id, ENDPOINT_CHAT)
    assert await failed_with(api, strict, batch["id"]) == [
        ("bucket_not_authorized", "input_file_id")
    ]
    failed = await api.batch(batch["id"])
    assert "bailian-datahub-access: read" in failed["errors"]["data"][0]["message"]

    relaxed = await reading_emulator(start_emulator, store_env, oss_require_tag=False)
    api = make_api(relaxed)
    batch = await api.create_ok(input_id, ENDPOINT_CHAT)
    await completed(api, relaxed, batch["id"])


async def test_a_presigned_url_is_read_without_the_tag_and_keeps_its_query_out_of_logs(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    log = io.StringIO()
    configure("debug", "json", stream=log)
    emulator = await reading_emulator(start_emulator, store_env, oss_require_tag=True)
    api = make_api(emulator)
    await s3.put_object(Bucket=store_env.bucket, Key="signed/in.jsonl", Body=requests(2))
    url = await s3.generate_presigned_url(
        "get_object", Params={"Bucket": store_env.bucket, "Key": "signed/in.jsonl"}, ExpiresIn=300
    )
    query = url.split("?", 1)[1]
    assert "X-Amz-Signature=" in query

    batch = await api.create_ok(url, ENDPOINT_CHAT)
    assert batch["input_file_id"] == url  # kept exactly as given
    done = await completed(api, emulator, batch["id"])
    assert done["request_counts"]["completed"] == 2

    # A URL whose signature does not match (another key) is refused by the store.
    forged = url.replace("signed/in.jsonl", "signed/other.jsonl")
    refused = await api.create_ok(forged, ENDPOINT_CHAT)
    assert await failed_with(api, emulator, refused["id"]) == [
        ("file_access_denied", "input_file_id")
    ]
    message = (await api.batch(refused["id"]))["errors"]["data"][0]["message"]
    assert query not in message and "X-Amz-Signature" not in message

    stats = await api.stats()
    assert stats["inputs"]["presigned"] == 2
    assert query not in orjson.dumps(stats).decode()
    written = log.getvalue()
    assert events(log, "input_read") and events(log, "input_unreadable")
    assert query not in written
    assert "X-Amz-Signature" not in written and "X-Amz-Credential" not in written


async def test_stats_count_inputs_by_kind_and_reset(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    emulator = await reading_emulator(start_emulator, store_env)
    api = make_api(emulator)
    content = requests(2)
    await s3.put_object(Bucket=store_env.bucket, Key="in.jsonl", Body=content)
    url = await s3.generate_presigned_url(
        "get_object", Params={"Bucket": store_env.bucket, "Key": "in.jsonl"}
    )
    await api.create_ok(await api.upload_ok(content), ENDPOINT_CHAT)
    for _ in range(2):
        await api.create_ok(oss_id(store_env, "in.jsonl"), ENDPOINT_CHAT)
    await api.create_ok(url, ENDPOINT_CHAT)

    stats = await api.stats()
    assert stats["inputs"] == {
        "uploaded": 1,
        "oss": 2,
        "presigned": 1,
        "bytes_read": {"oss": 2 * len(content), "presigned": len(content)},
        "reads_failed": {"oss": 0, "presigned": 0},
    }
    assert stats["batches_created"] == 4
    assert stats["batches_created_per_input_file"][oss_id(store_env, "in.jsonl")] == 2
    assert stats["files_stored"]["count"] == 1  # the upload; OSS inputs are not stored

    status, reset, _ = await api.call("POST", "/_emulator/stats/reset", key=None)
    assert status == 200
    assert reset["inputs"]["oss"] == reset["inputs"]["uploaded"] == 0
    assert reset["inputs"]["bytes_read"] == {"oss": 0, "presigned": 0}


async def test_the_list_filter_finds_a_batch_by_its_oss_name(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    """batchd finds a batch whose create answer was lost by listing its input_file_id."""
    emulator = await reading_emulator(start_emulator, store_env)
    api = make_api(emulator)
    for key in ("a.jsonl", "b.jsonl"):
        await s3.put_object(Bucket=store_env.bucket, Key=key, Body=requests(1))
    emulator.set_faults(lost_create_response_rate=1.0)
    with pytest.raises(aiohttp.ClientError):  # the answer is lost: the connection drops
        await api.create(oss_id(store_env, "a.jsonl"), ENDPOINT_CHAT)
    emulator.set_faults(lost_create_response_rate=0.0)
    other = await api.create_ok(oss_id(store_env, "b.jsonl"), ENDPOINT_CHAT)

    wanted = oss_id(store_env, "a.jsonl")
    status, page, _ = await api.call("GET", "/batches", params={"input_file_ids": wanted})
    assert status == 200
    assert [b["input_file_id"] for b in page["data"]] == [wanted]
    both = f"{wanted},{other['input_file_id']}"
    status, page, _ = await api.call("GET", "/batches", params={"input_file_ids": both})
    assert len(page["data"]) == 2


async def test_an_input_over_the_size_cap_fails_without_being_read_whole(
    s3: Any, store_env: Any, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    emulator = await reading_emulator(start_emulator, store_env, limits={"max_file_bytes": 4096})
    api = make_api(emulator)
    big = requests(200)
    assert len(big) > 4096
    await s3.put_object(Bucket=store_env.bucket, Key="big.jsonl", Body=big)
    url = await s3.generate_presigned_url(
        "get_object", Params={"Bucket": store_env.bucket, "Key": "big.jsonl"}
    )
    for input_id in (oss_id(store_env, "big.jsonl"), url):
        batch = await api.create_ok(input_id, ENDPOINT_CHAT)
        assert await failed_with(api, emulator, batch["id"]) == [
            ("file_too_large", "input_file_id")
        ]
    assert (await api.stats())["inputs"]["bytes_read"] == {"oss": 0, "presigned": 0}


async def test_the_openai_sdk_creates_a_batch_from_an_oss_name(
    s3: Any, store_env: Any, start_emulator: StartEmulator
) -> None:
    emulator = await reading_emulator(start_emulator, store_env)
    await s3.put_object(Bucket=store_env.bucket, Key="sdk.jsonl", Body=requests(1))
    input_id = oss_id(store_env, "sdk.jsonl")
    async with openai.AsyncOpenAI(
        api_key=API_KEY, base_url=emulator.base_url, max_retries=0
    ) as client:
        batch = await client.batches.create(
            input_file_id=input_id, endpoint=ENDPOINT_CHAT, completion_window="24h"
        )
        emulator.advance(3600)
        done = await client.batches.retrieve(batch.id)
    assert done.input_file_id == input_id
    assert done.status == "completed"


async def test_batchd_emulator_reads_from_the_store_its_flags_name(s3: Any, store_env: Any) -> None:
    """`batchd emulator --object-store-url URL --no-oss-require-tag`, keys and region from
    the AWS_* environment (as s3_server gives them)."""
    await s3.put_object(Bucket=store_env.bucket, Key="cli.jsonl", Body=requests(2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "emulator",
        "--port",
        "0",
        "--api-key",
        API_KEY,
        "--object-store-url",
        store_env.endpoint_url,
        "--no-oss-require-tag",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), 20)
        root = orjson.loads(line)["event"].removeprefix("emulator listening on ")
        headers = {"Authorization": f"Bearer {API_KEY}"}
        create = {
            "input_file_id": oss_id(store_env, "cli.jsonl"),
            "endpoint": ENDPOINT_CHAT,
            "completion_window": "24h",
        }
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{root}/v1/batches", json=create) as response:
                assert response.status == 200, await response.text()
                batch = await response.json()
            async with http.post(f"{root}/_emulator/clock/advance", json={"seconds": 3600}):
                pass
            async with http.get(f"{root}/v1/batches/{batch['id']}") as response:
                done = await response.json()
        assert done["status"] == "completed", done
        assert done["request_counts"]["completed"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0


# -- a fake store: one that keeps bucket tags, and one that stalls -------------------------

TAGGED = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<Tagging xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><TagSet>'
    b"<Tag><Key>bailian-datahub-access</Key><Value>read</Value></Tag>"
    b"</TagSet></Tagging>"
)


@pytest.fixture
async def fake_store(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """An S3-ish server on loopback: bucket `tagged` has the tag and its object reads;
    every object of bucket `slow` sends a few bytes, then nothing."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    for name in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)
    release = asyncio.Event()

    async def bucket(request: web.Request) -> web.StreamResponse:
        if "tagging" in request.query and request.match_info["bucket"] == "tagged":
            return web.Response(body=TAGGED, content_type="application/xml")
        return web.Response(status=404)

    async def obj(request: web.Request) -> web.StreamResponse:
        if request.match_info["bucket"] == "tagged":
            return web.Response(body=requests(2), content_type="application/octet-stream")
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b'{"custom_id"')
        await release.wait()
        return response

    app = web.Application()
    app.router.add_get("/{bucket}", bucket)
    app.router.add_get("/{bucket}/{key:.+}", obj)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        release.set()
        await runner.cleanup()


async def test_a_tagged_bucket_is_read_with_the_tag_check_on(
    fake_store: str, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    emulator = await start_emulator(object_store_url=fake_store, object_store_region="us-east-1")
    assert emulator.settings.oss_require_tag
    api = make_api(emulator)
    batch = await api.create_ok(f"oss:{SERVICE_REGION}:tagged/in.jsonl", ENDPOINT_CHAT)
    done = await completed(api, emulator, batch["id"])
    assert done["request_counts"]["completed"] == 2


async def test_a_stalled_read_is_cut_and_fails_the_batch(
    fake_store: str, start_emulator: StartEmulator, make_api: Callable[[Emulator], Api]
) -> None:
    emulator = await start_emulator(
        object_store_url=fake_store,
        object_store_region="us-east-1",
        oss_require_tag=False,
        oss_read_timeout_s=0.5,
    )
    api = make_api(emulator)
    for input_id in (
        f"oss:{SERVICE_REGION}:slow/in.jsonl",
        f"{fake_store}/slow/in.jsonl?X-Amz-Signature=abc",
    ):
        started = asyncio.get_running_loop().time()
        batch = await api.create_ok(input_id, ENDPOINT_CHAT)
        assert asyncio.get_running_loop().time() - started < 5
        assert await failed_with(api, emulator, batch["id"]) == [
            ("file_read_timeout", "input_file_id")
        ]
    # The emulator still answers.
    assert (await api.stats())["inputs"]["reads_failed"] == {"oss": 1, "presigned": 1}
