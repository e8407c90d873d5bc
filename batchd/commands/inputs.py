"""Commands that work on input and result files, without the daemon.

- `batchd validate FILE...`: check files against the provider's rules; exit 0 when all
  are valid, 1 when any is not (a missing or unreadable file counts as not valid, with
  the rule `unreadable`), 2 on a usage error.
- `batchd split FILE --out DIR`: write the parts a file is planned into.
- `batchd csv2jsonl IN.csv [-o OUT.jsonl] --model M`: CSV rows to batch requests.
- `batchd jsonl2csv IN.jsonl [-o OUT.csv] [--raw-cells]`: results to the guide's CSV
  (Excel-ready: a cell that would run as a formula gets a leading `'` unless --raw-cells).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchd import csvio
from batchd.commands import positive_int
from batchd.errors import UsageError
from batchd.profiles import DEFAULT_PROVIDER, PROFILES, ProviderLimits, merge_limits
from batchd.validate import (
    DEFAULT_MAX_REPORTED_ERRORS,
    Problem,
    Report,
    part_file_names,
    validate_file,
    write_parts,
)

EXIT_OK = 0
EXIT_FAILED = 1


def register(subparsers: Any) -> None:
    """Add validate, split, csv2jsonl and jsonl2csv to the `batchd` parser."""
    validate = subparsers.add_parser(
        "validate",
        description="Check every line of JSONL batch input files against the provider's "
        "rules and limits. Problems print as `path:line: code: message`.",
    )
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument("--json", action="store_true", help="one JSON object per file")
    add_check_options(validate)
    validate.set_defaults(handler=run_validate)

    split = subparsers.add_parser(
        "split",
        description="Validate FILE and write its parts as NAME.part-001.jsonl, ... into "
        "DIR. Nothing is written when the file fits in one batch.",
    )
    split.add_argument("file", type=Path, metavar="FILE")
    split.add_argument("--out", "-o", type=Path, required=True, metavar="DIR")
    split.add_argument("--group-by-model", action="store_true", help="one part (or more) per model")
    split.add_argument(
        "--max-requests", type=positive_int, metavar="N", help="at most N requests per part"
    )
    split.add_argument(
        "--max-bytes", type=positive_int, metavar="N", help="at most N bytes per part"
    )
    split.add_argument("--fsync", action="store_true", help="fsync each part file")
    _add_config_options(split)
    split.set_defaults(handler=run_split)

    to_jsonl = subparsers.add_parser(
        "csv2jsonl",
        description="Each CSV row (custom_id, content; header optional; UTF-8 with or "
        "without BOM) becomes one request. The output is written only if every row is good.",
    )
    to_jsonl.add_argument("source", type=Path, metavar="IN.csv")
    to_jsonl.add_argument("-o", "--output", type=Path, metavar="OUT.jsonl")
    to_jsonl.add_argument("--model", required=True)
    to_jsonl.add_argument(
        "--endpoint",
        help="url of every request (default: from the model: /v1/embeddings for "
        "embedding models, /v1/chat/ds-test for batch-test-model, else /v1/chat/completions)",
    )
    to_jsonl.add_argument("--system-prompt", help="a system message before each content")
    to_jsonl.add_argument("--encoding", default="utf-8-sig", help="CSV encoding (e.g. gbk)")
    to_jsonl.set_defaults(handler=run_csv2jsonl)

    to_csv = subparsers.add_parser(
        "jsonl2csv",
        description="Columns: " + ", ".join(csvio.RESULT_COLUMNS) + ". UTF-8 with a BOM "
        "so that Excel shows non-ASCII text.",
    )
    to_csv.add_argument("source", type=Path, metavar="IN.jsonl")
    to_csv.add_argument("-o", "--output", type=Path, metavar="OUT.csv")
    to_csv.add_argument(
        "--raw-cells",
        action="store_true",
        help="write cells as they are; by default a cell that a spreadsheet would run as a "
        "formula (starting with =, +, -, @, a tab or a carriage return) gets a leading '",
    )
    to_csv.set_defaults(handler=run_jsonl2csv)


def add_check_options(parser: argparse.ArgumentParser) -> None:
    """The options of `batchd validate` that decide how files are checked (shared with
    `batchd estimate`, which checks them the same way)."""
    _add_config_options(parser)
    parser.add_argument(
        "--no-split",
        action="store_true",
        default=None,
        help="a file over the request or byte limit is an error instead of planned into parts",
    )
    parser.add_argument(
        "--group-by-model",
        action="store_true",
        default=None,
        help="accept mixed models, one part per model (default: jobs.group_by_model)",
    )
    parser.add_argument(
        "--max-errors",
        type=positive_int,
        metavar="N",
        help="list at most N problems per file (default: max_reported_errors)",
    )


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="batchd TOML configuration")
    parser.add_argument(
        "--provider",
        choices=("dashscope", "dashscope-intl", "openai", "custom"),
        help="provider profile whose limits apply (default: from the configuration)",
    )


@dataclass(frozen=True)
class Checking:
    """How the daemon with the same configuration would check a file."""

    limits: ProviderLimits
    max_errors: int = DEFAULT_MAX_REPORTED_ERRORS
    split: bool = True
    group_by_model: bool = False
    csv_model: str | None = None
    csv_system_prompt: str | None = None
    provider: str = DEFAULT_PROVIDER
    # The daemon's state folder (its database), known when a configuration was read.
    state_dir: Path | None = None


def checking_for(args: argparse.Namespace) -> Checking:
    """The provider's limits and the job settings (`split`, `group_by_model`, the CSV
    defaults), as the daemon with the same configuration applies them. With no
    configuration file and no BATCHD_* variable they are the defaults, known without
    loading the daemon's configuration (pydantic-settings): `batchd validate` starts
    about as fast as Python does."""
    if args.config is None and not any(k.upper().startswith("BATCHD_") for k in os.environ):
        provider = args.provider or DEFAULT_PROVIDER
        return Checking(PROFILES[provider].limits, provider=provider)
    from batchd.config import Settings

    settings = Settings.load(args.config, provider=args.provider)
    jobs = settings.jobs
    return Checking(
        settings.profile.limits,
        settings.max_reported_errors,
        jobs.split,
        jobs.group_by_model,
        jobs.csv_model,
        jobs.csv_system_prompt,
        settings.provider,
        settings.paths.folder("state"),
    )


@dataclass(frozen=True)
class CheckOptions:
    """`split`, `group_by_model` and `max_errors` as the command line and configuration
    set them."""

    split: bool
    group: bool
    max_errors: int


def check_options(args: argparse.Namespace, checking: Checking) -> CheckOptions:
    """The options of `add_check_options`, defaulting to the configuration's."""
    return CheckOptions(
        checking.split if args.no_split is None else not args.no_split,
        checking.group_by_model if args.group_by_model is None else args.group_by_model,
        args.max_errors or checking.max_errors,
    )


