"""`vkr run` throughput against the model latency: achieved / ideal wall time per concurrency.

A user's run: ``vkr run`` in its own process, ``vkr dev fake-server`` in another, every
reply taking ``--latency`` seconds and every gate passing, so each of a video's six rounds
walks the whole path: generate, self_consistency, video_dependency (its two models at
once), cot_verification = 4 model latencies. Per-model limits are raised out of the way.
With C videos in flight the ideal wall time is ceil(N / C) x 4 x latency; the ratio
ideal / measured says how close vkr comes to running at the models' speed.

Two ratios per run: end to end (the whole command, start-up and report included) and
steady (minus the start-up of the same command on a finished directory: interpreter,
imports, plugin loading, opening the run). Also the checkpoint bytes per video.

The floor: after vkr at each level, ``floor_client.py`` does the same work with the raw
libraries (decord, Pillow, aiohttp: the same requests, no cache, journal, checkpoint or
verification) against the same server, so "vkr/floor" (the floor's wall time over vkr's)
says what vkr costs and the floor's own e2e what this host allows any client.

    .venv/bin/python bench/bench_throughput.py [--videos 128] [--concurrency 8 32 64]
        [--latency 1.0] [--repeats 1] [--frames-videos 8] [--no-floor]

Last, the checkpoint bytes per video of a run sampling 64 frames per video.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_calls import (  # noqa: E402
    ALL_PASS,
    VKR,
    FakeServerProcess,
    unbounded_pool,
    write_manifest,
    write_results,
)

from vkr_core.store import RunLayout  # noqa: E402

CPU_SECONDS: list[float] = []
HOPS = 4  # generate, self_consistency, video_dependency (both models at once), cot_verification


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], what: str, **kwargs: Any) -> float:
    """Wall seconds of ``command`` run to its end; its CPU seconds go to CPU_SECONDS (a
    `vkr run`'s decoder processes are children of multiprocessing's forkserver and are not
    counted). A failure raises with its output."""
    started, cpu = time.monotonic(), children_cpu()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    wall = time.monotonic() - started
    CPU_SECONDS.append(children_cpu() - cpu)
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return wall


def run(manifest: Path, pool: Path, out: Path, concurrency: int, *options: str) -> float:
    """Wall seconds of one `vkr run` (its CPU seconds go to CPU_SECONDS)."""
    command = [VKR, "run", "--videos", str(manifest), "--pool", str(pool), "--out", str(out)]
    command += ["--concurrency", str(concurrency), "--no-progress", "--skip-preflight"]
    return timed([*command, *options], "vkr run")


def floor_templates(run_dir: Path, manifest: Path, target: Path) -> Path:
    """One recorded step input per step of one video of a finished run, and its title: what
    ``floor_client.py`` fills with each video's title and frames."""
    titles = {v["video_id"]: v["title"] for v in map(json.loads, manifest.read_text().splitlines())}
    layout = RunLayout(run_dir)
    with open(layout.inputs("example_generation")) as first:
        video_id = json.loads(first.readline())["video_id"]
    steps = {}
    for step_file in layout.inputs_root.glob("*.jsonl"):
        with open(step_file) as lines:
            for line in lines:
                entry = json.loads(line)
                if entry["video_id"] == video_id:
                    steps[entry["step"]] = entry["messages"]
                    break
    target.write_text(json.dumps({"title": titles[video_id], "steps": steps}))
    return target


def run_floor(manifest: Path, templates: Path, base_url: str, concurrency: int, out: Path) -> float:
    """Wall seconds of ``floor_client.py`` doing the run's work with the raw libraries (its
    CPU seconds go to CPU_SECONDS)."""
    command = [sys.executable, str(ROOT / "bench" / "floor_client.py"), "--videos", str(manifest)]
    command += ["--templates", str(templates), "--base-url", base_url]
    command += ["--concurrency", str(concurrency), "--out", str(out)]
    return timed(command, "floor client")


