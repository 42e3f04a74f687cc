"""Seams for scale: where a run keeps its checkpoints and its call cache, who holds which
item, and what runs its items. Each is a backend chosen by name in the run's config; the
embedded ones (SQLite checkpoints, a diskcache call cache, no item status, the local asyncio
executor) are the defaults, and a plugin adds others (PostgreSQL, Ray) through
``vkr_register_backends`` without touching a step or a pipeline.

A run's shared state can instead be named by one URL (``RunConfig.state``, ``vkr run
--state``): the checkpointer, call cache and item status then come from the backends whose
``schemes`` include the URL's scheme. The URL is kept without its password (see
``split_password``), so no config snapshot or record ever holds one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ClassVar, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import InputError


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
    # URL schemes of ``RunConfig.state`` this backend serves (``postgresql``), if any.
    schemes: ClassVar[tuple[str, ...]] = ()

    def check(self, config: Any) -> None:
        """Raise InputError when this backend cannot serve the run (a missing extra, an
        unreachable server); called before the run directory is touched."""


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


Claim = Literal["claimed", "done", "held"]


class ItemStatus:
    """Who holds which item of a run, for drivers that share one (several machines, or a
    restarted driver while the old one's claims live). This default holds nothing: every
    item is claimed, as when one process owns the run directory.

    ``claim`` answers ``claimed`` (process it, then ``finish`` or ``release``), ``done``
    (finished, by any driver: skip it; an item that failed in an earlier invocation is
    claimed again, as a local rerun retries it) or ``held`` (another live driver has it:
    try again after ``retry_after`` seconds, when a dead driver's claim has expired).
    """

    retry_after: float = 1.0

    async def claim(self, item_id: str) -> Claim:
        return "claimed"

    async def finish(self, item_id: str, status: str) -> None:
        """The item's record is written with ``status`` (``done`` or ``failed``)."""

    async def release(self, item_id: str) -> None:
        """Give a claimed item up unfinished (the run stopped): another driver may take it."""

    async def close(self) -> None:
        """Release every claim still held and the connections."""


class StatusBackend(Backend):
    kind = "status"

    async def open(self, store: Any) -> ItemStatus:
        """The run's item status, open for the run (closed by the caller)."""
        raise NotImplementedError


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` without the password in its user part, and that password (None if none)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), parts.password


# Passwords given in state URLs this process, by the URL without them: the config keeps the
# URL only, the backend that connects asks here (or the server's own environment variable).
_STATE_PASSWORDS: dict[str, str] = {}


def remember_password(url: str, password: str) -> None:
    _STATE_PASSWORDS[url] = password


def state_password(url: str) -> str | None:
    """The password given with the state URL ``url`` in this process, if one was."""
    return _STATE_PASSWORDS.get(url)


def state_backend(registry: Any, kind: str, url: str) -> Backend:
    """The registered backend of ``kind`` serving ``url``'s scheme; an InputError naming the
    schemes that are served when none does."""
    scheme = urlsplit(url).scheme.lower()
    served: set[str] = set()
    for backend in registry.table("backend").values():
        if backend.kind != kind:
            continue
        served.update(backend.schemes)
        if scheme in backend.schemes:
            return backend
    known = ", ".join(f"{s}://" for s in sorted(served)) or "none"
    raise InputError(
        f"state {url}: no loaded {kind} backend serves {scheme or 'scheme-less'} URLs "
        f"(served: {known})"
    )


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
        run: Any = None,
    ) -> Any:
        """Process every item (``process`` records each), feeding ``counters``.

        ``run`` is the engine's open ``vkr_core.run.Run``: an executor whose workers are other
        processes opens the same run in each (``Run(..., joined=True)``) from its run
        directory, pool and config, and hands their call records to ``run.heard``.
        """
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
        # evicting silently). Nothing expires or is evicted, so culling (two queries in every
        # write) is switched off.
        return diskcache.Cache(str(path), size_limit=2**60, eviction_policy="none", cull_limit=0)

    def tune_for_long_runs(self, cache: CallCache) -> None:
        # diskcache's defaults map up to 64 MB of cache.db into memory and keep up to 32 MB
        # of its pages: both fill as the cache grows with the run (40 MB of cache.db at
        # 2,000 videos). Lookups are by key; the OS file cache serves them as well.
        reset = getattr(cache, "reset", None)
        if reset is not None:
            reset("sqlite_mmap_size", 0)
            reset("sqlite_cache_size", CALL_CACHE_PAGES)


class NoStatus(StatusBackend):
    """One process owns the run directory (its lock says so): no claims to keep."""

    name = "none"

    async def open(self, store: Any) -> ItemStatus:
        return ItemStatus()


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
        run: Any = None,
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
    for backend in (
        SqliteCheckpointer(),
        MemoryCheckpointer(),
        DiskCallCache(),
        NoStatus(),
        LocalExecutor(),
    ):
        register(backend)
