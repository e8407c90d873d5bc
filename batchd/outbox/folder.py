"""The layout of the outbox and of a job's folder in it, in one place.

A job's folder `outbox/NAME/` holds named members (`OutboxFolder`); the names are spelled
here, once:

| member | what it is |
| --- | --- |
| `result.jsonl` (`RESULTS`) | the successes, in input order |
| `error.jsonl` (`ERRORS`) | the failures, in input order, each with its `input_line` |
| `unattributed.jsonl` (`UNATTRIBUTED`) | result lines no request claims (only when any) |
| `result.csv` (`RESULTS_CSV`) | one row per request, in input order |
| `report.json` (`REPORT`) | the validation report |
| `input.jsonl` / `input.csv` | the validated input's copy; a retry reads `input.jsonl` |
| `unsent.EXT`, `input.changed.EXT`, `input.NAME.part-NNN.jsonl` | an input changed later |
| `late.meta.json` | a sidecar that came after the claim |
| `merged/` (`MERGED`, with `merged.json`) | a retry chain's answers, merged (`outbox.remerge`) |
| `summary.json` (`SUMMARY`) | what the job came to: written last |

A folder is complete when its `summary.json` exists: publishing writes every other member
first. On this machine the folder is written hidden (`Outbox.staging`) and appears in one
rename (`Outbox.publish`); a store without renames (an object store) writes the members
in place and `summary.json` last, and a reader takes a folder without one as not there.

What a second implementation (an object store) provides is the small set of methods of
`OutboxFolder`: `exists`, `read`, `write`, `replace` (atomically), `list`, `remove` of
named members, `complete`, and `member` (a local file a streaming writer fills, which such
a store uploads when it is closed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec

from batchd.documents import Summary, SummaryHead, decode_summary, encode_summary
from batchd.fsutil import fsync_dir, fsync_file, write_atomic
from batchd.inputs.lines import CHUNK_BYTES
from batchd.inputs.spool import LATE_SIDECAR, REQUESTS, input_name

RESULTS = "result.jsonl"
ERRORS = "error.jsonl"
UNATTRIBUTED = "unattributed.jsonl"
RESULTS_CSV = "result.csv"
SUMMARY = "summary.json"
REPORT = "report.json"
MERGED = "merged"
MERGED_SUMMARY = "merged.json"
# The input's copy a retry reads its failed requests from (a JSONL input's own name, a
# CSV input's conversion).
INPUT_REQUESTS = REQUESTS
__all__ = [
    "ERRORS",
    "INPUT_REQUESTS",
    "LATE_SIDECAR",
    "MERGED",
    "MERGED_SUMMARY",
    "REPORT",
    "RESULTS",
    "RESULTS_CSV",
    "SUMMARY",
    "UNATTRIBUTED",
    "Outbox",
    "OutboxFolder",
    "changed_input",
    "input_name",
    "sent_part",
    "unsent_name",
]


def unsent_name(suffix: str) -> str:
    """PURE: the member holding bytes appended to an input (`suffix`: ".jsonl") after
    its claim, never sent."""
    return f"unsent{suffix}"


def changed_input(suffix: str) -> str:
    """PURE: the member holding an input as it is after a change in place."""
    return f"input.changed{suffix}"


def sent_part(name: str) -> str:
    """PURE: the member keeping the part file `name` that was sent, beside a changed input."""
    return f"input.{name}"


class OutboxFolder:
    """One job's folder in the outbox: named members, complete once `summary.json` is in it.

    Every write is durable when it returns (fsynced); `replace` is atomic (a reader sees
    the old content or the new); `seal` makes the folder's entries durable."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"OutboxFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def member(self, name: str) -> Path:
        """The local file of member `name`, for a writer or reader that streams."""
        return self.path / name

    def exists(self, name: str) -> bool:
        return self.member(name).exists()

    def read(self, name: str) -> bytes:
        return self.member(name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        """Write member `name` (fsynced); within a folder not yet published."""
        path = self.member(name)
        path.write_bytes(data)
        fsync_file(path)

    def replace(self, name: str, data: bytes) -> None:
        """Replace member `name` atomically: a reader sees the old content or the new."""
        write_atomic(self.member(name), data)

    def copy_in(self, name: str, source: Path) -> None:
        """Member `name` as a copy of the local file `source` (never a link: the copy
        must not change with it), fsynced."""
        with source.open("rb") as src, self.member(name).open("wb") as out:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
            out.flush()
            os.fsync(out.fileno())

    def list(self) -> list[str]:
        """The names of the members, sorted (hidden ones too)."""
        try:
            return sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        """Remove member `name` (nothing when it is not there)."""
        self.member(name).unlink(missing_ok=True)

    def seal(self) -> None:
        """Make the folder's entries durable."""
        fsync_dir(self.path)

    def complete(self) -> bool:
        """Is this a job's published folder (its summary.json, written last, is there)?"""
        return self.exists(SUMMARY)

    def write_summary(self, summary: Summary) -> None:
        """Write summary.json, the last member (its presence says the folder is whole)."""
        self.write(SUMMARY, encode_summary(summary))

    def summary(self) -> Summary:
        """The folder's summary.json, decoded. Raises OSError when it cannot be read,
        `msgspec.ValidationError` (a ValueError) when it is not a summary."""
        return decode_summary(self.read(SUMMARY))

    def head(self) -> SummaryHead | None:
        """Whose folder this is, from its summary.json of any version; None when there is
        none or it is not one. A disk error reading it raises."""
        try:
            raw = self.read(SUMMARY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            return msgspec.json.decode(raw, type=SummaryHead)
        except msgspec.DecodeError:
            return None

    def job_id(self) -> str | None:
        """The id of the job that published this folder (never through a symlink); None
        when it is not a folder batchd published, or cannot be read."""
        try:
            if not stat.S_ISDIR(os.lstat(self.path).st_mode):
                return None
            head = self.head()
        except OSError:
            return None
        return head.job_id if head is not None else None


class Outbox:
    """The outbox: one folder per published job, each appearing whole."""

    __slots__ = ("root",)

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, name: str) -> OutboxFolder:
        return OutboxFolder(self.root / name)

    def staging(self, name: str, job_id: str) -> OutboxFolder:
        """The hidden folder job `job_id`'s folder `name` is written in before it is
        published (`.NAME.tmp-JOB`: a reader of the outbox skips it)."""
        return OutboxFolder(self.root / f".{name}.tmp-{job_id}")

    def taken(self, name: str) -> bool:
        """Does anything at all hold `name` (a dangling symlink too)?"""
        return os.path.lexists(self.root / name)

    def publish(self, staging: OutboxFolder, final: OutboxFolder) -> None:
        """Give the written folder `staging` its name, in one step. Not durable until
        `sync`."""
        os.rename(staging.path, final.path)

    def sync(self) -> None:
        """Make the outbox's entries (a folder published) durable."""
        fsync_dir(self.root)

    def holder(self, name: str, job_id: str) -> str | None:
        """Who holds the name `name`: None (nothing, not even a dangling symlink), "self"
        (job `job_id`'s published folder) or "other" (anything else). A summary that
        cannot be read for a disk error raises: taking another name then could publish
        the job twice."""
        folder = self.folder(name)
        try:
            st = os.lstat(folder.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return "other"
        head = folder.head()
        return "self" if head is not None and head.job_id == job_id else "other"

    def published(self) -> Iterator[tuple[str, str]]:
        """(folder name, job id) of every published folder (hidden ones skipped)."""
        with contextlib.suppress(OSError), os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                job_id = self.folder(entry.name).job_id()
                if job_id is not None:
                    yield entry.name, job_id
