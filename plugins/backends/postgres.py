"""Run state in PostgreSQL, shared by every driver of a run: ``vkr run --state postgresql://...``.

Three backends behind one URL, so two drivers on one manifest (two machines, or a driver
restarted while the old one's claims live) never process an item twice nor pay a reply
twice:

- ``checkpointer``: LangGraph's ``AsyncPostgresSaver`` (langgraph-checkpoint-postgres);
- ``call_cache``: the reply cache and journal (``vkr_core.calls``) in one table, values
  pickled as diskcache does, ``transact()`` a real transaction;
- ``status``: per item ``claimed | done | failed``, the owner (host:pid:token) and a lease
  kept alive by a heartbeat, so a driver killed with SIGKILL leaves claims that expire
  (after ``VKR_STATE_LEASE`` seconds, default 60) and are taken over.

Each run gets its own PostgreSQL schema, named from its identity: a hash of the run's config
snapshot (``config.json``) without the state URL, so two runs in one database never see each
other's rows, and every driver of one run, on any machine, finds the same ones. The URL's
password is never stored: the config keeps the URL without it (``RunConfig.state``), and
each invocation reads it from the URL it is given or from ``PGPASSWORD``.

psycopg and langgraph-checkpoint-postgres are imported when a run opens; without them the
run stops before anything is written, saying ``pip install 'vkr[postgres]'``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import pickle
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from hashlib import sha256
from typing import Any

from vkr_core.backends import (
    Backend,
    CallCacheBackend,
    CheckpointerBackend,
    Claim,
    ItemStatus,
    StatusBackend,
    state_password,
)
from vkr_core.hookspecs import hookimpl
from vkr_core.log import get_logger, redact
from vkr_core.schemas import InputError, RunStopped, VkrError
from vkr_core.store import RunLayout

log = get_logger("vkr.state")

SCHEMES = ("postgresql", "postgres")
INSTALL_HINT = "pip install 'vkr[postgres]'"
LEASE_ENV = "VKR_STATE_LEASE"
DEFAULT_LEASE = 60.0
CONNECT_TIMEOUT = 10
# pg_advisory_lock key under which drivers create a run's schema and tables one at a time
# (CREATE ... IF NOT EXISTS still fails when two sessions race to create the same name).
SETUP_LOCK = 0x766B725F7374  # "vkr_st"
SETUP_LOCK_POLL = 0.1


def take_setup_lock(conn: Any) -> None:
    """Take SETUP_LOCK on an autocommit connection, trying rather than waiting: a session
    blocked in pg_advisory_lock holds a snapshot, which the holder's CREATE INDEX
    CONCURRENTLY (LangGraph's migrations) waits for, a deadlock when two drivers start
    together."""
    import time

    while not conn.execute("SELECT pg_try_advisory_lock(%s)", (SETUP_LOCK,)).fetchone()[0]:
        time.sleep(SETUP_LOCK_POLL)


async def atake_setup_lock(conn: Any) -> None:
    """take_setup_lock on an async connection."""
    while True:
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s) AS taken", (SETUP_LOCK,))
        row = await cursor.fetchone()
        if (row["taken"] if isinstance(row, dict) else row[0]) is True:
            return
        await asyncio.sleep(SETUP_LOCK_POLL)


def _require(url: str) -> Any:
    try:
        import psycopg
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver  # noqa: F401
    except ImportError:
        raise InputError(
            f"state {url}: PostgreSQL support is not installed: {INSTALL_HINT}"
        ) from None
    return psycopg


def conninfo(url: str) -> str:
    """The libpq connection string: the URL plus the password given with it this process
    (none: libpq reads ``PGPASSWORD`` or ``~/.pgpass`` itself)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params: dict[str, Any] = {}
    password = state_password(url)
    if password is not None:
        params["password"] = password
    if "connect_timeout" not in conninfo_to_dict(url):
        params["connect_timeout"] = CONNECT_TIMEOUT
    return make_conninfo(url, **params)


def _one_line(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split())) or type(exc).__name__


def quiet_driver_warnings() -> None:
    """psycopg logs a lost connection's cleanup as a warning of its own, beside the one line
    the run stops with (RunStopped): keep its errors only."""
    logging.getLogger("psycopg").setLevel(logging.ERROR)


