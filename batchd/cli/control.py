"""Operator commands: thin clients of the daemon's control socket (and `submit`).

They speak to the daemon only through `batchd.client`, and import rich only to print a
table: a command starts about as fast as Python does. Exit codes scripts can rely on:
0 ok, 1 the thing asked for failed, 2 usage error, 3 the daemon is not reachable (the
message names the socket path); `submit --wait` adds 4 (timeout) and 5 (a job held
until an operator acts).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchd.cli.args import positive_int, positive_seconds
from batchd.client import (
    ENDED_STATES,
    Client,
    Queued,
    RequestFailed,
    Unreachable,
    inbox_location,
    inbox_name_problem,
    queue_input,
)
from batchd.errors import UsageError
from batchd.objstore.location import BucketUrl, parse_location
from batchd.operator.protocol import ActionResponse, JobInfo, Spend, StatusResponse, to_builtins

if TYPE_CHECKING:
    from batchd.config import StorageSettings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# Jobs a table lists unless told otherwise.
DEFAULT_LIST = 100
JOB_HELP = "job id, a unique prefix of it (6+ characters) or the job's exact name"

Handler = Callable[[argparse.Namespace], int]


def _client(args: argparse.Namespace) -> Client:
    """The daemon's client, its socket found as `batchd run` with the same `--config`
    and `--root` would place it (or `--socket`)."""
    return Client(
        getattr(args, "socket", None),
        root=getattr(args, "root", None),
        config=getattr(args, "config", None),
    )


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(to_builtins(data), option=orjson.OPT_INDENT_2).decode() + "\n")


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _guard(func: Handler) -> Handler:
    """No answer: exit 3 with the reason; an error answer: its message, exit 1 (with
    `--json`, the error envelope on stdout as well)."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except Unreachable as exc:
            print(f"batchd {args.command}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except RequestFailed as exc:
            if getattr(args, "json", False):
                _print_json({"error": {"code": exc.code, "message": exc.message}})
            print(f"batchd {args.command}: {exc.message}", file=sys.stderr)
            return EXIT_FAILED

    return wrapper


def _oss_lines(body: StatusResponse) -> list[str]:
    """How parts reach the service with the spool on a bucket, and what is missing."""
    oss = body.oss_inputs
    if oss is None:
        return []
    if oss.via == "oss":
        where = f", bucket in {oss.bucket_region}" if oss.bucket_region else ""
        lines = [f"parts reach the service from the spool bucket (oss: inputs{where})"]
    else:
        why = f": {oss.why_upload}" if oss.why_upload else ""
        lines = [f"parts are uploaded (jobs.input_via = {oss.setting}){why}"]
    if oss.checked_at is None and oss.via == "oss":
        lines.append("the spool bucket is checked before the first part goes by it")
    lines += [f"[red]missing for oss: inputs: {what}[/]" for what in oss.missing]
    lines += [f"[yellow]note: {what}[/]" for what in oss.notes]
    return lines


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    """Show the daemon's state: queue, running batches vs cap, rate levels, errors."""
    body = _client(args).status()
    if args.json:
        _print_json(body)
        return EXIT_OK
    from rich.table import Table

    console = _console()
    console.print(
        f"batchd {body.version} (pid {body.pid}) up {body.uptime_s:.0f} s, "
        f"provider {body.provider} ({body.base_url})"
    )
    flags = []
    if body.intake_paused:
        flags.append("[yellow]intake paused[/]")
    if body.draining:
        flags.append("[yellow]draining[/]")
    if body.account_paused:
        flags.append(f"[red]account paused: {body.account_paused}[/]")
    health = "[green]healthy[/]" if body.healthy else "[red]unhealthy[/]"
    console.print("  ".join([health, *flags]))
    for fault in body.local_faults:
        console.print(
            f"[red]local fault since {_when(fault.since)} UTC: {fault.key}: {fault.what}"
            f" ({fault.detail}); pauses {fault.pauses}[/]"
        )
    if body.provider_down:
        console.print(f"[red]the provider does not answer: {body.provider_down}[/]")
    for step in body.clock_steps:
        console.print(
            f"[yellow]the wall clock stepped {step.seconds:+.1f} s at {_when(step.at)} UTC[/]"
        )
    for line in _oss_lines(body):
        console.print(line)
    console.print(f"running batches {body.caps.running_batches} / {body.caps.running_cap}")
    if body.spend is not None:
        for line in _spend_lines(body.spend):
            console.print(line)
    for line in _counting_lines(body):
        console.print(line)
    for why in body.waiting:
        console.print(f"[yellow]waiting: {why}[/]")
    if body.reload is not None:
        reload = body.reload
        if not reload.ok:
            console.print(f"[red]last reload ({_when(reload.at)} UTC) failed: {reload.error}[/]")
        elif reload.needs_restart:
            console.print(
                f"[yellow]reloaded {_when(reload.at)} UTC; waiting for a restart: "
                f"{', '.join(reload.needs_restart)}[/]"
            )
        else:
            console.print(f"reloaded {_when(reload.at)} UTC")
    if body.problems:
        listed = Table(title=f"needs attention ({body.problem_count or len(body.problems)})")
        for column in ("what", "job", "part", "note"):
            listed.add_column(column)
        for problem in body.problems:
            listed.add_row(
                problem.kind.replace("_", " "),
                problem.job_id or "-",
                str(problem.part) if problem.part is not None else "-",
                problem.note[:120],
            )
        console.print(listed)
    table = Table(title="jobs")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, n in sorted(body.jobs_by_state.items()):
        table.add_row(state, str(n))
    for outcome, n in sorted(body.jobs_by_outcome.items()):
        table.add_row(f"  published {outcome}", str(n))
    console.print(table)
    rates = Table(title="API calls")
    for column in ("call", "sent", "429s", "free now", "last error (UTC)"):
        rates.add_column(column)
    for call, level in sorted(body.bucket_levels.items()):
        error = body.last_errors.get(call, "")
        at = body.last_error_at.get(call)
        rates.add_row(
            call,
            str(body.api_calls.get(call, 0)),
            str(body.throttled.get(call, 0)),
            str(level),
            f"{_when(at)}: {error[:60]}" if error and at else error[:60],
        )
    console.print(rates)
    if body.inbox_waiting or body.inbox_refused:
        inbox = Table(title="inbox")
        for column in ("entry", "", "why"):
            inbox.add_column(column)
        for name, why in sorted(body.inbox_waiting.items()):
            inbox.add_row(name, "waiting", why)
        for name, why in sorted(body.inbox_refused.items()):
            inbox.add_row(name, "[red]refused[/]", why)
        console.print(inbox)
    return EXIT_OK


def _money(amount: float | None, currency: str) -> str:
    return "unknown" if amount is None else f"{amount:.4f} {currency}".strip()


def _counting_lines(body: StatusResponse) -> list[str]:
    """PURE: status's lines on how tokens are counted and how old the prices are."""
    from rich.markup import escape

    lines = [escape(f"tokens of {family}: {how}") for family, how in body.tokenizers.items()]
    if body.prices_stale:
        lines.append(f"[yellow]warning: {escape(body.prices_stale)}[/]")
    elif body.prices_as_of:
        lines.append(f"prices read on {body.prices_as_of}")
    return lines


def _spend_lines(spend: Spend) -> list[str]:
    """PURE: status's lines on money: spend per period and provider, against the caps."""
    lines = []
    for label, period in (("today", spend.today), ("this month", spend.month)):
        spent = ", ".join(
            f"{provider} {_money(amount, spend.currency)}"
            for provider, amount in sorted(period.spent.items())
        )
        line = f"spent {label}: {spent or _money(0.0, spend.currency)}"
        if period.cap is not None:
            cap, left = _money(period.cap, spend.currency), _money(period.left, spend.currency)
            line += f"; budget {cap}, {left} left"
        lines.append(line)
    if spend.running_worst_case or spend.running_unpriced:
        unpriced = (
            f" ({spend.running_unpriced} parts with no price)" if spend.running_unpriced else ""
        )
        lines.append(
            f"running worst case: {_money(spend.running_worst_case, spend.currency)}{unpriced}"
        )
    if spend.held_jobs:
        lines.append(
            f"[yellow]{spend.held_jobs} job(s) held: batchd show JOB says why and what ends it[/]"
        )
    lines.append(f"(days begin at midnight {spend.timezone}; batch prices of the price table)")
    return lines


def _split(text: str | None) -> list[str] | None:
    return [s for s in (text or "").split(",") if s] or None


def _console() -> Any:
    """A console for tables; when piped, wide enough that no id or name is cut."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=10_000)


@_guard
def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs, newest first: the 100 newest unless told otherwise (`--json`: every
    job that matches unless `--limit`)."""
    client = _client(args)
    filters: dict[str, Any] = {
        "states": _split(args.state),
        "statuses": _split(args.status),
        "name": args.name,
        "newest_first": not args.oldest,
    }
    everything = args.all or (args.json and args.limit is None)
    if everything:
        jobs = list(client.all_jobs(**filters))
        total, more = len(jobs), False
    else:
        limit = args.limit or DEFAULT_LIST
        jobs = []
        before = None
        while len(jobs) < limit:  # a page holds 1000 at most
            page = client.jobs(limit=min(limit - len(jobs), 1000), before=before, **filters)
            jobs += page.jobs
            total, more = page.total, page.more
            if not page.more or not page.jobs or page.jobs[-1].id == before:
                break
            before = page.jobs[-1].id
    if args.json:
        _print_json(jobs)  # a JSON array of jobs, for scripts
        return EXIT_OK
    from rich.table import Table

    shown = f"{len(jobs)} of {total}" + ("; --all or --limit N for more" if more else "")
    table = Table(title=f"jobs, {'oldest' if args.oldest else 'newest'} first ({shown})")
    for column in ("id", "name", "state", "status", "requests", "done", "failed"):
        table.add_column(column, no_wrap=column in ("id", "name"))
    table.add_column("claimed (UTC)", no_wrap=True)
    for job in jobs:
        table.add_row(
            job.id,
            job.name,
            f"{job.state} (held: {job.held})" if job.held else job.state,
            job.status or "-",
            str(job.requests if job.requests is not None else "-"),
            str(job.completed),
            str(job.failed),
            _when(job.created_at),
        )
    _console().print(table)
    return EXIT_OK


@_guard
def cmd_show(args: argparse.Namespace) -> int:
    """Show one job with its parts, remote ids, request counts, timings and errors."""
    job = _client(args).job(args.job)
    if args.json:
        _print_json(job)
        return EXIT_OK
    from rich.table import Table

    console = _console()
    console.print(
        f"[bold]{job.id}[/] {job.name} ({job.inbox_name}): {job.state}"
        + (f", {job.status}" if job.status else "")
    )
    console.print(
        f"requests {job.requests}, completed {job.completed}, "
        f"failed {job.failed}; claimed {_when(job.created_at)} UTC"
    )
    if job.outbox:
        console.print(f"outbox {job.outbox}")
    for line in _retry_lines(job):
        console.print(line)
    if job.error:
        console.print(f"[red]{job.error}[/]")
    if job.held:
        console.print(f"[yellow]held ({job.held}): {job.held_note}[/]")
    for line in _cost_lines(job):
        console.print(line)
    # Times on batchd's clock only (the provider's are in `--json`'s provider_times).
    table = Table(title="parts (times UTC, batchd's clock)")
    columns = ("#", "state", "requests", "model", "batch", "status", "counts")
    for column in (*columns, "created", "ended", "note"):
        table.add_column(column)
    for part in job.parts or []:
        counts = part.request_counts or {}
        table.add_row(
            str(part.seq),
            part.state,
            str(part.requests),
            part.model,
            part.batch_id or "-",
            part.remote_status or "-",
            f"{counts.get('completed', 0)}/{counts.get('failed', 0)}/{counts.get('total', 0)}",
            _when(part.batch_created_at),
            _when(part.ended_at),
            (part.error or "")[:60],
        )
    console.print(table)
    for part in job.parts or []:
        # A part that cannot proceed says why in full, not cut to a table cell.
        if part.state == "parked" or part.attempts or part.unavailable:
            console.print(f"  part {part.seq} ({part.state}): {part.error or ''}")
            for kind, why in (part.unavailable or {}).items():
                console.print(f"    {kind} file unavailable: {why}")
    if job.extra_batches:
        console.print(
            f"[red]{len(job.extra_batches)} extra batch(es): made beside the ones the parts"
            " follow (a gateway sent a create again), cancelled as soon as found; a batch"
            " cancelled after it started may still bill the requests it ran[/]"
        )
        for extra in job.extra_batches:
            console.print(
                f"  part {extra.part}: {extra.batch_id} (the part follows"
                f" {extra.kept_batch_id}): {extra.note}"
            )
    for note in job.notifications or []:
        when = f" {_when(note.delivered_at)} UTC" if note.delivered_at else ""
        why = f": {note.last_error}" if note.last_error and note.state != "delivered" else ""
        console.print(
            f"  notified {note.target} ({note.event}): {note.state}{when},"
            f" {note.attempts} attempt(s){why}"
        )
    report = job.report or {}
    for err in (report.get("errors") or [])[:20]:
        where = f"line {err['line']}: " if err.get("line") is not None else ""
        console.print(f"  {where}{err['code']}: {err['message']}")
    return EXIT_OK


def _left_out_why(left_out: dict[str, int], job_id: str | None) -> str:
    """Why failures were left out of a retry, and the flag that sends them."""
    lost = left_out.get("result_unavailable", 0)
    if lost and lost == sum(left_out.values()):
        return (
            "their results were lost, but they were most likely billed; `batchd retry"
            f" {job_id} --force` sends them (paying again)"
        )
    why = "refused for their content or form"
    if lost:
        why += " (result_unavailable: most likely billed already)"
    return f"{why}; `batchd retry {job_id} --all` sends them"


def _retry_lines(job: JobInfo) -> list[str]:
    """What `show` says of a job's retries: the job it retries, what that retry left out
    (per code), the jobs that retry it, and where the merged results are."""
    lines = []
    if job.retry_of:
        lines.append(f"retry of {job.retry_of}")
    if job.retry_left_out:
        count = sum(job.retry_left_out.values())
        codes = ", ".join(f"{code} {n}" for code, n in sorted(job.retry_left_out.items()))
        lines.append(
            f"  {count} failure(s) of {job.retry_of} left out of this retry ({codes}):"
            f" {_left_out_why(job.retry_left_out, job.retry_of)}"
        )
    if job.retried_by:
        lines.append(f"retried by {', '.join(job.retried_by)}")
    if job.left_out:
        count = sum(job.left_out.values())
        codes = ", ".join(f"{code} {n}" for code, n in sorted(job.left_out.items()))
        lines.append(
            f"  {count} failure(s) left out of the retry ({codes}):"
            f" {_left_out_why(job.left_out, job.id)}"
        )
    if job.merged:
        lines.append(f"merged results (every answer, in the original order): {job.merged}")
    return lines


def _action(call: Callable[[Client, argparse.Namespace], ActionResponse]) -> Handler:
    @_guard
    def run(args: argparse.Namespace) -> int:
        result = call(_client(args), args)
        if args.json:
            _print_json(result)
        elif result.ok:
            print(result.message)
        if not result.ok:
            print(f"batchd {args.command}: {result.message}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    return run


def _without_args(
    call: Callable[[Client], ActionResponse],
) -> Callable[[Client, argparse.Namespace], ActionResponse]:
    return lambda client, _args: call(client)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answers and is healthy, 1 with the reason when it is not,
    3 when it does not answer (for monitoring; `--quiet` prints nothing)."""

    def say(text: str) -> None:
        if not args.quiet:
            print(f"batchd check: {text}", file=sys.stderr)

    try:
        body = _client(args).status()
    except Unreachable as exc:
        say(str(exc))
        return EXIT_UNREACHABLE
    except RequestFailed as exc:
        say(exc.message)
        return EXIT_FAILED
    if body.healthy:
        if not args.quiet:
            steps = "".join(
                f"; the wall clock stepped {step.seconds:+.1f} s at {_when(step.at)} UTC"
                for step in body.clock_steps
            )
            print(f"ok{steps}")
        return EXIT_OK
    fault = body.local_faults[0] if body.local_faults else None
    reason = (
        (
            f"{fault.key}: {fault.what} since {_when(fault.since)} UTC ({fault.detail});"
            f" pauses {fault.pauses}"
            if fault is not None
            else None
        )
        or (f"account paused: {body.account_paused}" if body.account_paused else None)
        or (f"the provider does not answer: {body.provider_down}" if body.provider_down else None)
        or (body.problems[0].note if body.problems else None)
        or "a stage has stopped"
    )
    say(f"unhealthy: {reason}")
    return EXIT_FAILED


@_guard
def cmd_watch(args: argparse.Namespace) -> int:
    """Live progress bars per job in flight, fed by the daemon's event stream."""
    from rich.progress import BarColumn, Progress, TaskID, TextColumn

    client = _client(args)
    listing = client.jobs(states=["claimed", "running", "publishing"], limit=1000)
    console = _console()
    if not listing.jobs:
        until = f" for {args.seconds:g} s" if args.seconds else " (Ctrl-C to stop)"
        console.print(f"no job is in flight; watching for new ones{until}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("{task.fields[note]}"),
        console=console,
    )
    bars: dict[str, TaskID] = {}
    totals: dict[str, int | None] = {}
    done_by_part: dict[str, dict[int, int]] = {}

    def show(job_id: str, done: int | None = None, note: str | None = None) -> None:
        total = totals.get(job_id)
        fields: dict[str, Any] = {}
        if note is not None:
            fields["note"] = note
        if done is None:
            done = int(progress.tasks[bars[job_id]].completed)
        fields["counts"] = f"{done}/{total if total is not None else '?'}"
        progress.update(bars[job_id], completed=done, total=total, **fields)

    def bar(job_id: str, name: str | None, total: int | None, note: str) -> None:
        if total is not None:
            totals[job_id] = total
        if job_id not in bars:
            label = f"{name or 'job'} ({job_id})"
            bars[job_id] = progress.add_task(label, total=total, counts="", note=note)
        show(job_id, note=note)

    for job in listing.jobs:
        bar(job.id, job.name, job.requests, job.state)
        show(job.id, done=job.completed + job.failed)
    with progress:
        for event in client.events(seconds=args.seconds or None):
            if not event.job_id:
                continue
            if event.type == "job":
                bar(event.job_id, event.name, event.requests, event.outcome or event.state or "")
            elif event.type == "part" and event.request_counts:
                bar(event.job_id, None, None, "running")
                counts = event.request_counts
                done_by_part.setdefault(event.job_id, {})[event.part or 0] = counts.get(
                    "completed", 0
                ) + counts.get("failed", 0)
                show(event.job_id, done=sum(done_by_part[event.job_id].values()))
    return EXIT_OK


EXIT_TIMEOUT = 4
# `submit --wait`: a job is held by a hold only an operator ends (printed with its note).
EXIT_HELD = 5


SIDECAR = ".meta.json"


def _cost_lines(job: JobInfo) -> list[str]:
    """PURE: show's lines on money: the worst case counted when planned, and once
    published the actual cost per model."""
    lines = []
    estimate = job.estimate or {}
    currency = str(estimate.get("currency") or "")
    for model, m in sorted((estimate.get("models") or {}).items()):
        lines.append(
            f"{model}: {m.get('input_tokens')} input tokens, output at most"
            f" {m.get('output_tokens_max')}; worst case {_money(m.get('cost_max'), currency)}"
        )
    if estimate:
        exact = "exact" if estimate.get("exact") else "approximate"
        lines.append(f"  (tokens counted by {', '.join(estimate.get('tokenizer') or [])}, {exact})")
    cost = job.cost or {}
    usage = (job.usage or {}).get("per_model") or {}
    for model, amount in sorted((cost.get("per_model") or {}).items()):
        used = usage.get(model) or {}
        lines.append(
            f"cost {model}: {_money(amount, str(cost.get('currency') or ''))}"
            f" ({used.get('prompt_tokens', 0)} in, {used.get('completion_tokens', 0)} out"
            f", {used.get('reasoning_tokens', 0)} reasoning)"
        )
    if cost:
        currency = str(cost.get("currency") or "")
        lines.append(f"cost in all: {_money(cost.get('amount'), currency)}")
        estimated = cost.get("estimated") if isinstance(cost.get("estimated"), dict) else {}
        requests = (estimated or {}).get("requests")
        if isinstance(requests, int) and requests:
            reasons = ", ".join(
                f"{why} {n}" for why, n in sorted(((estimated or {}).get("reasons") or {}).items())
            )
            lines.append(
                f"  of it {_money((estimated or {}).get('amount'), currency)} charged at worst"
                f" case for {requests} request(s) whose usage could not be used ({reasons}):"
                " see summary.json cost.estimated"
            )
    return lines


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a sidecar holds a JSON object")
    return data


def _submit_plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Each data file with the options given for it: `--meta FILE` or
    --model/--window/--priority (and --force), which `queue_file` lays over the file's
    own sidecar, NAME.meta.json beside it (named on the command line or not)."""
    told = {"model": args.model, "completion_window": args.window, "priority": args.priority}
    flags = {k: v for k, v in told.items() if v is not None}
    if args.meta is not None and flags:
        raise UsageError("--meta or --model/--window/--priority, not both")
    common = _read_meta(Path(args.meta)) if args.meta is not None else flags
    if args.force:
        common["allow_duplicate"] = True
    sidecars = [f for f in args.files if f.lower().endswith(SIDECAR)]
    plan = [(source, dict(common)) for source in args.files if source not in sidecars]
    stems = {Path(source).with_suffix("") for source, _ in plan}
    for lonely in sidecars:
        if Path(lonely[: -len(SIDECAR)]) not in stems:
            raise UsageError(
                f"{lonely}: a sidecar goes with its data file (NAME.jsonl or NAME.csv)"
            )
    return plan


def _refuse_ignored_names(
    plan: list[tuple[str, dict[str, Any]]], name: str | None, suffixes: list[str]
) -> None:
    """A job name the inbox would ignore (`~x`, `.x`) is a usage error: the file would
    wait there unclaimed for good."""
    for source, _ in plan:
        lower = Path(source).name.lower()
        suffix = next((x for x in suffixes if lower.endswith(x) and len(lower) > len(x)), None)
        if suffix is None:
            continue  # not an input: queue_file says so, for this file alone
        stem = name if name is not None else Path(source).name[: -len(suffix)]
        problem = inbox_name_problem(stem, suffix)
        if problem is not None:
            raise UsageError(f"{source}: {problem}")


def _storage_settings(args: argparse.Namespace) -> StorageSettings:
    """The object store's settings ([storage] and BATCHD_STORAGE__*), as `batchd run`
    reads them, for a bucket inbox."""
    from batchd.config import Settings

    return Settings.load(args.config).storage


def cmd_submit(args: argparse.Namespace) -> int:
    """Queue files in the inbox (sidecar first, each atomically) and print the job each
    became; with --wait, wait until every one is published."""
    plan = _submit_plan(args)
    if args.name and len(plan) > 1:
        raise UsageError("--name names one file's job; give one FILE")
    client = _client(args)
    try:
        status = client.status()
    except Unreachable as exc:
        if args.wait:
            print(f"batchd submit: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        status = None
    inbox: Path | BucketUrl
    if args.inbox:
        inbox = parse_location(args.inbox)
    elif status is not None:
        inbox = parse_location(status.inbox)
    else:
        inbox = inbox_location(root=args.root, config=args.config)
    if isinstance(inbox, Path) and not inbox.is_dir():
        raise UsageError(f"inbox {inbox} does not exist")
    storage = _storage_settings(args) if isinstance(inbox, BucketUrl) else None
    suffixes = status.input_suffixes if status is not None else [".jsonl", ".csv"]
    _refuse_ignored_names(plan, args.name, suffixes)
    queued: list[Queued] = []
    failed = 0
    for source, options in plan:
        try:
            queued.append(
                queue_input(
                    source,
                    inbox,
                    storage=storage,
                    name=args.name,
                    options=options,
                    suffixes=suffixes,
                )
            )
        except (ValueError, OSError) as exc:
            print(f"batchd submit: {source}: {exc}", file=sys.stderr)
            failed += 1
    if status is None:
        for q in queued:
            print(
                f"{q.source}: queued as {q.target}; no daemon answers on {client.path}, "
                "it is claimed when one starts"
            )
        if args.json:
            _print_json([{"file": str(q.source), "queued": str(q.target)} for q in queued])
        return EXIT_FAILED if failed else EXIT_OK
    try:
        return _claimed_and_waited(args, client, queued, failed)
    except Unreachable as exc:
        print(f"batchd submit: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RequestFailed as exc:
        print(f"batchd submit: {exc.message}", file=sys.stderr)
        return EXIT_FAILED


def _claimed_and_waited(
    args: argparse.Namespace, client: Client, queued: list[Queued], failed: int
) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    jobs: list[tuple[Queued, JobInfo]] = []
    for q in queued:
        try:
            job = client.claimed(q.submit_id, min(left() or 60.0, 60.0) if deadline else 60.0)
        except TimeoutError as exc:
            print(f"batchd submit: {q.source}: {exc}", file=sys.stderr)
            if args.wait:
                return EXIT_TIMEOUT
            failed += 1
            continue
        jobs.append((q, job))
        if not args.json:
            print(f"{q.source}: job {job.id} ({job.name}) {job.state}")
    code = EXIT_FAILED if failed else EXIT_OK
    if args.wait:
        ended: list[tuple[Queued, JobInfo]] = []
        held = False
        for q, job in jobs:

            def waiting(j: JobInfo, source: Path = q.source) -> None:
                if j.hold_ends_by_itself:
                    print(
                        f"{source}: job {j.id} held ({j.held}), waiting: {j.held_note}",
                        file=sys.stderr,
                    )

            try:
                final = client.wait(job.id, left(), on_held=waiting)
            except TimeoutError as exc:
                print(f"batchd submit: {exc}", file=sys.stderr)
                return EXIT_TIMEOUT
            ended.append((q, final))
            if final.state not in ENDED_STATES:
                # Held by a hold only an operator ends: said, and the next job waited for.
                held = True
                if not args.json:
                    print(f"{q.source}: job {final.id} held ({final.held}): {final.held_note}")
                continue
            if not args.json:
                print(f"{q.source}: job {final.id} {final.status or final.state}: {final.outbox}")
            if final.status != "completed":
                code = EXIT_FAILED
        jobs = ended
        if held:
            code = EXIT_HELD
    if args.json:
        _print_json(
            [
                {
                    "file": str(q.source),
                    "id": j.id,
                    "name": j.name,
                    "state": j.state,
                    "status": j.status,
                    "outbox": j.outbox,
                    "held": j.held,
                    "held_note": j.held_note,
                }
                for q, j in jobs
            ]
        )
    return code


def register(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, json: bool = True) -> None:
        p.add_argument("--config", type=Path, help="TOML configuration file")
        p.add_argument("--root", type=Path, help="the daemon's root, as given to `batchd run`")
        p.add_argument("--socket", type=Path, help="control socket (default from the config)")
        if json:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("status")
    common(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("jobs")
    common(p)
    p.add_argument("--state", help="comma-separated states (claimed, running, published, ...)")
    p.add_argument(
        "--status",
        help="comma-separated statuses of published jobs "
        "(completed, partial, failed, cancelled, expired, rejected)",
    )
    p.add_argument("--name", help="only jobs whose name contains this")
    many = p.add_mutually_exclusive_group()
    many.add_argument(
        "--limit",
        type=positive_int,
        help=f"at most N jobs (default: {DEFAULT_LIST}; with --json, every job)",
    )
    many.add_argument("--all", action="store_true", help="every job that matches")
    p.add_argument("--oldest", action="store_true", help="oldest first")
    p.set_defaults(handler=cmd_jobs)

    p = sub.add_parser("show")
    common(p)
    p.add_argument("job", help=JOB_HELP)
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("cancel")
    common(p)
    p.add_argument("job", help=JOB_HELP)
    p.set_defaults(handler=_action(lambda client, args: client.cancel(args.job)))
    p = sub.add_parser(
        "retry",
        description="Run again what failed or never ran. For a published job, its failed "
        "requests become a new input JOB-retry.jsonl; requests the service refused for their "
        "content or form (400 DataInspectionFailed, InvalidParameter...) are left out, "
        "counted per code, unless --all; requests whose results were lost (most likely "
        "billed already) are left out unless --force or --all. It says what the earlier "
        "attempt probably cost. Once the retry is published, the original job's folder "
        "holds merged/ with every answer in the original order.",
    )
    common(p)
    p.add_argument("job", help=JOB_HELP)
    p.add_argument(
        "--all",
        action="store_true",
        help="send every failure: the refused requests (they may fail, and cost, again) "
        "and those whose results were lost (most likely paid for already) too",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="send the requests whose results were lost too: the service most likely ran "
        "and billed them, so they are paid for again",
    )
    p.set_defaults(
        handler=_action(
            lambda client, args: client.retry(args.job, everything=args.all, force=args.force)
        )
    )
    for name, call in (
        ("pause", Client.pause),
        ("resume", Client.resume),
        ("drain", Client.drain),
    ):
        p = sub.add_parser(name)
        common(p)
        p.set_defaults(handler=_action(_without_args(call)))

    p = sub.add_parser("watch")
    common(p, json=False)
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser("check")
    common(p, json=False)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser(
        "submit",
        description="Queue files in the inbox and print the job each became. Exit codes: 0 "
        "ok (with --wait: every job completed), 1 a file was refused or (with --wait) a job "
        "ended otherwise (partial, failed, cancelled, expired, rejected), 2 usage error, "
        "3 the daemon is not reachable (with --wait; without, the files are queued for "
        "when it starts), 4 --timeout passed, 5 (with --wait) a job is held until an "
        "operator acts (a duplicate, a model without a price, larger than the whole "
        "budget): its hold and what ends it are printed. A hold that ends by itself "
        "(budget) is printed and waited out.",
    )
    common(p)
    p.add_argument(
        "--inbox", help="the inbox: a folder, or oss://B/P/ or s3://B/P/ (default: the daemon's)"
    )
    p.add_argument("--name", help="the job's name (one FILE only; default: the file's)")
    p.add_argument("--meta", type=Path, help="a JSON file of job options (the sidecar's)")
    p.add_argument("--model", help="model for a CSV input (sidecar option)")
    p.add_argument("--window", help="completion window, e.g. 24h or 7d (sidecar option)")
    p.add_argument("--priority", type=int, help="priority (sidecar option)")
    p.add_argument(
        "--force",
        action="store_true",
        help="run it even if the same input ran within jobs.duplicate_window (pays again)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="return when every job is published (or held until an operator acts: exit 5)",
    )
    p.add_argument(
        "--timeout", type=positive_seconds, help="give up waiting after S seconds (exit 4)"
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="JSONL or CSV files")
    p.set_defaults(handler=cmd_submit)
