"""CSV <-> JSONL conversions."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from batchd.config import PROFILES
from batchd.documents import JobOptions
from batchd.inputs.csvio import (
    RESULT_COLUMNS,
    csv_file_to_jsonl,
    default_endpoint,
    jsonl_file_to_csv,
    result_row,
)
from batchd.inputs.validate import validate_file

# The seed's output example (the test model's result line).
SEED_RESULT = (
    '{"id":"a2b1ae25-21f4-4d9a-8634-99a29926486c","custom_id":"1","response":{"status_code":200,'
    '"request_id":"a2b1ae25-21f4-4d9a-8634-99a29926486c","body":{"created":1743562621,"usage":'
    '{"completion_tokens":6,"prompt_tokens":20,"total_tokens":26},"model":"batch-test-model",'
    '"id":"chatcmpl-bca7295b-67c3-4b1f-8239-d78323bb669f","choices":[{"finish_reason":"stop",'
    '"index":0,"message":{"content":"This is a test result."}}],"object":"chat.completion"}},'
    '"error":null}'
)


def test_seed_result_line_becomes_the_expected_csv_row(tmp_path: Path) -> None:
    source = tmp_path / "result.jsonl"
    source.write_text(SEED_RESULT + "\n")
    target = tmp_path / "result.csv"
    assert jsonl_file_to_csv(source, target).rows == 1
    raw = target.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # Excel reads UTF-8 only with a BOM
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    assert rows == [
        list(RESULT_COLUMNS),
        [
            "1",
            "batch-test-model",
            "a2b1ae25-21f4-4d9a-8634-99a29926486c",
            "200",
            "",
            "",
            "1743562621",
            "This is a test result.",
            '{"completion_tokens":6,"prompt_tokens":20,"total_tokens":26}',
        ],
    ]


def test_error_code_and_message_come_from_error_code_and_message() -> None:
    line = {
        "id": "x",
        "custom_id": "7",
        "response": {"status_code": 400, "request_id": "r1", "body": None},
        "error": {"code": "InvalidParameter", "message": "bad 参数"},
    }
    assert result_row(line) == ["7", "", "r1", "400", "InvalidParameter", "bad 参数", "", "", ""]


def test_result_body_sent_as_a_json_string_and_missing_fields_are_tolerated() -> None:
    body = json.dumps({"model": "qwen-plus", "choices": [], "usage": {"total_tokens": 3}})
    line = {"custom_id": "1", "response": {"status_code": 200, "body": body}}
    assert result_row(line) == ["1", "qwen-plus", "", "200", "", "", "", "", '{"total_tokens":3}']
    assert result_row({}) == [""] * len(RESULT_COLUMNS)


def test_bad_result_lines_are_reported_and_no_csv_is_written(tmp_path: Path) -> None:
    source = tmp_path / "result.jsonl"
    source.write_text(SEED_RESULT + "\n\n{oops\n")
    target = tmp_path / "result.csv"
    result = jsonl_file_to_csv(source, target)
    assert [(e.line, e.code) for e in result.errors] == [(3, "invalid_json")]
    assert not target.exists() and list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("header", [b"", b"custom_id,content\r\n"])
def test_csv_becomes_a_valid_batch_file(tmp_path: Path, bom: bytes, header: bytes) -> None:
    source = tmp_path / "input.csv"
    source.write_bytes(
        bom + header + '1,你好!有什么可以帮助你的吗?\r\n2,"What is 2+2, exactly?"\r\n'.encode()
    )
    target = tmp_path / "input.jsonl"
    result = csv_file_to_jsonl(
        source, target, model="qwen-plus", system_prompt="You are a helpful assistant."
    )
    assert result.ok and result.rows == 2
    lines = target.read_bytes().splitlines()
    assert (
        lines[0]
        == (
            '{"custom_id":"1","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
            '"messages":[{"role":"system","content":"You are a helpful assistant."},'
            '{"role":"user","content":"你好!有什么可以帮助你的吗?"}]}}'
        ).encode()
    )
    assert json.loads(lines[1])["body"]["messages"][1]["content"] == "What is 2+2, exactly?"
    assert validate_file(target, PROFILES["dashscope"].limits).valid


def test_csv_round_trip_keeps_ids_and_contents(tmp_path: Path) -> None:
    rows = [("a", "line one\nline two"), ("b", 'quotes "" and , commas'), ("c", "emoji 🎉")]
    source = tmp_path / "in.csv"
    with source.open("w", encoding="utf-8", newline="") as out:
        csv.writer(out).writerows([("custom_id", "content"), *rows])
    target = tmp_path / "in.jsonl"
    assert csv_file_to_jsonl(source, target, model="qwen-plus").ok
    back = [json.loads(line) for line in target.read_bytes().splitlines()]
    assert [(r["custom_id"], r["body"]["messages"][-1]["content"]) for r in back] == rows


def test_endpoint_and_body_follow_the_model(tmp_path: Path) -> None:
    assert default_endpoint("batch-test-model") == "/v1/chat/ds-test"
    assert default_endpoint("text-embedding-v4") == "/v1/embeddings"
    assert default_endpoint("qwen-plus") == "/v1/chat/completions"
    source = tmp_path / "in.csv"
    source.write_text("1,hello\n")
    target = tmp_path / "out.jsonl"
    assert csv_file_to_jsonl(source, target, model="text-embedding-v4").ok
    assert json.loads(target.read_bytes())["body"] == {
        "model": "text-embedding-v4",
        "input": "hello",
    }


def test_bad_rows_are_named_and_nothing_is_written(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("1,ok\n,no id\n3\n1,again\n4,\n5,unquoted, comma\n\n6,fine\n")
    target = tmp_path / "out.jsonl"
    result = csv_file_to_jsonl(source, target, model="qwen-plus")
    assert [(e.line, e.code) for e in result.errors] == [
        (2, "empty_custom_id"),
        (3, "bad_row"),
        (4, "duplicate_custom_id"),
        (5, "empty_content"),
        (6, "bad_row"),
    ]
    assert not target.exists()


def test_a_csv_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes("1,你好\n".encode("gbk"))
    result = csv_file_to_jsonl(source, tmp_path / "out.jsonl", model="qwen-plus")
    assert [e.code for e in result.errors] == ["not_text"]
    ok = csv_file_to_jsonl(source, tmp_path / "out.jsonl", model="qwen-plus", encoding="gbk")
    assert ok.ok


def test_a_header_with_other_names_is_refused_not_sent() -> None:
    """`id,text` is a header, not a request to pay for; data rows are never mistaken."""
    import io as _io

    from batchd.inputs.csvio import csv_to_jsonl

    for first in (["id", "text"], ["ID", "Prompt"], ["key", "question", "comment"]):
        out = _io.BytesIO()
        result = csv_to_jsonl([first, ["a", "hello"]], out, model="qwen-plus")
        assert not result.ok and result.errors[0].code == "csv_header", first
        assert "custom_id" in result.errors[0].message
    out = _io.BytesIO()
    result = csv_to_jsonl([["1", "text"], ["2", "hello"]], out, model="qwen-plus")
    assert result.ok and result.rows == 2  # "1" is no column name: data


def test_configured_column_names_make_a_header_that_is_never_sent() -> None:
    from batchd.inputs.csvio import csv_to_jsonl

    for header in (["id", "text"], [" ID ", "Text", "notes"], ["custom_id", "content"]):
        out = io.BytesIO()
        result = csv_to_jsonl(
            [header, ["a", "hello", "x"][: len(header)]],
            out,
            model="qwen-plus",
            columns=("id", "text"),
        )
        assert result.ok and result.rows == 1, (header, result.errors)
        (line,) = [json.loads(raw) for raw in out.getvalue().splitlines()]
        assert line["custom_id"] == "a"
        assert line["body"]["messages"][-1]["content"] == "hello"
    # The columns are found by name, in any order.
    out = io.BytesIO()
    result = csv_to_jsonl(
        [["text", "id"], ["hello", "a"]], out, model="qwen-plus", columns=("id", "text")
    )
    assert result.ok and json.loads(out.getvalue())["custom_id"] == "a"


def test_a_header_that_is_not_the_known_one_names_the_three_fixes() -> None:
    from batchd.inputs.csvio import csv_to_jsonl

    out = io.BytesIO()
    result = csv_to_jsonl([["key", "prompt"], ["a", "hello"]], out, model="qwen-plus")
    (problem,) = result.errors
    assert (problem.line, problem.code) == (1, "csv_header")
    assert '{"columns":{"custom_id":"key","content":"prompt"}}' in problem.message  # sidecar
    assert '[jobs.csv_columns] custom_id = "key", content = "prompt"' in problem.message
    assert "rename them custom_id,content" in problem.message
    assert not result.ok  # csv_file_to_jsonl then writes nothing
    # A first row naming one known column and something else is a header too.
    result = csv_to_jsonl(
        [["id", "question?"], ["a", "hello"]], io.BytesIO(), model="m", columns=("id", "text")
    )
    assert [e.code for e in result.errors] == ["csv_header"]
    assert "id,text" in result.errors[0].message  # the header it expected


def test_a_sidecars_columns_are_checked_and_win_over_the_configuration() -> None:
    from batchd.inputs.csvio import CsvSource, csv_source
    from batchd.inputs.verdict import sidecar_options

    options = sidecar_options("a.meta.json", b'{"columns": {"custom_id": "k", "content": "q"}}')
    plan = csv_source(options, model="m", system_prompt=None, columns=("id", "text"))
    assert plan == CsvSource("m", None, ("k", "q"))
    assert csv_source(
        JobOptions(), model="m", system_prompt=None, columns=("id", "text")
    ) == CsvSource("m", None, ("id", "text"))
    for bad in (
        b'{"columns": ["k", "q"]}',
        b'{"columns": {"custom_id": "k"}}',
        b'{"columns": {"custom_id": "k", "content": ""}}',
        b'{"columns": {"custom_id": "K", "content": "k"}}',
    ):
        assert "columns" in sidecar_options("a.meta.json", bad).sidecar_error, bad
