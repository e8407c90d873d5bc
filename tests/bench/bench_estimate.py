"""`batchd estimate` throughput beside `batchd validate` on the same file.

    python -m tests.bench.bench_estimate [--size-mb 100] [--lines 50000] [--repeat 1]
        [--out FILE] [--dir DIR]

Generates chat request files in a temporary directory, then runs each command in its
own subprocess (`batchd.cli.main`, output to /dev/null) and reports MB/s, CPU seconds
and peak RSS:
- `validate`: `batchd validate --json FILE`, the reference;
- `estimate`: `batchd estimate --json FILE`, exact counts (Qwen's vocabulary), when the
  `dashscope` package is installed;
- `estimate --approx`: the approximation (target: >= 0.5x validate).
Two files: every user content unique (no cache of repeated strings can flatter the
figure; the system prompt is the seed's short one), and the same with a long system
prompt repeated on every line (what the memo of repeated strings is for). With
`--repeat N` each pass runs N times and the fastest counts. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from tests.bench.common import Row, verdict

# Real sentences cut into clauses, recombined at random: every content is unique but
# reads like text (random characters would tokenize unlike any real file).
CLAUSES_EN = (
    "the order arrived two days late and the box was damaged",
    "please summarise the customer's complaint in one sentence",
    "classify the review as positive, negative or neutral",
    "the quarterly report shows revenue up by a small margin",
    "extract the product name, the price and the delivery date",
    "translate the following paragraph into plain English",
    "our team will reply within one business day",
    "the meeting was moved to Thursday afternoon",
    "list three risks and one mitigation for each",
    "the battery lasts a full day but the camera is weak at night",
    "rewrite the title so that it fits in sixty characters",
    "answer with a JSON object that has the keys name and score",
)
CLAUSES_ZH = (
    "今天上午",
    "市气象台发布了暴雨蓝色预警信号",
    "预计未来六小时内",
    "我市大部分地区将出现短时强降水",
    "局部地区伴有雷电和七级以上大风",
    "请市民朋友尽量减少外出",
    "注意防范城市内涝和山洪等次生灾害",
    "这款手机我已经用了三个月",
    "总体来说非常满意",
    "屏幕显示效果细腻",
    "电池续航可以坚持一整天",
    "拍照在白天光线充足的时候表现很好",
    "但是夜景模式稍微有点噪点",
    "系统流畅",
    "没有遇到卡顿的情况",
    "唯一的缺点是充电器需要单独购买",
    "希望厂家以后能够改进",
    "人工智能技术的快速发展正在深刻改变各行各业",
    "在医疗领域",
    "智能影像诊断系统可以帮助医生更快地发现早期病变",
    "在教育领域",
    "个性化学习平台能够根据学生的掌握程度推荐合适的练习",
    "在制造业",
    "预测性维护减少了设备停机带来的损失",
    "数据安全、算法偏见和就业结构调整等问题也随之而来",
    "需要政府、企业和社会共同面对",
    "请根据以下要求撰写一份产品说明",
    "产品名称为智能保温杯",
    "容量五百毫升",
    "采用双层不锈钢真空结构",
    "杯盖内置温度显示屏",
    "可以实时查看水温",
    "说明书需要包括产品特点、使用方法、清洁保养和注意事项四个部分",
    "语言简洁明了",
    "适合普通消费者阅读",
    "床前明月光",
    "疑是地上霜",
    "举头望明月",
    "低头思故乡",
    "这首《静夜思》是唐代诗人李白的代表作之一",
)
LONG_SYSTEM = (
    "You are a careful assistant for a customer-service team. Answer in the customer's "
    "language, quote order numbers exactly, never invent a policy, and keep answers under "
    "120 words. 你是客服团队的助手：请用客户的语言回答，准确引用订单号，不要编造政策。"
) * 6

PASSES = ("validate", "estimate", "estimate --approx")


def _content(rng: random.Random, size: int) -> str:
    """A unique mix of English and Chinese clauses and numbers of about `size` UTF-8
    bytes."""
    parts: list[str] = []
    length = 0
    while length < size:
        roll = rng.random()
        if roll < 0.5:
            piece = rng.choice(CLAUSES_EN) + ", "
        elif roll < 0.92:
            piece = rng.choice(CLAUSES_ZH) + "，"
        else:
            piece = f"{rng.randint(0, 10**6)} "
        parts.append(piece)
        length += len(piece.encode())
    return "".join(parts)


def generate(path: Path, lines: int, total_bytes: int, system: str) -> int:
    """Write `lines` chat requests of about total_bytes/lines bytes, each user content
    unique; return the file's size."""
    per_line = max(total_bytes // lines - 200 - len(system.encode()), 10)
    rng = random.Random(15)
    with path.open("wb", buffering=1 << 20) as out:
        for i in range(lines):
            request = {
                "custom_id": f"request-{i:08d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "qwen-plus",
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"{i} " + _content(rng, per_line)},
                    ],
                    "max_tokens": 512,
                },
            }
            out.write(orjson.dumps(request) + b"\n")
    return path.stat().st_size


