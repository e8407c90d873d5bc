"""A CSV input's text encoding (issue 16): the sidecar's `encoding` over
`jobs.csv_encoding` over UTF-8; a file not in it is refused naming its first such line
and the fix, with the encoding its bytes read as when that is clear."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from batchd.config import Settings
from batchd.documents import JobOptions
from batchd.errors import ConfigError
from batchd.inputs.csvio import (
    SNIFF_BYTES,
    csv_file_to_jsonl,
    csv_source,
    encoding_problem,
    first_undecodable,
    guess_encoding,
)
from batchd.inputs.verdict import Rules, sidecar_options

CHINESE = "custom_id,content\n1,这家餐厅的菜很好吃，服务也很周到。\n2,物流太慢了，包装也破了。\n"


def test_a_gbk_file_is_refused_naming_its_line_and_gb18030(tmp_path: Path) -> None:
    source = tmp_path / "reviews.csv"
    source.write_bytes(CHINESE.encode("gbk"))
    result = csv_file_to_jsonl(source, tmp_path / "out.jsonl", model="qwen-plus")
    (problem,) = result.errors
    assert problem.code == "not_text" and problem.line is None
    assert problem.message.startswith("line 2 is not UTF-8 text (invalid continuation byte);")
    assert '"encoding": "gb18030" in NAME.meta.json, or jobs.csv_encoding' in problem.message
    assert not (tmp_path / "out.jsonl").exists()

    # Read in the encoding named, the text arrives whole.
    ok = csv_file_to_jsonl(source, tmp_path / "out.jsonl", model="qwen-plus", encoding="gb18030")
    assert ok.ok and ok.rows == 2
    assert "这家餐厅的菜很好吃" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")


def test_the_command_line_names_its_own_flag(tmp_path: Path) -> None:
    source = tmp_path / "reviews.csv"
    source.write_bytes(CHINESE.encode("gbk"))
    result = csv_file_to_jsonl(
        source, tmp_path / "o.jsonl", model="qwen-plus", encoding_flag="--encoding"
    )
    assert result.errors[0].message.endswith("set --encoding gb18030")


def test_the_bad_line_is_found_past_chunks_and_characters_cut_between_them(
    tmp_path: Path,
) -> None:
    # Each line holds a 3-byte character; the lines' length cuts one in two at the first
    # chunk boundary. Line 3001 then holds a byte UTF-8 never starts with.
    line = ("x" * 18 + "好\n").encode("utf-8")  # 22 bytes
    assert SNIFF_BYTES % len(line) == 20  # between the character's 2nd and 3rd byte
    body = line * 3000 + b"3001,\xff\n" + line
    assert len(line * 3000) > SNIFF_BYTES
    source = tmp_path / "long.csv"
    source.write_bytes(body)
    assert first_undecodable(source, "utf-8-sig") == (3001, "invalid start byte")
    source.write_bytes(line * 3000)
    assert first_undecodable(source, "utf-8") is None
    source.write_bytes(line + "好".encode()[:2])  # cut short at the end
    assert first_undecodable(source, "utf-8") == (2, "unexpected end of data")


@pytest.mark.parametrize(
    ("head", "tried", "guess"),
    [
        (CHINESE.encode("gbk"), "utf-8-sig", "gb18030"),
        (CHINESE.encode("gb18030"), "utf-8", "gb18030"),
        (CHINESE.encode("gbk"), "gbk", None),  # already tried
        (CHINESE.encode("utf-8"), "gbk", "utf-8"),
        (CHINESE.encode("utf-16"), "utf-8-sig", "utf-16"),
        # Western text in cp1252 also reads as GB18030: never taken for Chinese.
        ("1,résumé café naïve, Ærø\n".encode("cp1252"), "utf-8-sig", None),
        # Traditional Chinese in Big5: no safe guess.
        ("1,這家餐廳的服務很好\n".encode("big5"), "utf-8-sig", None),
        (b"1,plain\n", "gbk", None),
    ],
)
def test_a_guess_is_made_only_when_clear(head: bytes, tried: str, guess: str | None) -> None:
    assert guess_encoding(head, tried) == guess


def test_an_encoding_must_be_a_text_encoding_python_knows() -> None:
    assert encoding_problem("GBK") is None and encoding_problem("utf-8-sig") is None
    assert "'gbkk' is not an encoding Python knows" in (encoding_problem("gbkk") or "")
    assert "not a text encoding" in (encoding_problem("base64") or "")
    assert encoding_problem(936) is not None and encoding_problem(" ") is not None
    assert codecs.lookup("gb18030")  # the one the messages advise


def test_the_sidecar_encoding_is_checked_and_wins_over_the_configuration() -> None:
    bad = sidecar_options("reviews.meta.json", b'{"encoding": "gbkk"}').sidecar_error
    assert bad.startswith("reviews.meta.json: encoding: 'gbkk'")
    own = sidecar_options("reviews.meta.json", b'{"encoding": "gbk", "model": "qwen-plus"}')
    plan = csv_source(own, model=None, system_prompt=None, encoding="utf-8-sig")
    assert not isinstance(plan, Exception) and getattr(plan, "encoding", None) == "gbk"
    plan = csv_source(JobOptions(), model="qwen-plus", system_prompt=None, encoding="gb18030")
    assert getattr(plan, "encoding", None) == "gb18030"


def test_the_configuration_takes_an_encoding_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[jobs]\ncsv_encoding = "gb18030"\n')
    assert Rules.of(Settings.load(config)).csv_encoding == "gb18030"
    assert Rules().csv_encoding == Settings.load(None).jobs.csv_encoding == "utf-8-sig"
    config.write_text('[jobs]\ncsv_encoding = "gbkk"\n')
    with pytest.raises(ConfigError, match=r"jobs\.csv_encoding.*'gbkk'"):
        Settings.load(config)
