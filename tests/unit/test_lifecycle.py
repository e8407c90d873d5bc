"""The declared lifecycle (batchd.store.lifecycle): one table of the job and part
transitions, each with its owner; the store refuses the rest; a stage whose
compare-and-set did not take does nothing more; docs/design.md shows the table."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

import batchd
from batchd.clock import FakeClock
from batchd.config import PollSettings, Settings
from batchd.documents import JobOptions
from batchd.models import JOB_TERMINAL, JobState, PartPlan, PartState
from batchd.pipeline.account import AccountState
from batchd.pipeline.poll import Poller
from batchd.pipeline.problems import StepPolicy, step_failed
from batchd.provider.api import BatchApi
from batchd.provider.limits import RateLimiter
from batchd.provider.remote import RemoteBatch
from batchd.store import Store
from batchd.store.lifecycle import (
    JOB_INITIAL,
    JOB_TRANSITIONS,
    PARKED_BY,
    PART_INITIAL,
    PART_TERMINAL,
    PART_TRANSITIONS,
    IllegalTransition,
    Owner,
    Transition,
    table_markdown,
)

PACKAGE = Path(batchd.__file__).parent
DESIGN = PACKAGE.parent / "docs" / "design.md"

# Who each module that changes a state is, in the table's words. problems.py is the
# note-pause-park policy every stage calls for its own parts: it parks for them.
MODULE_OWNERS: dict[str, set[Owner]] = {
    "pipeline/intake.py": {Owner.INTAKE},
    "pipeline/prepare.py": {Owner.PREPARE},
    "pipeline/submit.py": {Owner.SUBMIT},
    "pipeline/poll.py": {Owner.POLL},
    "pipeline/collect.py": {Owner.COLLECT},
    "pipeline/publish.py": {Owner.PUBLISH},
    "pipeline/problems.py": set(PARKED_BY.values()),
    "operator/ops.py": {Owner.OPERATOR},
    "daemon.py": {Owner.RECOVERY},
}


def reachable(initial: Iterable[str], table: Iterable[Transition[Any]]) -> set[str]:
    seen, todo = set(initial), list(initial)
    moves = list(table)
    while todo:
        state = todo.pop()
        for move in moves:
            if move.source == state and move.target not in seen:
                seen.add(move.target)
                todo.append(move.target)
    return seen


def test_every_state_is_reachable_from_where_jobs_and_parts_start() -> None:
    assert reachable(JOB_INITIAL, JOB_TRANSITIONS) == set(JobState)
    assert reachable(PART_INITIAL, PART_TRANSITIONS) == set(PartState)


def test_terminal_states_are_left_only_by_a_retry_or_a_cancel_of_a_parked_part() -> None:
    job_exits = {(t.source, t.target, t.owner) for t in JOB_TRANSITIONS if t.source in JOB_TERMINAL}
    assert job_exits == {(JobState.PARKED, JobState.CLAIMED, Owner.OPERATOR)}
    part_exits = {
        (t.source, t.target, t.owner) for t in PART_TRANSITIONS if t.source in PART_TERMINAL
    }
    retries = {(PartState.FAILED, PartState.PENDING, Owner.OPERATOR)} | {
        (PartState.PARKED, back, Owner.OPERATOR) for back in PARKED_BY
    }
    cancel = {(PartState.PARKED, PartState.CANCELLED, Owner.SUBMIT)}
    assert part_exits == retries | cancel
    # Published, collected and cancelled are for good.
    for state in (JobState.PUBLISHED, PartState.COLLECTED, PartState.CANCELLED):
        assert not [t for t in (*JOB_TRANSITIONS, *PART_TRANSITIONS) if t.source == state]


def test_each_part_state_is_left_by_one_stage_besides_an_operator() -> None:
    """The rule the compare-and-sets lean on: a part in a state is moved on by one stage."""
    for state in set(PartState) - PART_TERMINAL:
        stages = {t.owner for t in PART_TRANSITIONS if t.source == state} - {Owner.OPERATOR}
        assert len(stages) == 1, (state, stages)


def test_no_transition_is_declared_twice_by_one_owner() -> None:
    for table in (JOB_TRANSITIONS, PART_TRANSITIONS):
        keys = [(t.source, t.target, t.owner) for t in table]
        assert len(keys) == len(set(keys))
        assert all(t.source != t.target for t in table)


def _state(node: ast.expr) -> str | None:
    """`JobState.X` or `PartState.X` as the state's value; None for anything else."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("JobState", "PartState")
    ):
        return str(getattr(JobState if node.value.id == "JobState" else PartState, node.attr))
    return None


