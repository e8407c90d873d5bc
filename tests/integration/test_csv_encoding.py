"""GBK CSVs of Chinese text through the daemon and `batchd validate` (issue 16): read in
`jobs.csv_encoding` or the sidecar's `encoding`, the text reaches the service whole; a
file not in its encoding is rejected naming the line and the fix."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from batchd.testing import (
    StartEmulator,
    cli,
    daemon_settings,
    drop_all,
    read_jsonl,
    running_daemon,
    summary,
    wait_published,
)

REVIEWS = (
    "custom_id,content\n"
    "1,这家餐厅的菜很好吃，服务也很周到。\n"
    '2,"物流太慢了，包装也破了，客服一直不回复。"\n'
    "3,性价比很高，下次还会再来。\n"
)


async def test_a_gbk_csv_runs_in_its_encoding_and_is_refused_in_another(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator(time_scale=3000)
    settings = daemon_settings(
        tmp_path / "root", emulator, jobs={"csv_model": "qwen-plus", "csv_encoding": "gb18030"}
    )
    gbk = REVIEWS.encode("gbk")
    async with running_daemon(settings) as daemon:
        drop_all(
            daemon.inbox,
            {
                # The sidecar's encoding wins over jobs.csv_encoding: this one is refused.
                "declared.meta.json": b'{"encoding": "utf-8"}',
                "declared.csv": gbk + "4,第四条评论\n".encode("gbk"),  # no twin of reviews
                "reviews.csv": gbk,
            },
        )
        folders = await wait_published(daemon.outbox, 2, emulator)
    by_name = {f.name: f for f in folders}

    reviews = summary(by_name["reviews"])
    assert reviews["status"] == "completed" and reviews["request_counts"]["completed"] == 3
    answers = {
        r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
        for r in read_jsonl(by_name["reviews"] / "result.jsonl")
    }
    # The emulator answers with the prompt's end: the Chinese text arrived whole.
    assert answers["2"].endswith("物流太慢了，包装也破了，客服一直不回复。")
    assert answers["3"].endswith("性价比很高，下次还会再来。")

    assert summary(by_name["declared"])["status"] == "rejected"
    report = orjson.loads((by_name["declared"] / "report.json").read_bytes())
    (error,) = report["errors"]
    assert error["code"] == "not_text"
    assert error["message"].startswith("line 2 is not UTF-8 text")
    assert '"encoding": "gb18030" in NAME.meta.json' in error["message"]


async def test_validate_reads_the_sidecars_encoding_and_names_the_fix_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "reviews.csv"
    source.write_bytes(REVIEWS.encode("gbk"))
    config = tmp_path / "batchd.toml"
    config.write_text('[jobs]\ncsv_model = "qwen-plus"\n')
    code, out, _ = await cli(capsys, "validate", "--config", str(config), str(source))
    assert code == 1
    assert "reviews.csv: not_text: line 2 is not UTF-8 text (invalid continuation byte)" in out
    assert 'set "encoding": "gb18030" in NAME.meta.json, or jobs.csv_encoding' in out

    (tmp_path / "reviews.meta.json").write_text('{"encoding": "gbk"}')
    code, out, _ = await cli(capsys, "validate", "--config", str(config), str(source))
    assert code == 0 and "reviews.csv: ok, 3 requests" in out

    (tmp_path / "reviews.meta.json").write_text('{"encoding": "gbkk"}')
    code, out, _ = await cli(capsys, "validate", "--config", str(config), str(source))
    assert code == 1 and "sidecar_invalid: reviews.meta.json: encoding: 'gbkk'" in out
