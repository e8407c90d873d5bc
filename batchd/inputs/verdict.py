"""One verdict on an input file, the same in `batchd validate` and in the daemon.

The daemon's prepare stage and the `validate` command both judge a file here, with the
same rules (`Rules`: the provider's limits and the job settings of one configuration),
in the same order:

1. Its sidecar `NAME.meta.json` (`read_sidecar`, `sidecar_options`): used whole or not at
   all; bad JSON, an unknown key or a bad value rejects the file (`sidecar_invalid`).
2. Its options (`option_problem`): a completion window outside the provider's range
   (`completion_window_invalid`).
3. What is decided without reading it (`refuse_unread`): over `jobs.max_input_bytes`
   (`input_too_large`), or sparse (`sparse_file`).
4. A CSV is converted as the daemon converts it (`csvio.csv_source`: the sidecar's model,
   system prompt, columns and encoding over `jobs.csv_model`, `jobs.csv_system_prompt`,
   `jobs.csv_columns`, `jobs.csv_encoding`), then every request line is validated
   (`validate.validate_file`, with `jobs.split` and `jobs.group_by_model`).

What only the daemon can judge is left to it: an input identical to one it already runs
or ran (`duplicate_input`) and an input that keeps changing while it is read.

Light on purpose (no pydantic, no store): `batchd validate` without a configuration file
starts about as fast as Python does; `Rules.of(settings)` reads a loaded configuration.
"""

from __future__ import annotations

import difflib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from batchd.documents import JobOptions, given
from batchd.failpoints import failpoint
from batchd.inputs import csvio
from batchd.inputs.inbox import SIDECAR_SUFFIX
from batchd.inputs.spool import SpoolFolder
from batchd.inputs.validate import DEFAULT_MAX_REPORTED_ERRORS, InputProblem, Report, validate_file
from batchd.models import completion_hours
from batchd.provider.profiles import DEFAULT_PROVIDER, GB, PROFILES, ProviderLimits

if TYPE_CHECKING:
    from batchd.config import Settings

# -- the sidecar ------------------------------------------------------------------------

MAX_SIDECAR_BYTES = 64 * 1024
SIDECAR_KEYS = frozenset(
    {
        "completion_window",
        "ds_name",
        "ds_description",
        "model",
        "system_prompt",
        # A CSV input's header names: {"custom_id": "id", "content": "text"}.
        "columns",
        # A CSV input's text encoding ("gb18030" for Chinese Excel's CSV export).
        "encoding",
        "priority",
        # `batchd submit`'s token: how it finds the job its file became.
        "submit_id",
        # Run an input identical to one already run (and pay for it again).
        "allow_duplicate",
        # The job a `batchd retry` input retries (summary.json links the two), and the
        # failures of that job the retry left out (refused for their content), per code.
        "retry_of",
        "retry_left_out",
        # The most this job may cost (worst case, in the price table's currency).
        "max_cost",
    }
)
# Keys batchd writes for itself, not listed to users as known keys.
_OWN_KEYS = frozenset({"submit_id", "retry_left_out"})
# The option that carries why a sidecar cannot be used.
SIDECAR_ERROR = "sidecar_error"

# Defaults of the job settings (batchd.config.JobSettings and IntakeSettings hold the same;
# tests/unit/test_config.py checks that they agree).
DEFAULT_COMPLETION_WINDOW = "24h"
DEFAULT_MAX_INPUT_BYTES = 50 * GB
# A file this large or larger is sparse when it holds fewer than 1/SPARSE_RATIO of its
# size in blocks: holes, not text. (JSON text compresses less than 16x.)
SPARSE_MIN_BYTES = 64 * 1024 * 1024
SPARSE_RATIO = 16


def _error(why: str) -> JobOptions:
    return JobOptions(sidecar_error=why)


