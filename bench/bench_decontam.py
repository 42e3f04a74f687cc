"""Benchmarks of `vkr decontam`: pHash throughput, the frame index, window voting, calibration.

    .venv/bin/python bench/bench_decontam.py                 # all sections
    .venv/bin/python bench/bench_decontam.py --section hash  # one of hash|index|windows|calibration

Figures are medians over ``--runs`` timed runs; variants of a section run round-robin so
load from other processes falls on all of them alike. Raw JSON goes to
bench/results/decontam.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TESTDATA = ROOT.parent / "shared/testdata/videos"
PANCAKE = TESTDATA / "flipping_a_pancake.mkv"

from corpus import decontam as dc  # noqa: E402
from corpus import phash  # noqa: E402


def timed_round_robin(variants: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """Seconds per run of each variant, interleaved, after one warm-up call each."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- hashing


def bench_hash(runs: int) -> dict[str, Any]:
    import imagehash
    from PIL import Image

    from vkr_core.plugins import get_plugin_manager
    from vkr_core.video import probe_video, read_frames

    pm = get_plugin_manager()
    info = probe_video(PANCAKE, pm=pm)
    # Every frame of the clip (30 fps), as decontam decodes them (64 px) and at full size.
    times = [i / info.fps for i in range(int(info.duration * info.fps))]
    small = [a for _, a in read_frames(PANCAKE, times, max_side=dc.FRAME_SIDE, pm=pm)]
    full = [a for _, a in read_frames(PANCAKE, times, pm=pm)]
    results: dict[str, Any] = {"frames": len(small), "sizes": {}}
    for label, frames in (("64 px (decontam)", small), ("426x240 (native)", full)):
        images = [Image.fromarray(a) for a in frames]
        batch = np.stack(frames)
        variants = {
            "vkr 64-bit": lambda b=batch: phash.phash_frames(b, 64),
            "imagehash 64-bit": lambda i=images: [imagehash.phash(x) for x in i],
            "vkr 256-bit": lambda b=batch: phash.phash_frames(b, 256),
            # highfreq_factor=2: the same 32x32 image vkr's 256-bit hash uses.
            "imagehash 256-bit": lambda i=images: [
                imagehash.phash(x, hash_size=16, highfreq_factor=2) for x in i
            ],
            "vkr 64+256-bit, one pass": lambda b=batch: phash.phash_frames_multi(b),
        }
        measured = timed_round_robin(variants, runs)
        fps = {name: len(frames) / median(t) for name, t in measured.items()}
        ours = phash.phash_frames(batch, 64)[0]
        theirs = np.stack([np.packbits(imagehash.phash(x).hash.ravel()) for x in images])
        results["sizes"][label] = {
            "shape": list(frames[0].shape),
            "frames_per_s": fps,
            "ratio_64": fps["vkr 64-bit"] / fps["imagehash 64-bit"],
            "ratio_256": fps["vkr 256-bit"] / fps["imagehash 256-bit"],
            # Not the same resampling (area vs Lanczos), so a few bits differ.
            "mean_bits_differing_from_imagehash_64": float(phash.hamming(ours, theirs).mean()),
        }
    return results


# ---------------------------------------------------------------- the frame index


def _flip(codes: np.ndarray, flips: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = np.unpackbits(codes, axis=1)
    for row, count in zip(bits, flips, strict=True):
        row[rng.choice(bits.shape[1], count, replace=False)] ^= 1
    return np.packbits(bits, axis=1)


def bench_index(runs: int, size: int, queries: int, brute_queries: int) -> dict[str, Any]:
    import faiss

    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (size, 8), dtype=np.uint8)
    video = dc.VideoHashes({64: codes}, np.full(size, 50.0, np.float32), float(size))
    planted = rng.choice(size, queries, replace=False)
    flips = rng.integers(0, 13, queries)  # 0-8: the index's guaranteed radius; 9-12 beyond
    query = _flip(codes[planted], flips, rng)
    k = dc.PRESETS["default"].neighbours

    start = time.perf_counter()
    index = dc.FrameIndex([video], 64, distance=12, min_detail=0.0, kind="multihash")
    build_s = time.perf_counter() - start
    words = codes.view(np.uint64).ravel()
    brute_rows = query[:brute_queries].view(np.uint64).ravel()

    def brute() -> list[np.ndarray]:
        found = []
        for q in brute_rows:
            distances = np.bitwise_count(words ^ q)
            found.append(np.argpartition(distances, k)[:k])
        return found

    threads = faiss.omp_get_max_threads()

    def search(n_threads: int) -> Callable[[], Any]:
        def run() -> Any:
            faiss.omp_set_num_threads(n_threads)
            try:
                return index.search(query, k)
            finally:
                faiss.omp_set_num_threads(threads)

        return run

    variants = {"numpy brute force": brute, "faiss multihash, 1 thread": search(1)}
    if threads > 1:
        variants[f"faiss multihash, {threads} threads"] = search(threads)
    measured = timed_round_robin(variants, runs)
    per_query = {
        name: median(t) / (brute_queries if name == "numpy brute force" else queries)
        for name, t in measured.items()
    }
    _, rows = index.search(query, k)
    hit = (rows == planted[:, None]).any(axis=1)
    brute_hit = np.array([planted[i] in found for i, found in enumerate(brute())])
    return {
        "indexed_frames": size,
        "queries": queries,
        "brute_force_queries": brute_queries,
        "k": k,
        "index": index.describe(),
        "build_s": build_s,
        "per_query_us": {name: s * 1e6 for name, s in per_query.items()},
        "speedup_vs_brute": {
            name: per_query["numpy brute force"] / s
            for name, s in per_query.items()
            if name != "numpy brute force"
        },
        "recall_flips_0_8": float(hit[flips <= 8].mean()),
        "recall_flips_9_12": float(hit[flips > 8].mean()),
        "brute_force_recall": float(brute_hit.mean()),
    }


