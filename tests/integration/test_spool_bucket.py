"""The spool on a bucket, and Model Studio reading the parts from OSS instead of an upload.

Against a real S3-compatible store on loopback (OpenStack Swift, the `s3_server` fixture),
which plays an OSS bucket in cn-beijing: parts are written to `SPOOL/JOB/PART-FILE` before
their batches are created with `oss:` ids and never uploaded; they stay there until their
job is published, then the job's prefix goes; the pre-flight says what the bucket lacks
(Swift always answers an empty tag set). The emulator reads `oss:` inputs only once it has
an object store (`object_store_url`); without one it refuses them with a 400, which fails
that part and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batchd.config import Settings, StorageSettings
from batchd.emulator import Emulator
from batchd.models import Job, Part, PartState
from batchd.objstore import open_store
from batchd.objstore.bucket import Bucket, ObjectStore
from batchd.objstore.location import BucketUrl
from batchd.testing import (
    StartEmulator,
    cli,
    daemon_settings,
    drop,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

pytestmark = pytest.mark.timeout(120)

BEIJING = "cn-beijing"


@pytest.fixture
def store_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The loopback store's credentials in this process's environment, which the
    daemon under test reads them from."""
    for name in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
async def objects(store_env: Any) -> AsyncIterator[ObjectStore]:
    settings = StorageSettings(endpoint_url=store_env.endpoint_url, region=store_env.region)
    async with open_store(settings, store_env.env()) as opened:
        yield opened


def spool_bucket(objects: ObjectStore, s3_server: Any) -> Bucket:
    return objects.bucket(BucketUrl("s3", s3_server.bucket, "spool/"), area="spool")


def bucket_settings(
    root: Path,
    emulator: Emulator,
    s3_server: Any,
    *,
    spool: str | None = None,
    **overrides: Any,
) -> Settings:
    """Daemon settings with the spool on the test's bucket and parts read from it."""
    values: dict[str, Any] = {
        "paths": {"spool": spool or f"s3://{s3_server.bucket}/spool/"},
        "storage": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region},
        "jobs": {"input_via": "oss"},
        "limits": {"max_requests_per_file": 3},
    }
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return daemon_settings(root, emulator, **values)


async def keys(bucket: Bucket, folder: BucketUrl | None = None) -> list[str]:
    return [info.key async for info in bucket.list(folder or bucket.url, recursive=True)]


async def parts_in(daemon: Any, job_id: str, state: PartState, count: int) -> list[Part]:
    parts: list[Part] = []

    async def done() -> bool:
        nonlocal parts
        parts = await daemon.store.parts_of(job_id)
        return len(parts) == count and all(p.state == state for p in parts)

    await wait_for(done, 30, lambda: f"parts {[(p.seq, p.state) for p in parts]}", step_s=0.05)
    return parts


async def one_job(daemon: Any) -> Job:
    jobs: list[Job] = []

    async def done() -> bool:
        nonlocal jobs
        jobs = await daemon.store.jobs()
        return len(jobs) == 1

    await wait_for(done, 30, lambda: f"jobs {jobs}", step_s=0.05)
    return jobs[0]


