"""SpamAssassin policy and edge check against a real spamd started by this module.

One spamd (Debian package ``spamd``, rules from ``spamassassin``) serves the
whole module on 127.0.0.1 and a free port. Failures (unreachable, silent,
protocol errors) use a closed port or a small fake server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from email.utils import formatdate, make_msgid

import pytest

from daemons import free_port, stop_process
from slimta.edge.smtp import SmtpValidators
from slimta.envelope import Envelope
from slimta.policy import apply_queue_policies
from slimta.policy.spamassassin import (
    DEFAULT_MAX_SIZE,
    RESULT_ATTRIBUTE,
    SpamAssassin,
    SpamdError,
    SpamResult,
    check_spam,
)
from slimta.queue import QueueError

GTUBE_LINE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: test\r\n\r\n"
    + GTUBE_LINE + b"\r\n"
)


def ham() -> bytes:
    """A plain message with the headers a real client writes (so it scores well under 5)."""
    return (
        "From: Alice <alice@example.com>\r\n"
        "To: Bob <bob@example.com>\r\n"
        "Subject: lunch tomorrow\r\n"
        f"Date: {formatdate()}\r\n"
        f"Message-Id: {make_msgid(domain='example.com')}\r\n"
        "\r\n"
        "Hi Bob,\r\n\r\nshall we meet for lunch tomorrow at noon?\r\n\r\nAlice\r\n"
    ).encode("ascii")


def envelope_of(data: bytes) -> Envelope:
    env = Envelope("alice@example.com", ["bob@example.com"])
    env.parse(data)
    return env


def find_program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"required program {name!r} is not installed (Debian: spamd, spamassassin)")
    return path


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            return s.recv(100).startswith(b"SPAMD/1.5 0 PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def spamd(tmp_path_factory):
    """A spamd on 127.0.0.1:<free port>, shared by the module: its (host, port)."""
    binary = find_program("spamd")
    port = free_port()
    log_path = tmp_path_factory.mktemp("spamd") / "spamd.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [binary, f"--listen=127.0.0.1:{port}", "-u", "nobody", "--max-children=1",
             "--local", "-x", "--syslog=stderr"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not ping(port):
            if proc.poll() is not None:
                pytest.fail(f"spamd exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"spamd did not answer PING in 60 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield ("127.0.0.1", port)
    finally:
        stop_process(proc, 15)


@contextlib.asynccontextmanager
async def fake_spamd(answer: bytes | None, unix_path: str | None = None):
    """A server that reads one request and sends ``answer`` (``None``: never answers).

    Yields (address, requests): the raw requests it got.
    """
    requests: list[bytes] = []
    hold = asyncio.Event()

    async def handle(reader, writer):
        data = await reader.read()  # the client half-closes after the message
        requests.append(data)
        if answer is None:
            await hold.wait()
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    if unix_path is not None:
        server = await asyncio.start_unix_server(handle, unix_path)
        address: tuple[str, int] | str = unix_path
    else:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
    try:
        yield address, requests
    finally:
        hold.set()
        server.close()
        await server.wait_closed()


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def added_fields(env: Envelope) -> tuple[list[bytes], dict[str, str]]:
    """The header lines of ``env`` and its X-Spam-* fields, unfolded."""
    head, _ = env.flatten()
    lines = head.split(b"\r\n")
    fields: dict[str, str] = {}
    for name in ("X-Spam-Status", "X-Spam-Score", "X-Spam-Symbols"):
        values = env.headers.get_all(name) or []
        assert len(values) <= 1, (name, values)
        if values:
            fields[name] = unfold(values[0]).replace("\t", "")
    return lines, fields


# --- the client --------------------------------------------------------------


async def test_ping(spamd):
    assert await SpamAssassin(spamd).ping() is True
    assert await SpamAssassin(("127.0.0.1", free_port()), timeout=5).ping() is False


async def test_check_gtube_is_spam(spamd):
    result = await SpamAssassin(spamd).check(GTUBE)
    assert isinstance(result, SpamResult)
    is_spam, score, threshold, symbols = result
    assert is_spam is True
    assert score >= 1000.0
    assert threshold == 5.0
    assert symbols == []  # CHECK does not ask for them


async def test_scan_gtube_has_symbols(spamd):
    result = await SpamAssassin(spamd).scan(envelope_of(GTUBE))
    assert result.is_spam is True
    assert result.score >= 1000.0
    assert result.threshold == 5.0
    assert "GTUBE" in result.symbols
    assert all(re.fullmatch(r"[A-Z0-9_]+", s) for s in result.symbols), result.symbols


async def test_scan_ham(spamd):
    result = await SpamAssassin(spamd).scan(ham())
    assert result.is_spam is False
    assert result.score < 5.0
    assert result.threshold == 5.0
    assert "GTUBE" not in result.symbols


async def test_headers_request(spamd):
    result, fields = await SpamAssassin(spamd).headers(GTUBE)
    assert result.is_spam is True and result.score >= 1000.0
    names = [name for name, _ in fields]
    assert all(name.startswith("X-Spam-") for name in names)
    assert "X-Spam-Flag" in names
    status = dict(fields)["X-Spam-Status"]
    assert status.startswith("Yes, score=")
    assert "GTUBE" in unfold(status)

    result, fields = await SpamAssassin(spamd).headers(ham())
    assert result.is_spam is False
    assert dict(fields)["X-Spam-Status"].startswith("No, score=")
    assert "X-Spam-Flag" not in dict(fields)


async def test_request_format_and_user():
    answer = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 8\r\nSpam: False ; 1.5 / 5.0\r\n\r\nA_RULE,B"
    async with fake_spamd(answer) as (address, requests):
        result = await SpamAssassin(address, user="alice").scan(b"Subject: x\r\n\r\nhi\r\n")
    assert result == SpamResult(False, 1.5, 5.0, ["A_RULE", "B"])
    assert requests == [
        b"SYMBOLS SPAMC/1.5\r\nContent-length: 18\r\nUser: alice\r\n\r\nSubject: x\r\n\r\nhi\r\n"
    ]
    with pytest.raises(ValueError):
        SpamAssassin(user="two words")


async def test_unix_socket(tmp_path):
    answer = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.0 / 5.0\r\n\r\n"
    async with fake_spamd(answer, unix_path=str(tmp_path / "spamd.sock")) as (address, _):
        assert await SpamAssassin(address).check(b"x") == SpamResult(True, 15.0, 5.0, [])


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SPAMD/1.0 76 Bad header line: SYMBOLS SPAMC/1.5\r\n", "spamd error 76: Bad header"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a spamd answer"),
        (b"", "closed the connection without answering"),
        (b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n", "bad Spam line"),
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "without a Spam line"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 9.0 / 5.0\r\n\r\nAB",
         "cut short"),
    ],
)
async def test_protocol_errors(answer, error):
    async with fake_spamd(answer) as (address, _):
        with pytest.raises(SpamdError, match=error) as info:
            await SpamAssassin(address).scan(GTUBE)
    assert info.value.code == (76 if b" 76 " in answer else None)


async def test_unreachable_and_timeout_raise():
    with pytest.raises(SpamdError, match="spamd at"):
        await SpamAssassin(("127.0.0.1", free_port()), timeout=5).scan(GTUBE)
    async with fake_spamd(None) as (address, _):
        started = time.monotonic()
        with pytest.raises(SpamdError, match=r"did not answer in 0\.3 s"):
            await SpamAssassin(address, timeout=0.3).scan(GTUBE)
        assert time.monotonic() - started < 3


async def test_max_size_not_scanned():
    assert DEFAULT_MAX_SIZE == 500 * 1024
    big = GTUBE + b"x" * 100 + b"\r\n"
    # Nothing listens at this address: a scan would fail; over max_size none is tried.
    sa = SpamAssassin(("127.0.0.1", free_port()), max_size=len(GTUBE), fail_open=False)
    assert await sa.scan(big) is None
    env = envelope_of(big)
    await sa.apply(env)
    assert b"".join(env.flatten()) == big
    assert not hasattr(env, RESULT_ATTRIBUTE)


async def test_default_max_size_scans_below_and_skips_above(spamd):
    sa = SpamAssassin(spamd)
    body = b"".join(b"line %d of a long and boring text\r\n" % i for i in range(20000))
    big = GTUBE + body
    assert len(big) > DEFAULT_MAX_SIZE
    assert await sa.scan(big) is None
    assert (await sa.scan(big[:DEFAULT_MAX_SIZE])).is_spam is True


# --- the queue policy ----------------------------------------------------------


async def test_policy_marks_spam(spamd):
    env = envelope_of(GTUBE)
    await apply_queue_policies([SpamAssassin(spamd)], env)
    result = getattr(env, RESULT_ATTRIBUTE)
    assert result.is_spam
    lines, fields = added_fields(env)
    score = f"{result.score:.1f}"
    tests = ",".join(result.symbols)
    assert fields == {
        "X-Spam-Status": f"Yes, score={score} required=5.0 tests={tests}",
        "X-Spam-Score": score,
        "X-Spam-Symbols": tests,
    }
    # on top, in this order, folded to 78 columns after commas
    names = [line.split(b":")[0] for line in lines if line and line[:1] not in b" \t"]
    assert names[:4] == [b"X-Spam-Status", b"X-Spam-Score", b"X-Spam-Symbols", b"From"]
    assert len(result.symbols) >= 4
    assert all(len(line) <= 78 for line in lines), lines
    assert any(line.startswith(b"\t") for line in lines)
    # the message itself is untouched
    _, body = env.flatten()
    assert body == GTUBE_LINE + b"\r\n"
    assert b"".join(env.flatten()).endswith(GTUBE)


async def test_policy_marks_ham(spamd):
    data = ham()
    env = envelope_of(data)
    await SpamAssassin(spamd).apply(env)
    result = getattr(env, RESULT_ATTRIBUTE)
    _, fields = added_fields(env)
    assert fields["X-Spam-Status"].startswith(f"No, score={result.score or 0.0:.1f} required=5.0 ")
    assert float(fields["X-Spam-Score"]) < 5.0
    assert b"".join(env.flatten()).endswith(data)


async def test_policy_replaces_forged_fields(spamd):
    forged = (
        b"X-Spam-Status: No, score=-100.0 required=5.0 tests=none\r\n"
        b"X-Spam-Score: -100.0\r\n" + GTUBE
    )
    env = envelope_of(forged)
    await SpamAssassin(spamd).apply(env)
    _, fields = added_fields(env)  # asserts one field of each name
    assert fields["X-Spam-Status"].startswith("Yes, score=")
    assert float(fields["X-Spam-Score"]) >= 1000.0
    head, _ = env.flatten()
    assert b"-100.0" not in head


async def test_policy_no_symbols_writes_none():
    answer = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; -0.0 / 5.0\r\n\r\n"
    async with fake_spamd(answer) as (address, _):
        env = envelope_of(b"Subject: hi\r\n\r\nhello\r\n")
        await SpamAssassin(address).apply(env)
    head, _ = env.flatten()
    assert head == (
        b"X-Spam-Status: No, score=0.0 required=5.0 tests=none\r\n"
        b"X-Spam-Score: 0.0\r\n"
        b"X-Spam-Symbols: none\r\n"
        b"Subject: hi\r\n\r\n"
    )


async def test_policy_fails_open_when_unreachable(caplog):
    env = envelope_of(GTUBE)
    with caplog.at_level(logging.WARNING, logger="slimta.policy.spamassassin"):
        await SpamAssassin(("127.0.0.1", free_port()), timeout=5).apply(env)
    assert b"".join(env.flatten()) == GTUBE
    assert "spam check failed, message passed unchecked" in caplog.text


async def test_policy_fails_open_on_timeout(caplog):
    env = envelope_of(GTUBE)
    async with fake_spamd(None) as (address, _):
        with caplog.at_level(logging.WARNING, logger="slimta.policy.spamassassin"):
            await SpamAssassin(address, timeout=0.3).apply(env)
    assert b"".join(env.flatten()) == GTUBE
    assert "did not answer in 0.3 s" in caplog.text


async def test_policy_fail_closed():
    env = envelope_of(GTUBE)
    sa = SpamAssassin(("127.0.0.1", free_port()), timeout=5, fail_open=False)
    with pytest.raises(QueueError) as info:
        await sa.apply(env)
    reply = info.value.reply
    assert reply.code == "451"
    assert reply.enhanced_status_code == "4.7.1"
    assert reply.text == "Message could not be checked for spam, try again later"
    assert b"".join(env.flatten()) == GTUBE


# --- the edge check -------------------------------------------------------------


def make_validators(sa: SpamAssassin, **options):
    class Validators(SmtpValidators):
        seen: list = []

        @check_spam(sa, **options)
        def handle_have_data(self, reply, data):
            # runs only for accepted messages, with the verdict at hand
            Validators.seen.append(getattr(self.session.envelope, RESULT_ATTRIBUTE, None))

    return Validators


def send(port: int, data: bytes):
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        return client.sendmail("alice@example.com", ["bob@example.com"], data)


def test_edge_rejects_gtube(spamd, run_edge):
    validators = make_validators(SpamAssassin(spamd), reject_above=10.0)
    edge = run_edge(validator_class=validators)
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(edge.port, GTUBE)
    assert info.value.smtp_code == 550
    assert info.value.smtp_error == b"5.7.1 Message rejected as spam"
    assert edge.queue.envelopes == []
    assert validators.seen == []


def test_edge_accepts_and_queues_ham(spamd, run_edge):
    validators = make_validators(SpamAssassin(spamd), reject_above=10.0)
    edge = run_edge(validator_class=validators)
    data = ham()
    assert send(edge.port, data) == {}
    [env] = edge.queue.envelopes
    assert env.recipients == ["bob@example.com"]
    result = getattr(env, RESULT_ATTRIBUTE)
    assert result.is_spam is False and result.score < 5.0
    assert validators.seen == [result]
    # The queue policy uses the edge's verdict: no second scan (nothing listens here).
    policy = SpamAssassin(("127.0.0.1", free_port()), fail_open=False)
    asyncio.run(policy.apply(env))
    _, fields = added_fields(env)
    assert fields["X-Spam-Status"].startswith("No, score=")
    assert b"".join(env.flatten()).endswith(data)


def test_edge_threshold_is_spamd_s_by_default(spamd, run_edge):
    edge = run_edge(validator_class=make_validators(SpamAssassin(spamd)))
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(edge.port, GTUBE)
    assert (info.value.smtp_code, info.value.smtp_error) == (
        550, b"5.7.1 Message rejected as spam")
    assert send(edge.port, ham()) == {}
    assert len(edge.queue.envelopes) == 1


def test_edge_below_reject_above_is_accepted_and_marked(spamd, run_edge):
    validators = make_validators(SpamAssassin(spamd), reject_above=5000.0)
    edge = run_edge(validator_class=validators)
    assert send(edge.port, GTUBE) == {}
    [env] = edge.queue.envelopes
    assert getattr(env, RESULT_ATTRIBUTE).is_spam is True
    asyncio.run(SpamAssassin(spamd).apply(env))
    _, fields = added_fields(env)
    assert fields["X-Spam-Status"].startswith("Yes, score=")


def test_edge_message_template(spamd, run_edge):
    validators = make_validators(
        SpamAssassin(spamd), reject_above=10.0, match_code="554",
        match_message="5.7.1 Spam score {score} over {threshold}: {symbols} {{sorry}}",
    )
    edge = run_edge(validator_class=validators)
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(edge.port, GTUBE)
    assert info.value.smtp_code == 554
    text = info.value.smtp_error.decode()
    match = re.fullmatch(r"5\.7\.1 Spam score (\d+\.\d) over 5\.0: ([A-Z0-9_,]+) \{sorry\}", text)
    assert match, text
    assert float(match.group(1)) >= 1000.0
    assert "GTUBE" in match.group(2).split(",")


def test_edge_over_max_size_accepted_unscanned(run_edge):
    # nothing listens: a scan would fail closed; the message is too big to be scanned
    sa = SpamAssassin(("127.0.0.1", free_port()), max_size=64, fail_open=False)
    edge = run_edge(validator_class=make_validators(sa, reject_above=1.0))
    assert send(edge.port, GTUBE) == {}
    [env] = edge.queue.envelopes
    assert not hasattr(env, RESULT_ATTRIBUTE)


def test_edge_fails_open_when_unreachable(run_edge, caplog):
    sa = SpamAssassin(("127.0.0.1", free_port()), timeout=5)
    edge = run_edge(validator_class=make_validators(sa, reject_above=1.0))
    with caplog.at_level(logging.WARNING, logger="slimta.policy.spamassassin"):
        assert send(edge.port, GTUBE) == {}
    assert len(edge.queue.envelopes) == 1
    assert "accepted unchecked" in caplog.text


def test_edge_fails_closed_on_timeout(run_edge):
    async def silent(reader, writer):
        await reader.read()
        await asyncio.sleep(30)

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(silent, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        address = server.sockets[0].getsockname()[:2]
        sa = SpamAssassin(address, timeout=0.5, fail_open=False)
        edge = run_edge(validator_class=make_validators(sa, reject_above=1.0))
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(edge.port, GTUBE)
        assert info.value.smtp_code == 451
        assert info.value.smtp_error == (
            b"4.7.1 Message could not be checked for spam, try again later")
        assert edge.queue.envelopes == []
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_check_spam_needs_an_error_code():
    with pytest.raises(ValueError):
        check_spam(SpamAssassin(), match_code="250")
