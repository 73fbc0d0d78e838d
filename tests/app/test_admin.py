"""slimta.app.admin: a real AdminServer on a free port over a real SQLite queue."""

from __future__ import annotations

import contextlib
import re
import socket
import time
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
                      headers: dict | None = None, data: Any = None,
                      ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(headers or {})
        token = self.token if token == "default" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, headers=headers, data=data,
                                        allow_redirects=False) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json(), resp
            return resp.status, await resp.text(), resp


@contextlib.asynccontextmanager
async def running_admin(tmp_path, token: str | None, **kwargs: Any):
    """A real AdminServer on a free loopback port over a queue of two waiting messages."""
    relay = DeferringRelay()
    queue = Queue(SqliteStorage(tmp_path / "queue.db"), relay=relay,
                  backoff=lambda envelope, attempts: 3600.0)
    metrics = Metrics()
    metrics.instrument_relay(relay)
    metrics.instrument_queue(queue, "outbound")
    server = AdminServer(port=0, token=token, metrics=metrics, queues={"outbound": queue},
                         **kwargs)
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
            client = Client(session, f"http://{host}:{port}", token)
            client.queue, client.ids, client.relay, client.server = queue, ids, relay, server
            yield client


@pytest.fixture
async def admin(tmp_path):
    async with running_admin(tmp_path, TOKEN) as client:
        yield client


@pytest.fixture
async def open_admin(tmp_path):
    """Without a token, as by default on loopback: the case the browser checks are for."""
    async with running_admin(tmp_path, None) as client:
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
    [[ended, reply]] = body["history"]
    assert reply == body["last_reply"] and "4.4.1 Connection refused" in reply
    assert isinstance(ended, float) and abs(ended - time.time()) < 60
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


# --- browsers acting for another site: CSRF and DNS rebinding ---------------------------

# what a cross-site HTML form sends
EVIL_FORM = {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
ACTIONS = [("POST", "retry"), ("POST", "hold"), ("POST", "release"), ("DELETE", ""),
           ("POST", "flush")]


def action_path(admin, method: str, action: str, qid: str | None = None) -> str:
    if action == "flush":
        return "/queues/outbound/flush"
    qid = qid or admin.ids[0]
    return f"/queues/outbound/{qid}" + (f"/{action}" if action else "")


async def assert_unchanged(admin, attempts: int) -> None:
    """Both messages still there, not held, attempted once; no attempt since."""
    await admin.queue.join()
    entries = {e.id: e for e in await admin.queue.list()}
    assert set(entries) == set(admin.ids)
    assert [(e.held, e.attempts) for e in entries.values()] == [(False, 1), (False, 1)]
    assert admin.relay.attempts == attempts


@pytest.fixture(params=["no token", "token"])
async def any_admin(request, tmp_path):
    async with running_admin(tmp_path, None if request.param == "no token" else TOKEN) as c:
        yield c


async def test_cross_site_form_post_refused(any_admin):
    admin, attempts = any_admin, any_admin.relay.attempts
    for method, action in ACTIONS:
        status, body, _ = await admin.request(method, action_path(admin, method, action),
                                              headers=EVIL_FORM, data=b"x=1")
        assert status == 403, (method, action)
        assert body["status"] == 403
        assert body["error"].startswith("cross-site request refused")
        assert "http://evil.example" in body["error"]
    await assert_unchanged(admin, attempts)


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site"])
async def test_sec_fetch_site_refused(open_admin, site):
    admin, attempts = open_admin, open_admin.relay.attempts
    for method, action in ACTIONS:
        status, body, _ = await admin.request(method, action_path(admin, method, action),
                                              headers={"Sec-Fetch-Site": site})
        assert status == 403, (method, action)
        assert "another site" in body["error"]
    await assert_unchanged(admin, attempts)


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=xyz",
                                   "text/plain;charset=UTF-8", "Text/Plain"])
