"""SqlLookup: the first row a parameterised SQL query returns, from SQLite or PostgreSQL.

The query gets the lookup's keyword arguments as *named parameters*, never
pasted into the SQL text, so an address such as ``x' OR '1'='1`` is only ever
a value. Write them in the driver's style:

* SQLite (:mod:`sqlite3`, run in a worker thread):
  ``SELECT alias FROM aliases WHERE address = :address``
* PostgreSQL (psycopg 3, asynchronous, with a connection pool):
  ``SELECT alias FROM aliases WHERE address = %(address)s``

The first row comes back as a dict of column names to values; no row is
``None``. Database errors raise :class:`~slimta.lookup.LookupError`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

from slimta.lookup import Lookup, LookupError

__all__ = ["SqlLookup"]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class SqlLookup(Lookup):
    """The first row of ``query`` run with the lookup's keyword arguments as named parameters.

    ``database`` is a ``postgresql://`` (or ``postgres://``) URL or a
    libpq ``key=value`` string with ``postgres=True``, for PostgreSQL; else a
    SQLite file name (``':memory:'`` works too, or a ``sqlite:///path`` URL).
    With ``key_template``, a parameter ``key`` filled from it is passed as
    well. PostgreSQL connections come from a pool of ``min_size`` to
    ``max_size`` connections, opened on the first lookup (in the running
    event loop) and closed by :meth:`close`; each query runs in autocommit
    mode. The SQLite connection is opened on the first lookup and used by one
    thread at a time.
    """

    def __init__(
        self,
        database: str,
        query: str,
        key_template: str | None = None,
        *,
        postgres: bool | None = None,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(key_template)
        self.query = query
        if postgres is None:
            postgres = database.startswith(_POSTGRES_SCHEMES)
        self.postgres = postgres
        if not postgres and database.startswith("sqlite://"):
            database = database[len("sqlite://"):]
            if database.startswith("/") and database[1:] == ":memory:":
                database = ":memory:"
        self.database = database
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self._pool: Any = None
        self._pool_lock: asyncio.Lock | None = None
        self._sqlite: sqlite3.Connection | None = None
        self._sqlite_lock = threading.Lock()

    def _params(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        params = dict(kwargs)
        if self.key_template is not None:
            params["key"] = self.format_key(**kwargs)
        return params

    async def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        params = self._params(kwargs)
        if self.postgres:
            return await self._lookup_postgres(params)
        return await asyncio.to_thread(self._lookup_sqlite, params)

    # --- SQLite ------------------------------------------------------------

    def _lookup_sqlite(self, params: dict[str, Any]) -> dict[str, Any] | None:
        with self._sqlite_lock:
            try:
                if self._sqlite is None:
                    conn = sqlite3.connect(
                        self.database, timeout=self.timeout, check_same_thread=False
                    )
                    conn.row_factory = sqlite3.Row
                    self._sqlite = conn
                row = self._sqlite.execute(self.query, params).fetchone()
            except sqlite3.Error as exc:
                raise LookupError(f"SQLite lookup in {self.database!r} failed: {exc}") from exc
            return dict(row) if row is not None else None

    # --- PostgreSQL --------------------------------------------------------

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                from psycopg_pool import AsyncConnectionPool

                pool = AsyncConnectionPool(
                    self.database,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.timeout,
                    kwargs={"autocommit": True},
                    open=False,
                )
                await pool.open()
                self._pool = pool
        return self._pool

    async def _lookup_postgres(self, params: dict[str, Any]) -> dict[str, Any] | None:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import PoolTimeout

        try:
            pool = await self._get_pool()
            async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(self.query, params)
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise LookupError(f"PostgreSQL lookup failed: {exc}") from exc
        return dict(row) if row is not None else None

    async def close(self) -> None:
        """Close the PostgreSQL pool or the SQLite connection."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        with self._sqlite_lock:
            conn, self._sqlite = self._sqlite, None
        if conn is not None:
            conn.close()