def state_changes() -> Iterable[tuple[str, int, str, str | None, str | None]]:
    """Every `move_job`/`move_part` call in the package: (module, line, kind, source,
    target), a state None where the code passes a variable."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr in ("move_job", "move_part") and len(node.args) >= 3:
                kind = node.func.attr.removeprefix("move_")
                yield module, node.lineno, kind, _state(node.args[1]), _state(node.args[2])


def test_every_state_change_in_the_code_is_declared_and_made_by_its_owner() -> None:
    changes = list(state_changes())
    assert len(changes) >= 25  # the scan sees the calls (it would pass on none)
    written: set[str] = set()
    for module, line, kind, source, target in changes:
        assert module in MODULE_OWNERS, f"{module}:{line} changes a {kind}'s state"
        table = JOB_TRANSITIONS if kind == "job" else PART_TRANSITIONS
        # A move to a state the code computes (a retry, back where it was parked) is
        # checked when it is made; here, only that its module may make such moves.
        if target is not None:
            written.add(target)
        owners = {
            t.owner for t in table if target in (None, t.target) and source in (None, t.source)
        }
        assert owners & MODULE_OWNERS[module], f"{module}:{line}: {source} -> {target}"
    declared = {t.target for t in (*JOB_TRANSITIONS, *PART_TRANSITIONS)}
    # The store's own transactions (plan, replan, publish) write the rest, each checked.
    assert declared - written <= {JobState.RUNNING, JobState.CLAIMED, JobState.PUBLISHED}


def test_a_state_is_written_in_sql_only_where_the_store_checks_the_table() -> None:
    tree = ast.parse((PACKAGE / "store" / "__init__.py").read_text())
    (store,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Store"]
    for node in store.body:
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        source = ast.unparse(node)
        writes = ("UPDATE jobs SET state", "UPDATE parts SET state", '"state": JobState')
        if any(w in source for w in writes) and not node.name.startswith("_update"):
            assert "lifecycle.check_" in source, node.name


def test_the_design_page_shows_the_table() -> None:
    assert table_markdown() in DESIGN.read_text()


# -- the store refuses what the table does not allow ------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "db.sqlite3", clock)
    try:
        yield opened
    finally:
        await opened.close()


async def planned(store: Store, clock: FakeClock) -> int:
    """A claimed job planned into one part; the part's id."""
    await store.insert_job(
        job_id="j",
        name="j",
        inbox_name="j.jsonl",
        inode=1,
        dev=1,
        spool_path="/spool/j/input.jsonl",
        kind="jsonl",
        options=JobOptions(),
        now=clock.now(),
        state=JobState.CLAIMED,
    )
    plan = PartPlan(1, "p", 1, 1, 10, "qwen-plus", "/v1/chat/completions", "u")
    assert await store.plan_parts("j", [plan], clock.now())
    (part,) = await store.parts_of("j")
    return part.id


