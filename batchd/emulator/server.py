"""Running the emulator: in-process for tests, or as `batchd emulator` until a signal."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from batchd.documents import JsonObject
from batchd.emulator.app import EmulatorState, build_app, make_windows
from batchd.emulator.clock import ServiceClock
from batchd.emulator.config import EmulatorSettings, FaultSettings
from batchd.emulator.faults import FaultInjector
from batchd.emulator.oss import ObjectReader, ReaderSettings
from batchd.emulator.store import EmulatorStore
from batchd.errors import ConfigError
from batchd.logs import get_logger, register_secret

log = get_logger("batchd.emulator")


class Emulator:
    """One emulated account served over HTTP on loopback.

    `async with Emulator(settings) as emu:` binds (port 0 picks a free port), then
    `emu.base_url` is the DashScope-style base URL and `emu.state` the live state. Tests
    move the service's clock with `emu.advance(seconds)` and switch faults with
    `emu.set_faults(...)`; `await emu.stats()` gives the figures `/_emulator/stats` serves.
    """

    def __init__(self, settings: EmulatorSettings, *, clock: ServiceClock | None = None) -> None:
        if settings.api_key is None or not settings.api_key.get_secret_value():
            raise ConfigError(
                "the emulator needs an API key: pass --api-key or set BATCHD_EMULATOR_API_KEY"
            )
        self.settings = settings
        self.api_key = settings.api_key.get_secret_value()
        register_secret(self.api_key)
        self.clock = clock or ServiceClock(settings.time_scale)
        self._own_dir = settings.data_dir is None
        data_dir = settings.data_dir or Path(tempfile.mkdtemp(prefix="batchd-emulator-"))
        self.data_dir = data_dir
        faults = FaultInjector(settings.faults)
        objects = None
        if settings.object_store_url is not None:
            objects = ObjectReader(
                ReaderSettings(
                    store_url=settings.object_store_url,
                    region=settings.object_store_region,
                    addressing=settings.object_store_addressing,
                    require_tag=settings.oss_require_tag,
                    stall_s=settings.oss_read_timeout_s,
                )
            )
        self.state = EmulatorState(
            settings=settings,
            clock=self.clock,
            store=EmulatorStore(settings, self.clock, data_dir, faults),
            windows=make_windows(settings),
            faults=faults,
            api_key=self.api_key,
            objects=objects,
        )
        self._runner: web.AppRunner | None = None
        self.host = settings.host
        self.port = settings.port

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/compatible-mode/v1"

    async def start(self) -> None:
        """Bind and serve; logs `emulator listening on http://H:P` once ready."""
        runner = web.AppRunner(build_app(self.state), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info(
            f"emulator listening on {self.root_url}",
            base_url=self.base_url,
            time_scale=self.clock.time_scale,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.state.objects is not None:
            await self.state.objects.close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def advance(self, service_s: float) -> float:
        """Move the service's clock forward; returns the new service time."""
        return self.clock.advance(service_s)

    def advance_wall(self, wall_s: float) -> float:
        """Move wall time forward: rate windows roll over, service time moves too."""
        return self.clock.advance_wall(wall_s)

    def set_faults(self, **patch: Any) -> FaultSettings:
        """Change fault settings at run time (the same as POST /_emulator/faults)."""
        return self.state.faults.update(patch)

    async def stats(self) -> JsonObject:
        return await self.state.stats()


async def serve(settings: EmulatorSettings) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Emulator(settings):
        await stop.wait()
        log.info("emulator_stopping")
