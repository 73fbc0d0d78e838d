"""Shared test fixtures: a recording queue and an SmtpEdge running in its own thread.

Blocking clients (smtplib, swaks, smtp-source, openssl) talk to an edge whose
event loop runs in a background thread, over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import threading

import pytest

from slimta.queue import QueueError


class RecordingQueue:
    """Stands in for a Queue: keeps every envelope it is given.

    ``fail_with`` makes enqueue answer with that QueueError; ``raise_exc``
    makes it raise.
    """

    def __init__(self):
        self.envelopes = []
        self.fail_with: QueueError | None = None
        self.raise_exc: BaseException | None = None
        self.delay = 0.0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    async def enqueue(self, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.raise_exc is not None:
            raise self.raise_exc
        if self.fail_with is not None:
            return [(envelope, self.fail_with)]
        with self._lock:
            self.envelopes.append(envelope)
            qid = f"q{next(self._ids):06d}"
        return [(envelope, qid)]


class EdgeThread:
    """Runs ``factory(queue)`` (which returns an edge) on an event loop in a thread."""

    def __init__(self, factory, queue=None):
        self.factory = factory
        self.queue = queue if queue is not None else RecordingQueue()
        self.loop = asyncio.new_event_loop()
        self.edge = None
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._start_edge)
        self.loop.run_forever()

    def _start_edge(self):
        # start() inside the running loop, as an application would
        try:
            self.edge = self.factory(self.queue)
            self.edge.start()
        except BaseException as exc:  # surfaced in start()
            self._error = exc
            self.edge = None
            self.loop.stop()
        self._ready.set()

    def start(self):
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.edge.address[1]

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        if self.edge is not None:
            try:
                self.call(self.edge.stop(), timeout=30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        self.loop.close()


@pytest.fixture
def recording_queue():
    return RecordingQueue()


@pytest.fixture
def run_edge():
    """``run_edge(**kwargs)`` starts SmtpEdge(('127.0.0.1', 0), queue, **kwargs) in a thread.

    Returns the EdgeThread (``.port``, ``.queue``, ``.edge``); stopped at teardown.
    Pass ``queue=`` to use another queue object, ``edge_class=`` for another class.
    """
    from slimta.edge.smtp import SmtpEdge

    started = []

    def start(queue=None, edge_class=SmtpEdge, listener=("127.0.0.1", 0), **kwargs):
        runner = EdgeThread(lambda q: edge_class(listener, q, **kwargs), queue)
        runner.start()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory):
    """A self-signed certificate for localhost: (certfile, keyfile) in one PEM file."""
    d = tmp_path_factory.mktemp("tls")
    pem = d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-nodes", "-subj", "/CN=localhost", "-newkey", "rsa:2048",
         "-keyout", str(pem), "-out", str(pem), "-days", "2"],
        check=True, capture_output=True,
    )
    return str(pem), str(pem)


@pytest.fixture
def server_tls_context(tls_cert):
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_cert)
    return ctx


@pytest.fixture
def client_tls_context():
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def require_tool(name: str) -> str:
    """The path of a program the tests need; fails (never skips) when it is missing.

    CI must not pass quietly without the real peers (see .ci/run).
    """
    path = shutil.which(name)
    if path is None and os.path.exists(f"/usr/sbin/{name}"):
        path = f"/usr/sbin/{name}"
    if path is None:
        pytest.fail(f"required program {name!r} is not installed (see .ci/run)")
    return path


@pytest.fixture
def tool():
    """``tool(name)`` is ``require_tool(name)``: for test modules that cannot import conftest."""
    return require_tool


@pytest.fixture
def dnsmasq():
    """``dnsmasq(records)`` starts dnsmasq on 127.0.0.1 with those options: a DnsServer.

    See tests/dnsmasq.py. Stopped at teardown; ``server.install()`` makes it the
    process-wide resolver until then.
    """
    from dnsmasq import DnsmasqFactory

    with DnsmasqFactory() as start:
        yield start


@pytest.fixture
def smtp_sink():
    """``smtp_sink(*options, host=, port=)`` starts Postfix's smtp-sink (tests/smtpsink.py).

    Default: 127.0.0.1 on a free port. Any 127.x.y.z address works for MX tests.
    """
    from smtpsink import SmtpSink

    binary = require_tool("smtp-sink")
    sinks = []

    def start(*options, host="127.0.0.1", port=None):
        sink = SmtpSink(binary, list(options), host=host, port=port)
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()


@pytest.fixture
def redis_prefix(request):
    """A unique Redis key prefix (``test:<module>:<uuid>:``, the module's name without
    ``test_``); every key under it on the local Redis is deleted afterwards."""
    import uuid

    import redis.asyncio as aioredis

    module = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    p = f"test:{module}:{uuid.uuid4().hex}:"
    yield p

    async def clean():
        client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
        try:
            keys = [k async for k in client.scan_iter(match=p + "*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    asyncio.run(clean())


PG_DSN = os.environ.get("SLIMTA_TEST_PG", "postgresql://127.0.0.1:5432/test")


@pytest.fixture
def pg_schema(request):
    """A unique PostgreSQL schema name (``t_<module>_<hex>``) on the local ``test`` database,
    dropped with everything in it afterwards. Fails (never skips) without PostgreSQL."""
    import uuid

    import psycopg

    try:
        psycopg.connect(PG_DSN, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required at {PG_DSN}: {exc}")
    module = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    name = f"t_{module}_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture(params=["postgres", "redis"])
def shared_queue_keys(request):
    """The storage keys of a config's queue section for a new, empty shared queue
    (YAML lines indented for a queue entry: ``q:\\n    <keys>``)."""
    if request.param == "postgres":
        schema = request.getfixturevalue("pg_schema")
        return f"type: postgres\n    dsn: '{PG_DSN}'\n    schema: {schema}"
    prefix = request.getfixturevalue("redis_prefix")
    return f"type: redis\n    url: 'redis://127.0.0.1:6379/0'\n    prefix: '{prefix}'"
