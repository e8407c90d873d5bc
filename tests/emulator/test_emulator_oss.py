"""The pure parts of reading OSS inputs: which ids are well formed, which URLs are an object
store's, how the store is addressed and whose keys sign (reads: tests/integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchd.cli import build_parser
from batchd.cli.emulator import settings_from
from batchd.emulator.config import EmulatorSettings
from batchd.emulator.oss import (
    OssName,
    StoreCredentials,
    addressing_style,
    credentials_from,
    is_remote,
    parse_oss_name,
    store_url_allowed,
)
from batchd.errors import ConfigError


def test_the_seeds_resource_name_parses() -> None:
    name = parse_oss_name("oss:cn-beijing:bucket-test/Batch/20250313/test.jsonl")
    assert name == OssName("cn-beijing", "bucket-test", "Batch/20250313/test.jsonl")
    assert str(name) == "oss:cn-beijing:bucket-test/Batch/20250313/test.jsonl"


@pytest.mark.parametrize(
    "bad",
    [
        "oss:",
        "oss:cn-beijing",
        "oss:cn-beijing:bucket",
        "oss:cn-beijing:bucket/",
        "oss:cn-beijing:bucket/folder/",
        "oss::bucket/key",
        "oss:cn-beijing:/key",
        "oss:cn-beijing:UPPER/key",
        "oss:cn beijing:bucket/key",
    ],
)
def test_a_malformed_resource_name_says_why(bad: str) -> None:
    with pytest.raises(ValueError, match="oss:"):
        parse_oss_name(bad)


def test_remote_ids_are_told_from_uploaded_file_ids() -> None:
    assert is_remote("oss:cn-beijing:b/k")
    assert is_remote("https://b.oss-cn-beijing.aliyuncs.com/k?Expires=1")
    assert not is_remote("file-batch-123")


STORE = "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        (f"{STORE}/bucket/key.jsonl?X-Amz-Signature=x", True),  # path style
        ("http://bucket.127.0.0.1:9000/key.jsonl", True),  # virtual-hosted under the store
        ("https://b.oss-cn-beijing.aliyuncs.com/dir/test.jsonl?Expires=1", True),
        (f"{STORE}/bucket-only", False),  # path style names no key
        ("http://127.0.0.1:9001/bucket/key.jsonl", False),  # another port
        ("https://127.0.0.1:9000/bucket/key.jsonl", False),  # another scheme
        ("http://example.com/bucket/key.jsonl", False),
        ("http://evil127.0.0.1:9000/key.jsonl", False),
        ("https://aliyuncs.com.evil.example/key", False),
        ("https://b.oss-cn-beijing.aliyuncs.com/", False),
        ("http://[::1/bucket/key", False),
    ],
)
def test_only_the_stores_and_osss_urls_are_read(url: str, allowed: bool) -> None:
    assert store_url_allowed(url, STORE) is allowed


@pytest.mark.parametrize(
    ("store", "chosen", "style"),
    [
        ("http://127.0.0.1:8080", "auto", "path"),
        ("http://localhost:8080", "auto", "path"),
        ("http://[::1]:8080", "auto", "path"),
        ("https://oss-cn-beijing.aliyuncs.com", "auto", "virtual"),
        ("https://127.0.0.1:8443", "auto", "virtual"),
        ("http://minio.internal:9000", "auto", "virtual"),
        ("http://minio.internal:9000", "path", "path"),
        ("http://127.0.0.1:8080", "virtual", "virtual"),
    ],
)
def test_loopback_http_is_path_style_and_the_rest_virtual(
    store: str, chosen: str, style: str
) -> None:
    assert addressing_style(store, chosen) == style


def test_oss_keys_come_first_then_aws_keys_then_botocores_chain() -> None:
    oss = {"OSS_ACCESS_KEY_ID": "o", "OSS_ACCESS_KEY_SECRET": "os", "OSS_SESSION_TOKEN": "ot"}
    aws = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "as"}
    assert credentials_from({**aws, **oss}) == StoreCredentials("o", "os", "ot")
    assert credentials_from(aws) == StoreCredentials("a", "as", None)
    # Half a pair is no pair: the next source is used.
    assert credentials_from({"OSS_ACCESS_KEY_ID": "o", **aws}) == StoreCredentials("a", "as")
    assert credentials_from({}) == StoreCredentials()
    secret = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    assert "s3cr3t-value" not in repr(credentials_from(secret))


def test_the_flags_and_the_toml_table_set_the_object_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("BATCHD_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "batchd.toml"
    config.write_text(
        '[emulator]\nobject_store_url = "https://oss-cn-beijing.aliyuncs.com/"\n'
        'oss_require_tag = false\nobject_store_addressing = "virtual"\n',
        encoding="utf-8",
    )
    argv = ["emulator", "--config", str(config)]
    from_toml = settings_from(build_parser(argv).parse_args(argv))
    assert from_toml.object_store_url == "https://oss-cn-beijing.aliyuncs.com"
    assert not from_toml.oss_require_tag
    assert from_toml.object_store_addressing == "virtual"

    argv += ["--object-store-url", "http://127.0.0.1:9000", "--oss-require-tag"]
    from_flags = settings_from(build_parser(argv).parse_args(argv))
    assert from_flags.object_store_url == "http://127.0.0.1:9000"
    assert from_flags.oss_require_tag

    argv = ["emulator"]
    default = settings_from(build_parser(argv).parse_args(argv))
    assert default.object_store_url is None and default.oss_require_tag
    assert default.service_region == "cn-beijing"


@pytest.mark.parametrize("url", ["oss://bucket", "ftp://host", "http://h:1/?x=1", "localhost"])
def test_an_object_store_url_that_is_no_http_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigError, match="object_store_url"):
        EmulatorSettings.load(None, object_store_url=url)
