"""`batchd run`: the daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from batchd.config import Settings
from batchd.logs import configure


def load_settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides: dict[str, Any] = dict(extra)
    if getattr(args, "provider", None):
        overrides["provider"] = args.provider
    if getattr(args, "base_url", None):
        overrides["base_url"] = args.base_url
    settings = Settings.load(getattr(args, "config", None), **overrides)
    if getattr(args, "root", None):
        paths = settings.paths.model_copy(update={"root": Path(args.root)})
        settings = settings.model_copy(update={"paths": paths})
    return settings


def _run(args: argparse.Namespace) -> int:
    from batchd.daemon import load_api_key, run_daemon

    settings = load_settings(args)
    configure(settings.log.level, settings.log.format)
    return run_daemon(settings, load_api_key(), reload=lambda: load_settings(args))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        description="Run the daemon. The API key comes from BATCHD_API_KEY, DASHSCOPE_API_KEY"
        " or a systemd credential named api_key; never from the configuration file.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--root", type=Path, help="folder holding inbox/, outbox/, spool/, state/")
    p.add_argument("--base-url", help="the provider's base URL (overrides the profile's)")
    p.add_argument(
        "--provider",
        choices=["dashscope", "dashscope-intl", "openai", "custom"],
        help="provider profile (default from the configuration: dashscope)",
    )
    p.set_defaults(handler=_run)
