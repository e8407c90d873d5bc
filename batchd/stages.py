"""The stages by name, how they are woken, and the loop each one runs.

Each stage is a loop that runs one step, then waits for "new work" (its wake event),
"interval elapsed" or "stop", whichever comes first. A step returns True when it did
something, and then runs again at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum


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


Step = Callable[[], Awaitable[bool]]
IdleFor = Callable[[float], Awaitable[float]]


async def run_stage(
    stage: Stage,
    step: Step,
    interval_s: float,
    wake: Wake,
    stopping: asyncio.Event,
    idle_s: IdleFor | None = None,
) -> None:
    """Run `step` while it has work; then sleep until woken, stopped, or `interval_s`
    (or what `idle_s(interval_s)` says, for a stage that knows when it is next due)."""
    event = wake[stage]
    while not stopping.is_set():
        event.clear()
        if await step():
            await asyncio.sleep(0)
            continue
        timeout = interval_s if idle_s is None else await idle_s(interval_s)
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
