"""The daemon: the composition root. It opens the store and the API client, builds the
stages, the operations layer and the control socket, runs every stage as a named,
supervised task, and closes what it opened.

A stage that raises unexpectedly stops the daemon with exit code 1 (systemd restarts it;
recovery settles whatever the crash interrupted). Stop is an event: stages finish their
current step within a grace period, then are cancelled. Whatever fails during start-up,
what was already opened is closed again (exit 2 for a configuration error).

A fault of this machine never stops the daemon (batchd.faults): a full, failing or
locked state database, a full spool, a stepped clock are waited out and shown, at start
as while running. Exit 2, which systemd does not restart, is for what a person must fix
before the daemon can start at all: a folder that cannot be written (read-only, or not
the daemon's), a bad configuration, no API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from batchd import __version__
from batchd.clock import SYSTEM_CLOCK, Clock, ClockWatch, SystemClock
from batchd.config import Settings
from batchd.errors import BatchdError, ConfigError
from batchd.faults import DATABASE, Faults, describe, local_cause, unusable_folder
from batchd.logs import configure, get_logger, register_secret
from batchd.models import JobState, Part, window_hours
from batchd.objstore import open_store
from batchd.operator.control import ControlServer, check_socket_path, resolve_group
from batchd.operator.ops import Operations
from batchd.operator.protocol import Reload
from batchd.pipeline.account import AccountProbe, AccountState
from batchd.pipeline.cleanup import RemoteCleanup
from batchd.pipeline.collect import Collector
from batchd.pipeline.extras import ExtraBatches
from batchd.pipeline.intake import Intake
from batchd.pipeline.notify import Notifications, load_webhook_secret
from batchd.pipeline.ossinputs import OssInputs
from batchd.pipeline.poll import Poller
from batchd.pipeline.prepare import Preparer
from batchd.pipeline.publish import Publisher
from batchd.pipeline.stages import Activity, Stage, Wake, run_stage
from batchd.pipeline.submit import Submitter
from batchd.provider.api import BatchApi, RetryPolicy, Throughput
from batchd.provider.limits import CallClass, RateLimiter
from batchd.store import Store
from batchd.systemd import Notifier, status_loop, watchdog_loop

if TYPE_CHECKING:
    from batchd.objstore.bucket import Bucket, ObjectStore

log = get_logger(__name__)

# Settings a SIGHUP cannot change: they are named as waiting for a restart. The state
# database's busy timeout is set when the store is opened.
RESTART_KEYS = (
    "provider",
    "base_url",
    "limits",
    "paths",
    "control",
    "api",
    "notify",
    "storage",
    "db_busy_timeout_s",
)
# Within [intake], what the inbox watcher was started with (named as one).
RESTART_INTAKE_KEYS = ("watch", "suffixes")
# Every other key is live: the stages read the settings in force at each use
# (`Daemon.current_settings`), so a reload is one assignment. A live key that needs an
# action when it changes has it named in `apply_settings`.
LIVE_KEYS = (
    "log",
    "intake",
    "poll",
    "jobs",
    "budget",
    "prices",
    "max_reported_errors",
    "max_job_crashes",
    "max_part_failures",
)

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
    failing every claim forever. Proven by renaming a hidden probe file across; when
    the probe cannot even be made (a disk full to its last inode), the daemon starts all
    the same: a fault of this machine is waited out, never an exit."""
    probe = inbox / f".batchd-probe-{os.getpid()}"
    target = spool / probe.name
    try:
        try:
            probe.touch()
        except OSError as exc:
            if local_cause(exc) is None:
                raise
            log.warning("filesystem_check_skipped", folder=str(inbox), error=str(exc))
            return
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


