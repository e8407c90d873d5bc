"""A retry's answers merged back into the original job's outbox folder: one place to read.

`batchd retry JOB` sends JOB's failures again as a new job whose options name JOB as
`retry_of`; a retry of that retry names it in turn. Each is published into its own
folder as usual. When one of them is published, the chain's root (the job retried
first) gets `outbox/ROOT/merged/`, rewritten from every published job of the chain:

- `result.jsonl`: the successes, in the order of ROOT's input (the `input.jsonl` kept in
  ROOT's folder), each the line of the job that answered it, byte for byte;
- `error.jsonl`: the requests still failing, in that order, each the latest failure's
  line with its `input_line` set to the line of ROOT's input;
- `result.csv`: one row per request in that order, success or failure, in the guide's
  CSV columns (`csvio.ResultCsv`), written beside the two files, as in a job's folder;
- `merged.json`: the jobs that contributed (and how many answers each), the counts, the
  codes still failing, and when.

Which answer a request gets: a success from any job of the chain wins over failures (a
request is sent again only when it failed, so there is at most one); among failures, the
latest job's (by claim time) is kept: it says why the request fails now.

Replacing the set atomically: a folder cannot be renamed over a folder that has files,
so `merged` is a symbolic link to a hidden folder `.merged-N` beside it. A new set is
written into a new hidden folder (each file fsynced, then the folder), a new link is
renamed over `merged` (a rename replaces a link in one step), the parent folder is
fsynced, and only then are older hidden folders removed. A crash anywhere leaves `merged`
pointing at a whole set, the old one or the new one (or no `merged` before the first),
never at a half-written one; a hidden folder left by a crash is removed the next time.
The fail point `publish.merged` stands between the written folder and the link's rename.

When nothing can be merged (ROOT's folder or its kept input is gone: `jobs.keep_input =
false`, or removed by hand; a link of the chain is unknown) it says so in the log and the
retry's own folder is all there is. A disk that fails (EIO, ENOSPC) fails the publish step
of the retry, which the publish stage tries again as for its own files; any other problem
is logged (`merged_failed`) and never holds up the retry's publication.

On a bucket outbox (`batchd.outbox.bucket`) the set is merged the same way from local
copies of the chain's files (`merge_chain_bucket`), then put into `ROOT/merged/`, one
object at a time, `merged.json` last: each object is replaced whole, and a reader that
waits for `merged.json` to change reads the new set.

PURE but for files: `write_merged` reads the folders it is given and writes only into
the folder it is given; `chain_root`/`chain_of` read the store; `merge_chain` is the shell.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.documents import given
from batchd.failpoints import failpoint
from batchd.faults import StorageFault
from batchd.fsutil import fsync_dir, fsync_file
from batchd.inputs import csvio
from batchd.inputs.lines import (
    DEFAULT_MAX_LINE_BYTES,
    Line,
    copy_line,
    copy_range,
    custom_id_of,
    identity,
    input_line_of,
    iter_lines,
    line_at,
    read_line,
    utf8_safe,
)
from batchd.logs import get_logger
from batchd.models import Job, JobState, Outcome
from batchd.outbox import failures
from batchd.outbox.folder import (
    ERRORS,
    INPUT_REQUESTS,
    MERGED,
    MERGED_SUMMARY,
    RESULTS,
    RESULTS_CSV,
)
from batchd.outbox.merge import numbered
from batchd.store import Store

if TYPE_CHECKING:
    from batchd.outbox.bucket import BucketOutbox

log = get_logger(__name__)

# Hidden folders holding merged sets; `merged` links to one of them.
HIDDEN_PREFIX = ".merged-"
# The longest retry chain followed (a loop of `retry_of` options cannot keep it going).
MAX_CHAIN = 100
# Disk errors worth trying the whole publish step again for.
DISK_ERRNOS = frozenset({errno.EIO, errno.ENOSPC, errno.EDQUOT})

# Where batchd puts `input_line` in an error.jsonl line: last in the object, or first in
# the object that wraps a line that does not end with a brace (batchd.outbox.merge).
_NUMBER_TAIL = re.compile(rb'"input_line"\s*:\s*([0-9]+)\s*\}\s*\Z')
_NUMBER_HEAD = re.compile(rb'\A\s*\{\s*"input_line"\s*:\s*([0-9]+)')
# How much of a long line's end is read to find its `input_line`.
_TAIL_BYTES = 256


@dataclass(frozen=True, slots=True)
class Contributor:
    """One published job of a chain and its outbox folder."""

    job_id: str
    name: str
    folder: Path
    retry_of: str | None = None


# -- the store side ---------------------------------------------------------------------


async def chain_root(store: Store, job: Job) -> Job | None:
    """The job at the start of `job`'s retry chain (`job` itself when it retries
    nothing); None when a link is unknown or the links go round."""
    seen = {job.id}
    current = job
    for _ in range(MAX_CHAIN):
        parent_id = given(current.options.retry_of)
        if not isinstance(parent_id, str):
            return current
        parent = await store.get_job(parent_id)
        if parent is None or parent.id in seen:
            return None
        seen.add(parent.id)
        current = parent
    return None


def _merges(job: Job) -> bool:
    """PURE: does a job's published folder hold answers to merge?"""
    return (
        job.state == JobState.PUBLISHED
        and job.outcome != Outcome.REJECTED
        and job.outbox_path is not None
    )


