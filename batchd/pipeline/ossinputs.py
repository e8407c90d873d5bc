"""OSS inputs: parts the service reads from the spool's bucket instead of an upload.

With `paths.spool` on a bucket (`oss://B/spool/`, or `s3://...`), the job's working folder
stays this machine's (`paths.folder("spool")`, laid out as `batchd.inputs.spool` says,
every stage unchanged). What the bucket holds is what someone else must read: each part
the service reads from OSS is written to `SPOOL/JOB/PART-FILE` (`part_key`) before its
batch is created, and the batch names it `oss:{region}:{bucket}/{key}` (`oss_id`): no
upload call, no upload cap, no input file in the account's quota (SPEC.md, "Inputs from
OSS"). The objects stay there until their job is published; then the job's whole prefix
goes (`remove_job`).

Which way a part goes (`choose_via`, pure) follows `jobs.input_via`:
- `upload`: as without a bucket, through the files API;
- `oss`: always the bucket (the configuration refuses it without a spool bucket or with a
  provider that does not read OSS); what the pre-flight finds missing is warned about,
  and the service's answer decides;
- `auto`: the bucket when the spool is an `oss://` bucket, the provider reads OSS inputs
  (`ProviderProfile.oss_inputs_region`) and the pre-flight finds nothing missing; else
  the upload, with a note saying why (logged once, shown in `batchd status`).

The pre-flight (`preflight_findings`, pure; `OssInputs.preflight`, the calls) checks what
a client can: the bucket's region against the service's, and the tag
`bailian-datahub-access: read` that the service's role needs. The service-linked role
itself (`AliyunServiceRoleForSFMDataHubOSSImport`) cannot be seen with the bucket's
credentials: it is named as a reminder, never as missing. A store that will not show its
tags (OSS's S3-compatible API may not answer GetBucketTagging) is "not checked", which
does not stop `auto`.

Crash safety: the write is an idempotent PUT made while the part is still PENDING; the
oss: id is recorded (UPLOADED) only once the object is whole. A kill between the two
writes it again; a kill after sends the create with the recorded id, and a lost create
is found in the batch list by that id (`submit.made_from`). A store fault while writing
is a `StorageFault`, this machine's trouble: the part waits, uncounted. Presigned URLs are
never used: they are bearer credentials that would sit in the service's batch list and
in batchd's records; the oss: name carries no secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.faults import StorageFault
from batchd.logs import get_logger
from batchd.models import OSS_ID_PREFIX, is_oss_id
from batchd.objstore.location import BucketUrl

if TYPE_CHECKING:
    from batchd.config import Settings
    from batchd.objstore.bucket import Bucket

log = get_logger(__name__)

__all__ = ["OSS_ID_PREFIX", "is_oss_id"]

InputVia = Literal["upload", "oss"]

ACCESS_TAG = "bailian-datahub-access"
ACCESS_TAG_VALUE = "read"
SERVICE_ROLE = "AliyunServiceRoleForSFMDataHubOSSImport"
# A pre-flight that found something missing, or could not check something, is made again
# this often: a tag added or a store back is noticed without a restart.
PREFLIGHT_AGAIN_S = 600.0


def oss_id(region: str, bucket: str, key: str) -> str:
    """PURE: the name the service reads an OSS object by: `oss:{region}:{bucket}/{key}`."""
    return f"{OSS_ID_PREFIX}{region}:{bucket}/{key}"


def part_key(spool: BucketUrl, job_id: str, part_path: str | Path) -> str:
    """PURE: the key of a part's object in the spool bucket: `SPOOL/JOB/PART-FILE`."""
    return spool.key(f"{job_id}/{Path(part_path).name}")


def region_of(location: str | None, default: str) -> str:
    """PURE: a bucket's region as the service names regions: OSS's native location is
    `oss-cn-beijing`, its S3-compatible one `cn-beijing`; none (AWS's us-east-1, a store's
    default) is the region the store is addressed in."""
    if not location:
        return default
    return location.removeprefix("oss-")


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the pre-flight found: what, and how to fix it."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}: {self.fix}"


@dataclass(frozen=True, slots=True)
class Preflight:
    """What the pre-flight of the spool bucket found (`at`: wall seconds)."""

    region: str
    at: float
    missing: tuple[Finding, ...] = ()
    # What could not be checked, with how to check it by hand.
    unchecked: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing


def tag_command(bucket: str) -> str:
    """PURE: the command that sets the tag the service's role needs on `bucket`."""
    return (
        f"ossutil bucket-tagging --method put oss://{bucket} {ACCESS_TAG}#{ACCESS_TAG_VALUE}"
        f" (or the OSS console: the bucket > Bucket Settings > Bucket Tagging:"
        f" {ACCESS_TAG} = {ACCESS_TAG_VALUE})"
    )


