"""Every file of tests/corpus gets the verdict its manifest (verdicts.json) records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.config import PROFILES, ProviderLimits, merge_limits
from batchd.validate import validate_file

CORPUS = Path(__file__).parent.parent / "corpus"
VERDICTS: dict[str, dict[str, Any]] = json.loads((CORPUS / "verdicts.json").read_text())


def test_manifest_and_corpus_list_the_same_files() -> None:
    on_disk = {p.name for p in CORPUS.glob("*.jsonl")}
    assert on_disk == set(VERDICTS)


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_corpus_file_gets_its_recorded_verdict(name: str) -> None:
    case = VERDICTS[name]
    limits: ProviderLimits = merge_limits(PROFILES["dashscope"].limits, case.get("limits", {}))
    report = validate_file(CORPUS / name, limits, **case.get("options", {}))
    got = [[e.line, e.code] for e in report.errors]
    assert got == case["errors"], [e.render(name) for e in report.errors]
    assert report.valid is case["valid"]
    assert report.error_count == len(case["errors"])
    for error in report.errors:
        assert error.message
        rendered = error.render(name)
        assert rendered.startswith(name) and error.code in rendered
    if "parts" in case:
        assert [[p.first_line, p.last_line] for p in report.parts] == case["parts"]