async def chain_of(store: Store, root: Job, publishing: Job, folder: Path) -> list[Contributor]:
    """The jobs whose answers make the merged set: `root` first (its folder holds the
    input the set follows), then every published retry below it, oldest first,
    `publishing` (being published into `folder`) among them."""
    below: list[Job] = []
    queue, seen = [root], {root.id}
    while queue and len(seen) <= MAX_CHAIN:
        for child in await store.retries_of(queue.pop(0).id):
            if child.id not in seen:
                seen.add(child.id)
                queue.append(child)
                below.append(child)
    below.sort(key=lambda j: (j.created_at, j.id))
    chain = [Contributor(root.id, root.name, Path(root.outbox_path or ""))]
    for job in below:
        if job.id == publishing.id:
            where = folder
        elif _merges(job):
            where = Path(job.outbox_path or "")
        else:
            continue
        parent = given(job.options.retry_of)
        chain.append(
            Contributor(job.id, job.name, where, parent if isinstance(parent, str) else None)
        )
    return chain


async def merge_chain(
    store: Store,
    job: Job,
    folder: Path,
    *,
    clock: Clock = SYSTEM_CLOCK,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Path | None:
    """Called as a job's publication completes (`folder`: its outbox folder): when the
    job is a retry, rewrite the merged set of its chain's root; its path, or None when
    there is nothing to merge. Idempotent: a publish step done again writes it again."""
    if not isinstance(given(job.options.retry_of), str):
        return None
    if job.report is not None and not job.report.valid:
        return None  # a rejected retry answered nothing: the set stays as it is
    try:
        root = await chain_root(store, job)
        if root is None or not root.outbox_path:
            log.warning("merged_skipped", job_id=job.id, reason="the retry chain's root is unknown")
            return None
        root_folder = Path(root.outbox_path)
        if not (root_folder / INPUT_REQUESTS).is_file():
            log.warning(
                "merged_skipped",
                job_id=job.id,
                root=root.id,
                reason=f"{root_folder}/{INPUT_REQUESTS} is not there (jobs.keep_input off?)",
            )
            return None
        chain = await chain_of(store, root, job, folder)
        stats = await asyncio.to_thread(
            replace_merged, root_folder, chain, clock.now(), max_line_bytes, job.inbox_name
        )
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise  # the publish step is tried again, as for the job's own files
        log.error("merged_failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")
        return None
    except Exception as exc:
        # The retry's own folder is published whatever happens here.
        log.exception("merged_failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")
        return None
    log.info(
        "merged_written",
        job_id=job.id,
        root=root.id,
        jobs=len(chain),
        request_counts=stats["request_counts"],
    )
    return root_folder / MERGED


async def merge_chain_bucket(
    store: Store,
    job: Job,
    where: str,
    outbox: BucketOutbox,
    work: Path,
    *,
    clock: Clock = SYSTEM_CLOCK,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_bytes: int,
) -> str | None:
    """`merge_chain` for an outbox on a bucket: the chain's files are copied into a
    hidden folder of the local outbox `work` (each at most `max_bytes`), merged there, and
    the set put into the root's `merged/`. A store that fails raises (the publish step is
    tried again); the URL of the set, or None when there is nothing to merge."""
    from batchd.outbox.bucket import folder_name, folder_url

    if not isinstance(given(job.options.retry_of), str):
        return None
    if job.report is not None and not job.report.valid:
        return None
    local = work / f".merge-{job.id}"
    try:
        root = await chain_root(store, job)
        root_url = folder_url(root.outbox_path or "") if root is not None else None
        if root is None or root_url is None:
            log.warning("merged_skipped", job_id=job.id, reason="the retry chain's root is unknown")
            return None
        root_name = folder_name(root_url)
        if root_url != outbox.url(root_name):
            log.warning(
                "merged_skipped", job_id=job.id, reason=f"the chain's root is in {root_url}"
            )
            return None
        if not await outbox.has(root_name, INPUT_REQUESTS):
            log.warning(
                "merged_skipped",
                job_id=job.id,
                root=root.id,
                reason=f"{root_url}{INPUT_REQUESTS} is not there (jobs.keep_input off?)",
            )
            return None
        chain = await chain_of(store, root, job, Path(where))
        shown: list[str] = []
        copied: list[Contributor] = []
        for slot, member in enumerate(chain):
            own = where if member.job_id == job.id else None
            if own is None:
                found = await store.get_job(member.job_id)
                own = found.outbox_path if found is not None else None
            url = folder_url(own or "")
            if url is None:
                continue  # published before the outbox was a bucket: not merged here
            wanted = [RESULTS, ERRORS] + ([INPUT_REQUESTS] if slot == 0 else [])
            folder = await outbox.fetch(url, wanted, local / str(slot), max_bytes=max_bytes)
            copied.append(Contributor(member.job_id, member.name, folder.path, member.retry_of))
            shown.append(str(url))
        target = local / "set"
        stats = await asyncio.to_thread(
            _write_set, copied, target, clock.now(), max_line_bytes, shown
        )
        await outbox.put_merged(root_name, target)
    except StorageFault:
        raise  # the store's trouble: the publish step waits and is tried again
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise
        log.error("merged_failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")
        return None
    except Exception as exc:
        log.exception("merged_failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        await asyncio.to_thread(shutil.rmtree, local, True)
    log.info(
        "merged_written",
        job_id=job.id,
        root=root.id,
        jobs=len(copied),
        request_counts=stats["request_counts"],
    )
    return f"{root_url}{MERGED}/"


def _write_set(
    chain: list[Contributor],
    target: Path,
    merged_at: float,
    max_line_bytes: int,
    shown: list[str],
) -> dict[str, Any]:
    target.mkdir(parents=True)
    return write_merged(chain[0].folder, chain, target, merged_at, max_line_bytes, places=shown)


# -- the files --------------------------------------------------------------------------


def replace_merged(
    root_folder: Path,
    chain: list[Contributor],
    merged_at: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    subject: str | None = None,
) -> dict[str, Any]:
    """Write a new merged set beside `root_folder/merged` and switch the link to it in one
    rename; older sets are removed after. Returns what merged.json says."""
    link = root_folder / MERGED
    current = os.readlink(link) if link.is_symlink() else None
    if os.path.lexists(link) and not (current or "").startswith(HIDDEN_PREFIX):
        raise FileExistsError(errno.EEXIST, f"{link} is not batchd's link; left as it is")
    # Sets left by a crash (never linked) go first: they hold space the new one needs.
    _remove_sets(root_folder, keep=current)
    name = f"{HIDDEN_PREFIX}{secrets.token_hex(6)}"
    target = root_folder / name
    target.mkdir()
    try:
        stats = write_merged(root_folder, chain, target, merged_at, max_line_bytes)
        fsync_dir(target)
        failpoint("publish.merged", subject)
        fresh = root_folder / f".{MERGED}.link.tmp"
        if os.path.lexists(fresh):
            fresh.unlink()
        os.symlink(name, fresh)
        os.replace(fresh, link)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    fsync_dir(root_folder)
    _remove_sets(root_folder, keep=name)
    return stats


def _remove_sets(root_folder: Path, keep: str | None) -> None:
    for entry in root_folder.iterdir():
        if entry.name.startswith(HIDDEN_PREFIX) and entry.name != keep:
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink()
            else:
                shutil.rmtree(entry)


@dataclass(slots=True)
class _Answer:
    """Where a retry's answer to one request is: which job, which file, which line."""

    slot: int  # the contributor (0 is the root)
    ok: bool
    offset: int


def _index_retries(
    chain: list[Contributor], handles: dict[tuple[int, bool], IO[bytes]], max_line_bytes: int
) -> dict[str, _Answer]:
    """custom_id -> the answer a request gets from the retries (the chain after its root):
    a success wins over failures, a later failure over an earlier one."""
    index: dict[str, _Answer] = {}
    for slot in range(1, len(chain)):
        for ok in (False, True):
            fh = handles.get((slot, ok))
            if fh is None:
                continue
            for line in iter_lines(fh, max_line_bytes):
                if line.blank:
                    continue
                cid = _line_id(line)
                if cid is None:
                    continue
                earlier = index.get(cid)
                if earlier is None or ok or not earlier.ok:
                    index[cid] = _Answer(slot, ok, line.offset)
    return index


def _line_id(line: Line) -> str | None:
    if line.data is None:
        return custom_id_of(line.head)
    return identity(line.data, read_line(line.data))


def _open(folder: Path, name: str) -> IO[bytes] | None:
    try:
        return (folder / name).open("rb")
    except FileNotFoundError:
        return None


class _Stream:
    """One of the root's own result files, read in step with its input: `head` is its
    next line and `key` what it is matched by (its `input_line`, or its custom_id)."""

    def __init__(self, fh: IO[bytes] | None, max_line_bytes: int, numbered: bool) -> None:
        self.fh = fh
        self.numbered = numbered
        self._lines: Iterator[Line] = iter_lines(fh, max_line_bytes) if fh else iter(())
        self.head: Line | None = None
        self.key: int | str | None = None
        self.advance()

    def advance(self) -> None:
        self.head, self.key = None, None
        for line in self._lines:
            if line.blank:
                continue
            self.head = line
            if self.numbered and self.fh is not None:
                at = self.fh.tell()
                self.key = input_line_of(self.fh, line)
                self.fh.seek(at)
            else:
                self.key = _line_id(line)
            return

    def take(self, out: IO[bytes] | None) -> bytes | None:
        """Copy the head line to `out` (None: skip it), then move on; returns the line's
        bytes when it was held whole."""
        line, fh = self.head, self.fh
        assert line is not None and fh is not None
        if out is not None:
            at = fh.tell()  # a long line is copied from where it is: back after
            copy_line(fh, line, out)
            fh.seek(at)
        self.advance()
        return line.data


def renumbered(line: bytes, number: int) -> bytes:
    """PURE: an error.jsonl line with its `input_line` set to `number`, its other bytes
    kept (one is added when it has none)."""
    body = line.rstrip(b"\r\n")
    digits = str(number).encode()
    found = _NUMBER_TAIL.search(body) or _NUMBER_HEAD.match(body)
    if found is not None:
        return body[: found.start(1)] + digits + body[found.end(1) :] + b"\n"
    from batchd.outbox.merge import with_input_line

    return with_input_line(line, number)


def _write_renumbered(fh: IO[bytes], line: Line, number: int, out: IO[bytes]) -> None:
    """`renumbered` for a line too long to hold: its end (or start) is rewritten, the
    rest copied in chunks."""
    if line.data is not None:
        out.write(renumbered(line.data, number))
        return
    start = max(line.offset, line.offset + line.size - _TAIL_BYTES)
    fh.seek(start)
    tail = fh.read(line.offset + line.size - start)
    if _NUMBER_TAIL.search(tail.rstrip(b"\r\n")):
        copy_range(fh, line.offset, start - line.offset, out)
        out.write(renumbered(tail, number))
        return
    head = _NUMBER_HEAD.match(line.head)
    if head is not None:
        out.write(renumbered(line.head[: head.end()], number).rstrip(b"\n"))
        if copy_range(fh, line.offset + head.end(), line.size - head.end(), out) != b"\n":
            out.write(b"\n")
        return
    copy_line(fh, line, out)  # no number to set: kept as it is


def _missing(cid: str, number: int) -> bytes:
    return (
        orjson.dumps(
            {
                "id": None,
                "custom_id": utf8_safe(cid),
                "response": None,
                "error": {
                    "code": "result_missing",
                    "message": "no job of the retry chain has an answer for this request",
                },
                "input_line": number,
            }
        )
        + b"\n"
    )


def _input_requests(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, custom_id) of every request of a validated input, in order."""
    for number, raw in numbered(path, max_line_bytes, None):
        if raw is None or not raw.strip():
            continue
        obj = read_line(raw)
        cid = obj.get("custom_id") if obj is not None else None
        if isinstance(cid, str):
            yield number, cid


def write_merged(
    root_folder: Path,
    chain: list[Contributor],
    target: Path,
    merged_at: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    *,
    places: list[str] | None = None,
) -> dict[str, Any]:
    """Write result.jsonl, error.jsonl, result.csv and merged.json of the chain (`chain[0]`
    is the root, in `root_folder`) into the empty folder `target`, each fsynced; returns
    what merged.json says. Memory: one entry per request the retries answered. `places`:
    where merged.json says each job's folder is (when the chain was read from copies of
    bucket folders: their URLs), in the chain's order."""
    handles: dict[tuple[int, bool], IO[bytes]] = {}
    answers = [0] * len(chain)
    counts = {"total": 0, "completed": 0, "failed": 0}
    still_failing: dict[str, int] = {}
    try:
        for slot, member in enumerate(chain):
            for ok, name in ((True, RESULTS), (False, ERRORS)):
                fh = _open(member.folder, name)
                if fh is not None:
                    handles[(slot, ok)] = fh
        index = _index_retries(chain, handles, max_line_bytes)
        successes = _Stream(handles.get((0, True)), max_line_bytes, numbered=False)
        errors = _Stream(handles.get((0, False)), max_line_bytes, numbered=True)
        with (
            (target / RESULTS).open("wb") as res,
            (target / ERRORS).open("wb") as err,
            csvio.result_csv(target / RESULTS_CSV) as table,
        ):
            for number, cid in _input_requests(root_folder / INPUT_REQUESTS, max_line_bytes):
                # The root's own answer: its next failure (by input line) or success.
                own: _Stream | None = None
                if errors.head is not None and errors.key == number:
                    own = errors
                elif successes.head is not None and successes.key == cid:
                    own = successes
                hit = index.pop(cid, None)
                data: bytes | None
                shown: Line | bytes
                if hit is not None and (hit.ok or own is not successes):
                    if own is not None:
                        own.take(None)
                    fh = handles[(hit.slot, hit.ok)]
                    line = line_at(fh, hit.offset, max_line_bytes)
                    ok, data, shown = hit.ok, line.data, line
                    answers[hit.slot] += 1
                    out = res if ok else err
                    start = out.tell()
                    if ok:
                        copy_line(fh, line, out)
                    else:
                        _write_renumbered(fh, line, number, out)
                elif own is not None:
                    ok = own is successes
                    assert own.head is not None
                    shown = own.head
                    out = res if ok else err
                    start = out.tell()
                    data = own.take(out)
                    answers[0] += 1
                else:
                    ok, data = False, _missing(cid, number)
                    shown, out = data, err
                    start = out.tell()
                    err.write(data)
                # The request's row in result.csv, from the line just written (a line
                # too long to hold: from its start, with its size as written).
                if isinstance(shown, Line):
                    shown = shown.data or Line(0, out.tell() - start, None, shown.head)
                table.add_request(shown, RESULTS if ok else ERRORS, cid)
                counts["total"] += 1
                if ok:
                    counts["completed"] += 1
                else:
                    counts["failed"] += 1
                    code = failures.classify(read_line(data) if data else None).code
                    still_failing[code] = still_failing.get(code, 0) + 1
            for out in (res, err):
                out.flush()
                os.fsync(out.fileno())
    finally:
        for fh in handles.values():
            fh.close()
    shown_at = places if places is not None else [str(m.folder) for m in chain]
    stats = {
        "root": chain[0].job_id,
        "input": f"{places[0]}{INPUT_REQUESTS}" if places else str(root_folder / INPUT_REQUESTS),
        "jobs": [
            {
                "job_id": m.job_id,
                "name": m.name,
                "outbox": shown_at[slot],
                "retry_of": m.retry_of,
                "answers": answers[slot],
            }
            for slot, m in enumerate(chain)
        ],
        "request_counts": counts,
        "still_failing": dict(sorted(still_failing.items())),
        "merged_at": merged_at,
    }
    (target / MERGED_SUMMARY).write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))
    fsync_file(target / MERGED_SUMMARY)
    return stats
