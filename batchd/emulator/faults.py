"""Fault injection: every draw comes from one seeded generator or a hash of the seed, so a
run repeats exactly."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from batchd.documents import JsonObject
from batchd.emulator.config import FaultSettings

# Counters of the faults decided outside `decide`, as `stats()["faults"]` names them.
COUNTERS = (
    # Calls held back by the latency fault before the service saw them.
    "delayed",
    "lost_create_response",
    "lost_response",
    # Batches a gateway's retried create made beside the first.
    "gateway_retried_creates",
    "list_filters_ignored",
    "endless_pages",
    "garbled_fields",
    "content_missing",
    "dripped",
    "huge_lines",
    "odd_lines",
    # Success lines written with an absurd number in their usage (`absurd_usage_rate`).
    "absurd_usage",
    # Batches failed by an enqueued-token limit (`limits` or `enqueued_tokens`).
    "token_limit_exceeded",
)
# Call classes whose calls can take effect and then lose their answer.
LOSABLE_CLASSES = frozenset({"upload", "create", "cancel", "files"})
# Batch object fields that hold a Unix time (or null).
TIMESTAMP_FIELDS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
# How many ways `garble` renders a Batch object wrongly; they are used in turn.
GARBLE_VARIANTS = 8


class FaultMode(StrEnum):
    NONE = "none"
    ERROR_5XX = "error_5xx"
    DROP = "dropped_connection"
    THROTTLE = "throttled"


@dataclass(frozen=True)
class Decision:
    """What happens to one call before it is served."""

    latency_s: float
    fault: FaultMode


class FaultInjector:
    """Draws the fate of each API call from the current `FaultSettings`."""

    def __init__(self, settings: FaultSettings) -> None:
        self.settings = settings
        self._rng = random.Random(settings.seed)
        self._garbled = 0
        self.counts: dict[str, int] = {}
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.counts = {f.value: 0 for f in FaultMode if f is not FaultMode.NONE}
        for name in COUNTERS:
            self.counts[name] = 0

    def update(self, patch: JsonObject) -> FaultSettings:
        """Apply a partial change; a new `seed` restarts the sequence of draws."""
        merged = self.settings.model_dump() | patch
        self.settings = FaultSettings.model_validate(merged)
        if "seed" in patch:
            self._rng = random.Random(self.settings.seed)
            self._garbled = 0
        return self.settings

    def _applies(self, call_class: str) -> bool:
        return not self.settings.classes or call_class in self.settings.classes

    def decide(self, call_class: str) -> Decision:
        s = self.settings
        if not self._applies(call_class):
            return Decision(0.0, FaultMode.NONE)
        latency = 0.0
        # A draw for the share only when it is one: a run with every call delayed
        # repeats the draws it made before `latency_rate` existed.
        if s.latency_max_s > 0 and (s.latency_rate >= 1 or self._rng.random() < s.latency_rate):
            low = min(s.latency_min_s, s.latency_max_s)
            latency = self._rng.uniform(low, s.latency_max_s)
            self.counts["delayed"] += 1
        fault = FaultMode.NONE
        for rate, kind in (
            (s.drop_connection_rate, FaultMode.DROP),
            (s.error_5xx_rate, FaultMode.ERROR_5XX),
            (s.throttle_rate, FaultMode.THROTTLE),
        ):
            if rate > 0 and self._rng.random() < rate:
                fault = kind
                break
        if fault is not FaultMode.NONE:
            self.counts[fault.value] += 1
        return Decision(latency, fault)

    def gateway_retries(self) -> int:
        """How many more times a gateway sends this create upstream (0: not at all)."""
        rate = self.settings.gateway_retry_rate
        if rate > 0 and self._applies("create") and self._rng.random() < rate:
            return self.settings.gateway_retries
        return 0

    def lose_create_response(self) -> bool:
        """Whether this create, having taken effect, loses its answer."""
        rate = self.settings.lost_create_response_rate
        if rate > 0 and self._applies("create") and self._rng.random() < rate:
            self.counts["lost_create_response"] += 1
            return True
        return False

    def lose_response(self, call_class: str) -> bool:
        """Whether this upload, create, cancel or file delete, having taken effect, loses
        its answer (`lost_response_rate`)."""
        rate = self.settings.lost_response_rate
        if (
            rate > 0
            and call_class in LOSABLE_CLASSES
            and self._applies(call_class)
            and self._rng.random() < rate
        ):
            self.counts["lost_response"] += 1
            return True
        return False

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def garble(self, batch: JsonObject) -> JsonObject:
        """The Batch object as a sloppy gateway renders it, for `garbled_fields_rate` of
        them; the object itself when not drawn. Identity fields are never touched."""
        rate = self.settings.garbled_fields_rate
        if rate <= 0 or self._rng.random() >= rate:
            return batch
        variant = self._garbled % GARBLE_VARIANTS
        self._garbled += 1
        self.counts["garbled_fields"] += 1
        return garbled(batch, variant, self._rng)

    def matches(self, metadata: Mapping[str, str] | None) -> bool:
        """Whether the content faults apply to a batch with this metadata."""
        wanted = self.settings.batch_match
        return not wanted or wanted in (metadata or {}).get("ds_name", "")

    def reset_counts(self) -> None:
        self._reset_counts()


def drawn(seed: int, kind: str, key: str, rate: float) -> bool:
    """A fixed draw per (seed, kind, key): the same file or line always gets the same fate."""
    if rate <= 0:
        return False
    return random.Random(f"{seed}:{kind}:{key}").random() < rate


def _iso(value: Any) -> Any:
    if not isinstance(value, int | float):
        return value
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def garbled(batch: JsonObject, variant: int, rng: random.Random) -> JsonObject:
    """A copy of a Batch object with its counts or timestamps rendered in one odd way."""
    out = dict(batch)
    raw = batch.get("request_counts") or {}
    total = int(raw.get("total", 0))
    completed = int(raw.get("completed", 0))
    failed = int(raw.get("failed", 0))
    if variant == 0:  # numbers as numeric strings
        out["request_counts"] = {
            "total": str(total),
            "completed": str(completed),
            "failed": str(failed),
        }
    elif variant == 1:  # not numbers at all
        out["request_counts"] = {"total": "n/a", "completed": None, "failed": "many"}
    elif variant == 2:  # a list instead of an object
        out["request_counts"] = [total, completed, failed]
    elif variant == 3:  # a string instead of an object
        out["request_counts"] = f"total={total} completed={completed} failed={failed}"
    elif variant == 4:  # numbers that cannot be right
        out["request_counts"] = {"total": total, "completed": total + 1, "failed": -1}
    elif variant == 5:  # floats, one of them absurdly large
        out["request_counts"] = {"total": float(total), "completed": 1e300, "failed": 0.5}
    elif variant == 6:  # timestamps as ISO 8601 text
        for name in TIMESTAMP_FIELDS:
            out[name] = _iso(batch.get(name))
    else:  # timestamps as floats with fractions
        for name in TIMESTAMP_FIELDS:
            value = batch.get(name)
            if isinstance(value, int | float):
                out[name] = value + round(0.001 + rng.random() * 0.998, 3)
    return out
