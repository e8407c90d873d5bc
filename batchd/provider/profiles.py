"""Provider profiles: each provider's base URL and the caps of an account (SPEC.md).

Limits are per provider, never constants: the same protocol is served by DashScope,
OpenAI and others with different caps, and an operator overrides any of them from
`[limits]`. The types are frozen msgspec structs, checked when built from a table
(`merge_limits`, `limits_from`), so that `batchd validate` reads them without loading the
daemon's configuration machinery.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

MB = 1024 * 1024
GB = 1024 * MB

ProviderName = Literal["dashscope", "dashscope-intl", "openai", "custom"]
DEFAULT_PROVIDER: ProviderName = "dashscope"

ENDPOINT_CHAT = "/v1/chat/completions"
ENDPOINT_EMBEDDINGS = "/v1/embeddings"
ENDPOINT_TEST = "/v1/chat/ds-test"
TEST_MODEL = "batch-test-model"

Count = Annotated[int, msgspec.Meta(ge=1)]
Rate = Annotated[float, msgspec.Meta(gt=0)]
T = TypeVar("T")


class ModelLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits that one model adds on top of the provider's (e.g. the test model)."""

    max_running: Count | None = None
    max_requests_per_file: Count | None = None
    max_file_bytes: Count | None = None
    # When set, the model may only be used on these endpoints.
    endpoints: tuple[str, ...] | None = None
    # When set, these endpoints may only be used by this model.
    exclusive_endpoints: tuple[str, ...] = ()
    # The most output tokens one request may produce (thinking included): bounds a
    # request's worst-case cost when it sets no `max_tokens`.
    max_output_tokens: Count | None = None
    # The model thinks unless a request sets `enable_thinking: false` (reasoning tokens
    # are billed as output).
    thinks_by_default: bool = False
    # OpenAI-style accounts: the input tokens of all queued (not ended) batches of this
    # model may not pass this; a batch that would is failed (`token_limit_exceeded`).
    enqueued_tokens: Count | None = None


def _test_model_only() -> dict[str, ModelLimits]:
    return {
        TEST_MODEL: ModelLimits(
            max_running=2,
            max_requests_per_file=100,
            max_file_bytes=1 * MB,
            endpoints=(ENDPOINT_TEST,),
            exclusive_endpoints=(ENDPOINT_TEST,),
        )
    }


class ProviderLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The caps one provider account has (SPEC.md), all overridable."""

    running_batches: Count = 1000
    create_per_minute: Count = 1000
    retrieve_per_minute: Count = 1000
    cancel_per_minute: Count = 1000
    list_per_minute: Count = 100
    upload_per_second: Rate = 3.0
    file_calls_per_second: Rate = 10.0
    max_requests_per_file: Count = 50_000
    max_file_bytes: Count = 500 * MB
    max_line_bytes: Count = 6 * MB
    max_stored_files: Count = 10_000
    max_stored_bytes: Count = 100 * GB
    min_completion_window_h: Count = 24
    max_completion_window_h: Count = 336
    endpoints: tuple[str, ...] = (ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, ENDPOINT_TEST)
    # Output bound of a model with no `max_output_tokens` of its own.
    default_max_output_tokens: Count = 32_768
    models: dict[str, ModelLimits] = msgspec.field(default_factory=_test_model_only)

    def for_model(self, model: str) -> ModelLimits:
        return self.models.get(model, ModelLimits())

    def requests_limit(self, model: str) -> int:
        own = self.for_model(model).max_requests_per_file
        return min(self.max_requests_per_file, own) if own else self.max_requests_per_file

    def bytes_limit(self, model: str) -> int:
        own = self.for_model(model).max_file_bytes
        return min(self.max_file_bytes, own) if own else self.max_file_bytes


# Qwen models whose output bound or thinking default the provider documents:
# - thinking-only models (QwQ, the -thinking variants) always think, and open-source
#   Qwen3 hybrids and Qwen3.5 think unless `enable_thinking: false` (Qwen Cloud's
#   "Thinking" guide, https://docs.qwencloud.com/developer-guides/text-generation/thinking,
#   and Qwen3's model card: thinking is the template's default);
# - most output tokens: qwen-turbo 16,384 (https://www.alibabacloud.com/help/en/model-studio/qwen-turbo),
#   qwen-flash 32K (its Model Studio model card).
_THINKING_BY_DEFAULT = (
    "qwq-plus",
    "qwq-32b",
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
)


def _dashscope_models() -> dict[str, ModelLimits]:
    models = _test_model_only()
    models.update({name: ModelLimits(thinks_by_default=True) for name in _THINKING_BY_DEFAULT})
    models["qwen-turbo"] = ModelLimits(max_output_tokens=16_384)
    models["qwen-flash"] = ModelLimits(max_output_tokens=32_768)
    return models


_DASHSCOPE_LIMITS = ProviderLimits(models=_dashscope_models())


# Model Studio in China (Beijing) reads a batch's input straight from an OSS bucket of its
# own region (`input_file_id = "oss:{region}:{bucket}/{key}"`, SPEC.md "Inputs from OSS").
MODEL_STUDIO_OSS_REGION = "cn-beijing"


class ProviderProfile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    base_url: str
    limits: ProviderLimits = msgspec.field(default_factory=ProviderLimits)
    # The region of the OSS buckets the service reads batch inputs from (`oss:` ids);
    # None: it reads none, every input is uploaded.
    oss_inputs_region: str | None = None

    @property
    def reads_oss_inputs(self) -> bool:
        return self.oss_inputs_region is not None


_OPENAI_LIMITS = ProviderLimits(
    # OpenAI counts its limits in enqueued tokens rather than running batches; these are
    # conservative defaults that an operator overrides from their own account page.
    running_batches=1000,
    max_requests_per_file=50_000,
    max_file_bytes=200 * MB,
    min_completion_window_h=24,
    max_completion_window_h=24,
    endpoints=(ENDPOINT_CHAT, ENDPOINT_EMBEDDINGS, "/v1/responses", "/v1/completions"),
    models={},
)

PROFILES: dict[str, ProviderProfile] = {
    "dashscope": ProviderProfile(
        name="dashscope",
        base_url="https://dashscope.aliyuncs.com/compatible-mode/v1",
        limits=_DASHSCOPE_LIMITS,
        oss_inputs_region=MODEL_STUDIO_OSS_REGION,
    ),
    "dashscope-intl": ProviderProfile(
        name="dashscope-intl",
        base_url="https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
        limits=_DASHSCOPE_LIMITS,
    ),
    "openai": ProviderProfile(
        name="openai", base_url="https://api.openai.com/v1", limits=_OPENAI_LIMITS
    ),
    # A DashScope-compatible service (the emulator in tests), taken to read OSS inputs as
    # Model Studio in Beijing does: `jobs.input_via = "upload"` for one that does not.
    "custom": ProviderProfile(
        name="custom",
        base_url="http://127.0.0.1:8765/v1",
        limits=_DASHSCOPE_LIMITS,
        oss_inputs_region=MODEL_STUDIO_OSS_REGION,
    ),
}


def limits_from(table: Any) -> ProviderLimits:
    """Limits from a whole table (an emulator's `[emulator.limits]`); a `ValueError`
    names the key that does not fit."""
    if isinstance(table, ProviderLimits):
        return table
    if isinstance(table, str | bytes):  # one environment variable holds the table as JSON
        try:
            table = msgspec.json.decode(table)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not a JSON table: {exc}") from None
    return _convert(table or {}, ProviderLimits)


def merge_limits(base: ProviderLimits, overrides: dict[str, Any]) -> ProviderLimits:
    """Apply a partial table of overrides (from TOML or env) to a profile's limits; a
    `ValueError` names the key that does not fit."""
    if not overrides:
        return base
    data: dict[str, Any] = msgspec.to_builtins(base)
    models: dict[str, Any] = data.get("models") or {}
    for name, table in (overrides.get("models") or {}).items():
        models[name] = {**models.get(name, {}), **(table or {})}
    data.update({k: v for k, v in overrides.items() if k != "models"})
    data["models"] = models
    return _convert(data, ProviderLimits)


def _convert(data: Any, kind: type[T]) -> T:
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc).replace("`$.", "`").replace("`$`", "the table")) from None
