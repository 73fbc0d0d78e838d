"""slimta.app.dashboard: the web dashboard of the admin endpoint.

Two parts:

- unit-level tests: a real AdminServer on a free port over a real queue, with
  aiohttp's client (auth, escaping, paging, search, the action endpoints,
  the JSON of the live view, the hour counters of slimta.app.metrics);
- browser tests: a real ``slimta serve`` daemon (its relay points at a closed
  port, so mail waits an hour between attempts) driven by Playwright in
  Debian's headless Chromium (/usr/bin/chromium). They fail, never skip,
  when Playwright or Chromium is missing (scripts/test installs both).

Screenshots of every page go to ``$SLIMTA_TEST_ARTIFACTS/dashboard/`` when that
variable is set, else to ``<pytest basetemp>/dashboard-screenshots/`` (e.g.
/tmp/pytest-of-root/pytest-N/dashboard-screenshots/); each is checked to be a
non-empty PNG.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_serve import CLI, connect, free_port, wait_for

from slimta.app.admin import AdminServer
from slimta.app.dashboard import Dashboard, format_relative
from slimta.app.metrics import Metrics, RecentCounts
from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.sqlite import SqliteStorage
from slimta.queue.storage import HISTORY_LIMIT
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply

TOKEN = "s3cret-dash-token"
XSS = "<script>window.__pwned = 1</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# unit level: AdminServer + aiohttp client
# ---------------------------------------------------------------------------

class ScriptedRelay(Relay):
    """Delivers recipients starting with ``ok``, fails ``bad`` ones for good, defers the rest."""

    def __init__(self):
        super().__init__()
        self.attempts = 0

    def _attempt(self, envelope, attempts):
        self.attempts += 1
        out: dict[str, Any] = {}
        for rcpt in envelope.recipients:
            if rcpt.startswith("ok"):
                out[rcpt] = Reply("250", "2.0.0 Ok")
            elif rcpt.startswith("bad"):
                out[rcpt] = PermanentRelayError(reply=Reply("550", "5.1.1 No such user"))
            else:
                out[rcpt] = TransientRelayError(
                    reply=Reply("451", f"4.4.1 Connection refused {XSS}"))
        return out


def basic(password: str, user: str = "admin") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Client:
    """An aiohttp session on the admin server that logs in with Basic unless told otherwise."""

    def __init__(self, session: aiohttp.ClientSession, base: str, auth: str | None):
        self.session, self.base, self.auth = session, base, auth

    async def request(self, method: str, path: str, auth: str | None = "default",
                      data: dict | None = None, headers: dict | None = None,
                      ) -> tuple[int, str, aiohttp.ClientResponse]:
        headers = dict(headers or {})
        auth = self.auth if auth == "default" else auth
        if auth is not None:
            headers["Authorization"] = auth
        async with self.session.request(method, self.base + path, headers=headers, data=data,
                                        allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp

    async def json(self, path: str) -> Any:
        status, text, _ = await self.request("GET", path)
        assert status == 200, text
        return json.loads(text)


async def enqueue(queue: Queue, sender: str, rcpts: list[str], subject: str) -> str:
    env = Envelope(sender, rcpts)
    env.parse(f"From: {sender}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())
    env.client.update(ip="192.0.2.7", name="client.example", protocol="ESMTP")
    [(_, qid)] = await queue.enqueue(env)
    return qid


@pytest.fixture
async def dash(tmp_path):
    relay = ScriptedRelay()
    queue = Queue(SqliteStorage(tmp_path / "queue.db"), relay=relay,
                  backoff=lambda envelope, attempts: 3600.0)
    metrics = Metrics(process=False)
    metrics.instrument_relay(relay)
    metrics.instrument_queue(queue, "outbound")
    server = AdminServer(port=0, token=TOKEN, metrics=metrics, queues={"outbound": queue})
    async with queue, server:
        ids = {
            "alice": await enqueue(queue, "alice@example.com", ["x@example.org"], "first"),
            "bob": await enqueue(queue, "bob@example.com",
                                 ["ok1@example.org", "y@example.net"], "second"),
            "evil": await enqueue(queue, f'"{XSS}"@example.com', [f'"{XSS}"@example.org'],
                                  XSS),
        }
        await queue.join()
        host, port = server.address
        async with aiohttp.ClientSession() as session:
            client = Client(session, f"http://{host}:{port}", basic(TOKEN))
            client.queue, client.ids, client.relay, client.server = queue, ids, relay, server
            client.metrics = metrics
            yield client


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, "no CSRF token in the page"
    return match.group(1)


def rows(page: str) -> list[str]:
    """The ids of the rows of a message list page, in order."""
    return re.findall(r'<tr data-id="([^"]+)"', page)


DASHBOARD_PATHS = ["/", "/dashboard", "/dashboard/", "/dashboard/queues/outbound",
                   "/dashboard/queues/outbound/0123", "/dashboard/api/overview",
                   "/dashboard/api/queues/outbound", "/dashboard/static/dashboard.js"]


@pytest.mark.parametrize("auth", [None, basic("wrong"), "Bearer wrong", "Basic !!notbase64",
                                  f"Token {TOKEN}"])
async def test_401_without_the_token(dash, auth):
    for path in DASHBOARD_PATHS:
        status, _, resp = await dash.request("GET", path, auth=auth)
        assert status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")  # a browser prompt
    qid = dash.ids["alice"]
    status, _, _ = await dash.request("POST", f"/dashboard/queues/outbound/{qid}/delete",
                                      auth=auth, data={"csrf": "x"})
    assert status == 401
    assert len(await dash.queue.list()) == 3


async def test_token_as_basic_password_or_bearer(dash):
    for auth in (basic(TOKEN), basic(TOKEN, user="anyone"), f"Bearer {TOKEN}"):
        status, text, _ = await dash.request("GET", "/dashboard/", auth=auth)
        assert status == 200, auth
        assert "<h1>Overview</h1>" in text
    # the JSON API keeps its bearer-only rule
    status, _, _ = await dash.request("GET", "/queues", auth=basic(TOKEN))
    assert status == 401
    status, _, _ = await dash.request("GET", "/queues", auth=f"Bearer {TOKEN}")
    assert status == 200


async def test_no_token_no_login():
    async with AdminServer(port=0) as server, aiohttp.ClientSession() as session:
        host, port = server.address
        async with session.get(f"http://{host}:{port}/dashboard/") as resp:
            assert resp.status == 200


async def test_overview_without_metrics(dash):
    dash.server.metrics = None
    [q] = (await dash.json("/dashboard/api/overview"))["queues"]
    assert q["last_hour"] is None and q["messages"] == 3
    _, page, _ = await dash.request("GET", "/dashboard/")
    assert '<td data-field="delivered_1h">—</td>' in page


async def test_dashboard_can_be_left_out():
    async with AdminServer(port=0, dashboard=False) as server, aiohttp.ClientSession() as s:
        assert server.dashboard is None
        host, port = server.address
        async with s.get(f"http://{host}:{port}/dashboard/") as resp:
            assert resp.status == 404


async def test_root_redirects_to_the_overview(dash):
    for path in ("/", "/dashboard"):
        status, _, resp = await dash.request("GET", path)
        assert status == 302
        assert resp.headers["Location"] == "/dashboard/"


async def test_overview(dash):
    status, page, resp = await dash.request("GET", "/dashboard/")
    assert status == 200
    assert resp.content_type == "text/html"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert 'href="/dashboard/queues/outbound"' in page
    data = await dash.json("/dashboard/api/overview")
    [q] = data["queues"]
    assert q["name"] == "outbound" and q["error"] is None
    # every message was attempted once and deferred for an hour
    assert (q["messages"], q["queued"], q["deferred"], q["held"], q["attempting"]) == \
        (3, 0, 3, 0, 0)
    assert data["now"] - 60 < q["oldest"] <= data["now"]
    assert q["last_hour"] == {"delivered": 1, "deferred": 3, "failed": 0, "bounced": 0}
    assert '<td data-field="messages">3</td>' in page
    assert '<td data-field="delivered_1h">1</td>' in page


async def test_overview_counts_states_and_bounces(dash):
    await dash.queue.hold(dash.ids["alice"])
    await enqueue(dash.queue, "carol@example.com", ["bad@example.org", "z@example.org"], "x")
    await dash.queue.join()  # bad@ bounced: a DSN to carol (deferred) joins the queue
    [q] = (await dash.json("/dashboard/api/overview"))["queues"]
    assert q["held"] == 1
    assert q["messages"] == 5 and q["deferred"] == 4 and q["queued"] == 0
    assert q["last_hour"]["bounced"] == 1 and q["last_hour"]["failed"] == 1


async def test_broken_queue_shown_not_fatal(dash, caplog):
    class Broken:
        async def list(self):
            raise RuntimeError("disk gone")

        async def stats(self):
            raise RuntimeError("disk gone")

    dash.server.queues = {"outbound": dash.queue, "broken": Broken()}
    status, page, _ = await dash.request("GET", "/dashboard/")
    assert status == 200
    assert "cannot be read: RuntimeError: disk gone" in page
    assert '<td data-field="messages">3</td>' in page
    assert "queue 'broken' could not be read" in caplog.text


async def test_list_shows_every_column(dash):
    status, page, _ = await dash.request("GET", "/dashboard/queues/outbound")
    assert status == 200
    assert sorted(rows(page)) == sorted(dash.ids.values())
    bob = dash.ids["bob"]
    assert f'href="/dashboard/queues/outbound/{bob}"' in page
    assert "bob@example.com" in page
    assert "y@example.net" in page and "ok1@example.org" not in page  # pending only
    assert "4.4.1 Connection refused" in page
    assert re.search(r'<time datetime="[0-9T:-]+Z">[0-9 :-]+ UTC</time> '
                     r'\(<span class="rel" data-ts="[0-9.]+">in 59 min</span>\)', page)
    assert "3 messages, page 1 of 1" in page
    await dash.queue.hold(bob)
    _, page, _ = await dash.request("GET", "/dashboard/queues/outbound")
    assert f'<tr data-id="{bob}" class="held">' in page
    assert page.count('<span class="badge held">held</span>') == 1


@pytest.mark.parametrize(("q", "who"), [
    ("alice", ["alice"]), ("ALICE@EXAMPLE", ["alice"]),  # sender, any case
    ("y@example.net", ["bob"]),  # a recipient
    ("connection refused", ["alice", "bob", "evil"]),  # the last reply
    ("nobody-at-all", []),
])
async def test_search(dash, q, who):
    status, page, _ = await dash.request("GET", f"/dashboard/queues/outbound?q={q}")
    assert status == 200
    assert sorted(rows(page)) == sorted(dash.ids[w] for w in who)
    assert f'value="{q}"' in page  # the search box keeps it
    data = await dash.json(f"/dashboard/api/queues/outbound?q={q}")
    assert sorted(e["id"] for e in data["entries"]) == sorted(dash.ids[w] for w in who)
    assert (data["matching"], data["total"]) == (len(who), 3)


async def test_search_by_id_prefix(dash):
    qid = dash.ids["bob"]
    _, page, _ = await dash.request("GET", f"/dashboard/queues/outbound?q={qid[:12]}")
    assert rows(page) == [qid]


async def test_paging(dash):
    for i in range(4):
        await enqueue(dash.queue, f"p{i}@example.com", [f"r{i}@example.org"], f"page {i}")
    await dash.queue.join()
    everything = [e.id for e in await dash.queue.list()]
    assert len(everything) == 7
    seen = []
    for page_no in (1, 2, 3):
        status, page, _ = await dash.request(
            "GET", f"/dashboard/queues/outbound?page={page_no}&per_page=3")
        assert status == 200
        seen += rows(page)
        assert f"page {page_no} of 3" in page
        assert ('rel="next"' in page) == (page_no < 3)
        assert ('rel="prev"' in page) == (page_no > 1)
    assert seen == everything  # every message once, in the queue's order
    _, page, _ = await dash.request("GET", "/dashboard/queues/outbound?page=1&per_page=3")
    assert 'href="/dashboard/queues/outbound?page=2&amp;per_page=3"' in page
    # past the end: the last page
    _, page, _ = await dash.request("GET", "/dashboard/queues/outbound?page=99&per_page=3")
    assert rows(page) == everything[6:]
    data = await dash.json("/dashboard/api/queues/outbound?page=2&per_page=3")
    assert [e["id"] for e in data["entries"]] == everything[3:6]
    assert (data["page"], data["pages"], data["per_page"]) == (2, 3, 3)
    # search and paging together; links keep the search
    _, page, _ = await dash.request("GET", "/dashboard/queues/outbound?q=example.com&per_page=2")
    assert "7 messages matching" in page
    assert 'href="/dashboard/queues/outbound?q=example.com&amp;page=2&amp;per_page=2"' in page


@pytest.mark.parametrize("query", ["page=x", "page=0", "per_page=0", "per_page=501",
                                   "per_page=1.5"])
async def test_bad_paging_parameters(dash, query):
    status, page, resp = await dash.request("GET", f"/dashboard/queues/outbound?{query}")
    assert status == 400
    assert resp.content_type == "text/html"
    assert "must be" in page
    status, text, _ = await dash.request("GET", f"/dashboard/api/queues/outbound?{query}")
    assert status == 400 and json.loads(text)["status"] == 400


async def test_unknown_queue_or_message(dash):
    for path in ("/dashboard/queues/nope", "/dashboard/queues/nope/0123",
                 "/dashboard/queues/outbound/0123", "/dashboard/queues/outbound/0123/message",
                 "/dashboard/api/queues/nope", "/dashboard/static/secret.py",
                 "/dashboard/static/..%2F..%2Fadmin.py"):
        status, _, _ = await dash.request("GET", path)
        assert status == 404, path


async def test_message_page(dash):
    qid = dash.ids["bob"]
    status, page, _ = await dash.request("GET", f"/dashboard/queues/outbound/{qid}")
    assert status == 200
    assert '<td id="sender">bob@example.com</td>' in page
    assert re.search(r'<td>ok1@example.org</td><td><span class="badge delivered">', page)
    assert re.search(r'<td>y@example.net</td><td><span class="badge pending">', page)
    assert "192.0.2.7" in page and "client.example" in page and "ESMTP" in page
    assert '<td id="attempts">1</td>' in page
    assert "4.4.1 Connection refused" in page
    assert "does not keep a history" not in page
    stored = await dash.queue.get(qid)
    [(ended, reply)] = stored.history
    escaped = "451 4.4.1 Connection refused &lt;script&gt;window.__pwned = 1&lt;/script&gt;"
    assert reply.startswith("451 4.4.1 Connection refused <script>")
    history = re.search(r'<table id="history".*?</table>', page, re.S).group(0)
    history_rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", history)
    assert len(history_rows) == 1
    assert history_rows[0][1] == escaped
    assert time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ended)) in history_rows[0][0]
    assert f'data-ts="{ended!r}"' in history_rows[0][0]
    # every deferral adds a row, oldest first
    await dash.queue.retry(qid)
    await dash.queue.join()
    _, page, _ = await dash.request("GET", f"/dashboard/queues/outbound/{qid}")
    assert '<td id="attempts">2</td>' in page
    history = re.search(r'<table id="history".*?</table>', page, re.S).group(0)
    history_rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", history)
    assert [r[1] for r in history_rows] == [escaped, escaped]
    assert f'data-ts="{ended!r}"' in history_rows[0][0]
    assert "not in the history" not in page
    assert f"id={qid}" in page
    assert "<th>Subject</th><td>second</td>" in page
    stored = await dash.queue.get(qid)
    header, body = stored.envelope.flatten()
    assert f"({len(header) + len(body)} octets)" in page
    for action in ("retry", "hold", "delete"):
        assert f'action="/dashboard/queues/outbound/{qid}/{action}"' in page
    assert f"/{qid}/release" not in page
    await dash.queue.hold(qid)
    _, page, _ = await dash.request("GET", f"/dashboard/queues/outbound/{qid}")
    assert f'action="/dashboard/queues/outbound/{qid}/release"' in page
    assert f"/{qid}/retry" not in page and f"/{qid}/hold" not in page
    status, raw, resp = await dash.request("GET", f"/dashboard/queues/outbound/{qid}/message")
    assert status == 200 and resp.content_type == "text/plain"
    assert raw.encode() == header + body


async def test_message_page_history_before_and_beyond_its_limit(dash):
    store = dash.queue.store
    env = Envelope("new@example.com", ["z@example.org"])
    env.parse(b"Subject: later\r\n\r\nhello\r\n")
    qid = await store.write(env, time.time() + 7200)
    path = f"/dashboard/queues/outbound/{qid}"
    _, page, _ = await dash.request("GET", path)
    assert '<p id="history-none" class="legend">No attempt yet.</p>' in page
    await store.record_attempt(qid, time.time() + 7200, [], "451 untimed")  # no history
    _, page, _ = await dash.request("GET", path)
    assert 'id="history-none"' in page and "before the queue kept one" in page
    for n in range(HISTORY_LIMIT):
        await store.record_attempt(qid, time.time() + 7200, [], f"451 try {n}",
                                   attempted_at=1700000000.0 + n)
    _, page, _ = await dash.request("GET", path)
    assert '<td id="attempts">21</td>' in page
    history = re.search(r'<table id="history".*?</table>', page, re.S).group(0)
    assert re.findall(r"<td>(451 try \d+)</td>", history) == [
        f"451 try {n}" for n in range(HISTORY_LIMIT)]
    assert "1 earlier attempt is not in the history: it keeps the last 20." in page


async def test_user_data_is_escaped(dash):
    """A <script> in a sender, recipient, header or reply is shown as text, never run."""
    qid = dash.ids["evil"]
    for path in ("/dashboard/", "/dashboard/queues/outbound",
                 f"/dashboard/queues/outbound/{qid}", "/dashboard/queues/outbound?q=<script>"):
        status, page, resp = await dash.request("GET", path)
        assert status == 200
        assert "__pwned" not in page.replace("&lt;script&gt;window.__pwned = 1&lt;/script&gt;", "")
        # the only script element is the dashboard's own file
        assert re.findall(r"<script\b[^>]*>", page) == \
            ['<script src="/dashboard/static/dashboard.js" defer>']
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    _, page, _ = await dash.request("GET", f"/dashboard/queues/outbound/{qid}")
    escaped = "&lt;script&gt;window.__pwned = 1&lt;/script&gt;"
    assert f'<td id="sender">&quot;{escaped}&quot;@example.com</td>' in page
    assert f"<th>Subject</th><td>{escaped}</td>" in page
    assert f"<td>&quot;{escaped}&quot;@example.org</td>" in page
    _, page, _ = await dash.request("GET", "/dashboard/queues/outbound?q=<script>")
    assert 'value="&lt;script&gt;"' in page
    # the live view's JSON carries the raw text; dashboard.js puts it in with textContent
    data = await dash.json("/dashboard/api/queues/outbound")
    [entry] = [e for e in data["entries"] if e["id"] == qid]
    assert entry["sender"] == f'"{XSS}"@example.com'


async def test_static_files(dash):
    status, js, resp = await dash.request("GET", "/dashboard/static/dashboard.js")
    assert status == 200 and resp.content_type == "text/javascript"
    assert "innerHTML" not in js and "textContent" in js
    status, css, resp = await dash.request("GET", "/dashboard/static/dashboard.css")
    assert status == 200 and resp.content_type == "text/css"
    assert "http:" not in css and "https:" not in css and "@import" not in css


async def post_action(dash, qid: str, action: str, csrf: str | None = None,
                      headers: dict | None = None) -> tuple[int, str, aiohttp.ClientResponse]:
    if csrf is None:
        _, page, _ = await dash.request("GET", f"/dashboard/queues/outbound/{dash.ids['bob']}")
        csrf = csrf_of(page)
    return await dash.request("POST", f"/dashboard/queues/outbound/{qid}/{action}",
                              data={"csrf": csrf}, headers=headers)


async def test_actions_hold_release_retry(dash):
    qid = dash.ids["alice"]
    page_url = f"/dashboard/queues/outbound/{qid}"
    status, _, resp = await post_action(dash, qid, "hold")
    assert status == 303
    assert resp.headers["Location"] == f"{page_url}?done=hold"
    assert (await dash.queue.get(qid)).held
    _, page, _ = await dash.request("GET", f"{page_url}?done=hold")
    assert "The message is held" in page
    attempts = dash.relay.attempts
    status, _, resp = await post_action(dash, qid, "release")
    assert (status, resp.headers["Location"]) == (303, f"{page_url}?done=release")
    await dash.queue.join()
    assert not (await dash.queue.get(qid)).held
    assert dash.relay.attempts == attempts + 1  # released: attempted at once
    status, _, resp = await post_action(dash, qid, "retry")
    assert (status, resp.headers["Location"]) == (303, f"{page_url}?done=retry")
    await dash.queue.join()
    assert (await dash.queue.get(qid)).attempts == 3


async def test_action_delete(dash):
    qid = dash.ids["alice"]
    status, _, resp = await post_action(dash, qid, "delete")
    assert status == 303
    assert resp.headers["Location"] == "/dashboard/queues/outbound?done=delete"
    assert qid not in [e.id for e in await dash.queue.list()]
    _, page, _ = await dash.request("GET", "/dashboard/queues/outbound?done=delete")
    assert "The message was deleted." in page
    status, page, _ = await post_action(dash, qid, "delete")
    assert status == 404 and "no message" in page


@pytest.mark.parametrize(("csrf", "headers"), [
    ("", None),
    ("0" * 64, None),
    ("good", {"Sec-Fetch-Site": "cross-site"}),  # right token, but sent by another site
    ("good", {"Sec-Fetch-Site": "same-site"}),
])
async def test_actions_refused_without_csrf_or_from_another_site(dash, csrf, headers):
    if csrf == "good":
        csrf = dash.server.dashboard.csrf_token()
    qid = dash.ids["alice"]
    for action in ("hold", "delete", "retry"):
        status, page, _ = await post_action(dash, qid, action, csrf=csrf, headers=headers)
        assert status == 403
        assert "came from another site" in page
    stored = await dash.queue.get(qid)
    assert not stored.held and stored.attempts == 1
    # and the same request with the token from the page works
    status, _, _ = await post_action(dash, qid, "hold", csrf=dash.server.dashboard.csrf_token(),
                                     headers={"Sec-Fetch-Site": "same-origin"})
    assert status == 303


async def test_actions_need_post(dash):
    qid = dash.ids["alice"]
    status, _, _ = await dash.request("GET", f"/dashboard/queues/outbound/{qid}/delete")
    assert status in (404, 405)
    assert len(await dash.queue.list()) == 3


def test_format_relative():
    assert format_relative(100.0, 100.4) == "now"
    assert format_relative(130.0, 100.0) == "in 30 s"
    assert format_relative(100.0 + 59 * 60 + 59, 100.0) == "in 59 min"
    assert format_relative(100.0, 100.0 + 2 * 3600 + 3 * 60) == "2 h 3 min ago"
    assert format_relative(100.0 + 3 * 86400 + 4 * 3600, 100.0) == "in 3 d 4 h"


def test_recent_counts_forget_after_an_hour():
    now = [1_000_000.0]
    counts = RecentCounts(lambda: now[0])
    counts.add("a")
    now[0] += 30 * 60
    counts.add("a", 2)
    counts.add("b")
    assert counts.totals() == {"a": 3, "b": 1}
    now[0] += 31 * 60  # the first minute is more than an hour ago
    assert counts.totals() == {"a": 2, "b": 1}
    now[0] += 30 * 60
    assert counts.totals() == {}
    counts.add("a")  # a slot reused after a full turn starts empty
    assert counts.totals() == {"a": 1}


async def test_metrics_last_hour_per_queue(tmp_path):
    now = [1_000_000.0]
    metrics = Metrics(clock=lambda: now[0], process=False)
    relay = ScriptedRelay()
    metrics.instrument_relay(relay)
    queues = {}
    for name in ("one", "two"):
        queues[name] = Queue(SqliteStorage(tmp_path / f"{name}.db"), relay=relay,
                             backoff=lambda envelope, attempts: 3600.0)
        metrics.instrument_queue(queues[name], name)
    async with queues["one"], queues["two"]:
        await enqueue(queues["one"], "a@example.com", ["ok@example.org", "bad@example.org"],
                      "one")
        await enqueue(queues["two"], "b@example.com", ["ok1@x.org", "ok2@x.org", "w@x.org"],
                      "two")
        await queues["one"].join()
        await queues["two"].join()
        # relay used directly (no queue): counted in the total only
        await relay.attempt(Envelope("c@example.com", ["ok@example.net"]), 0)
    assert metrics.last_hour("one") == {"delivered": 1, "deferred": 1, "failed": 1,
                                        "bounced": 1}  # the DSN to a@ was deferred
    assert metrics.last_hour("two") == {"delivered": 2, "deferred": 1, "failed": 0,
                                        "bounced": 0}
    assert metrics.last_hour() == {"delivered": 4, "deferred": 2, "failed": 1, "bounced": 1}
    assert metrics.last_hour("nope") == {"delivered": 0, "deferred": 0, "failed": 0,
                                         "bounced": 0}
    now[0] += 3601
    assert metrics.last_hour() == {"delivered": 0, "deferred": 0, "failed": 0, "bounced": 0}
    text = metrics.render().decode()
    assert 'slimta_delivery_attempts_total{result="delivered"} 4.0' in text


def test_dashboard_routes_are_owned():
    assert Dashboard.owns("/") and Dashboard.owns("/dashboard/")
    assert Dashboard.owns("/dashboard") and Dashboard.owns("/dashboard/api/overview")
    assert not Dashboard.owns("/dashboards") and not Dashboard.owns("/queues")


# ---------------------------------------------------------------------------
# in a real browser: Playwright + Chromium against `slimta serve`
# ---------------------------------------------------------------------------

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
for _var in ("SLIMTA_QUEUE_DB", "SLIMTA_ADMIN_URL", "SLIMTA_ADMIN_TOKEN"):
    ENV.pop(_var, None)
CHROMIUM = "/usr/bin/chromium"
#: a quoted local part may hold < and > (RFC 5321 qtextSMTP): the sender is attacker-controlled
EVIL_SENDER = '"<script>window.__pwned=1</script>"@example.com'




@dataclass
class Daemon:
    """A running `slimta serve` whose relay cannot deliver: its SMTP port and admin URL."""

    proc: subprocess.Popen
    smtp: int
    url: str

    def send(self, sender: str, rcpts: list[str], subject: str, from_header: str = "") -> None:
        with connect(self.smtp, self.proc) as client:
            msg = (f"From: {from_header or sender}\r\nSubject: {subject}\r\n\r\n"
                   f"hello {subject}\r\n")
            client.ehlo()
            code, reply = client.docmd(f"MAIL FROM:<{sender}>")  # verbatim, not re-quoted
            assert code == 250, reply
            for rcpt in rcpts:
                assert client.docmd(f"RCPT TO:<{rcpt}>")[0] == 250
            assert client.data(msg.encode())[0] == 250

    def queue_list(self) -> list[dict]:
        """`slimta queue list --json`, run as a user would, through the admin endpoint."""
        out = subprocess.run([*CLI, "queue", "--admin", self.url, "--token-env", "MY_TOKEN",
                              "list", "--json"], capture_output=True, text=True,
                             env=dict(ENV, MY_TOKEN=TOKEN), timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def entry(self, sender: str) -> dict | None:
        found = [e for e in self.queue_list() if e["sender"] == sender]
        return found[0] if found else None


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    """`slimta serve` with an SQLite queue whose static relay points at a closed port (each
    message is attempted once, then waits an hour), and the admin endpoint with a token."""
    tmp = tmp_path_factory.mktemp("dashboard-daemon")
    smtp, admin = free_port(), free_port()
    (tmp / "slimta.yaml").write_text(f"""
