"""The run's LangGraph checkpointer: one small checkpoint per video, written in group commits.

LangGraph's ``AsyncSqliteSaver`` commits every checkpoint and every task's writes on its
own, each behind one process-wide lock and three hops to its connection's thread, and
keeps every checkpoint a video ever had. At 64 videos in flight that lock was the run's
limit. This saver keeps LangGraph's tables and its reads, and changes the writes:

- Writes queue up while one is being committed and go in the next transaction together
  (group commit, on a writer thread of their own); each caller still returns only once
  its write is committed, so ``durability="sync"`` keeps its meaning: a run killed with
  SIGKILL resumes at the unfinished node.
- ``PRAGMA synchronous=NORMAL`` in WAL mode: a commit is not flushed to the disk, only
  handed to the OS, so it survives the process being killed; an OS crash or power loss can
  lose the last commits. Nothing is paid twice even then: every reply is in the call cache
  (and the journal) before the node that asked for it returns, so the replayed nodes are
  answered from the cache.
- A thread keeps its latest checkpoint only (and the writes made against it), which is all
  a resume reads; LangGraph reads older ones only for time travel, which vkr never does.
  Blobs are deflated (DeflateCipher).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import zlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

Statement = tuple[str, list[tuple[Any, ...]]]


def _saver_class() -> type:
    # Imported when a run opens, not with vkr_core: LangGraph's import is slow.
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    return AsyncSqliteSaver


class _GroupWriter:
    """One SQLite connection on one thread; what is queued while it commits goes next, in
    one transaction."""

    def __init__(self, path: Path):
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vkr-checkpoints")
        self._queue: list[tuple[list[Statement], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = threading.Event()

    async def write(self, statements: list[Statement]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((statements, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        # Shielded: a node cancelled while its checkpoint is being written leaves the write
        # to finish (or fail) for everyone else in the same transaction.
        await asyncio.shield(done)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await loop.run_in_executor(self._thread, self._commit, [s for s, _ in batch])
            except asyncio.CancelledError:
                # The loop is shutting down: the writes may or may not have landed (a
                # resume reads whatever did); nobody is left to tell.
                for _, done in batch + self._queue:
                    done.cancel()
                raise
            except BaseException as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    def _commit(self, batches: list[list[Statement]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statements in batches:
                for sql, rows in statements:
                    conn.executemany(sql, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def aclose(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            try:
                await self._flusher
            except BaseException:  # the callers that waited for it were told
                pass
        self._thread.submit(self._conn.close).result()
        self._thread.shutdown(wait=True)


class DeflateCipher:
    """A LangGraph "cipher" that deflates: state is JSON-like text (questions, reasoning,
    replies), a quarter of the bytes for ~0.1 ms of CPU per checkpoint. Through LangGraph's
    EncryptedSerializer, so its msgpack allowlist still applies; blobs written without it
    read as they were."""

    MIN_BYTES = 1024

    def encrypt(self, plaintext: bytes) -> tuple[str, bytes]:
        if len(plaintext) < self.MIN_BYTES:
            return "plain", plaintext
        return "zlib", zlib.compress(plaintext, 1)

    def decrypt(self, ciphername: str, ciphertext: bytes) -> bytes:
        if ciphername == "zlib":
            return zlib.decompress(ciphertext)
        if ciphername == "plain":
            return ciphertext
        raise ValueError(f"checkpoint blob in an unknown encoding {ciphername!r}")


def _make_saver(conn: Any, path: Path) -> Any:
    base = _saver_class()

    class RunCheckpointer(base):  # type: ignore[misc, valid-type]
        """AsyncSqliteSaver whose writes go through a group-committing writer."""

        writer: _GroupWriter

        async def aput(
            self,
            config: Any,  # LangGraph's RunnableConfig, Checkpoint, CheckpointMetadata
            checkpoint: Any,
            metadata: Any,
            new_versions: Any,
        ) -> Any:
            from langgraph.checkpoint.base import get_checkpoint_metadata

            await self.setup()
            configurable = config["configurable"]
            thread_id = str(configurable["thread_id"])
            ns = configurable["checkpoint_ns"]
            type_, blob = self.serde.dumps_typed(checkpoint)
            meta = json.dumps(get_checkpoint_metadata(config, metadata), ensure_ascii=False)
            row = (
                thread_id,
                ns,
                checkpoint["id"],
                configurable.get("checkpoint_id"),
                type_,
                blob,
                meta.encode("utf-8", "ignore"),
            )
            older = [(thread_id, ns, checkpoint["id"])]
            await self.writer.write(
                [
                    (
                        "INSERT OR REPLACE INTO checkpoints (thread_id, checkpoint_ns, "
                        "checkpoint_id, parent_checkpoint_id, type, checkpoint, metadata) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [row],
                    ),
                    # Checkpoint ids grow with time (uuid6): what is older is history.
                    (
                        "DELETE FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? "
                        "AND checkpoint_id < ?",
                        older,
                    ),
                    (
                        "DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = ? "
                        "AND checkpoint_id < ?",
                        older,
                    ),
                ]
            )
            return {
                "configurable": {
                    "thread_id": configurable["thread_id"],
                    "checkpoint_ns": ns,
                    "checkpoint_id": checkpoint["id"],
                }
            }

        async def aput_writes(
            self,
            config: Any,
            writes: Sequence[tuple[str, Any]],
            task_id: str,
            task_path: str = "",
        ) -> None:
            from langgraph.checkpoint.base import WRITES_IDX_MAP

            await self.setup()
            verb = (
                "INSERT OR REPLACE"
                if all(w[0] in WRITES_IDX_MAP for w in writes)
                else "INSERT OR IGNORE"
            )
            configurable = config["configurable"]
            rows = [
                (
                    str(configurable["thread_id"]),
                    str(configurable["checkpoint_ns"]),
                    str(configurable["checkpoint_id"]),
                    task_id,
                    task_path,
                    WRITES_IDX_MAP.get(channel, idx),
                    channel,
                    *self.serde.dumps_typed(value),
                )
                for idx, (channel, value) in enumerate(writes)
            ]
            await self.writer.write(
                [
                    (
                        f"{verb} INTO writes (thread_id, checkpoint_ns, checkpoint_id, task_id, "
                        "task_path, idx, channel, type, value) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                ]
            )

        async def adelete_thread(self, thread_id: str) -> None:
            await self.setup()
            key = [(str(thread_id),)]
            await self.writer.write(
                [
                    ("DELETE FROM checkpoints WHERE thread_id = ?", key),
                    ("DELETE FROM writes WHERE thread_id = ?", key),
                ]
            )

    from langgraph.checkpoint.serde.encrypted import EncryptedSerializer
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    return RunCheckpointer(conn, serde=EncryptedSerializer(DeflateCipher(), JsonPlusSerializer()))


@asynccontextmanager
async def open_checkpointer(path: Path) -> AsyncIterator[Any]:
    """The checkpointer of a run directory, open for the run (reads on LangGraph's own
    connection, writes through the group writer)."""
    import aiosqlite

    async with aiosqlite.connect(str(path)) as conn:
        saver = _make_saver(conn, path)
        await saver.setup()  # the tables and WAL mode, before the writer opens the file
        saver.writer = _GroupWriter(path)
        try:
            yield saver
        finally:
            await saver.writer.aclose()
