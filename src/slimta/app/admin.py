"""The admin HTTP endpoint: Prometheus metrics, a health check and a JSON queue API.

:class:`AdminServer` serves on 127.0.0.1:8025 by default. With a ``token``
every request needs ``Authorization: Bearer <token>`` (else 401). Routes::

    GET    /metrics                     Prometheus text format (404 without metrics)
    GET    /healthz                     {"status": "ok", "queues": {name: "ok"}}; 503 if a
                                        queue's stats fail or take over health_timeout
    GET    /queues                      {"queues": {name: stats}}
    GET    /queues/{name}               {"queue": name, "entries": [entry, ...]}
                                        (?limit=N: the first N by next attempt)
    GET    /queues/{name}/stats         the queue's stats
    POST   /queues/{name}/flush         attempt every message that is not held, now
    GET    /queues/{name}/{id}          one message: entry fields plus "all_recipients",
                                        "delivered" (+ "_indexes"), "subject", "message_id",
                                        "history" ([[time an attempt ended, reply], ...])
                                        and "envelope" (the stored metadata, see
                                        slimta.queue.record); never the message itself
    GET    /queues/{name}/{id}/message  the message as stored (message/rfc822)
    POST   /queues/{name}/{id}/retry    attempt it now
    POST   /queues/{name}/{id}/hold     keep it, attempt it no more
    POST   /queues/{name}/{id}/release  release a held message (attempted at once)
    DELETE /queues/{name}/{id}          remove it without delivering or bouncing it
    GET    /, /dashboard/...            the web dashboard (slimta.app.dashboard), whose
                                        pages also take the token as a Basic password

An entry is ``{"id", "sender", "recipients" (not yet delivered), "attempts",
"next_attempt" (Unix time), "last_reply", "held", "size", "created"}``. Actions
answer ``{"queue", "id", "action", "ok": true}`` (flush: ``{"queue", "action",
"ok", "count"}``, the messages not held). The entry fields are those of
:class:`~slimta.queue.storage.QueueEntry`, so ``QueueEntry(**entry)`` reads one.
Errors are JSON ``{"error": text, "status": code}``: 401, 403 (refused as cross-site, see
below), 404 (unknown queue, id or route), 405, 400 (a bad parameter), 421 (a Host that is
not allowed), 500 (logged).

Browsers are kept from acting on the endpoint for another site, which matters most
without a token (the default on loopback):

- DNS rebinding: on a loopback address, a request whose ``Host`` is not a loopback
  name (``localhost``, ``127.0.0.1``, ``[::1]``..., any port) or one of
  ``allowed_hosts`` is answered 421, whatever its route (dashboard included). On
  other addresses the token is the protection; ``allowed_hosts``, when given, is
  checked there too. A request without ``Host`` (not a browser) is let through.
- Cross-site requests: a request to the JSON API other than GET/HEAD/OPTIONS is
  answered 403 when ``Sec-Fetch-Site`` is neither ``same-origin`` nor ``none``,
  when it has an ``Origin`` that is not this endpoint's own (its ``Host``), or when
  its Content-Type is one an HTML form can send (``application/x-www-form-urlencoded``,
  ``multipart/form-data``, ``text/plain``). Scripts send no body (``slimta queue
  --admin`` does so). The dashboard's forms have their own CSRF token and check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

import slimta
from slimta.app.dashboard import Dashboard
from slimta.queue.record import envelope_to_record
from slimta.service import Service
from slimta.util.listeners import bind_listener

__all__ = ["AdminServer"]

log = logging.getLogger(__name__)

def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text, "status": status}, status=status)


def _entry_json(entry: Any) -> dict:
    return {
        "id": entry.id,
        "sender": entry.sender,
        "recipients": list(entry.recipients),
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "last_reply": entry.last_reply,
        "held": entry.held,
        "size": entry.size,
        "created": entry.created,
    }


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


#: Methods that change nothing, left to any site (a browser shows another site none of
#: the answers: there is no CORS).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: What an HTML form (or a fetch without a CORS preflight) can send as Content-Type.
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data",
                         "text/plain"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header (``name``, ``name:port``, ``[v6]:port``) as (name, port):
    the name lowercased without a final dot, an IP address in its canonical form;
    None if it is not one."""
    value = value.strip().lower()
    port_text = ""
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(name.split("%", 1)[0])
        except ValueError:
            return None
    else:
        name, _, port_text = value.partition(":")
        if ":" in port_text:
            return None  # a bare IPv6 address is not a Host
    name = name.rstrip(".")
    if not name or any(c.isspace() or c in "/?#@*" for c in name):
        return None
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    with contextlib.suppress(ValueError):
        name = str(ipaddress.ip_address(name))
    return name, port


