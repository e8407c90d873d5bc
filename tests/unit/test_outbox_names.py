"""Outbox names: the input's name is kept wherever it is safe for a folder, and a name
used before is numbered (`intake.outbox_name`, `publish.numbered_name`, `copy_number`)."""

from __future__ import annotations

import os
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchd.pipeline.intake import (
    MAX_NAME_BYTES,
    NAME_MAX_BYTES,
    TEMP_NAME_EXTRA_BYTES,
    name_hex,
    outbox_name,
    storable_name,
)
from batchd.pipeline.publish import MAX_COPIES, copy_number, numbered_name


@pytest.mark.parametrize(
    ("stem", "folder"),
    [
        ("评论 数据", "评论 数据"),  # spaces and non-ASCII are safe
        ("Ünïcödé – “quotes” & $shell 'chars' (1)", "Ünïcödé – “quotes” & $shell 'chars' (1)"),
        ("全角　スペース", "全角　スペース"),  # an ideographic space is a space
        ("emoji 🙂👍🏽 family 👨‍👩‍👧", "emoji 🙂👍🏽 family 👨‍👩‍👧"),  # ZWJ kept
        (" lead and trail ", " lead and trail "),
        ("up..down", "up..down"),
        ("trailing.", "trailing."),
        ("a/b", "a_b"),
        ("nul\x00byte", "nul_byte"),
        ("line\nbreak\ttab\rcr", "line_break_tab_cr"),
        ("esc\x1b[2Jape\x7f", "esc_[2Jape_"),
        ("c1\x85next", "c1_next"),
        ("sep\u2028par\u2029", "sep_par_"),
        ("invoice\u202egpj.exe", "invoice_gpj.exe"),  # right-to-left override
        ("iso\u2066late\u2069", "iso_late_"),
        (os.fsdecode(b"caf\xe9-latin1"), "caf_-latin1"),  # an undecodable byte
        (os.fsdecode(b"\xff\xfe"), "__"),
        (".hidden", "_hidden"),
        ("..", "_."),
        (".", "_"),
        ("-rf", "_rf"),
        ("--", "_-"),
        ("x-2", "x-2"),
    ],
)
def test_a_name_is_kept_but_for_what_a_folder_name_must_not_hold(stem: str, folder: str) -> None:
    assert outbox_name(stem) == folder


def test_a_long_name_is_cut_on_a_character_to_leave_room_for_the_temp_and_copy_names() -> None:
    assert MAX_NAME_BYTES == 222
    # `.NAME-999999.tmp-JOBID` fits NAME_MAX.
    assert MAX_NAME_BYTES + len("-999999") + TEMP_NAME_EXTRA_BYTES == NAME_MAX_BYTES
    assert outbox_name("a" * 249) == "a" * 222
    assert outbox_name("中" * 83) == "中" * 74  # 222 bytes
    assert outbox_name("a" + "é" * 150) == "a" + "é" * 110  # 221 bytes: no half "é"
    assert outbox_name("a" * 222) == "a" * 222


@given(st.text(max_size=300))
def test_any_name_becomes_a_safe_folder_name_and_a_safe_one_stays_as_it_is(stem: str) -> None:
    folder = outbox_name(stem)
    raw = folder.encode("utf-8")  # valid UTF-8: no surrogate is left
    assert 0 < len(raw) <= MAX_NAME_BYTES
    assert "/" not in folder and not folder.startswith((".", "-"))
    assert all(unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp") for c in folder)
    assert outbox_name(folder) == folder
    # Character for character in place (a long name loses its end): only the replaced
    # ones differ, and by "_".
    if stem:
        assert len(folder) <= len(stem)
        assert all(
            made in (given_char, "_") for given_char, made in zip(stem, folder, strict=False)
        )
    else:
        assert folder == "job"


@given(st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_the_inbox_name_is_recorded_exactly_or_with_its_bytes(raw: bytes) -> None:
    name = os.fsdecode(raw)
    text = storable_name(name)
    text.encode("utf-8")  # storable: valid UTF-8
    try:
        exact = raw.decode("utf-8")
    except UnicodeDecodeError:
        assert name_hex(name) == raw.hex()
        assert text == raw.decode("utf-8", "backslashreplace")
    else:
        assert (text, name_hex(name)) == (exact, None)


def test_a_name_used_before_is_numbered_and_each_number_is_read_back() -> None:
    assert numbered_name("评论 数据", 1) == "评论 数据"
    assert numbered_name("评论 数据", 2) == "评论 数据-2"
    for n in (2, 3, 10, MAX_COPIES):
        assert copy_number("x", numbered_name("x", n)) == n
    assert copy_number("x-2", "x-2-2") == 2
    for folder in ("x", "x-1", "x-02", "x-", "x-2a", "x-٢", "y-2", "x2", f"x-{MAX_COPIES + 1}"):
        assert copy_number("x", folder) is None, folder
