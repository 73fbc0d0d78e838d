"""HttpEdge over real sockets: curl (a subprocess) and aiohttp's client as the peers.

The edge runs on its own loop in a thread (conftest's ``run_edge`` with
``edge_class=HttpEdge``) and hands messages to conftest's RecordingQueue.
"""

from __future__ import annotations

import base64
import os
import subprocess

import aiohttp
import pytest
from multidict import CIMultiDict

from conftest import require_tool
from slimta.edge.http import HttpEdge, HttpValidators, http_status, reply_header
from slimta.queue import QueueError
from slimta.smtp.reply import Reply

MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def mail_headers(sender="a@example.com", recipients=("b@example.com",), **extra) -> dict:
    headers = {"Content-Type": "message/rfc822", "X-Envelope-Sender": b64(sender)}
    headers["X-Envelope-Recipient"] = ", ".join(b64(r) for r in recipients)
    headers.update(extra)
    return headers


def curl(url: str, *args: str, data: bytes | None = MESSAGE, headers: dict | None = None,
         cacert: str | None = None) -> tuple[int, dict, str]:
    """Run curl; (status, {lower-case header: [values]}, body)."""
    cmd = [require_tool("curl"), "-sS", "-D", "-", "-o", "-", "--max-time", "60"]
    for name, value in (headers or {}).items():
        for one in value if isinstance(value, list) else [value]:
            cmd += ["-H", f"{name}: {one}"]
    if cacert:
        cmd += ["--cacert", cacert]
    cmd += list(args)
    if data is not None:
        cmd += ["--data-binary", "@-"]
    cmd.append(url)
    out = subprocess.run(cmd, input=data, capture_output=True, timeout=90, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    found: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), found, body.decode("utf-8", "replace")


@pytest.fixture
def http_edge(run_edge):
    def start(**kwargs):
        runner = run_edge(edge_class=HttpEdge, hostname="mx.test", **kwargs)
        runner.url = f"http://127.0.0.1:{runner.port}/"
        return runner

    return start


# --- the reply and status mapping -------------------------------------------------

@pytest.mark.parametrize(("code", "status"), [
    ("250", 200), ("251", 200), ("451", 503), ("421", 503), ("535", 401), ("550", 500),
    ("554", 500), ("530", 500),
])
def test_http_status_of_a_reply(code, status):
    assert http_status(Reply(code, "x")) == status


def test_reply_header_escapes_and_joins_lines():
    assert reply_header(Reply("250", "2.6.0 Message queued as q1")) == \
        '250; message="2.6.0 Message queued as q1"'
    assert reply_header(Reply("550", '5.7.1 say "no"\nback\\slash')) == \
        '550; message="5.7.1 say \\"no\\" back\\\\slash"'


# --- with curl ----------------------------------------------------------------------

def test_curl_post_is_queued_with_the_envelope(http_edge):
    edge = http_edge()
    status, headers, body = curl(edge.url, headers=mail_headers(**{"X-Ehlo": "client.test"}))
    assert status == 200
    assert headers["x-smtp-reply"] == ['250; message="2.6.0 Message queued as q000001"']
    assert body.startswith("250 2.6.0 Message queued as q000001")
    [env] = edge.queue.envelopes
    assert env.sender == "a@example.com" and env.recipients == ["b@example.com"]
    assert b"".join(env.flatten()) == MESSAGE
    assert env.client == {"ip": "127.0.0.1", "host": None, "name": "client.test",
                          "protocol": "HTTP", "auth": None}
    assert env.receiver == "mx.test" and env.timestamp is not None
    assert env.smtputf8 is False and env.body == "7BIT"


def test_curl_without_ehlo_gets_the_ip_literal_and_null_sender(http_edge):
    edge = http_edge()
    headers = mail_headers()
    headers["X-Envelope-Sender"] = ""
    assert curl(edge.url, headers=headers)[0] == 200
    [env] = edge.queue.envelopes
    assert env.sender == "" and env.client["name"] == "[127.0.0.1]"


