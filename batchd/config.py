"""Configuration, read by pydantic-settings (the provider profiles are batchd.provider.profiles).

Every setting comes from, in order of precedence: keyword overrides (the CLI), the
environment (`BATCHD_*`), then one TOML file. Limits are per provider, never constants:
the same protocol is served by DashScope, OpenAI and others with different caps.
"""

from __future__ import annotations

import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from batchd.errors import ConfigError
from batchd.inputs.csvio import DEFAULT_CSV_ENCODING, encoding_problem
from batchd.inputs.validate import DEFAULT_MAX_REPORTED_ERRORS
from batchd.logs import shown_url
from batchd.models import completion_hours
from batchd.objstore.location import BucketUrl, parse_location
from batchd.provider.prices import PriceTable, table_from
from batchd.provider.profiles import (
    DEFAULT_PROVIDER,
    ENDPOINT_CHAT,
    ENDPOINT_EMBEDDINGS,
    ENDPOINT_TEST,
    GB,
    MB,
    PROFILES,
    TEST_MODEL,
    ModelLimits,
    ProviderLimits,
    ProviderName,
    ProviderProfile,
    merge_limits,
)

__all__ = [  # the provider profiles, as read through the configuration
    "ENDPOINT_CHAT",
    "ENDPOINT_EMBEDDINGS",
    "ENDPOINT_TEST",
    "GB",
    "MB",
    "PROFILES",
    "TEST_MODEL",
    "ModelLimits",
    "ProviderLimits",
    "ProviderName",
    "ProviderProfile",
    "merge_limits",
]


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML configuration file, with an error that names the file and the problem."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc}") from None


class FileSettings(BaseSettings):
    """Base for settings read from one table of a TOML file plus the environment.

    Subclasses name their table in `toml_table`; `load()` reads the file once and places
    its table below the environment in precedence.
    """

    toml_table: ClassVar[tuple[str, ...]] = ()
    # Top-level tables of the shared file that belong to other programs' settings.
    foreign_tables: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Self:
        """Read the TOML table and the environment; errors name the file and the key."""
        table: dict[str, Any] = {}
        if config_file is not None:
            table = read_toml(Path(config_file))
            for key in cls.toml_table:
                value = table.get(key, {})
                if not isinstance(value, dict):
                    raise ConfigError(f"configuration file {config_file}: [{key}] must be a table")
                table = value
            table = {k: v for k, v in table.items() if k not in cls.foreign_tables}
            if "api_key" in table:
                raise ConfigError(
                    f"configuration file {config_file}: the API key is never read from the"
                    " configuration file; set BATCHD_API_KEY (or DASHSCOPE_API_KEY) or give"
                    " systemd a credential named api_key"
                )
        token = _TOML_DATA.set(table)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            where = f"configuration file {config_file}" if config_file else "configuration"
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"{where} (or BATCHD_* environment): {problems}") from None
        finally:
            _TOML_DATA.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = InitSettingsSource(settings_cls, init_kwargs=_TOML_DATA.get())
        return (init_settings, env_settings, toml)


# The TOML table being loaded; a context variable so that concurrent loads cannot mix.
_TOML_DATA: ContextVar[dict[str, Any]] = ContextVar("batchd_toml_data", default={})  # noqa: B039


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": readable lines on a terminal, JSON lines otherwise (journald, files).
    format: Literal["auto", "json", "console"] = "auto"


# A folder that may be a bucket: a local path, or `oss://BUCKET/PREFIX/` / `s3://...`.
Location = Annotated[
    Path | BucketUrl, BeforeValidator(parse_location), PlainSerializer(str, when_used="json")
]
FolderName = Literal["inbox", "spool", "outbox", "state", "runtime"]
BUCKET_FOLDERS = ("inbox", "spool", "outbox")


