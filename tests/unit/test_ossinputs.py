"""Which way a part goes to the service (an upload, or the spool bucket named by an oss:
id), what the pre-flight of the bucket says, and the configuration that refuses `oss`
where it cannot work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd.clock import FakeClock
from batchd.config import PROFILES, Settings
from batchd.errors import ConfigError
from batchd.faults import StorageFault
from batchd.objstore.location import BucketUrl
from batchd.pipeline.ossinputs import (
    ACCESS_TAG,
    PREFLIGHT_AGAIN_S,
    OssInputs,
    Preflight,
    choose_via,
    is_oss_id,
    oss_id,
    part_key,
    preflight_findings,
    region_of,
    role_reminder,
)

OSS = BucketUrl("oss", "my-bucket", "spool/")
S3 = BucketUrl("s3", "my-bucket", "spool/")
BEIJING = "cn-beijing"
GOOD = Preflight(region=BEIJING, at=0.0)
TAGGED = {ACCESS_TAG: "read"}


@pytest.mark.parametrize(
    ("setting", "spool", "service", "preflight", "via", "why"),
    [
        # upload: always, whatever else is true
        ("upload", OSS, BEIJING, GOOD, "upload", None),
        # oss: the bucket, even where the pre-flight found something missing
        ("oss", OSS, BEIJING, GOOD, "oss", None),
        ("oss", S3, BEIJING, None, "oss", None),
        ("oss", OSS, BEIJING, preflight_findings("my-bucket", BEIJING, BEIJING, {}), "oss", None),
        # auto: oss only with an oss:// spool, a provider that reads OSS, nothing missing
        ("auto", OSS, BEIJING, GOOD, "oss", None),
        ("auto", OSS, BEIJING, None, "oss", None),
        ("auto", None, BEIJING, None, "upload", "local folder"),
        ("auto", S3, BEIJING, GOOD, "upload", "not an oss:// bucket"),
        ("auto", OSS, None, GOOD, "upload", "does not read batch inputs from OSS"),
        (
            "auto",
            OSS,
            BEIJING,
            preflight_findings("my-bucket", BEIJING, BEIJING, {}),
            "upload",
            f"lacks the tag {ACCESS_TAG}: read",
        ),
        (
            "auto",
            OSS,
            BEIJING,
            preflight_findings("my-bucket", "cn-hangzhou", BEIJING, TAGGED),
            "upload",
            "is in cn-hangzhou",
        ),
        # tags the store would not show do not stop auto (OSS's S3 API may not answer)
        (
            "auto",
            OSS,
            BEIJING,
            preflight_findings("my-bucket", BEIJING, BEIJING, None),
            "oss",
            None,
        ),
    ],
)
def test_the_input_via_decision_table(
    setting: str,
    spool: BucketUrl | None,
    service: str | None,
    preflight: Preflight | None,
    via: str,
    why: str | None,
) -> None:
    chosen, reason = choose_via(setting, spool, service, "dashscope", preflight)
    assert chosen == via
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason


def test_the_profiles_say_who_reads_oss_inputs() -> None:
    assert PROFILES["dashscope"].oss_inputs_region == BEIJING
    assert PROFILES["dashscope-intl"].oss_inputs_region is None
    assert PROFILES["openai"].oss_inputs_region is None
    assert PROFILES["custom"].reads_oss_inputs
    assert Settings.load(None, provider="dashscope").profile.reads_oss_inputs


def test_a_part_key_and_its_oss_id_name_the_job_and_the_part_file() -> None:
    key = part_key(OSS, "J1", Path("/var/lib/batchd/spool/J1/big.part-002.jsonl"))
    assert key == "spool/J1/big.part-002.jsonl"
    assert part_key(BucketUrl("s3", "b"), "J1", "followup-1-001.jsonl") == "J1/followup-1-001.jsonl"
    ident = oss_id(BEIJING, "my-bucket", key)
    assert ident == "oss:cn-beijing:my-bucket/spool/J1/big.part-002.jsonl"
    assert is_oss_id(ident) and not is_oss_id("file-batch-123") and not is_oss_id(None)


def test_the_bucket_region_is_read_as_the_service_names_regions() -> None:
    assert region_of("oss-cn-beijing", "us-east-1") == BEIJING
    assert region_of("cn-beijing", "us-east-1") == BEIJING
    assert region_of(None, BEIJING) == BEIJING


def test_the_preflight_names_a_region_mismatch_and_how_to_fix_it() -> None:
    found = preflight_findings("my-bucket", "ap-southeast-1", BEIJING, TAGGED)
    assert not found.ok and found.region == "ap-southeast-1"
    (finding,) = found.missing
    assert "my-bucket is in ap-southeast-1" in finding.what and BEIJING in finding.what
    assert "paths.spool" in finding.fix and 'input_via = "upload"' in finding.fix


def test_the_preflight_names_a_missing_tag_with_the_command_that_sets_it() -> None:
    for tags in ({}, {ACCESS_TAG: "write"}):
        found = preflight_findings("my-bucket", BEIJING, BEIJING, tags)
        (finding,) = found.missing
        assert f"{ACCESS_TAG}: read" in finding.what
        assert f"ossutil bucket-tagging --method put oss://my-bucket {ACCESS_TAG}#read" in (
            finding.fix
        )
    assert "it is 'write'" in str(
        preflight_findings("b-1", BEIJING, BEIJING, {ACCESS_TAG: "write"}).missing[0]
    )


def test_tags_the_store_will_not_show_are_unchecked_not_missing() -> None:
    found = preflight_findings("my-bucket", BEIJING, BEIJING, None)
    assert found.ok
    (note,) = found.unchecked
    assert "could not be read" in note.what and "ossutil bucket-tagging --method get" in note.fix
    assert preflight_findings("my-bucket", BEIJING, BEIJING, TAGGED) == Preflight(BEIJING, 0.0)


def test_the_service_role_is_named_as_a_reminder() -> None:
    assert "AliyunServiceRoleForSFMDataHubOSSImport" in str(role_reminder())


def test_oss_with_a_local_spool_is_a_configuration_error_naming_the_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.load(None, paths={"root": tmp_path}, jobs={"input_via": "oss"})
    assert "jobs.input_via" in str(err.value) and "paths.spool" in str(err.value)


@pytest.mark.parametrize("provider", ["dashscope-intl", "openai"])
def test_oss_with_a_provider_that_reads_no_oss_is_a_configuration_error(
    tmp_path: Path, provider: str
) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.load(
            None,
            provider=provider,
            paths={"root": tmp_path, "spool": "oss://my-bucket/spool/"},
            jobs={"input_via": "oss"},
        )
    assert "jobs.input_via" in str(err.value) and "provider" in str(err.value)
    assert provider in str(err.value)


def test_oss_and_auto_are_taken_where_they_can_work(tmp_path: Path) -> None:
    spool = {"root": tmp_path, "spool": "s3://my-bucket/spool/"}
    assert Settings.load(None, paths=spool, jobs={"input_via": "oss"}).jobs.input_via == "oss"
    # auto never refuses: it uploads where the bucket cannot be the way
    for provider in ("openai", "dashscope-intl"):
        assert Settings.load(None, provider=provider, paths=spool).jobs.input_via == "auto"


class FakeStore:
    def region(self, scheme: str) -> str:
        return BEIJING


class FakeBucket:
    """The spool bucket's answers, as `OssInputs` reads them (a narrow seam)."""

    def __init__(self, location: str | None = BEIJING, tags: dict[str, str] | None = None) -> None:
        self.url = OSS
        self.area = "spool"
        self.store = FakeStore()
        self.location_answer: str | StorageFault | None = location
        self.tags_answer = tags
        self.asked = 0
        self.objects: dict[str, int] = {}
        self.written: list[str] = []

    async def location(self) -> str | None:
        self.asked += 1
        if isinstance(self.location_answer, StorageFault):
            raise self.location_answer
        return self.location_answer

    async def tags(self) -> dict[str, str] | None:
        return self.tags_answer

    async def head(self, key: str) -> Any:
        size = self.objects.get(key)
        return None if size is None else type("Info", (), {"size": size})()

    async def put_file(self, key: str, path: Path) -> str:
        self.objects[key] = path.stat().st_size
        self.written.append(key)
        return "etag"


