"""Frame sampling: timestamps, decoding through the frame-reader hook, JPEG frames on disk.

Readers are plugins (hook ``vkr_frame_reader``): decord first, PyAV where decord fails.
Frames are chosen by presentation timestamp, never by frame index, so variable-frame-rate
files are sampled at the right moments. ``sample_frames`` decodes in a separate, killable
process by default because decord can abort the whole process or hang on corrupt files.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import hashlib
import importlib
import importlib.machinery
import inspect
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from vkr_core.files import atomic_write
from vkr_core.schemas import Frame, InputError, VideoInfo, VkrError

if TYPE_CHECKING:
    # Imported where frames are decoded, resized or encoded (the decoder processes, or
    # read_frames), never at import: every command reaches this module, few decode.
    import numpy as np
    import pluggy
    from PIL import Image

# Two readers must pick the same frame for the same time although decord reports times as
# float32 (about 0.1 ms off after half an hour): treat a frame starting up to 1 ms after the
# requested time as shown at that time.
TIMESTAMP_TOLERANCE = 1e-3

# Frames decoded per reader call: bounds memory (64 decoded 1080p frames are 400 MB) while
# keeping decord's batch reads and our JPEG encoding in step.
_CHUNK = 16

_MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1


class VideoDecodeError(InputError):
    """A video file that cannot be decoded; the message names the file and what failed.

    ``failures`` lists ``(reader, summary, detail)`` for every reader that was tried.
    """

    def __init__(self, message: str, failures: Sequence[tuple[str, str, str]] = ()):
        super().__init__(message)
        self.failures = list(failures)


class ReaderError(VkrError):
    """Raised by a FrameReader that cannot read a file; vkr then tries the next reader.

    ``summary`` says what failed in words shared by all readers (so messages from several
    readers can be merged), ``detail`` is the library's own message.
    """

    def __init__(self, summary: str, detail: str = ""):
        super().__init__(f"{summary}: {detail}" if detail else summary)
        self.summary = summary
        self.detail = detail


@runtime_checkable
class FrameReader(Protocol):
    """What a ``vkr_frame_reader`` hook returns. It may also define ``close()``."""

    name: str

    def probe(self) -> VideoInfo:
        """Duration (as the file declares it), fps, frame count and display size."""
        ...

    def read_at(self, timestamps: list[float]) -> list[tuple[float, np.ndarray]]:
        """For each time, the frame shown then (RGB uint8 HxWx3, display orientation) with
        its own presentation timestamp in seconds from the start of the video stream."""
        ...


def frame_index_at(starts: np.ndarray, timestamp: float) -> int:
    """Index of the frame shown at ``timestamp`` given sorted frame start times."""
    import numpy as np

    index = int(np.searchsorted(starts, timestamp + TIMESTAMP_TOLERANCE, side="right")) - 1
    return min(max(index, 0), len(starts) - 1)


# ---------------------------------------------------------------- timestamps and frames


def sample_timestamps(duration: float, fps: float = 0.2, max_frames: int = 64) -> list[float]:
    """Times 0, 1/fps, 2/fps ... strictly below ``duration``; at least one; at most
    ``max_frames``, spread evenly over the video when the rate would give more."""
    if not math.isfinite(duration) or duration <= 0:
        raise InputError(f"video duration must be a positive number of seconds, got {duration!r}")
    if not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number, got {fps!r}")
    if max_frames < 1:
        raise InputError(f"max_frames must be at least 1, got {max_frames!r}")
    # The small margin keeps float noise (10.000000001 * 1.0) from adding a frame at the end.
    count = max(1, math.ceil(duration * fps - 1e-9))
    if count <= max_frames:
        return [round(i / fps, 6) for i in range(count)]
    step = duration / max_frames
    return [round(i * step, 6) for i in range(max_frames)]


def random_frames(frames: Sequence[Frame], k: int, key: str) -> list[Frame]:
    """``k`` frames chosen at random (all if fewer), reproducible from ``key``, in time order."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k >= len(frames):
        chosen = list(frames)
    else:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")
        rng = random.Random(seed)
        chosen = [frames[i] for i in rng.sample(range(len(frames)), k)]
    return sorted(chosen, key=lambda frame: (frame.timestamp, frame.index))