def lost(url: str, exc: BaseException) -> RunStopped:
    """The run's state database stopped answering: every item needs it, so the run stops."""
    return RunStopped(
        f"lost the state database {url} ({_one_line(exc)}): nothing finished is lost; run "
        "the same command again once it answers"
    )


def _connection_errors() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError)


_reachable: set[str] = set()


def check_reachable(url: str) -> None:
    """Connect once (per process and URL): a missing extra, a bad URL, a wrong password or
    a server that does not answer is one InputError, before the run directory is touched."""
    if url in _reachable:
        return
    psycopg = _require(url)
    try:
        with psycopg.connect(conninfo(url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_user, "
                "has_database_privilege(current_user, current_database(), 'CREATE')"
            ).fetchone()
    except (psycopg.Error, ValueError) as exc:
        # psycopg names host, port and user, never the password; redact() would catch one.
        raise InputError(f"cannot use the state database {url}: {_one_line(exc)}") from None
    if row is None or not row[1]:
        user = row[0] if row else "this user"
        raise InputError(
            f"cannot use the state database {url}: user {user} may not create schemas in it "
            "(a run keeps its state in a schema of its own): GRANT CREATE ON DATABASE to it"
        )
    _reachable.add(url)


def run_schema(run_dir: str | os.PathLike[str]) -> str:
    """The run's schema: its identity, the config snapshot without where its state lives
    (the same on every machine that runs it; the run directory's path is not)."""
    layout = RunLayout(run_dir)
    snapshot = layout.read_config()
    if snapshot is None:
        raise VkrError(f"{layout.config} does not exist: the run is not open")
    config = {k: v for k, v in (snapshot.get("config") or {}).items() if k != "state"}
    blob = json.dumps({**snapshot, "config": config}, sort_keys=True, separators=(",", ":"))
    return "vkr_" + sha256(blob.encode()).hexdigest()[:20]


_ready: set[tuple[str, str]] = set()


def ensure_schema(url: str, schema: str) -> None:
    """The run's schema and vkr's tables in it (the checkpointer adds LangGraph's)."""
    if (url, schema) in _ready:
        return
    import psycopg

    try:
        _create_schema(psycopg, url, schema)
    except _connection_errors() as exc:
        raise lost(url, exc) from None
    except psycopg.Error as exc:  # privileges changed since the check, say
        raise InputError(f"cannot set up the run's state in {url}: {_one_line(exc)}") from None
    _ready.add((url, schema))


def _create_schema(psycopg: Any, url: str, schema: str) -> None:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        take_setup_lock(conn)
        try:
            with conn.transaction():
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                conn.execute(
                    f'CREATE TABLE IF NOT EXISTS "{schema}".call_cache ('
                    "key text PRIMARY KEY, value bytea NOT NULL)"
                )
                conn.execute(
                    f'CREATE TABLE IF NOT EXISTS "{schema}".items ('
                    "item_id text PRIMARY KEY, "
                    "state text NOT NULL CHECK (state IN ('claimed', 'done', 'failed')), "
                    "owner text NOT NULL, "
                    "lease_until timestamptz, "
                    "claims integer NOT NULL DEFAULT 1, "
                    "claimed timestamptz NOT NULL DEFAULT now(), "
                    "updated timestamptz NOT NULL DEFAULT now())"
                )
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))


class PostgresBackend(Backend):
    schemes = SCHEMES

    def check(self, config: Any) -> None:
        check_reachable(config.state)

    @staticmethod
    def url(store: Any) -> str:
        snapshot = store.layout.read_config() or {}
        url = (snapshot.get("config") or {}).get("state")
        if not url:
            raise VkrError(f"run directory {store.root} names no state URL")
        return str(url)


# ---------------------------------------------------------------- call cache


