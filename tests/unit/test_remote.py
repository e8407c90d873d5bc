"""The server's answers, checked field by field at the boundary (issue 12, rule 1).

No field from the server is trusted for identity or control flow without a check: an
object without a usable id is refused; every other field is coerced where its meaning is
clear and dropped, with a note, where it is not.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchd.models import ExtraBatch, ExtraCancel, Part, PartState
from batchd.outbox.writer import extra_note
from batchd.pipeline.extras import keep, progress, tagged_part
from batchd.pipeline.problems import StepPolicy
from batchd.pipeline.submit import made_from, past_intents
from batchd.provider.remote import (
    TIME_KEYS,
    BadAnswer,
    Page,
    RemoteBatch,
    RemoteFile,
    count,
    timestamp,
    valid_id,
)

GOOD = {
    "id": "batch_abc-123",
    "object": "batch",
    "status": "in_progress",
    "input_file_id": "file-batch-1",
    "output_file_id": None,
    "error_file_id": None,
    "created_at": 1_700_000_000,
    "request_counts": {"total": 10, "completed": 3, "failed": 1},
    "metadata": {"ds_name": "x", "batchd_part": "job-1"},
    "errors": None,
}


def part_like(**fields: Any) -> Part:
    """A part record with plain defaults, for the pure matchers."""
    values: dict[str, Any] = {name: None for name in Part.__dataclass_fields__}
    values.update(
        id=1,
        job_id="job",
        seq=1,
        path="p",
        first_line=1,
        requests=1,
        bytes=1,
        model="m",
        endpoint="/v1/chat/completions",
        state=PartState.CREATING,
        upload_name="u",
        attempts=0,
        round=0,
        adopt=False,
    )
    values.update(fields)
    return Part(**values)


def batch(**changes: Any) -> RemoteBatch:
    return RemoteBatch.parse({**GOOD, **changes})


def test_a_well_formed_batch_parses_without_notes() -> None:
    b = batch()
    assert (b.id, b.status, b.input_file_id, b.created_at) == (
        "batch_abc-123",
        "in_progress",
        "file-batch-1",
        1_700_000_000.0,
    )
    assert b.request_counts == {"total": 10, "completed": 3, "failed": 1}
    assert b.notes == ()


@pytest.mark.parametrize(
    "bad_id", [None, "", 42, ["batch_1"], "batch/../x", "a b", "x" * 300, "b?x=1", "b#1", ".."]
)
def test_a_batch_without_a_usable_id_is_refused(bad_id: Any) -> None:
    with pytest.raises(BadAnswer):
        batch(id=bad_id)


@pytest.mark.parametrize("raw", [None, [], "batch", 3])
def test_a_batch_that_is_not_an_object_is_refused(raw: Any) -> None:
    with pytest.raises(BadAnswer):
        RemoteBatch.parse(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"total": "12", "completed": "3", "failed": "0"},
            {"total": 12, "completed": 3, "failed": 0},
        ),
        ({"total": 12.0, "completed": 3, "failed": 0}, {"total": 12, "completed": 3, "failed": 0}),
        ({"total": "n/a", "completed": None, "failed": "many"}, {}),
        ({"total": 5, "completed": -1, "failed": True}, {"total": 5}),
        ({"total": 1e300, "completed": 1, "failed": 0}, {"completed": 1, "failed": 0}),
    ],
)
def test_counts_are_coerced_or_dropped_one_by_one(raw: Any, expected: dict[str, int]) -> None:
    b = batch(request_counts=raw)
    assert b.request_counts == expected
    # Whatever was dropped is said; a count whose meaning is clear ("12") needs no note.
    dropped = [k for k, v in raw.items() if v is not None and k not in expected]
    assert bool(b.notes) == bool(dropped)


@pytest.mark.parametrize("raw", [[1, 2, 3], "12/10", 7])
def test_counts_that_are_not_a_map_are_dropped_with_a_note(raw: Any) -> None:
    b = batch(request_counts=raw)
    assert b.request_counts is None and b.notes


def test_counts_that_cannot_all_be_true_are_kept_with_a_note() -> None:
    b = batch(request_counts={"total": 5, "completed": 7, "failed": 0})
    assert b.request_counts == {"total": 5, "completed": 7, "failed": 0}
    assert any("do not add up" in n for n in b.notes)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000, 1_700_000_000.0),
        (1_700_000_000.5, 1_700_000_000.5),
        ("1700000000", 1_700_000_000.0),
        (1_700_000_000_000, 1_700_000_000.0),  # milliseconds
        ("2023-11-14T22:13:20Z", 1_700_000_000.0),
        ("2023-11-14T22:13:20", 1_700_000_000.0),  # no zone: UTC
        ("2023-11-15T06:13:20+08:00", 1_700_000_000.0),
        (None, None),
        ("soon", None),
        (True, None),
        (-5, None),
        (float("inf"), None),
        (1e300, None),
    ],
)
def test_times_are_read_from_every_form_a_server_uses(raw: Any, expected: float | None) -> None:
    notes: list[str] = []
    assert timestamp(raw, "created_at", notes) == expected
    assert bool(notes) == (expected is None and raw is not None)


def test_every_timestamp_of_a_batch_is_kept_under_its_name_and_a_garbled_one_is_none() -> None:
    b = batch(
        in_progress_at="2023-11-14T22:13:30Z",
        completed_at=1_700_000_100_000,  # milliseconds
        failed_at="yesterday",
        expired_at=[1],
        cancelled_at=True,
    )
    assert b.times is not None and set(b.times) == set(TIME_KEYS)
    assert b.times["created_at"] == b.created_at == 1_700_000_000.0
    assert b.times["in_progress_at"] == 1_700_000_010.0
    assert b.times["completed_at"] == 1_700_000_100.0
    for garbled in ("failed_at", "expired_at", "cancelled_at"):
        assert b.times[garbled] is None
        assert any(note.startswith(f"{garbled} ignored") for note in b.notes)
    assert b.times["finalizing_at"] is None  # not sent: no note
    assert not any(note.startswith("finalizing_at") for note in b.notes)
    assert b.part_fields()["provider_times"] == b.times


def test_an_unusable_file_id_is_dropped_with_a_note_never_used_as_a_path() -> None:
    b = batch(output_file_id="../../etc/passwd", error_file_id=12345)
    assert b.output_file_id is None and b.error_file_id is None
    assert len(b.notes) == 2


def test_a_status_is_kept_as_text_and_odd_ones_are_dropped() -> None:
    assert batch(status="queued_for_capacity").status == "queued_for_capacity"
    assert batch(status=["completed"]).status is None
    assert batch(status="x" * 100).status is None


def test_huge_errors_are_cut_and_said_so() -> None:
    b = batch(errors={"data": [{"message": "m" * 100_000}]})
    assert "truncated" in b.errors and any("errors cut" in n for n in b.notes)


def test_a_file_needs_an_id_and_its_size_is_a_count() -> None:
    f = RemoteFile.parse({"id": "file-1", "bytes": "437", "filename": "x.jsonl"})
    assert (f.id, f.bytes, f.filename) == ("file-1", 437, "x.jsonl")
    assert RemoteFile.parse({"id": "file-1", "bytes": "big"}).bytes is None
    with pytest.raises(BadAnswer):
        RemoteFile.parse({"bytes": 1})


def test_a_page_needs_a_data_list_and_only_true_means_more() -> None:
    page = Page.parse({"data": [{"id": "a"}, "junk", {"id": "b"}], "has_more": "yes"})
    assert [i["id"] for i in page.items] == ["a", "b"]
    assert page.has_more is False and page.last_id == "b"
    assert Page.parse({"data": [{"id": "a"}], "has_more": True}).has_more
    with pytest.raises(BadAnswer):
        Page.parse({"data": None})


def test_ids_and_counts_pure_checks() -> None:
    assert valid_id("file-batch_output-9d22cd70-bff4-d2b6")
    assert not valid_id("a/b") and not valid_id("a..b")
    notes: list[str] = []
    assert count("007", "n", notes) == 7 and not notes


def test_a_batch_is_matched_by_its_own_file_id_or_batchd_metadata() -> None:
    part = part_like(job_id="job", seq=1, remote_file_id="file-batch-1")
    assert made_from(batch(), part)
    assert made_from(batch(input_file_id="file-other", metadata={"batchd_part": "job-1"}), part)
    assert not made_from(batch(input_file_id="file-other", metadata={}), part)
    assert past_intents(batch(created_at=1000), 2000, 300)
    assert not past_intents(batch(created_at=1900), 2000, 300)
    assert not past_intents(batch(created_at=None), 2000, 300)


def test_step_pauses_double_up_to_the_cap() -> None:
    policy = StepPolicy(max_failures=5, base_s=2, cap_s=10)
    assert [policy.pause_s(n) for n in (1, 2, 3, 4, 50)] == [2, 4, 8, 10, 10]


def test_of_a_parts_batches_the_one_followed_then_the_furthest_along_then_the_oldest() -> None:
    def made(i: str, status: str | None, created: float | None, done: int = 0) -> RemoteBatch:
        return RemoteBatch.parse(
            {
                "id": i,
                "status": status,
                "created_at": created,
                "request_counts": {"total": 9, "completed": done, "failed": 0},
            }
        )

    # As a newest-first list shows three made within the same second.
    a, b, c = (
        made("b3", "validating", 10),
        made("b2", "validating", 10),
        made("b1", "validating", 10),
    )
    assert keep([a, b, c]).id == "b1"  # equals: the oldest, the one listed last
    assert keep([a, b, c], followed="b2").id == "b2"  # the part's own, whatever else
    running = made("b2", "in_progress", 10, done=4)
    assert keep([a, running, c]).id == "b2"
    assert keep([made("x", "completed", 12), running]).id == "x"
    assert keep([made("late", "in_progress", 20, 5), made("early", "in_progress", 10, 5)]).id == (
        "early"
    )
    # Ended ones that ran nothing are kept only when all did; an unknown status may run.
    assert keep([made("f", "failed", 1), made("v", "validating", 5)]).id == "v"
    assert keep([made("f", "failed", 1), made("c", "cancelled", 5)]).id == "f"
    assert progress(made("u", "queued_upstream", 1)) > progress(made("f", "failed", 1))
    assert tagged_part("01a24dbd4c90e135a089-3") == ("01a24dbd4c90e135a089", 3)
    for bad in (None, "", "nodash", "job-", "-3", "job-x", "jo b-3", "j" * 90 + "-1", "job-1e3"):
        assert tagged_part(bad) is None, bad


def test_an_extra_batch_says_what_it_may_cost() -> None:
    def extra(cancel: ExtraCancel, status: str | None, counts: dict[str, int] | None) -> str:
        return extra_note(
            ExtraBatch("b", "j", 1, "k", "settle", 0.0, status, counts, cancel, error="HTTP 400")
        )

    assert "may still bill" in extra(ExtraCancel.REQUESTED, "validating", None)
    ran = extra(ExtraCancel.ENDED, "cancelled", {"total": 10, "completed": 3, "failed": 1})
    assert ran.startswith("cancelled") and "4 of its 10 requests had run (billed" in ran
    done = extra(ExtraCancel.ENDED, "completed", {"total": 10, "completed": 10, "failed": 0})
    assert done.startswith("had completed before it could be cancelled") and "10 of its 10" in done
    assert extra(ExtraCancel.FAILED, "completed", None).startswith(
        "could not be cancelled: HTTP 400"
    )


def test_a_batch_read_from_oss_keeps_its_oss_name_and_is_matched_by_it() -> None:
    name = "oss:cn-beijing:my-bucket/spool/J1/input.part-001.jsonl"
    read = batch(input_file_id=name, metadata={})
    assert read.input_file_id == name and not read.notes
    # A lost create is found by that name alone, whatever the metadata says.
    assert made_from(read, part_like(job_id="other", seq=9, remote_file_id=name))
    assert not made_from(
        batch(input_file_id=name + "x", metadata={}), part_like(remote_file_id=name)
    )
    for bad in ("oss:cn-beijing:my-bucket/", "oss:cn-beijing:A_B/k", "oss:x:bucket/a\nb"):
        odd = batch(input_file_id=bad)
        assert odd.input_file_id is None and odd.notes
