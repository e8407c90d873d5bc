"""result.csv's columns for every endpoint, and its rows, one per request (the writer
side of batchd.inputs.csvio)."""

from __future__ import annotations

import base64
import csv
import io
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.inputs.csvio import RESULT_COLUMNS, ResultCsv, result_csv, result_row
from batchd.inputs.lines import Line

USAGE = {"prompt_tokens": 5, "total_tokens": 5}


def line(body: dict[str, Any], cid: str = "c1") -> dict[str, Any]:
    return {
        "id": "x",
        "custom_id": cid,
        "response": {"status_code": 200, "request_id": "rq", "body": body},
        "error": None,
    }


def cells(body: dict[str, Any]) -> dict[str, str]:
    return dict(zip(RESULT_COLUMNS, result_row(line(body)), strict=True))


@pytest.mark.parametrize(
    ("endpoint", "body", "created", "content"),
    [
        (
            "/v1/chat/completions",
            {
                "created": 1743562621,
                "model": "qwen-plus",
                "choices": [{"message": {"content": "hi"}}],
            },
            "1743562621",
            "hi",
        ),
        (
            "/v1/chat/ds-test",
            {
                "created": 17,
                "model": "batch-test-model",
                "choices": [{"message": {"content": "t"}}],
            },
            "17",
            "t",
        ),
        (
            "/v1/completions",
            {"created": 18, "model": "m", "choices": [{"text": "a completion", "index": 0}]},
            "18",
            "a completion",
        ),
        (
            "/v1/responses",
            {
                "created_at": 19,
                "model": "m",
                "output": [
                    {"type": "reasoning", "summary": []},
                    {
                        "type": "message",
                        "content": [
                            {"type": "output_text", "text": "one, "},
                            {"type": "refusal", "refusal": "no"},
                            {"type": "output_text", "text": "two"},
                        ],
                    },
                ],
            },
            "19",
            "one, two",
        ),
        (
            "/v1/embeddings",
            {
                "object": "list",
                "model": "text-embedding-v3",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 1e-7]}],
            },
            "",
            "3 dims: [0.5, -0.25, 1e-07]",
        ),
    ],
)
def test_every_endpoint_fills_created_and_content(
    endpoint: str, body: dict[str, Any], created: str, content: str
) -> None:
    shown = cells({**body, "usage": USAGE})
    assert (shown["created"], shown["content"]) == (created, content), endpoint
    assert shown["model"] == body["model"] and shown["status_code"] == "200"
    assert orjson.loads(shown["usage"]) == USAGE


def test_an_embeddings_row_is_bounded_whatever_the_vector() -> None:
    big = [(-1) ** i * 0.0123456789 * i for i in range(3072)]
    body = {"model": "e", "data": [{"embedding": big, "index": 0}], "usage": USAGE}
    shown = cells(body)["content"]
    assert shown.startswith("3072 dims: [0, -0.0123457, 0.0246914, -0.037037, ...]")
    assert len(shown) < 120
    several = [{"embedding": big[:1024], "index": i} for i in range(3)]
    assert cells({"data": several})["content"].startswith("3 vectors of 1024 dims: [0, ")
    packed = base64.b64encode(struct.pack("<1024f", *big[:1024])).decode()
    assert cells({"data": [{"embedding": packed}]})["content"] == "base64, 1024 dims"
    # Whatever the service sent in a vector, the cell stays short and never a formula.
    odd = [{"embedding": ["=cmd()" * 100, None, True, {"a": 1}, 5]}]
    shown = cells({"data": odd})["content"]
    assert shown.startswith("5 dims: [=cmd()") and len(shown) < 150


def test_a_failure_has_no_answer_columns() -> None:
    failure = {
        "id": "x",
        "custom_id": "c2",
        "response": {"status_code": 400, "request_id": "rq", "body": {"error": {"code": "E"}}},
        "error": {"code": "InvalidParameter", "message": "bad"},
    }
    shown = dict(zip(RESULT_COLUMNS, result_row(failure), strict=True))
    assert (shown["error_code"], shown["error_message"], shown["status_code"]) == (
        "InvalidParameter",
        "bad",
        "400",
    )
    assert shown["created"] == shown["content"] == shown["model"] == ""


def test_a_request_always_gets_its_row_with_its_custom_id(tmp_path: Path) -> None:
    """`add_request`: whatever the line, one row, numbered within its own file."""
    target = tmp_path / "result.csv"
    with result_csv(target) as table:
        table.add_request(
            orjson.dumps(line({"choices": [{"message": {"content": "a"}}]})), "result.jsonl", "c1"
        )
        table.add_request(b'{"input_line":2,"raw":"cut sho', "error.jsonl", "c2")
        table.add_request(b'{"input_line":3,"raw":"x"}', "error.jsonl", "=c3")
        table.add_request(b"[1, 2]", "error.jsonl", "c4")
        table.add_request(Line(0, 99_999, None, b'{"id":"y"'), "result.jsonl", "c5")
    raw = target.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    assert rows[0] == list(RESULT_COLUMNS)
    assert [r[0] for r in rows[1:]] == ["c1", "c2", "'=c3", "c4", "c5"]
    assert [r[7] for r in rows[1:]] == [
        "a",
        "[line 1 is not valid JSON: see error.jsonl]",
        "",
        "[line 3 is not an object: see error.jsonl]",
        "[line of 99999 bytes: see result.jsonl]",
    ]


def test_a_plain_conversion_still_reports_a_line_it_cannot_place() -> None:
    """`jsonl2csv` (one row per line, no request known): a line without a custom_id that
    is not JSON is a problem, not a row."""
    table = ResultCsv(io.StringIO())
    table.add(1, b"not json at all", "x.jsonl")
    table.add(2, b"\n", "x.jsonl")
    assert table.result.rows == 0 and [p.code for p in table.result.errors] == ["invalid_json"]
