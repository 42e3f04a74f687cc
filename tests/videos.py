"""The test videos, made here with PyAV: real encoded files that decord and PyAV decode.

Nothing outside the repository is needed, so a fresh clone runs every test. Each file
mimics one kind of input vkr meets in the wild, and its truth (length, rate, size, where it
breaks) is known exactly because it is made here:

- ``flipping_a_pancake.mkv``: a normal clip, H.264 + Opus in Matroska, 426x240, 30 fps,
  310 frames (10.333 s; the container runs to ~10.38 s with its audio). A textured,
  slowly panning kitchen counter with a pan in which a pancake is flipped.
- ``corrupted.mp4``: H.264 in MP4, 10 fps, 50 frames (5.0 s), one group of pictures, and
  the packet at 3.0 s overwritten with 0xff: every frame from there on cannot be decoded.
- ``unordered.mov``: 4 frames at 32 fps, 50x50, with B-frames, so packets arrive out of
  presentation order (0, 3, 1, 2).
- ``video_90.mov``: stored 568x320 with a -90-degree display matrix, as phones write:
  shown 320x568, upright with a red block at the top left and a blue bar at the bottom.
- ``variable_frame_rate.mkv``: frame i is a flat grey of 20 + 20 * i shown from
  ``VFR_TIMES_MS[i]``; an index computed from the average rate lands on the wrong frame.
- ``truncated.mkv``: the first half of the pancake clip's bytes (still declares 10.333 s).
- ``zero_frames.mp4``: a fragmented MP4 that declares an H.264 video stream and holds no
  frame.
- ``not_a_video.mp4``: a text file named like a video.

``video_dir()`` makes them once and keeps them under ``.pytest_cache`` (a new folder per
version of this file), so later sessions reuse them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]

PANCAKE = "flipping_a_pancake.mkv"
CORRUPTED = "corrupted.mp4"
UNORDERED = "unordered.mov"
ROTATED = "video_90.mov"
VARIABLE_FRAME_RATE = "variable_frame_rate.mkv"
TRUNCATED = "truncated.mkv"
ZERO_FRAMES = "zero_frames.mp4"
NOT_A_VIDEO = "not_a_video.mp4"

GOOD = [PANCAKE, UNORDERED, ROTATED, VARIABLE_FRAME_RATE]
BROKEN = [CORRUPTED, TRUNCATED, ZERO_FRAMES, NOT_A_VIDEO]

PANCAKE_SIZE = (426, 240)
PANCAKE_FPS = 30
PANCAKE_FRAMES = 310
PANCAKE_SECONDS = PANCAKE_FRAMES / PANCAKE_FPS  # 10.333
PANCAKE_AUDIO_SECONDS = 10.38

CORRUPTED_FPS = 10
CORRUPTED_FRAMES = 50
CORRUPTED_BROKEN_AT = 3.0  # seconds: the destroyed packet

UNORDERED_FPS = 32
UNORDERED_FRAMES = 4

ROTATED_STORED = (568, 320)  # width, height as encoded
ROTATED_SHOWN = (320, 568)
ROTATED_FRAMES = 3

VFR_TIMES_MS = [0, 100, 200, 300, 1300, 1400, 3000, 3050, 3100, 5000]

NOT_A_VIDEO_TEXT = "this is a transcript, not a video\n" * 20


def grey_level(index: int) -> int:
    """The grey of frame ``index`` of the variable-frame-rate clip."""
    return 20 + 20 * index


# ---------------------------------------------------------------- writers


def _encode(
    path: Path,
    frames: list[np.ndarray] | Callable[[int], np.ndarray],
    count: int,
    fps: int,
    options: dict[str, str],
    pts_ms: list[int] | None = None,
    rotation: int = 0,
    audio_seconds: float = 0.0,
) -> None:
    """H.264 (yuv420p) from RGB frames; ``pts_ms`` gives each frame's start instead of i/fps."""
    height, width = (frames[0] if isinstance(frames, list) else frames(0)).shape[:2]
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = options
        if pts_ms is not None:
            video.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            video.set_display_rotation(rotation)
        audio = container.add_stream("libopus", rate=48000) if audio_seconds else None
        for i in range(count):
            array = frames[i] if isinstance(frames, list) else frames(i)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            else:
                frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None:
            _write_hum(container, audio, audio_seconds)


