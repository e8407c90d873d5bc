"""Merging result files into the outbox's files, in bounded memory, losing no paid line;
deciding what becomes of a part's files; copying the validated input (batchd.outbox.merge)."""

from __future__ import annotations

import csv
import hashlib
import io
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.cli import main
from batchd.documents import JobOptions, JobReport, decode_report, to_json
from batchd.inputs.csvio import jsonl_file_to_csv, neutralised
from batchd.inputs.lines import iter_lines
from batchd.models import Job, JobState, Part, PartState
from batchd.outbox.folder import OutboxFolder
from batchd.outbox.merge import (
    RESULT_UNAVAILABLE,
    batch_error,
    merge,
    merged,
    never_ran,
    output_path,
    with_input_line,
    write_with_input_line,
)
from batchd.outbox.writer import (
    cost_summary,
    job_error,
    keep_input_files,
    unread_rejection,
    write_rejection,
)
from batchd.pipeline.collect import Fetched, decide_collect, retryable_failure
from batchd.pipeline.problems import StepPolicy
from batchd.pipeline.publish import error_note, remote_files_to_delete
from batchd.provider.prices import table_from
from batchd.provider.profiles import PROFILES
from batchd.provider.tokens import RequestCounter
from batchd.testing import read_jsonl

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def make_part(folder: Path, seq: int = 1, **fields: Any) -> Part:
    values: dict[str, Any] = {
        "id": seq,
        "job_id": "job1",
        "seq": seq,
        "path": str(folder / "input.jsonl"),
        "first_line": 1,
        "requests": 0,
        "bytes": 0,
        "model": "qwen-plus",
        "endpoint": "/v1/chat/completions",
        "state": PartState.COLLECTED,
        "upload_name": f"batchd-job1-p{seq:03d}.jsonl",
        "remote_file_id": f"file-in-{seq}",
        "batch_id": f"batch_{seq}",
        "remote_status": "completed",
        "request_counts": None,
        "output_file_id": f"file-out-{seq}",
        "error_file_id": f"file-err-{seq}",
        "remote_errors": None,
        "next_poll_at": None,
        "created_remote_at": None,
        "ended_at": None,
        "attempts": 0,
        "error": None,
        "completion_window": "24h",
        "round": 0,
        "polled_at": None,
        "intent_at": None,
        "retry_at": None,
        "parked_from": None,
        "unavailable": None,
        "adopt": False,
    }
    values.update(fields)
    return Part(**values)


def make_job(spool_input: Path, **fields: Any) -> Job:
    data = spool_input.read_bytes() if spool_input.exists() else b""
    st = spool_input.stat() if spool_input.exists() else None
    values: dict[str, Any] = {
        "id": "job1",
        "name": "job",
        "inbox_name": spool_input.name,
        "spool_path": str(spool_input),
        "kind": spool_input.suffix.lstrip("."),
        "state": JobState.PUBLISHING,
        "outcome": None,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "options": JobOptions(),
        "report": JobReport(valid=True, requests=data.count(b"\n")),
        "error": None,
        "outbox_path": None,
        "cancel_requested": False,
        "crash_count": 0,
        "created_at": 0.0,
        "updated_at": 0.0,
        "completed": 0,
        "failed": 0,
        "usage": None,
        "input_mtime_ns": st.st_mtime_ns if st else None,
        "prepares": 1,
        "retried_as": None,
        "recovered_at": None,
    }
    values.update(fields)
    # A report given as the JSON the store keeps, decoded as the store decodes it.
    if isinstance(values["report"], dict):
        values["report"] = decode_report(values["report"])
    return Job(**values)