def inputs(bucket: FakeBucket, clock: FakeClock, **jobs: Any) -> OssInputs:
    settings = Settings.load(
        None, paths={"root": "/tmp/unused", "spool": str(OSS)}, jobs=jobs or None
    )
    return OssInputs(bucket, lambda: settings, clock=clock)  # type: ignore[arg-type]


async def test_auto_checks_the_bucket_once_and_again_while_something_is_missing() -> None:
    clock = FakeClock()
    bucket = FakeBucket(tags={})
    oss = inputs(bucket, clock)
    assert await oss.via() == "upload" and bucket.asked == 1
    report = oss.report()
    assert report is not None and report.why_upload is not None
    assert "lacks the tag" in report.why_upload
    clock.advance(60)
    assert await oss.via() == "upload" and bucket.asked == 1  # not asked again yet
    bucket.tags_answer = {ACCESS_TAG: "read"}
    clock.advance(PREFLIGHT_AGAIN_S)
    assert await oss.via() == "oss" and bucket.asked == 2  # the tag was added meanwhile
    clock.advance(PREFLIGHT_AGAIN_S)
    assert await oss.via() == "oss" and bucket.asked == 2  # all well: never asked again
    assert oss.input_id("spool/J/x.jsonl") == f"oss:{BEIJING}:my-bucket/spool/J/x.jsonl"