def test_curl_comma_separated_and_repeated_recipients(http_edge):
    edge = http_edge()
    headers = mail_headers(recipients=["b@example.com", "c@example.com"])
    headers["X-Envelope-Recipient"] = [headers["X-Envelope-Recipient"],
                                       f"{b64('d@example.com')};{b64('e@example.com')}"]
    assert curl(edge.url, headers=headers)[0] == 200
    [env] = edge.queue.envelopes
    assert env.recipients == ["b@example.com", "c@example.com", "d@example.com",
                              "e@example.com"]


def test_curl_non_ascii_addresses_set_smtputf8(http_edge):
    edge = http_edge()
    message = "From: jörg@exämple.de\r\nSubject: grüße\r\n\r\nÄ\r\n".encode()
    status, _, _ = curl(edge.url, data=message, headers=mail_headers(
        sender="jörg@exämple.de", recipients=["用户@例子.广告", "b@example.com"]))
    assert status == 200
    [env] = edge.queue.envelopes
    assert env.sender == "jörg@exämple.de"
    assert env.recipients == ["用户@例子.广告", "b@example.com"]
    assert env.smtputf8 is True and env.body == "8BITMIME"
    assert b"".join(env.flatten()) == message


def test_curl_ascii_addresses_with_8bit_body_is_not_smtputf8(http_edge):
    edge = http_edge()
    assert curl(edge.url, data="Subject: x\r\n\r\nÄ\r\n".encode(),
                headers=mail_headers())[0] == 200
    [env] = edge.queue.envelopes
    assert env.smtputf8 is False and env.body == "8BITMIME"


def test_curl_ten_megabytes_arrive_byte_exact(http_edge):
    edge = http_edge()
    body = os.urandom(3 * 1024 * 1024).hex().encode()  # 6 MiB of hex ...
    body = (body + body)[: 10 * 1024 * 1024 - 100]
    lines = b"\r\n".join(body[i:i + 998] for i in range(0, len(body), 998))
    message = b"Subject: big\r\n\r\n" + lines
    message = message[: 10 * 1024 * 1024]
    assert len(message) == 10 * 1024 * 1024  # exactly the default max_size
    status, headers, _ = curl(edge.url, data=message, headers=mail_headers())
    assert status == 200, headers
    [env] = edge.queue.envelopes
    assert b"".join(env.flatten()) == message


def test_curl_over_max_size_is_413(http_edge):
    edge = http_edge(max_size=1000)
    status, headers, _ = curl(edge.url, data=b"Subject: x\r\n\r\n" + b"a" * 1000,
                              headers=mail_headers())
    assert status == 413
    assert headers["x-smtp-reply"][0].startswith("552; message=\"5.3.4")
    assert edge.queue.envelopes == []
    # chunked: no Content-Length, the limit applies while reading
    status, _, _ = curl(edge.url, data=b"Subject: x\r\n\r\n" + b"a" * 1000,
                        headers=mail_headers(**{"Transfer-Encoding": "chunked"}))
    assert status == 413
    assert edge.queue.envelopes == []
    assert curl(edge.url, data=b"Subject: x\r\n\r\n" + b"a" * 900,
                headers=mail_headers())[0] == 200


def test_curl_expect_continue_over_max_size_is_refused_before_the_body(http_edge):
    edge = http_edge(max_size=2 * 1024 * 1024)
    # curl sends Expect: 100-continue for a body over 1 MiB
    status, _, _ = curl(edge.url, data=b"Subject: x\r\n\r\n" + b"a" * (3 * 1024 * 1024),
                        headers=mail_headers())
    assert status == 413
    assert edge.queue.envelopes == []


