"""Adversarial text costs time linear in its size, and the daemon answers throughout
(issue 22 item 1, TESTING G).

The input that froze the daemon: a chat message of "a" followed by 96,000 combining acute
accents and 96,000 combining grave-below marks (CPython's NFC sorts such a run with an
insertion sort, holding the GIL: 70 s), beside 100,000-character runs of protein, DNA,
one letter, digits, CJK and emoji (runs a byte-level BPE merges at length). A real
`batchd run` prepares it (validation, exact token counts, the worst case), then the same
at four times the size, while the test asks the control socket for `status` without
pause and listens to the watchdog on a fake NOTIFY_SOCKET: every answer comes within
ANSWER_S, no ping is late, and the preparation (its `elapsed_s`) grows within a linear
bound, as `batchd estimate` of the two does: 4x the input, well under the 16x of a
quadratic step.

Sizes start at Qwen's chunk (100,000 characters, counted apart): within one chunk
tiktoken's merging of one long piece grows faster than linearly (about 0.2 s for a whole
chunk of one piece), so a quarter of the size would take less than a quarter of the time.

Nothing here needs the service: a budget of 0.000001 CNY with `on_over = "reject"` makes
the daemon refuse each job once it has counted it (its worst case named), so no byte of
these inputs reaches the emulator (whose own copy of Qwen's tokenizer normalises the
quadratic way: it would stall there, not in the daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batchd.cli import main
from batchd.provider.tokens import tokenizer_for
from batchd.testing import (
    FakeSystemd,
    RawControl,
    StartEmulator,
    daemon_env,
    daemon_process,
    drop,
    job_folders,
    summary,
    wait_for,
    wait_published,
    wait_ready,
)

# The attack at full size: the 384 KB of combining marks, 100,000-char runs.
MARKS = 96_000
RUN_CHARS = 100_000
# Every status answer within this; a ping at least every WATCHDOG_USEC (sent at half).
ANSWER_S = 2.0
WATCHDOG_USEC = 1_000_000
# 4x the input may cost at most this many times the time (linear: about 4; quadratic: 16).
GROWTH_BOUND = 8.0


def adversarial_lines(scale: float, prefix: str = "r") -> bytes:
    """Requests holding the adversarial texts, `scale` times the full size."""
    marks, run = int(MARKS * scale), int(RUN_CHARS * scale)
    rng = random.Random(22)
    texts = [
        "a" + "\u0301" * marks + "\u0316" * marks,
        "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(run)),
        "".join(rng.choice("ACGT") for _ in range(run)),
        "a" * run,
        "7" * run,
        "的" * (run // 4) + "😀" * (run // 4),
    ]
    lines = []
    for i, text in enumerate(texts):
        body = {
            "model": "qwen-plus",
            "max_tokens": 10,
            "messages": [
                {"role": "system", "content": "Label it."},
                {"role": "user", "content": text},
            ],
        }
        line = {"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions"}
        lines.append(orjson.dumps({**line, "body": body}) + b"\n")
    return b"".join(lines)


def log_records(path: Path, event: str) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{") and (record := orjson.loads(line)).get("event") == event:
            records.append(record)
    return records


async def test_the_daemon_prepares_adversarial_text_in_linear_time_answering_throughout(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    emulator = await start_emulator()
    root = tmp_path / "root"
    (root / "inbox").mkdir(parents=True)
    notify = str(tmp_path / "notify.sock")
    env = daemon_env(
        emulator,
        root,
        {"budget": {"daily": 0.000001, "on_over": "reject"}},
        NOTIFY_SOCKET=notify,
        WATCHDOG_USEC=str(WATCHDOG_USEC),
        BATCHD_INTAKE__SETTLE_S="0",
    )
    log = tmp_path / "daemon.log"
    answers: list[tuple[float, float]] = []  # (asked at, seconds to the answer)
    failures: list[str] = []

    async def ask_status() -> None:
        control = RawControl(root / "control.sock", timeout_s=5 * ANSWER_S)
        while True:
            asked = time.monotonic()
            try:
                code, _ = await control.call("GET", "/v1/status")
            except (OSError, TimeoutError, aiohttp.ClientError) as exc:
                failures.append(f"{type(exc).__name__} after {time.monotonic() - asked:.1f} s")
            else:
                answers.append((asked, time.monotonic() - asked))
                if code != 200:
                    failures.append(f"status {code}")
            await asyncio.sleep(0.05)

    def published_or_failed(count: int) -> bool:
        """`count` jobs published, or the control socket failed (then at once)."""
        return bool(failures) or len(job_folders(root / "outbox")) >= count

    with FakeSystemd(notify) as systemd:
        async with daemon_process(env, log, stop_timeout_s=15):
            await wait_for(lambda: "READY=1" in systemd.texts(), 30, "READY=1", step_s=0.02)
            # Once per process, before the measured window: the first status loads Qwen's
            # vocabulary (tiktoken's constructor holds the GIL about half a second), the
            # first text with combining marks builds NFC's class of them. Not the text's
            # doing, and counted in neither input's time.
            await wait_ready(root, timeout_s=30)
            outbox = root / "outbox"
            drop(root / "inbox", "warm.jsonl", adversarial_lines(0.01, "warm"))
            await wait_published(outbox, 1, timeout_s=60)
            asker = asyncio.create_task(ask_status())
            try:
                started = time.monotonic()
                for count, (name, scale) in enumerate((("small", 1.0), ("large", 4.0)), 2):
                    drop(root / "inbox", f"{name}.jsonl", adversarial_lines(scale, name))
                    await wait_for(lambda n=count: published_or_failed(n), 50, f"{name} done")
                ended = time.monotonic()
            finally:
                asker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asker
            # Before the daemon is stopped: one stuck in a step would not stop in time.
            assert not failures, f"the control socket failed: {failures}"
            pings = [at for at in systemd.times("WATCHDOG=1") if started <= at <= ended]

    # Each was prepared (validated, counted exactly: a worst case) and refused for money.
    for folder in outbox.iterdir():
        error = summary(folder)["error"]
        assert error["code"] == "over_budget" and "needs up to" in error["message"], error
    elapsed = {r["name"]: r["elapsed_s"] for r in log_records(log, "job_rejected")}
    assert set(elapsed) == {"warm", "small", "large"}, log.read_text()[-3000:]
    # The control socket answered throughout, each time within ANSWER_S.
    during = [took for asked, took in answers if started <= asked <= ended]
    assert len(during) >= 5 and max(during) < ANSWER_S, (max(during), len(during))
    # The watchdog was pinged at its interval throughout (never a WATCHDOG_USEC without).
    marks = [started, *pings, ended]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, (max(gaps), len(pings))
    print(
        f"\nprepared in {elapsed} s; {len(during)} status answers meanwhile, the slowest"
        f" {max(during):.3f} s; {len(pings)} watchdog pings, the widest gap {max(gaps):.3f} s"
    )
    # Preparation grew within a linear bound.
    assert elapsed["large"] <= GROWTH_BOUND * max(elapsed["small"], 0.05), elapsed


def best_estimate_s(path: Path, capsys: pytest.CaptureFixture[str], runs: int = 3) -> float:
    """The best of `runs` timings of `batchd estimate --json PATH` (in this process)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        code = main(["estimate", "--json", str(path)])
        times.append(time.perf_counter() - started)
        out = capsys.readouterr().out
        assert code == 0, out
        assert orjson.loads(out)["exact"] is True
    return min(times)


@pytest.mark.skipif(
    not tokenizer_for("dashscope", "qwen-plus").exact,
    reason="Qwen's vocabulary (the `tokens` extra) is not installed",
)
def test_estimate_of_adversarial_text_grows_linearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchd estimate` of the adversarial input at n and 4n (the daemon's test's sizes):
    the time within GROWTH_BOUND times."""
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_bytes(adversarial_lines(1.0))
    large.write_bytes(adversarial_lines(4.0))
    best_estimate_s(small, capsys, runs=1)  # loads the vocabulary, builds NFC's classes
    small_s, large_s = best_estimate_s(small, capsys, 2), best_estimate_s(large, capsys, 2)
    assert large_s <= GROWTH_BOUND * small_s, (small_s, large_s)
