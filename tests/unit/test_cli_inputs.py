"""`batchd validate`, `split`, `csv2jsonl`, `jsonl2csv` through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchd.cli import main

CORPUS = Path(__file__).parent.parent / "corpus"
GOOD = CORPUS / "good_chat.jsonl"
BAD = CORPUS / "custom_id_duplicate.jsonl"


def test_validate_exits_0_when_every_file_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(GOOD), str(CORPUS / "good_crlf.jsonl")]) == 0
    out = capsys.readouterr().out
    assert f"{GOOD}: ok, 3 requests" in out


def test_validate_exits_1_and_prints_path_line_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(GOOD), str(BAD)]) == 1
    assert f"{BAD}:3: duplicate_custom_id: " in capsys.readouterr().out


def test_validate_json_prints_one_object_per_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--json", str(GOOD), str(BAD)]) == 1
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    keys = {"path", "valid", "requests", "bytes", "model", "endpoint", "parts", "errors"}
    assert keys | {"error_count"} <= set(first)
    assert first["valid"] is True and len(first["parts"]) == 1
    assert second["valid"] is False and second["error_count"] == 1
    assert second["errors"][0]["line"] == 3 and second["errors"][0]["code"] == "duplicate_custom_id"


def test_a_missing_file_is_reported_as_not_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    assert main(["validate", "--json", str(missing)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"][0]["code"] == "unreadable" and report["errors"][0]["line"] is None


def test_no_split_and_max_errors(capsys: pytest.CaptureFixture[str]) -> None:
    over = CORPUS / "test_model_101_split.jsonl"
    assert main(["validate", str(over)]) == 0
    assert "2 parts" in capsys.readouterr().out
    assert main(["validate", "--no-split", str(over)]) == 1
    assert "too_many_requests" in capsys.readouterr().out
    assert (
        main(["validate", "--json", "--max-errors", "1", str(CORPUS / "not_an_object.jsonl")]) == 1
    )
    report = json.loads(capsys.readouterr().out)
    assert len(report["errors"]) == 1 and report["error_count"] == 4


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--config", str(tmp_path / "none.toml"), str(GOOD)]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--max-errors", "0", str(GOOD)])
    assert exit_info.value.code == 2
    capsys.readouterr()


def test_config_limits_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text("[limits]\nmax_line_bytes = 100\n")
    assert main(["validate", "--config", str(config), str(GOOD)]) == 1
    assert "line_too_long" in capsys.readouterr().out


def test_split_writes_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = CORPUS / "test_model_101_split.jsonl"
    out = tmp_path / "parts"
    assert main(["split", str(source), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["test_model_101_split.part-001.jsonl", "test_model_101_split.part-002.jsonl"]
    assert b"".join((out / n).read_bytes() for n in names) == source.read_bytes()
    assert main(["split", str(GOOD), "--out", str(tmp_path / "none")]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert main(["split", str(GOOD), "--max-requests", "2", "--out", str(tmp_path / "two")]) == 0
    assert len(list((tmp_path / "two").iterdir())) == 2
    assert main(["split", str(BAD), "--out", str(tmp_path / "bad")]) == 1


def test_csv2jsonl_and_jsonl2csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "input.csv"
    source.write_text("custom_id,content\n1,hello\n2,world\n")
    assert main(["csv2jsonl", str(source), "--model", "batch-test-model"]) == 0
    converted = tmp_path / "input.jsonl"
    assert main(["validate", str(converted)]) == 0
    first = json.loads(converted.read_bytes().splitlines()[0])
    assert first["url"] == "/v1/chat/ds-test"
    result = tmp_path / "result.jsonl"
    result.write_text('{"custom_id":"1","response":{"status_code":200,"body":{"model":"m"}}}\n')
    assert main(["jsonl2csv", str(result), "-o", str(tmp_path / "out.csv")]) == 0
    assert (tmp_path / "out.csv").read_bytes().startswith(b"\xef\xbb\xbfcustom_id,model")
    source.write_text("1,a\n1,b\n")
    assert main(["csv2jsonl", str(source), "-o", str(tmp_path / "dup.jsonl"), "--model", "m"]) == 1
    assert ":2: duplicate_custom_id" in capsys.readouterr().err
    assert main(["csv2jsonl", str(tmp_path / "nope.csv"), "--model", "m"]) == 2


def test_validate_checks_as_the_daemon_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configuration's job settings apply, and a CSV is converted as the daemon
    converts it (model from its sidecar or jobs.csv_model), not parsed as JSONL."""
    for name in [k for k in __import__("os").environ if k.upper().startswith("BATCHD_")]:
        monkeypatch.delenv(name)
    mixed = tmp_path / "mixed.jsonl"
    rows = [
        {"custom_id": f"m{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}
        for i, model in enumerate(["qwen-plus", "qwen-max"])
    ]  # fmt: skip
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["validate", str(mixed)]) == 1  # mixed models: not by default
    config = tmp_path / "c.toml"
    config.write_text('[jobs]\ngroup_by_model = true\ncsv_model = "qwen-plus"\n')
    assert main(["validate", "--config", str(config), str(mixed)]) == 0  # as the daemon
    capsys.readouterr()

    table = tmp_path / "rows.csv"
    table.write_text("custom_id,content\nc1,hello\nc2,world\n")
    assert main(["validate", str(table)]) == 1
    assert "csv_needs_model" in capsys.readouterr().out
    assert main(["validate", "--config", str(config), str(table)]) == 0
    assert "ok, 2 requests" in capsys.readouterr().out
    (tmp_path / "rows.meta.json").write_text('{"model": "qwen-max"}')
    assert main(["validate", str(table)]) == 0
    assert "qwen-max" in capsys.readouterr().out
    (tmp_path / "rows.meta.json").write_text('{"modle": "qwen-max"}')
    assert main(["validate", str(table)]) == 1
    assert "did you mean 'model'" in capsys.readouterr().out
    (tmp_path / "rows.meta.json").unlink()
    table.write_text("id,text\nc1,hello\n")
    assert main(["validate", "--config", str(config), str(table)]) == 1
    assert "csv_header" in capsys.readouterr().out
    # Declared columns make `id,text` the header; the config's and the sidecar's alike.
    config.write_text(
        '[jobs]\ncsv_model = "qwen-plus"\n[jobs.csv_columns]\ncustom_id = "id"\ncontent = "text"\n'
    )
    assert main(["validate", "--config", str(config), str(table)]) == 0
    assert "ok, 1 requests" in capsys.readouterr().out
    (tmp_path / "rows.meta.json").write_text(
        '{"model": "qwen-max", "columns": {"custom_id": "id", "content": "text"}}'
    )
    assert main(["validate", str(table)]) == 0
    capsys.readouterr()


