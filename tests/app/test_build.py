"""slimta.app.build: from a config to running edges, queues and relays."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import urllib.request
from pathlib import Path

import pytest

from slimta.app.build import build, data_dir_of, ensure_first_user
from slimta.app.cli import load
from slimta.app.config import ConfigError, Listener, load_config, parse_config
from slimta.envelope import Envelope

COMPAT = Path("/work/shared/compat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen_free(config, *names: str) -> dict[str, int]:
    ports = {}
    for name in names:
        ports[name] = free_port()
        config.edge[name].listener = [Listener(interface="127.0.0.1", port=ports[name])]
    return ports


async def wait_for(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def compat(tmp_path):
    if not COMPAT.is_dir():
        pytest.skip("no compat sample")
    for f in COMPAT.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return load_config(tmp_path / "slimta.yaml.sample")


async def test_compat_sample_runs(compat):
    ports = listen_free(compat, "inbound", "outbound")
    app = build(compat)
    assert set(app.queues) == {"inbound", "outbound"} and set(app.relays) == {"inbound",
                                                                              "outbound"}
    delivered = []
    relay = app.relays["inbound"]
    attempt = relay.attempt

    async def counted(envelope, attempts):
        delivered.append(envelope)
        return await attempt(envelope, attempts)

    relay.attempt = counted
    app.start()
    try:
        await app.started()

        def inbound():
            with smtplib.SMTP("127.0.0.1", ports["inbound"], timeout=10) as client:
                assert client.docmd("NOOP")[0] == 250
                refused = client.sendmail("a@example.net", ["postmaster@example.com"],
                                          b"Subject: hi\r\n\r\nhello\r\n")
                with pytest.raises(smtplib.SMTPRecipientsRefused):
                    client.sendmail("a@example.net", ["nobody@example.com"], b"\r\nx\r\n")
                return refused

        assert await asyncio.to_thread(inbound) == {}
        await wait_for(lambda: delivered)
        assert delivered[0].recipients == ["postmaster@example.com"]
        # the policies ran: Date, Message-Id and Received were added
        assert {"Date", "Message-Id", "Received"} <= set(delivered[0].headers.keys())

        def outbound():
            with smtplib.SMTP("127.0.0.1", ports["outbound"], timeout=10) as client:
                with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                    client.sendmail("user@example.com", ["x@example.org"], b"\r\nx\r\n")
                assert refused.value.smtp_code == 530
                client.ehlo()
                client.login("user@example.com", "abcd1234")  # CRAM-MD5 (no TLS)
                return client.sendmail("user@example.com", ["x@example.org"], b"\r\nx\r\n")

        assert await asyncio.to_thread(outbound) == {}
    finally:
        await app.stop()


async def test_embedded_default_delivers_to_maildir_and_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTA_DATA_DIR", str(tmp_path / "data"))
    config = load(None)
    ports = listen_free(config, "inbound", "submission")
    admin_port = free_port()
    config.process_settings().admin.listener = Listener(interface="127.0.0.1",
                                                        port=admin_port)
    assert data_dir_of(config) == str(tmp_path / "data")
    user, password, path = ensure_first_user(config)
    assert Path(path).exists() and ensure_first_user(config) is None
    assert password not in Path(path).read_bytes().decode("latin-1")
    app = build(config)
    app.start()
    try:
        await app.started()

        def metrics() -> str:
            url = f"http://127.0.0.1:{admin_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.read().decode()

        before = await asyncio.to_thread(metrics)
        assert 'slimta_messages_received_total{result="accepted"} 0.0' in before

        def inbound():
            with smtplib.SMTP("127.0.0.1", ports["inbound"], timeout=10) as client:
                with pytest.raises(smtplib.SMTPRecipientsRefused):
                    client.sendmail("a@example.net", ["someone@example.org"], b"\r\nx\r\n")
                return client.sendmail("a@example.net", ["someone@localhost"],
                                       b"Subject: hi\r\n\r\nhello\r\n")

        assert await asyncio.to_thread(inbound) == {}
        new = tmp_path / "data/Maildir/localhost/someone/new"
        await wait_for(lambda: new.is_dir() and any(new.iterdir()))
        (message,) = new.iterdir()
        assert b"hello" in message.read_bytes()
        after = await asyncio.to_thread(metrics)
        assert 'slimta_messages_received_total{result="accepted"} 1.0' in after

        def submission():
            with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as client:
                client.ehlo()
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.login(user, "wrong")
                client.login(user, password)

        await asyncio.to_thread(submission)
        assert (tmp_path / "data/inbound.db").exists()
    finally:
        await app.stop()


RULES = """
edge:
  in:
    type: smtp
    queue: q
    listener: 127.0.0.1:0
    rules:
      banner: '{fqdn} says hi'
      only_senders: ['@good.test', 'boss@other.test']
      regex_recipients: '^r'
      lookup_recipients: {type: config, map: {r1@x.test: {}, r2@x.test: {}}}
