"""The shipped Batch API emulator: `batchd emulator`, and `Emulator` for tests."""

from __future__ import annotations

from batchd.emulator.clock import ServiceClock
from batchd.emulator.config import EmulatorSettings, FaultSettings
from batchd.emulator.server import Emulator, serve

__all__ = ["Emulator", "EmulatorSettings", "FaultSettings", "ServiceClock", "serve"]