async def test_parts_wait_in_the_spool_bucket_until_their_job_is_published(
    tmp_path: Path, start_emulator: StartEmulator, store_env: Any, objects: ObjectStore
) -> None:
    emulator = await start_emulator()
    # A budget of nothing holds the parts before their creates, written and recorded.
    settings = bucket_settings(tmp_path, emulator, store_env, budget={"daily": 0.0})
    bucket = spool_bucket(objects, store_env)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "big.jsonl", requests(5))
        job = await one_job(daemon)
        parts = await parts_in(daemon, job.id, PartState.UPLOADED, 2)
        # Each part is an object at SPOOL/JOB/PART-FILE, named by its oss: id.
        expected = {f"spool/{job.id}/{Path(p.path).name}": p for p in parts}
        assert set(await keys(bucket)) == set(expected)
        for key, part in expected.items():
            assert part.remote_file_id == f"oss:{BEIJING}:{store_env.bucket}/{key}"
            assert await bucket.get_bytes(key, max_bytes=1 << 20) == Path(part.path).read_bytes()
        stats = await emulator.stats()
        assert stats["calls"]["upload"]["served"] == 0
        assert stats["files_stored"]["count"] == 0
        # What status says: the bucket is the way; the tag is missing (Swift keeps none),
        # and with input_via = "oss" that is a warning, not a stop.
        status = await daemon.ops.status()
        oss = status.oss_inputs
        assert oss is not None and oss.via == "oss" and oss.bucket_region == BEIJING
        assert oss.checked_at is not None
        assert any("bailian-datahub-access: read" in m and "ossutil" in m for m in oss.missing)
        assert any("AliyunServiceRoleForSFMDataHubOSSImport" in n for n in oss.notes)
        # Published (cancelled here): the job's prefix leaves the bucket, and no oss: id
        # is ever sent to the files API for deletion.
        assert await daemon.ops.cancel(job.id) is not None
        await wait_published(settings.paths.folder("outbox"), 1, emulator)
        assert await keys(bucket) == []
        assert await daemon.store.garbage() == []


async def test_a_refused_oss_create_fails_that_part_and_the_daemon_goes_on(
    tmp_path: Path, start_emulator: StartEmulator, store_env: Any, objects: ObjectStore
) -> None:
    # An emulator with no object store refuses oss: inputs with a 400, as a service that
    # cannot read them would.
    emulator = await start_emulator()
    settings = bucket_settings(tmp_path, emulator, store_env)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "small.jsonl", requests(2))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        (part,) = await daemon.store.parts_of((await one_job(daemon)).id)
        assert part.state == PartState.FAILED and "OSS" in (part.error or "")
        assert summary(folder)["request_counts"]["completed"] == 0
        stats = await emulator.stats()
        assert stats["calls"]["create"]["served"] == 1
        assert stats["calls"]["upload"]["served"] == 0
        assert await keys(spool_bucket(objects, store_env)) == []
        assert daemon._stages_alive()


async def test_auto_uploads_when_the_preflight_finds_the_tag_missing(
    tmp_path: Path,
    start_emulator: StartEmulator,
    store_env: Any,
    objects: ObjectStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An oss:// spool (the loopback store playing OSS, path-style): auto would read the
    # parts from it, but the bucket lacks the tag the service's role needs.
    emulator = await start_emulator(time_scale=3000)
    settings = bucket_settings(
        tmp_path,
        emulator,
        store_env,
        spool=f"oss://{store_env.bucket}/spool/",
        jobs={"input_via": "auto"},
        storage={"addressing_style": "path"},
    )
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "small.jsonl", requests(2))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        assert summary(folder)["request_counts"]["completed"] == 2
        stats = await emulator.stats()
        assert stats["calls"]["upload"]["served"] == 1
        assert await keys(spool_bucket(objects, store_env)) == []
        oss = (await daemon.ops.status()).oss_inputs
        assert oss is not None and oss.setting == "auto" and oss.via == "upload"
        assert oss.why_upload is not None and "bailian-datahub-access: read" in oss.why_upload
        assert oss.missing and oss.checked_at is not None
        # `batchd status` says which way parts go, why, and how to fix it.
        code, out, _ = await cli(capsys, "status", "--socket", str(settings.socket_path))
        text = " ".join(out.split())
        assert code == 0 and "parts are uploaded (jobs.input_via = auto)" in text
        assert f"ossutil bucket-tagging --method put oss://{store_env.bucket}" in text
        assert "AliyunServiceRoleForSFMDataHubOSSImport" in text


