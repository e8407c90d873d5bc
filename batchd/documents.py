"""The documents that cross stages and reach users, as typed structs (msgspec, as the
control protocol is): a job's options, its validation report, what it cost, its token
usage, and the outbox's `summary.json`.

`summary.json` is the outbox's contract with its readers: its schema is versioned
(`version`, `SUMMARY_VERSION`) and documented field by field in docs/folders.md
("summary.json, field by field"), which a test keeps in step with `Summary`. A change a
reader could trip on (a field removed, renamed or of another type) takes a new version;
a field added keeps it. Written with `encode_summary` (the same JSON as before it had a
type: indented, keys in this order), read back with `decode_summary`.

Free JSON stays free where it is a user's or the service's own: a sidecar's options, the
service's batch errors, a line as the service sent it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import orjson

# The version of summary.json's schema this batchd writes.
SUMMARY_VERSION = 1

# A JSON value whose shape someone else fixes (the service, a user): kept as sent.
FreeJson = Any
# A JSON object on the wire or in a user's file, whose keys the service or the user fix: a
# request line and its body, a result line, an answer of the Batch API. Read with care
# (never trusted to have a key or a type), never a document of batchd's own, which is a
# struct here.
JsonObject = dict[str, Any]

T = TypeVar("T")


class JobOptions(msgspec.Struct, kw_only=True):
    """A job's options: its sidecar's (`inputs.verdict.SIDECAR_KEYS`, checked there) and
    what batchd adds for itself (`submit_id`, the `batchd retry` links, `sidecar_error`).

    Stored as the job's `options` column and in its spool record, written as a retry's
    sidecar. A key the sidecar did not give is UNSET, and is not written: a key given as
    null stays null, so the JSON is the one read (in this field order). The values a user
    writes and nothing checks (`priority`, `model`, ...) are free JSON, as they always
    were (`option_problem` judges `max_cost` and `completion_window`); `columns` and
    `encoding` are checked when the sidecar is read. An unknown key is ignored on decode.
    """

    completion_window: FreeJson | msgspec.UnsetType = msgspec.UNSET
    ds_name: FreeJson | msgspec.UnsetType = msgspec.UNSET
    ds_description: FreeJson | msgspec.UnsetType = msgspec.UNSET
    model: FreeJson | msgspec.UnsetType = msgspec.UNSET
    system_prompt: FreeJson | msgspec.UnsetType = msgspec.UNSET
    # A CSV input's header names: {"custom_id": "id", "content": "text"}.
    columns: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    # A CSV input's text encoding ("gb18030" for Chinese Excel's CSV export).
    encoding: str | msgspec.UnsetType = msgspec.UNSET
    priority: FreeJson | msgspec.UnsetType = msgspec.UNSET
    # `batchd submit`'s token: how it finds the job its file became.
    submit_id: FreeJson | msgspec.UnsetType = msgspec.UNSET
    # Run an input identical to one already run (and pay for it again) when `True`.
    allow_duplicate: FreeJson | msgspec.UnsetType = msgspec.UNSET
    # The job a `batchd retry` input retries, and the failures of that job the retry left
    # out (refused for their content), per code.
    retry_of: FreeJson | msgspec.UnsetType = msgspec.UNSET
    retry_left_out: FreeJson | msgspec.UnsetType = msgspec.UNSET
    # The most this job may cost (worst case, in the price table's currency).
    max_cost: FreeJson | msgspec.UnsetType = msgspec.UNSET
    # Why its sidecar cannot be used (then the only option): the prepare stage rejects it.
    sidecar_error: str | msgspec.UnsetType = msgspec.UNSET


def given(value: T | msgspec.UnsetType) -> T | None:
    """An option's value, None when it was not given (as `dict.get` said)."""
    return None if value is msgspec.UNSET else value


def decode_options(value: object) -> JobOptions:
    """A job's options as stored (a column's JSON text or the object it holds; none is
    no options); raises `msgspec.ValidationError` (a `ValueError`) when it is not one."""
    if value is None:
        return JobOptions()
    if isinstance(value, str | bytes):
        return msgspec.json.decode(value, type=JobOptions)
    return msgspec.convert(value, JobOptions)


