"""`vkr run` end to end: a rerun with a warm cache, a finished rerun, and peak memory.

Everything runs as a user runs it: ``vkr run`` in its own process against the fake model
server (``vkr dev fake-server``, another process), over copies of the pancake test clip.

1. Warm cache: one cold run into run directory A, then the same manifest into fresh run
   directories that start with a copy of A/cache (every call a cache hit; the server must
   see 0 completions), alternating with reruns into A itself (every video already done).
   For reference: ``vkr plugins`` (start-up and plugin loading alone) and sampling the
   clip's frames with ``sample_frames`` in process and in its isolated decoder process.
2. Memory: cold runs of ``--memory-videos`` videos at several ``--concurrency`` levels,
   with peak RSS of the vkr process (VmHWM) and peak PSS of its process tree (the vkr
   process plus its decoder processes), polled every 50 ms.

    .venv/bin/python bench/bench_run.py [--videos 10] [--repeats 3] [--memory-videos 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_calls import (  # noqa: E402
    VIDEO,
    VKR,
    FakeServerProcess,
    fake_server,
    write_results,
)

from vkr_core.store import RunLayout  # noqa: E402

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
API_KEY_ENV = "VKR_FAKE_API_KEY"


# ---------------------------------------------------------------- watching a process tree


def _children_of() -> dict[int, list[int]]:
    # This kernel has no /proc/<pid>/task/<tid>/children, so walk every process's parent.
    table: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        table[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    return table


def _tree(pid: int) -> list[int]:
    table = _children_of()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(table.get(current, []))
    return found


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared library pages split between the processes mapping them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Watcher(threading.Thread):
    """Polls a process: its VmHWM, its CPU and its reaped children's CPU, its tree's PSS."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.done = threading.Event()
        self.hwm_kb = 0
        self.tree_pss_kb = 0
        self.tree_processes = 0
        self.self_cpu_s = 0.0
        self.children_cpu_s = 0.0

    def run(self) -> None:
        while not self.done.is_set():
            self._sample()
            self.done.wait(self.interval)

    def _sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):  # gone once the process is a zombie: keep the last
                self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
        # Fields 14-17 of stat (11-14 after the command name): utime stime cutime cstime.
        utime, stime, cutime, cstime = (int(v) for v in stat[11:15])
        self.self_cpu_s = (utime + stime) / CLOCK_TICKS
        self.children_cpu_s = (cutime + cstime) / CLOCK_TICKS
        tree = _tree(self.pid)
        pss = sum(_pss_kb(p) for p in tree)
        if pss > self.tree_pss_kb:
            self.tree_pss_kb = pss
            self.tree_processes = len(tree)


@dataclass
class RunResult:
    label: str
    concurrency: int
    videos: int
    wall_s: float
    cpu_s: float  # the vkr process and every process it started and reaped
    main_cpu_s: float
    decoder_cpu_s: float
    peak_rss_mb: float  # VmHWM of the vkr process
    max_rss_mb: float  # wait4's ru_maxrss: the largest single process of the tree
    tree_pss_mb: float
    tree_processes: int
    completions: int  # chat completions the server made during the run
    summary: str


def vkr_run(
    server: FakeServerProcess,
    manifest: Path,
    pool: Path,
    out: Path,
    concurrency: int,
    label: str,
    videos: int,
    *extra: str,
) -> RunResult:
    command = [
        VKR, "run", "--videos", str(manifest), "--pool", str(pool), "--out", str(out),
        "--concurrency", str(concurrency), "--no-progress", *extra,
    ]  # fmt: skip
    before = server.completions()
    log = out.with_name(out.name + f"-{label}.log")
    with log.open("w") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        watcher = Watcher(process.pid)
        watcher.start()
        # wait4, not Popen.wait: it returns the run's own rusage (CPU and max RSS), not the
        # sum over every child this benchmark ever reaped.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        watcher.done.set()
        watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{text}")
    cpu = usage.ru_utime + usage.ru_stime
    return RunResult(
        label=label,
        concurrency=concurrency,
        videos=videos,
        wall_s=wall,
        cpu_s=cpu,
        main_cpu_s=cpu - watcher.children_cpu_s,
        decoder_cpu_s=watcher.children_cpu_s,
        peak_rss_mb=watcher.hwm_kb / 1024,
        max_rss_mb=usage.ru_maxrss / 1024,
        tree_pss_mb=watcher.tree_pss_kb / 1024,
        tree_processes=watcher.tree_processes,
        completions=server.completions() - before,
        summary=text.splitlines()[0] if text else "",
    )


# ---------------------------------------------------------------- inputs


