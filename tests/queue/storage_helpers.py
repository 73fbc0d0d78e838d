"""What the queue storage tests share: a message with every kind of metadata, an
injected clock, the test servers' addresses and a watch() callback to wait on.

test_storage.py runs the QueueStorage contract on every storage,
test_shared_storage.py the SharedQueueStorage contract on every shared one; the
test_<storage>_storage.py files test only what is particular to one storage.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import slimta
from slimta.envelope import Envelope

#: the servers behind conftest.py's pg_schema and redis_prefix fixtures
PG_DSN = os.environ.get("SLIMTA_TEST_PG", "postgresql://127.0.0.1:5432/test")
REDIS_URL = "redis://127.0.0.1:6379/0"

RAW = (
    "From: Jörg <jörg@exämple.de>\r\n".encode()
    + b"Subject: caf\xe9 (latin-1 bytes)\r\n"
    + b"\r\n"
    + b"8-bit body \xff\xfe\x00\r\n.\r\nend\r\n"
)


class FakeClock:
    """A clock that moves one second at each reading (creation times in order)."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        self.now += 1
        return self.now


def make_envelope(raw: bytes = RAW, sender: str = "sender@example.com",
                  recipients: tuple[str, ...] = ("a@example.org", "b@example.org",
                                                 "c@example.org")) -> Envelope:
    env = Envelope(sender, [])
    for rcpt in recipients:
        env.add_recipient(rcpt)
    env.rcpt_params[recipients[0]] = {"notify": ["SUCCESS", "FAILURE"],
                                      "orcpt": f"rfc822;{recipients[0]}"}
    env.parse(raw)
    env.client.update(ip="192.0.2.1", host="client.example.com", name="client",
                      protocol="ESMTPS", auth=None)
    env.receiver = "mx.example.net"
    env.timestamp = 1700000000.5
    env.ret = "FULL"
    env.envid = "envid+1"
    env.smtputf8 = True
    env.body = "8BITMIME"
    return env


class Waker:
    """A watch() callback that counts its calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()

    async def wait(self, timeout: float = 1.0) -> None:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()

    async def quiet(self, seconds: float = 0.3) -> bool:
        """True when no call comes within ``seconds``."""
        self.event.clear()
        await asyncio.sleep(seconds)
        return not self.event.is_set()


# --- durability: close and reopen, kill -9 -------------------------------------------


async def write_a_history(store) -> str:
    """A message with one attempt recorded (and another one written and removed):
    what the storage, reopened, must still hold as :func:`assert_the_history` says."""
    qid = await store.write(make_envelope(), 42.0)
    gone = await store.write(make_envelope(), 43.0)
    await store.record_attempt(qid, 300.0, [1], "451 later")
    await store.remove(gone)
    return qid


async def assert_the_history(store, qid: str) -> None:
    stored = await store.get(qid)
    assert b"".join(stored.envelope.flatten()) == RAW
    assert stored.envelope.rcpt_params == make_envelope().rcpt_params
    assert (stored.attempts, stored.delivered, stored.timestamp, stored.last_reply) == (
        1, {1}, 300.0, "451 later")


WRITER = r"""
import asyncio, sys, time
from slimta.envelope import Envelope
%(imports)s

async def main(args):
    store = %(make)s
    await store.open()
    out = sys.stdout

    async def writer(n):
        for i in range(1_000_000):
            env = Envelope("a@example.com", [f"{n}.{i}@example.org"])
            env.parse(b"Subject: %%d.%%d\r\n\r\n" %% (n, i) + b"x" * 1000 + b"\r\n")
            qid = await store.write(env, time.time())
            out.write(f"{qid} {n}.{i}\n")
            out.flush()

    await asyncio.gather(*(writer(n) for n in range(20)))

asyncio.run(main(sys.argv[1:]))
"""


def kill_a_writer_mid_stream(imports: str, make: str, *args: str) -> dict[str, str]:
    """Run 20 concurrent writers in a child process on the storage that the Python
    expression ``make`` makes (after ``imports``; the strings ``args`` are ``args``),
    SIGKILL it once 600 writes were acknowledged (or after a minute), and return
    every acknowledged write (id -> tag), those it printed before it died included."""
    src = str(Path(slimta.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = WRITER % {"imports": imports, "make": make}
    proc = subprocess.Popen([sys.executable, "-c", child, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    acknowledged: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:  # kill it mid-stream
            qid, tag = line.decode().split()
            acknowledged[qid] = tag
            if len(acknowledged) >= 600 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # what it printed before it died was acknowledged too
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    for line in rest.split(b"\n")[:-1]:  # complete lines only
        qid, tag = line.decode().split()
        acknowledged[qid] = tag
    assert len(acknowledged) >= 600
    return acknowledged


async def assert_every_acknowledged_write_is_stored(store, acknowledged: dict[str, str]) -> None:
    stored_ids = {qid for _, qid in await store.load()}
    missing = set(acknowledged) - stored_ids
    assert not missing, f"{len(missing)} acknowledged messages lost"
    for qid, tag in itertools.islice(acknowledged.items(), 0, None, 50):
        message = await store.get(qid)
        assert message.envelope.recipients == [f"{tag}@example.org"]
        assert message.envelope.headers["Subject"] == tag