class PathSettings(BaseModel):
    """Folders; each defaults to a child of `root` and may be set on its own. The inbox,
    the spool and the outbox may each be a bucket folder (batchd.objstore); the state and
    the runtime folder (the control socket) are always this machine's."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Path("/var/lib/batchd")
    inbox: Location | None = None
    spool: Location | None = None
    outbox: Location | None = None
    state: Path | None = None
    # The control socket's folder (systemd's RuntimeDirectory); the root itself when
    # unset, so that the socket is `ROOT/control.sock`.
    runtime: Path | None = None

    def location(self, name: FolderName) -> Path | BucketUrl:
        """Where folder `name` lives: a local path or a bucket folder."""
        own: Path | BucketUrl | None = getattr(self, name)
        if own is not None:
            return own
        return self.root if name == "runtime" else self.root / name

    def bucket(self, name: FolderName) -> BucketUrl | None:
        """The bucket folder `name` is, or None when it is a local folder."""
        own = self.location(name)
        return own if isinstance(own, BucketUrl) else None

    def buckets(self) -> dict[str, BucketUrl]:
        """The folders that are bucket folders, by name."""
        return {n: b for n in BUCKET_FOLDERS if (b := self.bucket(n)) is not None}  # type: ignore[arg-type]

    def folder(self, name: FolderName) -> Path:
        """Folder `name` on this machine. For a bucket folder, the local folder beside the
        others (`ROOT/NAME`) where batchd works on its objects: the spool's working copies,
        the outbox's folders before they are written to the bucket."""
        own = self.location(name)
        return own if isinstance(own, Path) else self.root / name


class IntakeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A dropped file is claimed once its size and mtime have not changed for this long
    # (twice this long without a sidecar beside it: one may follow).
    settle_s: float = Field(default=2.0, ge=0)
    # A file whose last line has no newline waits this long before it is judged as is.
    unterminated_settle_s: float = Field(default=60.0, ge=0)
    # Safety-net rescan of the inbox, in case inotify events were missed.
    rescan_interval_s: float = Field(default=10.0, gt=0)
    # inotify through watchfiles; off means the rescan alone finds new files.
    watch: bool = True
    # Reject sparse files (far fewer blocks on disk than their size: holes, not text)
    # before reading them. Turn off on filesystems that compress (ZFS, btrfs), where a
    # text file can take a small fraction of its size on disk.
    reject_sparse: bool = True
    suffixes: tuple[str, ...] = (".jsonl", ".csv")


