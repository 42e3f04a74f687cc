"""`vkr decontam`: benchmark ids, near-duplicate videos, calibration, the pHash itself.

Videos are real files: synthetic "scene" videos written here with PyAV (textured, moving
content, some still shots) and the shared test clips, decoded by the real readers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.fft import dctn
from videos import video_dir

from cli import cli
from corpus import decontam as dc
from corpus import phash
from vkr_core.schemas import InputError

TESTDATA = video_dir()  # made by tests/videos.py, cached across sessions
PANCAKE = TESTDATA / "flipping_a_pancake.mkv"


# ---------------------------------------------------------------- synthetic videos


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colour field with smooth structure, hard-edged patches and grain."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(12):
        fx, fy = rng.uniform(-0.08, 0.08, 2)
        wave = np.sin(fx * xx + fy * yy + rng.uniform(0, 2 * np.pi))
        image += rng.uniform(20, 60) * wave[..., None] * rng.uniform(0.3, 1.0, 3)
    for _ in range(8):
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(6, 30)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius * radius))
        image += blob[..., None] * rng.uniform(-90, 90, 3)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        h, w = rng.integers(6, height // 3), rng.integers(6, width // 3)
        image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    return image + rng.normal(0, 6, (height, width, 1)) + 128


def write_scene_video(
    path: Path, seed: int, duration: float = 30.0, size: tuple[int, int] = (160, 90), fps: int = 5
) -> Path:
    """A video of 5-9 s scenes: a textured view that pans (or holds still) and a moving dot."""
    rng = np.random.default_rng(seed)
    width, height = size
    total = int(round(duration * fps))
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        start = 0
        while start < total:
            length = int(rng.uniform(5, 9) * fps)
            view = _texture(rng, height * 2, width * 2)
            # A third of the scenes hold still, like a slide or a tripod shot.
            velocity = rng.uniform(-1.5, 1.5, 2) if rng.random() > 1 / 3 else np.zeros(2)
            colour, radius = rng.uniform(0, 255, 3), rng.uniform(6, 14)
            for k in range(min(length, total - start)):
                oy = int(height / 2 + velocity[0] * k) % height
                ox = int(width / 2 + velocity[1] * k) % width
                frame = view[oy : oy + height, ox : ox + width].copy()
                cy, cx = height / 2 + height / 3 * np.sin(k / fps), (k * 3) % width
                frame[(yy - cy) ** 2 + (xx - cx) ** 2 < radius * radius] = colour
                picture = av.VideoFrame.from_ndarray(
                    np.clip(frame, 0, 255).astype(np.uint8), format="rgb24"
                )
                for packet in stream.encode(picture):
                    container.mux(packet)
            start += length
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_trimmed_copy(source: Path, target: Path, start_s: float) -> Path:
    """The source from ``start_s`` on, re-encoded (a re-upload that cut the intro)."""
    with av.open(str(source)) as reader, av.open(str(target), "w") as writer:
        stream_in = reader.streams.video[0]
        stream = writer.add_stream("libx264", rate=stream_in.average_rate)
        stream.width, stream.height, stream.pix_fmt = stream_in.width, stream_in.height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "26"}
        for frame in reader.decode(stream_in):
            if frame.time is not None and frame.time >= start_s - 1e-6:
                picture = av.VideoFrame.from_ndarray(
                    frame.to_ndarray(format="rgb24"), format="rgb24"
                )
                for packet in stream.encode(picture):
                    writer.mux(packet)
        for packet in stream.encode():
            writer.mux(packet)
    return target


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Benchmark scenes, copies of them with every transform, and unrelated videos."""
    root = tmp_path_factory.mktemp("decontam")
    bench, train = root / "bench", root / "train"
    bench.mkdir()
    train.mkdir()
    scenes = [
        write_scene_video(bench / f"scene{i}.mp4", seed=100 + i, duration=25 + 4 * i)
        for i in range(5)
    ]
    (bench / "pancake.mkv").symlink_to(PANCAKE)
    for scene, transform in zip(scenes, dc.TRANSFORMS, strict=False):
        dc.make_transformed_copy(scene, train / f"copy_{transform}.mp4", transform)
    write_trimmed_copy(scenes[4], train / "copy_trimmed.mp4", start_s=7.0)
    dc.make_transformed_copy(PANCAKE, train / "copy_pancake.mp4", "reencode")
    for i in range(3):
        write_scene_video(train / f"unrelated{i}.mp4", seed=200 + i, duration=25 + 5 * i)
    for name in ("video_90.mov", "unordered.mov", "corrupted.mp4"):
        (train / name).symlink_to(TESTDATA / name)
    return {"root": root, "bench": bench, "train": train}


