"""slimta.app.admin: a real AdminServer on a free port over a real SQLite queue."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
import pytest

from slimta.app.admin import AdminServer
from slimta.app.metrics import Metrics
from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.sqlite import SqliteStorage
from slimta.queue.storage import QueueEntry
from slimta.relay import Relay, TransientRelayError
from slimta.smtp.reply import Reply

TOKEN = "s3cret-t0ken"
MESSAGE = b"From: a@example.com\r\nSubject: waiting\r\nMessage-ID: <1@example.com>\r\n\r\nhi\r\n"


class DeferringRelay(Relay):
    """Every attempt fails for now, so messages wait in the queue."""

    def __init__(self):
        super().__init__()
        self.attempts = 0

    def _attempt(self, envelope, attempts):
        self.attempts += 1
        raise TransientRelayError(reply=Reply("451", "4.4.1 Connection refused"))


class Client:
    """An aiohttp session on the admin server, with the token unless told otherwise."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None):
        self.session, self.base, self.token = session, base, token

    async def request(self, method: str, path: str, token: str | None = "default",
                      headers: dict | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(headers or {})
        token = self.token if token == "default" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, headers=headers) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json(), resp
            return resp.status, await resp.text(), resp


@pytest.fixture
async def admin(tmp_path):
    relay = DeferringRelay()
    queue = Queue(SqliteStorage(tmp_path / "queue.db"), relay=relay,
                  backoff=lambda envelope, attempts: 3600.0)
    metrics = Metrics()
    metrics.instrument_relay(relay)
    metrics.instrument_queue(queue, "outbound")
    server = AdminServer(port=0, token=TOKEN, metrics=metrics, queues={"outbound": queue})
    async with queue, server:
        ids = []
        for rcpts in (["b@example.org"], ["c@example.org", "d@example.net"]):
            env = Envelope("a@example.com", rcpts)
            env.parse(MESSAGE)
            [(_, qid)] = await queue.enqueue(env)
            ids.append(qid)
        await queue.join()
        host, port = server.address
        async with aiohttp.ClientSession() as session:
            client = Client(session, f"http://{host}:{port}", TOKEN)
            client.queue, client.ids, client.relay, client.server = queue, ids, relay, server
            yield client


async def test_binds_loopback_by_default():
    server = AdminServer()
    assert (server.host, server.port, server.token) == ("127.0.0.1", 8025, None)


async def test_warns_without_token_beyond_loopback(caplog):
    async with AdminServer(host="127.0.0.1", port=0):
        pass
    assert "without a token" not in caplog.text
    async with AdminServer(host="", port=0, token=TOKEN):
        pass
    assert "without a token" not in caplog.text
    async with AdminServer(host="", port=0):
        pass
    assert "without a token" in caplog.text


async def test_port_in_use_raises_at_start():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = AdminServer(port=busy.getsockname()[1])
        with pytest.raises(OSError):
            server.start()
        await server.stop()


@pytest.mark.parametrize("token", [None, "wrong", ""])
async def test_token_required(admin, token):
    for method, path in [("GET", "/queues"), ("GET", "/metrics"), ("GET", "/healthz"),
                         ("DELETE", f"/queues/outbound/{admin.ids[0]}"), ("GET", "/nowhere")]:
        status, body, resp = await admin.request(method, path, token=token)
        assert status == 401, (method, path)
        assert body["status"] == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(await admin.queue.list()) == 2  # nothing was deleted