def preflight_findings(
    bucket: str,
    region: str,
    service_region: str,
    tags: Mapping[str, str] | None,
    *,
    at: float = 0.0,
    region_known: bool = True,
) -> Preflight:
    """PURE: what is missing for the service to read objects of `bucket` (in `region`,
    or, when the store would not say, the region it is addressed in), from what the
    store said of its tags (None: it would not say)."""
    missing: list[Finding] = []
    unchecked: list[Finding] = []
    if not region_known:
        unchecked.append(
            Finding(
                f"the region of the bucket {bucket} could not be read (taken to be {region});"
                f" the service reads OSS inputs only from {service_region}",
                f"check it by hand (ossutil stat oss://{bucket} shows its Location)",
            )
        )
    elif region != service_region:
        missing.append(
            Finding(
                f"the bucket {bucket} is in {region}, the service reads OSS inputs only from"
                f" {service_region}",
                f"put paths.spool on a bucket in {service_region}, or set"
                ' jobs.input_via = "upload"',
            )
        )
    if tags is None:
        unchecked.append(
            Finding(
                f"the tags of the bucket {bucket} could not be read, so the tag"
                f" {ACCESS_TAG}: {ACCESS_TAG_VALUE} was not checked",
                f"check it by hand (ossutil bucket-tagging --method get oss://{bucket}); to"
                f" set it: {tag_command(bucket)}",
            )
        )
    elif tags.get(ACCESS_TAG) != ACCESS_TAG_VALUE:
        unchecked_value = tags.get(ACCESS_TAG)
        had = f" (it is {unchecked_value!r})" if unchecked_value is not None else ""
        missing.append(
            Finding(
                f"the bucket {bucket} lacks the tag {ACCESS_TAG}: {ACCESS_TAG_VALUE}{had},"
                " without which the service may not read it",
                tag_command(bucket),
            )
        )
    return Preflight(region=region, at=at, missing=tuple(missing), unchecked=tuple(unchecked))


def role_reminder() -> Finding:
    """PURE: the service-linked role, which no bucket call can see."""
    return Finding(
        f"the service reads OSS through its service-linked role {SERVICE_ROLE}, which batchd"
        " cannot check",
        "Model Studio creates it when OSS access is authorized in its console (once per"
        f" account); `aliyun ram GetRole --RoleName {SERVICE_ROLE}` shows whether it exists",
    )


def choose_via(
    setting: str,
    spool: BucketUrl | None,
    service_region: str | None,
    provider: str,
    preflight: Preflight | None,
) -> tuple[InputVia, str | None]:
    """PURE: whether parts go through an upload or the spool bucket, and (for `auto`
    choosing the upload) why not the bucket. `preflight` is None when not made yet (it is
    made before the first part goes by the bucket)."""
    if setting == "upload":
        return "upload", None
    if spool is None:
        return "upload", "the spool is a local folder (paths.spool)"
    if service_region is None:
        return "upload", f"provider {provider} does not read batch inputs from OSS"
    if setting == "oss":
        return "oss", None
    if spool.scheme != "oss":
        return "upload", f"the spool is not an oss:// bucket ({spool})"
    if preflight is not None and not preflight.ok:
        return "upload", "; ".join(f.what for f in preflight.missing)
    return "oss", None


@dataclass
class OssReport:
    """What `batchd status` shows of OSS inputs."""

    setting: str
    via: InputVia
    why_upload: str | None = None
    preflight: Preflight | None = None
    notes: list[str] = field(default_factory=list)


