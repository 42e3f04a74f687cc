"""What `vkr report` costs on a large run directory, against reading the same files raw.

A real run is made first (3 real videos through the real pipeline and litellm over HTTP to
the loopback fake server, under a policy that rejects at every stage); its records, call
log and failures are then replicated under new video ids up to ``--videos`` videos, so the
big run directory holds real shapes and real reason strings.

"raw" is the floor any report must pay: ``json.loads`` of every record file and every
call line, counting accepted examples and summing the cost of paid calls (with the garbage
collector paused, as build_report does while loading). "vkr" is
``build_report`` (validated schemas, funnel per skill, reason grouping, per-model and
per-step sums, latency percentiles); "write" is ``write_report`` (json, md, html, png).

    .venv/bin/python bench/bench_report.py [--videos 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corpus.report import build_report, write_report  # noqa: E402
from plugins.providers.fake_server import FakeModelServer, write_pool  # noqa: E402
from vkr_core.config import RunConfig  # noqa: E402
from vkr_core.files import read_jsonl  # noqa: E402
from vkr_core.plugins import get_plugin_manager  # noqa: E402
from vkr_core.run import process_items  # noqa: E402
from vkr_core.schemas import Video  # noqa: E402
from vkr_core.store import RunLayout  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from videos import video_dir  # noqa: E402  # tests/videos.py: the test videos, made if absent

TESTDATA = Path(os.environ["VKR_TESTDATA"]) if os.environ.get("VKR_TESTDATA") else video_dir()
RESULTS = Path(__file__).resolve().parent / "results"
SEED_VIDEOS = {
    "pancake": "flipping_a_pancake.mkv",
    "rotated": "video_90.mov",
    "unordered": "unordered.mov",
}
POLICY = {
    "steps": {
        "example_generation": {"malformed": 0.15, "refusal": 0.05},
        "self_consistency": {"accuracy": 0.7},
        "video_dependency": {"accuracy": 0.4},
        "cot_verification": {"cot_pass": 0.7},
    }
}


def make_seed_run(work: Path) -> Path:
    folder = work / "videos"
    folder.mkdir()
    videos = []
    for video_id, name in SEED_VIDEOS.items():
        target = folder / f"{video_id}{Path(name).suffix}"
        shutil.copy(TESTDATA / name, target)
        videos.append(Video(video_id=video_id, path=str(target), discipline="cooking"))
    (folder / "broken.mp4").write_text("not a video\n")
    videos.append(Video(video_id="broken", path=str(folder / "broken.mp4")))
    pm = get_plugin_manager()
    with FakeModelServer(seed=0, policy=None) as server:
        server.set_policy(POLICY)
        pool = write_pool(work / "pool.yaml", server.base_url, pm=pm)
        asyncio.run(process_items(videos, work / "seed", pool, RunConfig(), pm))
    return work / "seed"


def _rename(record: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    record["video_id"] = new
    record["video"]["video_id"] = new
    for example in record["accepted"]:
        example["video_id"] = new
        example["problem_id"] = example["problem_id"].replace(old, new, 1)
    for rejection in record["rejected"]:
        rejection["example_id"] = rejection["example_id"].replace(old, new, 1)
        if rejection["candidate"]:
            rejection["candidate"]["video_id"] = new
            rejection["candidate"]["example_id"] = rejection["example_id"]
    return record


def replicate(seed: Path, target: Path, videos: int) -> dict[str, int]:
    source, copy = RunLayout(seed), RunLayout(target)
    records = {p.stem: p.read_text() for p in source.record_files()}
    calls = [call for _, call in read_jsonl(source.calls, missing_ok=True)]
    failures = [failure for _, failure in read_jsonl(source.failures, missing_ok=True)]
    copy.records.mkdir(parents=True)
    copies = max(1, videos // len(records))
    call_lines, failure_lines = [], []
    for i in range(copies):
        for old, text in records.items():
            new = f"{old}-{i:05d}"
            record = _rename(json.loads(text), old, new)
            copy.record(new).write_text(json.dumps(record, indent=2))
        for call in calls:
            call_lines.append(json.dumps({**call, "video_id": f"{call['video_id']}-{i:05d}"}))
        for failure in failures:
            failure_lines.append(
                json.dumps({**failure, "video_id": f"{failure['video_id']}-{i:05d}"})
            )
    copy.calls.write_text("\n".join(call_lines) + "\n")
    copy.failures.write_text("\n".join(failure_lines) + "\n")
    return {"records": copies * len(records), "calls": len(call_lines)}


def raw_report(run_dir: Path) -> dict[str, Any]:
    # The same collector pause as build_report, so the ratio is about the work, not the GC.
    gc.disable()
    try:
        return _raw_report(run_dir)
    finally:
        gc.enable()


def _raw_report(run_dir: Path) -> dict[str, Any]:
    # The least work a report could do: plain json, no validation, no damaged-line checks.
    layout = RunLayout(run_dir)
    accepted = 0
    for path in layout.record_files():
        accepted += len(json.loads(path.read_text())["accepted"])
    spend = 0.0
    for line in layout.calls.read_text().splitlines():
        call = json.loads(line)
        if not call["cache_hit"]:
            spend += call["cost_usd"]
    return {"accepted": accepted, "spend": spend}


def timed(func: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vkr-bench-report-") as tmp:
        work = Path(tmp)
        seed = make_seed_run(work)
        big = work / "big"
        sizes = replicate(seed, big, args.videos)
        raw_s, raw = timed(lambda: raw_report(big), args.repeats)
        vkr_s, report = timed(lambda: build_report(big), args.repeats)
        write_s, _ = timed(lambda: write_report(report, work / "out"), args.repeats)
        assert report["totals"]["accepted"] == raw["accepted"]
        assert abs(report["totals"]["spend_usd"] - raw["spend"]) < 1e-9
        result = {
            "command": " ".join(["bench/bench_report.py", *sys.argv[1:]]),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "records": sizes["records"],
            "calls": sizes["calls"],
            "examples": report["totals"]["rounds"],
            "repeats": args.repeats,
            "raw_median_s": raw_s,
            "vkr_median_s": vkr_s,
            "vkr_over_raw": vkr_s / raw_s,
            "write_median_s": write_s,
            "bytes": {
                p.name: p.stat().st_size for p in sorted((work / "out").iterdir()) if p.is_file()
            },
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
