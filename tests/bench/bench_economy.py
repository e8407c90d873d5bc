"""API economy: calls per job, batchd against the seed's reference flow (issue 8, item 3).

    python -m tests.bench.bench_economy [--quick] [--out FILE]

The same workload runs twice, each time against a fresh emulator in its own process:
1. the seed's quick-start flow through the official `openai` SDK, one flow per job, all
   jobs in parallel: upload, create, retrieve every 10 s (service time) until the batch
   ends, retrieve again for the output and for the error file id, download;
2. batchd (`batchd run`, a subprocess) with its default poll cadence, scaled.
The workload mixes jobs of about 5 minutes, 17 minutes and one hour of service time
(`per_request_s` = 36 s, so small files last long); the service clock runs `time_scale`
times fast and every cap keeps its shape over `60 / time_scale` wall seconds.
Figures: calls per job by class, the ratio, and the wall time of each run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from batchd.testing import (
    API_KEY,
    DaemonProcess,
    EmulatorProcess,
    drop_all,
    job_folders,
    requests,
    wait_for,
)
from tests.bench.common import (
    Row,
    bench_main,
    calls,
    env_for,
    refused,
    verdict,
)

PER_REQUEST_S = 36.0
# Lines per job -> service seconds: 20 validating + 120 + 36 x lines + 10 finalizing.
KINDS = {"5min": 5, "17min": 25, "1h": 95}
TERMINAL = ("completed", "failed", "expired", "cancelled")


def duration_s(lines: int) -> float:
    return 150.0 + PER_REQUEST_S * lines


def _settings(scale: float) -> dict[str, Any]:
    return {
        "time_scale": scale,
        "rate_window_s": 60.0 / scale,
        "per_request_s": PER_REQUEST_S,
        "limits": {"upload_per_second": 3.0 * scale, "file_calls_per_second": 10.0 * scale},
        "shuffle_output": False,
    }


async def reference_flow(
    client: AsyncOpenAI, path: Path, out: Path, scale: float, counts: dict[str, int]
) -> None:
    """The seed's quick-start, with its 10 s sleep on the service's clock."""
    file_object = await client.files.create(file=path, purpose="batch")
    counts["upload"] += 1
    batch = await client.batches.create(
        input_file_id=file_object.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    counts["create"] += 1
    status = ""
    for _ in range(100_000):
        if status in TERMINAL:
            break
        status = (await client.batches.retrieve(batch.id)).status
        counts["retrieve"] += 1
        await asyncio.sleep(10.0 / scale)
    output_id = (await client.batches.retrieve(batch.id)).output_file_id
    error_id = (await client.batches.retrieve(batch.id)).error_file_id
    counts["retrieve"] += 2
    for file_id in (output_id, error_id):
        if file_id:
            content = await client.files.content(file_id)
            out.write_bytes(content.read())
            counts["download"] += 1


async def run_reference(tmp: Path, inputs: dict[str, bytes], scale: float) -> dict[str, Any]:
    emulator = await EmulatorProcess.start(tmp, **_settings(scale))
    folder = tmp / "ref"
    folder.mkdir()
    for name, content in inputs.items():
        (folder / name).write_bytes(content)
    per_kind: dict[str, dict[str, int]] = {}
    try:
        async with AsyncOpenAI(api_key=API_KEY, base_url=emulator.base_url) as client:
            started = time.monotonic()
            flows = []
            for name in inputs:
                counts = per_kind.setdefault(
                    name, dict.fromkeys(("upload", "create", "retrieve", "download"), 0)
                )
                flows.append(
                    reference_flow(client, folder / name, folder / f"{name}.out", scale, counts)
                )
            await asyncio.wait_for(asyncio.gather(*flows), 600)
            wall = time.monotonic() - started
        stats = await emulator.stats()
    finally:
        await emulator.stop()
    return {
        "wall_s": round(wall, 2),
        "calls": calls(stats),
        "refused_429": refused(stats),
        "per_job": per_kind,
    }


async def run_batchd(tmp: Path, inputs: dict[str, bytes], scale: float) -> dict[str, Any]:
    emulator = await EmulatorProcess.start(tmp, **_settings(scale))
    root = tmp / "root"
    env = env_for(
        emulator,
        root,
        {
            "limits": _settings(scale)["limits"],
            "api": {"rate_window_s": 60.0 / scale},
            # The defaults (first look after 30 s, then every 60 s), on the service's clock.
            "poll": {"first_poll_s": 30.0 / scale, "interval_s": 60.0 / scale, "jitter": 0.1},
        },
    )
    daemon = await DaemonProcess.start(env, tmp / "daemon.log")
    try:
        await wait_for(lambda: (root / "inbox").exists(), 30, "daemon start")
        started = time.monotonic()
        drop_all(root / "inbox", inputs)
        await wait_for(
            lambda: len(job_folders(root / "outbox")) >= len(inputs),
            600,
            "all published",
            step_s=0.05,
        )
        wall = time.monotonic() - started
        # Remote files are deleted after publishing: let the cleanup finish.
        await asyncio.sleep(min(2.0, 120.0 / scale) + 0.5)
        cpu = daemon.cpu_s()
    finally:
        code = await daemon.stop()
        stats = await emulator.stats()
        await emulator.stop()
    return {
        "wall_s": round(wall, 2),
        "calls": calls(stats),
        "refused_429": refused(stats),
        "daemon_cpu_s": round(cpu, 2),
        "exit_code": code,
    }


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    scale = 600.0 if quick else 60.0
    per_kind = 1 if quick else 4
    inputs = {
        f"{kind}-{i}.jsonl": requests(lines, prefix=f"{kind}{i}-")
        for kind, lines in KINDS.items()
        for i in range(per_kind)
    }
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    reference = await run_reference(tmp / "a", inputs, scale)
    batchd = await run_batchd(tmp / "b", inputs, scale)
    n = len(inputs)
    ref_total = sum(reference["calls"].values())
    ours_total = sum(batchd["calls"].values())
    ref_by_kind = {}
    for kind in KINDS:
        jobs = [c for name, c in reference["per_job"].items() if name.startswith(kind + "-")]
        ref_by_kind[kind] = sum(sum(c.values()) for c in jobs) / len(jobs)
    return {
        "setup": {
            "jobs": n,
            "time_scale": scale,
            "kinds": {k: {"lines": v, "service_s": duration_s(v)} for k, v in KINDS.items()},
        },
        "reference": reference,
        "batchd": batchd,
        "calls_per_job": {
            "reference": ref_total / n,
            "batchd": ours_total / n,
            "reference_by_kind": ref_by_kind,
            "batchd_by_class": {k: v / n for k, v in batchd["calls"].items() if v},
            "reference_by_class": {k: v / n for k, v in reference["calls"].items() if v},
        },
        "ratio_calls": ours_total / ref_total,
        "ratio_wall": batchd["wall_s"] / reference["wall_s"],
    }


def rows(f: dict[str, Any]) -> list[Row]:
    c = f["calls_per_job"]
    s = f["setup"]

    def classes(d: dict[str, float]) -> str:
        return " ".join(f"{k} {v:.1f}" for k, v in d.items())

    return [
        (
            "3 economy",
            f"calls per job, {s['jobs']} jobs 5 min..1 h: batchd / reference",
            f"{c['batchd']:.1f} / {c['reference']:.1f}",
            "",
            "",
        ),
        (
            "3 economy",
            "calls ratio batchd / reference (the mix; 1 h jobs alone cost the reference "
            f"{c['reference_by_kind']['1h']:.0f})",
            f"{f['ratio_calls']:.3f}",
            "<= 0.1",
            verdict(f["ratio_calls"] <= 0.1),
        ),
        ("3 economy", "batchd calls per job by class", classes(c["batchd_by_class"]), "", ""),
        ("3 economy", "reference calls per job by class", classes(c["reference_by_class"]), "", ""),
        (
            "3 economy",
            "wall time for all jobs: batchd / reference in parallel",
            f"{f['batchd']['wall_s']:.1f} s / {f['reference']['wall_s']:.1f} s"
            f" = {f['ratio_wall']:.2f}",
            "<= 1.0",
            verdict(f["ratio_wall"] <= 1.0),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__.split("\n")[0], run, rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