def request(cid: str) -> bytes:
    body = {"model": "qwen-plus", "messages": [{"role": "user", "content": f"q {cid}"}]}
    return orjson.dumps(
        {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def write_input(folder: Path, ids: list[str]) -> Path:
    path = folder / "input.jsonl"
    path.write_bytes(b"".join(request(c) + b"\n" for c in ids))
    return path


def success(cid: str, content: str = "fine", raw_content: bytes | None = None) -> bytes:
    text = raw_content if raw_content is not None else orjson.dumps(content)
    return (
        b'{"id":"r-' + cid.encode() + b'","custom_id":"' + cid.encode() + b'","response":'
        b'{"status_code":200,"request_id":"q","body":{"model":"qwen-plus","choices":'
        b'[{"message":{"content":' + text + b'}}],"usage":' + orjson.dumps(USAGE) + b"}},"
        b'"error":null}'
    )


def failure(cid: str) -> bytes:
    return orjson.dumps(
        {
            "id": f"r-{cid}",
            "custom_id": cid,
            "response": {"status_code": 400, "request_id": "q", "body": None},
            "error": {"code": "InvalidParameter", "message": "bad"},
        }
    )


def write_results(part: Part, output: list[bytes], error: list[bytes]) -> None:
    for kind, lines in (("output", output), ("error", error)):
        if lines:
            output_path(part, kind).write_bytes(b"".join(x + b"\n" for x in lines))


def run_merge(folder: Path, parts: list[Part], **kw: Any) -> tuple[Any, list[bytes], list[bytes]]:
    out = folder / "out"
    out.mkdir(exist_ok=True)
    stats = merge(
        folder / "input.jsonl",
        parts,
        out / "result.jsonl",
        out / "error.jsonl",
        out / "unattributed.jsonl",
        results_csv=out / "result.csv",
        **kw,
    )
    results = (out / "result.jsonl").read_bytes().splitlines(keepends=True)
    errors = (out / "error.jsonl").read_bytes().splitlines(keepends=True)
    return stats, results, errors


def test_lines_a_strict_parser_refuses_are_published_byte_for_byte(tmp_path: Path) -> None:
    ids = ["r0", "r1", "r2", "r3", "r4"]
    write_input(tmp_path, ids)
    part = make_part(tmp_path, requests=5)
    odd = [
        success("r0"),
        success("r1", raw_content=b'"cut at max_tokens \\ud83d"'),  # a lone surrogate
        success("r2").replace(b'"model":"qwen-plus"', b'"model":"qwen-plus","score":NaN'),
        success("r3").replace(b'"model":"qwen-plus"', b'"model":"qwen-plus","score":1e400'),
        success("r4")[:60],  # cut in half: not JSON, but its custom_id is at its start
    ]
    write_results(part, list(reversed(odd)), [])
    stats, results, errors = run_merge(tmp_path, [part])
    assert results == [line + b"\n" for line in odd]  # input order, every byte kept
    assert errors == []
    assert (stats.total, stats.completed, stats.failed) == (5, 5, 0)
    assert stats.unattributed == 0 and not (tmp_path / "out" / "unattributed.jsonl").exists()
    # Usage is summed from the lines that parse (the cut one does not).
    assert stats.usage == {"reasoning_tokens": 0, **{k: 4 * v for k, v in USAGE.items()}}
    # And per model; no cost where no prices are given. The line cut in half has no
    # usage to read: it ran, so it is charged its worst case (counted per reason).
    (model,) = stats.per_model
    assert stats.per_model[model]["requests"] == 4 and stats.costs == {}
    assert stats.estimated_reasons == {"usage_missing": 1}
    assert [e["input_line"] for e in stats.estimated_lines] == [5]


def test_a_line_from_the_error_file_that_does_not_parse_is_a_failure(tmp_path: Path) -> None:
    write_input(tmp_path, ["r0", "r1"])
    part = make_part(tmp_path, requests=2)
    cut = failure("r1")[:40]
    write_results(part, [success("r0")], [cut])
    stats, results, errors = run_merge(tmp_path, [part])
    assert (stats.completed, stats.failed, stats.never_run) == (1, 1, 0)
    assert results == [success("r0") + b"\n"]
    (error,) = errors
    assert orjson.loads(error) == {"input_line": 2, "raw": cut.decode()}


def test_lines_no_request_claims_are_kept_in_unattributed_jsonl(tmp_path: Path) -> None:
    write_input(tmp_path, ["r0", "r1", "r2"])
    part = make_part(tmp_path, requests=3)
    no_id = b'{"id":"x","response":{"status_code":200,"body":{}},"error":null}'
    garbage = b"\x00\x01 this is not json"
    unknown = success("zz")
    first_r0 = success("r0", "first answer")
    output = [first_r0, no_id, success("r1"), garbage, unknown, success("r0", "second answer")]
    errors_in = [failure("r1"), failure("r2"), b'{"custom_id":7,"error":{"code":"x"}}']
    write_results(part, output, errors_in)
    stats, results, errors = run_merge(tmp_path, [part])
    assert (stats.total, stats.completed, stats.failed) == (3, 2, 1)
    assert [orjson.loads(x)["custom_id"] for x in results] == ["r0", "r1"]
    assert results[0] == success("r0", "second answer") + b"\n"  # the later answer wins
    assert [orjson.loads(x)["custom_id"] for x in errors] == ["r2"]
    kept = (tmp_path / "out" / "unattributed.jsonl").read_bytes().splitlines()
    # Every line that is not an answer above is here, byte for byte, none twice.
    assert sorted(kept) == sorted(
        [no_id, garbage, unknown, first_r0, failure("r1"), b'{"custom_id":7,"error":{"code":"x"}}']
    )
    assert stats.unattributed == 6
    assert stats.unattributed_reasons == {
        "no_custom_id": 3,
        "duplicate": 2,
        "unknown_custom_id": 1,
    }
    listed = stats.unattributed_lines
    assert [x["line"] for x in listed] == list(range(1, 7))
    assert {x["custom_id"] for x in listed if x["reason"] == "duplicate"} == {"r0", "r1"}
    assert all(x["file_id"] in ("file-out-1", "file-err-1") for x in listed)


# -- what requests cost (issues 21 and 22) ------------------------------------------------

PLUS = table_from({"custom": {"qwen-plus": {"input": 2.0, "output": 8.0, "currency": "CNY"}}})


def counter() -> RequestCounter:
    return RequestCounter("custom", PROFILES["custom"].limits, PLUS)


def with_usage(cid: str, usage: bytes) -> bytes:
    """A success line whose usage is written as given (any bytes, NaN included)."""
    return success(cid).replace(b'"usage":' + orjson.dumps(USAGE), b'"usage":' + usage)


def worst_of(folder: Path, cids: list[str]) -> float:
    """What planning counts as the worst case of these requests of the input."""
    count = counter()
    total = 0.0
    for line in read_jsonl(folder / "input.jsonl"):
        if line["custom_id"] in cids:
            cost = count.worst(line["body"], line["url"]).cost
            assert cost is not None
            total += cost
    return total


def test_a_line_whose_usage_is_absurd_is_charged_its_worst_case(tmp_path: Path) -> None:
    """Each absurd number is refused with a note (never raising, never passing into the
    outbox's files), and its request charged its worst case; sound lines are priced from
    their usage."""
    absurd = [
        b'{"prompt_tokens":"3","completion_tokens":2,"total_tokens":5}',
        b'{"prompt_tokens":3,"completion_tokens":-2,"total_tokens":5}',
        b'{"prompt_tokens":3.5,"completion_tokens":2,"total_tokens":5}',
        b'{"prompt_tokens":3,"total_tokens":5}',
        b'{"prompt_tokens":18446744073709551617,"completion_tokens":2,"total_tokens":NaN}',
        b'{"prompt_tokens":' + b"9" * 401 + b',"completion_tokens":2,"total_tokens":5}',
    ]
    ids = [f"r{i}" for i in range(len(absurd) + 1)]
    write_input(tmp_path, ids)
    part = make_part(tmp_path, requests=len(ids))
    write_results(
        part, [success("r0")] + [with_usage(f"r{i + 1}", u) for i, u in enumerate(absurd)], []
    )
    stats, results, _ = run_merge(tmp_path, [part], counter=counter())
    assert stats.completed == len(ids) and len(results) == len(ids)
    # Usage is the sound line's alone.
    assert stats.usage == {"reasoning_tokens": 0, **USAGE}
    plus = PLUS.price("custom", "qwen-plus")
    assert plus is not None
    cost = stats.costs["qwen-plus"]
    assert cost.from_usage == pytest.approx(plus.batch_cost(3, 2))
    assert cost.estimated_requests == len(absurd)
    assert cost.estimated == pytest.approx(worst_of(tmp_path, ids[1:]))
    assert stats.estimated_reasons == {"usage_refused": len(absurd)}
    notes = [(e["input_line"], e["note"]) for e in stats.estimated_lines]
    assert notes[0] == (2, "prompt_tokens is not a token count ('3')")
    assert notes[3] == (5, "completion_tokens missing")
    summary = cost_summary(stats, "CNY")
    assert summary.amount == pytest.approx(cost.from_usage + cost.estimated, abs=1e-6)
    assert summary.estimated.requests == len(absurd)
    assert summary.estimated.why
    # Nothing absurd reaches what summary.json is written from.
    orjson.dumps({"usage": stats.usage, "per_model": stats.per_model, "cost": to_json(summary)})


def test_requests_whose_results_were_lost_are_charged_as_many_as_the_service_completed(
    tmp_path: Path,
) -> None:
    """A part whose files could not be fetched: the service counted 2 of its 4 requests
    completed, so the 2 dearest are charged their worst case; with no usable count, all
    of them."""
    path = tmp_path / "input.jsonl"
    lines = []
    for n, most in enumerate([10, 1000, 100, None]):
        body: dict[str, Any] = {
            "model": "qwen-plus",
            "messages": [{"role": "user", "content": "q"}],
        }
        if most is not None:
            body["max_tokens"] = most
        line = {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        lines.append(orjson.dumps(line) + b"\n")
    path.write_bytes(b"".join(lines))
    lost = {"output": "HTTP 404", "error": "HTTP 404"}
    counts = {"total": 4, "completed": 2, "failed": 2}
    part = make_part(tmp_path, requests=4, unavailable=lost, request_counts=counts)
    stats, _, errors = run_merge(tmp_path, [part], counter=counter())
    assert stats.unavailable == 4 and len(errors) == 4
    cost = stats.costs["qwen-plus"]
    assert cost.from_usage == 0.0 and cost.estimated_requests == 2
    # The dearest two: no max_tokens (the model's whole output bound), then 1000.
    assert cost.estimated == pytest.approx(worst_of(tmp_path, ["r3", "r1"]))
    assert stats.unavailable_parts == [{"part": 1, "requests": 4, "completed": 2, "charged": 2}]
    assert stats.estimated_reasons == {RESULT_UNAVAILABLE: 2}
    # A count that makes no sense (more than the part holds): every request is charged.
    for garbled in ({"completed": 9}, {"completed": "2"}, None):
        part = make_part(tmp_path, requests=4, unavailable=lost, request_counts=garbled)
        stats, _, _ = run_merge(tmp_path, [part], counter=counter())
        assert stats.costs["qwen-plus"].estimated == pytest.approx(
            worst_of(tmp_path, ["r0", "r1", "r2", "r3"])
        )


def test_a_lost_output_file_beside_a_fetched_error_file_charges_only_the_completed(
    tmp_path: Path,
) -> None:
    """The error file was fetched (one failure, unbilled); the output file was lost: the
    service's 2 completed requests are the 2 without an answer, both charged."""
    write_input(tmp_path, ["r0", "r1", "r2"])
    counts = {"total": 3, "completed": 2, "failed": 1}
    part = make_part(
        tmp_path, requests=3, unavailable={"output": "HTTP 404"}, request_counts=counts
    )
    write_results(part, [], [failure("r0")])
    stats, _, _ = run_merge(tmp_path, [part], counter=counter())
    assert stats.unavailable == 2
    cost = stats.costs["qwen-plus"]
    assert cost.estimated_requests == 2
    assert cost.estimated == pytest.approx(worst_of(tmp_path, ["r1", "r2"]))


def test_a_follow_up_part_whose_output_was_lost_is_charged_too(tmp_path: Path) -> None:
    """Two failures resent in a follow-up part whose output file was lost, one of them
    completed by the service's count: they keep the first round's answer, and the one
    the service completed is charged (the dearer)."""
    write_input(tmp_path, ["r0", "r1", "r2"])
    first = make_part(tmp_path, 1, requests=3)
    resent = tmp_path / "followup-1-002.jsonl"
    resent.write_bytes(request("r1") + b"\n" + request("r2") + b"\n")
    again = make_part(
        tmp_path,
        2,
        path=str(resent),
        requests=2,
        first_line=2,
        round=1,
        unavailable={"output": "HTTP 404"},
        request_counts={"total": 2, "completed": 1, "failed": 1},
    )
    throttled = failure("r1").replace(b"InvalidParameter", b"Throttling")
    write_results(first, [success("r0")], [throttled, failure("r2")])
    stats, _, errors = run_merge(tmp_path, [first, again], counter=counter())
    assert (stats.completed, stats.failed, stats.unavailable) == (1, 2, 0) and len(errors) == 2
    cost = stats.costs["qwen-plus"]
    assert cost.estimated_requests == 1
    assert cost.estimated == pytest.approx(max(worst_of(tmp_path, [c]) for c in ("r1", "r2")))
    assert stats.unavailable_parts == [{"part": 2, "requests": 2, "completed": 1, "charged": 1}]


def test_a_follow_up_answer_replaces_the_failure_it_retried(tmp_path: Path) -> None:
    write_input(tmp_path, ["r0", "r1"])
    first = make_part(tmp_path, 1, requests=2)
    again = make_part(tmp_path, 2, requests=1, first_line=2, round=1)
    write_results(first, [success("r0")], [failure("r1")])
    write_results(again, [success("r1")], [])
    stats, results, errors = run_merge(tmp_path, [first, again])
    assert (stats.completed, stats.failed, stats.unattributed) == (2, 0, 0) and errors == []
    assert results == [success("r0") + b"\n", success("r1") + b"\n"]


def test_only_the_validated_bytes_of_the_input_are_merged(tmp_path: Path) -> None:
    path = write_input(tmp_path, ["r0", "r1"])
    validated = path.stat().st_size
    with path.open("ab") as fh:  # a producer appends after the claim
        fh.write(request("late1") + b"\n" + request("late2") + b"\n")
    part = make_part(tmp_path, requests=2)
    write_results(part, [success("r0"), success("r1")], [])
    stats, results, _ = run_merge(tmp_path, [part], input_bytes=validated)
    assert (stats.total, stats.completed, stats.failed) == (2, 2, 0) and len(results) == 2


def test_lines_over_the_cap_are_copied_in_chunks_with_input_line_added(tmp_path: Path) -> None:
    write_input(tmp_path, ["r0", "r1", "r2"])
    part = make_part(tmp_path, requests=3)
    big = success("r0", "x" * 200_000)
    big_failure = failure("r1").replace(b'"bad"', orjson.dumps("y" * 100_000)) + b"  "
    cut_failure = failure("r2").replace(b'"bad"', orjson.dumps("z\u00e9" * 50_000))[:-30]
    write_results(part, [big], [big_failure, cut_failure])
    stats, results, errors = run_merge(tmp_path, [part], max_line_bytes=4096)
    assert (stats.completed, stats.failed) == (1, 2)
    assert results == [big + b"\n"]
    # The streaming rewrite gives exactly the bytes of the one that holds the line.
    assert errors == [with_input_line(big_failure, 2), with_input_line(cut_failure, 3)]
    assert orjson.loads(errors[0])["input_line"] == 2
    assert orjson.loads(errors[1])["raw"].startswith('{"id":"r-r2"')
    rows = list(csv.reader(io.StringIO((tmp_path / "out" / "result.csv").read_text("utf-8-sig"))))
    assert rows[1][0] == "r0" and rows[1][7] == f"[line of {len(big) + 1} bytes: see result.jsonl]"
    # A long failure's row gives the size of its line as published (input_line added).
    assert rows[2][0] == "r1" and rows[2][7] == f"[line of {len(errors[0])} bytes: see error.jsonl]"
    # The cut failure was wrapped ({"input_line":3,"raw":...}): its row names its request.
    assert rows[3][0] == "r2"
    assert len(rows) == 4


def test_merging_a_huge_line_holds_the_cap_not_the_line(tmp_path: Path) -> None:
    write_input(tmp_path, ["r0", "r1"])
    part = make_part(tmp_path, requests=2)
    with output_path(part, "output").open("wb") as out:
        out.write(success("r1") + b"\n")
        out.write(b'{"id":"r-r0","custom_id":"r0","response":{"status_code":200,"body":{"c":"')
        for _ in range(24):
            out.write(b"w" * (1 << 20))
        out.write(b'"}},"error":null}\n')
    result = tmp_path / "result.jsonl"
    tracemalloc.start()
    try:
        stats = merge(
            tmp_path / "input.jsonl",
            [part],
            result,
            tmp_path / "error.jsonl",
            tmp_path / "unattributed.jsonl",
            max_line_bytes=64 * 1024,
            results_csv=tmp_path / "result.csv",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (stats.completed, stats.failed) == (2, 0)
    assert result.stat().st_size == output_path(part, "output").stat().st_size
    assert peak < 8 * (1 << 20), f"peak {peak} bytes"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"a":1}\n', b'{"a":1,"input_line":3}\n'),
        (b'{"a":1}  \r\n', b'{"a":1,"input_line":3}\n'),
        (b"{}\n", b'{"input_line":3}\n'),
        (b"{ }", b'{ "input_line":3}\n'),
    ],
)
def test_input_line_is_added_without_breaking_the_object(line: bytes, expected: bytes) -> None:
    assert with_input_line(line, 3) == expected
    fh = io.BytesIO(b"x\n" + line)
    _, parsed = list(iter_lines(fh, 1 << 20))
    out = io.BytesIO()
    write_with_input_line(fh, parsed, 3, out)  # the streaming rewrite agrees
    assert out.getvalue() == expected


def test_requests_whose_file_could_not_be_fetched_get_result_unavailable(tmp_path: Path) -> None:
    write_input(tmp_path, ["r0", "r1"])
    part = make_part(tmp_path, requests=2, unavailable={"output": "HTTP 404 : no such file"})
    write_results(part, [], [failure("r1")])
    stats, results, errors = run_merge(tmp_path, [part])
    assert (stats.completed, stats.failed, stats.unavailable, stats.never_run) == (0, 2, 1, 0)
    assert results == []
    first = orjson.loads(errors[0])
    assert first["error"]["code"] == RESULT_UNAVAILABLE and first["input_line"] == 1
    assert "file-out-1" in first["error"]["message"] and "404" in first["error"]["message"]
    items = list(merged(tmp_path / "input.jsonl", [part]))
    # Most likely run and billed: never resubmitted on its own.
    assert not retryable_failure(items[0])


def test_a_permanent_failure_gives_the_file_up_at_once() -> None:
    part = make_part(Path("/spool/j"), attempts=0)
    fetched = [
        Fetched("output", "file-out-1", permanent="HTTP 404 : gone"),
        Fetched("error", "file-err-1", lines=2, size=10),
    ]
    decision = decide_collect(part, fetched, StepPolicy(max_failures=5), {"failed": 3})
    assert decision.done and decision.unavailable == {"output": "HTTP 404 : gone"}
    assert decision.note is not None
    assert "result_unavailable" in decision.note and "request_counts says 3" in decision.note


def test_transient_failures_pause_then_give_the_file_up_after_the_last() -> None:
    policy = StepPolicy(max_failures=3, base_s=1.0, cap_s=10.0)
    fetched = [Fetched("output", "file-out-1", transient="download too slow: 10 bytes")]
    first = decide_collect(make_part(Path("/s"), attempts=0), fetched, policy, None)
    assert not first.done and first.failures == 1 and first.retry_in_s == 1.0
    second = decide_collect(make_part(Path("/s"), attempts=1), fetched, policy, None)
    assert not second.done and second.retry_in_s == 2.0
    last = decide_collect(make_part(Path("/s"), attempts=2), fetched, policy, None)
    assert last.done and last.unavailable == {
        "output": "gave up after 3 failures: download too slow: 10 bytes"
    }
    assert last.note is not None and "left on the service" in last.note


def test_files_given_up_after_transient_failures_are_not_deleted() -> None:
    gone = make_part(Path("/s"), 1, unavailable={"output": "HTTP 404 : gone"})
    kept = make_part(Path("/s"), 2, unavailable={"error": "gave up after 5 failures: 503"})
    assert remote_files_to_delete([gone, kept]) == [
        "file-in-1",
        "file-out-1",
        "file-err-1",
        "file-in-2",
        "file-out-2",
    ]


@pytest.mark.parametrize(
    ("cell", "shown"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1", "'+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_cells_a_spreadsheet_would_run_are_neutralised(cell: str, shown: str) -> None:
    assert neutralised(cell) == shown


def test_result_csv_never_writes_a_formula_but_raw_cells_can(tmp_path: Path) -> None:
    source = tmp_path / "result.jsonl"
    source.write_bytes(
        b'{"custom_id":"=cmd|\' /C calc\'!A0","response":{"status_code":200,"body":'
        b'{"choices":[{"message":{"content":"@SUM(1+1)*cmd"}}]}}}\n'
        + success("r9", raw_content=b'"ends in \\ud83d"')
        + b"\n"
    )
    assert jsonl_file_to_csv(source, tmp_path / "safe.csv").ok
    safe = list(csv.reader(io.StringIO((tmp_path / "safe.csv").read_text("utf-8-sig"))))
    assert safe[1][0] == "'=cmd|' /C calc'!A0" and safe[1][7] == "'@SUM(1+1)*cmd"
    assert safe[2][7] == "ends in \ufffd"  # a lone surrogate is shown, not a crash
    assert jsonl_file_to_csv(source, tmp_path / "raw.csv", safe_cells=False).ok
    raw = list(csv.reader(io.StringIO((tmp_path / "raw.csv").read_text("utf-8-sig"))))
    assert raw[1][0] == "=cmd|' /C calc'!A0"


def test_the_outbox_input_is_a_copy_of_the_validated_bytes(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    source = write_input(spool, ["r0", "r1", "r2"])
    validated = source.read_bytes()
    job = make_job(source)
    with source.open("ab") as fh:  # a producer still holding the file appends
        fh.write(request("late") + b"\n")
    out = tmp_path / "tmp"
    out.mkdir()
    kept = keep_input_files(job, [], OutboxFolder(out), keep=True)
    assert (out / "input.jsonl").read_bytes() == validated
    assert (out / "input.jsonl").stat().st_ino != source.stat().st_ino
    assert (out / "unsent.jsonl").read_bytes() == request("late") + b"\n"
    changed = kept["input_changed"]
    assert changed["appended_bytes"] == len(request("late")) + 1
    assert not changed["modified_in_place"] and changed["unsent"] == "unsent.jsonl"
    assert "drop them again as a new file" in changed["note"]
    # Without keep_input the validated copy is not made, but the unsent bytes still are.
    bare = tmp_path / "bare"
    bare.mkdir()
    keep_input_files(job, [], OutboxFolder(bare), keep=False)
    assert sorted(p.name for p in bare.iterdir()) == ["unsent.jsonl"]


def test_an_input_changed_in_place_is_kept_beside_the_parts_that_were_sent(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    source = write_input(spool, ["r0", "r1"])
    job = make_job(source)
    (spool / "part-001.jsonl").write_bytes(request("r0") + b"\n")
    (spool / "part-002.jsonl").write_bytes(request("r1") + b"\n")
    parts = [
        make_part(spool, 1, path=str(spool / "part-001.jsonl")),
        make_part(spool, 2, path=str(spool / "part-002.jsonl")),
    ]
    source.write_bytes(request("other") + b"\n")
    out = tmp_path / "tmp"
    out.mkdir()
    changed = keep_input_files(job, parts, OutboxFolder(out), keep=True)["input_changed"]
    assert changed["modified_in_place"] and changed["kept_as"] == "input.changed.jsonl"
    assert sorted(p.name for p in out.iterdir()) == [
        "input.changed.jsonl",
        "input.part-001.jsonl",
        "input.part-002.jsonl",
    ]
    assert (out / "input.changed.jsonl").read_bytes() == request("other") + b"\n"


def test_an_input_rejected_unread_is_moved_not_copied(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    source = spool / "input.jsonl"
    with source.open("wb") as fh:
        fh.truncate(10 * (1 << 30))  # sparse: 10 GiB that a copy would write out
    report = {
        "valid": False,
        "requests": 0,
        "errors": [{"line": None, "code": "input_too_large", "message": "too large"}],
    }
    job = make_job(spool / "missing", spool_path=str(source), sha256=None, report=report)
    assert unread_rejection(job)
    inode = source.stat().st_ino
    out = tmp_path / "tmp"
    out.mkdir()
    assert keep_input_files(job, [], OutboxFolder(out), keep=True) == {}
    assert not source.exists() and (out / "input.jsonl").stat().st_ino == inode


def test_an_input_rejected_unread_stays_in_the_spool_across_filesystems(
    tmp_path: Path, elsewhere: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    source = spool / "input.jsonl"
    source.write_bytes(b"x" * 100)
    report = {"valid": False, "errors": [{"line": None, "code": "sparse_file", "message": "s"}]}
    job = make_job(source, sha256=None, report=report)
    kept = keep_input_files(job, [], OutboxFolder(elsewhere), keep=True)
    assert kept == {"input_kept_at": str(source)}
    assert source.exists() and not (elsewhere / "input.jsonl").exists()


def test_jsonl2csv_neutralises_formulas_unless_raw_cells(tmp_path: Path) -> None:
    source = tmp_path / "result.jsonl"
    source.write_bytes(b'{"custom_id":"+1-555","response":{"status_code":200,"body":{}}}\n')
    assert main(["jsonl2csv", str(source), "-o", str(tmp_path / "safe.csv")]) == 0
    assert "'+1-555" in (tmp_path / "safe.csv").read_text("utf-8-sig")
    raw_csv = tmp_path / "raw.csv"
    assert main(["jsonl2csv", str(source), "-o", str(raw_csv), "--raw-cells"]) == 0
    assert raw_csv.read_text("utf-8-sig").splitlines()[1].startswith("+1-555,")


# -- issue 16: one row per request in input order, never_run, whole-batch errors --------


def csv_ids(path: Path) -> list[str]:
    rows = list(csv.reader(io.StringIO(path.read_text("utf-8-sig"))))
    assert rows[0][0] == "custom_id"
    return [row[0] for row in rows[1:]]


def test_result_csv_follows_the_input_whatever_fails(tmp_path: Path) -> None:
    """200 requests, 18 failing among them (the issue's file): row N is line N."""
    ids = [f"r{n}" for n in range(200)]
    write_input(tmp_path, ids)
    part = make_part(tmp_path, requests=200)
    failing = {f"r{n}" for n in range(2, 200, 11)}
    assert len(failing) == 18
    # The service promises no order: its files come reversed.
    write_results(
        part,
        [success(c) for c in reversed(ids) if c not in failing],
        [failure(c) for c in reversed(ids) if c in failing],
    )
    stats, _, _ = run_merge(tmp_path, [part])
    assert (stats.total, stats.completed, stats.failed) == (200, 182, 18)
    assert csv_ids(tmp_path / "out" / "result.csv") == ids
    rows = list(csv.reader(io.StringIO((tmp_path / "out" / "result.csv").read_text("utf-8-sig"))))
    assert rows[3][0] == "r2" and rows[3][4] == "InvalidParameter"  # line 3: a failure, row 3


def not_run(cid: str, code: str) -> bytes:
    """A line of the service's own for a request it never ran."""
    return orjson.dumps(
        {
            "id": f"r-{cid}",
            "custom_id": cid,
            "response": None,
            "error": {"code": code, "message": "m"},
        }
    )


def test_never_run_counts_the_services_own_lines_as_batchds(tmp_path: Path) -> None:
    """Cancelled while running: the service lists what it never ran as batch_cancelled;
    those count as never run, as batchd's own lines for requests without an answer do."""
    write_input(tmp_path, ["r0", "r1", "r2", "r3", "r4"])
    part = make_part(tmp_path, requests=5, remote_status="cancelled")
    write_results(
        part,
        [success("r0")],
        [failure("r1"), not_run("r2", "batch_cancelled"), not_run("r3", "batch_cancelled")],
    )
    stats, _, errors = run_merge(tmp_path, [part])
    # r4 has no line at all: batchd's own batch_cancelled.
    codes = [orjson.loads(e)["error"]["code"] for e in errors]
    assert codes == ["InvalidParameter", "batch_cancelled", "batch_cancelled", "batch_cancelled"]
    assert (stats.completed, stats.failed, stats.never_run) == (1, 4, 3)


@pytest.mark.parametrize(
    ("code", "sent", "ran"),
    [
        ("batch_expired", True, False),
        ("batch_cancelled", True, False),
        ("batch_failed", True, False),
        ("batch_lost", True, False),
        ("not_submitted", True, False),
        ("result_missing", True, True),  # not known: the batch ended without its line
        ("result_unavailable", True, True),  # most likely ran: its file was not fetched
        ("InvalidParameter", True, True),
        (None, True, True),
        ("invalid_json", False, False),  # nothing of a rejected input ran
        ("not_submitted", False, False),
    ],
)
def test_never_run_is_decided_from_the_code(code: str | None, sent: bool, ran: bool) -> None:
    assert never_ran(code, sent=sent) is not ran


def test_a_batch_the_service_failed_is_stated_once(tmp_path: Path) -> None:
    """200 lines, each once listed in the batch's errors: summary.json says it once,
    each line refers to it by its code (the issue's file was 256 KB)."""
    ids = [f"r{n}" for n in range(200)]
    write_input(tmp_path, ids)
    listed = [
        {
            "code": "model_not_found",
            "message": "model 'qwen-plsu' does not exist",
            "line": n,
            "param": "body.model",
        }
        for n in range(1, 101)
    ]
    part = make_part(
        tmp_path,
        requests=200,
        remote_status="failed",
        output_file_id=None,
        error_file_id=None,
        remote_errors={"object": "list", "data": listed},
    )
    stats, results, errors = run_merge(tmp_path, [part])
    assert (stats.failed, stats.never_run, results) == (200, 200, [])
    assert {orjson.loads(e)["error"]["message"] for e in errors} == {
        "the batch was rejected: see summary.json error (model_not_found)"
    }
    assert sum(len(e) for e in errors) < 200 * 200
    assert batch_error(part) == {
        "code": "model_not_found",
        "message": "model 'qwen-plsu' does not exist (line 1 of part 1); 99 more listed in the"
        " part's errors",
        "part": 1,
        "batch_id": "batch_1",
        "listed": 100,
    }
    job = make_job(tmp_path / "input.jsonl")
    error = job_error(job, [part])
    assert error is not None and error.code == "model_not_found"
    assert error_note(error) == f"model_not_found: {error.message}"
    assert csv_ids(tmp_path / "out" / "result.csv") == ids


@pytest.mark.parametrize(
    ("errors", "code", "message"),
    [
        (None, "batch_failed", "the service failed the batch without saying why"),
        ({"truncated": '{"data": [{"code": "x"'}, "batch_failed", "the service failed the batch;"),
        ([{"code": 7, "message": ["no"]}], "batch_failed", "the service failed the batch;"),
        ({"code": "x" * 500, "message": "y" * 5000}, "x" * 100, "y" * 500),
        (
            [{"code": "token_limit_exceeded", "message": "Enqueued token limit"}],
            "token_limit_exceeded",
            "Enqueued",
        ),
    ],
)
def test_a_batch_error_is_read_whatever_the_service_sent(
    errors: Any, code: str, message: str
) -> None:
    error = batch_error(make_part(Path("/s"), remote_status="failed", remote_errors=errors))
    assert error is not None and error["code"] == code and error["message"].startswith(message)
    assert len(error["message"]) <= 600
    assert batch_error(make_part(Path("/s"), remote_status="expired", remote_errors=errors)) is None


def rejected_job(folder: Path, content: bytes, errors: list[dict[str, Any]], **report: Any) -> Job:
    source = folder / "input.jsonl"
    source.write_bytes(content)
    full = {
        "valid": False,
        "requests": len(content.splitlines()),
        "errors": errors,
        "error_count": len(errors),
    }
    return make_job(source, report={**full, **report})


def test_every_line_of_a_rejected_input_is_listed_with_one_reason(tmp_path: Path) -> None:
    """The issue's input: five lines, one valid. Each is in error.jsonl, in order."""
    good = request("ok")
    content = b"\n".join([b"{bad", good, b"[1]", b'{"custom_id": "x"}', b"nope"]) + b"\n"
    problems = [
        {"line": 1, "code": "invalid_json", "message": "not JSON"},
        {"line": 3, "code": "not_an_object", "message": "an array"},
        {"line": 4, "code": "invalid_method", "message": "no method"},
        {"line": 4, "code": "invalid_url", "message": "no url"},
        {"line": 5, "code": "invalid_json", "message": "not JSON"},
    ]
    job = rejected_job(tmp_path, content, problems)
    out = tmp_path / "out"
    out.mkdir()
    stats = write_rejection(job, OutboxFolder(out), 1 << 20)
    assert (stats.total, stats.completed, stats.failed, stats.never_run) == (5, 0, 5, 5)
    assert (out / "result.jsonl").read_bytes() == b""
    errors = read_jsonl(out / "error.jsonl")
    assert [(e["input_line"], e["custom_id"], e["error"]["code"]) for e in errors] == [
        (1, None, "invalid_json"),
        (2, "ok", "not_submitted"),
        (3, None, "not_an_object"),
        (4, "x", "invalid_method"),  # one reason: the first the report names
        (5, None, "invalid_json"),
    ]
    assert errors[1]["error"]["message"] == (
        "valid, not sent: the input was rejected for other lines (line 1: invalid_json)"
    )
    assert csv_ids(out / "result.csv") == ["", "ok", "", "x", ""]
    error = job_error(job, [])
    assert error is not None and error.code == "invalid_json"
    assert "line 1: not JSON (5 problems" in error.message


def test_a_rejected_input_whose_report_lists_only_some_problems_says_so(tmp_path: Path) -> None:
    content = requests_for(["a", "b", "c"]) + b"\n\n"
    problems = [{"line": 4, "code": "empty_line", "message": "empty"}]
    job = rejected_job(tmp_path, content, problems, error_count=7)
    out = tmp_path / "out"
    out.mkdir()
    stats = write_rejection(job, OutboxFolder(out), 1 << 20)
    errors = read_jsonl(out / "error.jsonl")
    # Blank lines are lines of the input too, each listed (the service counts them).
    assert [(e["input_line"], e["error"]["code"]) for e in errors] == [
        (1, "not_submitted"),
        (2, "not_submitted"),
        (3, "not_submitted"),
        (4, "empty_line"),
        (5, "empty_line"),
    ]
    assert "7 problems, report.json lists 1" in errors[0]["error"]["message"]
    assert "valid" not in errors[0]["error"]["message"]
    assert stats.total == stats.never_run == 5


def test_an_input_refused_as_a_whole_lists_its_lines_once_refused(tmp_path: Path) -> None:
    """Over budget (read, valid, refused whole): each line refers to the reason."""
    problems = [
        {"line": None, "code": "over_budget", "message": "not started: over the daily budget"}
    ]
    job = rejected_job(tmp_path, requests_for(["a", "b"]), problems, requests=0)
    out = tmp_path / "out"
    out.mkdir()
    stats = write_rejection(job, OutboxFolder(out), 1 << 20)
    errors = read_jsonl(out / "error.jsonl")
    assert [e["error"]["message"] for e in errors] == [
        "not sent: the input was rejected (over_budget): see summary.json error"
    ] * 2
    assert (stats.total, stats.never_run) == (2, 2)
    error = job_error(job, [])
    assert error is not None and "over the daily budget" in error.message


def test_an_input_never_read_lists_its_problem_and_counts_no_request(tmp_path: Path) -> None:
    problems = [{"line": None, "code": "input_too_large", "message": "over max_input_bytes"}]
    job = rejected_job(tmp_path, b"x" * 100, problems, requests=0)
    job = replace(job, sha256=None)
    out = tmp_path / "out"
    out.mkdir()
    stats = write_rejection(job, OutboxFolder(out), 1 << 20)
    (error,) = read_jsonl(out / "error.jsonl")
    assert (error["input_line"], error["error"]["code"]) == (None, "input_too_large")
    assert (stats.total, stats.failed, stats.never_run) == (0, 0, 0)
    assert csv_ids(out / "result.csv") == [""]


def requests_for(ids: list[str]) -> bytes:
    return b"".join(request(c) + b"\n" for c in ids)


def test_a_rejected_csv_lists_its_conversions_lines_or_its_rows_problems(
    tmp_path: Path,
) -> None:
    """A CSV whose conversion was validated: the conversion's lines, as for JSONL. One
    that did not convert: only the rows the report names (the others were never read
    as requests)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    source = spool / "input.csv"
    source.write_bytes(b"custom_id,content\na,x\nb,y\n")
    problems = [{"line": 2, "code": "invalid_thinking", "message": "m"}]
    (spool / "input.jsonl").write_bytes(requests_for(["a", "b"]))
    report = {"valid": False, "bytes": 300, "errors": problems, "error_count": 1}
    out = tmp_path / "out"
    out.mkdir()
    stats = write_rejection(make_job(source, report=report), OutboxFolder(out), 1 << 20)
    assert [(e["custom_id"], e["error"]["code"]) for e in read_jsonl(out / "error.jsonl")] == [
        ("a", "not_submitted"),
        ("b", "invalid_thinking"),
    ]
    assert stats.total == 2
    (spool / "input.jsonl").unlink()
    rows = [{"line": 3, "code": "bad_row", "message": "3 columns"}]
    report = {"valid": False, "errors": rows, "error_count": 1}
    stats = write_rejection(make_job(source, report=report), OutboxFolder(out), 1 << 20)
    (error,) = read_jsonl(out / "error.jsonl")
    assert (error["input_line"], error["error"]["code"], stats.total) == (3, "bad_row", 1)