class PostgresCallCache:
    """vkr's ``CallCache`` over one table; one connection, used from the event loop."""

    def __init__(self, conn: Any, schema: str, url: str):
        self._conn = conn
        self._table = f'"{schema}".call_cache'
        self._url = url
        self._lost = _connection_errors()

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        try:
            return self._conn.execute(sql, params)
        except self._lost as exc:
            raise lost(self._url, exc) from None

    def get(self, key: str, default: Any = None) -> Any:
        row = self._execute(f"SELECT value FROM {self._table} WHERE key = %s", (key,)).fetchone()
        return default if row is None else pickle.loads(row[0])

    def set(self, key: str, value: Any) -> bool:
        self._execute(
            f"INSERT INTO {self._table} (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)),
        )
        return True

    def delete(self, key: str) -> bool:
        return bool(self._execute(f"DELETE FROM {self._table} WHERE key = %s", (key,)).rowcount)

    @contextmanager
    def transact(self) -> Iterator[None]:
        """One transaction: a reply's entry and its journal drop commit together."""
        try:
            with self._conn.transaction():
                yield
        except self._lost as exc:  # the commit (or the rollback) met a dead connection
            raise lost(self._url, exc) from None

    def keys(self) -> list[str]:
        """Every key (tests and audits: which replies the run holds)."""
        return [row[0] for row in self._execute(f"SELECT key FROM {self._table}")]

    def close(self) -> None:
        self._conn.close()


class PostgresCalls(PostgresBackend, CallCacheBackend):
    name = "postgres"

    def open(self, store: Any) -> PostgresCallCache:
        return self.open_url(self.url(store), run_schema(store.root))

    @staticmethod
    def open_url(url: str, schema: str) -> PostgresCallCache:
        import psycopg

        ensure_schema(url, schema)
        try:
            conn = psycopg.connect(conninfo(url), autocommit=True)
        except _connection_errors() as exc:
            raise lost(url, exc) from None
        return PostgresCallCache(conn, schema, url)


# ---------------------------------------------------------------- checkpoints


class PostgresCheckpointer(PostgresBackend, CheckpointerBackend):
    name = "postgres"

    def open(self, store: Any) -> AbstractAsyncContextManager[Any]:
        url, schema = self.url(store), run_schema(store.root)

        @asynccontextmanager
        async def opened() -> AsyncIterator[Any]:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
            from psycopg import AsyncConnection
            from psycopg.rows import dict_row

            await asyncio.to_thread(ensure_schema, url, schema)
            quiet_driver_warnings()
            conn = await AsyncConnection.connect(
                conninfo(url),
                autocommit=True,
                prepare_threshold=0,
                row_factory=dict_row,
                options=f"-c search_path={schema}",
            )
            try:
                saver = _stopping_saver(AsyncPostgresSaver)(conn)
                saver.url = url
                # Its migrations are not safe against a second driver running them at once.
                await atake_setup_lock(conn)
                try:
                    await saver.setup()
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
                yield saver
            finally:
                await conn.close()

        return opened()


