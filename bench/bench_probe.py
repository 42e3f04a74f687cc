"""What `vkr probe` costs around its model calls, against the same calls made raw with litellm.

One eval set of MC questions on two copies of the pancake test clip, probed by 3 fake models
x 3 trials through the loopback fake server (real HTTP, real litellm client). Frames are
sampled once before timing (sampling has its own benchmark), so every variant sends the
very same requests:

- vkr, cold: ``probe_eval_set`` into a fresh output folder (empty cache): validation, the
  engine's run (lock, config snapshot, preflight of the 3 models, the batch), frame choice,
  cached-call bookkeeping, call records, step inputs, per-video records,
  trials/kept/filtered/report.
- vkr, rerun: the same command again in the same folder: every call from the cache.
- ModelCaller alone: the same requests through ``ModelCaller.call`` into a fresh cache, with
  no probe logic around them (separates the probe's own cost from the call layer's).
- raw: the same requests (messages built by the step, frames as data URLs) sent with
  ``litellm.acompletion`` under the same concurrency, replies parsed and compared with the
  solution; nothing cached, nothing written.

Variants run round-robin so load from other processes falls on all alike; medians.

    .venv/bin/python bench/bench_probe.py [--questions 60] [--runs 5] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench_calls import VIDEO  # noqa: E402  # the pancake clip, made if absent

from corpus.probe import (  # noqa: E402
    PROBE_STEP,
    ProbeOptions,
    load_eval_set,
    probe_eval_set,
    trial_frames,
    video_key,
)
from plugins.providers.fake_server import (  # noqa: E402
    FakeModelServer,
    make_tag,
    truth_for_tag,
    write_pool,
)
from vkr_core.answers import answers_match  # noqa: E402
from vkr_core.calls import ModelCaller  # noqa: E402
from vkr_core.config import load_pool  # noqa: E402
from vkr_core.plugins import get_plugin_manager  # noqa: E402
from vkr_core.steps import extract_json  # noqa: E402
from vkr_core.video import FrameImages, sample_frames  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["fake-a", "fake-b", "fake-c"]
TRIALS = 3


def make_eval(folder: Path, questions: int) -> Path:
    (folder / "videos").mkdir(parents=True)
    for name in ("one.mkv", "two.mkv"):
        shutil.copy(VIDEO, folder / "videos" / name)
    rows = []
    for n in range(questions):
        tag = make_tag(f"{n:08x}", "mc")
        rows.append(
            {
                "id": f"q{n}",
                "video_path": "one.mkv" if n % 2 else "two.mkv",
                "question": f"{tag} What does the cook do here?",
                "options": ["A. tilt", "B. pour", "C. flip", "D. wait"],
                "problem_type": "multiple-choice",
                "solution": f"<answer>{truth_for_tag(tag)}</answer>",
                "dataset": f"bench-{n % 3}",
                "subject": "cooking",
            }
        )
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def probe_requests(
    eval_file: Path, videos: Path, frames_root: Path, pool_path: Path, pm: Any
) -> list[tuple[Any, Any, int, list[dict[str, Any]]]]:
    """(question, model spec, trial, messages) of every trial, exactly as the probe sends them."""
    step = pm.registry.get("step", PROBE_STEP)
    pool = load_pool(pool_path)
    jobs = []
    frames_by_video: dict[str, Any] = {}
    for item in load_eval_set(eval_file):
        q = item.question
        if q.video_path not in frames_by_video:
            frames_by_video[q.video_path] = sample_frames(
                videos / q.video_path, frames_root / video_key(q.video_path), fps=1.0,
                max_frames=1800, pm=pm,
            )  # fmt: skip
        for name in MODELS:
            spec = pool.get(name)
            chosen = trial_frames(frames_by_video[q.video_path], TRIALS, 0, q.id, name)
            for number, frame in enumerate(chosen):
                jobs.append((q, spec, number, step.messages(q, frame)))
    return jobs


async def raw_probe(
    eval_file: Path, videos: Path, frames_root: Path, pool_path: Path, pm: Any, concurrency: int
) -> int:
    """The same requests, sent with litellm directly; returns the number of right answers."""
    import litellm

    step = pm.registry.get("step", PROBE_STEP)
    images = FrameImages()
    limit = asyncio.Semaphore(concurrency)
    jobs = probe_requests(eval_file, videos, frames_root, pool_path, pm)

    async def one(q: Any, spec: Any, number: int, messages: list[dict[str, Any]]) -> bool:
        async with limit:
            reply = await litellm.acompletion(
                model=spec.model,
                api_base=spec.api_base,
                api_key="sk-bench",
                messages=images.expand(messages),
                temperature=step.temperature,
                max_tokens=step.max_tokens,
                seed=number,
                extra_headers={"X-Vkr-Step": PROBE_STEP},
                max_retries=0,
            )
        answer = extract_json(reply.choices[0].message.content)["answer"]
        return answers_match("multiple choice", q.answer, answer)

    right = await asyncio.gather(*(one(*job) for job in jobs))
    return sum(right)


async def caller_only(
    eval_file: Path,
    videos: Path,
    frames_root: Path,
    pool_path: Path,
    pm: Any,
    concurrency: int,
    cache_dir: Path,
) -> int:
    """The same requests through vkr's ModelCaller (cache, journal, retries) and nothing else."""
    step = pm.registry.get("step", PROBE_STEP)
    caller = ModelCaller(cache_dir=cache_dir, providers=pm.registry.providers)
    limit = asyncio.Semaphore(concurrency)
    jobs = probe_requests(eval_file, videos, frames_root, pool_path, pm)
    params = {"temperature": step.temperature, "max_tokens": step.max_tokens}

    async def one(q: Any, spec: Any, number: int, messages: list[dict[str, Any]]) -> bool:
        async with limit:
            result = await caller.call(
                spec=spec,
                step=PROBE_STEP,
                prompt_version=step.version(),
                messages=messages,
                params=params,
                sample=number,
                validate=step.parse,
            )
        return answers_match("multiple choice", q.answer, step.parse(result.text).answer)

    try:
        return sum(await asyncio.gather(*(one(*job) for job in jobs)))
    finally:
        await caller.aclose()  # the provider's HTTP sessions too, not only the cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    pm = get_plugin_manager()
    work = Path(tempfile.mkdtemp(prefix="vkr-bench-probe-"))
    timings: dict[str, list[float]] = {
        "vkr probe, cold": [],
        "vkr probe, rerun": [],
        "ModelCaller alone, cold": [],
        "raw litellm": [],
    }
    calls = args.questions * len(MODELS) * TRIALS
    try:
        eval_file = make_eval(work, args.questions)
        videos, frames_root = work / "videos", work / "frames"
        with FakeModelServer(policy={"accuracy": 0.6}) as server:
            pool = write_pool(work / "pool.yaml", server.base_url, pm=pm)

            def options() -> ProbeOptions:
                return ProbeOptions(
                    models=MODELS, concurrency=args.concurrency, frames_dir=frames_root
                )

            # Warm-up: frames sampled, litellm imported and connected.
            asyncio.run(probe_eval_set(eval_file, videos, pool, work / "warm", options(), pm))
            asyncio.run(
                raw_probe(eval_file, videos, frames_root, pool, pm, args.concurrency)
            )  # fmt: skip
            for run in range(args.runs):
                out = work / f"out{run}"
                started = time.perf_counter()
                cold = asyncio.run(probe_eval_set(eval_file, videos, pool, out, options(), pm))
                timings["vkr probe, cold"].append(time.perf_counter() - started)
                assert cold.report["calls"]["paid"] == calls, cold.report["calls"]

                started = time.perf_counter()
                rerun = asyncio.run(probe_eval_set(eval_file, videos, pool, out, options(), pm))
                timings["vkr probe, rerun"].append(time.perf_counter() - started)
                assert rerun.report["calls"]["paid"] == 0

                started = time.perf_counter()
                via_caller = asyncio.run(
                    caller_only(
                        eval_file, videos, frames_root, pool, pm, args.concurrency,
                        work / f"caller{run}",
                    )
                )  # fmt: skip
                timings["ModelCaller alone, cold"].append(time.perf_counter() - started)

                started = time.perf_counter()
                right = asyncio.run(
                    raw_probe(eval_file, videos, frames_root, pool, pm, args.concurrency)
                )
                timings["raw litellm"].append(time.perf_counter() - started)
                vkr_right = sum(
                    e["right_trials"] for e in cold.report["by_model"].values()
                )  # fmt: skip
                assert right == vkr_right == via_caller, (right, vkr_right, via_caller)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    raw = statistics.median(timings["raw litellm"])
    caller = statistics.median(timings["ModelCaller alone, cold"])
    rows = []
    for name, values in timings.items():
        median = statistics.median(values)
        rows.append(
            {
                "variant": name,
                "median_s": round(median, 3),
                "min_s": round(min(values), 3),
                "max_s": round(max(values), 3),
                "ms_per_trial": round(1000 * median / calls, 2),
                "ratio_vs_raw": round(median / raw, 2),
                "ratio_vs_caller": round(median / caller, 2),
            }
        )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "questions": args.questions,
        "trials_total": calls,
        "concurrency": args.concurrency,
        "runs": args.runs,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{calls} trials ({args.questions} questions x {len(MODELS)} models x {TRIALS})")
    print("| variant | median s | min–max s | ms per trial | vs raw | vs ModelCaller alone |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['median_s']:.2f} | {row['min_s']:.2f}–{row['max_s']:.2f}"
            f" | {row['ms_per_trial']:.1f} | {row['ratio_vs_raw']:.2f}"
            f" | {row['ratio_vs_caller']:.2f} |"
        )


if __name__ == "__main__":
    main()
