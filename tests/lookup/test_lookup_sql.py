"""Tests for slimta.lookup.sql.SqlLookup: SQLite files and the PostgreSQL server on this machine.

PostgreSQL runs on 127.0.0.1:5432 (database ``test``, trust auth); the tests
fail, never skip, when it cannot be reached. Each test makes a table of its
own and drops it.
"""

from __future__ import annotations

import sqlite3
import uuid

import psycopg
import pytest

from slimta.lookup import LookupError
from slimta.lookup.sql import SqlLookup

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
ROWS = [
    ("alice@example.com", "al@example.net", "{PLAIN}secret"),
    ("bob@example.com", None, "{PLAIN}hunter2"),
]
INJECTION = "x' OR '1'='1"


@pytest.fixture
def sqlite_db(tmp_path):
    path = str(tmp_path / "users.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (address TEXT PRIMARY KEY, alias TEXT, password TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?, ?)", ROWS)
    conn.close()
    return path


@pytest.fixture
def pg_table():
    table = f"slimta_lookup_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (address TEXT PRIMARY KEY, alias TEXT, password TEXT)"
        )
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s)", ROWS)
    yield table
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


async def check_rows_as_dicts(lookup: SqlLookup) -> None:
    """``lookup`` selects alias and password of ROWS by address; closed afterwards."""
    try:
        assert await lookup.lookup_address("alice@example.com") == {
            "alias": "al@example.net", "password": "{PLAIN}secret"}
        assert await lookup.lookup_address("bob@example.com") == {
            "alias": None, "password": "{PLAIN}hunter2"}
        assert await lookup.lookup_address("carol@example.com") is None
    finally:
        await lookup.close()


# --- SQLite -----------------------------------------------------------------------


async def test_sqlite_row_as_dict(sqlite_db):
    lookup = SqlLookup(sqlite_db, "SELECT alias, password FROM users WHERE address = :address")
    await check_rows_as_dicts(lookup)


async def test_sqlite_url_and_key_template(sqlite_db):
    lookup = SqlLookup(f"sqlite://{sqlite_db}", "SELECT alias FROM users WHERE address = :key",
                       "{localpart}@example.com")
    async with lookup:
        assert await lookup.lookup_address("alice@elsewhere.example") == {
            "alias": "al@example.net"}


async def test_sqlite_injection_stays_a_parameter(sqlite_db):
    lookup = SqlLookup(sqlite_db, "SELECT address FROM users WHERE address = :address")
    async with lookup:
        assert await lookup.lookup(address=INJECTION) is None
        assert await lookup.lookup(address="'; DROP TABLE users; --") is None
        assert await lookup.lookup(address="bob@example.com") == {"address": "bob@example.com"}


async def test_sqlite_errors_raise_lookup_error(sqlite_db, tmp_path):
    async with SqlLookup(sqlite_db, "SELECT * FROM nosuchtable WHERE a = :address") as lookup:
        with pytest.raises(LookupError, match="SQLite lookup"):
            await lookup.lookup(address="a")
    # a named parameter the caller did not give
    async with SqlLookup(sqlite_db, "SELECT * FROM users WHERE address = :user") as lookup:
        with pytest.raises(LookupError):
            await lookup.lookup(address="a")
    missing = str(tmp_path / "no" / "such.db")
    async with SqlLookup(missing, "SELECT 1 WHERE :address") as lookup:
        with pytest.raises(LookupError):
            await lookup.lookup(address="a")


# --- PostgreSQL -------------------------------------------------------------------


async def test_postgres_row_as_dict(pg_table):
    lookup = SqlLookup(
        PG_URL, f"SELECT alias, password FROM {pg_table} WHERE address = %(address)s"
    )
    assert lookup.postgres
    await check_rows_as_dicts(lookup)


async def test_postgres_pool_serves_concurrent_lookups(pg_table):
    import asyncio

    lookup = SqlLookup(PG_URL, f"SELECT address FROM {pg_table} WHERE address = %(address)s",
                       max_size=2)
    async with lookup:
        addresses = ["alice@example.com", "bob@example.com", "carol@example.com"] * 5
        results = await asyncio.gather(*(lookup.lookup_address(a) for a in addresses))
    assert results == [{"address": "alice@example.com"}, {"address": "bob@example.com"},
                       None] * 5
    assert lookup._pool is None  # closed


async def test_postgres_key_template_and_libpq_string(pg_table):
    lookup = SqlLookup("host=127.0.0.1 port=5432 dbname=test user=postgres",
                       f"SELECT alias FROM {pg_table} WHERE address = %(key)s",
                       "{localpart}@example.com", postgres=True)
    async with lookup:
        assert await lookup.lookup_address("alice@x.example") == {"alias": "al@example.net"}


async def test_postgres_injection_stays_a_parameter(pg_table):
    lookup = SqlLookup(PG_URL, f"SELECT address FROM {pg_table} WHERE address = %(address)s")
    async with lookup:
        assert await lookup.lookup(address=INJECTION) is None
        assert await lookup.lookup(address=f"'; DROP TABLE {pg_table}; --") is None
        assert await lookup.lookup(address="bob@example.com") == {"address": "bob@example.com"}
    with psycopg.connect(PG_URL) as conn:
        assert conn.execute(f"SELECT count(*) FROM {pg_table}").fetchone() == (2,)


async def test_postgres_errors_raise_lookup_error(pg_table):
    async with SqlLookup(PG_URL, "SELECT * FROM slimta_no_such_table WHERE a = %(address)s") as lk:
        with pytest.raises(LookupError, match="PostgreSQL lookup failed"):
            await lk.lookup(address="a")
        # the pool survives a failed query
        lk.query = f"SELECT address FROM {pg_table} WHERE address = %(address)s"
        assert await lk.lookup(address="bob@example.com") == {"address": "bob@example.com"}


async def test_postgres_unreachable_raises_lookup_error():
    lookup = SqlLookup("postgresql://postgres@127.0.0.1:1/test", "SELECT 1", timeout=1.0)
    try:
        with pytest.raises(LookupError):
            await lookup.lookup(address="a")
    finally:
        await lookup.close()
