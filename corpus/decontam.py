"""Decontamination: drop training videos that are, or nearly copy, a benchmark video.

Two checks, as in the VideoKR paper (pipeline stage 13):

1. Benchmark ids: a training video whose YouTube id is in a benchmark's id list goes.
2. Near-duplicates: every video is hashed at 1 frame per second (pHash, see
   :mod:`corpus.phash`). For each benchmark video, a faiss binary index over all training
   frames gives each benchmark frame its nearest training frames; each neighbour votes for a
   (training video, time offset). Every 20-second benchmark window (1-second stride) takes
   its ten best-voted (video, offset) candidates, and each is verified against the stored
   hashes: the share of aligned frames within the Hamming distance. A training video goes
   when its best window reaches the share threshold.

The paper's thresholds (distance 30 of 64 bits, share 0.7) are kept as the ``paper``
preset, but they match unrelated frames by chance (two random 64-bit hashes are within
distance 30 about 35 % of the time), so the ``default`` preset uses thresholds measured
with :func:`calibrate`. See docs/DECONTAMINATION.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import time
import urllib.parse
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from corpus import phash
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_path, atomic_write, read_jsonl
from vkr_core.schemas import InputError, Strict, VkrError, check_video_id
from vkr_core.sources import VIDEO_EXTENSIONS

if TYPE_CHECKING:
    import pluggy

HASH_FPS = 1.0
# Frames are decoded with the longer side scaled to this many pixels before hashing: pHash
# looks at a 32x32 image, so 64 pixels keep all it uses, and small frames keep the hashing
# cheap (the vectorised hash is memory bound; see docs/BENCHMARKS.md).
FRAME_SIDE = 64
# Bumped whenever the hash definition or the cache layout changes.
CACHE_FORMAT = 1

_YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
_YOUTUBE_HOSTS = {"youtube.com", "youtube-nocookie.com", "youtu.be"}
_YOUTUBE_PATH_KINDS = {"shorts", "embed", "v", "live", "e"}


# ---------------------------------------------------------------- parameters


class DecontamParams(Strict):
    """The near-duplicate rule and how candidates are found."""

    hash_bits: Literal[64, 256] = 64
    # A frame pair matches when its Hamming distance is at most this.
    distance: int = Field(ge=0)
    # A window is a copy when at least this share of its aligned frames match.
    share: float = Field(gt=0.0, le=1.0)
    window_s: int = Field(default=20, ge=1)
    # Candidate (training video, offset) pairs verified per benchmark window.
    top_windows: int = Field(default=10, ge=1)
    # Nearest training frames asked from the index per benchmark frame.
    neighbours: int = Field(default=16, ge=1)
    # Frames whose low-pass image is flatter than this (grey-level standard deviation) carry
    # no information (black, white, fades): they neither vote nor count in a window.
    min_detail: float = Field(default=2.0, ge=0.0)
    # A window with fewer informative aligned frames than this is not judged.
    min_frames: int = Field(default=5, ge=1)
    # faiss index for candidates: "auto" picks by index size and rule (see FrameIndex).
    index: Literal["auto", "multihash", "flat"] = "auto"

    @model_validator(mode="after")
    def _distance_fits(self) -> DecontamParams:
        if self.distance > self.hash_bits:
            raise ValueError(
                f"distance {self.distance} is larger than the hash ({self.hash_bits} bits)"
            )
        return self


PRESETS: dict[str, DecontamParams] = {
    # The paper's rule taken literally: flags unrelated videos (see module docstring).
    "paper": DecontamParams(hash_bits=64, distance=30, share=0.7),
    # Measured with `vkr decontam calibrate`; see docs/DECONTAMINATION.md.
    "default": DecontamParams(hash_bits=64, distance=12, share=0.6),
}


def resolve_params(
    preset: str = "default",
    hash_bits: int | None = None,
    distance: int | None = None,
    share: float | None = None,
) -> DecontamParams:
    """A preset with the given overrides; a new hash size needs a distance of its own."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
    base = PRESETS[preset]
    if hash_bits is not None and hash_bits != base.hash_bits and distance is None:
        raise InputError(
            f"--hash-bits {hash_bits} changes the hash size of preset {preset!r} "
            f"({base.hash_bits} bits): give --distance too (`vkr decontam calibrate` measures one)"
        )
    updates: dict[str, Any] = {}
    if hash_bits is not None:
        updates["hash_bits"] = hash_bits
    if distance is not None:
        updates["distance"] = distance
    if share is not None:
        updates["share"] = share
    try:
        return DecontamParams.model_validate({**base.model_dump(), **updates})
    except ValidationError as exc:
        raise InputError(
            f"bad decontamination parameters: {describe_validation_error(exc)}"
        ) from None


# ---------------------------------------------------------------- benchmark id lists


class IdListProblem(Strict):
    """A line of a benchmark id list that holds no YouTube id; it is skipped."""

    file: str
    line: int
    text: str
    reason: str


class BenchmarkIds(Strict):
    """YouTube ids from benchmark id lists, each with where it was listed first."""

    ids: dict[str, str] = Field(default_factory=dict)
    problems: list[IdListProblem] = Field(default_factory=list)


def extract_youtube_id(text: str) -> str | None:
    """The 11-character YouTube id in a bare id or a YouTube URL, else None."""
    text = text.strip()
    if _YOUTUBE_ID.fullmatch(text):
        return text
    if "://" not in text and re.match(r"^(www\.|m\.|music\.)?(youtube\.com|youtu\.be)/", text):
        text = "https://" + text
    try:
        url = urllib.parse.urlsplit(text)
    except ValueError:
        return None
    host = (url.hostname or "").lower()
    for prefix in ("www.", "m.", "music."):
        host = host.removeprefix(prefix)
    if host not in _YOUTUBE_HOSTS:
        return None
    parts = [part for part in url.path.split("/") if part]
    candidate: str | None = None
    if host == "youtu.be":
        candidate = parts[0] if parts else None
    elif parts[:1] == ["watch"]:
        candidate = urllib.parse.parse_qs(url.query).get("v", [None])[0]
    elif len(parts) >= 2 and parts[0] in _YOUTUBE_PATH_KINDS:
        candidate = parts[1]
    if candidate is not None and _YOUTUBE_ID.fullmatch(candidate):
        return candidate
    return None


