"""Every file of tests/corpus gets the verdict its manifest (verdicts.json) records: the
verdict of batchd.inputs.verdict, as `batchd validate` and the daemon give it (its sidecar
NAME.meta.json read too; a CSV converted with the model qwen-plus unless its sidecar
names another). tests/integration/test_one_verdict.py proves the daemon agrees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.config import PROFILES, ProviderLimits, merge_limits
from batchd.documents import JobOptions
from batchd.inputs.verdict import Rules, judge, read_sidecar, sidecar_path

CORPUS = Path(__file__).parent.parent / "corpus"
VERDICTS: dict[str, dict[str, Any]] = json.loads((CORPUS / "verdicts.json").read_text())


def test_manifest_and_corpus_list_the_same_files() -> None:
    on_disk = {p.name for pattern in ("*.jsonl", "*.csv") for p in CORPUS.glob(pattern)}
    assert on_disk == set(VERDICTS)
    # Every sidecar belongs to an input of the corpus.
    for meta in CORPUS.glob("*.meta.json"):
        stem = meta.name.removesuffix(".meta.json")
        assert {f"{stem}.jsonl", f"{stem}.csv"} & on_disk, meta.name


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_corpus_file_gets_its_recorded_verdict(name: str, tmp_path: Path) -> None:
    case = VERDICTS[name]
    limits: ProviderLimits = merge_limits(PROFILES["dashscope"].limits, case.get("limits", {}))
    kind = name.rsplit(".", 1)[1]
    path = CORPUS / name
    rules = Rules(limits=limits, csv_model="qwen-plus", **case.get("options", {}))
    report = judge(
        path, kind, read_sidecar(sidecar_path(path, kind)) or JobOptions(), rules, tmp_path
    )
    got = [[e.line, e.code] for e in report.errors]
    assert got == case["errors"], [e.render(name) for e in report.errors]
    assert report.valid is case["valid"]
    assert report.error_count == len(case["errors"])
    for error in report.errors:
        assert error.message
        rendered = error.render(str(path))
        assert rendered.startswith(str(path)) and error.code in rendered
    if "parts" in case:
        assert [[p.first_line, p.last_line] for p in report.parts] == case["parts"]
