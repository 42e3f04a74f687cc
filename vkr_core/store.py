"""The run directory: config snapshot, checkpoints, call cache, frames, records, call log.

Layout::

    RUN_DIR/config.json          what the run was started with (a rerun must match)
    RUN_DIR/checkpoints.sqlite   LangGraph checkpoints, thread = video id
    RUN_DIR/cache/               the model-call cache (diskcache, never evicts)
    RUN_DIR/frames/<video_id>/   sampled frames, JPEG, encoded once
    RUN_DIR/records/<video_id>.json   one VideoRecord per finished video
    RUN_DIR/calls.jsonl          one CallRecord per call (cache hits included)
    RUN_DIR/failures.jsonl       videos that could not be processed, with the reason
    RUN_DIR/inputs/<step>.jsonl  rendered step inputs, for qualification pilots
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import os
import shutil
import tempfile
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vkr_core.calls import key_messages
from vkr_core.log import redact
from vkr_core.schemas import (  # noqa: F401  # DiskFull, is_disk_full: re-exported
    CallRecord,
    DiskFull,
    InputError,
    Video,
    VideoRecord,
    VkrError,
    check_video_id,
    is_disk_full,
)


class DigestSet:
    """A set of 64-bit digests at 8 bytes each (a set of Python ints costs ~70).

    A sorted array plus a small set of recent additions, merged into the array (streaming,
    no list of ints) once the recent set passes 1/16 of it: O(log n) lookups, amortised
    O(log n) additions.
    """

    def __init__(self) -> None:
        self._sorted = array("Q")
        self._recent: set[int] = set()

    def __contains__(self, digest: int) -> bool:
        if digest in self._recent:
            return True
        at = bisect.bisect_left(self._sorted, digest)
        return at < len(self._sorted) and self._sorted[at] == digest

    def add(self, digest: int) -> None:
        if digest in self:
            return
        self._recent.add(digest)
        if len(self._recent) > max(1024, len(self._sorted) // 16):
            self._sorted = array("Q", heapq.merge(self._sorted, sorted(self._recent)))
            self._recent.clear()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)


def _input_digest(key: str) -> int:
    """A 64-bit digest of an input key (a collision, about 1 in 30 million at a million
    inputs, would only leave one input out of the pilots' pool)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def atomic_write(path: Path, text: str) -> None:
    """Write a file so a reader (or a killed run) never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class RunDirectoryInUse(InputError):
    """Another process holds the run directory: two runs on one directory pay twice."""


class RunLock:
    """An exclusive lock on a run directory, held for as long as a run is open.

    An advisory ``flock`` on ``RUN_DIR/run.lock``: the kernel drops it when the holder
    exits, however it dies (kill -9 included), so a stale lock never blocks a rerun. The
    file says who holds it, for the refusal message.
    """

    def __init__(self, root: Path):
        self.path = root / "run.lock"
        self._fd: int | None = None

    def acquire(self, command: str = "vkr") -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"PID {info['pid']} ({info.get('command', 'vkr')}, started {info.get('started', '?')})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RunDirectoryInUse(
                f"run directory {self.path.parent} is in use by {who}: two runs on one "
                "directory would pay for the same calls twice; wait for it to finish or stop "
                "it, or use another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing the descriptor drops the flock; the file stays (unlinking it would
            # race with a process that opened it and is about to lock).
            os.close(self._fd)
            self._fd = None


class RunStore:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "records").mkdir(exist_ok=True)
        # 64-bit digests of the input keys seen per step: a run sees ~30 inputs per video.
        self._seen_inputs: dict[str, DigestSet] = {}
        self.run_lock = RunLock(self.root)

    def disk_full_error(self, exc: BaseException | None = None) -> DiskFull:
        if isinstance(exc, DiskFull) and str(exc).startswith("the disk holding"):
            return exc  # already says where and what to do
        return DiskFull(
            f"the disk holding {self.root} is full"
            + (f" ({type(exc).__name__}: {exc})" if exc else "")
            + ": nothing finished is lost; free some space and run the same command again to resume"
        )

    def low_on_space(self, minimum: int = 1 << 20) -> bool:
        return shutil.disk_usage(self.root).free < minimum

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "checkpoints.sqlite"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def frames_dir(self, video_id: str) -> Path:
        return self.root / "frames" / check_video_id(video_id)

    def record_path(self, video_id: str) -> Path:
        return self.root / "records" / f"{check_video_id(video_id)}.json"

    def check_config(self, snapshot: dict[str, Any], force: bool = False) -> None:
        """Refuse to mix results of different configs in one run directory unless forced."""
        path = self.root / "config.json"
        if path.exists() and not force:
            old = json.loads(path.read_text())
            differences = _diff(old, snapshot)
            if differences:
                raise InputError(
                    f"run directory {self.root} was made with a different config ("
                    + "; ".join(differences[:5])
                    + (" ..." if len(differences) > 5 else "")
                    + "): use another --out, or --force to continue with the new config"
                )
        atomic_write(path, json.dumps(snapshot, indent=2, sort_keys=True))

    def write_record(self, record: VideoRecord) -> Path:
        path = self.record_path(record.video_id)
        atomic_write(path, redact(record.model_dump_json(indent=2)))
        return path

    def read_record(self, video_id: str) -> VideoRecord | None:
        path = self.record_path(video_id)
        if not path.exists():
            return None
        return VideoRecord.model_validate_json(path.read_text())

    def iter_records(self) -> Iterator[VideoRecord]:
        """The records in video-id order, one at a time (a big run's do not fit in memory)."""
        for path in sorted((self.root / "records").glob("*.json")):
            yield VideoRecord.model_validate_json(path.read_text())

    def records(self) -> list[VideoRecord]:
        """Every record at once: for a few videos; ``iter_records`` for a run."""
        return list(self.iter_records())

    def _append(self, name: str, data: dict[str, Any]) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(redact(json.dumps(data, ensure_ascii=False)) + "\n")

    def append_call(self, record: CallRecord) -> None:
        self._append("calls.jsonl", record.model_dump())

    def iter_calls(self) -> Iterator[CallRecord]:
        """The call records in the order they were made, one line at a time."""
        path = self.root / "calls.jsonl"
        if not path.exists():
            return
        with path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield CallRecord.model_validate_json(line)

    def calls(self) -> list[CallRecord]:
        """Every call record at once: for a few videos; ``iter_calls`` for a run."""
        return list(self.iter_calls())

    def add_failure(self, video_id: str, reason: str, path: str | None = None) -> None:
        self._append(
            "failures.jsonl",
            {"video_id": video_id, "path": path, "reason": redact(reason), "time": time.time()},
        )

    def record_input(
        self,
        step: str,
        key: str,
        video: Video,
        messages: list[dict[str, Any]],
        meta: dict[str, Any],
        prompt_version: str | None = None,
    ) -> None:
        """Keep each distinct rendered input of a step once, for qualification pilots."""
        seen = self._seen_inputs.get(step)
        path = self.root / "inputs" / f"{step}.jsonl"
        if seen is None:
            seen = DigestSet()
            if path.exists():
                with path.open(encoding="utf-8") as handle:
                    for line in handle:
                        if line.strip():
                            seen.add(_input_digest(json.loads(line)["key"]))
            self._seen_inputs[step] = seen
        digest = _input_digest(key)
        if digest in seen:
            return
        seen.add(digest)
        frames = [
            {"sha256": p["sha256"], "path": p["path"]}
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p.get("type") == "frame"
        ]
        self._append(
            f"inputs/{step}.jsonl",
            {
                "key": key,
                "step": step,
                "prompt_version": prompt_version,
                "video_id": video.video_id,
                "discipline": video.discipline,
                "subject": video.subject,
                "meta": meta,
                "frames": frames,
                "messages": key_messages(messages),
            },
        )
