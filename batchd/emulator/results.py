"""Deterministic answers: the same request in the same batch always gets the same line.

Token counts: a request's input is counted by `prompt_tokens(body, endpoint)` and nowhere
else, so that the usage a result line shows, the enqueued-token limit (store.py) and the
per-model tally of `/_emulator/stats` all agree. Chat requests are counted as DashScope
counts them: Qwen's chat template written out here and encoded by the provider's own
tokenizer (`dashscope.get_tokenizer`, when the `dashscope` package is installed), which
gives the seed's 26, 26 and 22 prompt tokens. This shares no code with batchd's own
counter (`batchd.provider.tokens`, which reimplements the vocabulary's use on tiktoken), so a test
that compares batchd's estimate with what the emulator bills checks one against the
other. Without the package, an approximation shaped like a real tokenizer's (`_tokens`).
The free test model's answers always show 20 prompt and 6 completion tokens, as the
seed's do. `TokenTally` adds up the usage of the result lines a batch's files hold, per
model.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

from batchd.config import ENDPOINT_EMBEDDINGS, TEST_MODEL
from batchd.documents import JsonObject

TEST_ANSWER = "This is a test result."
# The test model's usage, whatever it is asked (the seed's sample output).
TEST_PROMPT_TOKENS = 20
TEST_COMPLETION_TOKENS = 6
# `TokenTally`'s figures per model, in the order stats show them.
TALLY_FIELDS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "total_tokens",
    "failed",
)
# Failures drawn for `request_failure_rate`: (HTTP status, code, message).
_FAILURES = (
    (500, "InternalError", "An internal error occurred while processing the request."),
    (400, "DataInspectionFailed", "Input data may contain inappropriate content."),
    (429, "Throttling", "The model is overloaded; the request was not processed."),
)


@dataclass(frozen=True)
class Answerer:
    """Writes result lines for one batch."""

    batch_id: str
    seed: int
    created: int
    thinking_models: frozenset[str]
    embedding_dimensions: dict[str, int]
    thinking_by_default: frozenset[str] = frozenset()

    def _digest(self, *parts: str) -> bytes:
        text = ":".join((str(self.seed), self.batch_id, *parts))
        return hashlib.sha256(text.encode()).digest()

    def request_id(self, custom_id: str) -> str:
        return str(uuid.UUID(bytes=self._digest("request", custom_id)[:16]))

    def success_record(self, custom_id: str, body: JsonObject, endpoint: str) -> JsonObject:
        """The success line as a record: id and custom_id first, as the service writes."""
        request_id = self.request_id(custom_id)
        if endpoint == ENDPOINT_EMBEDDINGS:
            answer = self._embedding(request_id, body)
        else:
            answer = self._chat(request_id, body, endpoint)
        response = {"status_code": 200, "request_id": request_id, "body": answer}
        return _record(request_id, custom_id, response, None)

    def failure(self, custom_id: str) -> bytes:
        request_id = self.request_id(custom_id)
        pick = self._digest("failure", custom_id)[0] % len(_FAILURES)
        status, code, message = _FAILURES[pick]
        body = {"error": {"code": code, "message": message, "type": code}}
        response = {"status_code": status, "request_id": request_id, "body": body}
        return _line(request_id, custom_id, response, {"code": code, "message": message})

    def not_run(self, custom_id: str, code: str, message: str) -> bytes:
        request_id = self.request_id(custom_id)
        return _line(request_id, custom_id, None, {"code": code, "message": message})

    def _chat(self, request_id: str, body: JsonObject, endpoint: str) -> JsonObject:
        model = str(body.get("model"))
        message: JsonObject
        asked = prompt_tokens(body, endpoint)
        if model == TEST_MODEL:
            usage: JsonObject = {
                "completion_tokens": TEST_COMPLETION_TOKENS,
                "prompt_tokens": asked,
                "total_tokens": asked + TEST_COMPLETION_TOKENS,
            }
            message = {"content": TEST_ANSWER}
        else:
            prompt = _prompt_text(body.get("messages"))
            text = f"{self.seed}:answer:{model}:{prompt}"
            digest = hashlib.sha256(text.encode()).hexdigest()
            content = f"Emulated answer {digest[:12]} to: {prompt[-60:]}"
            completion_tokens = _tokens(content)
            max_tokens = body.get("max_tokens")
            if isinstance(max_tokens, int) and 0 < max_tokens < completion_tokens:
                completion_tokens = max_tokens
            usage = {"completion_tokens": completion_tokens, "prompt_tokens": asked}
            message = {"content": content}
            if self._thinks(model, body.get("enable_thinking")):
                reasoning = f"Thinking about {digest[12:24]}: {prompt[:40]}"
                budget = body.get("thinking_budget")
                reasoning_tokens = _tokens(reasoning)
                if isinstance(budget, int) and 0 < budget < reasoning_tokens:
                    reasoning_tokens = budget
                usage["completion_tokens"] = completion_tokens + reasoning_tokens
                usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            usage["total_tokens"] = asked + usage["completion_tokens"]
        return {
            "created": self.created,
            "usage": usage,
            "model": model,
            "id": f"chatcmpl-{request_id}",
            "choices": [{"finish_reason": "stop", "index": 0, "message": message}],
            "object": "chat.completion",
        }

    def _thinks(self, model: str, enable_thinking: Any) -> bool:
        """Does the request think? Always for a thinking-only model; for a hybrid one
        when `enable_thinking` is true, or unset on a model that thinks by default."""
        if model in self.thinking_models or enable_thinking is True:
            return True
        return model in self.thinking_by_default and enable_thinking is None

    def _embedding(self, request_id: str, body: JsonObject) -> JsonObject:
        model = str(body.get("model"))
        texts = _embedding_texts(body)
        wanted = body.get("dimensions")
        dims = (
            wanted
            if isinstance(wanted, int) and wanted > 0
            else self.embedding_dimensions.get(model, 1024)
        )
        data = [
            {"embedding": _vector(self.seed, model, text, dims), "index": i, "object": "embedding"}
            for i, text in enumerate(texts)
        ]
        tokens = prompt_tokens(body, ENDPOINT_EMBEDDINGS)
        return {
            "data": data,
            "model": model,
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": request_id,
        }


@dataclass
class TokenTally:
    """The usage of result lines, per model: for each, `requests` (success lines),
    `prompt_tokens`, `completion_tokens` (thinking included), `reasoning_tokens`,
    `total_tokens`, and `failed` (error-file lines: failed requests and requests never
    run). A success line counts the usage its record holds, also when a content fault
    writes it odd or padded (the service bills the answer, not the line)."""

    by_model: dict[str, dict[str, int]] = field(default_factory=dict)

    def _row(self, model: str) -> dict[str, int]:
        row = self.by_model.get(model)
        if row is None:
            row = self.by_model[model] = dict.fromkeys(TALLY_FIELDS, 0)
        return row

    def success(self, record: JsonObject) -> None:
        """Count a success record from `Answerer.success_record`."""
        body = _response_body(record)
        usage = body["usage"]
        row = self._row(str(body["model"]))
        row["requests"] += 1
        row["prompt_tokens"] += usage["prompt_tokens"]
        row["completion_tokens"] += usage.get("completion_tokens", 0)
        row["reasoning_tokens"] += usage.get("completion_tokens_details", {}).get(
            "reasoning_tokens", 0
        )
        row["total_tokens"] += usage["total_tokens"]

    def failure(self, model: str) -> None:
        self._row(model)["failed"] += 1

    def merge(self, other: TokenTally) -> None:
        for model, counts in other.by_model.items():
            row = self._row(model)
            for name, value in counts.items():
                row[name] += value

    def clear(self) -> None:
        self.by_model.clear()

    def to_json(self) -> dict[str, dict[str, int]]:
        return {model: dict(self.by_model[model]) for model in sorted(self.by_model)}


def success_line(record: JsonObject) -> bytes:
    """A success record as the line the output file holds."""
    return _dump(record) + b"\n"


def _record(
    request_id: str, custom_id: str, response: JsonObject | None, error: JsonObject | None
) -> JsonObject:
    return {"id": request_id, "custom_id": custom_id, "response": response, "error": error}


def _dump(record: JsonObject) -> bytes:
    return orjson.dumps(record)


def _line(
    request_id: str, custom_id: str, response: JsonObject | None, error: JsonObject | None
) -> bytes:
    return _dump(_record(request_id, custom_id, response, error)) + b"\n"


# ---- odd and huge lines (faults): written by splicing text where a marker was dumped

# A string no answer contains: orjson writes it as `\u0000batchd-fault-marker\u0000`.
_MARK = "\x00batchd-fault-marker\x00"
_MARK_JSON = orjson.dumps(_MARK)  # with its quotes
_MARK_TEXT = _MARK_JSON[1:-1]  # as it appears inside a longer string
_MARK_2 = "\x00batchd-fault-marker-2\x00"
_MARK_2_JSON = orjson.dumps(_MARK_2)
ODD_VARIANTS = 4
# What replaces the marker in each odd variant: (marker as dumped, replacement).
_ODD_SPLICES = {
    0: (_MARK_TEXT, b"\\ud83d"),  # a lone high surrogate: an emoji cut at max_tokens
    1: (_MARK_JSON, b"NaN"),
    2: (_MARK_JSON, b"1e400"),  # too large for a double
}
# Padding of huge lines: plain ASCII that JSON writes as is, so its length is exact.
_PAD_UNIT = b" and so on, at great length."
PAD_CHUNK_BYTES = 1 << 20


def _response_body(record: JsonObject) -> JsonObject:
    response = record["response"]
    assert isinstance(response, dict)
    body = response["body"]
    assert isinstance(body, dict)
    return body


def _message(record: JsonObject) -> JsonObject | None:
    """The chat message of a success record; None for embeddings."""
    choices = _response_body(record).get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict):
            return message
    return None


def _splice(dumped: bytes, marker: bytes, replacement: bytes) -> bytes:
    at = dumped.rfind(marker)
    assert at >= 0
    return dumped[:at] + replacement + dumped[at + len(marker) :]


def odd_line(record: JsonObject, variant: int) -> bytes:
    """A success line in a form a strict parser refuses but that is otherwise readable:
    0 content ends in a lone surrogate escape, 1 a NaN field, 2 a number written as 1e400,
    3 the first half of the line only (custom_id still near its start)."""
    variant %= ODD_VARIANTS
    if variant == 3:
        return _cut(_dump(record), str(record["custom_id"])) + b"\n"
    record = _copy_for_marker(record)
    body = _response_body(record)
    message = _message(record)
    if variant == 0:
        if message is not None and isinstance(message.get("content"), str):
            message["content"] += _MARK
        else:
            body["note"] = _MARK
    elif variant == 1:
        choices = body.get("choices")
        if message is not None and isinstance(choices, list):
            choices[0]["logprobs"] = _MARK
        else:
            body["logprobs"] = _MARK
    else:
        body["score"] = _MARK
    marker, replacement = _ODD_SPLICES[variant]
    return _splice(_dump(record), marker, replacement) + b"\n"


# How many ways `absurd_usage_line` writes a number of a line's usage wrongly.
ABSURD_VARIANTS = 7
# Numbers no JSON encoder here writes: spliced in where a marker was dumped.
_BEYOND_64_BITS = str(2**64 + 1).encode()
_DIGITS_401 = b"9" * 401


def absurd_usage_line(record: JsonObject, variant: int) -> bytes:
    """A success line whose `usage` has a number no service should send, as a sloppy
    gateway or a broken server might: 0 `prompt_tokens` as a string, 1 a negative
    `completion_tokens`, 2 `prompt_tokens` as a float, 3 a count missing
    (`completion_tokens`; for embeddings, `prompt_tokens`), 4 `prompt_tokens` 2^64 + 1,
    5 `prompt_tokens` a 401-digit integer, 6 `prompt_tokens` 2^64 + 1 with `total_tokens`
    NaN (the line then only a lenient parser reads). The answer itself is as written
    (and billed, as `TokenTally` counts it)."""
    variant %= ABSURD_VARIANTS
    record = _copy_for_marker(record)
    body = _response_body(record)
    usage = dict(body["usage"])
    body["usage"] = usage
    splices: list[tuple[bytes, bytes]] = []
    if variant == 0:
        usage["prompt_tokens"] = str(usage["prompt_tokens"])
    elif variant == 1:
        usage["completion_tokens"] = -1 - int(usage.get("completion_tokens", 0))
    elif variant == 2:
        usage["prompt_tokens"] = usage["prompt_tokens"] + 0.5
    elif variant == 3:
        usage.pop("completion_tokens" if "completion_tokens" in usage else "prompt_tokens")
    else:
        usage["prompt_tokens"] = _MARK
        splices.append((_MARK_JSON, _DIGITS_401 if variant == 5 else _BEYOND_64_BITS))
        if variant == 6:
            usage["total_tokens"] = _MARK_2
            splices.append((_MARK_2_JSON, b"NaN"))
    dumped = _dump(record)
    for marker, replacement in splices:
        dumped = _splice(dumped, marker, replacement)
    return dumped + b"\n"


def _cut(line: bytes, custom_id: str) -> bytes:
    """About the first half of `line`, never before the end of its custom_id value and
    never inside a UTF-8 character; never the whole line."""
    key = b'"custom_id":' + orjson.dumps(custom_id)
    start = line.find(key)
    floor = (start + len(key) if start >= 0 else 0) + 1
    cut = min(max(len(line) // 2, floor), len(line) - 1)
    while cut < len(line) - 1 and (line[cut] & 0xC0) == 0x80:
        cut += 1
    return line[:cut]


def _copy_for_marker(record: JsonObject) -> JsonObject:
    """A copy deep enough that adding a marker leaves `record` as it was."""
    copy = dict(record)
    response = dict(record["response"])
    body = dict(response["body"])
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = dict(choices[0])
        if isinstance(first.get("message"), dict):
            first["message"] = dict(first["message"])
        body["choices"] = [first, *choices[1:]]
    response["body"] = body
    copy["response"] = response
    return copy


def huge_line_parts(record: JsonObject, size: int) -> tuple[bytes, int, bytes]:
    """(prefix, padding bytes, suffix with its newline) of a success line at least `size`
    bytes long: the chat content (for embeddings an added `padding` field) followed by
    padding text. The caller writes the padding with `write_padding`."""
    record = _copy_for_marker(record)
    message = _message(record)
    if message is not None and isinstance(message.get("content"), str):
        message["content"] += _MARK
    else:
        _response_body(record)["padding"] = _MARK
    dumped = _dump(record)
    at = dumped.rfind(_MARK_TEXT)
    prefix, suffix = dumped[:at], dumped[at + len(_MARK_TEXT) :]
    padding = max(0, size - len(prefix) - len(suffix))
    return prefix, padding, suffix + b"\n"


def write_padding(out: BinaryIO, count: int) -> int:
    """Write `count` bytes of padding text in chunks of at most 1 MiB; returns `count`."""
    chunk = (_PAD_UNIT * (PAD_CHUNK_BYTES // len(_PAD_UNIT) + 1))[:PAD_CHUNK_BYTES]
    left = count
    while left > 0:
        piece = chunk[: min(left, PAD_CHUNK_BYTES)]
        out.write(piece)
        left -= len(piece)
    return count


# ---- token counts


def prompt_tokens(body: JsonObject, endpoint: str) -> int:
    """PURE: the input tokens of one request body sent to `endpoint`, as its result line's
    `usage.prompt_tokens` shows them and the enqueued-token limit counts them (see the
    module's docstring). Nothing else in the emulator counts input tokens."""
    if body.get("model") == TEST_MODEL:
        return TEST_PROMPT_TOKENS
    if provider_tokenizer() is None:
        if endpoint == ENDPOINT_EMBEDDINGS:
            return sum(_tokens(t) for t in _embedding_texts(body))
        messages = body.get("messages")
        return _tokens(_prompt_text(messages)) + 4 * _count(messages)
    if endpoint == ENDPOINT_EMBEDDINGS:
        return sum(_provider_count(t) for t in _embedding_texts(body))
    return _provider_count(_chat_template(body.get("messages")))


# Texts up to this many characters have their count remembered (at most 256 of them, so
# 16 MB at most): a file's requests often repeat one prompt, and the tokenizer's BPE is
# slow on long runs without spaces (2,000 requests of one 20,000-letter word took 50 s to
# count twice: once when the file is checked, once when it is answered).
_MEMO_CHARS = 65_536


def _provider_count(text: str) -> int:
    if len(text) <= _MEMO_CHARS:
        return _memo_count(text)
    encode = provider_tokenizer()
    assert encode is not None
    return len(encode(text))


@functools.lru_cache(maxsize=256)
def _memo_count(text: str) -> int:
    encode = provider_tokenizer()
    assert encode is not None
    return len(encode(text))


def _chat_template(messages: Any) -> str:
    """Qwen's chat template (ChatML) of a request's messages, as the service renders it
    before counting: each message, then the assistant's turn; no default system
    message (Qwen3's template adds none)."""
    turns = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        role = message.get("role") if isinstance(message.get("role"), str) else "user"
        turns.append(f"<|im_start|>{role}\n{_message_text(message)}<|im_end|>\n")
    return "".join(turns) + "<|im_start|>assistant\n"


@functools.cache
def provider_tokenizer() -> Callable[[str], list[int]] | None:
    """The provider's own tokenizer from the `dashscope` package (special tokens in the
    text count as one each), or None when the package is not installed."""
    try:
        import dashscope
    except ImportError:
        return None
    tokenizer = dashscope.get_tokenizer("qwen-turbo")
    return lambda text: list(tokenizer.encode(text))


def _embedding_texts(body: JsonObject) -> list[str]:
    raw = body.get("input")
    return [raw] if isinstance(raw, str) else [str(t) for t in raw or []]


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _message_text(message: JsonObject) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def _prompt_text(messages: Any) -> str:
    return "\n".join(
        _message_text(m)
        for m in (messages if isinstance(messages, list) else [])
        if isinstance(m, dict)
    )


def _tokens(text: str) -> int:
    """A token count shaped like a real tokenizer's: ~4 ASCII chars or ~1.5 CJK chars each."""
    # Encoding drops every character above 127, so the length left is the ASCII count.
    ascii_chars = len(text.encode("ascii", "ignore"))
    other = len(text) - ascii_chars
    return max(1, math.ceil(ascii_chars / 4 + other / 1.5))


def _vector(seed: int, model: str, text: str, dims: int) -> list[float]:
    rng = random.Random(f"{seed}:embedding:{model}:{text}")
    values = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]
