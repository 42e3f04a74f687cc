"""The built-in frame readers themselves (decord, PyAV); `plugins.readers` registers them.

Both pick frames by presentation timestamp (the frame shown at a time), report times from
the start of the video stream, and return frames upright as a player shows them (rotation
metadata applied), so either can stand in for the other. Imported when a reader is made,
that is where frames are decoded: numpy (and decord, PyAV) are no part of a command that
decodes nothing.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from vkr_core.schemas import VideoInfo
from vkr_core.video import ReaderError, frame_index_at

if TYPE_CHECKING:
    import av.container
    import av.video.frame
    import av.video.stream


def _message(exc: BaseException, limit: int = 300) -> str:
    """A library error as one readable line."""
    text = str(exc) or type(exc).__name__
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)
    # decord prefixes each nested message with "[hh:mm:ss] /build/path/file.cc:123: ".
    text = " ".join(re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_clock(value: str) -> float | None:
    try:
        hours, minutes, seconds = value.strip().split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _declared_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float | None:
    """How long the file says its video stream is, from headers only (no decoding)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    # Matroska/WebM keep the per-track length in a DURATION tag, not in the stream header.
    for key, value in stream.metadata.items():
        if key.upper().startswith("DURATION"):
            seconds = _parse_clock(value)
            if seconds is not None:
                return seconds
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _read_declared_duration(path: str) -> float | None:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                return None
            return _declared_duration(container, container.streams.video[0])
    except (av.error.FFmpegError, OSError):
        return None


def _info(
    path: str,
    reader: str,
    declared: float | None,
    content_end: float,
    fps: float,
    frame_count: int,
    shape: tuple[int, ...],
) -> VideoInfo:
    if not (fps > 0 and np.isfinite(fps)):
        fps = frame_count / content_end if content_end > 0 else 0.0
    # The declared length wins (a truncated file declares more than it holds, which is how
    # vkr notices); frames running past a too-short declaration still count.
    duration = max(declared or 0.0, content_end)
    return VideoInfo(
        path=path,
        duration=round(duration, 6),
        fps=round(float(fps), 6),
        frame_count=frame_count,
        width=int(shape[1]),
        height=int(shape[0]),
        reader=reader,
    )


class DecordReader:
    """decord 0.6.0: indexes every packet when it opens a file, then seeks by frame index,
    so times are mapped to indices with its own per-frame timestamps.

    decord applies rotation metadata itself (clockwise by the display matrix angle).
    """

    name = "decord"

    def __init__(self, path: str):
        self.path = path
        self._reader: Any = None
        self._starts: np.ndarray = np.empty(0)
        self._ends: np.ndarray = np.empty(0)
        self._info: VideoInfo | None = None

    def _open(self) -> Any:
        if self._reader is not None:
            return self._reader
        import decord

        # vkr reports failures itself; ffmpeg's per-packet complaints are noise on stderr.
        decord.logging.set_level(decord.logging.QUIET)
        try:
            reader = decord.VideoReader(self.path, ctx=decord.cpu(0))
        except AssertionError:  # decord asserts a positive frame count after opening
            raise ReaderError("no frames in the video stream") from None
        except Exception as exc:
            detail = _message(exc)
            if "cannot find video stream" in detail:
                raise ReaderError("no video stream", detail) from None
            raise ReaderError("cannot open as a video", detail) from None
        times = np.asarray(reader.get_frame_timestamp(np.arange(len(reader))), dtype=np.float64)
        self._starts = np.round(times[:, 0], 6)
        self._ends = np.round(times[:, 1], 6)
        self._reader = reader
        return reader

    def _time(self, index: int) -> float:
        return float(self._starts[index])

    def probe(self) -> VideoInfo:
        if self._info is not None:
            return self._info
        reader = self._open()
        try:
            # get_batch, not reader[0]: on some rotated files reader[0] returns a garbled
            # 4-channel array while get_batch raises, and raising lets PyAV take over.
            shape = tuple(reader.get_batch([0]).shape[1:])
        except Exception as exc:
            raise ReaderError("cannot decode frame at 0.0 s", _message(exc)) from None
        content_end = float(max(self._ends.max(), self._starts.max()))
        self._info = _info(
            self.path,
            self.name,
            _read_declared_duration(self.path),
            content_end,
            float(reader.get_avg_fps()),
            len(reader),
            shape,
        )
        return self._info

    def read_at(self, timestamps: list[float]) -> list[tuple[float, np.ndarray]]:
        reader = self._open()
        indices = [frame_index_at(self._starts, t) for t in timestamps]
        wanted = sorted(set(indices))
        if not wanted:
            return []
        try:
            batch = reader.get_batch(wanted).asnumpy()
        except Exception as exc:
            raise ReaderError(self._where(wanted), _message(exc)) from None
        frames = {index: batch[number] for number, index in enumerate(wanted)}
        return [(self._time(index), frames[index]) for index in indices]

    def _where(self, indices: list[int]) -> str:
        duration = self._info.duration if self._info else float(self._ends.max())
        first, last = self._time(indices[0]), self._time(indices[-1])
        if len(indices) == 1:
            return f"cannot decode frame at {first:.1f} s of {duration:.1f} s"
        return f"cannot decode frames between {first:.1f} s and {last:.1f} s of {duration:.1f} s"

    def close(self) -> None:
        self._reader = None


