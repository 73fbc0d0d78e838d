"""Listening sockets, bound at once so a bad address or a busy port fails where it is given."""

from __future__ import annotations

import socket

__all__ = ["bind_listener"]


def bind_listener(listener, backlog: int = 1024) -> socket.socket:
    """A bound, listening TCP socket for ``listener``.

    ``listener`` is ``(host, port)`` or an existing socket. Host ``''`` means
    every address: IPv6 and IPv4 on one dual-stack socket where the machine
    allows it, else IPv4 only. A host name is resolved and its first address
    used. Raises ``OSError`` when the address cannot be bound.
    """
    if isinstance(listener, socket.socket):
        return listener
    host, port = listener[0], int(listener[1])
    if host in ("", None, "*"):
        if socket.has_dualstack_ipv6():
            try:
                return socket.create_server(("", port), family=socket.AF_INET6, backlog=backlog,
                                            reuse_port=False, dualstack_ipv6=True)
            except OSError:
                pass
        return socket.create_server(("", port), family=socket.AF_INET, backlog=backlog)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    return socket.create_server(addr, family=family, backlog=backlog)
