"""The service's own checks of an input file, done while a batch is validating.

Written for the emulator alone: the daemon has its own validator, and the two share no
code, so that a mistake on one side cannot hide the same mistake on the other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchd.config import ENDPOINT_EMBEDDINGS, ProviderLimits
from batchd.documents import JsonObject
from batchd.emulator.results import prompt_tokens

# The service lists at most this many problems in a failed batch's `errors`.
MAX_LISTED_ERRORS = 100


@dataclass(frozen=True)
class ServiceRules:
    """What the service accepts, taken from the emulator's settings."""

    limits: ProviderLimits
    models: frozenset[str]
    request_failure_rate: float
    seed: int


@dataclass
class Scan:
    """What the service learned from one pass over an input file."""

    total: int = 0
    model: str | None = None
    errors: list[JsonObject] = field(default_factory=list)
    error_count: int = 0
    # File positions (0-based) of the requests that will fail, in order.
    failing: list[int] = field(default_factory=list)
    # The input tokens of every request (`results.prompt_tokens`): what the batch adds to
    # its model's enqueued tokens while it runs.
    input_tokens: int = 0

    @property
    def valid(self) -> bool:
        return self.error_count == 0

    def add(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def request_fails(custom_id: str, rate: float, seed: int, salt: str = "") -> bool:
    """Whether the service fails this request: a fixed draw per custom_id, seed and input
    file (`salt`), so the same request sent again in another batch gets a fresh draw, as
    a transient failure would."""
    if rate <= 0:
        return False
    return random.Random(f"{seed}:fail:{salt}:{custom_id}").random() < rate


def _lines(fh: BinaryIO, max_line_bytes: int) -> Any:
    """Yield (line number, bytes or None when the line is over the limit)."""
    number = 0
    while True:
        chunk = fh.readline(max_line_bytes + 2)
        if not chunk:
            return
        number += 1
        if not chunk.endswith(b"\n") and len(chunk) > max_line_bytes:
            while chunk and not chunk.endswith(b"\n"):
                chunk = fh.readline(1 << 20)
            yield number, None
            continue
        body = chunk.rstrip(b"\r\n") if chunk.endswith(b"\n") else chunk
        yield number, (None if len(body) > max_line_bytes else body)


def _model_limit(limits: ProviderLimits, model: str, name: str) -> Any:
    own = limits.models.get(model)
    return getattr(own, name) if own is not None else None


class _LineCheck:
    def __init__(self, endpoint: str, rules: ServiceRules, scan: Scan, salt: str = "") -> None:
        self.salt = salt
        self.endpoint = endpoint
        self.rules = rules
        self.scan = scan
        self.seen: set[str] = set()
        self.thinking: object = None

    def check(self, number: int, raw: bytes | None) -> None:
        scan = self.scan
        limit = self.rules.limits.max_line_bytes
        if raw is None:
            scan.add("line_too_large", f"line is over {limit} bytes", number)
            return
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            scan.add("invalid_json_line", "line is not valid JSON", number)
            return
        if not isinstance(line, dict):
            scan.add("invalid_json_line", "line is not a JSON object", number)
            return
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            scan.add("invalid_request", "custom_id must be a non-empty string", number, "custom_id")
            return
        if custom_id in self.seen:
            scan.add("duplicate_custom_id", f"custom_id {custom_id!r} is repeated", number)
        self.seen.add(custom_id)
        if line.get("method") != "POST":
            scan.add("invalid_request", "method must be POST", number, "method")
        url = line.get("url")
        if url != self.endpoint:
            scan.add("invalid_url", f"url {url!r} differs from the batch endpoint", number, "url")
        body = line.get("body")
        if not isinstance(body, dict):
            scan.add("invalid_request", "body must be an object", number, "body")
            return
        self._check_body(number, body)
        self.scan.input_tokens += prompt_tokens(body, self.endpoint)
        if request_fails(custom_id, self.rules.request_failure_rate, self.rules.seed, self.salt):
            scan.failing.append(scan.total)
        scan.total += 1

    def _check_body(self, number: int, body: JsonObject) -> None:
        scan = self.scan
        model = body.get("model")
        if not isinstance(model, str) or not model:
            scan.add("invalid_request", "body.model must be a string", number, "body.model")
        elif model not in self.rules.models:
            scan.add("model_not_found", f"model {model!r} does not exist", number, "body.model")
        else:
            self._check_model(number, model, body)
        if self.endpoint == ENDPOINT_EMBEDDINGS:
            if not isinstance(body.get("input"), str | list):
                scan.add("invalid_request", "body.input is required", number, "body.input")
        elif not isinstance(body.get("messages"), list) or not body["messages"]:
            scan.add("invalid_request", "body.messages must be a list", number, "body.messages")

    def _check_model(self, number: int, model: str, body: JsonObject) -> None:
        scan = self.scan
        limits = self.rules.limits
        served_on = _model_limit(limits, model, "endpoints")
        if served_on is not None and self.endpoint not in served_on:
            scan.add(
                "model_not_found",
                f"model {model!r} is not available on {self.endpoint}",
                number,
                "body.model",
            )
        for other, own in limits.models.items():
            if other != model and self.endpoint in own.exclusive_endpoints:
                scan.add(
                    "model_not_found",
                    f"{self.endpoint} serves only {other!r}, not {model!r}",
                    number,
                    "body.model",
                )
        thinking = body.get("enable_thinking")
        if scan.model is None:
            scan.model = model
            self.thinking = thinking
        elif model != scan.model:
            scan.add(
                "mismatched_model",
                f"model {model!r} differs from {scan.model!r}; a batch uses one model",
                number,
                "body.model",
            )
        elif thinking != self.thinking:
            scan.add(
                "mismatched_model",
                "enable_thinking differs between lines; a batch uses one thinking mode",
                number,
                "body.enable_thinking",
            )


def scan_input(path: Path, endpoint: str, rules: ServiceRules, salt: str = "") -> Scan:
    """Check an input file against the service's rules in one streaming pass; `salt`
    (the input file id) varies which requests fail from one file to the next."""
    scan = Scan()
    check = _LineCheck(endpoint, rules, scan, salt)
    lines = 0
    with path.open("rb") as fh:
        for number, raw in _lines(fh, rules.limits.max_line_bytes):
            lines = number
            check.check(number, raw)
    size = path.stat().st_size
    if lines == 0:
        scan.add("empty_file", "the input file has no requests", None)
        return scan
    model = scan.model or ""
    max_requests = min(
        rules.limits.max_requests_per_file,
        _model_limit(rules.limits, model, "max_requests_per_file") or lines + 1,
    )
    if lines > max_requests:
        scan.add(
            "request_limit_exceeded",
            f"the file has {lines} requests; at most {max_requests} are allowed for {model!r}",
            max_requests + 1,
        )
    max_bytes = min(
        rules.limits.max_file_bytes,
        _model_limit(rules.limits, model, "max_file_bytes") or size + 1,
    )
    if size > max_bytes:
        scan.add(
            "file_too_large",
            f"the file has {size} bytes; at most {max_bytes} are allowed for {model!r}",
            None,
        )
    return scan
