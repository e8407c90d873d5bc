"""Token counts of batch requests, as the service bills them, and a file's worst-case cost.

PURE: no network, no store, no event loop. `batchd estimate` and the daemon's prepare
stage call `count_file`; budgets and the enqueued-token check read its figures.

Which tokenizer (`tokenizer_for`), every figure saying which one it came from:
- DashScope (and `custom`, taken for a DashScope-compatible service): Qwen's own
  vocabulary, `resources/qwen.tiktoken` inside the `dashscope` package, run on tiktoken
  with the pattern and special tokens of `dashscope/tokenizers/qwen_tokenizer.py` (NFC
  first; text beyond 100,000 characters encoded in chunks split at line ends, as there).
  The package is located with `importlib.util.find_spec`, never imported: importing
  `dashscope` takes long and loads much. Only Qwen-family models (qwen*, qwq*, qvq*,
  text-embedding-v*) use that vocabulary; other models a DashScope account serves
  (deepseek, kimi, glm, ...) have their own and get the approximation.
- OpenAI: tiktoken's encoding for the model (o200k_base, cl100k_base), only when its file
  is already in tiktoken's cache: tiktoken downloads missing files, and a host without
  internet access would wait on that download. The file's sha256 is checked before
  tiktoken reads it, since on a mismatch tiktoken downloads again.
- Otherwise (no `dashscope` or no `tiktoken` installed, an OpenAI encoding not cached, a
  model of another family): the approximation (`approx_tokens`) of every text.
- `count_file(approx=True)` (`batchd estimate --approx`): the fast approximation, most
  long texts scaled by a ratio measured with `approx_tokens` on a sample of them (see
  _SAMPLE_EVERY); file totals within a few percent of approximating every text.

How a request counts (`request_tokens`):
- Chat: Qwen's chat template (ChatML), the text
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` for each message then
  `<|im_start|>assistant\\n`; each special token is one token. For the seed's examples
  (system "You are a helpful assistant." with "你好!有什么可以帮助你的吗?", "What is
  2+2?" and "你是谁?") this gives the service's 26, 26 and 22. A request without a
  system message gets no default one: Qwen2/2.5's open-source templates add "You are a
  helpful assistant." (or "You are Qwen, created by Alibaba Cloud. ...") but Qwen3's add
  nothing, and the service's published counts agree with nothing (qwen-turbo-latest,
  one user message "假如你是李白,你想说什么?": input_tokens 15, what the template without
  a system message gives). Content given as a list of parts counts the text of each part
  (`text`); images and other media are not counted (their tokens depend on the image).
  `tools` are counted as Qwen2.5's template writes them into the system message.
  OpenAI models count as OpenAI documents for its chat models: 3 tokens per message plus
  its role and content (plus 1 and the name when `name` is set), and 3 for the reply.
- Embeddings, completions: the tokens of `input` / `prompt` (each string of a list;
  a list of token ids counts its length). Responses: `instructions` and `input` as chat
  messages.
- The test model `batch-test-model`: 20 input tokens and 6 output tokens, the service's
  fixed usage for it (SPEC.md).

The output bound (`output_bound`): a request's `max_tokens` (or `max_completion_tokens`,
or the Responses API's `max_output_tokens`) when it is a positive integer, else the
model's `max_output_tokens`, else the provider's `default_max_output_tokens`. When the
request thinks (`enable_thinking: true`, or unset on a model that thinks by default),
its reasoning is bounded apart: `max_tokens` bounds the answer only, and the reasoning
adds `thinking_budget` when set, else the model's maximum output again. SPEC.md:
reasoning tokens are billed as output, so they are part of the bound, never left out.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import re
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from batchd.documents import JsonObject
from batchd.provider import tokenbound
from batchd.provider.profiles import (
    ENDPOINT_EMBEDDINGS,
    ENDPOINT_TEST,
    TEST_MODEL,
    ModelLimits,
    ProviderLimits,
)

if TYPE_CHECKING:
    from batchd.provider.prices import Price, PriceTable

QWEN = "qwen"
APPROX = "approx"
FIXED = "fixed"

# The service's fixed usage for the test model (SPEC.md).
TEST_MODEL_INPUT_TOKENS = 20
TEST_MODEL_OUTPUT_TOKENS = 6

# dashscope/tokenizers/qwen_tokenizer.py: the pre-tokenizer pattern, the special tokens
# (their ids follow the vocabulary's last rank), and the chunk length of long texts.
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
)
_QWEN_SPECIAL_START = 151643
_CHUNK_CHARS = 100_000
_QWEN_FAMILY = ("qwen", "qwq", "qvq", "text-embedding-v")

# OpenAI encodings batchd reads from tiktoken's cache: the file tiktoken fetches, and its
# sha256 (tiktoken_ext/openai_public.py).
_OPENAI_FILES: dict[str, tuple[str, str]] = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

_CHAT_ENDPOINTS = frozenset({"/v1/chat/completions", ENDPOINT_TEST})
# Qwen2.5's template writes tools into the system message between these.
_TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


@dataclass(frozen=True, slots=True, eq=False)
class Tokenizer:
    """How text becomes tokens for one model: `name` is "qwen" (Qwen's vocabulary),
    "tiktoken:<encoding>" (an OpenAI encoding), "approx" (`approx_tokens`) or "fixed"
    (the test model, whose usage the service fixes); `exact`
    says whether counts are the tokenizer's own. `chat` is the chat format: "chatml"
    (Qwen's template) or "openai"."""

    name: str
    exact: bool
    chat: str = "chatml"
    _count: Callable[[str], int] = field(default=lambda text: approx_tokens(text), repr=False)
    # Why an approximate tokenizer was chosen (for `status` and `estimate`).
    reason: str = ""

    def count(self, text: str) -> int:
        """The tokens of `text` (special-token text in it counts as plain text)."""
        return self._count(text)

    @property
    def description(self) -> str:
        """For people: "exact, Qwen vocabulary", "approximate: ...", ..."""
        if self.name == QWEN:
            return "exact, Qwen vocabulary"
        if self.name == FIXED:
            return "exact, the test model's fixed usage"
        if self.name.startswith("tiktoken:"):
            return f"exact, tiktoken {self.name.split(':', 1)[1]}"
        whose = "OpenAI's o200k_base and cl100k_base" if self.chat == "openai" else "Qwen's"
        why = f" ({self.reason})" if self.reason else ""
        return f"approximate: an upper bound of {whose} count, {APPROX_ERROR}{why}"


def _approx_openai(text: str) -> int:
    return tokenbound.bound(tokenbound.OPENAI)(text)


APPROX_TOKENIZER = Tokenizer(APPROX, exact=False)
# The test model's usage is fixed by the service (`request_tokens` gives it whole).
FIXED_TOKENIZER = Tokenizer(FIXED, exact=True)
APPROX_OPENAI = Tokenizer(APPROX, exact=False, chat="openai", _count=_approx_openai)

# Why the approximation counts a model (Tokenizer.reason).
WHY_ASKED = "asked for"
WHY_NO_QWEN = "dashscope or tiktoken not installed: pip install 'batchd[tokens]'"
WHY_NOT_CACHED = "the encoding is not in tiktoken's cache, and batchd never downloads it"
WHY_NO_TIKTOKEN = "tiktoken not installed: pip install 'batchd[tokens]'"
WHY_OTHER_FAMILY = "a vocabulary batchd does not have: Qwen's bound stands in, unproven for it"

_TOKENIZERS: dict[tuple[str, str, bool], Tokenizer] = {}
_ENCODINGS: dict[str, Callable[[str], int] | None] = {}


def provider_kind(provider: str) -> str:
    """PURE: "openai" or "dashscope" (dashscope, dashscope-intl, custom)."""
    return "openai" if provider == "openai" else "dashscope"


def tokenizer_for(provider: str, model: str, *, approx: bool = False) -> Tokenizer:
    """The tokenizer that counts `model`'s requests on `provider` (see the module's
    docstring), cached per provider kind and model. `approx` asks for the approximation
    whatever is installed."""
    kind = provider_kind(provider)
    key = (kind, model, approx)
    found = _TOKENIZERS.get(key)
    if found is None:
        found = _TOKENIZERS[key] = _choose(kind, model, approx)
    return found


def _choose(kind: str, model: str, approx: bool) -> Tokenizer:
    if model == TEST_MODEL:
        return FIXED_TOKENIZER
    if kind == "openai":
        if approx:
            return APPROX_OPENAI
        encoding = _openai_encoding_name(model)
        count = _encoding(encoding) if encoding else None
        if count is not None:
            return Tokenizer(f"tiktoken:{encoding}", exact=True, chat="openai", _count=count)
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            return Tokenizer(APPROX, False, "openai", _approx_openai, WHY_NO_TIKTOKEN)
        return Tokenizer(APPROX, False, "openai", _approx_openai, WHY_NOT_CACHED)
    if approx:
        return APPROX_TOKENIZER
    if not model.lower().startswith(_QWEN_FAMILY):
        return Tokenizer(APPROX, exact=False, reason=WHY_OTHER_FAMILY)
    count = _encoding(QWEN)
    if count is not None:
        return Tokenizer(QWEN, exact=True, _count=count)
    return Tokenizer(APPROX, exact=False, reason=WHY_NO_QWEN)


def tokenizer_summary(provider: str) -> dict[str, str]:
    """For `status`: how the daemon counts each family of models on `provider`, one
    line each ("exact, Qwen vocabulary", "approximate: ... (why)")."""
    if provider_kind(provider) == "openai":
        return {
            "gpt-4o, o-series (o200k_base)": tokenizer_for(provider, "gpt-4o").description,
            "gpt-4, gpt-3.5 (cl100k_base)": tokenizer_for(provider, "gpt-4").description,
            "other models": tokenizer_for(provider, "some-other-model").description,
        }
    return {
        "qwen, qwq, qvq, text-embedding-v*": tokenizer_for(provider, "qwen-plus").description,
        "other models (deepseek, kimi, glm, ...)": tokenizer_for(
            provider, "deepseek-v3"
        ).description,
    }


def _encoding(name: str) -> Callable[[str], int] | None:
    """The counting function of an encoding, loaded once; None when it cannot run here."""
    if name not in _ENCODINGS:
        _ENCODINGS[name] = _load_qwen() if name == QWEN else _load_openai(name)
    return _ENCODINGS[name]


def qwen_vocabulary_path() -> Path | None:
    """Where the `dashscope` package keeps Qwen's vocabulary, found without importing it."""
    try:
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    return None


def _read_ranks(path: Path) -> dict[bytes, int]:
    return {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in path.read_bytes().splitlines() if line)
    }


def qwen_ranks() -> dict[bytes, int] | None:
    """Qwen's vocabulary (token bytes -> rank), None when `dashscope` is not installed."""
    path = qwen_vocabulary_path()
    if path is None:
        return None
    try:
        return _read_ranks(path)
    except (OSError, ValueError):
        return None


def openai_ranks(name: str) -> dict[bytes, int] | None:
    """An OpenAI encoding's vocabulary from tiktoken's cache (checked by its sha256), None
    when it is not there."""
    url, sha256 = _OPENAI_FILES[name]
    cached = tiktoken_cache_file(url)
    try:
        if cached is None or hashlib.sha256(cached.read_bytes()).hexdigest() != sha256:
            return None
        return _read_ranks(cached)
    except (OSError, ValueError):
        return None


def _load_qwen() -> Callable[[str], int] | None:
    try:
        import tiktoken
    except ImportError:
        return None
    ranks = qwen_ranks()
    if ranks is None:
        return None
    special = {text: i for i, text in enumerate(_QWEN_SPECIAL, start=_QWEN_SPECIAL_START)}
    encoding = tiktoken.Encoding(
        "Qwen", pat_str=_QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )
    return _qwen_counter(encoding.encode_ordinary)


def _qwen_counter(encode: Callable[[str], list[int]]) -> Callable[[str], int]:
    limit = _CHUNK_CHARS

    def count(text: str) -> int:
        if not text.isascii():
            text = nfc(text)
        if len(text) <= limit:
            return len(encode(text))
        return sum(len(encode(chunk)) for chunk in _chunks(text, limit))

    return count


# NFC in linear time. CPython puts the combining marks after a character in canonical
# order with an insertion sort: quadratic in the length of a run of them (a 384 KB input
# of two runs held the GIL for over a minute). A run longer than _RUN_CHARS is put in
# order first (each mark decomposed, then a stable sort by combining class, which is what
# canonical ordering is), so that CPython's sort finds it sorted and passes in one sweep.
# Runs are found with a class of every character whose decomposition is non-starters
# only, built once (a third of a second), and only when a text is not NFC already.
_RUN_CHARS = 32
_runs_lock = threading.Lock()
_runs: re.Pattern[str] | None = None


def _long_runs() -> re.Pattern[str]:
    global _runs
    with _runs_lock:
        if _runs is None:
            combining, normalize = unicodedata.combining, unicodedata.normalize
            marks = [
                char
                for char in map(chr, range(0x80, 0x110000))
                if (combining(char) or unicodedata.decomposition(char)[:1] not in ("", "<"))
                and not 0xD800 <= ord(char) < 0xE000
                and all(map(combining, normalize("NFD", char)))
            ]
            ranges: list[list[str]] = []
            for char in marks:
                if ranges and ord(ranges[-1][1]) + 1 == ord(char):
                    ranges[-1][1] = char
                else:
                    ranges.append([char, char])
            body = "".join(f"{re.escape(a)}-{re.escape(b)}" for a, b in ranges)
            _runs = re.compile(f"[{body}]{{{_RUN_CHARS},}}")
        return _runs


def _in_order(match: re.Match[str]) -> str:
    normalize = unicodedata.normalize
    marks = "".join([normalize("NFD", char) for char in match.group()])
    return "".join(sorted(marks, key=unicodedata.combining))


def nfc(text: str) -> str:
    """PURE: `unicodedata.normalize("NFC", text)`, in time linear in the text whatever
    its runs of combining marks (see _RUN_CHARS)."""
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text
    return unicodedata.normalize("NFC", _long_runs().sub(_in_order, text))


def _chunks(text: str, size: int) -> Iterator[str]:
    """Text cut into pieces of at most `size` characters at line starts (a line longer
    than that is cut anywhere), as dashscope's QwenTokenizer does: tiktoken's merge
    recursion overflows its stack on very long pieces."""
    current: list[str] = []
    length = 0
    for i, line in enumerate(text.split("\n")):
        piece = line if i == 0 else "\n" + line
        pieces = (
            [piece]
            if len(piece) <= size
            else [piece[j : j + size] for j in range(0, len(piece), size)]
        )
        for part in pieces:
            if length + len(part) > size and current:
                yield "".join(current)
                current, length = [], 0
            current.append(part)
            length += len(part)
    if current:
        yield "".join(current)


def _openai_encoding_name(model: str) -> str | None:
    try:
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return None
    # o200k_harmony (gpt-oss) reads o200k_base's file and adds special tokens.
    return name if name in _OPENAI_FILES else None


def tiktoken_cache_file(url: str) -> Path | None:
    """Where tiktoken caches the file at `url` (its own rule), None if caching is off."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if folder is None:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not folder:
        return None
    return Path(folder) / hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()


def _load_openai(name: str) -> Callable[[str], int] | None:
    url, sha256 = _OPENAI_FILES[name]
    cached = tiktoken_cache_file(url)
    try:
        if cached is None or hashlib.sha256(cached.read_bytes()).hexdigest() != sha256:
            return None
        import tiktoken

        encoding = tiktoken.get_encoding(name)
    except (OSError, ImportError, ValueError):
        return None
    encode = encoding.encode_ordinary
    return lambda text: len(encode(text))


# The approximation: tokenbound's upper bound, on the text as Qwen's tokenizer sees it
# (NFC, long texts in chunks). How loose it is, measured on tests/fixtures/
# tokens_corpus.jsonl against the vocabularies' own counts (docs/costs.md): in all x1.78
# Qwen's count (x1.83 OpenAI's); English prose x1.85, Chinese x2.2, code x2.3, JSON
# x2.1, CSV x1.2, numbers x1.0 (Qwen counts a token per digit); never below.
APPROX_ERROR = "never below it, about x1.8 on mixed text"


def approx_tokens(text: str) -> int:
    """PURE: an upper bound of Qwen's token count of `text` (tokenbound: never below the
    exact count, whatever the text; about x1.8 above it on mixed text, see APPROX_ERROR)."""
    if not text:
        return 0
    if not text.isascii():
        text = nfc(text)
    counted = tokenbound.bound(tokenbound.QWEN)
    if len(text) <= _CHUNK_CHARS:
        return counted(text)
    return sum(counted(chunk) for chunk in _chunks(text, _CHUNK_CHARS))


# --- requests ---------------------------------------------------------------------------

# A bounded memo of counts of long strings (a system prompt repeated on every line is
# counted once). Past either bound it is emptied: what repeats comes straight back.
_MEMO_MIN_CHARS = 64
_MEMO_MAX_ENTRIES = 16_384
_MEMO_MAX_CHARS = 4_000_000

# The fast approximation (`count_file(approx=True)`, `batchd estimate --approx`): texts of
# at least _SAMPLE_MIN_CHARS get `approx_tokens` for the first _SAMPLE_WARMUP of each kind
# (ASCII or not, per model) and one in _SAMPLE_EVERY after; the others are their length
# times the tokens per character measured so far on that kind (the fast schema measures
# raw JSON bytes instead of characters). Shorter texts are counted (and remembered) one
# by one. A batch file's texts are alike, so the file's total stays close to counting
# every text; a single request's figure is rougher.
_SAMPLE_MIN_CHARS = 64
_SAMPLE_WARMUP = 64
_SAMPLE_EVERY = 64


class _Counter:
    """Counts requests with one tokenizer, remembering the counts of long strings (or,
    `sampled`, scaling most long texts by a measured tokens-per-character ratio)."""

    def __init__(self, tokenizer: Tokenizer, memo: bool = True, sampled: bool = False) -> None:
        self.tokenizer = tokenizer
        self.raw = tokenizer.count
        self.memo: dict[str, int] | None = {} if memo else None
        self.memo_chars = 0
        self.sampled = sampled
        # Per kind (ASCII or not): [tokens counted, characters counted, texts seen], and
        # the same with raw JSON bytes for characters (the fast schema's contents), kept
        # apart for system messages: a long system prompt repeated on every line would
        # otherwise make the sample and skew the users' ratio.
        self.ratios: dict[bool, list[int]] = {True: [0, 0, 0], False: [0, 0, 0]}
        # Short raw JSON strings (a system prompt of a sentence) -> their tokens.
        self.short_raw: dict[bytes, int] = {}
        self.raw_ratios: dict[tuple[bool, bool], list[int]] = {
            (system, ascii): [0, 0, 0] for system in (True, False) for ascii in (True, False)
        }

    def text(self, text: str) -> int:
        length = len(text)
        if self.sampled:
            if length >= _SAMPLE_MIN_CHARS:
                return self.scaled(text, length)
            return self.remembered(text)
        if length < _MEMO_MIN_CHARS:
            return self.raw(text)
        return self.remembered(text)

    def remembered(self, text: str) -> int:
        memo = self.memo
        if memo is None:
            return self.raw(text)
        found = memo.get(text)
        if found is None:
            found = self.raw(text)
            if len(memo) >= _MEMO_MAX_ENTRIES or self.memo_chars >= _MEMO_MAX_CHARS:
                memo.clear()
                self.memo_chars = 0
            memo[text] = found
            self.memo_chars += len(text)
        return found

    def raw_text(self, raw: bytes, system: bool = False) -> int:
        """The tokens of a JSON string given as its raw bytes (quotes included): scaled
        by the tokens per raw byte measured on a sample, as `scaled` does."""
        size = len(raw)
        if size < _SAMPLE_MIN_CHARS:
            found = self.short_raw.get(raw)
            if found is None:
                if len(self.short_raw) >= _MEMO_MAX_ENTRIES:
                    self.short_raw.clear()
                found = self.short_raw[raw] = self.raw(_JSON_STR.decode(raw))
            return found
        kind = self.raw_ratios[system, raw.isascii()]
        seen = kind[2]
        kind[2] = seen + 1
        if seen < _SAMPLE_WARMUP or seen % _SAMPLE_EVERY == 0:
            found = self.raw(_JSON_STR.decode(raw))
            kind[0] += found
            kind[1] += size
            return found
        return (size * kind[0] + kind[1] - 1) // kind[1]

    def scaled(self, text: str, length: int) -> int:
        kind = self.ratios[text.isascii()]
        seen = kind[2]
        kind[2] = seen + 1
        if seen < _SAMPLE_WARMUP or seen % _SAMPLE_EVERY == 0:
            found = self.raw(text)
            kind[0] += found
            kind[1] += length
            return found
        return (length * kind[0] + kind[1] - 1) // kind[1]

    def message(self, role: str, content: str) -> int:
        """The tokens of `role\ncontent` (counted whole, by the approximation too: its
        bound holds for the text the template makes, not for its parts added up)."""
        return self.text(role + "\n" + content)

    def request(self, body: JsonObject, endpoint: str) -> int:
        if endpoint == ENDPOINT_TEST or body.get("model") == TEST_MODEL:
            return TEST_MODEL_INPUT_TOKENS
        if endpoint in _CHAT_ENDPOINTS:
            return self.chat(body.get("messages"), body.get("tools"))
        if endpoint == "/v1/responses":
            messages: list[Any] = []
            instructions = body.get("instructions")
            if isinstance(instructions, str) and instructions:
                messages.append({"role": "system", "content": instructions})
            given = body.get("input")
            if isinstance(given, str):
                messages.append({"role": "user", "content": given})
            elif isinstance(given, list):
                messages.extend(given)
            return self.chat(messages, body.get("tools"))
        field_name = "prompt" if endpoint == "/v1/completions" else "input"
        return self.texts(body.get(field_name))

    def texts(self, value: Any) -> int:
        """A string, a list of strings, token ids, or lists of token ids."""
        if isinstance(value, str):
            return self.text(value)
        if not isinstance(value, list):
            return 0
        total = 0
        for item in value:
            if isinstance(item, str):
                total += self.text(item)
            elif isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
        return total

    def chat(self, messages: Any, tools: Any = None) -> int:
        if type(messages) is not list:
            return 0
        if self.tokenizer.chat == "openai":
            return self._openai_chat(messages, tools)
        total = 3  # <|im_start|>assistant\n
        tools_text = _tools_text(tools) if tools else ""
        if tools_text and not (
            messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"
        ):
            total += 3 + self.message("system", "You are a helpful assistant." + tools_text)
            tools_text = ""
        # Once per message of every line: locals, type() checks, the usual case first.
        text = self.text
        for message in messages:
            if type(message) is not dict:
                continue
            role = message.get("role")
            if type(role) is not str:
                role = "user"
            content = message.get("content")
            if type(content) is not str:
                content = _content_text(content)
            if message.get("tool_calls"):
                content += orjson.dumps(message["tool_calls"]).decode()
            if tools_text and role == "system":
                content += tools_text
                tools_text = ""
            # <|im_start|> role\ncontent <|im_end|> \n; see `message`.
            total += 3 + text(role + "\n" + content)
        return total

    def _openai_chat(self, messages: list[Any], tools: Any) -> int:
        total = 3  # every reply is primed with <|start|>assistant<|message|>
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += 3
            role = message.get("role")
            total += self.text(role if isinstance(role, str) else "user")
            total += self.text(_content_text(message.get("content")))
            name = message.get("name")
            if isinstance(name, str):
                total += 1 + self.text(name)
        tools_text = _tools_text(tools)
        if tools_text:
            total += self.text(tools_text)
        return total


def _content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
    return "".join(texts)


def _tools_text(tools: Any) -> str:
    if not isinstance(tools, list) or not tools:
        return ""
    listed = "".join("\n" + orjson.dumps(tool).decode() for tool in tools)
    return _TOOLS_HEAD + listed + _TOOLS_TAIL


def request_tokens(body: JsonObject, endpoint: str, tokenizer: Tokenizer) -> int:
    """PURE: the input tokens the service counts for one request `body` sent to
    `endpoint` (chat template included; see the module's docstring)."""
    return _Counter(tokenizer, memo=False).request(body, endpoint)


def _positive(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def thinks(body: JsonObject, limits: ModelLimits) -> bool:
    """PURE: whether the request produces reasoning tokens: `enable_thinking: true`, or
    unset on a model that thinks by default."""
    setting = body.get("enable_thinking")
    return setting is True or (setting is None and limits.thinks_by_default)


def thinking_unset(body: JsonObject, limits: ModelLimits) -> bool:
    """PURE: the request goes to a model that thinks by default and does not set
    `enable_thinking`: it will think, and reasoning tokens are billed as output."""
    return limits.thinks_by_default and "enable_thinking" not in body


def output_split(
    body: JsonObject, limits: ModelLimits, default_max: int, *, endpoint: str | None = None
) -> tuple[int, int]:
    """PURE: (answer, reasoning) bounds of one request's output tokens; see output_bound."""
    model = body.get("model")
    if endpoint == ENDPOINT_TEST or model == TEST_MODEL:
        return TEST_MODEL_OUTPUT_TOKENS, 0
    if endpoint == ENDPOINT_EMBEDDINGS or (
        endpoint is None
        and "messages" not in body
        and "prompt" not in body
        and isinstance(model, str)
        and "embedding" in model
    ):
        return 0, 0
    most = limits.max_output_tokens or default_max
    answer = body.get("max_tokens")
    if type(answer) is not int or answer < 1:
        answer = (
            _positive(body.get("max_completion_tokens"))
            or _positive(body.get("max_output_tokens"))
            or most
        )
    reasoning = 0
    if thinks(body, limits):
        reasoning = _positive(body.get("thinking_budget")) or most
    choices = choices_of(body)
    return answer * choices, reasoning * choices


def choices_of(body: JsonObject) -> int:
    """PURE: how many choices a request asks for (`n`, each billed its own output): a
    positive integer, else 1 (the service's default; a bad `n` is validation's to report)."""
    return _positive(body.get("n")) or 1


def output_bound(
    body: JsonObject, limits: ModelLimits, default_max: int, *, endpoint: str | None = None
) -> int:
    """PURE: the most output tokens one request may be billed for: its `max_tokens` (or
    `max_completion_tokens`) when a positive integer, else the model's
    `max_output_tokens`, else `default_max`; plus, when it thinks, its `thinking_budget`
    (else the model's maximum again); all of it times `n`, each choice being billed.
    Embeddings: 0; the test model: 6. Without `endpoint`, an embedding request is told
    by its body (`input`, an embedding model)."""
    answer, reasoning = output_split(body, limits, default_max, endpoint=endpoint)
    return answer + reasoning


# --- files ------------------------------------------------------------------------------


class ModelCount(msgspec.Struct, kw_only=True):
    """One model's requests in a file, their input tokens and their cost range.

    `cost_min` prices the input alone (a request produces at least nothing);
    `cost_max` adds every request's output bound. Both are None when the model has no
    price (unknown, never 0). Amounts are in `currency`, batch discount applied."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens_max: int = 0
    # Requests that will think (so bill their output at the thinking price), and those
    # of them that do so only because the model thinks by default.
    thinking: int = 0
    thinking_unset: int = 0
    cost_min: float | None = None
    cost_max: float | None = None
    currency: str | None = None
    tokenizer: str = APPROX
    exact: bool = False
    # Whether `input_tokens` is never below the service's count: exact, or the
    # approximation's bound. False for the sampled fast path (`approx=True`), whose
    # scaled figures can undercount a text unlike the sample.
    bound: bool = True


class FileCount(msgspec.Struct, kw_only=True):
    """A file's counts per model; `skipped` lines were no valid request."""

    path: str
    models: dict[str, ModelCount] = msgspec.field(default_factory=dict)
    skipped: int = 0

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.models.values())

    @property
    def input_tokens(self) -> int:
        return sum(m.input_tokens for m in self.models.values())

    @property
    def tokenizers(self) -> list[str]:
        return sorted({m.tokenizer for m in self.models.values()})

    @property
    def exact(self) -> bool:
        return all(m.exact for m in self.models.values())

    @property
    def bound(self) -> bool:
        """Whether every input figure is at least the service's count (see ModelCount)."""
        return all(m.bound for m in self.models.values())

    def cost(self, which: str) -> float | None:
        """The sum of the models' `cost_min` or `cost_max`; None when any is unknown or
        the currencies differ."""
        values = [getattr(m, f"cost_{which}") for m in self.models.values()]
        if any(v is None for v in values) or len({m.currency for m in self.models.values()}) > 1:
            return None
        return float(sum(values))


class _ModelState:
    """What `count_file` keeps per model while it reads: its figures, and the sums its
    cost is made of, per price tier (a request's tier is chosen by its own input)."""

    __slots__ = ("count", "counter", "fast", "limits", "most", "price", "sums", "thinks_default")

    def __init__(
        self,
        model: str,
        count: ModelCount,
        counter: _Counter,
        limits: ModelLimits,
        default_max: int,
        price: Price | None,
    ) -> None:
        self.count = count
        self.counter = counter
        self.limits = limits
        self.price = price
        # Whether its chat lines may take the fast schema, and what that needs.
        self.fast = counter.sampled and model != TEST_MODEL
        self.most = limits.max_output_tokens or default_max
        self.thinks_default = limits.thinks_by_default
        # tier -> [input tokens, output bound of plain requests, of thinking ones]
        self.sums: dict[int, list[int]] = {}

    def add(self, tokens: int, output: int, thinks: bool) -> None:
        count = self.count
        count.requests += 1
        count.input_tokens += tokens
        count.output_tokens_max += output
        price = self.price
        if price is None:
            return
        tier = price.tier_of(tokens) if price.tiers else 0
        sums = self.sums.get(tier) or self.sums.setdefault(tier, [0, 0, 0])
        sums[0] += tokens
        sums[2 if thinks else 1] += output

    def finish(self) -> None:
        price = self.price
        if price is None:
            return
        self.count.cost_min = sum(price.batch_total(t, s[0], 0, 0) for t, s in self.sums.items())
        self.count.cost_max = sum(
            price.batch_total(t, s[0], s[1], s[2]) for t, s in self.sums.items()
        )


# The fast approximation reads chat lines through this schema: fields it does not name
# are skipped without being built, and a message's content stays raw JSON (its length
# and ASCII-ness are what scaling needs; only sampled texts are decoded). A line that
# does not fit (another endpoint, tools, a content that is not a string, a field of
# another type) goes the general way.
class _FastMessage(msgspec.Struct):
    role: str = "user"
    content: msgspec.Raw = msgspec.Raw(b"null")
    tool_calls: msgspec.Raw | None = None


class _FastBody(msgspec.Struct):
    model: str
    messages: list[_FastMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    n: int | None = None
    tools: msgspec.Raw | None = None


class _FastLine(msgspec.Struct):
    url: str
    body: _FastBody


_FAST_LINE = msgspec.json.Decoder(_FastLine)
_JSON_STR = msgspec.json.Decoder(str)


def _fast_tokens(counter: _Counter, messages: list[_FastMessage]) -> int | None:
    """A chat request's tokens from raw contents (Qwen's template, as `_Counter.chat`;
    long contents as `_Counter.raw_text`, inlined: this runs for every message); None
    when a message needs the general way."""
    total = 3
    ratios = counter.raw_ratios
    for message in messages:
        if message.tool_calls is not None:
            return None
        raw = bytes(message.content)
        if raw[:1] != b'"':
            return None
        size = len(raw)
        system = message.role == "system"
        kind = ratios[system, raw.isascii()] if size >= _SAMPLE_MIN_CHARS else None
        if kind is None or kind[2] < _SAMPLE_WARMUP or not kind[2] % _SAMPLE_EVERY:
            total += 5 + counter.raw_text(raw, system)
        else:
            kind[2] += 1
            total += 5 + (size * kind[0] + kind[1] - 1) // kind[1]
    return total


def _fast_split(body: _FastBody, most: int, thinks_by_default: bool) -> tuple[int, int]:
    """`output_split` of a chat body read through the fast schema, `most` being the
    model's output maximum."""
    answer = body.max_tokens
    if answer is None or answer < 1:
        answer = body.max_completion_tokens
        if answer is None or answer < 1:
            answer = most
    choices = body.n if body.n is not None and body.n > 0 else 1
    thinking = body.enable_thinking
    if thinking is True or (thinking is None and thinks_by_default):
        budget = body.thinking_budget
        reasoning = budget if budget is not None and budget > 0 else most
        return answer * choices, reasoning * choices
    return answer * choices, 0


def count_file(
    path: str | os.PathLike[str],
    provider: str,
    limits: ProviderLimits,
    prices: PriceTable | None = None,
    *,
    approx: bool = False,
) -> FileCount:
    """Count a JSONL batch input file's requests per model: input tokens, output bound,
    requests that think by default without saying so, and the cost range.

    One streaming pass (memory: one line, and a bounded memo of strings); a line that is
    not a request (not JSON, no body, no model) is skipped and counted in `skipped`
    (validate the file first to know why). `prices` defaults to the shipped table.
    `approx` asks for the fast approximation whatever is installed: most long texts are
    scaled by a tokens-per-character ratio measured on a sample of them (see
    _SAMPLE_EVERY); output bounds, thinking and costs are worked out as always."""
    if prices is None:
        from batchd.provider.prices import DEFAULT_PRICES

        prices = DEFAULT_PRICES
    result = FileCount(path=str(path))
    states: dict[str, _ModelState] = {}
    default_max = limits.default_max_output_tokens

    def state_for(model: str) -> _ModelState:
        state = states.get(model)
        if state is None:
            tokenizer = tokenizer_for(provider, model, approx=approx)
            price = prices.price(provider, model)
            count = ModelCount(
                tokenizer=tokenizer.name,
                exact=tokenizer.exact,
                currency=price.currency if price else prices.currency(provider),
            )
            counter = _Counter(tokenizer, sampled=approx and not tokenizer.exact)
            count.bound = not counter.sampled
            state = states[model] = _ModelState(
                model, count, counter, limits.for_model(model), default_max, price
            )
            result.models[model] = count
        return state

    loads = orjson.loads
    fast_line = _FAST_LINE.decode
    with open(path, "rb", buffering=1 << 20) as stream:
        for raw in stream:
            if approx:
                try:
                    line = fast_line(raw)
                except msgspec.MsgspecError:
                    line = None
                if line is not None and line.url in _CHAT_ENDPOINTS and line.body.tools is None:
                    fast = line.body
                    state = states.get(fast.model) or state_for(fast.model)
                    tokens = _fast_tokens(state.counter, fast.messages) if state.fast else None
                    if tokens is not None:
                        answer, reasoning = _fast_split(fast, state.most, state.thinks_default)
                        state.add(tokens, answer + reasoning, reasoning > 0)
                        if reasoning:
                            state.count.thinking += 1
                            if fast.enable_thinking is None:
                                state.count.thinking_unset += 1
                        continue
            try:
                obj = loads(raw)
                body = obj["body"]
                model = body["model"]
                endpoint = obj["url"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                result.skipped += 1
                continue
            if type(model) is not str or type(endpoint) is not str or type(body) is not dict:
                result.skipped += 1
                continue
            state = state_for(model)
            answer, reasoning = output_split(body, state.limits, default_max, endpoint=endpoint)
            state.add(state.counter.request(body, endpoint), answer + reasoning, reasoning > 0)
            if reasoning:
                state.count.thinking += 1
                if thinking_unset(body, state.limits):
                    state.count.thinking_unset += 1
    for state in states.values():
        state.finish()
    return result


# --- single requests --------------------------------------------------------------------


class Worst(msgspec.Struct, frozen=True):
    """One request's figures as planning counts them: its input tokens, its output bound
    (reasoning included), whether it thinks, and its worst-case batch price (None: the
    model has no price)."""

    input_tokens: int
    output_tokens: int
    thinks: bool
    cost: float | None


class RequestCounter:
    """The worst case of single requests, counted exactly as `count_file` counts each
    line of a file (the same tokenizer, output bound and price tier): follow-up parts are
    planned with it, and a published request whose usage is refused or whose result is
    lost is charged its worst case. Tokenizers and prices are looked up once per model."""

    def __init__(
        self, provider: str, limits: ProviderLimits, prices: PriceTable | None = None
    ) -> None:
        if prices is None:
            from batchd.provider.prices import DEFAULT_PRICES

            prices = DEFAULT_PRICES
        self.provider = provider
        self.limits = limits
        self.prices = prices
        self._counters: dict[str, _Counter] = {}

    def price(self, model: str) -> Price | None:
        """The model's price on this provider (None: unknown)."""
        return self.prices.price(self.provider, model)

    def worst(self, body: JsonObject, endpoint: str) -> Worst:
        """PURE but for its memo: the request `body` sent to `endpoint`, counted."""
        model = str(body.get("model"))
        counter = self._counters.get(model)
        if counter is None:
            counter = self._counters[model] = _Counter(tokenizer_for(self.provider, model))
        limits = self.limits.for_model(model)
        answer, reasoning = output_split(
            body, limits, self.limits.default_max_output_tokens, endpoint=endpoint
        )
        tokens = counter.request(body, endpoint)
        output = answer + reasoning
        thinks = reasoning > 0
        price = self.price(model)
        cost = None
        if price is not None:
            tier = price.tier_of(tokens) if price.tiers else 0
            cost = price.batch_total(tier, tokens, 0 if thinks else output, output if thinks else 0)
        return Worst(tokens, output, thinks, cost)