def test_validate_reads_a_jsonl_files_sidecar_as_the_daemon_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar beside a JSONL file is the daemon's too: a misspelt key or a window the
    provider refuses rejects the file in `validate` as it would in the daemon."""
    for name in [k for k in __import__("os").environ if k.upper().startswith("BATCHD_")]:
        monkeypatch.delenv(name)
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD.read_bytes())
    assert main(["validate", str(good)]) == 0
    (tmp_path / "good.meta.json").write_text('{"completion_window": "2h"}')
    assert main(["validate", str(good)]) == 1
    assert "completion_window_invalid" in capsys.readouterr().out
    (tmp_path / "good.meta.json").write_text('{"priorty": 1}')
    assert main(["validate", str(good)]) == 1
    assert "sidecar_invalid" in capsys.readouterr().out


def test_csv2jsonl_takes_the_column_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "rows.csv"
    source.write_text("key,prompt\nk1,hello\n")
    assert main(["csv2jsonl", str(source), "--model", "m"]) == 1
    assert "csv_header" in capsys.readouterr().err
    assert main(["csv2jsonl", str(source), "--model", "m", "--columns", "key,prompt"]) == 0
    assert json.loads((tmp_path / "rows.jsonl").read_bytes())["custom_id"] == "k1"
    assert main(["csv2jsonl", str(source), "--model", "m", "--columns", "key"]) == 2
    capsys.readouterr()


def test_validate_refuses_what_the_daemon_refuses_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over jobs.max_input_bytes the daemon rejects a file on its size: so does validate."""
    for name in [k for k in __import__("os").environ if k.upper().startswith("BATCHD_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "c.toml"
    config.write_text("[jobs]\nmax_input_bytes = 100\n")
    assert main(["validate", "--config", str(config), str(GOOD)]) == 1
    assert "input_too_large" in capsys.readouterr().out


def _submit(tmp_path: Path, *argv: str) -> int:
    """`batchd submit` with no daemon answering: the files are queued in `inbox/`."""
    (tmp_path / "inbox").mkdir(exist_ok=True)
    base = ["submit", "--inbox", str(tmp_path / "inbox"), "--socket", str(tmp_path / "no.sock")]
    return main([*base, *argv])


def test_submit_takes_the_sidecar_beside_the_file_with_the_flags_over_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`submit f.jsonl` reads f.meta.json beside it, as `validate` does and the inbox
    would: its `max_cost` is not dropped, a CSV's model is there; flags win over it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "f.jsonl").write_bytes(GOOD.read_bytes())
    (work / "f.meta.json").write_text('{"max_cost": 0.5, "completion_window": "24h"}')
    (work / "rows.csv").write_text("custom_id,content\nc1,hello\n")
    (work / "rows.meta.json").write_text('{"model": "qwen-plus"}')
    code = _submit(tmp_path, "--window", "48h", str(work / "f.jsonl"))
    assert code == 0, capsys.readouterr().err
    queued = json.loads((tmp_path / "inbox" / "f.meta.json").read_text())
    assert queued["max_cost"] == 0.5 and queued["completion_window"] == "48h"
    assert queued["submit_id"]
    assert _submit(tmp_path, str(work / "rows.csv")) == 0
    assert json.loads((tmp_path / "inbox" / "rows.meta.json").read_text())["model"] == "qwen-plus"
    # A sidecar the daemon would refuse is refused here, naming it.
    (work / "bad.jsonl").write_bytes(GOOD.read_bytes())
    (work / "bad.meta.json").write_text('{"modle": "qwen-plus"}')
    capsys.readouterr()
    assert _submit(tmp_path, str(work / "bad.jsonl")) == 1
    err = capsys.readouterr().err
    assert "bad.meta.json" in err and "did you mean 'model'" in err, err
    assert not (tmp_path / "inbox" / "bad.jsonl").exists()


@pytest.mark.parametrize("name", ["~x", ".x", "a~syncthing~b"])
def test_submit_refuses_a_name_the_inbox_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Such a file would wait in the inbox unclaimed for good (`--wait` ended rc 4):
    a usage error instead, and nothing is queued."""
    assert _submit(tmp_path, "--name", name, str(GOOD)) == 2
    err = capsys.readouterr().err
    assert "the inbox ignores" in err and "--name" in err, err
    assert list((tmp_path / "inbox").iterdir()) == []
    tilde = tmp_path / "~data.jsonl"
    tilde.write_bytes(GOOD.read_bytes())
    assert _submit(tmp_path, str(tilde)) == 2
    assert list((tmp_path / "inbox").iterdir()) == []
