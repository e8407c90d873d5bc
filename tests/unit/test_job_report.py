"""A job's validation report as a typed document (`documents.JobReport`): what the store
keeps, report.json and `show --json` show the keys the report had as a dict, and a
report stored before it had a type decodes and is written back the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.config import PROFILES
from batchd.documents import JobOptions, decode_report, to_json
from batchd.inputs.verdict import Rules, judge, read_sidecar, sidecar_path
from batchd.models import Job, JobState
from batchd.pipeline import prepare as prepare_module

CORPUS = Path(__file__).parent.parent / "corpus"
NAMES = sorted(json.loads((CORPUS / "verdicts.json").read_text()))

# Reports as the store kept them before they had a type: a valid input with its
# estimate, an input validation rejected, a rejection prepare decided by itself.
OLD_REPORTS: list[dict[str, Any]] = [
    {
        "path": "a.jsonl",
        "valid": True,
        "requests": 3,
        "bytes": 420,
        "model": "qwen-plus",
        "models": ["qwen-plus"],
        "endpoint": "/v1/chat/completions",
        "parts": [
            {
                "index": 0,
                "model": "qwen-plus",
                "endpoint": "/v1/chat/completions",
                "first_line": 1,
                "last_line": 3,
                "requests": 3,
                "bytes": 420,
                "start": 0,
                "end": 420,
            }
        ],
        "errors": [],
        "error_count": 0,
        "warnings": [{"line": None, "code": "max_tokens_unset", "message": "w"}],
        "estimate": {
            "tokenizer": ["qwen"],
            "exact": True,
            "currency": "CNY",
            "cost_max": 0.25,
            "models": {
                "qwen-plus": {
                    "requests": 3,
                    "input_tokens": 30,
                    "output_tokens_max": 300,
                    "cost_max": 0.25,
                    "thinking_unset": 0,
                }
            },
        },
    },
    {
        "path": "b.jsonl",
        "valid": False,
        "requests": 2,
        "bytes": 100,
        "model": None,
        "models": [],
        "endpoint": None,
        "parts": [],
        "errors": [{"line": 2, "code": "invalid_json", "message": "not JSON"}],
        "error_count": 1,
        "warnings": [],
    },
    {
        "path": "c.jsonl",
        "valid": False,
        "requests": 0,
        "bytes": 0,
        "parts": [],
        "errors": [{"line": None, "code": "input_too_large", "message": "too large"}],
        "error_count": 1,
    },
    # An estimate without a price: its worst case is unknown.
    {
        "path": "d.jsonl",
        "valid": True,
        "requests": 0,
        "bytes": 0,
        "parts": [],
        "errors": [],
        "error_count": 0,
        "estimate": {
            "tokenizer": [],
            "exact": False,
            "currency": "USD",
            "cost_max": None,
            "models": {},
        },
    },
]


@pytest.mark.parametrize("old", OLD_REPORTS, ids=[r["path"] for r in OLD_REPORTS])
def test_a_stored_report_decodes_and_is_shown_with_the_same_keys(old: dict[str, Any]) -> None:
    report = decode_report(json.loads(json.dumps(old)))
    assert report is not None
    shown = to_json(report)  # report.json and show --json write this
    assert shown == old
    assert list(shown) == list(old)


@pytest.mark.parametrize("name", NAMES)
def test_the_kept_report_is_the_verdict_without_byte_ranges(name: str, tmp_path: Path) -> None:
    kind = name.rsplit(".", 1)[1]
    path = CORPUS / name
    rules = Rules(limits=PROFILES["dashscope"].limits, csv_model="qwen-plus")
    options = read_sidecar(sidecar_path(path, kind)) or JobOptions()
    report = judge(path, kind, options, rules, tmp_path)
    before = report.to_dict()  # what prepare kept, as a dict, before JobReport
    before["parts"] = [{k: v for k, v in p.items() if k != "ranges"} for p in before["parts"]]
    kept = to_json(report.stored())
    assert kept == before
    assert list(kept) == list(before)


def test_a_rejection_prepare_decides_keeps_its_keys() -> None:
    job = Job(
        id="j",
        name="c",
        inbox_name="c.jsonl",
        spool_path="/spool/j/input.jsonl",
        kind="jsonl",
        state=JobState.CLAIMED,
        outcome=None,
        sha256=None,
        bytes=None,
        options=JobOptions(),
        report=None,
        error=None,
        outbox_path=None,
        cancel_requested=False,
        crash_count=0,
        created_at=0.0,
        updated_at=0.0,
        completed=0,
        failed=0,
        usage=None,
        input_mtime_ns=None,
        prepares=0,
        retried_as=None,
        recovered_at=None,
    )
    report = prepare_module._rejection(job, "input_too_large", "too large")
    assert to_json(report) == {
        "path": "c.jsonl",
        "valid": False,
        "requests": 0,
        "bytes": 0,
        "parts": [],
        "errors": [{"line": None, "code": "input_too_large", "message": "too large"}],
        "error_count": 1,
    }