async def test_form_content_types_refused(open_admin, ctype):
    """What a form (or a fetch without a preflight) can send, even with no Origin header
    (older browsers sent none with a form)."""
    admin, attempts = open_admin, open_admin.relay.attempts
    for method, action in ACTIONS:
        status, body, _ = await admin.request(method, action_path(admin, method, action),
                                              headers={"Content-Type": ctype}, data=b"")
        assert status == 403, (method, action)
        assert "form's content type" in body["error"]
    await assert_unchanged(admin, attempts)


async def test_origin_must_be_the_endpoint_itself(open_admin):
    admin, attempts = open_admin, open_admin.relay.attempts
    port = admin.server.address[1]
    for origin in ["null", f"http://127.0.0.1:{port + 1 if port < 65535 else 1}",
                   f"http://evil.example:{port}", "http://127.0.0.1", f"ftp://127.0.0.1:{port}"]:
        status, body, _ = await admin.request("POST", action_path(admin, "POST", "hold"),
                                              headers={"Origin": origin})
        assert status == 403, origin
        assert "another origin" in body["error"]
    await assert_unchanged(admin, attempts)
    # the endpoint's own pages (a same-origin fetch) may: Origin is the Host it was sent to
    same = {"Origin": admin.base, "Sec-Fetch-Site": "same-origin",
            "Content-Type": "application/json"}
    status, body, _ = await admin.request("POST", action_path(admin, "POST", "hold"),
                                          headers=same, data=b"{}")
    assert (status, body["action"]) == (200, "hold")
    assert (await admin.queue.get(admin.ids[0])).held
    status, _, _ = await admin.request("POST", action_path(admin, "POST", "release"),
                                       headers={**same, "Origin": f"http://localhost:{port}",
                                                "Host": f"localhost:{port}"})
    assert status == 200
    # the release attempts it at once: let that end before the queue stops (stopping the
    # queue in the same moment can hang on Python 3.11, see Clock.wait's wait_for)
    await admin.queue.join()


async def test_reading_is_not_refused(open_admin):
    """GETs change nothing, and another site cannot read the answers (no CORS)."""
    status, body, _ = await open_admin.request("GET", "/queues", headers=EVIL_FORM)
    assert status == 200
    assert body["queues"]["outbound"]["messages"] == 2


async def test_api_requests_as_the_cli_sends_them(any_admin):
    """slimta queue --admin: no Origin, no Sec-Fetch-Site, an empty body."""
    from slimta.app.queuecli import AdminQueueClient

    admin = any_admin
    first, second = admin.ids
    async with AdminQueueClient(admin.base, token=admin.token) as cli:
        assert (await cli.hold([first])).done == [first]
        assert (await admin.queue.get(first)).held
        assert (await cli.release([first])).done == [first]
        assert (await cli.retry([second, "0" * 32])).to_json() == {
            "done": [second], "missing": ["0" * 32]}
        assert sorted((await cli.flush()).done) == sorted(admin.ids)
        assert (await cli.delete([first])).done == [first]
        assert (await cli.stats())["messages"] == 1
    await admin.queue.join()
    assert [e.id for e in await admin.queue.list()] == [second]


@pytest.mark.parametrize("host", ["evil.example:8025", "evil.example", "localhost.evil.example",
                                  "127.0.0.1.evil.example:8025", "192.0.2.1:8025", "[::2]",
                                  "local host", "[::1", "localhost:http"])
