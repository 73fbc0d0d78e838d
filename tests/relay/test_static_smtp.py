"""StaticSmtpRelay and StaticLmtpRelay against real servers: smtp-sink and our own SmtpEdge."""

from __future__ import annotations

import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.smtp.static import StaticLmtpRelay, StaticSmtpRelay
from slimta.smtp.reply import Reply

MSG = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: relay test\r\n\r\n"
       b"first line\r\n.a line with a leading dot\r\nlast line\r\n")


def envelope(rcpts=("b@example.com", "c@example.com"), data=MSG, **fields) -> Envelope:
    env = Envelope("a@example.com", list(rcpts))
    env.parse(data)
    for k, v in fields.items():
        setattr(env, k, v)
    return env


def relay_for(sink, **kwargs) -> StaticSmtpRelay:
    kwargs.setdefault("ehlo_as", "relay.test")
    return StaticSmtpRelay("127.0.0.1", sink.port, **kwargs)


def delivered(results, rcpts):
    assert set(results) == set(rcpts)
    for rcpt in rcpts:
        assert isinstance(results[rcpt], Reply) and results[rcpt].code == "250", results


async def test_delivers_byte_exact_to_smtp_sink(smtp_sink):
    sink = smtp_sink()
    relay = relay_for(sink)
    results = await relay.attempt(envelope(), 0)
    delivered(results, ["b@example.com", "c@example.com"])
    await relay.close()
    [msg] = sink.messages()
    assert msg["sender"] == "a@example.com"
    assert msg["recipients"] == ["b@example.com", "c@example.com"]
    assert msg["data"].rstrip(b"\r\n") == MSG.rstrip(b"\r\n")


async def test_without_pipelining(smtp_sink):
    sink = smtp_sink("-p")
    relay = relay_for(sink)
    delivered(await relay.attempt(envelope(), 0), ["b@example.com", "c@example.com"])
    await relay.close()
    assert len(sink.messages()) == 1


async def test_connection_is_reused(smtp_sink):
    sink = smtp_sink()
    relay = relay_for(sink)
    for _ in range(5):
        delivered(await relay.attempt(envelope(["b@example.com"]), 0), ["b@example.com"])
    [session] = relay.pool._idle
    assert session.deliveries == 5
    await relay.close()
    assert len(sink.messages()) == 5


async def test_rcpt_soft_reject_is_transient_per_recipient(smtp_sink):
    sink = smtp_sink("-r", "rcpt")
    relay = relay_for(sink)
    results = await relay.attempt(envelope(), 0)
    for rcpt in ("b@example.com", "c@example.com"):
        err = results[rcpt]
        assert isinstance(err, TransientRelayError)
        assert err.reply.code.startswith("4")
        assert "RCPT" in str(err)
    await relay.close()
    assert sink.messages() == []


async def test_mail_hard_reject_is_permanent(smtp_sink):
    sink = smtp_sink("-f", "mail")
    relay = relay_for(sink)
    with pytest.raises(PermanentRelayError) as info:
        await relay.attempt(envelope(), 0)
    assert info.value.reply.code.startswith("5")
    assert "MAIL" in str(info.value)
    await relay.close()


async def test_data_soft_reject_is_transient_for_all(smtp_sink):
    sink = smtp_sink("-r", "data")
    relay = relay_for(sink)
    results = await relay.attempt(envelope(), 0)
    assert all(isinstance(r, TransientRelayError) for r in results.values())
    await relay.close()


async def test_connection_refused_is_transient():
    relay = StaticSmtpRelay("127.0.0.1", 1, connect_timeout=2)
    with pytest.raises(TransientRelayError) as info:
        await relay.attempt(envelope(), 0)
    assert info.value.reply.code == "451"


async def test_smtputf8_to_a_server_without_it_fails_permanently(smtp_sink):
    sink = smtp_sink()
    relay = relay_for(sink)
    with pytest.raises(PermanentRelayError) as info:
        await relay.attempt(envelope(["b\u00fc@example.com"], smtputf8=True), 0)
    assert (info.value.reply.code, info.value.reply.enhanced_status_code) == ("553", "5.6.7")
    await relay.close()