def _write_hum(
    container: av.container.OutputContainer, stream: av.AudioStream, seconds: float
) -> None:
    """A quiet 220 Hz hum with some hiss: an audio stream beside the video, as clips have."""
    rate, block = 48000, 960
    rng = np.random.default_rng(3)
    total = round(seconds * rate)
    for start in range(0, total, block):
        t = (np.arange(start, min(start + block, total)) / rate).astype(np.float32)
        samples = 0.05 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 0.01, t.size)
        padded = np.zeros((1, block), np.float32)
        padded[0, : t.size] = samples
        frame = av.AudioFrame.from_ndarray(padded, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A worktop: smooth colour waves, tiles and grain, so perceptual hashes have structure."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width, 3), 150.0, np.float32)
    for _ in range(8):
        fx, fy = rng.uniform(-0.06, 0.06, 2)
        wave = np.sin(fx * xx + fy * yy + rng.uniform(0, 2 * np.pi))
        image += rng.uniform(10, 35) * wave[..., None] * rng.uniform(0.4, 1.0, 3)
    for _ in range(10):
        y0, x0 = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
        h, w = int(rng.integers(10, 60)), int(rng.integers(10, 90))
        image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(40, 220, 3)
    image += rng.normal(0, 5, (height, width, 1))
    return np.clip(image, 0, 255)


def _pancake_frames() -> Callable[[int], np.ndarray]:
    """Frame i of the pancake clip: the camera pans over the worktop; the pancake browns,
    is tossed (rising, turning edge-on, landing) between 4 and 6 s, and browns again."""
    width, height = PANCAKE_SIZE
    rng = np.random.default_rng(2024)
    counter = _texture(rng, height + 40, width + 160)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    spots = rng.uniform(0, 1, (height, width)) < 0.02

    def frame(i: int) -> np.ndarray:
        t = i / PANCAKE_FPS
        shift = int(12 * t)  # pans 12 px a second
        image = counter[20 : 20 + height, shift : shift + width].copy()
        cx, cy = width / 2 + 10 * math.sin(t / 2), height / 2 + 10
        pan = (xx - cx) ** 2 + (yy - cy) ** 2
        image[pan < 95**2] = (45, 45, 50)
        image[(pan < 100**2) & (pan >= 95**2)] = (90, 90, 95)
        image[(yy > cy - 12) & (yy < cy + 12) & (xx > cx + 98) & (xx < width)] = (30, 25, 20)
        toss = min(max((t - 4.0) / 2.0, 0.0), 1.0)  # 0 before the toss, 1 after
        lift = 70 * math.sin(math.pi * toss)
        squash = max(abs(math.cos(math.pi * toss)), 0.08)
        browning = 0.6 * min(t, 4.0) / 4.0 if toss < 0.5 else 0.3 + 0.7 * (t - 5.0) / 5.0
        disc = ((xx - cx) / 70) ** 2 + ((yy - (cy - lift)) / (70 * squash)) ** 2 < 1
        colour = np.array([235, 205, 120]) * (1 - 0.35 * browning)
        image[disc] = colour
        image[disc & spots] = colour * 0.6
        return np.clip(image, 0, 255).astype(np.uint8)

    return frame


def _write_pancake(path: Path) -> None:
    _encode(
        path,
        _pancake_frames(),
        PANCAKE_FRAMES,
        PANCAKE_FPS,
        {"preset": "veryfast", "crf": "26", "g": "60"},
        audio_seconds=PANCAKE_AUDIO_SECONDS,
    )


def _write_corrupted(path: Path) -> None:
    rng = np.random.default_rng(5)
    base = _texture(rng, 90, 240)
    frames = [base[:, i : i + 160].astype(np.uint8) for i in range(0, 2 * CORRUPTED_FRAMES, 2)]
    # One group of pictures: every later frame depends, through its references, on the
    # destroyed one, as in a file damaged in transit.
    options = {"preset": "veryfast", "crf": "26", "g": "250"}
    _encode(path, frames, CORRUPTED_FRAMES, CORRUPTED_FPS, options)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size:
                if abs(float(packet.pts * packet.time_base) - CORRUPTED_BROKEN_AT) < 1e-6:
                    position, size = packet.pos, packet.size
                    break
        else:
            raise AssertionError(f"no packet at {CORRUPTED_BROKEN_AT} s in {path}")
    with path.open("r+b") as stream_file:
        stream_file.seek(position)
        stream_file.write(b"\xff" * size)


def _write_unordered(path: Path) -> None:
    frames = []
    for i in range(UNORDERED_FRAMES):
        image = np.full((50, 50, 3), 60, np.uint8)
        image[10 + 8 * i : 18 + 8 * i, 5:45] = (230, 120, 40)  # a bar moving down
        frames.append(image)
    # Two B-frames with fixed placement: decode order I0 P3 B1 B2.
    options = {"x264-params": "bframes=2:b-adapt=0:keyint=250:scenecut=0"}
    _encode(path, frames, UNORDERED_FRAMES, UNORDERED_FPS, options)


def rotated_upright() -> np.ndarray:
    """What ``video_90.mov`` looks like when shown (320x568): red block top left, blue
    bar along the bottom, on grey."""
    width, height = ROTATED_SHOWN
    image = np.full((height, width, 3), 128, np.uint8)
    image[:100, :100] = (220, 30, 30)
    image[height - 60 :, :] = (30, 30, 220)
    return image


def _write_rotated(path: Path) -> None:
    # A display matrix of -90 degrees (what phones write for portrait video) tells players
    # to turn the stored picture a quarter turn clockwise: store it turned the other way.
    stored = np.ascontiguousarray(np.rot90(rotated_upright(), 1))
    assert stored.shape[:2] == (ROTATED_STORED[1], ROTATED_STORED[0])
    options = {"preset": "veryfast"}
    _encode(path, [stored] * ROTATED_FRAMES, ROTATED_FRAMES, 30, options, rotation=-90)


def _write_variable_frame_rate(path: Path) -> None:
    frames = [np.full((64, 96, 3), grey_level(i), np.uint8) for i in range(len(VFR_TIMES_MS))]
    _encode(path, frames, len(frames), 30, {"preset": "veryfast"}, pts_ms=VFR_TIMES_MS)


def _write_zero_frames(path: Path) -> None:
    # Fragmented MP4 declares its tracks up front (a recorder stopped before its first
    # frame leaves this); a plain MP4 would drop the empty track altogether.
    options = {"movflags": "frag_keyframe+empty_moov"}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()


def make_test_videos(folder: Path) -> None:
    """Write every test video into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_pancake(folder / PANCAKE)
    data = (folder / PANCAKE).read_bytes()
    (folder / TRUNCATED).write_bytes(data[: len(data) // 2])
    _write_corrupted(folder / CORRUPTED)
    _write_unordered(folder / UNORDERED)
    _write_rotated(folder / ROTATED)
    _write_variable_frame_rate(folder / VARIABLE_FRAME_RATE)
    _write_zero_frames(folder / ZERO_FRAMES)
    (folder / NOT_A_VIDEO).write_text(NOT_A_VIDEO_TEXT)
    for file in folder.iterdir():
        file.chmod(0o444)  # shared by every test: a test that wants to change one copies it


# ---------------------------------------------------------------- the cached set


def _version() -> str:
    # A new folder whenever this file or the encoder changes, so no stale video is reused.
    source = Path(__file__).read_bytes()
    return hashlib.sha256(source + repr(av.library_versions).encode()).hexdigest()[:16]


@functools.cache
def video_dir() -> Path:
    """The folder of test videos, made on first use and reused by later sessions."""
    root = REPO / ".pytest_cache" / "d" / "vkr-test-videos"
    target = root / _version()
    if target.is_dir() and {p.name for p in target.iterdir()} == {*GOOD, *BROKEN}:
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Made aside and renamed into place: a concurrent session sees all of it or none.
    work = Path(tempfile.mkdtemp(prefix=".making-", dir=root))
    try:
        make_test_videos(work)
        if target.is_dir():  # incomplete (a file was deleted): replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(work, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
