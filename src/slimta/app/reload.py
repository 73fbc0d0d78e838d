"""SIGHUP: replace a running :class:`~slimta.app.build.App` by the one a re-read config makes.

The listening sockets are never closed: a new SMTP edge on the same
``interface:port`` as an old one takes a duplicate of the old edge's socket
(:meth:`SmtpEdge.handover_socket`), so connections wait in the backlog while
the generations change. Old edges stop accepting and their sessions end on
their own (:meth:`SmtpEdge.drain`), so no client sees a failure.

Queues, relays and lookups are kept as they are when their config sections
did not change; otherwise the old ones stop gracefully (in-flight deliveries
finish) before the new ones start on the same storage, whose ``start()``
reloads the schedule, so nothing queued is lost. An invalid new config, or
one that cannot start, leaves the old App running and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any

from slimta.app import build as B

__all__ = ["Reloader", "reload_app"]

log = logging.getLogger("slimta.app.reload")

#: the configured ``(interface, port)`` of an edge whose listener became a handed-over socket
_ADDRESS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _address(edge: Any) -> tuple | None:
    listener = _ADDRESS.get(edge, getattr(edge, "listener", None))
    return tuple(listener) if isinstance(listener, tuple) else None


def _dump(config: Any) -> Any:
    settings = config.process_settings()
    return ({k: v.model_dump() for k, v in config.queue.items()},
            {k: v.model_dump() for k, v in config.relay.items()},
            {k: (v.model_dump() if hasattr(v, "model_dump") else v)
             for k, v in config.lookup.items()},
            B.data_dir_of(config), settings.fqdn, settings.hostname,
            settings.admin.model_dump() if settings.admin is not None else None)


def _sockets(app: B.App) -> dict[tuple, Any]:
    """The old SMTP edges by their configured ``(interface, port)``."""
    found: dict[tuple, Any] = {}
    for edges in app.edges.values():
        for edge in edges:
            address = _address(edge)
            if hasattr(edge, "handover_socket") and address is not None:
                found[address] = edge
    return found


def _hand_over(old: B.App, new_edges: dict[str, list[Any]]) -> None:
    old_by_address = _sockets(old)
    for edges in new_edges.values():
        for edge in edges:
            address = _address(edge)
            previous = old_by_address.get(address) if address is not None else None
            if previous is not None and previous._sock is not None:
                _ADDRESS[edge] = address
                edge.listener = previous.handover_socket()


async def _drain_edges(app: B.App) -> None:
    edges = [e for group in app.edges.values() for e in group]
    await asyncio.gather(*((e.drain() if hasattr(e, "drain") else e.stop()) for e in edges),
                         return_exceptions=True)


async def reload_app(old: B.App, load: Callable[[], Any], *, no_edge: bool = False,
                     no_relay: bool = False) -> B.App:
    """The running App after a reload: a new one, or ``old`` when the new config fails.

    ``load()`` returns the new config (raising ``ConfigError`` when invalid).
    """
    from slimta.app.config import ConfigError

    try:
        config = load()
        keep = _dump(config) == _dump(old.config)
        builder = B._Builder(config, no_edge, no_relay)
        if keep:
            builder.app.lookups, builder.app.relays = old.lookups, old.relays
            builder.app.queues = old.queues
            if not no_edge:
                for name, spec in config.edge.items():
                    builder.app.edges[name] = builder.edge(name, spec, f"edge.{name}")
            new = builder.app
            new.admin, new.metrics = old.admin, old.metrics
            if new.metrics is not None:
                for edges in new.edges.values():
                    for edge in edges:
                        new.metrics.instrument_edge(edge)
        else:
            new = builder.build()
    except ConfigError as exc:
        log.error("reload failed, still running the old config: invalid config:\n%s", exc)
        return old
    except Exception as exc:  # a TLS file that cannot be read, ...
        log.error("reload failed, still running the old config: %s", exc)
        return old
    _hand_over(old, new.edges)
    if keep:
        try:
            for edges in new.edges.values():
                for edge in edges:
                    edge.start()
            for edges in new.edges.values():
                for edge in edges:
                    await edge.started()
        except Exception as exc:
            log.error("reload failed, still running the old config: %s", exc)
            for edges in new.edges.values():
                for edge in edges:
                    with contextlib.suppress(Exception):
                        await edge.stop()
            return old
        await _drain_edges(old)
        log.info("reloaded: new edges, queues and relays kept")
        return new
    # queues or relays changed: the old generation ends before the new one opens its storage
    await _drain_edges(old)
    old.edges = {}
    await old.stop()
    try:
        new.start()
        await new.started()
    except Exception as exc:
        # the old sockets were handed over, so nothing is left to fall back on: exit
        log.critical("reload failed after the old config stopped: %s", exc)
        raise
    log.info("reloaded: new edges, queues and relays")
    return new


class Reloader:
    """What ``slimta serve`` does on SIGHUP: one reload at a time, the running App in :attr:`app`.

    ``load()`` re-reads the config; ``fatal()`` is called when a reload failed
    past the point of return (the process should then stop).
    """

    def __init__(self, app: B.App, load: Callable[[], Any], fatal: Callable[[], None], *,
                 no_edge: bool = False, no_relay: bool = False):
        self.app = app
        self._load = load
        self._fatal = fatal
        self._options = {"no_edge": no_edge, "no_relay": no_relay}
        self._task: asyncio.Task | None = None
        self._again = False

    def request(self) -> None:
        """Reload soon (a signal handler); a request during a reload runs one more after it."""
        log.info("SIGHUP: reloading the config")
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                self.app = await reload_app(self.app, self._load, **self._options)
            except Exception:
                self._fatal()
                return
            if not self._again:
                return

    async def finish(self) -> None:
        """Wait for a reload in progress (before stopping :attr:`app`)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