async def test_parts_read_from_the_spool_bucket_are_never_uploaded(
    tmp_path: Path, start_emulator: StartEmulator, store_env: Any, objects: ObjectStore
) -> None:
    emulator = await start_emulator(
        time_scale=3000, object_store_url=store_env.endpoint_url, oss_require_tag=False
    )
    settings = bucket_settings(tmp_path, emulator, store_env)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "big.jsonl", requests(5))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        job = await one_job(daemon)
        parts = await daemon.store.parts_of(job.id)
        assert len(parts) == 2
        assert all(p.remote_file_id and p.remote_file_id.startswith("oss:") for p in parts)
        # The service's batch names its input as sent: no note that it was not understood.
        assert not any("input_file_id" in (p.error or "") for p in parts)
        assert summary(folder)["request_counts"]["completed"] == 5
        stats = await emulator.stats()
        assert stats["calls"]["upload"]["served"] == 0
        assert stats["inputs"]["oss"] == 2
        assert sorted(stats["batches_created_per_input_file"].values()) == [1, 1]
        assert await keys(spool_bucket(objects, store_env)) == []


async def test_a_store_fault_while_writing_a_part_pauses_it_uncounted(
    tmp_path: Path, start_emulator: StartEmulator, s3_faulty: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store answers every PUT 503 for a while (the fault proxy): the part waits, never
    # counted as its failure, the fault shows under "spool"; once the store answers the
    # part is written and created once, never uploaded.
    for name, value in s3_faulty.env().items():
        monkeypatch.setenv(name, value)
    s3_faulty.set_faults(error_rate=1.0, error_status=503, methods=["PUT"])
    emulator = await start_emulator()
    settings = bucket_settings(tmp_path, emulator, s3_faulty, storage={"max_attempts": 1})
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "small.jsonl", requests(2))
        job = await one_job(daemon)
        seen: list[Any] = []

        async def faulted() -> bool:
            seen[:] = (await daemon.ops.status()).local_faults
            return any(f.key == "spool" for f in seen)

        await wait_for(faulted, 30, lambda: f"local faults {seen}", step_s=0.02)
        (part,) = await daemon.store.parts_of(job.id)
        assert part.state == PartState.PENDING and part.attempts == 0
        assert part.error is not None and "waits for this machine" in part.error
        assert (await emulator.stats())["calls"]["create"]["served"] == 0
        s3_faulty.set_faults(error_rate=0.0)
        await wait_published(settings.paths.folder("outbox"), 1, emulator)
        stats = await emulator.stats()
        assert stats["calls"]["create"]["served"] == 1
        assert stats["calls"]["upload"]["served"] == 0
        assert not any(f.key == "spool" for f in (await daemon.ops.status()).local_faults)
    assert s3_faulty.stats()["faults"]


async def test_auto_reads_from_a_bucket_tagged_in_the_service_region(
    tmp_path: Path, start_emulator: StartEmulator, s3_faulty: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy serves the tag Swift cannot keep: auto takes the bucket, nothing missing.
    for name, value in s3_faulty.env().items():
        monkeypatch.setenv(name, value)
    s3_faulty.set_faults(tags={"bailian-datahub-access": "read"}, location=BEIJING)
    emulator = await start_emulator()
    settings = bucket_settings(
        tmp_path,
        emulator,
        s3_faulty,
        spool=f"oss://{s3_faulty.bucket}/spool/",
        jobs={"input_via": "auto"},
        storage={"addressing_style": "path"},
        budget={"daily": 0.0},  # held before the create, written and recorded
    )
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "small.jsonl", requests(2))
        job = await one_job(daemon)
        (part,) = await parts_in(daemon, job.id, PartState.UPLOADED, 1)
        assert part.remote_file_id == (
            f"oss:{BEIJING}:{s3_faulty.bucket}/spool/{job.id}/{Path(part.path).name}"
        )
        oss = (await daemon.ops.status()).oss_inputs
        assert oss is not None and oss.via == "oss" and oss.why_upload is None
        assert oss.missing == [] and oss.bucket_region == BEIJING
        assert (await emulator.stats())["calls"]["upload"]["served"] == 0


