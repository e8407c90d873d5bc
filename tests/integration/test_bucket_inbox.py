"""The inbox on a bucket (batchd.pipeline.bucket_intake): the drop-folder promises kept
for objects (each input in exactly one job, sidecars with it, ignored names left alone,
a rejected input published with its report), and the claim's steps crash-safe and
race-safe (an object deleted or overwritten while it is claimed).

The real daemon against the emulator and a real S3-compatible store (Swift) on loopback.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd import failpoints
from batchd.client import Client
from batchd.config import StorageSettings
from batchd.emulator import Emulator
from batchd.faults import StorageFault
from batchd.objstore import open_store
from batchd.objstore.bucket import Bucket, ObjectStore
from batchd.objstore.location import BucketUrl
from batchd.testing import (
    StartEmulator,
    cli,
    daemon_settings,
    idle,
    read_jsonl,
    requests,
    running_daemon,
    summary,
    wait_for,
    wait_published,
)

pytestmark = pytest.mark.timeout(120)

NO_CAPS: dict[str, Any] = {
    "upload_per_second": 100_000,
    "file_calls_per_second": 100_000,
    "create_per_minute": 1_000_000,
    "retrieve_per_minute": 1_000_000,
    "list_per_minute": 1_000_000,
    "max_stored_files": 1_000_000,
}


@pytest.fixture
async def store(s3_server: Any) -> AsyncIterator[ObjectStore]:
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    async with open_store(settings, s3_server.env()) as opened:
        yield opened


@pytest.fixture
def inbox(store: ObjectStore, s3_server: Any) -> Bucket:
    """The bucket inbox as a producer sees it."""
    return store.bucket(BucketUrl("s3", s3_server.bucket, "inbox/"), area="inbox")


def bucket_paths(root: Path, s3_server: Any, **more: str) -> dict[str, Any]:
    return {"root": root, "inbox": f"s3://{s3_server.bucket}/inbox/", **more}


def storage(s3_server: Any) -> dict[str, Any]:
    return {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region}


@pytest.fixture
def settings_for(s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Settings for an in-process daemon with the bucket inbox (more paths on top)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)

    def make(emulator: Emulator, **overrides: Any) -> Any:
        paths = bucket_paths(tmp_path / "root", s3_server, **overrides.pop("paths", {}))
        return daemon_settings(
            tmp_path / "root",
            emulator,
            paths=paths,
            storage=storage(s3_server),
            intake={"rescan_interval_s": 0.2, **overrides.pop("intake", {})},
            limits={**NO_CAPS, **overrides.pop("limits", {})},
            **overrides,
        )

    return make


async def names_in(bucket: Bucket) -> list[str]:
    return sorted([bucket.url.name(info.key) async for info in bucket.list()])


def jobs_of(root: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
        return sorted(db.execute("SELECT inbox_name, state FROM jobs").fetchall())


def claims_of(root: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(root / "state" / "batchd.sqlite3") as db:
        return sorted(db.execute("SELECT inbox_key, step FROM inbox_claims").fetchall())


# -- the drop-folder promises ------------------------------------------------------------


async def test_jsonl_and_csv_objects_are_claimed_once_each_and_published(
    emulator: Emulator, settings_for: Any, inbox: Bucket, tmp_path: Path
) -> None:
    await inbox.put_bytes("inbox/a.jsonl", requests(3))
    await inbox.put_bytes("inbox/b.csv", b"custom_id,content\nc1,hello\nc2,world\n")
    await inbox.put_bytes(
        "inbox/b.meta.json", b'{"model": "qwen-plus", "completion_window": "24h"}'
    )
    async with running_daemon(settings_for(emulator)) as daemon:
        folders = await wait_published(daemon.outbox, 2, emulator)
        assert [f.name for f in folders] == ["a", "b"]
        assert summary(folders[0])["request_counts"]["completed"] == 3
        b = summary(folders[1])
        assert b["request_counts"]["completed"] == 2
        assert b["options"]["model"] == "qwen-plus"
        # Claimed: gone from the inbox, sidecar too; one job and one finished claim each.
        assert await names_in(inbox) == []
        root = tmp_path / "root"
        assert claims_of(root) == [
            ("inbox/a.jsonl", "claimed"),
            ("inbox/b.csv", "claimed"),
        ]
        await idle(daemon)
        assert [name for name, _ in jobs_of(root)] == ["a.jsonl", "b.csv"]


async def test_ignored_names_and_folders_stay_in_the_inbox_untouched(
    emulator: Emulator, settings_for: Any, inbox: Bucket
) -> None:
    ignored = [
        ".hidden.jsonl",
        "x.jsonl.tmp",
        "y.jsonl.part",
        "z.jsonl.partial",
        "w.jsonl~",
        "notes.txt",
        "sub/inner.jsonl",
        "folder/",
    ]
    for name in ignored:
        await inbox.put_bytes(inbox.url.key(name), b"" if name.endswith("/") else requests(1))
    await inbox.put_bytes("inbox/real.jsonl", requests(1))
    async with running_daemon(settings_for(emulator)) as daemon:
        (folder,) = await wait_published(daemon.outbox, 1, emulator)
        assert folder.name == "real"
        await idle(daemon)
        listed = sorted([info.key async for info in inbox.list(recursive=True)])
        assert listed == sorted(inbox.url.key(n) for n in ignored)
        _waiting, refused = daemon.intake.entries()
        assert refused == {"notes.txt": "unknown suffix (not an input)"}


async def test_a_rejected_input_is_published_with_its_report_and_its_copy(
    emulator: Emulator, settings_for: Any, inbox: Bucket
) -> None:
    bad = b'{"custom_id": "a", "method": "POST"}\nnot json\n'
    await inbox.put_bytes("inbox/bad.jsonl", bad)
    async with running_daemon(settings_for(emulator)) as daemon:
        (folder,) = await wait_published(daemon.outbox, 1, emulator)
        assert summary(folder)["status"] == "rejected"
        assert (folder / "report.json").exists()
        # The owner has the input back, beside its report.
        assert (folder / "input.jsonl").read_bytes() == bad
        assert await names_in(inbox) == []


async def test_an_input_over_the_size_limit_stays_in_the_inbox_and_is_shown_refused(
    emulator: Emulator, settings_for: Any, inbox: Bucket
) -> None:
    await inbox.put_bytes("inbox/huge.jsonl", requests(50))
    async with running_daemon(settings_for(emulator, jobs={"max_input_bytes": 1000})) as daemon:
        await idle(daemon)
        assert await names_in(inbox) == ["huge.jsonl"]
        _waiting, refused = daemon.intake.entries()
        assert "over jobs.max_input_bytes" in refused["huge.jsonl"]
        assert await daemon.store.job_ids() == set()


async def test_a_big_input_is_split_into_parts_like_a_dropped_file(
    emulator: Emulator, settings_for: Any, inbox: Bucket
) -> None:
    await inbox.put_bytes("inbox/big.jsonl", requests(50))
    settings = settings_for(emulator, limits={"max_requests_per_file": 20})
    async with running_daemon(settings) as daemon:
        (folder,) = await wait_published(daemon.outbox, 1, emulator)
        s = summary(folder)
        assert len(s["parts"]) == 3
        assert [r["custom_id"] for r in read_jsonl(folder / "result.jsonl")] == [
            f"r{i}" for i in range(50)
        ]


async def test_a_late_sidecar_is_kept_beside_its_job_never_applied(
    emulator: Emulator, settings_for: Any, inbox: Bucket
) -> None:
    async with running_daemon(settings_for(emulator)) as daemon:
        await inbox.put_bytes("inbox/late.jsonl", requests(1))

        async def claimed() -> bool:
            return bool(await daemon.store.job_ids()) and await names_in(inbox) == []

        await wait_for(claimed, 10, "the input claimed")
        # The emulator's clock stands still: the job is not published before the sidecar
        # is seen.
        await inbox.put_bytes("inbox/late.meta.json", b'{"model": "qwen-max"}')

        async def moved() -> bool:
            return await names_in(inbox) == []

        await wait_for(moved, 10, "the late sidecar moved beside its job")
        (folder,) = await wait_published(daemon.outbox, 1, emulator)
        s = summary(folder)
        assert s["options"].get("model") != "qwen-max"
        assert s["late_sidecar"] is not None
        assert (folder / "late.meta.json").read_bytes() == b'{"model": "qwen-max"}'
        assert "late.meta.json" in daemon.intake.entries()[1]


# -- races with producers ----------------------------------------------------------------


def bare_bucket_intake(db: Any, bucket: Bucket, folder: Path) -> Any:
    """The real `BucketIntake` on `bucket` and the store `db`, without a daemon."""
    from batchd.config import IntakeSettings, Settings
    from batchd.pipeline.bucket_intake import BucketIntake

    settings = Settings(intake=IntakeSettings(suffixes=(".jsonl",)))
    return BucketIntake(
        db,
        folder / "inbox",
        folder / "spool",
        lambda: settings,
        bucket=bucket,
        on_claimed=lambda: None,
    )


@pytest.fixture
async def bare(inbox: Bucket, tmp_path: Path) -> AsyncIterator[Any]:
    """The real `BucketIntake` on a real store and database, without a daemon."""
    from batchd.store import Store

    db = await Store.open(tmp_path / "state" / "batchd.sqlite3")
    try:
        yield bare_bucket_intake(db, inbox, tmp_path)
    finally:
        failpoints.arm("")
        await db.close()


async def test_with_a_spool_bucket_the_claimed_input_is_copied_there_marked_with_its_job(
    bare: Any, inbox: Bucket, store: ObjectStore, s3_server: Any
) -> None:
    """The copy inside the store, under SPOOL/JOB/input.EXT, says which job owns it and
    which version of the inbox object it is; a claim cut after the copy does not copy
    again (the mark says it is done), and one cut before it copies once."""
    spool = store.bucket(BucketUrl("s3", s3_server.bucket, "spool/"), area="spool")
    bare.spool_bucket = spool
    etag = await inbox.put_bytes("inbox/s.jsonl", requests(2))
    failpoints.arm("intake.bucket.after_copy=raise")
    with pytest.raises(failpoints.FailpointError):
        await bare.run_once()
    failpoints.arm("")
    await bare.run_once()
    ((job_id, (name, content)),) = (await spooled(bare)).items()
    assert (name, content) == ("s.jsonl", requests(2))
    copy = await spool.head(f"spool/{job_id}/input.jsonl")
    assert copy is not None
    assert copy.metadata == {"batchd-job": job_id, "batchd-source-etag": etag}
    assert await spool.get_bytes(copy.key, max_bytes=10_000) == requests(2)
    assert await names_in(inbox) == []


async def spooled(intake: Any) -> dict[str, bytes]:
    """Each claimed job's input in the spool, by the inbox name it was claimed under."""
    jobs = await intake.store.jobs()
    return {
        job.id: (job.inbox_name, Path(job.spool_path).read_bytes())
        for job in jobs
        if job.state == "claimed"
    }


