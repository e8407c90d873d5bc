"""Operator commands: thin clients of the daemon's control socket (and `submit`).

Exit codes scripts can rely on: 0 ok, 1 the thing asked for failed, 2 usage error,
3 the daemon is not reachable (the message names the socket path).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from batchd.config import Settings
from batchd.control import ControlClient
from batchd.errors import ConfigError
from batchd.fsutil import atomic_output
from batchd.models import input_kind

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _settings(args: argparse.Namespace) -> Settings:
    """The configuration, with `--root` in place of `paths.root` as `batchd run` takes it."""
    settings = Settings.load(getattr(args, "config", None))
    if getattr(args, "root", None):
        paths = settings.paths.model_copy(update={"root": Path(args.root)})
        settings = settings.model_copy(update={"paths": paths})
    return settings


def _socket(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    return _settings(args).socket_path


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _call(args: argparse.Namespace, method: str, url: str, **params: str) -> tuple[int, Any]:
    return await ControlClient(_socket(args)).call(method, url, **params)


_NOT_REACHED = (aiohttp.ClientConnectionError, OSError)


def _run_call(args: argparse.Namespace, method: str, url: str, **params: str) -> tuple[int, Any]:
    path = _socket(args)
    try:
        return asyncio.run(_call(args, method, url, **params))
    except _NOT_REACHED as exc:
        raise unreachable(path, exc) from None


class Unreachable(Exception):
    """The control socket does not answer (exit code 3)."""


def unreachable(path: Path, exc: BaseException) -> Unreachable:
    """Why the call got no answer: nobody listening, or a daemon that closed on us."""
    closed = isinstance(exc, aiohttp.ServerDisconnectedError | BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    )
    if closed:
        return Unreachable(
            f"batchd on {path} closed the connection without an answer: the daemon refused "
            "or dropped it (this user may not use the socket, or it serves "
            "control.max_connections already, or the request took longer than "
            "control.request_timeout_s); its log says which"
        )
    return Unreachable(f"batchd is not reachable on {path}: {exc}")


def _guard(func: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
        except Unreachable as exc:
            print(f"batchd {args.command}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        return code

    return wrapper


def _answer(status: int, body: Any, args: argparse.Namespace) -> int:
    if status >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        print(f"batchd {args.command}: {error.get('message', body)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    """Show the daemon's state: queue, running batches vs cap, rate levels, errors."""
    status, body = _run_call(args, "GET", "/v1/status")
    if status >= 400 or args.json:
        _print_json(body)
        return _answer(status, body, args)
    console = Console()
    caps = body["caps"]
    console.print(
        f"batchd {body['version']} (pid {body['pid']}) up {body['uptime_s']:.0f} s, "
        f"provider {body['provider']} ({body['base_url']})"
    )
    flags = []
    if body["intake_paused"]:
        flags.append("[yellow]intake paused[/]")
    if body["draining"]:
        flags.append("[yellow]draining[/]")
    if body["account_paused"]:
        flags.append(f"[red]account paused: {body['account_paused']}[/]")
    health = "[green]healthy[/]" if body["healthy"] else "[red]unhealthy[/]"
    console.print("  ".join([health, *flags]))
    console.print(f"running batches {caps['running_batches']} / {caps['running_cap']}")
    problems = body.get("problems") or []
    if problems:
        listed = Table(title=f"needs attention ({body.get('problem_count', len(problems))})")
        for column in ("what", "job", "part", "note"):
            listed.add_column(column)
        for problem in problems:
            listed.add_row(
                problem["kind"].replace("_", " "),
                problem.get("job_id") or "-",
                str(problem["part"]) if problem.get("part") is not None else "-",
                problem["note"][:120],
            )
        console.print(listed)
    table = Table(title="jobs")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, n in sorted(body["jobs_by_state"].items()):
        table.add_row(state, str(n))
    for outcome, n in sorted(body["jobs_by_outcome"].items()):
        table.add_row(f"  published {outcome}", str(n))
    console.print(table)
    rates = Table(title="API calls")
    for column in ("call", "sent", "429s", "free now", "last error"):
        rates.add_column(column)
    for call, level in sorted(body["bucket_levels"].items()):
        rates.add_row(
            call,
            str(body["api_calls"].get(call, 0)),
            str(body["throttled"].get(call, 0)),
            str(level),
            body["last_errors"].get(call, "")[:60],
        )
    console.print(rates)
    return EXIT_OK


