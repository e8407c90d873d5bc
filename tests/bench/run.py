"""Run every benchmark of issue 8, print one table, write the figures as JSON.

    python -m tests.bench.run [--quick] [--out tests/bench/results.json] [--only caps,scale]

Each benchmark runs in its own process (its own event loop, its own peak RSS), one after
the other, each with a time limit. The table (markdown) gives figures, ratios and each
target met or missed; the JSON adds every raw figure and the machine's description.
`--quick` uses small sizes (about a minute or two in all) for a smoke check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.common import Row, machine, verdict

# name -> (module, arguments for a full run, arguments for --quick, time limit in seconds)
BENCHES: dict[str, tuple[str, list[str], list[str], float]] = {
    "validate": (
        "tests.bench.bench_validate",
        [],
        ["--size-mb", "20", "--lines", "2000", "--split-lines", "50000"],
        420,
    ),
    "estimate": ("tests.bench.bench_estimate", [], ["--quick"], 600),
    "caps": ("tests.bench.bench_caps", [], ["--quick"], 360),
    "economy": ("tests.bench.bench_economy", [], ["--quick"], 600),
    "scale": ("tests.bench.bench_scale", [], ["--quick"], 600),
    "intake": ("tests.bench.bench_intake", [], ["--quick"], 400),
    "latency": ("tests.bench.bench_latency", [], ["--quick"], 300),
    "startup": ("tests.bench.bench_startup", [], ["--quick"], 300),
    "buckets": ("tests.bench.bench_buckets", [], ["--quick"], 900),
}


def validate_rows(f: dict[str, Any]) -> list[Row]:
    name = "1 validate"
    v, b = f["validate"], f["orjson_loop"]
    out: list[Row] = [
        (
            name,
            f"{f['file']['bytes'] / 1e6:.0f} MB / {f['file']['lines']} lines: MB/s, validate vs"
            " bare orjson loop",
            f"{v['mb_per_s']:.0f} vs {b['mb_per_s']:.0f} = {f['ratio']:.2f}",
            ">= 0.5",
            verdict(f["ratio"] >= 0.5),
        ),
        (
            name,
            "validate peak RSS",
            f"{v['peak_rss_mb']:.0f} MB",
            "< 100 MB",
            verdict(v["peak_rss_mb"] < 100),
        ),
    ]
    s = f.get("split")
    if s:
        w = s["validate_and_write"]
        out += [
            (
                name,
                f"{s['file']['lines']} lines split into {w['parts']} parts: MB/s vs bare loop",
                f"{w['mb_per_s']:.0f} vs {s['orjson_loop']['mb_per_s']:.0f} = {s['ratio']:.2f}",
                ">= 0.5",
                verdict(s["ratio"] >= 0.5),
            ),
            (
                name,
                "split peak RSS",
                f"{w['peak_rss_mb']:.0f} MB",
                "< 100 MB",
                verdict(w["peak_rss_mb"] < 100),
            ),
        ]
    return out


def table(rows: list[Row]) -> str:
    lines = [
        "| benchmark | figure | value | target | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke check")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results.json"))
    parser.add_argument("--only", help="comma-separated subset: " + ",".join(BENCHES))
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(BENCHES)
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}")
    about = machine()
    results: dict[str, Any] = {}
    rows: list[Row] = []
    failed = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="batchd-bench-run-") as tmp:
        for name in chosen:
            module, full, quick, limit = BENCHES[name]
            out = Path(tmp) / f"{name}.json"
            command = [sys.executable, "-m", module, *(quick if args.quick else full)]
            command += ["--out", str(out)]
            print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                done = subprocess.run(command, timeout=limit, capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"timed out after {limit:.0f} s"}
                rows.append((name, "error", f"timed out after {limit:.0f} s", "", "MISSED"))
                failed += 1
                continue
            seconds = round(time.monotonic() - t0, 1)
            if done.returncode != 0 or not out.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                results[name] = {"error": "\n".join(tail), "seconds": seconds}
                rows.append((name, "error", " ".join(tail)[-200:], "", "MISSED"))
                failed += 1
                continue
            figures = json.loads(out.read_text())
            figures["seconds"] = seconds
            results[name] = figures
            if name == "validate":
                rows += validate_rows(figures)
            else:
                rows += importlib.import_module(module).rows(figures)
            print(f"   {seconds} s", file=sys.stderr, flush=True)
    total = round(time.monotonic() - started, 1)
    header = (
        f"batchd benchmarks, {about['date']}: {about['cpu']}, {about['cores']} cores,"
        f" {about['ram_gb']} GB RAM, Python {about['python']}, {about['os']}"
        f" ({'quick' if args.quick else 'full'} run, {total:.0f} s)"
    )
    text = header + "\n\n" + table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": about,
                "quick": args.quick,
                "seconds": total,
                "table": text,
                "rows": rows,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