def checkpoint_bytes(run_dir: Path) -> int:
    # The database and its -wal and -shm files.
    return sum(p.stat().st_size for p in run_dir.glob(RunLayout(run_dir).checkpoints.name + "*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per reply")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--frames-videos",
        type=int,
        default=8,
        help="videos sampled at 64 frames for the checkpoint-size figure (0: skip it)",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the raw-library client (floor_client.py) run after vkr at each level",
    )
    args = parser.parse_args()
    began, load_start = time.monotonic(), os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="vkr-bench-throughput-"))
    results: dict[str, Any] = {"levels": {}}
    try:
        manifest = write_manifest(work / "videos", args.videos)
        pool = work / "pool.yaml"
        server = FakeServerProcess(pool)
        try:
            unbounded_pool(pool)
            server.set_policy({**ALL_PASS, "latency_ms": args.latency * 1000})
            # Start-up alone: the same command over a directory whose videos are all done.
            small = write_manifest(work / "one", 1)
            run(small, pool, work / "startup", 1)
            startup = statistics.median(run(small, pool, work / "startup", 1) for _ in range(3))
            results["startup_s"] = startup
            print(f"start-up of `vkr run` on a finished directory: {startup:.2f} s (median of 3)")
            print(
                f"{'C':>4} {'ideal s':>8} {'wall s':>8} {'e2e':>6} {'steady':>7} "
                f"{'calls':>6} {'ckpt KB/video':>14} {'CPU s':>6} "
                f"{'floor wall s':>13} {'floor e2e':>10} {'floor CPU s':>12} {'vkr/floor':>10}"
            )
            templates: Path | None = None
            for concurrency in args.concurrency:
                ideal = math.ceil(args.videos / concurrency) * HOPS * args.latency
                walls, calls, per_video, cpus = [], [], [], []
                floor_walls, floor_cpus = [], []
                for repeat in range(args.repeats):
                    out = work / f"run-c{concurrency}-{repeat}"
                    before = server.completions()
                    walls.append(run(manifest, pool, out, concurrency))
                    cpus.append(CPU_SECONDS[-1])
                    calls.append(server.completions() - before)
                    per_video.append(checkpoint_bytes(out) / args.videos)
                    if templates is None:
                        templates = floor_templates(out, manifest, work / "templates.json")
                    shutil.rmtree(out)
                    if args.floor:
                        floor_out = work / "floor-records.jsonl"
                        floor_walls.append(
                            run_floor(manifest, templates, server.base_url, concurrency, floor_out)
                        )
                        floor_cpus.append(CPU_SECONDS[-1])
                wall = statistics.median(walls)
                level = {
                    "ideal_s": ideal,
                    "walls_s": walls,
                    "wall_s": wall,
                    "end_to_end": ideal / wall,
                    "steady": ideal / max(wall - startup, 1e-9),
                    "calls": statistics.median(calls),
                    "checkpoint_bytes_per_video": statistics.median(per_video),
                    "cpu_s": statistics.median(cpus),
                }
                floor = ""
                if floor_walls:
                    floor_wall = statistics.median(floor_walls)
                    level.update(
                        floor_walls_s=floor_walls,
                        floor_wall_s=floor_wall,
                        floor_end_to_end=ideal / floor_wall,
                        floor_cpu_s=statistics.median(floor_cpus),
                        vkr_over_floor=floor_wall / wall,
                    )
                    floor = (
                        f" {floor_wall:>13.1f} {level['floor_end_to_end']:>10.2f} "
                        f"{level['floor_cpu_s']:>12.1f} {level['vkr_over_floor']:>10.2f}"
                    )
                results["levels"][str(concurrency)] = level
                print(
                    f"{concurrency:>4} {ideal:>8.1f} {wall:>8.1f} {level['end_to_end']:>6.2f} "
                    f"{level['steady']:>7.2f} {level['calls']:>6.0f} "
                    f"{level['checkpoint_bytes_per_video'] / 1024:>14.1f} {level['cpu_s']:>6.1f}"
                    + floor,
                    flush=True,
                )
            if args.frames_videos:
                # The clip is 10 s long: 8 fps gives the 64 frames the 669 KB was for.
                many = write_manifest(work / "frames64", args.frames_videos)
                out = work / "frames64-run"
                options = ("--fps", "8", "--max-frames", "64")
                run(many, pool, out, min(8, args.frames_videos), *options)
                first_record = RunLayout(out).record_files()[0]
                frames = json.loads(first_record.read_text())["frames"]
                per_video = checkpoint_bytes(out) / args.frames_videos
                results["checkpoint_64_frames"] = {"frames": frames, "bytes_per_video": per_video}
                print(
                    f"checkpoint bytes per {frames}-frame video: {per_video / 1024:.1f} KB "
                    f"({args.frames_videos} videos)"
                )
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, "throughput.json", args, began, load_start)


if __name__ == "__main__":
    main()