def write_videos(folder: Path, count: int) -> Path:
    """``count`` copies of the pancake clip and a manifest naming them, each with its own title."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        name = f"pancake{i:02d}.mkv"
        if not (folder / name).exists():
            shutil.copy(VIDEO, folder / name)
        lines.append(
            {
                "video_id": f"pancake{i:02d}",
                "path": name,
                "discipline": "cooking",
                "subject": "batter cookery",
                "knowledge_point": "Maillard reaction",
                "title": f"Flipping a pancake, take {i}",
            }
        )
    manifest = folder / f"manifest-{count}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


# ---------------------------------------------------------------- reference figures


def startup_floor(repeats: int) -> list[float]:
    """Wall seconds of `vkr plugins`: interpreter start, CLI and plugin loading."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([VKR, "plugins"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def decode_floor(scratch: Path, repeats: int) -> dict[str, list[float]]:
    """Sampling the clip as `vkr run` does (0.2 fps, 768 px), in process and isolated."""
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.video import sample_frames

    pm = get_plugin_manager()
    out: dict[str, list[float]] = {"in_process_s": [], "isolated_s": [], "isolated_cpu_s": []}
    sample_frames(VIDEO, scratch / "decode-warm", isolate=False, pm=pm)  # imports, page cache
    for repeat in range(repeats):
        started = time.perf_counter()
        sample_frames(VIDEO, scratch / f"decode-a{repeat}", isolate=False, pm=pm)
        out["in_process_s"].append(time.perf_counter() - started)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        sample_frames(VIDEO, scratch / f"decode-b{repeat}", isolate=True, pm=pm)
        out["isolated_s"].append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["isolated_cpu_s"].append(
            after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        )
    return out


# ---------------------------------------------------------------- the two benchmarks


def warm_rerun(
    server: FakeServerProcess,
    pool: Path,
    scratch: Path,
    videos: int,
    repeats: int,
    concurrency: int,
) -> dict[str, Any]:
    manifest = write_videos(scratch / "videos", videos)
    first = scratch / "run-a"
    cold = vkr_run(server, manifest, pool, first, concurrency, "cold", videos)
    assert cold.completions > 0, "the cold run made no model calls"
    print(f"  cold: {cold.wall_s:.1f} s, {cold.completions} calls | {cold.summary}", flush=True)
    warm: list[RunResult] = []
    finished: list[RunResult] = []
    for repeat in range(repeats):
        fresh = scratch / f"run-warm-{repeat}"
        fresh.mkdir()
        shutil.copytree(RunLayout(first).cache, RunLayout(fresh).cache)

        def one_warm(fresh: Path = fresh) -> None:
            warm.append(vkr_run(server, manifest, pool, fresh, concurrency, "warm", videos))

        def one_finished() -> None:
            finished.append(vkr_run(server, manifest, pool, first, concurrency, "done", videos))

        for step in (one_warm, one_finished) if repeat % 2 == 0 else (one_finished, one_warm):
            step()
        for result in (warm[-1], finished[-1]):
            assert result.completions == 0, f"{result.label} rerun made {result.completions} calls"
            print(f"  {result.label}: {result.wall_s:.1f} s | {result.summary}", flush=True)
        shutil.rmtree(fresh)
    return {
        "videos": videos,
        "concurrency": concurrency,
        "cold": asdict(cold),
        "warm": [asdict(r) for r in warm],
        "finished": [asdict(r) for r in finished],
        "startup_s": startup_floor(repeats),
        "decode": decode_floor(scratch, repeats),
    }


def memory(
    server: FakeServerProcess,
    pool: Path,
    scratch: Path,
    videos: int,
    levels: list[int],
    repeats: int,
    latency_ms: float,
) -> dict[str, Any]:
    manifest = write_videos(scratch / "videos", videos)
    results: list[RunResult] = []
    server.set_policy({"latency_ms": latency_ms})
    try:
        for repeat in range(repeats):
            shift = repeat % len(levels)
            for level in levels[shift:] + levels[:shift]:
                out = scratch / f"run-mem-{level}-{repeat}"
                result = vkr_run(server, manifest, pool, out, level, f"mem-c{level}", videos)
                results.append(result)
                print(
                    f"  concurrency {level}: {result.wall_s:.1f} s, vkr peak RSS "
                    f"{result.peak_rss_mb:.0f} MB, tree peak PSS {result.tree_pss_mb:.0f} MB "
                    f"({result.tree_processes} processes)",
                    flush=True,
                )
                shutil.rmtree(out)
    finally:
        server.set_policy({})
    return {
        "videos": videos,
        "latency_ms": latency_ms,
        "levels": levels,
        "runs": [asdict(r) for r in results],
    }


# ---------------------------------------------------------------- reporting


