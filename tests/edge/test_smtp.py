"""SmtpEdge lifecycle and glue, over real sockets with asyncio clients."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from daemons import free_port
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.smtp.reply import Reply


class Queue:
    def __init__(self, delay: float = 0.0):
        self.envelopes = []
        self.delay = delay

    async def enqueue(self, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        self.envelopes.append(envelope)
        return [(envelope, f"id{len(self.envelopes)}")]


async def read_reply(reader) -> tuple[int, str]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            return 0, "\n".join(lines)
        lines.append(line.decode().rstrip("\r\n"))
        if line[3:4] != b"-":
            return int(line[:3]), "\n".join(x[4:] for x in lines)


async def session(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await read_reply(reader))[0] == 220
    return reader, writer


async def command(reader, writer, line: bytes) -> tuple[int, str]:
    writer.write(line + b"\r\n")
    return await read_reply(reader)


async def test_start_binds_at_once_and_a_busy_port_raises():
    async with SmtpEdge(("127.0.0.1", 0), Queue(), hostname="mx.test") as edge:
        port = edge.address[1]
        other = SmtpEdge(("127.0.0.1", port), Queue())
        with pytest.raises(OSError):
            other.start()


def test_start_before_any_loop_binds_at_once():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(OSError):
            SmtpEdge(("127.0.0.1", port), Queue()).start()


async def test_banner_and_default_replies():
    async with SmtpEdge(("127.0.0.1", 0), Queue(), hostname="mx.test") as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.address[1])
        assert await read_reply(reader) == (220, "mx.test ESMTP Mail Gateway")
        code, text = await command(reader, writer, b"EHLO client.test")
        assert code == 250 and text.startswith("Hello client.test\n")
        assert await command(reader, writer, b"MAIL FROM:<a@example.com>") == (
            250, "2.1.0 <a@example.com> Ok")
        assert await command(reader, writer, b"RCPT TO:<b@example.com>") == (
            250, "2.1.5 <b@example.com> Ok")
        assert await command(reader, writer, b"DATA") == (
            354, "Start mail input; end with <CRLF>.<CRLF>")
        assert await command(reader, writer, b"Subject: hi\r\n\r\nbody\r\n.") == (
            250, "2.6.0 Message queued as id1")
        assert await command(reader, writer, b"QUIT") == (221, "2.0.0 Bye")
        writer.close()
        env = edge.queue.envelopes[0]
        assert env.receiver == "mx.test" and env.timestamp
        assert env.client["ip"] == "127.0.0.1"
        assert env.client["name"] == "client.test"
        assert env.client["protocol"] == "ESMTP"


async def test_ipv6_listener():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.fail("this machine has no ::1; IPv6 listeners cannot be tested")
    async with SmtpEdge(("::1", 0), Queue(), hostname="mx.test") as edge:
        reader, writer = await asyncio.open_connection("::1", edge.address[1])
        assert (await read_reply(reader))[0] == 220
        await command(reader, writer, b"HELO x")
        await command(reader, writer, b"MAIL FROM:<a@example.com>")
        await command(reader, writer, b"RCPT TO:<b@example.com>")
        await command(reader, writer, b"DATA")
        assert (await command(reader, writer, b"x\r\n."))[0] == 250
        writer.close()
        assert edge.queue.envelopes[0].client["ip"] == "::1"


async def test_stop_closes_idle_sessions_with_421_and_lets_data_finish():
    queue = Queue(delay=0.3)
    edge = SmtpEdge(("127.0.0.1", 0), queue, hostname="mx.test", shutdown_timeout=5)
    edge.start()
    await edge.started()
    port = edge.address[1]
    idle_r, _idle_w = await session(port)
    busy_r, busy_w = await session(port)
    await command(busy_r, busy_w, b"EHLO x")
    await command(busy_r, busy_w, b"MAIL FROM:<a@example.com>")
    await command(busy_r, busy_w, b"RCPT TO:<b@example.com>")
    assert (await command(busy_r, busy_w, b"DATA"))[0] == 354
    busy_w.write(b"Subject: x\r\n\r\nhalf")
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(edge.stop())
    code, text = await read_reply(idle_r)
    assert code == 421 and text.startswith("4.3.2")
    # the session in DATA may finish its message; the queue takes it
    busy_w.write(b" and the rest\r\n.\r\n")
    assert await read_reply(busy_r) == (250, "2.6.0 Message queued as id1")
    code, _ = await read_reply(busy_r)
    assert code == 421
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    assert len(queue.envelopes) == 1


async def test_stop_aborts_sessions_after_the_grace_period():
    edge = SmtpEdge(("127.0.0.1", 0), Queue(), hostname="mx.test", shutdown_timeout=0.3)
    edge.start()
    await edge.started()
    r, w = await session(edge.address[1])
    await command(r, w, b"EHLO x")
    await command(r, w, b"MAIL FROM:<a@example.com>")
    await command(r, w, b"RCPT TO:<b@example.com>")
    await command(r, w, b"DATA")
    w.write(b"never finished")
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.wait_for(edge.stop(), 5)
    assert time.monotonic() - t0 < 2
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert edge.queue.envelopes == []


async def test_exception_in_one_session_does_not_affect_another():
    class Validators(SmtpValidators):
        def handle_mail(self, reply, sender, params):
            if sender == "boom@example.com":
                raise RuntimeError("validator bug")

    async with SmtpEdge(("127.0.0.1", 0), Queue(), validator_class=Validators) as edge:
        r1, w1 = await session(edge.address[1])
        r2, w2 = await session(edge.address[1])
        await command(r1, w1, b"EHLO a")
        await command(r2, w2, b"EHLO b")
        assert await command(r1, w1, b"MAIL FROM:<boom@example.com>") == (
            451, "4.3.0 Error queuing message")
        assert (await command(r2, w2, b"MAIL FROM:<ok@example.com>"))[0] == 250
        assert (await command(r1, w1, b"NOOP"))[0] == 250


async def test_async_validators_and_pipelined_replies_stay_in_order():
    class Validators(SmtpValidators):
        async def handle_rcpt(self, reply, recipient, params):
            await asyncio.sleep(0.01)
            if recipient.startswith("no"):
                reply.code, reply.message = "550", "5.7.1 Not here"

    async with SmtpEdge(("127.0.0.1", 0), Queue(), validator_class=Validators) as edge:
        r, w = await session(edge.address[1])
        w.write(b"EHLO a\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<no@example.com>\r\n"
                b"RCPT TO:<yes@example.com>\r\nDATA\r\n")
        assert (await read_reply(r))[0] == 250
        assert (await read_reply(r))[0] == 250
        assert await read_reply(r) == (550, "5.7.1 Not here")
        assert (await read_reply(r))[0] == 250
        assert (await read_reply(r))[0] == 354
        w.write(b"x\r\n.\r\n")
        assert (await read_reply(r))[0] == 250
        assert edge.queue.envelopes[0].recipients == ["yes@example.com"]


async def test_handle_rset_and_handle_close_are_called():
    calls = []

    class Validators(SmtpValidators):
        def handle_rset(self, reply):
            calls.append("rset")

        async def handle_close(self):
            calls.append("close")

    async with SmtpEdge(("127.0.0.1", 0), Queue(), validator_class=Validators) as edge:
        r, w = await session(edge.address[1])
        await command(r, w, b"EHLO a")
        assert (await command(r, w, b"RSET"))[0] == 250
        assert (await command(r, w, b"QUIT"))[0] == 221
        await r.read()
        await asyncio.sleep(0.05)
    assert calls == ["rset", "close"]


def test_run_forever_serves_until_sigterm(tmp_path):
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(f"""
        import slimta
        from slimta.edge.smtp import SmtpEdge

        class Queue:
            async def enqueue(self, envelope):
                return [(envelope, "x1")]

        SmtpEdge(("127.0.0.1", {port}), Queue(), hostname="mx.test").start()
        print("started", flush=True)
        slimta.run_forever()
        print("stopped", flush=True)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"started\n"
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    assert s.recv(100).startswith(b"220 mx.test ESMTP")
                    break
            except ConnectionRefusedError:
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert out == b"stopped\n"
    finally:
        proc.kill()


def test_validator_reply_objects_are_replies():
    seen = []

    class Validators(SmtpValidators):
        def handle_banner(self, reply, address):
            seen.append(reply)

    async def go():
        async with SmtpEdge(("127.0.0.1", 0), Queue(), validator_class=Validators,
                            hostname="mx.test") as edge:
            r, w = await asyncio.open_connection("127.0.0.1", edge.address[1])
            await read_reply(r)
            w.close()

    asyncio.run(go())
    assert isinstance(seen[0], Reply) and seen[0].code == "220"