@pytest.mark.parametrize(("fail", "code", "status"), [
    (QueueError(), "451", 503),
    (QueueError(Reply("452", "4.3.1 Insufficient system storage")), "452", 503),
    (QueueError(Reply("554", "5.6.0 Refused")), "554", 500),
])
def test_curl_queue_errors_map_like_smtpedge(http_edge, fail, code, status):
    edge = http_edge()
    edge.queue.fail_with = fail
    got, headers, _ = curl(edge.url, headers=mail_headers())
    assert got == status
    assert headers["x-smtp-reply"][0].startswith(f"{code}; ")
    if code == "451":
        assert headers["x-smtp-reply"] == ['451; message="4.3.0 Error queuing message"']


def test_curl_queue_raising_is_451(http_edge):
    edge = http_edge()
    edge.queue.raise_exc = RuntimeError("disk on fire")
    status, headers, _ = curl(edge.url, headers=mail_headers())
    assert status == 503
    assert headers["x-smtp-reply"] == ['451; message="4.3.0 Error queuing message"']


def test_curl_other_method_is_405(http_edge):
    edge = http_edge()
    status, headers, _ = curl(edge.url, data=None)
    assert status == 405 and headers["allow"] == ["POST"]
    status, _, _ = curl(edge.url, "-X", "PUT", headers=mail_headers())
    assert status == 405
    assert edge.queue.envelopes == []


def test_curl_other_content_type_is_415(http_edge):
    edge = http_edge()
    headers = mail_headers()
    del headers["Content-Type"]  # curl then sends application/x-www-form-urlencoded
    assert curl(edge.url, headers=headers)[0] == 415
    headers["Content-Type"] = "text/plain"
    assert curl(edge.url, headers=headers)[0] == 415
    headers["Content-Type"] = "Message/RFC822; charset=utf-8"
    assert curl(edge.url, headers=headers)[0] == 200


def test_curl_outside_uri_pattern_is_404(http_edge):
    edge = http_edge(uri_pattern=r"/mail/?$")
    assert curl(edge.url, headers=mail_headers())[0] == 404
    assert curl(edge.url + "mailbox", headers=mail_headers())[0] == 404
    assert curl(edge.url + "mail", headers=mail_headers())[0] == 200
    assert curl(edge.url + "mail/", headers=mail_headers())[0] == 200
    assert len(edge.queue.envelopes) == 2


@pytest.mark.parametrize(("header", "value", "reason"), [
    ("X-Envelope-Sender", "not base64!", "X-Envelope-Sender: invalid base64"),
    ("X-Envelope-Recipient", "@@@", "X-Envelope-Recipient: invalid base64"),
    ("X-Envelope-Recipient", base64.b64encode(b"\xff\xfe@x").decode(), "not UTF-8"),
    ("X-Envelope-Recipient", b64("no-at-sign"), "bad address 'no-at-sign'"),
    ("X-Envelope-Recipient", b64("a@b\r\nRCPT TO:<c@d>"), "bad address"),
    ("X-Envelope-Sender", b64("a b@example.com"), "bad address"),
    ("X-Ehlo", "two words", "X-Ehlo: not a host name"),
])
def test_curl_bad_headers_are_400_with_a_reason(http_edge, header, value, reason):
    edge = http_edge()
    status, headers, body = curl(edge.url, headers=mail_headers(**{header: value}))
    assert status == 400
    assert reason in body
    assert headers["x-smtp-reply"][0].startswith("501; ")
    assert edge.queue.envelopes == []


def test_curl_without_recipients_is_400(http_edge):
    edge = http_edge()
    headers = mail_headers()
    del headers["X-Envelope-Recipient"]
    status, replies, body = curl(edge.url, headers=headers)
    assert status == 400 and "no X-Envelope-Recipient header" in body
    assert replies["x-smtp-reply"] == ['554; message="5.5.1 No valid recipients"']


def test_curl_too_many_recipients(http_edge):
    edge = http_edge(max_recipients=2)
    rcpts = ["a@x.test", "b@x.test", "c@x.test"]
    status, headers, _ = curl(edge.url, headers=mail_headers(recipients=rcpts))
    assert status == 500 and headers["x-smtp-reply"][0].startswith("552; ")
    assert curl(edge.url, headers=mail_headers(recipients=rcpts[:2]))[0] == 200


