"""Validation throughput and memory, beside a bare `orjson.loads` loop over the same file.

    python -m tests.bench.bench_validate [--size-mb 500] [--lines 50000]
        [--split-lines 1000000] [--repeat 1] [--style compact] [--digest] [--out FILE]
        [--dir DIR]

Generates the files in a temporary directory, then measures each pass in its own
subprocess so that the peak RSS (ru_maxrss) is that pass's alone:
- `orjson`: `for line in file: orjson.loads(line)`, the baseline;
- `validate`: `validate_file` on the same file, as `batchd validate` runs it (target:
  >= 0.5x the baseline, < 100 MB); `--digest` adds the requests' digest of the
  duplicate guard, as the daemon runs it;
- `split`: validate and write the parts of a file of `--split-lines` short lines.
With `--repeat N` each pass runs N times and the fastest run counts (the highest peak
RSS is kept): on a shared machine that measures the code rather than the neighbours.
`--style spaced` writes the lines the way Python's json module does by default (spaces
after separators, non-ASCII escaped) instead of orjson's compact form.
Prints a table and writes the figures as JSON. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

WORDS = ["alpha", "beta", "gamma", "你好", "世界", "delta", "的", "batch", "模型", "request"]


def _content(seed: int, size: int) -> str:
    words: list[str] = []
    length = 0
    i = seed
    while length < size:
        word = WORDS[(i * 7 + i // 3) % len(WORDS)]
        words.append(word)
        length += len(word.encode()) + 1
        i += 1
    return " ".join(words)


def generate(path: Path, lines: int, total_bytes: int, style: str = "compact") -> int:
    """Write `lines` chat requests of about total_bytes/lines bytes each; return the size."""
    per_line = max(total_bytes // lines - 200, 10)
    contents = [_content(seed, per_line) for seed in range(16)]
    encode = orjson.dumps if style == "compact" else lambda obj: json.dumps(obj).encode()
    with path.open("wb", buffering=1 << 20) as out:
        for i in range(lines):
            request = {
                "custom_id": f"request-{i:08d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "qwen-plus",
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": contents[i % len(contents)]},
                    ],
                    "temperature": 0.7,
                },
            }
            out.write(encode(request) + b"\n")
    return path.stat().st_size


def worker(mode: str, path: Path, out_dir: Path | None, digest: bool = False) -> dict[str, Any]:
    """One measured pass, run in a fresh process."""
    from batchd.config import PROFILES
    from batchd.inputs.validate import validate_file, write_parts

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if mode == "orjson":
        with path.open("rb") as stream:
            for line in stream:
                orjson.loads(line)
    else:
        report = validate_file(path, PROFILES["dashscope"].limits, requests_digest=digest)
        assert report.valid, report.render()[:5]
        assert (report.requests_sha256 is not None) == digest
        result["parts"] = len(report.parts)
        if mode == "split":
            assert out_dir is not None
            planned = time.perf_counter()
            result["written"] = len(write_parts(report, path, out_dir))
            result["write_seconds"] = time.perf_counter() - planned
    result["seconds"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


# Whether the measured passes digest the requests (`--digest`).
DIGEST = False


def run_once(mode: str, path: Path, out_dir: Path | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "tests.bench.bench_validate", "--worker", mode, str(path)]
    if out_dir is not None:
        command.append(str(out_dir))
    if DIGEST:
        command.append("--digest")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def measure(
    path: Path, mode: str, out_dir: Path | None = None, repeat: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bare loop and `mode` on `path`, alternating, `repeat` times; the fastest of each.

    Alternating keeps both passes under the same conditions (page cache, neighbours).
    """
    runs: dict[str, list[dict[str, Any]]] = {"orjson": [], mode: []}
    for _ in range(repeat):
        runs["orjson"].append(run_once("orjson", path))
        runs[mode].append(run_once(mode, path, out_dir))
    size_mb = path.stat().st_size / 1e6
    best: list[dict[str, Any]] = []
    for passes in runs.values():
        figures = min(passes, key=lambda r: float(r["seconds"]))
        figures["peak_rss_mb"] = max(r["peak_rss_mb"] for r in passes)
        figures["all_seconds"] = [round(r["seconds"], 3) for r in passes]
        figures["mb_per_s"] = size_mb / figures["seconds"]
        best.append(figures)
    return best[0], best[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--split-lines", type=int, default=1_000_000, help="0 to skip")
    parser.add_argument("--repeat", type=int, default=1, help="runs per pass; the fastest counts")
    parser.add_argument("--style", choices=["compact", "spaced"], default="compact")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--dir", type=Path, help="where to generate the files")
    parser.add_argument(
        "--digest", action="store_true", help="digest the requests too, as the daemon does"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, path, *rest = args.worker
        out_dir = Path(rest[0]) if rest else None
        print(json.dumps(worker(mode, Path(path), out_dir, digest=args.digest)))
        return 0
    global DIGEST
    DIGEST = args.digest

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        big = Path(tmp) / "big.jsonl"
        size = generate(big, args.lines, args.size_mb * 1_000_000, args.style)
        run_once("orjson", big)  # warm the page cache so both passes read from memory
        baseline, validation = measure(big, "validate", repeat=args.repeat)
        figures: dict[str, Any] = {
            "requests_digest": DIGEST,
            "file": {"bytes": size, "lines": args.lines, "style": args.style},
            "orjson_loop": baseline,
            "validate": validation,
            "ratio": validation["mb_per_s"] / baseline["mb_per_s"],
        }
        big.unlink()
        if args.split_lines:
            many = Path(tmp) / "many.jsonl"
            split_size = generate(many, args.split_lines, args.split_lines * 400, args.style)
            run_once("orjson", many)
            split_baseline, split = measure(many, "split", Path(tmp) / "parts", args.repeat)
            figures["split"] = {
                "file": {"bytes": split_size, "lines": args.split_lines, "style": args.style},
                "orjson_loop": split_baseline,
                "validate_and_write": split,
                "ratio": split["mb_per_s"] / split_baseline["mb_per_s"],
            }

    print(f"{'pass':<34} {'MB/s':>8} {'seconds':>8} {'cpu s':>8} {'peak RSS MB':>12}")
    rows = [
        (f"orjson loop ({size / 1e6:.0f} MB, {args.lines} lines)", baseline),
        ("validate", validation),
    ]
    if "split" in figures:
        lines = args.split_lines
        rows += [
            (
                f"orjson loop ({figures['split']['file']['bytes'] / 1e6:.0f} MB, {lines} lines)",
                figures["split"]["orjson_loop"],
            ),
            ("validate + write parts", figures["split"]["validate_and_write"]),
        ]
    for name, row in rows:
        print(
            f"{name:<34} {row['mb_per_s']:>8.0f} {row['seconds']:>8.2f}"
            f" {row['cpu_seconds']:>8.2f} {row['peak_rss_mb']:>12.1f}"
        )
    print(f"validate / orjson loop: {figures['ratio']:.2f} (target >= 0.5)")
    if "split" in figures:
        split_figures = figures["split"]["validate_and_write"]
        print(
            f"split case, validate+write / orjson loop: {figures['split']['ratio']:.2f}"
            f" (of which writing the parts: {split_figures['write_seconds']:.2f} s)"
        )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
