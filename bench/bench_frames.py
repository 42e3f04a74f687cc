"""Frame sampling: vkr's timestamp sampling against raw decord doing the same work.

Makes a 5-minute synthetic video once (bench/.data/, ignored by git), then times, over
several runs each, in one process:

- raw decord: VideoReader + get_frame_timestamp + get_batch of the indices vkr picks
  (decode only), and the same plus JPEG encoding of each frame (quality 85);
- vkr read_frames (decode only, in process, with reader fallback and the end-of-file check);
- the PyAV reader alone (what the fallback costs when decord fails);
- vkr sample_frames, isolate=False (decode + JPEG + sha256 + files + manifest);
- vkr sample_frames, isolate=True (the same in a spawned decoder process);
- both sample_frames variants on a 3-frame test clip, which shows isolation's fixed cost.

Usage: .venv/bin/python bench/bench_frames.py [--runs 7] [--fps 0.2]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "bench" / ".data"
VIDEO = DATA / "synthetic_300s_640x360_25fps.mp4"


def make_video(path: Path, seconds: int = 300, fps: int = 25) -> None:
    """640x360 H.264 (libx264 ultrafast, default 250-frame GOP) with moving content."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the cache out of git without touching the repository's .gitignore.
    (path.parent / ".gitignore").write_text("*\n")
    width, height = 640, 360
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        ys, xs = np.mgrid[0:height, 0:width]
        for i in range(seconds * fps):
            t = i / fps
            frame = np.empty((height, width, 3), np.uint8)
            frame[..., 0] = (xs + 3 * i) % 256
            frame[..., 1] = (ys + 2 * i) % 256
            frame[..., 2] = (128 + 100 * np.sin(t / 7)) % 256
            # A bright square crossing the frame, so every second looks different.
            x = int((i * 4) % (width - 80))
            y = int((height - 80) * (0.5 + 0.5 * np.sin(t)))
            frame[y : y + 80, x : x + 80] = 255
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = i
            video_frame.time_base = Fraction(1, fps)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)


def timed(functions: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Run the variants round-robin, so load from other processes on a shared machine falls
    on all of them alike instead of on whichever ran during a noisy minute."""
    for function in functions.values():
        function()  # warm-up: imports, page cache
    times: dict[str, list[float]] = {label: [] for label in functions}
    for _ in range(runs):
        for label, function in functions.items():
            start = time.perf_counter()
            function()
            times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--fps", type=float, default=0.2)
    args = parser.parse_args()

    if not VIDEO.exists():
        print(f"making {VIDEO} ...", flush=True)
        start = time.perf_counter()
        make_video(VIDEO)
        print(f"  took {time.perf_counter() - start:.1f} s", flush=True)

    import decord
    from PIL import Image

    from vkr_core import video
    from vkr_core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    info = video.probe_video(VIDEO, pm=pm)
    times = video.sample_timestamps(info.duration, args.fps)
    path = str(VIDEO)

    def raw_indices(reader: decord.VideoReader) -> list[int]:
        starts = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
        return [video.frame_index_at(starts, t) for t in times]

    def raw_decord() -> int:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        return len(reader.get_batch(raw_indices(reader)).asnumpy())

    def raw_decord_jpeg() -> int:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        total = 0
        for array in reader.get_batch(raw_indices(reader)).asnumpy():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=85)
            total += len(buffer.getvalue())
        return total

    def vkr_read() -> int:
        return len(video.read_frames(VIDEO, times, pm=pm))

    def pyav_read() -> int:
        from plugins.readers import PyAVReader

        reader = PyAVReader(path)
        try:
            return len(reader.read_at(times))
        finally:
            reader.close()

    scratch = Path(tempfile.mkdtemp(prefix="vkr-bench-frames-"))

    def vkr_sample(isolate: bool) -> Callable[[], int]:
        def run() -> int:
            out = scratch / ("isolated" if isolate else "inprocess")
            shutil.rmtree(out, ignore_errors=True)  # a fresh directory: no manifest reuse
            return len(video.sample_frames(VIDEO, out, fps=args.fps, isolate=isolate, pm=pm))

        return run

    # The fixed cost of isolation (spawn a Python process, import numpy/PIL/pydantic/decord/
    # PyAV, send the result back), measured on a clip whose decoding costs next to nothing.
    clip = Path(os.environ.get("VKR_TESTDATA", ROOT.parent / "shared/testdata/videos"))
    clip = clip / "video_90.mov"

    def clip_sample(isolate: bool) -> Callable[[], int]:
        def run() -> int:
            out = scratch / ("clip-isolated" if isolate else "clip-inprocess")
            shutil.rmtree(out, ignore_errors=True)
            return len(video.sample_frames(clip, out, isolate=isolate, pm=pm))

        return run

    def vkr_cached() -> int:
        return len(
            video.sample_frames(VIDEO, scratch / "cached", fps=args.fps, isolate=False, pm=pm)
        )

    rows = [
        ("raw decord: decode", raw_decord),
        ("raw decord: decode + JPEG", raw_decord_jpeg),
        ("vkr read_frames: decode", vkr_read),
        ("PyAV reader alone (the fallback): decode", pyav_read),
        ("vkr sample_frames, isolate=False", vkr_sample(False)),
        ("vkr sample_frames, isolate=True", vkr_sample(True)),
        ("vkr sample_frames, manifest reuse", vkr_cached),
    ]
    if clip.is_file():
        rows += [
            ("3-frame clip, isolate=False", clip_sample(False)),
            ("3-frame clip, isolate=True", clip_sample(True)),
        ]
    print(
        f"video: {VIDEO.name}, {info.duration:.0f} s, {info.width}x{info.height}, "
        f"{info.fps:g} fps; {len(times)} frames at {args.fps:g} fps; {args.runs} runs each"
    )
    medians = {}
    for label, results in timed(dict(rows), args.runs).items():
        medians[label] = statistics.median(results)
        spread = f"{min(results) * 1000:.0f}-{max(results) * 1000:.0f}"
        print(f"{label:42s} median {medians[label] * 1000:8.1f} ms  (min-max {spread} ms)")
    shutil.rmtree(scratch, ignore_errors=True)

    raw, raw_jpeg = medians["raw decord: decode"], medians["raw decord: decode + JPEG"]
    print()
    print(
        f"read_frames / raw decode:                 {medians['vkr read_frames: decode'] / raw:.2f}"
    )
    for label in ("vkr sample_frames, isolate=False", "vkr sample_frames, isolate=True"):
        print(f"{label[4:]} / raw decode + JPEG: {medians[label] / raw_jpeg:.2f}")


if __name__ == "__main__":
    main()