async def test_a_location_the_keys_may_not_read_is_unchecked_and_the_region_assumed() -> None:
    denied = StorageFault("the object store denied access", "oss://my-bucket/", "403")
    bucket = FakeBucket(tags={ACCESS_TAG: "read"})
    bucket.location_answer = denied
    oss = inputs(bucket, FakeClock())
    assert await oss.via() == "oss"
    assert oss.checked is not None and oss.checked.region == BEIJING
    (note,) = oss.checked.unchecked
    assert "region of the bucket my-bucket could not be read" in note.what


async def test_a_store_that_answers_nothing_is_a_fault_not_a_bucket_that_checks_out() -> None:
    down = StorageFault("the object store cannot be reached", "oss://my-bucket/", "refused")
    bucket = FakeBucket(tags=None)
    bucket.location_answer = down
    oss = inputs(bucket, FakeClock())
    with pytest.raises(StorageFault):
        await oss.via()
    assert oss.checked is None


async def test_upload_never_asks_the_bucket() -> None:
    bucket = FakeBucket(tags={})
    oss = inputs(bucket, FakeClock(), input_via="upload")
    assert await oss.via() == "upload" and bucket.asked == 0


async def test_the_claimed_input_copied_by_its_claim_is_not_written_again(
    tmp_path: Path,
) -> None:
    bucket = FakeBucket(tags={ACCESS_TAG: "read"})
    oss = inputs(bucket, FakeClock())
    local = tmp_path / "input.jsonl"
    local.write_bytes(b'{"custom_id": "a"}\n')
    # A claim from a bucket inbox copied it to JOB/input.jsonl: used as it is.
    bucket.objects["spool/J1/input.jsonl"] = local.stat().st_size
    ident = await oss.write("J1", local, claimed_input=True)
    assert ident == f"oss:{BEIJING}:my-bucket/spool/J1/input.jsonl" and bucket.written == []
    # From a local inbox nobody copied it: written; and a part of batchd's own always is.
    assert await oss.write("J2", local, claimed_input=True) and bucket.written == [
        "spool/J2/input.jsonl"
    ]
    await oss.write("J1", tmp_path / "input.jsonl")
    assert bucket.written[-1] == "spool/J1/input.jsonl"
