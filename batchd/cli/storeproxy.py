"""`batchd store-proxy`: a fault proxy in front of an S3-compatible store, to dry-run
bucket folders against a store that fails (batchd.emulator.storeproxy)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from batchd.logs import configure


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "store-proxy",
        description=(
            "Pass every request to an S3-compatible store (OSS, S3, a local one) and back,"
            " injecting the faults asked for: errors at a rate, latency, slow or cut reads,"
            " bucket tags. Point [storage] endpoint_url at it. Faults change at run time with"
            " POST /_proxy/faults (JSON); counts at GET /_proxy/stats. Stops on SIGINT or"
            " SIGTERM."
        ),
    )
    parser.add_argument("--upstream", required=True, help="the store's endpoint URL")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9564, help="port (default 9564)")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests failed")
    parser.add_argument(
        "--error-status", type=int, default=503, choices=(500, 503), help="their status"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument(
        "--slow-read", type=float, default=0.0, help="seconds before each 64 KiB of a body"
    )
    parser.add_argument("--cut-rate", type=float, default=0.0, help="share of bodies cut halfway")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from batchd.emulator.storeproxy import StoreFaults, start_proxy

    configure("info", "console")
    faults = StoreFaults()
    try:
        faults.update(
            {
                "error_rate": args.error_rate,
                "error_status": args.error_status,
                "latency_s": args.latency,
                "slow_read_s": args.slow_read,
                "cut_rate": args.cut_rate,
            }
        )
    except ValueError as exc:
        raise SystemExit(f"batchd store-proxy: {exc}") from None

    async def serve() -> None:
        running = await start_proxy(args.upstream, args.host, args.port, faults)
        print(f"store proxy at {running.url} -> {args.upstream}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await running.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
