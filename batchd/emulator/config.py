"""Settings of the shipped emulator, read by the same machinery as the daemon's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    field_validator,
)
from pydantic_settings import SettingsConfigDict

from batchd.config import FileSettings, LogSettings
from batchd.provider.profiles import ProviderLimits, limits_from

# Call classes: each has its own rate cap and its own line in the stats.
CALL_CLASSES = ("create", "retrieve", "cancel", "list", "upload", "files", "download")


class FaultSettings(BaseModel):
    """Faults the emulator injects, each off by default; all draws come from `seed`."""

    model_config = ConfigDict(extra="forbid")

    # Share of API calls answered 500 InternalError before doing anything.
    error_5xx_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Extra latency added to every API call, in seconds (uniform between min and max).
    latency_min_s: float = Field(default=0.0, ge=0.0)
    latency_max_s: float = Field(default=0.0, ge=0.0)
    # Share of those calls that get the latency (1: every one). Fewer, with a latency
    # longer than the calls take, model calls that overtake each other on the way (one
    # waits in a proxy's queue while later ones go straight through); the service counts
    # each call against its cap when it arrives, after the latency.
    latency_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    # Share of API calls whose connection is dropped before any answer.
    drop_connection_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Share of batch creates that take effect but whose answer is lost (connection dropped).
    lost_create_response_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Share of API calls answered 429 Throttling regardless of the caps (a 429 storm).
    throttle_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Share of uploads, creates, cancels and file deletes that take effect but whose
    # answer is lost (connection dropped); `classes` narrows it like the faults above.
    lost_response_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # A gateway in front of the service whose own client sends a create upstream again
    # (as LiteLLM's did, whatever `num_retries` said, when its upstream connection was
    # lost after the batch was made): this share of creates is made `gateway_retries`
    # more times, same file, same metadata, each counted against the create cap (a retry
    # the cap refuses ends them). The answer is the last batch made, unless a lost-answer
    # fault above takes it.
    gateway_retry_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    gateway_retries: int = Field(default=2, ge=1, le=10)
    # Call classes the faults above apply to; empty means every class.
    classes: tuple[str, ...] = ()
    # The faults below shape answers the way other providers and gateways do; they apply
    # whatever `classes` says.
    # List calls ignore every filter (batches: input_file_ids, status, ds_name,
    # create_after, create_before; files: purpose), as OpenAI does; after/limit still page.
    ignore_list_filters: bool = False
    # List calls always answer has_more true; past the last item the last page repeats.
    endless_pages: bool = False
    # Share of Batch objects answered with garbled counts or timestamps (ids stay right).
    garbled_fields_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # The content faults below apply only to batches whose metadata.ds_name contains this
    # text; empty means every batch.
    batch_match: str = ""
    # Share of result files whose download answers 404 (fixed per file id and seed);
    # retrieve and delete still work on them.
    content_missing_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Share of result files (fixed per file id and seed) sent at `drip_bytes_per_s`.
    drip_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    drip_bytes_per_s: float = Field(default=1024.0, gt=0.0)
    # When > 0, the first success line written in each output file is at least this many
    # bytes long (its content padded); written streaming, never whole in memory.
    huge_line_bytes: int = Field(default=0, ge=0)
    # Share of success lines (fixed per seed, batch and custom_id) written in forms a
    # strict parser refuses: a lone surrogate escape, NaN, 1e400, or a line cut in half.
    odd_lines_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Share of success lines (fixed per seed, batch and custom_id) whose usage has one
    # absurd number, in turn: a string, a negative, a float, a count missing, 2^64 + 1,
    # a 401-digit integer, 2^64 + 1 beside a NaN. The answer is billed as usual.
    absurd_usage_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # Enqueued-token limits per model, as OpenAI sets them per account: a batch whose input
    # tokens, added to those of the model's batches not yet ended, pass its model's limit
    # fails at validation with `token_limit_exceeded`. A model named here takes this
    # limit instead of `limits.models.<model>.enqueued_tokens`; switchable at run time.
    enqueued_tokens: dict[str, PositiveInt] = Field(default_factory=dict)
    seed: int = 0


class EmulatorSettings(FileSettings):
    """Settings of `batchd emulator` (TOML table `[emulator]`, env `BATCHD_EMULATOR_*`)."""

    toml_table: ClassVar[tuple[str, ...]] = ("emulator",)
    model_config = SettingsConfigDict(
        env_prefix="BATCHD_EMULATOR_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        arbitrary_types_allowed=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    api_key: SecretStr | None = None
    # The service's clock runs this many times faster than wall time.
    time_scale: float = Field(default=1.0, gt=0)
    # Where uploaded and result files are kept; a temporary directory when unset.
    data_dir: Path | None = None
    # The account's caps, as in the daemon's `[limits]` but whole (defaults: DashScope's).
    # `models.<model>.enqueued_tokens` gives a model OpenAI's enqueued-token limit (see
    # `FaultSettings.enqueued_tokens` for switching it at run time).
    limits: Annotated[ProviderLimits, BeforeValidator(limits_from)] = Field(
        default_factory=ProviderLimits
    )
    log: LogSettings = Field(default_factory=LogSettings)
    # Length of the sliding window the per-minute caps are counted over, in wall seconds.
    rate_window_s: float = Field(default=60.0, gt=0)
    # Length of the window the per-second file caps are counted over, in wall seconds:
    # the cap per window is the per-second rate times this, at least 1.
    file_rate_window_s: float = Field(default=1.0, gt=0)
    # Service-time durations (seconds, before time_scale) shaped like the real service:
    # a two-line job takes about two and a half minutes, 50,000 lines about seven hours.
    validating_s: float = Field(default=20.0, ge=0)
    in_progress_base_s: float = Field(default=120.0, ge=0)
    per_request_s: float = Field(default=0.5, ge=0)
    finalizing_s: float = Field(default=10.0, ge=0)
    cancelling_s: float = Field(default=5.0, ge=0)
    # Share of requests that fail into the error file (deterministic per custom_id and seed).
    request_failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # The service promises no order in result files; by default lines are shuffled
    # (deterministically) so that a client relying on input order is caught.
    shuffle_output: bool = True
    # Models the account may use; the models named in `limits.models` are always known.
    models: tuple[str, ...] = (
        "qwen3-max",
        "qwen-max",
        "qwen-max-latest",
        "qwen-plus",
        "qwen-plus-latest",
        "qwen-flash",
        "qwen-turbo",
        "qwen-turbo-latest",
        "qwen-long",
        "qwen-long-latest",
        "qwq-plus",
        "qwq-32b-preview",
        "qwen3-235b-a22b",
        "qwen3-32b",
        "qwen3-30b-a3b",
        "qwen3-14b",
        "qwen3-8b",
        "qwen3-4b",
        "qwen3-1.7b",
        "qwen3-0.6b",
        "qwen3-235b-a22b-thinking-2507",
        "qwen3-30b-a3b-thinking-2507",
        "qwen3.5-plus",
        "qwen3.5-flash",
        "deepseek-r1",
        "deepseek-v3",
        "text-embedding-v1",
        "text-embedding-v2",
        "text-embedding-v3",
        "text-embedding-v4",
        "gpt-4o-mini",
        "text-embedding-3-small",
    )
    # Models that always think (enable_thinking does not apply to them).
    thinking_models: tuple[str, ...] = (
        "qwq-plus",
        "qwq-32b-preview",
        "deepseek-r1",
        "qwen3-235b-a22b-thinking-2507",
        "qwen3-30b-a3b-thinking-2507",
    )
    # Hybrid models that think unless a request sets `enable_thinking: false`, as Model
    # Studio documents them: the Qwen3 open models and Qwen3.5 (the commercial qwen-plus,
    # qwen-turbo, qwen-flash think only when asked). A list of the emulator's own, kept
    # apart from the daemon's (batchd.provider.profiles) so that one cannot hide the other's slip.
    thinking_by_default: tuple[str, ...] = (
        "qwen3-235b-a22b",
        "qwen3-32b",
        "qwen3-30b-a3b",
        "qwen3-14b",
        "qwen3-8b",
        "qwen3-4b",
        "qwen3-1.7b",
        "qwen3-0.6b",
        "qwen3.5-plus",
        "qwen3.5-flash",
    )
    # Vector length per embedding model; a request's `dimensions` overrides it.
    embedding_dimensions: dict[str, int] = Field(
        default_factory=lambda: {
            "text-embedding-v1": 1536,
            "text-embedding-v2": 1536,
            "text-embedding-v3": 1024,
            "text-embedding-v4": 1024,
            "text-embedding-3-small": 1536,
        }
    )
    faults: FaultSettings = Field(default_factory=FaultSettings)
    seed: int = 0
    # The region of this endpoint: an `oss:{region}:...` input must name it, as the service
    # reads only buckets in its own region.
    service_region: str = "cn-beijing"
    # An S3-compatible object store (OSS's `https://oss-cn-beijing.aliyuncs.com`, or Swift or
    # MinIO on loopback) that `oss:` and URL inputs are read from (emulator/oss.py); unset,
    # such inputs are refused. Credentials come from the environment: OSS_ACCESS_KEY_ID /
    # OSS_ACCESS_KEY_SECRET (/ OSS_SESSION_TOKEN), else AWS_ACCESS_KEY_ID /
    # AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), else botocore's own chain.
    object_store_url: str | None = None
    # The region requests to the store are signed for; unset, botocore's (AWS_REGION,
    # AWS_DEFAULT_REGION, the profile), else us-east-1.
    object_store_region: str | None = None
    # Bucket addressing: "auto" is path-style for an http:// loopback store, virtual-hosted
    # (`BUCKET.host`, the only style OSS takes) otherwise.
    object_store_addressing: Literal["auto", "path", "virtual"] = "auto"
    # An `oss:` input needs its bucket tagged `bailian-datahub-access: read`, as the service
    # does; off for stores that keep no bucket tags (Swift). URL inputs never need it.
    oss_require_tag: bool = True
    # A read of an input object that brings no byte for this long (wall seconds) is cut
    # and the batch fails validation with `file_read_timeout`.
    oss_read_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("object_store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("the object store URL takes no user, query or fragment")
        return value.rstrip("/")
