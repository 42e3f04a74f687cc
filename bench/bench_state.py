"""Per-call cost of the PostgreSQL call cache against diskcache, in one run.

What a model call does to its cache, timed operation by operation: ``get`` of a hit, ``get``
of a miss, ``set`` (the journal's raw reply on arrival), and ``transact`` (the reply's entry
and the journal drop in one commit, as ``ModelCaller`` stores a reply). Values are what the
caller stores: a reply dict of ~1 KB and a raw body of ~2 KB. Each side runs ``--ops``
operations per kind, ``--repeats`` times, round-robin with the order rotating so load from
other processes falls on both alike; medians of per-repeat means are reported with the
PostgreSQL / diskcache ratio.

PostgreSQL is ``$VKR_TEST_POSTGRES_URL`` or a throwaway cluster on this host (loopback TCP,
durable: fsync and synchronous commit on, as a production server runs; the tests' cluster
turns them off); diskcache is in a temporary folder on the local disk, created as vkr
creates it (never evicting, SQLite in WAL mode).

    .venv/bin/python bench/bench_state.py [--ops 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plugins.backends.postgres import PostgresCalls  # noqa: E402
from plugins.backends.postgres_server import (  # noqa: E402
    ThrowawayPostgres,
    create_database,
    drop_database,
)
from vkr_core.backends import DiskCallCache  # noqa: E402

REPLY = {
    "text": json.dumps({"answer": "B", "reasoning": "x" * 800}),
    "outcome": "ok",
    "prompt_tokens": 5123,
    "completion_tokens": 310,
    "cost_usd": 0.0042,
    "model": "gpt-4o",
}
RAW = b"{" + b'"choices": "' + b"y" * 2000 + b'"}'
KINDS = ("get hit", "get miss", "set", "transact")


def run_kind(cache: Any, kind: str, ops: int, tag: str) -> float:
    """Mean seconds per operation of ``kind`` over ``ops`` distinct keys."""
    keys = [f"{tag}-{kind}-{i:08d}" for i in range(ops)]
    if kind == "get hit":
        for key in keys:
            cache.set(key, REPLY)
    started = time.perf_counter()
    if kind == "get hit" or kind == "get miss":
        for key in keys:
            cache.get(key)
    elif kind == "set":
        for key in keys:
            cache.set("raw:" + key, RAW)
    else:
        for key in keys:
            with cache.transact():
                cache.set(key, REPLY)
                cache.delete("raw:" + key)
    return (time.perf_counter() - started) / ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "state.json"))
    args = parser.parse_args()

    server = None
    admin = os.environ.get("VKR_TEST_POSTGRES_URL")
    if not admin:
        server = ThrowawayPostgres(durable=True)
        admin = server.start()
    url = create_database(admin, prefix="vkr_bench")
    try:
        with tempfile.TemporaryDirectory() as folder:
            opened: dict[str, Callable[[], Any]] = {
                "diskcache": lambda: DiskCallCache.open_dir(Path(folder) / "diskcache"),
                "postgres": lambda: PostgresCalls.open_url(url, "vkr_bench"),
            }
            caches = {name: open_() for name, open_ in opened.items()}
            times: dict[str, dict[str, list[float]]] = {
                name: {kind: [] for kind in KINDS} for name in caches
            }
            for repeat in range(args.repeats):
                order = list(caches) if repeat % 2 == 0 else list(reversed(caches))
                for kind in KINDS:
                    for name in order:
                        times[name][kind].append(
                            run_kind(caches[name], kind, args.ops, f"r{repeat}")
                        )
            for cache in caches.values():
                cache.close()
    finally:
        drop_database(admin, url)
        if server is not None:
            server.stop()

    medians = {
        name: {kind: statistics.median(values) for kind, values in by_kind.items()}
        for name, by_kind in times.items()
    }
    print(f"{args.ops} operations per kind, median of {args.repeats} repeats (µs per operation)")
    print(f"{'operation':<10} {'diskcache':>10} {'postgres':>10} {'ratio':>7}")
    for kind in KINDS:
        disk, pg = medians["diskcache"][kind], medians["postgres"][kind]
        print(f"{kind:<10} {disk * 1e6:>10.1f} {pg * 1e6:>10.1f} {pg / disk:>6.1f}×")
    # What one paid model call costs its cache: a miss, the journal's set, the transaction.
    per_call = {name: m["get miss"] + m["set"] + m["transact"] for name, m in medians.items()}
    print(
        f"{'per call':<10} {per_call['diskcache'] * 1e6:>10.1f} "
        f"{per_call['postgres'] * 1e6:>10.1f} "
        f"{per_call['postgres'] / per_call['diskcache']:>6.1f}×"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "ops": args.ops,
                "repeats": args.repeats,
                "python": platform.python_version(),
                "postgres": "VKR_TEST_POSTGRES_URL" if server is None else "throwaway cluster",
                "seconds": times,
                "median_seconds": medians,
                "per_paid_call_seconds": per_call,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