class OssInputs:
    """The spool bucket as the submit stage sees it: which way each part goes, the
    pre-flight, and the part objects' writes and removal."""

    def __init__(
        self,
        bucket: Bucket | None,
        settings: Callable[[], Settings],
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.bucket = bucket
        self._settings = settings
        self.clock = clock
        self.checked: Preflight | None = None
        self._said: set[str] = set()

    @property
    def area(self) -> str:
        """The name the spool bucket's store faults are shown under."""
        return self.bucket.area if self.bucket is not None else "spool"

    @property
    def setting(self) -> str:
        """`jobs.input_via` in force (a reload changes it)."""
        return self._settings().jobs.input_via

    @property
    def spool(self) -> BucketUrl | None:
        return self.bucket.url if self.bucket is not None else None

    def _service_region(self) -> str | None:
        return self._settings().profile.oss_inputs_region

    def _choose(self) -> tuple[InputVia, str | None]:
        s = self._settings()
        return choose_via(
            s.jobs.input_via, self.spool, self._service_region(), s.provider, self.checked
        )

    async def via(self) -> InputVia:
        """Which way the next part goes; the pre-flight is made first when the bucket
        may be the way (a `StorageFault` from it is this machine's: the caller waits)."""
        s = self._settings()
        could, _ = choose_via(
            s.jobs.input_via, self.spool, self._service_region(), s.provider, None
        )
        if could == "oss" and self._due():
            await self.preflight()
        via, why = self._choose()
        if why is not None:
            self._say("input_via_upload", why, "parts are uploaded instead")
        return via

    def _due(self) -> bool:
        """Should the pre-flight be made (again) before choosing?"""
        checked = self.checked
        if checked is None:
            return True
        settled = checked.ok and not checked.unchecked
        return not settled and self.clock.now() - checked.at >= PREFLIGHT_AGAIN_S

    async def preflight(self) -> Preflight:
        """Check the spool bucket as the service will need it (once, and again every
        `PREFLIGHT_AGAIN_S` while something is missing); what is missing is logged once."""
        assert self.bucket is not None
        service_region = self._service_region()
        assert service_region is not None
        if self.checked is not None and not self._due():
            return self.checked
        url = self.bucket.url
        unread: StorageFault | None = None
        try:
            location = await self.bucket.location()
        except StorageFault as exc:
            # Keys allowed to write objects may not read the bucket's location, and a
            # store may not answer it: unchecked, and looked at again later.
            location, unread = None, exc
        tags = await self.bucket.tags()
        if unread is not None:
            if tags is None:
                # Neither answered: the store cannot be used just now (this machine's
                # trouble: the parts wait), rather than a bucket that checks out.
                raise unread
            log.warning("oss_preflight_location_unread", bucket=url.bucket, error=str(unread))
        found = preflight_findings(
            url.bucket,
            region_of(location, self.bucket.store.region(url.scheme)),
            service_region,
            tags,
            at=self.clock.now(),
            region_known=unread is None,
        )
        self.checked = found
        for finding in (*found.missing, *found.unchecked):
            self._say("oss_preflight", finding.what, finding.fix)
        if found.ok:
            log.info("oss_preflight_ok", bucket=url.bucket, region=found.region)
        return found

    def _say(self, event: str, what: str, fix: str) -> None:
        if what in self._said:
            return
        self._said.add(what)
        log.warning(event, what=what, fix=fix)

    def input_id(self, key: str) -> str:
        """The oss: id of `key` in the spool bucket, in the region the pre-flight found."""
        assert self.bucket is not None
        url = self.bucket.url
        region = (
            self.checked.region
            if self.checked is not None
            else region_of(None, self.bucket.store.region(url.scheme))
        )
        return oss_id(region, url.bucket, key)

    async def write(self, job_id: str, path: Path, *, claimed_input: bool = False) -> str:
        """Write the part file at `path` of job `job_id` to the spool bucket (a PUT that
        can be made again: the same bytes under the same key); its oss: id. A part that
        is the claimed input itself (`claimed_input`: an unsplit JSONL input) is at
        `JOB/input.jsonl`, where a claim from a bucket inbox already copied it: that copy
        is used as it is (the claim owns it); only where there is none is it written."""
        assert self.bucket is not None
        key = part_key(self.bucket.url, job_id, path)
        if claimed_input:
            there = await self.bucket.head(key)
            size = await asyncio.to_thread(lambda: path.stat().st_size)
            if there is not None and there.size == size:
                return self.input_id(key)
        await self.bucket.put_file(key, path)
        return self.input_id(key)

    async def remove_job(self, job_id: str) -> int:
        """Remove the job's prefix from the spool bucket (its parts, and the claimed
        input's copy): how many objects there were. Nothing without a spool bucket."""
        if self.bucket is None:
            return 0
        removed = await self.bucket.delete_folder(self.bucket.url.child(job_id))
        if removed:
            log.info("spool_objects_removed", job_id=job_id, objects=removed)
        return removed

    def report(self) -> OssReport | None:
        """What status shows; None without a spool bucket."""
        if self.bucket is None:
            return None
        via, why = self._choose()
        notes = [str(f) for f in self.checked.unchecked] if self.checked else []
        if via == "oss" and self.checked is not None and not self.checked.ok:
            # `oss` forced: what is missing is warned about, the service's answer decides.
            notes = [str(f) for f in self.checked.missing] + notes
        if via == "oss" or self._settings().jobs.input_via != "upload":
            notes.append(str(role_reminder()))
        return OssReport(
            setting=self._settings().jobs.input_via,
            via=via,
            why_upload=why,
            preflight=self.checked,
            notes=notes,
        )
