"""`batchd emulator`: serve the Batch API emulator on loopback for dry runs and tests."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from batchd.emulator.config import EmulatorSettings
from batchd.emulator.server import Emulator, serve
from batchd.logs import configure


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "emulator",
        description=(
            "Serve an emulator of the OpenAI-compatible Batch API (DashScope flavour) at "
            "http://HOST:PORT/compatible-mode/v1 and http://HOST:PORT/v1, with its stats at "
            "/_emulator/stats. Stops on SIGINT or SIGTERM."
        ),
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 picks a free one (default 8765)")
    parser.add_argument(
        "--api-key", help="the key clients must send (default: $BATCHD_EMULATOR_API_KEY)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        help="run the service's clock this many times faster than wall time (default 1)",
    )
    parser.add_argument(
        "--object-store-url",
        metavar="URL",
        help=(
            "an S3-compatible object store (OSS: https://oss-cn-beijing.aliyuncs.com) to read"
            " oss:{region}:{bucket}/{key} and presigned-URL inputs from; credentials from"
            " OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET, else AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY (default: such inputs are refused)"
        ),
    )
    parser.add_argument(
        "--oss-require-tag",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "whether an oss: input's bucket must be tagged bailian-datahub-access: read, as"
            " the service requires (default: yes; --no-oss-require-tag for stores that keep"
            " no bucket tags)"
        ),
    )
    parser.add_argument("--config", type=Path, help="TOML file with an [emulator] table")
    parser.set_defaults(handler=run)


def settings_from(args: argparse.Namespace) -> EmulatorSettings:
    """The emulator's settings: the TOML table and environment, under the flags given."""
    return EmulatorSettings.load(
        args.config,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        time_scale=args.time_scale,
        object_store_url=args.object_store_url,
        oss_require_tag=args.oss_require_tag,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until a signal; configuration errors surface as usage errors."""
    settings = settings_from(args)
    configure(settings.log.level, settings.log.format)
    Emulator(settings)  # refuses a missing key before anything is bound
    asyncio.run(serve(settings))
    return 0