class PyAVReader:
    """PyAV (FFmpeg): indexes packet timestamps and keyframes by demuxing once (no
    decoding), then seeks to the keyframe before each wanted frame, or keeps decoding when
    the next wanted frame is in the same group of pictures."""

    name = "pyav"

    def __init__(self, path: str):
        self.path = path
        self._container: av.container.InputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._frames: Any = None  # the decode generator since the last seek
        self._position: int | None = None  # index of the last frame decoded
        self._last: av.video.frame.VideoFrame | None = None
        self._info: VideoInfo | None = None

    def _open(self) -> None:
        if self._container is not None:
            return
        import av

        try:
            container = av.open(self.path)
        except (av.error.FFmpegError, OSError) as exc:
            raise ReaderError("cannot open as a video", _message(exc)) from None
        if not container.streams.video:
            container.close()
            raise ReaderError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stamps: list[int] = []
        keys: list[bool] = []
        durations: list[int] = []
        try:
            for packet in container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None or packet.size == 0:
                    continue
                stamps.append(stamp)
                keys.append(bool(packet.is_keyframe))
                durations.append(packet.duration or 0)
        except av.error.FFmpegError:
            # Unreadable data past this point: keep what was indexed; the end check of
            # vkr_core.video reports the file as truncated if much is missing.
            pass
        if not stamps:
            container.close()
            raise ReaderError("no frames in the video stream")
        order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
        self._pts = np.asarray(stamps, dtype=np.int64)[order]
        is_key = np.asarray(keys, dtype=bool)[order]
        # Same origin as decord: the stream's start time, so both report the same times.
        start = stream.start_time if stream.start_time is not None else int(self._pts[0])
        base = Fraction(stream.time_base) if stream.time_base is not None else Fraction(1, 1)
        self._starts = np.asarray(
            [round(float((p - start) * base), 6) for p in self._pts], dtype=np.float64
        )
        last_duration = int(np.asarray(durations, dtype=np.int64)[order][-1])
        self._content_end = round(float((int(self._pts[-1]) + last_duration - start) * base), 6)
        self._keys = np.flatnonzero(is_key)
        if len(self._keys) == 0 or self._keys[0] != 0:
            self._keys = np.concatenate([[0], self._keys])
        self._index_of = {int(p): i for i, p in enumerate(self._pts)}
        self._declared = _declared_duration(container, stream)
        self._container, self._stream = container, stream

    def _seek(self, index: int) -> None:
        assert self._container is not None and self._stream is not None
        self._container.seek(int(self._pts[index]), stream=self._stream, backward=True)
        self._frames = self._container.decode(self._stream)
        self._position = None
        self._last = None

    def _key_before(self, index: int) -> int:
        return int(self._keys[np.searchsorted(self._keys, index, side="right") - 1])

    def _frame_at(self, index: int) -> av.video.frame.VideoFrame:
        import av

        if self._position == index and self._last is not None:
            return self._last
        key = self._key_before(index)
        in_reach = self._position is not None and key <= self._position < index
        for attempt in range(2):
            if not in_reach:
                # The second attempt starts from the very beginning: a seek that lands
                # past the wanted frame means the keyframe index cannot be trusted.
                self._seek(key if attempt == 0 else 0)
            in_reach = False
            try:
                frame = self._decode_until(index)
            except av.error.FFmpegError as exc:
                raise ReaderError(self._where(index), _message(exc)) from None
            if frame is not None:
                return frame
        raise ReaderError(self._where(index), "the decoder returned no frame for this time")

    def _decode_until(self, index: int) -> av.video.frame.VideoFrame | None:
        target = int(self._pts[index])
        previous = self._last
        for frame in self._frames:
            if frame.pts is None:
                continue
            position = self._index_of.get(int(frame.pts))
            if frame.pts < target:
                previous = frame
                self._position, self._last = position, frame
                continue
            self._position, self._last = position, frame
            if frame.pts == target:
                return frame
            # The wanted frame never came out of the decoder: the one before it was on
            # screen at that time, unless the seek already landed past it.
            return previous
        return previous  # end of stream: the last frame stays on screen

    def _where(self, index: int) -> str:
        duration = self._info.duration if self._info else self._content_end
        return f"cannot decode frame at {self._starts[index]:.1f} s of {duration:.1f} s"

    @staticmethod
    def _rgb(frame: av.video.frame.VideoFrame) -> np.ndarray:
        array = frame.to_ndarray(format="rgb24")
        # PyAV reports the display matrix angle counter-clockwise; np.rot90 turns the same
        # way, which gives what decord returns.
        turns = round((frame.rotation or 0) / 90) % 4
        return np.ascontiguousarray(np.rot90(array, turns)) if turns else array

    def probe(self) -> VideoInfo:
        if self._info is not None:
            return self._info
        self._open()
        assert self._stream is not None
        first = self._rgb(self._frame_at(0))
        rate = self._stream.average_rate or self._stream.guessed_rate
        self._info = _info(
            self.path,
            self.name,
            self._declared,
            self._content_end,
            float(rate) if rate else 0.0,
            len(self._pts),
            first.shape,
        )
        return self._info

    def read_at(self, timestamps: list[float]) -> list[tuple[float, np.ndarray]]:
        self._open()
        indices = [frame_index_at(self._starts, t) for t in timestamps]
        frames: dict[int, np.ndarray] = {}
        for index in sorted(set(indices)):
            frames[index] = self._rgb(self._frame_at(index))
        return [(float(self._starts[index]), frames[index]) for index in indices]

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._stream, self._frames, self._last = None, None, None, None
        self._position = None
