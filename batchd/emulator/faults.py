"""Fault injection: every draw comes from one seeded generator, so a run repeats exactly."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from batchd.emulator.config import FaultSettings


class Fault(StrEnum):
    NONE = "none"
    ERROR_5XX = "error_5xx"
    DROP = "dropped_connection"
    THROTTLE = "throttled"


@dataclass(frozen=True)
class Decision:
    """What happens to one call before it is served."""

    latency_s: float
    fault: Fault


class FaultInjector:
    """Draws the fate of each API call from the current `FaultSettings`."""

    def __init__(self, settings: FaultSettings) -> None:
        self.settings = settings
        self._rng = random.Random(settings.seed)
        self.counts: dict[str, int] = {}
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.counts = {f.value: 0 for f in Fault if f is not Fault.NONE}
        self.counts["lost_create_response"] = 0

    def update(self, patch: dict[str, Any]) -> FaultSettings:
        """Apply a partial change; a new `seed` restarts the sequence of draws."""
        merged = self.settings.model_dump() | patch
        self.settings = FaultSettings.model_validate(merged)
        if "seed" in patch:
            self._rng = random.Random(self.settings.seed)
        return self.settings

    def _applies(self, call_class: str) -> bool:
        return not self.settings.classes or call_class in self.settings.classes

    def decide(self, call_class: str) -> Decision:
        s = self.settings
        if not self._applies(call_class):
            return Decision(0.0, Fault.NONE)
        latency = 0.0
        if s.latency_max_s > 0:
            low = min(s.latency_min_s, s.latency_max_s)
            latency = self._rng.uniform(low, s.latency_max_s)
        fault = Fault.NONE
        for rate, kind in (
            (s.drop_connection_rate, Fault.DROP),
            (s.error_5xx_rate, Fault.ERROR_5XX),
            (s.throttle_rate, Fault.THROTTLE),
        ):
            if rate > 0 and self._rng.random() < rate:
                fault = kind
                break
        if fault is not Fault.NONE:
            self.counts[fault.value] += 1
        return Decision(latency, fault)

    def lose_create_response(self) -> bool:
        """Whether this create, having taken effect, loses its answer."""
        rate = self.settings.lost_create_response_rate
        if rate > 0 and self._applies("create") and self._rng.random() < rate:
            self.counts["lost_create_response"] += 1
            return True
        return False

    def reset_counts(self) -> None:
        self._reset_counts()
