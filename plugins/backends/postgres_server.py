"""A throwaway PostgreSQL cluster for tests and benchmarks: ``initdb`` into a temporary
folder, ``pg_ctl start`` on a free loopback port with a random password, and gone at the end.

Found on PATH or in Debian's ``/usr/lib/postgresql/*/bin``; run as the ``postgres`` user when
this process is root (``initdb`` refuses root).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

HOW_TO_GET = (
    "PostgreSQL is needed: set VKR_TEST_POSTGRES_URL=postgresql://user:password@host:port/db "
    "(a server the tests may create databases on), or install the server binaries "
    "(Debian: apt-get install postgresql) so initdb and pg_ctl are on PATH or in "
    "/usr/lib/postgresql/*/bin"
)


class PostgresUnavailable(RuntimeError):
    pass


def find_binaries() -> Path:
    """The folder holding initdb and pg_ctl."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if versions:
        return Path(versions[-1]).parent
    raise PostgresUnavailable(HOW_TO_GET)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayPostgres:
    """``start()`` returns the superuser's URL (``postgresql://postgres:PW@127.0.0.1:PORT/postgres``)."""

    def __init__(self, durable: bool = False) -> None:
        # Tests want speed (fsync off); a benchmark wants a server's real commit cost.
        self.durable = durable
        self.bin = find_binaries()
        self.password = secrets.token_hex(12)
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="vkr-postgres-"))
        self.data = self.root / "data"
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailable("running as root without runuser: " + HOW_TO_GET)
            self.as_postgres = [runuser, "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.as_postgres, *args], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise PostgresUnavailable(f"{Path(args[0]).name} failed: {' | '.join(tail)}")

    def start(self) -> str:
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(password_file, "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        password_file.unlink()
        self.start_server()
        return self.url

    def start_server(self) -> None:
        """Start the server on the cluster (again, after ``stop_server``)."""
        # Durability is not under test (a throwaway cluster): fsync off keeps tests fast.
        fast = "" if self.durable else " -c fsync=off -c synchronous_commit=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            f"-c max_connections=200{fast}",
            "start",
        )

    def stop_server(self) -> None:
        """Stop the server, keeping the cluster (a database outage, for tests)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        except PostgresUnavailable:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def create_database(admin_url: str, prefix: str = "vkr_test") -> str:
    """A new, empty database on the server of ``admin_url``; returns its URL."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin_url)
    user = params.get("user", "postgres")
    password = params.get("password")
    auth = f"{user}:{password}" if password else str(user)
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return f"postgresql://{auth}@{host}:{port}/{name}"


def drop_database(admin_url: str, url: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
