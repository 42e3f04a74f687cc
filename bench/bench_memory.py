"""Peak memory of `vkr run` and `vkr report` against the number of videos.

A user's run: ``vkr run`` in its own process, ``vkr dev fake-server`` in another, replies
after ``--latency`` seconds (default 0: the runs are long enough as it is), per-model limits
out of the way, over N links to the pancake test clip (3 frames, 30 model calls per video).
For each N, one cold run into a fresh directory, then ``vkr report`` over that directory;
the peak RSS (``VmHWM``) of each process is polled every 50 ms. The acceptance of issue 9:
peak RSS over the largest N within 1.2x of the smallest.

``--pythonpath DIR`` runs another checkout of vkr (e.g. ``git archive HEAD`` unpacked in a
folder) with the same interpreter and packages, for a before/after in one run.

    .venv/bin/python bench/bench_memory.py [--videos 200 2000] [--concurrency 16]
        [--latency 0] [--pythonpath DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from bench_run import Watcher  # noqa: E402

# Every gate passes, so each round walks the whole path and writes a full record.


class SplitWatcher(Watcher):
    """Also the largest anonymous (heap) and file-backed (mapped files) parts of the RSS."""

    def __init__(self, pid: int):
        super().__init__(pid)
        self.anon_kb = self.file_kb = 0

    def _sample(self) -> None:
        super()._sample()
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("RssAnon:"):
                self.anon_kb = max(self.anon_kb, int(line.split()[1]))
            elif line.startswith("RssFile:"):
                self.file_kb = max(self.file_kb, int(line.split()[1]))


def measure(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run a command to the end; its wall time, peak RSS (VmHWM) and output."""
    with log.open("w") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        watcher = SplitWatcher(process.pid)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        watcher.done.set()
        watcher.join()
    text = log.read_text()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{text[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": watcher.hwm_kb / 1024,
        "peak_anon_mb": watcher.anon_kb / 1024,
        "peak_file_mb": watcher.file_kb / 1024,
        "output": text.splitlines()[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    parser.add_argument("--pythonpath", help="run the vkr checkout in this folder instead")
    parser.add_argument("--work", help="keep inputs and run directories here")
    args = parser.parse_args()
    began, load_start = time.monotonic(), os.getloadavg()[0]

    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = str(Path(args.pythonpath).resolve())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vkr-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"levels": {}}
    pool = work / "pool.yaml"
    server = FakeServerProcess(pool)
    try:
        unbounded_pool(pool)
        server.set_policy({**ALL_PASS, "latency_ms": args.latency * 1000})
        print(
            f"{'videos':>7} {'run s':>7} {'run RSS MB':>11} {'(anon + file)':>14} "
            f"{'report s':>9} {'report RSS MB':>14}"
        )
        for count in args.videos:
            manifest = write_manifest(work / "videos", count, f"manifest-{count}.jsonl")
            out = work / f"run-{count}"
            shutil.rmtree(out, ignore_errors=True)
            command = [
                VKR, "run", "--videos", str(manifest), "--pool", str(pool), "--out", str(out),
                "--concurrency", str(args.concurrency), "--no-progress", "--skip-preflight",
            ]  # fmt: skip
            run = measure(command, env, work / f"run-{count}.log")
            report = measure([VKR, "report", str(out)], env, work / f"report-{count}.log")
            results["levels"][str(count)] = {"run": run, "report": report}
            print(
                f"{count:>7} {run['wall_s']:>7.1f} {run['peak_rss_mb']:>11.1f} "
                f"{run['peak_anon_mb']:>6.0f} + {run['peak_file_mb']:<5.0f} "
                f"{report['wall_s']:>9.1f} {report['peak_rss_mb']:>14.1f}",
                flush=True,
            )
            if not args.work:
                shutil.rmtree(out)
    finally:
        server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    levels = results["levels"]
    smallest, largest = levels[str(min(args.videos))], levels[str(max(args.videos))]
    for what in ("run", "report"):
        ratio = largest[what]["peak_rss_mb"] / smallest[what]["peak_rss_mb"]
        results[f"{what}_rss_ratio"] = ratio
        print(
            f"peak RSS of `vkr {what}`, {max(args.videos)} / {min(args.videos)} videos: {ratio:.3f}"
        )
    write_results(results, "memory.json", args, began, load_start)


if __name__ == "__main__":
    main()
