"""The outbox's promises, checked over random fault mixes against the emulator (issue 16).

Each example runs one input through a real daemon and an in-process emulator (their own,
fresh: the emulator's failure rate and pace are its settings) with a random mix of
what goes wrong: requests that fail, result files that cannot be fetched, result lines
a strict parser refuses, a cancel before the batch is created or while it runs, a
batch that expires, a batch the service rejects (a mistyped model, alone or beside a
good one with `group_by_model`), an input rejected for one bad line; chat or embeddings.
For the published folder:

- every request of the input is in result.jsonl or error.jsonl, exactly once, and the
  error lines are numbered in input order;
- result.csv has one row per request, in input order;
- `request_counts.total` is the input's request count, `completed + failed = total`,
  `completed` and `failed` are the lines of result.jsonl and error.jsonl;
- `never_run` is the count of error lines whose code says the request never ran
  (`merge.never_ran`), and all of them when nothing was sent;
- the status agrees with the counts (and with what was done to the job);
- a whole-batch error is stated once (summary.json `error`, the job's `error`), and its
  lines refer to it by code: no line repeats the service's list;
- an embeddings row shows the vector's length, never the vector.

Bounded in `make test` (BATCHD_OUTBOX_EXAMPLES, 25 by default: about 15 s); the soak
marker runs more.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from batchd.inputs.lines import identity, read_line
from batchd.models import JobState, PartState
from batchd.outbox.merge import never_ran
from batchd.pipeline.stages import Stage
from batchd.testing import (
    ENDPOINT_CHAT,
    ENDPOINT_EMBEDDINGS,
    daemon_settings,
    drop,
    read_jsonl,
    requests,
    running_daemon,
    running_emulator,
    summary,
    wait_for,
    wait_published,
)

ENDINGS = ("none", "cancel_before", "cancel_during", "expire", "reject")
MISTYPED = "qwen-plsu"
WINDOW_S = 24 * 3600.0


@dataclass(frozen=True)
class Case:
    """One example: the input, the emulator's faults and what is done to the job."""

    count: int
    embeddings: bool
    # Two chat models, one part per model; `mistyped`: the second is a model the
    # service does not know (alone, without grouping), so its batch fails.
    grouped: bool
    mistyped: bool
    models: tuple[bool, ...]  # per line: the second model?
    failure_rate: float
    content_missing_rate: float
    odd_lines_rate: float
    ending: str
    # Where the bad line goes (reject), when the cancel comes (cancel_during: a share of
    # the batch's run), how many requests run before the window closes (expire).
    at: float
    seed: int

    @property
    def slow(self) -> bool:
        """Runs on the emulator's own clock, moved by hand (time_scale 1)."""
        return self.ending in ("cancel_during", "expire")


@st.composite
def cases(draw: st.DrawFn) -> Case:
    count = draw(st.integers(3, 10))
    embeddings = draw(st.booleans())
    grouped = not embeddings and draw(st.booleans())
    return Case(
        count=count,
        embeddings=embeddings,
        grouped=grouped,
        mistyped=not embeddings and draw(st.integers(0, 4)) == 0,
        models=tuple(draw(st.lists(st.booleans(), min_size=count, max_size=count))),
        failure_rate=draw(st.sampled_from([0.0, 0.0, 0.2, 0.5])),
        content_missing_rate=draw(st.sampled_from([0.0, 0.0, 0.0, 0.5])),
        odd_lines_rate=draw(st.sampled_from([0.0, 0.0, 0.3])),
        ending=draw(st.sampled_from(ENDINGS)),
        at=draw(st.floats(0.0, 0.999)),
        seed=draw(st.integers(0, 1000)),
    )


def input_models(case: Case) -> list[str]:
    """The model of each request: one, or two (`grouped`), the second mistyped or not."""
    if case.embeddings:
        return ["text-embedding-v3"] * case.count
    second = MISTYPED if case.mistyped else "qwen-turbo"
    two = case.grouped or case.mistyped
    return [
        second if two and (case.models[n] or not case.grouped) else "qwen-plus"
        for n in range(case.count)
    ]


def input_of(case: Case) -> bytes:
    """The input's bytes: chat or embeddings requests, one model or two, and for a
    rejected input one line that is not JSON among them."""
    url = ENDPOINT_EMBEDDINGS if case.embeddings else ENDPOINT_CHAT
    lines = [requests(1, model, url, start=n) for n, model in enumerate(input_models(case))]
    if case.ending == "reject":
        lines.insert(int(case.at * (case.count + 1)), b"this is not json\n")
    return b"".join(lines)