class CsvColumnSettings(BaseModel):
    """The header names of a CSV input's two columns (the sidecar's `columns` wins)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(default="custom_id", min_length=1)
    content: str = Field(default="content", min_length=1)

    @model_validator(mode="after")
    def _different(self) -> Self:
        if self.custom_id.strip().lower() == self.content.strip().lower():
            raise ValueError("custom_id and content must name different columns")
        return self

    @property
    def names(self) -> tuple[str, str]:
        return (self.custom_id, self.content)


class JobSettings(BaseModel):
    """Defaults for every job; a sidecar NAME.meta.json may override them per file."""

    model_config = ConfigDict(extra="forbid")

    completion_window: str = "24h"
    # Plan files over the request or byte limit into parts (off: such files are rejected).
    split: bool = True
    # One part per model when a file mixes models (off: mixed files are rejected).
    group_by_model: bool = False
    # Model and endpoint for CSV inputs (custom_id, content) without a sidecar.
    csv_model: str | None = None
    csv_system_prompt: str | None = None
    # The header names of the custom_id and content columns of CSV inputs.
    csv_columns: CsvColumnSettings = Field(default_factory=CsvColumnSettings)
    # The text encoding of CSV inputs (a sidecar's "encoding" wins for its file).
    csv_encoding: str = DEFAULT_CSV_ENCODING
    # Copy the input into its outbox folder.
    keep_input: bool = True
    # Delete the remote input, output and error files once a job is published.
    delete_remote_files: bool = True
    # Resubmit retryable failures and never-run requests as follow-up parts, at most N
    # times (0 = never: a retry costs money).
    resubmit_failed: int = Field(default=0, ge=0)
    # The largest input file taken at all (it is split into parts within the provider's
    # limits): a bigger one is rejected on its size, before a byte of it is read.
    max_input_bytes: int = Field(default=50 * GB, ge=1)
    # Result lines longer than this are published byte for byte but not parsed (their
    # custom_id is read from the line's start), so one huge line cannot exhaust memory.
    max_result_line_bytes: int = Field(default=64 * MB, ge=1024)
    # An input identical (sha256) to one running, or published within this window (NNh
    # or NNd; "0h" never), is held (`duplicate`) until an operator lets it go.
    duplicate_window: str = "7d"
    # Requests to a model that thinks by default, without enable_thinking: "warn" (in the
    # report), "refuse" (reject the job) or "allow".
    thinking: Literal["warn", "refuse", "allow"] = "warn"
    # How the service gets a part's requests: "upload" (the files API), "oss" (written to
    # the spool's bucket and named by `oss:{region}:{bucket}/{key}`: no upload call, no
    # upload cap, no input file in the account's quota), or "auto": oss when the spool
    # is an oss:// bucket, the provider reads OSS inputs and the pre-flight check of the
    # bucket finds nothing missing, else upload (batchd.pipeline.ossinputs).
    input_via: Literal["auto", "upload", "oss"] = "auto"

    @field_validator("duplicate_window")
    @classmethod
    def _window_form(cls, value: str) -> str:
        if completion_hours(value) is None and value not in ("0h", "0d"):
            raise ValueError(f"{value!r} is not a duration as NNh or NNd")
        return value

    @field_validator("csv_encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        problem = encoding_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class PollSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # First look at a batch this soon after it is created.
    first_poll_s: float = Field(default=30.0, gt=0)
    # Then about this often (the service advises about once a minute), with jitter.
    interval_s: float = Field(default=60.0, gt=0)
    jitter: float = Field(default=0.1, ge=0, le=0.5)
    # List pages answer for the due batches when at least this many are due, and at least
    # as many as the pages a sweep reads (one per 100 running): never more calls than
    # retrieving them one by one.
    list_threshold: int = Field(default=1, ge=1)
    # A batch the service still calls running this long after its completion window is
    # shown as overdue (a note on the part); it is followed until the service ends it. A
    # batch is declared lost only when the service says it does not know it.
    lost_margin_s: float = Field(default=6 * 3600.0, ge=0)


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=60.0, gt=0)
    # Length of the window the per-minute caps count over (60 on every real service;
    # shorter only against the emulator, to test in seconds what takes minutes).
    rate_window_s: float = Field(default=60.0, gt=0)
    # Share of each cap batchd allows itself (below 1.0 when other clients share the key).
    cap_share: float = Field(default=1.0, gt=0, le=1.0)
    # Uploads and creates in flight at once.
    concurrency: int = Field(default=8, ge=1)
    # While the account is unusable (bad key, arrears), probe it this often; while the
    # provider does not answer, probe it after a pause doubling from 1 s up to this.
    account_probe_s: float = Field(default=60.0, gt=0)
    # With no call answered for this long (an idle daemon), one cheap call (a list of one
    # batch) checks that the provider answers and the key works: `status` and `check`
    # tell within seconds of start-up, not at the first file. Also done at start-up.
    provider_probe_s: float = Field(default=300.0, gt=0)
    # The most pages one list call is followed for (files or batches, 100 a page); a
    # server whose `has_more` never ends is cut there, and the step fails with a note.
    max_list_pages: int = Field(default=100, ge=1)
    # After an upload or create whose answer was lost, wait this long before looking for
    # its effect (a list may lag behind a create), then page back this far before the
    # moment the service stored the part's file (or, where that is not known, the
    # intent: the service's clock may differ from ours).
    settle_after_s: float = Field(default=10.0, ge=0)
    clock_skew_s: float = Field(default=300.0, ge=0)
    # A download must average at least this many bytes a second once `download_grace_s`
    # have passed; a slower (dripping) body is cut and tried again later.
    download_min_bytes_per_s: float = Field(default=64 * 1024, gt=0)
    download_grace_s: float = Field(default=30.0, ge=0)
    # Downloads in flight at once (within the files call cap).
    download_concurrency: int = Field(default=4, ge=1)
    # A part step that failed is tried again after a pause doubling from the base.
    step_retry_base_s: float = Field(default=5.0, gt=0)
    step_retry_cap_s: float = Field(default=600.0, gt=0)


class NotifySettings(BaseModel):
    """Be told when a job ends (published, any status) or the account is paused."""

    model_config = ConfigDict(extra="forbid")

    # POSTed a signed JSON event (Standard Webhooks); the secret comes from
    # BATCHD_WEBHOOK_SECRET or the systemd credential webhook_secret, never this file.
    webhook_urls: list[str] = Field(default_factory=list)
    # Run (no shell) for each event, with the job's facts in BATCHD_* variables.
    command: list[str] | None = None
    command_timeout_s: float = Field(default=60.0, gt=0)
    # A webhook answer must come within this long; a failed delivery is tried again after
    # a pause doubling from retry_base_s up to retry_cap_s, at most max_attempts times.
    timeout_s: float = Field(default=10.0, gt=0)
    retry_base_s: float = Field(default=10.0, gt=0)
    retry_cap_s: float = Field(default=3600.0, gt=0)
    max_attempts: int = Field(default=12, ge=1)

    @field_validator("webhook_urls")
    @classmethod
    def _http_only(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{shown_url(url)!r} is not an http(s) URL")
        return urls


class BudgetSettings(BaseModel):
    """Caps on spending, in the price table's currency (batchd.pipeline.budget says how a part is
    held to them). Unset: no cap."""

    model_config = ConfigDict(extra="forbid")

    daily: float | None = Field(default=None, ge=0)
    monthly: float | None = Field(default=None, ge=0)
    # A job whose worst case does not fit: its parts "wait" for room, or it is "reject"ed
    # when planned, before anything is sent.
    on_over: Literal["wait", "reject"] = "wait"
    # A part whose model has no price: "hold" it while a cap is set, or "allow" it.
    unknown_price: Literal["hold", "allow"] = "hold"
    # Days and months begin at midnight here (an IANA zone name).
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a time zone name (e.g. UTC, Asia/Shanghai)"
            ) from None
        return value


class StorageSettings(BaseModel):
    """The object store of the folders given as `oss://` or `s3://` URLs (batchd.objstore).
    Credentials are never read from here: see batchd.objstore.credentials."""

    model_config = ConfigDict(extra="forbid")

    # The S3-compatible endpoint. Unset: OSS's for oss:// folders
    # (https://oss-REGION.aliyuncs.com), AWS's for s3:// folders.
    endpoint_url: str | None = None
    # The buckets' region. Unset: cn-beijing for oss:// (where Model Studio reads OSS
    # inputs), else AWS_DEFAULT_REGION or us-east-1.
    region: str | None = None
    # How a request names the bucket: "virtual" (BUCKET.host: what OSS requires), "path"
    # (host/BUCKET: what most self-hosted stores want), or "auto": virtual for oss:// and
    # for AWS, path for an s3:// folder on a custom endpoint.
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # V4 signatures; "s3" (V2) only for an old store that takes nothing else.
    signature_version: Literal["s3v4", "s3"] = "s3v4"
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # A read that brings nothing for this long is cut (and tried again).
    read_timeout_s: float = Field(default=60.0, gt=0)
    # Tries of one request that met a 5xx, throttling or a cut connection.
    max_attempts: int = Field(default=3, ge=1, le=10)
    # A listing of one folder stops with a named failure past this many pages (of up to
    # 1000 keys each): a store that never ends a listing cannot hold a stage.
    max_list_pages: int = Field(default=1000, ge=1)
    # Objects larger than this are written in parts of `part_size_mb` (multipart upload).
    multipart_threshold_mb: int = Field(default=64, ge=5, le=5120)
    part_size_mb: int = Field(default=16, ge=5, le=5120)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class ControlSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The control socket; `<runtime>/control.sock` when unset.
    socket: Path | None = None
    # Members of this group may use the socket (besides root and the daemon's own user).
    group: str | None = None
    # Connections served at once; more are closed as they are accepted.
    max_connections: int = Field(default=32, ge=1)
    # A request must arrive whole within this long of the connection (or of the previous
    # answer on it); a peer that sends nothing, or sends slowly, is closed.
    request_timeout_s: float = Field(default=10.0, gt=0)
    # Event streams (`batchd watch`) served at once, counted apart from max_connections:
    # watchers never lock out a request.
    max_streams: int = Field(default=16, ge=1)
    # A stream whose reader leaves what was written unread this long (a watch stopped
    # with Ctrl-Z) is cut; a quiet stream gets a heartbeat every third of it.
    stream_timeout_s: float = Field(default=30.0, gt=0)


class Settings(FileSettings):
    """The daemon's settings (`batchd run`, `batchd validate`, ...)."""

    foreign_tables: ClassVar[tuple[str, ...]] = ("emulator",)

    model_config = SettingsConfigDict(
        env_prefix="BATCHD_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    provider: ProviderName = DEFAULT_PROVIDER
    base_url: str | None = None
    limits: dict[str, Any] = Field(default_factory=dict)
    log: LogSettings = Field(default_factory=LogSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    poll: PollSettings = Field(default_factory=PollSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    # Prices per provider and model, over the shipped defaults (batchd.provider.prices):
    # [prices.dashscope."qwen-plus"] input = 0.8, output = 2.0, currency = "CNY", ...
    prices: dict[str, Any] = Field(default_factory=dict)
    # Stop and park a job after it was caught mid-step by this many crashes.
    max_job_crashes: int = Field(default=3, ge=1)
    # Park a part after this many failed steps in a row (`batchd retry` resumes it). Only
    # a step's own failures count: never a fault of this machine (a full disk, a locked
    # database) nor an outage of the provider, which are waited out and shown.
    max_part_failures: int = Field(default=5, ge=1)
    # A write to the state database waits this long for another process holding it (a
    # backup, a VACUUM) before the wait is shown as a fault (`status`); it is then tried
    # again after a short pause, for as long as it takes, never given up.
    db_busy_timeout_s: float = Field(default=10.0, gt=0)
    # The validator stops listing problems after this many (it still counts them all).
    max_reported_errors: int = Field(default=DEFAULT_MAX_REPORTED_ERRORS, ge=1)

    _price_table: PriceTable | None = PrivateAttr(default=None)

    @field_validator("prices")
    @classmethod
    def _prices_fit(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            table_from(value)
        except ValueError as exc:
            raise ValueError(f"[prices]: {exc}") from exc
        return value

    @property
    def price_table(self) -> PriceTable:
        """The shipped prices with `[prices]` over them (built once per settings)."""
        if self._price_table is None:
            self._price_table = table_from(self.prices)
        return self._price_table

    @model_validator(mode="after")
    def _check_limits(self) -> Self:
        try:
            limits = merge_limits(PROFILES[self.provider].limits, self.limits)
        except ValueError as exc:
            raise ValueError(f"[limits]: {exc}") from exc
        window = self.jobs.completion_window
        hours = completion_hours(window)
        lowest, highest = limits.min_completion_window_h, limits.max_completion_window_h
        if hours is None or not lowest <= hours <= highest:
            raise ValueError(
                f"jobs.completion_window {window!r}: {self.provider} takes {lowest}h to"
                f" {highest}h, as NNh or NNd"
            )
        return self

    @model_validator(mode="after")
    def _check_input_via(self) -> Self:
        if self.jobs.input_via != "oss":
            return self
        if self.paths.bucket("spool") is None:
            raise ValueError(
                'jobs.input_via = "oss" needs the spool on a bucket: set paths.spool to'
                ' oss://BUCKET/PREFIX/ (or s3://...), or jobs.input_via to "auto" or "upload"'
            )
        if not PROFILES[self.provider].reads_oss_inputs:
            raise ValueError(
                f'jobs.input_via = "oss": provider {self.provider!r} does not read batch'
                ' inputs from OSS (Model Studio in China (Beijing), provider "dashscope",'
                ' does); set jobs.input_via to "auto" or "upload", or change provider'
            )
        return self

    @property
    def socket_path(self) -> Path:
        return self.control.socket or self.paths.folder("runtime") / "control.sock"

    @property
    def profile(self) -> ProviderProfile:
        base = PROFILES[self.provider]
        return ProviderProfile(
            name=base.name,
            base_url=self.base_url or base.base_url,
            limits=merge_limits(base.limits, self.limits),
            oss_inputs_region=base.oss_inputs_region,
        )
