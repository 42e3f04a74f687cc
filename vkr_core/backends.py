"""Seams for scale: where a run keeps its checkpoints and its call cache, and what runs its
items. Each is a backend chosen by name in the run's config; the embedded ones (SQLite
checkpoints, a diskcache call cache, the local asyncio executor) are the defaults, and a
plugin adds others (PostgreSQL, Ray) through ``vkr_register_backends`` without touching a
step or a pipeline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ClassVar, Protocol

from vkr_core.hookspecs import hookimpl


class CallCache(Protocol):
    """What the caller needs from a call cache (and the reply journal kept in it).

    ``transact()`` groups writes into one commit: a reply's entry and the removal of its
    journal line land together or not at all.
    """

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> Any: ...

    def delete(self, key: str) -> Any: ...

    def transact(self) -> Any: ...

    def close(self) -> None: ...


class Backend:
    """A named implementation of one seam (``kind``)."""

    kind: ClassVar[str]
    name: ClassVar[str]


class CheckpointerBackend(Backend):
    kind = "checkpointer"

    def open(self, store: Any) -> AbstractAsyncContextManager[Any]:
        """A LangGraph checkpointer for the run directory ``store``, open for the run."""
        raise NotImplementedError


class CallCacheBackend(Backend):
    kind = "call_cache"

    def open(self, store: Any) -> CallCache:
        """The run's call cache (closed by the caller at the end of the run)."""
        raise NotImplementedError

    def tune_for_long_runs(self, cache: CallCache) -> None:
        """Settings for a run of many items (memory that stays flat); optional."""


class ExecutorBackend(Backend):
    kind = "executor"

    async def run(
        self,
        process: Callable[[Any], Awaitable[Any]],
        items: Iterable[Any],
        counters: Any,
        *,
        concurrency: int,
        target_accepted: int | None,
        on_item: Callable[[Any], None] | None,
        should_stop: Callable[[], bool],
        prepare: Callable[[Any], Awaitable[None]] | None,
    ) -> Any:
        """Process every item (``process`` records each), feeding ``counters``."""
        raise NotImplementedError


# ---------------------------------------------------------------- the embedded defaults


class SqliteCheckpointer(CheckpointerBackend):
    """LangGraph checkpoints in the run directory's SQLite file, written by a group-commit
    thread (vkr_core.checkpoints)."""

    name = "sqlite"

    def open(self, store: Any) -> AbstractAsyncContextManager[Any]:
        from vkr_core.checkpoints import open_checkpointer

        return open_checkpointer(store.checkpoint_path)


class MemoryCheckpointer(CheckpointerBackend):
    """LangGraph's in-memory saver: nothing survives the process (tests, throwaway runs)."""

    name = "memory"

    def open(self, store: Any) -> AbstractAsyncContextManager[Any]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[Any]:
            from langgraph.checkpoint.memory import InMemorySaver

            yield InMemorySaver()

        return opened()


# SQLite pages of the call cache a long run keeps in memory (4 KB each): SQLite's default.
CALL_CACHE_PAGES = 500


class DiskCallCache(CallCacheBackend):
    """diskcache in the run directory's ``cache/``, never evicting."""

    name = "diskcache"

    def open(self, store: Any) -> CallCache:
        return self.open_dir(store.cache_dir)

    @staticmethod
    def open_dir(path: Any) -> CallCache:
        import diskcache

        # Never evict: an evicted entry is a call paid twice (diskcache's default is 1 GB,
        # evicting silently).
        return diskcache.Cache(str(path), size_limit=2**60, eviction_policy="none")

    def tune_for_long_runs(self, cache: CallCache) -> None:
        # diskcache's defaults map up to 64 MB of cache.db into memory and keep up to 32 MB
        # of its pages: both fill as the cache grows with the run (40 MB of cache.db at
        # 2,000 videos). Lookups are by key; the OS file cache serves them as well.
        reset = getattr(cache, "reset", None)
        if reset is not None:
            reset("sqlite_mmap_size", 0)
            reset("sqlite_cache_size", CALL_CACHE_PAGES)


class LocalExecutor(ExecutorBackend):
    """asyncio on this machine: bounded concurrency, decoding ahead (vkr_core.batch)."""

    name = "local"

    async def run(
        self,
        process: Callable[[Any], Awaitable[Any]],
        items: Iterable[Any],
        counters: Any,
        *,
        concurrency: int,
        target_accepted: int | None,
        on_item: Callable[[Any], None] | None,
        should_stop: Callable[[], bool],
        prepare: Callable[[Any], Awaitable[None]] | None,
    ) -> Any:
        from vkr_core.batch import run_batch

        return await run_batch(
            process,
            items,
            counters,
            concurrency,
            target_accepted,
            on_video=on_item,
            should_stop=should_stop,
            prepare=prepare,
        )


@hookimpl
def vkr_register_backends(register: Callable[[Backend], None]) -> None:
    for backend in (SqliteCheckpointer(), MemoryCheckpointer(), DiskCallCache(), LocalExecutor()):
        register(backend)
