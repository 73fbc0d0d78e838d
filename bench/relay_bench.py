#!/usr/bin/env python3
"""Helpers of bench/relay_throughput.sh: fill and drain slimta's queue, time Postfix's drain.

    relay_bench.py fill --db PATH --template FILE -n N
        Store N copies of the message in FILE (sender and recipient given by
        --sender/--rcpt) into a fresh SqliteStorage, through a Queue without a
        relay (store only, as an edge-only process would). Untimed.

    relay_bench.py deliver --db PATH --port P -n N [--relay-pool 20] [--pool-size 20]
                           [--uvloop | --no-uvloop] [--log FILE]
        The timed slimta run: start a Queue with StaticSmtpRelay(127.0.0.1, P) on
        the filled storage (it opens the database, loads the schedule and
        delivers everything due), wait for ``queue.join()``, then check with
        ``queue.stats()`` that the storage is empty. Prints one JSON line.

    relay_bench.py postfix-run --etc DIR --queue DIR -n N
        The timed Postfix run: ``postsuper -H ALL`` (release the held
        messages into the deferred queue) and ``postqueue -f`` (deliver the
        deferred queue now), then poll until no message is left in the
        instance's queue directories. Prints one JSON line.

    relay_bench.py quiet [--max-wait 600] [--busy 15]
        Wait until the machine is quiet: no smtp_accept.sh, smtp-source,
        storage_write.py, pytest or other relay benchmark running, and all
        CPUs together less than --busy % busy over 2 s. Exit 0 when quiet,
        1 when --max-wait ran out.

    relay_bench.py summarize results.tsv
        The Markdown tables: median (min-max) msgs/s per row and the ratio of
        the medians slimta / Postfix (target >= 1.0).

Both timed runs report the busy share of CPU 0 and 1 over the timed
interval (from /proc/stat) and the steal time, so a run disturbed by the
host shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time

from benchloop import add_uvloop_option, loop_factory

# ---- /proc/stat ---------------------------------------------------------------------


def cpu_times() -> dict[str, list[int]]:
    """Jiffies per CPU line of /proc/stat (``cpu``, ``cpu0``, ``cpu1``, ...)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *fields = line.split()
            out[name] = [int(x) for x in fields[:8]]
    return out


def cpu_usage(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, float]:
    """Busy % per CPU (everything but idle and iowait) and steal % of all CPUs."""
    usage = {}
    for name in after:
        if name not in before:
            continue
        delta = [a - b for a, b in zip(after[name], before[name], strict=True)]
        total = sum(delta)
        if total <= 0:
            continue
        idle = delta[3] + delta[4]
        if name == "cpu":
            usage["busy_all"] = round(100.0 * (total - idle) / total, 1)
            usage["steal"] = round(100.0 * delta[7] / total, 1)
        else:
            usage[f"busy_{name}"] = round(100.0 * (total - idle) / total, 1)
    return usage


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each thread of this process, by name."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    names[os.getpid()] = "main"
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # the SQLite threads: slimta-sqlite-writer, slimta-sqlite-reader-N
        name = names.get(int(tid), "other").replace("slimta-sqlite-", "")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


# ---- fill ----------------------------------------------------------------------------


def read_template(path: str) -> bytes:
    """The message bytes, with CRLF line endings (as an SMTP edge stores them)."""
    with open(path, "rb") as f:
        data = f.read()
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data


async def fill(args: argparse.Namespace) -> int:
    from slimta.envelope import Envelope
    from slimta.queue import Queue
    from slimta.queue.sqlite import SqliteStorage

    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(args.db + suffix):
            os.unlink(args.db + suffix)
    raw = read_template(args.template)
    store = SqliteStorage(args.db)
    queue = Queue(store, relay=None, hostname="bench.local")
    queue.start()
    await queue.started()
    stored = 0

    async def one() -> None:
        nonlocal stored
        env = Envelope(args.sender, [args.rcpt])
        env.parse(raw)
        for _, result in await queue.enqueue(env):
            if isinstance(result, str):
                stored += 1

    start = time.perf_counter()
    for base in range(0, args.n, args.batch):
        await asyncio.gather(*(one() for _ in range(min(args.batch, args.n - base))))
    elapsed = time.perf_counter() - start
    stats = await queue.stats()
    await queue.stop()
    print(f"fill: stored {stored} messages of {len(raw)} bytes in {elapsed:.2f} s "
          f"({stats['messages']} in the storage)", file=sys.stderr)
    return 0 if stored == args.n == stats["messages"] else 1


# ---- deliver ----------------------------------------------------------------------------