def emulator_overrides(case: Case) -> dict[str, Any]:
    faults = {
        "content_missing_rate": case.content_missing_rate,
        "odd_lines_rate": case.odd_lines_rate,
        "seed": case.seed,
    }
    values: dict[str, Any] = {
        "time_scale": 3000.0,
        "request_failure_rate": case.failure_rate,
        "seed": case.seed,
        "faults": faults,
    }
    if case.ending == "cancel_during":
        values.update(time_scale=1.0, per_request_s=600.0)
    elif case.ending == "expire":
        # This many requests run before the 24 h window closes: at least one never does.
        ran = int(case.at * case.count)
        values.update(time_scale=1.0, per_request_s=WINDOW_S / (ran + 0.5))
    return values


async def run_case(case: Case, root: Path) -> tuple[Path, Any]:
    """Run the case's input through a daemon; its published folder and final job."""
    async with running_emulator(root / "emulator", **emulator_overrides(case)) as emulator:
        options = daemon_settings(
            root / "daemon",
            emulator,
            jobs={"group_by_model": case.grouped, "delete_remote_files": False},
            api={"max_attempts": 2},
            # `cancel_before`: a budget no job fits holds the job before anything is sent.
            **({"budget": {"daily": 1e-9}} if case.ending == "cancel_before" else {}),
        )
        async with running_daemon(options) as daemon:
            drop(options.paths.folder("inbox"), "input.jsonl", input_of(case))
            if case.ending in ("cancel_before", "cancel_during"):
                await cancel(case, daemon, emulator)
            (folder,) = await wait_published(
                options.paths.folder("outbox"),
                1,
                emulator,
                timeout_s=30,
                advance_s=7200.0 if case.slow else 60.0,
            )
            (job,) = await daemon.store.jobs()
            await wait_for(lambda: _published(daemon, job.id), 5, "the job's row marked published")
            return folder, await daemon.store.get_job(job.id)


async def _published(daemon: Any, job_id: str) -> bool:
    job = await daemon.store.get_job(job_id)
    return job is not None and job.state == JobState.PUBLISHED


async def cancel(case: Case, daemon: Any, emulator: Any) -> None:
    """Cancel the job: before its batch is created (held for the budget), or once its
    batch runs, a random share of the way through."""

    async def planned() -> Any:
        if case.ending == "cancel_before":
            held = await daemon.store.held_jobs()
            return held[0] if held else None
        jobs = await daemon.store.jobs([JobState.RUNNING])
        parts = await daemon.store.parts_of(jobs[0].id) if jobs else []
        return jobs[0] if parts and all(p.batch_id for p in parts) else None

    job = await wait_for(planned, 15, "the job planned (and its batches created)")
    if case.ending == "cancel_during":
        emulator.advance(case.at * (20 + 120 + 600 * case.count))
    await daemon.ops.request_cancel(job.id)
    if case.ending == "cancel_before":
        # Nothing wakes the collect stage when the submit stage drops parts never
        # created: it would see the job settled at its next interval (5 s).
        async def dropped() -> bool:
            parts = await daemon.store.parts_of(job.id)
            return all(p.state == PartState.CANCELLED for p in parts)

        await wait_for(dropped, 15, "the parts dropped")
        daemon.wake[Stage.COLLECT].set()
    if case.ending == "cancel_during":
        # The service has the cancel before its clock moves on (or the batch ended).
        async def asked() -> bool:
            parts = await daemon.store.parts_of(job.id)
            calls = (await emulator.stats())["calls"]["cancel"]["served"]
            return calls >= len(parts) or all(p.remote_status == "completed" for p in parts)

        await wait_for(asked, 15, "the service asked to cancel")


def csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text("utf-8-sig"))))


