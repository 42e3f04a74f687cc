"""A fresh clone passes its tests with only the README's commands, and vkr runs from any
directory.

- The tests make their own videos (tests/videos.py); each is what its name says, as vkr's
  readers see it.
- A copy of the repository with nothing beside it (no ``../shared``) passes its video tests.
- The review-page tests find Chromium on PATH or through VKR_CHROMIUM, and without one fail
  saying how to install it; they never skip.
- A directory with its own ``plugins/`` package does not replace vkr's plugins, neither in
  the command nor in the decoder workers it starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from videos import (
    CORRUPTED,
    NOT_A_VIDEO,
    PANCAKE,
    PANCAKE_FPS,
    PANCAKE_FRAMES,
    PANCAKE_SECONDS,
    PANCAKE_SIZE,
    ROTATED,
    ROTATED_SHOWN,
    TRUNCATED,
    UNORDERED,
    UNORDERED_FPS,
    UNORDERED_FRAMES,
    VARIABLE_FRAME_RATE,
    VFR_TIMES_MS,
    ZERO_FRAMES,
    grey_level,
    rotated_upright,
)

from plugins.readers import DecordReader, PyAVReader
from vkr_core.plugins import get_plugin_manager
from vkr_core.video import VideoDecodeError, sample_frames

REPO = Path(__file__).resolve().parents[1]
VKR = str(Path(sys.executable).parent / "vkr")
READERS = [DecordReader, PyAVReader]


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager(load_entry_points=False)


# ---------------------------------------------------------------- the test videos


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
def test_the_pancake_clip_is_a_normal_short_clip_with_sound(testdata: Path, reader) -> None:
    info = reader(str(testdata / PANCAKE)).probe()
    assert (info.duration, info.fps, info.frame_count) == (
        pytest.approx(PANCAKE_SECONDS, abs=1e-3),
        PANCAKE_FPS,
        PANCAKE_FRAMES,
    )
    assert (info.width, info.height) == PANCAKE_SIZE
    with av.open(str(testdata / PANCAKE)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]


def test_the_pancake_clip_changes_from_second_to_second(testdata: Path, tmp_path: Path, pm):
    frames = sample_frames(testdata / PANCAKE, tmp_path, fps=1.0, isolate=False, pm=pm)
    assert [round(f.timestamp) for f in frames] == list(range(11))
    assert len({f.sha256 for f in frames}) == 11


@pytest.mark.parametrize(
    "name, reason",
    [
        (CORRUPTED, r"cannot decode frame at 4\.9 s of 5\.0 s \(decord: .*; pyav: .*\)"),
        (TRUNCATED, r"truncated: frames stop at \d+\.\d s of the 10\.3 s the file declares"),
        (ZERO_FRAMES, r"no frames in the video stream"),
        (NOT_A_VIDEO, r"cannot open as a video"),
    ],
)
def test_each_broken_test_video_fails_for_its_own_reason(
    name: str, reason: str, testdata: Path, tmp_path: Path, pm
) -> None:
    with pytest.raises(VideoDecodeError) as error:
        sample_frames(testdata / name, tmp_path, isolate=False, pm=pm)
    message = str(error.value)
    assert message.startswith(f"{testdata / name}: ")
    assert re.search(reason, message), message


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
def test_unordered_packets_come_back_in_time_order(testdata: Path, reader) -> None:
    with av.open(str(testdata / UNORDERED)) as container:
        stored = [p.pts for p in container.demux(video=0) if p.size]
    assert stored != sorted(stored)  # B-frames: the file holds them out of order
    times = [i / UNORDERED_FPS for i in range(UNORDERED_FRAMES)]
    got = reader(str(testdata / UNORDERED)).read_at(times)
    assert [t for t, _ in got] == pytest.approx(times)
    # Frame i has an orange bar 8 px lower than frame i - 1.
    bars = [int(np.argmax(a[:, 25, 0])) for _, a in got]
    assert [bar - bars[0] for bar in bars] == [0, 8, 16, 24]


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
def test_rotated_video_is_shown_upright(testdata: Path, reader) -> None:
    [(_, array)] = reader(str(testdata / ROTATED)).read_at([0.0])
    width, height = ROTATED_SHOWN
    assert array.shape == (height, width, 3)
    difference = np.abs(array.astype(np.int16) - rotated_upright().astype(np.int16)).mean()
    assert difference < 4, f"not the upright picture (mean difference {difference:.1f})"


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
def test_variable_frame_rate_frames_are_found_by_time(testdata: Path, reader) -> None:
    asked = [0.0, 0.15, 1.0, 1.35, 2.9, 3.0, 3.06, 4.99, 5.0]
    shown = [0, 1, 3, 4, 5, 6, 7, 8, 9]
    got = reader(str(testdata / VARIABLE_FRAME_RATE)).read_at(asked)
    assert [round(float(a.mean())) for _, a in got] == pytest.approx(
        [grey_level(i) for i in shown], abs=2
    )
    assert [t for t, _ in got] == pytest.approx([VFR_TIMES_MS[i] / 1000 for i in shown])


# ---------------------------------------------------------------- a copy with nothing beside it


def _copy_checkout(target: Path) -> None:
    """The files a clone of this checkout would have: tracked ones, and new ones not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = REPO / name
        if source.is_file():  # listed but deleted in the working tree: not in a clone either
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def test_a_copy_with_nothing_beside_it_passes_its_video_tests(tmp_path: Path) -> None:
    checkout = tmp_path / "clone"
    _copy_checkout(checkout)
    assert not (checkout.parent / "shared").exists()
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # the copy's code, not the installed
    selected = [
        "tests/test_video.py::test_every_test_video_is_covered_here",
        "tests/test_video.py::test_pancake_at_one_frame_per_second",
        "tests/test_video.py::test_rotated_video_comes_out_upright",
        "tests/test_video.py::test_truncated_copy_is_an_error",
        "tests/test_fresh_clone.py::test_each_broken_test_video_fails_for_its_own_reason",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *selected],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b8 passed\b", result.stdout) and "skipped" not in result.stdout
    made = checkout / ".pytest_cache" / "d" / "vkr-test-videos"
    assert [p.name for p in made.iterdir() if not p.name.startswith(".")], "no videos made"


