"""Fuzz the validator with byte-level mutations of the corpus (TESTING.md F.27).

Each example takes a corpus file (tests/corpus), applies a few random mutations (flip,
insert or delete bytes; drop, duplicate or swap lines; splice in another corpus file;
truncate) and validates the result with random limits and options. The validator must
never raise, only return a Report whose invariants hold:

- `error_count >= len(errors)`, at most `max_errors` listed, in line order, each with a
  rule code, a message and a line inside the file (or none for a file-level rule);
- `valid` exactly when `error_count == 0`; `bytes` is the file's size;
- for a valid file, the parts cover exactly the requests: their byte ranges tile the
  file without gap or overlap, each holds its own count of requests, all of one model
  and endpoint and within that model's limits, and every custom_id lands in one part.

Bounded in `make test`; `make soak` runs thousands of examples (BATCHD_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchd.config import PROFILES, ProviderLimits, merge_limits
from batchd.inputs.validate import Report, validate_stream

CORPUS = Path(__file__).parent.parent / "corpus"
VERDICTS: dict[str, dict[str, Any]] = json.loads((CORPUS / "verdicts.json").read_text())
# The JSONL files (the CSV ones are converted before this validator sees them).
FILES: dict[str, bytes] = {
    name: (CORPUS / name).read_bytes() for name in sorted(VERDICTS) if name.endswith(".jsonl")
}
NAMES = sorted(FILES)
GOOD = sorted(name for name in NAMES if VERDICTS[name]["valid"])
BASE = PROFILES["dashscope"].limits

# Bytes that matter to a JSONL parser: structure, escapes, line endings, encodings.
TOKENS = [
    b'"',
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\n",
    b"\r\n",
    b"\r",
    b"\x00",
    b"\xff",
    b"\xc0\xaf",
    b"\xef\xbb\xbf",
    b"\xed\xa0\x80",
    b"\\ud800",
    b"\\udc00",
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"18446744073709551616",
    b'"custom_id":"1",',
    b'"model":"qwen-max",',
    b'"url":"/v1/embeddings",',
    b'"enable_thinking":true,',
    b"\xe4\xb8\xad",
    b" ",
    b"\t",
]


def _lines(data: bytes) -> list[bytes]:
    # LF ends a line, as for the validator and the service; a lone CR is JSON whitespace
    # (bytes.splitlines would also split there, and count lines the validator does not).
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


@st.composite
def mutation(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "flip",
                "insert",
                "token",
                "delete",
                "drop_line",
                "dup_line",
                "swap_lines",
                "splice",
                "foreign_line",
                "truncate",
            ]
        )
    )
    size = len(data)
    at = draw(st.integers(min_value=0, max_value=size))
    if kind == "flip" and size:
        at = min(at, size - 1)
        bit = 1 << draw(st.integers(min_value=0, max_value=7))
        return data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if kind == "token":
        return data[:at] + draw(st.sampled_from(TOKENS)) + data[at:]
    if kind == "delete":
        length = draw(st.integers(min_value=1, max_value=16))
        return data[:at] + data[at + length :]
    if kind == "truncate":
        return data[:at]
    lines = _lines(data)
    if kind in ("drop_line", "dup_line", "swap_lines") and lines:
        i = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        j = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        if kind == "drop_line":
            del lines[i]
        elif kind == "dup_line":
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return b"".join(lines)
    other = FILES[draw(st.sampled_from(NAMES))]
    if kind == "splice":
        cut = draw(st.integers(min_value=0, max_value=len(other)))
        return data[:at] + other[cut:]
    if kind == "foreign_line":
        foreign = _lines(other)
        if foreign:
            line = foreign[draw(st.integers(min_value=0, max_value=len(foreign) - 1))]
            i = draw(st.integers(min_value=0, max_value=len(lines)))
            lines.insert(i, line)
            return b"".join(lines)
    return data


@st.composite
def fuzz_cases(draw: st.DrawFn) -> tuple[str, bytes, ProviderLimits, dict[str, Any]]:
    # Half the examples start from a file the corpus calls valid, so that valid results
    # (whose parts are checked) stay common after mild mutations.
    name = draw(st.sampled_from(GOOD if draw(st.booleans()) else NAMES))
    case = VERDICTS[name]
    data = FILES[name]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3, 6]))):
        data = draw(mutation(data))
    overrides: dict[str, Any] = dict(case.get("limits", {}))
    rarely = st.sampled_from([False, False, False, True])
    if draw(rarely):
        overrides["max_requests_per_file"] = draw(st.integers(min_value=1, max_value=6))
    if draw(rarely):
        overrides["max_file_bytes"] = draw(st.integers(min_value=100, max_value=4000))
    if draw(rarely):
        overrides["max_line_bytes"] = draw(st.integers(min_value=100, max_value=2000))
    limits = merge_limits(BASE, overrides)
    options = {
        "split": draw(st.sampled_from([True, True, True, False])),
        "group_by_model": draw(st.booleans()),
        "max_errors": draw(st.sampled_from([1, 2, 5, 100])),
    }
    return name, data, limits, options


def check_invariants(data: bytes, report: Report, limits: ProviderLimits, max_errors: int) -> None:
    assert isinstance(report, Report)
    assert report.error_count >= len(report.errors)
    assert len(report.errors) <= max_errors
    assert report.valid is (report.error_count == 0)
    assert report.bytes == len(data)
    line_count = len(_lines(data))
    numbered = [e.line for e in report.errors if e.line is not None]
    assert numbered == sorted(numbered), "errors not in line order"
    for error in report.errors:
        assert error.code and error.message
        assert error.line is None or 1 <= error.line <= line_count, (error, line_count)
    if not report.valid:
        assert report.parts == []
        return
    assert report.requests > 0 and report.parts
    assert sum(p.requests for p in report.parts) == report.requests
    assert sum(p.bytes for p in report.parts) == len(data)
    assert [p.index for p in report.parts] == list(range(1, len(report.parts) + 1))
    assert [p.first_line for p in report.parts] == sorted(p.first_line for p in report.parts)
    # The byte ranges of all parts tile the file: no gap, no overlap.
    ranges = sorted(r for p in report.parts for r in p.ranges)
    position = 0
    for start, end in ranges:
        assert start == position and end > start, ranges
        position = end
    assert position == len(data)
    seen: Counter[str] = Counter()
    for part in report.parts:
        assert part.first_line <= part.last_line
        assert part.model in report.models and part.endpoint in report.endpoints
        assert part.requests <= limits.requests_limit(part.model) or len(report.parts) == 1
        assert part.bytes <= limits.bytes_limit(part.model) or len(report.parts) == 1
        content = b"".join(data[start:end] for start, end in part.ranges)
        assert len(content) == part.bytes
        lines = _lines(content)
        assert len(lines) == part.requests
        for line in lines:
            request = orjson.loads(line.rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf"))
            assert request["body"]["model"] == part.model
            assert request["url"] == part.endpoint
            seen[request["custom_id"]] += 1
    assert len(seen) == report.requests and set(seen.values()) == {1}


def run_fuzz(examples: int) -> Counter[str]:
    tally: Counter[str] = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzz_cases())
    def fuzz(case: tuple[str, bytes, ProviderLimits, dict[str, Any]]) -> None:
        name, data, limits, options = case
        report = validate_stream(io.BytesIO(data), path=name, limits=limits, **options)
        check_invariants(data, report, limits, options["max_errors"])
        tally["examples"] += 1
        tally["valid" if report.valid else "invalid"] += 1
        tally["parts"] += len(report.parts)
        tally.update(f"rule:{e.code}" for e in report.errors)

    fuzz()
    return tally


def _figure(tally: Counter[str], label: str) -> str:
    rules = sorted(k for k in tally if k.startswith("rule:"))
    return (
        f"\n[{label}] examples={tally['examples']} crashes=0 valid={tally['valid']}"
        f" invalid={tally['invalid']} parts={tally['parts']} rules_hit={len(rules)}"
    )


def test_fuzzed_corpus_never_crashes_the_validator(capsys: pytest.CaptureFixture[str]) -> None:
    tally = run_fuzz(300)
    with capsys.disabled():
        print(_figure(tally, "validate-fuzz"))
    # The mutations reach both verdicts and many rules, or the fuzz proves little.
    assert tally["valid"] > 0 and tally["invalid"] > 0
    assert len([k for k in tally if k.startswith("rule:")]) >= 10


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_fuzzed_corpus_soak(capsys: pytest.CaptureFixture[str]) -> None:
    examples = int(os.environ.get("BATCHD_FUZZ_EXAMPLES", "20000"))
    tally = run_fuzz(examples)
    with capsys.disabled():
        print(_figure(tally, "validate-fuzz soak"))
    assert tally["examples"] > 0
