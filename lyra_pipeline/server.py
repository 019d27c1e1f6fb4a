"""A Prefect server on PostgreSQL for production-like runs (SQLite stalls under many concurrent task runs).

``lyra server start`` creates the database if it is missing and runs ``prefect server start`` with
``PREFECT_API_DATABASE_CONNECTION_URL`` pointing at it; the API listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request

from lyra_ops.errors import LyraConfigError

DEFAULT_DB_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/lyra_prefect"
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _split(db_url: str) -> tuple[str, str]:
    """(asyncpg DSN of the maintenance database 'postgres', database name) of a SQLAlchemy asyncpg URL."""
    m = re.match(r"^postgresql\+asyncpg://(?P<rest>[^/]+)/(?P<db>[^?]+)$", db_url)
    if not m or not _DB_NAME.match(m["db"]):
        raise LyraConfigError(f"database URL {db_url!r}: expected postgresql+asyncpg://USER[:PASSWORD]@HOST:PORT/NAME "
                              "with NAME made of letters, digits and underscores")
    return f"postgresql://{m['rest']}/postgres", m["db"]


def ensure_database(db_url: str = DEFAULT_DB_URL) -> bool:
    """Create the database of ``db_url`` if it does not exist. Returns True when it was created."""
    dsn, name = _split(db_url)  # a malformed URL is one line before asyncpg loads
    import asyncpg

    async def run() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except Exception as exc:  # noqa: BLE001
            raise LyraConfigError(f"cannot connect to PostgreSQL at {dsn} ({type(exc).__name__}: {exc}); is it "
                                  "running?") from None
        try:
            if await conn.fetchval("select 1 from pg_database where datname = $1", name):
                return False
            await conn.execute(f'create database "{name}"')  # name validated above
            return True
        finally:
            await conn.close()

    return asyncio.run(run())


def drop_database(db_url: str) -> None:
    import asyncpg

    dsn, name = _split(db_url)

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()

    asyncio.run(run())


def server_env(db_url: str, host: str, port: int) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": db_url, "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"), "DO_NOT_TRACK": "1"}


def start_server(db_url: str = DEFAULT_DB_URL, host: str = "127.0.0.1", port: int = 4200, *,
                 wait: float = 120.0, env_overrides: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """Create the database if needed, start ``prefect server start`` and wait until its API answers."""
    ensure_database(db_url)
    env = {**server_env(db_url, host, port), **(env_overrides or {})}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                            env=env, **popen)
    deadline = time.time() + wait
    url = f"http://{host}:{port}/api/health"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LyraConfigError(f"prefect server exited with code {proc.returncode} before answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise LyraConfigError(f"prefect server did not answer on {url} within {wait:.0f} s")
