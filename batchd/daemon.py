"""The daemon: wires the stages as named, supervised tasks; start-up recovery; stop.

Each stage is a loop that runs one step, then waits for "new work", "interval elapsed"
or "stop", whichever comes first. A stage that raises unexpectedly stops the daemon with
exit code 1 (systemd restarts it; recovery settles whatever the crash interrupted). Stop
is an event: stages finish their current step within a grace period, then are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchd import __version__
from batchd.api import AccountError, ApiError, BatchApi, RetryPolicy, Throughput
from batchd.collect import Collector, Publisher
from batchd.config import Settings
from batchd.control import ControlServer, event_from
from batchd.errors import BatchdError, ConfigError
from batchd.failpoints import failpoint
from batchd.fsutil import fsync_dir, write_atomic
from batchd.intake import Intake
from batchd.limits import CallClass, RateLimiter
from batchd.lines import DEFAULT_MAX_LINE_BYTES, input_line_of, iter_lines
from batchd.logs import configure, get_logger, register_secret
from batchd.models import JOB_ACTIVE, JOB_TERMINAL, PART_QUEUED, Job, JobState, Part, PartState
from batchd.notify import Notifier, status_loop, status_text, watchdog_loop
from batchd.poll import Poller, window_hours
from batchd.prepare import Preparer
from batchd.problems import StepPolicy
from batchd.protocol import (
    ActionResponse,
    Caps,
    Event,
    JobInfo,
    JobList,
    PartInfo,
    Problem,
    StatusResponse,
)
from batchd.store import Store
from batchd.submit import AccountState, Settling, Submitter

log = get_logger(__name__)

KEY_VARIABLES = ("BATCHD_API_KEY", "DASHSCOPE_API_KEY")
CREDENTIAL_NAMES = ("api_key", "batchd-api-key")


def load_api_key(environ: dict[str, str] | None = None) -> str:
    """The API key from the environment or a systemd credential, never from the TOML."""
    env = dict(os.environ) if environ is None else environ
    for name in KEY_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            return value
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        for name in CREDENTIAL_NAMES:
            path = Path(cred_dir) / name
            if path.is_file():
                value = path.read_text(encoding="utf-8").strip()
                if value:
                    return value
    raise ConfigError(
        "no API key: set BATCHD_API_KEY or DASHSCOPE_API_KEY, or give systemd a credential"
        " named api_key (LoadCredential=api_key:/etc/batchd/api_key)"
    )


def check_same_filesystem(inbox: Path, spool: Path) -> None:
    """Claiming is a rename from the inbox into the spool: refuse to start where that
    cannot work (another filesystem, or another mount of the same one), instead of
    failing every claim forever. Proven by renaming a hidden probe file across."""
    probe = inbox / f".batchd-probe-{os.getpid()}"
    target = spool / probe.name
    try:
        probe.touch()
        try:
            os.rename(probe, target)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise ConfigError(
                    f"the inbox {inbox} and the spool {spool} are on different filesystems"
                    " (or mounts): claiming a file is a rename between them; put both under"
                    " one mount (paths.inbox, paths.spool)"
                ) from None
            raise
        os.unlink(target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


@dataclass(slots=True)
class Wake:
    """One event per stage: set when there may be new work for it."""

    events: dict[str, asyncio.Event] = field(default_factory=dict)

    def __getitem__(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    def poke(self, name: str) -> Callable[[], None]:
        return lambda: self[name].set()


class Daemon:
    def __init__(
        self, settings: Settings, api_key: str, *, notifier: Notifier | None = None
    ) -> None:
        register_secret(api_key)
        self.notifier = notifier or Notifier(None)
        self.settings = settings
        self.profile = settings.profile
        self.limits = self.profile.limits
        paths = settings.paths
        self.inbox = paths.folder("inbox")
        self.spool = paths.folder("spool")
        self.outbox = paths.folder("outbox")
        self.state_dir = paths.folder("state")
        self.runtime_dir = paths.folder("runtime")
        self._api_key = api_key
        self.stopping = asyncio.Event()
        self.draining = False
        self.wake = Wake()
        self.account = AccountState()
        self.started_at = time.time()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        # Said loudly in the log and in `status` when start-up finds state lost (spool
        # folders the database does not know); kept until the daemon restarts.
        self.state_lost: list[str] = []
        # One retry decision at a time: two at once would both write a retry input.
        self._retry_lock = asyncio.Lock()
        self.store: Store
        self.api: BatchApi
        self.exit_code = 0

    def __repr__(self) -> str:
        return f"Daemon(provider={self.profile.name!r}, root={self.settings.paths.root!s})"

    # -- wiring -------------------------------------------------------------------------

    def _limiter(self) -> RateLimiter:
        api = self.settings.api
        window = api.rate_window_s
        share = api.cap_share

        def per_window(per_minute: int) -> tuple[int, float]:
            # The cap holds per window; the window is 60 s except against an emulator
            # whose minutes are shortened to test in seconds what takes minutes.
            return max(1, int(per_minute * share)), window

        def per_second(rate: float) -> tuple[int, float]:
            # A per-second cap counted over one second.
            return max(1, int(rate * share)), 1.0

        lim = self.limits
        return RateLimiter(
            {
                CallClass.CREATE: per_window(lim.create_per_minute),
                CallClass.RETRIEVE: per_window(lim.retrieve_per_minute),
                CallClass.CANCEL: per_window(lim.cancel_per_minute),
                CallClass.LIST: per_window(lim.list_per_minute),
                CallClass.UPLOAD: per_second(lim.upload_per_second),
                CallClass.FILES: per_second(lim.file_calls_per_second),
            },
            margin_s=1.0,
        )

    def _lost_after_s(self, part: Part) -> float:
        window = part.completion_window or self.settings.jobs.completion_window
        return window_hours(window) * 3600.0 + self.settings.poll.lost_margin_s

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the store and the API client, each closed by `stack` whatever follows."""
        for folder in (self.inbox, self.spool, self.outbox, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        check_same_filesystem(self.inbox, self.spool)
        self.store = await Store.open(self.state_dir / "batchd.sqlite3")
        stack.push_async_callback(self.store.close)
        api = self.settings.api
        self.api = BatchApi(
            self.profile.base_url,
            self._api_key,
            self._limiter(),
            retry=RetryPolicy(api.max_attempts, api.backoff_base_s, api.backoff_cap_s),
            timeout_s=api.timeout_s,
            throughput=Throughput(api.download_min_bytes_per_s, api.download_grace_s),
        )
        stack.push_async_callback(self.api.close)
        s = self.settings
        policy = StepPolicy(s.max_part_failures, api.step_retry_base_s, api.step_retry_cap_s)
        self.intake = Intake(
            self.store,
            self.inbox,
            self.spool,
            settle_s=s.intake.settle_s,
            unterminated_settle_s=s.intake.unterminated_settle_s,
            suffixes=s.intake.suffixes,
            on_claimed=self.wake.poke("prepare"),
            on_pending=self.wake.poke("intake"),
        )
        self.preparer = Preparer(
            self.store,
            s,
            on_ready=self.wake.poke("submit"),
            on_rejected=self.wake.poke("publish"),
            retry_base_s=api.step_retry_base_s,
        )
        self.submitter = Submitter(
            self.store,
            self.api,
            self.limits,
            self.account,
            completion_window=s.jobs.completion_window,
            first_poll_s=s.poll.first_poll_s,
            concurrency=s.api.concurrency,
            on_created=self.wake.poke("poll"),
            on_replan=self.wake.poke("prepare"),
            policy=policy,
            settling=Settling(api.settle_after_s, api.clock_skew_s, api.max_list_pages),
        )
        self.poller = Poller(
            self.store,
            self.api,
            self.account,
            interval_s=s.poll.interval_s,
            jitter=s.poll.jitter,
            list_threshold=s.poll.list_threshold,
            lost_after_s=self._lost_after_s,
            on_ended=self.wake.poke("collect"),
            policy=policy,
            max_pages=api.max_list_pages,
        )
        self.collector = Collector(
            self.store,
            self.api,
            limits=self.limits,
            resubmit_failed=s.jobs.resubmit_failed,
            on_ready=self.wake.poke("publish"),
            on_follow_up=self.wake.poke("submit"),
            policy=policy,
            download_concurrency=s.api.download_concurrency,
            max_line_bytes=s.jobs.max_result_line_bytes,
            stopping=self.stopping,
        )
        self.publisher = Publisher(
            self.store,
            self.outbox,
            keep_input=s.jobs.keep_input,
            delete_remote_files=s.jobs.delete_remote_files,
            on_published=self._after_publish,
            on_retry_due=self.wake.poke("publish"),
            max_line_bytes=s.jobs.max_result_line_bytes,
        )

    def _after_publish(self) -> None:
        self.wake["cleanup"].set()
        self.wake["submit"].set()

    async def recover(self) -> None:
        """Settle every row a crash caught between an intent and its result."""
        await self.intake.recover_claims()
        self.state_lost = await self.intake.recover_orphans(self.outbox)
        parked = 0
        crashed = await self.store.crashed_jobs(
            [JobState.CLAIMED, JobState.PUBLISHING], self.settings.max_job_crashes
        )
        for job in crashed:
            await self.store.update_job(
                job.id,
                job.state,
                state=JobState.PARKED,
                error=f"parked after {job.crash_count} crashes while working on it",
            )
            log.error(
                "job_parked",
                job_id=job.id,
                name=job.name,
                state=str(job.state),
                crashes=job.crash_count,
                input=job.spool_path,
            )
            parked += 1
        # Parts caught in UPLOADING or CREATING are settled by the submitter's first pass
        # (it looks for the remote file or batch before doing anything again).
        counts = await self.store.part_counts()
        log.info("recovered", parked=parked, parts=counts)

    # -- stages -------------------------------------------------------------------------

    async def _stage(
        self,
        name: str,
        step: Callable[[], Awaitable[bool]],
        interval_s: float,
        idle_s: Callable[[float], Awaitable[float]] | None = None,
    ) -> None:
        """Run `step` while it has work; then sleep until poked, stopped, or `interval_s`
        (or what `idle_s(interval_s)` says, for a stage that knows when it is due)."""
        event = self.wake[name]
        while not self.stopping.is_set():
            event.clear()
            busy = await step()
            if busy:
                await asyncio.sleep(0)
                continue
            timeout = interval_s if idle_s is None else await idle_s(interval_s)
            waiters = [
                asyncio.ensure_future(event.wait()),
                asyncio.ensure_future(self.stopping.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    async def _intake_step(self) -> bool:
        if self.draining:
            return False
        return bool(await self.intake.run_once())

    async def _watch(self) -> None:
        """inotify through watchfiles: pokes the intake stage on any change in the inbox."""
        import watchfiles

        async for _changes in watchfiles.awatch(
            self.inbox, stop_event=self.stopping, debounce=50, step=50, recursive=False
        ):
            self.wake["intake"].set()

    async def _submit_step(self) -> bool:
        for job in await self.store.jobs_to_cancel():
            await self.submitter.cancel_job(job)
        return await self.submitter.run_once()

    async def _cleanup_step(self) -> bool:
        moved = False
        for file_id in await self.store.garbage(limit=50):
            try:
                await self.api.delete_file(file_id)
            except AccountError as err:
                self.account.pause(str(err))
                return moved
            except ApiError as err:
                log.warning("remote_delete_failed", file_id=file_id, error=str(err))
                return moved
            failpoint("cleanup.after_request")
            await self.store.drop_garbage(file_id)
            moved = True
        return moved

    async def _account_probe(self) -> bool:
        if self.account.paused_reason is None:
            return False
        try:
            await self.api.list_batches(limit="1")
        except ApiError as err:
            self.account.paused_reason = str(err)
            return False
        self.account.resume()
        self.wake["submit"].set()
        return False

    async def _drain_watch(self) -> bool:
        if not self.draining:
            return False
        counts = await self.store.job_counts()
        active = sum(n for state, n in counts.items() if state in JOB_ACTIVE)
        if active == 0:
            log.info("drained")
            self.stopping.set()
        return False

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Open, recover, run every stage until stop; returns the exit code. Whatever
        fails during start-up, what was already opened is closed again."""
        async with contextlib.AsyncExitStack() as stack:
            # First, before anything is opened: it checks the socket path and the group.
            self.control = ControlServer(
                self, self.settings.socket_path, self.settings.control.group
            )
            lock = self._lock_state()
            stack.callback(os.close, lock)
            await self._open(stack)
            stack.push_async_callback(self.control.stop)
            await self._serve(on_ready)
        log.info("daemon_stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _serve(self, on_ready: Callable[[], None] | None) -> None:
        await self.control.start()
        self.notifier.status("recovering")
        await self.recover()
        s = self.settings
        stages: dict[str, Awaitable[None]] = {
            "intake": self._stage("intake", self._intake_step, s.intake.rescan_interval_s),
            "prepare": self._stage("prepare", self.preparer.run_once, 5.0, self.preparer.idle_s),
            "submit": self._stage("submit", self._submit_step, 2.0, self.submitter.idle_s),
            "poll": self._stage("poll", self.poller.run_once, 1.0, self.poller.idle_s),
            "collect": self._stage("collect", self.collector.run_once, 5.0, self.collector.idle_s),
            "publish": self._stage("publish", self.publisher.run_once, 5.0),
            "cleanup": self._stage("cleanup", self._cleanup_step, 30.0),
            "account": self._stage("account", self._account_probe, s.api.account_probe_s),
            "drain": self._stage("drain", self._drain_watch, 1.0),
        }
        if s.intake.watch:
            stages["watch"] = self._watch()
        for name, coro in stages.items():
            self.tasks[name] = asyncio.create_task(coro, name=f"batchd.{name}")  # type: ignore[arg-type]
            self.tasks[name].add_done_callback(self._stage_done)
        log.info(
            "daemon_started",
            version=__version__,
            provider=self.profile.name,
            base_url=self.profile.base_url,
            root=str(s.paths.root),
        )
        if on_ready is not None:
            on_ready()
        await self.stopping.wait()
        self.notifier.stopping()
        await self._stop_tasks()

    def _lock_state(self) -> int:
        """One daemon per state folder: a second one would double every remote call."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "batchd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BatchdError(f"another batchd is already running on {self.state_dir}") from None
        return fd

    def _stage_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("stage_crashed", stage=task.get_name(), error=repr(exc), exc_info=exc)
            self.exit_code = 1
            self.stopping.set()

    async def _stop_tasks(self, grace_s: float = 20.0) -> None:
        for event in self.wake.events.values():
            event.set()
        pending = [t for t in self.tasks.values() if not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for task in self.tasks.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.exit_code = 1

    async def cancel_job(self, job_id: str) -> Job | None:
        """Ask for a job to be cancelled: parts not created are dropped, running batches
        are cancelled on the service; what finished before is still published."""
        job = await self.store.get_job(job_id)
        if job is None or job.state in JOB_TERMINAL or job.cancel_requested:
            return job
        await self.store.update_job(job_id, cancel_requested=True)
        log.info("job_cancel_requested", job_id=job_id)
        self.wake["submit"].set()
        return await self.store.get_job(job_id)

    def request_reload(self, load: Callable[[], Settings]) -> None:
        """Re-read the configuration; apply what can change without a restart."""
        try:
            new = load()
        except (ConfigError, ValueError) as exc:
            log.error("reload_failed", error=str(exc))
            return
        changed = self.apply_settings(new)
        log.info(
            "configuration_reloaded",
            applied=changed["applied"],
            needs_restart=changed["needs_restart"],
        )

    def apply_settings(self, new: Settings) -> dict[str, list[str]]:
        """Apply live-changeable settings; name the ones that need a restart."""
        old = self.settings
        applied: list[str] = []
        needs_restart: list[str] = []
        for key in ("provider", "base_url", "limits", "paths", "control", "api"):
            if getattr(old, key) != getattr(new, key):
                needs_restart.append(key)
        if old.log != new.log:
            configure(new.log.level, new.log.format)
            applied.append("log")
        if old.intake != new.intake:
            if old.intake.watch != new.intake.watch or old.intake.suffixes != new.intake.suffixes:
                needs_restart.append("intake.watch/suffixes")
            self.intake.settle_s = new.intake.settle_s
            self.intake.unterminated_settle_s = new.intake.unterminated_settle_s
            applied.append("intake")
        if old.poll != new.poll:
            self.poller.interval_s = new.poll.interval_s
            self.poller.jitter = new.poll.jitter
            self.poller.list_threshold = new.poll.list_threshold
            self.submitter.first_poll_s = new.poll.first_poll_s
            applied.append("poll")
        if old.jobs != new.jobs:
            self.submitter.completion_window = new.jobs.completion_window
            self.publisher.keep_input = new.jobs.keep_input
            self.publisher.delete_remote_files = new.jobs.delete_remote_files
            self.collector.resubmit_failed = new.jobs.resubmit_failed
            self.collector.max_line_bytes = new.jobs.max_result_line_bytes
            self.publisher.max_line_bytes = new.jobs.max_result_line_bytes
            applied.append("jobs")
        if old.max_reported_errors != new.max_reported_errors:
            applied.append("max_reported_errors")
        if old.max_job_crashes != new.max_job_crashes:
            applied.append("max_job_crashes")
        # Keep what cannot change live as it was, so status stays true to what runs.
        self.settings = new.model_copy(
            update={
                key: getattr(old, key)
                for key in ("provider", "base_url", "limits", "paths", "control", "api")
            }
        )
        self.preparer.settings = self.settings
        if old.intake.watch != new.intake.watch or old.intake.suffixes != new.intake.suffixes:
            self.settings = self.settings.model_copy(
                update={
                    "intake": new.intake.model_copy(
                        update={"watch": old.intake.watch, "suffixes": old.intake.suffixes}
                    )
                }
            )
        self.wake["intake"].set()
        return {"applied": applied, "needs_restart": needs_restart}

    def request_stop(self) -> None:
        log.info("stop_requested")
        self.stopping.set()

    def start_drain(self) -> None:
        """Finish what runs, take nothing new, then exit."""
        if not self.draining:
            log.info("drain_requested")
        self.draining = True
        self.wake["drain"].set()

    # -- what the control socket asks -------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Every stage alive, the account usable and the inbox readable."""
        stages_alive = all(not t.done() for t in self.tasks.values()) if self.tasks else False
        return stages_alive and self.account.paused_reason is None and self.intake.problem is None

    async def problems(self, limit: int = 20) -> tuple[int, list[Problem]]:
        """What cannot proceed without help or keeps failing, most pressing first."""
        found: list[Problem] = []
        if self.intake.problem is not None:
            found.append(Problem(kind="intake", note=self.intake.problem))
        for note in self.state_lost:
            found.append(Problem(kind="state_lost", note=note))
        count, parts = await self.store.problem_parts(limit)
        for part in parts:
            found.append(
                Problem(
                    kind="part_parked" if part.state == PartState.PARKED else "part_failing",
                    job_id=part.job_id,
                    part=part.seq,
                    note=part.error or "",
                    since=part.retry_at,
                )
            )
        parked_jobs = await self.store.count_jobs([JobState.PARKED])
        for job in await self.store.jobs([JobState.PARKED], limit=limit):
            found.append(
                Problem(
                    kind="job_parked", job_id=job.id, note=job.error or "", since=job.updated_at
                )
            )
        total = count + parked_jobs + (self.intake.problem is not None) + len(self.state_lost)
        return total, found[:limit]

    async def status(self) -> StatusResponse:
        total, by_model = await self.store.slot_holders()
        problem_count, problems = await self.problems()
        parked = any(p.kind == "part_parked" for p in problems)
        return StatusResponse(
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started_at, 3),
            provider=self.profile.name,
            base_url=self.profile.base_url,
            root=str(self.settings.paths.root),
            intake_paused=self.intake.paused,
            draining=self.draining,
            account_paused=self.account.paused_reason,
            jobs_by_state=await self.store.job_counts(),
            jobs_by_outcome=await self.store.outcome_counts(),
            parts_by_state=await self.store.part_counts(),
            caps=Caps(
                running_batches=total,
                running_cap=self.limits.running_batches,
                running_by_model=by_model,
            ),
            bucket_levels=self.api.limiter.levels(),
            api_calls={str(k): v for k, v in self.api.limiter.sent.items() if v},
            throttled={str(k): v for k, v in self.api.limiter.throttled.items()},
            last_errors={str(k): v for k, v in self.api.last_error.items()},
            healthy=self.healthy and not parked and not self.state_lost,
            problems=problems,
            problem_count=problem_count,
        )

    async def job_info(self, job_id: str, *, detail: bool = False) -> JobInfo | None:
        job = await self.store.get_job(job_id)
        if job is None:
            return None
        return await self._job_info(job, detail)

    async def _job_info(self, job: Job, detail: bool) -> JobInfo:
        parts = await self.store.parts_of(job.id) if detail else None
        requests = (job.report or {}).get("requests")
        completed, failed = job.completed, job.failed
        if job.state != JobState.PUBLISHED:
            all_parts = parts if parts is not None else await self.store.parts_of(job.id)
            completed = sum((p.request_counts or {}).get("completed", 0) for p in all_parts)
            failed = sum((p.request_counts or {}).get("failed", 0) for p in all_parts)
        return JobInfo(
            id=job.id,
            name=job.name,
            inbox_name=job.inbox_name,
            kind=job.kind,
            state=job.state,
            outcome=job.outcome,
            requests=requests if isinstance(requests, int) else None,
            completed=completed,
            failed=failed,
            bytes=job.bytes,
            sha256=job.sha256,
            cancel_requested=job.cancel_requested,
            error=job.error,
            outbox_path=job.outbox_path,
            created_at=job.created_at,
            updated_at=job.updated_at,
            parts=[_part_info(p) for p in parts] if parts is not None else None,
            report=job.report if detail else None,
        )

    async def list_jobs(
        self, states: list[str] | None, name: str | None, limit: int, offset: int
    ) -> JobList:
        try:
            wanted = [JobState(s) for s in states] if states else None
        except ValueError:
            known = ", ".join(s.value for s in JobState)
            raise ValueError(f"unknown state in {states}; states are: {known}") from None
        jobs = await self.store.jobs(wanted, name=name, limit=limit, offset=offset)
        return JobList(
            jobs=[await self._job_info(j, False) for j in jobs],
            total=await self.store.count_jobs(wanted, name),
            limit=limit,
            offset=offset,
        )

    async def cancel_action(self, job_id: str) -> ActionResponse | None:
        job = await self.store.get_job(job_id)
        if job is None:
            return None
        if job.state in JOB_TERMINAL:
            return ActionResponse(
                ok=False,
                message=f"job {job_id} is already {job.state}",
                job=await self._job_info(job, False),
            )
        await self.cancel_job(job_id)
        return ActionResponse(
            ok=True,
            message="cancelling: parts not yet created are dropped, running batches cancelled",
            job=await self.job_info(job_id),
        )

    async def retry_action(self, job_id: str) -> ActionResponse | None:
        """Rerun what failed or never ran: parked jobs are requeued, parked parts resume
        where they stopped, parts that could not be submitted are submitted again, and a
        published job's failed requests become a new input `NAME-retry.jsonl` in the
        inbox (with the job's options). Asked twice, it answers with what the first did:
        a script that repeats itself after a timeout never pays for the requests twice."""
        async with self._retry_lock:
            job = await self.store.get_job(job_id)
            if job is None:
                return None
            if job.state == JobState.PARKED:
                if not Path(job.spool_path).exists():
                    return ActionResponse(ok=False, message="the parked job's input is gone")
                await self.store.update_job(
                    job_id,
                    JobState.PARKED,
                    state=JobState.CLAIMED,
                    crash_count=0,
                    prepares=0,
                    error=None,
                )
                self.wake["prepare"].set()
                return ActionResponse(ok=True, message="requeued", job=await self.job_info(job_id))
            if job.state == JobState.RUNNING:
                again = await self._resume_parts(job_id)
                if not again:
                    return ActionResponse(ok=False, message="nothing has failed (yet) in this job")
                return ActionResponse(ok=True, message=f"{again} part(s) will be tried again")
            if job.state == JobState.PUBLISHED and job.outcome != "rejected" and job.outbox_path:
                return await self._retry_published(job)
            return ActionResponse(
                ok=False,
                message=f"job is {job.outcome or job.state}: nothing to retry"
                + (" (fix the input and drop it again)" if job.outcome == "rejected" else ""),
            )

    async def _resume_parts(self, job_id: str) -> int:
        """Failed parts are submitted again; parked parts go back to where they stopped."""
        again = 0
        now = time.time()
        for part in await self.store.parts_of(job_id):
            if part.state == PartState.FAILED:
                fields: dict[str, Any] = {"state": PartState.PENDING}
            elif part.state == PartState.PARKED and part.parked_from:
                fields = {"state": PartState(part.parked_from), "parked_from": None}
                if part.parked_from == PartState.RUNNING:
                    fields["next_poll_at"] = now
            else:
                continue
            if await self.store.update_part(
                part.id, part.state, attempts=0, retry_at=None, error=None, **fields
            ):
                again += 1
        for stage in ("submit", "poll", "collect"):
            self.wake[stage].set()
        return again

    async def _retry_published(self, job: Job) -> ActionResponse:
        if job.retried_as is not None:
            await asyncio.to_thread(finish_retry_input, job.retried_as, self.inbox)
            return ActionResponse(
                ok=True,
                message=f"already resubmitted as {job.retried_as} (retry that job to go again)",
            )
        planned = await asyncio.to_thread(
            write_retry_input,
            job,
            Path(job.outbox_path or ""),
            self.inbox,
            self.settings.jobs.max_result_line_bytes,
        )
        if planned is None:
            return ActionResponse(ok=False, message="no failed requests, or input not kept")
        # Committed before the file appears under its name: a crash in between leaves a
        # hidden temp file that the next `retry` finishes, never a second input.
        await self.store.update_job(job.id, JobState.PUBLISHED, retried_as=planned)
        await asyncio.to_thread(finish_retry_input, planned, self.inbox)
        self.wake["intake"].set()
        return ActionResponse(ok=True, message=f"failed requests resubmitted as {planned}")

    async def status_line(self) -> str:
        """The one line systemd shows in `systemctl status` (STATUS=)."""
        jobs = await self.store.job_counts()
        parts = await self.store.part_counts()
        running, _ = await self.store.slot_holders()
        return status_text(
            jobs_active=sum(n for s, n in jobs.items() if s in JOB_ACTIVE),
            parts_queued=sum(parts.get(s, 0) for s in PART_QUEUED),
            running=running,
            running_cap=self.limits.running_batches,
            intake_paused=self.intake.paused,
            draining=self.draining,
            account_paused=self.account.paused_reason,
        )

    async def metrics_snapshot(self) -> dict[str, Any]:
        totals = await self.store.totals()
        total, _ = await self.store.slot_holders()
        oldest = totals["oldest_active_at"]
        return {
            "jobs_by_state": await self.store.job_counts(),
            "jobs_by_outcome": await self.store.outcome_counts(),
            "requests": {"completed": totals["completed"], "failed": totals["failed"]},
            "api_calls": {str(k): v for k, v in self.api.limiter.sent.items() if v},
            "throttled": {str(k): v for k, v in self.api.limiter.throttled.items()},
            "bucket_levels": self.api.limiter.levels(),
            "running": total,
            "running_cap": self.limits.running_batches,
            "queue_age_s": max(0.0, time.time() - oldest) if oldest else 0.0,
            "tokens": {
                "prompt": totals["prompt_tokens"],
                "completion": totals["completion_tokens"],
            },
        }

    async def describe_event(self, raw: dict[str, Any]) -> Event | None:
        if raw.get("type") == "job":
            return event_from(raw, str(raw.get("id")), None)
        if raw.get("type") == "part":
            part = await self.store.get_part(int(raw.get("id") or 0))
            if part is None:
                return None
            event = event_from(raw, part.job_id, part.seq)
            event.requests = part.requests
            if event.request_counts is None:
                event.request_counts = part.request_counts
            return event
        return None


def _part_info(p: Part) -> PartInfo:
    return PartInfo(
        seq=p.seq,
        state=p.state,
        requests=p.requests,
        bytes=p.bytes,
        model=p.model,
        endpoint=p.endpoint,
        first_line=p.first_line,
        remote_file_id=p.remote_file_id,
        batch_id=p.batch_id,
        remote_status=p.remote_status,
        request_counts=p.request_counts,
        output_file_id=p.output_file_id,
        error_file_id=p.error_file_id,
        created_remote_at=p.created_remote_at,
        ended_at=p.ended_at,
        error=p.error,
        attempts=p.attempts,
        retry_at=p.retry_at,
        parked_from=p.parked_from,
        unavailable=p.unavailable,
    )


def write_retry_input(
    job: Job, folder: Path, inbox: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> str | None:
    """Copy the input lines listed in a published job's error.jsonl into a hidden temp
    file in the inbox (fsynced), with the job's options as its sidecar; the name it is to
    take (`finish_retry_input` gives it), or None when there is nothing to retry."""
    source = folder / "input.jsonl"
    errors = folder / "error.jsonl"
    if not source.exists() or not errors.exists():
        return None
    wanted: set[int] = set()
    with errors.open("rb") as fh:
        for line in iter_lines(fh, max_line_bytes):
            at = fh.tell()
            number = None if line.blank else input_line_of(fh, line)
            fh.seek(at)
            if number is not None:
                wanted.add(number)
    if not wanted:
        return None
    name = f"{job.name}-retry"
    n = 1
    while (inbox / f"{name}.jsonl").exists() or (inbox / f".{name}.jsonl.tmp").exists():
        n += 1
        name = f"{job.name}-retry{n}"
    if job.options:
        write_atomic(inbox / f"{name}.meta.json", orjson.dumps(job.options))
    tmp = inbox / f".{name}.jsonl.tmp"
    with source.open("rb") as src, tmp.open("wb") as out:
        for number, request in enumerate(src, start=1):
            if number in wanted:
                out.write(request if request.endswith(b"\n") else request + b"\n")
        out.flush()
        os.fsync(out.fileno())
    log.info("retry_input_written", job_id=job.id, name=f"{name}.jsonl", requests=len(wanted))
    return f"{name}.jsonl"


def finish_retry_input(name: str, inbox: Path) -> None:
    """Give the retry input written by `write_retry_input` its name (once; again after a
    crash between the two is harmless)."""
    tmp = inbox / f".{name}.tmp"
    if tmp.exists() and not (inbox / name).exists():
        os.rename(tmp, inbox / name)
        fsync_dir(inbox)


async def reload_loop(
    daemon: Daemon,
    notifier: Notifier,
    load: Callable[[], Settings],
    hup: asyncio.Event,
    done: asyncio.Event,
) -> None:
    """Each SIGHUP (`hup`): re-read the configuration and apply what can change live."""
    finished = asyncio.ensure_future(done.wait())
    try:
        while not done.is_set():
            signalled = asyncio.ensure_future(hup.wait())
            await asyncio.wait({signalled, finished}, return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            if done.is_set():
                return
            hup.clear()
            notifier.reloading()
            daemon.request_reload(load)
            notifier.ready(status="configuration reloaded")
    finally:
        finished.cancel()


def run_daemon(
    settings: Settings, api_key: str, reload: Callable[[], Settings] | None = None
) -> int:
    """Run the daemon until SIGTERM/SIGINT (graceful) and return its exit code. SIGHUP
    re-reads the configuration through `reload` and applies what can change live."""

    async def main() -> int:
        notifier = Notifier.from_env()
        daemon = Daemon(settings, api_key, notifier=notifier)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        done = asyncio.Event()
        # Pings start before the store opens: recovery awaits, so the loop keeps pinging
        # through it; a blocked loop stops them, which is the point.
        side = [asyncio.create_task(watchdog_loop(notifier, done), name="batchd.watchdog")]
        if reload is not None:
            # The signal handler only sets an event; the reload runs as a task of its own.
            hup = asyncio.Event()
            loop.add_signal_handler(signal.SIGHUP, hup.set)
            side.append(
                asyncio.create_task(
                    reload_loop(daemon, notifier, reload, hup, done), name="batchd.reload"
                )
            )

        def on_ready() -> None:
            # Called once the store is open, recovery done and the control socket listens.
            notifier.ready()
            side.append(
                asyncio.create_task(
                    status_loop(notifier, done, daemon.status_line), name="batchd.status"
                )
            )

        try:
            return await daemon.run(on_ready=on_ready)
        finally:
            done.set()
            await asyncio.gather(*side, return_exceptions=True)

    return asyncio.run(main())
