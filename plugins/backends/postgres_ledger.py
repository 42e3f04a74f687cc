"""The YouTube quota ledger in PostgreSQL: ``vkr collect --state postgresql://...``.

The SQLite ledger (``plugins.sources.youtube.QuotaLedger``) keeps one collection folder's
spend; this one keeps it where every driver of a collection, on any machine, reads and
writes it, so drivers sharing one API key never spend past the daily quota between them: a
request's units are reserved in one transaction, under a lock every driver takes, before
the request is sent.

Its tables live in the schema ``vkr_youtube`` of the state database, shared by every
collection in that database: YouTube's quota belongs to the key's project, not to a
collection, so one database is one key's quota (give collections with other keys another
database). The answered responses are shared too: a request another collection already
paid for is replayed, as a rerun replays its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from plugins.backends.postgres import (
    SETUP_LOCK,
    _connection_errors,
    _one_line,
    _require,
    check_reachable,
    conninfo,
    lost,
    take_setup_lock,
)
from plugins.sources.youtube import METHOD_COST, Ledger, QuotaStatus, quota_resets_at
from vkr_core.schemas import InputError

SCHEMA = "vkr_youtube"
# pg_advisory_xact_lock key every driver takes to reserve units, so two reservations never
# both read the same spend.
RESERVE_LOCK = 0x766B725F7174  # "vkr_qt"


def _lock_id(request_key: str) -> int:
    """The advisory lock (a signed 64-bit number) of a request, from its hex digest."""
    return int.from_bytes(bytes.fromhex(request_key[:16]), "big", signed=True)


class PostgresQuotaLedger(Ledger):
    """The SQLite ledger's interface over one autocommit connection (used from the event
    loop, as the SQLite one is)."""

    def __init__(self, url: str, daily_quota: int, clock: Callable[[], datetime]) -> None:
        if daily_quota < 1:
            raise InputError(f"the daily YouTube quota must be at least 1 unit, not {daily_quota}")
        psycopg = _require(url)
        check_reachable(url)
        self.url = url
        self.daily_quota = daily_quota
        self.clock = clock
        self._lost = _connection_errors()
        try:
            self._conn = psycopg.connect(conninfo(url), autocommit=True)
            self._setup()
        except self._lost as exc:
            raise lost(url, exc) from None
        except psycopg.Error as exc:
            raise InputError(
                f"cannot set up the YouTube ledger in {url}: {_one_line(exc)}"
            ) from None

    def _setup(self) -> None:
        conn = self._conn
        take_setup_lock(conn)
        try:
            with conn.transaction():
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.spend (day text, method text, "
                    "requests integer NOT NULL, units integer NOT NULL, PRIMARY KEY (day, method))"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.exhausted (day text PRIMARY KEY, at text)"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.responses (request_key text PRIMARY KEY, "
                    "method text, params text, body text, day text, received_at text)"
                )
                # videos.list items by id; item NULL: the id was asked for and not returned.
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.videos (video_id text PRIMARY KEY, "
                    "item text)"
                )
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self._conn.execute(sql, params)
        except self._lost as exc:
            raise lost(self.url, exc) from None

    def close(self) -> None:
        self._conn.close()

    def try_hold(self, key: str) -> bool:
        # A session lock: held across the request (not a transaction), and let go by the
        # server if this driver dies holding it.
        row = self._execute("SELECT pg_try_advisory_lock(%s)", (_lock_id(key),)).fetchone()
        return bool(row[0])

    def let_go(self, key: str) -> None:
        self._execute("SELECT pg_advisory_unlock(%s)", (_lock_id(key),))

    def status(self) -> QuotaStatus:
        day = self.today().isoformat()
        rows = self._execute(
            f"SELECT method, requests, units FROM {SCHEMA}.spend WHERE day = %s", (day,)
        ).fetchall()
        exhausted = (
            self._execute(f"SELECT 1 FROM {SCHEMA}.exhausted WHERE day = %s", (day,)).fetchone()
            is not None
        )
        spent = sum(units for _, _, units in rows)
        return QuotaStatus(
            day=day,
            spent=spent,
            limit=self.daily_quota,
            requests={m: r for m, r, _ in rows},
            units={m: u for m, _, u in rows},
            exhausted=exhausted or spent >= self.daily_quota,
            resets_at=quota_resets_at(self.clock()),
        )

    def units_by_method(self) -> dict[str, int]:
        rows = self._execute(f"SELECT method, SUM(units) FROM {SCHEMA}.spend GROUP BY method")
        return {method: int(units) for method, units in rows}

    def reserve(self, method: str) -> None:
        day = self.today().isoformat()
        try:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (RESERVE_LOCK,))
                row = self._conn.execute(
                    f"SELECT COALESCE(SUM(units), 0) FROM {SCHEMA}.spend WHERE day = %s", (day,)
                ).fetchone()
                exhausted = (
                    self._conn.execute(
                        f"SELECT 1 FROM {SCHEMA}.exhausted WHERE day = %s", (day,)
                    ).fetchone()
                    is not None
                )
                why = self.over_budget(method, int(row[0]), exhausted)
                if why is None:
                    self._conn.execute(
                        f"INSERT INTO {SCHEMA}.spend AS s VALUES (%s, %s, 0, %s) "
                        "ON CONFLICT (day, method) DO UPDATE SET units = s.units + excluded.units",
                        (day, method, METHOD_COST[method]),
                    )
        except self._lost as exc:
            raise lost(self.url, exc) from None
        if why is not None:
            raise self.exhausted_error(why)

    def refund(self, method: str) -> None:
        self._execute(
            f"UPDATE {SCHEMA}.spend SET units = units - %s WHERE day = %s AND method = %s",
            (METHOD_COST[method], self.today().isoformat(), method),
        )

    def mark_exhausted(self) -> None:
        self._execute(
            f"INSERT INTO {SCHEMA}.exhausted VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (self.today().isoformat(), self.clock().isoformat()),
        )

    def cached(self, key: str) -> dict[str, Any] | None:
        row = self._execute(
            f"SELECT body FROM {SCHEMA}.responses WHERE request_key = %s", (key,)
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def charge(self, method: str, key: str | None, params: dict[str, Any], body: Any) -> None:
        day, now = self.today().isoformat(), self.clock().isoformat()
        try:
            with self._conn.transaction():
                self._conn.execute(
                    f"INSERT INTO {SCHEMA}.spend AS s VALUES (%s, %s, 1, 0) "
                    "ON CONFLICT (day, method) DO UPDATE SET requests = s.requests + 1",
                    (day, method),
                )
                if key is not None:
                    clean = {k: v for k, v in params.items() if k != "key"}
                    self._conn.execute(
                        f"INSERT INTO {SCHEMA}.responses VALUES (%s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (request_key) DO UPDATE SET body = excluded.body, "
                        "day = excluded.day, received_at = excluded.received_at",
                        (key, method, json.dumps(clean), json.dumps(body), day, now),
                    )
        except self._lost as exc:
            raise lost(self.url, exc) from None

    def remember_videos(self, items: dict[str, Any], missing: Iterable[str]) -> None:
        rows: list[tuple[str, str | None]] = [
            (vid, json.dumps(item)) for vid, item in items.items()
        ]
        rows += [(vid, None) for vid in missing]
        try:
            with self._conn.transaction(), self._conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {SCHEMA}.videos VALUES (%s, %s) "
                    "ON CONFLICT (video_id) DO UPDATE SET item = excluded.item",
                    rows,
                )
        except self._lost as exc:
            raise lost(self.url, exc) from None

    def known_videos(self, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        rows = self._execute(
            f"SELECT video_id, item FROM {SCHEMA}.videos WHERE video_id = ANY(%s)", (list(ids),)
        )
        return {vid: None if item is None else json.loads(item) for vid, item in rows}