def worker(mode: str, path: Path) -> dict[str, Any]:
    """One measured pass, run in a fresh process: the command as a user runs it."""
    from batchd.cli import main

    argv = {
        "validate": ["validate", "--json", str(path)],
        "estimate": ["estimate", "--json", str(path)],
        "estimate --approx": ["estimate", "--json", "--approx", str(path)],
    }[mode]
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with io.StringIO() as printed, contextlib.redirect_stdout(printed):
        code = main(argv)
        output = printed.getvalue()
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    assert code == 0, (mode, code)
    figures: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }
    if mode != "validate":
        figures["input_tokens"] = json.loads(output)["input_tokens"]
    return figures


def run_once(mode: str, path: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "tests.bench.bench_estimate", "--worker", mode, str(path)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def exact_available() -> bool:
    """Whether Qwen's vocabulary can run here, found without loading it (this process's
    peak RSS is inherited by the passes it starts)."""
    import importlib.util

    from batchd.provider.tokens import qwen_vocabulary_path

    return qwen_vocabulary_path() is not None and importlib.util.find_spec("tiktoken") is not None


def measure(path: Path, passes: list[str], repeat: int) -> dict[str, dict[str, Any]]:
    """Each pass on `path`, alternating, `repeat` times; the fastest of each."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in passes}
    for _ in range(repeat):
        for mode in passes:
            runs[mode].append(run_once(mode, path))
    size_mb = path.stat().st_size / 1e6
    best: dict[str, dict[str, Any]] = {}
    for mode, results in runs.items():
        figures = min(results, key=lambda r: float(r["seconds"]))
        figures["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
        figures["all_seconds"] = [round(r["seconds"], 3) for r in results]
        figures["mb_per_s"] = size_mb / figures["seconds"]
        best[mode] = figures
    for figures in best.values():
        figures["ratio"] = figures["mb_per_s"] / best["validate"]["mb_per_s"]
    return best


def rows(f: dict[str, Any]) -> list[Row]:
    """Table rows for tests.bench.run."""
    out: list[Row] = []
    for case, data in f["cases"].items():
        size = f"{data['file']['bytes'] / 1e6:.0f} MB / {data['file']['lines']} lines, {case}"
        validate = data["passes"]["validate"]
        for mode in ("estimate --approx", "estimate"):
            figures = data["passes"].get(mode)
            if figures is None:
                continue
            target = mode == "estimate --approx"
            out.append(
                (
                    "estimate",
                    f"{size}: MB/s, {mode} vs validate",
                    f"{figures['mb_per_s']:.0f} vs {validate['mb_per_s']:.0f}"
                    f" = {figures['ratio']:.2f}",
                    ">= 0.5" if target else "(exact: measured)",
                    verdict(figures["ratio"] >= 0.5) if target else "n/a",
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per pass; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="20 MB, 10,000 lines")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--dir", type=Path, help="where to generate the files")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, path = args.worker
        print(json.dumps(worker(mode, Path(path))))
        return 0
    if args.quick:
        args.size_mb, args.lines = 20, 10_000

    passes = ["validate", "estimate --approx"]
    if exact_available():
        passes.append("estimate")
    figures: dict[str, Any] = {"cases": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for case, system in (
            ("unique contents", "You are a helpful assistant."),
            ("long system prompt repeated", LONG_SYSTEM),
        ):
            path = Path(tmp) / "estimate.jsonl"
            size = generate(path, args.lines, args.size_mb * 1_000_000, system)
            run_once("validate", path)  # warm the page cache
            measured = measure(path, passes, args.repeat)
            if "estimate" in measured:
                exact = measured["estimate"]["input_tokens"]
                fast = measured["estimate --approx"]["input_tokens"]
                measured["estimate --approx"]["error_vs_exact"] = (fast - exact) / exact
            figures["cases"][case] = {
                "file": {"bytes": size, "lines": args.lines, "system_bytes": len(system.encode())},
                "passes": measured,
            }
            path.unlink()

    print(f"{'case / pass':<48} {'MB/s':>8} {'ratio':>6} {'cpu s':>8} {'peak RSS MB':>12}")
    for case, data in figures["cases"].items():
        for mode, row in data["passes"].items():
            print(
                f"{case + ' / ' + mode:<48} {row['mb_per_s']:>8.1f} {row['ratio']:>6.2f}"
                f" {row['cpu_seconds']:>8.2f} {row['peak_rss_mb']:>12.1f}"
            )
        error = data["passes"]["estimate --approx"].get("error_vs_exact")
        if error is not None:
            print(f"{case}: estimate --approx input tokens vs exact: {error:+.1%}")
    print("target: estimate --approx >= 0.5x validate")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