def sidecar_options(name: str, raw: bytes) -> JobOptions:
    """PURE: a sidecar's options, or `{SIDECAR_ERROR: why}` naming the file and the key
    (with the known keys, and the closest one to a misspelt key) or the bad value."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _error(f"{name}: not JSON: {exc}")
    if not isinstance(data, dict):
        return _error(f"{name}: not a JSON object")
    unknown = sorted(set(data) - SIDECAR_KEYS)
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)
            for key in unknown
            for close in [difflib.get_close_matches(key, sorted(SIDECAR_KEYS), 1)]
        ]
        known = ", ".join(sorted(SIDECAR_KEYS - _OWN_KEYS))
        return _error(f"{name}: unknown key {', '.join(hints)}; known keys: {known}")
    if "columns" in data and (problem := columns_problem(data["columns"])) is not None:
        return _error(f"{name}: columns: {problem}")
    if "encoding" in data and (problem := csvio.encoding_problem(data["encoding"])) is not None:
        return _error(f"{name}: encoding: {problem}")
    return msgspec.convert(data, JobOptions)


def columns_problem(value: Any) -> str | None:
    """PURE: why a CSV column mapping (the sidecar's `columns`) cannot be used, or None:
    it must name, with two different non-empty texts, the columns custom_id and content."""
    if not isinstance(value, dict) or set(value) != {"custom_id", "content"}:
        return 'must be {"custom_id": "<header name>", "content": "<header name>"}'
    names = [value["custom_id"], value["content"]]
    if not all(isinstance(n, str) and n.strip() for n in names):
        return "the header names must be non-empty texts"
    if names[0].strip().lower() == names[1].strip().lower():
        return "custom_id and content must be different columns"
    return None


def read_sidecar(
    path: Path, shown: str | None = None, *, owner: int | None = None
) -> JobOptions | None:
    """The options of the sidecar at `path` (None when there is none), read as the
    intake reads it: never through a symlink, never blocking on a FIFO, a small regular
    file only. `shown` is the name its problems are told under. With `owner` (the uid
    of its input), a sidecar another user owns is refused (`owner_problem`)."""
    shown = shown or path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIDECAR_BYTES:
            return _error(f"{shown}: not a small regular file")
        if owner is not None and (problem := owner_problem(st.st_uid, owner)) is not None:
            return _error(f"{shown}: {problem}")
        raw = os.read(fd, MAX_SIDECAR_BYTES + 1)
    finally:
        os.close(fd)
    return sidecar_options(shown, raw)


def owner_problem(sidecar_uid: int, input_uid: int, daemon_uid: int | None = None) -> str | None:
    """PURE but for user names: why a sidecar owned by `sidecar_uid` may not set the
    options of an input owned by `input_uid`, or None. The inbox is writable by the
    whole drop group: a sidecar counts only when the input's owner wrote it, or root,
    or the daemon's own user (`daemon_uid`, this process's by default)."""
    daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
    if sidecar_uid in (input_uid, 0, daemon_uid):
        return None
    return (
        f"owned by {user_name(sidecar_uid)} while its input is owned by"
        f" {user_name(input_uid)}: a sidecar sets a job's options only when the input's"
        " owner (or root, or batchd) wrote it"
    )


def user_name(uid: int) -> str:
    """`name (uid N)`, or `uid N` for a uid with no name."""
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def sidecar_path(path: Path, kind: str) -> Path:
    """PURE: where the sidecar of the input `path` of this kind is (`NAME.meta.json`)."""
    return path.with_name(path.name[: -(len(kind) + 1)] + SIDECAR_SUFFIX)


# -- the rules --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rules:
    """What a verdict depends on: one configuration's provider limits and job settings.
    The defaults are batchd's with no configuration (`Rules.of(Settings())` equals
    `Rules()`)."""

    limits: ProviderLimits = PROFILES[DEFAULT_PROVIDER].limits
    provider: str = DEFAULT_PROVIDER
    completion_window: str = DEFAULT_COMPLETION_WINDOW
    split: bool = True
    group_by_model: bool = False
    csv_model: str | None = None
    csv_system_prompt: str | None = None
    csv_columns: tuple[str, str] = csvio.DEFAULT_COLUMNS
    csv_encoding: str = csvio.DEFAULT_CSV_ENCODING
    max_errors: int = DEFAULT_MAX_REPORTED_ERRORS
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    reject_sparse: bool = True

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        jobs = settings.jobs
        profile = settings.profile
        return cls(
            limits=profile.limits,
            provider=profile.name,
            completion_window=jobs.completion_window,
            split=jobs.split,
            group_by_model=jobs.group_by_model,
            csv_model=jobs.csv_model,
            csv_system_prompt=jobs.csv_system_prompt,
            csv_columns=jobs.csv_columns.names,
            csv_encoding=jobs.csv_encoding,
            max_errors=settings.max_reported_errors,
            max_input_bytes=jobs.max_input_bytes,
            reject_sparse=settings.intake.reject_sparse,
        )


def option_problem(options: JobOptions, rules: Rules) -> InputProblem | None:
    """PURE: why a file's options (its sidecar, or the defaults) cannot be run as they
    are, or None. Checked before anything is read or sent: a sidecar with a misspelt
    key, or a completion window the provider refuses, would otherwise run with other
    options than meant, or fail only once paid-for uploads are made."""
    if options.sidecar_error:
        return InputProblem(None, "sidecar_invalid", options.sidecar_error)
    own_cap = given(options.max_cost)
    if own_cap is not None and (
        not isinstance(own_cap, int | float) or isinstance(own_cap, bool) or own_cap <= 0
    ):
        return InputProblem(None, "sidecar_invalid", f"max_cost {own_cap!r}: not a positive amount")
    window = given(options.completion_window) or rules.completion_window
    lowest, highest = rules.limits.min_completion_window_h, rules.limits.max_completion_window_h
    hours = completion_hours(window)
    if hours is None or not lowest <= hours <= highest:
        told = "the sidecar's" if given(options.completion_window) else "jobs."
        return InputProblem(
            None,
            "completion_window_invalid",
            f"completion_window {window!r} ({told}completion_window): "
            f"{rules.provider} takes {lowest}h to {highest}h, as NNh or NNd (e.g. {lowest}h)",
        )
    return None


def is_sparse(st: os.stat_result) -> bool:
    """PURE: far fewer blocks on disk than the size says (st_blocks are 512 bytes)."""
    return st.st_size >= SPARSE_MIN_BYTES and st.st_blocks * 512 * SPARSE_RATIO < st.st_size


def refuse_unread(st: os.stat_result, rules: Rules) -> InputProblem | None:
    """PURE: why an input must not even be read, or None."""
    limit = rules.max_input_bytes
    if st.st_size > limit:
        return InputProblem(
            None,
            "input_too_large",
            f"the file is {st.st_size} bytes, over jobs.max_input_bytes ({limit}); it was not read",
        )
    if rules.reject_sparse and is_sparse(st):
        return InputProblem(
            None,
            "sparse_file",
            f"the file is sparse ({st.st_size} bytes with {st.st_blocks * 512} on disk):"
            " holes, not text; it was not read (intake.reject_sparse = false allows it on"
            " compressing filesystems)",
        )
    return None


# -- the verdict ------------------------------------------------------------------------


def refused(path: str, problem: InputProblem, total: int | None = None) -> Report:
    """PURE: the report of a file refused for one problem (or several, counted)."""
    return Report(path=path, errors=[problem], error_count=total or 1)


def convert_csv(source: Path, target: Path, options: JobOptions, rules: Rules) -> Report | None:
    """Convert the CSV input `source` into the JSONL file `target` as the daemon does;
    the report of its rejection, or None when it converted."""
    plan = csvio.csv_source(
        options,
        model=rules.csv_model,
        system_prompt=rules.csv_system_prompt,
        columns=rules.csv_columns,
        encoding=rules.csv_encoding,
    )
    if isinstance(plan, InputProblem):
        return refused(str(source), plan)
    conversion = csvio.csv_file_to_jsonl(
        source,
        target,
        model=plan.model,
        system_prompt=plan.system_prompt,
        encoding=plan.encoding,
        max_errors=rules.max_errors,
        columns=plan.columns,
    )
    if conversion.ok:
        return None
    return Report(
        path=str(source), errors=list(conversion.errors), error_count=conversion.error_count
    )


def judge_unread(options: JobOptions, st: os.stat_result, rules: Rules) -> InputProblem | None:
    """PURE: why a file is refused before a byte of it is read (steps 2 and 3 of the
    module's docstring), or None."""
    return option_problem(options, rules) or refuse_unread(st, rules)


def judge_content(
    path: Path,
    kind: str,
    options: JobOptions,
    rules: Rules,
    work: Path,
    subject: str | None = None,
    *,
    requests_digest: bool = False,
) -> Report:
    """Read and judge the input `path` (`kind`: "jsonl" or "csv"): a CSV is converted
    into `work/input.jsonl` (a folder the caller owns), then every request is validated
    and the file planned into parts (step 4). `subject` names the input to fail points;
    `requests_digest` asks for `Report.requests_sha256` (of a CSV: its requests as
    converted)."""
    jsonl = path
    if kind == "csv":
        jsonl = SpoolFolder(work).requests
        rejection = convert_csv(path, jsonl, options, rules)
        if rejection is not None:
            return rejection
    failpoint("prepare.before_validate", subject or path.name)
    report = validate_file(
        jsonl,
        rules.limits,
        split=rules.split,
        group_by_model=rules.group_by_model,
        max_errors=rules.max_errors,
        requests_digest=requests_digest,
    )
    report.path = str(path)
    return report


def judge(path: Path, kind: str, options: JobOptions, rules: Rules, work: Path) -> Report:
    """The verdict on the input `path` with its `options` (its sidecar's), as the daemon
    gives it, but for what only the daemon knows (see the module's docstring)."""
    problem = judge_unread(options, os.stat(path), rules)
    if problem is not None:
        return refused(str(path), problem)
    return judge_content(path, kind, options, rules, work)