# ---------------------------------------------------------------- window voting


def bench_windows(size: int, bench_videos: int) -> dict[str, Any]:
    """Planted copied windows among random footage: does the vote find every one?"""
    rng = np.random.default_rng(9)
    per_video = 300
    n_train = size // per_video

    def random_video(seconds: int) -> dc.VideoHashes:
        # Shots of 1-6 s with one hash each, like cuts between steady shots.
        lengths = rng.integers(1, 7, seconds)
        shots = rng.integers(0, 256, (seconds, 8), dtype=np.uint8)
        codes = np.repeat(shots, lengths, axis=0)[:seconds]
        return dc.VideoHashes({64: codes}, np.full(seconds, 50.0, np.float32), float(seconds))

    train = [random_video(per_video) for _ in range(n_train)]
    params = dc.PRESETS["default"]
    index = dc.FrameIndex(train, 64, params.distance, params.min_detail, kind="multihash")
    truth: dict[int, int] = {}
    bench = []
    for number in range(bench_videos):
        video = random_video(40)
        if number % 2 == 0:  # half the benchmark videos copy 20 s of a training video
            source, start = int(rng.integers(n_train)), int(rng.integers(0, per_video - 20))
            window = train[source].codes[64][start : start + 20]
            # Per-frame distances 0-12, the spread of a 5 % crop (worst transform measured).
            video.codes[64][10:30] = _flip(window, rng.integers(0, 13, 20), rng)
            truth[number] = source
        bench.append(video)
    start_time = time.perf_counter()
    found = [dc.match_benchmark_video(str(i), b, index, train, params) for i, b in enumerate(bench)]
    seconds = time.perf_counter() - start_time
    caught = sum(truth[i] in found[i] for i in truth)
    false_flags = sum(len(set(f) - {truth.get(i)}) for i, f in enumerate(found))
    return {
        "training_frames": len(index),
        "benchmark_videos": bench_videos,
        "planted": len(truth),
        "window_recall": caught / len(truth),
        "false_flags": false_flags,
        "ms_per_benchmark_video": seconds / bench_videos * 1e3,
    }


# ---------------------------------------------------------------- calibration


def bench_calibration(videos: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_decontam import write_scene_video

    with tempfile.TemporaryDirectory(prefix="vkr-bench-decontam-") as scratch:
        folder = Path(scratch) / "videos"
        folder.mkdir()
        for i in range(videos):
            size = ((160, 90), (128, 72), (192, 108))[i % 3]
            write_scene_video(folder / f"scene{i:02d}.mp4", 1000 + i, 25 + (i * 7) % 36, size)
        (folder / "pancake.mkv").symlink_to(PANCAKE)
        entries = dc.read_video_list(folder, check_ids=False)
        result = dc.calibrate(entries, Path(scratch) / "work", cache_dir=None, jobs=2)
    return json.loads(result.model_dump_json())


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--section", default="all")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--index-size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--brute-queries", type=int, default=50)
    parser.add_argument("--calibration-videos", type=int, default=20)
    args = parser.parse_args()
    sections = (
        ["hash", "index", "windows", "calibration"] if args.section == "all" else [args.section]
    )
    results: dict[str, Any] = {"python": platform.python_version(), "runs": args.runs}
    if "hash" in sections:
        results["hash"] = hash_result = bench_hash(args.runs)
        for label, row in hash_result["sizes"].items():
            print(f"\n# pHash of {hash_result['frames']} frames at {label}")
            for name, fps in row["frames_per_s"].items():
                print(f"{name:28s} {fps:10.0f} frames/s")
            print(
                f"vkr / imagehash: 64-bit {row['ratio_64']:.1f}x, 256-bit {row['ratio_256']:.1f}x"
            )
            print(
                f"bits differing from imagehash (64-bit): {row['mean_bits_differing_from_imagehash_64']:.2f}"
            )
    if "index" in sections:
        results["index"] = r = bench_index(
            args.runs, args.index_size, args.queries, args.brute_queries
        )
        print(f"\n# nearest frames among {r['indexed_frames']} hashes ({r['index']})")
        print(f"build {r['build_s']:.1f} s")
        for name, us in r["per_query_us"].items():
            print(f"{name:28s} {us:10.1f} us/query")
        for name, ratio in r["speedup_vs_brute"].items():
            print(f"speed-up, {name}: {ratio:.0f}x")
        print(
            f"recall: flips 0-8 {r['recall_flips_0_8']:.3f}, flips 9-12 {r['recall_flips_9_12']:.3f}"
            f", brute force {r['brute_force_recall']:.3f}"
        )
    if "windows" in sections:
        results["windows"] = w = bench_windows(args.index_size, 200)
        print(f"\n# window vote over {w['training_frames']} training frames")
        print(
            f"planted {w['planted']} copied windows: recall {w['window_recall']:.3f}, "
            f"false flags {w['false_flags']}, {w['ms_per_benchmark_video']:.1f} ms per benchmark video"
        )
    if "calibration" in sections:
        results["calibration"] = c = bench_calibration(args.calibration_videos)
        print(f"\n# calibration on {len(c['videos'])} videos")
        for name, p in c["presets"].items():
            print(
                f"{name}: FPR {p['false_positive_rate']} recall {p['recall']} {p['recall_by_transform']}"
            )
        print("recommended:", c["recommended"])
    out = ROOT / "bench/results/decontam.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() and args.section != "all" else {}
    out.write_text(json.dumps({**existing, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
