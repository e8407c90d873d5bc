"""Property tests: generated valid files pass; any single mutation of one line is caught
and reported at that line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchd.config import PROFILES
from batchd.inputs.validate import validate_file

LIMITS = PROFILES["dashscope"].limits
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40
)  # any Unicode but lone surrogates: quotes, colons, backslashes, CJK, emoji
styles = st.sampled_from(["compact", "spaced", "ascii"])


@st.composite
def valid_files(draw: st.DrawFn) -> tuple[list[dict[str, Any]], str]:
    count = draw(st.integers(min_value=2, max_value=12))
    ids = draw(
        st.lists(st.text(min_size=1, max_size=12), min_size=count, max_size=count, unique=True)
    )
    thinking = draw(st.sampled_from([None, True, False]))
    extra = draw(
        st.dictionaries(
            st.sampled_from(["temperature", "max_tokens", "top_p", "seed", "metadata"]),
            st.one_of(
                st.integers(min_value=-(2**63), max_value=2**63 - 1),
                st.floats(allow_nan=False, allow_infinity=False),
                st.dictionaries(texts, texts, max_size=3),
            ),
            max_size=3,
        )
    )
    requests = []
    for custom_id in ids:
        body: dict[str, Any] = {
            "model": "qwen-plus",
            "messages": [
                {"role": "system", "content": draw(texts)},
                {"role": "user", "content": draw(texts)},
            ],
            **extra,
        }
        if thinking is not None:
            body["enable_thinking"] = thinking
        requests.append(
            {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    return requests, draw(styles)


def dump(obj: dict[str, Any], style: str) -> bytes:
    if style == "compact":
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    if style == "spaced":
        return json.dumps(obj, ensure_ascii=False).encode()
    return json.dumps(obj).encode()


def write(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "generated.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@FAST
@given(valid_files())
def test_generated_valid_files_pass(tmp_path: Path, case: tuple[list[dict[str, Any]], str]) -> None:
    requests, style = case
    path = write(tmp_path, [dump(r, style) for r in requests])
    report = validate_file(path, LIMITS)
    assert report.valid, report.render()
    assert report.requests == len(requests)


def _drop(key: str) -> Any:
    return lambda obj, _: {k: v for k, v in obj.items() if k != key}


def _body(**changes: Any) -> Any:
    return lambda obj, _: {**obj, "body": {**obj["body"], **changes}}


OBJECT_MUTATIONS: dict[str, Any] = {
    "drop custom_id": _drop("custom_id"),
    "drop method": _drop("method"),
    "drop url": _drop("url"),
    "drop body": _drop("body"),
    "empty custom_id": lambda obj, _: {**obj, "custom_id": ""},
    "numeric custom_id": lambda obj, _: {**obj, "custom_id": 1},
    "earlier custom_id": lambda obj, first: {**obj, "custom_id": first["custom_id"]},
    "method GET": lambda obj, _: {**obj, "method": "GET"},
    "other url": lambda obj, _: {**obj, "url": "/v1/embeddings"},
    "unknown url": lambda obj, _: {**obj, "url": "/v2/chat"},
    "other model": _body(model="qwen-max"),
    "test model": _body(model="batch-test-model"),
    "no messages": lambda obj, _: {**obj, "body": {"model": obj["body"]["model"]}},
    "empty messages": _body(messages=[]),
    "thinking flipped": lambda obj, _: {
        **obj,
        "body": {**obj["body"], "enable_thinking": obj["body"].get("enable_thinking") is not True},
    },
    "huge integer": _body(max_tokens=2**64),
}

BYTE_MUTATIONS: dict[str, Any] = {
    "empty line": lambda line: b"",
    "blank line": lambda line: b"  \t",
    "truncated": lambda line: line[: len(line) // 2],
    "bom": lambda line: b"\xef\xbb\xbf" + line,
    "invalid utf-8": lambda line: line[:-2] + b"\xff" + line[-2:],
    "array": lambda line: b"[" + line + b"]",
    "two objects": lambda line: line + b" " + line,
    "NaN": lambda line: line[:-1] + b',"x":NaN}',
    "duplicate key": lambda line: line[:-1] + b',"custom_id":"zz"}',
    "duplicate key spaced": lambda line: line[:-1] + b', "method" : "POST"}',
    "deep": lambda line: line[:-1] + b',"x":' + b"[" * 1100 + b"]" * 1100 + b"}",
    "escaped lone surrogate": lambda line: line[:-1] + b',"x":"\\udc00"}',
}


@FAST
@given(
    valid_files(),
    st.integers(min_value=0, max_value=11),
    st.sampled_from(sorted(OBJECT_MUTATIONS) + sorted(BYTE_MUTATIONS)),
)
def test_any_single_mutation_is_caught_at_its_line(
    tmp_path: Path, case: tuple[list[dict[str, Any]], str], index: int, mutation: str
) -> None:
    requests, style = case
    index %= len(requests)
    lines = [dump(r, style) for r in requests]
    if mutation in OBJECT_MUTATIONS:
        # The first line sets the file's model, url and thinking: mutate a later one.
        index = index or 1
        lines[index] = dump(OBJECT_MUTATIONS[mutation](requests[index], requests[0]), style)
    else:
        lines[index] = BYTE_MUTATIONS[mutation](lines[index])
    report = validate_file(write(tmp_path, lines), LIMITS)
    assert not report.valid, mutation
    assert {e.line for e in report.errors} == {index + 1}, (mutation, report.render())
