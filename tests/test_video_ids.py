"""Video ids as YouTube writes them: 11 characters of [A-Za-z0-9_-], often starting with '-'
or '_', through every command that names a file or a thread after the id."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from vkr_core.schemas import InputError, Video, check_video_id
from vkr_core.store import RunLayout

VKR = str(Path(sys.executable).parent / "vkr")
# Real YouTube ids' shapes: a leading '-', a leading '_', and '-'/'_' inside.
DASH, UNDERSCORE = "-dQw4w9WgXc", "_aB3-x_9Q0k"


def vkr(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([VKR, *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"vkr {args[0]} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.mark.parametrize("video_id", [DASH, UNDERSCORE, "-", "_x", "a.b-c_d", "A" * 128])
def test_youtube_shaped_ids_are_video_ids(video_id):
    assert check_video_id(video_id) == video_id
    assert Video(video_id=video_id, path="x.mp4").video_id == video_id


@pytest.mark.parametrize(
    "video_id",
    [
        ".hidden",  # a hidden file
        ".",
        "..",
        "a..b",
        "../escape",
        "a/b",
        "-/b",
        "a\\b",
        "",
        "abc\n",  # '$' alone would let a trailing newline through
        "a b",
        "A" * 129,
    ],
)
def test_ids_that_are_not_safe_file_names_are_refused(video_id):
    with pytest.raises(InputError, match=r"unsafe video id .*'\.' \(not first\)"):
        check_video_id(video_id)


def write_manifest(folder: Path, testdata: Path, ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for video_id in ids:
        shutil.copy(testdata / "flipping_a_pancake.mkv", folder / f"{video_id}.mkv")
        lines.append(
            {
                "video_id": video_id,
                "path": f"{video_id}.mkv",
                "discipline": "cooking",
                "subject": "batter cookery",
                "title": f"Pancake flip {video_id}",
            }
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_leading_dash_id_runs_splits_and_exports_end_to_end(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    videos = tmp_path / "videos"
    manifest = write_manifest(videos, testdata, [DASH, UNDERSCORE])
    run = tmp_path / "run"
    args = ["run", "--videos", str(manifest), "--pool", str(vkr_pool), "--out", str(run)]
    vkr(*args, "--no-progress")
    layout = RunLayout(run)
    for video_id in (DASH, UNDERSCORE):
        record = json.loads(layout.record(video_id).read_text())
        assert record["video_id"] == video_id and record["status"] == "done"
        assert any(layout.frames(video_id).glob("*.jpg"))
    assert layout.record(DASH).name == f"{DASH}.json"
    # The checkpoints' thread is the id as it is.
    with sqlite3.connect(layout.checkpoints) as db:
        threads = {row[0] for row in db.execute("SELECT DISTINCT thread_id FROM checkpoints")}
    assert {DASH, UNDERSCORE} <= threads
    accepted = {
        e["problem_id"]: video_id
        for video_id in (DASH, UNDERSCORE)
        for e in json.loads(layout.record(video_id).read_text())["accepted"]
    }
    assert set(accepted.values()) == {DASH, UNDERSCORE}

    # A rerun resumes from those threads and records: no call is paid twice.
    paid = vkr_fake_server.stats()["by_step"]
    vkr(*args, "--no-progress")
    assert vkr_fake_server.stats()["by_step"] == paid
    assert vkr_fake_server.stats()["repeats"] == 0

    split = tmp_path / "split"
    vkr("split", str(run), "--out", str(split), "--sft-share", "0.5")
    rows = read_lines(split / "sft.jsonl") + read_lines(split / "rl.jsonl")
    assert {r["problem_id"]: r["video_id"] for r in rows} == accepted
    assert {r["video_path"] for r in rows} == {f"{DASH}.mkv", f"{UNDERSCORE}.mkv"}

    out = tmp_path / "export"
    vkr("export", "--format", "llamafactory", "--input", str(split), "--out", str(out))
    exported = [
        video
        for path in sorted(out.glob("*.json"))
        if path.name != "dataset_info.json"
        for row in json.loads(path.read_text())
        for video in row["videos"]
    ]
    assert exported and {Path(v).name for v in exported} <= {f"{DASH}.mkv", f"{UNDERSCORE}.mkv"}
    assert all((videos / v).is_file() or Path(v).is_file() for v in exported)


def test_vkr_generate_takes_a_leading_dash_id(tmp_path, testdata, vkr_pool, vkr_fake_server):
    videos = tmp_path / "videos"
    write_manifest(videos, testdata, [DASH])
    run = tmp_path / "run"
    # click takes the next word as the option's value, even one that starts with '-'.
    for form in (["--video-id", DASH], [f"--video-id={DASH}"]):
        result = vkr(
            "generate",
            *form,
            "--videos-dir",
            str(videos),
            "--pool",
            str(vkr_pool),
            "--out",
            str(run),
        )
        assert f"video {DASH}:" in result.stdout
        assert f"record: {RunLayout(run).record(DASH)}" in result.stdout
    assert RunLayout(run).record(DASH).is_file()


def test_an_id_with_a_leading_dot_is_refused_in_one_line(tmp_path, testdata, vkr_pool):
    videos = tmp_path / "videos"
    write_manifest(videos, testdata, ["good"])
    (videos / "good.mkv").rename(videos / ".hidden.mkv")
    result = vkr(
        "generate",
        "--video-id",
        ".hidden",
        "--videos-dir",
        str(videos),
        "--pool",
        str(vkr_pool),
        "--out",
        str(tmp_path / "run"),
        check=False,
    )
    assert result.returncode != 0
    assert "unsafe video id '.hidden'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "records").exists() or not any(
        (tmp_path / "run" / "records").iterdir()
    )


def test_yt_dlp_downloads_a_leading_dash_id_once_and_the_source_reads_it_back(
    vkr_youtube_server, tmp_path
):
    from plugins.providers.fake_youtube import FakeVideo
    from plugins.sources.youtube import YouTubeSource
    from plugins.sources.youtube_download import YouTubeDownloader

    server = vkr_youtube_server
    server.add_videos([FakeVideo(DASH, "Pancake flip", ("pancake",), "A pan and a flip.")])
    out = tmp_path / "videos"
    downloader = YouTubeDownloader(
        out, url_template=server.file_url_template, min_interval_seconds=0
    )
    outcome = downloader.download(DASH)
    assert outcome.status == "downloaded", outcome.message
    assert Path(outcome.path or "").name == f"{DASH}.mp4"
    fetched = server.file_requests[DASH]
    again = YouTubeDownloader(out, url_template=server.file_url_template).download(DASH)
    assert again.status == "already" and server.file_requests[DASH] == fetched
    assert YouTubeSource().resolve(DASH, videos_dir=out).video_path == f"{DASH}.mp4"
