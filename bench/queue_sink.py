#!/usr/bin/env python3
"""slimta's SmtpEdge in front of a storing Queue on SqliteStorage or PostgresStorage.

For the accept benchmark. Every message is written by ``Queue.enqueue`` into
the storage and the client gets its ``250`` only after the transaction that
holds it has been committed: ``SqliteStorage`` (WAL, ``synchronous=FULL``:
flushed to disk) by default, or with ``--storage postgres`` a
``PostgresStorage`` in schema ``--schema`` of the server ``--dsn`` (the
server's ``synchronous_commit``, printed at start: ``on`` means the WAL is
flushed before the commit is acknowledged). The queue has no relay, so it
only stores (an edge-only process): what Postfix does with its queue on
hold. Nothing is logged per message.

    python bench/queue_sink.py [--port 2511] [--db PATH] [--pidfile PATH] [--uvloop | --no-uvloop]
    python bench/queue_sink.py --reset --db PATH [--pidfile PATH]   # empty the queue while it runs
    python bench/queue_sink.py --storage postgres --dsn DSN [--schema S] [--port ...] ...
    python bench/queue_sink.py --storage postgres --dsn DSN [--schema S] --reset [--pidfile PATH]
    python bench/queue_sink.py --storage postgres --dsn DSN [--schema S] --drop  # DROP SCHEMA

Runs in the foreground until SIGTERM or SIGINT, then stops the edge and the
queue gracefully. Without ``--db`` the database goes into a fresh temporary
directory that is removed at exit. The event loop is uvloop when it can be
imported, unless ``--no-uvloop`` is given.

On SIGUSR1, and when it stops, it prints what the storage's writer did since
the last such line: operations (here: stored messages), the commits they
took, messages per commit (the group commit at work) and the largest batch,
e.g.::

    since last report: 20000 writes in 1093 commits (18.3 per commit, max 20) in 9.8 s

``--reset`` first sends SIGUSR1 to the pid in ``--pidfile`` (if given and
running), so each run's line lands in the sink's log, then deletes every row
of the ``messages`` table and truncates the write-ahead log (``PRAGMA
wal_checkpoint(TRUNCATE)``), from a connection of its own, while the sink
runs: SQLite's locks keep this safe, and a queue without a relay keeps
nothing of the stored messages in memory. The benchmark runs it, untimed,
before each run, as Postfix's reset empties its hold queue. With
``--storage postgres`` the reset is ``TRUNCATE <schema>.messages`` followed
by a ``CHECKPOINT`` (so a run does not pay for the previous run's dirty
pages), and ``--drop`` removes the whole schema (before and after the row).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from typing import Any

from benchloop import add_uvloop_option, loop_factory, stop_event

from slimta.edge.smtp import SmtpEdge
from slimta.queue import Queue
from slimta.queue.sqlite import SqliteStorage

DEFAULT_DSN = "postgresql://127.0.0.1:5432/test"
DEFAULT_SCHEMA = "slimta_bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2511)
    ap.add_argument("--db", default=None,
                    help="the queue database (default: queue.db in a fresh temporary directory)")
    ap.add_argument(
        "--hostname",
        default="bench.local",
        help="name in the banner and the queue (given, so there is no getfqdn() lookup)",
    )
    add_uvloop_option(ap)
    ap.add_argument("--pidfile", default=None,
                    help="the sink writes its pid here; --reset signals it (SIGUSR1: stats line)")
    ap.add_argument("--reset", action="store_true",
                    help="empty the messages table of --db or --schema (the sink may be"
                    " running) and exit")
    ap.add_argument("--storage", choices=("sqlite", "postgres"), default="sqlite",
                    help="SqliteStorage (default) or PostgresStorage")
    ap.add_argument("--dsn", default=DEFAULT_DSN,
                    help=f"PostgreSQL server for --storage postgres (default {DEFAULT_DSN})")
    ap.add_argument("--schema", default=DEFAULT_SCHEMA,
                    help=f"PostgreSQL schema of the queue (default {DEFAULT_SCHEMA})")
    ap.add_argument("--pool-size", type=int, default=10,
                    help="PostgresStorage pool_size (default 10)")
    ap.add_argument("--writers", type=int, default=None,
                    help="PostgresStorage writers (default: the storage's default)")
    ap.add_argument("--drop", action="store_true",
                    help="--storage postgres: drop --schema and everything in it, and exit")
    ap.add_argument("--pin-backends", action="store_true",
                    help="--storage postgres: pin the PostgreSQL server processes that serve"
                    " the sink's connections to the CPUs the sink may use (root, same host)")
    ap.add_argument("--info", action="store_true",
                    help="--storage postgres: print the server's version and durability"
                    " settings, and exit")
    return ap.parse_args(argv)


def signal_sink(pidfile: str | None) -> None:
    """Ask a running sink for its stats line (SIGUSR1), and give it a moment to print."""
    if not pidfile:
        return
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGUSR1)
    except (OSError, ValueError) as exc:
        print(f"reset: no sink to signal ({exc})", file=sys.stderr)
        return
    time.sleep(0.05)


def reset(path: str, pidfile: str | None = None) -> int:
    """Delete every stored message and truncate the WAL; print what was removed."""
    signal_sink(pidfile)
    if not os.path.exists(path):
        print(f"reset: {path} does not exist", file=sys.stderr)
        return 1
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    try:
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("BEGIN IMMEDIATE")
        deleted = conn.execute("DELETE FROM messages").rowcount
        conn.execute("COMMIT")
        busy, wal_pages, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    print(f"reset: deleted {deleted} messages; checkpoint busy={busy} "
          f"wal_pages={wal_pages} checkpointed={done}")
    return 0


def pg_quote(name: str) -> str:
    """``name`` as a quoted PostgreSQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def pg_reset(dsn: str, schema: str, pidfile: str | None = None) -> int:
    """TRUNCATE the schema's messages table and CHECKPOINT; print what was removed."""
    import psycopg

    signal_sink(pidfile)
    with psycopg.connect(dsn, autocommit=True) as conn:
        table = f"{pg_quote(schema)}.messages"
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            print(f"reset: {table} does not exist", file=sys.stderr)
            return 1
        count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        conn.execute(f"TRUNCATE {table}")
        try:
            conn.execute("CHECKPOINT")
            checkpoint = "done"
        except psycopg.Error as exc:  # needs superuser or pg_checkpoint
            checkpoint = f"skipped ({exc})"
    print(f"reset: truncated {count} messages from {table}; checkpoint {checkpoint}")
    return 0