async def deliver(args: argparse.Namespace, loop_name: str) -> dict:
    from slimta.queue import Queue
    from slimta.queue.sqlite import SqliteStorage
    from slimta.relay.smtp.static import StaticSmtpRelay

    class CountingRelay(StaticSmtpRelay):
        """StaticSmtpRelay that counts recipients the sink accepted (a 2xx reply)."""

        accepted = 0

        async def _attempt(self, envelope, attempts):
            results = await self.pool.deliver(envelope)
            for result in results.values():
                if getattr(result, "code", "")[:1] == "2":
                    self.accepted += 1
            return results

    relay = CountingRelay(args.host, args.port, pool_size=args.pool_size, ehlo_as="bench.local")
    store = SqliteStorage(args.db)
    queue = Queue(store, relay, relay_pool=args.relay_pool, hostname="bench.local")
    cpu0, t_cpu0, threads0 = cpu_times(), os.times(), thread_cpu()
    start = time.perf_counter()
    queue.start()
    await queue.join()
    elapsed = time.perf_counter() - start
    cpu1, t_cpu1, threads1 = cpu_times(), os.times(), thread_cpu()
    stats = await queue.stats()
    await queue.stop()
    await relay.close()
    proc_cpu = (t_cpu1.user - t_cpu0.user) + (t_cpu1.system - t_cpu0.system)
    result = {
        "row": "slimta",
        "n": args.n,
        "delivered": relay.accepted,
        "left": stats["messages"],
        "seconds": round(elapsed, 4),
        "rate": round(relay.accepted / elapsed, 1),
        "proc_cpu_us_per_msg": round(1e6 * proc_cpu / max(1, relay.accepted), 1),
        # CPU per message of the event loop's thread and of the storage's threads
        "thread_cpu_us_per_msg": {
            name: round(1e6 * (used - threads0.get(name, 0.0)) / max(1, relay.accepted), 1)
            for name, used in sorted(threads1.items())
        },
        "commits": store.commits,
        "loop": loop_name,
        "relay_pool": args.relay_pool,
        "pool_size": args.pool_size,
    }
    result.update(cpu_usage(cpu0, cpu1))
    result["ok"] = relay.accepted == args.n and stats["messages"] == 0
    return result


# ---- postfix -----------------------------------------------------------------------------

#: Postfix's message queues (``defer``, ``bounce``, ``trace`` and ``flush``
#: hold logs about messages, not messages).
PF_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


def pf_has_mail(queue_dir: str) -> bool:
    """Whether any message file is left: stops at the first one, so a poll costs little."""
    stack = [os.path.join(queue_dir, q) for q in PF_QUEUES]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        return True
        except FileNotFoundError:
            continue
    return False


def pf_count(queue_dir: str, queues=PF_QUEUES) -> int:
    n = 0
    for q in queues:
        for _, _, files in os.walk(os.path.join(queue_dir, q)):
            n += len(files)
    return n