queue:
  q: {type: memory, relay: r, retry: {maximum: 3, delay: 30*x}}
relay:
  r: {type: blackhole}
"""


async def test_rules():
    config = parse_config(__import__("yaml").safe_load(RULES))
    port = listen_free(config, "in")["in"]
    config.edge["in"].hostname = "mx.test"
    app = build(config)
    app.start()
    try:
        await app.started()

        def session():
            client = smtplib.SMTP(timeout=10)
            assert client.connect("127.0.0.1", port) == (220, b"mx.test says hi")
            with client:
                client.ehlo()
                assert client.mail("bad@evil.test")[0] == 550
                client.rset()
                assert client.mail("boss@other.test")[0] == 250
                client.rset()
                assert client.mail("a@GOOD.test")[0] == 250
                assert client.rcpt("x1@x.test")[0] == 550   # not ^r
                assert client.rcpt("r3@x.test")[0] == 550   # not in the lookup
                assert client.rcpt("r1@x.test")[0] == 250

        await asyncio.to_thread(session)
    finally:
        await app.stop()
    backoff = app.queues["q"].backoff
    env = Envelope("a@good.test", ["r1@x.test"])
    assert backoff(env, 1) == 30 and backoff(env, 2) == 60 and backoff(env, 3) is None


def test_no_edge_no_relay_and_build_errors(tmp_path):
    config = parse_config(__import__("yaml").safe_load(RULES))
    app = build(config, no_relay=True)
    assert app.relays == {} and app.queues["q"].relay is None and app.edges
    app = build(config, no_edge=True)
    assert app.edges == {} and app.queues["q"].relay is app.relays["r"]
    config.relay["r"] = parse_config({"relay": {"r": {
        "type": "custom", "factory": "no_such_module:make"}}}).relay["r"]
    with pytest.raises(ConfigError, match=r"relay\.r\.factory: cannot load factory"):
        build(config)
    bad = parse_config({"edge": {"e": {"type": "smtp", "queue": "q", "rules": {
        "banner": "{host}"}}}, "queue": {"q": {"type": "memory"}}})
    with pytest.raises(ConfigError, match=r"edge\.e\.rules\.banner: bad template"):
        build(bad)
    proxy = parse_config({"queue": {"q": {"type": "proxy", "relay": "r"}},
                          "relay": {"r": {"type": "blackhole"}}})
    with pytest.raises(ConfigError, match="proxy queue cannot run without its relay"):
        build(proxy, no_relay=True)
    assert type(build(proxy).queues["q"]).__name__ == "ProxyQueue"


def test_every_policy_type(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (tmp_path / "dkim.pem").write_bytes(pem)
    (tmp_path / "slimta.yaml").write_text("""
lookup:
  aliases: {type: config, map: {a@x.test: {alias: b@x.test}}}
queue:
  q:
    type: memory
    policies:
      - {type: add_date_header}
      - {type: add_messageid_header}
      - {type: add_received_header}
      - {type: recipient_split}
      - {type: recipient_domain_split}
      - {type: forward, mapping: {'^a@': 'b@'}}
      - {type: spamassassin}
      - {type: lookup, lookup: aliases}
      - {type: dkim_verify}
      - {type: add_authentication_results}
      - {type: dkim_sign, keys: {x.test: {selector: s1, key_file: dkim.pem}}}
      - {type: arc_seal, selector: s1, domain: x.test, key_file: dkim.pem}
