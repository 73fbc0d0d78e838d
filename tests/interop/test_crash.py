"""Crash and restart: a message acknowledged with 250 is never lost, not even on kill -9.

A real process (SmtpEdge + Queue + SqliteStorage + MaildirRelay) takes mail
from parallel smtplib clients and is SIGKILLed at a random moment; after a
restart every message any client got a 250 for must reach the Maildir.
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import smtplib
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from daemons import free_port
from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.sqlite import SqliteStorage
from slimta.relay import Relay, TransientRelayError
from slimta.util.clock import ManualClock

SERVER = textwrap.dedent("""
    import asyncio, sys
    from slimta.edge.smtp import SmtpEdge
    from slimta.queue import Queue, exponential_backoff
    from slimta.queue.sqlite import SqliteStorage
    from slimta.relay.maildir import MaildirRelay

    async def main():
        db, maildir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
        queue = Queue(SqliteStorage(db), MaildirRelay(maildir), hostname="mx.test",
                      backoff=exponential_backoff(initial=0.5, maximum=1, jitter=0))
        queue.start()
        await queue.started()
        edge = SmtpEdge(("127.0.0.1", port), queue, hostname="mx.test")
        edge.start()
        await edge.started()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")

ID_RE = re.compile(rb"^X-Test-Id: (\S+)\r?$", re.M)


def start_server(tmp_path, port):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "queue.db"), str(tmp_path / "Maildir"),
         str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout.readline() == b"ready\n"
    return proc


def delivered_ids(maildir) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    new = os.path.join(maildir, "new")
    if not os.path.isdir(new):
        return counts
    for name in os.listdir(new):
        with open(os.path.join(new, name), "rb") as f:
            for m in ID_RE.finditer(f.read()):
                counts[m.group(1).decode()] += 1
    return counts


def load_client(port, worker, acked, stop, failed: list | None = None, timeout: float = 10):
    """Sessions of five messages each, until the server dies or we are told to stop.

    The id of each message goes into ``acked`` after its 250; a broken session's
    error into ``failed`` when given."""
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as client:
                for _ in range(5):
                    n += 1
                    msg_id = f"{worker}-{n}"
                    body = (f"From: load@example.com\r\nSubject: {msg_id}\r\n"
                            f"X-Test-Id: {msg_id}\r\n\r\n" + "x" * 900 + "\r\n")
                    client.sendmail("load@example.com", ["rcpt@example.com"], body)
                    acked.append(msg_id)  # only after the 250
        except (OSError, smtplib.SMTPException) as exc:
            if failed is not None:
                failed.append(repr(exc))
            if stop.is_set():
                return
            time.sleep(0.01)


def test_every_acknowledged_message_survives_kill_9(tmp_path, record_property):
    port = free_port()
    server = start_server(tmp_path, port)
    acked: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=load_client, args=(port, w, acked, stop), daemon=True)
               for w in range(12)]
    try:
        for t in clients:
            t.start()
        deadline = time.monotonic() + 30
        target = random.randint(300, 700)
        while len(acked) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.2))
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        stop.set()
        for t in clients:
            t.join(20)
        assert len(acked) >= 300, f"only {len(acked)} messages acknowledged before the kill"

        server = start_server(tmp_path, port)
        wanted = set(acked)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = delivered_ids(tmp_path / "Maildir")
            if wanted <= counts.keys():
                break
            time.sleep(0.2)
        counts = delivered_ids(tmp_path / "Maildir")
        missing = sorted(wanted - counts.keys())
        duplicates = sum(c - 1 for c in counts.values() if c > 1)
        record_property("acknowledged", len(acked))
        record_property("duplicates", duplicates)
        print(f"\ncrash test: {len(acked)} acknowledged, {len(counts)} delivered, "
              f"{len(missing)} lost, {duplicates} duplicates")
        assert not missing, f"lost {len(missing)} acknowledged messages: {missing[:10]}"
    finally:
        stop.set()
        server.kill()
        server.wait(10)


class RecordingRelay(Relay):
    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.order: list[str] = []

    def _attempt(self, envelope, attempts):
        if self.fail:
            raise TransientRelayError()
        self.order.append(envelope.sender)


@pytest.mark.parametrize("seed", [1, 2])
async def test_after_restart_mail_goes_out_in_order_of_next_attempt(tmp_path, seed):
    rng = random.Random(seed)
    clock = ManualClock()
    db = str(tmp_path / "queue.db")
    # the relay is down: every message is deferred, each with its own next attempt time
    delays = {f"s{i}@example.com": rng.uniform(10, 1000) for i in range(12)}
    down = RecordingRelay(fail=True)
    queue = Queue(SqliteStorage(db), down, clock=clock,
                  backoff=lambda env, attempts: delays[env.sender])
    queue.start()
    await queue.started()
    for sender in delays:
        env = Envelope(sender, ["r@example.com"])
        env.parse(b"Subject: x\r\n\r\nbody\r\n")
        await queue.enqueue(env)
        await queue.join()
    await queue.stop()

    await clock.advance(5000)  # everything is due when the new process starts
    up = RecordingRelay()
    queue = Queue(SqliteStorage(db), up, clock=clock, relay_pool=1)
    queue.start()
    await queue.started()
    await queue.join()
    await queue.stop()
    assert up.order == sorted(delays, key=delays.get)