async def test_8bit_mail_is_converted_for_a_server_without_8bitmime(smtp_sink):
    sink = smtp_sink("-8")
    relay = relay_for(sink)
    data = (b"From: a@example.com\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"\r\ncaf\xc3\xa9\r\n")
    delivered(await relay.attempt(envelope(["b@example.com"], data=data, body="8BITMIME"), 0),
              ["b@example.com"])
    await relay.close()
    [msg] = sink.messages()
    assert all(b < 128 for b in msg["data"])
    assert b"quoted-printable" in msg["data"].lower()


async def test_tls_required_without_starttls_is_transient(smtp_sink):
    sink = smtp_sink()
    relay = relay_for(sink, tls_required=True)
    with pytest.raises(TransientRelayError) as info:
        await relay.attempt(envelope(), 0)
    assert info.value.reply.enhanced_status_code == "4.7.0"


async def test_dsn_parameters_are_passed_on(smtp_sink):
    sink = smtp_sink()
    relay = relay_for(sink)
    env = envelope(["b@example.com"], ret="HDRS", envid="ID+1",
                   rcpt_params={"b@example.com": {"notify": ["SUCCESS", "FAILURE"],
                                                  "orcpt": "rfc822;b@example.com"}})
    delivered(await relay.attempt(env, 0), ["b@example.com"])
    await relay.close()
    [msg] = sink.messages()
    assert "RET=HDRS" in msg["mail_args"] and "ENVID=" in msg["mail_args"]
    assert "NOTIFY=SUCCESS,FAILURE" in msg["rcpt_args"][0]
    assert "ORCPT=rfc822;b@example.com" in msg["rcpt_args"][0]


async def test_lmtp_gives_a_result_per_recipient(smtp_sink):
    sink = smtp_sink("-L")
    relay = StaticLmtpRelay("127.0.0.1", sink.port, ehlo_as="relay.test")
    delivered(await relay.attempt(envelope(), 0), ["b@example.com", "c@example.com"])
    await relay.close()
    assert len(sink.messages()) == 1


class CheckingValidators(SmtpValidators):
    def handle_auth(self, reply, creds):
        if not (creds.authcid == "relayuser" and creds.check_secret("s3cret")):
            reply.code, reply.message = "535", "5.7.8 Nope"


@pytest.mark.parametrize("pipelined", [True, False])
async def test_starttls_auth_and_bdat_to_our_own_edge(run_edge, server_tls_context,
                                                      client_tls_context, pipelined):
    edge = run_edge(context=server_tls_context, auth=True, validator_class=CheckingValidators,
                    hostname="smarthost.test")
    relay = StaticSmtpRelay("127.0.0.1", edge.port, context=client_tls_context,
                            tls_required=True, credentials=("relayuser", "s3cret"),
                            ehlo_as="relay.test")
    if not pipelined:
        relay.pool.options.pipelining = False
    delivered(await relay.attempt(envelope(), 0), ["b@example.com", "c@example.com"])
    await relay.close()
    [env] = edge.queue.envelopes
    assert b"".join(env.flatten()) == MSG
    assert env.client["protocol"] == "ESMTPSA"
    assert env.client["auth"] == "relayuser"
    assert env.client["name"] == "relay.test"


async def test_wrong_credentials_are_a_failure(run_edge, server_tls_context, client_tls_context):
    edge = run_edge(context=server_tls_context, auth=True, validator_class=CheckingValidators)
    relay = StaticSmtpRelay("127.0.0.1", edge.port, context=client_tls_context,
                            credentials=("relayuser", "wrong"), ehlo_as="relay.test")
    with pytest.raises(PermanentRelayError) as info:
        await relay.attempt(envelope(), 0)
    assert "AUTH" in str(info.value)
    assert edge.queue.envelopes == []


async def test_an_invalid_envelope_fails_permanently_before_sending(smtp_sink):
    sink = smtp_sink()
    relay = relay_for(sink)
    with pytest.raises(PermanentRelayError) as info:
        await relay.attempt(envelope(["b@example.com\r\nRCPT TO:<evil@example.com>"]), 0)
    assert info.value.reply.code == "550"
    await relay.close()
    assert sink.messages() == []
