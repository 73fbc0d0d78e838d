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
                                        "delivered" (+ "_indexes"), "subject", "message_id"
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
Errors are JSON ``{"error": text, "status": code}``: 401, 404 (unknown queue, id or route),
405, 400 (a bad parameter), 500 (logged).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Mapping
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
    :attr:`dashboard`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8025, token: str | None = None,
                 metrics: Any = None, queues: Mapping[str, Any] | None = None, *,
                 health_timeout: float = 5.0, shutdown_timeout: float = 5.0,
                 access_log: bool = False, dashboard: bool = True):
        self.host = host
        self.port = port
        self.token = token
        self.metrics = metrics
        self.queues: Mapping[str, Any] = queues if queues is not None else {}
        self.health_timeout = health_timeout
        self.shutdown_timeout = shutdown_timeout
        self.access_log = access_log
        self.started_at = time.time()
        self._sock = None
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
            if self.token is None and not _is_loopback(self.address[0]):
                log.warning("admin endpoint on %s without a token: anyone who can reach it "
                            "can read and delete queued mail", self.address[0])

    async def _begin(self) -> None:
        app = web.Application(middlewares=[self._errors, self._auth])
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

    async def _show(self, request: web.Request) -> web.Response:
        name, queue = self._queue(request)
        qid = request.match_info["id"]
        try:
            stored = await queue.get(qid)
        except KeyError:
            raise web.HTTPNotFound(reason=f"no message {qid} in queue {name!r}") from None
        return web.json_response({"queue": name, **_message_json(qid, stored)})

    async def _message(self, request: web.Request) -> web.Response:
        name, queue = self._queue(request)
        qid = request.match_info["id"]
        try:
            stored = await queue.get(qid)
        except KeyError:
            raise web.HTTPNotFound(reason=f"no message {qid} in queue {name!r}") from None
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