def _is_loopback_name(name: str) -> bool:
    return name == "localhost" or _is_loopback(name)


def _host_entry(entry: str) -> str:
    """One ``allowed_hosts`` entry as :func:`_split_host` names it (a port is ignored)."""
    try:
        return str(ipaddress.ip_address(entry.strip().strip("[]")))
    except ValueError:
        pass
    parsed = _split_host(entry)
    if parsed is None:
        raise ValueError(f"allowed_hosts: {entry!r} is not a host name or address")
    return parsed[0]


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (an Origin header) names the server ``host`` (its Host header):
    same name and port. A Host without a port matches the default port of the
    origin's scheme (a TLS proxy in front of the endpoint passes ``Host: name``)."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    default = _DEFAULT_PORTS.get(scheme)
    if not sep or default is None or "/" in rest:
        return False  # "null" (a sandbox, a file, a redirect), or not an origin
    theirs, ours = _split_host(rest), _split_host(host)
    if theirs is None or ours is None:
        return False
    return theirs[0] == ours[0] and (theirs[1] or default) == (ours[1] or default)


def _header(envelope: Any, name: str) -> str | None:
    value = envelope.headers.get(name)
    return None if value is None else str(value)


def _message_json(qid: str, stored: Any) -> dict:
    """One stored message: what ``slimta queue show`` prints (the message itself is
    at ``/message``)."""
    env = stored.envelope
    meta, data = envelope_to_record(env)
    delivered = sorted(i for i in stored.delivered if 0 <= i < len(env.recipients))
    return {
        "id": qid,
        "sender": env.sender,
        "recipients": [rcpt for _, rcpt in stored.pending],
        "all_recipients": list(env.recipients),
        "delivered": [env.recipients[i] for i in delivered],
        "delivered_indexes": delivered,
        "attempts": stored.attempts,
        "next_attempt": stored.timestamp,
        "last_reply": stored.last_reply,
        "history": [[t, reply] for t, reply in stored.history],
        "held": stored.held,
        "size": len(data),
        "created": env.timestamp,
        "subject": _header(env, "Subject"),
        "message_id": _header(env, "Message-ID"),
        "envelope": meta,
    }