@contextmanager
def checked(
    path: Path, checking: Checking, options: CheckOptions
) -> Iterator[tuple[Report, Path | None]]:
    """The verdict on one input file as the daemon would give it, and the JSONL file it
    judged: the file itself, or a CSV's conversion (kept until the context ends); None
    when there is none (an unreadable file, a CSV that did not convert)."""
    split, group, max_errors = options.split, options.group, options.max_errors
    if path.name.lower().endswith(".csv"):
        with tempfile.TemporaryDirectory(prefix="batchd-validate-") as tmp:
            try:
                report, jsonl = _validate_csv(path, checking, split, group, max_errors, Path(tmp))
            except OSError as exc:
                report, jsonl = _unreadable(path, exc), None
            yield report, jsonl
        return
    try:
        report = validate_file(
            path, checking.limits, split=split, group_by_model=group, max_errors=max_errors
        )
    except OSError as exc:
        yield _unreadable(path, exc), None
        return
    yield report, path


def _validate_csv(
    path: Path, checking: Checking, split: bool, group: bool, max_errors: int, folder: Path
) -> tuple[Report, Path | None]:
    """A CSV input checked as the daemon does: converted (into `folder`) with the model
    of its sidecar (NAME.meta.json beside it) or `jobs.csv_model`, then validated; rows
    are numbered as in the CSV. Returns the report and the conversion, if any."""
    options: dict[str, Any] = {}
    sidecar = path.with_name(path.name[: -len(".csv")] + ".meta.json")
    if sidecar.is_file():
        from batchd.intake import SIDECAR_ERROR, sidecar_options

        options = sidecar_options(sidecar.name, sidecar.read_bytes())
        if SIDECAR_ERROR in options:
            return Report(
                path=str(path),
                errors=[Problem(None, "sidecar_invalid", str(options[SIDECAR_ERROR]))],
                error_count=1,
            ), None
    model = options.get("model") or checking.csv_model
    if not isinstance(model, str) or not model:
        message = 'a CSV input needs a model: set jobs.csv_model or "model" in NAME.meta.json'
        return Report(
            path=str(path), errors=[Problem(None, "csv_needs_model", message)], error_count=1
        ), None
    prompt = options.get("system_prompt") or checking.csv_system_prompt
    converted = folder / "input.jsonl"
    conversion = csvio.csv_file_to_jsonl(
        path,
        converted,
        model=model,
        system_prompt=prompt if isinstance(prompt, str) else None,
        max_errors=max_errors,
    )
    if not conversion.ok:
        return Report(
            path=str(path), errors=list(conversion.errors), error_count=conversion.error_count
        ), None
    report = validate_file(
        converted, checking.limits, split=split, group_by_model=group, max_errors=max_errors
    )
    report.path = str(path)
    return report, converted


