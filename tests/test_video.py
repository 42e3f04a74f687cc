"""Frame sampling on real video files, decoded by real decord and PyAV."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import signal
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pluggy
import pytest
from PIL import Image
from videos import BROKEN, GOOD, video_dir

from plugins.readers import DecordReader, PyAVReader
from vkr_core import hookspecs
from vkr_core.hookspecs import hookimpl
from vkr_core.plugins import get_plugin_manager
from vkr_core.schemas import Frame, InputError, VideoInfo
from vkr_core.video import (
    FrameImages,
    VideoDecodeError,
    probe_video,
    random_frames,
    read_frames,
    sample_frames,
    sample_timestamps,
    stop_decoders,
)

TESTDATA = video_dir()  # made by tests/videos.py, cached across sessions
PANCAKE = TESTDATA / "flipping_a_pancake.mkv"


@pytest.fixture(scope="module")
def pm() -> pluggy.PluginManager:
    return get_plugin_manager(load_entry_points=False)


def video(name: str) -> Path:
    path = TESTDATA / name
    if not path.is_file():
        pytest.fail(f"test video {path} not found: tests/videos.py makes every test video")
    return path


def only(*plugins: object) -> pluggy.PluginManager:
    """A plugin manager holding just these reader plugins (no built-in readers)."""
    manager = pluggy.PluginManager("vkr")
    manager.add_hookspecs(hookspecs)
    for plugin in plugins:
        manager.register(plugin)
    return manager


# ---------------------------------------------------------------- test reader plugins
# Module-level classes, so the isolated decoder process can import them by name.


class RaisingDecord:
    """Stands in for decord failing on a file: a reader named "decord" that raises."""

    name = "decord"

    def probe(self) -> VideoInfo:
        raise RuntimeError("simulated decord failure")

    def read_at(self, timestamps: list[float]) -> list[tuple[float, np.ndarray]]:
        raise RuntimeError("simulated decord failure")


class RaisingDecordPlugin:
    @hookimpl(tryfirst=True)
    def vkr_frame_reader(self, path: str, exclude: tuple[str, ...]) -> RaisingDecord | None:
        return None if "decord" in exclude else RaisingDecord()


class BrokenHookPlugin:
    @hookimpl(tryfirst=True)
    def vkr_frame_reader(self, path: str, exclude: tuple[str, ...]) -> None:
        raise RuntimeError("broken plugin")


def _in_worker() -> None:
    # These readers kill or block their process: never let one run inside pytest itself.
    if multiprocessing.parent_process() is None:
        raise RuntimeError("this test reader only runs in the isolated decoder process")


class HangingReader:
    name = "hang"

    def probe(self) -> VideoInfo:
        _in_worker()
        time.sleep(3600)
        raise AssertionError("unreachable")

    def read_at(self, timestamps: list[float]) -> list[tuple[float, np.ndarray]]:
        raise AssertionError("unreachable")


class HangingPlugin:
    @hookimpl(tryfirst=True)
    def vkr_frame_reader(self, path: str, exclude: tuple[str, ...]) -> HangingReader | None:
        return None if "hang" in exclude else HangingReader()


class KillingReader:
    name = "killer"

    def probe(self) -> VideoInfo:
        _in_worker()
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    def read_at(self, timestamps: list[float]) -> list[tuple[float, np.ndarray]]:
        raise AssertionError("unreachable")


class KillingPlugin:
    @hookimpl(tryfirst=True)
    def vkr_frame_reader(self, path: str, exclude: tuple[str, ...]) -> KillingReader | None:
        return None if "killer" in exclude else KillingReader()


# ---------------------------------------------------------------- helpers


def make_video(path: Path, times_ms: list[int], size: tuple[int, int] = (96, 64)) -> None:
    """H.264 video whose frame i (shown from times_ms[i]) is a flat grey of 20 + 20 * i."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate(times_ms):
            array = np.full((height, width, 3), 20 + 20 * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def grey_index(array: np.ndarray) -> int:
    return round((float(array.mean()) - 20) / 20)


# ---------------------------------------------------------------- timestamps


def test_sample_timestamps_every_five_seconds_below_the_end() -> None:
    assert sample_timestamps(10.381) == [0.0, 5.0, 10.0]
    assert sample_timestamps(10.0, fps=1.0) == [float(i) for i in range(10)]
    assert sample_timestamps(15.0) == [0.0, 5.0, 10.0]


def test_sample_timestamps_short_video_gets_one_frame() -> None:
    assert sample_timestamps(0.1) == [0.0]


def test_sample_timestamps_long_video_spreads_max_frames_evenly() -> None:
    times = sample_timestamps(3600.0, fps=0.2, max_frames=64)
    assert len(times) == 64
    assert times[0] == 0.0 and times[-1] < 3600.0
    gaps = np.diff(times)
    assert np.allclose(gaps, 3600.0 / 64)


@pytest.mark.parametrize(
    "duration, fps, max_frames", [(0.0, 0.2, 64), (10.0, 0.0, 64), (10.0, 0.2, 0)]
)
def test_sample_timestamps_rejects_nonsense(duration: float, fps: float, max_frames: int) -> None:
    with pytest.raises(InputError):
        sample_timestamps(duration, fps, max_frames)


# ---------------------------------------------------------------- the test videos


def test_every_test_video_is_covered_here() -> None:
    on_disk = {path.name for path in video("flipping_a_pancake.mkv").parent.iterdir()}
    assert on_disk == set(GOOD + BROKEN)


@pytest.mark.parametrize("name", GOOD)
def test_good_videos_sample_into_jpeg_frames(
    name: str, tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    frames = sample_frames(video(name), tmp_path, fps=1.0, isolate=False, pm=pm)
    assert frames
    for frame in frames:
        data = Path(frame.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == frame.sha256
        with Image.open(frame.path) as image:
            assert image.format == "JPEG"
            assert image.size == (frame.width, frame.height)


@pytest.mark.parametrize("name", BROKEN)
def test_broken_videos_are_an_error_not_a_partial_result(
    name: str, tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    with pytest.raises(VideoDecodeError, match=name):
        sample_frames(video(name), tmp_path, isolate=False, pm=pm)
    assert not (tmp_path / "manifest.json").exists()


def test_pancake_at_default_rate_is_sampled_at_0_5_10_seconds(
    tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    frames = sample_frames(PANCAKE, tmp_path, isolate=False, pm=pm)
    assert [frame.timestamp for frame in frames] == pytest.approx([0.0, 5.0, 10.0], abs=1e-3)
    assert [frame.index for frame in frames] == [0, 1, 2]
    assert all(Path(frame.path).is_absolute() for frame in frames)
    assert Path(frames[1].path).name == "frame_0001_000005000ms.jpg"


def test_pancake_at_one_frame_per_second(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    frames = sample_frames(PANCAKE, tmp_path, fps=1.0, isolate=False, pm=pm)
    assert len(frames) == 11
    for second, frame in enumerate(frames):
        assert abs(frame.timestamp - second) < 1 / 30


def test_rotated_video_comes_out_upright(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    # video_90.mov is stored 568x320 with a 90-degree display matrix: shown portrait.
    [frame] = sample_frames(video("video_90.mov"), tmp_path, isolate=False, pm=pm)
    assert (frame.width, frame.height) == (320, 568)
    info = probe_video(video("video_90.mov"), pm=pm)
    assert (info.width, info.height) == (320, 568)


@pytest.mark.parametrize("name", GOOD)
def test_decord_and_pyav_agree(name: str) -> None:
    path = str(video(name))
    decord_reader, pyav_reader = DecordReader(path), PyAVReader(path)
    decord_info, pyav_info = decord_reader.probe(), pyav_reader.probe()
    assert decord_info.model_dump(exclude={"reader"}) == pyav_info.model_dump(exclude={"reader"})
    # Every frame of the short clips, one per second of the long one.
    rate = decord_info.fps if decord_info.duration < 2 else 1.0
    times = sample_timestamps(decord_info.duration, fps=rate)
    from_decord = decord_reader.read_at(times)
    from_pyav = pyav_reader.read_at(times)
    for (t_decord, a_decord), (t_pyav, a_pyav) in zip(from_decord, from_pyav, strict=True):
        assert t_decord == pytest.approx(t_pyav, abs=1e-3)
        assert a_decord.shape == a_pyav.shape
        difference = np.abs(a_decord.astype(np.int16) - a_pyav.astype(np.int16)).mean()
        assert difference < 2.0, f"{name} at {t_pyav} s: mean pixel difference {difference:.1f}"


def test_frames_are_chosen_by_timestamp_on_variable_frame_rate(tmp_path: Path) -> None:
    # Frame i is shown from times_ms[i]; an index computed from the average rate would
    # land on the wrong picture almost everywhere.
    times_ms = [0, 100, 200, 300, 1300, 1400, 3000, 3050, 3100, 5000]
    path = tmp_path / "vfr.mkv"
    make_video(path, times_ms)
    asked = [0.0, 0.15, 1.0, 1.35, 2.9, 3.0, 3.06, 4.99, 5.0]
    shown = [0, 1, 3, 4, 5, 6, 7, 8, 9]
    for reader in (DecordReader(str(path)), PyAVReader(str(path))):
        got = reader.read_at(asked)
        assert [grey_index(a) for _, a in got] == shown, reader.name
        assert [t for t, _ in got] == pytest.approx([times_ms[i] / 1000 for i in shown])


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(VideoDecodeError, match=r"nowhere\.mp4: no such file"):
        sample_frames(missing, tmp_path / "out", pm=pm)
    with pytest.raises(VideoDecodeError, match=r"nowhere\.mp4: no such file"):
        read_frames(missing, [0.0], pm=pm)


def test_text_file_named_mp4(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    fake = tmp_path / "lecture.mp4"
    fake.write_text("this is a transcript, not a video\n" * 20)
    with pytest.raises(VideoDecodeError, match=r"lecture\.mp4: cannot open as a video") as error:
        sample_frames(fake, tmp_path / "out", isolate=False, pm=pm)
    assert {name for name, _, _ in error.value.failures} == {"decord", "pyav"}


def test_empty_file(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(VideoDecodeError, match=r"empty\.mp4: empty file"):
        read_frames(empty, [0.0], pm=pm)


def test_file_without_video_stream(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    audio = tmp_path / "podcast.mp4"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 44100, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match=r"podcast\.mp4: no video stream"):
        sample_frames(audio, tmp_path / "out", isolate=False, pm=pm)


def test_truncated_copy_is_an_error(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    truncated = tmp_path / "pancake_half.mkv"
    data = PANCAKE.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match=r"pancake_half\.mkv: truncated") as error:
        sample_frames(truncated, tmp_path / "out", isolate=False, pm=pm)
    assert "of the 10.3 s the file declares" in str(error.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_corrupted_file_names_the_frame_and_both_readers(pm: pluggy.PluginManager) -> None:
    with pytest.raises(VideoDecodeError) as error:
        read_frames(video("corrupted.mp4"), [0.0], pm=pm)
    message = str(error.value)
    assert "corrupted.mp4: cannot decode frame at 4.9 s of 5.0 s" in message
    assert "decord:" in message and "pyav:" in message


def test_corrupted_file_in_the_isolated_decoder(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    with pytest.raises(VideoDecodeError, match=r"corrupted\.mp4: cannot decode frame at"):
        sample_frames(video("corrupted.mp4"), tmp_path, isolate=True, pm=pm)


def test_timestamp_past_the_end(pm: pluggy.PluginManager) -> None:
    with pytest.raises(InputError, match=r"flipping_a_pancake\.mkv: timestamp 60\.000 s is past"):
        read_frames(PANCAKE, [60.0], pm=pm)


# ---------------------------------------------------------------- fallback


def test_pyav_takes_over_when_decord_fails() -> None:
    pm = get_plugin_manager(extra_plugins=[RaisingDecordPlugin()], load_entry_points=False)
    assert probe_video(PANCAKE, pm=pm).reader == "pyav"
    times = [0.0, 5.0, 10.0]
    frames = read_frames(PANCAKE, times, pm=pm)
    expected = PyAVReader(str(PANCAKE)).read_at(times)
    assert [t for t, _ in frames] == [t for t, _ in expected]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(frames, expected, strict=True))


def test_all_readers_failing_lists_each(tmp_path: Path) -> None:
    pm = only(RaisingDecordPlugin(), BrokenHookPlugin())
    with pytest.raises(VideoDecodeError) as error:
        read_frames(PANCAKE, [0.0], pm=pm)
    message = str(error.value)
    assert message.startswith(f"{PANCAKE}: cannot read video (")
    assert "simulated decord failure" in message and "broken plugin" in message


def test_plugin_whose_hook_raises_is_skipped() -> None:
    pm = get_plugin_manager(extra_plugins=[BrokenHookPlugin()], load_entry_points=False)
    assert probe_video(PANCAKE, pm=pm).reader == "decord"


def test_no_reader_at_all(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="no frame reader is available"):
        sample_frames(PANCAKE, tmp_path, isolate=False, pm=only())


# ---------------------------------------------------------------- isolation


def test_hanging_reader_times_out(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(VideoDecodeError) as error:
        sample_frames(PANCAKE, tmp_path, timeout=2.0, isolate=True, pm=only(HangingPlugin()))
    elapsed = time.monotonic() - start
    assert "timed out after 2 s" in str(error.value)
    assert str(PANCAKE) in str(error.value)
    assert elapsed < 2.0 + 8.0  # the timeout plus process start-up and clean-up


def test_reader_that_kills_its_process_is_a_crash(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match=r"decoder crashed \(signal 9\)"):
        sample_frames(PANCAKE, tmp_path, isolate=True, pm=only(KillingPlugin()))
    assert not (tmp_path / "manifest.json").exists()


def test_after_a_crash_the_next_reader_takes_over(tmp_path: Path) -> None:
    pm = get_plugin_manager(extra_plugins=[KillingPlugin()], load_entry_points=False)
    frames = sample_frames(PANCAKE, tmp_path, isolate=True, pm=pm)
    assert [frame.timestamp for frame in frames] == pytest.approx([0.0, 5.0, 10.0], abs=1e-3)


def test_isolated_and_in_process_sampling_write_the_same_frames(
    tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    inside = sample_frames(PANCAKE, tmp_path / "a", fps=1.0, isolate=False, pm=pm)
    isolated = sample_frames(PANCAKE, tmp_path / "b", fps=1.0, isolate=True, pm=pm)
    assert [f.sha256 for f in inside] == [f.sha256 for f in isolated]


# ---------------------------------------------------------------- files and reuse


def test_second_call_reuses_the_manifest_without_decoding(
    tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    first = sample_frames(PANCAKE, tmp_path, isolate=False, pm=pm)
    mtimes = [Path(frame.path).stat().st_mtime_ns for frame in first]
    # No reader at all: any decoding would fail.
    second = sample_frames(PANCAKE, tmp_path, isolate=False, pm=only())
    assert second == first
    assert [Path(frame.path).stat().st_mtime_ns for frame in second] == mtimes


def test_other_parameters_resample_and_drop_old_frames(
    tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    sample_frames(PANCAKE, tmp_path, fps=1.0, isolate=False, pm=pm)
    small = sample_frames(PANCAKE, tmp_path, max_side=200, isolate=False, pm=pm)
    assert [(f.width, f.height) for f in small] == [(200, 113)] * 3
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == sorted(
        Path(f.path).name for f in small
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["max_side"] == 200


def test_manifest_with_a_missing_frame_is_redone(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    first = sample_frames(PANCAKE, tmp_path, isolate=False, pm=pm)
    Path(first[1].path).unlink()
    again = sample_frames(PANCAKE, tmp_path, isolate=False, pm=pm)
    assert again == first and Path(first[1].path).is_file()


def test_moved_output_directory_is_still_reused(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    sample_frames(PANCAKE, tmp_path / "before", isolate=False, pm=pm)
    (tmp_path / "before").rename(tmp_path / "after")
    frames = sample_frames(PANCAKE, tmp_path / "after", isolate=False, pm=only())
    assert all(Path(frame.path).parent == tmp_path / "after" for frame in frames)


def test_frame_hashes_are_stable(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    one = sample_frames(PANCAKE, tmp_path / "one", isolate=False, pm=pm)
    two = sample_frames(PANCAKE, tmp_path / "two", isolate=False, pm=pm)
    assert [f.sha256 for f in one] == [f.sha256 for f in two]
    assert len({f.sha256 for f in one}) == 3


# ---------------------------------------------------------------- random frames and images


def _frames(count: int) -> list[Frame]:
    return [
        Frame(index=i, timestamp=5.0 * i, sha256=f"{i:064x}", path=f"/f{i}.jpg", width=1, height=1)
        for i in range(count)
    ]


def test_random_frames_are_reproducible_and_in_time_order() -> None:
    frames = _frames(20)
    chosen = random_frames(frames, 4, key="video-1/video_dependency")
    assert chosen == random_frames(frames, 4, key="video-1/video_dependency")
    assert [f.timestamp for f in chosen] == sorted(f.timestamp for f in chosen)
    assert len({f.index for f in chosen}) == 4
    assert random_frames(frames, 4, key="video-2/video_dependency") != chosen


def test_random_frames_returns_all_when_there_are_fewer() -> None:
    frames = _frames(3)
    assert random_frames(list(reversed(frames)), 4, key="k") == frames


def test_frame_images_encode_once(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    frames = sample_frames(PANCAKE, tmp_path, isolate=False, pm=pm)
    images = FrameImages()
    encoded = images.base64(frames[0])
    assert base64.b64decode(encoded) == Path(frames[0].path).read_bytes()
    url = images.data_url(frames[0])
    assert url == "data:image/jpeg;base64," + encoded
    Path(frames[0].path).unlink()  # memoised: no second read of the file
    # The very same string every call: no re-encoding and no megabyte copies per request.
    assert images.data_url(frames[0]) is url
    assert images.base64(frames[0]) == encoded


def test_frame_images_refuse_a_changed_file(tmp_path: Path, pm: pluggy.PluginManager) -> None:
    frames = sample_frames(PANCAKE, tmp_path, isolate=False, pm=pm)
    Path(frames[0].path).write_bytes(Path(frames[1].path).read_bytes())
    with pytest.raises(InputError, match="changed since it was sampled"):
        FrameImages().data_url(frames[0])


def decoders() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "vkr-decoder"]


def test_isolated_decoders_are_kept_between_videos_and_a_broken_one_replaced(
    tmp_path: Path, pm: pluggy.PluginManager
) -> None:
    """Starting a decoder process cost more than decoding a short clip: one is kept for the
    next video, runs below the caller's priority, and one that crashed is never used again."""
    stop_decoders()  # those other tests kept
    assert decoders() == []
    sample_frames(PANCAKE, tmp_path / "first", fps=1.0, isolate=True, pm=pm)
    [kept] = decoders()
    for i in range(4):
        sample_frames(PANCAKE, tmp_path / f"again{i}", fps=1.0, isolate=True, pm=pm)
    assert decoders() == [kept]
    assert os.getpriority(os.PRIO_PROCESS, kept.pid) > os.getpriority(os.PRIO_PROCESS, 0)

    with pytest.raises(VideoDecodeError, match=r"decoder crashed"):
        sample_frames(PANCAKE, tmp_path / "crash", isolate=True, pm=only(KillingPlugin()))
    frames = sample_frames(PANCAKE, tmp_path / "after", isolate=True, pm=pm)
    assert [frame.timestamp for frame in frames] == pytest.approx([0.0, 5.0, 10.0], abs=1e-3)
    assert all(p.is_alive() for p in decoders())
