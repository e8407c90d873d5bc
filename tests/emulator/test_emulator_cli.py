"""`batchd emulator` as users run it: one ready line, the key from env, a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import orjson
import pytest


async def _start(*args: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "emulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stderr.readline(), 20)
    event = orjson.loads(line)["event"]
    assert event.startswith("emulator listening on http://127.0.0.1:")
    return process, event.removeprefix("emulator listening on ")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_serves_both_base_paths_and_stops_cleanly_on_a_signal(stop: signal.Signals) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    env["BATCHD_EMULATOR_API_KEY"] = "sk-from-env"
    process, root = await _start("--time-scale", "60", env=env)
    try:
        async with aiohttp.ClientSession() as http:
            for prefix in ("/compatible-mode/v1", "/v1"):
                headers = {"Authorization": "Bearer sk-from-env"}
                async with http.get(f"{root}{prefix}/batches", headers=headers) as response:
                    assert response.status == 200
            async with http.get(f"{root}/_emulator/stats") as response:
                stats = await response.json()
        assert stats["calls"]["list"]["served"] == 2
    finally:
        process.send_signal(stop)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert process.stderr is not None
    rest = (await process.stderr.read()).decode()
    assert "emulator listening" not in rest  # the ready line is logged exactly once
    assert "sk-from-env" not in rest


async def test_a_missing_key_is_a_clear_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "emulator",
        "--port",
        "0",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert b"BATCHD_EMULATOR_API_KEY" in err