def pg_info(dsn: str) -> str:
    """The server's version and the settings that decide durability, in one line."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        version, sync, fsync = conn.execute(
            "SELECT version(), current_setting('synchronous_commit'), current_setting('fsync')"
        ).fetchone()
    return (f"{version.split(' on ')[0]}, synchronous_commit={sync}, fsync={fsync};"
            f" psycopg {psycopg.__version__}")


def pg_drop(dsn: str, schema: str) -> int:
    """DROP SCHEMA ... CASCADE."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {pg_quote(schema)} CASCADE")
    print(f"dropped schema {schema}")
    return 0


class WriterStats:
    """What the storage's writer committed since the last report (bench only).

    For SqliteStorage it wraps the private ``_run_batch`` of one instance to
    see the largest batch (the writer thread is its only caller);
    PostgresStorage keeps ``max_batch_seen`` itself.
    """

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.max = 0
        self._ops = self._commits = 0
        self._since = time.monotonic()
        if isinstance(storage, SqliteStorage):
            run_batch = storage._run_batch

            def counting(conn, batch):
                n = len(batch)
                if n > self.max:
                    self.max = n
                return run_batch(conn, batch)

            storage._run_batch = counting

    def report(self) -> None:
        ops, commits = self.storage.operations, self.storage.commits
        n, c = ops - self._ops, commits - self._commits
        now = time.monotonic()
        per = f"{n / c:.1f}" if c else "-"
        largest = self.max
        if not isinstance(self.storage, SqliteStorage):
            largest, self.storage.max_batch_seen = self.storage.max_batch_seen, 0
        print(f"since last report: {n} writes in {c} commits ({per} per commit, "
              f"max {largest}) in {now - self._since:.1f} s", flush=True)
        self._ops, self._commits, self._since, self.max = ops, commits, now, 0


