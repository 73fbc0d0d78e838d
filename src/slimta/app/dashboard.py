"""The web dashboard of the admin endpoint: queues, messages and actions in a browser.

:class:`Dashboard` adds HTML pages (and the JSON they refresh from) to an
:class:`~slimta.app.admin.AdminServer`. Everything is rendered here with
:func:`html.escape`; the only other files are ``dashboard_static/dashboard.css``
and ``dashboard_static/dashboard.js`` in this package (no CDN, no build step).
Routes::

    GET  /                                       redirect to /dashboard/
    GET  /dashboard/                             overview: per queue counts by state, the
                                                 oldest message's age, the last hour's
                                                 deliveries and bounces
    GET  /dashboard/queues/{name}                message list (?q=, ?page=, ?per_page=)
    GET  /dashboard/queues/{name}/{id}           one message, with its action buttons
    GET  /dashboard/queues/{name}/{id}/message   the message as stored, as text/plain
    POST /dashboard/queues/{name}/{id}/{action}  retry, hold, release or delete; then a
                                                 303 redirect back (form field ``csrf``)
    GET  /dashboard/api/overview                 the overview as JSON (the live view polls it)
    GET  /dashboard/api/queues/{name}            a list page as JSON (same parameters)
    GET  /dashboard/static/{file}                the CSS and JavaScript

Authentication is the admin endpoint's token: with one set, a request
carries it as ``Authorization: Bearer <token>`` or, so that a browser can
log in, as the password of HTTP Basic authentication (any user name). A 401
on these routes asks for Basic, so the browser shows its login prompt.

Forms that change the queue carry a CSRF token (an HMAC of a random secret
made at start) and are refused when the browser says the request came from
another site (``Sec-Fetch-Site``). Pages are sent with a Content Security
Policy that allows only this endpoint's own script and style sheet, so even
a mistake in escaping could not run a script from a message header.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import html
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from hashlib import sha256
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from slimta.queue.storage import HISTORY_LIMIT, QueueEntry

__all__ = ["DEFAULT_PER_PAGE", "MAX_PER_PAGE", "PREFIX", "Dashboard", "format_relative"]

log = logging.getLogger(__name__)

#: Where the dashboard lives on the admin endpoint.
PREFIX = "/dashboard"
#: Messages on a list page unless ``?per_page=`` says otherwise, and the most it may ask.
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 500

_STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
_ACTIONS = ("retry", "hold", "release", "delete")
_DONE = {
    "retry": "Retry requested: the message is being attempted now.",
    "hold": "The message is held: it will not be attempted until released.",
    "release": "The message is released and is being attempted now.",
    "delete": "The message was deleted.",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_e = html.escape


def _q(part: str) -> str:
    """One path segment, percent-encoded."""
    return quote(part, safe="")


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_relative(ts: float, now: float) -> str:
    """``ts`` as seen from ``now``: "in 5 min", "2 h 3 min ago" or "now".

    dashboard.js formats the same way when it refreshes a page.
    """
    delta = ts - now
    if abs(delta) < 1:
        return "now"
    return f"in {_span(delta)}" if delta > 0 else f"{_span(-delta)} ago"


def _absolute(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _when(ts: float | None, now: float) -> str:
    """Absolute and relative time, the relative part refreshed by the script."""
    if not ts:
        return "—"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    return (f'<time datetime="{iso}">{_absolute(ts)}</time> '
            f'(<span class="rel" data-ts="{ts!r}">{_e(format_relative(ts, now))}</span>)')


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # not reached


def _sender(sender: str | None) -> str:
    return sender or "<>"


def _matches(entry: QueueEntry, needle: str) -> bool:
    """Whether ``needle`` (case-folded) is in the id, sender, a recipient or the last reply."""
    fields: Iterable[str | None] = (entry.id, entry.sender, entry.last_reply, *entry.recipients)
    return any(needle in f.casefold() for f in fields if f)


class _BadParameter(ValueError):
    pass


def _int_param(query: Any, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadParameter(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise _BadParameter(f"{name} must be between {low} and {high}")
    return value


def _static(name: str) -> bytes:
    return resources.files("slimta.app").joinpath("dashboard_static", name).read_bytes()


class Dashboard:
    """The dashboard pages of an admin endpoint.

    ``server`` is the :class:`~slimta.app.admin.AdminServer` (or anything
    with its ``queues``, ``metrics`` and ``token`` attributes): they are read
    at each request, so a reload that replaces them is seen at once.
    ``refresh`` is how often (seconds) the live view polls; ``clock()`` gives
    the time shown as "now".
    """

    def __init__(self, server: Any, refresh: float = 3.0,
                 clock: Callable[[], float] = time.time):
        self.server = server
        self.refresh = refresh
        self.clock = clock
        self._secret = os.urandom(32)
        self._files: dict[str, bytes] = {}

    # --- mounting ------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        """The routes to add to the admin application."""
        p = PREFIX
        return [
            web.get("/", self._root),
            web.get(p, self._root),
            web.get(f"{p}/", self._overview),
            web.get(f"{p}/static/{{file}}", self._static),
            web.get(f"{p}/api/overview", self._overview_json),
            web.get(f"{p}/api/queues/{{name}}", self._list_json),
            web.get(f"{p}/queues/{{name}}", self._list),
            web.get(f"{p}/queues/{{name}}/{{id}}", self._show),
            web.get(f"{p}/queues/{{name}}/{{id}}/message", self._raw),
            web.post(f"{p}/queues/{{name}}/{{id}}/{{action:retry|hold|release|delete}}",
                     self._action),
        ]

    @staticmethod
    def owns(path: str) -> bool:
        """Whether ``path`` is one of the dashboard's (its auth is :meth:`check_auth`)."""
        return path in ("/", PREFIX) or path.startswith(PREFIX + "/")

    @staticmethod
    def check_auth(request: web.Request, token: str) -> None:
        """Raise 401 unless the request carries ``token`` (Bearer, or Basic's password)."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        given: str | None = None
        if scheme == "bearer":
            given = value
        elif scheme == "basic":
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                given = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise web.HTTPUnauthorized(
                reason="the admin token is required (as the password)",
                headers={"WWW-Authenticate": 'Basic realm="slimta admin", charset="UTF-8"'})

    def csrf_token(self) -> str:
        """The token the action forms carry; valid until the endpoint restarts."""
        return hmac.new(self._secret, b"slimta-dashboard-actions", sha256).hexdigest()

    def _csrf_ok(self, request: web.Request, form: Any) -> bool:
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return False
        given = form.get("csrf")
        return isinstance(given, str) and hmac.compare_digest(given.encode(),
                                                              self.csrf_token().encode())

    # --- rendering helpers ------------------------------------------------------
    def _page(self, title: str, body: str, *, status: int = 200, view: str = "",
              live: str = "") -> web.Response:
        attrs = f' data-view="{_e(view)}"' if view else ""
        if live:
            attrs += (f' data-live="{_e(live)}"'
                      f' data-refresh="{int(self.refresh * 1000)}"')
        now = self.clock()
        text = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · slimta</title>
<link rel="stylesheet" href="{PREFIX}/static/dashboard.css">
<script src="{PREFIX}/static/dashboard.js" defer></script>
</head>
<body{attrs} data-now="{now!r}">
<header><a class="brand" href="{PREFIX}/">slimta</a>
<nav>{self._nav()}</nav>
<span id="live-status" class="live-status">{"live view: starting" if live else ""}</span>
</header>
<main>
{body}
</main>
</body>
</html>
"""
        return web.Response(text=text, status=status, content_type="text/html",
                            headers=_SECURITY_HEADERS)

    def _nav(self) -> str:
        links = [f'<a href="{PREFIX}/">Overview</a>']
        links += [f'<a href="{PREFIX}/queues/{_e(_q(n))}">{_e(n)}</a>'
                  for n in list(self.server.queues)]
        return " ".join(links)

    def _problem(self, status: int, text: str) -> web.Response:
        body = (f'<h1>{status}</h1><p class="problem">{_e(text)}</p>'
                f'<p><a href="{PREFIX}/">Back to the overview</a></p>')
        return self._page(f"Error {status}", body, status=status)

    def _queue(self, request: web.Request) -> tuple[str, Any]:
        name = request.match_info["name"]
        queue = self.server.queues.get(name)
        if queue is None:
            raise KeyError(f"no queue named {name!r}")
        return name, queue

    # --- data ------------------------------------------------------------------------
    async def overview_data(self) -> dict[str, Any]:
        """What the overview shows, per queue (also ``GET /dashboard/api/overview``)."""
        now = self.clock()
        last_hour = getattr(self.server.metrics, "last_hour", None)
        out = []
        for name, queue in list(self.server.queues.items()):
            row: dict[str, Any] = {"name": name, "url": f"{PREFIX}/queues/{_q(name)}",
                                   "error": None}
            try:
                entries = await queue.list()
                stats = await queue.stats()
            except Exception as exc:
                log.exception("dashboard: queue %r could not be read", name)
                row["error"] = f"{type(exc).__name__}: {exc}"
                out.append(row)
                continue
            created = [e.created for e in entries if e.created]
            row.update({
                "messages": len(entries),
                "queued": sum(1 for e in entries if not e.held and not e.attempts),
                "deferred": sum(1 for e in entries if not e.held and e.attempts),
                "held": sum(1 for e in entries if e.held),
                "attempting": int(stats.get("attempting", 0)),
                "recipients": sum(len(e.recipients) for e in entries),
                "bytes": sum(e.size for e in entries),
                "oldest": min(created) if created else None,
                "last_hour": last_hour(name) if last_hour is not None else None,
            })
            out.append(row)
        return {"now": now, "queues": out}

    async def list_data(self, name: str, queue: Any, query: Any) -> dict[str, Any]:
        """One page of a queue's messages, filtered by ``q`` (also the list's JSON).

        Raises :class:`ValueError` for a bad ``page`` or ``per_page``.
        """
        per_page = _int_param(query, "per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
        page = _int_param(query, "page", 1, 1, 10**9)
        search = (query.get("q") or "").strip()
        entries = await queue.list()
        found = entries
        if search:
            needle = search.casefold()
            found = [e for e in entries if _matches(e, needle)]
        pages = max(1, math.ceil(len(found) / per_page))
        page = min(page, pages)
        shown = found[(page - 1) * per_page:page * per_page]
        base = f"{PREFIX}/queues/{_q(name)}"
        return {
            "queue": name,
            "now": self.clock(),
            "q": search,
            "page": page,
            "per_page": per_page,
            "pages": pages,
            "matching": len(found),
            "total": len(entries),
            "entries": [{
                "id": e.id,
                "url": f"{base}/{_q(e.id)}",
                "sender": e.sender,
                "recipients": list(e.recipients),
                "attempts": e.attempts,
                "next_attempt": e.next_attempt,
                "last_reply": e.last_reply,
                "held": e.held,
                "size": e.size,
                "created": e.created,
            } for e in shown],
        }

    # --- routes: pages --------------------------------------------------------------
    async def _root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{PREFIX}/")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in _STATIC:
            return self._problem(404, f"no file {name!r}")
        if name not in self._files:
            self._files[name] = _static(name)
        return web.Response(body=self._files[name], content_type=_STATIC[name],
                            charset="utf-8", headers={"Cache-Control": "no-cache",
                                                      "X-Content-Type-Options": "nosniff"})

    async def _overview(self, request: web.Request) -> web.Response:
        data = await self.overview_data()
        now = data["now"]
        rows = "\n".join(self._overview_row(q, now) for q in data["queues"]) or (
            '<tr><td colspan="10">No queue stores messages.</td></tr>')
        body = f"""<h1>Overview</h1>
<table id="overview" class="grid">
<thead><tr><th>Queue</th><th>Messages</th><th>Queued</th><th>Deferred</th><th>Held</th>
<th>Being attempted</th><th>Oldest message</th><th>Delivered (1 h)</th>
<th>Bounced (1 h)</th><th>Deferred attempts (1 h)</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="legend"><b>Queued</b>: waiting for a first attempt. <b>Deferred</b>: attempted
and waiting for a retry. <b>Held</b>: kept without attempts until released.
<b>Being attempted</b>: deliveries in progress now (counted in queued or deferred too).
The last hour's counts are per recipient (bounces: per notification built) since this
process started.</p>
"""
        return self._page("Overview", body, view="overview", live=f"{PREFIX}/api/overview")

    def _overview_row(self, q: dict[str, Any], now: float) -> str:
        name = f'<a href="{_e(q["url"])}">{_e(q["name"])}</a>'
        if q["error"]:
            return (f'<tr data-queue="{_e(q["name"])}"><td>{name}</td>'
                    f'<td colspan="9" class="problem">cannot be read: {_e(q["error"])}</td></tr>')
        hour = q["last_hour"] or {}

        def n(key: str) -> str:
            return str(hour.get(key, 0)) if q["last_hour"] is not None else "—"

        oldest = "—"
        if q["oldest"]:
            oldest = (f'<span class="rel" data-ts="{q["oldest"]!r}">'
                      f'{_e(format_relative(q["oldest"], now))}</span>')
        cells = [name, str(q["messages"]), str(q["queued"]), str(q["deferred"]), str(q["held"]),
                 str(q["attempting"]), oldest, n("delivered"), n("bounced"), n("deferred")]
        keys = ["name", "messages", "queued", "deferred", "held", "attempting", "oldest",
                "delivered_1h", "bounced_1h", "deferred_1h"]
        tds = "".join(f'<td data-field="{k}">{c}</td>' for k, c in zip(keys, cells, strict=True))
        return f'<tr data-queue="{_e(q["name"])}">{tds}</tr>'

    async def _list(self, request: web.Request) -> web.Response:
        try:
            name, queue = self._queue(request)
            data = await self.list_data(name, queue, request.query)
        except KeyError as exc:
            return self._problem(404, exc.args[0])
        except _BadParameter as exc:
            return self._problem(400, str(exc))
        base = f"{PREFIX}/queues/{_q(name)}"
        params = {"q": data["q"], "page": data["page"], "per_page": data["per_page"]}
        live = f"{PREFIX}/api/queues/{_q(name)}?{urlencode(params)}"
        now = data["now"]
        rows = "\n".join(self._list_row(e, now) for e in data["entries"])
        if not rows:
            rows = '<tr class="empty"><td colspan="7">No messages.</td></tr>'
        keep = (f'<input type="hidden" name="per_page" value="{data["per_page"]}">'
                if data["per_page"] != DEFAULT_PER_PAGE else "")
        clear = f' <a href="{_e(base)}">Clear</a>' if data["q"] else ""
        done = request.query.get("done")
        notice = f'<p class="notice" role="status">{_e(_DONE[done])}</p>' if done in _DONE else ""
        body = f"""<h1>Queue {_e(name)}</h1>
{notice}
<form class="search" method="get" action="{_e(base)}" role="search">
<input type="search" name="q" value="{_e(data["q"])}" size="40"
 placeholder="sender, recipient, id or reply" aria-label="Search">{keep}
<button type="submit">Search</button>{clear}
</form>
<p id="summary" class="summary">{_e(self._summary(data))}</p>
<table id="messages" class="grid">
<thead><tr><th>Id</th><th>Sender</th><th>Recipients</th><th>Attempts</th>
<th>Next attempt</th><th>Last reply</th><th>Held</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
{self._pager(base, data)}
"""
        return self._page(f"Queue {name}", body, view="messages", live=live)

    @staticmethod
    def _summary(data: dict[str, Any]) -> str:
        found = data["matching"]
        text = f"{found} message{'s' if found != 1 else ''}"
        if data["q"]:
            text += f" matching “{data['q']}” (of {data['total']})"
        return text + f", page {data['page']} of {data['pages']}"

    @staticmethod
    def _pager(base: str, data: dict[str, Any]) -> str:
        def link(page: int, text: str, rel: str) -> str:
            params: dict[str, Any] = {"page": page}
            if data["q"]:
                params = {"q": data["q"], **params}
            if data["per_page"] != DEFAULT_PER_PAGE:
                params["per_page"] = data["per_page"]
            return f'<a rel="{rel}" href="{_e(base + "?" + urlencode(params))}">{text}</a>'

        parts = []
        if data["page"] > 1:
            parts.append(link(data["page"] - 1, "← Previous", "prev"))
        if data["page"] < data["pages"]:
            parts.append(link(data["page"] + 1, "Next →", "next"))
        return (f'<nav class="pager" id="pager" data-base="{_e(base)}" '
                f'data-default-per-page="{DEFAULT_PER_PAGE}">{" ".join(parts)}</nav>')

    @staticmethod
    def _list_row(e: dict[str, Any], now: float) -> str:
        held = '<span class="badge held">held</span>' if e["held"] else ""
        row_class = ' class="held"' if e["held"] else ""
        rcpts = "<br>".join(_e(r) for r in e["recipients"])
        return (f'<tr data-id="{_e(e["id"])}"{row_class}>'
                f'<td class="id"><a href="{_e(e["url"])}">{_e(e["id"])}</a></td>'
                f'<td>{_e(_sender(e["sender"]))}</td><td>{rcpts}</td>'
                f'<td class="num">{e["attempts"]}</td>'
                f'<td>{_when(e["next_attempt"], now)}</td>'
                f'<td class="reply">{_e(e["last_reply"] or "—")}</td><td>{held}</td></tr>')

    async def _show(self, request: web.Request) -> web.Response:
        qid = request.match_info["id"]
        try:
            name, queue = self._queue(request)
        except KeyError as exc:
            return self._problem(404, exc.args[0])
        try:
            stored = await queue.get(qid)
        except KeyError:
            return self._problem(404, f"no message {qid} in queue {name!r} (delivered, "
                                      "bounced or deleted?)")
        now = self.clock()
        env = stored.envelope
        base = f"{PREFIX}/queues/{_q(name)}"
        url = f"{base}/{_q(qid)}"
        header, data = env.flatten()
        done = request.query.get("done")
        notice = f'<p class="notice" role="status">{_e(_DONE[done])}</p>' if done in _DONE else ""
        rcpts = "\n".join(
            f'<tr><td>{_e(r)}</td><td><span class="badge {s}">{s}</span></td></tr>'
            for r, s in ((r, "delivered" if i in stored.delivered else "pending")
                         for i, r in enumerate(env.recipients)))
        client = env.client or {}
        client_rows = "".join(
            f"<tr><th>{label}</th><td>{_e(str(client.get(key) or '—'))}</td></tr>"
            for key, label in (("ip", "IP address"), ("host", "Reverse DNS"),
                               ("name", "EHLO name"), ("protocol", "Protocol"),
                               ("auth", "Authenticated as")))
        headers = "\n".join(f"<tr><th>{_e(str(k))}</th><td>{_e(str(v))}</td></tr>"
                            for k, v in env.headers.items())
        held = stored.held
        status = '<span class="badge held">held</span>' if held else ""
        body = f"""<p class="crumbs"><a href="{_e(base)}">← Queue {_e(name)}</a></p>
<h1>Message <code>{_e(qid)}</code> {status}</h1>
{notice}
<div class="actions">
{"" if held else self._button(url, "retry", "Retry now")}
{self._button(url, "release" if held else "hold", "Release" if held else "Hold")}
{self._button(url, "delete", "Delete",
              "Delete this message without delivering it or sending a bounce?")}
<a class="button" href="{_e(url)}/message">Raw message</a>
</div>
<section><h2>Envelope</h2>
<table class="facts">
<tr><th>Sender</th><td id="sender">{_e(_sender(env.sender))}</td></tr>
<tr><th>Received</th><td>{_when(env.timestamp, now)}</td></tr>
<tr><th>Received by</th><td>{_e(env.receiver or "—")}</td></tr>
<tr><th>Size</th><td>{_size(len(header) + len(data))} ({len(header) + len(data)} octets)</td></tr>
{client_rows}
</table>
<h3>Recipients</h3>
<table id="recipients" class="grid"><thead><tr><th>Recipient</th><th>Status</th></tr></thead>
<tbody>{rcpts}</tbody></table>
</section>
<section><h2>Delivery</h2>
<table class="facts">
<tr><th>Attempts</th><td id="attempts">{stored.attempts}</td></tr>
<tr><th>Last reply</th><td id="last-reply">{_e(stored.last_reply or "—")}</td></tr>
<tr><th>Next attempt</th><td>{"held: none until released" if held
                               else _when(stored.timestamp, now)}</td></tr>
</table>
{self._history(stored, now)}
<p class="legend">Every attempt is also logged with its reply: search the log for
<code>id={_e(qid)}</code>.</p>
</section>
<section><h2>Headers</h2>
<table id="headers" class="facts headers">{headers}</table>
</section>
"""
        return self._page(f"Message {qid}", body)

    @staticmethod
    def _history(stored: Any, now: float) -> str:
        """The attempt history of a message: when each attempt ended and its reply."""
        history = stored.history
        if not history:
            text = ("No attempt yet." if not stored.attempts else
                    "No attempt history: the earlier attempts were made before the queue"
                    " kept one.")
            return f'<h3>Attempt history</h3>\n<p id="history-none" class="legend">{text}</p>'
        rows = "\n".join(f"<tr><td>{_when(ts, now)}</td><td>{_e(reply or '—')}</td></tr>"
                         for ts, reply in history)
        earlier = stored.attempts - len(history)
        note = "" if earlier <= 0 else (
            f'<p class="legend">{earlier} earlier attempt{"s are" if earlier != 1 else " is"}'
            f" not in the history: it keeps the last {HISTORY_LIMIT}.</p>")
        return f"""<h3>Attempt history</h3>
<table id="history" class="grid"><thead><tr><th>Attempt ended</th><th>Reply</th></tr></thead>
<tbody>{rows}</tbody></table>
{note}"""

    def _button(self, url: str, action: str, label: str, confirm: str = "") -> str:
        ask = f' data-confirm="{_e(confirm)}"' if confirm else ""
        return (f'<form class="action" method="post" action="{_e(url)}/{action}"{ask}>'
                f'<input type="hidden" name="csrf" value="{self.csrf_token()}">'
                f'<button type="submit" class="{action}">{label}</button></form>')

    async def _raw(self, request: web.Request) -> web.Response:
        qid = request.match_info["id"]
        try:
            _, queue = self._queue(request)
            stored = await queue.get(qid)
        except KeyError:
            return self._problem(404, f"no message {qid}")
        header, body = stored.envelope.flatten()
        return web.Response(body=header + body, content_type="text/plain", charset="utf-8",
                            headers=_SECURITY_HEADERS)

    async def _action(self, request: web.Request) -> web.Response:
        qid, action = request.match_info["id"], request.match_info["action"]
        form = await request.post()
        if not self._csrf_ok(request, form):
            return self._problem(403, "This form has expired or came from another site. "
                                      "Reload the message page and try again.")
        try:
            name, queue = self._queue(request)
            if action == "delete":
                if not await queue.delete(qid):
                    raise KeyError(f"no message {qid}")
            else:
                await getattr(queue, action)(qid)
        except KeyError:
            return self._problem(404, f"no message {qid} in this queue (delivered, bounced or "
                                      "deleted?)")
        log.info("dashboard: id=%s %s in queue %s", qid, action, name)
        base = f"{PREFIX}/queues/{_q(name)}"
        target = base if action == "delete" else f"{base}/{_q(qid)}"
        raise web.HTTPSeeOther(f"{target}?done={action}")

    # --- routes: JSON for the live view --------------------------------------------
    async def _overview_json(self, request: web.Request) -> web.Response:
        return web.json_response(await self.overview_data(),
                                 headers={"Cache-Control": "no-store"})

    async def _list_json(self, request: web.Request) -> web.Response:
        try:
            name, queue = self._queue(request)
            data = await self.list_data(name, queue, request.query)
        except KeyError as exc:
            return web.json_response({"error": exc.args[0], "status": 404}, status=404)
        except _BadParameter as exc:
            return web.json_response({"error": str(exc), "status": 400}, status=400)
        return web.json_response(data, headers={"Cache-Control": "no-store"})