class AdminServer(Service):
    """The admin/metrics HTTP endpoint, a :class:`~slimta.service.Service`.

    ``metrics`` is a :class:`~slimta.app.metrics.Metrics` (``/metrics``
    answers 404 without one); ``queues`` maps names to queues (anything
    with Queue's management coroutines: ``list``, ``get``, ``retry``,
    ``hold``, ``release``, ``delete``, ``flush``, ``stats``). Both are read
    at each request, so a reload may replace them. ``token``: the bearer
    token every request must carry (None: no check; keep the default
    loopback address then). ``start()`` binds at once (``OSError`` for a
    port in use); ``address`` is the bound (host, port). ``stop()`` lets
    requests in progress finish for up to ``shutdown_timeout`` seconds.
    Without a token on an address other than loopback, start() logs a
    warning: anyone who reaches it can delete queued mail. ``dashboard``:
    serve the web dashboard (:mod:`slimta.app.dashboard`) too, as
    :attr:`dashboard`. ``allowed_hosts``: host names (or addresses) that
    requests may name in ``Host`` besides the loopback ones, e.g. the name
    a reverse proxy passes on; on a loopback address only loopback names
    are allowed without it, elsewhere any (the token protects), see the
    module's notes on DNS rebinding.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8025, token: str | None = None,
                 metrics: Any = None, queues: Mapping[str, Any] | None = None, *,
                 health_timeout: float = 5.0, shutdown_timeout: float = 5.0,
                 access_log: bool = False, dashboard: bool = True,
                 allowed_hosts: Iterable[str] | None = None):
        if isinstance(allowed_hosts, str):
            raise TypeError("allowed_hosts is a list of host names, not one string")
        self.host = host
        self.port = port
        self.token = token
        self.metrics = metrics
        self.queues: Mapping[str, Any] = queues if queues is not None else {}
        self.health_timeout = health_timeout
        self.shutdown_timeout = shutdown_timeout
        self.access_log = access_log
        self.allowed_hosts: frozenset[str] | None = (
            None if allowed_hosts is None else frozenset(_host_entry(h) for h in allowed_hosts))
        self.started_at = time.time()
        self._sock = None
        self._loopback = True  # whether the bound address is loopback (set at bind)
        self._runner: web.AppRunner | None = None
        self.dashboard: Dashboard | None = Dashboard(self) if dashboard else None

    @property
    def address(self) -> tuple:
        """The bound (host, port), e.g. to learn the port after binding port 0."""
        return self._sock.getsockname()[:2]

    # --- lifecycle ---------------------------------------------------------------
    def _prepare(self) -> None:
        if self._sock is None:
            self._sock = bind_listener((self.host, self.port))
            self._loopback = _is_loopback(self.address[0])
            if self.token is None and not self._loopback:
                log.warning("admin endpoint on %s without a token: anyone who can reach it "
                            "can read and delete queued mail", self.address[0])

    async def _begin(self) -> None:
        app = web.Application(middlewares=[self._errors, self._host_check, self._cross_site,
                                           self._auth])
        app.add_routes([
            web.get("/metrics", self._metrics),
            web.get("/healthz", self._healthz),
            web.get("/queues", self._queues),
            web.get("/queues/{name}", self._list),
            web.get("/queues/{name}/stats", self._stats),
            web.post("/queues/{name}/flush", self._flush),
            web.get("/queues/{name}/{id}", self._show),
            web.get("/queues/{name}/{id}/message", self._message),
            web.delete("/queues/{name}/{id}", self._delete),
            web.post("/queues/{name}/{id}/{action:retry|hold|release}", self._action),
        ])
        if self.dashboard is not None:
            app.add_routes(self.dashboard.routes())
        kwargs: dict[str, Any] = {} if self.access_log else {"access_log": None}
        self._runner = web.AppRunner(app, handle_signals=False,
                                     shutdown_timeout=self.shutdown_timeout, **kwargs)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()
        self.started_at = time.time()
        log.info("admin endpoint on http://%s:%d/", *self.address[:2])

    async def _end(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()

    # --- middlewares ------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every error as JSON with its status."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error(exc.status, exc.reason)
            for name in ("Allow", "WWW-Authenticate"):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin: %s %s failed", request.method, request.path)
            return _error(500, "Internal Server Error")

    def _host_allowed(self, host: str | None) -> bool:
        """Whether a request naming ``host`` (its Host header) is for this endpoint."""
        if host is None:
            return True  # HTTP/1.0 without Host: a script, not a browser
        if self.allowed_hosts is None and not self._loopback:
            return True  # reachable from elsewhere: the token is the protection
        parsed = _split_host(host)
        if parsed is None:
            return False
        return _is_loopback_name(parsed[0]) or parsed[0] in (self.allowed_hosts or ())

    @web.middleware
    async def _host_check(self, request: web.Request, handler) -> web.StreamResponse:
        """Refuse a Host that is not ours: a page of another site whose name was made to
        resolve to this address (DNS rebinding) would otherwise be same-origin with us."""
        host = request.headers.get("Host")
        if not self._host_allowed(host):
            log.warning("admin: refused %s %s for Host %r (not a loopback name nor in "
                        "allowed_hosts)", request.method, request.path, host)
            raise web.HTTPMisdirectedRequest(
                reason=f"Host {host!r} is not allowed here: use http://127.0.0.1:PORT/ or "
                       "http://localhost:PORT/, or add the name to allowed_hosts")
        return await handler(request)

    @web.middleware
    async def _cross_site(self, request: web.Request, handler) -> web.StreamResponse:
        """Refuse a change to the queues (JSON API) that a browser makes for another site.

        The dashboard's forms are left to the dashboard (their CSRF token)."""
        if request.method in _SAFE_METHODS or (
                self.dashboard is not None and self.dashboard.owns(request.path)):
            return await handler(request)
        reason = None
        fetch_site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
            reason = ("the browser says this request comes from another site "
                      f"(Sec-Fetch-Site: {fetch_site!r})")
        elif origin is not None and not _same_origin(origin, request.headers.get("Host", "")):
            reason = f"the request comes from another origin (Origin: {origin!r})"
        elif ctype in _FORM_TYPES:
            reason = (f"{ctype} is a form's content type, which the JSON API refuses: "
                      "send the request without a body (or as application/json)")
        if reason is not None:
            log.warning("admin: refused %s %s: %s", request.method, request.path, reason)
            raise web.HTTPForbidden(reason=f"cross-site request refused: {reason}")
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        token = self.token
        if token is not None and self.dashboard is not None and self.dashboard.owns(
                request.path):
            self.dashboard.check_auth(request, token)  # Bearer, or Basic for browsers
        elif token is not None:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), token.encode()):
                raise web.HTTPUnauthorized(reason="a valid bearer token is required",
                                           headers={"WWW-Authenticate": 'Bearer realm="slimta"'})
        return await handler(request)

    # --- helpers ---------------------------------------------------------------------
    def _queue(self, request: web.Request) -> tuple[str, Any]:
        name = request.match_info["name"]
        queue = self.queues.get(name)
        if queue is None:
            raise web.HTTPNotFound(reason=f"no queue named {name!r}")
        return name, queue

    # --- routes --------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        metrics = self.metrics
        if metrics is None:
            raise web.HTTPNotFound(reason="metrics are not enabled")
        from slimta.app.metrics import CONTENT_TYPE

        body = await metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        checks, healthy = {}, True
        for name, queue in list(self.queues.items()):
            try:
                await asyncio.wait_for(queue.stats(), self.health_timeout)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                checks[name], healthy = "timeout", False
            except Exception as exc:
                checks[name], healthy = f"error: {type(exc).__name__}", False
            else:
                checks[name] = "ok"
        body = {
            "status": "ok" if healthy else "unavailable",
            "version": slimta.__version__,
            "uptime": round(time.time() - self.started_at, 3),
            "queues": checks,
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def _queues(self, request: web.Request) -> web.Response:
        out = {}
        for name, queue in list(self.queues.items()):
            out[name] = await queue.stats()
        return web.json_response({"queues": out})

    async def _list(self, request: web.Request) -> web.Response:
        name, queue = self._queue(request)
        limit = request.query.get("limit")
        if limit is not None:
            try:
                limit_n = int(limit)
                if limit_n < 0:
                    raise ValueError
            except ValueError:
                raise web.HTTPBadRequest(reason="limit must be a whole number >= 0") from None
        entries = await queue.list()
        if limit is not None:
            entries = entries[:limit_n]
        return web.json_response({"queue": name, "entries": [_entry_json(e) for e in entries]})

    async def _stats(self, request: web.Request) -> web.Response:
        name, queue = self._queue(request)
        return web.json_response({"queue": name, **await queue.stats()})

    async def _flush(self, request: web.Request) -> web.Response:
        name, queue = self._queue(request)
        stats = await queue.stats()
        await queue.flush()
        count = max(0, stats.get("messages", 0) - stats.get("held", 0))
        log.info("admin: queue %s flushed (%d messages)", name, count)
        return web.json_response({"queue": name, "action": "flush", "ok": True, "count": count})

    async def _stored(self, request: web.Request) -> tuple[str, str, Any]:
        """(queue name, id, the stored message) the request names; 404 when there is none."""
        name, queue = self._queue(request)
        qid = request.match_info["id"]
        try:
            return name, qid, await queue.get(qid)
        except KeyError:
            raise web.HTTPNotFound(reason=f"no message {qid} in queue {name!r}") from None

    async def _show(self, request: web.Request) -> web.Response:
        name, qid, stored = await self._stored(request)
        return web.json_response({"queue": name, **_message_json(qid, stored)})

    async def _message(self, request: web.Request) -> web.Response:
        _, _, stored = await self._stored(request)
        header, body = stored.envelope.flatten()
        return web.Response(body=header + body, content_type="message/rfc822")

    async def _delete(self, request: web.Request) -> web.Response:
        name, queue = self._queue(request)
        qid = request.match_info["id"]
        if not await queue.delete(qid):
            raise web.HTTPNotFound(reason=f"no message {qid} in queue {name!r}")
        log.info("admin: id=%s deleted from queue %s", qid, name)
        return web.json_response({"queue": name, "id": qid, "action": "delete", "ok": True})

    async def _action(self, request: web.Request) -> web.Response:
        name, queue = self._queue(request)
        qid, action = request.match_info["id"], request.match_info["action"]
        try:
            await getattr(queue, action)(qid)
        except KeyError:
            raise web.HTTPNotFound(reason=f"no message {qid} in queue {name!r}") from None
        log.info("admin: id=%s %s in queue %s", qid, action, name)
        return web.json_response({"queue": name, "id": qid, "action": action, "ok": True})

