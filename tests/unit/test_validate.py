"""The validator's limits, reading edge cases, report shape and part files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.config import MB, PROFILES, ProviderLimits, merge_limits
from batchd.inputs.validate import Report, part_file_names, validate_file, write_parts

DASHSCOPE = PROFILES["dashscope"].limits


def request(custom_id: str, content: str = "Hello", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": body.pop("url", "/v1/chat/completions"),
        "body": {
            "model": body.pop("model", "qwen-plus"),
            "messages": [{"role": "user", "content": content}],
            **body,
        },
    }


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def write(tmp_path: Path, lines: list[bytes], name: str = "in.jsonl", end: bytes = b"\n") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def limits(**overrides: Any) -> ProviderLimits:
    return merge_limits(DASHSCOPE, overrides)


def codes(report: Report) -> list[tuple[int | None, str]]:
    return [(e.line, e.code) for e in report.errors]


def padded(custom_id: str, size: int) -> bytes:
    """A valid request line of exactly `size` bytes (without its newline)."""
    base = encode(request(custom_id, ""))
    line = encode(request(custom_id, "x" * (size - len(base))))
    assert len(line) == size
    return line


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_line_at_max_line_bytes_passes_and_one_more_fails(tmp_path: Path, end: bytes) -> None:
    path = write(tmp_path, [padded("1", 300), padded("2", 301), padded("3", 300)], end=end)
    report = validate_file(path, limits(max_line_bytes=300))
    assert codes(report) == [(2, "line_too_long")]
    assert report.requests == 3 and report.bytes == path.stat().st_size


def test_a_very_long_line_is_skipped_in_bounded_chunks_and_counting_goes_on(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, [padded("1", 150), padded("2", 50_000), padded("3", 150)])
    report = validate_file(path, limits(max_line_bytes=1000))
    assert codes(report) == [(2, "line_too_long")]
    assert "50000 bytes" in report.errors[0].message
    assert report.bytes == path.stat().st_size


def test_a_long_last_line_without_newline_is_too_long(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(padded("1", 150) + b"\n" + padded("2", 5000))
    assert codes(validate_file(path, limits(max_line_bytes=1000))) == [(2, "line_too_long")]


def test_requests_at_the_limit_pass_and_one_more_fails_without_splitting(tmp_path: Path) -> None:
    lines = [encode(request(str(i))) for i in range(5)]
    at_limit = validate_file(
        write(tmp_path, lines[:4]), limits(max_requests_per_file=4), split=False
    )
    assert at_limit.valid and len(at_limit.parts) == 1
    over = validate_file(write(tmp_path, lines), limits(max_requests_per_file=4), split=False)
    assert codes(over) == [(None, "too_many_requests")]
    assert "5 requests" in over.errors[0].message and over.parts == []


def test_bytes_at_the_limit_pass_and_one_more_fails_without_splitting(tmp_path: Path) -> None:
    lines = [padded("1", 149), padded("2", 149)]  # 300 bytes with newlines
    assert validate_file(write(tmp_path, lines), limits(max_file_bytes=300), split=False).valid
    report = validate_file(write(tmp_path, lines), limits(max_file_bytes=299), split=False)
    assert codes(report) == [(None, "file_too_large")]


def test_the_test_models_own_byte_limit_applies(tmp_path: Path) -> None:
    size = 1 * MB // 4
    lines = [
        padded(str(i), size - 1)
        .replace(b"qwen-plus", b"batch-test-model", 1)
        .replace(b"/v1/chat/completions", b"/v1/chat/ds-test", 1)
        for i in range(4)
    ]
    path = write(tmp_path, lines)
    report = validate_file(path, DASHSCOPE, split=False)
    assert path.stat().st_size > 1 * MB
    assert codes(report) == [(None, "file_too_large")]
    split = validate_file(path, DASHSCOPE)
    assert split.valid and [p.requests for p in split.parts] == [3, 1]


def test_a_line_bigger_than_the_models_whole_file_limit_fits_no_part(tmp_path: Path) -> None:
    line = encode(request("1", "x" * (1 * MB), model="batch-test-model", url="/v1/chat/ds-test"))
    report = validate_file(write(tmp_path, [line]), DASHSCOPE)
    assert codes(report) == [(1, "line_too_long")]


def test_listing_stops_at_max_errors_but_counting_does_not(tmp_path: Path) -> None:
    path = write(tmp_path, [b"[]"] * 500)
    report = validate_file(path, DASHSCOPE, max_errors=10)
    assert len(report.errors) == 10 and report.error_count == 500
    assert report.render()[-1].endswith("490 more problems not listed")


def test_a_file_level_problem_is_listed_even_when_the_list_is_full(tmp_path: Path) -> None:
    lines = [encode(request("1"))] * 20
    report = validate_file(
        write(tmp_path, lines), limits(max_requests_per_file=5), split=False, max_errors=3
    )
    assert report.errors[0].code == "too_many_requests"
    assert len(report.errors) == 3 and report.error_count == 20


def test_report_json_shape(tmp_path: Path) -> None:
    path = write(tmp_path, [encode(request(str(i))) for i in range(3)])
    data = validate_file(path, DASHSCOPE).to_dict()
    assert {
        "path",
        "valid",
        "requests",
        "bytes",
        "model",
        "endpoint",
        "parts",
        "errors",
        "error_count",
    } <= set(data)
    assert data["model"] == "qwen-plus" and data["endpoint"] == "/v1/chat/completions"
    assert data["parts"] == [
        {
            "index": 1,
            "model": "qwen-plus",
            "endpoint": "/v1/chat/completions",
            "first_line": 1,
            "last_line": 3,
            "requests": 3,
            "bytes": path.stat().st_size,
            "start": 0,
            "end": path.stat().st_size,
        }
    ]
    json.dumps(data)


def test_over_limit_file_is_split_into_parts_that_each_validate_clean(tmp_path: Path) -> None:
    lines = [padded(str(i), 150 + (i * 37) % 120) for i in range(103)]
    source = write(tmp_path, lines, name="reviews.jsonl")
    small = limits(max_requests_per_file=10, max_file_bytes=2500)
    report = validate_file(source, small)
    assert report.valid and report.needs_split
    out = tmp_path / "parts"
    written = write_parts(report, source, out)
    assert [p.name for p in written] == part_file_names(source, len(report.parts))
    assert written[0].name == "reviews.part-001.jsonl"
    joined = b""
    for part, path in zip(report.parts, written, strict=True):
        again = validate_file(path, small, split=False)
        assert again.valid, again.render()
        assert again.requests == part.requests <= 10 and again.bytes == part.bytes <= 2500
        joined += path.read_bytes()
    assert joined == source.read_bytes()
    assert report.parts[0].first_line == 1 and report.parts[-1].last_line == 103


def test_a_file_that_fits_in_one_batch_writes_no_parts(tmp_path: Path) -> None:
    source = write(tmp_path, [encode(request("1"))])
    report = validate_file(source, DASHSCOPE)
    assert write_parts(report, source, tmp_path / "parts") == []
    assert not (tmp_path / "parts").exists()


def test_grouping_by_model_writes_one_part_per_model_in_line_order(tmp_path: Path) -> None:
    models = ["qwen-plus", "qwen-max", "qwen-plus", "text-embedding-v4", "qwen-max"]
    lines = []
    for i, model in enumerate(models, start=1):
        if model.startswith("text-embedding"):
            obj = {
                "custom_id": str(i),
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": model, "input": "x"},
            }
        else:
            obj = request(str(i), model=model)
        lines.append(encode(obj))
    source = write(tmp_path, lines, name="mixed.jsonl")
    assert codes(validate_file(source, DASHSCOPE))[0] == (2, "mixed_model")
    report = validate_file(source, DASHSCOPE, group_by_model=True)
    assert report.valid and report.model is None
    assert report.models == ["qwen-plus", "qwen-max", "text-embedding-v4"]
    assert [(p.model, p.first_line, p.last_line, p.requests) for p in report.parts] == [
        ("qwen-plus", 1, 3, 2),
        ("qwen-max", 2, 5, 2),
        ("text-embedding-v4", 4, 4, 1),
    ]
    written = write_parts(report, source, tmp_path / "out")
    for part, path in zip(report.parts, written, strict=True):
        assert validate_file(path, DASHSCOPE, split=False).valid
        assert path.read_bytes().splitlines() == [
            lines[n - 1] for n in range(1, len(lines) + 1) if models[n - 1] == part.model
        ]


def test_write_parts_refuses_a_source_that_changed(tmp_path: Path) -> None:
    source = write(tmp_path, [encode(request(str(i))) for i in range(4)])
    report = validate_file(source, limits(max_requests_per_file=2))
    with source.open("ab") as extra:
        extra.write(encode(request("9")) + b"\n")
    with pytest.raises(ValueError, match="changed"):
        write_parts(report, source, tmp_path / "parts")


def test_a_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path / "nope.jsonl", DASHSCOPE)


def test_requests_to_a_model_that_thinks_by_default_warn_without_failing(tmp_path: Path) -> None:
    """qwen3-32b thinks unless told not to: the file is valid, and the report counts the
    requests that leave enable_thinking unset (their reasoning is billed as output)."""
    unset = write(tmp_path, [encode(request(str(i), model="qwen3-32b")) for i in range(4)])
    report = validate_file(unset, DASHSCOPE)
    assert report.valid and report.error_count == 0
    [warning] = report.warnings
    assert warning.code == "thinking_default" and warning.line is None
    assert warning.message.startswith("4 request(s) to qwen3-32b")
    assert "enable_thinking" in warning.message and "billed as output" in warning.message
    assert report.to_dict()["warnings"][0]["code"] == "thinking_default"
    assert any("warning: thinking_default" in line for line in report.render())
    lines = [encode(request(str(i), model="qwen3-32b", enable_thinking=False)) for i in range(4)]
    assert validate_file(write(tmp_path, lines, "off.jsonl"), DASHSCOPE).warnings == []
    # A model that does not think by default gets no warning.
    assert (
        validate_file(write(tmp_path, [encode(request("1"))], "plain.jsonl"), DASHSCOPE).warnings
        == []
    )


def test_the_thinking_warning_counts_each_model_of_a_grouped_file(tmp_path: Path) -> None:
    lines = [encode(request(str(i), model="qwq-plus" if i % 2 else "qwen-plus")) for i in range(7)]
    report = validate_file(write(tmp_path, lines), DASHSCOPE, group_by_model=True)
    assert report.valid
    assert [w.message.split(" request(s)")[0] for w in report.warnings] == ["3"]


def _requests_digest(path: Path) -> str | None:
    return validate_file(path, DASHSCOPE, requests_digest=True).requests_sha256


def test_the_requests_digest_ignores_line_endings_spacing_key_order_and_escapes(
    tmp_path: Path,
) -> None:
    """The duplicate guard compares requests, not bytes: the same requests written with
    CRLF, with spaces, with keys in another order, with \\u escapes, or without a final
    newline have one digest; a changed value, or the lines in another order, another."""
    reqs = [request(f"r{n}", f"question {n} é", temperature=0.5) for n in range(300)]
    compact = [encode(r) for r in reqs]
    digest = _requests_digest(write(tmp_path, compact, "compact.jsonl"))
    assert digest is not None and len(digest) == 64
    spaced = [json.dumps(r).encode() for r in reqs]  # ", " and ": ", non-ASCII as \u00e9
    reordered = [
        json.dumps(dict(reversed(list(r.items()))), ensure_ascii=False).encode() for r in reqs
    ]
    same = {
        "crlf": _requests_digest(write(tmp_path, compact, "crlf.jsonl", end=b"\r\n")),
        "spaced": _requests_digest(write(tmp_path, spaced, "spaced.jsonl")),
        "reordered": _requests_digest(write(tmp_path, reordered, "reordered.jsonl")),
        "no final newline": _requests_digest(
            (tmp_path / "open.jsonl").write_bytes(b"\n".join(compact)) and tmp_path / "open.jsonl"
        ),
    }
    assert same == dict.fromkeys(same, digest)
    changed = [*compact[:-1], encode(request("r299", "question 299 é", temperature=0.6))]
    swapped = [compact[1], compact[0], *compact[2:]]
    assert _requests_digest(write(tmp_path, changed, "changed.jsonl")) != digest
    assert _requests_digest(write(tmp_path, swapped, "swapped.jsonl")) != digest
    # Only asked for, and only of a valid file.
    assert validate_file(tmp_path / "compact.jsonl", DASHSCOPE).requests_sha256 is None
    broken = write(tmp_path, [*compact, b"{not json"], "broken.jsonl")
    assert _requests_digest(broken) is None
