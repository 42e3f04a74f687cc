"""What `vkr collect` costs per candidate video, against the raw HTTP calls doing the same work.

The loopback servers (model, YouTube Data API with video files, Azure Content Safety) run in
this process; both sides run as child processes, so their wall and CPU times are the
children's alone:

- "vkr": ``vkr collect --bank BUILT --moderation azure`` into a fresh folder (the bank is
  built once beforehand, so both sides start from the same knowledge points).
- "raw": one aiohttp session replaying, at the same concurrency, exactly the requests vkr's
  run made, read from the servers afterwards: each YouTube ``search``/``videos`` request,
  each file GET, each chat completion (the same texts and the same JPEG frames as data URLs)
  and each moderation request (the same images) — no cache, ledger, parsing or records.

Per candidate = time / candidates found. Repeats alternate the sides; medians are reported.

    .venv/bin/python bench/bench_collect.py [--videos-per-lecture 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VKR = str(Path(sys.executable).parent / "vkr")
MODERATION_KEY = "bench-moderation-key"
# The example bank's lecture titles: every lecture's first knowledge point is its title,
# and the model's queries contain the term.
TITLES = (
    "newton's laws of motion",
    "rotational dynamics and torque",
    "heat transfer",
    "turning on a lathe",
    "gear trains",
)


def timed(
    args: list[str], env: dict[str, str]
) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(f"{args[:2]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, cpu, result


# ---------------------------------------------------------------- the raw side (child process)


async def replay(plan: dict[str, Any]) -> None:
    import aiohttp

    slots = asyncio.Semaphore(plan["concurrency"])
    images: dict[str, str] = plan["images"]

    def data_url(sha: str) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(Path(images[sha]).read_bytes()).decode()

    async with aiohttp.ClientSession() as session:

        async def get(url: str, params: dict[str, str] | None = None) -> None:
            async with slots, session.get(url, params=params) as reply:
                await reply.read()

        async def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
            async with slots, session.post(url, json=body, headers=headers) as reply:
                await reply.read()

        tasks = []
        for method, value in plan["youtube"]:
            params = {"key": plan["youtube_key"], "part": "snippet"}
            if method == "search":
                params.update(type="video", videoLicense="creativeCommon", q=value, maxResults="10")
            else:
                params.update(part="contentDetails,snippet,status", id=value)
            tasks.append(get(f"{plan['youtube_base']}/{method}", params))
        for vid in plan["files"]:
            tasks.append(get(plan["file_template"].format(id=vid)))
        for chat in plan["chats"]:
            content: list[dict[str, Any]] = [{"type": "text", "text": t} for t in chat["texts"]]
            content += [
                {"type": "image_url", "image_url": {"url": data_url(h)}} for h in chat["images"]
            ]
            body = {
                "model": chat["model"],
                "messages": [{"role": "user", "content": content}],
                "temperature": 0.0,
            }
            tasks.append(
                post(
                    f"{plan['model_base']}/chat/completions",
                    body,
                    {"Authorization": "Bearer x", "X-Vkr-Step": chat["step"]},
                )
            )
        for sha in plan["moderation"]:
            body = {"image": {"content": data_url(sha).split(",", 1)[1]}}
            tasks.append(
                post(
                    f"{plan['azure']}/contentsafety/image:analyze?api-version=2024-09-01",
                    body,
                    {"Ocp-Apim-Subscription-Key": MODERATION_KEY},
                )
            )
        await asyncio.gather(*tasks)


# ---------------------------------------------------------------- the bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos-per-lecture", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--raw-plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_plan:
        asyncio.run(replay(json.loads(Path(args.raw_plan).read_text())))
        return

    from plugins.providers.fake_moderation import FakeAzureContentSafety
    from plugins.providers.fake_server import FakeModelServer, write_pool
    from plugins.providers.fake_youtube import FakeVideo, FakeYouTubeServer
    from vkr_core.plugins import get_plugin_manager

    work = Path(tempfile.mkdtemp(prefix="vkr-bench-collect-"))
    videos = [
        FakeVideo(f"v{lecture}x{i:03d}", f"{title} clip {i}", (title,), shade=lecture * 50 + i)
        for lecture, title in enumerate(TITLES)
        for i in range(args.videos_per_lecture)
    ]
    policy = {
        "steps": {"metadata_relevance": {"relevant": 1.0}, "visual_relevance": {"relevant": 1.0}}
    }
    rows: dict[str, list[tuple[float, float]]] = {"vkr": [], "raw": []}
    candidates = 0
    with (
        FakeModelServer(policy=policy, seed=0) as models,
        FakeYouTubeServer(videos, match="contains") as youtube,
        FakeAzureContentSafety(api_key=MODERATION_KEY) as azure,
    ):
        models.base_url = models.start()
        pm = get_plugin_manager()
        pool = write_pool(
            work / "pool.yaml", models.base_url, registry_path=work / "elig.yaml", pm=pm
        )
        env = {
            **os.environ,
            "YOUTUBE_API_KEY": youtube.api_key,
            "AZURE_CONTENT_SAFETY_ENDPOINT": str(azure.url),
            "AZURE_CONTENT_SAFETY_KEY": MODERATION_KEY,
        }
        from knowledge.loader import example_bank_path

        bank = work / "bank"
        subprocess.run(
            [VKR, "bank", "build", "--bank", str(example_bank_path()), "--pool", str(pool),
             "--out", str(bank), "--no-progress"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        plan_path = work / "plan.json"
        for repeat in range(args.repeats):
            for side in ("vkr", "raw") if repeat % 2 == 0 else ("raw", "vkr"):
                if side == "raw" and not plan_path.exists():
                    continue
                if side == "vkr":
                    models.reset_stats()
                    youtube.answered.clear()
                    youtube.file_requests.clear()
                    azure.reset_counts()
                    out = work / f"collect-{repeat}"
                    wall, cpu, _ = timed(
                        [VKR, "collect", "--bank", str(bank), "--pool", str(pool), "--out",
                         str(out), "--youtube-api-base", youtube.base_url,
                         "--download-url-template", youtube.file_url_template,
                         "--download-interval", "0", "--concurrency", str(args.concurrency),
                         "--no-progress"],
                        env,
                    )  # fmt: skip
                    report = json.loads((out / "collect_report.json").read_text())
                    candidates = report["funnel"]["candidates"]
                    if not plan_path.exists():
                        write_plan(plan_path, out, models, youtube, azure, args.concurrency)
                else:
                    wall, cpu, _ = timed(
                        [sys.executable, __file__, "--raw-plan", str(plan_path)], env
                    )
                rows[side].append((wall, cpu))
        if len(rows["raw"]) < args.repeats:  # the first repeat had no plan yet
            for _ in range(args.repeats - len(rows["raw"])):
                rows["raw"].append(
                    timed([sys.executable, __file__, "--raw-plan", str(plan_path)], env)[:2]
                )
    result: dict[str, Any] = {"candidates": candidates, "repeats": args.repeats}
    for side, values in rows.items():
        result[side] = {
            "wall_s": statistics.median(w for w, _ in values),
            "cpu_s": statistics.median(c for _, c in values),
        }
        result[side]["wall_ms_per_candidate"] = 1000 * result[side]["wall_s"] / candidates
        result[side]["cpu_ms_per_candidate"] = 1000 * result[side]["cpu_s"] / candidates
    result["ratio_wall"] = result["vkr"]["wall_s"] / result["raw"]["wall_s"]
    result["ratio_cpu"] = result["vkr"]["cpu_s"] / result["raw"]["cpu_s"]
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "collect.json").write_text(json.dumps(result, indent=2) + "\n")


def write_plan(
    path: Path, out: Path, models: Any, youtube: Any, azure: Any, concurrency: int
) -> None:
    """The requests vkr's run made, as the servers saw them, for the raw side to replay."""
    images = {}
    from vkr_core.store import RunLayout

    for frame in RunLayout(out / "run").frames_root.rglob("*.jpg"):
        images[hashlib.sha256(frame.read_bytes()).hexdigest()] = str(frame)
    chats = [
        {"model": r.model, "step": r.step, "texts": r.texts, "images": r.image_hashes}
        for r in models.received()
        if r.step != "knowledge_points"
    ]
    plan = {
        "concurrency": concurrency,
        "youtube_key": youtube.api_key,
        "youtube_base": youtube.base_url,
        "file_template": youtube.file_url_template,
        "model_base": models.base_url,
        "azure": str(azure.url),
        "youtube": list(youtube.answered),
        "files": sorted(youtube.file_requests),
        "chats": chats,
        "moderation": list(azure.images),
        "images": images,
    }
    path.write_text(json.dumps(plan))


if __name__ == "__main__":
    main()