async def test_other_auth_scheme_refused(admin):
    status, _, _ = await admin.request("GET", "/queues", token=None,
                                       headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401


async def test_healthz(admin):
    status, body, _ = await admin.request("GET", "/healthz")
    assert status == 200
    assert body["status"] == "ok"
    assert body["queues"] == {"outbound": "ok"}


async def test_healthz_unhealthy_queue(admin):
    class Broken:
        async def stats(self):
            raise RuntimeError("disk gone")

    admin.server.queues = {"outbound": admin.queue, "broken": Broken()}
    status, body, _ = await admin.request("GET", "/healthz")
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["queues"] == {"outbound": "ok", "broken": "error: RuntimeError"}


async def test_metrics(admin):
    status, text, resp = await admin.request("GET", "/metrics")
    assert status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert 'slimta_queue_messages{queue="outbound",state="queued"} 2.0' in text
    assert 'slimta_delivery_attempts_total{result="deferred"} 3.0' in text


async def test_metrics_disabled(tmp_path):
    async with AdminServer(port=0) as server, aiohttp.ClientSession() as session:
        host, port = server.address
        async with session.get(f"http://{host}:{port}/metrics") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "metrics are not enabled"
        async with session.get(f"http://{host}:{port}/healthz") as resp:  # no token needed
            assert resp.status == 200


async def test_queues_and_stats(admin):
    status, body, _ = await admin.request("GET", "/queues")
    assert status == 200
    stats = body["queues"]["outbound"]
    assert stats["messages"] == 2
    assert stats["recipients"] == 3
    assert stats["held"] == 0
    status, body, _ = await admin.request("GET", "/queues/outbound/stats")
    assert status == 200
    assert body["queue"] == "outbound"
    assert body["messages"] == 2


async def test_list(admin):
    status, body, _ = await admin.request("GET", "/queues/outbound")
    assert status == 200
    assert body["queue"] == "outbound"
    entries = {e["id"]: e for e in body["entries"]}
    assert set(entries) == set(admin.ids)
    first = entries[admin.ids[0]]
    assert set(first) >= {"id", "sender", "recipients", "attempts", "next_attempt",
                          "last_reply", "held", "size"}
    assert first["sender"] == "a@example.com"
    assert first["recipients"] == ["b@example.org"]
    assert first["attempts"] == 1
    assert "4.4.1 Connection refused" in first["last_reply"]
    assert first["held"] is False
    assert first["size"] == len(MESSAGE)
    assert QueueEntry(**first).recipients == ["b@example.org"]
    assert entries[admin.ids[1]]["recipients"] == ["c@example.org", "d@example.net"]
    status, body, _ = await admin.request("GET", "/queues/outbound?limit=1")
    assert len(body["entries"]) == 1
    status, body, _ = await admin.request("GET", "/queues/outbound?limit=many")
    assert status == 400
    assert body["status"] == 400


async def test_show(admin):
    qid = admin.ids[1]
    status, body, _ = await admin.request("GET", f"/queues/outbound/{qid}")
    assert status == 200
    assert body["id"] == qid
    assert body["recipients"] == ["c@example.org", "d@example.net"]
    assert body["attempts"] == 1
    assert body["subject"] == "waiting"
    assert body["message_id"] == "<1@example.com>"
    assert body["held"] is False
    assert body["delivered"] == body["delivered_indexes"] == []
    assert body["envelope"]["v"] == 1
    assert body["envelope"]["recipients"] == ["c@example.org", "d@example.net"]
    assert "message" not in body  # the message only at /message
    status, text, resp = await admin.request("GET", f"/queues/outbound/{qid}/message")
    assert status == 200
    assert resp.content_type == "message/rfc822"
    assert text.encode() == MESSAGE
    status, _, _ = await admin.request("GET", "/queues/outbound/0123/message")
    assert status == 404


async def test_hold_release_retry(admin):
    qid = admin.ids[0]
    status, body, _ = await admin.request("POST", f"/queues/outbound/{qid}/hold")
    assert (status, body) == (200, {"queue": "outbound", "id": qid, "action": "hold", "ok": True})
    assert (await admin.queue.get(qid)).held
    _, body, _ = await admin.request("GET", "/queues/outbound/stats")
    assert body["held"] == 1
    attempts = admin.relay.attempts
    status, body, _ = await admin.request("POST", f"/queues/outbound/{qid}/release")
    assert status == 200
    assert body["action"] == "release"
    await admin.queue.join()
    assert not (await admin.queue.get(qid)).held
    assert admin.relay.attempts == attempts + 1  # released: attempted at once
    status, body, _ = await admin.request("POST", f"/queues/outbound/{qid}/retry")
    assert status == 200
    await admin.queue.join()
    assert admin.relay.attempts == attempts + 2
    assert (await admin.queue.get(qid)).attempts == 3


async def test_delete(admin):
    qid = admin.ids[0]
    status, body, _ = await admin.request("DELETE", f"/queues/outbound/{qid}")
    assert (status, body["action"], body["ok"]) == (200, "delete", True)
    assert [e.id for e in await admin.queue.list()] == [admin.ids[1]]
    status, body, _ = await admin.request("DELETE", f"/queues/outbound/{qid}")
    assert status == 404


async def test_flush(admin):
    attempts = admin.relay.attempts
    status, body, _ = await admin.request("POST", "/queues/outbound/flush")
    assert (status, body) == (200, {"queue": "outbound", "action": "flush", "ok": True,
                                    "count": 2})
    await admin.queue.join()
    assert admin.relay.attempts == attempts + 2


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/queues/nope"),
    ("GET", "/queues/nope/stats"),
    ("POST", "/queues/nope/flush"),
    ("GET", "/queues/nope/0123"),
    ("DELETE", "/queues/nope/0123"),
    ("POST", "/queues/nope/0123/retry"),
    ("GET", "/queues/outbound/0123"),
    ("DELETE", "/queues/outbound/0123"),
    ("POST", "/queues/outbound/0123/retry"),
    ("POST", "/queues/outbound/0123/hold"),
    ("POST", "/queues/outbound/0123/release"),
    ("GET", "/no/such/route"),
    ("POST", "/queues/outbound/0123/explode"),
])
async def test_not_found(admin, method, path):
    status, body, _ = await admin.request(method, path)
    assert status == 404
    assert body["status"] == 404
    assert body["error"]


async def test_wrong_method(admin):
    status, body, resp = await admin.request("POST", "/metrics")
    assert status == 405
    assert body["status"] == 405
    assert "GET" in resp.headers["Allow"]


async def test_server_error_is_json_and_logged(admin, caplog):
    class Broken:
        async def list(self):
            raise RuntimeError("boom")

    admin.server.queues = {"broken": Broken()}
    status, body, _ = await admin.request("GET", "/queues/broken")
    assert status == 500
    assert body == {"error": "Internal Server Error", "status": 500}
    assert "GET /queues/broken failed" in caplog.text