class Daemon:
    def __init__(
        self,
        settings: Settings,
        api_key: str,
        *,
        notifier: Notifier | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        register_secret(api_key)
        # The webhook signing key (env or credential); refused at once when malformed, or
        # missing while webhooks are configured (exit 2).
        self._webhook_secret = load_webhook_secret()
        if settings.notify.webhook_urls and self._webhook_secret is None:
            raise ConfigError(
                "[notify] webhook_urls needs a signing secret: set BATCHD_WEBHOOK_SECRET or"
                " give systemd a credential named webhook_secret (whsec_ + base64)"
            )
        # The one clock every stage, the operations layer, the API client and the store
        # read time through (tests hand in a FakeClock).
        self.clock = clock
        self.notifier = notifier or Notifier(None)
        self.settings = settings
        self.profile = settings.profile
        self.limits = self.profile.limits
        paths = settings.paths
        self.inbox = paths.folder("inbox")
        self.spool = paths.folder("spool")
        self.outbox = paths.folder("outbox")
        self.state_dir = paths.folder("state")
        # The folders that are bucket folders (oss://, s3://), by name; for each, the
        # local folder above is where batchd works on its objects. The object store's
        # client is opened with the rest (`_open`); its credentials are read now, so
        # that half a key pair is a configuration error (exit 2) before anything starts.
        self.bucket_urls = paths.buckets()
        self.objects: ObjectStore | None = (
            open_store(settings.storage) if self.bucket_urls else None
        )
        self.buckets: dict[str, Bucket] = {}
        self._api_key = api_key
        self.stopping = asyncio.Event()
        self.wake = Wake()
        # Each stage's passes, for tests to wait until the work has run out.
        self.activity = Activity()
        # This machine's faults in force, shown by status, check and /metrics.
        api = settings.api
        self.faults = Faults(
            folders={
                "inbox": self.inbox,
                "spool": self.spool,
                "outbox": self.outbox,
                "state": self.state_dir,
            },
            clock=clock,
            base_s=api.step_retry_base_s,
            cap_s=min(60.0, api.step_retry_cap_s),
        )
        self.clock_watch = ClockWatch(clock)
        self.account = AccountState(
            clock=clock,
            on_down=self.wake.poke(Stage.ACCOUNT),
            on_back=self._provider_back,
        )
        self.started_at = clock.now()
        self.tasks: dict[Stage, asyncio.Task[None]] = {}
        self.store: Store
        self.api: BatchApi
        self.ops: Operations
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

    def _check_folders(self) -> None:
        """Each folder made if missing, and refused (exit 2) when it cannot be written for
        a reason a person must fix (read-only, not the daemon's); a full disk is not."""
        for name, folder in self.faults.folders.items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                raise ConfigError(
                    f"the {name} folder {folder} cannot be made ({describe(exc)}:"
                    f" {exc.strerror}); create it, or make its parent writable (paths.{name})"
                ) from None
            unusable_folder(name, folder)

    async def _open_store(self) -> Store | None:
        """The store, opened once the state database can be: a fault of this machine
        (a full or failing disk, another process holding the database) is waited out and
        shown, never an exit. None when a stop came first."""
        path = self.state_dir / "batchd.sqlite3"
        while True:
            try:
                return await Store.open(
                    path,
                    self.clock,
                    faults=self.faults,
                    busy_timeout_s=self.settings.db_busy_timeout_s,
                )
            except (sqlite3.Error, OSError) as exc:
                local = local_cause(exc)
                if local is None:
                    raise
                pause = self.faults.met(local, "start-up (opening the state database)", DATABASE)
                self.notifier.status(f"waiting for the state database: {describe(local)}")
                self.notifier.extend_timeout(pause + 30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)
            if self.stopping.is_set():
                return None

    async def _open(self, stack: contextlib.AsyncExitStack) -> bool:
        """Open the store and the API client, each closed by `stack` whatever follows;
        False when a stop came before the store could be opened."""
        if "inbox" not in self.bucket_urls and "spool" not in self.bucket_urls:
            check_same_filesystem(self.inbox, self.spool)
        if self.objects is not None:
            stack.push_async_callback(self.objects.close)
            self.buckets = {
                name: self.objects.bucket(url, area=name) for name, url in self.bucket_urls.items()
            }
        store = await self._open_store()
        if store is None:
            return False
        self.store = store
        stack.push_async_callback(self.store.close)
        api = self.settings.api
        self.api = BatchApi(
            self.profile.base_url,
            self._api_key,
            self._limiter(),
            retry=RetryPolicy(api.max_attempts, api.backoff_base_s, api.backoff_cap_s),
            timeout_s=api.timeout_s,
            throughput=Throughput(api.download_min_bytes_per_s, api.download_grace_s),
            clock=self.clock,
        )
        # Every call tells whether the provider answers at all (an outage pauses calls).
        self.api.on_answer = self.account.answered
        self.api.on_silence = self.account.unreachable
        stack.push_async_callback(self.api.close)
        # Every stage reads the settings in force through this one callable: a reload
        # replaces `self.settings` and they read the new values from their next use.
        settings = self.current_settings
        inbox_bucket = self.buckets.get("inbox")
        self.intake: Intake
        if inbox_bucket is not None:
            # Needs the storage extra, there when a bucket is opened.
            from batchd.pipeline.bucket_intake import BucketIntake

            # Listed every intake.rescan_interval_s: a bucket has no inotify.
            self.intake = BucketIntake(
                self.store,
                self.inbox,
                self.spool,
                settings,
                bucket=inbox_bucket,
                spool_bucket=self.buckets.get("spool"),
                on_claimed=self.wake.poke(Stage.PREPARE),
                clock=self.clock,
            )
        else:
            self.intake = Intake(
                self.store,
                self.inbox,
                self.spool,
                settings,
                on_claimed=self.wake.poke(Stage.PREPARE),
                on_pending=self.wake.poke(Stage.INTAKE),
                clock=self.clock,
            )
        self.preparer = Preparer(
            self.store,
            settings,
            on_ready=self.wake.poke(Stage.SUBMIT),
            on_rejected=self.wake.poke(Stage.PUBLISH),
            clock=self.clock,
            on_held=self.wake.poke(Stage.NOTIFY),
            faults=self.faults,
        )
        # A part's extra batches (a gateway's retried create): found by the submit and
        # poll stages, cancelled and followed by the submit stage.
        self.extras = ExtraBatches(
            self.store,
            self.api,
            self.account,
            self.clock,
            settings=settings,
            on_garbage=self.wake.poke(Stage.CLEANUP),
        )
        # The spool bucket as the submit and publish stages see it: parts the service
        # reads from it instead of an upload, removed once their job is published.
        self.oss_inputs = OssInputs(self.buckets.get("spool"), settings, clock=self.clock)
        self.submitter = Submitter(
            self.store,
            self.api,
            settings,
            self.limits,
            self.account,
            on_created=self.wake.poke(Stage.POLL),
            on_replan=self.wake.poke(Stage.PREPARE),
            clock=self.clock,
            on_held=self.wake.poke(Stage.NOTIFY),
            extras=self.extras,
            faults=self.faults,
            oss=self.oss_inputs,
        )
        self.poller = Poller(
            self.store,
            self.api,
            settings,
            self.account,
            lost_after_s=self._lost_after_s,
            on_ended=self.wake.poke(Stage.COLLECT),
            clock=self.clock,
            extras=self.extras,
            faults=self.faults,
        )
        self.collector = Collector(
            self.store,
            self.api,
            settings,
            self.limits,
            on_ready=self.wake.poke(Stage.PUBLISH),
            on_follow_up=self.wake.poke(Stage.SUBMIT),
            stopping=self.stopping,
            account=self.account,
            clock=self.clock,
            faults=self.faults,
        )
        self.publisher = Publisher(
            self.store,
            self.outbox,
            settings,
            self.limits,
            on_published=self._after_publish,
            on_retry_due=self.wake.poke(Stage.PUBLISH),
            clock=self.clock,
            bucket=self.buckets.get("outbox"),
            faults=self.faults,
            remove_spool_objects=self.oss_inputs.remove_job if "spool" in self.buckets else None,
        )
        self.cleanup = RemoteCleanup(self.store, self.api, self.account)
        self.probe = AccountProbe(
            self.api, self.account, settings, on_resumed=self.wake.poke(Stage.SUBMIT)
        )
        self.notifications = Notifications(
            self.store, settings, self._webhook_secret, self.account, clock=self.clock
        )
        stack.push_async_callback(self.notifications.close)
        self.ops = Operations(
            self.store,
            settings,
            intake=self.intake,
            account=self.account,
            api=self.api,
            wake=self.wake,
            stopping=self.stopping,
            stages_alive=self._stages_alive,
            started_at=self.started_at,
            clock=self.clock,
            inputs_kept=lambda: self.publisher.inputs_kept,
            faults=self.faults,
            outbox_bucket=self.buckets.get("outbox"),
            oss_inputs=self.oss_inputs.report,
        )
        return True

    def current_settings(self) -> Settings:
        """The settings in force: what every stage reads, replaced whole by a reload."""
        return self.settings

    def _provider_back(self) -> None:
        """The provider answers again after an outage: every stage that calls it goes on."""
        for stage in (Stage.SUBMIT, Stage.POLL, Stage.COLLECT, Stage.CLEANUP):
            self.wake[stage].set()

    def _after_publish(self) -> None:
        self.wake[Stage.CLEANUP].set()
        # Spend and the running worst case changed (the money holds), and an earlier job
        # a duplicate is held on may have ended (the duplicate holds).
        self.wake[Stage.SUBMIT].set()
        self.preparer.cause_changed()
        self.wake[Stage.PREPARE].set()
        self.wake[Stage.NOTIFY].set()

    def _stages_alive(self) -> bool:
        return bool(self.tasks) and all(not t.done() for t in self.tasks.values())

    async def recover(self) -> None:
        """Settle every row a crash caught between an intent and its result."""
        await self._reschedule()
        await self.ops.restore()
        await self.intake.recover_claims()
        self.ops.state_lost = await self.intake.recover_orphans(
            self.outbox, self.buckets.get("outbox")
        )
        parked = 0
        crashed = await self.store.crashed_jobs(
            [JobState.CLAIMED, JobState.PUBLISHING], self.settings.max_job_crashes
        )
        for job in crashed:
            if not await self.store.move_job(
                job.id,
                job.state,
                JobState.PARKED,
                error=f"parked after {job.crash_count} crashes while working on it",
            ):
                continue
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

    async def _reschedule(self) -> None:
        """What the last run scheduled is on its steady clock, which this run anchors to
        the wall clock afresh: a wall-clock step during the last run shifts it by the
        step. Nothing is left further ahead than a pause can last (a step back would
        otherwise hold it for as long), and a part caught between an intent and its
        result is looked for no sooner than `api.settle_after_s` from now, however long
        ago the wall clock says the intent was."""
        s = self.settings
        now = self.clock.steady()
        moved = await self.store.reschedule(
            now,
            retry_within_s=max(s.api.step_retry_cap_s, s.api.settle_after_s),
            poll_within_s=max(s.poll.interval_s * (1 + s.poll.jitter), s.poll.first_poll_s),
            settle_s=s.api.settle_after_s,
        )
        if moved:
            log.info("rescheduled", parts=moved)

    # -- stages -------------------------------------------------------------------------

    async def _intake_step(self) -> bool:
        if self.ops.draining:
            return False
        return bool(await self.intake.run_once())

    async def _rescan_s(self, _longest_s: float) -> float:
        """The intake stage's safety-net rescan interval, as the settings in force say."""
        return self.settings.intake.rescan_interval_s

    async def _watch(self) -> None:
        """inotify through watchfiles: pokes the intake stage on any change in the inbox."""
        import watchfiles

        async for _changes in watchfiles.awatch(
            self.inbox, stop_event=self.stopping, debounce=50, step=50, recursive=False
        ):
            self.wake[Stage.INTAKE].set()

    async def _clock_step(self) -> bool:
        step = self.clock_watch.check()
        if step is not None:
            self.faults.stepped(step)
        return False

    async def _submit_step(self) -> bool:
        cancelled = await self.store.jobs_to_cancel()
        for job in cancelled:
            await self.submitter.cancel_job(job)
        if cancelled:
            # Parts never created are settled now: the job may be ready to publish.
            self.wake[Stage.COLLECT].set()
        return await self.submitter.run_once()

    def _stages(self) -> dict[Stage, Awaitable[None]]:
        s = self.settings

        def stage(
            name: Stage,
            step: Callable[[], Awaitable[bool]],
            interval_s: float,
            idle_s: Callable[[float], Awaitable[float]] | None = None,
        ) -> Awaitable[None]:
            return run_stage(
                name,
                step,
                interval_s,
                self.wake,
                self.stopping,
                idle_s,
                faults=self.faults,
                activity=self.activity,
            )

        stages: dict[Stage, Awaitable[None]] = {
            Stage.INTAKE: stage(
                Stage.INTAKE, self._intake_step, s.intake.rescan_interval_s, self._rescan_s
            ),
            Stage.PREPARE: stage(Stage.PREPARE, self.preparer.run_once, 5.0, self.preparer.idle_s),
            Stage.SUBMIT: stage(Stage.SUBMIT, self._submit_step, 2.0, self.submitter.idle_s),
            Stage.POLL: stage(Stage.POLL, self.poller.run_once, 1.0, self.poller.idle_s),
            Stage.COLLECT: stage(
                Stage.COLLECT, self.collector.run_once, 5.0, self.collector.idle_s
            ),
            Stage.PUBLISH: stage(Stage.PUBLISH, self.publisher.run_once, 5.0),
            Stage.CLEANUP: stage(Stage.CLEANUP, self.cleanup.run_once, 30.0),
            Stage.ACCOUNT: stage(
                Stage.ACCOUNT, self.probe.run_once, s.api.account_probe_s, self.probe.idle_s
            ),
            Stage.DRAIN: stage(Stage.DRAIN, self.ops.drain_watch, 1.0),
            Stage.NOTIFY: stage(
                Stage.NOTIFY, self.notifications.run_once, 60.0, self.notifications.idle_s
            ),
            Stage.CLOCK: stage(Stage.CLOCK, self._clock_step, 1.0),
        }
        if s.intake.watch and "inbox" not in self.bucket_urls:
            stages[Stage.WATCH] = self._watch()
        return stages

    # -- running ------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Open, recover, run every stage until stop; returns the exit code. Whatever
        fails during start-up, what was already opened is closed again."""
        control = self.settings.control
        # First, before anything is opened: a socket path the kernel cannot bind and a
        # group that does not exist are configuration errors (exit 2), not hangs.
        check_socket_path(self.settings.socket_path)
        resolve_group(control.group)
        self._check_folders()
        async with contextlib.AsyncExitStack() as stack:
            lock = self._lock_state()
            stack.callback(os.close, lock)
            if not await self._open(stack):
                log.info("daemon_stopped", exit_code=self.exit_code)
                return self.exit_code
            self.control = ControlServer(
                self.ops,
                self.settings.socket_path,
                control.group,
                max_connections=control.max_connections,
                request_timeout_s=control.request_timeout_s,
                max_streams=control.max_streams,
                stream_timeout_s=control.stream_timeout_s,
            )
            stack.push_async_callback(self.control.stop)
            await self._serve(on_ready)
        log.info("daemon_stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _serve(self, on_ready: Callable[[], None] | None) -> None:
        await self.control.start()
        self.notifier.status("recovering")
        await self._recover_through_faults()
        if self.stopping.is_set():
            return
        for name, coro in self._stages().items():
            self.tasks[name] = asyncio.create_task(coro, name=f"batchd.{name}")  # type: ignore[arg-type]
            self.tasks[name].add_done_callback(self._stage_done)
        log.info(
            "daemon_started",
            version=__version__,
            provider=self.profile.name,
            base_url=self.profile.base_url,
            root=str(self.settings.paths.root),
        )
        if on_ready is not None:
            on_ready()
        await self.stopping.wait()
        self.notifier.stopping()
        await self._stop_tasks()

    async def _recover_through_faults(self) -> None:
        """`recover`, waiting out the faults of this machine it meets (its writes wait
        inside the store; a folder's error ends one try, and recovery is tried again):
        systemd is asked for more time to start while a fault lasts."""
        done = asyncio.Event()

        async def keep_alive() -> None:
            while not done.is_set():
                for fault in self.faults.pausing()[:1]:
                    self.notifier.status(f"recovering: waiting for {fault.key}: {fault.what}")
                    self.notifier.extend_timeout(30.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 10.0)

        alive = asyncio.create_task(keep_alive(), name="batchd.recovering")
        try:
            while not self.stopping.is_set():
                try:
                    await self.recover()
                    return
                except Exception as exc:
                    local = local_cause(exc)
                    if local is None:
                        raise
                    pause = self.faults.met(local, "start-up recovery")
                    log.warning("recovery_waits", error=str(local), retry_in_s=pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), pause)
        finally:
            done.set()
            await alive

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
        self.wake.all()
        pending = [t for t in self.tasks.values() if not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for task in self.tasks.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.exit_code = 1

    def request_reload(self, load: Callable[[], Settings]) -> None:
        """Re-read the configuration; apply what can change without a restart."""
        try:
            new = load()
        except (ConfigError, ValueError) as exc:
            log.error("reload_failed", error=str(exc))
            self.ops.last_reload = Reload(at=self.clock.now(), ok=False, error=str(exc))
            return
        changed = self.apply_settings(new)
        log.info(
            "configuration_reloaded",
            applied=changed["applied"],
            needs_restart=changed["needs_restart"],
        )
        self.ops.last_reload = Reload(
            at=self.clock.now(),
            ok=True,
            applied=changed["applied"],
            needs_restart=changed["needs_restart"],
        )

    def apply_settings(self, new: Settings) -> dict[str, list[str]]:
        """Apply live-changeable settings; name the ones that need a restart."""
        old = self.settings
        needs_restart = [key for key in RESTART_KEYS if getattr(old, key) != getattr(new, key)]
        intake_restart = {
            key: getattr(old.intake, key)
            for key in RESTART_INTAKE_KEYS
            if getattr(old.intake, key) != getattr(new.intake, key)
        }
        if intake_restart:
            needs_restart.append("intake.watch/suffixes")
        applied = [key for key in LIVE_KEYS if getattr(old, key) != getattr(new, key)]
        # The one assignment: every stage reads `self.settings` at its next use. What
        # cannot change live is kept as it was, so status stays true to what runs.
        kept = {key: getattr(old, key) for key in RESTART_KEYS}
        if intake_restart:
            kept["intake"] = new.intake.model_copy(update=intake_restart)
        self.settings = new.model_copy(update=kept)
        # What a change needs besides being read: named, one by one.
        if "log" in applied:
            configure(new.log.level, new.log.format)
        if "budget" in applied or "prices" in applied:
            # The money holds are judged again at the next pass: a raised cap releases
            # held parts, new prices price the parts planned without one (and count for
            # jobs planned or published from now on).
            self.wake[Stage.SUBMIT].set()
        # `jobs.duplicate_window` may have changed: the duplicate holds are judged again.
        self.preparer.cause_changed()
        self.wake[Stage.PREPARE].set()
        self.wake[Stage.INTAKE].set()
        return {"applied": applied, "needs_restart": needs_restart}

    def request_stop(self) -> None:
        # The event first: nothing after it (a log line) may keep a signal from stopping.
        self.stopping.set()
        log.info("stop_requested")


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
        # The system clock (stepped from outside only by the test-only variable
        # BATCHD_TEST_CLOCK_STEP_FILE, see batchd.clock).
        daemon = Daemon(settings, api_key, notifier=notifier, clock=SystemClock.from_env())
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
                    status_loop(notifier, done, daemon.ops.status_line), name="batchd.status"
                )
            )

        try:
            return await daemon.run(on_ready=on_ready)
        finally:
            done.set()
            await asyncio.gather(*side, return_exceptions=True)

    return asyncio.run(main())
