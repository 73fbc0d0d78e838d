"""HttpRelay against a real HttpEdge, and against a small aiohttp server for odd answers."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from conftest import RecordingQueue
from daemons import free_port
from slimta.edge.http import HttpEdge, HttpValidators
from slimta.envelope import Envelope
from slimta.queue import QueueError
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.http import HttpRelay, parse_reply_header
from slimta.smtp.reply import Reply

MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def envelope(sender="a@example.com", recipients=("b@example.com",), data=MESSAGE) -> Envelope:
    env = Envelope(sender, list(recipients))
    env.parse(data)
    return env


class OddServer:
    """An aiohttp server answering what ``answer(request)`` returns; records peers and requests."""

    def __init__(self, answer):
        self.answer = answer
        self.peers: list = []
        self.requests: list = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.peers.append(request.transport.get_extra_info("peername"))
        self.requests.append((request.headers.copy(), await request.read()))
        result = self.answer(request)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def __aenter__(self):
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/mail"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


@pytest.mark.parametrize(("value", "expected"), [
    ('250; message="2.6.0 Message queued as q1"', Reply("250", "2.6.0 Message queued as q1")),
    ('  451 ;message = "4.3.0 Error queuing message"', Reply("451", "4.3.0 Error queuing message")),
    ('550; message="5.7.1 say \\"no\\" \\\\o/"', Reply("550", '5.7.1 say "no" \\o/')),
    ('550; command="RCPT"; message="5.1.1 Unknown"', Reply("550", "5.1.1 Unknown")),
    ("554; message=plain", Reply("554", "plain")),
    ("250", Reply("250", "")),
    ("", None), (None, None), ("nonsense", None), ("999; message=\"x\"", None),
])
def test_parse_reply_header(value, expected):
    assert parse_reply_header(value) == expected


def test_bad_url():
    with pytest.raises(ValueError):
        HttpRelay("ftp://example.com/")
    assert HttpRelay("example.com:8025/mail").url == "http://example.com:8025/mail"


# --- against HttpEdge ----------------------------------------------------------------

async def test_delivers_to_http_edge():
    queue = RecordingQueue()
    async with HttpEdge(("127.0.0.1", 0), queue, uri_pattern="/mail$") as edge, \
            HttpRelay(f"http://127.0.0.1:{edge.address[1]}/mail", ehlo_as="relay.test") as relay:
        env = envelope(recipients=["b@example.com", "ü@exämple.test", "c@example.com"])
        reply = await relay.attempt(env, 0)
    assert reply == Reply("250", "2.6.0 Message queued as q000001")
    [got] = queue.envelopes
    assert got.sender == "a@example.com"
    assert got.recipients == ["b@example.com", "ü@exämple.test", "c@example.com"]
    assert got.smtputf8 is True
    assert got.client["name"] == "relay.test" and got.client["protocol"] == "HTTP"
    assert b"".join(got.flatten()) == MESSAGE


async def test_null_sender_and_callable_ehlo():
    queue = RecordingQueue()
    async with HttpEdge(("127.0.0.1", 0), queue) as edge, \
            HttpRelay(f"http://127.0.0.1:{edge.address[1]}/", ehlo_as=lambda: "dyn.test") as relay:
        await relay.attempt(envelope(sender=""), 0)
    assert queue.envelopes[0].sender == "" and queue.envelopes[0].client["name"] == "dyn.test"


async def test_ten_megabytes_to_http_edge():
    queue = RecordingQueue()
    data = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 10400
    assert len(data) < 10 * 1024 * 1024
    async with HttpEdge(("127.0.0.1", 0), queue) as edge, \
            HttpRelay(f"http://127.0.0.1:{edge.address[1]}/") as relay:
        await relay.attempt(envelope(data=data), 0)
    assert b"".join(queue.envelopes[0].flatten()) == data


async def test_edge_queue_error_is_transient():
    queue = RecordingQueue()
    queue.fail_with = QueueError()
    async with HttpEdge(("127.0.0.1", 0), queue) as edge, \
            HttpRelay(f"http://127.0.0.1:{edge.address[1]}/") as relay:
        with pytest.raises(TransientRelayError) as info:
            await relay.attempt(envelope(), 0)
    assert info.value.reply == Reply("451", "4.3.0 Error queuing message")


class NoNobody(HttpValidators):
    def validate_recipient(self, reply, recipient):
        if recipient.startswith("nobody@"):
            reply.code, reply.message = "550", '5.1.1 <nobody@x> "unknown"'


async def test_edge_refusal_is_permanent_with_its_reply():
    async with HttpEdge(("127.0.0.1", 0), RecordingQueue(), validator_class=NoNobody) as edge, \
            HttpRelay(f"http://127.0.0.1:{edge.address[1]}/") as relay:
        with pytest.raises(PermanentRelayError) as info:
            await relay.attempt(envelope(recipients=["b@x.test", "nobody@x.test"]), 0)
    assert info.value.reply == Reply("550", '5.1.1 <nobody@x> "unknown"')


async def test_edge_auth_with_headers():
    queue = RecordingQueue()
    async with HttpEdge(("127.0.0.1", 0), queue, auth="tok") as edge:
        url = f"http://127.0.0.1:{edge.address[1]}/"
        async with HttpRelay(url) as relay:
            with pytest.raises(PermanentRelayError) as info:
                await relay.attempt(envelope(), 0)
            assert info.value.reply.code == "530"
        async with HttpRelay(url, headers={"Authorization": "Bearer nope"}) as relay:
            with pytest.raises(PermanentRelayError) as info:
                await relay.attempt(envelope(), 0)
            assert info.value.reply.code == "535"
        async with HttpRelay(url, headers={"Authorization": "Bearer tok"}) as relay:
            assert (await relay.attempt(envelope(), 0)).code == "250"
    assert len(queue.envelopes) == 1


async def test_https_to_http_edge(server_tls_context, client_tls_context):
    queue = RecordingQueue()
    async with HttpEdge(("127.0.0.1", 0), queue, context=server_tls_context) as edge:
        url = f"https://127.0.0.1:{edge.address[1]}/"
        async with HttpRelay(url, context=client_tls_context) as relay:
            assert (await relay.attempt(envelope(), 0)).code == "250"
        async with HttpRelay(url) as relay:  # verified by default: a self-signed cert fails
            with pytest.raises(TransientRelayError):
                await relay.attempt(envelope(), 0)
    assert queue.envelopes[0].client["protocol"] == "HTTPS"


# --- against odd servers ---------------------------------------------------------------

def answer(status: int, reply: str | None = None):
    headers = {"X-Smtp-Reply": reply} if reply is not None else {}
    return lambda request: web.Response(status=status, headers=headers)


@pytest.mark.parametrize(("status", "reply", "error", "code"), [
    (200, None, None, None),
    (204, '250; message="2.0.0 Ok"', None, "250"),
    (503, '451; message="4.7.1 Greylisted"', TransientRelayError, "451"),
    (503, None, TransientRelayError, "451"),
    (500, None, TransientRelayError, "451"),
    (502, None, TransientRelayError, "451"),
    (500, '552; message="5.3.4 Too big"', PermanentRelayError, "552"),
    (500, '421; message="4.3.2 Shutting down"', TransientRelayError, "421"),
    (403, '550; message="5.7.1 Sender not allowed"', PermanentRelayError, "550"),
    (404, None, PermanentRelayError, "550"),
    (400, None, PermanentRelayError, "550"),
    (401, None, PermanentRelayError, "550"),
    (400, '451; message="4.0.0 odd"', TransientRelayError, "451"),
    (302, None, TransientRelayError, "451"),
    (503, "garbage", TransientRelayError, "451"),
])
async def test_status_and_reply_mapping(status, reply, error, code):
    async with OddServer(answer(status, reply)) as server, HttpRelay(server.url) as relay:
        if error is None:
            result = await relay.attempt(envelope(), 0)
            assert (result.code if result is not None else None) == code
        else:
            with pytest.raises(error) as info:
                await relay.attempt(envelope(), 0)
            assert info.value.reply.code == code
            if reply is None or reply == "garbage":
                assert f"HTTP {status}" in info.value.reply.message


async def test_request_carries_the_protocol_headers():
    async with OddServer(answer(200)) as server, \
            HttpRelay(server.url, ehlo_as="me.test", headers={"X-Extra": "1"}) as relay:
        await relay.attempt(envelope(sender="s@x.test", recipients=["r1@x.test", "r2@x.test"]),
                            0)
    [(headers, body)] = server.requests
    assert body == MESSAGE
    assert headers["Content-Type"] == "message/rfc822"
    assert headers["X-Ehlo"] == "me.test" and headers["X-Extra"] == "1"
    assert headers["X-Envelope-Sender"] == "c0B4LnRlc3Q="
    assert headers.getall("X-Envelope-Recipient") == ["cjFAeC50ZXN0", "cjJAeC50ZXN0"]


async def test_timeout_is_transient():
    async def slow(request):
        await asyncio.sleep(3)
        return web.Response()

    async with OddServer(slow) as server, HttpRelay(server.url, timeout=0.3) as relay:
        with pytest.raises(TransientRelayError) as info:
            await relay.attempt(envelope(), 0)
    assert info.value.reply.code == "451" and "4.4.2" in info.value.reply.message


async def test_connection_refused_is_transient():
    async with HttpRelay(f"http://127.0.0.1:{free_port()}/") as relay:
        with pytest.raises(TransientRelayError) as info:
            await relay.attempt(envelope(), 0)
    assert info.value.reply.code == "451" and "4.4.1" in info.value.reply.message


async def test_keep_alive_reuses_one_connection():
    async with OddServer(answer(200)) as server:
        async with HttpRelay(server.url) as relay:
            for _ in range(5):
                await relay.attempt(envelope(), 0)
        assert len(server.peers) == 5 and len(set(server.peers)) == 1
        server.peers.clear()
        async with HttpRelay(server.url, idle_timeout=0) as relay:
            for _ in range(3):
                await relay.attempt(envelope(), 0)
        assert len(set(server.peers)) == 3


async def test_keep_alive_against_http_edge():
    peers = []

    class Peers(HttpValidators):
        def validate_ehlo(self, reply, ehlo):
            peers.append(self.request.transport.get_extra_info("peername"))

    async with HttpEdge(("127.0.0.1", 0), RecordingQueue(), validator_class=Peers) as edge, \
            HttpRelay(f"http://127.0.0.1:{edge.address[1]}/") as relay:
        for _ in range(4):
            await relay.attempt(envelope(), 0)
    assert len(peers) == 4 and len(set(peers)) == 1


async def test_pool_size_bounds_connections():
    busy = 0
    most = 0

    async def slow(request):
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        await asyncio.sleep(0.1)
        busy -= 1
        return web.Response()

    async with OddServer(slow) as server, HttpRelay(server.url, pool_size=2) as relay:
        await asyncio.gather(*(relay.attempt(envelope(), 0) for _ in range(6)))
    assert most == 2 and len(set(server.peers)) == 2


async def test_stop_closes_the_session_and_a_later_attempt_reopens():
    async with OddServer(answer(200)) as server:
        relay = HttpRelay(server.url)
        relay.start()
        await relay.attempt(envelope(), 0)
        await relay.stop()
        assert relay._session is None
        await relay.attempt(envelope(), 0)  # used without start(): a session on demand
        await relay.close()
    assert len(server.requests) == 2