def encode_options(options: JobOptions) -> bytes:
    """A job's options as stored: a JSON object of the keys given."""
    return msgspec.json.encode(options)


class ReportProblem(msgspec.Struct, kw_only=True):
    """One broken rule of an input (`validate.InputProblem`): `line` None for the file."""

    line: int | None = None
    code: str = ""
    message: str = ""


class ReportPart(msgspec.Struct, kw_only=True):
    """One planned part of a valid input: its lines and their bytes in the input."""

    index: int = 0
    model: str | None = None
    endpoint: str | None = None
    first_line: int = 0
    last_line: int = 0
    requests: int = 0
    bytes: int = 0
    start: int = 0
    end: int = 0


class ModelEstimate(msgspec.Struct, kw_only=True):
    """One model's counted tokens and worst case (None: the model has no price)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens_max: int = 0
    cost_max: int | float | None = 0.0
    thinking_unset: int = 0


class Estimate(msgspec.Struct, kw_only=True):
    """A valid input's counted tokens and worst case, in all and per model."""

    tokenizer: list[str] = msgspec.field(default_factory=list)
    exact: bool = True
    currency: str = ""
    cost_max: int | float | None = None
    models: dict[str, ModelEstimate] = msgspec.field(default_factory=dict)


class JobReport(msgspec.Struct, kw_only=True):
    """A job's validation report, as stored (the job's `report` column), written to the
    outbox as report.json and shown by `show --json`: `validate.Report`'s verdict without
    the parts' byte ranges, with the `estimate` of a valid input. A rejection batchd
    decides by itself (a refusal before reading, a budget) has only the path, the counts
    and its one problem: the fields it does not have are UNSET and not written."""

    path: str = ""
    # A report without the key counts as valid, as it always did.
    valid: bool = True
    requests: int = 0
    bytes: int = 0
    model: str | msgspec.UnsetType | None = msgspec.UNSET
    models: list[str] | msgspec.UnsetType = msgspec.UNSET
    endpoint: str | msgspec.UnsetType | None = msgspec.UNSET
    parts: list[ReportPart] = msgspec.field(default_factory=list)
    errors: list[ReportProblem] = msgspec.field(default_factory=list)
    error_count: int = 0
    warnings: list[ReportProblem] | msgspec.UnsetType = msgspec.UNSET
    estimate: Estimate | msgspec.UnsetType = msgspec.UNSET


def decode_report(value: object) -> JobReport | None:
    """A job's recorded report (from its row), or None when it has none."""
    return None if value is None else msgspec.convert(value, JobReport)


class ModelUsage(msgspec.Struct, kw_only=True):
    """One model's token usage: the requests whose usage was counted, and its sum."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0


class TokenUsage(msgspec.Struct, kw_only=True):
    """A job's token usage, summed from the result lines that parse, in all and per model."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    per_model: dict[str, ModelUsage] = msgspec.field(default_factory=dict)


class EstimatedCost(msgspec.Struct, kw_only=True):
    """The requests charged their worst case: how much, how many, why, the first few."""

    amount: float = 0.0
    requests: int = 0
    per_model: dict[str, int] = msgspec.field(default_factory=dict)
    reasons: dict[str, int] = msgspec.field(default_factory=dict)
    lines: list[FreeJson] = msgspec.field(default_factory=list)
    unavailable_parts: list[FreeJson] = msgspec.field(default_factory=list)
    why: str | None = None


class Cost(msgspec.Struct, kw_only=True):
    """What a job's requests cost at batch prices (see docs/costs.md)."""

    amount: float | None = None
    currency: str = ""
    per_model: dict[str, float | None] = msgspec.field(default_factory=dict)
    unknown_models: list[str] = msgspec.field(default_factory=list)
    known_amount: float = 0.0
    from_usage: float = 0.0
    estimated: EstimatedCost = msgspec.field(default_factory=EstimatedCost)