@functools.cache
def _stopping_saver(base: type) -> type:
    """``AsyncPostgresSaver`` whose lost connection stops the run (RunStopped) instead of
    failing the item whose checkpoint it was writing, and every item after it."""
    errors = _connection_errors()

    class StoppingSaver(base):  # type: ignore[misc, valid-type]
        url = ""

        async def aget_tuple(self, config: Any) -> Any:
            try:
                return await super().aget_tuple(config)
            except errors as exc:
                raise lost(self.url, exc) from None

        async def aput(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().aput(*args, **kwargs)
            except errors as exc:
                raise lost(self.url, exc) from None

        async def aput_writes(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return await super().aput_writes(*args, **kwargs)
            except errors as exc:
                raise lost(self.url, exc) from None

        async def adelete_thread(self, thread_id: str) -> None:
            try:
                await super().adelete_thread(thread_id)
            except errors as exc:
                raise lost(self.url, exc) from None

    return StoppingSaver


# ---------------------------------------------------------------- item status


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE
    try:
        lease = float(raw)
    except ValueError:
        raise InputError(f"{LEASE_ENV}={raw!r} is not a number of seconds") from None
    if lease <= 0:
        raise InputError(f"{LEASE_ENV} must be more than 0 seconds, not {raw}")
    return lease


class PostgresItemStatus(ItemStatus):
    """Claims with a lease, renewed by a heartbeat while this driver lives."""

    def __init__(
        self,
        conn: Any,
        schema: str,
        lease: float,
        started: Any,
        owner: str | None = None,
        url: str = "",
    ):
        self._conn = conn
        self.url = url
        # The database's clock when this driver opened: an item that failed before is tried
        # again (a rerun), one another driver failed since is not (it is that run's result).
        self.started = started
        self._table = f'"{schema}".items'
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # A dead driver's claim is free once its lease has run out: look again then.
        self.retry_after = max(0.1, lease / 4)
        self._heartbeat: asyncio.Task[None] | None = None

    async def claim(self, item_id: str) -> Claim:
        # New, failed before this driver started (a rerun tries it again, as the local
        # engine does) or a claim whose lease ran out (its driver died): ours. Done, failed
        # by a driver of this round, or claimed by a live driver: not.
        try:
            return await self._claim(item_id)
        except _connection_errors() as exc:
            raise lost(self.url, exc) from None

    async def _claim(self, item_id: str) -> Claim:
        cursor = await self._conn.execute(
            f"INSERT INTO {self._table} AS i (item_id, state, owner, lease_until) "
            "VALUES (%s, 'claimed', %s, now() + make_interval(secs => %s)) "
            "ON CONFLICT (item_id) DO UPDATE SET state = 'claimed', owner = excluded.owner, "
            "lease_until = excluded.lease_until, claims = i.claims + 1, claimed = now(), "
            "updated = now() "
            "WHERE (i.state = 'failed' AND i.updated < %s) "
            "OR (i.state = 'claimed' AND i.lease_until < now()) "
            "RETURNING i.claims",
            (item_id, self.owner, self.lease, self.started),
        )
        row = await cursor.fetchone()
        if row is not None:
            if row[0] > 1:
                log.info("item taken over", item_id=item_id, claims=row[0])
            self._start_heartbeat()
            return "claimed"
        cursor = await self._conn.execute(
            f"SELECT state FROM {self._table} WHERE item_id = %s", (item_id,)
        )
        row = await cursor.fetchone()
        return "done" if row is not None and row[0] in ("done", "failed") else "held"

    async def finish(self, item_id: str, status: str) -> None:
        state = "done" if status == "done" else "failed"
        try:
            cursor = await self._conn.execute(
                f"UPDATE {self._table} SET state = %s, lease_until = NULL, updated = now() "
                "WHERE item_id = %s AND owner = %s",
                (state, item_id, self.owner),
            )
        except Exception as exc:  # the record is written; the claim expires and is replayed
            self._complain("could not mark item", exc, item_id=item_id, state=state)
            return
        if not cursor.rowcount:
            log.warning(
                f"item was taken over before it finished (its lease ran out: raise {LEASE_ENV})",
                item_id=item_id,
            )

    async def release(self, item_id: str) -> None:
        await self._release("item_id = %s AND ", (item_id,))

    async def _release(self, where: str, params: tuple[Any, ...]) -> None:
        try:
            await self._conn.execute(
                f"UPDATE {self._table} SET lease_until = '-infinity', updated = now() "
                f"WHERE {where}owner = %s AND state = 'claimed'",
                (*params, self.owner),
            )
        except Exception as exc:  # the lease runs out on its own
            self._complain("could not release claims", exc)

    def _complain(self, what: str, exc: Exception, **where: Any) -> None:
        # A lost connection is said once, by the RunStopped that stops the run; a warning
        # per item on top of it would bury that line.
        quiet = isinstance(exc, _connection_errors())
        (log.debug if quiet else log.warning)(what, error=_one_line(exc), **where)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._conn.execute(
                    f"UPDATE {self._table} SET lease_until = now() + make_interval(secs => %s) "
                    "WHERE owner = %s AND state = 'claimed'",
                    (self.lease, self.owner),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a blip: the next beat may land before the lease ends
                self._complain("state heartbeat failed", exc)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self._release("", ())
        await self._conn.close()


class PostgresStatus(PostgresBackend, StatusBackend):
    name = "postgres"

    def check(self, config: Any) -> None:
        lease_seconds()
        super().check(config)

    async def open(self, store: Any) -> ItemStatus:
        from psycopg import AsyncConnection

        url, schema = self.url(store), run_schema(store.root)
        await asyncio.to_thread(ensure_schema, url, schema)
        conn = await AsyncConnection.connect(conninfo(url), autocommit=True)
        cursor = await conn.execute("SELECT now()")
        row = await cursor.fetchone()
        assert row is not None
        return PostgresItemStatus(conn, schema, lease_seconds(), started=row[0], url=url)


@hookimpl
def vkr_register_backends(register: Callable[[Backend], None]) -> None:
    for backend in (PostgresCheckpointer(), PostgresCalls(), PostgresStatus()):
        register(backend)