def _unreadable(path: Path, exc: OSError) -> Report:
    reason = exc.strerror or str(exc)
    return Report(
        path=str(path),
        errors=[Problem(None, "unreadable", f"cannot read the file: {reason}")],
        error_count=1,
    )


def summary(report: Report) -> str:
    if not report.valid:
        return f"{report.path}: invalid, {report.error_count} problem(s)"
    models = ", ".join(report.models)
    endpoints = ", ".join(report.endpoints)
    parts = len(report.parts)
    plan = "1 batch" if parts == 1 else f"{parts} parts"
    return (
        f"{report.path}: ok, {report.requests} requests, {report.bytes} bytes, "
        f"model {models}, url {endpoints}, {plan}"
    )


def run_validate(args: argparse.Namespace) -> int:
    """`batchd validate`: exit 0 if every file is valid, 1 if any is not."""
    checking = checking_for(args)
    options = check_options(args, checking)
    all_valid = True
    for path in args.files:
        with checked(path, checking, options) as (report, _):
            all_valid = all_valid and report.valid
        if args.json:
            sys.stdout.write(orjson.dumps(report.to_dict()).decode() + "\n")
        else:
            for line in report.render():
                print(line)
            print(summary(report))
    return EXIT_OK if all_valid else EXIT_FAILED


def run_split(args: argparse.Namespace) -> int:
    """`batchd split`: validate, then write the planned parts (if more than one)."""
    checking = checking_for(args)
    limits, max_reported = checking.limits, checking.max_errors
    overrides = {
        key: value
        for key, value in (
            ("max_requests_per_file", args.max_requests),
            ("max_file_bytes", args.max_bytes),
        )
        if value is not None
    }
    if overrides:
        limits = merge_limits(limits, overrides)
    try:
        report = validate_file(
            args.file,
            limits,
            group_by_model=args.group_by_model,
            max_errors=max_reported,
        )
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    if not report.valid:
        for line in report.render():
            print(line)
        print(summary(report))
        return EXIT_FAILED
    written = write_parts(report, args.file, args.out, fsync=args.fsync)
    if not written:
        print(f"{args.file}: fits in one batch ({report.requests} requests); nothing written")
        return EXIT_OK
    names = part_file_names(args.file, len(report.parts))
    for part, name in zip(report.parts, names, strict=True):
        print(
            f"{args.out / name}: lines {part.first_line}-{part.last_line}, "
            f"{part.requests} requests, {part.bytes} bytes, model {part.model}"
        )
    return EXIT_OK


def _report_conversion(source: Path, result: csvio.Conversion, target: Path) -> int:
    for problem in result.errors:
        print(problem.render(str(source)), file=sys.stderr)
    hidden = result.error_count - len(result.errors)
    if hidden > 0:
        print(f"{source}: ... and {hidden} more problems not listed", file=sys.stderr)
    if not result.ok:
        print(f"{source}: {result.error_count} problem(s); {target} not written", file=sys.stderr)
        return EXIT_FAILED
    print(f"{target}: {result.rows} rows")
    return EXIT_OK


def run_csv2jsonl(args: argparse.Namespace) -> int:
    """`batchd csv2jsonl`: rows of custom_id,content to a JSONL batch input file."""
    target = args.output or args.source.with_suffix(".jsonl")
    if target.resolve() == args.source.resolve():
        raise UsageError("the output would overwrite the input; name it with -o")
    if not args.source.is_file():
        raise UsageError(f"{args.source} is not a readable file")
    try:
        result = csvio.csv_file_to_jsonl(
            args.source,
            target,
            model=args.model,
            endpoint=args.endpoint,
            system_prompt=args.system_prompt,
            encoding=args.encoding,
        )
    except (ValueError, LookupError) as exc:
        raise UsageError(str(exc)) from None
    return _report_conversion(args.source, result, target)


def run_jsonl2csv(args: argparse.Namespace) -> int:
    """`batchd jsonl2csv`: a result JSONL file to CSV with the guide's columns."""
    target = args.output or args.source.with_suffix(".csv")
    if target.resolve() == args.source.resolve():
        raise UsageError("the output would overwrite the input; name it with -o")
    if not args.source.is_file():
        raise UsageError(f"{args.source} is not a readable file")
    result = csvio.jsonl_file_to_csv(args.source, target, safe_cells=not args.raw_cells)
    return _report_conversion(args.source, result, target)