class DataURL(str):
    """A frame's ``data:image/jpeg;base64,...`` URL, made by vkr from the frame's bytes:
    base64 only, so JSON needs no escape in it and a request body may splice it in as is
    instead of passing it through the encoder (plugins/providers/litellm_provider.py)."""

    __slots__ = ()


class FrameImages:
    """JPEG bytes and base64 of frames, loaded and encoded once per content hash.

    The file's hash is checked on first load, so a model never sees bytes other than the
    ones its cache key (the sha256) stands for.
    """

    _PREFIX = "data:image/jpeg;base64,"

    def __init__(self, max_entries: int = 1024):
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def _entry(self, sha256: str, path: str) -> tuple[bytes, str]:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None:
                self._entries.move_to_end(sha256)
                return entry
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise InputError(f"{path}: frame image is missing") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise InputError(
                f"{path}: frame image changed since it was sampled "
                f"(sha256 {digest[:12]}..., expected {sha256[:12]}...)"
            )
        # Keep the data URL itself: building it per call would copy megabytes each time.
        entry = (data, DataURL(self._PREFIX + base64.b64encode(data).decode("ascii")))
        with self._lock:
            self._entries[sha256] = entry
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return entry

    def jpeg(self, frame: Frame) -> bytes:
        """The frame's JPEG bytes."""
        return self._entry(frame.sha256, frame.path)[0]

    def base64(self, frame: Frame) -> str:
        """The frame's JPEG bytes, base64-encoded."""
        return self._entry(frame.sha256, frame.path)[1][len(self._PREFIX) :]

    def data_url(self, frame: Frame) -> str:
        """``data:image/jpeg;base64,...`` for an image part of a chat message."""
        return self._entry(frame.sha256, frame.path)[1]

    def data_url_for(self, sha256: str, path: str) -> str:
        """The data URL of a frame known only by its hash and file (a message part)."""
        return self._entry(sha256, path)[1]

    def expand(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages with frame parts replaced by image parts, as providers take them."""
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = [
                    {
                        "type": "image_url",
                        "image_url": {"url": self.data_url_for(p["sha256"], p["path"])},
                    }
                    if p.get("type") == "frame"
                    else p
                    for p in content
                ]
            out.append({"role": message["role"], "content": content})
        return out


# ---------------------------------------------------------------- frames for a run


class FrameSource:
    """A run's decoded frames, by key (the video id).

    Decoding runs on threads of its own, each waiting on a decoder process: never on the
    event loop's default executor, where it queued behind network work. ``prefetch``
    starts a video's decoding ahead of its turn; ``get`` waits for it (or starts it) and
    raises its failure there, where the run records it, so a file is never decoded twice.
    The last ``keep`` videos' frame lists stay in memory (a few KB each).
    """

    def __init__(self, workers: int, keep: int = 512, thread_name: str = "vkr-decode"):
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=thread_name
        )
        self._keep = keep
        self._cache: OrderedDict[str, list[Frame]] = OrderedDict()
        self._decoding: dict[str, asyncio.Future[list[Frame]]] = {}

    def _started(self, key: str, decode: Callable[[], list[Frame]]) -> asyncio.Future[list[Frame]]:
        pending = self._decoding.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._decoding[key] = asyncio.ensure_future(
                loop.run_in_executor(self._executor, decode)
            )
            # A video decoded ahead but never processed (the run stopped first) must not
            # leave "exception was never retrieved" behind: get() is where a failure counts.
            pending.add_done_callback(lambda done: done.cancelled() or done.exception())
        return pending

    async def get(self, key: str, decode: Callable[[], list[Frame]]) -> list[Frame]:
        """The frames of ``key``: kept, being decoded, or decoded now by ``decode()``."""
        frames = self._cache.get(key)
        if frames is not None:
            self._cache.move_to_end(key)
            return frames
        pending = self._started(key, decode)
        try:
            frames = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._decoding.pop(key, None)
        if self._keep:
            self._cache[key] = frames
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return frames

    async def prefetch(self, key: str, decode: Callable[[], list[Frame]]) -> None:
        """Start decoding ``key`` and wait for it to end, successfully or not."""
        if key not in self._cache:
            await asyncio.wait([self._started(key, decode)])

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def close(self) -> None:
        for pending in self._decoding.values():
            pending.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- finding a reader


@dataclass(frozen=True)
class _ReaderFactory:
    """One ``vkr_frame_reader`` implementation, callable outside pluggy's firstresult loop."""

    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]

    def __call__(self, path: str, exclude: tuple[str, ...]) -> Any:
        given = {"path": path, "exclude": exclude}
        return self.function(**{name: given[name] for name in self.argnames})


