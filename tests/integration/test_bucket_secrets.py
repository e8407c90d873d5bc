"""The object store's credentials never leave the client (issue 24): with every folder
on a bucket and the keys given as OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET, a job runs
end to end (claimed from the bucket inbox, parts read by the service from the bucket
spool, published to the bucket outbox), and neither the key id nor the secret is in the
daemon's log, its state database, any file under its root, any object it wrote, or the
control socket's answers (`status`, `jobs`, a job, `/metrics`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd.client import AsyncClient
from batchd.config import StorageSettings
from batchd.objstore import open_store
from batchd.objstore.location import BucketUrl
from batchd.testing import (
    DaemonProcess,
    StartEmulator,
    daemon_env,
    requests,
    wait_for,
    wait_ready,
)


@pytest.mark.timeout(180)
async def test_the_stores_keys_are_nowhere_batchd_writes_or_answers(
    start_emulator: StartEmulator,
    tmp_path: Path,
    s3_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_id, secret = s3_server.access_key_id, s3_server.secret_access_key
    oss_env = {"OSS_ACCESS_KEY_ID": key_id, "OSS_ACCESS_KEY_SECRET": secret}
    # The emulator (in this process) reads the store as the service would, with its own
    # credentials; the daemon gets the OSS_* pair only.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    emulator = await start_emulator(
        time_scale=3000, object_store_url=s3_server.endpoint_url, oss_require_tag=False
    )
    bucket = s3_server.bucket
    store = {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region}
    root = tmp_path / "root"
    settings = {
        "paths": {
            "inbox": f"s3://{bucket}/in/",
            "spool": f"s3://{bucket}/spool/",
            "outbox": f"s3://{bucket}/out/",
        },
        "storage": store,
        "jobs": {"input_via": "oss"},
        "intake": {"rescan_interval_s": 0.2},
        "log": {"level": "debug"},
    }
    env = daemon_env(emulator, root, settings)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    env |= oss_env
    log = tmp_path / "daemon.log"
    async with open_store(StorageSettings(**store), oss_env) as objects:
        everything = objects.bucket(BucketUrl("s3", bucket, ""))
        await everything.put_bytes("in/secret-check.jsonl", requests(3))
        daemon = await DaemonProcess.start(env, log)
        try:
            await wait_ready(root, daemon)

            async def published() -> bool:
                return await everything.head("out/secret-check/summary.json") is not None

            await wait_for(published, 90, "the job published to the bucket outbox")
            client = AsyncClient(root=root, storage=StorageSettings(**store))
            status = await client.status()
            jobs = await client.jobs(limit=10)
            answers = [
                str(status),
                str(jobs),
                str(await client.job(jobs.jobs[0].id)),
                await client.metrics(),
            ]
        finally:
            daemon.send_signal(15)
            await daemon.wait()
        objects_written = {
            info.key: await everything.get_bytes(info.key, max_bytes=10_000_000)
            async for info in everything.list(recursive=True)
        }

    assert status.inbox == f"s3://{bucket}/in/" and status.outbox == f"s3://{bucket}/out/"
    stats = await emulator.stats()
    assert stats["inputs"]["oss"] >= 1 and stats["calls"]["upload"]["served"] == 0
    assert "out/secret-check/result.jsonl" in objects_written
    places: dict[str, bytes] = {"daemon log": log.read_bytes()}
    places |= {f"control answer {n}": a.encode() for n, a in enumerate(answers)}
    places |= {f"object {k}": v or b"" for k, v in objects_written.items()}
    places |= {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert any(p.endswith("batchd.sqlite3") for p in places), "the state was read"
    for what in (key_id, secret):
        leaks = [where for where, data in places.items() if what.encode() in data]
        assert not leaks, f"{what!r} found in {leaks}"