process:
  slimta:
    data_dir: data
    admin: {{listener: '127.0.0.1:{admin}', token: {TOKEN}}}
edge:
  in: {{type: smtp, queue: q, listener: '127.0.0.1:{smtp}'}}
queue:
  q: {{type: sqlite, relay: out, retry: {{maximum: 20, delay: '3600'}}}}
relay:
  out: {{type: static, host: 127.0.0.1, port: {free_port()}, starttls: false}}
""")
    proc = subprocess.Popen([*CLI, "serve", "-c", str(tmp / "slimta.yaml")], cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    d = Daemon(proc, smtp, f"http://127.0.0.1:{admin}")
    try:
        d.send("alice@example.com", ["bob@example.org"], "first")
        d.send("carol@example.com", ["dave@example.org", "erin@example.net"], "second")
        d.send(EVIL_SENDER, ["frank@example.org"], XSS, from_header=f'"{XSS}" <m@example.com>')
        wait_for(lambda: [e["attempts"] for e in d.queue_list()] == [1, 1, 1],
                 "the first attempts")
        yield d
    finally:
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through Playwright; fails (never skips) when either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is not installed: pip install -e '.[test]' "
                    "(scripts/test does it)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/test does it)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: $SLIMTA_TEST_ARTIFACTS/dashboard, else
    <basetemp>/dashboard-screenshots."""
    root = os.environ.get("SLIMTA_TEST_ARTIFACTS")
    path = (Path(root) / "dashboard") if root else \
        tmp_path_factory.getbasetemp() / "dashboard-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser, daemon, shots):
    """A page logged in with the token as the Basic password; fails on script errors and
    Content Security Policy violations."""
    context = browser.new_context(http_credentials={"username": "admin", "password": TOKEN},
                                  viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20_000)
    p = context.new_page()
    problems: list[str] = []
    p.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
    p.on("console", lambda m: problems.append(m.text)
         if m.type == "error" and "Content Security Policy" in m.text else None)
    p.on("dialog", lambda dialog: dialog.accept())  # the delete button asks first

    def shot(name: str) -> Path:
        path = shots / f"{name}.png"
        p.screenshot(path=str(path), full_page=True)
        data = path.read_bytes()
        assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC), path
        return path

    p.shot = shot
    p.base = daemon.url
    yield p
    context.close()
    assert problems == []