class BackendPinner:
    """Keeps the server processes of the sink's PostgreSQL connections on the sink's CPUs.

    The sink's connections carry ``application_name`` (``name``); every
    ``interval`` seconds the server processes with that name that are not
    pinned yet get the sink's own CPU affinity (``sched_setaffinity``: root,
    and the server on this host). So with ``taskset`` on the sink, slimta and
    the database work it causes share the server's CPU, as Postfix's and
    SqliteStorage's work does. The server's shared processes (WAL writer,
    checkpointer, ...) are left alone.
    """

    def __init__(self, dsn: str, name: str, interval: float = 0.5) -> None:
        self.dsn, self.name, self.interval = dsn, name, interval
        self.cpus = os.sched_getaffinity(0)
        self.pinned: set[int] = set()

    async def run(self) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.name,))
                for (pid,) in await cur.fetchall():
                    if pid in self.pinned:
                        continue
                    try:
                        os.sched_setaffinity(pid, self.cpus)
                    except OSError as exc:
                        print(f"pin-backends: cannot pin {pid}: {exc}", file=sys.stderr)
                    self.pinned.add(pid)
                    print(f"pin-backends: server process {pid} on CPUs {sorted(self.cpus)}",
                          flush=True)
                await asyncio.sleep(self.interval)


async def make_storage(args: argparse.Namespace, db: str) -> tuple[Any, str]:
    """The storage the sink uses, and how to describe it."""
    if args.storage == "sqlite":
        storage = SqliteStorage(db)
        return storage, f"SqliteStorage({db!r}), synchronous={storage.synchronous}"
    from slimta.queue.postgres import PostgresStorage

    dsn = args.dsn
    if args.pin_backends:
        from psycopg.conninfo import make_conninfo

        dsn = make_conninfo(dsn, application_name=f"slimta-queue-sink-{os.getpid()}")
    extra = {} if args.writers is None else {"writers": args.writers}
    storage = PostgresStorage(dsn, schema=args.schema, pool_size=args.pool_size, **extra)
    return storage, (f"PostgresStorage(schema={args.schema!r}, writers={storage.writers}),"
                     f" {pg_info(args.dsn)}")


async def serve(args: argparse.Namespace, db: str, loop_name: str) -> None:
    storage, described = await make_storage(args, db)
    stats = WriterStats(storage)
    pinner = None
    if args.storage == "postgres" and args.pin_backends:
        pinner = asyncio.get_running_loop().create_task(BackendPinner(
            storage.dsn, f"slimta-queue-sink-{os.getpid()}").run())
    queue = Queue(storage, relay=None, hostname=args.hostname)
    queue.start()
    await queue.started()
    edge = SmtpEdge((args.host, args.port), queue, hostname=args.hostname)
    edge.start()
    stopping = stop_event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stats.report)
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    print(f"slimta SmtpEdge + Queue({described}) "
          f"on {args.host}:{args.port} loop={loop_name}", flush=True)
    try:
        await stopping.wait()
    finally:
        await edge.stop()
        await queue.stop()
        if pinner is not None:
            pinner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinner
        stats.report()
        if args.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(args.pidfile)
    print(f"stopped: {storage.operations} writes in {storage.commits} commits in all",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.storage == "postgres":
        if args.info:
            print(pg_info(args.dsn))
            return 0
        if args.drop:
            return pg_drop(args.dsn, args.schema)
        if args.reset:
            return pg_reset(args.dsn, args.schema, args.pidfile)
    elif args.drop:
        print("--drop needs --storage postgres", file=sys.stderr)
        return 2
    if args.reset:
        if not args.db:
            print("--reset needs --db", file=sys.stderr)
            return 2
        return reset(args.db, args.pidfile)
    tmpdir = None
    db = args.db
    if db is None and args.storage == "sqlite":
        tmpdir = tempfile.mkdtemp(prefix="slimta-queue-sink-")
        db = os.path.join(tmpdir, "queue.db")
    factory, loop_name = loop_factory(args.uvloop)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(args, db, loop_name))
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