def spread(values: list[float], digits: int = 2) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f}–{max(values):.{digits}f})"
    )


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den


def print_warm(result: dict[str, Any]) -> None:
    videos = result["videos"]
    cold = result["cold"]
    print(
        f"\nwarm-cache rerun: {videos} videos, --concurrency {result['concurrency']}, "
        f"{len(result['warm'])} repeats; median (min–max)\n"
    )
    print("| run | model calls | wall s | s per video | CPU s per video (vkr process + decoders) |")
    print("|---|---:|---:|---:|---:|")
    rows = [("cold (fresh cache)", [cold])]
    rows += [("fresh run dir, copied cache", result["warm"])]
    rows += [("same run dir, all done", result["finished"])]
    for name, runs in rows:
        calls = sorted({r["completions"] for r in runs})
        print(
            f"| {name} | {', '.join(map(str, calls))} | {spread([r['wall_s'] for r in runs])} "
            f"| {spread([r['wall_s'] / videos for r in runs], 3)} "
            f"| {spread([r['cpu_s'] / videos for r in runs], 3)} "
            f"({statistics.median(r['main_cpu_s'] for r in runs) / videos:.3f} + "
            f"{statistics.median(r['decoder_cpu_s'] for r in runs) / videos:.3f}) |"
        )
    marginal = [
        (w["wall_s"] - f["wall_s"]) / videos
        for w, f in zip(result["warm"], result["finished"], strict=True)
    ]
    print(f"\nwarm minus finished, per video: {spread(marginal, 3)} s")
    print(f"`vkr plugins` (start-up floor): {spread(result['startup_s'])} s")
    decode = result["decode"]
    print(
        f"sampling the clip's frames, in process: {spread(decode['in_process_s'], 3)} s; "
        f"isolated: {spread(decode['isolated_s'], 3)} s wall, "
        f"{spread(decode['isolated_cpu_s'], 3)} s CPU in the decoder process"
    )


def print_memory(result: dict[str, Any]) -> None:
    runs = result["runs"]
    levels = result["levels"]
    print(
        f"\npeak memory: {result['videos']} videos, server latency {result['latency_ms']:g} ms; "
        "median (min–max)\n"
    )
    print(
        "| --concurrency | wall s | vkr process peak RSS MB | largest process MB "
        "| tree peak PSS MB | processes at tree peak |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    medians: dict[str, list[float]] = {"peak_rss_mb": [], "tree_pss_mb": []}
    for level in levels:
        at = [r for r in runs if r["concurrency"] == level]
        for key in medians:
            medians[key].append(statistics.median(r[key] for r in at))
        print(
            f"| {level} | {spread([r['wall_s'] for r in at], 1)} "
            f"| {spread([r['peak_rss_mb'] for r in at], 0)} "
            f"| {spread([r['max_rss_mb'] for r in at], 0)} "
            f"| {spread([r['tree_pss_mb'] for r in at], 0)} "
            f"| {max(r['tree_processes'] for r in at)} |"
        )
    xs = [float(level) for level in levels]
    result["slope_rss_mb"] = slope(xs, medians["peak_rss_mb"])
    result["slope_tree_pss_mb"] = slope(xs, medians["tree_pss_mb"])
    print(
        f"\nslope per additional concurrent video: vkr process {result['slope_rss_mb']:.1f} MB, "
        f"process tree {result['slope_tree_pss_mb']:.1f} MB"
    )


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10, help="videos in the rerun benchmark")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="of the rerun benchmark")
    parser.add_argument("--memory-videos", type=int, default=16)
    parser.add_argument("--memory-levels", default="1,4,8", help="--concurrency values")
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--memory-latency-ms", type=float, default=200.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-rerun", action="store_true")
    args = parser.parse_args()
    levels = [int(v) for v in args.memory_levels.split(",")]

    load_start = os.getloadavg()[0]
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, load {load_start:.1f}")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="vkr-bench-run-"))
    os.environ.setdefault(API_KEY_ENV, "bench-key-not-secret")
    results: dict[str, Any] = {}
    try:
        pool = scratch / "pool.yaml"
        with fake_server(pool) as server:
            if not args.skip_rerun:
                results["rerun"] = warm_rerun(
                    server, pool, scratch, args.videos, args.repeats, args.concurrency
                )
            if not args.skip_memory:
                results["memory"] = memory(
                    server,
                    pool,
                    scratch,
                    args.memory_videos,
                    levels,
                    args.memory_repeats,
                    args.memory_latency_ms,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "rerun" in results:
        print_warm(results["rerun"])
    if "memory" in results:
        print_memory(results["memory"])
    write_results(results, "run.json", args, started, load_start)


if __name__ == "__main__":
    main()