class Follows(msgspec.Struct, kw_only=True):
    """The earlier folder of a name a numbered folder (`NAME-N`) follows."""

    folder: str
    job_id: str | None


class InputOf(msgspec.Struct, kw_only=True):
    """The input a job was claimed from."""

    name: str
    name_hex: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    kind: str = "jsonl"


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class LateSidecar(msgspec.Struct, kw_only=True):
    kept_as: str
    note: str


class JobError(msgspec.Struct, kw_only=True):
    """What failed a job as a whole: `batches` for failed batches, `report` for a
    rejected input (each only then)."""

    code: str
    message: str
    batches: list[FreeJson] | msgspec.UnsetType = msgspec.UNSET
    report: str | msgspec.UnsetType = msgspec.UNSET


class PartOf(msgspec.Struct, kw_only=True):
    """One part of a job: its batch, files, status and counts as last seen."""

    seq: int
    round: int
    requests: int
    model: str | None
    endpoint: str | None
    state: str
    batch_id: str | None
    status: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    request_counts: dict[str, int] | None
    errors: FreeJson
    unavailable: dict[str, str] | None
    kept_on_service: list[str]
    note: str | None
    provider_times: dict[str, str | None] | None


class ExtraBatchOf(msgspec.Struct, kw_only=True):
    """A batch a gateway made beside a part's own, cancelled when found."""

    part: int
    batch_id: str
    kept_batch_id: str | None
    status: str | None
    request_counts: dict[str, int] | None
    cancel: str
    note: str


class Timings(msgspec.Struct, kw_only=True):
    """batchd's own clock, as `clock.iso_utc` text."""

    claimed_at: str | None
    batches_created_at: list[str | None]
    batches_ended_at: list[str | None]
    published_at: str | None


class Summary(msgspec.Struct, kw_only=True):
    """The outbox folder's summary.json (schema `SUMMARY_VERSION`)."""

    version: int = SUMMARY_VERSION
    job_id: str
    name: str
    folder: str
    follows: Follows | None = None
    input: InputOf
    status: str
    options: dict[str, FreeJson] = msgspec.field(default_factory=dict)
    retry_of: str | None = None
    request_counts: RequestCounts
    never_run: int = 0
    result_unavailable: int = 0
    unattributed: int = 0
    unattributed_reasons: dict[str, int] = msgspec.field(default_factory=dict)
    unattributed_lines: list[FreeJson] = msgspec.field(default_factory=list)
    # What changed in the input after its claim (`outbox.writer.keep_input_files`).
    input_changed: dict[str, FreeJson] | None = None
    input_kept_at: str | None = None
    late_sidecar: LateSidecar | None = None
    usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    cost: Cost = msgspec.field(default_factory=Cost)
    error: JobError | None = None
    parts: list[PartOf] = msgspec.field(default_factory=list)
    extra_batches: list[ExtraBatchOf] = msgspec.field(default_factory=list)
    timings: Timings | None = None


class SummaryHead(msgspec.Struct, kw_only=True):
    """What tells whose folder it is, from a summary.json of any version."""

    job_id: str | None = None


def encode_summary(summary: Summary) -> bytes:
    """summary.json's bytes: indented JSON, the fields in the schema's order."""
    return orjson.dumps(msgspec.to_builtins(summary), option=orjson.OPT_INDENT_2)


def decode_summary(raw: bytes) -> Summary:
    """A summary.json read back; raises `msgspec.ValidationError` (a `ValueError`) when
    it is not one."""
    return msgspec.json.decode(raw, type=Summary)


def decode_cost(value: object) -> Cost | None:
    """A job's recorded cost (from its row), or None when it has none."""
    return None if value is None else msgspec.convert(value, Cost)


def decode_usage(value: object) -> TokenUsage | None:
    """A job's recorded usage (from its row), or None when it has none."""
    return None if value is None else msgspec.convert(value, TokenUsage)


def to_json(document: msgspec.Struct) -> Any:
    """A document as the plain JSON values a store column or a response holds."""
    return msgspec.to_builtins(document)