class Refusing(HttpValidators):
    custom_headers = ("X-Tenant",)

    def validate_ehlo(self, reply, ehlo):
        if ehlo == "bad.test":
            reply.code, reply.message = "550", "5.7.1 Go away"

    async def validate_sender(self, reply, sender):
        if sender == "later@example.com":
            reply.code, reply.message = "451", "4.7.1 Try later"

    def validate_recipient(self, reply, recipient):
        if recipient.startswith("nobody@"):
            reply.code, reply.message = "550", "5.1.1 No such user"

    def validate_custom(self, reply, name, value):
        assert name == "X-Tenant"
        if value is None:
            reply.code, reply.message = "535", "5.7.8 Tenant required"
        else:
            self.client["host"] = f"{value}.tenant.test"

    def validate_data(self, reply, data):
        if b"GTUBE" in data:
            reply.code, reply.message = "554", "5.6.0 Content rejected"


@pytest.mark.parametrize(("change", "status", "reply"), [
    ({"X-Ehlo": "bad.test"}, 500, '550; message="5.7.1 Go away"'),
    ({"X-Envelope-Sender": b64("later@example.com")}, 503, '451; message="4.7.1 Try later"'),
    ({"X-Envelope-Recipient": f"{b64('b@x.test')},{b64('nobody@x.test')}"}, 500,
     '550; message="5.1.1 No such user"'),
    ({"X-Tenant": None}, 401, '535; message="5.7.8 Tenant required"'),
    ({"data": b"Subject: x\r\n\r\nGTUBE\r\n"}, 500, '554; message="5.6.0 Content rejected"'),
])
def test_curl_validators_refuse(http_edge, change, status, reply):
    edge = http_edge(validator_class=Refusing)
    headers = mail_headers(**{"X-Tenant": "acme"})
    data = change.pop("data", MESSAGE)
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    got, replies, _ = curl(edge.url, data=data, headers=headers)
    assert (got, replies["x-smtp-reply"]) == (status, [reply])
    assert edge.queue.envelopes == []


def test_curl_validators_accept_and_fill_the_client(http_edge):
    edge = http_edge(validator_class=Refusing)
    assert curl(edge.url, headers=mail_headers(**{"X-Tenant": "acme"}))[0] == 200
    [env] = edge.queue.envelopes
    assert env.client["host"] == "acme.tenant.test"


def test_curl_bearer_token(http_edge):
    edge = http_edge(auth="s3cret-token")
    status, headers, _ = curl(edge.url, headers=mail_headers())
    assert status == 401 and headers["www-authenticate"][0].startswith("Bearer")
    assert headers["x-smtp-reply"] == ['530; message="5.7.0 Authentication required"']
    status, headers, _ = curl(edge.url, headers=mail_headers(Authorization="Bearer wrong"))
    assert status == 401
    assert headers["x-smtp-reply"] == ['535; message="5.7.8 Authentication credentials invalid"']
    assert curl(edge.url, "-u", "user:s3cret-token", headers=mail_headers())[0] == 401
    assert edge.queue.envelopes == []
    assert curl(edge.url, headers=mail_headers(Authorization="Bearer s3cret-token"))[0] == 200
    [env] = edge.queue.envelopes
    assert env.client["auth"] is None


def test_curl_basic_auth_with_a_dict(http_edge):
    edge = http_edge(auth={"alice": "pw1", "bob": "{PLAIN}pw2"})
    status, headers, _ = curl(edge.url, headers=mail_headers())
    assert status == 401 and headers["www-authenticate"][0].startswith("Basic")
    assert curl(edge.url, "-u", "alice:wrong", headers=mail_headers())[0] == 401
    assert curl(edge.url, "-u", "carol:pw1", headers=mail_headers())[0] == 401
    assert curl(edge.url, headers=mail_headers(Authorization="Basic !!!"))[0] == 401
    assert edge.queue.envelopes == []
    assert curl(edge.url, "-u", "alice:pw1", headers=mail_headers())[0] == 200
    assert curl(edge.url, "-u", "bob:pw2", headers=mail_headers())[0] == 200
    assert [e.client["auth"] for e in edge.queue.envelopes] == ["alice", "bob"]


