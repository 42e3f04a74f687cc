"""Video paths: one rule for every command.

A record holds the video's path relative to a declared video root (``vkr run --video-root``,
by default the manifest's folder; ``vkr generate --videos-dir``); the root is saved in the
run's config; two files never share an identity; ``vkr export`` refuses videos that are not
files under its root. Runs go through the real CLI, litellm over HTTP to the fake server,
real SQLite and real decoding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli import cli
from corpus.split import split_run_dirs
from plugins.sources.local import LocalFolderSource
from vkr_core.manifest import load_manifest
from vkr_core.schemas import AcceptedExample, InputError, Verdict, Video, VideoRecord

# Every gate passes, so each video yields its six examples and the split is predictable.
ALL_PASS = {
    "steps": {
        "self_consistency": {"accuracy": 1.0},
        "video_dependency": {"accuracy": 0.0},
        "cot_verification": {"cot_pass": 1.0},
    }
}


def vkr(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args: Any) -> Any:
    result = vkr(*args)
    assert result.exit_code == 0, result.output
    return result


def put_video(testdata: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(testdata / "flipping_a_pancake.mkv", target)
    return target


def write_manifest(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"discipline": "cooking", "subject": "batter cookery"}
    path.write_text("".join(json.dumps(base | line) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_paths(run_dir: Path) -> dict[str, set[str]]:
    """video id -> the video_path values its accepted examples hold."""
    out: dict[str, set[str]] = {}
    for path in sorted((run_dir / "records").glob("*.json")):
        data = json.loads(path.read_text())
        out[data["video_id"]] = {e["video_path"] for e in data["accepted"]}
    return out


def under(root: Path, relative: str) -> Path:
    """``relative`` resolved under ``root``, asserting it is a real file inside the root."""
    assert not Path(relative).is_absolute() and ".." not in Path(relative).parts, relative
    path = root / relative
    assert path.is_file(), f"{relative} is not a file under {root}"
    assert path.resolve().is_relative_to(root.resolve())
    return path


def accepted(video_id: str, index: int, video_path: str) -> AcceptedExample:
    return AcceptedExample(
        problem_id=f"{video_id}-VidR-{index}",
        question=f"What happens at 00:0{index}?",
        options=["A. The pan is flipped", "B. Nothing"],
        problem_type="multiple choice",
        solution="<answer>A</answer>",
        think="<think>The pan turns over at that moment.</think>",
        video_path=video_path,
        skill="VidR",
        subject="batter cookery",
        discipline="cooking",
        video_id=video_id,
        models={"example_generation": ["m1"]},
        verdicts=[Verdict(step="self_consistency", passed=True, reason="same answer")],
    )


def write_run(run_dir: Path, videos: dict[str, tuple[Path, str, int]], root: Path | None) -> None:
    """A run directory as `vkr run` leaves it: records (id -> file, video_path, examples) and
    a config.json holding the video root."""
    (run_dir / "records").mkdir(parents=True)
    for video_id, (file, video_path, count) in videos.items():
        record = VideoRecord(
            video_id=video_id,
            video=Video(video_id=video_id, path=str(file), video_path=video_path),
            status="done",
            accepted=[accepted(video_id, i, video_path) for i in range(count)],
        )
        (run_dir / "records" / f"{video_id}.json").write_text(record.model_dump_json())
    config = {"config": {"video_root": str(root) if root else None}}
    (run_dir / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------- acceptance


def test_a_run_over_mixed_paths_exports_every_video_under_the_root(
    tmp_path: Path, testdata: Path, vkr_pool: Path, vkr_fake_server: Any
) -> None:
    """Absolute and relative manifest paths, two different files named clip.mkv: run, split,
    export to LLaMA-Factory, verl and VideoKR, and every exported path is a file under the
    root; after the root moves (another machine), only --video-root changes."""
    vkr_fake_server.set_policy(ALL_PASS)
    root = tmp_path / "data" / "videos"
    put_video(testdata, root / "a" / "clip.mkv")
    put_video(testdata, root / "b" / "clip.mkv")
    manifest = write_manifest(
        tmp_path / "data" / "lists" / "manifest.jsonl",
        [
            {"video_id": "first-clip", "path": "../videos/a/clip.mkv"},  # relative
            {"video_id": "second-clip", "path": str(root / "b" / "clip.mkv")},  # absolute
        ],
    )
    run_dir = tmp_path / "run"
    ok(
        "run",
        "--videos",
        manifest,
        "--video-root",
        root,
        "--pool",
        vkr_pool,
        "--out",
        run_dir,
        "--no-progress",
    )
    assert record_paths(run_dir) == {"first-clip": {"a/clip.mkv"}, "second-clip": {"b/clip.mkv"}}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["video_root"] == str(root)

    # Six examples each and half to SFT: two videos land one on each side, never merged.
    ok("split", run_dir, "--out", tmp_path / "split", "--sft-share", "0.5")
    split = json.loads((tmp_path / "split" / "split.json").read_text())
    assert split["sft"]["videos"] == 1 and split["rl"]["videos"] == 1
    assert sorted(split["sft"]["video_ids"] + split["rl"]["video_ids"]) == [
        "first-clip",
        "second-clip",
    ]

    # LLaMA-Factory, with no --video-root: the root the run recorded, and it says so.
    result = ok(
        "export",
        "--format",
        "llamafactory",
        "--input",
        tmp_path / "split",
        "--out",
        tmp_path / "lf",
    )
    assert f"video root: {root}" in result.output
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    [entry] = info.values()
    rows = json.loads((tmp_path / "lf" / entry["file_name"]).read_text())
    assert rows and all(len(r["videos"]) == 1 for r in rows)
    lf_paths = {r["videos"][0] for r in rows}
    for path in lf_paths:
        under(root, path)

    # verl, every example, root given explicitly.
    ok(
        "export",
        "--format",
        "verl",
        "--input",
        tmp_path / "split",
        "--out",
        tmp_path / "verl",
        "--video-root",
        root,
        "-o",
        "part=all",
    )
    [parquet] = sorted((tmp_path / "verl").glob("*.parquet"))
    verl_rows = pq.read_table(parquet).to_pylist()
    assert len(verl_rows) == 12
    verl_paths = {v["video"] for r in verl_rows for v in r["videos"]}
    assert verl_paths == {"a/clip.mkv", "b/clip.mkv"}
    for path in verl_paths:
        under(root, path)

    # The videos move (another machine): the recorded root no longer holds them.
    moved = tmp_path / "elsewhere" / "videos"
    moved.parent.mkdir()
    root.rename(moved)
    refused = vkr(
        "export", "--format", "videokr", "--input", tmp_path / "split", "--out", tmp_path / "vk"
    )
    assert refused.exit_code == 1
    assert "2 of 2 videos are not files under the video root" in refused.output
    assert "a/clip.mkv" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "vk" / "sft.jsonl").exists()

    ok(
        "export",
        "--format",
        "videokr",
        "--input",
        tmp_path / "split",
        "--out",
        tmp_path / "vk",
        "--video-root",
        moved,
    )
    rows = read_jsonl(tmp_path / "vk" / "sft.jsonl") + read_jsonl(tmp_path / "vk" / "rl.jsonl")
    assert len(rows) == 12
    by_video = {r["video_id"]: set() for r in rows}
    for row in rows:
        by_video[row["video_id"]].add(row["video_path"])
        under(moved, row["video_path"])
    # Same file name, two files, two videos: one path each, never shared.
    assert by_video == {"first-clip": {"a/clip.mkv"}, "second-clip": {"b/clip.mkv"}}


def test_generate_and_run_store_paths_by_the_same_rule(
    tmp_path: Path, testdata: Path, vkr_pool: Path, vkr_fake_server: Any
) -> None:
    """The same file gets the same video_path, and the run remembers the same root, whether
    it came through `vkr generate --videos-dir` or a manifest under `vkr run --video-root`."""
    vkr_fake_server.set_policy(ALL_PASS)
    videos = tmp_path / "videos"
    put_video(testdata, videos / "pancake.mkv")
    ok(
        "generate",
        "--video-id",
        "pancake",
        "--videos-dir",
        videos,
        "--pool",
        vkr_pool,
        "--out",
        tmp_path / "gen",
        "--discipline",
        "cooking",
    )
    manifest = write_manifest(
        tmp_path / "lists" / "manifest.jsonl",
        [{"video_id": "pancake", "path": "../videos/pancake.mkv"}],
    )
    ok(
        "run",
        "--videos",
        manifest,
        "--video-root",
        videos,
        "--pool",
        vkr_pool,
        "--out",
        tmp_path / "run",
        "--no-progress",
    )
    assert record_paths(tmp_path / "gen") == record_paths(tmp_path / "run")
    assert record_paths(tmp_path / "run") == {"pancake": {"pancake.mkv"}}
    for run_dir in ("gen", "run"):
        config = json.loads((tmp_path / run_dir / "config.json").read_text())
        assert config["config"]["video_root"] == str(videos)


# ---------------------------------------------------------------- manifest


def test_absolute_manifest_paths_keep_their_folders(tmp_path: Path, testdata: Path) -> None:
    """Two different files named clip.mkv under the manifest's folder are two paths."""
    first = put_video(testdata, tmp_path / "a" / "clip.mkv")
    second = put_video(testdata, tmp_path / "b" / "clip.mkv")
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [{"video_id": "one", "path": str(first)}, {"video_id": "two", "path": str(second)}],
    )
    loaded = load_manifest(manifest)
    assert not loaded.problems
    assert {v.video_id: v.video_path for v in loaded.videos} == {
        "one": "a/clip.mkv",
        "two": "b/clip.mkv",
    }


