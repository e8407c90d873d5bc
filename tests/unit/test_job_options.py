"""A job's options as a typed document (`documents.JobOptions`): the options rows of a
database written before they had a type decode, and every shape batchd writes comes
back as written."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import msgspec
import orjson
import pytest

from batchd import store as store_module
from batchd.documents import JobOptions, decode_options, encode_options, given, to_json
from batchd.inputs.verdict import sidecar_options
from batchd.store import Store
from batchd.testing import events

# The options rows as the code before JobOptions wrote them (a dict through orjson, in
# the sidecar's own key order), each with what it decodes to.
OLD_ROWS: list[tuple[str, str, JobOptions]] = [
    ("empty", "{}", JobOptions()),
    ("null", "null", JobOptions()),
    (
        "sidecar",
        json.dumps(
            {
                "priority": 3,
                "model": "qwen-plus",
                "completion_window": "48h",
                "ds_name": "reviews",
                "ds_description": "november",
                "system_prompt": "Be brief.",
                "columns": {"custom_id": "id", "content": "text"},
                "encoding": "gb18030",
                "max_cost": 12.5,
                "submit_id": "0123abcd",
            }
        ),
        JobOptions(
            priority=3,
            model="qwen-plus",
            completion_window="48h",
            ds_name="reviews",
            ds_description="november",
            system_prompt="Be brief.",
            columns={"custom_id": "id", "content": "text"},
            encoding="gb18030",
            max_cost=12.5,
            submit_id="0123abcd",
        ),
    ),
    (
        "retry",
        json.dumps(
            {
                "model": "qwen-max",
                "retry_of": "root",
                "allow_duplicate": True,
                "retry_left_out": {"request_invalid": 2},
            }
        ),
        JobOptions(
            model="qwen-max",
            retry_of="root",
            allow_duplicate=True,
            retry_left_out={"request_invalid": 2},
        ),
    ),
    (
        "bad-sidecar",
        json.dumps({"sidecar_error": "a.meta.json: not JSON"}),
        JobOptions(sidecar_error="a.meta.json: not JSON"),
    ),
    # What nothing checks is kept as the user wrote it: a text priority, a null model.
    (
        "loose",
        json.dumps({"priority": "high", "model": None, "max_cost": "ten"}),
        JobOptions(priority="high", model=None, max_cost="ten"),
    ),
    # A key this batchd does not know (a later one's) is tolerated.
    ("later", json.dumps({"model": "m", "from_the_future": 1}), JobOptions(model="m")),
]


async def test_the_options_of_a_database_written_before_they_had_a_type_decode(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        for _number, script in store_module._migrations():
            db.executescript(script)
        db.execute(f"PRAGMA user_version = {max(n for n, _ in store_module._migrations())}")
        for i, (job_id, options, _) in enumerate(OLD_ROWS):
            db.execute(
                "INSERT INTO jobs (id, name, inbox_name, spool_path, kind, state, options,"
                " created_at, updated_at) VALUES (?, ?, ?, '/x', 'jsonl', 'running', ?, ?, ?)",
                (job_id, job_id, f"{job_id}.jsonl", options, float(i), float(i)),
            )
    store = await Store.open(path)
    try:
        for job_id, raw, expected in OLD_ROWS:
            job = await store.get_job(job_id)
            assert job is not None
            assert job.options == expected, job_id
            # Written back, the same JSON object (but for a key it does not know).
            assert await store.update_job(job_id, options=job.options)
            async with store._db.execute("SELECT options FROM jobs WHERE id=?", (job_id,)) as cur:
                row = await cur.fetchone()
            assert row is not None
            before = orjson.loads(raw) if raw else {}
            before = {k: v for k, v in (before or {}).items() if k != "from_the_future"}
            assert orjson.loads(row[0]) == before, job_id
    finally:
        await store.close()


@pytest.mark.parametrize("job_id", [job_id for job_id, _, _ in OLD_ROWS])
def test_each_shape_comes_back_as_written(job_id: str) -> None:
    options = next(expected for name, _, expected in OLD_ROWS if name == job_id)
    assert decode_options(encode_options(options)) == options
    assert decode_options(to_json(options)) == options


def test_a_sidecar_read_is_its_json_and_an_option_not_given_is_none() -> None:
    raw = b'{"max_cost": 2, "model": null, "priority": 1}'
    options = sidecar_options("a.meta.json", raw)
    assert to_json(options) == orjson.loads(raw)
    assert options.model is None and given(options.model) is None
    assert options.retry_of is msgspec.UNSET and given(options.retry_of) is None
    assert given(options.max_cost) == 2


async def test_a_document_column_that_does_not_decode_is_logged_and_the_rest_still_read(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    """A row edited by hand (or shaped by another batchd) spoils that column of that job
    only: the job reads with no report, cost or usage (default options), the other jobs
    as stored, and the log names the job and the column."""
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        for _number, script in store_module._migrations():
            db.executescript(script)
        db.execute(f"PRAGMA user_version = {max(n for n, _ in store_module._migrations())}")
        rows = [
            ("odd", '{"priority": 1, "columns": 7}', '{"errors": 5}', '"x"', "[1]"),
            ("fine", '{"priority": 2}', None, None, None),
        ]
        for i, (job_id, options, report, cost, usage) in enumerate(rows):
            db.execute(
                "INSERT INTO jobs (id, name, inbox_name, spool_path, kind, state, options,"
                " report, cost, usage, created_at, updated_at)"
                " VALUES (?, ?, ?, '/x', 'jsonl', 'running', ?, ?, ?, ?, ?, ?)",
                (job_id, job_id, f"{job_id}.jsonl", options, report, cost, usage, i, i),
            )
    store = await Store.open(path)
    try:
        jobs = {job.id: job for job in await store.jobs()}
    finally:
        await store.close()
    odd, fine = jobs["odd"], jobs["fine"]
    assert (odd.options, odd.report, odd.cost, odd.usage) == (JobOptions(), None, None, None)
    assert fine.options == JobOptions(priority=2)
    logged = events(log_lines, "job_column_unreadable")
    assert {e["job_id"] for e in logged} == {"odd"}, logged
    assert sorted(e["column"] for e in logged) == ["cost", "options", "report", "usage"], logged
