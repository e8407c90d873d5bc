"""Upload and create, each behind a committed intent, with the settling that recovery uses.

Upload: PENDING -> UPLOADING (committed) -> call -> UPLOADED with the file id. A part
left in UPLOADING (a crash, or an answer lost) is settled by looking for its remote file
by name (`upload_name` names job and part): adopted when its size matches, else deleted
and uploaded again. A stray copy costs storage, never money.

Create: UPLOADED -> CREATING (committed, with the time of the intent) -> call -> RUNNING
with the batch id. A part left in CREATING is settled by finding the batch made from its
file: the list is paged back (with `after`) past the intent's time and every batch is
matched on its own `input_file_id` and on batchd's metadata (`batchd_part`), whatever
the server does with filters (OpenAI's list takes none). Only a listing that reached
past the intent proves there is no batch; one that could not (too many pages, a server
that never ends its pages) leaves the part in CREATING with a note, tried again later
and parked after `max_part_failures`: never a second batch for the same part from batchd.
A gateway's own client may still have sent the create more than once: the listing goes
back past the intent even once a batch is found, keeps every batch of the part, and all
but the one the part follows are cancelled at once (`batchd.pipeline.extras`).

Each intent also sets the part's `retry_at` `settle_after_s` ahead (on the steady clock):
a part caught in UPLOADING or CREATING is looked for no sooner, whatever the wall clock
does, and recovery sets that wait again after a restart. A listing that fails because
the provider answers nothing at all (an outage) leaves the parts waiting, uncounted; so
does a fault of this machine (`batchd.faults`).

With the spool on a bucket and parts going that way (`jobs.input_via`, decided by
`batchd.pipeline.ossinputs`), a part is not uploaded: PENDING -> written to the spool
bucket (an idempotent PUT) -> UPLOADED with its `oss:` id, then created as any other;
a lost create is found by that id. A crash between the write and its record writes it
again; a store fault is this machine's (the part waits, uncounted).

The input that is sent is the input that was validated: before each upload of a file
that a producer may still hold open (an unsplit JSONL input), its size and mtime are
compared with those validated; a change sends the job back to be validated again while
nothing of it was sent, and a change during the upload throws that upload away.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from batchd.clock import SYSTEM_CLOCK, Clock
from batchd.config import ProviderLimits, Settings
from batchd.documents import given
from batchd.failpoints import failpoint
from batchd.faults import Faults, describe, local_cause
from batchd.inputs.spool import REQUESTS
from batchd.logs import get_logger
from batchd.models import Job, Part, PartState, RemoteStatus
from batchd.pipeline import holds
from batchd.pipeline.account import AccountState
from batchd.pipeline.budget import BudgetCaps, Ledger, periods, refusal
from batchd.pipeline.extras import ExtraBatches, keep, tag
from batchd.pipeline.holds import Hold, first_to_show
from batchd.pipeline.ossinputs import OssInputs
from batchd.pipeline.prepare import worst_cost
from batchd.pipeline.problems import (
    CallFailure,
    StepPolicy,
    classify,
    step_failed,
    step_trouble,
    step_waits,
)
from batchd.provider.api import (
    AccountError,
    ApiError,
    BatchApi,
    ListingIncomplete,
    parse_items,
)
from batchd.provider.limits import CallClass
from batchd.provider.prices import PriceTable
from batchd.provider.remote import RemoteBatch, RemoteFile
from batchd.provider.tokens import count_file
from batchd.store import Store

log = get_logger(__name__)

# Rounds of `concurrency` uploads one pass makes before it lets creation catch up.
UPLOAD_ROUNDS = 8
LIST_PAGE = 100


@dataclass(frozen=True, slots=True)
class Settling:
    """How batchd looks for the effect of a call whose answer was lost."""

    after_s: float = 10.0  # wait this long first: a list may lag behind a create
    clock_skew_s: float = 300.0  # page back this far past the intent
    max_pages: int = 100


def free_slots(limits: ProviderLimits, total: int, by_model: dict[str, int], model: str) -> int:
    """PURE: how many more batches of `model` may be created now."""
    free = limits.running_batches - total
    own = limits.for_model(model).max_running
    if own is not None:
        free = min(free, own - by_model.get(model, 0))
    return max(0, free)


def made_from(batch: RemoteBatch, part: Part) -> bool:
    """PURE: is this batch one created for `part`? Its own input file id says so, or
    batchd's metadata on it does; a server's filter is never taken on trust."""
    if part.remote_file_id is not None and batch.input_file_id == part.remote_file_id:
        return True
    return batch.metadata.get("batchd_part") == tag(part)


def listing_bound(part: Part) -> float:
    """PURE: the moment a listing must page back past to prove `part` has no batch: when
    the service stored its input file, on the service's own clock (no batch can be made
    from a file before it exists); the create intent, on batchd's clock, only for a part
    whose file's time is not known. Never batchd's clock where the service's is known: a
    wall clock hours ahead made every batch of the first page look older than the intent,
    and a batch already made was "proved" absent and created again."""
    if part.file_created_at is not None:
        return part.file_created_at
    return part.intent_at or 0.0


def past_intents(batch: RemoteBatch, oldest: float, skew_s: float) -> bool:
    """PURE: was this batch created before the oldest `listing_bound` still looked for
    (with the clocks' possible skew)? Then, in a newest-first list, no later page can
    hold one."""
    return batch.created_at is not None and batch.created_at < oldest - skew_s


def files_by_name(files: list[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """PURE: the account's files grouped by their name."""
    named: dict[str, list[RemoteFile]] = {}
    for f in files:
        if f.filename is not None:
            named.setdefault(f.filename, []).append(f)
    return named


def match_upload(named: dict[str, list[RemoteFile]], part: Part) -> tuple[str | None, list[str]]:
    """PURE: the remote file that is this part's upload arrived whole (its name and its
    size say so), and the other files of that name (strays, to delete)."""
    mine = named.get(part.upload_name, [])
    whole = next((f.id for f in mine if f.bytes == part.bytes), None)
    return whole, [f.id for f in mine if f.id != whole]


def stored_at(named: dict[str, list[RemoteFile]], file_id: str | None) -> float | None:
    """PURE: when the service stored the file `file_id` (its own clock), if it says."""
    return next((f.created_at for same in named.values() for f in same if f.id == file_id), None)


def input_unchanged(path: Path, job: Job) -> bool:
    """Is the file at `path` still the validated input of `job` (same size and mtime)?"""
    if job.bytes is None or job.input_mtime_ns is None:
        return True  # validated before batchd recorded the mtime
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == job.bytes and st.st_mtime_ns == job.input_mtime_ns


def producer_writable(part: Part, job: Job) -> bool:
    """Does this part upload the claimed input itself (one part, JSONL), which the
    producer may still hold open? Split parts and converted CSV are batchd's own files."""
    return job.kind == "jsonl" and Path(part.path) == Path(job.spool_path)


class Submitter:
    def __init__(
        self,
        store: Store,
        api: BatchApi,
        settings: Callable[[], Settings],
        limits: ProviderLimits,
        account: AccountState,
        *,
        on_created: Callable[[], None],
        on_replan: Callable[[], None] = lambda: None,
        clock: Clock = SYSTEM_CLOCK,
        on_held: Callable[[], None] = lambda: None,
        extras: ExtraBatches | None = None,
        faults: Faults | None = None,
        oss: OssInputs | None = None,
    ) -> None:
        self.store = store
        # The spool bucket, when parts may reach the service through it.
        self.oss = oss
        # The settings in force, read where they are used (a reload replaces them): the
        # budget's caps, its time zone and the prices among them.
        self._settings = settings
        self.extras = extras or ExtraBatches(store, api, account, clock, settings=settings)
        self.faults = faults if faults is not None else Faults(clock=clock)
        # The prices the parts planned without one were last priced again with.
        self._priced_with: dict[str, object] | None = None
        self.on_held = on_held
        self.clock = clock
        self.api = api
        # The provider's caps: fixed for the daemon's life (`limits` needs a restart).
        self.limits = limits
        self.account = account
        self.on_created = on_created
        self.on_replan = on_replan

    @property
    def caps(self) -> BudgetCaps:
        return BudgetCaps.of(self._settings())

    @property
    def budget_zone(self) -> str:
        return self._settings().budget.timezone

    @property
    def provider(self) -> str:
        return self._settings().provider

    @property
    def prices(self) -> PriceTable:
        return self._settings().price_table

    @property
    def completion_window(self) -> str:
        return self._settings().jobs.completion_window

    @property
    def first_poll_s(self) -> float:
        return self._settings().poll.first_poll_s

    @property
    def concurrency(self) -> int:
        return self._settings().api.concurrency

    @property
    def policy(self) -> StepPolicy:
        return StepPolicy.of(self._settings())

    @property
    def settling(self) -> Settling:
        api = self._settings().api
        return Settling(api.settle_after_s, api.clock_skew_s, api.max_list_pages)

    # -- one pass -----------------------------------------------------------------------

    async def run_once(self) -> bool:
        """Upload and create what the caps allow now; True when anything moved."""
        if self.account.paused_reason is not None or self.account.silent:
            return False
        await self._price_unpriced()
        moved = await self._settle_stuck()
        moved |= await self.extras.run_once()
        # Uploads and creates overlap: the parts uploaded in one pass are created in the
        # next while the following ones upload, so neither waits for the other's batch.
        uploaded, created = await asyncio.gather(self._uploads(), self._creates())
        return moved or uploaded or created

    async def idle_s(self, longest_s: float) -> float:
        """How long the submit stage may sleep: until a part pausing after a failure is
        due again, at most `longest_s`."""
        due = await self.store.next_retry_at(
            [PartState.PENDING, PartState.UPLOADING, PartState.UPLOADED, PartState.CREATING]
        )
        waits = [longest_s]
        if due is not None:
            waits.append(max(0.05, due - self.clock.steady()))
        rollover = self.next_rollover()
        if rollover is not None:
            # The budget's day begins on the wall clock.
            waits.append(max(0.05, rollover - self.clock.now()))
        return await self.extras.idle_s(min(waits))

    async def _guarded(self, part: Part, step: Awaitable[bool]) -> bool:
        """Run one part's step; an unexpected error fails that step of that part only."""
        try:
            return await step
        except (AccountError, asyncio.CancelledError):
            raise
        except Exception as exc:
            if local_cause(exc) is None:
                log.exception("part_step_crashed", job_id=part.job_id, part=part.seq)
            await step_trouble(
                self.store,
                part,
                exc,
                self.policy,
                self.clock.steady(),
                self.faults,
                "uploads and creates",
            )
            return False

    async def _outage(self, parts: list[Part], why: str, since_mono: float) -> bool:
        """True (and the parts left waiting, uncounted) when a listing failed because the
        provider answers nothing at all: an outage is no part's failure."""
        if await self.api.answering(since_mono):
            return False
        now = self.clock.steady()
        for part in parts:
            note = f"waits: the provider does not answer ({why})"
            await step_waits(self.store, part, note, self.policy.pause_s(1), now)
        return True

    async def _settle_stuck(self) -> bool:
        now = self.clock.steady()
        moved = False
        adopting = await self.store.parts_to_adopt(now)
        if adopting:
            moved |= await self._guarded(adopting[0], self.settle_adopted(adopting))
        for state, settle in (
            (PartState.UPLOADING, self.settle_uploads),
            (PartState.CREATING, self.settle_creates),
        ):
            # Looked for once the list can show them (a list may lag behind the call):
            # the intent set `retry_at` that far ahead, on the steady clock.
            stuck = await self.store.parts_in([state], ready_at=now)
            if stuck:
                moved |= await self._guarded(stuck[0], settle(stuck))
        return moved

    async def _uploads(self) -> bool:
        total, _ = await self.store.slot_holders()
        waiting = await self.store.count_parts_in([PartState.UPLOADED])
        # Upload ahead of creation only as far as free slots need: files on the account
        # count against its 10,000-file quota.
        room = max(0, self.limits.running_batches - total + self.concurrency - waiting)
        # And only as far as the account's file quota leaves room for each new part's
        # input and its two result files: a full account refuses uploads.
        held = await self.store.remote_files_held()
        room = min(room, max(0, self.limits.max_stored_files - held) // 3)
        # A few rounds of concurrent uploads per pass, so that creation follows closely.
        pending = [
            p
            for p in await self.store.parts_in(
                [PartState.PENDING],
                limit=min(room, self.concurrency * UPLOAD_ROUNDS),
                ready_at=self.clock.steady(),
            )
            if not p.adopt  # looked for on the service first (`settle_adopted`)
        ]
        if not pending:
            return False
        # Only an unsplit JSONL part is the claimed input itself, which a producer may
        # still write: only its job is read (a split job's report is large).
        jobs = {
            job_id: await self.store.get_job(job_id)
            for job_id in {p.job_id for p in pending if Path(p.path).name == REQUESTS}
        }
        # One way for the pass: the pre-flight of the spool bucket comes first when it
        # may be the way; a fault of its store is this machine's: the parts wait for it.
        try:
            via = await self.oss.via() if self.oss is not None else "upload"
        except Exception as exc:
            local = local_cause(exc)
            if local is None:
                raise
            pause = self.faults.met(local, "uploads and creates")
            note = f"waits for this machine: {describe(local)}: {local}"
            for part in pending:
                await step_waits(self.store, part, note, pause, self.clock.steady())
            return False
        sem = asyncio.Semaphore(self.concurrency)

        async def one(part: Part) -> bool:
            async with sem:
                job = jobs.get(part.job_id)
                step = self.to_bucket(part, job) if via == "oss" else self.upload(part, job)
                return await self._guarded(part, step)

        results = await asyncio.gather(*(one(p) for p in pending))
        return any(results)

    async def _creates(self) -> bool:
        total, by_model = await self.store.slot_holders()
        ledger = await self._ledger()
        caps = self.caps  # read once for the pass: thousands of parts may be judged
        queued = await self.store.queued_tokens() if self._queues_tokens() else {}
        chosen: list[Part] = []
        # job id -> the hold its note shows (`holds.first_to_show` of its parts' refusals),
        # and the jobs some part of which was judged against the budget in this pass.
        short: dict[str, Hold] = {}
        judged: set[str] = set()
        for part in await self.store.parts_in(
            [PartState.UPLOADED], limit=10_000, ready_at=self.clock.steady()
        ):
            # Every waiting part is judged against the budget, whether or not a slot is
            # free: a hold is said (and kept) whatever else the part waits for.
            if ledger is not None:
                judged.add(part.job_id)
                refused = refusal(part.cost_max, ledger, caps, part.model)
                if refused is not None:
                    short[part.job_id] = first_to_show(short.get(part.job_id), refused)
                    continue
            if total >= self.limits.running_batches:
                continue
            if free_slots(self.limits, total, by_model, part.model) <= 0:
                continue
            if not self._fits_queue(part, queued):
                continue
            if ledger is not None:
                ledger.add(part.cost_max or 0.0)
            chosen.append(part)
            total += 1
            by_model[part.model] = by_model.get(part.model, 0) + 1
            queued[part.model] = queued.get(part.model, 0) + (part.input_tokens or 0)
            if total >= self.limits.running_batches and ledger is None:
                break
        await self._judge_holds(short, judged, capped=ledger is not None)
        if not chosen:
            return False
        # Each job read once per pass: a job of thousands of parts carries a large report,
        # and reading it again for every part would cost more than the creates.
        jobs = {job_id: await self.store.get_job(job_id) for job_id in {p.job_id for p in chosen}}
        sem = asyncio.Semaphore(self.concurrency)

        async def one(part: Part) -> bool:
            async with sem:
                if self.account.paused_reason is not None:
                    return False
                return await self._guarded(part, self.create(part, jobs[part.job_id]))

        results = await asyncio.gather(*(one(p) for p in chosen))
        if any(results):
            self.on_created()
        return any(results)

    # -- money and queues ---------------------------------------------------------------

    async def _ledger(self) -> Ledger | None:
        """What the caps are measured against now (None: no cap is set)."""
        if not self.caps.active:
            return None
        when = periods(self.clock.now(), self.budget_zone)
        day = await self.store.spent_since(when.day_start)
        month = await self.store.spent_since(when.month_start)
        committed, unknown = await self.store.committed_cost()
        mine = (self.provider, self.caps.currency)
        return Ledger(
            spent_day=day.get(mine, 0.0),
            spent_month=month.get(mine, 0.0),
            committed=committed,
            committed_unknown=unknown,
        )

    def _queues_tokens(self) -> bool:
        return any(m.enqueued_tokens for m in self.limits.models.values())

    def _fits_queue(self, part: Part, queued: dict[str, int]) -> bool:
        """PURE but for self: does the part's input fit the model's enqueued-token limit
        beside the batches already queued? (Only OpenAI-style profiles set one; a part
        too large for the limit alone was rejected when its job was planned.)"""
        limit = self.limits.for_model(part.model).enqueued_tokens
        if limit is None or not queued.get(part.model):
            return True
        return queued[part.model] + (part.input_tokens or 0) <= limit

    async def _judge_holds(self, short: dict[str, Hold], judged: set[str], capped: bool) -> None:
        """Hold the jobs a part of which does not fit the budget (the note kept current,
        logged once when the hold starts), and release the held ones judged in this pass
        whose parts now fit, or all of them when no cap is set any more (a reload took
        it away). A split job some of whose parts run says how many."""
        for job_id, refused in short.items():
            started, total = await self.store.created_parts(job_id)
            note = refused.note(job_id)
            if started:
                note = f"{started} of {total} parts created; the rest wait: {note}"
            if await holds.hold(self.store, job_id, refused.reason, note):
                self.on_held()
        for job_id, reason in (await self.store.held_for(holds.MONEY)).items():
            if job_id in short:
                continue
            if not capped:
                await holds.release(self.store, job_id, reason, by="no_cap")
            elif job_id in judged:
                await holds.release(self.store, job_id, reason, by="fits")

    async def _price_unpriced(self) -> None:
        """Price the parts planned while their model had no price, with the table in
        force, once per table: a price added to [prices] (a reload, or a restart) is what
        ends their `no_price` hold."""
        settings = self._settings()
        table = settings.price_table
        if settings.prices == self._priced_with:
            return
        for part in await self.store.unpriced_parts():
            if table.price(self.provider, part.model) is None:
                continue  # still no price: nothing to count
            try:
                count = await asyncio.to_thread(
                    count_file, part.path, self.provider, self.limits, table
                )
            except OSError as exc:
                log.warning(
                    "part_pricing_failed", job_id=part.job_id, part=part.seq, error=str(exc)
                )
                continue
            worst = worst_cost(count)  # as when a job is planned
            if worst is None:
                continue
            output = sum(m.output_tokens_max for m in count.models.values())
            if await self.store.price_part(part.id, count.input_tokens, output, worst):
                log.info("part_priced", job_id=part.job_id, part=part.seq, cost_max=worst)
        self._priced_with = settings.prices

    def next_rollover(self) -> float | None:
        """When the budget's day next begins (a held part may fit then)."""
        if not self.caps.active:
            return None
        return periods(self.clock.now(), self.budget_zone).next_rollover

    # -- upload -------------------------------------------------------------------------

    async def _input_changed(self, part: Part, job: Job) -> bool:
        """True (and the job sent back to validation) when the producer changed the input
        since it was validated; nothing of the job may have been sent yet."""
        if not producer_writable(part, job) or await asyncio.to_thread(
            input_unchanged, Path(part.path), job
        ):
            return False
        note = "the input changed after it was claimed (a producer still writing it?)"
        if await self.store.replan_job(job.id, note, self.clock.now()):
            log.warning("input_changed", job_id=job.id, name=job.name, before="upload")
            self.on_replan()
        return True

    async def upload(self, part: Part, job: Job | None) -> bool:
        """Upload one part; `job` is given when the part is the claimed input itself."""
        if job is not None and await self._input_changed(part, job):
            return False
        if not await self.store.move_part(
            part.id,
            PartState.PENDING,
            PartState.UPLOADING,
            intent_at=self.clock.now(),
            retry_at=self.clock.steady() + self.settling.after_s,
        ):
            return False
        failpoint("upload.before_request")
        try:
            info = await self.api.upload_file(Path(part.path), part.upload_name)
        except ApiError as err:
            # Left UPLOADING when uncertain: settled (looked for by name) once the list
            # can show it. A full file quota (freed as jobs publish) waits in PENDING.
            return await self._call_failed(
                part, err, "upload", PartState.UPLOADING, PartState.PENDING
            )
        failpoint("upload.after_request")
        problem = None
        if (
            job is not None
            and producer_writable(part, job)
            and not await asyncio.to_thread(input_unchanged, Path(part.path), job)
        ):
            problem = "the input changed while it was uploaded"
        elif info.bytes is not None and info.bytes != part.bytes:
            problem = f"the service stored {info.bytes} bytes of {part.bytes}"
        if problem is not None:
            # What arrived is not what was validated: that file is thrown away.
            await self.store.add_garbage([info.id], problem, self.clock.now())
            if await self.store.move_part(part.id, PartState.UPLOADING, PartState.PENDING):
                await step_failed(self.store, part, problem, self.policy, self.clock.steady())
            return False
        if not await self.store.move_part(
            part.id,
            PartState.UPLOADING,
            PartState.UPLOADED,
            remote_file_id=info.id,
            file_created_at=info.created_at,
            attempts=0,
            retry_at=None,
            error=None,
        ):
            return False
        log.info(
            "part_uploaded", job_id=part.job_id, part=part.seq, file_id=info.id, bytes=part.bytes
        )
        return True

    async def to_bucket(self, part: Part, job: Job | None) -> bool:
        """Write one part to the spool bucket, then record its oss: id (UPLOADED): the
        create names the object, nothing is uploaded. `job` is given when the part is the
        claimed input itself. A kill before the record writes it again (the same bytes
        under the same key)."""
        assert self.oss is not None
        if job is not None and await self._input_changed(part, job):
            return False
        claimed = job is not None and producer_writable(part, job)
        file_id = await self.oss.write(part.job_id, Path(part.path), claimed_input=claimed)
        failpoint("spool.after_write")
        if (
            job is not None
            and producer_writable(part, job)
            and not await asyncio.to_thread(input_unchanged, Path(part.path), job)
        ):
            # What the bucket holds is not what was validated: written again next time.
            problem = "the input changed while it was written to the spool bucket"
            await step_failed(self.store, part, problem, self.policy, self.clock.steady())
            return False
        if not await self.store.move_part(
            part.id,
            PartState.PENDING,
            PartState.UPLOADED,
            remote_file_id=file_id,
            attempts=0,
            retry_at=None,
            error=None,
        ):
            return False
        self.faults.healed(self.oss.area)
        log.info(
            "part_written", job_id=part.job_id, part=part.seq, file_id=file_id, bytes=part.bytes
        )
        return True

    async def settle_uploads(self, parts: list[Part]) -> bool:
        """Parts caught in UPLOADING: adopt each one's remote file if it arrived whole
        (one listing for all of them); otherwise upload again."""
        started = self.clock.monotonic()
        try:
            # A listing cut short still adopts what it saw; for the rest, uploading again
            # costs storage, never money.
            files, complete = await self.api.list_files(max_pages=self.settling.max_pages)
        except AccountError as err:
            self.account.failed(err)
            return False
        except ApiError as err:
            log.warning("upload_settle_failed", parts=len(parts), error=str(err))
            if err.retryable and await self._outage(parts, f"cannot list files: {err}", started):
                return False
            now = self.clock.steady()
            for part in parts:
                await step_failed(self.store, part, f"cannot list files: {err}", self.policy, now)
            return False
        named = files_by_name(files)
        now = self.clock.now()
        for part in parts:
            adopted, strays = match_upload(named, part)
            await self.store.add_garbage(strays, "stray upload", now)
            if adopted:
                if await self.store.move_part(
                    part.id,
                    PartState.UPLOADING,
                    PartState.UPLOADED,
                    remote_file_id=adopted,
                    file_created_at=stored_at(named, adopted),
                    attempts=0,
                    retry_at=None,
                    error=None,
                ):
                    log.info("upload_adopted", job_id=part.job_id, part=part.seq, file_id=adopted)
            else:
                note = None if complete else "files could not all be listed; uploaded again"
                if await self.store.move_part(
                    part.id, PartState.UPLOADING, PartState.PENDING, error=note
                ):
                    log.info("upload_retry", job_id=part.job_id, part=part.seq)
        return True

    async def settle_adopted(self, parts: list[Part]) -> bool:
        """Parts of a job re-created from its spool folder after the database was lost:
        each one's remote file is looked for by name, and its batch by batchd's metadata
        or that file, back to the job's claim; found ones are followed, never sent again.
        Nothing is sent for a part until the listings prove it was not."""
        now, steady = self.clock.now(), self.clock.steady()
        started = self.clock.monotonic()
        jobs = {j: await self.store.get_job(j) for j in {p.job_id for p in parts}}
        try:
            files, complete = await self.api.list_files(max_pages=self.settling.max_pages)
        except AccountError as err:
            self.account.failed(err)
            return False
        except ApiError as err:
            files, complete = [], False
            log.warning("adopt_settle_failed", parts=len(parts), error=str(err))
        if not complete:
            # Only a file's absence would be unproven (a stray costs storage, not money);
            # the batches below are what must be proven absent before sending.
            log.warning("adopt_files_incomplete", parts=len(parts), seen=len(files))
        named = files_by_name(files)
        candidates: list[Part] = []
        strays: dict[int, list[str]] = {}
        for part in parts:
            whole, strays[part.id] = match_upload(named, part)
            job = jobs.get(part.job_id)
            claimed_at = job.created_at if job is not None else 0.0
            candidates.append(
                replace(
                    part,
                    remote_file_id=whole,
                    intent_at=claimed_at,
                    file_created_at=stored_at(named, whole),
                )
            )
        found, reached, failed = await self._find_batches(candidates)
        if found is None:
            return False
        if failed is not None and not reached and await self._outage(parts, failed, started):
            return False
        for part, seen in zip(parts, candidates, strict=True):
            others = strays[part.id]
            batch = await self._keep(part, found.get(part.id, []), "adopt")
            if batch is not None:
                file_id = batch.input_file_id or seen.remote_file_id
                adopted_batch = await self.store.move_part(
                    part.id,
                    PartState.PENDING,
                    PartState.RUNNING,
                    adopt=False,
                    remote_file_id=file_id,
                    batch_id=batch.id,
                    intent_at=now,
                    created_remote_at=batch.created_at or now,
                    # When it was asked for went with the lost database: batchd's first
                    # sight of it is the time on its own clock that it can vouch for.
                    batch_created_at=now,
                    next_poll_at=steady,
                    error="found on the service after the state was lost",
                    **batch.part_fields(),
                )
                others = [f for f in others if f != file_id]
                if adopted_batch:
                    log.warning(
                        "batch_adopted", job_id=part.job_id, part=part.seq, batch_id=batch.id
                    )
            elif not reached:
                await step_failed(
                    self.store,
                    part,
                    "cannot tell whether its batch exists: the batch list could not be"
                    " followed back to the job's claim",
                    self.policy,
                    steady,
                )
                continue
            elif seen.remote_file_id is not None:
                if await self.store.move_part(
                    part.id,
                    PartState.PENDING,
                    PartState.UPLOADED,
                    adopt=False,
                    remote_file_id=seen.remote_file_id,
                    file_created_at=seen.file_created_at,
                ):
                    log.warning(
                        "upload_adopted",
                        job_id=part.job_id,
                        part=part.seq,
                        file_id=seen.remote_file_id,
                    )
            else:
                await self.store.update_part(part.id, PartState.PENDING, adopt=False)
            await self.store.add_garbage(others, "stray upload (state lost)", now)
        return True

    # -- create -------------------------------------------------------------------------

    async def create(self, part: Part, job: Job | None) -> bool:
        """Create the batch of one uploaded part of `job` (read in this pass)."""
        if job is None or job.cancel_requested:
            return False
        window = str(given(job.options.completion_window) or self.completion_window)
        asked_at = self.clock.now()
        if not await self.store.move_part(
            part.id,
            PartState.UPLOADED,
            PartState.CREATING,
            completion_window=window,
            intent_at=asked_at,
            retry_at=self.clock.steady() + self.settling.after_s,
        ):
            return False
        assert part.remote_file_id is not None
        metadata = {
            "ds_name": str(given(job.options.ds_name) or job.name)[:100],
            "batchd_part": tag(part),
        }
        if given(job.options.ds_description):
            metadata["ds_description"] = str(job.options.ds_description)[:200]
        failpoint("create.before_request")
        try:
            batch = await self.api.create_batch(
                part.remote_file_id, part.endpoint, window, metadata
            )
        except ApiError as err:
            # Left CREATING when uncertain: the batch may exist, and is looked for (never
            # created again) once the list can show it. A 429 quota (someone else filled
            # the running cap) waits in UPLOADED.
            return await self._call_failed(
                part, err, "create", PartState.CREATING, PartState.UPLOADED
            )
        failpoint("create.after_request")
        return await self._record_created(part, batch, asked_at)

    async def _record_created(self, part: Part, batch: RemoteBatch, asked_at: float) -> bool:
        """Record the batch made for `part`; `asked_at` is when batchd asked for it (its
        create intent, on batchd's clock): the batch's creation time in summary.json.
        False when the part was no longer CREATING (nothing recorded)."""
        now = self.clock.now()
        steady = self.clock.steady()
        if batch.input_file_id not in (None, part.remote_file_id):
            log.error(
                "batch_file_mismatch",
                job_id=part.job_id,
                part=part.seq,
                batch_id=batch.id,
                sent=part.remote_file_id,
                answered=batch.input_file_id,
            )
        if not await self.store.move_part(
            part.id,
            PartState.CREATING,
            PartState.RUNNING,
            batch_id=batch.id,
            created_remote_at=batch.created_at or now,
            batch_created_at=asked_at,
            next_poll_at=steady + self.first_poll_s,
            attempts=0,
            retry_at=None,
            error="; ".join(batch.notes) or None,
            **batch.part_fields(),
        ):
            return False
        log.info(
            "batch_created",
            job_id=part.job_id,
            part=part.seq,
            batch_id=batch.id,
            file_id=part.remote_file_id,
            status=batch.status,
        )
        return True

    async def settle_creates(self, parts: list[Part]) -> bool:
        """Parts caught in CREATING: adopt the batch made from each one's file, found by
        paging the list back past the oldest intent; create again only when the listing
        reached that far and found nothing."""
        started = self.clock.monotonic()
        found, reached, failed = await self._find_batches(parts)
        if found is None:
            return False
        if failed is not None and not reached and await self._outage(parts, failed, started):
            return False
        now = self.clock.steady()
        for part in parts:
            batch = await self._keep(part, found.get(part.id, []), "settle")
            if batch is not None:
                # Asked for at the intent that the crash cut short, whenever it is found.
                if await self._record_created(part, batch, part.intent_at or now):
                    log.info("batch_adopted", job_id=part.job_id, part=part.seq, batch_id=batch.id)
            elif reached:
                if await self.store.move_part(
                    part.id, PartState.CREATING, PartState.UPLOADED, error=None
                ):
                    log.info("create_retry", job_id=part.job_id, part=part.seq)
            else:
                await step_failed(
                    self.store,
                    part,
                    "cannot tell whether its batch exists: the batch list could not be"
                    f" followed back past the create ({self.settling.max_pages} pages)",
                    self.policy,
                    now,
                )
        return True

    async def _keep(
        self, part: Part, batches: list[RemoteBatch], found_by: str
    ) -> RemoteBatch | None:
        """The batch the part follows of those found for it (None: none); the others are
        recorded as extras and cancelled first (a crash between finds them again)."""
        if not batches:
            return None
        known = await self.store.extra_batch_ids([b.id for b in batches])
        candidates = [b for b in batches if b.id not in known] or batches
        kept = keep(candidates)
        await self.extras.found(part, batches, kept.id, found_by)
        return kept

    async def _find_batches(
        self, parts: list[Part]
    ) -> tuple[dict[int, list[RemoteBatch]] | None, bool, str | None]:
        """Every batch made from these parts' files, by part id (newest first, as listed);
        whether the listing went back far enough to prove there are no others (a gateway
        may have made more than one; None: the account is unusable); and, when a call of
        the listing failed for a reason that may pass (a transport error, a 5xx), that
        error."""
        oldest = min(listing_bound(p) for p in parts)
        found: dict[int, list[RemoteBatch]] = {}
        previous: float | None = None
        newest_first = True
        try:
            async for page in self.api.pages(
                CallClass.LIST,
                "/batches",
                {"limit": str(LIST_PAGE)},
                max_pages=self.settling.max_pages,
            ):
                batches = parse_items(page, RemoteBatch.parse)
                for batch in batches:
                    if batch.created_at is not None:
                        if previous is not None and batch.created_at > previous:
                            newest_first = False  # the server's order is not ours
                        previous = batch.created_at
                    for part in parts:
                        if made_from(batch, part):
                            found.setdefault(part.id, []).append(batch)
                if (
                    newest_first
                    and batches
                    and past_intents(batches[-1], oldest, self.settling.clock_skew_s)
                ):
                    return found, True, None
        except AccountError as err:
            self.account.failed(err)
            return None, False, None
        except ListingIncomplete as err:
            log.warning("create_settle_incomplete", parts=len(parts), error=str(err))
            return found, False, None
        except ApiError as err:
            log.warning("create_settle_failed", parts=len(parts), error=str(err))
            return found, False, str(err) if err.retryable else None
        # The list ended: every batch of the account was seen.
        return found, True, None

    # -- cancel -------------------------------------------------------------------------

    async def cancel_job(self, job: Job) -> None:
        """Stop what has not been created; ask the service to cancel what runs (a part
        parked while running too: its batch is cancelled, the part stays parked for
        `batchd retry`)."""
        for part in await self.store.parts_of(job.id):
            never_created = part.state in (PartState.PENDING, PartState.UPLOADED) or (
                part.state == PartState.PARKED
                and part.parked_from in (PartState.PENDING, PartState.UPLOADED)
            )
            if never_created:
                # Not taken: the part moved on meanwhile; the next pass sees where it is.
                if await self.store.move_part(
                    part.id,
                    part.state,
                    PartState.CANCELLED,
                    remote_status=RemoteStatus.CANCELLED,
                ):
                    await self.store.add_garbage(
                        [part.remote_file_id], "cancelled", self.clock.now()
                    )
            elif (
                (part.state == PartState.RUNNING or part.parked_from == PartState.RUNNING)
                and part.batch_id
                and (part.remote_status not in (RemoteStatus.CANCELLING, RemoteStatus.CANCELLED))
            ):
                try:
                    batch = await self.api.cancel_batch(part.batch_id)
                except ApiError as err:
                    log.warning("cancel_failed", job_id=job.id, part=part.seq, error=str(err))
                    continue
                fields = batch.part_fields() if batch is not None else {}
                await self.store.update_part(
                    part.id,
                    part.state,
                    next_poll_at=self.clock.steady(),
                    **{k: v for k, v in fields.items() if v is not None},
                )
                log.info(
                    "batch_cancel_requested", job_id=job.id, part=part.seq, batch_id=part.batch_id
                )

    async def _call_failed(
        self, part: Part, err: ApiError, call: str, state: PartState, back: PartState
    ) -> bool:
        """The `call` (upload or create) of `part` failed with `err` while the part was
        in `state`, its intent committed: what follows is the error ladder's rung
        (`classify`). An uncertain call leaves the part in `state`, to be settled; a call
        that did not take (the account, or a reason that may pass) sends it `back`,
        uncounted; a refusal fails it."""
        rung = classify(err)
        if rung is CallFailure.ACCOUNT:
            self.account.failed(err)
            await self.store.move_part(part.id, state, back, retry_at=None)
            return False
        if rung is CallFailure.UNCERTAIN:
            log.warning(f"{call}_uncertain", job_id=part.job_id, part=part.seq, error=str(err))
            await self.store.update_part(
                part.id,
                state,
                error=str(err),
                retry_at=self.clock.steady() + self.settling.after_s,
            )
            return False
        if rung is CallFailure.LATER:
            if call == "upload":
                log.warning("upload_deferred", job_id=part.job_id, part=part.seq, error=str(err))
            await self.store.move_part(part.id, state, back, error=str(err), retry_at=None)
            return False
        return await self._part_error(part, state, err)

    async def _part_error(self, part: Part, state: PartState, err: ApiError) -> bool:
        if not await self.store.move_part(
            part.id, state, PartState.FAILED, error=str(err), attempts=part.attempts + 1
        ):
            return False
        log.error("part_failed", job_id=part.job_id, part=part.seq, error=str(err))
        return True
