"""Commands that work on input and result files, without the daemon.

- `batchd validate FILE...`: the daemon's verdict on each file (batchd.inputs.verdict: its
  sidecar, its options, its content); exit 0 when all are valid, 1 when any is not (a
  missing or unreadable file counts as not valid, with the rule `unreadable`), 2 on a
  usage error.
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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchd.cli.args import positive_int
from batchd.documents import JobOptions
from batchd.errors import UsageError
from batchd.inputs import csvio
from batchd.inputs.spool import SpoolFolder
from batchd.inputs.validate import InputProblem, Report, part_file_names, validate_file, write_parts
from batchd.inputs.verdict import Rules, judge, read_sidecar, sidecar_path
from batchd.provider.profiles import DEFAULT_PROVIDER, PROFILES, merge_limits

if TYPE_CHECKING:
    from batchd.config import Settings

EXIT_OK = 0
EXIT_FAILED = 1


def register(subparsers: Any) -> None:
    """Add validate, split, csv2jsonl and jsonl2csv to the `batchd` parser."""
    validate = subparsers.add_parser(
        "validate",
        description="Judge JSONL and CSV batch input files as the daemon with the same "
        "configuration would: the sidecar NAME.meta.json beside each, its options, then every "
        "line against the provider's rules and limits (a CSV converted as the daemon converts "
        "it). Problems print as `path:line: code: message`.",
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
    to_jsonl.add_argument(
        "--columns",
        metavar="ID,CONTENT",
        help="the header's names of the custom_id and content columns (default: "
        "custom_id,content; those are known too)",
    )
    to_jsonl.add_argument(
        "--encoding",
        default=csvio.DEFAULT_CSV_ENCODING,
        help="the CSV's text encoding (default: UTF-8 with or without a BOM; gb18030 reads"
        " GBK, Chinese Excel's CSV export)",
    )
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


def configured(args: argparse.Namespace) -> Settings | None:
    """The daemon's configuration when `--config` or a BATCHD_* variable gives one; None
    otherwise, without loading the configuration machinery (pydantic-settings): then
    `batchd validate` starts about as fast as Python does."""
    if args.config is None and not any(k.upper().startswith("BATCHD_") for k in os.environ):
        return None
    from batchd.config import Settings

    return Settings.load(args.config, provider=args.provider)


def rules_for(args: argparse.Namespace, settings: Settings | None = None) -> Rules:
    """The provider's limits and the job settings as the daemon with the same
    configuration applies them (batchd.inputs.verdict), with the command line's `--no-split`,
    `--group-by-model` and `--max-errors` over them."""
    if settings is None:
        settings = configured(args)
    if settings is None:
        provider = args.provider or DEFAULT_PROVIDER
        rules = Rules(limits=PROFILES[provider].limits, provider=provider)
    else:
        rules = Rules.of(settings)
    changed: dict[str, Any] = {}
    if getattr(args, "max_errors", None):
        changed["max_errors"] = args.max_errors
    if getattr(args, "no_split", None) is not None:
        changed["split"] = not args.no_split
    if getattr(args, "group_by_model", None) is not None:
        changed["group_by_model"] = args.group_by_model
    return replace(rules, **changed)


@contextmanager
def checked(path: Path, rules: Rules) -> Iterator[tuple[Report, Path | None]]:
    """The daemon's verdict on `path` (batchd.inputs.verdict): its sidecar NAME.meta.json, its
    options, its size, then its content; a CSV is converted as the daemon converts it,
    rows numbered as in the CSV. Also the JSONL file judged: the file itself, or the
    CSV's conversion (kept until the context ends); None when there is none. Not judged
    here: whether the daemon already ran the same file (a `duplicate` hold)."""
    kind = "csv" if path.name.lower().endswith(".csv") else "jsonl"
    options = JobOptions()
    if path.name.lower().endswith(f".{kind}"):
        options = read_sidecar(sidecar_path(path, kind)) or JobOptions()
    if kind == "jsonl":
        try:
            yield judge(path, kind, options, rules, path.parent), path
        except OSError as exc:
            yield _unreadable(path, exc), None
        return
    with tempfile.TemporaryDirectory(prefix="batchd-validate-") as tmp:
        try:
            report = judge(path, kind, options, rules, Path(tmp))
        except OSError as exc:
            yield _unreadable(path, exc), None
            return
        converted = SpoolFolder(Path(tmp)).requests
        yield report, converted if converted.is_file() else None


def _unreadable(path: Path, exc: OSError) -> Report:
    reason = exc.strerror or str(exc)
    return Report(
        path=str(path),
        errors=[InputProblem(None, "unreadable", f"cannot read the file: {reason}")],
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
    rules = rules_for(args)
    all_valid = True
    for path in args.files:
        with checked(path, rules) as (report, _):
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
    rules = rules_for(args)
    limits, max_reported = rules.limits, rules.max_errors
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
    columns = csvio.DEFAULT_COLUMNS
    if args.columns is not None:
        names = [name.strip() for name in args.columns.split(",")]
        if len(names) != 2 or not all(names) or names[0].lower() == names[1].lower():
            raise UsageError("--columns takes two different names: ID,CONTENT")
        columns = (names[0], names[1])
    try:
        result = csvio.csv_file_to_jsonl(
            args.source,
            target,
            model=args.model,
            endpoint=args.endpoint,
            system_prompt=args.system_prompt,
            encoding=args.encoding,
            columns=columns,
            encoding_flag="--encoding",
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
