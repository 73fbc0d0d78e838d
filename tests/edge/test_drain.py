"""SmtpEdge.drain and handover_socket: what a reload relies on to lose no client."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import threading

from slimta.edge.smtp import SmtpEdge


def _send(port: int, context: ssl.SSLContext | None = None, sock: socket.socket | None = None):
    """smtplib over an already connected socket (SMTPS when ``context`` is given)."""
    if context is not None:
        client = smtplib.SMTP_SSL(context=context, timeout=10)
    else:
        client = smtplib.SMTP(timeout=10)
    if sock is not None:
        client.sock = context.wrap_socket(sock) if context is not None else sock
        client.file = None
        code, _ = client.getreply()
        assert code == 220
    else:
        client.connect("127.0.0.1", port)
    try:
        return client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\ny\r\n")
    finally:
        client.quit()


async def test_drain_waits_for_an_open_session(recording_queue):
    edge = SmtpEdge(("127.0.0.1", 0), recording_queue)
    async with edge:
        port = edge.address[1]
        client = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=10)
        drain = asyncio.ensure_future(edge.drain(timeout=10))
        await asyncio.sleep(0.3)
        assert not drain.done()
        assert await asyncio.to_thread(
            client.sendmail, "a@example.com", ["b@example.com"], b"Subject: x\r\n\r\ny\r\n") == {}
        await asyncio.to_thread(client.quit)
        await asyncio.wait_for(drain, 5)
    assert len(recording_queue.envelopes) == 1


async def test_drain_waits_for_a_tls_handshake_in_progress(
        recording_queue, server_tls_context, client_tls_context):
    """A socket accepted before drain() whose session begins only after its TLS handshake."""
    edge = SmtpEdge(("127.0.0.1", 0), recording_queue, context=server_tls_context,
                    tls_immediately=True)
    async with edge:
        port = edge.address[1]
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        await asyncio.sleep(0.3)  # accepted; the server waits for the ClientHello
        drain = asyncio.ensure_future(edge.drain(timeout=10))
        await asyncio.sleep(0.3)
        assert not drain.done(), "drain() ended while a TLS client was still connecting"
        assert await asyncio.to_thread(_send, port, client_tls_context, raw) == {}
        await asyncio.wait_for(drain, 5)
    assert len(recording_queue.envelopes) == 1


def test_connections_in_the_backlog_go_to_the_edge_that_takes_over(recording_queue):
    """Clients that connect while no edge accepts wait and are served by the new edge."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def start(listener):
        edge = SmtpEdge(listener, recording_queue)
        edge.start()
        await edge.started()
        return edge

    old = run(start(("127.0.0.1", 0)))
    port = old.address[1]
    try:
        sock = old.handover_socket()
        run(old.drain(timeout=5))
        results = []
        waiting = [threading.Thread(target=lambda: results.append(_send(port)))
                   for _ in range(3)]
        for client in waiting:
            client.start()
        new = run(start(sock))
        for client in waiting:
            client.join(20)
        assert results == [{}, {}, {}]
        run(new.stop())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert len(recording_queue.envelopes) == 3
