"""Shared pieces of the benchmarks: the machine, the emulator, the daemon as a subprocess.

Every benchmark module has `main(argv)` with `--quick` and `--out FILE` (its figures as
JSON) and a `rows(figures)` that turns its figures into table rows for `tests.bench.run`.
The emulator runs in the benchmark's own process; the daemon runs as `batchd run` in a
subprocess so that its CPU seconds and peak RSS are its own. Network: 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batchd.emulator import Emulator, EmulatorSettings
from batchd.logs import configure
from tests.integration.daemon_harness import KEY, daemon_env, start_subprocess

# A table row: benchmark, figure, value (already formatted), target, verdict.
Row = tuple[str, str, str, str, str]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(ram_gb, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def request_line(i: int, prefix: str = "r", model: str = "qwen-plus") -> bytes:
    return orjson.dumps(
        {
            "custom_id": f"{prefix}{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"q {i}"}]},
        }
    )


def jsonl(n: int, prefix: str = "r") -> bytes:
    return b"".join(request_line(i, prefix) + b"\n" for i in range(n))


async def start_emulator(tmp: Path, **overrides: Any) -> Emulator:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "api_key": KEY,
        "data_dir": tmp / "emulator",
        "log": {"level": "warning"},
    }
    values.update(overrides)
    emulator = Emulator(EmulatorSettings(**values))
    await emulator.start()
    return emulator


def wall_of(emulator: Emulator, service_t: float) -> float:
    """The monotonic wall time (this process's clock) at which the service read `service_t`.

    Valid while the emulator's clock was never advanced by hand."""
    clock = emulator.clock
    return clock._start_wall + (service_t - clock._start_service) / clock.time_scale


def mono_of_unix(unix_t: float) -> float:
    """A Unix timestamp (the daemon's time.time()) on this process's monotonic clock."""
    return time.monotonic() - (time.time() - unix_t)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}__{k.upper()}", v, out)
    else:
        out[prefix] = str(value).lower() if isinstance(value, bool) else str(value)


class EmulatorProc:
    """`batchd emulator` in its own process (so that it does not share a core with the
    client being measured); figures come from GET /_emulator/stats."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root_url}/compatible-mode/v1"

    @classmethod
    async def start(cls, tmp: Path, **settings: Any) -> EmulatorProc:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
        values: dict[str, Any] = {"data_dir": str(tmp / "emulator"), "log": {"level": "warning"}}
        values.update(settings)
        for key, value in values.items():
            if isinstance(value, dict) and key != "log":
                env[f"BATCHD_EMULATOR_{key.upper()}"] = json.dumps(value)
            else:
                _flatten(f"BATCHD_EMULATOR_{key.upper()}", value, env)
        log = (tmp / "emulator.log").open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchd",
                "emulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-key",
                KEY,
                env=env,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        emulator = cls(proc, port)
        await until(emulator._up, 30, "emulator start", step_s=0.1)
        return emulator

    async def _up(self) -> bool:
        try:
            await self.stats()
        except (OSError, aiohttp.ClientError):
            return False
        return True

    async def _get(self, path: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.root_url + path) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def stats(self) -> dict[str, Any]:
        return await self._get("/_emulator/stats")

    async def clock(self) -> dict[str, Any]:
        return await self._get("/_emulator/clock")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def env_for(emulator: Any, root: Path, settings: dict[str, Any]) -> dict[str, str]:
    """The harness's subprocess environment plus nested settings as BATCHD_* variables
    (`limits` goes as one JSON value)."""
    extra: dict[str, str] = {}
    for key, value in settings.items():
        if key == "limits":
            extra["BATCHD_LIMITS"] = json.dumps(value)
        else:
            _flatten(f"BATCHD_{key.upper()}", value, extra)
    env = daemon_env(emulator, root, **extra)
    # BATCHD_BENCH_LOG=info keeps the daemon's log lines (in the temp folder) for a look.
    env["BATCHD_LOG__LEVEL"] = os.environ.get("BATCHD_BENCH_LOG", "warning")
    return env


@dataclass
class DaemonProc:
    """`batchd run` in a subprocess, with its CPU and memory read from /proc."""

    proc: asyncio.subprocess.Process
    log_path: Path

    @classmethod
    async def start(cls, env: dict[str, str], log_path: Path) -> DaemonProc:
        return cls(await start_subprocess(env, log_path), log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def rss_mb(self, key: str = "VmHWM") -> float:
        """Peak (VmHWM) or current (VmRSS) resident memory, MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def stop(self, timeout_s: float = 40.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode if self.proc.returncode is not None else -1

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def calls(stats: dict[str, Any]) -> dict[str, int]:
    """Served calls per class from emulator stats."""
    return {name: int(c["served"]) for name, c in stats["calls"].items()}


def refused(stats: dict[str, Any]) -> dict[str, int]:
    return {name: int(c["refused_429"]) for name, c in stats["calls"].items()}


async def until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout_s: float,
    what: str,
    step_s: float = 0.05,
) -> float:
    """Wait until `check()` is true, at most `timeout_s`; returns the seconds it took."""
    started = time.monotonic()
    for _ in range(int(timeout_s / step_s) + 2):
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            break
        await asyncio.sleep(step_s)
    raise TimeoutError(f"{what}: not done within {timeout_s:.0f} s")


def published(outbox: Path) -> list[Path]:
    if not outbox.exists():
        return []
    return [p for p in outbox.iterdir() if not p.name.startswith(".")]


def write_inputs(inbox: Path, files: dict[str, bytes]) -> None:
    """Write files under hidden temp names, then rename them all into the inbox at once."""
    inbox.mkdir(parents=True, exist_ok=True)
    past = time.time() - 10
    temps = []
    for name, content in files.items():
        tmp = inbox / f".{name}.tmp"
        tmp.write_bytes(content)
        os.utime(tmp, (past, past))
        temps.append((tmp, inbox / name))
    for tmp, final in temps:
        tmp.rename(final)


def bench_main(
    description: str,
    run: Callable[[Path, bool], Awaitable[dict[str, Any]]],
    rows: Callable[[dict[str, Any]], list[Row]],
    argv: Sequence[str] | None = None,
) -> int:
    """The command line of one benchmark module."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--dir", type=Path, help="where to put temporary files")
    args = parser.parse_args(argv)
    configure("warning", "console", stream=sys.stderr)
    keep = os.environ.get("BATCHD_BENCH_KEEP")
    with tempfile.TemporaryDirectory(prefix="batchd-bench-", dir=args.dir) as tmp:
        if keep:
            print(f"temporary folder: {tmp} (copied to {keep})", file=sys.stderr)
        started = time.monotonic()
        figures = asyncio.run(run(Path(tmp), args.quick))
        figures["bench_seconds"] = round(time.monotonic() - started, 1)
        if keep:
            shutil.copytree(tmp, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.jsonl"))
    for row in rows(figures):
        print(" | ".join(row))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    sys.stdout.flush()
    return 0
