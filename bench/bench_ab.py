"""`vkr run` from two (or more) source trees, alternated against one fake server.

The workload of ``bench_throughput.py`` (every reply after ``--latency`` seconds, plus an
exponential tail of mean ``--latency-tail`` seconds if given, every
gate passing, per-model limits out of the way) run by the same ``vkr`` entry point with
``PYTHONPATH`` set to each tree in turn, repeat by repeat. On a shared machine whose load
moves by several runnable processes a minute, alternating is what makes two commits
comparable: each pair of runs sees about the same load. The server is the one of the
checkout this script lives in, so only the run's side differs.

Make a tree of a commit with ``git archive COMMIT | tar -x -C DIR`` (the installed entry
points must name modules that exist in every tree compared).

    .venv/bin/python bench/bench_ab.py --concurrency 64 --videos 128 --repeats 3 TREE_A TREE_B

Prints, per tree, each run's wall and CPU seconds (the `vkr run` process; its decoder
processes are children of multiprocessing's forkserver and are not counted) and the
load average when it ended, then the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

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
from bench_throughput import CPU_SECONDS, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees to run vkr from")
    parser.add_argument("--videos", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per reply")
    parser.add_argument(
        "--latency-tail",
        type=float,
        default=0.0,
        help="mean seconds of an exponential delay added to each reply (a provider's tail)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    for tree in trees:
        if not (tree / "vkr_core").is_dir():
            parser.error(f"{tree} is not a vkr source tree (no vkr_core/ in it)")
    args.trees = [str(tree) for tree in trees]  # saved with the results as JSON
    began, load_start = time.monotonic(), os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="vkr-bench-ab-"))
    runs: dict[str, list[dict[str, float]]] = {str(tree): [] for tree in trees}
    try:
        manifest = write_manifest(work / "videos", args.videos)
        pool = work / "pool.yaml"
        server = FakeServerProcess(pool)
        try:
            unbounded_pool(pool)
            server.set_policy(
                {
                    **ALL_PASS,
                    "latency_ms": args.latency * 1000,
                    "latency_tail_ms": args.latency_tail * 1000,
                }
            )
            for repeat in range(args.repeats):
                for tree in trees:
                    out = work / f"run-{repeat}-{trees.index(tree)}"
                    wall = timed(
                        [VKR, "run", "--videos", str(manifest), "--pool", str(pool)]
                        + ["--out", str(out), "--concurrency", str(args.concurrency)]
                        + ["--no-progress", "--skip-preflight"],
                        f"vkr run from {tree}",
                        env=dict(os.environ, PYTHONPATH=str(tree)),
                        cwd=tree,
                    )
                    runs[str(tree)].append(
                        {"wall_s": wall, "cpu_s": CPU_SECONDS[-1], "load": os.getloadavg()[0]}
                    )
                    shutil.rmtree(out)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for tree, rows in runs.items():
        walls = ", ".join(f"{row['wall_s']:.1f}" for row in rows)
        cpus = ", ".join(f"{row['cpu_s']:.1f}" for row in rows)
        loads = ", ".join(f"{row['load']:.1f}" for row in rows)
        print(
            f"{tree}\n  wall s {walls} (median {statistics.median(r['wall_s'] for r in rows):.1f})"
            f"\n  CPU s {cpus} (median {statistics.median(r['cpu_s'] for r in rows):.2f})"
            f"\n  load {loads}"
        )
    write_results({"runs": runs}, "ab.json", args, began, load_start)


if __name__ == "__main__":
    main()