async def test_the_store_refuses_a_transition_the_table_does_not_allow(
    store: Store, clock: FakeClock
) -> None:
    part_id = await planned(store, clock)
    # Straight to a batch without an upload or a create intent: refused, nothing written.
    with pytest.raises(IllegalTransition, match="pending to creating"):
        await store.move_part(part_id, PartState.PENDING, PartState.CREATING)
    with pytest.raises(IllegalTransition, match="running to published"):
        await store.move_job("j", JobState.RUNNING, JobState.PUBLISHED)
    # A state is never set as a plain field, nor a job created half-way through.
    with pytest.raises(IllegalTransition, match="move_part"):
        await store.update_part(part_id, PartState.PENDING, state=PartState.RUNNING)
    with pytest.raises(IllegalTransition, match="move_job"):
        await store.update_job("j", state=JobState.PUBLISHING)
    with pytest.raises(IllegalTransition, match="not created running"):
        await store.insert_job(
            job_id="k",
            name="k",
            inbox_name="k.jsonl",
            inode=2,
            dev=1,
            spool_path="/spool/k/input.jsonl",
            kind="jsonl",
            options=JobOptions(),
            now=clock.now(),
            state=JobState.RUNNING,
        )
    part = await store.get_part(part_id)
    job = await store.get_job("j")
    assert part is not None and part.state == PartState.PENDING
    assert job is not None and job.state == JobState.RUNNING
    assert await store.get_job("k") is None


async def test_a_move_that_did_not_take_says_so(store: Store, clock: FakeClock) -> None:
    part_id = await planned(store, clock)
    first, second = await asyncio.gather(
        store.move_part(part_id, PartState.PENDING, PartState.UPLOADING, intent_at=1.0),
        store.move_part(part_id, PartState.PENDING, PartState.UPLOADING, intent_at=2.0),
    )
    assert sorted([first, second]) == [False, True]
    part = await store.get_part(part_id)
    assert part is not None and part.intent_at == (1.0 if first else 2.0)


# -- two stages racing for one part: the one whose update did not take does nothing -----


# A poll stage that polls every minute, without jitter, retrieving batches one by one.
POLL_SETTINGS = Settings(poll=PollSettings(interval_s=60.0, jitter=0.0, list_threshold=20))


def poller(store: Store, clock: FakeClock) -> Poller:
    return Poller(
        store,
        BatchApi("http://127.0.0.1:9", "sk-unused", RateLimiter({})),  # never called
        lambda: POLL_SETTINGS,
        AccountState(clock=clock),
        lost_after_s=lambda _part: 30 * 3600.0,
        on_ended=lambda: None,
        clock=clock,
    )


async def running(store: Store, clock: FakeClock) -> int:
    part_id = await planned(store, clock)
    assert await store.move_part(
        part_id,
        PartState.PENDING,
        PartState.RUNNING,
        batch_id="batch_1",
        remote_status="in_progress",
        next_poll_at=clock.steady(),
    )
    return part_id


async def test_a_poll_that_lost_the_race_to_park_the_part_records_no_end(
    store: Store, clock: FakeClock
) -> None:
    part_id = await running(store, clock)
    seen = await store.get_part(part_id)  # what the poller read before its answer came
    assert seen is not None
    # Meanwhile the part's failures park it (its stage's policy).
    assert await step_failed(store, seen, "unusable answer", StepPolicy(max_failures=1), 0.0)
    ended = RemoteBatch.parse({"id": "batch_1", "status": "completed", "created_at": 1})
    assert await poller(store, clock)._apply(seen, ended) == 0
    part = await store.get_part(part_id)
    assert part is not None and part.state == PartState.PARKED
    # Nothing of the end was written: `batchd retry` puts it back to be polled again.
    assert part.ended_at is None and part.remote_status == "in_progress"


async def test_two_polls_of_one_ended_batch_end_it_once(store: Store, clock: FakeClock) -> None:
    part_id = await running(store, clock)
    seen = await store.get_part(part_id)
    assert seen is not None
    ended = RemoteBatch.parse({"id": "batch_1", "status": "completed", "created_at": 1})
    lost = poller(store, clock)
    counts = await asyncio.gather(
        poller(store, clock)._apply(seen, ended), lost._lost(seen, "not known")
    )
    assert sorted(counts) == [0, 1]
    part = await store.get_part(part_id)
    assert part is not None and part.state == PartState.ENDED
    # The loser's answer was not written over the winner's.
    assert part.remote_status == ("completed" if counts[0] == 1 else "lost")