COPIES = {
    # training video: (benchmark video, training second - benchmark second)
    "copy_reencode": ("scene0", 0),
    "copy_resize": ("scene1", 0),
    "copy_crop": ("scene2", 0),
    "copy_brightness": ("scene3", 0),
    "copy_trimmed": ("scene4", -7),
    "copy_pancake": ("pancake", 0),
}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- the command


def test_default_preset_removes_every_copy_and_keeps_unrelated_videos(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    train = corpus["train"]
    # A manifest, so one video can carry a YouTube id that a benchmark lists.
    manifest = tmp_path / "train.jsonl"
    lines = []
    for file in sorted(train.iterdir()):
        record = {"video_id": file.stem, "path": os.path.relpath(file, tmp_path)}
        if file.stem == "unrelated2":
            record["youtube_id"] = "dQw4w9WgXcQ"
        lines.append(json.dumps(record))
    manifest.write_text("\n".join(lines) + "\n")
    ids = tmp_path / "bench_ids.txt"
    ids.write_text("# benchmark X\nhttps://www.youtube.com/watch?v=dQw4w9WgXcQ&t=42s\n")
    out, cache = tmp_path / "report", tmp_path / "cache"
    args = ["decontam", "--train", str(manifest), "--bench", str(corpus["bench"])]
    args += ["--bench-ids", str(ids), "--out", str(out), "--cache-dir", str(cache)]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    removed = {r["video_id"]: r for r in _read_jsonl(out / "removed.jsonl")}
    assert set(removed) == {*COPIES, "unrelated2"}
    assert removed["unrelated2"]["reason"] == "benchmark-id"
    assert removed["unrelated2"]["evidence"]["listed_at"] == f"{ids}:2"
    for video_id, (bench_id, offset) in COPIES.items():
        record = removed[video_id]
        evidence = record["evidence"]
        assert record["reason"] == "near-duplicate"
        assert evidence["benchmark_video"] == bench_id
        assert evidence["share"] >= 0.6
        assert evidence["matched_frames"] <= evidence["compared_frames"]
        assert evidence["training_start_s"] - evidence["benchmark_start_s"] == offset or (
            # a window that starts before the training clip begins is clipped at 0
            offset < 0 and evidence["training_start_s"] == 0
        )
    assert removed["copy_pancake"]["evidence"]["window_s"] == 11  # a 10.4 s clip: one window
    kept = (out / "kept.txt").read_text().split()
    assert sorted(kept) == ["unordered", "unrelated0", "unrelated1", "video_90"]
    failed = _read_jsonl(out / "failed.jsonl")
    assert [f["video_id"] for f in failed] == ["corrupted"]
    assert "corrupted.mp4" in failed[0]["error"] and "decode" in failed[0]["error"]
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["removed_near_duplicate"] == len(COPIES)
    assert sorted(report["unchecked"]) == ["unordered", "video_90"]  # one frame each
    assert f"removed: 1 benchmark-id, {len(COPIES)} near-duplicate" in result.output
    assert "failed: 1" in result.output

    # A second run reads every hash from the cache and decides the same.
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    hashed = report["hashed"]
    assert f"hashed 0 videos, {hashed} from cache" in again.output
    assert _read_jsonl(out / "removed.jsonl") == list(removed.values())


def test_paper_preset_flags_unrelated_videos(corpus: dict[str, Path], tmp_path: Path) -> None:
    """The paper's rule taken literally removes videos that share no footage."""
    train = tmp_path / "unrelated"
    train.mkdir()
    for i in range(3):
        (train / f"unrelated{i}.mp4").symlink_to(corpus["train"] / f"unrelated{i}.mp4")
    common = ["decontam", "--train", str(train), "--bench", str(corpus["bench"])]
    common += ["--cache-dir", str(tmp_path / "cache"), "--jobs", "0"]

    paper = CliRunner().invoke(cli, [*common, "--preset", "paper", "--out", str(tmp_path / "p")])
    default = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "d")])

    assert paper.exit_code == 0 and default.exit_code == 0, paper.output + default.output
    assert len(_read_jsonl(tmp_path / "p" / "removed.jsonl")) >= 2  # 3 of 3 when measured
    assert _read_jsonl(tmp_path / "d" / "removed.jsonl") == []
    assert "exhaustive" in paper.output  # the paper's loose rule searches every frame