def test_curl_basic_auth_with_a_coroutine_and_a_lookup(http_edge):
    from slimta.lookup.dict import DictLookup

    async def check(user, password):
        return (user, password) == ("ann", "pässword")

    edge = http_edge(auth=check)
    assert curl(edge.url, "-u", "ann:nope", headers=mail_headers())[0] == 401
    assert curl(edge.url, "-u", "ann:pässword", headers=mail_headers())[0] == 200

    edge = http_edge(auth=DictLookup({"ann@example.com": {"password": "{PLAIN}pw"}},
                                     "{username}"))
    assert curl(edge.url, "-u", "ann@example.com:nope", headers=mail_headers())[0] == 401
    assert curl(edge.url, "-u", "ann@example.com:pw", headers=mail_headers())[0] == 200
    [env] = edge.queue.envelopes
    assert env.client["auth"] == "ann@example.com"

    from slimta.lookup.credentials import LookupCredentials
    edge = http_edge(auth=LookupCredentials(DictLookup({"bo": {"secret": "{PLAIN}x"}},
                                                       "{username}"), "secret"))
    assert curl(edge.url, "-u", "bo:y", headers=mail_headers())[0] == 401
    assert curl(edge.url, "-u", "bo:x", headers=mail_headers())[0] == 200


def test_curl_auth_refused_before_a_big_body_is_sent(http_edge):
    edge = http_edge(auth="token")
    status, _, _ = curl(edge.url, data=b"Subject: x\r\n\r\n" + b"a" * (2 * 1024 * 1024),
                        headers=mail_headers())
    assert status == 401


def test_curl_https_sets_protocol(http_edge, server_tls_context, tls_cert):
    edge = http_edge(context=server_tls_context)
    url = f"https://localhost:{edge.port}/"
    status, _, _ = curl(url, cacert=tls_cert[0], headers=mail_headers())
    assert status == 200
    [env] = edge.queue.envelopes
    assert env.client["protocol"] == "HTTPS"


# --- with aiohttp's client ----------------------------------------------------------

async def post(url: str, data: bytes = MESSAGE, headers=None, **kwargs) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as client, \
            client.post(url, data=data, headers=headers or mail_headers(), **kwargs) as resp:
        await resp.read()
        return resp


async def test_aiohttp_statuses(http_edge):
    edge = http_edge(uri_pattern="/in", max_size=100)
    url = f"http://127.0.0.1:{edge.port}"
    resp = await post(url + "/in")
    assert resp.status == 200
    assert resp.headers["X-Smtp-Reply"].startswith("250; ")
    assert (await post(url + "/out")).status == 404
    assert (await post(url + "/in", b"x" * 101)).status == 413
    assert (await post(url + "/in", headers=mail_headers(**{
        "Content-Type": "application/json"}))).status == 415
    async with aiohttp.ClientSession() as client, client.get(url + "/in") as resp:
        assert resp.status == 405
    edge.queue.fail_with = QueueError()
    resp = await post(url + "/in")
    assert resp.status == 503
    assert resp.headers["X-Smtp-Reply"] == '451; message="4.3.0 Error queuing message"'


