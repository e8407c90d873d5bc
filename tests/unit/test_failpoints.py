"""The fail point syntax: `NAME=ACTION[:SUBJECT][@N]` (batchd/failpoints.py)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from batchd import failpoints
from batchd.failpoints import FailpointError, arm, failpoint


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    arm("")


def test_an_unarmed_fail_point_does_nothing() -> None:
    arm("")
    for name in failpoints.NAMES:
        failpoint(name, "anything")


@pytest.mark.parametrize(("action", "code"), [("eio", errno.EIO), ("enospc", errno.ENOSPC)])
def test_disk_actions_raise_os_errors_with_their_errno(action: str, code: int) -> None:
    arm(f"publish.write={action}")
    with pytest.raises(OSError) as caught:
        failpoint("publish.write", "a.jsonl")
    assert caught.value.errno == code
    assert "publish.write" in str(caught.value)
    failpoint("publish.fsync", "a.jsonl")  # only the armed name


def test_a_subject_filter_fires_only_for_matching_subjects() -> None:
    arm("prepare.before_validate=raise:poison")
    failpoint("prepare.before_validate", "good.jsonl")
    failpoint("prepare.before_validate")  # no subject: never matches a filter
    with pytest.raises(FailpointError):
        failpoint("prepare.before_validate", "big-poison.jsonl")


def test_at_n_lets_the_first_hits_go_by_then_fires_every_time() -> None:
    arm("poll.after_request=raise@3, publish.write=eio:x@2")
    failpoint("poll.after_request")
    failpoint("poll.after_request")
    for _ in range(2):
        with pytest.raises(FailpointError):
            failpoint("poll.after_request")
    failpoint("publish.write", "y")  # does not match, does not count
    failpoint("publish.write", "x")
    with pytest.raises(OSError):
        failpoint("publish.write", "x")


@pytest.mark.parametrize(
    "spec",
    [
        "nope=kill",
        "poll.after_request=explode",
        "poll.after_request",
        "poll.after_request=kill:",
        "poll.after_request=kill@0",
        "poll.after_request=kill@x",
        "poll.after_request=kill@",
    ],
)
def test_a_bad_spec_is_refused_with_the_item(spec: str) -> None:
    with pytest.raises(ValueError, match="BATCHD_FAILPOINTS"):
        arm(spec)