@_guard
def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs, oldest first, filtered by state and name."""
    params = {"limit": str(args.limit), "offset": str(args.offset)}
    if args.state:
        params["state"] = args.state
    if args.name:
        params["name"] = args.name
    status, body = _run_call(args, "GET", "/v1/jobs", **params)
    if status >= 400:
        _print_json(body)
        return _answer(status, body, args)
    if args.json:
        _print_json(body["jobs"])  # a JSON array of jobs, for scripts
        return EXIT_OK
    table = Table(title=f"jobs ({len(body['jobs'])} of {body['total']})")
    for column in ("id", "name", "state", "status", "requests", "done", "failed", "claimed"):
        table.add_column(column)
    for job in body["jobs"]:
        table.add_row(
            job["id"],
            job["name"],
            job["state"],
            job["outcome"] or "-",
            str(job["requests"] or "-"),
            str(job["completed"]),
            str(job["failed"]),
            _when(job["created_at"]),
        )
    Console().print(table)
    return EXIT_OK


@_guard
def cmd_show(args: argparse.Namespace) -> int:
    """Show one job with its parts, remote ids, request counts, timings and errors."""
    status, body = _run_call(args, "GET", f"/v1/jobs/{args.job}")
    if status >= 400 or args.json:
        _print_json(body)
        return _answer(status, body, args)
    console = Console()
    console.print(
        f"[bold]{body['id']}[/] {body['name']} ({body['inbox_name']}): {body['state']}"
        + (f", {body['outcome']}" if body["outcome"] else "")
    )
    console.print(
        f"requests {body['requests']}, completed {body['completed']}, "
        f"failed {body['failed']}; claimed {_when(body['created_at'])}"
    )
    if body["outbox_path"]:
        console.print(f"outbox {body['outbox_path']}")
    if body["error"]:
        console.print(f"[red]{body['error']}[/]")
    table = Table(title="parts")
    for column in ("#", "state", "requests", "model", "batch", "status", "counts", "note"):
        table.add_column(column)
    for part in body["parts"] or []:
        counts = part["request_counts"] or {}
        table.add_row(
            str(part["seq"]),
            part["state"],
            str(part["requests"]),
            part["model"],
            part["batch_id"] or "-",
            part["remote_status"] or "-",
            f"{counts.get('completed', 0)}/{counts.get('failed', 0)}/{counts.get('total', 0)}",
            (part["error"] or "")[:60],
        )
    console.print(table)
    for part in body["parts"] or []:
        # A part that cannot proceed says why in full, not cut to a table cell.
        if part["state"] == "parked" or part.get("attempts") or part.get("unavailable"):
            console.print(f"  part {part['seq']} ({part['state']}): {part['error'] or ''}")
            for kind, why in (part.get("unavailable") or {}).items():
                console.print(f"    {kind} file unavailable: {why}")
    report = body.get("report") or {}
    for err in (report.get("errors") or [])[:20]:
        console.print(f"  line {err['line']}: {err['code']}: {err['message']}")
    return EXIT_OK


def _action(method: str, url: str) -> Any:
    @_guard
    def run(args: argparse.Namespace) -> int:
        status, body = _run_call(args, method, url.format(job=getattr(args, "job", "")))
        if args.json:
            _print_json(body)
        elif status < 400:
            print(body.get("message", "ok"))
        return _answer(status, body, args)

    return run


@_guard
def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answers and is healthy, 1 otherwise (for monitoring)."""
    try:
        status, body = _run_call(args, "GET", "/v1/status")
    except Unreachable as exc:
        print(f"batchd check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if status == 200 and body.get("healthy"):
        if not args.quiet:
            print("ok")
        return EXIT_OK
    problems = body.get("problems") or [] if isinstance(body, dict) else []
    reason = (
        body.get("account_paused")
        or body.get("error")
        or (problems[0]["note"] if problems else None)
        or "a stage has stopped"
    )
    print(f"batchd check: unhealthy: {reason}", file=sys.stderr)
    return EXIT_FAILED


@_guard
def cmd_watch(args: argparse.Namespace) -> int:
    """Live progress bars per running job, fed by the daemon's event stream."""
    return asyncio.run(_watch(args))


async def _watch(args: argparse.Namespace) -> int:
    client = ControlClient(_socket(args))
    try:
        status, body = await client.call("GET", "/v1/jobs", state="running", limit="1000")
    except _NOT_REACHED as exc:
        raise unreachable(client.path, exc) from None
    if status >= 400:
        return _answer(status, body, args)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[note]}"),
    )
    bars: dict[str, TaskID] = {}
    done_by_part: dict[str, dict[int, int]] = {}

    def bar(job_id: str, name: str, total: int | None) -> TaskID:
        if job_id not in bars:
            bars[job_id] = progress.add_task(f"{name} ({job_id})", total=total or None, note="")
        return bars[job_id]

    for job in body["jobs"]:
        bar(job["id"], job["name"], job["requests"])
        progress.update(bars[job["id"]], completed=job["completed"] + job["failed"])
    deadline = time.monotonic() + args.seconds if args.seconds else None
    with progress:
        async for event in client.stream("/v1/events"):
            job_id = event.get("job_id")
            if job_id:
                task = bar(job_id, job_id, None)
                if event.get("type") == "part" and event.get("request_counts"):
                    counts = event["request_counts"]
                    done_by_part.setdefault(job_id, {})[event.get("part") or 0] = counts.get(
                        "completed", 0
                    ) + counts.get("failed", 0)
                    progress.update(task, completed=sum(done_by_part[job_id].values()))
                if event.get("type") == "job" and event.get("state"):
                    progress.update(task, note=event.get("outcome") or event["state"])
            if deadline is not None and time.monotonic() > deadline:
                break
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    """Copy files into the inbox atomically (temp name, fsync, rename); no daemon needed."""
    settings = _settings(args)
    inbox = Path(args.inbox) if args.inbox else settings.paths.folder("inbox")
    if not inbox.is_dir():
        raise ConfigError(f"inbox {inbox} does not exist")
    failed = 0
    for source in args.files:
        path = Path(source)
        if input_kind(path.name, settings.intake.suffixes) is None:
            print(
                f"{path}: not an input (expected {', '.join(settings.intake.suffixes)})",
                file=sys.stderr,
            )
            failed += 1
            continue
        target = inbox / path.name
        if target.exists():
            print(f"{path}: {target} already exists; rename the file", file=sys.stderr)
            failed += 1
            continue
        try:
            # A hidden temp name the daemon ignores, fsynced, then renamed: never claimed
            # half-copied.
            with path.open("rb") as src, atomic_output(target) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"submitted {path} -> {target}")
    return EXIT_FAILED if failed else EXIT_OK