""")
    app = build(load_config(tmp_path / "slimta.yaml"))
    names = [type(p).__name__ for p in app.queues["q"].queue_policies]
    assert names == ["AddDateHeader", "AddMessageIdHeader", "AddReceivedHeader",
                     "RecipientSplit", "RecipientDomainSplit", "Forward", "SpamAssassin",
                     "LookupPolicy", "DkimVerify", "AddAuthenticationResults", "DkimSign",
                     "ArcSeal"]
    assert app.queues["q"].queue_policies[7].lookup is app.lookups["aliases"]


def test_every_relay_type(tmp_path):
    config = parse_config({"relay": {
        "mx": {"type": "mx"}, "static": {"type": "static", "host": "smart.test"},
        "lmtp": {"type": "lmtp", "host": "/run/lmtp"}, "pipe": {"type": "pipe", "args": ["cat"]},
        "maildrop": {"type": "maildrop"}, "dovecot": {"type": "dovecot"},
        "maildir": {"type": "maildir", "path": "/tmp/x/{localpart}"},
        "blackhole": {"type": "blackhole"},
    }})
    names = {n: type(r).__name__ for n, r in build(config).relays.items()}
    assert names == {"mx": "MxSmtpRelay", "static": "StaticSmtpRelay",
                     "lmtp": "StaticLmtpRelay", "pipe": "PipeRelay",
                     "maildrop": "MaildropRelay", "dovecot": "DovecotLdaRelay",
                     "maildir": "MaildirRelay", "blackhole": "BlackholeRelay"}


async def test_tls_edge_offers_starttls_and_auth_over_it(tls_cert, client_tls_context):
    certfile = tls_cert[0]  # the key is in the same file
    config = parse_config({
        "edge": {"sub": {"type": "smtp", "queue": "q", "tls": {"certfile": certfile},
                         "rules": {"lookup_credentials": {
                             "type": "config", "map": {"u@x.test": {"password": "pw"}}}}}},
        "queue": {"q": {"type": "memory", "relay": "r"}},
        "relay": {"r": {"type": "blackhole"}},
    })
    port = listen_free(config, "sub")["sub"]
    app = build(config)
    app.start()
    try:
        await app.started()

        def session():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                assert client.has_extn("starttls")
                assert "PLAIN" not in client.esmtp_features.get("auth", "")
                client.starttls(context=client_tls_context)
                client.ehlo()
                assert "PLAIN" in client.esmtp_features["auth"]
                client.login("u@x.test", "pw")
                return client.sendmail("u@x.test", ["a@example.org"], b"\r\nhi\r\n")

        assert await asyncio.to_thread(session) == {}
    finally:
        await app.stop()


async def test_reject_spam_asks_spamd_at_end_of_data():
    answer = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 15.0 / 5.0\r\n\r\n"

    async def handle(reader, writer):
        await reader.read()
        writer.write(answer)
        await writer.drain()
        writer.close()

    spamd = await asyncio.start_server(handle, "127.0.0.1", 0)
    spamd_port = spamd.sockets[0].getsockname()[1]
    config = parse_config({
        "edge": {"in": {"type": "smtp", "queue": "q", "rules": {
            "reject_spam": {"host": "127.0.0.1", "port": spamd_port},
            "reject_spf": ["fail"], "dnsbl": ["bl.test"]}}},
        "queue": {"q": {"type": "memory"}},
    })
    port = listen_free(config, "in")["in"]
    app = build(config)
    app.start()
    try:
        await app.started()

        def session():
            # loopback clients skip the SPF and DNSBL checks; spamd calls it spam
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    client.sendmail("a@example.net", ["b@example.org"], b"\r\nbuy\r\n")
                return refused.value.smtp_code

        assert await asyncio.to_thread(session) == 550
    finally:
        await app.stop()
        spamd.close()
        await spamd.wait_closed()


def test_admin_allowed_hosts_and_shared_queue_types(pg_schema, redis_prefix):
    config = parse_config({
        "process": {"slimta": {"admin": {"allowed_hosts": ["mail.example.com"]}}},
        "queue": {
            "pg": {"type": "postgres", "dsn": "postgresql://127.0.0.1/test",
                   "schema": pg_schema, "lease": 60, "owner": "mx1"},
            "rd": {"type": "redis", "host": "127.0.0.1", "prefix": redis_prefix, "db": 0},
        },
    })
    app = build(config)
    assert app.admin.allowed_hosts == frozenset({"mail.example.com"})
    pg, rd = app.queues["pg"], app.queues["rd"]
    assert pg.shared and pg.lease == 60 and pg.store.owner == "mx1"
    assert type(pg.store).__name__ == "PostgresStorage"
    assert rd.shared and type(rd.store).__name__ == "RedisStorage"


def test_each_worker_holds_its_own_leases(monkeypatch):
    """A configured lease owner gets the worker's number in worker processes."""
    from slimta.app import build as B

    class Worker:
        number = 2

    monkeypatch.setattr(B, "worker", Worker())
    config = parse_config({"queue": {"pg": {"type": "postgres", "owner": "mx1"}}})
    assert build(config).queues["pg"].store.owner == "mx1:2"
    assert config.queue["pg"].owner == "mx1"
