"""What qualification pilots cost on top of the model calls and the database writes they make.

Three pairs, each "vkr" against a "raw" baseline doing only the unavoidable part:

- pilot, cold cache: ``run_pilot`` (read recorded inputs, stratified sample, verify and copy
  frames, call, parse, write items.jsonl, pilot.json and auto labels) against the same calls
  made directly with ``ModelCaller`` into an empty cache;
- pilot, warm cache: the same two, run again over their filled caches;
- one label: a POST to the review server (HTTP, validation, history-keeping SQLite write)
  against a bare ``INSERT`` + commit into the same SQLite schema settings (WAL).

The model is the scripted fake server on 127.0.0.1 through the real litellm client.

    .venv/bin/python bench/bench_qualify.py [--videos 5] [--n 24] [--trials 5] [--labels 300]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_calls import VIDEO  # noqa: E402  # the pancake clip, made if absent

RESULTS = Path(__file__).resolve().parent / "results"
STEP = "example_generation"


def record_inputs(root: Path, videos: int, pool: Path, pm: Any) -> Path:
    from vkr_core.config import RunConfig
    from vkr_core.run import process_items
    from vkr_core.schemas import Video

    items = []
    for i in range(videos):
        path = root / f"v{i}.mkv"
        shutil.copy(VIDEO, path)
        discipline = ("cooking", "physics", "chemistry", "biology")[i % 4]
        items.append(Video(video_id=f"v{i}", path=str(path), discipline=discipline, title=f"v{i}"))
    asyncio.run(process_items(items, root / "run", pool, RunConfig(), pm))
    return root / "run"


def raw_calls(pilot_dir: Path, cache: Path, pool: Path, pm: Any) -> None:
    """The pilot's model calls and nothing else: same messages, same parameters."""
    from vkr_core.calls import ModelCaller
    from vkr_core.config import load_pool

    step = pm.registry.steps[STEP]
    spec = load_pool(pool).get("fake-a")
    items = [json.loads(line) for line in (pilot_dir / "items.jsonl").read_text().splitlines()]
    jobs = []
    for item in items:
        paths = {f["sha256"]: str(pilot_dir / f["path"]) for f in item["frames"]}
        messages = [
            {
                "role": m["role"],
                "content": [
                    {"type": "frame", "sha256": p["sha256"], "path": paths[p["sha256"]]}
                    if p.get("type") == "image"
                    else p
                    for p in m["content"]
                ]
                if isinstance(m["content"], list)
                else m["content"],
            }
            for m in item["messages"]
        ]
        jobs.append(messages)
    caller = ModelCaller(cache_dir=cache, providers=pm.registry.providers)
    params = {"temperature": step.temperature, "max_tokens": step.max_tokens}

    async def go() -> None:
        await asyncio.gather(
            *(
                caller.call(
                    spec=spec,
                    step=STEP,
                    prompt_version=step.version(),
                    messages=m,
                    params=params,
                    validate=step.parse,
                )
                for m in jobs
            )
        )

    try:
        asyncio.run(go())
    finally:
        caller.close()


def timed(func: Any, *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    func(*args, **kwargs)
    return time.perf_counter() - started


def bench_labels(pilot_dir: Path, count: int) -> tuple[list[float], list[float]]:
    from qualification.pilot import open_pilot
    from qualification.review import ReviewServer

    items = [i.item_id for i in open_pilot(pilot_dir).items]
    vkr: list[float] = []
    with ReviewServer(pilot_dir) as server:
        host, port = server.httpd.server_address[:2]
        connection = http.client.HTTPConnection(host, port, timeout=10)
        for k in range(count):
            body = json.dumps(
                {
                    "item_id": items[k % len(items)],
                    "annotator": f"a{k // len(items)}",
                    "label": ("ok", "soft", "hard")[k % 3],
                    "category": None if k % 3 == 0 else "other",
                    "note": "",
                }
            )
            started = time.perf_counter()
            connection.request("POST", "/api/labels", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            vkr.append(time.perf_counter() - started)
            assert response.status == 200
        connection.close()
    raw: list[float] = []
    db_path = pilot_dir / "raw.sqlite"
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE labels (id INTEGER PRIMARY KEY, item_id TEXT, annotator TEXT, label TEXT,"
        " category TEXT, note TEXT, created_at TEXT, source TEXT, superseded_by INTEGER)"
    )
    for k in range(count):
        started = time.perf_counter()
        db.execute(
            "INSERT INTO labels (item_id, annotator, label, category, note, created_at, source)"
            " VALUES (?, ?, ?, ?, '', ?, 'web')",
            (items[k % len(items)], f"a{k}", "ok", None, str(time.time())),
        )
        raw.append(time.perf_counter() - started)
    db.close()
    return vkr, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=5)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--labels", type=int, default=300)
    args = parser.parse_args()

    from plugins.providers.fake_server import FakeModelServer, write_pool
    from qualification.pilot import run_pilot
    from vkr_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    root = Path(tempfile.mkdtemp(prefix="vkr-bench-qualify-"))
    try:
        with FakeModelServer(seed=0) as server:
            assert server.base_url
            pool = write_pool(root / "pool.yaml", server.base_url, pm=pm)
            server.set_policy({"steps": {"self_consistency": {"accuracy": 0.0}}})
            run = record_inputs(root, args.videos, pool, pm)
            server.set_policy({})
            results: dict[str, dict[str, list[float]]] = {
                "pilot_cold": {"vkr": [], "raw": []},
                "pilot_warm": {"vkr": [], "raw": []},
            }
            for trial in range(args.trials):
                out = root / f"pilot{trial}"
                pilot_args = (STEP, "fake-a", pool, [run], out)
                for case in ("pilot_cold", "pilot_warm"):
                    results[case]["vkr"].append(timed(run_pilot, *pilot_args, n=args.n, pm=pm))
                cache = root / f"raw-cache{trial}"
                for case in ("pilot_cold", "pilot_warm"):
                    results[case]["raw"].append(timed(raw_calls, out, cache, pool, pm))
            vkr_labels, raw_labels = bench_labels(root / "pilot0", args.labels)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for name, pair in results.items():
        vkr_ms = statistics.median(pair["vkr"]) * 1000
        raw_ms = statistics.median(pair["raw"]) * 1000
        rows.append((name, f"{args.n} items", raw_ms, vkr_ms))
    rows.append(
        (
            "one label",
            "per label",
            statistics.median(raw_labels) * 1000,
            statistics.median(vkr_labels) * 1000,
        )
    )
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus")
    print("| case | unit | raw median ms | vkr median ms | vkr / raw |")
    print("|---|---|---:|---:|---:|")
    for name, unit, raw_ms, vkr_ms in rows:
        print(f"| {name} | {unit} | {raw_ms:.2f} | {vkr_ms:.2f} | {vkr_ms / raw_ms:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qualify.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "python": platform.python_version(),
                "pilot": results,
                "labels": {"vkr": vkr_labels, "raw": raw_labels},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