async def test_an_object_deleted_between_the_listing_and_its_claim_is_no_job(
    bare: Any, inbox: Bucket
) -> None:
    await inbox.put_bytes("inbox/gone.jsonl", requests(1))
    ((info, kind),), _sidecars, _lone = await bare.list_inbox()
    await inbox.delete("inbox/gone.jsonl")
    assert await bare.claim_object(info, kind, None) is False
    assert await bare.store.job_ids() == set()
    assert await bare.store.open_inbox_claims() == []
    assert list((bare.spool).iterdir()) == []


async def test_an_object_overwritten_before_its_copy_is_claimed_as_it_is_now(
    bare: Any, inbox: Bucket
) -> None:
    await inbox.put_bytes("inbox/x.jsonl", requests(1))
    ((info, kind),), _sidecars, _lone = await bare.list_inbox()
    await inbox.put_bytes("inbox/x.jsonl", requests(2))
    # The copy's If-Match fails: the intent is dropped, the next listing sees the new one.
    assert await bare.claim_object(info, kind, None) is False
    assert await bare.store.job_ids() == set()
    assert await bare.run_once() == 1
    assert list((await spooled(bare)).values()) == [("x.jsonl", requests(2))]
    assert await names_in(inbox) == []


async def test_a_put_overwriting_an_object_being_claimed_stays_and_is_its_own_job(
    bare: Any, inbox: Bucket
) -> None:
    """Between the copy and the delete a producer PUTs the same name again: the claim
    takes the version it copied, the delete (If-Match) leaves the new one, and the next
    pass claims that as a job of its own."""
    await inbox.put_bytes("inbox/x.jsonl", requests(1))
    failpoints.arm("intake.bucket.after_copy=raise")
    with pytest.raises(failpoints.FailpointError):
        await bare.run_once()
    failpoints.arm("")
    await inbox.put_bytes("inbox/x.jsonl", requests(3))
    # The cut claim is settled first (its delete finds another ETag and keeps it)...
    await bare.run_once()
    # ...and the new version claimed, now or at the next pass.
    await bare.run_once()
    assert sorted((await spooled(bare)).values()) == [
        ("x.jsonl", requests(1)),
        ("x.jsonl", requests(3)),
    ]
    assert await names_in(inbox) == []
    assert await bare.store.open_inbox_claims() == []