async def test_aiohttp_multiple_recipient_headers_and_utf8(http_edge):
    edge = http_edge()
    headers = [("Content-Type", "message/rfc822"), ("X-Envelope-Sender", b64("ø@ø.test")),
               ("X-Envelope-Recipient", b64("a@x.test")),
               ("X-Envelope-Recipient", b64("ü@x.test"))]
    async with aiohttp.ClientSession() as client, \
            client.post(f"http://127.0.0.1:{edge.port}/", data=MESSAGE,
                        headers=CIMultiDict(headers)) as resp:
        assert resp.status == 200
    [env] = edge.queue.envelopes
    assert env.sender == "ø@ø.test" and env.recipients == ["a@x.test", "ü@x.test"]
    assert env.smtputf8 is True


async def test_aiohttp_ten_megabytes_chunked(http_edge):
    edge = http_edge()
    message = b"Subject: big\r\n\r\n" + os.urandom(5 * 1024 * 1024 - 8).hex().encode()[
        : 10 * 1024 * 1024 - 16]

    async def chunks():
        for i in range(0, len(message), 65536):
            yield message[i:i + 65536]

    resp = await post(f"http://127.0.0.1:{edge.port}/", chunks())
    assert resp.status == 200
    [env] = edge.queue.envelopes
    assert b"".join(env.flatten()) == message


async def test_aiohttp_basic_and_bearer(http_edge):
    edge = http_edge(auth={"u": "p"})
    url = f"http://127.0.0.1:{edge.port}/"
    assert (await post(url)).status == 401
    for password, status in (("x", 401), ("p", 200)):
        basic = "Basic " + base64.b64encode(f"u:{password}".encode()).decode()
        assert (await post(url, headers=mail_headers(Authorization=basic))).status == status
    edge = http_edge(auth="tok")
    url = f"http://127.0.0.1:{edge.port}/"
    assert (await post(url, headers=mail_headers(Authorization="Bearer nope"))).status == 401
    assert (await post(url, headers=mail_headers(Authorization="Bearer tok"))).status == 200


async def test_aiohttp_https(http_edge, server_tls_context, client_tls_context):
    edge = http_edge(context=server_tls_context)
    resp = await post(f"https://127.0.0.1:{edge.port}/", ssl=client_tls_context)
    assert resp.status == 200
    assert edge.queue.envelopes[0].client["protocol"] == "HTTPS"
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientError):
            await client.post(f"http://127.0.0.1:{edge.port}/", data=MESSAGE,
                              headers=mail_headers())


async def test_keep_alive_requests_share_a_connection(http_edge):
    peers = []

    class Peers(HttpValidators):
        def validate_ehlo(self, reply, ehlo):
            peers.append(self.request.transport.get_extra_info("peername"))

    edge = http_edge(validator_class=Peers)
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(f"http://127.0.0.1:{edge.port}/", data=MESSAGE,
                                   headers=mail_headers()) as resp:
                assert resp.status == 200
    assert len(peers) == 3 and len(set(peers)) == 1
    assert len(edge.queue.envelopes) == 3


async def test_start_binds_at_once_and_stop_is_graceful(recording_queue):
    async with HttpEdge(("127.0.0.1", 0), recording_queue) as edge:
        port = edge.address[1]
        with pytest.raises(OSError):
            HttpEdge(("127.0.0.1", port), recording_queue).start()
        recording_queue.delay = 0.5
        async with aiohttp.ClientSession() as client:
            import asyncio
            pending = asyncio.ensure_future(client.post(
                f"http://127.0.0.1:{port}/", data=MESSAGE, headers=mail_headers()))
            await asyncio.sleep(0.2)
            await edge.stop()  # waits for the request in progress
            resp = await pending
            assert resp.status == 200
    assert len(recording_queue.envelopes) == 1


def test_data_timeout_answers_451_when_the_body_stalls(http_edge):
    import socket

    edge = http_edge(data_timeout=0.5)
    head = "".join(f"{k}: {v}\r\n" for k, v in mail_headers().items())
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n{head}\r\n"
                  "Subject: only part".encode())
        answer = s.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 503")
    assert 'X-Smtp-Reply: 451; message="4.4.2 Timed out reading the message"' in answer
    assert edge.queue.envelopes == []
