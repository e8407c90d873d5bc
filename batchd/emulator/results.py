"""Deterministic answers: the same request in the same batch always gets the same line."""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.config import ENDPOINT_EMBEDDINGS, TEST_MODEL

TEST_ANSWER = "This is a test result."
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

    def _digest(self, *parts: str) -> bytes:
        text = ":".join((str(self.seed), self.batch_id, *parts))
        return hashlib.sha256(text.encode()).digest()

    def request_id(self, custom_id: str) -> str:
        return str(uuid.UUID(bytes=self._digest("request", custom_id)[:16]))

    def success(self, custom_id: str, body: dict[str, Any], endpoint: str) -> bytes:
        request_id = self.request_id(custom_id)
        if endpoint == ENDPOINT_EMBEDDINGS:
            answer = self._embedding(request_id, body)
        else:
            answer = self._chat(request_id, body)
        response = {"status_code": 200, "request_id": request_id, "body": answer}
        return _line(request_id, custom_id, response, None)

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

    def _chat(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        model = str(body.get("model"))
        message: dict[str, Any]
        if model == TEST_MODEL:
            usage: dict[str, Any] = {
                "completion_tokens": 6,
                "prompt_tokens": 20,
                "total_tokens": 26,
            }
            message = {"content": TEST_ANSWER}
        else:
            prompt = _prompt_text(body.get("messages"))
            text = f"{self.seed}:answer:{model}:{prompt}"
            digest = hashlib.sha256(text.encode()).hexdigest()
            content = f"Emulated answer {digest[:12]} to: {prompt[-60:]}"
            prompt_tokens = _tokens(prompt) + 4 * _count(body.get("messages"))
            completion_tokens = _tokens(content)
            max_tokens = body.get("max_tokens")
            if isinstance(max_tokens, int) and 0 < max_tokens < completion_tokens:
                completion_tokens = max_tokens
            usage = {"completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens}
            message = {"content": content}
            if model in self.thinking_models or body.get("enable_thinking") is True:
                reasoning = f"Thinking about {digest[12:24]}: {prompt[:40]}"
                budget = body.get("thinking_budget")
                reasoning_tokens = _tokens(reasoning)
                if isinstance(budget, int) and 0 < budget < reasoning_tokens:
                    reasoning_tokens = budget
                usage["completion_tokens"] = completion_tokens + reasoning_tokens
                usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
                message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            usage["total_tokens"] = prompt_tokens + usage["completion_tokens"]
        return {
            "created": self.created,
            "usage": usage,
            "model": model,
            "id": f"chatcmpl-{request_id}",
            "choices": [{"finish_reason": "stop", "index": 0, "message": message}],
            "object": "chat.completion",
        }

    def _embedding(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        model = str(body.get("model"))
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else [str(t) for t in raw or []]
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
        tokens = sum(_tokens(t) for t in texts)
        return {
            "data": data,
            "model": model,
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": request_id,
        }


def _line(
    request_id: str, custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> bytes:
    record = {"id": request_id, "custom_id": custom_id, "response": response, "error": error}
    return orjson.dumps(record) + b"\n"


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _prompt_text(messages: Any) -> str:
    parts: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
    return "\n".join(parts)


def _tokens(text: str) -> int:
    """A token count shaped like a real tokenizer's: ~4 ASCII chars or ~1.5 CJK chars each."""
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    other = len(text) - ascii_chars
    return max(1, math.ceil(ascii_chars / 4 + other / 1.5))


def _vector(seed: int, model: str, text: str, dims: int) -> list[float]:
    rng = random.Random(f"{seed}:embedding:{model}:{text}")
    values = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]
