#!/usr/bin/env python3
"""slimta's SmtpEdge in front of a storing Queue on SqliteStorage, for the accept benchmark.

Every message is written by ``Queue.enqueue`` into ``SqliteStorage`` (WAL,
``synchronous=FULL``: flushed to disk) and the client gets its ``250`` only
after the transaction that holds it has been committed. The queue has no
relay, so it only stores (an edge-only process): what Postfix does with its
queue on hold. Nothing is logged per message.

    python bench/queue_sink.py [--port 2511] [--db PATH] [--pidfile PATH] [--uvloop | --no-uvloop]
    python bench/queue_sink.py --reset --db PATH [--pidfile PATH]   # empty the queue while it runs

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
before each run, as Postfix's reset empties its hold queue.
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

from benchloop import add_uvloop_option, loop_factory, stop_event

from slimta.edge.smtp import SmtpEdge
from slimta.queue import Queue
from slimta.queue.sqlite import SqliteStorage


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
                    help="empty the messages table of --db (the sink may be running) and exit")
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


class WriterStats:
    """What the storage's writer committed since the last report (bench only).

    Wraps the private ``SqliteStorage._run_batch`` of one instance to see
    the largest batch; the writer thread is its only caller.
    """

    def __init__(self, storage: SqliteStorage) -> None:
        self.storage = storage
        self.max = 0
        self._ops = self._commits = 0
        self._since = time.monotonic()
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
        print(f"since last report: {n} writes in {c} commits ({per} per commit, "
              f"max {self.max}) in {now - self._since:.1f} s", flush=True)
        self._ops, self._commits, self._since, self.max = ops, commits, now, 0


async def serve(args: argparse.Namespace, db: str, loop_name: str) -> None:
    storage = SqliteStorage(db)
    stats = WriterStats(storage)
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
    print(f"slimta SmtpEdge + Queue(SqliteStorage({db!r}), synchronous={storage.synchronous}) "
          f"on {args.host}:{args.port} loop={loop_name}", flush=True)
    try:
        await stopping.wait()
    finally:
        await edge.stop()
        await queue.stop()
        stats.report()
        if args.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(args.pidfile)
    print(f"stopped: {storage.operations} writes in {storage.commits} commits in all",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reset:
        if not args.db:
            print("--reset needs --db", file=sys.stderr)
            return 2
        return reset(args.db, args.pidfile)
    tmpdir = None
    db = args.db
    if db is None:
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
