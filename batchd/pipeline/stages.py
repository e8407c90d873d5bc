"""The stages by name, how they are woken, and the loop each one runs.

Each stage is a loop that runs one step, then waits for "new work" (its wake event),
"interval elapsed" or "stop", whichever comes first. A step returns True when it did
something, and then runs again at once.

A step that raises a fault of this machine (a full disk, a read-only folder, a database
that cannot be read: batchd.faults) does not end its stage, nor the daemon: the fault is
shown, the stage waits a growing pause and runs the step again, and the fault is cleared
once the step goes through. Any other error ends the stage (the daemon stops, exit 1).

`Activity` records each stage's passes (started, finished, whether the last one did
something, when the next is due), so that a test can wait until every stage has run out
of work (`batchd.testing.idle`) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from batchd.faults import Faults, local_cause
from batchd.logs import get_logger

log = get_logger(__name__)


class Stage(StrEnum):
    """The daemon's long-lived tasks, in pipeline order."""

    INTAKE = "intake"
    WATCH = "watch"  # inotify: wakes the intake stage
    PREPARE = "prepare"
    SUBMIT = "submit"
    POLL = "poll"
    COLLECT = "collect"
    PUBLISH = "publish"
    CLEANUP = "cleanup"  # remote files nobody needs any more
    ACCOUNT = "account"  # probes an account paused by an account-level error
    DRAIN = "drain"  # ends the daemon once a drain has finished the work
    NOTIFY = "notify"  # webhooks and the notify command when a job ends
    CLOCK = "clock"  # notices steps of the wall clock


@dataclass(slots=True)
class Wake:
    """One event per stage: set when there may be new work for it."""

    events: dict[Stage, asyncio.Event] = field(default_factory=dict)

    def __getitem__(self, stage: Stage) -> asyncio.Event:
        return self.events.setdefault(stage, asyncio.Event())

    def poke(self, stage: Stage) -> Callable[[], None]:
        """A callback that wakes `stage` (for a stage to give the next one)."""
        return lambda: self[stage].set()

    def all(self) -> None:
        """Wake every stage (at stop, so that each sees it at once)."""
        for event in self.events.values():
            event.set()


@dataclass(slots=True)
class Passes:
    """One stage's passes so far (its step, run once), as `run_stage` reports them."""

    started: int = 0
    finished: int = 0
    did: bool = False  # the last finished pass did something (another follows at once)
    # Loop time of the next pass when nothing wakes the stage: what it knows is due (its
    # `idle_s`, or the pause after a fault of this machine); inf for a periodic look only.
    due_at: float = math.inf
    faulted: bool = False  # the last pass met a fault of this machine (it waits it out)

    @property
    def busy(self) -> bool:
        """Mid-pass."""
        return self.started > self.finished


@dataclass(slots=True)
class Activity:
    """Every stage's `Passes`, and a count of the passes that did something, across
    stages: for a test to tell when the daemon has run out of work."""

    stages: dict[Stage, Passes] = field(default_factory=dict)
    progress: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __getitem__(self, stage: Stage) -> Passes:
        return self.stages.setdefault(stage, Passes())

    def started(self, stage: Stage) -> None:
        self[stage].started += 1

    def finished(self, stage: Stage, did: bool, due_at: float, faulted: bool = False) -> None:
        passes = self[stage]
        passes.finished = passes.started
        passes.did, passes.due_at, passes.faulted = did, due_at, faulted
        self.progress += did
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Returns when the next pass of any stage has finished."""
        await self._changed.wait()


Step = Callable[[], Awaitable[bool]]
IdleFor = Callable[[float], Awaitable[float]]


async def run_stage(
    stage: Stage,
    step: Step,
    interval_s: float,
    wake: Wake,
    stopping: asyncio.Event,
    idle_s: IdleFor | None = None,
    faults: Faults | None = None,
    activity: Activity | None = None,
) -> None:
    """Run `step` while it has work; then sleep until woken, stopped, or `interval_s`
    (or what `idle_s(interval_s)` says, for a stage that knows when it is next due).
    With `faults`, a fault of this machine pauses the stage instead of ending it.
    Each pass is reported to `activity` when one is given."""
    event = wake[stage]
    met: set[str] = set()
    passes = Activity() if activity is None else activity
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        event.clear()
        passes.started(stage)
        try:
            did = await step()
        except Exception as exc:
            local = local_cause(exc)
            if faults is None or local is None:
                passes.finished(stage, did=False, due_at=math.inf)
                raise
            key = faults.area(local)
            met.add(key)
            pause = faults.met(local, f"the {stage} stage", key)
            log.warning("stage_waits", stage=str(stage), error=str(local), retry_in_s=pause)
            passes.finished(stage, did=False, due_at=loop.time() + pause, faulted=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)
            continue
        if faults is not None:
            for key in met:
                faults.healed(key)
        met.clear()
        if did:
            passes.finished(stage, did=True, due_at=loop.time())
            await asyncio.sleep(0)
            continue
        timeout = interval_s if idle_s is None else await idle_s(interval_s)
        # Only a shorter wait than the interval is something due; the interval is a look.
        due = loop.time() + timeout if timeout < interval_s else math.inf
        passes.finished(stage, did=False, due_at=due)
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