# ---------------------------------------------------------------- the browser


def test_without_chromium_the_browser_tests_fail_saying_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_qualify import find_chromium  # the review-page tests' own lookup

    monkeypatch.delenv("VKR_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        find_chromium()
    monkeypatch.setenv("VKR_CHROMIUM", str(tmp_path / "no-such-browser"))
    with pytest.raises(pytest.fail.Exception, match=r"VKR_CHROMIUM=.*no-such-browser"):
        find_chromium()


def test_chromium_is_found_on_path_or_named_by_vkr_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_qualify import find_chromium

    elsewhere = tmp_path / "opt" / "chromium"
    elsewhere.parent.mkdir()
    elsewhere.write_text("#!/bin/sh\n")
    elsewhere.chmod(0o755)
    monkeypatch.delenv("VKR_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(elsewhere.parent))
    assert find_chromium() == str(elsewhere)
    named = tmp_path / "chrome-build" / "chrome"
    named.parent.mkdir()
    shutil.copy2(elsewhere, named)
    monkeypatch.setenv("VKR_CHROMIUM", str(named))
    assert find_chromium() == str(named)


# ---------------------------------------------------------------- a project's own plugins/


def test_vkr_runs_from_a_directory_with_its_own_plugins_package(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "plugins").mkdir(parents=True)
    (project / "plugins" / "__init__.py").write_text('"""The project\'s own plugins."""\n')
    (project / "plugins" / "readers.py").write_text('"""Nothing to do with vkr."""\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    listed = subprocess.run(
        [VKR, "plugins"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert "plugins.readers (built-in)\n    hooks: vkr_frame_reader" in listed.stdout

    # The demo decodes its video in the isolated decoder: the worker processes must import
    # vkr's readers too, not the project's plugins/readers.py.
    out = tmp_path / "demo"
    demo = subprocess.run(
        [VKR, "demo", "--out", str(out), "--port", "0"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    accepted = re.search(r"^\s+accepted\s+(\d+)$", demo.stdout, re.MULTILINE)
    assert accepted and int(accepted.group(1)) >= 1, demo.stdout
    record = json.loads((out / "run" / "records" / "demo_pendulum.json").read_text())
    assert record["status"] == "done" and record["frames"] == 6
