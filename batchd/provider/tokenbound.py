"""An upper bound of a text's tokens, for when the vocabulary itself cannot run here.

PURE: no network, no store. `tokens` uses `bound(family)` wherever it cannot count
exactly (`dashscope` or `tiktoken` not installed, an OpenAI encoding not cached,
`estimate --approx`); budgets rely on it, so it must never count less than the service.

Why it is a bound (for the tiktoken BPE of Qwen's vocabulary, and of OpenAI's o200k_base
and cl100k_base). Every token starts at some byte of the text; charge it to the unit
(below) that byte belongs to. A byte-level BPE token is at least one byte, so at most
`bytes(u)` tokens start inside a unit u: the count is at most the text's UTF-8 bytes,
whatever the text. Two kinds of unit do better, each for reasons checked against the
vocabularies themselves (`derive_units`, re-derived from Qwen's by the tests):

- A certified word: " word" (a space and ASCII letters shaped `[A-Z]*[a-z]+` or
  `[A-Z]+`) or "word" at the start of a text, after a line break or a digit, followed by
  an ASCII character that is no letter and no apostrophe (or the end). In all three
  pre-tokenizers that is exactly one piece (a space before letters is never taken by
  the piece before it; o200k splits letters only at a case change, which those shapes
  exclude, and attaches "'s" only after an apostrophe); when the piece is one of the
  vocabulary's tokens (`words`), tiktoken encodes it as that one token.
- A credited character: a multi-byte character that is a token (`stable`: every way
  of cutting its bytes in two or more parts leaves two adjacent parts that merge, so
  BPE never stops inside it), whose neighbours are neither ASCII nor a `poison`
  character. BPE stops only when no two adjacent parts of a piece form a token; a
  stable character's bytes therefore end as one token, or inside a token that covers
  it whole, unless some token holds part of it and part of a neighbour. The tokens
  that cross a character's edge were listed from each vocabulary: they pair a partial
  character with ASCII (" \\xe5"), with a `poison` character ("选\\xe6\\x8b"), or with
  another partial (then the partial's characters are `poison` themselves). So at most
  one token starts in a credited character.

The bound is then `bytes - sum(len(word) - 1) - sum(bytes(char) - 1)` over certified
words and credited characters. Qwen normalises text to NFC and cuts long texts into
chunks first; `tokens` bounds each chunk of the normalised text. How loose it is (on
tests/fixtures/tokens_corpus.jsonl): docs/costs.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import pairwise, repeat

QWEN = "qwen"
OPENAI = "openai"
FAMILIES = (QWEN, OPENAI)

_RESOURCE = "approx_units.json.gz"

# A certified word: its leading space (or a start: text, line, after a digit), letters in
# one of o200k's piece shapes, then an ASCII non-letter that is no apostrophe, or the end.
WORD_PATTERN = re.compile(
    r"(?:(?<![^\n\r0-9])| )(?:[A-Z]*[a-z]+|[A-Z]+)(?=[\x00-&(-@\[-`{-\x7f]|\Z)"
)
_SHAPE = re.compile(rb"[A-Z]*[a-z]+|[A-Z]+")

# Classes of characters after `str.translate`: "a" ASCII, "z" poison, "2"/"3"/"4" a
# stable character of that many bytes, "." an uncredited one; any other character stays
# as it is (multi-byte, never credited, harmless to its neighbours).
_UNCREDIT = tuple(
    (old, new)
    for mark in "234"
    for old, new in (
        ("a" + mark, "a."),
        ("z" + mark, "z."),
        (mark + "a", ".a"),
        (mark + "z", ".z"),
    )
)


@dataclass(frozen=True, slots=True)
class Units:
    """What the bound may rely on for one family of vocabularies (see the module)."""

    words: frozenset[str]  # " word" and "word" forms that are one token in each
    stable: str  # multi-byte characters that BPE never leaves cut, in each
    poison: str  # characters a token may join to part of their neighbour


class Bound:
    """The bound for one family (`__call__(text)`: at least its token count)."""

    def __init__(self, units: Units) -> None:
        self.savings = {word: len(word) - 1 for word in units.words}
        table: dict[int, str] = {code: "a" for code in range(128)}
        for char in units.stable:
            table[ord(char)] = str(len(char.encode("utf-8")))
        for char in units.poison:
            table[ord(char)] = "z"
        self.table = table

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        total = len(text.encode("utf-8", "surrogatepass"))
        found = WORD_PATTERN.findall(text)
        if found:
            total -= sum(map(self.savings.get, found, repeat(0)))
        if not text.isascii():
            classes = text.translate(self.table)
            for old, new in _UNCREDIT:
                classes = classes.replace(old, new)
            total -= classes.count("2") + 2 * classes.count("3") + 3 * classes.count("4")
        return total


@cache
def bound(family: str) -> Bound:
    """The bound of `family` ("qwen", or "openai": o200k_base and cl100k_base at once),
    loaded once from the shipped table."""
    return Bound(shipped_units()[family])


@cache
def shipped_units() -> dict[str, Units]:
    """The table shipped in batchd/provider/resources (written by
    `python -m batchd.provider.tokenbound`)."""
    raw = resources.files("batchd.provider.resources").joinpath(_RESOURCE).read_bytes()
    data = json.loads(gzip.decompress(raw))
    return {
        family: Units(
            words=frozenset(data[family]["words"]),
            stable=data[family]["stable"],
            poison=data[family]["poison"],
        )
        for family in FAMILIES
    }


# --- derivation (from the vocabularies; run by a maintainer, checked by the tests) -------


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte < 0xC0


def _char_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    return 4 if 0xF0 <= lead < 0xF8 else 0


def _cut(token: bytes) -> tuple[bytes, list[bytes], bytes] | None:
    """A token's bytes as (the end of a character, whole characters, the start of one);
    None when the token lies inside one character."""
    i = 0
    while i < len(token) and _is_continuation(token[i]):
        i += 1
    tail, wholes = token[:i], list[bytes]()
    while i < len(token):
        length = _char_length(token[i])
        chunk = token[i : i + length]
        if length == 0 or not all(map(_is_continuation, chunk[1:])):
            raise ValueError(f"token {token!r} is not UTF-8 in pieces")
        if len(chunk) < length:
            if not tail and not wholes:
                return None
            return tail, wholes, chunk
        wholes.append(chunk)
        i += length
    if tail and not wholes:
        return None
    return tail, wholes, b""


def _stable(char: bytes, ranks: Mapping[bytes, int]) -> bool:
    """Whether BPE can never stop with `char`'s bytes cut: it is a token, and every cut
    into two or more parts leaves two adjacent parts that form a token."""
    if char not in ranks:
        return False
    n = len(char)
    for cuts in range(1, 1 << (n - 1)):
        edges = [0, *(i + 1 for i in range(n - 1) if cuts >> i & 1), n]
        parts = [char[a:b] for a, b in pairwise(edges)]
        if not any(a + b in ranks for a, b in pairwise(parts)):
            return False
    return True


def derive_units(vocabularies: Iterable[Mapping[bytes, int]]) -> Units:
    """PURE: the units the bound may rely on for every one of `vocabularies` (token bytes
    -> rank, as tiktoken reads them) at once. About a second per vocabulary."""
    chosen = list(vocabularies)
    first = chosen[0]

    def everywhere(token: bytes) -> bool:
        return all(token in ranks for ranks in chosen)

    words = {
        token.decode()
        for token in first
        if everywhere(token)
        and (
            (token[:1] == b" " and _SHAPE.fullmatch(token, 1) is not None)
            or _SHAPE.fullmatch(token) is not None
        )
    }
    poison: set[str] = set()
    split_heads: set[bytes] = set()
    for ranks in chosen:
        for token in ranks:
            cut = _cut(token) if len(token) > 1 else None
            if cut is None:
                continue
            tail, wholes, head = cut
            if not tail and not head:
                continue
            if not wholes:
                # Two partial characters: each character starting like `head` is poison
                # (its neighbour loses the credit); the other's is lost with it.
                split_heads.add(head)
                continue
            if head:
                poison.add(wholes[-1].decode())
            if tail:
                poison.add(wholes[0].decode())
    poison = {char for char in poison if not char.isascii()}
    for head in split_heads:
        poison.update(_completions(head))
    stable = sorted(
        char
        for char in map(_one_char, first)
        if char and char not in poison and all(_stable(char.encode(), r) for r in chosen)
    )
    return Units(words=frozenset(words), stable="".join(stable), poison="".join(sorted(poison)))


def _one_char(token: bytes) -> str:
    """The multi-byte character a token is, or ""."""
    try:
        text = token.decode()
    except UnicodeDecodeError:
        return ""
    return text if len(text) == 1 and not text.isascii() else ""


def _completions(head: bytes) -> set[str]:
    """Every character whose UTF-8 starts with `head` (a lead byte and maybe more)."""
    missing = _char_length(head[0]) - len(head)
    found = set()
    for rest in range(64**missing):
        tail = bytes(0x80 | (rest >> (6 * k)) & 0x3F for k in reversed(range(missing)))
        try:
            found.add((head + tail).decode())
        except UnicodeDecodeError:
            continue
    return found


def _dump(units: dict[str, Units], sources: dict[str, str]) -> bytes:
    data: dict[str, object] = {"sources": sources}
    for family, unit in units.items():
        data[family] = {
            "words": sorted(unit.words),
            "stable": unit.stable,
            "poison": unit.poison,
        }
    return gzip.compress(json.dumps(data, ensure_ascii=False).encode(), mtime=0)


def main() -> None:  # pragma: no cover - a maintainer's tool, run by hand
    """Write batchd/provider/resources/approx_units.json.gz from Qwen's vocabulary (the
    `dashscope` package) and OpenAI's o200k_base and cl100k_base (tiktoken's cache)."""
    from pathlib import Path

    from batchd.provider.tokens import openai_ranks, qwen_ranks

    qwen = qwen_ranks()
    o200k, cl100k = openai_ranks("o200k_base"), openai_ranks("cl100k_base")
    if qwen is None or o200k is None or cl100k is None:
        raise SystemExit("needs dashscope and the o200k_base and cl100k_base files cached")
    sources = {
        name: hashlib.sha256(b"".join(sorted(k + b"%d" % v for k, v in ranks.items()))).hexdigest()
        for name, ranks in (("qwen", qwen), ("o200k_base", o200k), ("cl100k_base", cl100k))
    }
    units = {QWEN: derive_units([qwen]), OPENAI: derive_units([o200k, cl100k])}
    target = Path(__file__).parent / "resources" / _RESOURCE
    target.write_bytes(_dump(units, sources))
    print(f"wrote {target}")


if __name__ == "__main__":  # pragma: no cover
    main()