def _reader_factories(pm: pluggy.PluginManager) -> list[_ReaderFactory]:
    # Called one by one (in pluggy's call order: tryfirst first, later registrations first)
    # so that a plugin whose hook raises is skipped instead of ending the fallback chain.
    impls = [
        impl
        for impl in reversed(pm.hook.vkr_frame_reader.get_hookimpls())
        if not (impl.hookwrapper or impl.wrapper)
    ]
    return [_ReaderFactory(impl.plugin_name, impl.function, tuple(impl.argnames)) for impl in impls]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join((str(exc) or type(exc).__name__).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _reader_call() -> Iterator[None]:
    """Turn anything a reader raises into a ReaderError, so the next reader is tried."""
    try:
        yield
    except ReaderError:
        raise
    except Exception as exc:
        raise ReaderError("cannot read video", f"{type(exc).__name__}: {_one_line(exc)}") from exc


def _decode_error(path: Path | str, failures: Sequence[tuple[str, str, str]]) -> VideoDecodeError:
    if not failures:
        return VideoDecodeError(
            f"{path}: no frame reader is available (no loaded plugin implements "
            "vkr_frame_reader: `vkr plugins` lists what is loaded)"
        )
    summaries = {summary for _, summary, _ in failures}
    if len(summaries) == 1:
        details = [f"{name}: {detail}" if detail else name for name, _, detail in failures]
        message = f"{path}: {summaries.pop()} ({'; '.join(details)})"
    else:
        parts = [
            f"{name}: {summary}" + (f": {detail}" if detail else "")
            for name, summary, detail in failures
        ]
        message = f"{path}: cannot read video ({'; '.join(parts)})"
    return VideoDecodeError(message, failures)


T = TypeVar("T")


def _with_fallback(
    path: Path,
    factories: Sequence[_ReaderFactory],
    attempt: Callable[[FrameReader], T],
    exclude: Sequence[str] = (),
    on_reader: Callable[[str], None] | None = None,
    on_failure: Callable[[tuple[str, str, str], bool], None] | None = None,
) -> T:
    """Run ``attempt`` with the first reader offered; on a ReaderError ask again with that
    reader excluded, until one succeeds or none is left.

    ``on_reader`` hears each reader's name before it starts; ``on_failure`` hears each
    failure and whether it was a reader's (True) or a plugin's hook (False).
    """
    failures: list[tuple[str, str, str]] = []
    excluded = list(exclude)
    skipped: set[int] = set()

    def fail(entry: tuple[str, str, str], is_reader: bool) -> None:
        failures.append(entry)
        if on_failure is not None:
            on_failure(entry, is_reader)

    for _ in range(64):  # a plugin that ignores ``exclude`` must not loop forever
        reader = None
        for number, factory in enumerate(factories):
            if number in skipped:
                continue
            try:
                candidate = factory(str(path), tuple(excluded))
            except Exception as exc:
                skipped.add(number)
                detail = f"{type(exc).__name__}: {_one_line(exc)}"
                fail((factory.plugin, "reader plugin failed", detail), False)
                continue
            if candidate is None:
                continue
            name = getattr(candidate, "name", None)
            if not isinstance(candidate, FrameReader) or not isinstance(name, str):
                skipped.add(number)
                what = f"returned {type(candidate).__name__}, not a FrameReader"
                fail((factory.plugin, "reader plugin failed", what), False)
                continue
            if name in excluded:
                skipped.add(number)
                continue
            reader = candidate
            break
        if reader is None:
            break
        if on_reader is not None:
            on_reader(reader.name)
        try:
            return attempt(reader)
        except ReaderError as exc:
            excluded.append(reader.name)
            fail((reader.name, exc.summary, exc.detail), True)
        finally:
            close = getattr(reader, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # closing a failed reader must not hide why it failed
                    pass
    raise _decode_error(path, failures)


def _existing_file(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if not file.exists():
        raise VideoDecodeError(f"{file}: no such file")
    if file.is_dir():
        raise VideoDecodeError(f"{file}: is a directory, not a video file")
    if file.stat().st_size == 0:
        raise VideoDecodeError(f"{file}: empty file (0 bytes), not a video")
    return file


def _checked_frames(
    got: Any, asked: Sequence[float], reader: FrameReader
) -> list[tuple[float, np.ndarray]]:
    import numpy as np

    if not isinstance(got, list) or len(got) != len(asked):
        raise ReaderError(
            "reader returned the wrong number of frames",
            f"{reader.name} gave {len(got) if isinstance(got, list) else type(got).__name__} "
            f"for {len(asked)} timestamps",
        )
    for _, array in got:
        if (
            not isinstance(array, np.ndarray)
            or array.dtype != np.uint8
            or array.ndim != 3
            or array.shape[2] != 3
        ):
            shape = getattr(array, "shape", None)
            raise ReaderError(
                "reader returned a frame that is not RGB uint8 HxWx3",
                f"{reader.name} gave {getattr(array, 'dtype', type(array).__name__)} {shape}",
            )
    return [(float(actual), array) for actual, array in got]


def _read(reader: FrameReader, timestamps: Sequence[float]) -> list[tuple[float, np.ndarray]]:
    with _reader_call():
        got = reader.read_at(list(timestamps))
    return _checked_frames(got, timestamps, reader)


def _probe(reader: FrameReader) -> VideoInfo:
    with _reader_call():
        info = reader.probe()
    if info.frame_count < 1 or info.duration <= 0:
        raise ReaderError("no frames in the video stream")
    return info


def _verify_end(reader: FrameReader, info: VideoInfo) -> None:
    """Decode the last frame: a corrupt or truncated file fails here, before any work.

    Sampling at 0.2 fps would otherwise skip the broken part and return a partial result
    that looks fine. Corruption between sampled frames still goes unnoticed; finding it
    would take decoding every frame.
    """
    tail = max(0.0, info.duration - TIMESTAMP_TOLERANCE)
    [(actual, _)] = _read(reader, [tail])
    interval = 1.0 / info.fps if info.fps > 0 else 0.0
    end = actual + interval
    if info.duration - end > max(1.0, 0.02 * info.duration):
        raise ReaderError(
            f"truncated: frames stop at {end:.1f} s of the {info.duration:.1f} s the file declares"
        )


def _check_times(path: Path, timestamps: Sequence[float], info: VideoInfo) -> None:
    for t in timestamps:
        if not math.isfinite(t) or t < 0:
            raise InputError(f"{path}: timestamp {t!r} is not a time in the video")
        if t > info.duration:
            raise InputError(
                f"{path}: timestamp {t:.3f} s is past the end of the video ({info.duration:.3f} s)"
            )


def _fit(image: Image.Image, max_side: int | None) -> Image.Image:
    from PIL import Image

    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap first shrinks by an integer factor (cheap), then resamples the rest.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def probe_video(path: str | os.PathLike[str], *, pm: pluggy.PluginManager) -> VideoInfo:
    """Duration, fps, frame count, display size and the reader of ``pm`` that answered.

    Reads headers and the packet index and decodes the first frame only: a truncated or
    corrupt file may probe fine; ``read_frames`` and ``sample_frames`` check the end.
    """
    file = _existing_file(path)
    factories = _reader_factories(pm)
    return _with_fallback(file, factories, _probe)


def read_frames(
    path: str | os.PathLike[str],
    timestamps: Sequence[float],
    *,
    pm: pluggy.PluginManager,
    max_side: int | None = None,
) -> list[tuple[float, np.ndarray]]:
    """The frame shown at each time (RGB uint8 HxWx3) with its actual timestamp, decoded in
    this process by ``pm``'s readers; a reader that fails hands over to the next one."""
    file = _existing_file(path)
    times = [float(t) for t in timestamps]
    factories = _reader_factories(pm)

    def attempt(reader: FrameReader) -> list[tuple[float, np.ndarray]]:
        info = _probe(reader)
        _check_times(file, times, info)
        _verify_end(reader, info)
        frames: list[tuple[float, np.ndarray]] = []
        for start in range(0, len(times), _CHUNK):
            frames.extend(_read(reader, times[start : start + _CHUNK]))
        return frames

    frames = _with_fallback(file, factories, attempt)
    if max_side is None:
        return frames
    import numpy as np
    from PIL import Image

    return [(t, np.asarray(_fit(Image.fromarray(a), max_side))) for t, a in frames]


# ---------------------------------------------------------------- sample_frames


@dataclass(frozen=True)
class _Settings:
    fps: float
    max_frames: int
    max_side: int
    jpeg_quality: int


def _frame_name(index: int, timestamp: float) -> str:
    return f"frame_{index:04d}_{round(timestamp * 1000):09d}ms.jpg"


def _sample_with(reader: FrameReader, out_dir: Path, settings: _Settings) -> list[Frame]:
    from PIL import Image

    info = _probe(reader)
    times = sample_timestamps(info.duration, settings.fps, settings.max_frames)
    _verify_end(reader, info)
    frames: list[Frame] = []
    seen: set[float] = set()
    for start in range(0, len(times), _CHUNK):
        for actual, array in _read(reader, times[start : start + _CHUNK]):
            # A rate above the video's own frame rate maps several times to one frame:
            # the same picture twice is only wasted tokens.
            if round(actual, 6) in seen:
                continue
            seen.add(round(actual, 6))
            image = _fit(Image.fromarray(array), settings.max_side)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=settings.jpeg_quality)
            data = buffer.getvalue()
            index = len(frames)
            target = out_dir / _frame_name(index, actual)
            target.write_bytes(data)
            frames.append(
                Frame(
                    index=index,
                    timestamp=round(actual, 6),
                    sha256=hashlib.sha256(data).hexdigest(),
                    path=str(target),
                    width=image.width,
                    height=image.height,
                )
            )
    return frames


def _video_identity(file: Path) -> dict[str, Any]:
    stat = file.stat()
    return {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _load_manifest(out_dir: Path, params: dict[str, Any]) -> list[Frame] | None:
    try:
        manifest = json.loads((out_dir / _MANIFEST).read_text())
        if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("params") != params:
            return None
        frames = [
            Frame(**{**entry, "path": str(out_dir / entry["path"])}) for entry in manifest["frames"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not frames or not all(Path(frame.path).is_file() for frame in frames):
        return None
    return frames


def _write_manifest(out_dir: Path, params: dict[str, Any], frames: list[Frame]) -> None:
    # Names are stored relative to out_dir so a moved run directory stays valid.
    entries = [{**frame.model_dump(), "path": Path(frame.path).name} for frame in frames]
    text = json.dumps({"format": _MANIFEST_FORMAT, "params": params, "frames": entries}, indent=1)
    atomic_write(out_dir / _MANIFEST, text)


def sample_frames(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fps: float = 0.2,
    max_frames: int = 64,
    max_side: int = 768,
    jpeg_quality: int = 85,
    timeout: float = 120.0,
    isolate: bool = True,
    *,
    pm: pluggy.PluginManager,
) -> list[Frame]:
    """Sample frames at ``fps`` (at most ``max_frames``), scale the longer side to at most
    ``max_side``, write each once as JPEG into ``out_dir`` and return them.

    ``pm`` is the plugin manager whose frame readers decode: a run's own, so it decodes
    with the plugins it routes with (there is no process-wide default).

    A second call with the same video and parameters returns the manifest written by the
    first without decoding. With ``isolate`` the decoding runs in a separate process that
    is killed after ``timeout`` seconds per reader attempt; a reader that crashes or hangs
    there hands over to the next reader.
    """
    file = _existing_file(path)
    if not 1 <= jpeg_quality <= 100:
        raise InputError(f"jpeg_quality must be between 1 and 100, got {jpeg_quality!r}")
    if max_side < 1:
        raise InputError(f"max_side must be at least 1 pixel, got {max_side!r}")
    if not timeout > 0:
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    sample_timestamps(1.0, fps, max_frames)  # validates fps and max_frames before any work
    settings = _Settings(float(fps), int(max_frames), int(max_side), int(jpeg_quality))
    target = Path(out_dir).absolute()
    params = {"video": _video_identity(file), **asdict(settings)}
    done = _load_manifest(target, params)
    if done is not None:
        return done
    target.mkdir(parents=True, exist_ok=True)
    # A stale manifest must never describe frames that are being rewritten.
    (target / _MANIFEST).unlink(missing_ok=True)
    factories = _reader_factories(pm)
    if isolate:
        frames = _sample_isolated(file, target, settings, factories, timeout)
    else:
        frames = _with_fallback(file, factories, lambda r: _sample_with(r, target, settings))
    _remove_stale_frames(target, frames)
    _write_manifest(target, params, frames)
    return frames


def _remove_stale_frames(out_dir: Path, frames: list[Frame]) -> None:
    # Left by earlier parameters or by a reader that failed half-way; only our own names.
    keep = {Path(frame.path).name for frame in frames}
    for stale in out_dir.glob("frame_*_*ms.jpg"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------- the isolated decoder


def _factory_spec(factory: _ReaderFactory) -> tuple[str, str, str, str, str]:
    """How the decoder process re-creates a reader factory: (plugin, kind, module, qualname,
    attribute). Module functions, classes and instances of module-level classes (built
    again with no arguments) can be re-created."""
    function = factory.function
    owner = getattr(function, "__self__", None)
    if owner is None:
        kind, module_name, qualname, attribute = (
            "function",
            function.__module__,
            function.__qualname__,
            "",
        )
    else:
        cls = owner if isinstance(owner, type) else type(owner)
        kind = "class" if isinstance(owner, type) else "instance"
        module_name, qualname, attribute = cls.__module__, cls.__qualname__, function.__name__
    if "<locals>" in qualname:
        raise VkrError(
            f"reader plugin {factory.plugin!r} ({qualname}) is defined inside a function, so "
            "the isolated decoder process cannot import it: define it at module level or "
            "pass isolate=False"
        )
    return (factory.plugin, kind, module_name, qualname, attribute)


def _factory_from_spec(spec: Sequence[str]) -> _ReaderFactory:
    plugin, kind, module_name, qualname, attribute = spec
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    if kind == "instance":
        found = found()
    function = getattr(found, attribute) if attribute else found
    argnames = tuple(name for name in inspect.signature(function).parameters)
    return _ReaderFactory(plugin, function, argnames)


def _decode_job(
    conn: Any,
    path: str,
    out_dir: str,
    settings: _Settings,
    specs: list[tuple[str, str, str, str, str]],
    exclude: tuple[str, ...],
) -> None:
    """One video in the decoder process: reports each reader it starts, then the result."""
    try:
        factories = [_factory_from_spec(spec) for spec in specs]
        frames = _with_fallback(
            Path(path),
            factories,
            lambda r: _sample_with(r, Path(out_dir), settings),
            exclude=exclude,
            on_reader=lambda name: conn.send(("reader", name)),
            on_failure=lambda entry, is_reader: conn.send(("failure", (entry, is_reader))),
        )
        conn.send(("ok", [frame.model_dump() for frame in frames]))
    except VideoDecodeError:
        conn.send(("failed", None))
    except BaseException as exc:  # anything else goes back to the caller as it was raised
        try:
            pickle.loads(pickle.dumps(exc))  # the caller must be able to rebuild it
        except Exception:
            exc = VkrError(f"{type(exc).__name__}: {_one_line(exc)}")
        conn.send(("raise", exc))


# Decoding yields to the process that waits for it: a run's event loop keeps the model
# slots busy while the decoders use what CPU is left (they take all of it when it idles).
DECODER_NICENESS = 10


def _decoder_loop(conn: Any) -> None:
    """Entry point of a decoder process: decodes one video after another until its pipe
    closes. A worker that crashes, hangs or raises is killed by the caller, never reused."""
    try:
        os.nice(DECODER_NICENESS)
    except (AttributeError, OSError):  # not on this platform, or not allowed
        pass
    # Ctrl-C in a terminal reaches the whole process group: the caller decides what stops
    # (and kills a busy worker); an idle one must not die with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        _decode_job(conn, *job)


class _DecoderWorker:
    """A decoder process and the parent's end of its pipe."""

    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_decoder_loop, args=(child,), name="vkr-decoder", daemon=True
        )
        self.process.start()
        child.close()  # so the parent sees end-of-file when the worker dies
        self.jobs = 0

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        self.conn.close()  # an idle worker reads end-of-file and returns
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class _DecoderPool:
    """Decoder processes kept between videos: starting one (a fork of the forkserver, then
    multiprocessing's preparation) cost more than decoding a short clip. A worker goes back
    to the pool only after a clean result; one that crashed, timed out or raised is killed.
    Workers are replaced after ``MAX_JOBS`` videos, so a leaking reader cannot grow one."""

    MAX_IDLE = 8
    MAX_JOBS = 200

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_DecoderWorker] = []
        self._pid = os.getpid()

    def take(self, context: Any) -> _DecoderWorker:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's workers are not ours
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                worker = self._idle.pop()
                if worker.process.is_alive():
                    return worker
                worker.stop(kill=True)
        return _DecoderWorker(context)

    def give_back(self, worker: _DecoderWorker) -> None:
        worker.jobs += 1
        with self._lock:
            keep = (
                worker.jobs < self.MAX_JOBS
                and len(self._idle) < self.MAX_IDLE
                and self._pid == os.getpid()
            )
            if keep:
                self._idle.append(worker)
        if not keep:
            worker.stop(kill=False)

    def close(self) -> None:
        """Stop the idle workers (also done by multiprocessing at exit: they are daemons)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop(kill=False)


_DECODERS = _DecoderPool()


def stop_decoders() -> None:
    """Stop the isolated decoder processes kept between videos (multiprocessing stops them
    when the process exits; a long-lived program may want them gone sooner)."""
    _DECODERS.close()


# Modules every decoder worker needs, with the reader plugins' own modules. A forkserver
# imports them once; each worker is then a fork of it (milliseconds) instead of a fresh
# interpreter importing them (~0.6 CPU s).
_DECODER_PRELOAD = ["numpy", "PIL.Image", "av", "decord", "vkr_core.video"]


def _imported_from_here(name: str) -> bool:
    """Whether the top-level package of ``name`` in the current directory, if there is one,
    is the very one this process imported."""
    top = name.partition(".")[0]
    ours = getattr(sys.modules.get(top), "__file__", None)
    try:
        local = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
        if local is None:
            return True
        return bool(local.origin and ours) and os.path.samefile(str(local.origin), str(ours))
    except (ImportError, OSError, ValueError):
        return False


def _preloadable(modules: Sequence[str]) -> list[str]:
    """The modules a forkserver started now would import from where this process did.

    Python 3.11's forkserver ignores our sys.path and searches the current directory first,
    so a project's own ``plugins/`` folder would stand in for vkr's ``plugins`` in every
    worker (a reader plugin's module "not found"). Such modules are not preloaded: each worker
    imports them itself, after multiprocessing has given it this process's sys.path.
    """
    return [name for name in dict.fromkeys(modules) if _imported_from_here(name)]


@functools.cache
def _decoder_context() -> Any:
    """Forkserver where the platform has one (a crashed worker never harms the server), else
    spawn. Never plain fork: the parent runs threads and an event loop."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def _sample_isolated(
    file: Path,
    out_dir: Path,
    settings: _Settings,
    factories: Sequence[_ReaderFactory],
    timeout: float,
) -> list[Frame]:
    specs = [_factory_spec(factory) for factory in factories]
    context = _decoder_context()
    if context.get_start_method() == "forkserver":
        # Read when the forkserver starts (the first worker), from the directory of that moment.
        # "__main__" is multiprocessing's own default: the forkserver imports the main script
        # once, where each worker would otherwise run it again (for `vkr`, all of the CLI).
        readers = [spec[2] for spec in specs]
        context.set_forkserver_preload(["__main__", *_preloadable([*_DECODER_PRELOAD, *readers])])
    failures: list[tuple[str, str, str]] = []
    exclude: list[str] = []
    while True:
        job = (str(file), str(out_dir), settings, specs, tuple(exclude))
        worker = _DECODERS.take(context)
        try:
            worker.conn.send(job)
        except OSError:  # it died while idle: another worker, nothing against this video
            worker.stop(kill=True)
            worker = _DecoderWorker(context)
            worker.conn.send(job)
        process = worker.process
        current: str | None = None
        kind, payload = "interrupted", None
        try:
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not worker.conn.poll(remaining):
                    kind = "timeout"
                    break
                try:
                    message_kind, message = worker.conn.recv()
                except EOFError:
                    kind = "crash"
                    break
                if message_kind == "reader":
                    current = message
                elif message_kind == "failure":
                    entry, is_reader = message
                    if entry not in failures:  # a restarted worker repeats plugin failures
                        failures.append(entry)
                    if is_reader:
                        exclude.append(entry[0])
                        current = None
                else:
                    kind, payload = message_kind, message
                    break
        finally:
            if kind in ("ok", "failed"):
                _DECODERS.give_back(worker)
            else:  # hung, crashed, raised or interrupted: never reused
                worker.stop(kill=kind != "crash")
        if kind == "ok":
            return [Frame(**entry) for entry in payload or []]
        if kind == "failed":
            raise _decode_error(file, failures)
        if kind == "raise":
            raise payload if isinstance(payload, BaseException) else VkrError(str(payload))
        if kind == "timeout":
            what = f"decoder timed out after {timeout:g} s"
        elif process.exitcode is not None and process.exitcode < 0:
            what = f"decoder crashed (signal {-process.exitcode})"
        else:
            what = f"decoder exited unexpectedly (status {process.exitcode})"
        failures.append((current or "decoder process", what, ""))
        if current is None:
            raise _decode_error(file, failures)
        exclude.append(current)


__all__ = [
    "DataURL",
    "FrameImages",
    "FrameSource",
    "FrameReader",
    "ReaderError",
    "TIMESTAMP_TOLERANCE",
    "VideoDecodeError",
    "frame_index_at",
    "probe_video",
    "random_frames",
    "read_frames",
    "sample_frames",
    "sample_timestamps",
    "stop_decoders",
]
