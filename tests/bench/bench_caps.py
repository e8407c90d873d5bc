"""Cap utilisation: thousands of queued parts against the emulator's caps (issue 8, item 2).

    python -m tests.bench.bench_caps [--quick] [--out FILE]

One input file split into one part per request (so thousands of parts are queued at
once), run by `batchd run` in a subprocess against the in-process emulator. The caps keep
their shape (create cap per window, running cap = create cap, list cap = a tenth) but the
window is `rate_window_s` seconds on both sides (10 s: 100 creates a second, six times
the real service's 1000 a minute), and the service's clock runs fast, so that batches end
within a fraction of a second and the create cap, not the running cap, bounds the run.
Shorter windows measure the machine rather than batchd: at 2 s (500 creates and 500
uploads a second, thirty times the real rate) the emulator, a single Python process
sharing the cores with the daemon, cannot answer that fast. Uploads are given a high
cap here to isolate the create cap (with the real 3 uploads/s, uploads bound creation).

Figures: creates per complete window / cap (target >= 0.95), the most calls of each
class in any window (<= cap), 429s (0), running-cap occupancy sampled over time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from batchd.testing import (
    DaemonProcess,
    drop_all,
    job_folders,
    requests,
    running_emulator,
    wait_for,
)
from tests.bench.common import (
    Row,
    bench_main,
    env_for,
    verdict,
    wall_of,
)


def utilisation(times: list[float], cap: int, window_s: float) -> dict[str, Any]:
    """PURE: creates per complete window after the first create, as a share of the cap."""
    if not times:
        return {"windows": 0, "per_window": [], "fraction_of_cap": 0.0}
    times = sorted(times)
    start, last = times[0], times[-1]
    complete = int((last - start) // window_s)
    counts = [0] * max(complete, 0)
    for t in times:
        k = int((t - start) // window_s)
        if k < complete:
            counts[k] += 1
    span = last - start
    return {
        "windows": complete,
        "per_window": counts,
        "fraction_of_cap": (sum(counts) / (complete * cap)) if complete else None,
        "first_to_last_s": round(span, 3),
        # The fastest any client may go: `cap` at once, then `cap` per window.
        "ideal_first_to_last_s": ((len(times) - 1) // cap) * window_s,
    }


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    cap = 200 if quick else 1000
    window_s = 2.0 if quick else 10.0
    parts = 3 * cap + cap // 2
    limits = {
        "running_batches": cap,
        "create_per_minute": cap,
        "retrieve_per_minute": cap,
        "cancel_per_minute": cap,
        "list_per_minute": max(1, cap // 10),
        "upload_per_second": 5000.0,
        "file_calls_per_second": 5000.0,
        "max_requests_per_file": 1,
    }
    async with running_emulator(
        tmp / "emulator",
        time_scale=3000.0,
        rate_window_s=window_s,
        limits=limits,
        shuffle_output=False,
    ) as emulator:
        root = tmp / "root"
        env = env_for(
            emulator,
            root,
            {
                "limits": limits,
                "api": {"rate_window_s": window_s},
                "poll": {"first_poll_s": 0.05, "interval_s": 0.2, "jitter": 0.1},
            },
        )
        daemon = await DaemonProcess.start(env, tmp / "daemon.log")
        store = emulator.state.store
        samples: list[tuple[float, int, int]] = []
        try:
            await wait_for(lambda: (root / "inbox").exists(), 30, "daemon start")
            cpu0 = daemon.cpu_s()
            t0 = time.monotonic()
            drop_all(root / "inbox", {"many.jsonl": requests(parts)})
            timeout = 120.0 if quick else 300.0
            deadline = t0 + timeout
            while len(store.batches) < parts and time.monotonic() < deadline:
                now = time.monotonic()
                samples.append(
                    (
                        round(now - t0, 2),
                        len(store.unfinished(emulator.clock.now())),
                        len(store.batches),
                    )
                )
                if daemon.proc.returncode is not None:
                    raise RuntimeError("daemon exited:\n" + daemon.log_tail())
                await asyncio.sleep(0.1)
            created_all_s = time.monotonic() - t0
            cpu_create = daemon.cpu_s() - cpu0
            await wait_for(lambda: len(job_folders(root / "outbox")) >= 1, timeout, "publish")
            cpu_total = daemon.cpu_s() - cpu0
            rss = daemon.rss_mb()
        finally:
            code = await daemon.stop()
        stats = await emulator.stats()

    times = [wall_of(emulator, b.timeline.created_at) for b in store.batches.values()]
    figures: dict[str, Any] = {
        "setup": {
            "parts": parts,
            "create_cap": cap,
            "running_cap": cap,
            "list_cap": limits["list_per_minute"],
            "rate_window_s": window_s,
            "time_scale": 3000.0,
        },
        "batches_created": len(times),
        "utilisation": utilisation(times, cap, window_s),
        "calls": stats["calls"],
        "refused_429_total": sum(c["refused_429"] for c in stats["calls"].values()),
        "windows_over_cap": sum(
            1
            for c in stats["calls"].values()
            if c["cap"] is not None and c["max_in_window"] > c["cap"]
        ),
        "max_unfinished_batches": stats["max_unfinished_batches"],
        "duplicate_creates": sum(
            1 for n in stats["batches_created_per_input_file"].values() if n > 1
        ),
        "occupancy": {
            "samples": samples[:: max(1, len(samples) // 60)],
            "mean_while_creating": (sum(s[1] for s in samples) / len(samples)) if samples else 0,
            "max_sampled": max((s[1] for s in samples), default=0),
        },
        "seconds_to_all_created": round(created_all_s, 2),
        "daemon": {
            "cpu_s_while_creating": round(cpu_create, 2),
            "cpu_share_while_creating": round(cpu_create / created_all_s, 2),
            "cpu_s_total": round(cpu_total, 2),
            "peak_rss_mb": round(rss, 1),
            "exit_code": code,
        },
    }
    return figures


def rows(f: dict[str, Any]) -> list[Row]:
    u = f["utilisation"]
    s = f["setup"]
    frac = u["fraction_of_cap"]
    name = "2 caps"
    shape = f"{s['parts']} parts, cap {s['create_cap']}/{s['rate_window_s']:g}s"
    c = f["calls"]
    return [
        (
            name,
            f"create rate / cap ({shape})",
            "n/a" if frac is None else f"{frac:.2f}",
            ">= 0.95",
            verdict(None if frac is None else frac >= 0.95),
        ),
        (
            name,
            "first to last create vs ideal",
            f"{u.get('first_to_last_s', 0):.1f} s vs {u.get('ideal_first_to_last_s', 0):.1f} s",
            "",
            "",
        ),
        (
            name,
            "most calls in a window: create/retrieve/list",
            "{}/{}/{} (caps {}/{}/{})".format(
                c["create"]["max_in_window"],
                c["retrieve"]["max_in_window"],
                c["list"]["max_in_window"],
                c["create"]["cap"],
                c["retrieve"]["cap"],
                c["list"]["cap"],
            ),
            "<= cap",
            verdict(f["windows_over_cap"] == 0),
        ),
        (name, "429s", str(f["refused_429_total"]), "0", verdict(f["refused_429_total"] == 0)),
        (
            name,
            "running cap: max / mean occupancy",
            f"{f['max_unfinished_batches']} / {f['occupancy']['mean_while_creating']:.0f}"
            f" of {s['running_cap']}",
            f"<= {s['running_cap']}",
            verdict(f["max_unfinished_batches"] <= s["running_cap"]),
        ),
        (
            name,
            "daemon CPU share while creating",
            f"{f['daemon']['cpu_share_while_creating']:.2f} core",
            "",
            "",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    return bench_main(__doc__.split("\n")[0], run, rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
