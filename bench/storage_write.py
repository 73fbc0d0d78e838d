"""Durable write throughput of a queue storage, without SMTP: how fast ``write()`` returns.

``TASKS`` concurrent tasks each write ``COUNT`` messages of ``SIZE`` bytes
(an Envelope parsed from raw bytes, as the edge hands it over) and await each
write before the next, like SMTP sessions waiting for their 250. Prints the
median of ``--runs`` runs: messages/s, and for SqliteStorage the commits/s
and messages per commit (group commit at work).

    PYTHONPATH=src python bench/storage_write.py                      # 20 x 500 x 1 KB
    PYTHONPATH=src python bench/storage_write.py --size 102400 --count 100
    PYTHONPATH=src python bench/storage_write.py --tasks 1            # no concurrency
    PYTHONPATH=src python bench/storage_write.py --synchronous NORMAL --uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from slimta.envelope import Envelope
from slimta.queue.dict import DictStorage
from slimta.queue.sqlite import SqliteStorage


async def one_run(args: argparse.Namespace, directory: str, n: int) -> tuple[float, float, float]:
    if args.storage == "dict":
        store = DictStorage()
    else:
        store = SqliteStorage(os.path.join(directory, f"run{n}.db"), synchronous=args.synchronous)
    await store.open()
    head = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n"
    raw = head + b"x" * max(0, args.size - len(head))

    async def writer() -> None:
        for _ in range(args.count):
            env = Envelope("a@example.com", ["b@example.org"])
            env.parse(raw)
            await store.write(env, time.time())

    commits = getattr(store, "commits", 0)
    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(args.tasks)))
    elapsed = time.perf_counter() - start
    commits = getattr(store, "commits", 0) - commits
    await store.close()
    total = args.tasks * args.count
    return total / elapsed, commits / elapsed, total / commits if commits else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", choices=("sqlite", "dict"), default="sqlite")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--count", type=int, default=500, help="messages per task")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes")
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--dir", default=None, help="where the databases go (default: a temp dir)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        results = [asyncio.run(one_run(args, directory, n)) for n in range(args.runs)]
    rates = [r[0] for r in results]
    median = statistics.median(rates)
    line = (f"{args.storage} {args.tasks} tasks x {args.count} x {args.size} B: "
            f"{median:.0f} msg/s (runs: {', '.join(f'{r:.0f}' for r in rates)})")
    if args.storage == "sqlite":
        line += (f", synchronous={args.synchronous}, "
                 f"{statistics.median(r[1] for r in results):.0f} commits/s, "
                 f"{statistics.median(r[2] for r in results):.1f} msg/commit")
    print(line)


if __name__ == "__main__":
    main()