def test_a_manifest_file_outside_the_root_is_a_bad_line(tmp_path: Path, testdata: Path) -> None:
    inside = put_video(testdata, tmp_path / "root" / "in.mkv")
    outside = put_video(testdata, tmp_path / "other" / "out.mkv")
    manifest = write_manifest(
        tmp_path / "lists" / "manifest.jsonl",
        [
            {"video_id": "in", "path": str(inside)},
            {"video_id": "out", "path": "../other/out.mkv"},
            {"video_id": "named", "path": str(inside), "video_path": "somewhere/in.mkv"},
        ],
    )
    loaded = load_manifest(manifest, tmp_path / "root")
    assert [(v.video_id, v.video_path) for v in loaded.videos] == [("in", "in.mkv")]
    assert loaded.video_root == str(tmp_path / "root")
    [out, named] = loaded.problems
    assert out.line == 2 and f"{outside} is outside the video root" in out.reason
    assert "--video-root" in out.reason
    assert named.line == 3 and "'somewhere/in.mkv'" in named.reason

    # The default root is the manifest's folder, which holds none of these files.
    assert [p.line for p in load_manifest(manifest).problems] == [1, 2, 3]


def test_run_names_manifest_lines_outside_the_root_and_refuses_a_missing_root(
    tmp_path: Path, testdata: Path
) -> None:
    video = put_video(testdata, tmp_path / "elsewhere" / "clip.mkv")
    manifest = write_manifest(
        tmp_path / "lists" / "m.jsonl", [{"video_id": "v", "path": str(video)}]
    )
    pool = tmp_path / "no-pool.yaml"  # refused before the pool is read
    result = vkr(
        "run", "--videos", manifest, "--pool", pool, "--out", tmp_path / "r", "--strict-manifest"
    )
    assert result.exit_code == 1
    assert f"line 1: video file {video} is outside the video root" in result.output
    assert "1 bad manifest line(s); nothing was run" in result.output
    result = vkr(
        "run",
        "--videos",
        manifest,
        "--video-root",
        tmp_path / "nope",
        "--pool",
        pool,
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 1 and "video root not found" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- split


def test_split_keeps_two_files_with_one_name_apart_and_one_file_under_two_ids_together(
    tmp_path: Path,
) -> None:
    """Records made before paths were relative to a root hold bare file names: the split
    still tells the files apart, by the file each run read."""
    a, b, c = (tmp_path / d / "clip.mkv" for d in "abc")
    write_run(tmp_path / "old", {"x": (a, "clip.mkv", 3), "y": (b, "clip.mkv", 3)}, None)
    split_run_dirs([tmp_path / "old"], tmp_path / "s1", sft_share=0.5)
    manifest = json.loads((tmp_path / "s1" / "split.json").read_text())
    assert manifest["sft"]["videos"] == 1 and manifest["rl"]["videos"] == 1

    # One file, two ids in two runs with different roots (so different video_paths).
    write_run(tmp_path / "r1", {"p": (c, "c/clip.mkv", 3)}, tmp_path)
    write_run(tmp_path / "r2", {"q": (c, "clip.mkv", 3), "z": (a, "clip.mkv", 6)}, tmp_path / "c")
    for seed in range(10):
        out = tmp_path / f"s-{seed}"
        split_run_dirs([tmp_path / "r1", tmp_path / "r2"], out, sft_share=0.5, seed=seed)
        sides = json.loads((out / "split.json").read_text())
        sft = set(sides["sft"]["video_ids"])
        assert ("p" in sft) == ("q" in sft)


# ---------------------------------------------------------------- export


def test_export_refuses_videos_missing_under_its_root_naming_the_run_root(tmp_path: Path) -> None:
    """A run with the default root (the manifest's folder D) holds ``videos/x.mkv``: exporting
    under ``D/videos`` would write paths that point at ``D/videos/videos/x.mkv``."""
    folder = tmp_path / "D"
    (folder / "videos").mkdir(parents=True)
    files = {f"v{i}": folder / "videos" / f"x{i}.mkv" for i in range(7)}
    for file in files.values():
        file.write_bytes(b"a video")
    write_run(
        tmp_path / "run",
        {vid: (file, f"videos/{file.name}", 1) for vid, file in files.items()},
        folder,
    )
    split = tmp_path / "split"
    split_run_dirs([tmp_path / "run"], split, sft_share=0.5)

    args = ["export", "--format", "videokr", "--input", split, "--out", tmp_path / "o"]
    result = vkr(*args, "--video-root", folder / "videos")
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.strip().splitlines()[-1]
    assert "7 of 7 videos are not files under the video root" in message
    assert "videos/x0.mkv, videos/x1.mkv" in message and "and 2 more" in message
    assert f"the runs used the video root '{folder}'" in message
    assert not (tmp_path / "o").exists()

    result = ok(*args)  # no --video-root: the run's
    rows = read_jsonl(tmp_path / "o" / "sft.jsonl") + read_jsonl(tmp_path / "o" / "rl.jsonl")
    assert sorted(r["video_path"] for r in rows) == [f"videos/x{i}.mkv" for i in range(7)]
    for row in rows:
        under(folder, row["video_path"])

    # One deleted file: refused, named, nothing written.
    files["v3"].unlink()
    result = vkr(*args[:-1], tmp_path / "o2")
    assert result.exit_code == 1
    assert "1 of 7 videos are not files under the video root" in result.output
    assert "videos/x3.mkv (this is the root the runs used" in result.output


def test_export_without_any_root_asks_for_one(tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "x.mkv").write_bytes(b"a video")
    write_run(tmp_path / "run", {"v": (folder / "x.mkv", "x.mkv", 2)}, None)
    split_run_dirs([tmp_path / "run"], tmp_path / "split", sft_share=0.5)
    args = ["export", "--format", "videokr", "--input", tmp_path / "split", "--out", tmp_path / "o"]
    result = vkr(*args)
    assert result.exit_code == 1
    assert "no video root for the 1 video(s)" in result.output and "--video-root" in result.output
    ok(*args, "--video-root", folder)


def test_runs_with_different_roots_need_an_explicit_root(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.mkv").write_bytes(b"a video")
        write_run(
            tmp_path / f"run-{name}",
            {name: (tmp_path / name / "x.mkv", "x.mkv", 2)},
            tmp_path / name,
        )
    split_run_dirs([tmp_path / "run-one", tmp_path / "run-two"], tmp_path / "split")
    result = vkr(
        "export", "--format", "videokr", "--input", tmp_path / "split", "--out", tmp_path / "o"
    )
    assert result.exit_code == 1
    assert "recorded different video roots" in result.output
    assert str(tmp_path / "one") in result.output and str(tmp_path / "two") in result.output


def test_local_source_paths_are_relative_to_the_videos_dir(tmp_path: Path, testdata: Path) -> None:
    videos = tmp_path / "videos"
    put_video(testdata, videos / "pancake.mkv")
    video = LocalFolderSource().resolve("pancake", videos_dir=videos)
    assert video.video_path == "pancake.mkv"
    (videos / "pancake.json").write_text(json.dumps({"video_path": "elsewhere/pancake.mkv"}))
    with pytest.raises(InputError, match="drop the field"):
        LocalFolderSource().resolve("pancake", videos_dir=videos)
