"""The emulated account: files on disk, batches in memory, and the figures stats report.

Nothing is persisted: a restarted emulator starts with an empty account, and every figure
below lives exactly as long as the batches it counts.

Tokens by model: when a batch ends, its result files are written once (`settle`), and
the usage of every line written is added to `tokens_by_model` (`results.TokenTally`) in
the same step that stores the files. Retrieving the batch or downloading its files any
number of times adds nothing; `/_emulator/stats/reset` starts the tally again.

Enqueued tokens (OpenAI): a model with an enqueued-token limit (the fault settings'
`enqueued_tokens`, else `limits.models.<model>.enqueued_tokens`) accepts a batch only
while the batch's input tokens (`Scan.input_tokens`), added to those of the model's other
batches not yet ended, stay within it. The check runs when the batch is created, its
fate fixed then as every other fact of its timeline is: over the limit, the batch
validates and fails with `token_limit_exceeded`, as OpenAI's does. A batch counts from
create until it ends (completed, failed, expired, cancelled; `cancelling` still counts);
a batch that fails validation never counts.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import os
import random
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

from batchd.documents import JsonObject
from batchd.emulator import errors
from batchd.emulator.checks import Scan
from batchd.emulator.clock import ServiceClock
from batchd.emulator.config import EmulatorSettings, FaultSettings
from batchd.emulator.faults import FaultInjector, drawn
from batchd.emulator.lifecycle import (
    CANCELLABLE,
    Phase,
    Status,
    Timeline,
    derive,
    ends_at,
)
from batchd.emulator.oss import InputKind
from batchd.emulator.results import (
    Answerer,
    TokenTally,
    absurd_usage_line,
    huge_line_parts,
    odd_line,
    success_line,
    write_padding,
)

# OpenAI names the organization in its enqueued-token message; the emulator has one.
ORGANIZATION = "org-emulator"
OUTPUT_PREFIX = "file-batch_output-"
INPUT_PREFIX = "file-batch-"
_NOT_RUN = {
    Status.EXPIRED: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    Status.CANCELLED: (
        "batch_cancelled",
        "This request was not executed: the batch was cancelled.",
    ),
}


@dataclass
class StoredFile:
    id: str
    filename: str
    bytes: int
    created_at: int
    purpose: str
    path: Path
    # The batch a result file belongs to; None for uploads.
    batch_id: str | None = None

    def to_json(self) -> JsonObject:
        return {
            "id": self.id,
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "object": "file",
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True)
class BatchInput:
    """What a batch is made from: the id the client gave (kept as given), the local file
    holding its requests, where it came from, and the id as stats show it (a URL without
    its query, which is a credential)."""

    id: str
    path: Path
    kind: InputKind
    shown: str


@dataclass
class Batch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    timeline: Timeline
    scan: Scan
    input_path: Path
    output_file_id: str | None = None
    error_file_id: str | None = None
    settled: bool = False
    # Writing the result files, once: shared by every call that finds the batch ended.
    settling: asyncio.Task[None] | None = None

    def phase(self, now: float) -> Phase:
        return derive(self.timeline, now)


def _ts(value: float | None) -> int | None:
    return None if value is None else math.floor(value)


@dataclass
class _Written:
    """What writing a batch's result files produced: (temp path, bytes) per file, and the
    content faults written into them."""

    output: tuple[Path, int]
    error: tuple[Path, int]
    huge_lines: int = 0
    odd_lines: int = 0
    absurd_usage: int = 0
    tally: TokenTally = field(default_factory=TokenTally)


class _HugeLine:
    """A success line written streaming: prefix, then padding in chunks, then suffix."""

    def __init__(self, prefix: bytes, padding: int, suffix: bytes) -> None:
        self.prefix = prefix
        self.padding = padding
        self.suffix = suffix

    def write(self, out: BinaryIO) -> int:
        out.write(self.prefix)
        write_padding(out, self.padding)
        out.write(self.suffix)
        return len(self.prefix) + self.padding + len(self.suffix)


class EmulatorStore:
    """All state of one emulated account."""

    def __init__(
        self,
        settings: EmulatorSettings,
        clock: ServiceClock,
        data_dir: Path,
        faults: FaultInjector | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # Shared with the routes: result files are written under its current settings.
        self.faults = faults or FaultInjector(settings.faults)
        self.files_dir = data_dir / "files"
        self.tmp_dir = data_dir / "tmp"
        for folder in (self.files_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        # Unfinished batches: id -> (when it ends, its model).
        self._active: dict[str, tuple[float, str | None]] = {}
        self._ids = 0
        self.max_unfinished = 0
        self.created_per_input_file: Counter[str] = Counter()
        # Batches created per input kind (uploaded, oss, presigned), and the bytes read
        # from the object store and the reads that failed, per kind.
        self.inputs_by_kind: Counter[str] = Counter()
        self.input_bytes_read: Counter[str] = Counter()
        self.input_reads_failed: Counter[str] = Counter()
        # The usage of every result line written, per model (counted once, at settle).
        self.tokens_by_model = TokenTally()

    # ---- ids and paths

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        text = f"{self.settings.seed}:{prefix}:{self._ids}"
        return prefix + str(uuid.UUID(bytes=hashlib.sha256(text.encode()).digest()[:16]))

    def temp_path(self) -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}.part"

    # ---- files

    def inputs(self) -> JsonObject:
        """Batches created per input kind, and what the object store gave (stats' `inputs`)."""
        out: JsonObject = {kind.value: self.inputs_by_kind[kind] for kind in InputKind}
        remote = (InputKind.OSS, InputKind.PRESIGNED)
        out["bytes_read"] = {kind.value: self.input_bytes_read[kind] for kind in remote}
        out["reads_failed"] = {kind.value: self.input_reads_failed[kind] for kind in remote}
        return out

    def reset_inputs(self) -> None:
        for counter in (self.inputs_by_kind, self.input_bytes_read, self.input_reads_failed):
            counter.clear()

    def stored_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def check_storage(self, extra_bytes: int = 0, extra_files: int = 0) -> None:
        limits = self.settings.limits
        if len(self.files) + extra_files > limits.max_stored_files:
            raise errors.quota(f"the account already stores {limits.max_stored_files} files")
        if self.stored_bytes() + extra_bytes > limits.max_stored_bytes:
            raise errors.quota(f"the account's storage of {limits.max_stored_bytes} bytes is full")

    def add_file(
        self, temp: Path, filename: str, size: int, purpose: str, batch_id: str | None = None
    ) -> StoredFile:
        prefix = OUTPUT_PREFIX if purpose == "batch_output" else INPUT_PREFIX
        file_id = self.new_id(prefix)
        path = self.files_dir / f"{file_id}.jsonl"
        os.replace(temp, path)
        created = _ts(self.clock.now()) or 0
        stored = StoredFile(file_id, filename, size, created, purpose, path, batch_id)
        self.files[file_id] = stored
        return stored

    def get_file(self, file_id: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None:
            raise errors.not_found("file", file_id)
        return stored

    def content_fault(self, stored: StoredFile, kind: str, rate: float) -> bool:
        """Whether a content fault (`kind`) hits this result file: a fixed draw per file
        id and fault seed, for batches `batch_match` selects."""
        if rate <= 0 or stored.batch_id is None:
            return False
        batch = self.batches.get(stored.batch_id)
        if batch is None or not self.faults.matches(batch.metadata):
            return False
        return drawn(self.faults.settings.seed, kind, stored.id, rate)

    def delete_file(self, file_id: str) -> None:
        stored = self.get_file(file_id)
        del self.files[file_id]
        stored.path.unlink(missing_ok=True)

    # ---- the running cap

    def unfinished(self, now: float) -> dict[str, tuple[float, str | None]]:
        """Batches not yet ended at `now` (validating, in_progress, finalizing, cancelling)."""
        for batch_id in [b for b, (end, _) in self._active.items() if end <= now]:
            del self._active[batch_id]
        return self._active

    def check_running_cap(self, model: str | None, now: float) -> None:
        active = self.unfinished(now)
        cap = self.settings.limits.running_batches
        if len(active) >= cap:
            wait = self.clock.wall_seconds(min(end for end, _ in active.values()) - now)
            raise errors.quota(
                f"{len(active)} batches are unfinished; at most {cap} may run at once", wait
            )
        own = self.settings.limits.models.get(model or "")
        if own is not None and own.max_running is not None:
            mine = [end for end, m in active.values() if m == model]
            if len(mine) >= own.max_running:
                wait = self.clock.wall_seconds(min(mine) - now)
                raise errors.quota(
                    f"{len(mine)} batches of {model} are unfinished; "
                    f"at most {own.max_running} may run at once",
                    wait,
                )

    # ---- enqueued tokens

    def enqueued_limit(self, model: str | None) -> int | None:
        """The model's enqueued-token limit: the fault settings' first, then its limits'."""
        if model is None:
            return None
        switched = self.faults.settings.enqueued_tokens.get(model)
        if switched is not None:
            return switched
        own = self.settings.limits.models.get(model)
        return own.enqueued_tokens if own is not None else None

    def enqueued_tokens(self, now: float) -> dict[str, int]:
        """Input tokens per model of the batches not ended at `now` that passed validation
        (or will): what the enqueued-token limits count."""
        totals: Counter[str] = Counter()
        for batch_id, (_, model) in self.unfinished(now).items():
            batch = self.batches[batch_id]
            if model is not None and batch.timeline.valid:
                totals[model] += batch.scan.input_tokens
        return dict(totals)

    def check_enqueued(self, scan: Scan, now: float) -> None:
        """Fail a valid scan whose tokens would pass its model's enqueued-token limit, with
        the error OpenAI lists in such a batch's `errors`."""
        limit = self.enqueued_limit(scan.model)
        if limit is None or not scan.valid or scan.model is None:
            return
        queued = self.enqueued_tokens(now).get(scan.model, 0)
        if queued + scan.input_tokens <= limit:
            return
        scan.add(
            "token_limit_exceeded",
            f"Enqueued token limit reached for {scan.model} in organization {ORGANIZATION}. "
            f"Limit: {limit:,} enqueued tokens. "
            "Please try again once some in_progress batches have been completed.",
            None,
        )
        self.faults.count("token_limit_exceeded")

    # ---- batches

    def create_batch(
        self,
        source: BatchInput,
        endpoint: str,
        completion_window: str,
        window_s: float,
        metadata: dict[str, str] | None,
        scan: Scan,
    ) -> Batch:
        """Record a new batch; the caller has checked the caps with no await since. A
        batch over its model's enqueued-token limit is recorded to fail validation."""
        s = self.settings
        now = self.clock.now()
        self.check_enqueued(scan, now)
        batch_id = self.new_id("batch_")
        link = self.tmp_dir / f"{batch_id}.input.jsonl"
        # The batch keeps its own link to the input, so deleting the file does not stop it.
        try:
            os.link(source.path, link)
        except OSError:
            shutil.copyfile(source.path, link)
        timeline = Timeline(
            created_at=now,
            total=scan.total if scan.valid else 0,
            valid=scan.valid,
            validating_s=s.validating_s,
            run_s=s.in_progress_base_s + s.per_request_s * scan.total,
            finalizing_s=s.finalizing_s,
            cancelling_s=s.cancelling_s,
            window_s=window_s,
        )
        batch = Batch(
            batch_id, endpoint, source.id, completion_window, metadata, timeline, scan, link
        )
        self.batches[batch_id] = batch
        self._active[batch_id] = (ends_at(timeline), scan.model)
        self.max_unfinished = max(self.max_unfinished, len(self.unfinished(now)))
        self.created_per_input_file[source.shown] += 1
        self.inputs_by_kind[source.kind] += 1
        return batch

    def get_batch(self, batch_id: str) -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise errors.not_found("batch", batch_id)
        return batch

    def cancel(self, batch: Batch) -> None:
        now = self.clock.now()
        status = batch.phase(now).status
        if status in (Status.CANCELLING, Status.CANCELLED):
            return
        if status not in CANCELLABLE:
            raise errors.invalid(f"batch {batch.id} is {status}; it can no longer be cancelled")
        batch.timeline = batch.timeline.cancelled(now)
        self._active[batch.id] = (ends_at(batch.timeline), batch.scan.model)

    async def settle(self, batch: Batch, phase: Phase) -> None:
        """Write the result files of a batch that has ended, once."""
        if batch.settled or not phase.terminal:
            return
        if phase.status is Status.FAILED:
            batch.input_path.unlink(missing_ok=True)
            batch.settled = True
            return
        # Shielded: a client that goes away mid-call (a killed daemon) cancels its handler,
        # and must not leave a half-written batch for the next caller to write again
        # while the first worker thread still runs.
        if batch.settling is None:
            batch.settling = asyncio.ensure_future(self._settle(batch, phase))
        await asyncio.shield(batch.settling)

    async def _settle(self, batch: Batch, phase: Phase) -> None:
        try:
            faults = self.faults.settings
            if not self.faults.matches(batch.metadata):
                faults = FaultSettings(seed=faults.seed)
            written = await asyncio.to_thread(self._write_results, batch, phase, faults)
            self.faults.count("huge_lines", written.huge_lines)
            self.faults.count("odd_lines", written.odd_lines)
            self.faults.count("absurd_usage", written.absurd_usage)
            for kind, (temp, size) in (("output", written.output), ("error", written.error)):
                if size == 0:
                    temp.unlink(missing_ok=True)
                    continue
                name = f"{batch.id}_{kind}.jsonl"
                stored = self.add_file(temp, name, size, "batch_output", batch.id)
                if kind == "output":
                    batch.output_file_id = stored.id
                else:
                    batch.error_file_id = stored.id
            batch.settled = True
            # In the step that stores the files, never again: settle runs once per batch.
            self.tokens_by_model.merge(written.tally)
            # Only now: until the files are stored, a failed attempt is tried again.
            batch.input_path.unlink(missing_ok=True)
        except BaseException:
            batch.settling = None  # the next caller tries again
            raise

    async def settle_all(self) -> None:
        now = self.clock.now()
        for batch in list(self.batches.values()):
            if not batch.settled:
                await self.settle(batch, batch.phase(now))

    def _write_results(self, batch: Batch, phase: Phase, faults: FaultSettings) -> _Written:
        """Write both result files to temp paths (in a worker thread). `faults` are the
        content faults for this batch (none when `batch_match` leaves it out). Lines made
        odd are never parsed again here: counts come from the scan, sizes from writes."""
        s = self.settings
        answer = Answerer(
            batch_id=batch.id,
            seed=s.seed,
            created=math.floor(phase.events.get("in_progress_at", batch.timeline.created_at)),
            thinking_models=frozenset(s.thinking_models),
            thinking_by_default=frozenset(s.thinking_by_default),
            embedding_dimensions=dict(s.embedding_dimensions),
        )
        failing = set(batch.scan.failing)
        not_run = _NOT_RUN.get(phase.status)
        # The order lines are written in is fixed before any is made, so that the first
        # success written (the one a huge line pads) is known while reading the input.
        successes = phase.executed - bisect.bisect_left(batch.scan.failing, phase.executed)
        ok_order = self._order(successes, batch.id)
        huge_at = ok_order[0] if faults.huge_line_bytes > 0 and ok_order else -1
        ok: list[bytes | _HugeLine] = []
        bad: list[bytes] = []
        huge = odd = absurd = 0
        tally = TokenTally()
        with batch.input_path.open("rb") as fh:
            for index, raw in enumerate(fh):
                request = orjson.loads(raw)
                custom_id = request["custom_id"]
                body = request["body"]
                if index >= phase.executed:
                    assert not_run is not None
                    bad.append(answer.not_run(custom_id, *not_run))
                    tally.failure(str(body.get("model")))
                    continue
                if index in failing:
                    bad.append(answer.failure(custom_id))
                    tally.failure(str(body.get("model")))
                    continue
                record = answer.success_record(custom_id, body, batch.endpoint)
                tally.success(record)
                if len(ok) == huge_at:
                    ok.append(_HugeLine(*huge_line_parts(record, faults.huge_line_bytes)))
                    huge += 1
                elif drawn(faults.seed, f"odd:{batch.id}", custom_id, faults.odd_lines_rate):
                    ok.append(odd_line(record, odd))
                    odd += 1
                elif drawn(faults.seed, f"absurd:{batch.id}", custom_id, faults.absurd_usage_rate):
                    ok.append(absurd_usage_line(record, absurd))
                    absurd += 1
                else:
                    ok.append(success_line(record))
        if len(ok) != successes:  # never expected: every input line is one request
            ok_order = self._order(len(ok), batch.id)
        output = self._write_lines([ok[i] for i in ok_order])
        error = self._write_lines([bad[i] for i in self._order(len(bad), batch.id)])
        return _Written(output, error, huge, odd, absurd, tally)

    def _order(self, count: int, batch_id: str) -> list[int]:
        """The order result lines are written in: the service promises none, so they are
        shuffled (deterministically) unless `shuffle_output` is off."""
        order = list(range(count))
        if self.settings.shuffle_output:
            random.Random(f"{self.settings.seed}:order:{batch_id}").shuffle(order)
        return order

    def _write_lines(self, lines: Sequence[bytes | _HugeLine]) -> tuple[Path, int]:
        temp = self.temp_path()
        size = 0
        with temp.open("wb") as out:
            for line in lines:
                if isinstance(line, _HugeLine):
                    size += line.write(out)
                else:
                    out.write(line)
                    size += len(line)
        return temp, size

    def batch_json(self, batch: Batch, phase: Phase) -> JsonObject:
        t = batch.timeline
        if phase.status in (Status.VALIDATING, Status.FAILED):
            counts = {"total": 0, "completed": 0, "failed": 0}
        else:
            failed = bisect.bisect_left(batch.scan.failing, phase.executed)
            counts = {
                "total": t.total,
                "completed": phase.executed - failed,
                "failed": failed + phase.not_run,
            }
        errors_field = None
        if phase.status is Status.FAILED:
            errors_field = {"object": "list", "data": batch.scan.errors}
        ev = phase.events
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": errors_field,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": phase.status.value,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": _ts(t.created_at),
            "in_progress_at": _ts(ev.get("in_progress_at")),
            "expires_at": _ts(phase.expires_at),
            "finalizing_at": _ts(ev.get("finalizing_at")),
            "completed_at": _ts(ev.get("completed_at")),
            "failed_at": _ts(ev.get("failed_at")),
            "expired_at": _ts(ev.get("expired_at")),
            "cancelling_at": _ts(ev.get("cancelling_at")),
            "cancelled_at": _ts(ev.get("cancelled_at")),
            "request_counts": counts,
            "metadata": batch.metadata or {},
        }

    async def render(self, batch: Batch) -> JsonObject:
        """The Batch object as the service returns it now, result files written if due."""
        phase = batch.phase(self.clock.now())
        await self.settle(batch, phase)
        return self.batch_json(batch, phase)