async def test_a_bucket_in_another_region_is_named_with_both_regions(
    tmp_path: Path, start_emulator: StartEmulator, s3_faulty: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_faulty.env().items():
        monkeypatch.setenv(name, value)
    s3_faulty.set_faults(tags={"bailian-datahub-access": "read"}, location="oss-ap-southeast-1")
    emulator = await start_emulator(time_scale=3000)
    settings = bucket_settings(
        tmp_path,
        emulator,
        s3_faulty,
        spool=f"oss://{s3_faulty.bucket}/spool/",
        jobs={"input_via": "auto"},
        storage={"addressing_style": "path"},
    )
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "small.jsonl", requests(2))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        assert summary(folder)["request_counts"]["completed"] == 2
        oss = (await daemon.ops.status()).oss_inputs
        assert oss is not None and oss.via == "upload" and oss.bucket_region == "ap-southeast-1"
        assert oss.why_upload is not None
        assert f"is in ap-southeast-1, the service reads OSS inputs only from {BEIJING}" in (
            oss.why_upload
        )
        (missing,) = oss.missing
        assert "paths.spool" in missing
        assert (await emulator.stats())["calls"]["upload"]["served"] == 1


async def test_follow_up_parts_are_read_from_the_spool_bucket_too(
    tmp_path: Path, start_emulator: StartEmulator, store_env: Any, objects: ObjectStore
) -> None:
    emulator = await start_emulator(
        time_scale=3000,
        request_failure_rate=0.5,
        object_store_url=store_env.endpoint_url,
        oss_require_tag=False,
    )
    settings = bucket_settings(
        tmp_path, emulator, store_env, jobs={"resubmit_failed": 2}, limits={}
    )
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "again.jsonl", requests(30))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        parts = await daemon.store.parts_of((await one_job(daemon)).id)
    follow_ups = [p for p in parts if p.round >= 1]
    assert follow_ups, "the seed failed nothing retryable"
    for part in follow_ups:
        assert part.remote_file_id is not None
        assert part.remote_file_id.endswith(f"/{Path(part.path).name}")
        assert part.remote_file_id.startswith(f"oss:{BEIJING}:{store_env.bucket}/spool/")
    stats = await emulator.stats()
    assert stats["calls"]["upload"]["served"] == 0
    assert stats["inputs"]["oss"] == len(parts)
    assert summary(folder)["request_counts"]["total"] == 30
    assert await keys(spool_bucket(objects, store_env)) == []


async def test_a_lost_create_of_an_oss_part_is_found_by_its_oss_name(
    tmp_path: Path, start_emulator: StartEmulator, store_env: Any
) -> None:
    # Every create's answer is lost: each part is looked for in the batch list, found by
    # its oss: name, and followed; none is created twice.
    emulator = await start_emulator(
        time_scale=3000,
        faults={"lost_create_response_rate": 1.0},
        object_store_url=store_env.endpoint_url,
        oss_require_tag=False,
    )
    settings = bucket_settings(tmp_path, emulator, store_env)
    async with running_daemon(settings) as daemon:
        drop(settings.paths.folder("inbox"), "big.jsonl", requests(5))
        (folder,) = await wait_published(settings.paths.folder("outbox"), 1, emulator)
        parts = await daemon.store.parts_of((await one_job(daemon)).id)
    stats = await emulator.stats()
    assert stats["faults"]["lost_create_response"] == 2
    assert sorted(stats["batches_created_per_input_file"]) == sorted(
        p.remote_file_id for p in parts
    )
    assert sorted(stats["batches_created_per_input_file"].values()) == [1, 1]
    assert summary(folder)["request_counts"]["completed"] == 5


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({}, "paths.spool"),
        (
            {"BATCHD_PROVIDER": "dashscope-intl", "BATCHD_PATHS__SPOOL": "oss://my-bucket/s/"},
            "provider 'dashscope-intl'",
        ),
    ],
)
def test_batchd_run_with_oss_where_it_cannot_work_exits_2(
    tmp_path: Path, extra: dict[str, str], named: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "DASHSCOPE_"))}
    env |= {
        "BATCHD_API_KEY": "sk-test",
        "BATCHD_PATHS__ROOT": str(tmp_path / "r"),
        "BATCHD_JOBS__INPUT_VIA": "oss",
        "BATCHD_LOG__FORMAT": "json",
        **extra,
    }
    result = subprocess.run(
        [sys.executable, "-m", "batchd", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "jobs.input_via" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
