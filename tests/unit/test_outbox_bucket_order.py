"""The pure parts of the outbox on a bucket: the order members go up in (summary.json
last, hidden names never), and how a job's recorded folder is read back."""

from __future__ import annotations

from batchd.objstore.location import BucketUrl
from batchd.outbox.bucket import folder_name, folder_url, read_cap, upload_order


def test_summary_goes_up_last_and_hidden_files_never() -> None:
    names = ["summary.json", "result.jsonl", ".report.json.tmp", "error.jsonl", "report.json"]
    assert upload_order(names) == ["error.jsonl", "report.json", "result.jsonl", "summary.json"]
    # A folder not yet given its summary puts up what it has, and no summary.
    assert upload_order(["result.jsonl"]) == ["result.jsonl"]


def test_a_recorded_folder_is_a_bucket_url_or_a_local_path() -> None:
    url = folder_url("s3://out-bucket/team/outbox/评论 数据-2/")
    assert url == BucketUrl("s3", "out-bucket", "team/outbox/评论 数据-2/")
    assert folder_name(url) == "评论 数据-2"
    assert folder_url("/var/lib/batchd/outbox/q") is None
    assert folder_url("s3://Not_A_Bucket/x/") is None


def test_reads_back_are_capped_above_the_largest_input() -> None:
    assert read_cap(50 * 1000**3) == 400 * 1000**3
    assert read_cap(1) == 1024**3