async def test_foreign_host_refused_on_loopback(any_admin, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 is
    same-origin with the endpoint for the browser, but names its own host."""
    admin, attempts = any_admin, any_admin.relay.attempts
    for method, path in [("GET", "/queues"), ("GET", f"/queues/outbound/{admin.ids[0]}/message"),
                         ("GET", "/healthz"), ("GET", "/dashboard/"),
                         ("GET", f"/dashboard/queues/outbound/{admin.ids[0]}"),
                         ("POST", f"/queues/outbound/{admin.ids[0]}/retry"),
                         ("DELETE", f"/queues/outbound/{admin.ids[0]}"),
                         ("POST", f"/dashboard/queues/outbound/{admin.ids[0]}/delete")]:
        status, body, _ = await admin.request(method, path, headers={"Host": host})
        assert status == 421, (method, path)
        assert body["status"] == 421
        assert "is not allowed here" in body["error"] and "allowed_hosts" in body["error"]
    await assert_unchanged(admin, attempts)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8025", "localhost", "LocalHost:1",
                                  "localhost.:8025", "[::1]", "[::1]:8025", "127.0.0.2:9",
                                  "[::ffff:127.0.0.1]:8025"])
async def test_loopback_hosts_accepted(open_admin, host):
    """Any loopback name, any port (an SSH tunnel may forward another port)."""
    status, body, _ = await open_admin.request("GET", "/queues", headers={"Host": host})
    assert status == 200, body
    status, body, _ = await open_admin.request(
        "POST", f"/queues/outbound/{open_admin.ids[0]}/hold", headers={"Host": host})
    assert status == 200, body


async def test_allowed_hosts(tmp_path):
    async with running_admin(tmp_path, TOKEN, allowed_hosts=[
            "Admin.Example.COM.", "192.0.2.1", "[2001:db8::1]:8025"]) as admin:
        assert admin.server.allowed_hosts == {"admin.example.com", "192.0.2.1", "2001:db8::1"}
        for host in ["admin.example.com", "ADMIN.example.com:8443", "192.0.2.1:80",
                     "[2001:db8::1]", "localhost:8025", "127.0.0.1"]:
            status, _, _ = await admin.request("GET", "/queues", headers={"Host": host})
            assert status == 200, host
        for host in ["evil.example", "example.com", "www.admin.example.com"]:
            status, _, _ = await admin.request("GET", "/queues", headers={"Host": host})
            assert status == 421, host
    with pytest.raises(TypeError):
        AdminServer(allowed_hosts="admin.example.com")
    for bad in ["admin.example.com/path", "*.example.com", "", "a:b:c"]:
        with pytest.raises(ValueError, match="allowed_hosts"):
            AdminServer(allowed_hosts=[bad])


async def test_host_not_checked_beyond_loopback_without_allowed_hosts(tmp_path):
    """Listening on an address other than loopback, the token protects; allowed_hosts,
    when given, is still checked. (Bound to 127.0.0.1 here, taken as another address.)"""
    async with running_admin(tmp_path, TOKEN) as admin:
        admin.server._loopback = False
        status, _, _ = await admin.request("GET", "/queues", headers={"Host": "mail.example:8025"})
        assert status == 200
        status, _, _ = await admin.request("GET", "/queues", token=None,
                                           headers={"Host": "mail.example:8025"})
        assert status == 401
        admin.server.allowed_hosts = frozenset({"mail.example"})
        status, _, _ = await admin.request("GET", "/queues", headers={"Host": "mail.example:8025"})
        assert status == 200
        status, _, _ = await admin.request("GET", "/queues", headers={"Host": "evil.example"})
        assert status == 421


async def test_dashboard_forms_still_work_without_a_token(open_admin):
    """What a browser sends with the dashboard's own form: Origin and Host its own,
    Sec-Fetch-Site same-origin, a form body with the CSRF token."""
    admin = open_admin
    qid = admin.ids[0]
    status, page, _ = await admin.request("GET", f"/dashboard/queues/outbound/{qid}")
    assert status == 200
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    browser = {"Origin": admin.base, "Sec-Fetch-Site": "same-origin"}
    status, _, resp = await admin.request("POST", f"/dashboard/queues/outbound/{qid}/hold",
                                          headers=browser, data={"csrf": csrf})
    assert (status, resp.headers["Location"]) == (
        303, f"/dashboard/queues/outbound/{qid}?done=hold")
    assert (await admin.queue.get(qid)).held
    # the same form from another site: the dashboard's own check refuses it
    status, page, _ = await admin.request("POST", f"/dashboard/queues/outbound/{qid}/release",
                                          headers={**EVIL_FORM, "Sec-Fetch-Site": "cross-site"},
                                          data={"csrf": csrf})
    assert status == 403 and "came from another site" in page
    assert (await admin.queue.get(qid)).held
