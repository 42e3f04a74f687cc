"""`vkr run` throughput: the local engine against Ray with 1 and 2 workers, same workload.

The workload of bench/bench_throughput.py: ``vkr run`` in its own process against ``vkr dev
fake-server`` in another, every reply taking ``--latency`` seconds and every gate passing
(4 model latencies per video), per-model limits out of the way. The Ray runs join one local
Ray cluster this script starts (``--ray-address``), as a user joins an existing cluster, so
the cluster's own start-up is not in the figures (a worker's start-up is). Engines take
turns within each repeat, so a noisy neighbour on the machine hits them alike; the figures
are medians. Ratio = ideal wall time / measured, ideal = ceil(N / C) x 4 x latency; end to
end (the whole command) and steady (minus the start-up: the same command again on the
finished directory, which starts the driver and the workers and replays the records).

Last, the cost of the cluster-wide limiter: one acquire + release round trip to the limits
actor, from a Ray worker, as a worker's caller makes it before each request.

    .venv/bin/python bench/bench_ray.py [--videos 32] [--concurrency 8] [--latency 1.0]
        [--repeats 3] [--cpus 2]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
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
    FakeServerProcess,
    unbounded_pool,
    write_manifest,
    write_results,
)
from bench_throughput import HOPS, run  # noqa: E402

from plugins.backends.ray_engine import ClusterLimits  # noqa: E402


def limiter_round_trip(ray: Any, calls: int = 2000) -> float:
    """Milliseconds per acquire + release of one slot, from a Ray worker (a worker's
    caller awaits the acquire; the release is sent without waiting)."""
    limits = ray.remote(num_cpus=0, max_concurrency=100_000)(ClusterLimits).remote(
        {"m": (8, None, None)}
    )

    @ray.remote(num_cpus=0)
    def worker(limits: Any, calls: int) -> float:
        import asyncio

        async def loop() -> float:
            started = time.perf_counter()
            for _ in range(calls):
                await limits.acquire.remote("m", "bench", 0)
                limits.release.remote("m", "bench", True)
            return (time.perf_counter() - started) / calls * 1000

        return asyncio.run(loop())

    ray.get(worker.remote(limits, 100))  # warm: the worker process and its connection
    millis = ray.get(worker.remote(limits, calls))
    ray.kill(limits)
    return float(millis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per reply")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    began, load_start = time.monotonic(), os.getloadavg()[0]

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False)
    address = ray.get_runtime_context().gcs_address
    engines: dict[str, tuple[str, ...]] = {
        "local": (),
        "ray, 1 worker": ("--engine", "ray", "--ray-address", address, "--workers", "1"),
        "ray, 2 workers": ("--engine", "ray", "--ray-address", address, "--workers", "2"),
    }
    ideal = math.ceil(args.videos / args.concurrency) * HOPS * args.latency
    work = Path(tempfile.mkdtemp(prefix="vkr-bench-ray-"))
    results: dict[str, Any] = {"ideal_s": ideal, "engines": {}}
    try:
        manifest = write_manifest(work / "videos", args.videos)
        pool = work / "pool.yaml"
        server = FakeServerProcess(pool)
        try:
            unbounded_pool(pool)
            server.set_policy({**ALL_PASS, "latency_ms": args.latency * 1000})
            walls: dict[str, list[float]] = {name: [] for name in engines}
            startups: dict[str, list[float]] = {name: [] for name in engines}
            for repeat in range(args.repeats):
                for number, (name, options) in enumerate(engines.items()):
                    out = work / f"run-{number}-{repeat}"
                    before = server.completions()
                    walls[name].append(run(manifest, pool, out, args.concurrency, *options))
                    calls = server.completions() - before
                    startups[name].append(run(manifest, pool, out, args.concurrency, *options))
                    print(
                        f"  {name}: {walls[name][-1]:.1f} s, {calls} calls; start-up "
                        f"{startups[name][-1]:.1f} s",
                        flush=True,
                    )
                    shutil.rmtree(out)
            print(f"\n{args.videos} videos, --concurrency {args.concurrency}, {args.latency:g} s")
            print(f"per reply; ideal {ideal:.1f} s; medians of {args.repeats}")
            print(
                f"{'engine':<16} {'wall s':>7} {'start-up s':>11} {'e2e':>6} {'steady':>7} "
                f"{'e2e vs local':>13}"
            )
            local = statistics.median(walls["local"])
            for name, measured in walls.items():
                wall = statistics.median(measured)
                startup = statistics.median(startups[name])
                level = {
                    "walls_s": measured,
                    "wall_s": wall,
                    "startups_s": startups[name],
                    "startup_s": startup,
                    "end_to_end": ideal / wall,
                    "steady": ideal / max(wall - startup, 1e-9),
                    "vs_local": local / wall,
                }
                results["engines"][name] = level
                print(
                    f"{name:<16} {wall:>7.1f} {startup:>11.1f} {level['end_to_end']:>6.2f} "
                    f"{level['steady']:>7.2f} {level['vs_local']:>13.2f}"
                )
        finally:
            server.stop()
        millis = limiter_round_trip(ray)
        results["limiter_round_trip_ms"] = millis
        print(f"cluster-wide limiter: {millis:.2f} ms per acquire + release, from a Ray worker")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, "ray.json", args, began, load_start)


if __name__ == "__main__":
    main()