def read_benchmark_ids(paths: Iterable[str | os.PathLike[str]]) -> BenchmarkIds:
    """Read id lists: one id or YouTube URL per line; blank lines and '#' comments skipped.

    A line with no recognisable id is recorded in ``problems`` with its line number and
    skipped, never silently dropped.
    """
    result = BenchmarkIds()
    for path in paths:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise InputError(f"{file}: benchmark id list not found") from None
        except IsADirectoryError:
            raise InputError(f"{file}: is a directory, expected a text file of ids") from None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip().lstrip("\ufeff")
            if not line or line.startswith("#"):
                continue
            token, *more = line.split(None, 1)
            rest = more[0] if more else ""
            if rest and not rest.startswith("#"):
                reason = "expected one id or URL per line (text after it is not a '#' comment)"
                result.problems.append(
                    IdListProblem(file=str(file), line=number, text=raw, reason=reason)
                )
                continue
            video_id = extract_youtube_id(token)
            if video_id is None:
                reason = "not an 11-character YouTube id or a YouTube video URL"
                result.problems.append(
                    IdListProblem(file=str(file), line=number, text=raw, reason=reason)
                )
                continue
            result.ids.setdefault(video_id, f"{file}:{number}")
    return result


# ---------------------------------------------------------------- video lists


class VideoEntry(Strict):
    """A video to check or to check against."""

    video_id: str
    path: str
    youtube_id: str | None = None


IdsFrom = Literal["auto", "youtube_id", "video_id"]


def read_video_list(
    source: str | os.PathLike[str], ids_from: IdsFrom = "auto", check_ids: bool = True
) -> list[VideoEntry]:
    """Videos of a directory (every video file in it, id = file stem) or of a jsonl manifest.

    A manifest line is a JSON object with at least ``video_id`` and ``path`` (relative paths
    are relative to the manifest). ``ids_from`` says which field holds the YouTube id
    compared with benchmark id lists: ``auto`` takes ``youtube_id`` when a line has it and
    ``video_id`` otherwise. ``check_ids`` enforces vkr's safe id alphabet.
    """
    location = Path(source)
    if not location.exists():
        raise InputError(f"{location}: no such file or directory")
    entries: list[VideoEntry] = []
    seen: dict[str, str] = {}

    def add(video_id: str, path: Path, youtube_id: str | None, where: str) -> None:
        if check_ids:
            try:
                check_video_id(video_id)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
        if video_id in seen:
            raise InputError(f"{where}: video id {video_id!r} is also used at {seen[video_id]}")
        seen[video_id] = where
        entries.append(VideoEntry(video_id=video_id, path=str(path), youtube_id=youtube_id))

    if location.is_dir():
        files = sorted(
            p
            for p in location.iterdir()
            if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")
        )
        for file in files:
            add(file.stem, file, None if ids_from == "youtube_id" else file.stem, str(file))
        return entries
    base = location.parent
    for number, record in read_jsonl(location):
        where = f"{location}:{number}"
        for name in ("video_id", "path"):
            if not isinstance(record.get(name), str) or not record[name]:
                raise InputError(f"{where}: field {name!r} is missing or not a string")
        if ids_from == "youtube_id" and "youtube_id" not in record:
            raise InputError(f"{where}: field 'youtube_id' is missing (ids taken from youtube_id)")
        if ids_from == "video_id":
            youtube_id = record["video_id"]
        else:
            youtube_id = record.get(
                "youtube_id", None if ids_from == "youtube_id" else record["video_id"]
            )
        if youtube_id is not None and not isinstance(youtube_id, str):
            raise InputError(f"{where}: field 'youtube_id' must be a string or null")
        path = Path(record["path"])
        add(record["video_id"], path if path.is_absolute() else base / path, youtube_id, where)
    return entries


# ---------------------------------------------------------------- hashing videos


@dataclass
class VideoHashes:
    """pHashes of one video at 1 frame per second: frame i is at second i."""

    codes: dict[int, np.ndarray]
    detail: np.ndarray
    duration: float

    def __len__(self) -> int:
        return len(self.detail)