def test_bad_options_give_clear_errors(corpus: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["decontam", "--train", str(corpus["train"]), "--out", str(tmp_path / "o")]

    no_bench = runner.invoke(cli, base)
    bits_only = runner.invoke(cli, [*base, "--bench", str(corpus["bench"]), "--hash-bits", "256"])
    bad_share = runner.invoke(cli, [*base, "--bench", str(corpus["bench"]), "--share", "1.5"])

    assert no_bench.exit_code == 2 and "--bench" in no_bench.output
    assert bits_only.exit_code == 1 and "give --distance too" in bits_only.output
    # Out of (0, 1]: a usage error naming the option and its range.
    assert bad_share.exit_code == 2 and "'--share': 1.5 is not in the range" in bad_share.output


# ---------------------------------------------------------------- calibration


def test_calibrate_measures_presets_and_recommends_a_rule(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("scene0.mp4", "scene2.mp4", "pancake.mkv"):
        (videos / name).symlink_to(corpus["bench"] / name)
    (videos / "unrelated0.mp4").symlink_to(corpus["train"] / "unrelated0.mp4")
    out = tmp_path / "calibration.json"
    args = ["decontam", "calibrate", "--videos", str(videos), "--out", str(out)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--jobs", "0"]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    assert len(measured["videos"]) == 4
    paper, default = measured["presets"]["paper"], measured["presets"]["default"]
    assert paper["unrelated_pairs"] == 12 and paper["copies"] == 16
    assert paper["false_positives"] > 0
    assert default["false_positives"] == 0 and default["recall"] == 1.0
    recommended = measured["recommended"]
    assert recommended["false_positive_rate"] == 0.0 and recommended["recall"] == 1.0
    use = (
        f"use: --hash-bits {recommended['hash_bits']} --distance {recommended['distance']} "
        f"--share {recommended['share']:g}"
    )
    assert use in result.output
    assert "false-positive rate / recall" in result.output


def test_calibrate_needs_two_usable_videos(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "short.mov").symlink_to(TESTDATA / "video_90.mov")
    args = ["decontam", "calibrate", "--videos", str(tmp_path / "v"), "--jobs", "0"]
    args += ["--cache-dir", str(tmp_path / "cache")]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 1
    assert "at least 2 usable videos" in result.output and "short" in result.output


# ---------------------------------------------------------------- benchmark id lists


def test_benchmark_id_lists_take_ids_and_urls_and_report_junk_lines(tmp_path: Path) -> None:
    listing = tmp_path / "ids.txt"
    listing.write_text(
        "\n".join(
            [
                "# VideoMMMU ids",  # 1
                "",  # 2
                "dQw4w9WgXcQ",  # 3
                "https://www.youtube.com/watch?v=9bZkp7q19f0&t=30s",  # 4
                "youtu.be/kJQP7kiw5Fk?si=abc",  # 5
                "https://m.youtube.com/shorts/J---aiyznGQ",  # 6
                "https://www.youtube.com/embed/OPf0YbXqDm0  # embedded",  # 7
                "not an id",  # 8
                "https://vimeo.com/123456789",  # 9
                "abc123",  # 10
                "   ",  # 11
                "dQw4w9WgXcQ",  # 12: listed again, the first place is kept
                "https://www.youtube.com/watch?v=tooshort",  # 13
            ]
        )
        + "\n"
    )

    ids = dc.read_benchmark_ids([listing])

    assert ids.ids == {
        "dQw4w9WgXcQ": f"{listing}:3",
        "9bZkp7q19f0": f"{listing}:4",
        "kJQP7kiw5Fk": f"{listing}:5",
        "J---aiyznGQ": f"{listing}:6",
        "OPf0YbXqDm0": f"{listing}:7",
    }
    assert [(p.line, p.text) for p in ids.problems] == [
        (8, "not an id"),
        (9, "https://vimeo.com/123456789"),
        (10, "abc123"),
        (13, "https://www.youtube.com/watch?v=tooshort"),
    ]
    with pytest.raises(InputError, match="missing.txt: benchmark id list not found"):
        dc.read_benchmark_ids([tmp_path / "missing.txt"])


def test_junk_id_lines_are_printed_with_file_and_line(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    listing = tmp_path / "ids.txt"
    listing.write_text("dQw4w9WgXcQ\nwatch this later\n")
    args = ["decontam", "--train", str(corpus["train"]), "--bench-ids", str(listing)]
    args += ["--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--jobs", "0"]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    assert f"{listing}:2: skipped 'watch this later'" in result.output
    assert "1 ids (1 lines skipped)" in result.output


def test_manifest_errors_name_the_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"video_id": "a", "path": "a.mp4"}\n{"video_id": "b"}\n')
    with pytest.raises(InputError, match=r"train.jsonl:2: field 'path' is missing"):
        dc.read_video_list(manifest)
    manifest.write_text('{"video_id": "a", "path": "a.mp4"}\n{oops\n')
    with pytest.raises(InputError, match=r"train.jsonl:2: not JSON \("):
        dc.read_video_list(manifest)
    manifest.write_text('{"video_id": "a", "path": "a.mp4"}\n{"video_id": "a", "path": "b.mp4"}\n')
    with pytest.raises(InputError, match=r"train.jsonl:2: video id 'a' is also used at .*:1"):
        dc.read_video_list(manifest)
    manifest.write_text('{"video_id": "../a", "path": "a.mp4"}\n')
    with pytest.raises(InputError, match=r"train.jsonl:1: unsafe video id"):
        dc.read_video_list(manifest)


# ---------------------------------------------------------------- decoding failures


def crash_or_hang(path: Path, pm: Any) -> dc.VideoHashes:
    """A hasher for worker processes that dies or hangs on some files, like decord can."""
    if "crash" in path.name:
        os.kill(os.getpid(), signal.SIGKILL)
    if "hang" in path.name:
        time.sleep(600)
    return dc.hash_video(path, pm=pm)


def test_a_decoder_that_crashes_or_hangs_costs_only_its_video(tmp_path: Path) -> None:
    for name in ("crash.mkv", "hang.mkv", "good.mkv"):
        shutil.copy(PANCAKE, tmp_path / name)  # distinct files: one file is decoded once
    videos = [(name, tmp_path / f"{name}.mkv") for name in ("crash", "hang", "good")]

    hashes, errors, stats = dc.hash_videos(videos, None, jobs=2, timeout=2.0, hasher=crash_or_hang)

    assert set(hashes) == {"good"} and len(hashes["good"]) == 11
    assert errors["crash"] == f"{tmp_path / 'crash.mkv'}: decoder crashed (signal 9)"
    assert errors["hang"] == f"{tmp_path / 'hang.mkv'}: decoder timed out after 2 s"
    assert stats.hashed == 1 and stats.failed == 2


# ---------------------------------------------------------------- the hash


def reference_phash(frame: np.ndarray, bits: int) -> np.ndarray:
    """pHash of one frame written the plain way: loops for the resize, scipy for the DCT."""
    side = math.isqrt(bits)
    height, width, _ = frame.shape
    gray = frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    small = np.zeros((32, 32))
    sy, sx = height / 32, width / 32
    for i in range(32):
        rows = range(math.floor(i * sy), min(math.ceil((i + 1) * sy), height))
        wy = np.array([min((i + 1) * sy, y + 1) - max(i * sy, y) for y in rows])
        for j in range(32):
            cols = range(math.floor(j * sx), min(math.ceil((j + 1) * sx), width))
            wx = np.array([min((j + 1) * sx, x + 1) - max(j * sx, x) for x in cols])
            block = gray[rows.start : rows.stop, cols.start : cols.stop]
            small[i, j] = (wy @ block @ wx) / (sy * sx)
    low = np.rint(dctn(small, type=2)[:side, :side]).ravel()
    return np.packbits(low > np.median(low))


def test_vectorised_phash_equals_the_per_frame_reference_bit_for_bit(vkr_plugin_manager) -> None:
    from vkr_core.video import read_frames

    pm = vkr_plugin_manager
    rng = np.random.default_rng(7)
    times = [0.0, 2.5, 5.0, 9.9]
    frames = [a for _, a in read_frames(PANCAKE, times, pm=pm)]  # 426x240
    frames += [a for _, a in read_frames(PANCAKE, times, max_side=dc.FRAME_SIDE, pm=pm)]
    frames += [rng.integers(0, 256, (36, 64, 3), dtype=np.uint8) for _ in range(4)]
    frames.append(np.zeros((90, 160, 3), np.uint8))  # black: every AC coefficient is 0
    frames.append(np.full((31, 17, 3), 200, np.uint8))  # flat and smaller than 32x32
    yy, xx = np.mgrid[0:64, 0:64]
    symmetric = 128 + 100 * np.sin(xx / 7.0) * np.sin(yy / 7.0)  # equal coefficient pairs
    frames.append(np.repeat(symmetric[..., None], 3, axis=2).astype(np.uint8))

    for bits in phash.HASH_BITS:
        expected = np.stack([reference_phash(frame, bits) for frame in frames])
        codes, _ = phash.phash_frames(frames, bits)
        assert np.array_equal(codes, expected), bits
    # One pass gives both sizes, equal to asking for each.
    both, detail = phash.phash_frames_multi(frames)
    assert all(np.array_equal(both[b], phash.phash_frames(frames, b)[0]) for b in phash.HASH_BITS)
    assert detail[len(times) * 2 + 4] == 0.0 and detail[-3] == 0.0  # flat frames
    assert detail[: len(times)].min() > dc.PRESETS["default"].min_detail


def test_hamming_distance_counts_differing_bits() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (50, 32), dtype=np.uint8)
    b = rng.integers(0, 256, (50, 32), dtype=np.uint8)
    expected = np.unpackbits(a ^ b, axis=1).sum(axis=1)
    assert np.array_equal(phash.hamming(a, b), expected)


def test_paper_distance_matches_a_third_of_random_hash_pairs() -> None:
    """Two unrelated 64-bit hashes are within distance 30 about 35 % of the time."""
    rng = np.random.default_rng(2026)
    pairs = 200_000
    a = rng.integers(0, 256, (pairs, 8), dtype=np.uint8)
    b = rng.integers(0, 256, (pairs, 8), dtype=np.uint8)
    observed = float((phash.hamming(a, b) <= 30).mean())
    expected = phash.chance_match_probability(64, 30)

    assert expected == pytest.approx(0.354, abs=0.001)
    # 5 standard errors of a binomial proportion over 200k pairs is about 0.005.
    assert observed == pytest.approx(expected, abs=0.005)
    assert phash.chance_match_probability(64, dc.PRESETS["default"].distance) < 1e-6


def _random_hash_video(rng: np.random.Generator, seconds: int, shot: int) -> dc.VideoHashes:
    """Random hashes that hold for ``shot`` seconds, like cuts between still shots."""
    shots = rng.integers(0, 256, (math.ceil(seconds / shot), 8), dtype=np.uint8)
    codes = np.repeat(shots, shot, axis=0)[:seconds]
    return dc.VideoHashes({64: codes}, np.full(seconds, 50.0, np.float32), float(seconds))


def test_paper_rule_flags_most_unrelated_random_hash_videos() -> None:
    rng = np.random.default_rng(11)
    videos = [_random_hash_video(rng, 60, shot=6) for _ in range(12)]
    paper, default = dc.PRESETS["paper"], dc.PRESETS["default"]

    def flagged(params: dc.DecontamParams) -> float:
        hits = [
            dc.best_shares(a, b, 64, [params.distance])[0] >= params.share
            for i, a in enumerate(videos)
            for j, b in enumerate(videos)
            if i != j
        ]
        return float(np.mean(hits))

    assert flagged(paper) > 0.5
    assert flagged(default) == 0.0


# ---------------------------------------------------------------- the index


def test_multihash_index_finds_every_planted_copy_within_its_radius() -> None:
    rng = np.random.default_rng(3)
    rows = 200_000
    codes = rng.integers(0, 256, (rows, 8), dtype=np.uint8)
    video = dc.VideoHashes({64: codes}, np.full(rows, 50.0, np.float32), float(rows))
    index = dc.FrameIndex([video], 64, distance=12, min_detail=2.0, kind="multihash")
    radius = dc.multihash_radius(64, index.index.nflip)
    planted = rng.choice(rows, 300, replace=False)
    queries = np.unpackbits(codes[planted], axis=1)
    flips = rng.integers(0, radius + 1, len(planted))
    for query, count in zip(queries, flips, strict=True):
        query[rng.choice(64, count, replace=False)] ^= 1

    distances, found = index.search(np.packbits(queries, axis=1), 4)

    assert radius == 8
    hit = found == planted[:, None]
    assert hit.any(axis=1).all()
    assert np.array_equal(distances[hit], flips)