def list_ids(page) -> list[str]:
    return page.eval_on_selector_all("#messages tbody tr[data-id]",
                                     "rows => rows.map(r => r.dataset.id)")


def test_browser_login_is_required(browser, daemon):
    from playwright.sync_api import Error

    context = browser.new_context()  # no credentials
    try:
        response = context.request.get(daemon.url + "/dashboard/")
        assert response.status == 401
        assert response.headers["www-authenticate"].startswith("Basic")
        # the browser is asked to log in (and, headless with nothing to give, gives up)
        with pytest.raises(Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
            context.new_page().goto(daemon.url + "/dashboard/")
    finally:
        context.close()


def test_browser_overview_live(page, daemon):
    page.goto(page.base + "/")  # redirected to the overview
    assert page.url == page.base + "/dashboard/"
    row = page.locator('#overview tr[data-queue="q"]')
    assert row.locator('[data-field="messages"]').inner_text() == "3"
    assert row.locator('[data-field="deferred"]').inner_text() == "3"
    assert row.locator('[data-field="held"]').inner_text() == "0"
    assert row.locator('[data-field="deferred_1h"]').inner_text() == "4"  # per recipient
    assert "ago" in row.locator('[data-field="oldest"]').inner_text()
    page.shot("overview")
    page.evaluate("window.__still_here = 42")
    daemon.send("grace@example.com", ["heidi@example.org"], "live overview")
    page.wait_for_function(
        """() => document.querySelector('#overview tr[data-queue="q"] '
                                        + '[data-field="messages"]').textContent === "4" """)
    assert page.evaluate("window.__still_here") == 42  # updated in place, not reloaded
    assert "live" in page.locator("#live-status").inner_text()
    page.shot("overview-live")


def test_browser_list_search_and_live(page, daemon):
    page.goto(page.base + "/dashboard/")
    page.click('#overview a[href="/dashboard/queues/q"]')
    page.wait_for_url("**/dashboard/queues/q")
    assert len(list_ids(page)) == 4
    text = page.locator("#messages").inner_text()
    assert "carol@example.com" in text and "erin@example.net" in text
    assert EVIL_SENDER in text  # shown as text
    assert page.evaluate("window.__pwned") is None
    page.shot("list")

    page.fill('input[name="q"]', "carol")
    page.press('input[name="q"]', "Enter")
    page.wait_for_url("**/dashboard/queues/q?q=carol")
    carol = daemon.entry("carol@example.com")["id"]
    assert list_ids(page) == [carol]
    assert "1 message matching" in page.locator("#summary").inner_text()
    page.shot("list-search")

    page.goto(page.base + "/dashboard/queues/q?per_page=4")
    assert page.locator("#pager a").count() == 0  # 4 messages: one page
    page.evaluate("window.__still_here = 7")
    daemon.send("ivan@example.com", ["judy@example.org"], "live list")
    # the fifth message (due last) makes a second page: the summary and pager follow
    page.wait_for_function("() => document.getElementById('summary').textContent"
                           ".startsWith('5 messages, page 1 of 2')")
    assert page.evaluate("window.__still_here") == 7
    assert len(list_ids(page)) == 4
    page.click('#pager a[rel="next"]')
    page.wait_for_url("**/dashboard/queues/q?page=2&per_page=4")
    assert "ivan@example.com" in page.locator("#messages").inner_text()

    page.goto(page.base + "/dashboard/queues/q")
    page.evaluate("window.__still_here = 8")
    daemon.send("mallory@example.com", ["trent@example.org"], "live list 2")
    page.wait_for_function("() => document.querySelectorAll('#messages tbody tr[data-id]')"
                           ".length === 6")
    assert page.evaluate("window.__still_here") == 8
    text = page.locator("#messages").inner_text()
    assert "mallory@example.com" in text
    assert EVIL_SENDER in text  # rows rebuilt by the script: still text
    assert page.evaluate("window.__pwned") is None
    page.shot("list-live")


def test_browser_message_page_escapes(page, daemon):
    evil = daemon.entry(EVIL_SENDER)["id"]
    page.goto(page.base + "/dashboard/queues/q")
    page.click(f'#messages a[href="/dashboard/queues/q/{evil}"]')
    page.wait_for_url(f"**/dashboard/queues/q/{evil}")
    assert page.locator("#sender").inner_text() == EVIL_SENDER
    headers = page.locator("#headers").inner_text()
    assert XSS in headers  # the Subject and From as text
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#recipients").inner_text().count("pending") == 1
    assert page.locator("#attempts").inner_text() == "1"
    assert page.locator("#last-reply").inner_text().startswith("451 4.4.1 Connection to")
    page.shot("message")


def test_browser_hold_release_retry_delete(page, daemon):
    alice = daemon.entry("alice@example.com")
    qid = alice["id"]
    page.goto(f"{page.base}/dashboard/queues/q/{qid}")

    page.click("button.hold")
    page.wait_for_url(f"**/dashboard/queues/q/{qid}?done=hold")
    assert "held" in page.locator(".notice").inner_text()
    assert daemon.entry("alice@example.com")["held"] is True
    page.shot("message-held")

    page.click("button.release")
    page.wait_for_url(f"**/dashboard/queues/q/{qid}?done=release")
    wait_for(lambda: (e := daemon.entry("alice@example.com")) and not e["held"]
             and e["attempts"] == alice["attempts"] + 1, "the attempt after release")

    page.click("button.retry")
    page.wait_for_url(f"**/dashboard/queues/q/{qid}?done=retry")
    wait_for(lambda: daemon.entry("alice@example.com")["attempts"] == alice["attempts"] + 2,
             "the retried attempt")
    page.reload()
    assert page.locator("#attempts").inner_text() == str(alice["attempts"] + 2)
    page.shot("message-retried")

    page.click("button.delete")  # the confirm() dialog is accepted
    page.wait_for_url("**/dashboard/queues/q?done=delete")
    assert "deleted" in page.locator(".notice").inner_text()
    assert daemon.entry("alice@example.com") is None
    assert qid not in list_ids(page)
    page.shot("list-after-delete")


def test_browser_screenshots_are_pngs(shots):
    names = {p.name for p in shots.glob("*.png")}
    assert names >= {"overview.png", "overview-live.png", "list.png", "list-search.png",
                     "list-live.png", "message.png", "message-held.png", "message-retried.png",
                     "list-after-delete.png"}
    for path in shots.glob("*.png"):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, path