def _cache_key(path: Path) -> str:
    stat = path.stat()
    identity = {
        "format": CACHE_FORMAT,
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "fps": HASH_FPS,
        "frame_side": FRAME_SIDE,
        "bits": list(phash.HASH_BITS),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _cache_file(cache_dir: Path, path: Path) -> Path:
    key = _cache_key(path)
    return cache_dir / key[:2] / f"{key}.npz"


def load_cached_hashes(cache_dir: Path, path: Path) -> VideoHashes | None:
    """The cached hashes of ``path`` if it has not changed since they were computed."""
    try:
        file = _cache_file(cache_dir, path)
        with np.load(file) as data:
            codes = {bits: data[f"codes_{bits}"] for bits in phash.HASH_BITS}
            return VideoHashes(codes, data["detail"], float(data["duration"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # missing, stale or damaged: hash the video again


def store_hashes(cache_dir: Path, path: Path, hashes: VideoHashes) -> None:
    """Write hashes to the cache atomically (a killed run leaves no half-written file)."""
    arrays: dict[str, Any] = {f"codes_{b}": codes for b, codes in hashes.codes.items()}
    arrays.update(detail=hashes.detail, duration=hashes.duration)
    # Into an open file: given a path, np.savez would add ".npz" to the temporary's name.
    with atomic_path(_cache_file(cache_dir, path)) as temporary, temporary.open("wb") as stream:
        np.savez(stream, **arrays)


def hash_video(path: str | os.PathLike[str], *, pm: pluggy.PluginManager) -> VideoHashes:
    """Decode a video at 1 fps with ``pm``'s frame readers and hash every frame (64 and 256
    bits), in this process.

    Raises :class:`vkr_core.video.VideoDecodeError` when the file cannot be decoded.
    """
    from vkr_core.video import probe_video, read_frames, sample_timestamps

    file = Path(path)
    info = probe_video(file, pm=pm)
    times = sample_timestamps(info.duration, fps=HASH_FPS, max_frames=10**9)
    # read_frames returns full-size frames before scaling them: bound a call's memory.
    per_call = int(max(8, min(240, 200e6 // max(1, info.width * info.height * 3))))
    codes: dict[int, list[np.ndarray]] = {bits: [] for bits in phash.HASH_BITS}
    details: list[np.ndarray] = []
    for start in range(0, len(times), per_call):
        frames = read_frames(file, times[start : start + per_call], max_side=FRAME_SIDE, pm=pm)
        batch_codes, batch_detail = phash.phash_frames_multi([a for _, a in frames])
        for bits in phash.HASH_BITS:
            codes[bits].append(batch_codes[bits])
        details.append(batch_detail)
    return VideoHashes(
        {bits: np.concatenate(parts) for bits, parts in codes.items()},
        np.concatenate(details),
        float(info.duration),
    )


@dataclass
class HashingStats:
    hashed: int = 0
    cached: int = 0
    failed: int = 0
    seconds: float = 0.0
    # Hashes that could not be written to the cache (the run still uses them).
    cache_write_failures: int = 0


# Called as hasher(path, pm=...): a module-level function, so worker processes can import it.
Hasher = Callable[..., VideoHashes]


def _hash_worker(conn: Any, hasher: Hasher) -> None:
    """Decoder process: hash each path it is sent, reply with the hashes or the error.

    A plugin manager cannot cross a process: the worker loads the installed plugins itself,
    before the first video, so that video's timeout is decoding only.
    """
    from vkr_core.plugins import get_plugin_manager

    pm: Any = None
    startup_error: str | None = None
    try:
        pm = get_plugin_manager()
    except Exception as exc:  # each video then reports it
        startup_error = f"{type(exc).__name__}: {exc}"
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        key, path = task
        conn.send(("started", key, None))
        if pm is None:
            conn.send(("error", key, f"{path}: plugins did not load: {startup_error}"))
            continue
        try:
            hashes = hasher(path, pm=pm)
            conn.send(("ok", key, (hashes.codes, hashes.detail, hashes.duration)))
        except VkrError as exc:
            conn.send(("error", key, str(exc)))
        except Exception as exc:  # a decoder bug on one file must not end the run
            conn.send(("error", key, f"{path}: {type(exc).__name__}: {exc}"))


# How long a decoder process may take to start (imports, plugins) before its first video.
_WORKER_STARTUP_S = 120.0


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: tuple[str, Path] | None = None
    # When the current video's timeout runs out; set for start-up until the worker says
    # it began decoding.
    deadline: float = 0.0
    running: bool = False


def _start_worker(context: Any, hasher: Hasher) -> _Worker:
    parent, child = context.Pipe()
    process = context.Process(target=_hash_worker, args=(child, hasher), name="vkr-decontam-hash")
    process.daemon = True
    process.start()
    child.close()
    return _Worker(process, parent)


def _stop_worker(worker: _Worker, kill: bool = False) -> None:
    try:
        if kill:
            worker.process.kill()
        else:
            worker.conn.send(None)
    except (OSError, ValueError):
        pass
    worker.process.join(timeout=5)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.conn.close()


def _crash_message(path: Path, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"{path}: decoder crashed (signal {-exitcode})"
    return f"{path}: decoder crashed (exit code {exitcode})"


def hash_videos(
    videos: Sequence[tuple[str, str | os.PathLike[str]]],
    cache_dir: str | os.PathLike[str] | None,
    jobs: int = 0,
    timeout: float = 600.0,
    progress: Callable[[int, int], None] | None = None,
    hasher: Hasher = hash_video,
    pm: pluggy.PluginManager | None = None,
) -> tuple[dict[str, VideoHashes], dict[str, str], HashingStats]:
    """Hash ``(key, path)`` videos, from the cache where possible.

    Returns (hashes by key, error message by key, stats). With ``jobs`` > 0 the decoding
    runs in that many separate processes, so a decoder that aborts or hangs on one file
    (decord 0.6.0 can do both) costs that file only: it is reported as failed ("decoder
    crashed", "timed out after T s") and the rest go on; each process loads the installed
    plugins. ``jobs=0`` decodes in this process with ``pm``'s frame readers (by default
    the installed plugins'). ``hasher`` (a module-level function, so worker processes can
    import it) replaces :func:`hash_video`.
    """
    started = time.monotonic()
    stats = HashingStats()
    cache = Path(cache_dir) if cache_dir is not None else None
    results: dict[str, VideoHashes] = {}
    errors: dict[str, str] = {}
    todo: deque[tuple[str, Path]] = deque()
    # The same file under several keys (a video in both lists) is decoded once.
    same_file: dict[Path, list[str]] = {}
    for key, raw_path in videos:
        path = Path(raw_path)
        if not path.is_file():
            errors[key] = f"{path}: no such file" if not path.exists() else f"{path}: not a file"
            continue
        cached = load_cached_hashes(cache, path) if cache is not None else None
        if cached is not None:
            results[key] = cached
            stats.cached += 1
            continue
        keys = same_file.setdefault(path.resolve(), [])
        if not keys:
            todo.append((key, path))
        keys.append(key)
    total, done = len(videos), len(results) + len(errors)

    def finish(key: str, path: Path, hashes: VideoHashes | None, error: str | None) -> None:
        nonlocal done
        if hashes is not None:
            stats.hashed += 1
            if cache is not None:
                try:
                    store_hashes(cache, path, hashes)
                except OSError:  # a full or read-only cache costs the next run, not this one
                    stats.cache_write_failures += 1
        for same in same_file[path.resolve()]:
            done += 1
            if hashes is not None:
                results[same] = hashes
            else:
                errors[same] = error or f"{path}: failed"
        if progress is not None:
            progress(done, total)

    if jobs <= 0 and todo:
        if pm is None:
            from vkr_core.plugins import get_plugin_manager

            pm = get_plugin_manager()
        for key, path in todo:
            try:
                hashes = hasher(path, pm=pm)
            except VkrError as exc:
                finish(key, path, None, str(exc))
            except Exception as exc:  # as in a worker: one file's decoder bug is its failure
                finish(key, path, None, f"{path}: {type(exc).__name__}: {exc}")
            else:
                finish(key, path, hashes, None)
    elif todo:
        _hash_in_workers(todo, min(jobs, len(todo)), timeout, finish, hasher)
    stats.failed = len(errors)
    stats.seconds = time.monotonic() - started
    return results, errors, stats


def _hash_in_workers(
    todo: deque[tuple[str, Path]],
    jobs: int,
    timeout: float,
    finish: Callable[[str, Path, VideoHashes | None, str | None], None],
    hasher: Hasher,
) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [_start_worker(context, hasher) for _ in range(jobs)]
    try:
        while todo or any(w.task for w in workers):
            for worker in workers:
                if worker.task is None and todo:
                    worker.task = todo.popleft()
                    worker.deadline = time.monotonic() + max(timeout, _WORKER_STARTUP_S)
                    worker.running = False
                    worker.conn.send(worker.task)
            busy = [w for w in workers if w.task is not None]
            wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = multiprocessing.connection.wait([w.conn for w in busy], timeout=wait)
            for index, worker in enumerate(workers):
                if worker.task is None:
                    continue
                key, path = worker.task
                if worker.conn in ready:
                    try:
                        kind, _, payload = worker.conn.recv()
                    except (EOFError, OSError):
                        worker.process.join(timeout=5)
                        finish(key, path, None, _crash_message(path, worker.process.exitcode))
                        _stop_worker(worker, kill=True)
                        workers[index] = _start_worker(context, hasher)
                        continue
                    if kind == "started":
                        worker.deadline = time.monotonic() + timeout
                        worker.running = True
                        continue
                    worker.task = None
                    if kind == "ok":
                        codes, detail, duration = payload
                        finish(key, path, VideoHashes(codes, detail, duration), None)
                    else:
                        finish(key, path, None, payload)
                elif time.monotonic() >= worker.deadline:
                    _stop_worker(worker, kill=True)
                    if worker.running:
                        error = f"{path}: decoder timed out after {timeout:g} s"
                    else:
                        error = f"{path}: decoder process did not start in {_WORKER_STARTUP_S:g} s"
                    finish(key, path, None, error)
                    workers[index] = _start_worker(context, hasher)
    finally:
        for worker in workers:
            _stop_worker(worker)


# ---------------------------------------------------------------- the frame index


def multihash_radius(bits: int, nflip: int, table_bits: int = 21) -> int:
    """Largest Hamming distance a multi-hash index with these settings never misses.

    With ``bits // table_bits`` tables, a pair within distance r differs in at most
    ``r // tables`` bits of some table (pigeonhole), which ``nflip`` flips reach.
    """
    tables = bits // table_bits
    return tables * (nflip + 1) - 1


# Below this many frames an exhaustive search costs less than a millisecond per query.
FLAT_INDEX_LIMIT = 100_000
# Rules that match this share of random frame pairs or more (the paper's: 0.35) need an
# exhaustive search to behave as written: a hash index only returns close frames.
_CHANCE_NEEDS_FLAT = 1e-3
# Bit flips probed per hash table, per hash size: 2 flips over 3 tables of 21 bits never
# miss a 64-bit pair within distance 8 and find most pairs up to 12; see docs/BENCHMARKS.md.
_MULTIHASH_FLIPS = {64: 2, 256: 1}


class FrameIndex:
    """Nearest training frames for benchmark frames (a faiss binary index).

    Large indexes use ``IndexBinaryMultiHash`` (tables of 21 bits, probed with bit flips):
    exact for pairs within :func:`multihash_radius`, probabilistic beyond, which the window
    vote tolerates since a copied window has many matching frames and one vote makes it a
    candidate. Small indexes, and rules so loose that they match random frames (the
    paper's), use the exhaustive ``IndexBinaryFlat`` so retrieval never hides what the rule
    would flag.
    """

    TABLE_BITS = 21

    def __init__(
        self,
        videos: Sequence[VideoHashes],
        bits: int,
        distance: int,
        min_detail: float,
        kind: Literal["auto", "multihash", "flat"] = "auto",
    ):
        import faiss

        self.bits = bits
        codes, video_of, second_of = [], [], []
        for number, video in enumerate(videos):
            keep = np.flatnonzero(video.detail >= min_detail)
            codes.append(video.codes[bits][keep])
            video_of.append(np.full(len(keep), number, dtype=np.int64))
            second_of.append(keep.astype(np.int64))
        self.codes = np.concatenate(codes) if codes else np.zeros((0, bits // 8), np.uint8)
        self.video_of = np.concatenate(video_of) if video_of else np.zeros(0, np.int64)
        self.second_of = np.concatenate(second_of) if second_of else np.zeros(0, np.int64)
        if kind == "auto":
            loose = phash.chance_match_probability(bits, distance) >= _CHANCE_NEEDS_FLAT
            kind = "flat" if loose or len(self.codes) <= FLAT_INDEX_LIMIT else "multihash"
        self.index: Any
        if kind == "multihash":
            self.index = faiss.IndexBinaryMultiHash(bits, bits // self.TABLE_BITS, self.TABLE_BITS)
            self.index.nflip = _MULTIHASH_FLIPS[bits]
        else:
            self.index = faiss.IndexBinaryFlat(bits)
        self.kind = kind
        if len(self.codes):
            self.index.add(self.codes)

    def __len__(self) -> int:
        return len(self.codes)

    def describe(self) -> str:
        if self.kind == "multihash":
            return (
                f"faiss IndexBinaryMultiHash ({self.bits // self.TABLE_BITS} tables x "
                f"{self.TABLE_BITS} bits, {self.index.nflip} flips) over {len(self)} frames"
            )
        return f"faiss IndexBinaryFlat (exhaustive) over {len(self)} frames"

    def search(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows) of the ``k`` nearest indexed frames; rows are -1 where none."""
        if not len(self.codes) or not len(codes):
            shape = (len(codes), k)
            return np.full(shape, self.bits + 1, np.int32), np.full(shape, -1, np.int64)
        distances, rows = self.index.search(np.ascontiguousarray(codes), k)
        return distances, rows


# ---------------------------------------------------------------- matching windows


class WindowMatch(Strict):
    """The best-matching window of a training video against a benchmark video."""

    benchmark_video: str
    benchmark_start_s: float
    training_start_s: float
    window_s: int
    share: float
    mean_distance: float
    matched_frames: int
    compared_frames: int


# Windows per block of the vote-count matrix: bounds its memory on long benchmark videos.
_WINDOW_BLOCK = 128


def _vote_candidates(
    votes_key: np.ndarray, votes_time: np.ndarray, n_keys: int, n_windows: int, width: int, top: int
) -> list[tuple[int, np.ndarray]]:
    """For each key, the windows in whose top-``top`` vote counts it is."""
    chosen: dict[int, list[int]] = {}
    first = np.maximum(0, votes_time - width + 1)
    last = np.minimum(votes_time, n_windows - 1)
    for block in range(0, n_windows, _WINDOW_BLOCK):
        end = min(n_windows, block + _WINDOW_BLOCK)
        lo = np.maximum(first, block)
        hi = np.minimum(last, end - 1)
        use = lo <= hi
        diff = np.zeros((n_keys, end - block + 1), dtype=np.int32)
        np.add.at(diff, (votes_key[use], lo[use] - block), 1)
        np.add.at(diff, (votes_key[use], hi[use] - block + 1), -1)
        counts = np.cumsum(diff[:, :-1], axis=1)
        if n_keys > top:
            best = np.argpartition(-counts, top - 1, axis=0)[:top]
        else:
            best = np.broadcast_to(np.arange(n_keys)[:, None], (n_keys, end - block))
        windows = np.broadcast_to(np.arange(block, end), best.shape)
        voted = np.take_along_axis(counts, best, axis=0) > 0
        for key, window in zip(best[voted].tolist(), windows[voted].tolist(), strict=True):
            chosen.setdefault(key, []).append(window)
    return [(key, np.array(sorted(set(w)), dtype=np.int64)) for key, w in chosen.items()]


def _window_sums(values: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    cumulative = np.concatenate([[0], np.cumsum(values)])
    return cumulative[starts + width] - cumulative[starts]


def verify_offset(
    bench: VideoHashes,
    train: VideoHashes,
    offset: int,
    starts: np.ndarray,
    params: DecontamParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Share of matching frames in benchmark windows ``starts`` aligned with ``train``
    shifted by ``offset`` seconds (training second = benchmark second + offset).

    Returns (share, mean distance, matched, compared) per window; share is -1 where fewer
    than ``min_frames`` informative frames could be compared.
    """
    bits = params.hash_bits
    n_b, n_t = len(bench), len(train)
    width = min(params.window_s, n_b)
    seconds = np.arange(n_b)
    aligned = (seconds + offset >= 0) & (seconds + offset < n_t)
    informative = bench.detail >= params.min_detail
    distances = np.full(n_b, bits + 1, dtype=np.int64)
    rows = np.flatnonzero(aligned)
    distances[rows] = phash.hamming(bench.codes[bits][rows], train.codes[bits][rows + offset])
    compared = aligned & informative
    matched = compared & (distances <= params.distance)
    n_matched = _window_sums(matched, starts, width)
    n_compared = _window_sums(compared, starts, width)
    n_flat = _window_sums(aligned & ~informative, starts, width)
    distance_sum = _window_sums(np.where(compared, distances, 0), starts, width)
    # A training clip shorter than the window can at best fill its own length of it.
    possible = min(width, n_t) - n_flat
    share = np.where(possible >= params.min_frames, n_matched / np.maximum(possible, 1), -1.0)
    mean = np.where(n_compared > 0, distance_sum / np.maximum(n_compared, 1), float(bits))
    return share, mean, n_matched, n_compared


def match_benchmark_video(
    bench_id: str,
    bench: VideoHashes,
    index: FrameIndex,
    train: Sequence[VideoHashes],
    params: DecontamParams,
) -> dict[int, WindowMatch]:
    """Best verified window per training video (by position in ``train``) whose share
    reaches ``params.share``."""
    bits = params.hash_bits
    n_b = len(bench)
    if n_b == 0 or len(index) == 0:
        return {}
    width = min(params.window_s, n_b)
    n_windows = n_b - width + 1
    queries = np.flatnonzero(bench.detail >= params.min_detail)
    if not len(queries):
        return {}
    distances, rows = index.search(bench.codes[bits][queries], params.neighbours)
    hit = (rows >= 0) & (distances <= params.distance)
    times = np.broadcast_to(queries[:, None], rows.shape)[hit]
    rows = rows[hit]
    if not len(rows):
        return {}
    videos = index.video_of[rows]
    offsets = index.second_of[rows] - times
    pair = np.stack([videos, offsets], axis=1)
    keys, votes_key = np.unique(pair, axis=0, return_inverse=True)
    candidates = _vote_candidates(
        votes_key.ravel(), times, len(keys), n_windows, width, params.top_windows
    )
    best: dict[int, WindowMatch] = {}
    for key, starts in candidates:
        video, offset = int(keys[key, 0]), int(keys[key, 1])
        share, mean, matched, compared = verify_offset(bench, train[video], offset, starts, params)
        good = np.flatnonzero(share >= params.share)
        if not len(good):
            continue
        # Highest share first, then the closest frames.
        pick = good[np.lexsort((mean[good], -share[good]))[0]]
        found = WindowMatch(
            benchmark_video=bench_id,
            benchmark_start_s=float(starts[pick]),
            training_start_s=float(max(0, starts[pick] + offset)),
            window_s=int(min(width, len(train[video]))),
            share=round(float(share[pick]), 4),
            mean_distance=round(float(mean[pick]), 2),
            matched_frames=int(matched[pick]),
            compared_frames=int(compared[pick]),
        )
        current = best.get(video)
        if current is None or (found.share, -found.mean_distance) > (
            current.share,
            -current.mean_distance,
        ):
            best[video] = found
    return best


# ---------------------------------------------------------------- the whole run


class BenchmarkIdEvidence(Strict):
    youtube_id: str
    listed_at: str


class NearDuplicateEvidence(WindowMatch):
    # How many benchmark videos this training video matched; the window is the best one.
    benchmark_videos_matched: int = 1


class RemovedVideo(Strict):
    video_id: str
    path: str
    reason: Literal["benchmark-id", "near-duplicate"]
    evidence: BenchmarkIdEvidence | NearDuplicateEvidence


class FailedVideo(Strict):
    video_id: str
    path: str
    role: Literal["training", "benchmark"]
    error: str


class DecontamReport(Strict):
    """What a decontamination run decided, written to the report directory."""

    params: DecontamParams
    preset: str
    training_videos: int
    benchmark_videos: int
    benchmark_ids: int
    removed: list[RemovedVideo]
    kept: list[str]
    failed: list[FailedVideo]
    # Training videos too short (or too flat) for any window to be judged: kept unchecked.
    unchecked: list[str]
    id_list_problems: list[IdListProblem]
    index: str
    hashed: int
    from_cache: int
    cache_write_failures: int = 0
    seconds: float

    def counts(self) -> dict[str, int]:
        by_reason = {"benchmark-id": 0, "near-duplicate": 0}
        for video in self.removed:
            by_reason[video.reason] += 1
        return {
            "training": self.training_videos,
            "kept": len(self.kept),
            "removed_benchmark_id": by_reason["benchmark-id"],
            "removed_near_duplicate": by_reason["near-duplicate"],
            "failed_training": sum(f.role == "training" for f in self.failed),
            "failed_benchmark": sum(f.role == "benchmark" for f in self.failed),
            "unchecked": len(self.unchecked),
        }


def default_cache_dir() -> Path:
    """Where video hashes are cached unless told otherwise ($VKR_CACHE_DIR or ~/.cache/vkr)."""
    root = os.environ.get("VKR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vkr"
    )
    return Path(root) / "decontam-hashes"


def _checkable(video: VideoHashes, params: DecontamParams) -> bool:
    informative = int((video.detail >= params.min_detail).sum())
    return informative >= params.min_frames


def run_decontam(
    train: Sequence[VideoEntry],
    bench: Sequence[VideoEntry],
    bench_ids: BenchmarkIds,
    params: DecontamParams,
    preset: str = "default",
    cache_dir: str | os.PathLike[str] | None = None,
    jobs: int = 0,
    timeout: float = 600.0,
    progress: Callable[[int, int], None] | None = None,
    pm: pluggy.PluginManager | None = None,
) -> DecontamReport:
    """Decide which training videos to remove; nothing is written (see :func:`write_report`).

    ``pm`` decodes when ``jobs`` is 0 (see :func:`hash_videos`).
    """
    started = time.monotonic()
    removed: dict[str, RemovedVideo] = {}
    for entry in train:
        if entry.youtube_id is not None and entry.youtube_id in bench_ids.ids:
            evidence = BenchmarkIdEvidence(
                youtube_id=entry.youtube_id, listed_at=bench_ids.ids[entry.youtube_id]
            )
            removed[entry.video_id] = RemovedVideo(
                video_id=entry.video_id, path=entry.path, reason="benchmark-id", evidence=evidence
            )
    # Without benchmark videos there is nothing to compare frames with.
    to_hash = [e for e in train if e.video_id not in removed] if bench else []
    tasks = [(f"t:{e.video_id}", e.path) for e in to_hash] + [
        (f"b:{e.video_id}", e.path) for e in bench
    ]
    hashes, errors, stats = hash_videos(
        tasks, cache_dir, jobs=jobs, timeout=timeout, progress=progress, pm=pm
    )
    failed = [
        FailedVideo(
            video_id=e.video_id, path=e.path, role="training", error=errors[f"t:{e.video_id}"]
        )
        for e in to_hash
        if f"t:{e.video_id}" in errors
    ] + [
        FailedVideo(
            video_id=e.video_id, path=e.path, role="benchmark", error=errors[f"b:{e.video_id}"]
        )
        for e in bench
        if f"b:{e.video_id}" in errors
    ]
    train_ok = [e for e in to_hash if f"t:{e.video_id}" in hashes]
    train_hashes = [hashes[f"t:{e.video_id}"] for e in train_ok]
    index = FrameIndex(
        train_hashes, params.hash_bits, params.distance, params.min_detail, params.index
    )
    matches: dict[int, list[WindowMatch]] = {}
    for entry in bench:
        bench_hashes = hashes.get(f"b:{entry.video_id}")
        if bench_hashes is None:
            continue
        for video, found in match_benchmark_video(
            entry.video_id, bench_hashes, index, train_hashes, params
        ).items():
            matches.setdefault(video, []).append(found)
    for video, windows in matches.items():
        copy = train_ok[video]
        top = max(windows, key=lambda m: (m.share, -m.mean_distance))
        matched = len({m.benchmark_video for m in windows})
        removed[copy.video_id] = RemovedVideo(
            video_id=copy.video_id,
            path=copy.path,
            reason="near-duplicate",
            evidence=NearDuplicateEvidence(**top.model_dump(), benchmark_videos_matched=matched),
        )
    failed_ids = {f.video_id for f in failed if f.role == "training"}
    kept = [e.video_id for e in train if e.video_id not in removed and e.video_id not in failed_ids]
    unchecked = [
        e.video_id
        for e, h in zip(train_ok, train_hashes, strict=True)
        if e.video_id not in removed and not _checkable(h, params)
    ]
    order = {e.video_id: i for i, e in enumerate(train)}
    return DecontamReport(
        params=params,
        preset=preset,
        training_videos=len(train),
        benchmark_videos=len(bench),
        benchmark_ids=len(bench_ids.ids),
        removed=sorted(removed.values(), key=lambda r: order[r.video_id]),
        kept=kept,
        failed=failed,
        unchecked=unchecked,
        id_list_problems=bench_ids.problems,
        index=index.describe(),
        hashed=stats.hashed,
        from_cache=stats.cached,
        cache_write_failures=stats.cache_write_failures,
        seconds=round(time.monotonic() - started, 3),
    )


def write_report(report: DecontamReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write removed.jsonl, kept.txt, failed.jsonl and report.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "removed": out / "removed.jsonl",
        "kept": out / "kept.txt",
        "failed": out / "failed.jsonl",
        "report": out / "report.json",
    }
    atomic_write(files["removed"], "".join(r.model_dump_json() + "\n" for r in report.removed))
    atomic_write(files["kept"], "".join(video_id + "\n" for video_id in report.kept))
    atomic_write(files["failed"], "".join(f.model_dump_json() + "\n" for f in report.failed))
    summary = {
        "counts": report.counts(),
        **report.model_dump(exclude={"removed", "kept", "failed"}),
    }
    atomic_write(files["report"], json.dumps(summary, indent=2) + "\n")
    return files


# ---------------------------------------------------------------- calibration


TRANSFORMS = ("reencode", "resize", "crop", "brightness")


def _transform_frame(array: np.ndarray, transform: str) -> np.ndarray:
    height, width = array.shape[:2]
    if transform == "crop":
        # 5 % off every side: the kind of border crop that removes a logo or a frame.
        dy, dx = round(height * 0.05), round(width * 0.05)
        return array[dy : height - dy, dx : width - dx]
    if transform == "brightness":
        return np.clip(array.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    return array


def make_transformed_copy(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    transform: str,
    max_seconds: float | None = None,
    max_side: int | None = None,
) -> Path:
    """Write a transformed copy of a video with PyAV (H.264), for calibration and tests.

    ``reencode``: same frames at a low bitrate (CRF 40); ``resize``: half size; ``crop``:
    5 % cut from every side; ``brightness``: +40 grey levels. ``max_seconds`` copies only
    the start of the video and ``max_side`` first scales it down (both only save time: the
    hash looks at 64-pixel frames). Raises InputError naming the file when the source
    cannot be decoded.
    """
    import av
    from av.video.reformatter import VideoReformatter

    if transform not in TRANSFORMS:
        raise InputError(f"unknown transform {transform!r} (known: {', '.join(TRANSFORMS)})")
    src, dst = Path(source), Path(target)
    # One reformatter per direction: a fresh swscale context per frame costs 10x the work.
    to_rgb, to_yuv = VideoReformatter(), VideoReformatter()
    try:
        with av.open(str(src)) as reader, av.open(str(dst), "w") as writer:
            stream_in = reader.streams.video[0]
            rate = stream_in.average_rate or stream_in.guessed_rate or 25
            stream = None
            for frame in reader.decode(stream_in):
                if max_seconds is not None and frame.time is not None and frame.time >= max_seconds:
                    break
                width, height = frame.width, frame.height
                if max_side is not None and max(width, height) > max_side:
                    scale = max_side / max(width, height)
                    width, height = round(width * scale), round(height * scale)
                if transform == "resize":
                    width, height = width // 2, height // 2
                size = {"width": max(16, width), "height": max(16, height)}
                rgb = to_rgb.reformat(frame, format="rgb24", **size).to_ndarray()
                array = _transform_frame(rgb, transform)
                # H.264 4:2:0 needs even sides.
                array = array[: array.shape[0] // 2 * 2, : array.shape[1] // 2 * 2]
                if stream is None:
                    stream = writer.add_stream("libx264", rate=rate)
                    stream.width, stream.height = array.shape[1], array.shape[0]
                    stream.pix_fmt = "yuv420p"
                    crf = "40" if transform == "reencode" else "23"
                    stream.options = {"preset": "ultrafast", "crf": crf}
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                for packet in stream.encode(to_yuv.reformat(picture, format="yuv420p")):
                    writer.mux(packet)
            if stream is None:
                raise InputError(f"{src}: no video frames to copy")
            for packet in stream.encode():
                writer.mux(packet)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        dst.unlink(missing_ok=True)
        raise InputError(f"{src}: cannot make a {transform} copy: {exc}") from None
    return dst


def best_shares(
    bench: VideoHashes,
    train: VideoHashes,
    bits: int,
    distances: Sequence[int],
    window_s: int = 20,
    min_detail: float = 2.0,
    min_frames: int = 5,
) -> np.ndarray:
    """Best window share of ``train`` against ``bench`` for each distance, over every offset
    and window (exhaustive: the rule itself, without the index). -1 where nothing could be
    judged."""
    n_b, n_t = len(bench), len(train)
    result = np.full(len(distances), -1.0)
    if not n_b or not n_t:
        return result
    width = min(window_s, n_b)
    table = phash.hamming(bench.codes[bits][:, None, :], train.codes[bits][None, :, :])
    informative = bench.detail >= min_detail
    thresholds = np.asarray(distances)[:, None, None]
    matched = (table[None] <= thresholds) & informative[None, :, None]
    flat = np.broadcast_to(~informative[:, None], (n_b, n_t))
    starts_all = np.arange(n_b - width + 1)
    for offset in range(-(n_b - 1), n_t):
        # Benchmark seconds t with 0 <= t + offset < n_t lie on one diagonal.
        t0 = max(0, -offset)
        hits = np.zeros((len(distances), n_b))
        diagonal = np.diagonal(matched, offset=offset, axis1=1, axis2=2)
        hits[:, t0 : t0 + diagonal.shape[1]] = diagonal
        flats = np.zeros(n_b)
        flat_diagonal = np.diagonal(flat, offset=offset)
        flats[t0 : t0 + len(flat_diagonal)] = flat_diagonal
        cumulative = np.concatenate(
            [np.zeros((len(distances), 1)), np.cumsum(hits, axis=1)], axis=1
        )
        n_matched = cumulative[:, starts_all + width] - cumulative[:, starts_all]
        possible = min(width, n_t) - _window_sums(flats, starts_all, width)
        valid = possible >= min_frames
        if not valid.any():
            continue
        shares = n_matched[:, valid] / possible[valid]
        result = np.maximum(result, shares.max(axis=1))
    return result


class CalibrationPoint(Strict):
    hash_bits: int
    distance: int
    share: float
    false_positive_rate: float
    recall: float
    false_positives: int
    unrelated_pairs: int
    caught: int
    copies: int
    recall_by_transform: dict[str, float]
    # How far the threshold is from the nearest unrelated pair and the nearest caught copy.
    margin: float


class CalibrationResult(Strict):
    videos: list[str]
    skipped: dict[str, str]
    transforms: list[str]
    points: list[CalibrationPoint]
    recommended: CalibrationPoint | None
    presets: dict[str, CalibrationPoint]
    max_false_positive_rate: float
    chance_match_probability: dict[str, float]


DEFAULT_GRID: dict[int, tuple[int, ...]] = {
    64: (4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 30),
    256: (16, 32, 48, 64, 72, 80, 88, 96, 112),
}
DEFAULT_SHARES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def calibrate(
    videos: Sequence[VideoEntry],
    work_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    jobs: int = 0,
    max_false_positive_rate: float = 0.0,
    grid: dict[int, Sequence[int]] | None = None,
    shares: Sequence[float] = DEFAULT_SHARES,
    transforms: Sequence[str] = TRANSFORMS,
    window_s: int = 20,
    min_detail: float = 2.0,
    min_frames: int = 5,
    copy_seconds: float | None = 60.0,
    copy_max_side: int | None = 640,
    progress: Callable[[str], None] | None = None,
    pm: pluggy.PluginManager | None = None,
) -> CalibrationResult:
    """Measure the near-duplicate rule on known-unrelated pairs and on transformed copies.

    Unrelated pairs are all ordered pairs of distinct given videos (they must really be
    unrelated: different footage). Copies are made of every video with each transform.
    For every grid point (hash bits, distance, share) this gives the false-positive rate
    (unrelated pairs flagged) and the recall (copies flagged); the recommendation is the
    point with the best recall among those within ``max_false_positive_rate``, then the
    widest margin on both sides. Copies are made of the first ``copy_seconds`` of each
    video, scaled to at most ``copy_max_side`` pixels first, to keep calibration quick.
    """
    grid = {bits: tuple(d) for bits, d in (grid or DEFAULT_GRID).items()}
    for bits in grid:
        phash.hash_side(bits)
    say = progress or (lambda message: None)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    say(f"hashing {len(videos)} videos")
    originals, errors, _ = hash_videos(
        [(e.video_id, e.path) for e in videos], cache_dir, jobs=jobs, pm=pm
    )
    skipped = dict(errors)
    usable = [e for e in videos if e.video_id in originals]
    for entry in list(usable):
        if int((originals[entry.video_id].detail >= min_detail).sum()) < min_frames:
            skipped[entry.video_id] = f"{entry.path}: fewer than {min_frames} informative seconds"
            usable.remove(entry)
    if len(usable) < 2:
        raise InputError(
            f"calibration needs at least 2 usable videos of {min_frames} s or more, got "
            f"{len(usable)}" + (f" (skipped: {'; '.join(skipped.values())})" if skipped else "")
        )
    copy_tasks = []
    for entry in usable:
        for transform in transforms:
            target = work / f"{entry.video_id}.{transform}.mp4"
            say(f"making {transform} copy of {entry.video_id}")
            make_transformed_copy(entry.path, target, transform, copy_seconds, copy_max_side)
            copy_tasks.append((f"{entry.video_id}|{transform}", target))
    say(f"hashing {len(copy_tasks)} copies")
    copies, copy_errors, _ = hash_videos(copy_tasks, None, jobs=jobs, pm=pm)
    for key, error in copy_errors.items():
        skipped[key] = error

    pairs = list(itertools.permutations(usable, 2))

    def measure(bits: int, distances: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Best share per distance: (unrelated pairs x distances, {transform: copies x distances})."""

        def shares_of(bench: VideoHashes, train: VideoHashes) -> np.ndarray:
            return best_shares(bench, train, bits, distances, window_s, min_detail, min_frames)

        unrelated = [shares_of(originals[a.video_id], originals[b.video_id]) for a, b in pairs]
        copied = {
            t: [
                shares_of(originals[e.video_id], copies[f"{e.video_id}|{t}"])
                for e in usable
                if f"{e.video_id}|{t}" in copies
            ]
            for t in transforms
        }
        shape = (-1, len(distances))
        return np.reshape(unrelated, shape), {t: np.reshape(v, shape) for t, v in copied.items()}

    say(f"comparing {len(pairs)} unrelated pairs and {len(copies)} copies")
    measured = {bits: measure(bits, distances) for bits, distances in grid.items()}

    def point(bits: int, distance: int, share: float) -> CalibrationPoint:
        if distance in grid.get(bits, ()):
            column, (unrelated, copied) = grid[bits].index(distance), measured[bits]
        else:  # a preset off the grid
            column, (unrelated, copied) = 0, measure(bits, [distance])
        u = unrelated[:, column]
        per_transform = {t: v[:, column] for t, v in copied.items()}
        all_copies = np.concatenate(list(per_transform.values()))
        caught = all_copies[all_copies >= share]
        false_positives = int((u >= share).sum())
        below = u[u < share]
        margin = min(
            share - (below.max() if len(below) else 0.0),
            (caught.min() - share) if len(caught) else 0.0,
        )
        return CalibrationPoint(
            hash_bits=bits,
            distance=distance,
            share=share,
            false_positive_rate=round(false_positives / max(1, len(u)), 4),
            recall=round(len(caught) / max(1, len(all_copies)), 4),
            false_positives=false_positives,
            unrelated_pairs=len(u),
            caught=len(caught),
            copies=len(all_copies),
            recall_by_transform={
                t: round(float(np.mean(v >= share)) if len(v) else 0.0, 4)
                for t, v in per_transform.items()
            },
            margin=round(float(margin), 4),
        )

    points = [point(b, d, s) for b, ds in grid.items() for d in ds for s in shares]
    allowed = [p for p in points if p.false_positive_rate <= max_false_positive_rate]
    # Best recall; then, among rules with a comfortable margin (0.1 share or more), the
    # strictest one: the lowest chance that two unrelated frames match, since the videos
    # measured here are few next to the pairs a real corpus compares.
    recommended = (
        max(
            allowed,
            key=lambda p: (
                p.recall,
                -p.false_positive_rate,
                min(p.margin, 0.1),
                -phash.chance_match_probability(p.hash_bits, p.distance),
                p.share,
            ),
        )
        if allowed
        else None
    )
    presets = {
        name: point(params.hash_bits, params.distance, params.share)
        for name, params in PRESETS.items()
    }
    chance = {
        f"{name} ({p.hash_bits} bits, distance {p.distance})": float(
            f"{phash.chance_match_probability(p.hash_bits, p.distance):.3g}"
        )
        for name, p in PRESETS.items()
    }
    return CalibrationResult(
        videos=[e.video_id for e in usable],
        skipped=skipped,
        transforms=list(transforms),
        points=points,
        recommended=recommended,
        presets=presets,
        max_false_positive_rate=max_false_positive_rate,
        chance_match_probability=chance,
    )
