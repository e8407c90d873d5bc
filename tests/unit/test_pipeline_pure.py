"""Pure decisions of the pipeline stages, with plain values."""

from __future__ import annotations

import os

import orjson
import pytest

from batchd.config import ProviderLimits
from batchd.models import input_kind, remote_is_terminal, window_hours
from batchd.outbox.merge import with_input_line
from batchd.pipeline.intake import Seen, is_ignored_name, settled, shown_name
from batchd.pipeline.poll import expected_end_in, poll_after
from batchd.pipeline.submit import free_slots


@pytest.mark.parametrize(
    "name",
    [
        ".x.jsonl",
        "x.jsonl.tmp",
        "x.part",
        "x.partial",
        "x.crdownload",
        "x.jsonl~",
        "~syncthing~x.jsonl.tmp",
        ".syncthing.x.jsonl.tmp",
        ".x.jsonl.Ab12Cd",
        "x.meta.json",
    ],
)
def test_temp_and_hidden_names_are_ignored(name: str) -> None:
    assert is_ignored_name(name)


def test_real_inputs_are_recognised_by_suffix() -> None:
    assert not is_ignored_name("reviews.jsonl")
    assert input_kind("reviews.JSONL", (".jsonl", ".csv")) == "jsonl"
    assert input_kind("a.csv", (".jsonl", ".csv")) == "csv"
    assert input_kind(".jsonl", (".jsonl",)) is None
    assert input_kind("notes.txt", (".jsonl", ".csv")) is None


def test_odd_names_are_logged_escaped() -> None:
    assert shown_name("a\nb") == "a\\nb"
    assert "\\x" in shown_name(os.fsdecode(b"bad\xff.jsonl"))


def test_a_file_is_settled_only_when_unchanged_for_the_settle_time() -> None:
    st = os.stat_result((0o100644, 5, 1, 1, 0, 0, 10, 0, 100, 100))
    seen = Seen(ino=5, size=10, mtime_ns=st.st_mtime_ns, since=50.0)
    assert not settled(seen, st, now=51.0, wall_now=200.0, settle_s=2.0)
    assert settled(seen, st, now=52.0, wall_now=200.0, settle_s=2.0)
    # Recently modified (mtime close to now) is not settled, whatever the scan says.
    assert not settled(seen, st, now=52.0, wall_now=101.0, settle_s=2.0)
    grown = Seen(ino=5, size=9, mtime_ns=st.st_mtime_ns, since=0.0)
    assert not settled(grown, st, now=52.0, wall_now=200.0, settle_s=2.0)


def test_free_slots_respects_the_account_and_model_caps() -> None:
    limits = ProviderLimits(running_batches=10)
    assert free_slots(limits, 3, {"qwen-plus": 3}, "qwen-plus") == 7
    assert free_slots(limits, 3, {"batch-test-model": 2}, "batch-test-model") == 0
    assert free_slots(limits, 10, {}, "qwen-plus") == 0
    assert free_slots(limits, 12, {}, "qwen-plus") == 0


def test_unknown_remote_statuses_are_never_final() -> None:
    for status in ("completed", "failed", "expired", "cancelled"):
        assert remote_is_terminal(status)
    for status in ("validating", "in_progress", "finalizing", "cancelling", "paused", None, ""):
        assert not remote_is_terminal(status)


def test_completion_window_hours() -> None:
    assert window_hours("24h") == 24
    assert window_hours("14d") == 336
    assert window_hours("soon") == 336


def test_error_lines_keep_the_service_bytes_and_gain_the_input_line() -> None:
    line = b'{"id":"x","custom_id":"7","response":null,"error":{"code":"E","message":"m"}}\n'
    out = with_input_line(line, 12)
    assert out.startswith(line[:-2])
    assert orjson.loads(out)["input_line"] == 12


def test_expected_end_follows_the_rate_between_two_looks() -> None:
    before = {"total": 100, "completed": 20, "failed": 0}
    now = {"total": 100, "completed": 50, "failed": 10}
    # 40 requests in 20 s: the 40 left take 20 s more.
    assert expected_end_in(now, 120.0, before, 100.0) == pytest.approx(20.0)
    assert expected_end_in(now, 120.0, None, None) is None
    assert expected_end_in(now, 120.0, now, 100.0) is None  # no progress, no rate
    assert expected_end_in({"total": 0}, 120.0, before, 100.0) is None


@pytest.mark.parametrize(
    ("status", "counts", "end_in", "wait"),
    [
        ("validating", None, None, 60.0),
        ("in_progress", {"total": 10, "completed": 2, "failed": 0}, None, 60.0),
        ("in_progress", {"total": 10, "completed": 2, "failed": 0}, 600.0, 60.0),
        ("in_progress", {"total": 10, "completed": 8, "failed": 0}, 30.0, 30.0),
        ("in_progress", {"total": 10, "completed": 9, "failed": 0}, 1.0, 10.0),
        ("in_progress", {"total": 10, "completed": 7, "failed": 3}, None, 10.0),
        ("finalizing", {"total": 10, "completed": 10, "failed": 0}, None, 10.0),
    ],
)
def test_a_batch_close_to_its_end_is_looked_at_sooner(
    status: str, counts: dict[str, int] | None, end_in: float | None, wait: float
) -> None:
    assert poll_after(status, counts, end_in, 60.0) == pytest.approx(wait)


def test_a_sidecar_counts_only_when_its_inputs_owner_root_or_batchd_wrote_it() -> None:
    from batchd.inputs.verdict import owner_problem

    batchd_uid, owner, neighbour = 990, 1000, 1001
    assert owner_problem(owner, owner, batchd_uid) is None
    assert owner_problem(0, owner, batchd_uid) is None  # root's
    assert owner_problem(batchd_uid, owner, batchd_uid) is None  # the daemon's own
    problem = owner_problem(neighbour, owner, batchd_uid)
    assert problem is not None and "uid 1001" in problem and "uid 1000" in problem