def tolerant_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a result file as objects, read as batchd reads them: a line a strict
    parser refuses (NaN, a lone surrogate) is read; one cut short is known by its
    custom_id only."""
    found = []
    for raw in path.read_bytes().splitlines():
        if raw.strip():
            obj = read_line(raw)
            found.append(obj if obj is not None else {"custom_id": identity(raw, None)})
    return found


def check(case: Case, folder: Path, job: Any) -> str:
    """Every invariant of the module's docstring; the status, for the tally."""
    data = input_of(case)
    lines = data.splitlines()
    ids = [orjson.loads(x)["custom_id"] if x.startswith(b"{") else None for x in lines]
    s = summary(folder)
    status = s["status"]
    counts = s["request_counts"]
    results = tolerant_lines(folder / "result.jsonl")
    errors = read_jsonl(folder / "error.jsonl")
    said = f"{case}: {s}"

    # Every request once, across the two files; failures numbered in input order.
    assert counts["total"] == len(lines), said
    assert counts["completed"] + counts["failed"] == counts["total"], said
    assert (counts["completed"], counts["failed"]) == (len(results), len(errors)), said
    answered = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert Counter(c for c in answered if c is not None) == Counter(
        c for c in ids if c is not None
    ), said
    numbers = [e["input_line"] for e in errors]
    assert numbers == sorted(set(numbers)), said
    assert all(ids[e["input_line"] - 1] == e["custom_id"] for e in errors), said
    failed_ids = {e["custom_id"] for e in errors}
    assert [r["custom_id"] for r in results] == [
        c for c in ids if c is not None and c not in failed_ids
    ], said

    # result.csv: one row per request, in input order.
    rows = csv_rows(folder / "result.csv")
    assert rows[0][0] == "custom_id" and len(rows) - 1 == counts["total"], said
    assert [row[0] or None for row in rows[1:]] == ids, said

    # never_run: the failures whose code says so (all of them when nothing was sent).
    sent = status != "rejected"
    codes = [e["error"]["code"] if isinstance(e.get("error"), dict) else None for e in errors]
    assert s["never_run"] == sum(never_ran(code, sent=sent) for code in codes), said

    # The status agrees with the counts and with what was done to the job.
    done, total = counts["completed"], counts["total"]
    if status == "completed":
        assert done == total > 0, said
    elif status == "partial":
        assert 0 < done < total, said
    elif status in ("failed", "rejected"):
        assert done == 0, said
    else:
        assert status in ("cancelled", "expired") and done < total, said
    if case.ending == "reject":
        assert status == "rejected" and s["never_run"] == total, said
        (bad,) = [e for e in errors if e["error"]["code"] != "not_submitted"]
        assert bad["error"]["code"] == "invalid_json" and bad["custom_id"] is None, said
    elif case.ending == "cancel_before":
        assert status == "cancelled" and s["never_run"] == total, said
        assert set(codes) == {"batch_cancelled"}, said
    elif case.ending == "cancel_during":
        assert status in ("cancelled", "completed"), said
        # A batch cancelled before its end: the service's own lines for what never ran
        # (unless its files are not fetched). A cancel that came too late changes
        # nothing but the status (`decide_outcome`).
        cut = any(p["status"] == "cancelled" for p in s["parts"])
        if cut and done < total and not case.content_missing_rate:
            assert codes.count("batch_cancelled") > 0, said
    elif case.ending == "expire":
        # A batch of more requests than run in the window expires (another part may
        # complete in time, or fail for its model).
        ran = int(case.at * case.count)
        sizes = Counter(input_models(case)).items()
        if any(size > ran for model, size in sizes if model != MISTYPED):
            assert status == "expired", said
        if status == "expired" and not case.content_missing_rate:
            assert codes.count("batch_expired") > 0, said

    # A whole-batch error: stated once, each of its lines refers to it by code.
    rejected_batches = [p for p in s["parts"] if p["status"] == "failed"]
    if rejected_batches:
        assert s["error"]["code"] == "model_not_found", said
        assert len(s["error"]["batches"]) == len(rejected_batches), said
        assert job.error.startswith("model_not_found: "), said
        mine = [e for e in errors if e["error"]["code"] == "batch_failed"]
        assert mine, said
        for e in mine:
            assert e["error"]["message"].endswith("(model_not_found)"), said
    elif MISTYPED in input_models(case) and case.ending == "none":
        raise AssertionError(f"no batch failed for a mistyped model: {said}")
    assert all(len(x) < 2048 for x in (folder / "error.jsonl").read_bytes().splitlines()), said

    # An embeddings row shows the vector's length and first values, never the vector.
    if case.embeddings:
        answered_rows = [row for row in rows[1:] if row[3] == "200"]
        assert all(re.fullmatch(r"1024 dims: \[[^\]]{0,100}\]", r[7]) for r in answered_rows), said
        assert all(r[6] == "" for r in answered_rows), said
    return status


def run_examples(examples: int) -> Counter[str]:
    tally: Counter[str] = Counter()

    # No shrinking: each example runs a daemon, and the failing case is printed whole.
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(cases())
    def example(case: Case) -> None:
        with tempfile.TemporaryDirectory(prefix="outbox-inv-") as tmp:
            folder, job = asyncio.run(run_case(case, Path(tmp)))
            status = check(case, folder, job)
        tally["examples"] += 1
        tally[f"status:{status}"] += 1
        tally[f"ending:{case.ending}"] += 1

    example()
    return tally


def _figure(tally: Counter[str], label: str) -> str:
    shown = " ".join(f"{k}={v}" for k, v in sorted(tally.items()))
    return f"\n[{label}] {shown}"


def test_every_published_job_keeps_the_outbox_promises(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tally = run_examples(int(os.environ.get("BATCHD_OUTBOX_EXAMPLES", "25")))
    with capsys.disabled():
        print(_figure(tally, "outbox-invariants"))
    assert tally["examples"] > 0


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_every_published_job_keeps_the_outbox_promises_soak(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tally = run_examples(int(os.environ.get("BATCHD_OUTBOX_EXAMPLES", "400")))
    with capsys.disabled():
        print(_figure(tally, "outbox-invariants soak"))
    assert tally["examples"] > 0