def postfix_run(args: argparse.Namespace) -> dict:
    held = pf_count(args.queue, ("hold",))
    cpu0 = cpu_times()
    start = time.perf_counter()
    subprocess.run(["postsuper", "-c", args.etc, "-H", "ALL"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["postqueue", "-c", args.etc, "-f"], check=True)
    released = time.perf_counter() - start
    deadline = start + args.timeout
    while pf_has_mail(args.queue):
        if time.perf_counter() > deadline:
            break
        time.sleep(args.poll)
    elapsed = time.perf_counter() - start
    cpu1 = cpu_times()
    left = pf_count(args.queue)
    result = {
        "row": "postfix",
        "n": args.n,
        "held_at_start": held,
        "left": left,
        "seconds": round(elapsed, 4),
        "release_seconds": round(released, 4),  # postsuper -H ALL and postqueue -f
        # delivered is checked afterwards from the log; until then assume all that left
        "delivered": held - left,
        "rate": round((held - left) / elapsed, 1),
    }
    result.update(cpu_usage(cpu0, cpu1))
    result["ok"] = held == args.n and left == 0
    return result


# ---- quiet -----------------------------------------------------------------------------------

BUSY_PATTERNS = (
    "smtp_accept.sh", "smtp-source", "relay_throughput.sh", "storage_write.py", "pytest",
)


def others_running() -> list[str]:
    """Benchmark processes that are not this one's ancestors."""
    mine = set()
    pid = os.getpid()
    while pid > 1:
        mine.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(p in cmd for p in BUSY_PATTERNS):
            found.append(f"{name}: {cmd[:120]}")
    return found


def quiet(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.max_wait
    said = None
    while True:
        others = others_running()
        before = cpu_times()
        time.sleep(2)
        busy = cpu_usage(before, cpu_times()).get("busy_all", 100.0)
        if not others and busy < args.busy:
            print(f"quiet: CPUs {busy:.0f}% busy, no other benchmark running", file=sys.stderr)
            return 0
        why = f"{len(others)} benchmark process(es)" if others else f"CPUs {busy:.0f}% busy"
        if why != said:
            detail = ("; " + "; ".join(others[:3])) if others else ""
            print(f"quiet: waiting ({why}{detail})", file=sys.stderr)
            said = why
        if time.monotonic() > deadline:
            print(f"quiet: still not quiet after {args.max_wait:.0f} s ({why})", file=sys.stderr)
            return 1
        time.sleep(max(0.0, args.interval - 2))


# ---- summarize -----------------------------------------------------------------------------


def summarize(args: argparse.Namespace) -> int:
    rows: dict[str, list[dict]] = {}
    with open(args.tsv) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line.split("\t")[-1])
            rows.setdefault(rec["row"], []).append(rec)

    def fmt(x: float) -> str:
        return f"{x:,.0f}"

    print("| row | runs ok | msgs/s median (min-max) | seconds (median) "
          "| CPU 1 busy % (senders) | CPU 0 busy % (sink) | steal % |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for name in sorted(rows, key=lambda r: (r != "postfix", r)):
        good = [r for r in rows[name] if r.get("ok")]
        if not good:
            print(f"| {name} | 0/{len(rows[name])} | - | - | - | - | - |")
            continue
        rates = [r["rate"] for r in good]
        medians[name] = statistics.median(rates)

        def med(key: str, recs=good) -> str:
            vals = [r[key] for r in recs if key in r]
            return f"{statistics.median(vals):.0f}" if vals else "-"

        print(f"| {name} | {len(good)}/{len(rows[name])} | **{fmt(medians[name])}** "
              f"({fmt(min(rates))}-{fmt(max(rates))}) "
              f"| {statistics.median(r['seconds'] for r in good):.2f} "
              f"| {med('busy_cpu1')} | {med('busy_cpu0')} | {med('steal')} |")
    print()
    base = medians.get("postfix")
    status = 0
    if base:
        print("| ratio of medians | value | target |")
        print("|---|---|---|")
        for name, value in medians.items():
            if name == "postfix":
                continue
            ratio = value / base
            met = ratio >= args.target
            if name == "slimta":  # the row the target is for; the others inform
                status |= 0 if met else 1
            print(f"| {name} / postfix | **{ratio:.2f}x** | >= {args.target:.1f}x "
                  f"({'met' if met else 'missed'}) |")
    else:
        print("(no successful Postfix run: no ratio)")
        status = 1
    print()
    print("Every run (in order):")
    print()
    with open(args.tsv) as f:
        for line in f:
            if line.strip():
                print(f"    {line.rstrip()}")
    return status if args.check else 0


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fill")
    p.add_argument("--db", required=True)
    p.add_argument("--template", required=True)
    p.add_argument("-n", type=int, required=True)
    p.add_argument("--sender", default="bench-from@example.com")
    p.add_argument("--rcpt", default="bench-to@example.org")
    p.add_argument("--batch", type=int, default=100, help="concurrent enqueues")

    p = sub.add_parser("deliver")
    p.add_argument("--db", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, required=True, help="messages expected")
    p.add_argument("--relay-pool", type=int, default=20)
    p.add_argument("--pool-size", type=int, default=20)
    add_uvloop_option(p)
    p.add_argument("--log", default=None,
                   help="log at INFO to this file (as the slimta daemon logs); default: no log")

    p = sub.add_parser("postfix-run")
    p.add_argument("--etc", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("-n", type=int, required=True)
    p.add_argument("--poll", type=float, default=0.005)
    p.add_argument("--timeout", type=float, default=600.0)

    p = sub.add_parser("quiet")
    p.add_argument("--max-wait", type=float, default=600.0)
    p.add_argument("--busy", type=float, default=15.0)
    p.add_argument("--interval", type=float, default=5.0)

    p = sub.add_parser("summarize")
    p.add_argument("tsv")
    p.add_argument("--target", type=float, default=1.0)
    p.add_argument("--check", action="store_true", help="exit 1 when the target is missed")

    args = ap.parse_args(argv)
    if args.cmd == "fill":
        return asyncio.run(fill(args))
    if args.cmd == "deliver":
        if args.log:
            logging.basicConfig(filename=args.log, level=logging.INFO,
                                format="%(asctime)s %(name)s %(message)s")
        factory, loop_name = loop_factory(args.uvloop)
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(deliver(args, loop_name))
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if args.cmd == "postfix-run":
        result = postfix_run(args)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if args.cmd == "quiet":
        return quiet(args)
    return summarize(args)


if __name__ == "__main__":
    sys.exit(main())