async def test_a_claim_cut_by_a_store_fault_is_finished_by_the_next_pass(
    bare: Any, inbox: Bucket
) -> None:
    """A fault after the intent (here a raise at the fail point, as a 500 would) leaves an
    open claim; the next pass settles it before listing: one job, never two."""
    await inbox.put_bytes("inbox/y.jsonl", requests(1))
    failpoints.arm("intake.bucket.after_record=raise")
    with pytest.raises(failpoints.FailpointError):
        await bare.run_once()
    failpoints.arm("")
    assert len(await bare.store.open_inbox_claims()) == 1
    await bare.run_once()
    assert list((await spooled(bare)).values()) == [("y.jsonl", requests(1))]
    assert await bare.store.open_inbox_claims() == []
    assert await names_in(inbox) == []


# -- batchd submit ------------------------------------------------------------------------


async def test_submit_puts_the_file_into_the_bucket_inbox_sidecar_first_and_waits(
    start_emulator: StartEmulator,
    settings_for: Any,
    inbox: Bucket,
    s3_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The client reads [storage] as `batchd run` does (here from the environment).
    monkeypatch.setenv("BATCHD_STORAGE__ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("BATCHD_STORAGE__REGION", s3_server.region)
    work = tmp_path / "work"
    work.mkdir()
    (work / "reviews.jsonl").write_bytes(requests(4))
    (work / "reviews.meta.json").write_text('{"completion_window": "48h"}')
    (work / "more.jsonl").write_bytes(requests(2))
    emulator = await start_emulator(time_scale=3000)
    settings = settings_for(emulator)
    sock = str(settings.socket_path)
    async with running_daemon(settings) as daemon:
        status = await asyncio.to_thread(Client(sock).status)
        assert status.inbox == f"s3://{s3_server.bucket}/inbox/"
        code, out, err = await cli(
            capsys, "submit", "--socket", sock, "--wait", "--json", str(work / "reviews.jsonl")
        )
        (done,) = orjson.loads(out)
        assert code == 0 and done["status"] == "completed", err
        assert Path(done["outbox"]).parent == daemon.outbox
        assert summary(Path(done["outbox"]))["options"]["completion_window"] == "48h"
        # The Python client too.
        client = Client(sock)
        job = await asyncio.to_thread(
            client.submit, work / "more.jsonl", storage=settings.storage, name="other"
        )
        final = await asyncio.to_thread(client.wait, job.id, 60)
        assert final.state == "published" and final.name == "other"
        assert await names_in(inbox) == []
    # An input already in the bucket inbox under that name is never overwritten.
    await inbox.put_bytes("inbox/taken.jsonl", b"theirs\n")
    code, _out, err = await cli(
        capsys, "submit", "--inbox", str(inbox.url), str(work / "more.jsonl"), "--name", "taken"
    )
    assert code != 0 and "already in the inbox" in err
    assert await inbox.get_bytes("inbox/taken.jsonl", max_bytes=100) == b"theirs\n"


async def test_a_hundred_objects_are_claimed_once_each_and_the_rate_is_said(
    bare: Any, inbox: Bucket
) -> None:
    count = 100
    names = [f"n{i:03d}.jsonl" for i in range(count)]
    await asyncio.gather(*(inbox.put_bytes(inbox.url.key(n), requests(1, prefix=n)) for n in names))
    started = time.monotonic()
    claimed = await bare.run_once()
    elapsed = time.monotonic() - started
    print(f"\nbucket inbox: {count} objects claimed in {elapsed:.2f} s ({count / elapsed:.0f}/s)")
    assert claimed == count
    jobs = await spooled(bare)
    assert sorted(name for name, _ in jobs.values()) == names
    assert await names_in(inbox) == []


# -- store faults (the fault proxy in front of the store) ---------------------------------


@pytest.fixture
async def faulty(s3_faulty: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """A bare `BucketIntake` that reads the inbox through the fault proxy, without
    botocore's retries (each fault reaches batchd)."""
    from batchd.store import Store

    settings = StorageSettings(
        endpoint_url=s3_faulty.endpoint_url,
        region=s3_faulty.region,
        max_attempts=1,
        read_timeout_s=0.5,
    )
    db = await Store.open(tmp_path / "state" / "batchd.sqlite3")
    async with open_store(settings, s3_faulty.env()) as opened:
        bucket = opened.bucket(BucketUrl("s3", s3_faulty.bucket, "inbox/"), area="inbox")
        try:
            yield bare_bucket_intake(db, bucket, tmp_path)
        finally:
            await db.close()


async def test_store_errors_at_a_rate_never_lose_or_double_claim_an_input(
    faulty: Any, inbox: Bucket, s3_faulty: Any
) -> None:
    """A third of the store's answers are 500s while twenty objects are claimed: every
    pass a fault ends is taken up by the next, each input in exactly one job."""
    names = [f"f{i:02d}.jsonl" for i in range(20)]
    for n in names:
        await inbox.put_bytes(inbox.url.key(n), requests(1, prefix=n))
    s3_faulty.set_faults(error_rate=0.3, error_status=500, seed=5)
    faults = 0
    for _ in range(300):
        try:
            await faulty.run_once()
        except StorageFault as exc:
            assert exc.area == "inbox"
            faults += 1
            continue
        if await names_in(inbox) == [] and not await faulty.store.open_inbox_claims():
            break
    s3_faulty.set_faults(error_rate=0.0)
    await faulty.run_once()
    assert faults > 0 and s3_faulty.stats()["injected"]["error_500"] >= faults
    jobs = await spooled(faulty)
    assert sorted(jobs.values()) == [(n, requests(1, prefix=n)) for n in names]
    assert await faulty.store.open_inbox_claims() == []
    assert await names_in(inbox) == []


async def test_a_read_cut_by_a_slow_store_is_claimed_whole_once_the_store_recovers(
    faulty: Any, inbox: Bucket, s3_faulty: Any
) -> None:
    big = requests(2000)  # about 300 KB: several slow chunks
    await inbox.put_bytes("inbox/big.jsonl", big)
    s3_faulty.set_faults(slow_read_s=1.0, methods=["GET"], key_contains="big.jsonl")
    with pytest.raises(StorageFault):
        await faulty.run_once()
    # Cut mid-copy: the claim is open, nothing half-written in the spool.
    (claim,) = await faulty.store.open_inbox_claims()
    assert claim.step == "copying"
    job = await faulty.store.get_job(claim.job_id)
    assert [p.name for p in Path(job.spool_path).parent.iterdir()] == ["claim.json"]
    s3_faulty.set_faults(slow_read_s=0.0)
    assert await faulty.run_once() == 1  # the open claim, settled first; nothing new
    assert list((await spooled(faulty)).values()) == [("big.jsonl", big)]
    assert await names_in(inbox) == []


async def test_a_store_outage_pauses_the_intake_and_shows_then_every_input_is_claimed_once(
    start_emulator: StartEmulator,
    s3_faulty: Any,
    inbox: Bucket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_faulty.env().items():
        monkeypatch.setenv(name, value)
    emulator = await start_emulator(time_scale=3000)
    root = tmp_path / "root"
    settings = daemon_settings(
        root,
        emulator,
        paths=bucket_paths(root, s3_faulty),
        storage={
            "endpoint_url": s3_faulty.endpoint_url,
            "region": s3_faulty.region,
            "max_attempts": 1,
        },
        intake={"rescan_interval_s": 0.2},
        limits=NO_CAPS,
    )
    for n in ("a.jsonl", "b.jsonl", "c.jsonl"):
        await inbox.put_bytes(inbox.url.key(n), requests(2, prefix=n))
    s3_faulty.set_faults(error_rate=1.0, error_status=503)
    async with running_daemon(settings) as daemon:
        await wait_for(lambda: "inbox" in daemon.faults.active, 20, "the store fault shown")
        assert await daemon.store.job_ids() == set()
        s3_faulty.set_faults(error_rate=0.0)
        folders = await wait_published(daemon.outbox, 3, emulator, timeout_s=60)
        assert [f.name for f in folders] == ["a", "b", "c"]
        await wait_for(lambda: "inbox" not in daemon.faults.active, 20, "the fault healed")
    assert jobs_of(root) == [(n, "published") for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    assert await names_in(inbox) == []


async def test_inbox_and_outbox_both_on_the_bucket_an_object_in_gives_a_folder_out(
    start_emulator: StartEmulator, settings_for: Any, inbox: Bucket, store: ObjectStore
) -> None:
    emulator = await start_emulator(time_scale=3000)
    outbox = store.bucket(BucketUrl("s3", inbox.url.bucket, "outbox/"), area="outbox")
    await inbox.put_bytes("inbox/both.jsonl", requests(3))
    settings = settings_for(emulator, paths={"outbox": str(outbox.url)})
    async with running_daemon(settings):

        async def published() -> bool:
            return await outbox.head("outbox/both/summary.json") is not None

        await wait_for(published, 60, "both/summary.json in the outbox bucket")
    results = await outbox.get_bytes("outbox/both/result.jsonl", max_bytes=1_000_000)
    assert results is not None and len(results.splitlines()) == 3
    assert await names_in(inbox) == []