def register(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, json: bool = True) -> None:
        p.add_argument("--config", type=Path, help="TOML configuration file")
        p.add_argument("--root", type=Path, help="the daemon's root, as given to `batchd run`")
        p.add_argument("--socket", type=Path, help="control socket (default from the config)")
        if json:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("status", help="the daemon's state, caps and errors")
    common(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("jobs", help="list jobs")
    common(p)
    p.add_argument("--state", help="comma-separated states (claimed, running, published, ...)")
    p.add_argument("--name", help="only jobs whose name contains this")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.set_defaults(handler=cmd_jobs)

    p = sub.add_parser("show", help="one job with its parts")
    common(p)
    p.add_argument("job", help="job id")
    p.set_defaults(handler=cmd_show)

    for name, url, text in (
        ("cancel", "/v1/jobs/{job}/cancel", "cancel a job (finished requests are kept)"),
        ("retry", "/v1/jobs/{job}/retry", "rerun what failed or never ran"),
    ):
        p = sub.add_parser(name, help=text)
        common(p)
        p.add_argument("job", help="job id")
        p.set_defaults(handler=_action("POST", url))
    for name, url, text in (
        ("pause", "/v1/intake/pause", "stop taking new files from the inbox"),
        ("resume", "/v1/intake/resume", "take new files again"),
        ("drain", "/v1/drain", "finish what runs, take nothing new, then exit"),
    ):
        p = sub.add_parser(name, help=text)
        common(p)
        p.set_defaults(handler=_action("POST", url))

    p = sub.add_parser("watch", help="live progress bars of running jobs")
    common(p, json=False)
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser("check", help="exit 0 when the daemon answers and is healthy")
    common(p, json=False)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("submit", help="copy files into the inbox atomically")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--root", type=Path, help="the daemon's root, as given to `batchd run`")
    p.add_argument("--inbox", type=Path, help="the inbox (default from the config)")
    p.add_argument("files", nargs="+", help="JSONL or CSV files")
    p.set_defaults(handler=cmd_submit)
